"""The policy engine: vLLM's AsyncLLM (continuous batching) plus versioned weight updates.

No gRPC here. Requests come in as plain Python values, are checked against the model's
limits (errors name the field and the limit), and run on vLLM. Weight pushes arrive
staged and verified (services.policy.weights); applying one waits until generation in
flight has finished (new requests wait meanwhile), reloads the weights in the engine-core
process through a worker extension, resets the prefix cache and moves the version, so a
completion is always produced by exactly one version.
"""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import os
import pathlib
import time
import uuid
from collections.abc import AsyncIterator

from prometheus_client import Counter, Gauge, Histogram

from services.common.errors import FailedPrecondition, InvalidArgument, Unavailable
from services.policy.weights import StagedWeights, TensorSpec, WeightStage, checkpoint_tensors

log = logging.getLogger(__name__)

INSTANCE_ID = str(uuid.uuid4())  # made once per process: a new one means the replica restarted

REQUESTS = Counter("rlhf_policy_requests_total", "PolicyService requests", ["method"])
GENERATED_TOKENS = Counter("rlhf_policy_generated_tokens_total", "Tokens generated")
PROMPT_TOKENS = Counter("rlhf_policy_prompt_tokens_total", "Prompt tokens processed")
TTFT = Histogram("rlhf_policy_time_to_first_token_seconds", "Time from request to its first generated token",
                 buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
WEIGHT_VERSION = Gauge("rlhf_policy_weight_version", "Version of the served weights (0 = as loaded)")
UPDATE_SECONDS = Histogram("rlhf_policy_weight_update_seconds", "UpdateWeights from header to applied",
                           buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300))
UPDATE_BYTES = Counter("rlhf_policy_weight_update_bytes_total", "Bytes of weights applied")
UPDATES = Counter("rlhf_policy_weight_updates_total", "UpdateWeights outcomes", ["result"])

DEFAULT_MAX_TOKENS = 16
MAX_TEMPERATURE = 2.0  # vLLM refuses hotter sampling
MAX_STOP = 16
MAX_STOP_BYTES = 256
MAX_REQUEST_ID_BYTES = 128


def _on_cpu() -> bool:
    from vllm.platforms import current_platform
    return current_platform.is_cpu()


# vLLM's worker busy-polls its shared-memory queue (sched_yield) for a second after each
# step before it sleeps (SpinCondition.busy_loop_s in vllm's shm_broadcast). On a CPU node
# that second takes a core from whatever runs next: right after a Generate, a reward-model
# forward on the same 2-core machine ran ~25x slower. On CPU the engine sets this variable
# for its worker process, where importing WeightLoader's module applies it (see the end of
# this file); 10 ms still covers the gap between two decode steps.
WORKER_SPIN_ENV = "RLHF_VLLM_WORKER_SPIN_S"
CPU_WORKER_SPIN_S = 0.01


def _limit_worker_spin() -> None:
    limit = os.environ.get(WORKER_SPIN_ENV)
    if limit is None:
        return
    try:
        from vllm.distributed.device_communicators.shm_broadcast import SpinCondition
    except ImportError:  # a vLLM without it: nothing to limit
        return
    wait = SpinCondition.wait

    def limited_wait(self, timeout_ms=None):
        self.busy_loop_s = min(self.busy_loop_s, float(limit))
        return wait(self, timeout_ms)

    SpinCondition.wait = limited_wait


@dataclasses.dataclass
class EngineConfig:
    model: str
    served_model_name: str | None = None
    max_model_len: int | None = None
    dtype: str = "auto"
    seed: int = 0
    max_num_seqs: int = 256
    kv_cache_gib: float = 1.0
    gpu_memory_utilization: float = 0.85
    tensor_parallel_size: int = 1
    enforce_eager: bool = False
    max_n: int = 64
    max_prompts: int = 1024
    max_push_bytes: int = 64 << 30
    # Where a push is written as it arrives, and kept while it holds the latest bytes of a
    # tensor (a later partial push reloads the rest of a layer from it). None: the temp dir.
    # On disk the kernel keeps what fits in the page cache and can drop it; /dev/shm writes
    # a little faster but pins every byte in RAM.
    staging_dir: str | None = None


@dataclasses.dataclass
class Sampling:
    """SamplingParams of the proto; None = the documented default."""
    n: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    max_tokens: int | None = None
    stop: list[str] = dataclasses.field(default_factory=list)
    stop_token_ids: list[int] = dataclasses.field(default_factory=list)
    seed: int | None = None
    ignore_eos: bool = False
    logprobs: bool = False


