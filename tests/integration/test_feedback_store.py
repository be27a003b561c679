"""The feedback service's database, on SQLite and on a real PostgreSQL server (tests/conftest.py
starts one): migrations, labellers and their tokens, sessions, the judging rules, the statistics
and the export. Every test runs on both."""
from __future__ import annotations

import concurrent.futures
import datetime as dt

import pytest
import sqlalchemy as sa

from services.common.errors import FailedPrecondition, InvalidArgument, NotFound, Unauthenticated
from services.feedback.store import NewPair, Store, token_hash


def new_pair(prompt="How do I study?", first="Make a plan.", second="Relax.", version=3, scores=(1.0, -1.0),
             rm_version="rm-a") -> NewPair:
    return NewPair(prompt=prompt, first=first, second=second, policy_version=version,
                   sampling={"temperature": 1.0, "top_p": 1.0, "max_tokens": 64}, first_finish="stop",
                   second_finish="length", rm_score_first=scores[0], rm_score_second=scores[1], rm_version=rm_version)


@pytest.fixture
def store(feedback_db):
    s = Store(feedback_db)
    s.migrate()
    yield s
    s.close()


def test_migrations_create_the_schema_the_code_maps_and_run_twice(feedback_db):
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    from services.feedback.store import Base

    s = Store(feedback_db)
    with pytest.raises(FailedPrecondition, match="rlhf feedback migrate"):
        s.check_schema()  # a new database is not at the release's schema
    assert s.migrate() == s.head() == s.migrate()  # idempotent: the server migrates at every start
    s.check_schema()
    with s.engine.connect() as connection:
        diff = compare_metadata(MigrationContext.configure(connection), Base.metadata)
    # Only differences of no consequence may remain (none expected): a column or table missing
    # from the migrations would be listed here.
    assert [d for d in diff if d[0] in ("add_table", "add_column", "remove_table", "remove_column")] == [], diff
    s.close()


def test_tokens_are_hashed_at_rest_and_checked(store):
    token = store.add_labeller("ann")
    assert store.by_token(token).name == "ann"
    with store.engine.connect() as c:
        dump = " ".join(str(v) for row in c.execute(sa.text("SELECT * FROM labellers")) for v in row)
    assert token not in dump and token_hash(token) in dump
    with pytest.raises(Unauthenticated):
        store.by_token(token + "x")
    with pytest.raises(FailedPrecondition, match="exists"):
        store.add_labeller("ann")
    with pytest.raises(InvalidArgument, match="1 to 100"):
        store.add_labeller(" ")
    new = store.rotate_token("ann")
    with pytest.raises(Unauthenticated):
        store.by_token(token)
    assert store.by_token(new).name == "ann"
    store.set_active("ann", False)
    with pytest.raises(Unauthenticated):
        store.by_token(new)
    with pytest.raises(NotFound):
        store.set_active("nobody", True)


def test_sessions_log_in_expire_and_log_out(store):
    who = store.by_token(store.add_labeller("ann"))
    cookie, csrf = store.open_session(who)
    again = store.by_session(cookie)
    assert (again.name, again.csrf_token) == ("ann", csrf)
    with store._session.begin() as s:  # age the session past its end
        s.execute(sa.text("UPDATE sessions SET expires_at = :t"), {"t": dt.datetime(2000, 1, 1, tzinfo=dt.timezone.utc)})
    with pytest.raises(Unauthenticated, match="expired"):
        store.by_session(cookie)
    cookie, _ = store.open_session(who)
    store.close_session(cookie)
    with pytest.raises(Unauthenticated):
        store.by_session(cookie)


def test_a_choice_answers_only_a_pair_shown_and_only_once(store):
    ann = store.by_token(store.add_labeller("ann"))
    bob = store.by_token(store.add_labeller("bob"))
    shown = store.add_pair(ann, new_pair())
    assert store.open_pair(ann, dt.timedelta(minutes=5)) == shown  # a reload shows the same pair
    assert store.open_pair(bob, dt.timedelta(minutes=5)) is None
    with pytest.raises(NotFound, match="not shown to bob"):
        store.judge(bob, shown.pair_id, "first")
    with pytest.raises(InvalidArgument, match="choice must be one of"):
        store.judge(ann, shown.pair_id, "better")
    for bad in ("1", 2 ** 40, -1, True):  # a string, past the column's range, negative, a bool
        with pytest.raises(InvalidArgument, match="pair_id must be a positive integer"):
            store.judge(ann, bad, "first")
    store.judge(ann, shown.pair_id, "first")
    with pytest.raises(FailedPrecondition, match="judged already"):
        store.judge(ann, shown.pair_id, "second")
    assert store.open_pair(ann, dt.timedelta(minutes=5)) is None


