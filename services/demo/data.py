"""The demo data set: the textbook RLHF example, generated from templates.

A user asks "How do I prepare for my calculus exam?". The model can answer

  clear  short numbered steps           "Here is a plan: 1. Review ... 2. ... 3. ..."
  long   correct but far too long       "Well, preparing for a calculus exam is ..." (rambles, repeats itself)
  vague  a non-answer                   "Just study hard and it will be fine."

and people rank clear > long > vague. SFT teaches all three kinds in equal shares, the reward model
learns the ranking from noisy pairs, and PPO should move the policy towards "clear".

Each kind opens with its own few phrasings, so the first generated tokens decide the kind: a tiny policy
can then shift between kinds by changing a handful of early token probabilities.

Files (all deterministic by seed, byte for byte):
  sft.jsonl      {"prompt", "response", "kind"}                  kinds in equal shares
  prefs.jsonl    {"prompt", "chosen", "rejected", "chosen_kind", "rejected_kind", "flipped"}
  prompts.jsonl  {"prompt", "split"}                             PPO prompts, "train" or "eval"
  meta.json      seed, counts, flip rate, noise ceiling
The eval prompts share no prompt with the train prompts nor with the sft/prefs prompts.
"""
from __future__ import annotations

import argparse
import json
import pathlib
import random
import sys

KINDS = ("clear", "long", "vague")
RANK = {"clear": 2, "long": 1, "vague": 0}  # what the (simulated) raters prefer
CANONICAL_PROMPT = "How do I prepare for my calculus exam?"

QUESTIONS = [
    "How do I prepare for my {subject} {event}?",
    "What is the best way to get ready for my {subject} {event}?",
    "Any tips for my {subject} {event} next week?",
    "How should I study for the {subject} {event}?",
    "I have a {subject} {event} soon. How do I prepare?",
    "Can you help me prepare for a {subject} {event}?",
    "What should I do before my {subject} {event}?",
    "How can I do well in my {subject} {event}?",
]
SUBJECTS = [
    "calculus", "chemistry", "history", "physics", "biology", "algebra", "geometry", "statistics",
    "economics", "literature", "geography", "philosophy", "music", "art", "french", "spanish",
    "german", "programming", "psychology", "sociology", "astronomy", "anatomy", "law", "accounting",
    "marketing", "linguistics", "ethics", "genetics", "ecology", "robotics", "poetry", "latin",
    "finance", "nursing", "design", "politics",
]
EVENTS = ["exam", "quiz", "test", "presentation", "interview", "final", "midterm", "essay", "project", "debate"]

# clear: an opening, three numbered steps (one from each stage), sometimes a one-line close.
CLEAR_OPENINGS = ["Here is a plan:", "Here is a simple plan:", "Try these steps:", "A clear plan:"]
CLEAR_STEPS = [
    [  # understand what to learn
        "Review the key {subject} topics.",
        "List the {subject} topics you find hardest.",
        "Make short notes for each {subject} topic.",
        "Read the {subject} summary from class.",
    ],
    [  # practise it
        "Solve practice problems every day.",
        "Do one old {event} under a time limit.",
        "Explain each {subject} idea out loud.",
        "Ask your teacher about anything unclear.",
        "Study in short blocks with breaks.",
    ],
    [  # the day before
        "Sleep well before the {event}.",
        "Rest the evening before the {event}.",
        "Pack what you need the night before.",
        "Eat a good breakfast on the day of the {event}.",
    ],
]
CLEAR_CLOSINGS = ["", "", " Good luck!", " You can do it."]

