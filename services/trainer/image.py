"""What the policy replicas serve, as the trainer last pushed it: each rank's own shard of every
policy parameter, in the served dtype, on its device.

A push converts each rank's shard of the new weights to the served dtype where it lives (the
GPU), compares the bits with the image there, and encodes only the elements that changed
(services.ml.delta): the encoded records, a few percent of the shard at RL learning rates, are
all that crosses to the host and to rank 0, which sends them. Nothing is gathered whole on
every rank. A replica that needs the whole image (a fresh or restarted one, one that refused a
delta) gets it gathered to rank 0 one parameter at a time, still in the served dtype.

The image digest (WeightsHeader.image_digest) is computed the same way on both ends: each
tensor is cut into world_size segments along its first dimension, exactly FSDP2's shards, so
each rank hashes its own shard and rank 0 combines the digests.
"""
from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Iterator

import torch
import torch.distributed as dist
import xxhash
from torch.distributed.tensor import DTensor, Shard

from services.ml.delta import encode_segment
from services.policy.wire import image_digest, segment_rows
from services.trainer import distributed, lora
from services.trainer.distributed import Dist

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}


@dataclasses.dataclass
class Delta:
    """A push's payload as rank 0 sends it: the entry of each tensor that changed."""
    version: int  # the version the delta makes
    base_version: int
    base_digest: bytes
    image_digest: bytes
    entries: dict[str, bytes]  # name -> encoded entry, tensors with a change only
    shapes: dict[str, tuple[int, ...]]
    changed: int  # elements whose served bits changed
    elements: int  # elements of the whole image
    encode_seconds: float  # the slowest rank's: conversion, comparison, encoding
    gather_seconds: float  # the records to rank 0

    @property
    def payload_bytes(self) -> int:
        return sum(len(e) for e in self.entries.values())