@dataclasses.dataclass
class Completion:
    index: int
    token_ids: list[int]
    text: str
    logprobs: list[float]
    finish_reason: str  # "length" | "stop" | "eos" | "abort"
    weight_version: int
    stop_string: str = ""


@dataclasses.dataclass
class PromptResult:
    prompt_token_ids: list[int]
    completions: list[Completion]


@dataclasses.dataclass
class StreamDelta:
    index: int
    token_ids: list[int]
    text: str
    logprobs: list[float]
    finish_reason: str | None
    weight_version: int
    prompt_token_ids: list[int]


@dataclasses.dataclass
class UpdateResult:
    version: int
    previous_version: int
    bytes: int
    tensors: int
    apply_seconds: float


class WeightLoader:
    """vLLM worker extension (runs in the engine-core process, next to the model).

    vLLM's in-place reload re-runs the CPU/GPU weight processing (e.g. oneDNN packing of
    linear layers), which plain `param.copy_` would bypass. A tied lm_head shares the
    embedding parameter but has its own processed copy on CPU, so after loading the
    embedding we re-process lm_head from it."""

    def rlhf_reload(self, sources: list[tuple]) -> int:
        import torch

        model = self.model_runner.get_model()
        tensors = _read_sources(sources, torch)
        self.model_runner.reload_weights(weights_iterator=tensors, is_checkpoint_format=True)
        lm_head = getattr(model, "lm_head", None)
        embed = getattr(getattr(model, "model", None), "embed_tokens", None)
        if lm_head is not None and embed is not None and getattr(lm_head, "weight", None) is getattr(embed, "weight", None):
            method = getattr(lm_head, "quant_method", None)
            if method is not None and hasattr(method, "process_weights_after_loading"):
                method.process_weights_after_loading(lm_head)
        return len(sources)


def _read_sources(sources, torch):
    """(name, tensor) for each source. A pushed tensor is read into a fresh tensor of its
    own (no mmap): the staged file stays out of this process's RSS and each tensor is
    freed once vLLM has copied it into the model."""
    from safetensors import safe_open

    dtypes = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}
    files: dict[str, object] = {}
    try:
        for name, kind, path, offset, dtype, shape in sources:
            if kind == "raw":
                if path not in files:
                    files[path] = open(path, "rb", buffering=0)
                t = torch.empty(shape, dtype=dtypes[dtype])
                f = files[path]
                f.seek(offset)
                f.readinto(t.view(-1).view(torch.uint8).numpy())
                yield name, t
            else:
                if path not in files:
                    files[path] = safe_open(path, framework="pt")
                yield name, files[path].get_tensor(name)
    finally:
        for f in files.values():
            if hasattr(f, "close"):
                f.close()


