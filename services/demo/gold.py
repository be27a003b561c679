"""The gold labeller: which kind of answer a text is, by the rules the demo data was written with.

The reward model only sees noisy preference pairs; this labeller knows the truth, so the demo can show
what PPO did to the policy ("clear" share before and after) without trusting the reward model it trained
against. It must also judge model outputs, which are not always clean template text:

  long   more than LONG_MIN_WORDS words (rambling past the length limit, whatever the opening),
         or a long opening (a long answer cut off by max_tokens is still long)
  clear  a clear opening and at least two numbered steps, within the length limit
  vague  a vague opening and at most VAGUE_MAX_WORDS words
  other  empty, garbled (mostly words the demo never uses) or none of the above
"""
from __future__ import annotations

import functools
import re
from collections.abc import Iterable

from services.demo import data

LABELS = ("clear", "long", "vague", "other")
LONG_MIN_WORDS = 55   # generated clear answers have at most ~37 words, long ones at least ~70
VAGUE_MAX_WORDS = 20  # generated vague answers have at most ~12 words
MIN_KNOWN_SHARE = 0.8
# Each kind opens with its own phrases (see services/demo/data.py); the first words decide the kind.
OPENINGS = {
    "clear": ("Here is", "Try these", "A clear plan"),
    "long": ("Well,", "So,", "Okay,"),
    "vague": ("Just", "Don't worry", "It depends"),
}
_WORD = re.compile(r"[a-z']+")
_STEP = re.compile(r"(?:^|\s)(\d+)\.(?=\s|$)")


@functools.cache
def _known_words() -> frozenset[str]:
    texts = [*data.QUESTIONS, *data.SUBJECTS, *data.EVENTS, "course exam", *data.CLEAR_OPENINGS,
             *(s for stage in data.CLEAR_STEPS for s in stage), *data.CLEAR_CLOSINGS, *data.LONG_OPENINGS,
             *data.LONG_MIDDLE, *data.LONG_CLOSINGS, *data.VAGUE_ANSWERS]
    return frozenset(w for t in texts for w in _WORD.findall(t.lower()) if w not in ("subject", "event"))


def opening_kind(text: str) -> str | None:
    """The kind whose opening `text` starts with, or None."""
    text = text.lstrip()
    for kind, openings in OPENINGS.items():
        if text.startswith(openings):
            return kind
    return None


def label(answer: str) -> str:
    """"clear", "long", "vague" or "other"."""
    words = _WORD.findall(answer.lower())
    if not words:
        return "other"
    known = _known_words()
    if sum(w in known for w in words) < MIN_KNOWN_SHARE * len(words):
        return "other"  # garbled
    if len(words) > LONG_MIN_WORDS:
        return "long"
    kind = opening_kind(answer)
    if kind == "long":
        return "long"
    if kind == "clear":
        steps = [int(n) for n in _STEP.findall(answer)]
        return "clear" if len(steps) >= 2 and steps[:2] == [1, 2] else "other"
    if kind == "vague":
        return "vague" if len(words) <= VAGUE_MAX_WORDS else "other"
    return "other"


def shares(answers: Iterable[str]) -> dict[str, float]:
    """Share of each label among `answers` (all four labels; zeros when there are none)."""
    counts = dict.fromkeys(LABELS, 0)
    for a in answers:
        counts[label(a)] += 1
    total = sum(counts.values())
    return {k: (c / total if total else 0.0) for k, c in counts.items()}


# What a person prefers when shown two answers (services.demo.data: clear > long > vague; garbled last).
PREFERENCE = {"clear": 3, "long": 2, "vague": 1, "other": 0}


def choice(first: str, second: str) -> str:
    """The feedback page's choice: "first", "second", or "tie" for two answers of one kind."""
    a, b = PREFERENCE[label(first)], PREFERENCE[label(second)]
    return "first" if a > b else "second" if b > a else "tie"
