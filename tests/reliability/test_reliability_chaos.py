"""Chaos during a whole PPO run: SIGKILL of one replica's engine core, of a whole replica, and of
the reward service, each twice, at random steps, while a supervisor restarts whatever died (as
Kubernetes would). The run must finish every step, train on nothing twice and skip nothing, and
end with every replica serving exactly the final checkpoint's weights."""
from __future__ import annotations

import hashlib
import random
import threading
import time

import psutil
import pytest
import yaml

from rlhf.v1 import trainer_pb2, trainer_pb2_grpc
from services.common.channel import create_channel
from services.common.config import ClientConfig
from services.demo.launch import ChildServer, free_port, health_status, rlhf_command
from services.policy.client import PolicyClient
from services.trainer.state import Prompts

from reliability_common import POLICY, REWARD, TRAINER, record, server_env

pytestmark = [pytest.mark.slow, pytest.mark.vllm]
STEPS = 12
BATCH = 8


class Supervised:
    """A server restarted on the same port whenever it is found dead."""

    def __init__(self, argv_of, service: str, log_dir, name: str):
        self.port, self.argv_of, self.service = free_port(), argv_of, service
        self.log, self.restarts = log_dir / f"{name}.log", 0
        self.server = self._new()

    def _new(self) -> ChildServer:
        return ChildServer(self.argv_of(self.port), port=self.port, service=self.service, env=server_env(),
                           log_path=self.log)

    @property
    def address(self) -> str:
        return self.server.address

    def heal(self) -> None:
        if self.server.alive():
            return
        self.server.kill()  # reap it and whatever it left
        deadline = time.monotonic() + 60
        while any(c.laddr.port == self.port for c in psutil.net_connections() if c.status == psutil.CONN_LISTEN):
            assert time.monotonic() < deadline, f"port {self.port} still taken"
            time.sleep(0.2)
        self.server = self._new().start()
        self.restarts += 1


def engine_core(server: ChildServer) -> psutil.Process:
    for child in psutil.Process(server.pid).children(recursive=True):
        if "EngineCore" in " ".join([child.name(), *child.cmdline()]):
            return child
    raise AssertionError("no VLLM::EngineCore process under the policy server")


