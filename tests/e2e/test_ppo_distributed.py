"""PPO on two ranks (torchrun, FSDP2, gloo) against live policy and reward services: the push
from sharded parameters is exact (tied embeddings included), a checkpoint resumes at another
world size with the same prompt order, and a rank killed with SIGKILL ends the job at once,
naming the rank, after which --resume goes on. Real servers, real vLLM (CPU)."""
from __future__ import annotations

import hashlib
import os
import signal
import time

import psutil
import pytest
import torch
from safetensors.torch import load_file

from services.policy.client import PolicyClient
from services.trainer.state import Prompts

from ppo_harness import AUTH, policy_server, read_metrics, reward_server, start_trainer, wait_for, write_config

pytestmark = [pytest.mark.slow, pytest.mark.vllm]
PROMPTS = ["How do I prepare for my calculus exam?", "Any tips for my poetry debate next week?",
           "How can I do well in my economics final?", "What should I study for chemistry?"]


@pytest.fixture(scope="module")
def tied_stack(models_root, tiny_reward_dir, tmp_path_factory):
    """Two replicas of a policy whose LM head is tied to its input embedding, and a reward service."""
    from services.demo.data import write_demo_data
    from services.demo.tiny_model import build_model
    policy_dir = build_model("policy", models_root / "policy-tied-e2e", tie_embeddings=True, seed=2)
    logs = tmp_path_factory.mktemp("logs")
    data = write_demo_data(tmp_path_factory.mktemp("data"), seed=0, num_sft=30, num_prefs=30, num_prompts=200)
    reward = reward_server(tiny_reward_dir, logs / "reward.log")
    replicas = [policy_server(policy_dir, logs), policy_server(policy_dir, logs)]
    try:
        for s in (reward, *replicas):
            s.start()
        for s in (reward, *replicas):
            s.wait_ready()
        yield dict(reward=reward, replicas=replicas, prompts=data["prompts"], logs=logs, policy_dir=policy_dir,
                   reward_dir=tiny_reward_dir)
    finally:
        for s in (reward, *replicas):
            s.terminate()


def greedy(address: str) -> list[tuple[list[int], list[float]]]:
    with PolicyClient(address, AUTH, timeout=120) as client:
        results = client.generate(PROMPTS, max_tokens=24, temperature=0.0, logprobs=True)
    return [(r.completions[0].token_ids, r.completions[0].logprobs) for r in results]


def test_two_ranks_train_and_push_exactly_what_they_export(tied_stack, tmp_path):
    out = tmp_path / "run"
    config = write_config(tmp_path / "ppo.yaml", tied_stack, out, steps=3, checkpoint_every=0)
    proc, _ = start_trainer(config, tmp_path / "trainer.log", nproc=2)
    assert proc.wait(timeout=900) == 0, (tmp_path / "trainer.log").read_text()[-4000:]
    log = (tmp_path / "trainer.log").read_text()
    assert "rank 1/2 on cpu" in log and "rank 0/2 on cpu" in log
    history = read_metrics(out)
    assert [m["step"] for m in history] == [1, 2, 3]
    for m in history:
        assert m["trained_versions"] == [m["weight_version"]] and m["completions"] == 16

    exported = out / "checkpoints" / "step-000003" / "policy"
    trained, initial = load_file(exported / "model.safetensors"), load_file(tied_stack["policy_dir"] / "model.safetensors")
    assert "lm_head.weight" not in trained and trained.keys() == initial.keys()
    assert any(not torch.equal(trained[k], initial[k]) for k in trained), "training changed nothing"
    assert_replicas_serve(exported, tied_stack, history[-1]["pushed_version"])


def assert_replicas_serve(model_dir, stack: dict, version: int) -> None:
    """Every replica serves `version`, and answers (greedy token ids and logprobs) as a fresh
    server on `model_dir`."""
    fresh = policy_server(model_dir, stack["logs"]).start().wait_ready()
    try:
        expected = greedy(fresh.address)
        for replica in stack["replicas"]:
            with PolicyClient(replica.address, AUTH) as client:
                assert client.model_info().weight_version == version
            for (ids, logprobs), (want_ids, want_logprobs) in zip(greedy(replica.address), expected):
                assert ids == want_ids
                assert logprobs == pytest.approx(want_logprobs, abs=1e-5)
    finally:
        fresh.terminate()


def expected_prompt_hashes(path, steps: int, batch: int = 16) -> dict[int, str]:
    prompts = Prompts(str(path), seed=0)
    return {s: hashlib.sha256("\n".join(prompts.next(batch)).encode()).hexdigest()[:16] for s in range(1, steps + 1)}


