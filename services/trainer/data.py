"""Train/eval split, batching and learning-rate schedules shared by the training jobs
(reading the data sets: services.trainer.formats)."""
from __future__ import annotations

import random


from services.common.errors import InvalidArgument

IGNORE_INDEX = -100  # label of tokens that carry no loss (the prompt, padding)


def split_train_eval(rows: list, eval_fraction: float, seed: int) -> tuple[list, list]:
    """Shuffle once with `seed`, hold out eval_fraction (at least one row when the fraction is > 0)."""
    if not 0.0 <= eval_fraction < 1.0:
        raise InvalidArgument(f"eval_fraction must be in [0, 1), got {eval_fraction}")
    if rows and all(isinstance(r, dict) and "pair_id" in r for r in rows):
        return _split_by_pair(rows, eval_fraction, seed)
    rows = list(rows)
    random.Random(seed).shuffle(rows)
    n_eval = max(1, round(eval_fraction * len(rows))) if eval_fraction > 0 else 0
    if n_eval >= len(rows):
        raise InvalidArgument(f"eval_fraction {eval_fraction} leaves no training examples out of {len(rows)}")
    return rows[n_eval:], rows[:n_eval]


def _split_by_pair(rows: list[dict], eval_fraction: float, seed: int) -> tuple[list, list]:
    """The split of judgments (services.feedback): the rows of one pair, judged by two labellers,
    stay on one side, so no held-out pair was trained on."""
    groups: dict = {}
    for r in rows:
        groups.setdefault(r["pair_id"], []).append(r)
    keys = sorted(groups, key=str)
    random.Random(seed).shuffle(keys)
    n_eval = max(1, round(eval_fraction * len(keys))) if eval_fraction > 0 else 0
    if n_eval >= len(keys):
        raise InvalidArgument(f"eval_fraction {eval_fraction} leaves no training pairs out of {len(keys)}")
    return [r for k in keys[n_eval:] for r in groups[k]], [r for k in keys[:n_eval] for r in groups[k]]


def length_grouped_batches(lengths: list[int], batch_size: int, rng: random.Random,
                           group: int = 32) -> list[list[int]]:
    """Batches of indices with similar lengths, in random order.

    The demo answers range from ~10 to ~160 tokens; batching them at random
    wastes most of the compute on padding. Sorting inside random mega-batches of
    `group` batches keeps batches short while the order stays random.
    """
    order = list(range(len(lengths)))
    rng.shuffle(order)
    mega = batch_size * group
    batches = []
    for start in range(0, len(order), mega):
        chunk = sorted(order[start:start + mega], key=lambda i: lengths[i])
        batches += [chunk[i:i + batch_size] for i in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)
    return batches


def lr_lambda(warmup_steps: int, total_steps: int, schedule: str = "cosine", min_ratio: float = 0.1):
    """Linear warmup, then cosine or linear decay to min_ratio of the peak learning rate (or constant)."""
    import math

    def f(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        if schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        decay = 0.5 * (1 + math.cos(math.pi * progress)) if schedule == "cosine" else 1 - progress
        return min_ratio + (1 - min_ratio) * decay
    return f
