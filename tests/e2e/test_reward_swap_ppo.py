"""PPO while the reward service swaps its model in the middle of each step's scoring (LoadModel):
every step trains on the scores of one reward model version, says which, and counts what it scored
again or dropped to keep it so; TrainerService shows the version (issue 25, item 4). Real servers:
vLLM (CPU) for the policy, `rlhf serve reward` with two tiny reward models of different weights."""
from __future__ import annotations

import shutil
import sys
import threading
import time
import urllib.request

import grpc
import pytest

from rlhf.v1 import trainer_pb2, trainer_pb2_grpc
from services.common.channel import create_channel
from services.demo.launch import ChildServer, free_port, rlhf_command
from services.reward.client import RewardClient

from ppo_harness import AUTH, ENV, policy_server, read_metrics, start_trainer, wait_for, write_config

pytestmark = [pytest.mark.slow, pytest.mark.vllm]
STEPS = 4
# A rule function beside the model, weight 0: it adds 50 ms per completion to scoring, so that a
# step's scoring (8 requests of 2 pairs: --max-pairs 2) lasts longer than a swap (~0.3 s).
SLOW = "import time\n\ndef slow(prompt, response):\n    time.sleep(0.05)\n    return 0.0\n"


def test_a_step_never_mixes_reward_model_versions_while_the_model_is_swapped(tiny_policy_dir, tiny_reward_dir,
                                                                             tmp_path):
    from services.demo.data import write_demo_data
    from services.demo.tiny_model import build_model

    root = tmp_path / "models"
    shutil.copytree(tiny_reward_dir, root / "a")
    build_model("reward", root / "b", seed=1)
    lib = tmp_path / "lib"
    lib.mkdir()
    (lib / "slow_rules.py").write_text(SLOW)
    data = write_demo_data(tmp_path / "data", seed=0, num_sft=30, num_prefs=30, num_prompts=200)
    port, metrics_port = free_port(), free_port()
    reward = ChildServer(rlhf_command("serve", "reward", "--model", str(root / "a"), "--host", "127.0.0.1", "--port",
                                      str(port), "--metrics-port", str(metrics_port), "--model-root", str(root),
                                      "--max-pairs", "2",
                                      "--reward-function", "slow=slow_rules:slow", "--reward-mix", "rm=1,slow=0"),
                         port=port, service="rlhf.v1.RewardService", env={**ENV, "PYTHONPATH": f"{lib}:{sys.path[0]}"},
                         log_path=tmp_path / "reward.log", client_config=AUTH)
    policy = policy_server(tiny_policy_dir, tmp_path)
    swaps, stop = [], threading.Event()

    def scores_started() -> float:
        text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).read().decode()
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                   if line.startswith("grpc_server_started_total{") and 'grpc_method="Score"' in line)

    def swap_in_each_steps_scoring():
        """b, a, b, ...: one LoadModel as soon as a step's scoring has begun, so that it lands in the
        middle of it; then wait for that scoring (and its scoring again) to be over."""
        with RewardClient(reward.address, AUTH) as c:
            k, last = 1, scores_started()
            while not stop.is_set():
                time.sleep(0.05)
                if scores_started() == last:
                    continue
                try:
                    swaps.append(c.load_model(str(root / "ab"[k % 2])).model_version)
                except grpc.RpcError:  # the service stopping at the end
                    return
                k += 1
                quiet, last = time.monotonic(), scores_started()
                while not stop.is_set() and time.monotonic() - quiet < 2.0:
                    time.sleep(0.1)
                    if (n := scores_started()) != last:
                        quiet, last = time.monotonic(), n

    def status():
        try:
            return trainer.GetStatus(trainer_pb2.GetStatusRequest(), timeout=10)
        except grpc.RpcError:
            return None

    out = tmp_path / "run"
    try:
        for s in (reward, policy):
            s.start()
        for s in (reward, policy):
            s.wait_ready()
        with RewardClient(reward.address, AUTH) as c:
            service_versions = {c.model_info().model_version}
            # with the rule function in the mix, a version is the weights' hash with the mix: learn both
            service_versions.add(c.load_model(str(root / "b")).model_version)
            c.load_model(str(root / "a"))
        stack = dict(replicas=[policy], reward=reward, policy_dir=tiny_policy_dir, reward_dir=root / "a",
                     prompts=data["prompts"])
        proc, trainer_port = start_trainer(write_config(tmp_path / "ppo.yaml", stack, out, steps=STEPS),
                                           tmp_path / "trainer.log")
        swapper = threading.Thread(target=swap_in_each_steps_scoring, daemon=True)
        swapper.start()
        trainer = trainer_pb2_grpc.TrainerServiceStub(create_channel(f"127.0.0.1:{trainer_port}", AUTH))
        running = wait_for(lambda: (s := status()) is not None and s.step >= 2 and s, 600, proc, "two steps")
        assert running.reward_model_version == running.last_metrics.reward_model_version in service_versions
        assert running.last_metrics.extra["completions_rescored"] >= 0
        assert proc.wait(timeout=600) == 0, (tmp_path / "trainer.log").read_text()[-3000:]
    finally:
        stop.set()
        for s in (reward, policy):
            s.terminate()
    history = read_metrics(out)
    assert [m["step"] for m in history] == list(range(1, STEPS + 1))
    mixed = 0
    for m in history:
        assert m["reward_version"] in service_versions, m["reward_version"]
        scored_first = sum(m["reward_versions"].values())
        # every completion trained on was scored, by the one version; what was scored by another
        # was scored again or dropped, and counted
        assert scored_first >= m["completions"] + m["completions_dropped_reward_version"]
        if len(m["reward_versions"]) > 1:
            mixed += 1
            others = scored_first - m["reward_versions"].get(m["reward_version"], 0)
            assert m["completions_rescored"] >= others > 0, m
        else:
            assert m["completions_dropped_reward_version"] == 0
    print(f"{len(swaps)} swaps during {STEPS} steps; steps scored by two versions or more: {mixed}; per step "
          + "; ".join(f"{m['step']}: {m['reward_versions']} -> {m['reward_version'][:6]}, rescored "
                      f"{m['completions_rescored']}, dropped {m['completions_dropped_reward_version']}"
                      for m in history))
    assert mixed >= 1  # a swap landed inside a step's scoring at least once: the check checked something
