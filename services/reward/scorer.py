"""The reward service's core: the reward model behind the dynamic batcher, the reward functions,
the input checks and the weighted mix. No transport here: the gRPC server and the OpenRLHF HTTP
endpoint are thin front ends over one Scorer, so both doors share one queue, one batcher and one
set of limits, and get dataclasses back.

Every request is checked (naming the field and the limit) and encoded in a worker thread before
anything is queued, so a bad pair fails its whole call and nothing of it is scored. torch is
imported only when a reward model is served: a service of reward functions alone needs none.
"""
from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import dataclasses
import hashlib
import logging
import math
import pathlib
import uuid
from typing import Sequence, Union

from services.common.errors import InvalidArgument, Unavailable
from services.common.text import TRUNCATIONS, check_messages, fit, utf8_size
from services.reward import metrics, tokens
from services.reward.batcher import Batcher
from services.reward.rules import RM, ConfigError, RewardFunction, parse_mix
from services.reward.tokens import Input, is_chat

log = logging.getLogger(__name__)


@dataclasses.dataclass
class RewardSettings:
    """The `rlhf serve reward` flags that the core uses."""
    model: str | None = None
    device: str = "auto"
    dtype: str = "auto"
    max_length: int | None = None
    max_pairs: int = 256
    max_text_bytes: int = 65536
    max_batch_size: int = 64
    max_batch_tokens: int = 16384
    max_wait_ms: float = 5.0
    max_queue: int = 4096
    functions: list[RewardFunction] = dataclasses.field(default_factory=list)
    mix: str | None = None  # --reward-mix as given

    @classmethod
    def from_args(cls, args: argparse.Namespace, functions: list[RewardFunction]) -> "RewardSettings":
        return cls(model=args.model, device=args.device, dtype=args.dtype, max_length=args.max_length,
                   max_pairs=args.max_pairs, max_text_bytes=args.max_text_bytes, max_batch_size=args.max_batch_size,
                   max_batch_tokens=args.max_batch_tokens, max_wait_ms=args.max_wait_ms, max_queue=args.max_queue,
                   functions=functions, mix=args.reward_mix)

    def check(self) -> None:
        for name in ("max_pairs", "max_text_bytes", "max_batch_size", "max_batch_tokens", "max_queue"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.max_wait_ms < 0:
            raise ConfigError(f"--max-wait-ms must be >= 0, got {self.max_wait_ms}")
        if not self.model and not self.functions:
            raise ConfigError("nothing to score with: give --model, --reward-function, or both")


@dataclasses.dataclass
class Pair:
    """A (prompt, response) to score, and how errors name it and its two inputs."""
    prompt: Input
    response: Union[str, list[int]]
    name: str  # "pairs[3]"
    prompt_field: str  # "pairs[3].prompt.text"
    response_field: str


@dataclasses.dataclass
class Query:
    """An OpenRLHF query: the whole templated sequence as text (special-token text kept, maybe
    padded), and the templated prompt it starts with when the caller sent one."""
    text: str
    prompt: str | None
    name: str  # "query[3]"
    text_field: str
    prompt_field: str


@dataclasses.dataclass
class PairResult:
    score: float
    raw_score: float
    truncated: bool
    num_tokens: int
    components: dict[str, float]  # unweighted; "rm" normalized when asked


@dataclasses.dataclass
class CompareResult:
    first_score: float
    second_score: float
    prob_first_preferred: float
    truncated: bool


@dataclasses.dataclass
class Component:
    name: str
    weight: float
    kind: str  # "model" or "function"
    source: str


@dataclasses.dataclass
class ModelInfo:
    model_name: str
    architecture: str
    dtype: str
    max_length: int
    model_version: str
    score_mean: float
    score_std: float
    eval_accuracy: float
    instance_id: str
    max_pairs: int
    max_batch_size: int
    max_batch_tokens: int
    components: list[Component]
    max_text_bytes: int


@dataclasses.dataclass
class _Prepared:
    ids: list[int] | None  # None without a reward model
    truncated: bool
    texts: tuple[str, str] | None  # (prompt, response) for the reward functions; None without any


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


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x)) if x >= 0 else math.exp(x) / (1.0 + math.exp(x))


