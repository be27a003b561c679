"""The delta codec (services.ml.delta) and the arithmetic both ends of a push share
(services.policy.wire): every dtype, random tensors and change masks, encode then apply gives
the new tensor bit for bit; the encoder picks the smallest record; a malformed entry is refused
with what is wrong, never applied in part."""
from __future__ import annotations

import math

import pytest
import torch
import xxhash
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from services.ml import delta
from services.policy import wire

DTYPES = [torch.bfloat16, torch.float16, torch.float32, torch.float64]
INT = {torch.bfloat16: torch.int16, torch.float16: torch.int16, torch.float32: torch.int32, torch.float64: torch.int64}


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1).view(INT[t.dtype])


def random_pair(dtype, shape, density, seed, small_steps):
    """(old, new): random bit patterns (NaN, inf and -0.0 included), `density` of them changed,
    by a few ulps (what training does) or to any pattern at all."""
    g = torch.Generator().manual_seed(seed)
    n = math.prod(shape)
    width = torch.finfo(dtype).bits
    low, high = -(1 << (width - 1)), (1 << (width - 1)) - 1
    old_bits = torch.randint(low, high, (n,), generator=g, dtype=torch.int64)
    changed = torch.rand(n, generator=g) < density
    if small_steps:
        step = torch.randint(-3, 4, (n,), generator=g)
        step[step == 0] = 1
        new_bits = old_bits + step
    else:
        new_bits = torch.randint(low, high, (n,), generator=g, dtype=torch.int64)
    new_bits = torch.where(changed, new_bits, old_bits)
    def wrap(b):  # into the signed range of the width (int64 wraps by itself)
        return b if width == 64 else (torch.remainder(b - low, 1 << width) + low).to(INT[dtype])

    return wrap(old_bits).view(dtype).reshape(shape), wrap(new_bits).view(dtype).reshape(shape)


shapes = st.one_of(st.just(()), st.lists(st.integers(0, 40), min_size=1, max_size=3).map(tuple))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(dtype=st.sampled_from(DTYPES), shape=shapes, density=st.sampled_from([0.0, 0.001, 0.02, 0.3, 0.8, 1.0]),
       seed=st.integers(0, 2**31), small=st.booleans(), segments=st.integers(1, 9))
def test_encode_then_apply_is_bit_exact(dtype, shape, density, seed, small, segments):
    old, new = random_pair(dtype, shape, density, seed, small)
    entry, changed = delta.encode_tensor(new, old, segments)
    assert changed == int((bits(new) != bits(old)).sum())
    got, applied = delta.apply_entry(old, entry.numpy().tobytes(), segments)
    assert torch.equal(bits(got), bits(new)) and applied == changed
    assert torch.equal(bits(old), bits(old.clone()))  # the base is never written
    if changed == 0:
        assert delta.unchanged_entry(entry.numpy().tobytes())


@settings(max_examples=100, deadline=None)
@given(dtype=st.sampled_from(DTYPES), n=st.integers(0, 3000), density=st.floats(0.0, 1.0), seed=st.integers(0, 2**31))
def test_the_record_is_the_smallest_kind(dtype, n, density, seed):
    """Each kind's size worked out on its own; the record is the smallest (RAW for float64)."""
    old, new = random_pair(dtype, (n,), density, seed, small_steps=True)
    record, k = delta.encode_segment(new, old)
    if k == 0:
        assert record.tolist() == [wire.UNCHANGED]
        return
    width = torch.finfo(dtype).bits
    raw = n * width // 8
    if width == 64:
        assert record[0] == wire.RAW
        return
    index = (bits(new) != bits(old)).nonzero().squeeze(1).tolist()
    mask = (1 << width) - 1
    steps = [(((int(b) & mask) - (int(a) & mask) + (1 << (width - 1))) % (1 << width)) - (1 << (width - 1))
             for a, b in zip(bits(old)[index].tolist(), bits(new)[index].tolist())]
    steps_size = sum(len(wire.varint((s << 1) ^ (s >> 63))) for s in steps)
    gaps = [index[0]] + [b - a - 1 for a, b in zip(index, index[1:])]
    sizes = {wire.SPARSE: len(wire.varint(k)) + sum(len(wire.varint(g)) for g in gaps) + steps_size,
             wire.BITMAP: math.ceil(n / 8) + steps_size, wire.RAW: raw}
    best = min(sizes.values())
    assert len(record) == 1 + len(wire.varint(best)) + best
    assert sizes[int(record[0])] == best


def test_small_steps_cost_about_a_byte_each():
    """What makes deltas pay: a 1% change of bf16 weights by one ulp costs ~2 bytes per changed
    element (gap + step), against 6 for a 4-byte index and a 2-byte value."""
    old, new = random_pair(torch.bfloat16, (1 << 20,), 0.01, 0, small_steps=True)
    entry, changed = delta.encode_tensor(new, old, 1)
    assert len(entry) <= 1.3 * changed * 2, (len(entry), changed)