def test_a_checkpoint_of_two_ranks_resumes_on_one_and_back_on_two(tied_stack, tmp_path):
    out, log = tmp_path / "run", tmp_path / "trainer.log"
    for nproc, steps in ((2, 2), (1, 4), (2, 5)):
        config = write_config(tmp_path / "ppo.yaml", tied_stack, out, steps=steps, checkpoint_every=1)
        proc, _ = start_trainer(config, log, *(["--resume"] if steps > 2 else []), nproc=nproc)
        assert proc.wait(timeout=900) == 0, log.read_text()[-4000:]
    history = read_metrics(out)
    assert [m["step"] for m in history] == [1, 2, 3, 4, 5]
    assert log.read_text().count("resumed from") == 1 + 2  # one rank, then two ranks each say it
    # The same prompts, in the same order, as one uninterrupted run: the data position was restored.
    expected = expected_prompt_hashes(tied_stack["prompts"], 5)
    assert [m["prompts_sha"] for m in history] == [expected[s] for s in range(1, 6)]
    # Versions only go up, across every restart.
    versions = [m["pushed_version"] for m in history]
    assert versions == sorted(set(versions))


def test_a_rank_killed_mid_run_ends_the_job_fast_and_resume_goes_on(tied_stack, tmp_path):
    out, log = tmp_path / "run", tmp_path / "trainer.log"
    config = write_config(tmp_path / "ppo.yaml", tied_stack, out, steps=200, checkpoint_every=2)
    proc, _ = start_trainer(config, log, nproc=2)
    try:
        wait_for(lambda: len(read_metrics(out)) >= 3, 600, proc, "three steps")
        ranks = {p.environ().get("RANK"): p for p in psutil.Process(proc.pid).children(recursive=True)
                 if p.environ().get("RANK") is not None and "services.cli" in " ".join(p.cmdline())}
        assert set(ranks) == {"0", "1"}, ranks
        os.kill(ranks["1"].pid, signal.SIGKILL)
        killed = time.monotonic()
        code = proc.wait(timeout=120)
        took = time.monotonic() - killed
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    text = log.read_text()
    assert code != 0 and took < 60, (code, took)
    # torchrun's summary names the rank that failed first and how.
    failure = text[text.rindex("Root Cause"):]
    assert "rank      : 1" in failure and "SIGKILL" in failure, failure[:1500]

    saved = int((out / "checkpoints" / "LATEST").read_text().split("-")[1])
    before = [m for m in read_metrics(out) if m["step"] <= saved]
    config = write_config(tmp_path / "ppo.yaml", tied_stack, out, steps=saved + 2, checkpoint_every=2)
    proc, _ = start_trainer(config, log, "--resume", nproc=2)
    assert proc.wait(timeout=900) == 0, log.read_text()[-4000:]
    steps = [m["step"] for m in read_metrics(out)]
    assert steps[-2:] == [saved + 1, saved + 2] and len(before) == saved


def test_lora_on_two_ranks_pushes_the_merged_model_it_exports(tied_stack, tmp_path):
    """PPO with LoRA on two ranks (lora.push merged): every step pushes base + scaled B A under the
    full model's names, gathered one weight at a time; --export-merged writes the same model. The
    replicas then answer exactly as a fresh server on the export. The checkpoints hold the adapter
    in peft's format, not the policy."""
    out, merged, log = tmp_path / "run", tmp_path / "merged", tmp_path / "trainer.log"
    config = write_config(tmp_path / "ppo.yaml", tied_stack, out, steps=2, checkpoint_every=0,
                          lora=dict(rank=8, alpha=16), ppo=dict(lr=1e-3))
    proc, _ = start_trainer(config, log, "--export-merged", str(merged), nproc=2)
    assert proc.wait(timeout=900) == 0, log.read_text()[-4000:]
    assert "LoRA rank 8" in log.read_text()
    history = read_metrics(out)
    assert [m["step"] for m in history] == [1, 2]
    final = out / "checkpoints" / "step-000002"
    assert (final / "adapter" / "adapter_config.json").is_file() and not (final / "policy").exists()

    trained, initial = load_file(merged / "model.safetensors"), load_file(tied_stack["policy_dir"] / "model.safetensors")
    assert trained.keys() == initial.keys() and "lm_head.weight" not in trained
    changed = {k for k in trained if not torch.equal(trained[k], initial[k])}
    assert changed and all(k.endswith("_proj.weight") for k in changed), changed  # only the adapted weights
    assert_replicas_serve(merged, tied_stack, history[-1]["pushed_version"])
