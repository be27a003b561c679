"""PPO against live services: two policy replicas, a replica killed with -9 mid-run, the
trainer killed and resumed, and TrainerService control. Real servers, real vLLM (CPU)."""
from __future__ import annotations

import json
import os
import pathlib
import signal
import subprocess
import time

import grpc
import pytest
import yaml

from rlhf.v1 import trainer_pb2, trainer_pb2_grpc
from services.common.channel import create_channel
from services.common.config import ClientConfig
from services.demo.launch import ChildServer, free_port, rlhf_command
from services.policy.client import PolicyClient

pytestmark = [pytest.mark.slow, pytest.mark.vllm]
TOKEN = "e2e-token"
ENV = {"RLHF_AUTH_TOKEN": TOKEN, "VLLM_CPU_KVCACHE_SPACE": "1"}
AUTH = ClientConfig(auth_token=TOKEN)
STEPS = 8


def policy_server(model_dir, log_dir: pathlib.Path, port: int | None = None) -> ChildServer:
    port = port or free_port()
    metrics = free_port()
    server = ChildServer(rlhf_command("serve", "policy", "--model", str(model_dir), "--host", "127.0.0.1",
                                      "--port", str(port), "--metrics-port", str(metrics), "--kv-cache-gib", "1"),
                         port=port, service="rlhf.v1.PolicyService", env=ENV,
                         log_path=log_dir / f"policy-{port}.log")
    server.metrics_port = metrics
    return server


def reward_server(model_dir, log_path: pathlib.Path, port: int | None = None) -> ChildServer:
    port = port or free_port()
    return ChildServer(rlhf_command("serve", "reward", "--model", str(model_dir), "--host", "127.0.0.1",
                                    "--port", str(port), "--metrics-port", "0"),
                       port=port, service="rlhf.v1.RewardService", env=ENV, log_path=log_path)


@pytest.fixture(scope="module")
def stack(tiny_policy_dir, tiny_reward_dir, tmp_path_factory):
    """A reward service and two policy replicas, shared by the tests of this module."""
    from services.demo.data import write_demo_data
    logs = tmp_path_factory.mktemp("logs")
    data = write_demo_data(tmp_path_factory.mktemp("data"), seed=0, num_sft=30, num_prefs=30, num_prompts=200)
    reward = reward_server(tiny_reward_dir, logs / "reward.log")
    replicas = [policy_server(tiny_policy_dir, logs), policy_server(tiny_policy_dir, logs)]
    servers = [reward, *replicas]
    try:
        for s in servers:
            s.start()
        for s in servers:
            s.wait_ready()
        yield dict(reward=reward, replicas=replicas, prompts=data["prompts"], logs=logs,
                   policy_dir=tiny_policy_dir, reward_dir=tiny_reward_dir)
    finally:
        for s in servers + [r for r in replicas if r not in servers]:
            s.terminate()


def write_config(path: pathlib.Path, stack: dict, out: pathlib.Path, steps: int, deadline_s: float = 240,
                 **extra) -> pathlib.Path:
    config = dict(policy_addresses=[r.address for r in stack["replicas"]], reward_address=stack["reward"].address,
                  sft_model=str(stack["policy_dir"]), reward_model=str(stack["reward_dir"]),
                  prompts=str(stack["prompts"]), out=str(out), steps=steps, seed=0,
                  rollout=dict(batch_size=16, max_tokens=16), ppo=dict(epochs=1, minibatch_size=8, lr=1e-4),
                  services=dict(dependency_deadline_s=deadline_s, retry_max_s=2.0), **extra)
    path.write_text(yaml.safe_dump(config))
    return path


def start_trainer(config: pathlib.Path, log: pathlib.Path, *extra: str) -> tuple[subprocess.Popen, int]:
    port = free_port()
    proc = subprocess.Popen(rlhf_command("train", "ppo", "--config", str(config), "--host", "127.0.0.1",
                                         "--port", str(port), "--metrics-port", "0", *extra),
                            env={**os.environ, **ENV}, stdout=open(log, "ab"), stderr=subprocess.STDOUT)
    return proc, port


