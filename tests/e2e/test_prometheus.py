"""A real Prometheus server scrapes a PPO run; what it stored agrees with what the run did.

Prometheus is Debian's package (installed by .ci/install). The test pauses the trainer,
lets Prometheus scrape the paused state, and compares its answers with the trainer's own
status and per-step log."""
from __future__ import annotations

import json
import shutil
import subprocess
import time
import urllib.parse
import urllib.request

import pytest
import yaml

from rlhf.v1 import trainer_pb2, trainer_pb2_grpc
from services.common.channel import create_channel
from services.common.config import ClientConfig
from services.demo.launch import ChildServer, free_port, rlhf_command

pytestmark = [pytest.mark.slow, pytest.mark.vllm]
ENV = {"VLLM_CPU_KVCACHE_SPACE": "1"}


def query(prom: str, expr: str) -> float:
    url = f"http://{prom}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    reply = json.load(urllib.request.urlopen(url, timeout=10))
    assert reply["status"] == "success", reply
    result = reply["data"]["result"]
    assert result, f"no series for {expr}"
    return float(result[0]["value"][1])


@pytest.fixture
def prometheus(tmp_path):
    """Start Prometheus on a free port; returns (address, function to set scrape targets)."""
    binary = shutil.which("prometheus")
    assert binary, "Debian's prometheus package is missing: run bash .ci/install"
    port = free_port()
    config = tmp_path / "prometheus.yml"
    proc = None

    def start(targets: dict[str, int]):
        nonlocal proc
        config.write_text(yaml.safe_dump({
            "global": {"scrape_interval": "1s", "scrape_timeout": "1s"},
            "scrape_configs": [{"job_name": job, "static_configs": [{"targets": [f"127.0.0.1:{p}"]}]}
                               for job, p in targets.items()],
        }))
        proc = subprocess.Popen([binary, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                                 f"--web.listen-address=127.0.0.1:{port}"],
                                stdout=open(tmp_path / "prometheus.log", "wb"), stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if urllib.request.urlopen(f"http://127.0.0.1:{port}/-/ready", timeout=2).status == 200:
                    return f"127.0.0.1:{port}"
            except OSError:
                time.sleep(0.3)
        raise AssertionError("prometheus did not become ready")

    yield start
    if proc:
        proc.terminate()
        proc.wait(30)


def test_prometheus_scrapes_a_ppo_run(prometheus, tiny_policy_dir, tiny_reward_dir, tmp_path):
    from services.demo.data import write_demo_data
    data = write_demo_data(tmp_path / "data", seed=0, num_sft=30, num_prefs=30, num_prompts=100)
    ports = {name: (free_port(), free_port()) for name in ("policy", "reward", "trainer")}
    policy = ChildServer(rlhf_command("serve", "policy", "--model", str(tiny_policy_dir), "--host", "127.0.0.1",
                                      "--port", str(ports["policy"][0]), "--metrics-port", str(ports["policy"][1]),
                                      "--kv-cache-gib", "1"),
                         port=ports["policy"][0], service="rlhf.v1.PolicyService", env=ENV,
                         log_path=tmp_path / "policy.log")
    reward = ChildServer(rlhf_command("serve", "reward", "--model", str(tiny_reward_dir), "--host", "127.0.0.1",
                                      "--port", str(ports["reward"][0]), "--metrics-port", str(ports["reward"][1])),
                         port=ports["reward"][0], service="rlhf.v1.RewardService", log_path=tmp_path / "reward.log")
    prom = prometheus({name: metrics for name, (_, metrics) in ports.items()})
    out = tmp_path / "run"
    config = tmp_path / "ppo.yaml"
    config.write_text(yaml.safe_dump(dict(
        policy_addresses=[policy.address], reward_address=reward.address, sft_model=str(tiny_policy_dir),
        reward_model=str(tiny_reward_dir), prompts=str(data["prompts"]), out=str(out), steps=20, seed=0,
        rollout=dict(batch_size=16, max_tokens=16), ppo=dict(epochs=1, minibatch_size=8))))
    with policy, reward:
        trainer = ChildServer(rlhf_command("train", "ppo", "--config", str(config), "--host", "127.0.0.1",
                                           "--port", str(ports["trainer"][0]), "--metrics-port", str(ports["trainer"][1])),
                              port=ports["trainer"][0], service="rlhf.v1.TrainerService",
                              log_path=tmp_path / "trainer.log")
        with trainer:
            stub = trainer_pb2_grpc.TrainerServiceStub(create_channel(trainer.address, ClientConfig()))
            while stub.GetStatus(trainer_pb2.GetStatusRequest(), timeout=10).step < 3:
                time.sleep(0.5)
            stub.Pause(trainer_pb2.PauseRequest(), timeout=10)
            while (status := stub.GetStatus(trainer_pb2.GetStatusRequest(), timeout=10)).phase != trainer_pb2.PHASE_PAUSED:
                time.sleep(0.3)
            history = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
            assert len(history) == status.step
            time.sleep(4)  # a few scrapes of the paused state

            # Trainer: step and pushed weight version.
            assert query(prom, "rlhf_trainer_step") == status.step
            assert query(prom, "rlhf_trainer_weight_version") == status.weight_version
            # Policy: the version it serves, and every token it generated for the trainer.
            assert query(prom, "rlhf_policy_weight_version") == status.weight_version
            assert query(prom, "rlhf_policy_generated_tokens_total") == sum(m["generated_tokens"] for m in history)
            # Reward: every completion scored.
            assert query(prom, "rlhf_reward_samples_total") == sum(m["completions"] for m in history)
            # grpc_server_handled_total for each service, by method and code.
            ok = 'grpc_code="OK"'
            assert query(prom, f'sum(grpc_server_handled_total{{grpc_service="rlhf.v1.PolicyService",grpc_method="Generate",{ok}}})') == status.step
            # One push per step plus the push that brings the replica to the trainer's weights at start.
            assert query(prom, f'sum(grpc_server_handled_total{{grpc_service="rlhf.v1.PolicyService",grpc_method="UpdateWeights",{ok}}})') == status.step + 1
            assert query(prom, f'sum(grpc_server_handled_total{{grpc_service="rlhf.v1.RewardService",grpc_method="Score",{ok}}})') == status.step
            assert query(prom, f'sum(grpc_server_handled_total{{grpc_service="rlhf.v1.TrainerService",grpc_method="Pause",{ok}}})') == 1
            assert query(prom, 'up{job="trainer"}') == 1
            # Counters, not rates, for the trainer (rate() in the query gives tokens per second).
            assert query(prom, "rlhf_trainer_steps_total") == status.step
            assert query(prom, "rlhf_trainer_generated_tokens_total") == sum(m["generated_tokens"] for m in history)
            assert query(prom, 'sum(rlhf_trainer_weight_pushes_total{result="ok"})') == status.step + 1
            assert query(prom, 'sum(rlhf_trainer_reward_component{component="rm"})') == pytest.approx(
                history[-1]["reward_components"]["rm"], rel=1e-6)
            # Every service says what runs; vLLM's own series come from the policy's metrics port,
            # under vLLM's own names (colons kept, whatever format Prometheus asks for).
            assert query(prom, "count(rlhf_build_info)") == 3
            assert query(prom, "sum(vllm:generation_tokens_total)") >= sum(m["generated_tokens"] for m in history)
            assert query(prom, "sum(vllm:num_requests_running)") == 0  # paused: nothing in flight
            assert 0 <= query(prom, "max(vllm:kv_cache_usage_perc)") <= 1
