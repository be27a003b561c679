"""Checkpoints of a PPO run: resumable at any world size, and servable as they are.

    out/checkpoints/step-000010/
        shards/     torch.distributed.checkpoint: the trained models and their optimizers, sharded
        policy/     a Hugging Face directory of the policy (what a policy server loads)
        state.pt    step, weight version, schedulers, KL controller, prompt position, history
    out/checkpoints/LATEST      the name of the newest complete checkpoint

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
    `export(dir)` writes the servable policy (a collective too); `state` is rank 0's to keep."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

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
        model_state, optimizer_state = get_state_dict(model, optimizer)
        shards[name] = {"model": model_state, "optimizer": optimizer_state}
    dcp.save(shards, checkpoint_id=tmp / "shards")
    export(tmp / "policy")

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
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    shards = {}
    for name, (model, optimizer) in trained.items():
        model_state, optimizer_state = get_state_dict(model, optimizer)
        shards[name] = {"model": model_state, "optimizer": optimizer_state}
    dcp.load(shards, checkpoint_id=path / "shards")
    for name, (model, optimizer) in trained.items():
        set_state_dict(model, optimizer, model_state_dict=shards[name]["model"],
                       optim_state_dict=shards[name]["optimizer"])
    return torch.load(path / "state.pt", weights_only=False)


def _fsync(path: pathlib.Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
