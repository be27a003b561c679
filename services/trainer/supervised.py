"""The loop SFT and reward-model training share: length-grouped global batches split over the
ranks, AdamW with warmup and decay, gradient clipping, progress, and the batched evaluation.

A job gives `step(rows, batch_size)`: the loss of its rows, normalised so that the sum over the
ranks' gradients is the gradient of the whole batch (FSDP averages over the ranks, hence the
factor world_size in the jobs' losses), and the local sums it wants reported.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import pathlib
import random
import sys
from collections.abc import Callable, Iterable

import torch
from tqdm.auto import tqdm

from services.trainer import distributed, lora
from services.common.errors import InvalidArgument
from services.trainer.config import ConfigError, Supervised, dump, from_args
from services.trainer.data import length_grouped_batches, lr_lambda
from services.trainer.distributed import Dist

log = logging.getLogger(__name__)


@dataclasses.dataclass
class StepResult:
    loss: torch.Tensor  # to backpropagate on this rank
    sums: dict[str, float]  # local sums to report, e.g. {"nll": ..., "tokens": ...}


def prepare(cfg: Supervised, d: Dist | None) -> tuple[Dist, object, int, list[dict], list[dict]]:
    """What both jobs do first: join the process group, seed, load the tokenizer (it must have an
    EOS: a response could never end), read the data set and split it. Returns (d, tokenizer,
    pad id, train rows, eval rows)."""
    from transformers import AutoTokenizer

    from services.trainer.data import split_train_eval
    from services.trainer.formats import load_rows

    lora.check_not_adapter(cfg.model, "model")
    d = d or distributed.init(cfg.device, cfg.dtype, cfg.collective_timeout_s)
    torch.manual_seed(cfg.seed)
    tokenizer = AutoTokenizer.from_pretrained(cfg.model)
    if tokenizer.eos_token_id is None:
        raise ConfigError(f"model: the tokenizer in {cfg.model} has no EOS token: a response could never end")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    train_rows, eval_rows = split_train_eval(load_rows(cfg.data, cfg.columns, cfg.data_split), cfg.eval_fraction,
                                             cfg.seed)
    return d, tokenizer, pad_id, train_rows, eval_rows


def fit(model: torch.nn.Module, cfg: Supervised, d: Dist, *, lengths: list[int],
        step: Callable[[list[int], int], StepResult], show: Callable[[dict[str, float]], dict[str, float]],
        desc: str) -> dict:
    """Train `model` on len(lengths) examples for cfg.epochs (or cfg.max_steps). `show` turns the
    global sums of one step into what the progress bar shows; their moving averages come back."""
    steps_per_epoch = math.ceil(len(lengths) / cfg.batch_size)
    total_steps = max(1, math.ceil(cfg.epochs * steps_per_epoch))
    if cfg.max_steps:
        total_steps = min(total_steps, cfg.max_steps)
    optimizer = torch.optim.AdamW(lora.trainable(model), lr=cfg.lr, betas=(0.9, 0.95), weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambda(max(1, round(cfg.warmup_ratio * total_steps)), total_steps, cfg.schedule))
    log.info("%s: %d examples, %d steps (%.2f epochs x %d), batch %d over %d rank(s), lr %g, rank %d on %s, "
             "compute %s, %.1f MB of parameters here%s", desc, len(lengths), total_steps, cfg.epochs, steps_per_epoch,
             cfg.batch_size, d.world_size, cfg.lr, d.rank, d.device, str(d.dtype).removeprefix("torch."),
             distributed.local_bytes(model) / 1e6,
             f", LoRA rank {cfg.lora.rank}: {distributed.local_bytes(*lora.trainable(model)) / 1e6:.2f} MB of them "
             f"trained" if cfg.lora.enabled else "")

    rng = random.Random(cfg.seed)  # the same batches on every rank
    done, averages = 0, {}
    bar = tqdm(total=total_steps, desc=desc, disable=not d.main)
    while done < total_steps:
        for idx in length_grouped_batches(lengths, cfg.batch_size, rng):
            if done >= total_steps:
                break
            rows = idx[d.rank::d.world_size]
            # A last batch smaller than the world leaves a rank without rows: it still runs a
            # forward and backward (FSDP's gathers need every rank), on a row weighted 0.
            with distributed.autocast(d):
                result = step(rows or idx[:1], len(idx))
            (result.loss if rows else 0.0 * result.loss).backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            done += 1
            sums = distributed.all_sum([v if rows else 0.0 for v in result.sums.values()], d)
            for key, value in show(dict(zip(result.sums, sums))).items():
                averages[key] = value if key not in averages else 0.95 * averages[key] + 0.05 * value
            bar.update(1)
            bar.set_postfix({**{k: f"{v:.3f}" for k, v in averages.items()}, "lr": f"{scheduler.get_last_lr()[0]:.2e}"})
    bar.close()
    return {"steps": total_steps, **{f"train_{k}": v for k, v in averages.items()}}


@torch.no_grad()
def evaluate(model: torch.nn.Module, order: Iterable[int], batch_size: int, d: Dist,
             forward: Callable[[list[int]], dict[str, float]]) -> dict[str, float]:
    """Sums of `forward(rows)` over every example in `order`, in batches split over the ranks
    (a rank without rows in a batch runs one row and drops its sums)."""
    model.eval()
    order = list(order)
    totals: dict[str, float] = {}
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        rows = idx[d.rank::d.world_size]
        with distributed.autocast(d):
            sums = forward(rows or idx[:1])
        for key, value in sums.items():
            totals[key] = totals.get(key, 0.0) + (value if rows else 0.0)
    model.train()
    if not totals:
        return {}
    return dict(zip(totals, distributed.all_sum(list(totals.values()), d)))


def write_model(model: torch.nn.Module, tokenizer, cfg: Supervised, d: Dist) -> list[pathlib.Path]:
    """The job's output: cfg.out holds the model (a Hugging Face directory), or with LoRA the
    adapter in peft's format; cfg.export_merged, when set, base + adapter merged. Returns the
    directories written (the job's meta file goes into each)."""
    out = pathlib.Path(cfg.out)
    distributed.export_hf(model, tokenizer, out, d)
    if not cfg.export_merged:
        return [out]
    lora.export_merged(model, pathlib.Path(cfg.export_merged), d, tokenizer)
    return [out, pathlib.Path(cfg.export_merged)]


# config key -> the attribute of the parsed CLI arguments that sets it (`rlhf train sft|rm`)
FLAGS = {key: key for key in ("model", "data", "out", "epochs", "lr", "batch_size", "max_length", "eval_fraction",
                              "seed", "device", "dtype", "max_steps", "data_split", "init", "export_merged")}


def load_config(args: argparse.Namespace, cls: type[Supervised]) -> Supervised:
    return from_args(cls, args, FLAGS)


def run_job(args: argparse.Namespace, cls: type[Supervised], train: Callable[[Supervised], dict], name: str,
            keys: tuple[str, ...]) -> int:
    """The CLI around a supervised job: load and check the config (exit 2 when it or the data is
    bad: retrying cannot help), train, print a summary on rank 0."""
    try:
        cfg = load_config(args, cls)
        if args.print_config:
            print(dump(cfg), end="")
            return 0
        meta = train(cfg)
    except (ConfigError, InvalidArgument) as e:
        print(f"rlhf train {name}: {e}", file=sys.stderr)
        return 2
    finally:
        distributed.close()
    if int(os.environ.get("RANK", 0)) == 0:
        print(json.dumps({k: meta.get(k) for k in keys}))
        print(f"saved to {cfg.out}" + (f", merged to {cfg.export_merged}" if cfg.export_merged else ""))
    return 0
