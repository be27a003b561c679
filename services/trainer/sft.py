"""Supervised fine-tuning: the first stage of RLHF, and the reference policy of PPO.

L_SFT = -sum_i log P(y_i | x, y_<i) over the response tokens (and the EOS that
ends them); the prompt is context only (labels -100). Averaged per token.

    rlhf train sft --model models/policy --data data/sft.jsonl --out models/sft
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
from tqdm.auto import tqdm

from services.trainer import data as D

log = logging.getLogger(__name__)

# Tuned on the demo data (3000 examples) and the tiny model trained from random
# init: enough for well-formed answers of all three kinds in ~1-2 min on 2 CPU cores.
DEFAULTS = dict(epochs=4.0, lr=3e-3, batch_size=32, max_length=256, warmup_ratio=0.05, weight_decay=0.0)


def sft_nll(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(summed negative log-likelihood of the labelled tokens, their number).

    Position t predicts token t+1, so logits and labels are shifted by one.
    """
    logits, labels = logits[:, :-1].float(), labels[:, 1:]
    n = int((labels != D.IGNORE_INDEX).sum())
    nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                            ignore_index=D.IGNORE_INDEX, reduction="sum")
    return nll, n


def _batch(examples, idx, pad_id, device):
    """Right-padded (input_ids, labels, attention_mask) for the examples at idx."""
    ids = D.pad_right([examples[i][0] for i in idx], pad_id)
    labels = D.pad_right([examples[i][1] for i in idx], D.IGNORE_INDEX)
    attention_mask = D.pad_right([[1] * len(examples[i][0]) for i in idx], 0)
    return ids.to(device), labels.to(device), attention_mask.to(device)


@torch.no_grad()
def evaluate(model, examples, batch_size: int, pad_id: int, device) -> float:
    """Per-token NLL of the responses in `examples` (nan when there are none)."""
    model.eval()
    total, count = 0.0, 0
    order = sorted(range(len(examples)), key=lambda i: len(examples[i][0]))
    for start in range(0, len(order), batch_size):
        ids, labels, attn = _batch(examples, order[start:start + batch_size], pad_id, device)
        nll, n = sft_nll(model(input_ids=ids, attention_mask=attn).logits, labels)
        total, count = total + float(nll), count + n
    model.train()
    return total / count if count else float("nan")


