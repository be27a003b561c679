"""Receiving a weight push: the protocol (header, chunks, commit) as one session object,
checked against the served model, its bytes staged on disk and verified; and the life of a
staged push after that (StagedSlot: staged, then committed, aborted or expired).

No torch, no gRPC. The bytes go straight to a staging file as they arrive, so the server
holds at most one extra copy of the model (in the page cache of a disk file, not on the
heap), and the vLLM worker reads them back one tensor at a time. Nothing here touches the
served weights: a push that fails any check is discarded and the model never sees it.

The session knows nothing of what the payload means (a tensor's bytes or a delta entry):
the engine turns a staged payload into an image. So the same session, slot and commit
serve any kind of push a later version of the contract adds (an adapter, say).
"""
from __future__ import annotations

import dataclasses
import errno
import fcntl
import json
import math
import os
import pathlib
import struct
import tempfile
import threading
import time
from collections.abc import Callable

from services.common.errors import FailedPrecondition, InvalidArgument, ResourceExhausted
from services.policy.wire import DIGESTS, ELEMENT_SIZE, MAX_SEGMENTS, RECORD_OVERHEAD

# safetensors header dtype -> our name
SAFETENSORS_DTYPE = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64"}
MAX_VERSION = 2**63 - 1  # the largest version every client (int64 in most languages) can hold
FILE_PREFIX = "rlhf-push-"  # + owner + "-" + random + ".bin"
LOCK_PREFIX = "rlhf-staging-"  # + owner + ".lock"
DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str
    shape: tuple[int, ...]
    nbytes: int
    encoded_bytes: int = 0  # a delta push's entry; 0 in a raw push

    @property
    def payload(self) -> int:
        """Bytes of this tensor in the push's payload."""
        return self.encoded_bytes or self.nbytes


@dataclasses.dataclass(frozen=True)
class PushHeader:
    """A WeightsHeader, checked (check_header)."""
    version: int
    tensors: list[TensorSpec]
    full: bool
    digest: str = "xxh3_128"
    delta_base: int | None = None  # a delta: the version it applies to
    base_digest: bytes = b""  # a delta: the image digest of its base as the sender has it
    image_digest: bytes = b""  # the image digest after the push; b"": not checked
    segments: int = 1
    stage_only: bool = False  # applied only by a commit naming its version
    keep_previous: bool = False  # keep the image served before, for a rollback

    @property
    def delta(self) -> bool:
        return self.delta_base is not None


