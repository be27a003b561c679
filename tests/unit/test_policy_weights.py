"""Staging and verification of weight pushes (services.policy.weights), without a server.

Also the client's side of the wire format (services.policy.client): what it sends must
pass the server's checks byte for byte."""
from __future__ import annotations

import hashlib
import json
import pathlib
import struct

import numpy as np
import pytest
import xxhash

from rlhf.v1 import policy_pb2
from services.common.errors import FailedPrecondition, InvalidArgument, ResourceExhausted
from services.policy.client import plan_push, tensor_bytes, weight_messages
from services.policy.weights import TensorSpec, WeightStage, checkpoint_tensors

SERVED = {
    "embed.weight": TensorSpec("embed.weight", "float32", (10, 4), 160),
    "norm.weight": TensorSpec("norm.weight", "float32", (4,), 16),
    "lm_head.weight": TensorSpec("lm_head.weight", "float32", (10, 4), 160),
}


def stage(tensors=None, version=1, full=True, current=0, max_bytes=1 << 20, tmp_path=None):
    tensors = list(SERVED.values()) if tensors is None else tensors
    return WeightStage(version, tensors, full, served=SERVED, current_version=current, max_bytes=max_bytes,
                       directory=str(tmp_path) if tmp_path else None)


def payload(specs):
    rng = np.random.default_rng(0)
    return b"".join(rng.standard_normal(t.nbytes // 4).astype("<f4").tobytes() for t in specs)


def test_complete_push_stages_every_byte(tmp_path):
    s = stage(tmp_path=tmp_path)
    data = payload(SERVED.values())
    for off in range(0, len(data), 100):
        s.write(off, data[off:off + 100])
    staged = s.commit(xxhash.xxh3_128(data).digest())
    assert pathlib.Path(staged.path).read_bytes() == data
    assert [(x.name, x.offset) for x in staged.sources] == [("embed.weight", 0), ("norm.weight", 160),
                                                             ("lm_head.weight", 176)]
    assert staged.nbytes == 336 and staged.version == 1


@pytest.mark.parametrize("change,error,words", [
    (dict(version=0), FailedPrecondition, "greater than the served version 0"),
    (dict(version=3, current=3), FailedPrecondition, "served version 3"),
    (dict(tensors=[]), InvalidArgument, "at least one"),
    (dict(tensors=[TensorSpec("embed.weight", "float32", (11, 4), 176)], full=False), FailedPrecondition, "[10, 4]"),
    (dict(tensors=[TensorSpec("embed.weight", "float16", (10, 4), 80)], full=False), FailedPrecondition, "float32"),
    (dict(tensors=[TensorSpec("embed.weight", "int8", (10, 4), 40)], full=False), InvalidArgument, "dtype must be one of"),
    (dict(tensors=[TensorSpec("embed.weight", "float32", (10, 4), 161)], full=False), InvalidArgument, "nbytes must be"),
    (dict(tensors=[TensorSpec("nope", "float32", (4,), 16)], full=False), FailedPrecondition, "not a parameter"),
    (dict(tensors=[SERVED["norm.weight"], SERVED["norm.weight"]], full=False), InvalidArgument, "twice"),
    (dict(tensors=[SERVED["norm.weight"]], full=True), FailedPrecondition, "misses 2 parameters"),
    (dict(max_bytes=100), ResourceExhausted, "--max-push-bytes 100"),
])
def test_header_refusals(tmp_path, change, error, words):
    with pytest.raises(error, match=None) as e:
        stage(tmp_path=tmp_path, **change)
    assert words in str(e.value)
    assert not list(tmp_path.iterdir())  # nothing staged


def test_a_reused_file_holds_exactly_the_new_push(tmp_path):
    """A spare staging file, longer than the next push, is overwritten and cut to size."""
    spare = tmp_path / "spare.bin"
    spare.write_bytes(b"\xff" * 1000)
    s = WeightStage(1, [SERVED["norm.weight"]], False, served=SERVED, current_version=0, max_bytes=1 << 20,
                    directory=str(tmp_path), reuse=str(spare))
    data = payload([SERVED["norm.weight"]])
    s.write(0, data)
    staged = s.commit(xxhash.xxh3_128(data).digest())
    assert staged.path == str(spare) and spare.read_bytes() == data
    assert [p.name for p in tmp_path.iterdir()] == ["spare.bin"]


def test_a_spare_deleted_meanwhile_gives_a_new_file(tmp_path):
    s = WeightStage(1, [SERVED["norm.weight"]], False, served=SERVED, current_version=0, max_bytes=1 << 20,
                    directory=str(tmp_path), reuse=str(tmp_path / "gone.bin"))
    assert pathlib.Path(s.path).parent == tmp_path and pathlib.Path(s.path).exists()
    s.discard()


def test_an_abandoned_stage_refuses_further_writes(tmp_path):
    s = stage(tmp_path=tmp_path)
    s.write(0, b"\x00" * 16)
    s.close()  # what the engine does when the client goes away mid-push
    with pytest.raises(InvalidArgument, match="abandoned"):
        s.write(16, b"\x00" * 16)
    assert pathlib.Path(s.path).stat().st_size == 16


def test_partial_push_of_named_tensors(tmp_path):
    s = stage([SERVED["norm.weight"]], full=False, tmp_path=tmp_path)
    data = payload([SERVED["norm.weight"]])
    s.write(0, data)
    assert [x.name for x in s.commit(xxhash.xxh3_128(data).digest()).sources] == ["norm.weight"]


def test_chunk_offsets_and_sizes(tmp_path):
    s = stage(tmp_path=tmp_path)
    data = payload(SERVED.values())
    s.write(0, data[:50])
    with pytest.raises(InvalidArgument, match=r"offset must equal the bytes received so far \(50\), got 60"):
        s.write(60, data[60:70])
    with pytest.raises(InvalidArgument, match=r"offset must equal .*\(50\), got 0"):
        s.write(0, data[:10])  # overlap
    with pytest.raises(InvalidArgument, match="runs past the 336 bytes"):
        s.write(50, data[50:] + b"xx")
    s.write(50, data[50:300])
    with pytest.raises(InvalidArgument, match="commit after 300 of the 336 bytes"):
        s.commit(xxhash.xxh3_128(data).digest())
    s.discard()
    assert not list(tmp_path.iterdir())


def test_checksum(tmp_path):
    data = payload(SERVED.values())
    s = stage(tmp_path=tmp_path)
    s.write(0, data)
    with pytest.raises(InvalidArgument, match="must be 16 bytes for xxh3_128, got 5"):
        s.commit(b"short")
    corrupt = bytearray(data)
    corrupt[7] ^= 1
    with pytest.raises(InvalidArgument, match="does not match"):
        s.commit(xxhash.xxh3_128(corrupt).digest())
    s.discard()
    assert not list(tmp_path.iterdir())


def test_sha256_digest_on_request(tmp_path):
    data = payload(SERVED.values())
    s = WeightStage(1, list(SERVED.values()), True, served=SERVED, current_version=0, max_bytes=1 << 20,
                    directory=str(tmp_path), digest="sha256")
    s.write(0, data)
    with pytest.raises(InvalidArgument, match="must be 32 bytes for sha256, got 16"):
        s.commit(xxhash.xxh3_128(data).digest())
    assert pathlib.Path(s.commit(hashlib.sha256(data).digest()).path).read_bytes() == data


def test_unknown_digest_is_refused_before_staging(tmp_path):
    with pytest.raises(InvalidArgument, match="header.digest must be one of"):
        WeightStage(1, list(SERVED.values()), True, served=SERVED, current_version=0, max_bytes=1 << 20,
                    directory=str(tmp_path), digest="Digest value 7")
    assert not list(tmp_path.iterdir())


def _write_safetensors(path, tensors: dict[str, tuple[str, list[int]]]):
    header, offset = {}, 0
    for name, (dtype, shape) in tensors.items():
        n = int(np.prod(shape)) * {"F32": 4, "BF16": 2}[dtype]
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + bytes(offset))


@pytest.mark.parametrize("tied", [True, False])
def test_checkpoint_tensors_reads_headers(tmp_path, tied):
    (tmp_path / "config.json").write_text(json.dumps({"tie_word_embeddings": tied}))
    _write_safetensors(tmp_path / "model.safetensors", {
        "model.embed_tokens.weight": ("F32", [10, 4]), "model.norm.weight": ("BF16", [4]),
        "lm_head.weight": ("F32", [10, 4])})
    specs, sources = checkpoint_tensors(tmp_path, "bfloat16")
    want = {"model.embed_tokens.weight", "model.norm.weight"} | (set() if tied else {"lm_head.weight"})
    assert set(specs) == want == set(sources)
    assert specs["model.embed_tokens.weight"] == TensorSpec("model.embed_tokens.weight", "bfloat16", (10, 4), 80)
    assert sources["model.embed_tokens.weight"].dtype == "float32"  # converted by the loader


def test_client_messages_pass_the_stage(tmp_path):
    """The client's header/chunks/commit, fed to a stage, give the tensors' exact bytes."""
    import torch

    state = {"embed.weight": torch.randn(10, 4), "norm.weight": torch.randn(4, dtype=torch.float64)}
    state["lm_head.weight"] = state["embed.weight"]  # a tied alias the server does not list
    served = {k: SERVED[k] for k in ("embed.weight", "norm.weight")}
    info = policy_pb2.PolicyModelInfo(dtype="bfloat16", tensors=[
        policy_pb2.TensorSpec(name=t.name, dtype=policy_pb2.DTYPE_BFLOAT16, shape=t.shape) for t in served.values()])
    plan = plan_push(state, info)
    assert [name for name, _, _ in plan] == ["embed.weight", "norm.weight"]
    msgs = [policy_pb2.UpdateWeightsRequest.FromString(m) for m in weight_messages(plan, 5, True, "bfloat16",
                                                                                    chunk_bytes=24)]
    header = msgs[0].header
    assert [t.nbytes for t in header.tensors] == [80, 8] and header.version == 5 and header.full
    assert all(len(m.chunk.data) == 24 for m in msgs[1:-2])  # small tensors are packed into full chunks
    bf16 = {k: TensorSpec(k, "bfloat16", v.shape, v.nbytes // 2) for k, v in served.items()}
    s = WeightStage(5, [TensorSpec(t.name, "bfloat16", tuple(t.shape), t.nbytes) for t in header.tensors], True,
                    served=bf16, current_version=0, max_bytes=1 << 20, directory=str(tmp_path))
    for m in msgs[1:-1]:
        s.write(m.chunk.offset, m.chunk.data)
    staged = s.commit(msgs[-1].commit.digest)
    want = b"".join(state[k].to(torch.bfloat16).view(torch.int16).numpy().tobytes() for k in served)
    assert pathlib.Path(staged.path).read_bytes() == want


def test_tensor_bytes_without_copy_when_possible():
    import torch

    t = torch.arange(6, dtype=torch.float32).reshape(2, 3)
    view = tensor_bytes(t, "float32")
    assert view.nbytes == 24 and bytes(view) == t.numpy().tobytes()
    t[0, 0] = 42.0  # same memory: no copy was made
    assert np.frombuffer(view, dtype="<f4")[0] == 42.0
    assert bytes(tensor_bytes(t.t(), "float32")) == t.t().contiguous().numpy().tobytes()
    assert bytes(tensor_bytes(np.ones(3, dtype=np.float64), "float32")) == np.ones(3, dtype="<f4").tobytes()


def test_client_and_transport_import_neither_torch_nor_vllm():
    import subprocess
    import sys

    code = ("import sys, services.policy.client, services.policy.server, services.policy.main; "
            "bad = [m for m in ('torch', 'vllm') if m in sys.modules]; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)
