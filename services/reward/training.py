"""Reward-model training on preference pairs (Bradley-Terry).

P(chosen > rejected | x) = sigmoid(R(x, chosen) - R(x, rejected)), so the loss
is -log sigmoid(R(x, y_c) - R(x, y_r)) (Ouyang et al. 2022, eq. 1). Only score
differences are learned: the mean and std of the scores over the training
responses are recorded so the service can return normalised rewards.

    rlhf train rm --model models/reward --data data/prefs.jsonl --out models/rm
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import pathlib
import random
import time

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from services.common.errors import InvalidArgument
from services.reward import model as rm
from services.trainer import data as D

log = logging.getLogger(__name__)

# Tuned on the demo prefs (3000 pairs) and the tiny reward model from random
# init: eval accuracy at the noise ceiling in about a minute on 2 CPU cores.
DEFAULTS = dict(epochs=1.0, lr=1e-3, batch_size=32, max_length=256, warmup_ratio=0.05)


def bradley_terry_loss(chosen: torch.Tensor, rejected: torch.Tensor) -> torch.Tensor:
    """-log sigmoid(R_c - R_r), averaged over pairs (logsigmoid is the stable form)."""
    return -F.logsigmoid(chosen - rejected).mean()


def _encode_pairs(tokenizer, rows, max_length):
    """[(chosen_ids, rejected_ids)] and the rows kept; a response that cannot fit even alone is dropped."""
    pairs, kept, dropped = [], [], 0
    for row in rows:
        try:
            c, _ = rm.encode(tokenizer, row["prompt"], row["chosen"], max_length, "keep_end_of_prompt")
            r, _ = rm.encode(tokenizer, row["prompt"], row["rejected"], max_length, "keep_end_of_prompt")
        except InvalidArgument:
            dropped += 1
            continue
        pairs.append((c, r))
        kept.append(row)
    if dropped:
        log.warning("%d pairs have a response longer than max_length %d and were dropped", dropped, max_length)
    return pairs, kept


def _pair_rewards(model, pairs, idx, pad_id, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(R_chosen, R_rejected) for the pairs at idx, in one forward pass."""
    seqs = [pairs[i][0] for i in idx] + [pairs[i][1] for i in idx]
    input_ids, attention_mask = rm.pad_batch(seqs, pad_id, device)
    r = rm.rewards(model, input_ids, attention_mask)
    return r[: len(idx)], r[len(idx):]


@torch.no_grad()
def evaluate(model, pairs, batch_size, pad_id, device) -> dict:
    """Loss and pairwise accuracy (a tie counts half) plus each pair's score margin."""
    model.eval()
    margins = []
    for start in range(0, len(pairs), batch_size):
        c, r = _pair_rewards(model, pairs, range(start, min(start + batch_size, len(pairs))), pad_id, device)
        margins += (c - r).tolist()
    model.train()
    if not margins:
        return {"loss": float("nan"), "accuracy": float("nan"), "margins": []}
    m = torch.tensor(margins)
    accuracy = float(((m > 0).float() + 0.5 * (m == 0).float()).mean())
    return {"loss": float(-F.logsigmoid(m).mean()), "accuracy": accuracy, "margins": margins}


@torch.no_grad()
def score_stats(model, seqs, batch_size, pad_id, device) -> tuple[float, float]:
    """Mean and std of R over the given sequences (the training responses)."""
    model.eval()
    scores = []
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
    for start in range(0, len(order), 2 * batch_size):
        ids, mask = rm.pad_batch([seqs[i] for i in order[start:start + 2 * batch_size]], pad_id, device)
        scores += rm.rewards(model, ids, mask).tolist()
    t = torch.tensor(scores, dtype=torch.float64)
    return float(t.mean()), float(t.std()) if len(scores) > 1 else 1.0


def noise_ceiling(data_path, rows) -> float | None:
    """The best accuracy reachable against noisy labels: 1 - flip rate.

    From meta.json next to the data when it says, else from the rows' "flipped" field; None if neither.
    """
    meta = pathlib.Path(data_path).parent / "meta.json"
    if meta.is_file():
        try:
            value = json.loads(meta.read_text(encoding="utf-8")).get("noise_ceiling")
            if value is not None:
                return float(value)
        except (json.JSONDecodeError, ValueError):
            pass
    flags = [r["flipped"] for r in rows if isinstance(r.get("flipped"), bool)]
    return 1.0 - sum(flags) / len(flags) if flags else None


