"""services.policy.wire: the hand-written chunk codec reads and writes what protobuf does,
and the enum tables are policy.proto's."""
from __future__ import annotations

import pytest
from google.protobuf.message import DecodeError
from hypothesis import given, settings
from hypothesis import strategies as st

from rlhf.v1 import policy_pb2
from services.policy.wire import (CHUNK_FIELD, DATA_FIELD, DIGEST_ENUM, DIGEST_NAME, DIGESTS, DTYPE_ENUM, DTYPE_NAME,
                                  ELEMENT_SIZE, FINISH_ENUM, FINISH_NAME, OFFSET_FIELD, Chunk, varint, decode_request,
                                  encode_chunk)

Request = policy_pb2.UpdateWeightsRequest


def test_enum_tables_are_the_protos():
    def names(enum, prefix):
        return {v.number: v.name.removeprefix(prefix).lower() for v in enum.DESCRIPTOR.values if v.number}

    assert DTYPE_NAME == names(policy_pb2.DType, "DTYPE_") and set(DTYPE_ENUM) == set(ELEMENT_SIZE)
    assert {k: v for k, v in DIGEST_NAME.items() if k} == names(policy_pb2.Digest, "DIGEST_")
    assert DIGEST_NAME[policy_pb2.DIGEST_UNSPECIFIED] == "xxh3_128" and set(DIGEST_ENUM) == set(DIGESTS)
    assert {k: v for k, v in FINISH_NAME.items() if k} == names(policy_pb2.FinishReason, "FINISH_REASON_")
    assert all(DTYPE_NAME[DTYPE_ENUM[n]] == n for n in DTYPE_ENUM)
    assert all(FINISH_NAME[FINISH_ENUM[n]] == n for n in FINISH_ENUM)


def chunk_request(offset: int, data: bytes) -> Request:
    return Request(chunk=policy_pb2.WeightsChunk(offset=offset, data=data))


@pytest.mark.parametrize("offset, size", [(0, 0), (0, 5), (1, 1), (127, 128), (128, 300), (2**40 + 3, 1 << 20)])
def test_encode_chunk_is_the_protobuf_message(offset, size):
    data = bytes(range(256)) * (size // 256) + bytes(size % 256)
    wire = encode_chunk(offset, memoryview(data))
    assert Request.FromString(wire) == chunk_request(offset, data)
    if size:  # protobuf leaves out an empty data field; otherwise the bytes are the same
        assert wire == chunk_request(offset, data).SerializeToString()


def test_decode_gives_a_view_into_the_received_bytes():
    received = chunk_request(1 << 20, b"\x01\x02" * 1000).SerializeToString()
    chunk = decode_request(received)
    assert isinstance(chunk, Chunk) and chunk.offset == 1 << 20 and bytes(chunk.data) == b"\x01\x02" * 1000
    assert chunk.data.obj is received  # no copy of the payload


def test_headers_and_commits_stay_protobuf_messages():
    header = Request(header=policy_pb2.WeightsHeader(version=3, full=True, tensors=[
        policy_pb2.TensorSpec(name="w", dtype=policy_pb2.DTYPE_FLOAT32, shape=[2], nbytes=8)]))
    commit = Request(commit=policy_pb2.WeightsCommit(digest=b"\x00" * 16))
    for msg in (header, commit, Request()):
        assert decode_request(msg.SerializeToString()) == msg


def assert_agrees_with_protobuf(buf: bytes) -> None:
    try:
        want = Request.FromString(buf)
    except DecodeError:
        with pytest.raises(DecodeError):
            decode_request(buf)
        return
    got = decode_request(buf)
    if want.WhichOneof("kind") == "chunk":
        assert isinstance(got, Chunk), buf
        assert (got.offset, bytes(got.data)) == (want.chunk.offset, want.chunk.data), buf
    else:
        assert got == want, buf


def _field():
    """Fields of a WeightsChunk as they may come: offsets of any size (up to 10-byte
    varints), data, and other bytes (unknown fields, wrong wire types, junk)."""
    offset = st.integers(0, 2**64 - 1).map(lambda n: bytes((OFFSET_FIELD,)) + varint(n))
    data = st.binary(max_size=40).map(lambda d: bytes((DATA_FIELD,)) + varint(len(d)) + d)
    return st.one_of(offset, data, st.binary(min_size=1, max_size=6))


def _mangled(buf: bytes):
    """buf with one byte flipped, cut short, or with bytes appended."""
    if not buf:
        return st.binary(max_size=8)
    return st.one_of(
        st.tuples(st.integers(0, len(buf) - 1), st.integers(1, 255)).map(
            lambda t: buf[:t[0]] + bytes((buf[t[0]] ^ t[1],)) + buf[t[0] + 1:]),
        st.integers(0, len(buf) - 1).map(lambda n: buf[:n]),
        st.binary(min_size=1, max_size=8).map(lambda extra: buf + extra))


_inner = st.lists(_field(), max_size=4).map(b"".join)
_chunks = _inner.map(lambda inner: bytes((CHUNK_FIELD,)) + varint(len(inner)) + inner)


@settings(max_examples=1500, deadline=None)
@given(st.one_of(_chunks, _chunks.flatmap(_mangled), st.binary(max_size=48)))
def test_decode_agrees_with_protobuf_on_any_bytes(buf):
    assert_agrees_with_protobuf(buf)


@settings(max_examples=300, deadline=None)
@given(st.integers(0, 2**63), st.binary(max_size=300))
def test_round_trip(offset, data):
    chunk = decode_request(encode_chunk(offset, data))
    assert (chunk.offset, bytes(chunk.data)) == (offset, data)