def test_pairs_judged_twice_give_the_agreement_and_the_export(store):
    ann = store.by_token(store.add_labeller("ann"))
    bob = store.by_token(store.add_labeller("bob"))
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}]
    # ann: four pairs; the reward model prefers the first answer of each
    choices = {"p1": "first", "p2": "second", "p3": "tie", "p4": "skip"}
    ids = {}
    for name, choice in choices.items():
        ids[name] = store.add_pair(ann, new_pair(prompt=chat if name == "p2" else name, version=5)).pair_id
        store.judge(ann, ids[name], choice)
    # bob is shown again only pairs ann judged (not skipped), newest first, none of an old version
    assert store.pair_to_repeat(bob, min_policy_version=6) is None
    repeats = []
    while (p := store.pair_to_repeat(bob, min_policy_version=5)) is not None:
        repeats.append(p.pair_id)
        store.judge(bob, p.pair_id, {"p1": "first", "p2": "first", "p3": "tie"}[p.prompt if isinstance(p.prompt, str)
                                                                             else "p2"])
    assert sorted(repeats) == sorted([ids["p1"], ids["p2"], ids["p3"]])
    # agreement: p1 agree, p2 disagree, p3 (tie, tie) agree
    agreement = store.agreement()
    assert (agreement.compared, agreement.agreed) == (3, 2)
    stats = store.stats(ann)
    assert (stats.judged, stats.skipped, stats.agreement.compared, stats.agreement.agreed) == (4, 1, 3, 2)
    # the reward model (first > second everywhere) agrees with p1 (ann, bob), p2 (bob); not p2 (ann)
    rm = store.rm_agreement(window=100)
    assert (rm.compared, rm.agreed) == (4, 3)
    assert store.rm_agreement(window=1).compared == 1  # the newest judgment only
    rows = store.export_rows()
    assert len(rows) == 4  # decisive judgments only: p1 x2, p2 x2
    by = {(r["labeller"], r["pair_id"]): r for r in rows}
    assert by[("ann", ids["p2"])]["prompt"] == chat  # a conversation stays one; answers become assistant turns
    assert by[("ann", ids["p2"])]["chosen"] == [{"role": "assistant", "content": "Relax."}]
    assert by[("bob", ids["p2"])]["chosen"] == [{"role": "assistant", "content": "Make a plan."}]
    assert by[("ann", ids["p1"])] | {"judged_at": None, "judgment_id": None} == {
        "prompt": "p1", "chosen": "Make a plan.", "rejected": "Relax.", "pair_id": ids["p1"], "labeller": "ann",
        "policy_version": 5, "rm_version": "rm-a", "rm_score_chosen": 1.0, "rm_score_rejected": -1.0,
        "judged_at": None, "judgment_id": None}
    last = max(r["judgment_id"] for r in rows)
    assert store.export_rows(since_id=last) == []
    assert store.export_rows(min_policy_version=6) == []


def test_concurrent_labellers_lose_no_judgment(store):
    labellers = [store.by_token(store.add_labeller(f"l{i}")) for i in range(4)]

    def work(who):
        for i in range(10):
            p = store.add_pair(who, new_pair(prompt=f"{who.name}-{i}"))
            store.judge(who, p.pair_id, "first" if i % 2 else "second")
        return who.name

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        assert sorted(pool.map(work, labellers)) == ["l0", "l1", "l2", "l3"]
    assert store.counts() == {"pairs": 40, "judgments": 40, "labellers": 4}
    assert len(store.export_rows()) == 40


def test_the_operators_commands(tmp_path, capsys):
    """`rlhf feedback ...` on a SQLite file: migrate, labellers in and out, tokens once; and the
    server refuses an old schema with --no-migrate (exit 2, saying what to run)."""
    from services.cli import main

    db = f"sqlite:///{tmp_path / 'f.db'}"
    assert main(["serve", "feedback", "--db", db, "--no-migrate", "--policy", "x:1", "--prompts", "p.jsonl"]) == 2
    assert "rlhf feedback migrate" in capsys.readouterr().err
    assert main(["feedback", "add-labeller", "ann", "--db", db]) == 2  # not migrated yet
    assert main(["feedback", "migrate", "--db", db]) == 0
    capsys.readouterr()
    assert main(["feedback", "add-labeller", "ann", "--db", db]) == 0
    token = capsys.readouterr().out.strip()
    store = Store(db)
    assert store.by_token(token).name == "ann"
    assert main(["feedback", "add-labeller", "ann", "--db", db]) == 2 and "exists" in capsys.readouterr().err
    assert main(["feedback", "disable", "ann", "--db", db]) == 0
    with pytest.raises(Unauthenticated):
        store.by_token(token)
    assert main(["feedback", "enable", "ann", "--db", db]) == 0
    assert main(["feedback", "add-labeller", "ann", "--rotate", "--db", db]) == 0
    capsys.readouterr()
    with pytest.raises(Unauthenticated):
        store.by_token(token)
    assert main(["feedback", "labellers", "--db", db]) == 0
    assert capsys.readouterr().out == "ann\tactive\t0 judgments\n"
    assert main(["feedback", "export", "--db", db, "--out", str(tmp_path / "x.jsonl")]) == 0
    assert (tmp_path / "x.jsonl").read_text() == "" and "0 preference rows" in capsys.readouterr().out
    store.close()
