"""The weight path in PPO runs against live services (real vLLM, real reward model), the trainer in
this process so that a test can change what a dns: name resolves to while it runs.

The replicas sit behind one name, dns:///replicas.rlhf.test:PORT: replica a on 127.0.0.1:PORT,
replica b on 127.0.0.2:PORT (Linux routes all of 127/8 to loopback), b slow on purpose
(--max-num-seqs 1: its share of a rollout takes seconds). The name is resolved by
socket.getaddrinfo, which the test answers itself for that one name: no hosts file, no DNS
server, and the answer changes when the test says so (a headless Service's pods coming and
going).
"""
from __future__ import annotations

import socket
import threading
import time

import pytest
import yaml
from prometheus_client import REGISTRY

from rlhf.v1 import trainer_pb2, trainer_pb2_grpc
from services.common.channel import create_channel
from services.common.config import ServerConfig
from services.demo.launch import free_port
from services.policy.client import PolicyClient
from services.trainer import loop
from services.trainer.config import Config

from ppo_harness import AUTH, TOKEN, policy_server, read_metrics, reward_server

pytestmark = [pytest.mark.slow, pytest.mark.vllm]
NAME = "replicas.rlhf.test"
PROMPTS = ["How do I prepare for my calculus exam?", "Any tips for my poetry debate next week?", [5, 17, 9, 33]]


@pytest.fixture(scope="module")
def fleet(models_root, tiny_reward_dir, tmp_path_factory):
    """A reward service and two replicas of a policy with tied embeddings, on one port of two
    loopback addresses."""
    from services.demo.data import write_demo_data
    from services.demo.tiny_model import build_model

    policy_dir = build_model("policy", models_root / "policy-tied-weights", tie_embeddings=True, seed=5)
    logs = tmp_path_factory.mktemp("logs")
    data = write_demo_data(tmp_path_factory.mktemp("data"), seed=0, num_sft=30, num_prefs=30, num_prompts=200)
    port = free_port()
    reward = reward_server(tiny_reward_dir, logs / "reward.log")
    a = policy_server(policy_dir, logs, port=port)
    b = policy_server(policy_dir, logs, port=port, extra=("--max-num-seqs", "1"))
    b.argv[b.argv.index("--host") + 1] = "127.0.0.2"
    b.address = f"127.0.0.2:{port}"
    servers = [reward, a, b]
    try:
        for s in servers:
            s.start()
        for s in servers:
            s.wait_ready()
        yield dict(reward=reward, a=a, b=b, port=port, prompts=data["prompts"], policy_dir=policy_dir,
                   reward_dir=tiny_reward_dir, logs=logs)
    finally:
        for s in servers:
            s.terminate()


class Resolver:
    """socket.getaddrinfo for NAME answers with `hosts`, whatever they are at the moment."""

    def __init__(self, monkeypatch, hosts: list[str]):
        self.hosts, self.lookups = list(hosts), 0
        real = socket.getaddrinfo

        def getaddrinfo(host, port, *args, **kwargs):
            if host != NAME:
                return real(host, port, *args, **kwargs)
            self.lookups += 1
            return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (h, int(port))) for h in list(self.hosts)]

        monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)


def config(fleet, out, steps: int, addresses: list[str], **sections) -> Config:
    tree = dict(policy_addresses=addresses, reward_address=fleet["reward"].address, sft_model=str(fleet["policy_dir"]),
                reward_model=str(fleet["reward_dir"]), prompts=str(fleet["prompts"]), out=str(out), steps=steps, seed=0,
                checkpoint_every=0, device="cpu", dtype="float32",
                rollout=dict(batch_size=8, max_tokens=16), ppo=dict(epochs=1, minibatch_size=8, lr=3e-4),
                services=dict(dependency_deadline_s=120, retry_max_s=1.0))
    for key, value in sections.items():
        tree[key] = {**tree.get(key, {}), **value}
    return Config.model_validate(yaml.safe_load(yaml.safe_dump(tree)))


def run(cfg: Config, port: int):
    return loop.train(cfg, AUTH, ServerConfig(host="127.0.0.1", port=port, metrics_port=0, auth_token=TOKEN),
                      handle_signals=False)


def greedy(address: str):
    with PolicyClient(address, AUTH, timeout=120) as c:
        return [(r.completions[0].token_ids, r.completions[0].logprobs)
                for r in c.generate(PROMPTS, max_tokens=24, temperature=0.0, logprobs=True)]


def status(port: int) -> trainer_pb2.TrainerStatus:
    with create_channel(f"127.0.0.1:{port}", AUTH) as channel:
        return trainer_pb2_grpc.TrainerServiceStub(channel).GetStatus(trainer_pb2.GetStatusRequest(), timeout=10)


