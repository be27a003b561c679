"""The push's wire format: the tables both ends share, UpdateWeights chunks encoded and
decoded without protobuf's copies of the payload, and the arithmetic of segments, image
digests and relay trees that a sender and every replica must do alike.

A push is hundreds of megabytes of `WeightsChunk.data`. Through the generated protobuf
classes every chunk is copied three times on each side (into the message, out of it as
`bytes`, and once more to serialize or parse). On a CPU node those copies, not the
socket, bounded a push. So the chunk message, which has two fields, is written and read
here by hand: the sender joins a few header bytes to a view of the tensor (one copy),
and the receiver gets a memoryview into the bytes gRPC handed over (no copy).

Only that one exact shape takes the short way. Anything else (headers, commits, unknown
fields, odd encodings, garbage) goes through protobuf, so the wire format is the proto's
and both paths give the same answer; tests/unit/test_policy_wire.py checks that, and that
the enum numbers below are policy.proto's.

No protobuf import at module level: the receiving side's staging code (weights.py, no
contracts there) takes its element sizes and digests from here.
"""
from __future__ import annotations

import dataclasses
import hashlib
import math
from collections.abc import Mapping, Sequence

import xxhash

# Tensor bytes on the wire: little-endian, C order. Names as torch spells them.
ELEMENT_SIZE = {"float32": 4, "float16": 2, "bfloat16": 2, "float64": 8}
# Push checksums by name. xxh3 is the default: SHA-256 on both ends took a third of a
# push's time on loopback, and the checksum only guards against corruption.
DIGESTS = {"xxh3_128": xxhash.xxh3_128, "sha256": hashlib.sha256}

# policy.proto's enums, by number (written out like the tags below).
DTYPE_NAME = {1: "float32", 2: "float16", 3: "bfloat16", 4: "float64"}  # DType
DTYPE_ENUM = {v: k for k, v in DTYPE_NAME.items()}
DIGEST_NAME = {0: "xxh3_128", 1: "xxh3_128", 2: "sha256"}  # Digest; UNSPECIFIED = the default
DIGEST_ENUM = {"xxh3_128": 1, "sha256": 2}
FINISH_NAME = {0: "", 1: "length", 2: "stop", 3: "eos", 4: "abort"}  # FinishReason
FINISH_ENUM = {v: k for k, v in FINISH_NAME.items() if v}

# Tags: (field number << 3) | wire type. Wire type 0 = varint, 2 = length-delimited.
CHUNK_FIELD = 2 << 3 | 2  # UpdateWeightsRequest.chunk
OFFSET_FIELD = 1 << 3 | 0  # WeightsChunk.offset
DATA_FIELD = 2 << 3 | 2  # WeightsChunk.data
MAX_VARINT_BYTES = 9  # up to 2**63 - 1; longer ones (legal, never sent by us) go to protobuf

# Delta records (policy.proto, DeltaBase): one per segment of a tensor's entry.
UNCHANGED, RAW, SPARSE, BITMAP = 0, 1, 2, 3
DELTA_KINDS = {UNCHANGED: "unchanged", RAW: "raw", SPARSE: "sparse", BITMAP: "bitmap"}
RECORD_OVERHEAD = 11  # kind byte + a varint length of at most 10 bytes
MAX_SEGMENTS = 1 << 16  # WeightsHeader.digest_segments
# RelayPlan limits.
MAX_RELAY_ADDRESSES, MAX_ADDRESS_BYTES, MAX_FANOUT = 1024, 256, 64
# Metadata key of the push token (--push-token-file): pushes need it on top of the bearer token.
PUSH_TOKEN_KEY = "rlhf-push-token"


@dataclasses.dataclass(frozen=True)
class Chunk:
    """A decoded WeightsChunk; `data` is a view into the received message, `raw` the
    message as it came (a relay passes it on as it is)."""
    offset: int
    data: memoryview
    raw: bytes | None = dataclasses.field(default=None, compare=False, repr=False)


def varint(n: int) -> bytes:
    """LEB128 bytes of n >= 0."""
    out = bytearray()
    while n >= 0x80:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _read_varint(buf: bytes, pos: int) -> tuple[int, int] | None:
    """(value, next position), or None when it is truncated or longer than we take."""
    value = shift = 0
    for i in range(pos, min(pos + MAX_VARINT_BYTES, len(buf))):
        byte = buf[i]
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, i + 1
        shift += 7
    return None


