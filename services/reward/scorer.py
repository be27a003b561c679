"""The reward service's core: the reward model behind the dynamic batcher, the reward functions,
the input checks and the weighted mix, and swapping the model for a new version while serving. No
transport here: the gRPC server and the OpenRLHF HTTP endpoint are thin front ends over one Scorer,
so both doors share one queue, one batcher and one set of limits, and get dataclasses back.

Every request is checked (naming the field and the limit) and encoded in a worker thread before
anything is queued, so a bad pair fails its whole call and nothing of it is scored. A request is
scored from start to end by the model version served when it started (services.reward.served), and
every result names that version. A score is a float32 on the wire: a component or a sum that is
not finite as one fails its call (INVALID_ARGUMENT naming it), never reaches a trainer as inf or
nan. torch is imported only when a reward model is served: a service of reward functions alone
needs none.
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
import struct
import time
import uuid
from typing import Sequence, Union

from services.common.errors import FailedPrecondition, InvalidArgument, ResourceExhausted, ServiceError, Unavailable
from services.common.text import TRUNCATIONS, check_messages, fit, utf8_size
from services.reward import metrics, served as models, tokens
from services.reward.batcher import Batcher
from services.reward.rules import RM, ConfigError, RewardFunction, parse_mix
from services.reward.served import Served
from services.reward.tokens import Input, is_chat
from services.reward.workers import FunctionPool

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
    function_timeout_s: float = 5.0  # per call of a module:function
    function_workers: int = 4  # processes running them
    model_roots: list[str] = dataclasses.field(default_factory=list)  # where LoadModel may load from

    @classmethod
    def from_args(cls, args: argparse.Namespace, functions: list[RewardFunction]) -> "RewardSettings":
        return cls(model=args.model, device=args.device, dtype=args.dtype, max_length=args.max_length,
                   max_pairs=args.max_pairs, max_text_bytes=args.max_text_bytes, max_batch_size=args.max_batch_size,
                   max_batch_tokens=args.max_batch_tokens, max_wait_ms=args.max_wait_ms, max_queue=args.max_queue,
                   functions=functions, mix=args.reward_mix, function_timeout_s=args.reward_function_timeout_s,
                   function_workers=args.reward_function_workers, model_roots=list(args.model_root))

    def check(self) -> None:
        for name in ("max_pairs", "max_text_bytes", "max_batch_size", "max_batch_tokens", "max_queue",
                     "function_workers"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-').replace('function-', 'reward-function-')} must be "
                                  f">= 1, got {getattr(self, name)}")
        if self.max_wait_ms < 0:
            raise ConfigError(f"--max-wait-ms must be >= 0, got {self.max_wait_ms}")
        if not (0 < self.function_timeout_s < math.inf):
            raise ConfigError(f"--reward-function-timeout-s must be > 0, got {self.function_timeout_s}")
        for root in self.model_roots:
            if not pathlib.Path(root).is_absolute():
                raise ConfigError(f"--model-root must be an absolute directory, got {root!r}")
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
    model_version: str  # what scored it


@dataclasses.dataclass
class CompareResult:
    first_score: float
    second_score: float
    prob_first_preferred: float
    truncated: bool
    model_version: str  # both scores are this version's


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
    weights_version: str  # the reward model's weights alone ("" without one)
    model_path: str  # the directory it was loaded from, resolved
    loaded_at: float  # unix seconds
    model_roots: list[str]  # where LoadModel may load from (empty: LoadModel is off)


@dataclasses.dataclass
class LoadResult:
    model_version: str  # what results carry from now on
    previous_version: str
    load_seconds: float
    weights_version: str
    model_path: str  # resolved
    changed: bool  # False: those weights were served already (a repeated call), nothing was loaded


@dataclasses.dataclass
class _Prepared:
    ids: list[int] | None  # None without a reward model
    truncated: bool
    texts: tuple[str, str] | None  # (prompt, response) for the reward functions; None without any


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x)) if x >= 0 else math.exp(x) / (1.0 + math.exp(x))


def float32_finite(x: float) -> bool:
    """Whether x is finite once cast to float32, the contract's float (1e39 is finite as a float64)."""
    try:
        return math.isfinite(struct.unpack("f", struct.pack("f", x))[0])
    except OverflowError:  # struct refuses exactly what would round to inf
        return False