def test_thirty_delta_pushes_while_replicas_come_and_go(fleet, tmp_path, monkeypatch):
    """30 PPO steps, one_step_off, every push a delta relayed through the replicas behind a dns:
    name whose answer flips between {a} and {a, b} for the first steps (and while the run is
    paused with the next rollout generating on the slow b, so that the trainer drops b while a
    background Generate uses it). Then: every step trained, each push a delta stream whose trainer
    egress is at most 1.1 x its payload, and both replicas bit for bit what a fresh server
    loads from the final checkpoint (tied embeddings included)."""
    resolver = Resolver(monkeypatch, ["127.0.0.1", "127.0.0.2"])
    out, port = tmp_path / "run", free_port()
    cfg = config(fleet, out, 30, [f"dns:///{NAME}:{fleet['port']}"],
                 rollout=dict(mode="one_step_off"), services=dict(max_staleness=1))
    result: dict = {}
    trainer = threading.Thread(target=lambda: result.update(history=run(cfg, port)), daemon=True)
    trainer.start()

    def steps() -> int:
        return len(read_metrics(out))

    def wait(predicate, what: str, timeout: float = 600) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            assert trainer.is_alive(), f"the run ended while waiting for {what}"
            assert time.monotonic() < deadline, f"timed out waiting for {what}"
            time.sleep(0.2)

    def flip(until_step: int) -> None:
        while steps() < until_step and trainer.is_alive():
            resolver.hosts = ["127.0.0.1"] if len(resolver.hosts) == 2 else ["127.0.0.1", "127.0.0.2"]
            time.sleep(0.7)
        resolver.hosts = ["127.0.0.1", "127.0.0.2"]

    wait(lambda: steps() >= 3, "three steps")
    flipper = threading.Thread(target=flip, args=(15,), daemon=True)
    flipper.start()
    with create_channel(f"127.0.0.1:{port}", AUTH) as channel:
        control = trainer_pb2_grpc.TrainerServiceStub(channel)
        control.Pause(trainer_pb2.PauseRequest(), timeout=10)
        wait(lambda: status(port).phase == trainer_pb2.PHASE_PAUSED, "the pause")
        time.sleep(6)  # paused: rank 0 re-resolves every 2 s while the next rollout generates
        paused = status(port)
        assert paused.weight_version >= 3 and paused.replicas
        control.Resume(trainer_pb2.ResumeRequest(), timeout=10)
    trainer.join(timeout=900)
    flipper.join(timeout=10)
    assert not trainer.is_alive() and "history" in result, "the run did not finish"
    assert resolver.lookups > 10

    history = read_metrics(out)
    assert [m["step"] for m in history] == list(range(1, 31))
    for m in history:
        assert m["push"]["delta_streams"] >= 1, m["push"]  # every step's new version went out as a delta
        if m["push"]["full_streams"] == 0:  # one stream, whatever the replica count
            assert m["push"]["wire_bytes"] <= 1.1 * m["push"]["payload_bytes"], m["push"]
        assert 0 < m["push"]["changed_share"] < 1
        # one_step_off trains on the version before the last push; a rollout redone after the replica
        # set changed under it (the dns flips, the pause) samples the newest weights instead.
        assert set(m["trained_versions"]) <= {m["pushed_version"] - 2, m["pushed_version"] - 1}, m
    one_behind = [m["step"] for m in history[1:] if m["trained_versions"] == [m["pushed_version"] - 2]]
    assert len(one_behind) >= 25, one_behind
    final = history[-1]["pushed_version"]

    fresh = policy_server(out / "checkpoints" / "step-000030" / "policy", fleet["logs"]).start().wait_ready()
    try:
        expected = greedy(fresh.address)
    finally:
        fresh.terminate()
    for replica in (fleet["a"], fleet["b"]):
        with PolicyClient(replica.address, AUTH) as c:
            assert c.model_info().weight_version == final
        assert greedy(replica.address) == expected  # tokens and logprobs, exactly


def test_a_canary_rolls_back_a_broken_update_and_stops_the_run(fleet, tmp_path):
    """services.canary: a sound run passes its canary at every push (GetStatus and the metrics
    show the verdicts); a run whose pushes are broken on purpose (services.push_scale, a test-only
    knob that multiplies the pushed weights) fails it on its first push: the canary is rolled
    back to the version before, the other replica never sees the broken weights, and the run
    stops with a clear error and a checkpoint."""
    addresses = [fleet["a"].address, fleet["b"].address]
    passes = REGISTRY.get_sample_value("rlhf_trainer_canary_verdicts_total", {"verdict": "pass"}) or 0.0
    port = free_port()
    seen: list = []

    def watch():
        while len(seen) < 1 and not done.is_set():
            try:
                s = status(port)
                if s.HasField("canary"):
                    seen.append(s.canary)
            except Exception:  # noqa: BLE001 - not serving yet
                pass
            time.sleep(0.2)

    done = threading.Event()
    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    history = run(config(fleet, tmp_path / "sound", 2, addresses, services=dict(canary=dict(enabled=True, probes=4))),
                  port)
    done.set()
    watcher.join(timeout=10)
    assert [m.step for m in history] == [1, 2]
    assert REGISTRY.get_sample_value("rlhf_trainer_canary_verdicts_total", {"verdict": "pass"}) - passes >= 3
    assert seen and seen[0].passed and seen[0].kl < 0.1 and seen[0].replica in addresses, seen

    with PolicyClient(fleet["a"].address, AUTH) as a, PolicyClient(fleet["b"].address, AUTH) as b:
        before = {name: (c.model_info().weight_version, greedy(c_addr))
                  for name, c, c_addr in (("a", a, fleet["a"].address), ("b", b, fleet["b"].address))}
    out = tmp_path / "broken"
    with pytest.raises(SystemExit) as stop:
        run(config(fleet, out, 3, addresses, services=dict(canary=dict(enabled=True, probes=4), push_scale=3.0)),
            free_port())
    message = str(stop.value)
    assert "canary" in message and "failed" in message and "services.canary.max_kl" in message, message
    assert "rolled back" in message and "Resume with --resume" in message
    assert (out / "checkpoints" / "LATEST").read_text().strip() == "step-000000"
    assert REGISTRY.get_sample_value("rlhf_trainer_canary_verdicts_total", {"verdict": "fail"}) >= 1
    for name in "ab":
        with PolicyClient(fleet[name].address, AUTH) as c:
            assert (c.model_info().weight_version, greedy(fleet[name].address)) == before[name], name
