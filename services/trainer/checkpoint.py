"""Checkpoints of a PPO run: resumable at any world size, and servable as they are.

    out/checkpoints/step-000010/
        shards/     torch.distributed.checkpoint: the trained models and their optimizers, sharded
        policy/     a Hugging Face directory of the policy (what a policy server loads);
        adapter/    instead of policy/ with LoRA: the policy's adapter in peft's format
        state.pt    step, weight version, schedulers, KL controller, prompt position, history
    out/checkpoints/LATEST      the name of the newest complete checkpoint

Only trained parameters are saved: with LoRA the shards hold the adapters (and a score head
trained in full) and their AdamW moments, not the frozen base, which the run reloads from its
sft_model and reward_model.

Every rank writes its own shards (a shared file system across nodes: a ReadWriteMany volume);
torch.distributed.checkpoint reshards on load, so a run saved on 8 ranks resumes on 2.

A checkpoint is written under a temporary name, renamed into place when complete, and only then
named by LATEST (a rename too). Both renames are atomic, so LATEST always names a complete
checkpoint, also while a step is saved again or when the process dies halfway. Saving a step that
LATEST already names writes nothing: the state at a step boundary does not change.
"""
from __future__ import annotations

import logging
import os
import pathlib
import shutil
import uuid
from collections.abc import Callable

import torch

from services.trainer import distributed
from services.trainer.distributed import Dist

log = logging.getLogger(__name__)

LATEST = "LATEST"


def _trained_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """(model state, optimizer state) of what is trained: frozen parameters (a LoRA base) are left
    out, a frozen tied head too (get_state_dict keeps it under its second name regardless)."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optimizer_state = get_state_dict(model, optimizer, options=_trained_options())
    frozen = {name for name, p in model.named_parameters(remove_duplicate=False) if not p.requires_grad}
    return {k: v for k, v in model_state.items() if k not in frozen}, optimizer_state


def _trained_options():
    from torch.distributed.checkpoint.state_dict import StateDictOptions
    # strict=False lets set_state_dict take a state without the frozen parameters (dcp.load has
    # already checked that every key asked for was in the checkpoint).
    return StateDictOptions(ignore_frozen_params=True, strict=False)


def root(out) -> pathlib.Path:
    return pathlib.Path(out) / "checkpoints"


def latest(out) -> pathlib.Path | None:
    """The checkpoint LATEST names, or None when there is none."""
    marker = root(out) / LATEST
    try:
        name = marker.read_text().strip()
    except FileNotFoundError:
        return None
    path = root(out) / name
    return path if (path / "state.pt").is_file() else None


def save(out, step: int, d: Dist, *, trained: dict[str, tuple[torch.nn.Module, torch.optim.Optimizer]],
         state: dict, export: Callable[[pathlib.Path], None], keep: int = 2) -> pathlib.Path:
    """Write step `step`; every rank calls this. `trained` maps a name to (model, optimizer);
    `export(dir)` writes what a user serves into the checkpoint's directory (a collective too);
    `state` is rank 0's to keep."""
    import torch.distributed.checkpoint as dcp

    base = root(out)
    final = base / f"step-{step:06d}"
    current = latest(out) if d.main else None
    if distributed.broadcast_object(current is not None and current.name == final.name, d):
        return final
    tmp = base / distributed.broadcast_object(f".tmp-{final.name}-{uuid.uuid4().hex[:8]}", d)
    if d.main:
        for stale in base.glob(".tmp-*"):  # left by a run that died while saving
            shutil.rmtree(stale, ignore_errors=True)
        tmp.mkdir(parents=True)
    torch.distributed.barrier()

    shards = {}
    for name, (model, optimizer) in trained.items():
        model_state, optimizer_state = _trained_state(model, optimizer)
        shards[name] = {"model": model_state, "optimizer": optimizer_state}
    dcp.save(shards, checkpoint_id=tmp / "shards")
    export(tmp)

    if d.main:
        torch.save({**state, "step": step}, tmp / "state.pt")
        _fsync(tmp / "state.pt")
        if final.exists():  # a step saved before, not the one LATEST names: replace it
            trash = base / f".tmp-replaced-{final.name}-{uuid.uuid4().hex[:8]}"
            final.rename(trash)
            shutil.rmtree(trash, ignore_errors=True)
        tmp.rename(final)
        marker = base / f".{LATEST}.{uuid.uuid4().hex[:8]}"
        marker.write_text(final.name)
        _fsync(marker)
        marker.rename(base / LATEST)
        _fsync(base)
        others = sorted(p for p in base.glob("step-*") if p != final)
        for old in others[:max(len(others) - (keep - 1), 0)]:
            shutil.rmtree(old, ignore_errors=True)
        log.info("checkpoint %s", final)
    torch.distributed.barrier()
    return final


def load(path: pathlib.Path, d: Dist, *, trained: dict[str, tuple[torch.nn.Module, torch.optim.Optimizer]]) -> dict:
    """Load the shards of `path` into the given models and optimizers (at this run's world size)
    and return rank 0's state (every rank gets the same)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_state_dict

    shards = {}
    for name, (model, optimizer) in trained.items():
        model_state, optimizer_state = _trained_state(model, optimizer)
        shards[name] = {"model": model_state, "optimizer": optimizer_state}
    dcp.load(shards, checkpoint_id=path / "shards")  # raises on any key the checkpoint lacks
    for name, (model, optimizer) in trained.items():
        set_state_dict(model, optimizer, model_state_dict=shards[name]["model"],
                       optim_state_dict=shards[name]["optimizer"], options=_trained_options())
    return torch.load(path / "state.pt", weights_only=False)


def _fsync(path: pathlib.Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
