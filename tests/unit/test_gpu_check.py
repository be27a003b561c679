"""bench/gpu_check.sh without a GPU (as CI runs it): it says so, checks that every command it
would run exists and takes its flags, and exits 0; a command that would not start fails it."""
from __future__ import annotations

import importlib.util
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[2]


def load_gpu_check():
    spec = importlib.util.spec_from_file_location("rlhf_bench_gpu_check", ROOT / "bench" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_without_a_gpu_it_checks_every_stage_and_exits_0(tmp_path):
    result = subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh"), "--dry-run", "--out", str(tmp_path)],
                            capture_output=True, text=True, env={"PYTHON": sys.executable, "PATH": "/usr/bin:/bin"},
                            timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    assert "no GPU here" in result.stdout
    checked = [line for line in result.stdout.splitlines() if line.startswith(("ok:", "FAILED:"))]
    stages = {line.split(":")[1].strip() for line in checked}
    assert stages == {"ppo x1", "ppo x2", "push", "reward"}, checked
    assert all(line.startswith("ok:") for line in checked), checked
    assert len(checked) == 6  # two servers and four command lines: every one was checked


def test_the_dry_run_refuses_what_would_not_start(tmp_path):
    check = load_gpu_check()
    assert check.check_rlhf(check.rlhf("serve", "policy", "--model", str(tmp_path), "--gpu-memory-utilization",
                                           "0.3")) is None
    assert "vLLM refuses" in check.check_rlhf(check.rlhf("serve", "policy", "--model", str(tmp_path),
                                                              "--no-such-flag", "1"))
    assert "do not parse" in check.check_rlhf(check.rlhf("serve", "reward", "--model", "m", "--no-such-flag"))
    bad = tmp_path / "ppo.yaml"
    bad.write_text("policy_addresses: [a:1]\nreward_address: b:2\nsft_model: s\nreward_model: r\nprompts: p\n"
                   "ppo: {lr: -1}\n")
    assert "ppo.lr" in check.check_rlhf(check.rlhf("train", "ppo", "--config", str(bad)))
    assert check.check_flags([sys.executable, "bench/reward.py", "--device", "cuda"]) is None
    assert "does not take ['--no-such-flag']" in check.check_flags([sys.executable, "bench/reward.py",
                                                                    "--no-such-flag"])
    assert "does not exist" in check.check_flags([sys.executable, "bench/nothing.py"])
