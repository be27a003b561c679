"""Checkpoints of a PPO run: everything needed to continue as if never stopped.

    out/checkpoints/step-000010/{policy/, value/, state.pt}   and   out/checkpoints/LATEST

policy/ and value/ are Hugging Face directories (the policy can be served as it is);
state.pt holds optimizers, schedulers, step, weight version, RNG states, data position
and the KL controller. A checkpoint is written to a temporary name and renamed, so a
crash mid-write never leaves a half checkpoint behind LATEST.
"""
from __future__ import annotations

import pathlib
import random
import shutil

import numpy as np
import torch


def _dir(out: str | pathlib.Path) -> pathlib.Path:
    return pathlib.Path(out) / "checkpoints"


def save(out, step: int, *, policy, value, tokenizer, state: dict, keep: int = 2) -> pathlib.Path:
    root = _dir(out)
    final = root / f"step-{step:06d}"
    tmp = root / f".tmp-step-{step:06d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    policy.save_pretrained(tmp / "policy")
    tokenizer.save_pretrained(tmp / "policy")
    value.save_pretrained(tmp / "value")
    rng = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    torch.save({**state, "step": step, "rng": rng}, tmp / "state.pt")
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    (root / "LATEST.tmp").write_text(final.name)
    (root / "LATEST.tmp").rename(root / "LATEST")
    for old in sorted(root.glob("step-*"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest(out) -> pathlib.Path | None:
    marker = _dir(out) / "LATEST"
    if not marker.exists():
        return None
    path = _dir(out) / marker.read_text().strip()
    return path if (path / "state.pt").exists() else None


def load_state(path: pathlib.Path) -> dict:
    """The saved state; also restores the RNGs, so sampling continues where it stopped."""
    state = torch.load(path / "state.pt", weights_only=False)
    random.setstate(state["rng"]["python"])
    np.random.set_state(state["rng"]["numpy"])
    torch.set_rng_state(state["rng"]["torch"])
    return state
