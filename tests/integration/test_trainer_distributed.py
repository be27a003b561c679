"""The trainer on torch.distributed: N ranks make the same update as one rank on the same batch
(PPO, SFT, reward model), and a checkpoint saved at one world size loads at another.

Each case runs real ranks under `torchrun` on the CPU with gloo and FSDP2, exactly the code that
runs with NCCL on GPUs.

Tolerances: fp32 throughout. The ranks reduce gradients in another order than one process sums
them, and a forward pass of 4 rows rounds a little differently than one of 8, so parameters
cannot be bit-equal. With SGD (lr 1e-3, no clipping) a parameter's change is the gradient
itself, so its difference between the runs, relative to the change, measures how far the
gradients differ: we allow 1e-3 (measured: up to 6e-5, the rounding of fp32 parameters of ~0.02
moved by ~1e-4). A normalisation error (a forgotten world_size factor, a per-rank mean) is an
error of order 1 there. AdamW is invariant to the gradient's scale, so it could hide such an
error; it is checked too because it is the optimizer users run.
"""
from __future__ import annotations

import json
import pathlib
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

pytestmark = pytest.mark.slow
ROOT = pathlib.Path(__file__).resolve().parents[2]
WORKER = ROOT / "tests" / "integration" / "ppo_update_worker.py"


def torchrun(nproc: int, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), *args],
                            capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    return result


@pytest.fixture(scope="module")
def tied_policy_dir(models_root):
    from services.demo.tiny_model import build_model
    return build_model("policy", models_root / "policy-tied", tie_embeddings=True, seed=1)


def initial(tied_policy_dir, tiny_reward_dir) -> dict[str, torch.Tensor]:
    params = {f"policy.{k}": v for k, v in load_file(tied_policy_dir / "model.safetensors").items()}
    return params | {f"value.{k}": v for k, v in load_file(tiny_reward_dir / "model.safetensors").items()}


def assert_same_update(one: dict, two: dict, start: dict, rtol: float) -> None:
    assert one.keys() == two.keys()
    for name in one:
        change = (one[name] - start[name]).norm()
        assert change > 0, f"{name} did not move"
        assert (one[name] - two[name]).norm() <= rtol * change, name


def assert_same_state(saved: dict, loaded: dict) -> None:
    """The worker's parameters and AdamW moments, bit for bit."""
    for name in saved["params"]:
        assert torch.equal(saved["params"][name], loaded["params"][name]), name
    for model in ("policy", "value"):
        assert saved["optimizer"][model].keys() == loaded["optimizer"][model].keys()
        for param, moments in saved["optimizer"][model].items():
            for key in ("exp_avg", "exp_avg_sq"):
                assert torch.equal(moments[key], loaded["optimizer"][model][param][key]), (model, param, key)


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_a_ppo_update_on_two_ranks_equals_one_rank(tmp_path, tied_policy_dir, tiny_reward_dir, optimizer):
    runs = {}
    for n in (1, 2):
        torchrun(n, str(WORKER), str(tied_policy_dir), str(tiny_reward_dir), str(tmp_path), optimizer)
        runs[n] = torch.load(tmp_path / f"params-update-{n}.pt")
    assert "policy.lm_head.weight" not in runs[1]["params"]  # tied: pushed and trained once, as the embedding
    assert_same_update(runs[1]["params"], runs[2]["params"], initial(tied_policy_dir, tiny_reward_dir), 1e-3)
    torch.testing.assert_close(runs[1]["advantages"], runs[2]["advantages"], rtol=1e-5, atol=1e-6)
    for key, value in runs[1]["stats"].items():
        assert runs[2]["stats"][key] == pytest.approx(value, rel=1e-4, abs=1e-7), key


def test_a_checkpoint_saved_at_two_ranks_loads_at_one_and_back(tmp_path, tied_policy_dir, tiny_reward_dir):
    """Parameters and AdamW moments survive a change of world size exactly (resharding)."""
    args = [str(WORKER), str(tied_policy_dir), str(tiny_reward_dir), str(tmp_path), "adamw"]
    torchrun(2, *args, "save")
    torchrun(1, *args, "load")
    saved, loaded = torch.load(tmp_path / "params-save-2.pt"), torch.load(tmp_path / "params-load-1.pt")
    assert loaded["step"] == 1
    assert_same_state(saved, loaded)
    # ... and a checkpoint of one rank loads on two.
    (tmp_path / "checkpoints").rename(tmp_path / "checkpoints-from-2")
    torchrun(1, *args, "save")
    torchrun(2, *args, "load")
    saved, loaded = torch.load(tmp_path / "params-save-1.pt"), torch.load(tmp_path / "params-load-2.pt")
    for name in saved["params"]:
        assert torch.equal(saved["params"][name], loaded["params"][name]), name


