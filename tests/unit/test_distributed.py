"""The trainer's collectives in a group of one (a plain `rlhf train ...` process)."""
from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]

# Run in a process of its own: a process group (and libgomp's count of threads) lives as long as
# the process does.
GROUP_OF_ONE = r"""
import os
import torch
from services.trainer import distributed

torch.set_num_threads(2)  # an OpenMP pool of two, whatever the CPUs of the machine
d = distributed.init("cpu", "float32")
torch.ones(1 << 22).add_(1)  # the main thread's pool exists
threads = len(os.listdir("/proc/self/task"))
big = {"samples": list(range(200_000))}  # pickled, MBs: gloo would copy it with parallel kernels
assert distributed.all_gather_object(big) == [big]
assert distributed.broadcast_object(big, d) is big
assert distributed.agree(lambda: big, d, (ValueError,)) == [big]
assert distributed.all_sum([1, 2.5, torch.tensor(3.0)], d) == [1.0, 2.5, 3.0]
assert distributed.all_max([False, 1, True], d) == [False, True, True]
local = torch.randn(64, 4096)
assert distributed.gather_rows(local, d) is local
after = len(os.listdir("/proc/self/task"))
print("threads", threads, after)
assert after == threads, f"{after - threads} thread(s) started by the collectives of a group of one"
distributed.close()
"""


def test_collectives_of_a_group_of_one_are_the_identity_and_start_no_thread():
    """gloo runs a collective on a worker thread of its own; a large object's copies there start a
    second OpenMP pool, after which libgomp stops spinning in every pool of the process (the PPO
    update's OpenMP workers then sleep between parallel regions: thousands of context switches
    an update). In a group of one the collectives are skipped."""
    result = subprocess.run([sys.executable, "-c", GROUP_OF_ONE], capture_output=True, text=True, cwd=ROOT,
                            timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    assert result.stdout.startswith("threads")


def ppo_config(**extra):
    from services.trainer.config import Config
    return Config.model_validate(dict(policy_addresses=["p:1"], reward_address="r:2", sft_model="sft",
                                      reward_model="rm", prompts="prompts.jsonl", **extra))


def test_the_collective_timeout_is_minutes_and_outlasts_a_dependency_retry():
    from services.trainer.config import ConfigError, SFTConfig, load
    config = ppo_config()
    assert 60 <= config.collective_timeout_s <= 15 * 60  # minutes, not half an hour
    assert SFTConfig(out="o", model="m", data="d").collective_timeout_s == config.collective_timeout_s
    services = config.services
    assert config.collective_timeout_s > services.dependency_deadline_s + services.rpc_timeout_s
    # A timeout shorter than a rank's retries of a dependency would kill the job mid-retry.
    with pytest.raises(ConfigError, match=r"collective_timeout_s \(300\) must exceed services.dependency_deadline_s "
                                          r"\+ services.rpc_timeout_s \(420\)"):
        load(type(config), None, ["collective_timeout_s=300"], dict(
            policy_addresses=["p:1"], reward_address="r:2", sft_model="sft", reward_model="rm", prompts="p"))
    assert ppo_config(collective_timeout_s=300, services=dict(dependency_deadline_s=120)).collective_timeout_s == 300


def test_nccl_watchdog_settings_are_names_torch_reads_and_never_override_the_user(monkeypatch):
    import torch

    from services.trainer import distributed
    header = pathlib.Path(torch.__file__).parent / "include/torch/csrc/distributed/c10d/ProcessGroupNCCL.hpp"
    declared = header.read_text()
    for names in distributed.nccl_watchdog_env(600):
        for name in names:
            assert f'"{name}"' in declared, f"torch {torch.__version__} does not read {name}"
    for names in distributed.nccl_watchdog_env(600):
        for name in names:
            monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("TORCH_NCCL_HEARTBEAT_TIMEOUT_SEC", "42")
    monkeypatch.setenv("NCCL_ASYNC_ERROR_HANDLING", "0")  # the older alias counts as set
    applied = distributed.set_nccl_watchdog(600)
    assert applied == {"TORCH_NCCL_ENABLE_MONITORING": "1", "TORCH_NCCL_PROPAGATE_ERROR": "1"}
    assert os.environ["TORCH_NCCL_HEARTBEAT_TIMEOUT_SEC"] == "42"
    assert "TORCH_NCCL_ASYNC_ERROR_HANDLING" not in os.environ
    monkeypatch.delenv("TORCH_NCCL_HEARTBEAT_TIMEOUT_SEC")
    monkeypatch.delenv("NCCL_ASYNC_ERROR_HANDLING")
    assert distributed.set_nccl_watchdog(900) == {"TORCH_NCCL_ASYNC_ERROR_HANDLING": "1",
                                                  "TORCH_NCCL_HEARTBEAT_TIMEOUT_SEC": "900"}


def test_the_documented_timeout_and_watchdog_settings_are_the_code_s():
    """docs/training.md states the default and the settings the trainer makes: they must be these."""
    import re

    from services.trainer import distributed
    from services.trainer.config import COLLECTIVE_TIMEOUT_S
    doc = (ROOT / "docs" / "training.md").read_text()
    documented = re.search(r"`collective_timeout_s` defaults to (\d+) minutes", doc)
    assert documented, "docs/training.md: the sentence stating collective_timeout_s's default is gone"
    assert int(documented.group(1)) * 60 == COLLECTIVE_TIMEOUT_S
    for names, value in distributed.nccl_watchdog_env(COLLECTIVE_TIMEOUT_S).items():
        assert f"`{names[0]}={value}`" in doc, names[0]
