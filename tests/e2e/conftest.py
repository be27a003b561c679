"""Fixtures of the end-to-end tests: a reward service and two policy replicas per module."""
from __future__ import annotations

import pytest

from ppo_harness import policy_server, reward_server


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