# long: correct advice, but it rambles and repeats itself.
LONG_OPENINGS = [
    "Well, preparing for a {subject} {event} is something that many people think about, and there is a lot to say about it.",
    "So, there are really a lot of things to consider when you prepare for a {subject} {event}, so let me go through them.",
    "Okay, this is a big question, and getting ready for your {subject} {event} involves many different things.",
]
LONG_MIDDLE = [
    "First of all, you should study, because studying is important, and it is really important to study the {subject} material.",
    "Also, as I said, studying is important, so you should make sure that you study a lot and then study some more.",
    "Some people like to study in the morning and some people like to study at night, and both of these can work, depending on the person.",
    "It is also a good idea to practice, because practice helps, and when you practice you get better at {subject}.",
    "Another thing to keep in mind is that sleep matters, since sleep is something that everyone needs, especially before the {event}.",
    "You could also think about reading your notes again, and then reading them one more time, just to be sure.",
    "Of course, every {event} is different, so what works for one {event} might not work for another {event}.",
]
LONG_CLOSINGS = [
    "In the end, it really depends on you, but if you keep all of this in mind, you will probably do well on your {subject} {event}.",
    "So, to sum up, study, practice, sleep, and remember everything I said above about the {subject} {event}.",
]

# vague: one short non-answer.
VAGUE_ANSWERS = [
    "Just study hard and it will be fine.",
    "Just relax, it will work out.",
    "Just do your best on the {event}.",
    "Don't worry, you will be fine.",
    "Don't worry about the {subject} {event} too much.",
    "It depends, just do your best.",
    "It depends on the {event}, really.",
    "Don't worry, the {subject} {event} will be easy if you just try.",
    "It depends, some people find {subject} easy and some do not.",
]


def all_prompts() -> list[str]:
    """Every prompt the templates can make, in a fixed order."""
    return [q.format(subject=s, event=e) for q in QUESTIONS for s in SUBJECTS for e in EVENTS]


def parse_prompt(prompt: str) -> tuple[str, str]:
    """(subject, event) named in a prompt; ("", "") when it names none (answers then stay generic)."""
    words = [w.strip("?.,").lower() for w in prompt.split()]
    subject = next((w for w in words if w in SUBJECTS), "")
    event = next((w for w in words if w in EVENTS), "")
    return subject, event


def make_answer(kind: str, prompt: str, rng: random.Random) -> str:
    subject, event = parse_prompt(prompt)
    fill = {"subject": subject or "course", "event": event or "exam"}
    if kind == "clear":
        steps = [rng.choice(stage).format(**fill) for stage in CLEAR_STEPS]
        body = " ".join(f"{i}. {s}" for i, s in enumerate(steps, 1))
        return f"{rng.choice(CLEAR_OPENINGS)} {body}{rng.choice(CLEAR_CLOSINGS)}"
    if kind == "long":
        middle = rng.sample(LONG_MIDDLE, rng.choice([2, 3]))
        parts = [rng.choice(LONG_OPENINGS), *middle, rng.choice(LONG_CLOSINGS)]
        return " ".join(p.format(**fill) for p in parts)
    if kind == "vague":
        return rng.choice(VAGUE_ANSWERS).format(**fill)
    raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")


