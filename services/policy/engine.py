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
import itertools
import logging
import os
import time
import uuid
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from services.common.errors import FailedPrecondition, InvalidArgument, ResourceExhausted, Unavailable
from services.policy import limits, wire
from services.common.text import render_messages
from services.policy.limits import Chat, Limits, Prompt, Sampling
from services.policy.metrics import (CHANGED_ELEMENTS, GENERATED_TOKENS, PROMPT_TOKENS, STAGE_SECONDS, TTFT,
                                     UPDATE_BYTES, WEIGHT_VERSION)
from services.policy.results import Completion, PromptResult
from services.policy.weights import (DISK_FULL, FILE_PREFIX, PushSession, StagedImage, StagedSlot, StagedWeights,
                                     StagingDir, TensorSource, TensorSpec, checkpoint_tensors)
from services.policy.worker import CPU_WORKER_SPIN_S, WORKER_SPIN_ENV

log = logging.getLogger(__name__)

INSTANCE = uuid.uuid4()  # made once per process: a new one means the replica restarted
INSTANCE_ID = str(INSTANCE)
WORKER_EXTENSION = "services.policy.worker.WeightLoader"
DEAD_POLL_S = 0.5  # vLLM notices its core process's death within ~1 s; we look this often
STAGE_THREADS = min(8, os.cpu_count() or 1)  # tensors of a push decoded and hashed at once

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
    # How long a push staged for CommitWeights waits before it is dropped.
    stage_timeout_s: float = 300.0


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
    staged: bool = False  # waits for commit(); nothing applied yet
    image_digest: bytes = b""
    tensors_reloaded: int = 0
    stage_seconds: float = 0.0
    changed_elements: int = 0
    transfer_seconds: float = 0.0


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
    staged_version: int = 0
    rollback_version: int = 0


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
        self.highest_version = 0  # above the served one after a rollback: versions only go up
        self._sources: dict[str, TensorSource] = {}
        self._digests: dict[tuple[TensorSource, int], list[bytes]] = {}  # (source, segments) -> segment digests
        self._slot = StagedSlot(cfg.stage_timeout_s)
        self._previous: tuple[int, dict[str, TensorSource]] | None = None  # kept for a rollback
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
                              prompt_logprobs=0 if c.prompt_logprobs else None, output_kind=RequestOutputKind.DELTA)

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
        prompt_logprobs: list[float] = []
        async for out in self._outputs(prompt_ids, params, request_id, time_first_token=time_first_token):
            if params.prompt_logprobs is not None and out.prompt_logprobs and not prompt_logprobs:
                # one dict per prompt position, None for the first token (nothing before it)
                prompt_logprobs = [float(pos[t].logprob) for t, pos in zip(prompt_ids[1:], out.prompt_logprobs[1:])]
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
        return PromptResult(list(prompt_ids), completions, prompt_logprobs)

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
    #
    # The served image is `_sources`: where each tensor's current bytes are (the model
    # directory, or a staged push's file). A push is received by a PushSession, then staged
    # here (a delta decoded against the image, the new tensors written after the payload in
    # the push's own file, the image digest checked), then committed: the worker reloads the
    # tensors it touched and the sources move. `_sources` is replaced, never changed in
    # place, so a thread reading it sees one image.

    def push_session(self) -> PushSession:
        """A new push, checked against what is served now (apply checks the version again)."""
        self._require_started()
        self._release(self._slot.expired())
        return PushSession(self.staging, served=self.served, current_version=self.version,
                           max_bytes=self.cfg.max_push_bytes, image_digest=self.image_digest,
                           highest_version=self.highest_version)

    def image_digest(self, segments: int, changed: dict[str, list[bytes]] | None = None,
                     sources: dict[str, TensorSource] | None = None) -> bytes:
        """The digest of the served image (WeightsHeader.image_digest), with `changed` in place of
        those tensors' segment digests. What is not cached yet is read (the whole image, the
        first time a push asks for a digest with this many segments)."""
        sources = self._sources if sources is None else sources
        changed = changed or {}
        return wire.image_digest({name: changed.get(name) or self._tensor_digests(sources[name], segments)
                                  for name in self.served})

    def _tensor_digests(self, source: TensorSource, segments: int) -> list[bytes]:
        key = (source, segments)
        digests = self._digests.get(key)
        if digests is None:
            digests = wire.segment_digests(_as_bytes(self._read(source)), source.shape,
                                           wire.ELEMENT_SIZE[self.dtype], segments)
            self._digests[key] = digests
        return digests

    def _read(self, source: TensorSource):
        """One tensor of the image, in the served dtype, on the CPU."""
        from services.policy.worker import read_tensor

        return read_tensor(source.kind, source.path, source.offset, source.dtype, source.shape, source.name,
                           to_dtype=self.dtype)

    def _stage(self, staged: StagedWeights) -> StagedImage:
        """A verified push made into image changes (a thread: a delta's decoding and the digests
        take CPU time). Nothing served changes here; any error leaves the image as it was."""
        from services.ml.delta import apply_entry

        t0 = time.perf_counter()
        h = staged.header
        specs = {t.name: t for t in h.tensors}
        size = wire.ELEMENT_SIZE[self.dtype]
        # Where each rebuilt tensor goes: after the payload, in header order.
        ends = itertools.accumulate((specs[s.name].nbytes for s in staged.sources if s.kind == "delta"),
                                    initial=staged.nbytes)
        places = {s.name: end for s, end in zip((s for s in staged.sources if s.kind == "delta"), ends)}

        def one(i: int, s: TensorSource, fd: int) -> tuple[TensorSource, int, list[bytes] | None]:
            """One tensor: its delta applied to the served one and written raw (a thread each: the
            work is torch, file I/O and hashing, which let go of the GIL)."""
            spec = specs[s.name]
            if s.kind == "delta":
                try:
                    new, k = apply_entry(self._read(self._sources[s.name]), _pread(fd, spec.encoded_bytes, s.offset),
                                         h.segments)
                except ValueError as e:
                    raise InvalidArgument(f"header.tensors[{i}] ({s.name!r}): its delta entry does not fit the "
                                          f"tensor: {e}; nothing was applied") from None
                data = _as_bytes(new)
                _pwrite(fd, data, places[s.name])  # the tensor as the worker reads it: raw, after the payload
                s = TensorSource(s.name, "raw", staged.path, places[s.name], s.dtype, s.shape)
            else:
                k = spec.nbytes // size
                data = _pread(fd, spec.nbytes, s.offset) if h.image_digest else None
            return s, k, (wire.segment_digests(data, s.shape, size, h.segments) if data is not None else None)

        try:
            fd = os.open(staged.path, os.O_RDWR)
            try:
                with ThreadPoolExecutor(STAGE_THREADS, thread_name_prefix="stage") as pool:
                    done = list(pool.map(one, range(len(staged.sources)), staged.sources,
                                         [fd] * len(staged.sources)))
            finally:
                os.close(fd)
        except OSError as e:
            if e.errno in DISK_FULL:
                raise ResourceExhausted(f"the staging directory {self.staging.directory} is full "
                                        f"({os.strerror(e.errno)}) while decoding a delta push; nothing was applied "
                                        f"(free room there or point --staging-dir at a larger one)") from e
            raise
        sources = {s.name: s for s, _, _ in done}
        digests = {s.name: d for s, _, d in done if d is not None}
        changed = sum(k for _, k, _ in done)
        image = b""
        if h.image_digest:
            image = self.image_digest(h.segments, digests)
            if image != h.image_digest:
                raise FailedPrecondition(f"header.image_digest {h.image_digest.hex()[:16]}... is not the digest of the "
                                         f"image this push makes here ({image.hex()[:16]}...): the replica's weights "
                                         f"differ from the sender's; nothing was applied, send a full push")
        return StagedImage(staged.version, self.version, staged.path, sources, staged.full, staged.nbytes, changed,
                           h.segments, digests, image, h.keep_previous, staged.transfer_seconds,
                           time.perf_counter() - t0)

    async def apply(self, staged: StagedWeights) -> UpdateResult:
        """Stage a verified push (a delta decoded, the image digest checked), then swap it in:
        drain generation, reload, reset caches, bump the version; or, with stage_only, keep it
        for commit(). The staged file is the engine's from here on: served from, staged, or
        recycled."""
        self._require_started()
        image = None
        try:
            async with self._apply_lock:
                self._check_newer(staged.version)
                base = staged.header.delta_base
                if base is not None and base != self.version:  # another push committed since the header
                    raise FailedPrecondition(f"header.delta.version is {base} but this replica serves version "
                                             f"{self.version} now: send a full push")
                image = await asyncio.to_thread(self._stage, staged)
                STAGE_SECONDS.observe(image.stage_seconds)
                if staged.header.stage_only:
                    self._release(self._slot.put(image))
                    log.info("weights v%d staged onto v%d: %d tensors, %.1f MB, staged in %.2f s; waiting for "
                             "CommitWeights", image.version, self.version, len(image.sources), image.nbytes / 1e6,
                             image.stage_seconds)
                    return self._result(image, self.version, staged=True)
                return await self._commit(image)
        finally:
            self._release(staged.path)

    async def commit(self, version: int) -> UpdateResult:
        """Apply the push staged for `version` (CommitWeights)."""
        self._require_started()
        async with self._apply_lock:
            self._release(self._slot.expired())
            image = self._slot.take(version)
            try:
                return await self._commit(image)
            finally:
                self._release(image.path)

    async def abort(self, version: int) -> bool:
        """Drop the push staged for `version` (AbortWeights); True when there was one."""
        self._require_started()
        async with self._apply_lock:
            image = self._slot.drop(version)
            self._release(image)
            if image is not None:
                log.info("weights v%d: the staged push was aborted; still serving v%d", version, self.version)
            return image is not None

    async def rollback(self, version: int) -> UpdateResult:
        """Put back the image served before `version` (RollbackWeights): the one way down."""
        self._require_started()
        async with self._apply_lock:
            if self._previous is None or self.version != version:
                kept = f"version {self._previous[0]} is kept" if self._previous else "no earlier image is kept"
                raise FailedPrecondition(f"cannot roll back version {version}: version {self.version} is served and "
                                         f"{kept} (only a push with header.keep_previous keeps one, until the next "
                                         f"push commits)")
            previous, sources = self._previous
            touched = sorted(n for n in self.served if sources[n] != self._sources[n])
            t0 = time.perf_counter()
            reloaded = await self._reload(sources, touched)
            dropped, self._sources, self._previous = self._sources, sources, None
            self.version = previous
            self._release(*{s.path for s in dropped.values()})
            WEIGHT_VERSION.set(self.version)
            seconds = time.perf_counter() - t0
            log.warning("weights v%d rolled back to v%d: %d tensors reloaded in %.2f s", version, previous, reloaded,
                        seconds)
            return UpdateResult(previous, version, 0, len(touched), seconds, tensors_reloaded=reloaded)

    def _check_newer(self, version: int) -> None:
        if version <= self.version:  # another push got in first
            raise FailedPrecondition(f"header.version must be greater than the served version {self.version}, "
                                     f"got {version}")
        if version <= self.highest_version:
            raise FailedPrecondition(f"header.version must be greater than {self.highest_version}, the highest "
                                     f"version this replica has served, got {version}")

    async def _reload(self, sources: dict[str, TensorSource], touched: list[str] | None) -> int:
        """Load `touched` (every tensor: None) from `sources` into the model, with generation
        drained meanwhile and the prefix cache reset after; the tensors the worker reloaded."""
        from vllm.v1.engine.exceptions import EngineDeadError

        self._open.clear()
        try:
            await self._idle.wait()
            rows = [(s.name, s.kind, s.path, s.offset, s.dtype, list(s.shape)) for s in sources.values()]
            reloaded = await self.llm.collective_rpc("rlhf_reload", args=(rows, touched))
            if not await self.llm.reset_prefix_cache():
                raise Unavailable("could not reset the prefix cache after loading weights")
            return int(reloaded[0]) if reloaded else 0
        except EngineDeadError as e:
            raise _engine_dead() from e
        finally:
            self._open.set()

    async def _commit(self, image: StagedImage) -> UpdateResult:
        """Swap a staged image in (the apply lock held)."""
        self._check_newer(image.version)
        if image.base_version != self.version:
            raise FailedPrecondition(f"the push of version {image.version} was staged onto version "
                                     f"{image.base_version}, but version {self.version} is served now; push again")
        t0 = time.perf_counter()
        sources = {**self._sources, **image.sources}
        # The worker needs every tensor of a layer to re-process it (fused qkv, packed GEMM
        # weights): it widens `touched` to whole layers, read from where each tensor lives now.
        reloaded = await self._reload(sources, None if image.full else sorted(image.sources))
        previous, old, dropped = self.version, self._sources, self._previous
        self._previous = (previous, old) if image.keep_previous else None
        self._sources, self.version = sources, image.version
        self.highest_version = max(self.highest_version, self.version)
        for name, digests in image.digests.items():
            self._digests[(sources[name], image.segments)] = digests
        kept = set(self._sources.values()) | (set(self._previous[1].values()) if self._previous else set())
        self._digests = {k: v for k, v in self._digests.items() if k[0] in kept}
        self._release(*{s.path for s in old.values()}, *({s.path for s in dropped[1].values()} if dropped else ()))
        apply_seconds = time.perf_counter() - t0
        WEIGHT_VERSION.set(self.version)
        UPDATE_BYTES.inc(image.nbytes)
        CHANGED_ELEMENTS.inc(image.changed)
        log.info("weights v%d -> v%d: %d tensors (%d reloaded), %.1f MB, applied in %.2f s", previous, self.version,
                 len(image.sources), reloaded, image.nbytes / 1e6, apply_seconds)
        return self._result(image, previous, apply_seconds=apply_seconds, reloaded=reloaded)

    def _result(self, image: StagedImage, previous: int, *, staged: bool = False, apply_seconds: float = 0.0,
                reloaded: int = 0) -> UpdateResult:
        return UpdateResult(image.version, previous, image.nbytes, len(image.sources), apply_seconds, staged=staged,
                            image_digest=image.image_digest, tensors_reloaded=reloaded,
                            stage_seconds=image.stage_seconds, changed_elements=image.changed,
                            transfer_seconds=image.transfer_seconds)

    def _release(self, *items) -> None:
        """Recycle the staging files given (paths or StagedImages) that nothing holds any more:
        not the served image, not the one kept for a rollback, not the staged push."""
        held = {s.path for s in self._sources.values()}
        if self._previous is not None:
            held |= {s.path for s in self._previous[1].values()}
        if self._slot.held is not None:
            held.add(self._slot.held.path)
        for item in items:
            path = item.path if isinstance(item, StagedImage) else item
            if path and path not in held and os.path.basename(path).startswith(FILE_PREFIX):
                self.staging.recycle(path)
                held.add(path)

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
                         engine_config=dict(self.engine_config), max_text_bytes=self.cfg.max_text_bytes,
                         staged_version=self._slot.version,
                         rollback_version=self._previous[0] if self._previous else 0)


def _pread(fd: int, size: int, offset: int) -> bytes:
    """`size` bytes at `offset` (one pread returns at most ~2 GiB on Linux: a large tensor takes several)."""
    parts, done = [], 0
    while done < size:
        part = os.pread(fd, size - done, offset + done)
        if not part:
            raise OSError(f"the staged push ends {size - done} bytes early")
        parts.append(part)
        done += len(part)
    return parts[0] if len(parts) == 1 else b"".join(parts)


def _pwrite(fd: int, data: memoryview, offset: int) -> None:
    done = 0
    while done < len(data):
        done += os.pwrite(fd, data[done:], offset + done)


def _as_bytes(t) -> memoryview:
    """The bytes of a CPU tensor (C order), without a copy when it is contiguous."""
    import torch

    return memoryview(t.contiguous().reshape(-1).view(torch.uint8).numpy())


def _config_value(value) -> str:
    return "" if value is None else str(value).removeprefix("torch.")


def _sampled_logprobs(c) -> list[float]:
    """The logprob of each sampled token (vLLM returns a dict per position)."""
    if not c.logprobs:
        return []
    return [float(pos[t].logprob) for t, pos in zip(c.token_ids, c.logprobs)]
