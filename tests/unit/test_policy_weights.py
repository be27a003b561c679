"""Receiving weight pushes (services.policy.weights) without a server: the push session
(header checks, chunk offsets, digest, commit, message order), the staging directory
(spare file, files of dead servers), and the client's messages passing the session
byte for byte."""
from __future__ import annotations

import dataclasses
import errno
import fcntl
import hashlib
import json
import os
import pathlib
import struct
import subprocess
import sys

import numpy as np
import pytest
import xxhash

from rlhf.v1 import policy_pb2
from services.common.errors import FailedPrecondition, InvalidArgument, ResourceExhausted
from services.policy.client import plan_push, tensor_bytes, weight_messages
from services.policy.weights import MAX_VERSION, PushSession, StagingDir, TensorSpec, checkpoint_tensors

SERVED = {
    "embed.weight": TensorSpec("embed.weight", "float32", (10, 4), 160),
    "norm.weight": TensorSpec("norm.weight", "float32", (4,), 16),
    "lm_head.weight": TensorSpec("lm_head.weight", "float32", (10, 4), 160),
}


@pytest.fixture
def staging(tmp_path):
    s = StagingDir(tmp_path, owner="me")
    s.open()
    yield s
    s.close()


def pushes(directory) -> list[str]:
    return sorted(p.name for p in pathlib.Path(directory).glob("rlhf-push-*"))


def session(staging, served=SERVED, current=0, max_bytes=1 << 20) -> PushSession:
    return PushSession(staging, served=served, current_version=current, max_bytes=max_bytes)


def started(staging, tensors=None, version=1, full=True, digest="xxh3_128", **kw) -> PushSession:
    s = session(staging, **kw)
    s.header(version, list(SERVED.values()) if tensors is None else tensors, full, digest)
    return s