class PolicyEngine:
    def __init__(self, cfg: EngineConfig):
        self.cfg = cfg
        self.llm = None
        self.version = 0
        self.tokenizer = None
        # Generation gate: a weight update closes it, waits for `_active` to reach 0,
        # applies, and opens it again.
        self._active = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._open = asyncio.Event()
        self._open.set()
        self._apply_lock = asyncio.Lock()
        self._request_counter = 0
        # A staging file no longer in use, for the next push to overwrite (see WeightStage).
        self._spare: str | None = None

    # ---- lifecycle -------------------------------------------------------------------

    async def start(self) -> None:
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(max(1, round(self.cfg.kv_cache_gib))))
        if _on_cpu():
            os.environ.setdefault(WORKER_SPIN_ENV, str(CPU_WORKER_SPIN_S))
        from vllm import AsyncEngineArgs
        from vllm.platforms import current_platform
        from vllm.v1.engine.async_llm import AsyncLLM
        import vllm

        c = self.cfg
        args = AsyncEngineArgs(
            model=c.model, served_model_name=c.served_model_name, max_model_len=c.max_model_len, dtype=c.dtype,
            seed=c.seed, max_num_seqs=c.max_num_seqs, gpu_memory_utilization=c.gpu_memory_utilization,
            tensor_parallel_size=c.tensor_parallel_size, enforce_eager=c.enforce_eager,
            worker_extension_cls=f"{__name__}.WeightLoader", disable_log_stats=True,
        )
        log.info("starting vLLM on %s", c.model)
        self.llm = AsyncLLM.from_engine_args(args)
        mc = self.llm.model_config
        self.tokenizer = self.llm.get_tokenizer()
        self.max_model_len = mc.max_model_len
        self.vocab_size = mc.get_vocab_size()
        self.dtype = str(mc.dtype).removeprefix("torch.")
        self.architecture = (mc.hf_config.architectures or [""])[0]
        self.backend = f"{'vllm-cpu' if current_platform.is_cpu() else 'vllm'} {vllm.__version__}"
        self.eos_token_id = self.tokenizer.eos_token_id if self.tokenizer.eos_token_id is not None else -1
        self.pad_token_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else -1
        self.served, self._sources = checkpoint_tensors(c.model, self.dtype)
        WEIGHT_VERSION.set(self.version)
        log.info("vLLM ready: %s %s, max_model_len %d, %d tensors", self.architecture, self.dtype,
                 self.max_model_len, len(self.served))

    async def stop(self) -> None:
        if self.llm is not None:
            self.llm.shutdown()
            self.llm = None
        for path in {s.path for s in self._sources.values() if s.kind == "raw"} | {self._spare} - {None}:
            pathlib.Path(path).unlink(missing_ok=True)

    def _require_started(self):
        if self.llm is None:
            raise Unavailable("the policy engine is not loaded yet")

    # ---- generation --------------------------------------------------------------------

    def tokenize(self, prompt: str | list[int], field: str) -> list[int]:
        if isinstance(prompt, str):
            if not prompt:
                raise InvalidArgument(f"{field}.text must not be empty")
            ids = self.tokenizer.encode(prompt)
        else:
            ids = list(prompt)
            bad = next((t for t in ids if not 0 <= t < self.vocab_size), None)
            if bad is not None:
                raise InvalidArgument(f"{field}.token_ids must be in [0, {self.vocab_size}), got {bad}")
        if not ids:
            raise InvalidArgument(f"{field} must not be empty")
        if len(ids) >= self.max_model_len:
            raise InvalidArgument(f"{field} has {len(ids)} tokens; it must be shorter than max_model_len "
                                  f"{self.max_model_len}")
        return ids

    def sampling_params(self, s: Sampling, longest_prompt: int, *, stream: bool = False):
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        n = 1 if s.n is None else s.n
        if not 1 <= n <= self.cfg.max_n:
            raise InvalidArgument(f"params.n must be in [1, {self.cfg.max_n}], got {n}")
        if stream and n != 1:
            raise InvalidArgument(f"params.n must be 1 for GenerateStream, got {n}")
        temperature = 1.0 if s.temperature is None else s.temperature
        if not (temperature >= 0 and math.isfinite(temperature)):
            raise InvalidArgument(f"params.temperature must be >= 0, got {temperature}")
        if temperature > MAX_TEMPERATURE:
            raise InvalidArgument(f"params.temperature must be <= {MAX_TEMPERATURE}, got {temperature}")
        if n > 1 and temperature < 1e-5:  # vLLM's greedy threshold: n identical copies
            raise InvalidArgument(f"params.n must be 1 when params.temperature is 0 (greedy), got n={n}")
        if n > 1 and s.seed is not None and _on_cpu():
            # vLLM's CPU sampler kills the engine on a seeded request with n > 1
            # ("CPU Generator does not use offset"): refuse it instead.
            raise InvalidArgument(f"params.seed needs params.n = 1 on the CPU backend, got n={n}")
        top_p = 1.0 if s.top_p is None else s.top_p
        if not 0 < top_p <= 1:
            raise InvalidArgument(f"params.top_p must be in (0, 1], got {top_p}")
        top_k = 0 if s.top_k is None else s.top_k
        if top_k < -1:
            raise InvalidArgument(f"params.top_k must be 0 or -1 (off) or >= 1, got {top_k}")
        limit = self.max_model_len - longest_prompt
        max_tokens = DEFAULT_MAX_TOKENS if s.max_tokens is None else s.max_tokens
        if not 1 <= max_tokens <= limit:
            raise InvalidArgument(f"params.max_tokens must be in [1, max_model_len - prompt length] = [1, {limit}], "
                                  f"got {max_tokens}")
        if len(s.stop) > MAX_STOP:
            raise InvalidArgument(f"params.stop holds at most {MAX_STOP} strings, got {len(s.stop)}")
        for i, stop in enumerate(s.stop):
            if not stop or len(stop.encode()) > MAX_STOP_BYTES:
                raise InvalidArgument(f"params.stop[{i}] must be non-empty and at most {MAX_STOP_BYTES} bytes, "
                                      f"got {len(stop.encode())} bytes")
        if len(s.stop_token_ids) > MAX_STOP:
            raise InvalidArgument(f"params.stop_token_ids holds at most {MAX_STOP} ids, got {len(s.stop_token_ids)}")
        for i, t in enumerate(s.stop_token_ids):
            if not 0 <= t < self.vocab_size:
                raise InvalidArgument(f"params.stop_token_ids[{i}] must be in [0, {self.vocab_size}), got {t}")
        return SamplingParams(
            n=n, temperature=temperature, top_p=top_p, top_k=top_k if top_k > 0 else 0, max_tokens=max_tokens,
            stop=list(s.stop) or None, stop_token_ids=list(s.stop_token_ids) or None, seed=s.seed,
            ignore_eos=s.ignore_eos, logprobs=0 if s.logprobs else None,
            output_kind=RequestOutputKind.DELTA,
        )

    async def _enter(self, require_version: int) -> int:
        """Admit one generation at the current version (waits while an update applies)."""
        while not self._open.is_set():
            await self._open.wait()
        if require_version and require_version != self.version:
            raise FailedPrecondition(f"require_weight_version is {require_version} but the served version is "
                                     f"{self.version}")
        self._active += 1
        self._idle.clear()
        return self.version

    def _exit(self) -> None:
        self._active -= 1
        if self._active == 0:
            self._idle.set()

    def _request_id(self, request_id: str) -> str:
        self._request_counter += 1
        return f"{request_id or 'gen'}-{self._request_counter}-{uuid.uuid4().hex[:8]}"

    @staticmethod
    def _check_request_id(request_id: str) -> None:
        if len(request_id.encode()) > MAX_REQUEST_ID_BYTES:
            raise InvalidArgument(f"request_id must be at most {MAX_REQUEST_ID_BYTES} bytes, "
                                  f"got {len(request_id.encode())}")

    async def generate(self, prompts: list[str | list[int]], sampling: Sampling, *, require_version: int = 0,
                       request_id: str = "") -> list[PromptResult]:
        self._require_started()
        self._check_request_id(request_id)
        if not 1 <= len(prompts) <= self.cfg.max_prompts:
            raise InvalidArgument(f"prompts must hold [1, {self.cfg.max_prompts}] prompts, got {len(prompts)}")
        ids = [self.tokenize(p, f"prompts[{i}]") for i, p in enumerate(prompts)]
        params = self.sampling_params(sampling, max(map(len, ids)), stream=False)
        version = await self._enter(require_version)
        try:
            # The first prompt streams deltas, which time the call's first token; the rest
            # (scheduled in the same batch) return only their final output: a delta per
            # token and prompt costs the event loop more than a small model's decode step.
            from vllm.sampling_params import RequestOutputKind

            final_only = params.clone()
            final_only.output_kind = RequestOutputKind.FINAL_ONLY
            results = await asyncio.gather(*(self._one(p, final_only if i else params, request_id, version,
                                                       time_first_token=not i) for i, p in enumerate(ids)))
        finally:
            self._exit()
        return list(results)

    async def _one(self, prompt_ids: list[int], params, request_id: str, version: int, *,
                   time_first_token: bool) -> PromptResult:
        start, first = time.perf_counter(), time_first_token
        acc: dict[int, Completion] = {}
        async for out in self.llm.generate({"prompt_token_ids": prompt_ids}, params, self._request_id(request_id)):
            if first and any(c.token_ids for c in out.outputs):
                TTFT.observe(time.perf_counter() - start)
                first = False
            for c in out.outputs:
                a = acc.setdefault(c.index, Completion(c.index, [], "", [], "abort", version))
                a.token_ids += c.token_ids
                a.text += c.text
                if params.logprobs is not None:
                    a.logprobs += _sampled_logprobs(c)
                if c.finish_reason is not None:
                    a.finish_reason, a.stop_string = self._finish(c)
        PROMPT_TOKENS.inc(len(prompt_ids))
        completions = sorted(acc.values(), key=lambda c: c.index)
        GENERATED_TOKENS.inc(sum(len(c.token_ids) for c in completions))
        return PromptResult(list(prompt_ids), completions)

    @staticmethod
    def _finish(c) -> tuple[str, str]:
        if c.finish_reason == "length":
            return "length", ""
        if c.finish_reason == "stop":
            if c.stop_reason is None:
                return "eos", ""
            return "stop", c.stop_reason if isinstance(c.stop_reason, str) else ""
        if c.finish_reason is None:
            return "", ""
        return "abort", ""

    async def generate_stream(self, prompt: str | list[int], sampling: Sampling, *, require_version: int = 0,
                              request_id: str = "") -> AsyncIterator[StreamDelta]:
        self._require_started()
        self._check_request_id(request_id)
        ids = self.tokenize(prompt, "prompt")
        params = self.sampling_params(sampling, len(ids), stream=True)
        version = await self._enter(require_version)
        try:
            first, start = True, time.perf_counter()
            async for out in self.llm.generate({"prompt_token_ids": ids}, params, self._request_id(request_id)):
                if first and any(c.token_ids for c in out.outputs):
                    TTFT.observe(time.perf_counter() - start)
                for c in out.outputs:
                    reason, _ = self._finish(c) if c.finish_reason is not None else ("", "")
                    GENERATED_TOKENS.inc(len(c.token_ids))
                    yield StreamDelta(index=c.index, token_ids=list(c.token_ids), text=c.text,
                                      logprobs=_sampled_logprobs(c) if params.logprobs is not None else [],
                                      finish_reason=reason or None, weight_version=version,
                                      prompt_token_ids=list(ids) if first else [])
                    first = False
                if out.finished:
                    PROMPT_TOKENS.inc(len(ids))
        finally:
            self._exit()

    # ---- weights ---------------------------------------------------------------------

    def begin_push(self, version: int, tensors: list[TensorSpec], full: bool, digest: str = "xxh3_128") -> WeightStage:
        self._require_started()
        stage = WeightStage(version, tensors, full, served=self.served, current_version=self.version,
                            max_bytes=self.cfg.max_push_bytes, directory=self.cfg.staging_dir, digest=digest,
                            reuse=self._spare)
        self._spare = None
        return stage

    def abandon_push(self, stage: WeightStage) -> None:
        """A push that ended before its commit verified: its file becomes the spare."""
        stage.close()
        self._recycle(stage.path)

    def _recycle(self, path: str) -> None:
        if self._spare is None:
            self._spare = path
        else:
            pathlib.Path(path).unlink(missing_ok=True)

    async def apply(self, staged: StagedWeights) -> UpdateResult:
        """Swap in verified weights: drain generation, reload, reset caches, bump the version.
        The staged file is the engine's from here on: served from, or kept as the spare."""
        try:
            return await self._apply(staged)
        finally:
            if staged.path not in {s.path for s in self._sources.values()}:  # refused or failed
                self._recycle(staged.path)

    async def _apply(self, staged: StagedWeights) -> UpdateResult:
        async with self._apply_lock:
            if staged.version <= self.version:  # another push got in first
                raise FailedPrecondition(f"header.version must be greater than the served version {self.version}, "
                                         f"got {staged.version}")
            t0 = time.perf_counter()
            self._open.clear()
            try:
                await self._idle.wait()
                # The worker needs every tensor of a layer to re-process it (fused qkv,
                # packed GEMM weights), so a partial push reloads the rest from where each
                # tensor currently lives: the model directory or an earlier push.
                sources = dict(self._sources)
                for s in staged.sources:
                    sources[s.name] = s
                rows = [(s.name, s.kind, s.path, s.offset, s.dtype, list(s.shape)) for s in sources.values()]
                await self.llm.collective_rpc("rlhf_reload", args=(rows,))
                if not await self.llm.reset_prefix_cache():
                    raise Unavailable("could not reset the prefix cache after loading weights")
                previous, self.version = self.version, staged.version
                old_files = {s.path for s in self._sources.values() if s.kind == "raw"}
                self._sources = sources
                for path in old_files - {s.path for s in sources.values()}:
                    self._recycle(path)
            finally:
                self._open.set()
            apply_seconds = time.perf_counter() - t0
            WEIGHT_VERSION.set(self.version)
            UPDATE_BYTES.inc(staged.nbytes)
            log.info("weights v%d -> v%d: %d tensors, %.1f MB, applied in %.2f s", previous, self.version,
                     len(staged.sources), staged.nbytes / 1e6, apply_seconds)
            return UpdateResult(self.version, previous, staged.nbytes, len(staged.sources), apply_seconds)

    def info(self) -> dict:
        self._require_started()
        return dict(model_name=self.cfg.served_model_name or self.cfg.model, architecture=self.architecture,
                    dtype=self.dtype, max_model_len=self.max_model_len, backend=self.backend,
                    weight_version=self.version, instance_id=INSTANCE_ID, vocab_size=self.vocab_size,
                    eos_token_id=self.eos_token_id, pad_token_id=self.pad_token_id,
                    tensors=list(self.served.values()), max_n=self.cfg.max_n, max_prompts=self.cfg.max_prompts)


def _sampled_logprobs(c) -> list[float]:
    """The logprob of each sampled token (vLLM returns a dict per position)."""
    if not c.logprobs:
        return []
    return [float(pos[t].logprob) for t, pos in zip(c.token_ids, c.logprobs)]


_limit_worker_spin()  # in vLLM's worker process, which imports this module for WeightLoader