def read_metrics(out: pathlib.Path) -> list[dict]:
    path = out / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def wait_for(predicate, timeout: float, proc: subprocess.Popen | None = None, what: str = ""):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (value := predicate()):
            return value
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"trainer exited with {proc.returncode} while waiting for {what}")
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


def requests_served(server: ChildServer) -> float:
    import urllib.request
    text = urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=5).read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("grpc_server_started_total{") and 'grpc_service="rlhf.v1.PolicyService"' in line)


def test_two_replicas_survive_kill_9_and_trainer_service_controls_the_run(stack, tmp_path):
    out = tmp_path / "run"
    proc, port = start_trainer(write_config(tmp_path / "ppo.yaml", stack, out, steps=STEPS), tmp_path / "trainer.log")
    a, b = stack["replicas"]
    try:
        trainer = trainer_pb2_grpc.TrainerServiceStub(create_channel(f"127.0.0.1:{port}", AUTH))
        wait_for(lambda: len(read_metrics(out)) >= 2, 300, proc, "two PPO steps")
        # Generation goes to both replicas.
        assert requests_served(a) > 0 and requests_served(b) > 0
        # Control needs the token; with it, Pause holds the run and Resume lets it go on.
        anonymous = trainer_pb2_grpc.TrainerServiceStub(create_channel(f"127.0.0.1:{port}", ClientConfig()))
        with pytest.raises(grpc.RpcError) as err:
            anonymous.Pause(trainer_pb2.PauseRequest(), timeout=10)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert trainer.Pause(trainer_pb2.PauseRequest(), timeout=10).paused
        paused_at = wait_for(lambda: (s := trainer.GetStatus(trainer_pb2.GetStatusRequest(), timeout=10)).phase
                             == trainer_pb2.PHASE_PAUSED and s, 120, proc, "the pause")
        saved = trainer.SaveCheckpoint(trainer_pb2.SaveCheckpointRequest(), timeout=120)
        assert saved.step == paused_at.step and pathlib.Path(saved.path, "state.pt").exists()
        time.sleep(2)
        assert len(read_metrics(out)) == paused_at.step  # nothing moves while paused

        # kill -9 one replica, let the run go on with the other, then bring it back empty.
        b.kill()
        trainer.Resume(trainer_pb2.ResumeRequest(), timeout=10)
        step_at_kill = len(read_metrics(out))
        wait_for(lambda: len(read_metrics(out)) >= step_at_kill + 1, 300, proc, "a step without replica b")
        # Hold the run while b restarts: vLLM takes longer to start than the remaining steps take
        # on a fast machine, and the run must still have steps left to resync b and use it.
        trainer.Pause(trainer_pb2.PauseRequest(), timeout=10)
        held = wait_for(lambda: (s := trainer.GetStatus(trainer_pb2.GetStatusRequest(), timeout=10)).phase
                        == trainer_pb2.PHASE_PAUSED and s, 120, proc, "the second pause")
        assert held.step < STEPS
        restarted = policy_server(stack["policy_dir"], stack["logs"], port=int(b.address.rsplit(":", 1)[1]))
        stack["replicas"][1] = restarted
        restarted.start().wait_ready()
        watched = trainer.WatchMetrics(trainer_pb2.WatchMetricsRequest(include_history=True), timeout=600)
        trainer.Resume(trainer_pb2.ResumeRequest(), timeout=10)
        steps_seen = [m.step for m in watched]  # the stream ends when the run finishes
        assert proc.wait(timeout=600) == 0, (tmp_path / "trainer.log").read_text()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()

    history = read_metrics(out)
    assert [m["step"] for m in history] == list(range(1, STEPS + 1)) and steps_seen == list(range(1, STEPS + 1))
    # Every step trained only on completions of the version it had pushed; nothing off-version.
    for m in history:
        assert m["trained_versions"] == [m["weight_version"]], m
        assert m["pushed_version"] == m["weight_version"] + 1
    assert history[-1]["replica_resyncs"] >= 1  # the restarted replica got the weights before use
    assert requests_served(restarted) > 0
    final = history[-1]["pushed_version"]
    for replica in (a, restarted):
        with PolicyClient(replica.address, AUTH) as client:
            assert client.model_info().weight_version == final
    assert (out / "reward.png").exists() and (out / "kl.png").exists()