class Scorer:
    """What a reward is here: the model (optional, swappable), the functions and their weights;
    `score` and `compare` for the front ends, `load_model` to serve a new model version, `info` for
    what is served."""

    def __init__(self, settings: RewardSettings):
        settings.check()
        self.s = settings
        self.functions = list(settings.functions)
        self.weights = parse_mix(settings.mix, ([RM] if settings.model else []) + [f.name for f in self.functions])
        isolated = [f for f in self.functions if not f.builtin]
        self.pool = (FunctionPool(isolated, settings.function_workers, settings.function_timeout_s)
                     if isolated else None)
        self.instance_id = uuid.uuid4().hex[:12]
        self.served: Served | None = None  # the reward model being served; None: functions only
        self._retiring: set[Served] = set()  # replaced, finishing the requests that started on them
        self._tasks: set[asyncio.Task] = set()  # releasing those
        self._rules_version = ""  # the version without a reward model
        self.ready = False
        self._load_lock = asyncio.Lock()  # one LoadModel at a time; the next waits for it
        # One thread owns the tokenizers: HF fast tokenizers are not safe to share across threads.
        self._prepare_pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="reward-prepare")
        # The built-in functions: ours, linear in the text (the user's run in self.pool's processes).
        self._rules_pool = concurrent.futures.ThreadPoolExecutor(2, thread_name_prefix="reward-rules")

    @property
    def version(self) -> str:
        """What results scored now carry (see RewardModelInfo.model_version)."""
        return self.served.version if self.served is not None else self._rules_version

    # ---- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        if self.pool is not None:
            try:
                await self.pool.start()
            except ConfigError as exc:
                raise SystemExit(f"rlhf serve reward: {exc}") from None
        if self.s.model:
            # Loading takes seconds; in a thread, so health keeps answering NOT_SERVING meanwhile.
            try:
                served = await asyncio.to_thread(models.load, self.s.model, pathlib.Path(self.s.model).resolve(),
                                                  self.s.device, self.s.dtype, self.s.max_length)
            except FailedPrecondition as exc:
                raise SystemExit(f"--model {self.s.model}: {exc} (--max-length)") from None
            if self.s.max_batch_tokens < served.max_length:
                raise SystemExit(f"--max-batch-tokens ({self.s.max_batch_tokens}) must be >= the max length "
                                 f"({served.max_length}) so that any accepted pair fits in a batch")
            await self._serve(served)
        else:
            self._rules_version = self._version("")
        metrics.QUEUE_DEPTH.set_function(self._queue_depth)
        self.ready = True
        log.info("reward components %s, version %s",
                 ", ".join(f"{c.name}={c.weight:g} ({c.source})" for c in self.components()), self.version)
        if self.s.model_roots:
            log.info("LoadModel loads new reward model versions from under %s", ", ".join(self.s.model_roots))

    async def _serve(self, new: Served) -> Served | None:
        """Start `new`'s batcher and make it the one served (one assignment: see served.py); the
        one it replaces is released once its last request is done. Returns that one."""
        new.version = self._version(new.weights_version)
        model, pad_id = new.model, new.pad_id
        from services.ml import head  # torch: only where a reward model is served

        new.batcher = Batcher(lambda batch: head.score_batch(model, batch, pad_id),
                              max_batch_size=self.s.max_batch_size, max_batch_tokens=self.s.max_batch_tokens,
                              max_wait_s=self.s.max_wait_ms / 1000.0, max_queue=self.s.max_queue,
                              on_batch=metrics.observe_batch)
        await new.batcher.start()
        new.idle.set()
        old, self.served = self.served, new
        if old is not None:
            metrics.MODEL_INFO.labels(old.version, old.weights_version, old.path.name).set(0)
            self._retiring.add(old)
            self._tasks.add(task := asyncio.ensure_future(self._retire(old)))
            task.add_done_callback(self._tasks.discard)
        metrics.MODEL_INFO.labels(new.version, new.weights_version, new.path.name).set(1)
        metrics.MODEL_LOADED.set(new.loaded_at)
        log.info("reward model %s served: version %s (weights %s), max length %d, vocab %d, mean %.4f std %.4f",
                 new.source, new.version, new.weights_version, new.max_length, new.vocab_size, new.score_mean,
                 new.score_std)
        return old

    async def _retire(self, old: Served) -> None:
        await old.idle.wait()  # its last request is done; none can start on it any more
        await old.batcher.stop()
        self._retiring.discard(old)
        await asyncio.to_thread(models.free, old)
        log.info("reward model version %s released", old.version)

    def _queue_depth(self) -> int:
        return sum(s.batcher.depth for s in (self.served, *self._retiring) if s is not None and s.batcher)

    def _version(self, weights: str) -> str:
        """The weights' hash; with reward functions, a hash of it and of every component and weight
        (a function's code is not hashed: its spec names it)."""
        if self.weights == {RM: 1.0}:
            return weights
        h = hashlib.sha256(weights.encode())
        for c in self._components(self.s.model or ""):
            h.update(f"\n{c.name}={c.weight!r}:{c.source}".encode())
        return h.hexdigest()[:16]

    async def stop(self) -> None:
        self.ready = False
        for task in list(self._tasks):
            task.cancel()
        for s in (self.served, *self._retiring):
            if s is not None and s.batcher is not None:
                await s.batcher.stop()
        self.served = None
        self._retiring.clear()
        if self.pool is not None:
            await self.pool.stop()
        self._prepare_pool.shutdown(wait=False, cancel_futures=True)
        self._rules_pool.shutdown(wait=False, cancel_futures=True)

    # ---- a new model version ---------------------------------------------------------------

    async def load_model(self, model_path: str, expected_weights_version: str = "",
                         if_version: str = "") -> LoadResult:
        """Serve the reward model in `model_path` from now on (see reward.proto's LoadModel). One
        load at a time: a second call waits for the first. The load goes on if the caller leaves,
        and a call for the weights already served answers at once, so a caller whose deadline ran
        out calls again to learn how it ended."""
        if not self.ready:
            raise Unavailable("the reward service is not loaded yet")
        if self.served is None:
            raise FailedPrecondition("this service scores with reward functions only (no --model): there is no "
                                     "reward model to replace")
        task = asyncio.ensure_future(self._load_model(model_path, expected_weights_version, if_version))
        task.add_done_callback(lambda t: t.cancelled() or t.exception())  # logged already, if its caller left
        return await asyncio.shield(task)

    async def _load_model(self, model_path: str, expected: str, if_version: str) -> LoadResult:
        started = time.perf_counter()
        result = "refused"  # the request or the model does not fit; "failed": the model could not be loaded
        try:
            async with self._load_lock:
                path = models.resolve(model_path, self.s.model_roots)
                current = self.served
                if if_version and if_version != current.version:
                    raise FailedPrecondition(f"if_version is {if_version}, but this service serves version "
                                             f"{current.version}")
                weights = await asyncio.to_thread(models.weights_version, path)
                if expected and expected != weights:
                    raise FailedPrecondition(f"the weights in {model_path} are version {weights}, not "
                                             f"expected_weights_version {expected} (still being written?)")
                if weights == current.weights_version and path == current.path:
                    result = "unchanged"
                    return LoadResult(current.version, current.version, time.perf_counter() - started, weights,
                                      str(current.path), changed=False)
                result = "failed"
                try:
                    new = await asyncio.to_thread(self._open, model_path, path)
                except FailedPrecondition as exc:
                    result = "failed" if isinstance(exc, _Unloadable) else "refused"  # no EOS, num_labels 2: refused
                    raise
                result = "refused"
                try:
                    await asyncio.to_thread(models.check_fits, current, new)
                    if not self.ready:
                        raise Unavailable("the reward service is stopping")
                except BaseException:
                    await asyncio.to_thread(models.free, new)
                    raise
                new.max_length = current.max_length  # what GetModelInfo promised stays
                old = await self._serve(new)
                result = "swapped"
                return LoadResult(new.version, old.version, time.perf_counter() - started, new.weights_version,
                                  str(path), changed=True)
        finally:
            seconds = time.perf_counter() - started
            metrics.MODEL_LOADS.labels(result).inc()
            metrics.MODEL_LOAD_SECONDS.observe(seconds)
            log.log(logging.INFO if result in ("swapped", "unchanged") else logging.WARNING,
                    "LoadModel %s: %s after %.1f s", model_path, result, seconds)

    def _open(self, source: str, path: pathlib.Path) -> Served:
        """The model in `path`, loaded (in a thread). Whatever goes wrong is an error saying what,
        and nothing changes: the served model goes on."""
        try:
            return models.load(source, path, self.s.device, self.s.dtype, None)
        except ServiceError:
            raise
        except MemoryError:
            raise ResourceExhausted(f"out of memory loading {source} (a swap holds two models until the old "
                                    f"one's last request is done)") from None
        except Exception as exc:  # noqa: BLE001 - bad files, a missing config, anything: the old model goes on
            if "out of memory" in str(exc).lower():  # torch.OutOfMemoryError (CUDA), without importing torch here
                raise ResourceExhausted(f"out of memory loading {source}: {str(exc)[:300]}") from None
            raise _Unloadable(f"cannot load the reward model in {source}: {type(exc).__name__}: "
                              f"{str(exc)[:500]}") from None

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

    def _need_model(self, served: Served | None, field: str, what: str) -> None:
        if served is None:
            raise InvalidArgument(f"{field}: {what} need the reward model's tokenizer, and this service scores "
                                  f"with reward functions only (no --model); send text")

    def check_ids(self, ids: Sequence[int], field: str, served: Served | None) -> list[int]:
        self._need_model(served, field, "token ids")
        if not ids:
            raise InvalidArgument(f"{field} must not be empty")
        if len(ids) > served.max_length:
            raise InvalidArgument(f"{field} holds {len(ids)} tokens, limit --max-length={served.max_length}")
        ids = list(ids)
        if min(ids) < 0 or max(ids) >= served.vocab_size:
            j, t = next((j, t) for j, t in enumerate(ids) if not 0 <= t < served.vocab_size)
            raise InvalidArgument(f"{field}[{j}] = {t} is not in [0, {served.vocab_size}) (the vocabulary)")
        return ids

    def check_input(self, x: Input, field: str, prompt: bool, served: Served | None) -> Input:
        if isinstance(x, str):
            return self.check_text(x, field)
        if is_chat(x):
            if not prompt:
                raise InvalidArgument(f"{field}: a response is text or token_ids; messages are for prompts")
            self._need_model(served, field, "messages")
            return check_messages(x, field, self.s.max_text_bytes)
        return self.check_ids(x, field, served)

    # ---- scoring ---------------------------------------------------------------------------

    async def score(self, items: Sequence[Union[Pair, Query]], truncation: str = "reject", normalize: bool = False,
                    field: str = "pairs") -> list[PairResult]:
        """One result per item, in order, all scored by one model version. Raises
        services.common.errors naming the field or pair."""
        self.check_count(len(items), field)
        return await self._score(items, truncation, normalize)

    async def compare(self, first: Pair, second: Pair, truncation: str = "reject") -> CompareResult:
        """Both responses' raw (mixed) scores and P(first preferred) (the pairs share their prompt),
        from one model version."""
        a, b = await self._score([first, second], truncation, normalize=False)
        return CompareResult(a.raw_score, b.raw_score, sigmoid(a.raw_score - b.raw_score), a.truncated or b.truncated,
                             a.model_version)

    async def _score(self, items, truncation: str, normalize: bool) -> list[PairResult]:
        if not self.ready:
            raise Unavailable("the reward service is not loaded yet")
        self.check_truncation(truncation)
        # This request's model version, from its first token to its last score: a swap meanwhile
        # serves the requests after it.
        served = self.served.acquire() if self.served is not None else None
        try:
            loop = asyncio.get_running_loop()
            # Checking and tokenizing 256 long texts takes a while: off the event loop.
            prepared = await loop.run_in_executor(self._prepare_pool,
                                                  lambda: [self._prepare(x, truncation, served) for x in items])
            # The model and the functions at the same time.
            rm_scores, fn_values = await _all([
                served.batcher.submit([p.ids for p in prepared]) if served is not None else _none(),
                self._apply_functions(prepared, items) if self.functions else _none()])
            version = served.version if served is not None else self._rules_version
            return [self._mix(p, item.name, rm_scores[i] if rm_scores else None, fn_values[i] if fn_values else {},
                              normalize, served, version)
                    for i, (p, item) in enumerate(zip(prepared, items))]
        finally:
            if served is not None:
                served.release()

    def _prepare(self, item: Union[Pair, Query], truncation: str, served: Served | None) -> _Prepared:
        if isinstance(item, Query):
            return self._prepare_query(item, truncation, served)
        prompt = self.check_input(item.prompt, item.prompt_field, prompt=True, served=served)
        response = self.check_input(item.response, item.response_field, prompt=False, served=served)
        ids, truncated, texts = None, False, None
        tok = served.tokenizer if served is not None else None
        if served is not None:
            prompt_ids, response_ids = tokens.prompt_ids(tok, prompt, item.prompt_field), tokens.response_ids(tok, response)
            try:
                ids, truncated = fit(prompt_ids, response_ids, served.max_length, truncation)
            except InvalidArgument as exc:
                raise self._too_long(item.name, exc, truncation, served) from None
        if self.functions:
            # Text prompts as sent; conversations rendered and token ids decoded as the model reads them.
            p = prompt if isinstance(prompt, str) else tokens.prompt_text(tok, prompt, item.prompt_field)
            texts = (p, tokens.response_text(tok, response))
        return _Prepared(ids, truncated, texts)

    def _prepare_query(self, q: Query, truncation: str, served: Served | None) -> _Prepared:
        self.check_text(q.text, q.text_field, texts=2)
        if q.prompt is not None:
            self.check_text(q.prompt, q.prompt_field, empty_ok=True)
        tok = served.tokenizer if served is not None else None
        text, prompt = q.text, q.prompt
        if tok is not None:
            text, prompt = tokens.strip_padding(tok, text), prompt and tokens.strip_padding(tok, prompt)
        starts = bool(prompt) and text.startswith(prompt)
        ids, truncated, texts = None, False, None
        if served is not None:
            try:
                ids, truncated = tokens.query_ids(tok, text, prompt if starts else None, served.max_length, truncation)
            except InvalidArgument as exc:
                raise self._too_long(q.name, exc, truncation, served) from None
        if self.functions:
            if not starts:
                raise InvalidArgument(f"{q.name}: the reward functions read the response apart from its prompt, so "
                                      f"{q.text_field} must start with {q.prompt_field}")
            texts = (prompt, text[len(prompt):])
        return _Prepared(ids, truncated, texts)

    def _too_long(self, name: str, exc: InvalidArgument, truncation: str, served: Served) -> InvalidArgument:
        return InvalidArgument(f"{name}: {exc} (--max-length={served.max_length}, truncation={truncation})")

    async def _apply_functions(self, prepared: list[_Prepared], items) -> list[dict[str, float]]:
        """{function: value} per pair: the built-ins in a thread here, the user's in the worker
        processes (one message per request), at the same time."""
        texts = [(*p.texts, item.name) for p, item in zip(prepared, items)]
        builtins = [f for f in self.functions if f.builtin]

        def apply_builtins() -> list[list[float]]:
            return [[f(prompt, response, name) for f in builtins] for prompt, response, name in texts]

        loop = asyncio.get_running_loop()
        ours, theirs = await _all([loop.run_in_executor(self._rules_pool, apply_builtins) if builtins else _none(),
                                   self.pool.apply(texts) if self.pool is not None else _none()])
        names = [f.name for f in builtins] + ([f.name for f in self.pool.functions] if self.pool else [])
        return [dict(zip(names, (ours[i] if ours else []) + (theirs[i] if theirs else []))) for i in range(len(texts))]

    def _mix(self, p: _Prepared, name: str, rm_score: float | None, fn_values: dict[str, float], normalize: bool,
             served: Served | None, version: str) -> PairResult:
        values = {f.name: fn_values[f.name] for f in self.functions}
        if rm_score is not None:
            values = {RM: rm_score, **values}
        raw = sum(self.weights[n] * v for n, v in values.items())
        components = dict(values)
        if normalize and rm_score is not None:
            components[RM] = (rm_score - served.score_mean) / served.score_std
        score = sum(self.weights[n] * v for n, v in components.items()) if normalize else raw
        self._check_finite(name, components, raw, score)
        metrics.SAMPLES.inc()
        metrics.SCORE.observe(raw)
        for n, v in values.items():
            metrics.COMPONENT.labels(n).observe(v)
        return PairResult(score, raw, p.truncated, len(p.ids) if p.ids else 0, components, version)

    def _check_finite(self, name: str, components: dict[str, float], raw: float, score: float) -> None:
        """Every number this pair's result carries, finite as the float32 the contract sends: each
        component, each weighted term, the sums. INVALID_ARGUMENT naming the first that is not."""
        for n, v in components.items():
            w = self.weights[n]
            if not float32_finite(v):
                raise InvalidArgument(f"{name}: reward component {n} is {v!r}, not a finite float32 "
                                      f"(|x| <= 3.4e38); the score would be inf or nan")
            if not float32_finite(w * v):
                raise InvalidArgument(f"{name}: reward component {n} = {v!r} x weight {w:g} (--reward-mix) is "
                                      f"{w * v!r}, not a finite float32 (|x| <= 3.4e38)")
        for what, total in (("raw score", raw), ("score", score)):
            if not float32_finite(total):
                raise InvalidArgument(f"{name}: the {what}, the weighted sum of {', '.join(components)}, is "
                                      f"{total!r}, not a finite float32 (|x| <= 3.4e38)")

    # ---- what is served --------------------------------------------------------------------

    def _components(self, model_source: str) -> list[Component]:
        out = [Component(RM, self.weights[RM], "model", model_source)] if RM in self.weights else []
        return out + [Component(f.name, self.weights[f.name], "function", f.source) for f in self.functions]

    def components(self) -> list[Component]:
        return self._components(self.served.source if self.served is not None else "")

    def info(self) -> ModelInfo:
        if not self.ready:
            raise Unavailable("the reward service is not loaded yet")
        s = self.served
        m = s.model if s is not None else None
        return ModelInfo(
            model_name=s.path.name if s is not None else "",
            architecture=s.architecture if s is not None else "",
            dtype=str(next(m.parameters()).dtype).removeprefix("torch.") if m is not None else "",
            max_length=s.max_length if s is not None else 0, model_version=self.version,
            score_mean=s.score_mean if s is not None else 0.0, score_std=s.score_std if s is not None else 1.0,
            eval_accuracy=float(s.meta.get("eval_accuracy") or 0.0) if s is not None else 0.0,
            instance_id=self.instance_id, max_pairs=self.s.max_pairs, max_batch_size=self.s.max_batch_size,
            max_batch_tokens=self.s.max_batch_tokens, components=self.components(),
            max_text_bytes=self.s.max_text_bytes, weights_version=s.weights_version if s is not None else "",
            model_path=str(s.path) if s is not None else "", loaded_at=s.loaded_at if s is not None else 0.0,
            model_roots=list(self.s.model_roots))


class _Unloadable(FailedPrecondition):
    """The files could not be loaded at all (as opposed to a model that loads but does not fit)."""


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