class Scorer:
    """What a reward is here: the model (optional), the functions and their weights; `score` and
    `compare` for the front ends, `info` for what is served."""

    def __init__(self, settings: RewardSettings):
        settings.check()
        self.s = settings
        self.functions = list(settings.functions)
        self.weights = parse_mix(settings.mix, ([RM] if settings.model else []) + [f.name for f in self.functions])
        self.instance_id = uuid.uuid4().hex[:12]
        self.model = self.tokenizer = self.batcher = None
        self.meta: dict = {}
        self.max_length = self.vocab_size = 0
        self.score_mean, self.score_std = 0.0, 1.0
        self.version = ""
        self.ready = False
        # One thread owns the tokenizer: HF fast tokenizers are not safe to share across threads.
        self._prepare_pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="reward-prepare")
        # Reward functions are the user's Python: a few threads, so one slow call does not hold up all.
        self._rules_pool = concurrent.futures.ThreadPoolExecutor(4, thread_name_prefix="reward-rules")

    # ---- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        weights = ""
        if self.s.model:
            await self._load_model()
            weights = await asyncio.to_thread(weights_version, self.s.model)
        self.version = self._version(weights)
        self.ready = True
        log.info("reward components %s, version %s",
                 ", ".join(f"{c.name}={c.weight:g} ({c.source})" for c in self.components()), self.version)

    async def _load_model(self) -> None:
        from services.ml import head as rm  # torch: only where a reward model is served

        # Loading takes seconds; in a thread, so health keeps answering NOT_SERVING meanwhile.
        self.model, self.tokenizer, meta = await asyncio.to_thread(
            rm.load_reward_model, self.s.model, self.s.device, self.s.dtype)
        self.meta = dict(meta or {})
        # The model's own limit (positions), not the max_length it was trained at (meta): longer pairs
        # score less reliably, but whether to send them is the caller's call.
        model_max = _model_max_length(self.model, self.tokenizer)
        if self.s.max_length is not None and not 1 <= self.s.max_length <= model_max:
            raise SystemExit(f"--max-length must be in [1, {model_max}] (the model's), got {self.s.max_length}")
        self.max_length = self.s.max_length or model_max
        if self.s.max_batch_tokens < self.max_length:
            raise SystemExit(f"--max-batch-tokens ({self.s.max_batch_tokens}) must be >= the max length "
                             f"({self.max_length}) so that any accepted pair fits in a batch")
        if self.tokenizer.eos_token_id is None:
            raise SystemExit(f"{self.s.model}: the tokenizer has no EOS token; the reward model scores at the EOS")
        pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        self.vocab_size = _vocab_size(self.model, self.tokenizer)
        # Training records these; without them normalize is the identity (mean 0, std 1).
        self.score_mean = float(self.meta.get("score_mean") or 0.0)
        self.score_std = float(self.meta.get("score_std") or 1.0)
        model = self.model
        self.batcher = Batcher(lambda batch: rm.score_batch(model, batch, pad_id),
                               max_batch_size=self.s.max_batch_size, max_batch_tokens=self.s.max_batch_tokens,
                               max_wait_s=self.s.max_wait_ms / 1000.0, max_queue=self.s.max_queue,
                               on_batch=metrics.observe_batch)
        await self.batcher.start()
        metrics.QUEUE_DEPTH.set_function(lambda: self.batcher.depth if self.batcher else 0)
        log.info("reward model %s loaded: max length %d, vocab %d, mean %.4f std %.4f",
                 self.s.model, self.max_length, self.vocab_size, self.score_mean, self.score_std)

    def _version(self, weights: str) -> str:
        """The weights' hash; with reward functions, a hash of it and of every component and weight
        (a function's code is not hashed: its spec names it)."""
        if self.weights == {RM: 1.0}:
            return weights
        h = hashlib.sha256(weights.encode())
        for c in self.components():
            h.update(f"\n{c.name}={c.weight!r}:{c.source}".encode())
        return h.hexdigest()[:16]

    async def stop(self) -> None:
        self.ready = False
        if self.batcher is not None:
            await self.batcher.stop()
            self.batcher = None
        self._prepare_pool.shutdown(wait=False, cancel_futures=True)
        self._rules_pool.shutdown(wait=False, cancel_futures=True)

    # ---- checks ----------------------------------------------------------------------------

    def check_count(self, n: int, field: str = "pairs") -> None:
        if not 1 <= n <= self.s.max_pairs:
            raise InvalidArgument(f"{field} must hold 1 to {self.s.max_pairs} pairs (--max-pairs), got {n}")

    def check_truncation(self, truncation: str) -> str:
        if truncation not in TRUNCATIONS:
            raise InvalidArgument(f"truncation must be one of {list(TRUNCATIONS)}, got {truncation!r}")
        return truncation

    def check_text(self, text: str, field: str, empty_ok: bool = False, texts: int = 1) -> str:
        """Non-empty UTF-8 within --max-text-bytes (or `texts` times it: a query holds a prompt and a response)."""
        n, limit = utf8_size(text, field), texts * self.s.max_text_bytes
        if not n and not empty_ok:
            raise InvalidArgument(f"{field} must not be empty")
        if n > limit:
            raise InvalidArgument(f"{field} is {n} bytes, limit {'2 x ' if texts == 2 else ''}"
                                  f"--max-text-bytes={self.s.max_text_bytes}")
        return text

    def _need_model(self, field: str, what: str) -> None:
        if self.model is None:
            raise InvalidArgument(f"{field}: {what} need the reward model's tokenizer, and this service scores "
                                  f"with reward functions only (no --model); send text")

    def check_ids(self, ids: Sequence[int], field: str) -> list[int]:
        self._need_model(field, "token ids")
        if not ids:
            raise InvalidArgument(f"{field} must not be empty")
        if len(ids) > self.max_length:
            raise InvalidArgument(f"{field} holds {len(ids)} tokens, limit --max-length={self.max_length}")
        ids = list(ids)
        if min(ids) < 0 or max(ids) >= self.vocab_size:
            j, t = next((j, t) for j, t in enumerate(ids) if not 0 <= t < self.vocab_size)
            raise InvalidArgument(f"{field}[{j}] = {t} is not in [0, {self.vocab_size}) (the vocabulary)")
        return ids

    def check_input(self, x: Input, field: str, prompt: bool) -> Input:
        if isinstance(x, str):
            return self.check_text(x, field)
        if is_chat(x):
            if not prompt:
                raise InvalidArgument(f"{field}: a response is text or token_ids; messages are for prompts")
            self._need_model(field, "messages")
            return check_messages(x, field, self.s.max_text_bytes)
        return self.check_ids(x, field)

    # ---- scoring ---------------------------------------------------------------------------

    async def score(self, items: Sequence[Union[Pair, Query]], truncation: str = "reject", normalize: bool = False,
                    field: str = "pairs") -> list[PairResult]:
        """One result per item, in order. Raises services.common.errors naming the field or pair."""
        self.check_count(len(items), field)
        return await self._score(items, truncation, normalize)

    async def compare(self, first: Pair, second: Pair, truncation: str = "reject") -> CompareResult:
        """Both responses' raw (mixed) scores and P(first preferred) (the pairs share their prompt)."""
        a, b = await self._score([first, second], truncation, normalize=False)
        return CompareResult(a.raw_score, b.raw_score, sigmoid(a.raw_score - b.raw_score), a.truncated or b.truncated)

    async def _score(self, items, truncation: str, normalize: bool) -> list[PairResult]:
        if not self.ready:
            raise Unavailable("the reward service is not loaded yet")
        self.check_truncation(truncation)
        loop = asyncio.get_running_loop()
        # Checking and tokenizing 256 long texts takes a while: off the event loop.
        prepared = await loop.run_in_executor(self._prepare_pool, lambda: [self._prepare(x, truncation) for x in items])
        # The model and the functions at the same time.
        rm_scores, fn_values = await _all([
            self.batcher.submit([p.ids for p in prepared]) if self.batcher is not None else _none(),
            loop.run_in_executor(self._rules_pool, self._apply_functions, prepared, items) if self.functions
            else _none()])
        return [self._mix(p, rm_scores[i] if rm_scores else None, fn_values[i] if fn_values else (), normalize)
                for i, p in enumerate(prepared)]

    def _prepare(self, item: Union[Pair, Query], truncation: str) -> _Prepared:
        if isinstance(item, Query):
            return self._prepare_query(item, truncation)
        prompt = self.check_input(item.prompt, item.prompt_field, prompt=True)
        response = self.check_input(item.response, item.response_field, prompt=False)
        ids, truncated, texts = None, False, None
        tok = self.tokenizer
        if self.model is not None:
            prompt_ids, response_ids = tokens.prompt_ids(tok, prompt, item.prompt_field), tokens.response_ids(tok, response)
            try:
                ids, truncated = fit(prompt_ids, response_ids, self.max_length, truncation)
            except InvalidArgument as exc:
                raise self._too_long(item.name, exc, truncation) from None
        if self.functions:
            # Text prompts as sent; conversations rendered and token ids decoded as the model reads them.
            p = prompt if isinstance(prompt, str) else tokens.prompt_text(tok, prompt, item.prompt_field)
            texts = (p, tokens.response_text(tok, response))
        return _Prepared(ids, truncated, texts)

    def _prepare_query(self, q: Query, truncation: str) -> _Prepared:
        self.check_text(q.text, q.text_field, texts=2)
        if q.prompt is not None:
            self.check_text(q.prompt, q.prompt_field, empty_ok=True)
        tok = self.tokenizer
        text, prompt = q.text, q.prompt
        if tok is not None:
            text, prompt = tokens.strip_padding(tok, text), prompt and tokens.strip_padding(tok, prompt)
        starts = bool(prompt) and text.startswith(prompt)
        ids, truncated, texts = None, False, None
        if self.model is not None:
            try:
                ids, truncated = tokens.query_ids(tok, text, prompt if starts else None, self.max_length, truncation)
            except InvalidArgument as exc:
                raise self._too_long(q.name, exc, truncation) from None
        if self.functions:
            if not starts:
                raise InvalidArgument(f"{q.name}: the reward functions read the response apart from its prompt, so "
                                      f"{q.text_field} must start with {q.prompt_field}")
            texts = (prompt, text[len(prompt):])
        return _Prepared(ids, truncated, texts)

    def _too_long(self, name: str, exc: InvalidArgument, truncation: str) -> InvalidArgument:
        return InvalidArgument(f"{name}: {exc} (--max-length={self.max_length}, truncation={truncation})")

    def _apply_functions(self, prepared: list[_Prepared], items) -> list[list[float]]:
        return [[f(*p.texts, item.name) for f in self.functions] for p, item in zip(prepared, items)]

    def _mix(self, p: _Prepared, rm_score: float | None, fn_values: Sequence[float], normalize: bool) -> PairResult:
        values = dict(zip((f.name for f in self.functions), fn_values))
        if rm_score is not None:
            values = {RM: rm_score, **values}
        raw = sum(self.weights[n] * v for n, v in values.items())
        components = dict(values)
        if normalize and rm_score is not None:
            components[RM] = (rm_score - self.score_mean) / self.score_std
        score = sum(self.weights[n] * v for n, v in components.items()) if normalize else raw
        metrics.SAMPLES.inc()
        metrics.SCORE.observe(raw)
        for n, v in values.items():
            metrics.COMPONENT.labels(n).observe(v)
        return PairResult(score, raw, p.truncated, len(p.ids) if p.ids else 0, components)

    # ---- what is served --------------------------------------------------------------------

    def components(self) -> list[Component]:
        out = [Component(RM, self.weights[RM], "model", str(self.s.model))] if RM in self.weights else []
        return out + [Component(f.name, self.weights[f.name], "function", f.source) for f in self.functions]

    def info(self) -> ModelInfo:
        if not self.ready:
            raise Unavailable("the reward service is not loaded yet")
        m = self.model
        return ModelInfo(
            model_name=pathlib.Path(self.s.model).resolve().name if m is not None else "",
            architecture=(getattr(m.config, "architectures", None) or [type(m).__name__])[0] if m is not None else "",
            dtype=str(next(m.parameters()).dtype).removeprefix("torch.") if m is not None else "",
            max_length=self.max_length, model_version=self.version, score_mean=self.score_mean,
            score_std=self.score_std, eval_accuracy=float(self.meta.get("eval_accuracy") or 0.0),
            instance_id=self.instance_id, max_pairs=self.s.max_pairs, max_batch_size=self.s.max_batch_size,
            max_batch_tokens=self.s.max_batch_tokens, components=self.components(),
            max_text_bytes=self.s.max_text_bytes)


async def _none() -> None:
    return None


async def _all(awaitables: list) -> list:
    """Results of all, in order; the first failure cancels the rest (a pair a function refuses
    leaves nothing of its call in the batcher's queue)."""
    tasks = [asyncio.ensure_future(a) for a in awaitables]
    try:
        return list(await asyncio.gather(*tasks))
    finally:
        for t in tasks:
            t.cancel()


def _model_max_length(model, tokenizer) -> int:
    limits = [getattr(model.config, "max_position_embeddings", None), getattr(tokenizer, "model_max_length", None)]
    limits = [int(x) for x in limits if x and x < 1_000_000]  # HF uses 1e30 for "no limit"
    return min(limits) if limits else 512


def _vocab_size(model, tokenizer) -> int:
    """Rows of the embedding: the ids the model can read (may exceed the tokenizer's, padded for speed)."""
    return int(getattr(model.config, "vocab_size", None) or len(tokenizer))