def payload(specs):
    rng = np.random.default_rng(0)
    return b"".join(rng.standard_normal(t.nbytes // 4).astype("<f4").tobytes() for t in specs)


def test_complete_push_stages_every_byte(staging):
    s = started(staging)
    data = payload(SERVED.values())
    for off in range(0, len(data), 100):
        s.chunk(off, data[off:off + 100])
    s.commit(xxhash.xxh3_128(data).digest())
    staged = s.end()
    s.close()  # after end(): the file is the caller's, close() leaves it alone
    assert pathlib.Path(staged.path).read_bytes() == data
    assert [(x.name, x.offset) for x in staged.sources] == [("embed.weight", 0), ("norm.weight", 160),
                                                             ("lm_head.weight", 176)]
    assert staged.nbytes == 336 and staged.version == 1 and staging.spare is None


@pytest.mark.parametrize("change,error,words", [
    (dict(version=0), FailedPrecondition, "greater than the served version 0"),
    (dict(version=3, current=3), FailedPrecondition, "served version 3"),
    (dict(version=MAX_VERSION + 1), InvalidArgument, f"header.version must be at most 2^63 - 1 = {MAX_VERSION}"),
    (dict(version=2**64 - 1), InvalidArgument, "header.version must be at most"),
    (dict(tensors=[]), InvalidArgument, "at least one"),
    (dict(tensors=[TensorSpec("embed.weight", "float32", (11, 4), 176)], full=False), FailedPrecondition, "[10, 4]"),
    (dict(tensors=[TensorSpec("embed.weight", "float16", (10, 4), 80)], full=False), FailedPrecondition, "float32"),
    (dict(tensors=[TensorSpec("embed.weight", "int8", (10, 4), 40)], full=False), InvalidArgument, "dtype must be one of"),
    (dict(tensors=[TensorSpec("embed.weight", "float32", (10, 4), 161)], full=False), InvalidArgument, "nbytes must be"),
    (dict(tensors=[TensorSpec("nope", "float32", (4,), 16)], full=False), FailedPrecondition, "not a parameter"),
    (dict(tensors=[SERVED["norm.weight"], SERVED["norm.weight"]], full=False), InvalidArgument, "twice"),
    (dict(tensors=[SERVED["norm.weight"]], full=True), FailedPrecondition, "misses 2 parameters"),
    (dict(max_bytes=100), ResourceExhausted, "--max-push-bytes 100"),
    (dict(digest="Digest value 7"), InvalidArgument, "header.digest must be one of"),
])
def test_header_refusals(staging, change, error, words):
    with pytest.raises(error) as e:
        started(staging, **change)
    assert words in str(e.value)
    assert not pushes(staging.directory)  # nothing staged


def test_the_largest_version_is_accepted(staging):
    s = started(staging, version=MAX_VERSION, tensors=[SERVED["norm.weight"]], full=False)
    s.close()


def test_message_order(staging):
    """Header first, one header, no empty messages, nothing after the commit, a commit
    before the end: each broken rule is INVALID_ARGUMENT and stages nothing for good."""
    data = payload([SERVED["norm.weight"]])
    digest = xxhash.xxh3_128(data).digest()

    def fresh():
        return started(staging, tensors=[SERVED["norm.weight"]], full=False)

    s = session(staging)
    with pytest.raises(InvalidArgument, match="first UpdateWeights message must be a header, got a chunk"):
        s.chunk(0, data)
    with pytest.raises(InvalidArgument, match="must be a header, got a commit"):
        s.commit(digest)
    with pytest.raises(InvalidArgument, match="ended after no header"):
        s.end()
    s = fresh()
    with pytest.raises(InvalidArgument, match="second header"):
        s.header(2, [SERVED["norm.weight"]], False, "xxh3_128")
    with pytest.raises(InvalidArgument, match="empty message"):
        s.empty_message()
    s.chunk(0, data)
    with pytest.raises(InvalidArgument, match="ended after 16 of 16 bytes and no commit"):
        s.end()
    s.commit(digest)
    with pytest.raises(InvalidArgument, match="got a chunk after the commit"):
        s.chunk(16, b"")
    with pytest.raises(InvalidArgument, match="got a commit after the commit"):
        s.commit(digest)
    s.close()  # refused: its file becomes the spare, which the next push overwrites
    spare = staging.spare
    assert pushes(staging.directory) == [pathlib.Path(spare).name]
    s = fresh()
    s.chunk(0, data)
    s.commit(digest)
    assert s.end().path == spare and staging.spare is None


def test_a_reused_file_holds_exactly_the_new_push(staging):
    """A spare staging file, longer than the next push, is overwritten and cut to size."""
    spare = staging.directory / "rlhf-push-me-spare.bin"
    spare.write_bytes(b"\xff" * 1000)
    staging.spare = str(spare)
    s = started(staging, tensors=[SERVED["norm.weight"]], full=False)
    data = payload([SERVED["norm.weight"]])
    s.chunk(0, data)
    s.commit(xxhash.xxh3_128(data).digest())
    staged = s.end()
    assert staged.path == str(spare) and spare.read_bytes() == data
    assert pushes(staging.directory) == ["rlhf-push-me-spare.bin"]


def test_a_spare_deleted_meanwhile_gives_a_new_file(staging):
    staging.spare = str(staging.directory / "rlhf-push-me-gone.bin")
    s = started(staging, tensors=[SERVED["norm.weight"]], full=False)
    assert pathlib.Path(s.path).parent == staging.directory and pathlib.Path(s.path).exists()
    s.close()


def test_recycle_keeps_one_spare(staging):
    paths = [staging.create()[1] for _ in range(3)]
    for p in paths:
        staging.recycle(p)
    assert staging.spare == paths[0] and pushes(staging.directory) == [pathlib.Path(paths[0]).name]


def test_an_abandoned_session_refuses_further_writes(staging):
    s = started(staging)
    s.chunk(0, b"\x00" * 16)
    s.close()  # what the server does when the client goes away mid-push
    with pytest.raises(InvalidArgument, match="abandoned"):
        s.chunk(16, b"\x00" * 16)
    assert pathlib.Path(s.path).stat().st_size == 16 and staging.spare == s.path


def test_partial_push_of_named_tensors(staging):
    s = started(staging, tensors=[SERVED["norm.weight"]], full=False)
    data = payload([SERVED["norm.weight"]])
    s.chunk(0, data)
    s.commit(xxhash.xxh3_128(data).digest())
    assert [x.name for x in s.end().sources] == ["norm.weight"]


def test_chunk_offsets_and_sizes(staging):
    s = started(staging)
    data = payload(SERVED.values())
    s.chunk(0, data[:50])
    with pytest.raises(InvalidArgument, match=r"offset must equal the bytes received so far \(50\), got 60"):
        s.chunk(60, data[60:70])
    with pytest.raises(InvalidArgument, match=r"offset must equal .*\(50\), got 0"):
        s.chunk(0, data[:10])  # overlap
    with pytest.raises(InvalidArgument, match="runs past the 336 bytes"):
        s.chunk(50, data[50:] + b"xx")
    s.chunk(50, data[50:300])
    with pytest.raises(InvalidArgument, match="commit after 300 of the 336 bytes"):
        s.commit(xxhash.xxh3_128(data).digest())


def test_checksum(staging):
    data = payload(SERVED.values())
    s = started(staging)
    s.chunk(0, data)
    with pytest.raises(InvalidArgument, match="must be 16 bytes for xxh3_128, got 5"):
        s.commit(b"short")
    corrupt = bytearray(data)
    corrupt[7] ^= 1
    with pytest.raises(InvalidArgument, match="does not match"):
        s.commit(xxhash.xxh3_128(corrupt).digest())


def test_sha256_digest_on_request(staging):
    data = payload(SERVED.values())
    s = started(staging, digest="sha256")
    s.chunk(0, data)
    with pytest.raises(InvalidArgument, match="must be 32 bytes for sha256, got 16"):
        s.commit(xxhash.xxh3_128(data).digest())
    s.commit(hashlib.sha256(data).digest())
    assert pathlib.Path(s.end().path).read_bytes() == data


class _FullDisk:
    """A file whose writes fail as a full (or over-quota) disk makes them fail."""

    def __init__(self, file, code):
        self.file, self.code = file, code
        self.closed = False

    def write(self, data):
        raise OSError(self.code, os.strerror(self.code))

    def close(self):
        self.file.close()
        self.closed = True


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EDQUOT])
def test_a_full_disk_is_resource_exhausted_and_frees_the_file(staging, code):
    """The mapping only; tests/reliability/test_reliability_policy.py fills a real tmpfs."""
    s = started(staging)
    s._file = _FullDisk(s._file, code)
    with pytest.raises(ResourceExhausted, match=f"staging directory {staging.directory} is full .*after 0 of 336"):
        s.chunk(0, b"\x00" * 16)
    assert not pushes(staging.directory)  # the partial file is deleted, not kept as the spare
    s.close()
    assert staging.spare is None
    # other errors are not the caller's: they stay what they are (INTERNAL)
    s = started(staging)
    s._file = _FullDisk(s._file, errno.EIO)
    with pytest.raises(OSError) as e:
        s.chunk(0, b"\x00" * 16)
    assert not isinstance(e.value, ResourceExhausted) and e.value.errno == errno.EIO


