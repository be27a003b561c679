"""The gold labeller is right on every generated answer and sensible on model-like outputs."""
import random

import pytest

from services.demo import data, gold


def test_right_on_every_generated_answer():
    rng = random.Random(0)
    for prompt in data.all_prompts():
        for kind in data.KINDS:
            answer = data.make_answer(kind, prompt, rng)
            assert gold.label(answer) == kind, answer


def test_right_on_every_answer_in_the_written_files(tmp_path):
    paths = data.write_demo_data(tmp_path, seed=5, num_sft=300, num_prefs=300, num_prompts=100)
    import json
    for line in paths["sft"].read_text().splitlines():
        r = json.loads(line)
        assert gold.label(r["response"]) == r["kind"]
    for line in paths["prefs"].read_text().splitlines():
        r = json.loads(line)
        assert gold.label(r["chosen"]) == r["chosen_kind"] and gold.label(r["rejected"]) == r["rejected_kind"]


def test_every_template_starts_with_its_own_opening_only():
    templates = {"clear": data.CLEAR_OPENINGS, "long": data.LONG_OPENINGS, "vague": data.VAGUE_ANSWERS}
    for kind, texts in templates.items():
        for t in texts:
            assert gold.opening_kind(t) == kind, t


LONG = data.make_answer("long", data.CANONICAL_PROMPT, random.Random(0))
CLEAR = data.make_answer("clear", data.CANONICAL_PROMPT, random.Random(0))


@pytest.mark.parametrize("text,expected", [
    ("", "other"),
    ("   \n", "other"),
    ("1. 2. 3.", "other"),
    ("hat~\ufffdce pre chemistry old\x7fPa ideaterm\ufffderent nutmary", "other"),  # random-model output
    ("xq zzv plok Just", "other"),
    (LONG[:40], "long"),                        # a long answer cut off by max_tokens
    (" ".join(LONG.split()[:8]), "long"),
    ("Well,", "long"),
    (CLEAR + " " + LONG, "long"),               # a clear opening rambling past the length limit
    (CLEAR, "clear"),
    ("  " + CLEAR + "\n", "clear"),
    ("Here is a plan: 1. Review the key calculus topics. 2. Sleep well before the exam.", "clear"),
    ("Here is a plan:", "other"),               # no steps
    ("Here is a plan: 1. Review the key calculus topics.", "other"),
    ("Just study hard and it will be fine.", "vague"),
    ("Don't worry, you will be fine", "vague"),  # no final period
    (" ".join(["Just relax, it will work out."] * 4), "other"),  # repeated past the vague limit
    ("Review the key calculus topics.", "other"),  # no recognised opening
])
def test_edge_cases(text, expected):
    assert gold.label(text) == expected


def test_shares():
    answers = [CLEAR, CLEAR, LONG, "Just relax, it will work out.", ""]
    s = gold.shares(answers)
    assert s == {"clear": 0.4, "long": 0.2, "vague": 0.2, "other": 0.2}
    assert gold.shares([]) == {"clear": 0.0, "long": 0.0, "vague": 0.0, "other": 0.0}
