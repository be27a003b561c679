"""The policy engine: vLLM's AsyncLLM (continuous batching) plus versioned weight updates.

No gRPC here. Requests come in as plain Python values, are checked by
services.policy.limits, and their prompts are tokenized (or chat-templated) on a thread of
their own, so a large one never holds up the event loop. Weight pushes arrive through a
PushSession (services.policy.weights), staged and verified; applying one waits until
generation in flight has finished (new requests wait meanwhile), reloads the weights in
the engine-core process through the worker extension (services.policy.worker), resets
the prefix cache and moves the version, so a completion is always produced by exactly
one version.
"""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import time
import uuid
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from services.common.errors import FailedPrecondition, Unavailable
from services.policy import limits
from services.common.text import render_messages
from services.policy.limits import Chat, Limits, Prompt, Sampling
from services.policy.metrics import (GENERATED_TOKENS, PROMPT_TOKENS, TTFT, UPDATE_BYTES, WEIGHT_VERSION)
from services.policy.results import Completion, PromptResult
from services.policy.weights import PushSession, StagedWeights, StagingDir, TensorSpec, checkpoint_tensors
from services.policy.worker import CPU_WORKER_SPIN_S, WORKER_SPIN_ENV

log = logging.getLogger(__name__)

INSTANCE = uuid.uuid4()  # made once per process: a new one means the replica restarted
INSTANCE_ID = str(INSTANCE)
WORKER_EXTENSION = "services.policy.worker.WeightLoader"
DEAD_POLL_S = 0.5  # vLLM notices its core process's death within ~1 s; we look this often

# What GetModelInfo.engine_config reports: vLLM argument name -> (VllmConfig section, attribute).
ENGINE_CONFIG = {
    "dtype": ("model_config", "dtype"),
    "max_model_len": ("model_config", "max_model_len"),
    "quantization": ("model_config", "quantization"),
    "seed": ("model_config", "seed"),
    "revision": ("model_config", "revision"),
    "tokenizer": ("model_config", "tokenizer"),
    "trust_remote_code": ("model_config", "trust_remote_code"),
    "enforce_eager": ("model_config", "enforce_eager"),
    "max_num_batched_tokens": ("scheduler_config", "max_num_batched_tokens"),
    "max_num_seqs": ("scheduler_config", "max_num_seqs"),
    "enable_chunked_prefill": ("scheduler_config", "enable_chunked_prefill"),
    "enable_prefix_caching": ("cache_config", "enable_prefix_caching"),
    "kv_cache_dtype": ("cache_config", "cache_dtype"),
    "block_size": ("cache_config", "block_size"),
    "gpu_memory_utilization": ("cache_config", "gpu_memory_utilization"),
    "tensor_parallel_size": ("parallel_config", "tensor_parallel_size"),
    "pipeline_parallel_size": ("parallel_config", "pipeline_parallel_size"),
    "data_parallel_size": ("parallel_config", "data_parallel_size"),
}


@dataclasses.dataclass
class EngineConfig:
    model: str
    # vLLM's AsyncEngineArgs from the vLLM flags (services.policy.options); the engine sets
    # its model and worker extension. None: vLLM's defaults.
    engine_args: Any = None
    kv_cache_gib: float = 1.0
    max_n: int = 64
    max_prompts: int = 1024
    max_text_bytes: int = 65536
    max_push_bytes: int = 64 << 30
    # Where a push is written as it arrives, and kept while it holds the latest bytes of a
    # tensor (a later partial push reloads the rest of a layer from it). None: the temp dir.
    # On disk the kernel keeps what fits in the page cache and can drop it; /dev/shm writes
    # a little faster but pins every byte in RAM.
    staging_dir: str | None = None


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


@dataclasses.dataclass
class ModelInfo:
    model_name: str
    architecture: str
    dtype: str
    max_model_len: int
    backend: str
    weight_version: int
    instance_id: str
    vocab_size: int
    eos_token_id: int
    pad_token_id: int
    tensors: list[TensorSpec]
    max_n: int
    max_prompts: int
    engine_config: dict[str, str]
    max_text_bytes: int


def _engine_dead() -> Unavailable:
    return Unavailable("the vLLM engine of this replica died; it is restarting, retry on another replica")


