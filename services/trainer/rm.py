"""Reward-model training on preference pairs (Bradley-Terry), the second stage of RLHF.

P(chosen > rejected | x) = sigmoid(R(x, chosen) - R(x, rejected)), so the loss is
-log sigmoid(R(x, y_c) - R(x, y_r)) (Ouyang et al. 2022, eq. 1). Only score differences are
learned: the mean and std of the scores over the training responses are recorded so the
reward service can return normalised rewards.

The trainer runs this job (the reward service only serves); it pools and encodes a pair with
services.ml.head, as the service does, so a pair scores the same in both.

    rlhf train rm --model models/reward --data data/prefs.jsonl --out models/rm
"""
from __future__ import annotations

import argparse
import json
import logging
import pathlib
import random
import time

import torch
import torch.nn.functional as F

from services.common.errors import InvalidArgument
from services.ml import head as rm
from services.trainer import distributed, formats, lora
from services.trainer.config import RMConfig
from services.trainer.distributed import Dist
from services.trainer import supervised
from services.trainer.supervised import StepResult, evaluate, fit, run_job

log = logging.getLogger(__name__)


def bradley_terry_loss(chosen: torch.Tensor, rejected: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """-log sigmoid(R_c - R_r) over pairs, averaged or summed (logsigmoid is the stable form)."""
    losses = -F.logsigmoid(chosen - rejected)
    return losses.sum() if reduction == "sum" else losses.mean()


def _pair_rewards(model, pairs, idx, pad_id, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(R_chosen, R_rejected) for the pairs at idx, in one forward pass."""
    seqs = [pairs[i][0] for i in idx] + [pairs[i][1] for i in idx]
    input_ids, attention_mask = rm.pad_batch(seqs, pad_id, device)
    r = rm.rewards(model, input_ids, attention_mask)
    return r[: len(idx)], r[len(idx):]


def labeller_agreement(rows) -> tuple[float | None, int]:
    """(share of agreeing judgments, comparisons) over pairs judged by two labellers or more: rows
    of the feedback service's export share a pair_id, and two of them agree when they chose the
    same answer. (None, 0) when no pair was judged twice."""
    chosen: dict = {}
    for r in rows:
        if "pair_id" in r:
            chosen.setdefault(r["pair_id"], []).append(json.dumps(r["chosen"], sort_keys=True))
    compared = agreed = 0
    for answers in chosen.values():
        for i in range(len(answers)):
            for j in range(i + 1, len(answers)):
                compared += 1
                agreed += answers[i] == answers[j]
    return (agreed / compared if compared else None), compared


def noise_ceiling(data_path, rows) -> float | None:
    """The best accuracy reachable against noisy labels: 1 - flip rate.

    From meta.json next to the data when it says, else from the rows' "flipped" field, else the
    labellers' agreement on pairs judged twice (feedback data); None if none of these."""
    meta = pathlib.Path(data_path).parent / "meta.json"
    if meta.is_file():
        try:
            value = json.loads(meta.read_text(encoding="utf-8")).get("noise_ceiling")
            if value is not None:
                return float(value)
        except (json.JSONDecodeError, ValueError):
            pass
    flags = [r["flipped"] for r in rows if isinstance(r.get("flipped"), bool)]
    if flags:
        return 1.0 - sum(flags) / len(flags)
    return labeller_agreement(rows)[0]


def replay_examples(cfg: RMConfig, tokenizer, new_pairs: int) -> tuple[list, list, int]:
    """(old training pairs to mix in, old held-out pairs, old rows available) of cfg.replay: the old
    data set split as the new one is (eval_fraction, seed), and share / (1 - share) old training
    pairs per new one, drawn with the seed."""
    from services.trainer.data import split_train_eval

    replay = cfg.replay
    rows = formats.load_rows(replay.data, replay.columns, replay.data_split)
    old_train, old_eval = split_train_eval(rows, cfg.eval_fraction, cfg.seed)
    wanted = min(len(old_train), round(replay.share / (1 - replay.share) * new_pairs))
    picked = random.Random(cfg.seed).sample(old_train, wanted)
    train, _ = formats.preference_examples(tokenizer, picked, cfg.max_length, replay.data) if picked else ([], [])
    held, _ = formats.preference_examples(tokenizer, old_eval, cfg.max_length, replay.data) if old_eval else ([], [])
    return train, held, len(rows)


def train_reward_model(cfg: RMConfig, d: Dist | None = None) -> dict:
    """Train the sequence classifier cfg.model on cfg.data; write a Hugging Face directory to cfg.out.
    Returns the metrics also written to out/reward_meta.json."""
    from transformers import AutoModelForSequenceClassification

    t0 = time.monotonic()
    d, tokenizer, pad_id, train_rows, eval_rows = supervised.prepare(cfg, d)
    train, train_rows = formats.preference_examples(tokenizer, train_rows, cfg.max_length, cfg.data)
    evalset, eval_rows = (formats.preference_examples(tokenizer, eval_rows, cfg.max_length, cfg.data)
                          if eval_rows else ([], []))
    if not train:
        raise InvalidArgument(f"no pair of {cfg.data} fits max_length {cfg.max_length}")
    new_pairs = len(train)
    old_train, old_eval, old_rows = replay_examples(cfg, tokenizer, new_pairs) if cfg.replay else ([], [], 0)
    train = train + old_train

    model = distributed.load_model(AutoModelForSequenceClassification, cfg.model, d, lora=cfg.lora, seed=cfg.seed,
                                   num_labels=1, pad_token_id=pad_id)
    net = lora.base_of(model)  # the score head on the hidden states; with LoRA, peft's layers inside

    def accuracy(examples: list) -> float | None:
        """Held-out pairwise accuracy (a tie counts half)."""
        def forward(rows: list[int]) -> dict[str, float]:
            c, r = _pair_rewards(model, examples, rows, pad_id, d.device)
            return {"pairs": len(rows), "correct": float(((c > r).float() + 0.5 * (c == r).float()).sum())}
        ev = evaluate(model, range(len(examples)), cfg.batch_size, d, forward) if examples else {}
        return ev["correct"] / ev["pairs"] if ev else None

    # A refresh: how the served model does on the new comparisons (and the old) before training.
    before = {"init_eval_accuracy_new": accuracy(evalset), "init_eval_accuracy_old": accuracy(old_eval)} \
        if cfg.init else {}

    def step(rows: list[int], batch_size: int) -> StepResult:
        chosen, rejected = _pair_rewards(net, train, rows, pad_id, d.device)
        loss = bradley_terry_loss(chosen, rejected, "sum")
        return StepResult(loss * d.world_size / batch_size, {"loss": loss.item(), "pairs": len(rows),
                                                             "correct": (chosen > rejected).sum().item()})

    trained = fit(model, cfg, d, lengths=[max(len(c), len(r)) for c, r in train], step=step, desc="reward",
                  show=lambda s: {"loss": s["loss"] / s["pairs"], "acc": s["correct"] / s["pairs"]})

    # Held-out accuracy (a tie counts half), and against the raters' true preference where the
    # data says which labels were flipped: how well the ranking itself was learned.
    flips = [r.get("flipped") for r in eval_rows]
    known_flips = bool(evalset) and all(isinstance(f, bool) for f in flips)

    def eval_forward(rows: list[int]) -> dict[str, float]:
        c, r = _pair_rewards(net, evalset, rows, pad_id, d.device)
        margin = c - r
        out = {"loss": float(bradley_terry_loss(c, r, "sum")), "pairs": len(rows),
               "correct": float(((margin > 0).float() + 0.5 * (margin == 0).float()).sum())}
        if known_flips:
            flipped = torch.tensor([flips[i] for i in rows], device=margin.device)
            out["clean"] = float(((margin > 0) != flipped).sum())
        return out

    ev = evaluate(model, range(len(evalset)), cfg.batch_size, d, eval_forward) if evalset else {}
    metrics = {"eval_loss": ev["loss"] / ev["pairs"] if ev else None,
               "eval_accuracy": ev["correct"] / ev["pairs"] if ev else None,
               "noise_ceiling": noise_ceiling(cfg.data, train_rows + eval_rows)}
    if known_flips:
        metrics["eval_accuracy_clean"] = ev["clean"] / ev["pairs"]
        metrics["eval_noise_ceiling"] = 1.0 - sum(flips) / len(flips)
    if cfg.init or cfg.replay:  # new comparisons (data) and old (replay) apart
        metrics |= {"eval_accuracy_new": metrics["eval_accuracy"], "eval_accuracy_old": accuracy(old_eval),
                    "new_train_pairs": new_pairs, "replay_train_pairs": len(old_train),
                    "replay_eval_pairs": len(old_eval), "replay_rows": old_rows, **before}
    agreement, compared = labeller_agreement(train_rows + eval_rows)
    if compared:
        metrics |= {"labeller_agreement": agreement, "labeller_comparisons": compared}

    # Score statistics over the training responses, for the service's normalised rewards.
    responses = [s for pair in train for s in pair]

    def score_forward(rows: list[int]) -> dict[str, float]:
        ids, mask = rm.pad_batch([responses[i] for i in rows], pad_id, d.device)
        r = rm.rewards(net, ids, mask).double()
        return {"n": len(rows), "sum": r.sum().item(), "sumsq": (r * r).sum().item()}

    s = evaluate(model, sorted(range(len(responses)), key=lambda i: len(responses[i])), 2 * cfg.batch_size, d,
                 score_forward)
    score_mean = s["sum"] / s["n"]
    score_std = ((s["sumsq"] - s["n"] * score_mean ** 2) / max(s["n"] - 1, 1)) ** 0.5 if s["n"] > 1 else 1.0
    seconds = round(time.monotonic() - t0, 1)
    log.info("RM done: eval accuracy %s (noise ceiling %s), eval loss %s, score mean %.3f std %.3f (%.1f s)",
             metrics["eval_accuracy"], metrics["noise_ceiling"], metrics["eval_loss"], score_mean, score_std, seconds)

    written = supervised.write_model(model, tokenizer, cfg, d)
    meta = {
        "base_model": str(cfg.model), "init": cfg.init, "data": _safe(cfg.data),
        "replay": cfg.replay.model_dump() if cfg.replay else None, "train_pairs": len(train), "eval_pairs": len(evalset),
        "epochs": cfg.epochs, "steps": trained["steps"], "lr": cfg.lr, "batch_size": cfg.batch_size,
        "seed": cfg.seed, **metrics, "train_loss": trained.get("train_loss"), "score_mean": score_mean,
        "score_std": score_std, "max_length": cfg.max_length, "seconds": seconds, "device": str(d.device),
        "world_size": d.world_size,
        **({"lora": cfg.lora.model_dump(), "export_merged": cfg.export_merged} if cfg.lora.enabled else {}),
    }
    if d.main:
        for out in written:  # the reward service reads the score statistics from here
            (out / rm.META_FILE).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    return meta


def _safe(data: str) -> str:
    """A data path, or a database URL without its password (it is written to reward_meta.json)."""
    if "://" in str(data) and "@" in str(data):
        scheme, rest = str(data).split("://", 1)
        return f"{scheme}://***@{rest.rsplit('@', 1)[1]}"
    return str(data)


def main(args: argparse.Namespace) -> int:
    return run_job(args, RMConfig, train_reward_model, "rm", ("steps", "eval_accuracy", "noise_ceiling",
                                                             "eval_accuracy_clean", "eval_accuracy_new",
                                                             "eval_accuracy_old", "init_eval_accuracy_new",
                                                             "init_eval_accuracy_old", "labeller_agreement",
                                                             "score_mean", "score_std", "seconds"))


def load_config(args: argparse.Namespace) -> RMConfig:
    return supervised.load_config(args, RMConfig)