def encode_chunk(offset: int, data) -> bytes:
    """The serialized UpdateWeightsRequest{chunk: {offset, data}}; `data` is any bytes-like."""
    head = (bytes((OFFSET_FIELD,)) + varint(offset) if offset else b"") + bytes((DATA_FIELD,)) + varint(len(data))
    return b"".join((bytes((CHUNK_FIELD,)), varint(len(head) + len(data)), head, data))


def _fast_chunk(buf: bytes) -> Chunk | None:
    """The chunk of a message made of one `chunk` field holding offset and data, else None."""
    if not buf or buf[0] != CHUNK_FIELD:
        return None
    length = _read_varint(buf, 1)
    if length is None or length[1] + length[0] != len(buf):
        return None
    pos = length[1]
    offset, data = 0, memoryview(b"")
    while pos < len(buf):
        tag = buf[pos]
        field = _read_varint(buf, pos + 1)
        if field is None:
            return None
        if tag == OFFSET_FIELD:
            offset, pos = field
        elif tag == DATA_FIELD:
            size, start = field
            if start + size > len(buf):
                return None
            data, pos = memoryview(buf)[start:start + size], start + size
        else:
            return None
    return Chunk(offset, data, buf)


def decode_request(buf: bytes):
    """gRPC request deserializer: a Chunk for chunk messages, the protobuf
    UpdateWeightsRequest otherwise. Raises protobuf's DecodeError for bytes that are no
    UpdateWeightsRequest."""
    chunk = _fast_chunk(buf)
    if chunk is not None:
        return chunk
    from rlhf.v1 import policy_pb2  # the slow path only (see the module docstring)

    msg = policy_pb2.UpdateWeightsRequest.FromString(buf)
    if msg.WhichOneof("kind") == "chunk":
        return Chunk(msg.chunk.offset, memoryview(msg.chunk.data))
    return msg


# ---- segments, image digests, relay trees -------------------------------------------------

def segment_rows(rows: int, segments: int) -> list[tuple[int, int]]:
    """The row range of each segment: blocks of ceil(rows / segments) rows, the last ones
    shorter or empty, as torch.chunk (and so FSDP2) cuts dim 0 over `segments` ranks."""
    size = max(1, math.ceil(rows / segments))
    return [(min(i * size, rows), min((i + 1) * size, rows)) for i in range(segments)]


def segment_elements(shape: Sequence[int], segments: int) -> list[tuple[int, int]]:
    """The element range (C order) of each segment of a tensor of `shape`. A 0-d tensor is one
    row of one element."""
    rows = shape[0] if len(shape) else 1
    row = math.prod(shape[1:]) if len(shape) else 1
    return [(a * row, b * row) for a, b in segment_rows(rows, segments)]


def segment_digests(data, shape: Sequence[int], element_size: int, segments: int) -> list[bytes]:
    """XXH3-128 of each segment of a tensor's bytes (C order, served dtype)."""
    view = memoryview(data).cast("B")
    return [xxhash.xxh3_128(view[a * element_size:b * element_size]).digest()
            for a, b in segment_elements(shape, segments)]


def image_digest(digests: Mapping[str, Sequence[bytes]]) -> bytes:
    """The digest of a whole image from each tensor's segment digests (WeightsHeader.image_digest)."""
    h = xxhash.xxh3_128()
    for name in sorted(digests, key=lambda n: n.encode()):
        h.update(name.encode() + b"\0" + b"".join(digests[name]))
    return h.digest()


def relay_children(addresses: Sequence[str], fanout: int) -> list[tuple[str, list[str]]]:
    """(child, the addresses it relays to) of a RelayPlan: the first `fanout` addresses are
    the children, the rest split among them in contiguous blocks, the first ones taking one
    more."""
    fanout = max(1, fanout)
    children, rest = list(addresses[:fanout]), list(addresses[fanout:])
    out, start = [], 0
    for i, child in enumerate(children):
        n = len(rest) // len(children) + (i < len(rest) % len(children))
        out.append((child, rest[start:start + n]))
        start += n
    return out


def read_varint(buf, pos: int) -> tuple[int, int]:
    """(value, next position) of the LEB128 varint at `pos`; ValueError when it runs past
    the end or past 10 bytes."""
    value = shift = 0
    for i in range(pos, min(pos + 10, len(buf))):
        byte = buf[i]
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, i + 1
        shift += 7
    raise ValueError(f"a varint at byte {pos} runs past the end or past 10 bytes")
