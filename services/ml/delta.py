"""Delta pushes in torch: a segment's changed elements encoded on the sender's device, and a
tensor's entry applied to its base on the replica. The format is policy.proto's (DeltaBase);
services.policy.wire holds its constants and the segment arithmetic.

Why torch on both ends: the trainer encodes where its weights live (a GPU), right after the
conversion to the served dtype, so only the encoded bytes cross to the host; the replica's
engine decodes with the same operations on its CPU. Everything is vectorised (varints are
written and read with cumulative sums), never a Python loop per element: a 1% delta of an 8B
model is 80M elements.

Why steps and varints: the replicas serve bf16, and an RL update moves a changed weight by one
or a few units in the last place. A changed bf16 element as (4-byte index, 2-byte value) costs
3x its own bytes; as (gap to the previous change, step in ulps), both LEB128 varints, it costs
about 2 bytes at a 1% change rate.
"""
from __future__ import annotations

import math

import torch

from services.policy.wire import BITMAP, RAW, SPARSE, UNCHANGED, read_varint, segment_elements, varint

# Served dtype -> (integer dtype of the same width, bits)
BITS = {torch.bfloat16: (torch.int16, 16), torch.float16: (torch.int16, 16), torch.float32: (torch.int32, 32),
        torch.float64: (torch.int64, 64)}
MAX_VARINT_LEN = 9  # bytes of a varint below 2**63 (gaps, counts and steps always are)


# ---- varints, vectorised ------------------------------------------------------------------

def varint_lengths(values: torch.Tensor) -> torch.Tensor:
    """Bytes of the LEB128 varint of each value (int64, >= 0)."""
    lengths = torch.ones_like(values)
    longest = len(varint(int(values.max()))) if values.numel() else 1
    for j in range(1, longest):  # RL steps and gaps take one or two bytes: one or two passes
        lengths += values >= (1 << (7 * j))
    return lengths


