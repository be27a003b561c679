"""The reward model a service serves, and what a new version must satisfy to take its place.

A Served is everything that belongs to one model version and must change together: the model, its
tokenizer, the normalisation statistics of its training (reward_meta.json), its version and the
batcher that runs its forward passes. A request takes the Served of the moment it starts and keeps
it to its end (Scorer._score), so swapping is one assignment: requests in flight finish on the old
model, every request after it is scored by the new one, no request mixes the two, and the old one
is released once its last request is done.

A new version is loaded only from under the server's --model-root directories, and must fit what
the clients rely on: the same tokenizer (token ids they send mean the same tokens, text renders to
the same ids), the same architecture, one label, and at least the served max length.

No gRPC here; torch only through services.ml.head, imported when a model is loaded.
"""
from __future__ import annotations

import asyncio
import dataclasses
import gc
import hashlib
import os
import pathlib
import time
from typing import Any, Sequence

from services.common.errors import FailedPrecondition, InvalidArgument, NotFound, PermissionDenied
from services.reward.batcher import Batcher

MAX_PATH_BYTES = 4096


@dataclasses.dataclass(eq=False)
class Served:
    """One reward model version, as it is served."""
    source: str  # the directory as it was given (--model, or LoadModel's model_path)
    path: pathlib.Path  # the same, resolved
    model: Any
    tokenizer: Any
    meta: dict  # reward_meta.json
    weights_version: str  # content hash of the weight files
    max_length: int
    vocab_size: int  # rows of the embedding: the token ids it can read
    pad_id: int
    version: str = ""  # what results carry: the weights' hash, with the reward functions' mix
    batcher: Batcher | None = None
    loaded_at: float = dataclasses.field(default_factory=time.time)
    users: int = 0  # requests scoring with it now
    idle: asyncio.Event = dataclasses.field(default_factory=asyncio.Event)

    @property
    def score_mean(self) -> float:  # training records these; without them normalize is the identity
        return float(self.meta.get("score_mean") or 0.0)

    @property
    def score_std(self) -> float:
        return float(self.meta.get("score_std") or 1.0)

    @property
    def architecture(self) -> str:
        return architecture(self.model)

    def acquire(self) -> "Served":
        self.users += 1
        self.idle.clear()
        return self

    def release(self) -> None:
        self.users -= 1
        if self.users == 0:
            self.idle.set()


def weights_version(model_dir: str | pathlib.Path) -> str:
    """First 16 hex digits of SHA-256 over the weight files (sorted by name): same weights, same version."""
    files = sorted(pathlib.Path(model_dir).glob("*.safetensors")) or sorted(pathlib.Path(model_dir).glob("*.bin"))
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode())
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()[:16]


def load(source: str, path: pathlib.Path, device: str, dtype: str, max_length: int | None) -> Served:
    """The model in `path`, loaded and checked on its own (one label, an EOS, `max_length` within its
    positions; None: the model's own limit). Blocking: call it in a thread."""
    from services.ml import head  # torch: only where a reward model is served

    weights = weights_version(path)
    try:
        model, tokenizer, meta = head.load_reward_model(path, device, dtype)
    except InvalidArgument as exc:  # num_labels != 1
        raise FailedPrecondition(str(exc)) from None
    # The model's own limit (positions), not the max_length it was trained at (meta): longer pairs
    # score less reliably, but whether to send them is the caller's call.
    model_max = model_max_length(model, tokenizer)
    if max_length is not None and not 1 <= max_length <= model_max:
        raise FailedPrecondition(f"the max length must be in [1, {model_max}] (the model's), got {max_length}")
    if tokenizer.eos_token_id is None:
        raise FailedPrecondition(f"{source}: the tokenizer has no EOS token; the reward model scores at the EOS")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return Served(source, path, model, tokenizer, dict(meta or {}), weights, max_length or model_max,
                  vocab_size(model, tokenizer), pad_id)


