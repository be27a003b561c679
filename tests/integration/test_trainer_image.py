"""The trainer's served image across ranks: each rank converts and hashes its own FSDP2 shard and
encodes its own segment of every delta entry, and what rank 0 assembles is the image and the
delta a single process computes from the whole tensors (3 ranks: shards of uneven size)."""
from __future__ import annotations

import pathlib
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from services.ml.delta import apply_entry
from services.policy.wire import image_digest, segment_digests

pytestmark = pytest.mark.slow
ROOT = pathlib.Path(__file__).resolve().parents[2]
WORKER = ROOT / "tests" / "integration" / "image_worker.py"


@pytest.mark.parametrize("nproc", [1, 3])
def test_shards_make_the_image_and_the_delta_of_the_whole(tmp_path, models_root, nproc):
    from services.demo.tiny_model import build_model

    model_dir = build_model("policy", models_root / "policy-image", tie_embeddings=True, seed=6)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
               str(WORKER), str(model_dir), str(tmp_path)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    got = torch.load(tmp_path / "image.pt")
    assert got["world_size"] == nproc

    # The image is the checkpoint in bf16, whole, on rank 0 (the tied head once, as the embedding).
    checkpoint = load_file(model_dir / "model.safetensors")
    assert got["first"].keys() == checkpoint.keys() and "lm_head.weight" not in got["first"]
    for name, t in checkpoint.items():
        assert torch.equal(got["first"][name].view(torch.int16), t.to(torch.bfloat16).view(torch.int16)), name

    def digest(tensors):
        return image_digest({name: segment_digests(t.reshape(-1).view(torch.uint8).numpy(), tuple(t.shape), 2, nproc)
                             for name, t in tensors.items()})

    assert got["digest"] == digest(got["first"]) == got["base_digest"]
    assert got["image_digest"] == digest(got["second"])
    # The delta, assembled from every rank's records, takes the first image to the second.
    assert (got["base_version"], got["version"]) == (1, 2) and 0 < got["changed"] < got["elements"]
    changed = 0
    for name, before in got["first"].items():
        after = got["second"][name]
        if name not in got["entries"]:
            assert torch.equal(before.view(torch.int16), after.view(torch.int16)), name
            continue
        rebuilt, k = apply_entry(before, got["entries"][name], nproc)
        assert torch.equal(rebuilt.view(torch.int16), after.view(torch.int16)), name
        changed += k
    assert changed == got["changed"]