def train_sft(model_dir, data_path, out_dir, *, epochs: float | None = None, lr: float | None = None,
              batch_size: int | None = None, max_length: int | None = None, eval_fraction: float = 0.1,
              seed: int = 0, device: str = "cpu", warmup_ratio: float | None = None,
              schedule: str = "cosine", progress: bool = True) -> dict:
    """Fine-tune the causal LM in model_dir on prompt/response JSONL; write a HF directory to out_dir.

    Returns the metrics also written to out_dir/training_meta.json.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    epochs = DEFAULTS["epochs"] if epochs is None else epochs
    lr = DEFAULTS["lr"] if lr is None else lr
    batch_size = DEFAULTS["batch_size"] if batch_size is None else batch_size
    max_length = DEFAULTS["max_length"] if max_length is None else max_length
    warmup_ratio = DEFAULTS["warmup_ratio"] if warmup_ratio is None else warmup_ratio
    for name, value in (("epochs", epochs), ("lr", lr), ("batch_size", batch_size), ("max_length", max_length)):
        if not value > 0:
            raise D.InvalidArgument(f"{name} must be > 0, got {value}")
    t0 = time.monotonic()
    torch.manual_seed(seed)
    rng = random.Random(seed)
    device = D.pick_device(device)

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if tokenizer.eos_token_id is None:
        raise D.InvalidArgument(f"the tokenizer in {model_dir} has no EOS token: a response could never end")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    config = AutoConfig.from_pretrained(model_dir)
    D.disable_dropout(config)
    model = AutoModelForCausalLM.from_pretrained(model_dir, config=config, dtype=torch.float32).to(device)
    model.train()

    rows = D.read_jsonl(data_path, ("prompt", "response"))
    train_rows, eval_rows = D.split_train_eval(rows, eval_fraction, seed)
    encoded = [D.encode_sft(tokenizer, r["prompt"], r["response"], max_length) for r in train_rows]
    truncated = sum(t for _, _, t in encoded)
    if truncated:
        log.warning("%d of %d training examples are longer than max_length %d and were cut",
                    truncated, len(encoded), max_length)
    train = [(ids, labels) for ids, labels, _ in encoded]
    evalset = [D.encode_sft(tokenizer, r["prompt"], r["response"], max_length)[:2] for r in eval_rows]

    steps_per_epoch = math.ceil(len(train) / batch_size)
    total_steps = max(1, math.ceil(epochs * steps_per_epoch))
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95),
                                  weight_decay=DEFAULTS["weight_decay"])
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, D.lr_lambda(max(1, round(warmup_ratio * total_steps)), total_steps, schedule))
    log.info("SFT: %d train / %d eval examples, %d steps (%.2f epochs x %d), batch %d, lr %g, device %s",
             len(train), len(evalset), total_steps, epochs, steps_per_epoch, batch_size, lr, device)

    lengths = [len(ids) for ids, _ in train]
    tokens_per_example = sum(sum(l != D.IGNORE_INDEX for l in labels[1:]) for _, labels in train) / len(train)
    step, train_loss = 0, None  # train_loss: moving average of the per-token loss, for the bar and the log
    bar = tqdm(total=total_steps, desc="sft", disable=not progress)
    while step < total_steps:
        for idx in D.length_grouped_batches(lengths, batch_size, rng):
            if step >= total_steps:
                break
            ids, labels, attn = _batch(train, idx, pad_id, device)
            nll, n = sft_nll(model(input_ids=ids, attention_mask=attn).logits, labels)
            # Divide by a constant, not by this batch's token count: batches are grouped by
            # length, and a per-batch mean would weight the tokens of short answers far more
            # than those of long ones (the model would then over-produce short answers).
            (nll / (len(idx) * tokens_per_example)).backward()
            loss = nll.detach() / max(n, 1)
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            step += 1
            train_loss = float(loss) if train_loss is None else 0.95 * train_loss + 0.05 * float(loss)
            bar.update(1)
            bar.set_postfix(loss=f"{train_loss:.3f}", lr=f"{scheduler.get_last_lr()[0]:.2e}")
    bar.close()
    eval_loss = evaluate(model, evalset, batch_size, pad_id, device) if evalset else None
    log.info("SFT done: train loss %.4f, eval loss %s (%.1f s)", train_loss, eval_loss, time.monotonic() - t0)

    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.eval()
    model.generation_config = GenerationConfig(
        eos_token_id=tokenizer.eos_token_id, pad_token_id=pad_id,
        bos_token_id=getattr(model.generation_config, "bos_token_id", None))
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    meta = {
        "base_model": str(model_dir), "data": str(data_path), "train_examples": len(train),
        "eval_examples": len(evalset), "truncated_examples": truncated, "epochs": epochs, "steps": total_steps,
        "lr": lr, "batch_size": batch_size, "max_length": max_length, "schedule": schedule,
        "warmup_ratio": warmup_ratio, "seed": seed, "train_loss": train_loss, "eval_loss": eval_loss,
        "eval_perplexity": math.exp(eval_loss) if eval_loss is not None else None,
        "seconds": round(time.monotonic() - t0, 1), "device": str(device),
    }
    (out / "training_meta.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    return meta


def main(args: argparse.Namespace) -> int:
    meta = train_sft(args.model, args.data, args.out, epochs=args.epochs, lr=args.lr, batch_size=args.batch_size,
                     max_length=args.max_length, eval_fraction=args.eval_fraction, seed=args.seed,
                     device=args.device)
    print(json.dumps({k: meta[k] for k in ("steps", "train_loss", "eval_loss", "seconds")}))
    print(f"saved to {args.out}")
    return 0
