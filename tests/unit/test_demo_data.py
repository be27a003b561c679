"""The demo data set: counts, disjoint splits, balance, label noise and determinism."""
import argparse
import collections
import json

import pytest

from services.demo import data


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    paths = data.write_demo_data(out, seed=0, flip_rate=0.1, num_sft=600, num_prefs=1200, num_prompts=400)
    return paths, {name: read_jsonl(p) for name, p in paths.items() if name != "meta"}


def test_counts_and_fields(demo):
    paths, rows = demo
    assert set(paths) == {"sft", "prefs", "prompts", "meta"}
    assert len(rows["sft"]) == 600 and len(rows["prefs"]) == 1200 and len(rows["prompts"]) == 400
    assert all(set(r) == {"prompt", "response", "kind"} for r in rows["sft"])
    assert all(set(r) == {"prompt", "chosen", "rejected", "chosen_kind", "rejected_kind", "flipped"} for r in rows["prefs"])
    assert all(set(r) == {"prompt", "split"} and r["split"] in ("train", "eval") for r in rows["prompts"])
    meta = json.loads(paths["meta"].read_text())
    assert meta["seed"] == 0 and meta["num_sft"] == 600 and meta["num_prefs"] == 1200
    assert meta["noise_ceiling"] == pytest.approx(0.9)


def test_splits_are_disjoint_and_eval_holds_the_textbook_prompt(demo):
    _, rows = demo
    train = {r["prompt"] for r in rows["prompts"] if r["split"] == "train"}
    evals = {r["prompt"] for r in rows["prompts"] if r["split"] == "eval"}
    seen = {r["prompt"] for r in rows["sft"]} | {r["prompt"] for r in rows["prefs"]}
    assert data.CANONICAL_PROMPT in evals
    assert len(train) + len(evals) == 400 and 30 <= len(evals) <= 60
    assert not train & evals and not evals & seen and not train & seen


def test_sft_kinds_balanced_and_answers_mention_the_prompt(demo):
    _, rows = demo
    counts = collections.Counter(r["kind"] for r in rows["sft"])
    assert counts == {"clear": 200, "long": 200, "vague": 200}
    for r in rows["sft"]:
        subject, event = data.parse_prompt(r["prompt"])
        if r["kind"] != "vague":  # vague answers only sometimes name the subject or event
            assert subject in r["response"] or event in r["response"], r


def test_prefs_rank_and_flip_share(demo):
    _, rows = demo
    flipped = [r for r in rows["prefs"] if r["flipped"]]
    assert len(flipped) == 120  # exactly flip_rate of the pairs
    for r in rows["prefs"]:
        better = data.RANK[r["chosen_kind"]] > data.RANK[r["rejected_kind"]]
        assert better != r["flipped"], r
        assert r["chosen"] != r["rejected"]
    pairs = collections.Counter(frozenset((r["chosen_kind"], r["rejected_kind"])) for r in rows["prefs"])
    assert sorted(pairs.values()) == [400, 400, 400]


def test_kinds_have_distinct_openings_and_lengths():
    rng = data.random.Random(1)
    prompts = data.all_prompts()[::11]
    lengths = {k: [len(data.make_answer(k, p, rng).split()) for p in prompts] for k in data.KINDS}
    assert max(lengths["vague"]) < min(lengths["clear"]) and max(lengths["clear"]) < min(lengths["long"])
    firsts = {k: {data.make_answer(k, p, rng).split()[0] for p in prompts} for k in data.KINDS}
    assert not firsts["clear"] & firsts["long"] and not firsts["clear"] & firsts["vague"]
    assert not firsts["long"] & firsts["vague"]


def test_deterministic_by_seed(tmp_path):
    a = data.write_demo_data(tmp_path / "a", seed=3, num_sft=90, num_prefs=90, num_prompts=200)
    b = data.write_demo_data(tmp_path / "b", seed=3, num_sft=90, num_prefs=90, num_prompts=200)
    c = data.write_demo_data(tmp_path / "c", seed=4, num_sft=90, num_prefs=90, num_prompts=200)
    for name in a:
        assert a[name].read_bytes() == b[name].read_bytes(), name
    assert a["sft"].read_bytes() != c["sft"].read_bytes()


def test_cli_main_writes_files(tmp_path, capsys):
    args = argparse.Namespace(out=str(tmp_path), seed=0, flip_rate=0.0, num_sft=30, num_prefs=30, num_prompts=100)
    assert data.main(args) == 0
    assert not any(r["flipped"] for r in read_jsonl(tmp_path / "prefs.jsonl"))
    assert "prompts.jsonl" in capsys.readouterr().out


@pytest.mark.parametrize("kwargs", [{"flip_rate": 0.7}, {"flip_rate": -0.1}, {"num_prompts": 1},
                                    {"num_prompts": 10**6}, {"num_sft": 0}])
def test_bad_arguments_are_refused(tmp_path, kwargs):
    with pytest.raises(ValueError):
        data.write_demo_data(tmp_path, **kwargs)


def test_cli_main_reports_bad_arguments(tmp_path, capsys):
    args = argparse.Namespace(out=str(tmp_path / "x"), seed=0, flip_rate=0.9, num_sft=30, num_prefs=30, num_prompts=100)
    assert data.main(args) == 2
    assert "flip_rate must be in [0, 0.5], got 0.9" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