def check_fits(served: Served, new: Served) -> None:
    """FailedPrecondition listing every way `new` differs from `served` that clients would notice."""
    problems = []
    if new.architecture != served.architecture:
        problems.append(f"architecture {new.architecture} (served: {served.architecture}; another architecture "
                        f"needs a restart with --model)")
    if new.vocab_size != served.vocab_size:
        problems.append(f"vocabulary of {new.vocab_size} token ids (served: {served.vocab_size})")
    problems += tokenizer_differences(served.tokenizer, new.tokenizer)
    if new.max_length < served.max_length:
        problems.append(f"max length {new.max_length} tokens (served: {served.max_length}, and GetModelInfo "
                        f"promises it)")
    if problems:
        raise FailedPrecondition(f"the model in {new.source} does not fit the one served ({served.source}): "
                                 + "; ".join(problems))


def tokenizer_differences(served, new) -> list[str]:
    """What differs between two tokenizers in ways that change token ids: the vocabulary, the
    special tokens, the chat template (text prompts are rendered with it)."""
    out = []
    a, b = served.get_vocab(), new.get_vocab()
    if a != b:
        moved = sorted(t for t in a.keys() & b.keys() if a[t] != b[t])
        only = len(a.keys() ^ b.keys())
        example = f" (e.g. {moved[0]!r} is {b[moved[0]]} here, {a[moved[0]]} served)" if moved else ""
        out.append(f"tokenizer: {len(moved)} tokens map to other ids{example}, {only} tokens in one vocabulary "
                   f"only ({len(b)} tokens here, {len(a)} served)")
    for name in ("eos_token_id", "pad_token_id", "bos_token_id"):
        if getattr(served, name, None) != getattr(new, name, None):
            out.append(f"tokenizer {name} {getattr(new, name, None)} (served: {getattr(served, name, None)})")
    if getattr(served, "chat_template", None) != getattr(new, "chat_template", None):
        out.append("tokenizer chat template (text prompts would render to other tokens)")
    return out


def resolve(model_path: str, roots: Sequence[str]) -> pathlib.Path:
    """LoadModel's model_path as the directory to load, if it lies under one of `roots`
    (--model-root): absolute, no '..', and after resolving every symlink, the directory and each
    file in it inside a root."""
    if not roots:
        raise FailedPrecondition("LoadModel is off on this server: start it with --model-root DIR, the directory "
                                 "(a shared volume) where new reward model versions are written")
    if not model_path:
        raise InvalidArgument("model_path must not be empty")
    if len(model_path.encode(errors="surrogatepass")) > MAX_PATH_BYTES or "\x00" in model_path:
        raise InvalidArgument(f"model_path must be at most {MAX_PATH_BYTES} bytes, without NUL")
    if not os.path.isabs(model_path):
        raise InvalidArgument(f"model_path must be an absolute path (under --model-root), got {model_path!r}")
    if ".." in pathlib.PurePath(model_path).parts:
        raise PermissionDenied(f"model_path must not contain '..', got {model_path!r}")
    allowed = [pathlib.Path(os.path.realpath(r)) for r in roots]

    def inside(p: pathlib.Path) -> bool:
        return any(p == r or p.is_relative_to(r) for r in allowed)

    real = pathlib.Path(os.path.realpath(model_path))
    if not inside(real):
        raise PermissionDenied(f"model_path {model_path!r} is outside the directories this server loads models from "
                               f"(--model-root: {', '.join(map(str, roots))})")
    if not real.is_dir():
        raise NotFound(f"model_path {model_path!r} is not a directory")
    for f in sorted(real.iterdir()):
        if not inside(pathlib.Path(os.path.realpath(f))):
            raise PermissionDenied(f"model_path {model_path!r}: {f.name} links to outside --model-root")
    return real


def free(served: Served) -> None:
    """Drop the model's memory (a GPU's too) once nothing uses it."""
    served.model = served.tokenizer = served.batcher = None
    gc.collect()
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def architecture(model) -> str:
    return (getattr(model.config, "architectures", None) or [type(model).__name__])[0]


def model_max_length(model, tokenizer) -> int:
    limits = [getattr(model.config, "max_position_embeddings", None), getattr(tokenizer, "model_max_length", None)]
    limits = [int(x) for x in limits if x and x < 1_000_000]  # HF uses 1e30 for "no limit"
    return min(limits) if limits else 512


def vocab_size(model, tokenizer) -> int:
    """Rows of the embedding: the ids the model can read (may exceed the tokenizer's, padded for speed)."""
    return int(getattr(model.config, "vocab_size", None) or len(tokenizer))