def test_a_run_survives_killed_engine_cores_replicas_and_reward_service(tiny_policy_dir, tiny_reward_dir,
                                                                      reliability_logs, tmp_path, request):
    from services.demo.data import write_demo_data
    data = write_demo_data(tmp_path / "data", seed=0, num_sft=8, num_prefs=8, num_prompts=200)
    def policy_argv(port: int, model=tiny_policy_dir) -> list[str]:
        return rlhf_command("serve", "policy", "--model", str(model), "--host", "127.0.0.1", "--port", str(port),
                            "--metrics-port", "0", "--kv-cache-gib", "1")

    reward_argv = lambda port: rlhf_command("serve", "reward", "--model", str(tiny_reward_dir), "--host", "127.0.0.1",  # noqa: E731
                                            "--port", str(port), "--metrics-port", "0", "--device", "cpu")
    a = Supervised(policy_argv, POLICY, reliability_logs, "chaos-policy-a")
    b = Supervised(policy_argv, POLICY, reliability_logs, "chaos-policy-b")
    reward = Supervised(reward_argv, REWARD, reliability_logs, "chaos-reward")
    services = [a, b, reward]
    out = tmp_path / "run"
    config = tmp_path / "ppo.yaml"
    config.write_text(yaml.safe_dump(dict(
        policy_addresses=[a.address, b.address], reward_address=reward.address, sft_model=str(tiny_policy_dir),
        reward_model=str(tiny_reward_dir), prompts=str(data["prompts"]), out=str(out), steps=STEPS, seed=0,
        checkpoint_every=2, rollout=dict(batch_size=BATCH, max_tokens=8), ppo=dict(epochs=1, minibatch_size=4, lr=1e-4),
        services=dict(dependency_deadline_s=300, retry_max_s=2.0, rpc_timeout_s=60))))
    port = free_port()
    trainer = ChildServer(rlhf_command("train", "ppo", "--config", str(config), "--host", "127.0.0.1", "--port",
                                       str(port), "--metrics-port", "0"),
                          port=port, service=TRAINER, env=server_env(), log_path=tmp_path / "trainer.log")

    def steps_done() -> int:
        path = out / "metrics.jsonl"
        return len(path.read_text().splitlines()) if path.exists() else 0

    rng = random.Random(7)
    kinds = ["engine core of a", "replica b", "reward service"] * 2
    rng.shuffle(kinds)
    plan = dict(zip(sorted(rng.sample(range(1, STEPS - 2), len(kinds))), kinds))  # step -> what dies after it
    done, log = threading.Event(), []

    def chaos() -> None:
        for step, kind in plan.items():
            while steps_done() < step and not done.is_set():
                time.sleep(0.1)
            if done.is_set():
                return
            if kind == "engine core of a":
                engine_core(a.server).kill()
            elif kind == "replica b":
                b.server.kill()
            else:
                reward.server.kill()
            log.append((step, kind, time.monotonic()))
        # After the last kill, hold the run at a step boundary until the supervisor has everything
        # back, so that the remaining steps bring every replica to the final weights.
        stub = trainer_pb2_grpc.TrainerServiceStub(create_channel(trainer.address, ClientConfig()))
        stub.Pause(trainer_pb2.PauseRequest(), timeout=30)
        while not done.is_set() and not all(s.server.alive() and health_status(s.address, s.service) == 1
                                            for s in services):
            time.sleep(0.5)
        stub.Resume(trainer_pb2.ResumeRequest(), timeout=30)

    def supervise() -> None:
        while not done.is_set():
            for s in services:
                s.heal()
            time.sleep(0.5)

    try:
        for s in services:
            s.server.start()
        for s in services:
            s.server.wait_ready()
        trainer.start()
        threads = [threading.Thread(target=chaos), threading.Thread(target=supervise)]
        for t in threads:
            t.start()
        code = trainer.proc.wait(timeout=1800)
        done.set()
        for t in threads:
            t.join()
        trainer_log = (tmp_path / "trainer.log").read_text()
        assert code == 0, trainer_log[-4000:]
        assert [kind for _, kind, _ in log] == list(plan.values()), log

        # Every step once, in order, each trained on completions of the weights it had pushed.
        history = [yaml.safe_load(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        assert [m["step"] for m in history] == list(range(1, STEPS + 1))
        for m in history:
            assert m["trained_versions"] == [m["weight_version"]] and m["pushed_version"] == m["weight_version"] + 1, m
        prompts = Prompts(str(data["prompts"]), seed=0)
        assert [m["prompts_sha"] for m in history] == [
            hashlib.sha256("\n".join(prompts.next(BATCH)).encode()).hexdigest()[:16] for _ in range(STEPS)]

        # Every replica ends on the final weights: the same greedy answers as a server started on the
        # final checkpoint's policy/.
        for s in services:
            s.heal()
            s.server.wait_ready()
        final = out / "checkpoints" / f"step-{STEPS:06d}" / "policy"
        fresh_port = free_port()
        fresh = ChildServer(policy_argv(fresh_port, final), port=fresh_port, service=POLICY, env=server_env(),
                            log_path=reliability_logs / "chaos-fresh.log")
        with fresh:
            ask = dict(max_tokens=16, temperature=0.0, logprobs=True)
            prompts_text = ["How do I prepare for my calculus exam?", "Any tips for my poetry debate?"]
            with PolicyClient(fresh.address, ClientConfig(), timeout=120) as client:
                want = [r.completions[0].token_ids for r in client.generate(prompts_text, **ask)]
            for replica in (a, b):
                with PolicyClient(replica.address, ClientConfig(), timeout=120) as client:
                    assert client.model_info().weight_version == history[-1]["pushed_version"], replica.address
                    got = [r.completions[0].token_ids for r in client.generate(prompts_text, **ask)]
                    assert got == want, replica.address
        restarts = {s.log.stem: s.restarts for s in services}
    finally:
        done.set()
        trainer.kill()
        for s in services:
            s.server.terminate()
    assert restarts["chaos-policy-a"] >= 2 and restarts["chaos-policy-b"] >= 2 and restarts["chaos-reward"] >= 2
    record(request, "chaos: PPO run with engine cores, replicas and the reward service killed (-9), each twice",
           cases=f"{STEPS} steps, kills after steps {', '.join(f'{s} ({k})' for s, k in plan.items())}",
           faults=f"restarts {restarts}", result="pass: every step once, in order, on its own version; replicas on "
                                                 "the final checkpoint's weights")