def test_trainer_killed_and_resumed_continues_at_the_saved_step(stack, tmp_path):
    from services.trainer.loop import Prompts
    out = tmp_path / "run"
    config = write_config(tmp_path / "ppo.yaml", stack, out, steps=6, checkpoint_every=2)
    proc, _ = start_trainer(config, tmp_path / "trainer.log")
    try:
        wait_for(lambda: (out / "checkpoints" / "LATEST").exists() and len(read_metrics(out)) >= 3, 300, proc,
                 "a checkpoint")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    saved_step = int((out / "checkpoints" / "LATEST").read_text().split("-")[1])
    before = read_metrics(out)
    proc, _ = start_trainer(config, tmp_path / "trainer.log", "--resume")
    assert proc.wait(timeout=600) == 0, (tmp_path / "trainer.log").read_text()[-3000:]
    after = read_metrics(out)[len(before):]
    assert [m["step"] for m in after] == list(range(saved_step + 1, 7))
    assert "resumed from" in (tmp_path / "trainer.log").read_text()
    # The data position was restored: every step saw the prompts an uninterrupted run sees.
    prompts = Prompts(str(stack["prompts"]), seed=0)
    import hashlib
    expected = {s: hashlib.sha256("\n".join(prompts.next(16)).encode()).hexdigest()[:16] for s in range(1, 7)}
    for m in before + after:
        assert m["prompts_sha"] == expected[m["step"]], m["step"]
    # Versions only go up across the restart: the resumed trainer continues above what replicas serve.
    assert after[0]["weight_version"] > max(m["pushed_version"] for m in before)


def test_reward_outage_delays_the_run_and_one_past_the_deadline_stops_it_with_a_checkpoint(stack, tmp_path):
    port = free_port()  # a reward service of its own: the other tests keep theirs
    reward = reward_server(stack["reward_dir"], tmp_path / "reward.log", port).start()
    reward.wait_ready()
    out, log = tmp_path / "run", tmp_path / "trainer.log"
    deadline_s = 20
    config = write_config(tmp_path / "ppo.yaml", {**stack, "reward": reward}, out, steps=200, deadline_s=deadline_s)
    proc, _ = start_trainer(config, log)
    try:
        wait_for(lambda: len(read_metrics(out)) >= 2, 300, proc, "two PPO steps")
        # A short outage: the step waits (backoff with jitter), the run goes on afterwards.
        reward.kill()
        time.sleep(6)
        stalled_at = len(read_metrics(out))
        reward = reward_server(stack["reward_dir"], tmp_path / "reward.log", port).start()
        reward.wait_ready()
        wait_for(lambda: len(read_metrics(out)) >= stalled_at + 2, 300, proc, "steps after the reward service came back")
        assert "reward service: UNAVAILABLE, retrying" in log.read_text()
        # An outage past the deadline: the run stops with a checkpoint and says how to go on.
        reward.kill()
        killed = time.monotonic()
        code = proc.wait(timeout=deadline_s + 120)
        took = time.monotonic() - killed
    finally:
        if proc.poll() is None:
            proc.kill()
        reward.terminate()
    text = log.read_text()
    assert code != 0 and deadline_s <= took < deadline_s + 120, (code, took, text[-2000:])
    stopped = text[text.index("PPO stopped at step"):]
    step = int(stopped.split()[4].rstrip(":"))
    assert "reward service unavailable for" in stopped and "Resume with --resume" in stopped, stopped[:300]
    assert (out / "checkpoints" / "LATEST").read_text().strip() == f"step-{step:06d}"
    assert [m["step"] for m in read_metrics(out)] == list(range(1, step + 1))