def test_staging_files_of_dead_servers_are_removed_and_live_ones_kept(tmp_path):
    """Owners whose lock can be taken are dead: their files go. A live owner (here a child
    process holding its flock) keeps its files, whatever their names."""
    live = StagingDir(tmp_path, owner="live")
    live.open()
    live_file = live.create()[1]
    (tmp_path / "rlhf-staging-other.lock").write_text("")
    holder = subprocess.Popen([sys.executable, "-c", (
        "import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_RDWR); fcntl.flock(fd, fcntl.LOCK_EX); "
        "print('locked', flush=True); time.sleep(60)"), str(tmp_path / "rlhf-staging-other.lock")],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        (tmp_path / "rlhf-push-other-x1.bin").write_bytes(b"held by a live server in another process")
        (tmp_path / "rlhf-staging-dead.lock").write_text("")  # its server was SIGKILLed: nobody holds it
        (tmp_path / "rlhf-push-dead-a.bin").write_bytes(b"a")
        (tmp_path / "rlhf-push-dead-b.bin").write_bytes(b"b")
        (tmp_path / "rlhf-push-nolock-c.bin").write_bytes(b"c")  # no lock file at all
        (tmp_path / "unrelated.bin").write_bytes(b"d")
        live.close()  # the first server stops cleanly: its files and lock go
        me = StagingDir(tmp_path, owner="new")
        removed = me.open()
        assert sorted(pathlib.Path(p).name for p in removed) == ["rlhf-push-dead-a.bin", "rlhf-push-dead-b.bin",
                                                                  "rlhf-push-nolock-c.bin"]
        left = sorted(p.name for p in tmp_path.iterdir())
        assert left == ["rlhf-push-other-x1.bin", "rlhf-staging-new.lock", "rlhf-staging-other.lock", "unrelated.bin"]
        assert not pathlib.Path(live_file).exists()
        # this server's own lock is held: a third server leaves its files alone
        mine = me.create()[1]
        third = StagingDir(tmp_path, owner="third")
        assert third.open() == [] and pathlib.Path(mine).exists()
        third.close()
        me.close()
        assert sorted(p.name for p in tmp_path.iterdir()) == ["rlhf-push-other-x1.bin", "rlhf-staging-other.lock",
                                                              "unrelated.bin"]
    finally:
        holder.kill()
        holder.wait()
    # once its holder is gone, the other server's files are found dead too
    last = StagingDir(tmp_path, owner="last")
    assert [pathlib.Path(p).name for p in last.open()] == ["rlhf-push-other-x1.bin"]
    last.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["unrelated.bin"]


def test_the_lock_is_held_from_the_moment_it_has_its_name(tmp_path):
    s = StagingDir(tmp_path, owner="me")
    s.open()
    fd = os.open(tmp_path / "rlhf-staging-me.lock", os.O_RDWR)
    try:
        with pytest.raises(BlockingIOError):
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    finally:
        os.close(fd)
        s.close()


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


def test_client_messages_pass_the_session(staging):
    """The client's header/chunks/commit, fed to a session, give the tensors' exact bytes."""
    import torch

    from services.policy.wire import DTYPE_NAME

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
    s = session(staging, served=bf16)
    s.header(5, [TensorSpec(t.name, DTYPE_NAME[t.dtype], tuple(t.shape), t.nbytes) for t in header.tensors], True,
             "xxh3_128")
    for m in msgs[1:-1]:
        s.chunk(m.chunk.offset, m.chunk.data)
    s.commit(msgs[-1].commit.digest)
    want = b"".join(state[k].to(torch.bfloat16).view(torch.int16).numpy().tobytes() for k in served)
    assert pathlib.Path(s.end().path).read_bytes() == want


def test_tensor_bytes_without_copy_when_possible():
    import torch

    t = torch.arange(6, dtype=torch.float32).reshape(2, 3)
    view = tensor_bytes(t, "float32")
    assert view.nbytes == 24 and bytes(view) == t.numpy().tobytes()
    t[0, 0] = 42.0  # same memory: no copy was made
    assert np.frombuffer(view, dtype="<f4")[0] == 42.0
    assert bytes(tensor_bytes(t.t(), "float32")) == t.t().contiguous().numpy().tobytes()
    assert bytes(tensor_bytes(np.ones(3, dtype=np.float64), "float32")) == np.ones(3, dtype="<f4").tobytes()


# ---- delta pushes, image digests, staged pushes -------------------------------------------

NORM = SERVED["norm.weight"]


def delta_spec(encoded: int, spec=NORM) -> TensorSpec:
    return dataclasses.replace(spec, encoded_bytes=encoded)


@pytest.mark.parametrize("kw,error,words", [
    (dict(tensors=[delta_spec(4)], full=True), InvalidArgument, "header.full must be false in a delta push"),
    (dict(tensors=[delta_spec(0)]), InvalidArgument,
     "header.tensors[0].encoded_bytes must be in [digest_segments, nbytes + 11 x digest_segments] = [1, 27], got 0"),
    (dict(tensors=[delta_spec(28)]), InvalidArgument, "= [1, 27], got 28"),
    (dict(tensors=[delta_spec(3)], segments=4), InvalidArgument, "= [4, 60], got 3"),
    (dict(tensors=[delta_spec(4)], segments=65537), InvalidArgument,
     "header.digest_segments must be in [1, 65536], got 65537"),
    (dict(tensors=[delta_spec(4)], image_digest=b"x" * 15), InvalidArgument,
     "header.image_digest must be empty or 16 bytes (XXH3-128), got 15 bytes"),
    (dict(tensors=[delta_spec(4)], base_digest=b"x" * 32), InvalidArgument,
     "header.delta.image_digest must be empty or 16 bytes"),
    (dict(tensors=[delta_spec(4)], delta_base=2), FailedPrecondition,
     "header.delta.version is 2 but this replica serves version 3: a delta applies only to the version it was made "
     "against; send a full push"),
    (dict(tensors=[delta_spec(4)], base_digest=b"\x01" * 16), FailedPrecondition,
     "header.delta.image_digest 0101010101010101... is not the digest of this replica's image at version 3 "
     "(0202020202020202...): its weights are not the delta's base; send a full push"),
    (dict(tensors=[delta_spec(4, dataclasses.replace(NORM, name="other"))]), FailedPrecondition,
     "header.tensors[0].name 'other' is not a parameter"),
])
def test_delta_header_refusals(staging, kw, error, words):
    """Each refusal names the field and its limit, with the right status; nothing is staged."""
    tensors = kw.pop("tensors")
    full = kw.pop("full", False)
    s = session(staging, current=3)
    s.image_digest = lambda segments: b"\x02" * 16
    with pytest.raises(error) as e:
        s.header(4, tensors, full, "xxh3_128", **{"delta_base": 3, **kw})
    assert words in str(e.value), str(e.value)
    assert not pushes(staging.directory)


def test_encoded_bytes_belong_to_delta_pushes(staging):
    with pytest.raises(InvalidArgument, match=r"header.tensors\[0\].encoded_bytes is for delta pushes .* got 4"):
        started(staging, tensors=[delta_spec(4)], full=False)


def test_versions_stay_above_the_highest_served_after_a_rollback(staging):
    s = PushSession(staging, served=SERVED, current_version=4, max_bytes=1 << 20, highest_version=5)
    with pytest.raises(FailedPrecondition, match="must be greater than 5, the highest version this replica has served"):
        s.header(5, [NORM], False, "xxh3_128")
    s.header(6, [NORM], False, "xxh3_128")
    s.close()


def test_a_delta_stages_its_entries_and_names_its_base(staging):
    s = session(staging, current=3)
    s.image_digest = lambda segments: b"\x02" * 16
    s.header(4, [delta_spec(5)], False, "xxh3_128", delta_base=3, base_digest=b"\x02" * 16, image_digest=b"\x03" * 16,
             segments=1, stage_only=True, keep_previous=True)
    entry = b"\x02\x03\x01\x00\x02"  # SPARSE, 3 bytes: k=1, gap 0, step +1
    s.chunk(0, entry)
    s.commit(xxhash.xxh3_128(entry).digest())
    staged = s.end()
    assert [(x.name, x.kind, x.offset) for x in staged.sources] == [("norm.weight", "delta", 0)]
    h = staged.header
    assert (h.delta_base, h.base_digest, h.image_digest, h.stage_only, h.keep_previous) == (
        3, b"\x02" * 16, b"\x03" * 16, True, True)


def test_a_refusal_of_a_relayed_push_is_held_until_the_end(staging):
    """A replica not at a delta's base still receives and stages the push (it passes it on to
    the replicas after it); end() then gives its own refusal."""
    s = session(staging, current=3)
    s.header(4, [delta_spec(5)], False, "xxh3_128", delta_base=2, relay=True)
    entry = b"\x02\x03\x01\x00\x02"
    s.chunk(0, entry)
    s.commit(xxhash.xxh3_128(entry).digest())
    assert pathlib.Path(s.path).read_bytes() == entry  # there to be replayed
    with pytest.raises(FailedPrecondition, match="header.delta.version is 2 but this replica serves version 3"):
        s.end()
    s.close()
    assert staging.spare == s.path


def test_the_staged_slot_holds_one_push_until_its_commit(monkeypatch):
    from services.policy import weights as w

    def image(version):
        return w.StagedImage(version, version - 1, f"/p{version}", {}, True, 0, 0, 1, {}, b"", False)

    slot = w.StagedSlot(timeout_s=10)
    assert slot.put(image(4)) is None and slot.version == 4
    dropped = slot.put(image(5))  # a later push replaces it: the caller owns the one dropped
    assert dropped.version == 4 and slot.version == 5
    with pytest.raises(FailedPrecondition, match=r"no push staged for version 4 \(version 5 is staged; a staged push "
                                                 r"is dropped by a later push, by AbortWeights and after "
                                                 r"--stage-timeout-s 10 s\)"):
        slot.take(4)
    assert slot.drop(4) is None and slot.drop(5).version == 5 and slot.version == 0
    with pytest.raises(FailedPrecondition, match="nothing is staged"):
        slot.take(5)
    slot.put(image(6))
    now = w.time.monotonic()
    monkeypatch.setattr(w.time, "monotonic", lambda: now + 11)
    assert slot.expired().version == 6 and slot.version == 0


def test_recycling_the_spare_twice_keeps_it(staging):
    fd, path = staging.create()
    os.close(fd)
    staging.recycle(path)
    staging.recycle(path)
    assert pathlib.Path(path).exists() and staging.spare == path


@pytest.mark.parametrize("plan,words", [
    (dict(addresses=[f"h{i}:1" for i in range(1025)]), "header.relay.addresses holds at most 1024, got 1025"),
    (dict(addresses=["a:1", ""]), "header.relay.addresses[1] must be non-empty and at most 256 bytes, got 0 bytes"),
    (dict(addresses=["x" * 257]), "header.relay.addresses[0] must be non-empty and at most 256 bytes, got 257 bytes"),
    (dict(addresses=["a:1", "b:1", "a:1"]), "header.relay.addresses must not repeat an address"),
    (dict(addresses=["a:1"], fanout=65), "header.relay.fanout must be in [1, 64] (0 means 1), got 65"),
])
def test_relay_plan_refusals(plan, words):
    from services.policy.server import _check_relay

    with pytest.raises(InvalidArgument) as e:
        _check_relay(policy_pb2.RelayPlan(**plan))
    assert words in str(e.value)
    _check_relay(policy_pb2.RelayPlan(addresses=["a:1", "b:1"], fanout=64))  # within the limits
