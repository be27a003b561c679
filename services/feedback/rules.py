"""The judging rules and the statistics over judgments: pure functions, no database, no transport.

A judgment is one of CHOICES. Two judgments of one pair agree when they are the same choice
(a tie and a tie agree; a tie and "first" do not); skips say nothing and are left out. The reward
model agrees with a labeller's decisive choice (first or second) when it scored that answer higher.
"""
from __future__ import annotations

import dataclasses
import itertools

CHOICES = ("first", "second", "tie", "skip")


@dataclasses.dataclass(frozen=True)
class Agreement:
    compared: int  # pairs (of judgments, or of a judgment and the reward model) compared
    agreed: float  # a tie in the reward model's scores counts half

    @property
    def rate(self) -> float | None:
        return self.agreed / self.compared if self.compared else None

    def as_dict(self) -> dict:
        return {"compared": self.compared, "agreed": self.agreed, "rate": self.rate}


def labeller_agreement(by_pair: dict[int, list[tuple[int, str]]], labeller_id: int | None = None) -> Agreement:
    """Over pairs judged by several labellers: how many pairs of judgments agree. With
    `labeller_id`, only the comparisons of that labeller's judgment with the others'."""
    compared = agreed = 0
    for judgments in by_pair.values():
        for (a, ca), (b, cb) in itertools.combinations(judgments, 2):
            if labeller_id is not None and labeller_id not in (a, b):
                continue
            compared += 1
            agreed += ca == cb
    return Agreement(compared, agreed)


def rm_agreement(rows: list[tuple[str, float, float]]) -> Agreement:
    """rows: (choice, reward-model score of the first answer, of the second) of decisive judgments.
    A tie in the scores counts as half an agreement, as in the reward model's own accuracy."""
    compared, agreed = 0, 0.0
    for choice, first, second in rows:
        if choice not in ("first", "second"):
            continue
        compared += 1
        margin = first - second if choice == "first" else second - first
        agreed += 1.0 if margin > 0 else 0.5 if margin == 0 else 0.0
    return Agreement(compared, agreed)


def trl_row(prompt, chosen: str, rejected: str) -> dict:
    """One row of TRL's preference format: a string prompt with string answers (standard), or a
    conversation with the answers as assistant turns (conversational)."""
    if isinstance(prompt, str):
        return {"prompt": prompt, "chosen": chosen, "rejected": rejected}
    return {"prompt": prompt, "chosen": [{"role": "assistant", "content": chosen}],
            "rejected": [{"role": "assistant", "content": rejected}]}
