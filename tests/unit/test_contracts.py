"""The generated stubs match the protos, and a client-only install needs no torch."""
from __future__ import annotations

import subprocess
import sys
import venv


import pytest

import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[2]


def test_generated_stubs_are_fresh():
    result = subprocess.run([sys.executable, str(ROOT / "protos" / "generate.py"), "--check"],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_rpc_of_the_design_is_in_the_contracts():
    from rlhf.v1 import policy_pb2, reward_pb2, trainer_pb2
    methods = {s.full_name: {m.name for m in s.methods}
               for f in (policy_pb2, reward_pb2, trainer_pb2) for s in f.DESCRIPTOR.services_by_name.values()}
    assert methods == {
        "rlhf.v1.PolicyService": {"Generate", "GenerateStream", "UpdateWeights", "CommitWeights", "AbortWeights",
                                  "RollbackWeights", "GetModelInfo"},
        "rlhf.v1.RewardService": {"Score", "ScoreStream", "Compare", "GetModelInfo", "LoadModel"},
        "rlhf.v1.TrainerService": {"GetStatus", "WatchMetrics", "Pause", "Resume", "SaveCheckpoint"},
    }


@pytest.mark.slow
def test_client_only_install_has_no_torch(tmp_path):
    """pip install of the base distribution into an empty venv: grpcio + protobuf only."""
    env_dir = tmp_path / "client-venv"
    venv.create(env_dir, with_pip=True)
    py = env_dir / "bin" / "python"
    subprocess.run([py, "-m", "pip", "install", "-q", str(ROOT)], check=True)
    installed = subprocess.run([py, "-m", "pip", "list", "--format=freeze"], capture_output=True, text=True,
                               check=True).stdout.lower()
    assert "torch" not in installed and "vllm" not in installed and "transformers" not in installed, installed
    subprocess.run([py, "-c", "from services.reward.client import RewardClient; "
                              "from services.policy.client import PolicyClient; print('ok')"],
                   check=True, cwd=tmp_path)
    # The package says it is typed, and a server started from this install says what is missing.
    subprocess.run([py, "-c", "import importlib.resources as r; assert (r.files('services') / 'py.typed').is_file(); "
                              "assert (r.files('rlhf') / 'py.typed').is_file()"], check=True, cwd=tmp_path)
    rlhf = env_dir / "bin" / "rlhf"
    result = subprocess.run([rlhf, "serve", "reward", "--model", "m"], capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 1 and "needs the server extra" in result.stderr and "Traceback" not in result.stderr, \
        result.stderr
    result = subprocess.run([rlhf, "--version"], capture_output=True, text=True, cwd=tmp_path, check=True)
    assert result.stdout.startswith("rlhf ")