class PolicyEngine:
    def __init__(self, cfg: EngineConfig):
        self.cfg = cfg
        self.llm = None
        self.version = 0
        self.tokenizer = None
        self.limits: Limits | None = None
        # Generation gate: a weight update closes it, waits for `_active` to reach 0,
        # applies, and opens it again.
        self._active = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._open = asyncio.Event()
        self._open.set()
        self._apply_lock = asyncio.Lock()
        self._request_counter = 0
        self.staging = StagingDir(cfg.staging_dir, owner=INSTANCE.hex)
        # One thread tokenizes: the event loop stays free, and the tokenizer is never used
        # from two threads at once.
        self._tokenize = ThreadPoolExecutor(1, thread_name_prefix="tokenize")

    # ---- lifecycle -------------------------------------------------------------------

    async def start(self) -> None:
        from vllm import AsyncEngineArgs
        from vllm.platforms import current_platform
        from vllm.v1.engine.async_llm import AsyncLLM
        import vllm

        c = self.cfg
        removed = self.staging.open()
        if removed:
            log.info("removed %d staging files of dead servers from %s", len(removed), self.staging.directory)
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(max(1, round(c.kv_cache_gib))))
        on_cpu = current_platform.is_cpu()
        if on_cpu:
            os.environ.setdefault(WORKER_SPIN_ENV, str(CPU_WORKER_SPIN_S))
        args = dataclasses.replace(c.engine_args or AsyncEngineArgs(model=c.model), model=c.model,
                                   worker_extension_cls=WORKER_EXTENSION)
        log.info("starting vLLM on %s", c.model)
        self.llm = AsyncLLM.from_engine_args(args)
        mc = self.llm.model_config
        self.tokenizer = self.llm.get_tokenizer()
        self.dtype = str(mc.dtype).removeprefix("torch.")
        self.architecture = (mc.hf_config.architectures or [""])[0]
        self.backend = f"{'vllm-cpu' if on_cpu else 'vllm'} {vllm.__version__}"
        self.limits = Limits(max_n=c.max_n, max_prompts=c.max_prompts, max_text_bytes=c.max_text_bytes,
                             vocab_size=mc.get_vocab_size(), max_model_len=mc.max_model_len,
                             seed_needs_single_n=on_cpu)
        self.served, self._sources = checkpoint_tensors(c.model, self.dtype)
        self.engine_config = {name: _config_value(getattr(getattr(self.llm.vllm_config, section), attr, None))
                              for name, (section, attr) in ENGINE_CONFIG.items()}
        WEIGHT_VERSION.set(self.version)
        log.info("vLLM ready: %s %s, max_model_len %d, %d tensors", self.architecture, self.dtype,
                 mc.max_model_len, len(self.served))

    async def stop(self) -> None:
        if self.llm is not None:
            self.llm.shutdown()
            self.llm = None
        self._tokenize.shutdown(wait=False, cancel_futures=True)
        self.staging.close()

    async def dead(self) -> str:
        """Returns once vLLM's engine has died (its core process killed, say by the OOM
        killer): this process can never serve again. The runtime's fatal-failure hook."""
        while not self.llm.errored:
            await asyncio.sleep(DEAD_POLL_S)
        return "the vLLM engine died (its engine-core process exited)"

    def _require_started(self):
        if self.llm is None:
            raise Unavailable("the policy engine is not loaded yet")

    # ---- prompts ---------------------------------------------------------------------

    async def _prompt_ids(self, prompts: list[Prompt], fields: list[str]) -> list[list[int]]:
        for p, field in zip(prompts, fields):
            limits.check_prompt_input(p, field, self.limits)  # before any tokenizing
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._tokenize, self._tokenize_all, prompts, fields)

    def _tokenize_all(self, prompts: list[Prompt], fields: list[str]) -> list[list[int]]:
        out = []
        for p, field in zip(prompts, fields):
            if isinstance(p, str):
                ids = self.tokenizer.encode(p)
            elif isinstance(p, Chat):
                ids = self.tokenizer.encode(render_messages(self.tokenizer, p.messages, f"{field}.messages"),
                                            add_special_tokens=False)
            else:
                ids = list(p)
            limits.check_token_ids(ids, field, self.limits, given=isinstance(p, list))
            out.append(ids)
        return out

    # ---- generation --------------------------------------------------------------------

    @staticmethod
    def _sampling_params(c: Sampling):
        """vLLM's SamplingParams of checked sampling (limits.check_sampling)."""
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        return SamplingParams(n=c.n, temperature=c.temperature, top_p=c.top_p, top_k=c.top_k,
                              max_tokens=c.max_tokens, stop=c.stop or None, stop_token_ids=c.stop_token_ids or None,
                              seed=c.seed, ignore_eos=c.ignore_eos, logprobs=0 if c.logprobs else None,
                              output_kind=RequestOutputKind.DELTA)

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

    async def _outputs(self, prompt_ids: list[int], params, request_id: str, *, time_first_token: bool):
        """vLLM's outputs for one prompt; the one place that times the first token."""
        from vllm.v1.engine.exceptions import EngineDeadError

        start = time.perf_counter()
        try:
            async for out in self.llm.generate({"prompt_token_ids": prompt_ids}, params, self._request_id(request_id)):
                if time_first_token and any(c.token_ids for c in out.outputs):
                    TTFT.observe(time.perf_counter() - start)
                    time_first_token = False
                yield out
        except EngineDeadError as e:
            raise _engine_dead() from e

    async def generate(self, prompts: list[Prompt], sampling: Sampling, *, require_version: int = 0,
                       request_id: str = "") -> list[PromptResult]:
        self._require_started()
        limits.check_request_id(request_id)
        limits.check_prompt_count(len(prompts), self.limits)
        ids = await self._prompt_ids(prompts, [f"prompts[{i}]" for i in range(len(prompts))])
        params = self._sampling_params(limits.check_sampling(sampling, self.limits, max(map(len, ids))))
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
        acc: dict[int, Completion] = {}
        async for out in self._outputs(prompt_ids, params, request_id, time_first_token=time_first_token):
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

    async def generate_stream(self, prompt: Prompt, sampling: Sampling, *, require_version: int = 0,
                              request_id: str = "") -> AsyncIterator[StreamDelta]:
        self._require_started()
        limits.check_request_id(request_id)
        [ids] = await self._prompt_ids([prompt], ["prompt"])
        params = self._sampling_params(limits.check_sampling(sampling, self.limits, len(ids), stream=True))
        version = await self._enter(require_version)
        try:
            first = True
            async for out in self._outputs(ids, params, request_id, time_first_token=True):
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

    def push_session(self) -> PushSession:
        """A new push, checked against what is served now (apply checks the version again)."""
        self._require_started()
        return PushSession(self.staging, served=self.served, current_version=self.version,
                           max_bytes=self.cfg.max_push_bytes)

    async def apply(self, staged: StagedWeights) -> UpdateResult:
        """Swap in verified weights: drain generation, reload, reset caches, bump the version.
        The staged file is the engine's from here on: served from, or recycled."""
        try:
            return await self._apply(staged)
        finally:
            if staged.path not in {s.path for s in self._sources.values()}:  # refused or failed
                self.staging.recycle(staged.path)

    async def _apply(self, staged: StagedWeights) -> UpdateResult:
        from vllm.v1.engine.exceptions import EngineDeadError

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
                    self.staging.recycle(path)
            except EngineDeadError as e:
                raise _engine_dead() from e
            finally:
                self._open.set()
            apply_seconds = time.perf_counter() - t0
            WEIGHT_VERSION.set(self.version)
            UPDATE_BYTES.inc(staged.nbytes)
            log.info("weights v%d -> v%d: %d tensors, %.1f MB, applied in %.2f s", previous, self.version,
                     len(staged.sources), staged.nbytes / 1e6, apply_seconds)
            return UpdateResult(self.version, previous, staged.nbytes, len(staged.sources), apply_seconds)

    def info(self) -> ModelInfo:
        self._require_started()
        tok = self.tokenizer
        return ModelInfo(model_name=self.llm.model_config.served_model_name or self.cfg.model,
                         architecture=self.architecture, dtype=self.dtype, max_model_len=self.limits.max_model_len,
                         backend=self.backend, weight_version=self.version, instance_id=INSTANCE_ID,
                         vocab_size=self.limits.vocab_size,
                         eos_token_id=-1 if tok.eos_token_id is None else tok.eos_token_id,
                         pad_token_id=-1 if tok.pad_token_id is None else tok.pad_token_id,
                         tensors=list(self.served.values()), max_n=self.cfg.max_n, max_prompts=self.cfg.max_prompts,
                         engine_config=dict(self.engine_config), max_text_bytes=self.cfg.max_text_bytes)


def _config_value(value) -> str:
    return "" if value is None else str(value).removeprefix("torch.")


def _sampled_logprobs(c) -> list[float]:
    """The logprob of each sampled token (vLLM returns a dict per position)."""
    if not c.logprobs:
        return []
    return [float(pos[t].logprob) for t, pos in zip(c.token_ids, c.logprobs)]
