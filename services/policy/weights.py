"""Receiving a weight push: check it against the served model, stage its bytes, verify.

No torch, no gRPC. The bytes go straight to a staging file as they arrive, so the server
holds at most one extra copy of the model (in the page cache of a disk file, not on the
heap), and the vLLM worker reads them back one tensor at a time. Nothing here touches the
served weights: a push that fails any check is discarded and the model never sees it.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import pathlib
import struct
import tempfile
import threading

import xxhash

from services.common.errors import FailedPrecondition, InvalidArgument, ResourceExhausted

# Wire dtypes: little-endian, C order. Names as torch spells them.
ELEMENT_SIZE = {"float32": 4, "float16": 2, "bfloat16": 2, "float64": 8}
# safetensors header dtype -> our name
SAFETENSORS_DTYPE = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64"}
# Push checksums (the proto's Digest), by name. xxh3 is the default: SHA-256 on both ends
# took a third of a push's time on loopback, and the checksum only guards against corruption.
DIGESTS = {"xxh3_128": xxhash.xxh3_128, "sha256": hashlib.sha256}


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str
    shape: tuple[int, ...]
    nbytes: int


@dataclasses.dataclass(frozen=True)
class TensorSource:
    """Where the worker reads one tensor: a safetensors file of the model directory
    (kind "safetensors") or a byte range of a staged push (kind "raw")."""
    name: str
    kind: str
    path: str
    offset: int
    dtype: str
    shape: tuple[int, ...]


def checkpoint_tensors(model_dir: str | os.PathLike, dtype: str) -> tuple[dict[str, TensorSpec], dict[str, TensorSource]]:
    """The parameters a push may name (Hugging Face checkpoint names, shapes from the
    safetensors headers, `dtype` = the served dtype) and where each is read from now.

    A tied lm_head is not a parameter of its own: the checkpoint stores only the input
    embedding and pushing that updates both (see engine.WeightLoader)."""
    model_dir = pathlib.Path(model_dir)
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise FailedPrecondition(f"--model {model_dir} holds no *.safetensors files")
    config = json.loads((model_dir / "config.json").read_text())
    tied = bool(config.get("tie_word_embeddings", config.get("text_config", {}).get("tie_word_embeddings", False)))
    specs: dict[str, TensorSpec] = {}
    sources: dict[str, TensorSource] = {}
    for path in files:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
        for name, entry in header.items():
            if name == "__metadata__" or (tied and name == "lm_head.weight"):
                continue
            shape = tuple(int(d) for d in entry["shape"])
            specs[name] = TensorSpec(name, dtype, shape, math.prod(shape) * ELEMENT_SIZE[dtype])
            src_dtype = SAFETENSORS_DTYPE.get(entry["dtype"], entry["dtype"])
            sources[name] = TensorSource(name, "safetensors", str(path), 0, src_dtype, shape)
    return specs, sources


@dataclasses.dataclass
class StagedWeights:
    """A complete, verified push waiting to be applied."""
    version: int
    full: bool
    path: str
    sources: list[TensorSource]
    nbytes: int
    transfer_seconds: float = 0.0


def check_header(version: int, tensors: list[TensorSpec], full: bool, *, served: dict[str, TensorSpec],
                 current_version: int, max_bytes: int) -> int:
    """Everything that can be checked before a byte arrives; returns the total byte count."""
    if version <= current_version:
        raise FailedPrecondition(f"header.version must be greater than the served version {current_version}, got {version}")
    if not tensors:
        raise InvalidArgument("header.tensors must name at least one tensor")
    seen: set[str] = set()
    total = 0
    for i, t in enumerate(tensors):
        field = f"header.tensors[{i}]"
        if t.name in seen:
            raise InvalidArgument(f"{field}.name {t.name!r} appears twice; names must be unique")
        seen.add(t.name)
        if t.dtype not in ELEMENT_SIZE:
            raise InvalidArgument(f"{field}.dtype must be one of {sorted(ELEMENT_SIZE)}, got {t.dtype!r}")
        if any(d < 0 for d in t.shape):
            raise InvalidArgument(f"{field}.shape must not be negative, got {list(t.shape)}")
        want_bytes = math.prod(t.shape) * ELEMENT_SIZE[t.dtype]
        if t.nbytes != want_bytes:
            raise InvalidArgument(f"{field}.nbytes must be product(shape) * element size = {want_bytes}, got {t.nbytes}")
        model = served.get(t.name)
        if model is None:
            raise FailedPrecondition(f"{field}.name {t.name!r} is not a parameter of the served model "
                                     f"(GetModelInfo lists the {len(served)} it accepts)")
        if tuple(t.shape) != model.shape:
            raise FailedPrecondition(f"{field}.shape of {t.name!r} must be {list(model.shape)}, got {list(t.shape)}")
        if t.dtype != model.dtype:
            raise FailedPrecondition(f"{field}.dtype of {t.name!r} must be the served dtype {model.dtype}, got {t.dtype}")
        total += t.nbytes
    if full:
        missing = sorted(set(served) - seen)
        if missing:
            more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
            raise FailedPrecondition(f"header.full is set but header.tensors misses {len(missing)} parameters: "
                                     f"{', '.join(missing[:3])}{more}")
    if total > max_bytes:
        raise ResourceExhausted(f"header.tensors total {total} bytes, above the server's --max-push-bytes {max_bytes}")
    return total


def _open_existing(path: str) -> int | None:
    try:
        return os.open(path, os.O_WRONLY)
    except FileNotFoundError:
        return None


class WeightStage:
    """One push being received. Chunks are written to a file and hashed as they come."""

    def __init__(self, version: int, tensors: list[TensorSpec], full: bool, *, served: dict[str, TensorSpec],
                 current_version: int, max_bytes: int, directory: str | None = None, digest: str = "xxh3_128",
                 reuse: str | None = None):
        if digest not in DIGESTS:
            raise InvalidArgument(f"header.digest must be one of {sorted(DIGESTS)}, got {digest!r}")
        self.total = check_header(version, tensors, full, served=served, current_version=current_version,
                                  max_bytes=max_bytes)
        self.version, self.tensors, self.full = version, list(tensors), full
        self.received = 0
        self.digest_name = digest
        self._hash = DIGESTS[digest]()
        # `reuse`: an earlier push's file no longer in use. Overwriting pages the kernel
        # already holds costs less than half of allocating new ones (0.02 s against 0.05 s
        # per 345 MB), and the push stream is CPU-bound.
        fd = _open_existing(reuse) if reuse else None
        if fd is None:
            fd, self.path = tempfile.mkstemp(prefix="rlhf-push-", suffix=".bin", dir=directory)
        else:
            self.path = reuse
        self._file = os.fdopen(fd, "wb", buffering=0)
        # Writes run in a worker thread. close() takes this lock so that a write still in
        # flight when a push is abandoned finishes before the file can be handed to the next.
        self._lock = threading.Lock()

    def write(self, offset: int, data: bytes | memoryview) -> None:
        if offset != self.received:
            raise InvalidArgument(f"chunk.offset must equal the bytes received so far ({self.received}), got {offset}")
        if self.received + len(data) > self.total:
            raise InvalidArgument(f"chunk at offset {offset} with {len(data)} bytes runs past the "
                                  f"{self.total} bytes the header announced")
        with self._lock:
            if self._file.closed:
                raise InvalidArgument("this push was abandoned")
            self._file.write(data)
        self._hash.update(data)
        self.received += len(data)

    def commit(self, digest: bytes) -> StagedWeights:
        if self.received != self.total:
            raise InvalidArgument(f"commit after {self.received} of the {self.total} bytes the header announced")
        want = self._hash.digest()
        if len(digest) != len(want):
            raise InvalidArgument(f"commit.digest must be {len(want)} bytes for {self.digest_name}, got {len(digest)}")
        if digest != want:
            raise InvalidArgument(f"commit.digest {digest.hex()[:16]}... does not match the {self.digest_name} of "
                                  f"the received bytes ({want.hex()[:16]}...)")
        with self._lock:
            self._file.truncate(self.total)  # a reused file may have been longer
            self._file.close()
        sources, offset = [], 0
        for t in self.tensors:
            sources.append(TensorSource(t.name, "raw", self.path, offset, t.dtype, tuple(t.shape)))
            offset += t.nbytes
        return StagedWeights(self.version, self.full, self.path, sources, self.total)

    def close(self) -> None:
        """Stop writing (a push that failed); the file stays for the caller to reuse or delete."""
        with self._lock:
            if not self._file.closed:
                self._file.close()

    def discard(self) -> None:
        self.close()
        pathlib.Path(self.path).unlink(missing_ok=True)
