"""Checkpoints: everything restored, LATEST always names a complete checkpoint, a step saved
twice is written once. (One rank here; sharded checkpoints across world sizes:
tests/integration/test_trainer_distributed.py.)"""
from __future__ import annotations

import threading

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from services.trainer import checkpoint, distributed


@pytest.fixture(scope="module")
def d():
    return distributed.init("cpu", "float32")


@pytest.fixture
def trained(d, tiny_policy_dir):
    model = distributed.load_model(AutoModelForCausalLM, tiny_policy_dir, d)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(input_ids=torch.tensor([[5, 6, 7]])).logits.sum().backward()
    opt.step()
    return model, opt


def save(out, step, d, trained, tokenizer, state=None):
    model, opt = trained
    return checkpoint.save(out, step, d, trained={"policy": (model, opt)}, state=state or {"marker": step},
                           export=lambda path: distributed.export_hf(model, tokenizer, path / "policy", d))


def test_roundtrip_restores_model_optimizer_and_state(tmp_path, d, trained, tiny_policy_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_policy_dir)
    path = save(tmp_path, 4, d, trained, tokenizer, {"kl": 0.5})
    assert checkpoint.latest(tmp_path) == path and path.name == "step-000004"

    fresh = distributed.load_model(AutoModelForCausalLM, tiny_policy_dir, d)
    fresh_opt = torch.optim.AdamW(fresh.parameters(), lr=1e-3)
    state = checkpoint.load(path, d, trained={"policy": (fresh, fresh_opt)})
    assert state == {"kl": 0.5, "step": 4}
    model, opt = trained
    for (name, a), b in zip(model.named_parameters(), fresh.parameters()):
        assert torch.equal(a, b), name
    for a, b in zip(opt.state.values(), fresh_opt.state.values()):
        assert torch.equal(a["exp_avg"], b["exp_avg"]) and torch.equal(a["exp_avg_sq"], b["exp_avg_sq"])
    # The policy/ directory is a Hugging Face model that loads on its own, with the same weights.
    served = AutoModelForCausalLM.from_pretrained(path / "policy")
    for name, p in model.named_parameters():
        assert torch.equal(served.get_parameter(name), p), name


def test_a_step_saved_again_is_not_written_again(tmp_path, d, trained, tiny_policy_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_policy_dir)
    first = save(tmp_path, 3, d, trained, tokenizer)
    written = (first / "state.pt").stat().st_mtime_ns
    for _ in range(5):
        assert save(tmp_path, 3, d, trained, tokenizer) == first
    assert (first / "state.pt").stat().st_mtime_ns == written
    assert sorted(p.name for p in checkpoint.root(tmp_path).iterdir()) == ["LATEST", "step-000003"]


def test_latest_always_names_a_complete_checkpoint_while_saving(tmp_path, d, trained, tiny_policy_dir):
    """A reader polling LATEST (a resume after a crash at any moment) never finds nothing and never
    a directory missing a part, while steps are saved, saved again, and replaced."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_policy_dir)
    save(tmp_path, 1, d, trained, tokenizer)
    seen, bad, done = set(), [], threading.Event()

    def poll():
        while not done.is_set():
            path = checkpoint.latest(tmp_path)
            if path is None or not all((path / part).exists() for part in ("state.pt", "shards/.metadata",
                                                                            "policy/config.json")):
                bad.append(path)
            else:
                seen.add(path.name)

    reader = threading.Thread(target=poll)
    reader.start()
    try:
        for step in (2, 2, 3, 3, 3, 4):
            save(tmp_path, step, d, trained, tokenizer)
        # A stale step-000006 from an earlier life of the run (died before LATEST moved): replaced whole.
        stale = save(tmp_path, 6, d, trained, tokenizer)
        (checkpoint.root(tmp_path) / "LATEST.new").write_text("step-000004")
        (checkpoint.root(tmp_path) / "LATEST.new").rename(checkpoint.root(tmp_path) / "LATEST")
        (stale / "stale-marker").write_text("old")
        assert save(tmp_path, 6, d, trained, tokenizer) == stale and not (stale / "stale-marker").exists()
    finally:
        done.set()
        reader.join()
    assert not bad, bad
    assert {"step-000001", "step-000004", "step-000006"} <= seen
    names = sorted(p.name for p in checkpoint.root(tmp_path).iterdir())
    assert names == ["LATEST", "step-000004", "step-000006"]  # keep=2, no temporary left