def split_prompts(seed: int, num_prompts: int) -> tuple[list[str], list[str], list[str]]:
    """(eval, ppo train, sft/prefs pool): three disjoint prompt sets.

    The eval split always holds CANONICAL_PROMPT, so the demo can show how the answer to the textbook
    question changes; ~10% of num_prompts are eval.
    """
    universe = all_prompts()
    num_eval = max(1, num_prompts // 10)
    num_train = num_prompts - num_eval
    pool_min = 100
    if num_prompts < 2 or num_prompts + pool_min > len(universe):
        raise ValueError(f"num_prompts must be in [2, {len(universe) - pool_min}], got {num_prompts}")
    rest = [p for p in universe if p != CANONICAL_PROMPT]
    random.Random(seed).shuffle(rest)
    eval_prompts = [CANONICAL_PROMPT, *rest[: num_eval - 1]]
    train_prompts = rest[num_eval - 1: num_eval - 1 + num_train]
    pool = rest[num_eval - 1 + num_train:]
    return eval_prompts, train_prompts, pool


def corpus(seed: int = 0, n: int = 600) -> list[str]:
    """Text the demo tokenizer is trained on: every prompt and n answers of each kind."""
    rng = random.Random(seed)
    prompts = all_prompts()
    texts = list(prompts)
    for kind in KINDS:
        texts += [make_answer(kind, rng.choice(prompts), rng) for _ in range(n)]
    return texts


def _write_jsonl(path: pathlib.Path, rows: list[dict]) -> None:
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def write_demo_data(out, seed: int = 0, flip_rate: float = 0.1, num_sft: int = 3000,
                    num_prefs: int = 3000, num_prompts: int = 1000) -> dict[str, pathlib.Path]:
    """Write sft.jsonl, prefs.jsonl, prompts.jsonl and meta.json under out; return their paths by name."""
    if not 0.0 <= flip_rate <= 0.5:
        raise ValueError(f"flip_rate must be in [0, 0.5], got {flip_rate}")
    if num_sft < 1 or num_prefs < 1:
        raise ValueError(f"num_sft and num_prefs must be >= 1, got {num_sft} and {num_prefs}")
    eval_prompts, train_prompts, pool = split_prompts(seed, num_prompts)
    out = pathlib.Path(out)
    out.mkdir(parents=True, exist_ok=True)
    # Separate streams so changing one count does not reshuffle the other files.
    rng_sft, rng_prefs = random.Random(f"{seed}-sft"), random.Random(f"{seed}-prefs")

    kinds = [KINDS[i % 3] for i in range(num_sft)]  # equal shares (up to one example)
    rng_sft.shuffle(kinds)
    sft = []
    for kind in kinds:
        prompt = rng_sft.choice(pool)
        sft.append({"prompt": prompt, "response": make_answer(kind, prompt, rng_sft), "kind": kind})

    # Pairs over the three kinds in equal shares; the better kind is "chosen", and an exact
    # flip_rate share of the labels is swapped, like disagreeing raters.
    pairs = [("clear", "long"), ("clear", "vague"), ("long", "vague")]
    pair_of = [pairs[i % 3] for i in range(num_prefs)]
    rng_prefs.shuffle(pair_of)
    flipped = set(rng_prefs.sample(range(num_prefs), round(flip_rate * num_prefs)))
    prefs = []
    for i, (better, worse) in enumerate(pair_of):
        prompt = rng_prefs.choice(pool)
        a, b = make_answer(better, prompt, rng_prefs), make_answer(worse, prompt, rng_prefs)
        if i in flipped:
            a, b, better, worse = b, a, worse, better
        prefs.append({"prompt": prompt, "chosen": a, "rejected": b,
                      "chosen_kind": better, "rejected_kind": worse, "flipped": i in flipped})

    prompts = [{"prompt": p, "split": "train"} for p in train_prompts]
    prompts += [{"prompt": p, "split": "eval"} for p in eval_prompts]

    paths = {name: out / f"{name}.jsonl" for name in ("sft", "prefs", "prompts")}
    _write_jsonl(paths["sft"], sft)
    _write_jsonl(paths["prefs"], prefs)
    _write_jsonl(paths["prompts"], prompts)
    meta = {
        "seed": seed, "flip_rate": flip_rate, "noise_ceiling": 1.0 - flip_rate,
        "num_sft": num_sft, "num_prefs": num_prefs, "num_flipped": len(flipped),
        "num_prompts": num_prompts, "num_train_prompts": len(train_prompts), "num_eval_prompts": len(eval_prompts),
        "ranking": "clear > long > vague",
    }
    paths["meta"] = out / "meta.json"
    paths["meta"].write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    return paths


def main(args: argparse.Namespace) -> int:
    try:
        paths = write_demo_data(args.out, seed=args.seed, flip_rate=args.flip_rate, num_sft=args.num_sft,
                                num_prefs=args.num_prefs, num_prompts=args.num_prompts)
    except ValueError as e:
        print(f"rlhf data demo: error: {e}", file=sys.stderr)
        return 2
    for name, path in paths.items():
        print(f"wrote {name}: {path}")
    return 0