@settings(max_examples=200, deadline=None)
@given(values=st.lists(st.integers(0, 2**63 - 1), max_size=50))
def test_varints_match_the_reference(values):
    t = torch.tensor(values, dtype=torch.long)
    encoded = delta.varint_encode(t)
    assert bytes(encoded.tolist()) == b"".join(wire.varint(v) for v in values)
    decoded, used = delta.varint_decode(torch.cat([encoded, torch.tensor([0x80, 0x01], dtype=torch.uint8)]),
                                        len(values))
    assert decoded.tolist() == values and used == len(encoded)


def entry_of(records: list[bytes]) -> bytes:
    return b"".join(records)


def record(kind: int, payload: bytes) -> bytes:
    return bytes((kind,)) + wire.varint(len(payload)) + payload


@pytest.mark.parametrize("entry,words", [
    (b"", "segment 0: the entry ends after 0 bytes"),
    (bytes((7,)), "segment 0: unknown record kind 7"),
    (record(wire.RAW, b"\x00" * 6), "a raw record must hold 8 bytes, got 6"),
    (bytes((wire.RAW,)) + wire.varint(100) + b"\x00" * 8, "a record of 100 bytes runs past the entry's end"),
    (record(wire.SPARSE, wire.varint(5) + b"\x00" * 10), "5 changes in a segment of 4 elements"),
    (record(wire.SPARSE, wire.varint(1) + wire.varint(4) + wire.varint(2)), "a changed index past the segment's 4"),
    (record(wire.SPARSE, wire.varint(2) + wire.varint(0) + wire.varint(0) + wire.varint(2)), "2 varints expected"),
    (record(wire.SPARSE, wire.varint(1) + wire.varint(0) + wire.varint(2) + b"\x00"), "1 bytes left over after 1"),
    (record(wire.BITMAP, b""), "a bitmap record must hold at least 1 bytes, got 0"),
    (record(wire.UNCHANGED, b""), "left over after the last segment's record"),
    (bytes((wire.UNCHANGED, wire.UNCHANGED)), "1 bytes left over after the last segment's record"),
    (record(wire.SPARSE, wire.varint(1) + b"\xff" * 12), "varint"),
])
def test_a_malformed_entry_is_refused_whole(entry, words):
    base = torch.arange(4, dtype=torch.float16)
    before = base.clone()
    with pytest.raises(ValueError, match=words.replace("(", r"\(").replace(")", r"\)")):
        delta.apply_entry(base, entry, 1)
    assert torch.equal(base, before)


def test_float64_takes_raw_records_only():
    base = torch.zeros(3, dtype=torch.float64)
    with pytest.raises(ValueError, match="float64 tensors take raw records only"):
        delta.apply_entry(base, record(wire.SPARSE, wire.varint(1) + wire.varint(0) + wire.varint(2)), 1)


@given(rows=st.integers(0, 100), segments=st.integers(1, 16))
def test_segments_are_torch_chunks(rows, segments):
    """Segment i is what torch.chunk (FSDP2's sharding of dim 0 over `segments` ranks) gives rank i."""
    chunks = torch.arange(rows).chunk(segments) if rows else ()
    got = wire.segment_rows(rows, segments)
    assert len(got) == segments
    for i, (a, b) in enumerate(got):
        want = chunks[i].tolist() if i < len(chunks) else []
        assert list(range(a, b)) == want


def test_the_image_digest_is_over_sorted_names_and_segment_digests():
    t = torch.arange(12, dtype=torch.float32).reshape(6, 2)
    data = t.numpy().tobytes()
    segs = wire.segment_digests(data, (6, 2), 4, 4)  # rows 2, 2, 2, 0
    assert segs == [xxhash.xxh3_128(data[i * 16:(i + 1) * 16]).digest() for i in range(3)] + [
        xxhash.xxh3_128(b"").digest()]
    a = {"b.weight": segs, "a.weight": segs[:1]}
    want = xxhash.xxh3_128(b"a.weight\0" + segs[0] + b"b.weight\0" + b"".join(segs)).digest()
    assert wire.image_digest(a) == want == wire.image_digest(dict(reversed(list(a.items()))))
    assert wire.image_digest({**a, "b.weight": segs[::-1]}) != want


@pytest.mark.parametrize("n,fanout,want", [
    (0, 1, []),
    (4, 1, [("r0", ["r1", "r2", "r3"])]),
    (4, 2, [("r0", ["r2"]), ("r1", ["r3"])]),
    (7, 2, [("r0", ["r2", "r3", "r4"]), ("r1", ["r5", "r6"])]),
    (3, 5, [("r0", []), ("r1", []), ("r2", [])]),
])
def test_relay_children(n, fanout, want):
    assert wire.relay_children([f"r{i}" for i in range(n)], fanout) == want


@given(n=st.integers(0, 60), fanout=st.integers(1, 6))
def test_a_relay_tree_reaches_every_replica_once(n, fanout):
    addresses = [f"r{i}" for i in range(n)]
    seen, todo = [], [(a, plan) for a, plan in wire.relay_children(addresses, fanout)]
    while todo:
        address, plan = todo.pop()
        seen.append(address)
        todo += wire.relay_children(plan, fanout)
    assert sorted(seen) == sorted(addresses)