@pytest.mark.parametrize("advantage", ["grpo", "reinforce_pp"])
def test_a_critic_free_update_on_two_ranks_equals_one_rank_and_its_checkpoint_resumes(tmp_path, tied_policy_dir,
                                                                                       tiny_reward_dir, advantage):
    """No value model is loaded, trained or checkpointed; the update and the checkpoint behave as with it."""
    for n in (1, 2):
        torchrun(n, str(WORKER), str(tied_policy_dir), str(tiny_reward_dir), str(tmp_path), "sgd", "update", advantage)
    one, two = (torch.load(tmp_path / f"params-update-{n}.pt") for n in (1, 2))
    assert not [k for k in one["params"] if k.startswith("value.")] and one["stats"]["value_loss"] == 0.0
    start = {k: v for k, v in initial(tied_policy_dir, tiny_reward_dir).items() if k.startswith("policy.")}
    assert_same_update(one["params"], two["params"], start, 1e-3)
    args = [str(WORKER), str(tied_policy_dir), str(tiny_reward_dir), str(tmp_path), "adamw"]
    torchrun(2, *args, "save", advantage)
    torchrun(1, *args, "load", advantage)
    saved, loaded = torch.load(tmp_path / "params-save-2.pt"), torch.load(tmp_path / "params-load-1.pt")
    assert set(saved["optimizer"]) == {"policy"}
    for name in saved["params"]:
        assert torch.equal(saved["params"][name], loaded["params"][name]), name


def test_bf16_compute_keeps_fp32_parameters_on_one_rank_and_on_two(tmp_path, tied_policy_dir, tiny_reward_dir):
    """dtype bfloat16: autocast on one rank, FSDP's MixedPrecisionPolicy on two; the parameters
    (the optimizer's master copy) stay fp32, and the update is the fp32 one within bf16's precision
    (~3 significant digits; a forgotten cast or a bf16 master copy is off by far more)."""
    fp32 = torch.load(_run(tmp_path / "fp32", tied_policy_dir, tiny_reward_dir, 1, "float32"))
    assert fp32["compute_dtypes"] == ["float32"]
    start = initial(tied_policy_dir, tiny_reward_dir)
    for n in (1, 2):
        bf16 = torch.load(_run(tmp_path / f"bf16-{n}", tied_policy_dir, tiny_reward_dir, n, "bfloat16"))
        assert bf16["compute_dtypes"] == ["bfloat16"]  # every linear layer of policy and value computed in bf16
        assert {t.dtype for t in bf16["params"].values()} == {torch.float32}
        assert_same_update(fp32["params"], bf16["params"], start, 0.25)
        # ... and the update shows it: bf16's rounding moves it off the fp32 one (0.018-0.022 of the
        # update measured), where an ignored dtype would match fp32 to reduction-order noise (< 1e-4).
        moved = max(((bf16["params"][k] - fp32["params"][k]).norm() / (fp32["params"][k] - start[k]).norm()).item()
                    for k in start)
        assert moved > 1e-3, moved


def _run(out, policy_dir, reward_dir, nproc: int, dtype: str):
    torchrun(nproc, str(WORKER), str(policy_dir), str(reward_dir), str(out), "sgd", "update", "gae", dtype)
    return out / f"params-update-{nproc}.pt"


def test_logprobs_in_chunks_under_fsdp_equal_the_full_logits_tied_or_not(tied_policy_dir, tiny_policy_dir):
    """The head runs in a method registered with FSDP (the root's embeddings, norm and lm_head are
    gathered for it); values and gradients on two ranks equal the model's own forward
    (tests/integration/logprobs_worker.py)."""
    result = torchrun(2, str(ROOT / "tests" / "integration" / "logprobs_worker.py"), str(tied_policy_dir),
                      str(tiny_policy_dir))
    assert result.stdout.count("equal the full logits") == 2