@dataclasses.dataclass(frozen=True)
class TensorSource:
    """Where one tensor is: a safetensors file of the model directory (kind "safetensors"),
    a byte range of a staged push holding its bytes (kind "raw", what the worker reads), or
    a delta entry in a staged push (kind "delta", until the engine turns it into "raw")."""
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
    embedding and pushing that updates both (see worker.WeightLoader)."""
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
    """A complete, verified push waiting to be applied. `sources` says where each tensor's
    payload is in the file: its bytes (a raw push) or its delta entry (header.delta)."""
    version: int
    full: bool
    path: str
    sources: list[TensorSource]
    nbytes: int
    transfer_seconds: float = 0.0
    header: PushHeader | None = None


def check_header(version: int, tensors: list[TensorSpec], full: bool, *, served: dict[str, TensorSpec],
                 current_version: int, max_bytes: int, header: PushHeader | None = None,
                 image_digest: Callable[[int], bytes] | None = None, highest_version: int = 0) -> int:
    """Everything that can be checked before a byte arrives; returns the payload's byte count.
    The form of the header first (INVALID_ARGUMENT, RESOURCE_EXHAUSTED), then whether it fits
    this replica's model and version (FAILED_PRECONDITION). `image_digest(segments)` gives the
    served image's digest, for a delta's base; `highest_version` is the highest ever served
    (above the served one after a rollback)."""
    h = header or PushHeader(version, tensors, full)
    if version > MAX_VERSION:
        raise InvalidArgument(f"header.version must be at most 2^63 - 1 = {MAX_VERSION}, got {version}")
    if not tensors:
        raise InvalidArgument("header.tensors must name at least one tensor")
    if not 1 <= h.segments <= MAX_SEGMENTS:
        raise InvalidArgument(f"header.digest_segments must be in [1, {MAX_SEGMENTS}], got {h.segments}")
    for field, value in (("header.image_digest", h.image_digest), ("header.delta.image_digest", h.base_digest)):
        if value and len(value) != 16:
            raise InvalidArgument(f"{field} must be empty or 16 bytes (XXH3-128), got {len(value)} bytes")
    if h.delta and full:
        raise InvalidArgument("header.full must be false in a delta push (header.delta set): a delta lists "
                              "only the tensors that changed")
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
        if h.delta:
            most = t.nbytes + RECORD_OVERHEAD * h.segments
            if not h.segments <= t.encoded_bytes <= most:
                raise InvalidArgument(f"{field}.encoded_bytes must be in [digest_segments, nbytes + "
                                      f"{RECORD_OVERHEAD} x digest_segments] = [{h.segments}, {most}], "
                                      f"got {t.encoded_bytes}")
        elif t.encoded_bytes:
            raise InvalidArgument(f"{field}.encoded_bytes is for delta pushes (header.delta); must be 0 here, "
                                  f"got {t.encoded_bytes}")
        total += t.payload
    if total > max_bytes:
        raise ResourceExhausted(f"header.tensors total {total} bytes, above the server's --max-push-bytes {max_bytes}")
    if version <= current_version:
        raise FailedPrecondition(f"header.version must be greater than the served version {current_version}, got {version}")
    if version <= highest_version:
        raise FailedPrecondition(f"header.version must be greater than {highest_version}, the highest version this "
                                 f"replica has served (versions only go up, across a rollback too), got {version}")
    if h.delta and h.delta_base != current_version:
        raise FailedPrecondition(f"header.delta.version is {h.delta_base} but this replica serves version "
                                 f"{current_version}: a delta applies only to the version it was made against; "
                                 f"send a full push")
    for i, t in enumerate(tensors):
        field = f"header.tensors[{i}]"
        model = served.get(t.name)
        if model is None:
            raise FailedPrecondition(f"{field}.name {t.name!r} is not a parameter of the served model "
                                     f"(GetModelInfo lists the {len(served)} it accepts)")
        if tuple(t.shape) != model.shape:
            raise FailedPrecondition(f"{field}.shape of {t.name!r} must be {list(model.shape)}, got {list(t.shape)}")
        if t.dtype != model.dtype:
            raise FailedPrecondition(f"{field}.dtype of {t.name!r} must be the served dtype {model.dtype}, got {t.dtype}")
    if full:
        missing = sorted(set(served) - seen)
        if missing:
            more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
            raise FailedPrecondition(f"header.full is set but header.tensors misses {len(missing)} parameters: "
                                     f"{', '.join(missing[:3])}{more}")
    if h.delta and h.base_digest and image_digest is not None:
        have = image_digest(h.segments)
        if have != h.base_digest:
            raise FailedPrecondition(f"header.delta.image_digest {h.base_digest.hex()[:16]}... is not the digest of "
                                     f"this replica's image at version {current_version} ({have.hex()[:16]}...): "
                                     f"its weights are not the delta's base; send a full push")
    return total


class StagingDir:
    """Where one server stages its pushes; other servers may share the directory (the
    temp dir by default).

    A server's files carry its owner id, and it holds an flock on its lock file for as long
    as it lives. At start it removes the files of owners whose lock it can take: servers
    that died without cleaning up (SIGKILL, OOM), whose files are each model-sized. It
    keeps at most one spare file: overwriting pages the kernel already holds costs less
    than half of allocating new ones (0.02 s against 0.05 s per 345 MB)."""

    def __init__(self, directory: str | os.PathLike | None, owner: str):
        self.directory = pathlib.Path(directory or tempfile.gettempdir())
        self.owner = owner  # no "-" in it: file names are split on the first one
        self.spare: str | None = None
        self._lock_fd: int | None = None

    def open(self) -> list[str]:
        """Take this server's lock; returns the dead servers' files it removed."""
        removed = self._remove_dead()
        fd, tmp = tempfile.mkstemp(prefix=f".{LOCK_PREFIX}", dir=self.directory)
        fcntl.flock(fd, fcntl.LOCK_EX)
        # Locked before it gets its name: a server starting meanwhile never sees it unlocked.
        os.rename(tmp, self._lock_path(self.owner))
        self._lock_fd = fd
        return removed

    def _lock_path(self, owner: str) -> pathlib.Path:
        return self.directory / f"{LOCK_PREFIX}{owner}.lock"

    def _files(self, owner: str) -> list[pathlib.Path]:
        return list(self.directory.glob(f"{FILE_PREFIX}{owner}-*.bin"))

    def _remove_dead(self) -> list[str]:
        owners = {p.name[len(FILE_PREFIX):].split("-", 1)[0] for p in self._files("*")}
        owners |= {p.name[len(LOCK_PREFIX):-len(".lock")] for p in self.directory.glob(f"{LOCK_PREFIX}*.lock")}
        removed = []
        for owner in sorted(owners - {self.owner}):
            try:
                fd = os.open(self._lock_path(owner), os.O_RDWR)
            except FileNotFoundError:
                fd = None  # files without a lock: their server is gone
            except OSError:
                continue  # not ours to judge (another user's)
            try:
                if fd is not None:
                    try:
                        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    except BlockingIOError:
                        continue  # alive
                for path in self._files(owner):
                    path.unlink(missing_ok=True)
                    removed.append(str(path))
                if fd is not None:
                    self._lock_path(owner).unlink(missing_ok=True)
            finally:
                if fd is not None:
                    os.close(fd)
        return removed

    def create(self) -> tuple[int, str]:
        """(writable fd, path) of a file for the next push: the spare, or a new one."""
        spare, self.spare = self.spare, None
        if spare is not None:
            try:
                return os.open(spare, os.O_WRONLY), spare
            except FileNotFoundError:
                pass
        return tempfile.mkstemp(prefix=f"{FILE_PREFIX}{self.owner}-", suffix=".bin", dir=self.directory)

    def recycle(self, path: str) -> None:
        """A file no longer needed: the spare, or deleted when there is one already."""
        if path == self.spare:
            return
        if self.spare is None:
            self.spare = path
        else:
            pathlib.Path(path).unlink(missing_ok=True)

    def close(self) -> None:
        """Remove every file of this server, then its lock."""
        for path in self._files(self.owner):
            path.unlink(missing_ok=True)
        self.spare = None
        if self._lock_fd is not None:
            self._lock_path(self.owner).unlink(missing_ok=True)
            os.close(self._lock_fd)
            self._lock_fd = None


class PushSession:
    """One UpdateWeights stream, message by message: a header, chunks in order, a commit,
    then the end of the stream.

    The header is checked against the served model before a byte is staged; chunks are
    written and hashed as they come; the commit must match; nothing may follow it. Only a
    session that saw all of that gives StagedWeights (end()). Every other ends in close(),
    which hands its file back to the staging directory. chunk() and commit() may run in
    a worker thread; close() waits for a write still in flight."""

    def __init__(self, staging: StagingDir, *, served: dict[str, TensorSpec], current_version: int,
                 max_bytes: int, image_digest: Callable[[int], bytes] | None = None, highest_version: int = 0):
        self.staging, self.served = staging, served
        self.current_version, self.max_bytes = current_version, max_bytes
        self.highest_version = highest_version
        self.image_digest = image_digest
        self.total = self.received = 0
        self.path: str | None = None
        self.refusal: FailedPrecondition | None = None  # relay only: this replica refused, passes it on
        self._file = None
        self._hash = None
        self._staged: StagedWeights | None = None
        self._owns_file = False  # from create() until end() hands it over or a full disk deletes it
        self._lock = threading.Lock()

    # ---- messages --------------------------------------------------------------------

    def header(self, version: int, tensors: list[TensorSpec], full: bool, digest: str, *, delta_base: int | None = None,
               base_digest: bytes = b"", image_digest: bytes = b"", segments: int = 1, stage_only: bool = False,
               keep_previous: bool = False, relay: bool = False) -> None:
        """Check the header and open the staging file. With `relay`, a push this replica
        refuses for its own state (FAILED_PRECONDITION: another base, another model) is
        still received and staged, to be passed on; end() then raises the refusal."""
        if self.path is not None:
            raise InvalidArgument("UpdateWeights got a second header; a push has one, first")
        if digest not in DIGESTS:
            raise InvalidArgument(f"header.digest must be one of {sorted(DIGESTS)}, got {digest!r}")
        self.push = PushHeader(version, list(tensors), full, digest, delta_base, base_digest, image_digest,
                               segments or 1, stage_only, keep_previous)
        try:
            self.total = check_header(version, tensors, full, served=self.served, current_version=self.current_version,
                                      max_bytes=self.max_bytes, header=self.push, image_digest=self.image_digest,
                                      highest_version=self.highest_version)
        except FailedPrecondition as e:
            if not relay:
                raise
            self.refusal = e
            self.total = sum(t.payload for t in tensors)
        self.version, self.tensors, self.full, self.digest = version, list(tensors), full, digest
        self._hash = DIGESTS[digest]()
        try:
            fd, self.path = self.staging.create()
        except OSError as e:
            raise self._disk_error(e) from e
        self._file = os.fdopen(fd, "wb", buffering=0)
        self._owns_file = True

    def chunk(self, offset: int, data: bytes | memoryview) -> None:
        self._expect("chunk")
        if offset != self.received:
            raise InvalidArgument(f"chunk.offset must equal the bytes received so far ({self.received}), got {offset}")
        if self.received + len(data) > self.total:
            raise InvalidArgument(f"chunk at offset {offset} with {len(data)} bytes runs past the "
                                  f"{self.total} bytes the header announced")
        with self._lock:
            if self._file.closed:
                raise InvalidArgument("this push was abandoned")
            try:
                self._file.write(data)
            except OSError as e:
                raise self._disk_error(e) from e
        self._hash.update(data)
        self.received += len(data)

    def commit(self, digest: bytes) -> None:
        self._expect("commit")
        if self.received != self.total:
            raise InvalidArgument(f"commit after {self.received} of the {self.total} bytes the header announced")
        want = self._hash.digest()
        if len(digest) != len(want):
            raise InvalidArgument(f"commit.digest must be {len(want)} bytes for {self.digest}, got {len(digest)}")
        if digest != want:
            raise InvalidArgument(f"commit.digest {digest.hex()[:16]}... does not match the {self.digest} of "
                                  f"the received bytes ({want.hex()[:16]}...)")
        with self._lock:
            try:
                self._file.truncate(self.total)  # a reused file may have been longer
            except OSError as e:
                raise self._disk_error(e) from e
            self._file.close()
        sources, offset = [], 0
        for t in self.tensors:
            sources.append(TensorSource(t.name, "delta" if self.push.delta else "raw", self.path, offset, t.dtype,
                                        tuple(t.shape)))
            offset += t.payload
        self._staged = StagedWeights(self.version, self.full, self.path, sources, self.total, header=self.push)

    def empty_message(self) -> None:
        """A message that sets none of header, chunk and commit."""
        self._expect("message")
        raise InvalidArgument("UpdateWeights got an empty message (no header, chunk or commit)")

    def _expect(self, what: str) -> None:
        if self.path is None:
            raise InvalidArgument(f"the first UpdateWeights message must be a header, got a {what}")
        if self._staged is not None:
            raise InvalidArgument(f"UpdateWeights got a {what} after the commit; the commit ends a push, "
                                  f"nothing was applied")

    def end(self) -> StagedWeights:
        """The stream ended: the verified push, which the caller now owns."""
        if self._staged is None:
            what = "no header" if self.path is None else f"{self.received} of {self.total} bytes and no commit"
            raise InvalidArgument(f"UpdateWeights stream ended after {what}; nothing was applied")
        if self.refusal is not None:
            raise self.refusal
        self._owns_file = False
        return self._staged

    def close(self) -> None:
        """Give up the push unless end() handed it over: its file goes back to the staging
        directory (the spare the next push overwrites)."""
        if not self._owns_file:
            return
        with self._lock:
            if not self._file.closed:
                self._file.close()
        self.staging.recycle(self.path)

    def _disk_error(self, e: OSError) -> Exception:
        """The error to raise for a failed create, write or truncate (called with the file
        lock held, or before there is a file)."""
        if e.errno not in DISK_FULL:
            return e
        # The partial file takes room that other writers of the directory need: delete it.
        if self._file is not None:
            self._file.close()
        if self._owns_file:
            pathlib.Path(self.path).unlink(missing_ok=True)
            self._owns_file = False
        return ResourceExhausted(f"the staging directory {self.staging.directory} is full ({os.strerror(e.errno)}) "
                                 f"after {self.received} of {self.total} bytes; nothing was applied (free room "
                                 f"there or point --staging-dir at a larger one)")


# ---- after staging: one push waits for its commit ---------------------------------------------

@dataclasses.dataclass
class StagedImage:
    """A verified push made into image changes, ready to commit: where each tensor it touched
    now is, their segment digests and the image digest they give."""
    version: int
    base_version: int  # the version served when it was staged: it commits only onto that one
    path: str  # the push's file (delta entries, then the tensors they made)
    sources: dict[str, TensorSource]  # the tensors it touched, all kind "raw"
    full: bool
    nbytes: int  # payload bytes received
    changed: int  # elements whose bits it changes
    segments: int
    digests: dict[str, list[bytes]]  # segment digests of the touched tensors ({} when not computed)
    image_digest: bytes  # b"" when not computed
    keep_previous: bool
    transfer_seconds: float = 0.0
    stage_seconds: float = 0.0
    staged_at: float = dataclasses.field(default_factory=time.monotonic)


class StagedSlot:
    """The one staged push a replica holds between UpdateWeights (stage_only) and its commit.
    A new push drops the one before; one older than `timeout_s` is dropped when next looked at
    (a trainer that died must not pin a model-sized file for ever). Whatever it drops is
    handed back to the caller, who owns its file."""

    def __init__(self, timeout_s: float):
        self.timeout_s = timeout_s
        self._staged: StagedImage | None = None

    def put(self, image: StagedImage) -> StagedImage | None:
        dropped, self._staged = self._staged, image
        return dropped

    def expired(self) -> StagedImage | None:
        if self._staged is not None and time.monotonic() - self._staged.staged_at > self.timeout_s:
            dropped, self._staged = self._staged, None
            return dropped
        return None

    @property
    def version(self) -> int:
        return self._staged.version if self._staged is not None else 0

    @property
    def held(self) -> StagedImage | None:
        return self._staged

    def take(self, version: int) -> StagedImage:
        """The staged push of `version`, no longer staged; FailedPrecondition when there is none."""
        if self._staged is None or self._staged.version != version:
            held = f"version {self._staged.version} is staged" if self._staged else "nothing is staged"
            raise FailedPrecondition(f"no push staged for version {version} ({held}; a staged push is dropped by a "
                                     f"later push, by AbortWeights and after --stage-timeout-s {self.timeout_s:g} s)")
        image, self._staged = self._staged, None
        return image

    def drop(self, version: int) -> StagedImage | None:
        if self._staged is not None and self._staged.version == version:
            image, self._staged = self._staged, None
            return image
        return None