def train_reward_model(model_dir, data_path, out_dir, *, epochs: float | None = None, lr: float | None = None,
                       batch_size: int | None = None, max_length: int | None = None, eval_fraction: float = 0.1,
                       seed: int = 0, device: str = "cpu", warmup_ratio: float | None = None,
                       progress: bool = True) -> dict:
    """Train the sequence classifier in model_dir on prompt/chosen/rejected JSONL; write a HF directory.

    Returns the metrics also written to out_dir/reward_meta.json.
    """
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

    epochs = DEFAULTS["epochs"] if epochs is None else epochs
    lr = DEFAULTS["lr"] if lr is None else lr
    batch_size = DEFAULTS["batch_size"] if batch_size is None else batch_size
    max_length = DEFAULTS["max_length"] if max_length is None else max_length
    warmup_ratio = DEFAULTS["warmup_ratio"] if warmup_ratio is None else warmup_ratio
    for name, value in (("epochs", epochs), ("lr", lr), ("batch_size", batch_size), ("max_length", max_length)):
        if not value > 0:
            raise InvalidArgument(f"{name} must be > 0, got {value}")
    t0 = time.monotonic()
    torch.manual_seed(seed)
    rng = random.Random(seed)
    device = D.pick_device(device)

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if tokenizer.eos_token_id is None:
        raise InvalidArgument(f"the tokenizer in {model_dir} has no EOS token")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    config = AutoConfig.from_pretrained(model_dir, num_labels=1)
    D.disable_dropout(config)
    config.pad_token_id = pad_id
    model = AutoModelForSequenceClassification.from_pretrained(model_dir, config=config, dtype=torch.float32)
    model = model.to(device).train()

    rows = D.read_jsonl(data_path, ("prompt", "chosen", "rejected"))
    train_rows, eval_rows = D.split_train_eval(rows, eval_fraction, seed)
    train, train_rows = _encode_pairs(tokenizer, train_rows, max_length)
    evalset, eval_rows = _encode_pairs(tokenizer, eval_rows, max_length)
    if not train:
        raise InvalidArgument(f"no pair of {data_path} fits max_length {max_length}")

    steps_per_epoch = math.ceil(len(train) / batch_size)
    total_steps = max(1, math.ceil(epochs * steps_per_epoch))
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, D.lr_lambda(max(1, round(warmup_ratio * total_steps)), total_steps, "cosine"))
    log.info("RM: %d train / %d eval pairs, %d steps (%.2f epochs x %d), batch %d, lr %g, device %s",
             len(train), len(evalset), total_steps, epochs, steps_per_epoch, batch_size, lr, device)

    lengths = [max(len(c), len(r)) for c, r in train]
    step, ema_loss, ema_acc = 0, None, None
    bar = tqdm(total=total_steps, desc="reward", disable=not progress)
    while step < total_steps:
        for idx in D.length_grouped_batches(lengths, batch_size, rng):
            if step >= total_steps:
                break
            chosen, rejected = _pair_rewards(model, train, idx, pad_id, device)
            loss = bradley_terry_loss(chosen, rejected)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            step += 1
            acc = float((chosen > rejected).float().mean())
            value = float(loss.detach())
            ema_loss = value if ema_loss is None else 0.95 * ema_loss + 0.05 * value
            ema_acc = acc if ema_acc is None else 0.95 * ema_acc + 0.05 * acc
            bar.update(1)
            bar.set_postfix(loss=f"{ema_loss:.3f}", acc=f"{ema_acc:.3f}")
    bar.close()

    ev = evaluate(model, evalset, batch_size, pad_id, device) if evalset else {"loss": None, "accuracy": None}
    ceiling = noise_ceiling(data_path, rows)
    metrics = {"eval_loss": ev["loss"], "eval_accuracy": ev["accuracy"], "noise_ceiling": ceiling}
    flags = [r.get("flipped") for r in eval_rows]
    if evalset and all(isinstance(f, bool) for f in flags):
        # Against the raters' true preference (labels un-flipped): how well the ranking itself was learned.
        clean = [(m > 0) != f for m, f in zip(ev["margins"], flags)]
        metrics["eval_accuracy_clean"] = sum(clean) / len(clean)
        metrics["eval_noise_ceiling"] = 1.0 - sum(flags) / len(flags)
    score_mean, score_std = score_stats(model, [s for pair in train for s in pair], batch_size, pad_id, device)
    seconds = round(time.monotonic() - t0, 1)
    log.info("RM done: eval accuracy %s (noise ceiling %s), eval loss %s, score mean %.3f std %.3f (%.1f s)",
             ev["accuracy"], ceiling, ev["loss"], score_mean, score_std, seconds)

    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.eval()
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    meta = {
        "base_model": str(model_dir), "data": str(data_path), "train_pairs": len(train), "eval_pairs": len(evalset),
        "epochs": epochs, "steps": total_steps, "lr": lr, "batch_size": batch_size, "seed": seed,
        **metrics, "train_loss": ema_loss, "score_mean": score_mean, "score_std": score_std,
        "max_length": max_length, "seconds": seconds, "device": str(device),
    }
    (out / rm.META_FILE).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    return meta


def main(args: argparse.Namespace) -> int:
    meta = train_reward_model(args.model, args.data, args.out, epochs=args.epochs, lr=args.lr,
                              batch_size=args.batch_size, max_length=args.max_length,
                              eval_fraction=args.eval_fraction, seed=args.seed, device=args.device)
    print(json.dumps({k: meta.get(k) for k in ("steps", "eval_accuracy", "noise_ceiling", "eval_accuracy_clean",
                                                "score_mean", "score_std", "seconds")}))
    print(f"saved to {args.out}")
    return 0
