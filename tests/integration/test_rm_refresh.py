"""`rlhf train rm --init`: a reward model refreshed from the feedback database, with a replay share of
the comparisons it was trained on, reporting accuracy on old and new comparisons apart (before and
after) and the labellers' agreement as the noise ceiling."""
from __future__ import annotations

import json
import random
import subprocess
import sys

import pytest

from services.demo.data import make_answer, write_demo_data
from services.feedback.store import NewPair, Store

# The people's taste moved: short answers now win (vague > clear > long), the reverse of what the
# served model learned on the demo data (clear > long > vague).
NEW_RANK = {"vague": 2, "clear": 1, "long": 0}


def rlhf(*args, timeout=900):
    proc = subprocess.run([sys.executable, "-m", "services.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def feedback_db(path, prompts: list[str], pairs: int, seed: int = 0) -> tuple[str, float]:
    """A feedback database of `pairs` pairs judged by ann, a third of them by bob too, who disagrees
    with ann on one in five of those; returns its URL and that agreement."""
    rng = random.Random(seed)
    url = f"sqlite:///{path}"
    store = Store(url)
    store.migrate()
    ann, bob = (store.by_token(store.add_labeller(n)) for n in ("ann", "bob"))
    agreed = compared = 0
    for i in range(pairs):
        prompt = rng.choice(prompts)
        a, b = rng.sample(list(NEW_RANK), 2)
        pair = store.add_pair(ann, NewPair(prompt, make_answer(a, prompt, rng), make_answer(b, prompt, rng), 1,
                                           {"temperature": 1.0}, "stop", "stop", 0.0, 0.0, "rm-0"))
        choice = "first" if NEW_RANK[a] > NEW_RANK[b] else "second"
        store.judge(ann, pair.pair_id, choice)
        if i % 3 == 0:
            assert store.pair_to_repeat(bob, 0).pair_id == pair.pair_id
            other = choice if i % 15 else ("second" if choice == "first" else "first")
            store.judge(bob, pair.pair_id, other)
            compared, agreed = compared + 1, agreed + (other == choice)
    assert store.agreement().rate == agreed / compared
    store.close()
    return url, agreed / compared


@pytest.fixture(scope="module")
def served(tiny_reward_dir, tmp_path_factory):
    """The demo data and a reward model trained on it: the one the reward service serves."""
    root = tmp_path_factory.mktemp("served")
    data = write_demo_data(root / "data", seed=0, num_sft=10, num_prefs=300, num_prompts=50)
    rlhf("train", "rm", "--model", tiny_reward_dir, "--data", data["prefs"], "--out", root / "rm", "--epochs", 2,
         "--batch-size", 16, "--eval-fraction", 0.2, "--lr", 1e-3)
    prompts = [json.loads(line)["prompt"] for line in data["prompts"].read_text().splitlines()]
    return root / "rm", data, prompts


def test_refresh_from_the_feedback_database_learns_the_new_taste_and_reports_old_and_new(served, tmp_path):
    rm0, data, prompts = served
    db, agreement = feedback_db(tmp_path / "feedback.db", prompts, 240)
    out = tmp_path / "rm1"
    proc = rlhf("train", "rm", "--init", rm0, "--data", db, "--out", out, "--epochs", 3, "--batch-size", 16,
                "--eval-fraction", 0.2, "--lr", 1e-3, "--set", f"replay.data={data['prefs']}",
                "--set", "replay.share=0.25")
    meta = json.loads((out / "reward_meta.json").read_text())
    summary = json.loads(proc.stdout.splitlines()[-2])
    assert summary["eval_accuracy_new"] == meta["eval_accuracy_new"]
    # The served model ranks the new comparisons mostly wrong; the refresh learns them.
    assert meta["init_eval_accuracy_new"] < 0.5, meta
    assert meta["eval_accuracy_new"] > meta["init_eval_accuracy_new"] + 0.25, meta
    # The old comparisons are held out and reported on their own, before and after.
    assert meta["init_eval_accuracy_old"] > 0.7 and meta["eval_accuracy_old"] is not None, meta
    assert meta["replay_eval_pairs"] == 60 and meta["replay_rows"] == 300
    # share 0.25: one old pair to three new ones, from the old training split
    assert meta["replay_train_pairs"] == round(meta["new_train_pairs"] / 3), meta
    assert meta["train_pairs"] == meta["new_train_pairs"] + meta["replay_train_pairs"]
    # The noise ceiling is the labellers' agreement on the pairs both judged.
    assert meta["noise_ceiling"] == pytest.approx(agreement) and meta["labeller_comparisons"] == 80
    assert meta["init"] == str(rm0)

    # The export file says the same: the same rows, the same ceiling.
    export = tmp_path / "prefs.jsonl"
    rlhf("feedback", "export", "--db", db, "--out", export)
    from services.trainer.formats import load_rows
    from services.trainer.rm import noise_ceiling
    rows = load_rows(str(export))
    assert len(rows) == 240 + 80 and noise_ceiling(str(export), rows) == pytest.approx(agreement)


def test_a_refresh_is_refused_clearly(served, tmp_path, capsys):
    """Exit 2 (a bad config or data: no retry helps) with the reason, before any training."""
    from services.cli import main

    rm0, data, _ = served
    empty = f"sqlite:///{tmp_path / 'empty.db'}"
    Store(empty).migrate()
    for args, message in (
        (("--init", rm0, "--data", empty), "holds no judgment"),
        (("--init", rm0, "--data", f"sqlite:///{tmp_path / 'new.db'}"), "rlhf feedback migrate"),
        (("--init", rm0, "--model", data["prefs"].parent, "--data", empty), "give model or init, not both"),
        (("--data", empty), "model is required (or init"),
        (("--init", rm0, "--data", empty, "--set", "replay.share=1"), "replay.share"),
    ):
        code = main(["train", "rm", *map(str, args), "--out", str(tmp_path / "x")])
        err = capsys.readouterr().err
        assert code == 2 and message in err, (args, err[-2000:])