class ServedImage:
    """The trainer's copy of the served image. Every method is a collective: every rank calls
    it, in the same order."""

    def __init__(self, model: torch.nn.Module, d: Dist, dtype: str, scale: float = 1.0):
        if dtype not in DTYPES:
            raise ValueError(f"the policy replicas serve {dtype!r}; pushes support {sorted(DTYPES)}")
        self.model, self.d, self.dtype_name = model, d, dtype
        self.dtype = DTYPES[dtype]
        self.scale = scale  # services.push_scale: tests only
        self.segments = d.world_size
        # (served name, global shape, this rank's part of it): a LoRA policy's are base + adapter merged
        self.sources = (lora.served_tensors(model) if lora.is_lora(model)
                        else [(name, tuple(p.shape), lambda p=p: p) for name, p in model.named_parameters()])
        self.shapes = {name: shape for name, shape, _ in self.sources}
        self.shards: dict[str, torch.Tensor] = {}
        self._mine: dict[str, bytes] = {}  # this rank's segment digest of each tensor
        self.version = 0  # the version the image is, 0 = none yet
        self.digest = b""  # rank 0: the image digest
        self.elements = sum(math.prod(s) for s in self.shapes.values())

    # ---- this rank's shard ------------------------------------------------------------------

    def _served(self, name: str, p: torch.Tensor) -> torch.Tensor:
        """This rank's shard of `p` in the served dtype, on its device, a tensor of its own."""
        local = p.detach()
        rows = self.shapes[name][0] if self.shapes[name] else 1
        a, b = segment_rows(rows, self.segments)[self.d.rank]
        if isinstance(p, DTensor):
            if tuple(p.placements) != (Shard(0),):
                raise ValueError(f"{name}: pushes expect FSDP2's Shard(0) placement, got {p.placements}")
            local = p.to_local()
        elif self.segments > 1 and local.dim() and local.shape[0] == rows:
            local = local[a:b]  # a whole tensor (a merged Conv1D-style LoRA weight): this rank's rows
        if self.segments > 1 and local.dim():
            if local.shape[0] != b - a:
                raise ValueError(f"{name}: rank {self.d.rank} holds {local.shape[0]} rows, segment {self.d.rank} of "
                                 f"{self.segments} is rows [{a}, {b})")
        if self.scale != 1.0:
            local = local * self.scale
        return local.to(self.dtype, copy=True).contiguous()

    @staticmethod
    def _hash(t: torch.Tensor) -> bytes:
        return xxhash.xxh3_128(t.reshape(-1).view(torch.uint8).cpu().numpy()).digest()

    # ---- collectives ------------------------------------------------------------------------

    @torch.no_grad()
    def snapshot(self, version: int) -> None:
        """Take the model's current weights as the image of `version` (no delta)."""
        self.shards = {name: self._served(name, part()) for name, _, part in self.sources}
        self._mine = {name: self._hash(t) for name, t in self.shards.items()}
        self._finish(version)

    def _finish(self, version: int) -> None:
        mine = list(self._mine.items())
        parts = [mine] if self.d.world_size == 1 else _gather_to_main(mine, self.d)
        if self.d.main:
            digests = {name: [dict(part)[name] for part in parts] for name in self.shapes}
            self.digest = image_digest(digests)
        self.version = version

    @torch.no_grad()
    def advance(self, version: int) -> Delta | None:
        """Move the image to the model's current weights as `version`; rank 0 gets the delta from
        the previous image (None elsewhere)."""
        if not self.version:
            raise RuntimeError("advance() needs an image to compare with: snapshot() first")
        t0 = time.perf_counter()
        records, changed = [], 0
        for name, _, part in self.sources:
            new = self._served(name, part())
            record, k = encode_segment(new, self.shards[name])
            if k:
                self.shards[name] = new
                self._mine[name] = self._hash(new)
            records.append((name, record.numpy().tobytes(), k))
            changed += k
        encode_seconds = time.perf_counter() - t0
        t1 = time.perf_counter()
        parts = [(records, encode_seconds)] if self.d.world_size == 1 else _gather_to_main((records, encode_seconds),
                                                                                             self.d)
        gather_seconds = time.perf_counter() - t1
        base_version, base_digest = self.version, self.digest
        self._finish(version)
        if not self.d.main:
            return None
        entries = {}
        for i, (name, _, _) in enumerate(parts[0][0]):
            if any(part[0][i][2] for part in parts):
                entries[name] = b"".join(part[0][i][1] for part in parts)
        return Delta(version, base_version, base_digest, self.digest, entries, self.shapes,
                     sum(k for part in parts for _, _, k in part[0]), self.elements,
                     max(part[1] for part in parts), gather_seconds)

    def full(self) -> Iterator[tuple[str, torch.Tensor | None]]:
        """(name, the whole tensor in the served dtype on rank 0's CPU | None elsewhere), one
        parameter at a time, gathered from every rank's shard of the image. Every rank must run
        it to the end."""
        for name, shard in self.shards.items():
            if self.d.world_size == 1:
                yield name, shard.cpu()
                continue
            rows = self.shapes[name][0]
            size = segment_rows(rows, self.segments)[0][1]  # the largest segment's rows
            padded = shard.new_zeros((size, *shard.shape[1:]))
            padded[:shard.shape[0]] = shard
            parts = [torch.empty_like(padded) for _ in range(self.d.world_size)] if self.d.main else None
            dist.gather(padded, parts, dst=0)
            yield name, (torch.cat(parts)[:rows].cpu() if self.d.main else None)
            del padded, parts


def _gather_to_main(obj, d: Dist) -> list:
    """Every rank's `obj` on rank 0 (a list in rank order), nothing on the others."""
    out = [None] * d.world_size if d.main else None
    dist.gather_object(obj, out, dst=0)
    return out


def served_dtype(dtype: str, d: Dist) -> str:
    """The replicas' dtype (rank 0 knows it from GetModelInfo) on every rank."""
    return distributed.broadcast_object(dtype, d)