@pytest.fixture(scope="module")
def small_data(tmp_path_factory):
    from services.demo.data import write_demo_data
    return write_demo_data(tmp_path_factory.mktemp("data"), seed=0, num_sft=64, num_prefs=64, num_prompts=16)


@pytest.mark.parametrize("job", ["sft", "rm"])
def test_a_supervised_step_on_two_ranks_equals_one_rank(tmp_path, small_data, tied_policy_dir, tiny_reward_dir, job):
    model, data = (tied_policy_dir, small_data["sft"]) if job == "sft" else (tiny_reward_dir, small_data["prefs"])
    outputs = {}
    for n in (1, 2):
        out = tmp_path / f"{job}-{n}"
        torchrun(n, "-m", "services.cli", "train", job, "--model", str(model), "--data", str(data), "--out", str(out),
                 "--max-steps", "2", "--batch-size", "16", "--eval-fraction", "0.1", "--lr", "1e-4", "--device", "cpu")
        outputs[n] = out
    one, two = load_file(outputs[1] / "model.safetensors"), load_file(outputs[2] / "model.safetensors")
    assert_same_update(one, two, load_file(model / "model.safetensors"), 1e-2)
    meta = "training_meta.json" if job == "sft" else "reward_meta.json"
    m1, m2 = (json.loads((outputs[n] / meta).read_text()) for n in (1, 2))
    assert (m1["world_size"], m2["world_size"]) == (1, 2)
    key = "eval_loss"
    assert m2[key] == pytest.approx(m1[key], rel=1e-5)


def test_lora_on_two_ranks_equals_one_rank_its_reference_is_the_base_and_it_resumes_at_another_world_size(
        tmp_path, tied_policy_dir, tiny_reward_dir):
    """LoRA (rank 4 on every projection) on the policy and on the value model, whose score head is
    trained in full. The update: the same tolerance argument as the whole model's (SGD, the
    adapters' change is their gradient). The reference is the policy's base with the adapter
    off, no second model: after the update its logprobs equal those of the SFT model loaded as a
    plain Hugging Face model, on one rank and under FSDP on two, while the policy's moved. A
    checkpoint of two ranks holds the adapters and their AdamW moments, not the base, and
    resumes on one rank with the same parameters, moments, step and prompt position."""
    args = [str(WORKER), str(tied_policy_dir), str(tiny_reward_dir)]
    for n in (1, 2):
        torchrun(n, *args, str(tmp_path / "sgd"), "sgd", "update", "gae", "float32", "4")
    one, two = (torch.load(tmp_path / "sgd" / f"params-update-{n}.pt", weights_only=False) for n in (1, 2))
    assert not one["reference"] and not two["reference"]
    assert one["params"].keys() == one["initial"].keys()
    assert all(".lora_" in k or k == "value.base_model.model.score.modules_to_save.default.weight"
               for k in one["params"]), sorted(one["params"])
    assert_same_update(one["params"], two["params"], one["initial"], 1e-3)
    for key, value in one["stats"].items():
        assert two["stats"][key] == pytest.approx(value, rel=1e-4, abs=1e-7), key
    for run in (one, two):
        mask = run["mask"].bool()
        assert torch.equal(run["ref_logprobs"][mask], run["plain_logprobs"][mask])
        assert (run["policy_logprobs"] - run["ref_logprobs"])[mask].abs().max() > 1e-4

    out = tmp_path / "adamw"
    torchrun(2, *args, str(out), "adamw", "save", "gae", "float32", "4")
    torchrun(1, *args, str(out), "adamw", "load", "gae", "float32", "4")
    saved, loaded = torch.load(out / "params-save-2.pt"), torch.load(out / "params-load-1.pt")
    assert (loaded["step"], loaded["prompts"]) == (saved["step"], saved["prompts"]) == (1, {"epoch": 1, "index": 1})
    assert_same_state(saved, loaded)
    from torch.distributed.checkpoint import FileSystemReader
    checkpoint_dir = out / "checkpoints" / "step-000001"
    stored = [k for k in FileSystemReader(str(checkpoint_dir / "shards")).read_metadata().state_dict_metadata
              if ".model." in k]
    assert stored and all(".lora_" in k or "modules_to_save" in k for k in stored), stored
    assert {p.name for p in (checkpoint_dir / "adapter").iterdir()} >= {"adapter_config.json",
                                                                       "adapter_model.safetensors"}
    assert not (checkpoint_dir / "policy").exists()
