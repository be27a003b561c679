"""Supervised fine-tuning: the first stage of RLHF, and the reference policy of PPO.

L_SFT = -sum_i log P(y_i | x, y_<i) over the completion tokens (and the EOS or end-of-turn that
ends them: the assistant turns of a conversation); the prompt is context only (labels -100).
Averaged per token. Data: any TRL SFT format (services.trainer.formats).

    rlhf train sft --model models/policy --data data/sft.jsonl --out models/sft
    torchrun --nproc-per-node 8 -m services.cli train sft --config sft.yaml
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import time

import torch

from services.ml.head import pad_batch
from services.trainer import data as D
from services.trainer import distributed, formats, lora
from services.trainer.config import SFTConfig
from services.trainer.distributed import Dist
from services.trainer.logprobs import next_token_logprobs
from services.trainer import supervised
from services.trainer.supervised import StepResult, evaluate, fit, run_job

log = logging.getLogger(__name__)


def sft_nll(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor
            ) -> tuple[torch.Tensor, int]:
    """(summed negative log-likelihood of the labelled tokens, their number).

    Position t predicts token t+1; only the positions that predict a label are scored, and never
    as full-vocabulary logits (services.trainer.logprobs).
    """
    logprobs, _ = next_token_logprobs(model, input_ids, attention_mask, None, labels)
    return -logprobs.sum(), int((labels[:, 1:] != D.IGNORE_INDEX).sum())


def _batch(examples, idx, pad_id, device):
    """Right-padded (input_ids, labels, attention_mask) for the examples at idx."""
    ids, attention_mask = pad_batch([examples[i][0] for i in idx], pad_id, device)
    labels, _ = pad_batch([examples[i][1] for i in idx], D.IGNORE_INDEX, device)
    return ids, labels, attention_mask


def train_sft(cfg: SFTConfig, d: Dist | None = None) -> dict:
    """Fine-tune the causal LM cfg.model on cfg.data; write a Hugging Face directory to cfg.out.
    Returns the metrics also written to out/training_meta.json."""
    from transformers import AutoModelForCausalLM, GenerationConfig

    t0 = time.monotonic()
    d, tokenizer, pad_id, train_rows, eval_rows = supervised.prepare(cfg, d)
    train, truncated = formats.sft_examples(tokenizer, train_rows, cfg.max_length, cfg.data)
    if truncated:
        log.warning("%d of %d training examples are longer than max_length %d and were cut",
                    truncated, len(train), cfg.max_length)
    evalset = formats.sft_examples(tokenizer, eval_rows, cfg.max_length, cfg.data)[0] if eval_rows else []

    model = distributed.load_model(AutoModelForCausalLM, cfg.model, d, lora=cfg.lora, seed=cfg.seed)
    # Divide by a constant, not by a batch's token count: batches are grouped by length, and a
    # per-batch mean would weight the tokens of short answers far more than those of long ones
    # (the model would then over-produce short answers).
    tokens_per_example = sum(sum(l != D.IGNORE_INDEX for l in labels[1:]) for _, labels in train) / len(train)

    def step(rows: list[int], batch_size: int) -> StepResult:
        ids, labels, attn = _batch(train, rows, pad_id, d.device)
        nll, n = sft_nll(model, ids, attn, labels)
        return StepResult(nll * d.world_size / (batch_size * tokens_per_example), {"nll": nll.item(), "tokens": n})

    def eval_forward(rows: list[int]) -> dict[str, float]:
        ids, labels, attn = _batch(evalset, rows, pad_id, d.device)
        nll, n = sft_nll(model, ids, attn, labels)
        return {"nll": nll.item(), "tokens": n}

    trained = fit(model, cfg, d, lengths=[len(ids) for ids, _ in train], step=step, desc="sft",
                  show=lambda s: {"loss": s["nll"] / max(s["tokens"], 1)})
    eval_loss = None
    if evalset:
        totals = evaluate(model, sorted(range(len(evalset)), key=lambda i: len(evalset[i][0])), cfg.batch_size, d,
                          eval_forward)
        eval_loss = totals["nll"] / totals["tokens"] if totals.get("tokens") else None
    log.info("SFT done: train loss %.4f, eval loss %s (%.1f s)", trained.get("train_loss", float("nan")), eval_loss,
             time.monotonic() - t0)

    hf = lora.base_of(model)
    hf.generation_config = GenerationConfig(
        eos_token_id=tokenizer.eos_token_id, pad_token_id=pad_id,
        bos_token_id=getattr(hf.generation_config, "bos_token_id", None))
    written = supervised.write_model(model, tokenizer, cfg, d)
    meta = {
        "base_model": str(cfg.model), "data": str(cfg.data), "train_examples": len(train),
        "eval_examples": len(evalset), "truncated_examples": truncated, "epochs": cfg.epochs,
        "steps": trained["steps"], "lr": cfg.lr, "batch_size": cfg.batch_size, "max_length": cfg.max_length,
        "schedule": cfg.schedule, "warmup_ratio": cfg.warmup_ratio, "seed": cfg.seed,
        "train_loss": trained.get("train_loss"), "eval_loss": eval_loss,
        "eval_perplexity": math.exp(eval_loss) if eval_loss is not None else None,
        "seconds": round(time.monotonic() - t0, 1), "device": str(d.device), "world_size": d.world_size,
        **({"lora": cfg.lora.model_dump(), "export_merged": cfg.export_merged} if cfg.lora.enabled else {}),
    }
    if d.main:
        for out in written:
            (out / "training_meta.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    return meta


def main(args: argparse.Namespace) -> int:
    return run_job(args, SFTConfig, train_sft, "sft", ("steps", "train_loss", "eval_loss", "seconds"))


def load_config(args: argparse.Namespace) -> SFTConfig:
    return supervised.load_config(args, SFTConfig)
