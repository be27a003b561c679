"""What the PPO end-to-end tests share: real servers started as child processes, a trainer run as
`rlhf train ppo` (or under torchrun), and reading what it wrote."""
from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import time

import yaml

from services.common.config import ClientConfig
from services.demo.launch import ChildServer, free_port, rlhf_command

TOKEN = "e2e-token"
ENV = {"RLHF_AUTH_TOKEN": TOKEN, "VLLM_CPU_KVCACHE_SPACE": "1"}
AUTH = ClientConfig(auth_token=TOKEN)


def policy_server(model_dir, log_dir: pathlib.Path, port: int | None = None, extra: tuple[str, ...] = ()) -> ChildServer:
    port = port or free_port()
    metrics = free_port()
    server = ChildServer(rlhf_command("serve", "policy", "--model", str(model_dir), "--host", "127.0.0.1",
                                      "--port", str(port), "--metrics-port", str(metrics), "--kv-cache-gib", "1",
                                      *extra),
                         port=port, service="rlhf.v1.PolicyService", env=ENV,
                         log_path=log_dir / f"policy-{port}.log")
    server.metrics_port = metrics
    return server


def reward_server(model_dir, log_path: pathlib.Path, port: int | None = None) -> ChildServer:
    port = port or free_port()
    return ChildServer(rlhf_command("serve", "reward", "--model", str(model_dir), "--host", "127.0.0.1",
                                    "--port", str(port), "--metrics-port", "0"),
                       port=port, service="rlhf.v1.RewardService", env=ENV, log_path=log_path)


def write_config(path: pathlib.Path, stack: dict, out: pathlib.Path, steps: int, deadline_s: float = 240,
                 **extra) -> pathlib.Path:
    """A small PPO run against the stack; `extra` adds keys, its sections (rollout=..., ppo=...,
    services=...) are merged into the defaults."""
    config = dict(policy_addresses=[r.address for r in stack["replicas"]], reward_address=stack["reward"].address,
                  sft_model=str(stack["policy_dir"]), reward_model=str(stack["reward_dir"]),
                  prompts=str(stack["prompts"]), out=str(out), steps=steps, seed=0,
                  rollout=dict(batch_size=16, max_tokens=16), ppo=dict(epochs=1, minibatch_size=8, lr=1e-4),
                  services=dict(dependency_deadline_s=deadline_s, retry_max_s=2.0))
    for key, value in extra.items():
        config[key] = {**config[key], **value} if isinstance(value, dict) and key in config else value
    path.write_text(yaml.safe_dump(config))
    return path


def start_trainer(config: pathlib.Path, log: pathlib.Path, *extra: str, nproc: int = 0) -> tuple[subprocess.Popen, int]:
    """`rlhf train ppo` as a child process; with nproc, under torchrun with that many ranks."""
    port = free_port()
    args = ["train", "ppo", "--config", str(config), "--host", "127.0.0.1", "--port", str(port),
            "--metrics-port", "0", *extra]
    command = ([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "-m", "services.cli",
                *args] if nproc else rlhf_command(*args))
    proc = subprocess.Popen(command, env={**os.environ, **ENV}, stdout=open(log, "ab"), stderr=subprocess.STDOUT,
                            start_new_session=True)
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
               if line.startswith("grpc_server_started_total{") and 'grpc_method="Generate"' in line)