def varint_encode(values: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
    """The LEB128 varints of `values` (int64, >= 0) one after the other, as uint8: every value's
    bytes laid out in a [n, longest] table, the ones past each value's length masked out."""
    lengths = varint_lengths(values) if lengths is None else lengths
    if values.numel() == 0:
        return torch.empty(0, dtype=torch.uint8, device=values.device)
    longest = int(lengths.max())
    if longest == 1:  # every value below 128, as most steps are: the bytes are the values
        return values.to(torch.uint8)
    j = torch.arange(longest, device=values.device)
    table = (values.unsqueeze(1) >> (7 * j)) & 0x7F | (j < lengths.unsqueeze(1) - 1).long() << 7
    return table[j < lengths.unsqueeze(1)].to(torch.uint8)


def varint_decode(buf: torch.Tensor, count: int) -> tuple[torch.Tensor, int]:
    """The first `count` varints of `buf` (uint8) as int64, and the bytes they took.
    ValueError when `buf` holds fewer, or one longer than MAX_VARINT_LEN bytes."""
    if count == 0:
        return torch.zeros(0, dtype=torch.long, device=buf.device), 0
    head = buf[:count]
    if head.numel() == count and bool((head < 0x80).all()):  # one byte each, as most steps are
        return head.long(), count
    end_at = (buf < 0x80).nonzero().squeeze(1)
    if end_at.numel() < count:
        raise ValueError(f"{count} varints expected, {end_at.numel()} found")
    end_at = end_at[:count]
    starts = torch.cat([end_at.new_zeros(1), end_at[:-1] + 1])
    lengths = end_at - starts + 1
    longest = int(lengths.max())
    if longest > MAX_VARINT_LEN:
        raise ValueError(f"a varint longer than {MAX_VARINT_LEN} bytes")
    values = torch.zeros(count, dtype=torch.long, device=buf.device)
    for j in range(longest):  # byte j of every value at once
        byte = buf[torch.minimum(starts + j, end_at)].long() & 0x7F
        values |= torch.where(j < lengths, byte << (7 * j), 0)
    return values, int(end_at[-1]) + 1


# ---- bits and steps -------------------------------------------------------------------------

def _unsigned(bits: torch.Tensor, width: int) -> torch.Tensor:
    """Integer bit patterns as unsigned values in int64 (64-bit ones stay as they are)."""
    return bits.long() & ((1 << width) - 1) if width < 64 else bits.long()


def _signed(values: torch.Tensor, width: int, dtype: torch.dtype) -> torch.Tensor:
    """Unsigned values (int64, in [0, 2**width)) back to the integer dtype of that width."""
    half = 1 << (width - 1)
    return torch.where(values >= half, values - (1 << width), values).to(dtype)


def steps_of(new_u: torch.Tensor, old_u: torch.Tensor, width: int) -> torch.Tensor:
    """zigzag(new - old), the difference taken modulo 2**width into the signed range."""
    half = 1 << (width - 1)
    d = torch.remainder(new_u - old_u + half, 1 << width) - half
    return (d << 1) ^ (d >> 63)


def apply_steps(old_u: torch.Tensor, steps: torch.Tensor, width: int) -> torch.Tensor:
    d = (steps >> 1) ^ -(steps & 1)
    return torch.remainder(old_u + d, 1 << width)


def _record(kind: int, payload: torch.Tensor) -> torch.Tensor:
    head = torch.tensor(list(bytes((kind,)) + varint(payload.numel())), dtype=torch.uint8)
    return torch.cat([head, payload.cpu()])


# ---- the sender -----------------------------------------------------------------------------

def encode_segment(new: torch.Tensor, old: torch.Tensor | None) -> tuple[torch.Tensor, int]:
    """The record of one segment (uint8, on the CPU) taking `old` to `new` (flat tensors of the
    served dtype, on any device), and how many elements changed. Without `old`: RAW."""
    int_dtype, width = BITS[new.dtype]
    n = new.numel()
    new_bits = new.reshape(-1).view(int_dtype)
    if old is None:
        return _record(RAW, new_bits.view(torch.uint8)), n
    old_bits = old.reshape(-1).view(int_dtype)
    changed = new_bits != old_bits
    k = int(torch.count_nonzero(changed))
    if k == 0:
        return torch.tensor([UNCHANGED], dtype=torch.uint8), 0
    raw_size = n * width // 8
    if width == 64:  # steps of 64-bit patterns do not fit int64 arithmetic: float64 goes raw
        return _record(RAW, new_bits.view(torch.uint8)), k
    index = changed.nonzero().squeeze(1)
    steps = steps_of(_unsigned(new_bits[index], width), _unsigned(old_bits[index], width), width)
    step_lengths = varint_lengths(steps)
    steps_size = int(step_lengths.sum())
    gaps = torch.diff(index, prepend=index.new_full((1,), -1)) - 1
    gap_lengths = varint_lengths(gaps)
    sizes = {SPARSE: len(varint(k)) + int(gap_lengths.sum()) + steps_size, BITMAP: math.ceil(n / 8) + steps_size,
             RAW: raw_size}
    kind = min(sizes, key=lambda c: (sizes[c], c))
    if kind == RAW:
        return _record(RAW, new_bits.view(torch.uint8)), k
    steps_bytes = varint_encode(steps, step_lengths)
    if kind == SPARSE:
        count = torch.tensor(list(varint(k)), dtype=torch.uint8, device=new.device)
        return _record(SPARSE, torch.cat([count, varint_encode(gaps, gap_lengths), steps_bytes])), k
    padded = torch.zeros(math.ceil(n / 8) * 8, dtype=torch.long, device=new.device)
    padded[:n] = changed.long()
    bitmap = (padded.view(-1, 8) << torch.arange(8, device=new.device)).sum(1).to(torch.uint8)
    return _record(BITMAP, torch.cat([bitmap, steps_bytes])), k


def encode_tensor(new: torch.Tensor, old: torch.Tensor | None, segments: int) -> tuple[torch.Tensor, int]:
    """A whole tensor's entry (every segment's record, in order) and its changed elements; the
    entry of a sender that holds the whole tensor."""
    flat_new = new.reshape(-1)
    flat_old = None if old is None else old.reshape(-1)
    records, changed = [], 0
    for a, b in segment_elements(tuple(new.shape), segments):
        record, k = encode_segment(flat_new[a:b], None if flat_old is None else flat_old[a:b])
        records.append(record)
        changed += k
    return torch.cat(records), changed


def unchanged_entry(entry) -> bool:
    """Whether an entry changes nothing (every record UNCHANGED): such tensors are left out."""
    return all(b == UNCHANGED for b in bytes(entry))


# ---- the replica ----------------------------------------------------------------------------

def apply_entry(base: torch.Tensor, entry, segments: int) -> tuple[torch.Tensor, int]:
    """The tensor that `entry` (the bytes of one tensor's delta entry) makes of `base` (the served
    tensor, on the CPU), and how many elements changed. ValueError naming what is wrong when the
    entry does not fit the tensor; `base` is never modified."""
    int_dtype, width = BITS[base.dtype]
    new = base.clone()
    bits = new.reshape(-1).view(int_dtype)
    data = bytes(entry)
    buf = torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else torch.zeros(0, dtype=torch.uint8)
    pos, changed = 0, 0
    for i, (a, b) in enumerate(segment_elements(tuple(base.shape), segments)):
        where = f"segment {i}"
        if pos >= len(data):
            raise ValueError(f"{where}: the entry ends after {len(data)} bytes, before its record")
        kind = data[pos]
        pos += 1
        if kind == UNCHANGED:
            continue
        if kind not in (RAW, SPARSE, BITMAP):
            raise ValueError(f"{where}: unknown record kind {kind}")
        length, pos = read_varint(data, pos)
        if pos + length > len(data):
            raise ValueError(f"{where}: a record of {length} bytes runs past the entry's end")
        payload, pos = buf[pos:pos + length], pos + length
        segment, n = bits[a:b], b - a
        if kind == RAW:
            if length != n * width // 8:
                raise ValueError(f"{where}: a raw record must hold {n * width // 8} bytes, got {length}")
            values = payload.clone().view(int_dtype)
            changed += int(torch.count_nonzero(values != segment))
            segment.copy_(values)
            continue
        if width == 64:
            raise ValueError(f"{where}: float64 tensors take raw records only")
        if kind == SPARSE:
            k, start = read_varint(bytes(payload[:10].tolist()), 0)
            if k > n:
                raise ValueError(f"{where}: {k} changes in a segment of {n} elements")
            gaps, used = varint_decode(payload[start:], k)
            index = torch.cumsum(gaps + 1, 0) - 1
            start += used
            if k and (int(gaps.min()) < 0 or int(index[-1]) >= n):
                raise ValueError(f"{where}: a changed index past the segment's {n} elements")
        else:
            width_bytes = math.ceil(n / 8)
            if length < width_bytes:
                raise ValueError(f"{where}: a bitmap record must hold at least {width_bytes} bytes, got {length}")
            flags = (payload[:width_bytes].long().unsqueeze(1) >> torch.arange(8)) & 1
            index = flags.reshape(-1)[:n].nonzero().squeeze(1)
            k, start = index.numel(), width_bytes
        steps, used = varint_decode(payload[start:], k)
        if start + used != length:
            raise ValueError(f"{where}: {length - start - used} bytes left over after {k} steps")
        segment[index] = _signed(apply_steps(_unsigned(segment[index], width), steps, width), width, int_dtype)
        changed += k
    if pos != len(data):
        raise ValueError(f"{len(data) - pos} bytes left over after the last segment's record")
    return new, changed
