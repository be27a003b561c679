"""RewardService: proto <-> the reward model behind a dynamic batcher.

Every request is checked here (field by field, naming the field and the limit),
turned into token ids the one documented way (services.common.text), and its
sequences go to the shared Batcher, whose forward pass runs in a worker thread.
The OpenRLHF HTTP endpoint (services.reward.http) calls `score_pairs` too, so
both doors share one queue, one batcher and one set of limits.
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

from prometheus_client import Counter, Gauge, Histogram

from rlhf.v1 import common_pb2, reward_pb2, reward_pb2_grpc
from services.common.errors import InvalidArgument, ServiceError, Unavailable
from services.common.text import format_prompt
from services.reward.batcher import Batcher, BatchStats

log = logging.getLogger(__name__)

Input = Union[str, list[int]]
# Proto enum -> the mode names of services.reward.model.fit.
TRUNCATION_NAMES = {reward_pb2.TRUNCATION_UNSPECIFIED: "reject", reward_pb2.TRUNCATION_REJECT: "reject",
                    reward_pb2.TRUNCATION_KEEP_END_OF_PROMPT: "keep_end_of_prompt"}
MAX_REQUEST_ID_BYTES = 128
STREAM_WINDOW = 64  # requests of one ScoreStream in flight at once (back-pressure on a fast writer)

SAMPLES = Counter("rlhf_reward_samples_total", "Pairs scored.")
REQUESTS = Counter("rlhf_reward_requests_total", "Requests received, by method.", ["method"])
BATCH_SIZE = Histogram("rlhf_reward_batch_size", "Pairs per forward pass.",
                       buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512))
BATCH_TOKENS = Histogram("rlhf_reward_batch_tokens", "Padded tokens per forward pass (rows x longest row).",
                         buckets=(64, 256, 1024, 2048, 4096, 8192, 16384, 32768, 65536, 131072))
QUEUE_SECONDS = Histogram("rlhf_reward_queue_seconds", "Time a pair waited for its forward pass.",
                          buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10))
INFERENCE_SECONDS = Histogram("rlhf_reward_inference_seconds", "Time of one forward pass.",
                              buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10))
SCORE = Histogram("rlhf_reward_score", "Raw scores returned (their distribution drifts when the policy games the RM).",
                  buckets=(-10, -5, -3, -2, -1, -0.5, -0.25, 0, 0.25, 0.5, 1, 2, 3, 5, 10))
QUEUE_DEPTH = Gauge("rlhf_reward_queue_depth", "Pairs waiting for a forward pass.")


@dataclasses.dataclass
class RewardSettings:
    """The `rlhf serve reward` flags that the service itself uses."""
    model: str
    device: str = "auto"
    dtype: str = "auto"
    max_length: int | None = None
    max_pairs: int = 256
    max_text_bytes: int = 65536
    max_batch_size: int = 64
    max_batch_tokens: int = 16384
    max_wait_ms: float = 5.0
    max_queue: int = 4096
    http_port: int = 0
    host: str = "127.0.0.1"
    auth_token: str | None = None
    tls_cert: str | None = None  # the HTTP endpoint serves HTTPS with the gRPC certificate
    tls_key: str | None = None

    @classmethod
    def from_args(cls, args: argparse.Namespace, auth_token: str | None = None) -> "RewardSettings":
        return cls(model=args.model, device=args.device, dtype=args.dtype, max_length=args.max_length,
                   max_pairs=args.max_pairs, max_text_bytes=args.max_text_bytes,
                   max_batch_size=args.max_batch_size, max_batch_tokens=args.max_batch_tokens,
                   max_wait_ms=args.max_wait_ms, max_queue=args.max_queue, http_port=args.http_port,
                   host=args.host, auth_token=auth_token, tls_cert=args.tls_cert, tls_key=args.tls_key)

    def check(self) -> None:
        for name in ("max_pairs", "max_text_bytes", "max_batch_size", "max_batch_tokens", "max_queue"):
            if getattr(self, name) < 1:
                raise SystemExit(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.max_wait_ms < 0:
            raise SystemExit(f"--max-wait-ms must be >= 0, got {self.max_wait_ms}")


@dataclasses.dataclass
class PairResult:
    score: float
    raw_score: float
    truncated: bool
    num_tokens: int


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


class RewardServicer(reward_pb2_grpc.RewardServiceServicer):
    service_name = "rlhf.v1.RewardService"

    def __init__(self, settings: RewardSettings):
        settings.check()
        self.s = settings
        self.instance_id = uuid.uuid4().hex[:12]
        self._rm = self.model = self.tokenizer = None  # services.reward.model and what it loaded
        self.meta: dict = {}
        self.batcher: Batcher | None = None
        self.http_runner = None
        self.max_length = 0
        self.model_version = ""
        # One thread owns the tokenizer: HF fast tokenizers are not safe to share across threads.
        self._tokenize_pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="reward-tokenize")

    def add_to_server(self, server) -> None:
        reward_pb2_grpc.add_RewardServiceServicer_to_server(self, server)

    # ---- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        from services.reward import model as rm  # torch: only in the server process

        # Loading takes seconds; in a thread, so health keeps answering NOT_SERVING meanwhile.
        self._rm = rm
        self.model, self.tokenizer, meta = await asyncio.to_thread(
            rm.load_reward_model, self.s.model, self.s.device, self.s.dtype)
        self.meta = dict(meta or {})
        self.model_version = await asyncio.to_thread(weights_version, self.s.model)
        # The model's own limit (positions), not the max_length it was trained at (meta): longer pairs
        # score less reliably, but whether to send them is the caller's call.
        model_max = _model_max_length(self.model, self.tokenizer)
        if self.s.max_length is not None and not 1 <= self.s.max_length <= model_max:
            raise SystemExit(f"--max-length must be in [1, {model_max}] (the model's), got {self.s.max_length}")
        self.max_length = self.s.max_length or model_max
        if self.s.max_batch_tokens < self.max_length:
            raise SystemExit(f"--max-batch-tokens ({self.s.max_batch_tokens}) must be >= the max length "
                             f"({self.max_length}) so that any accepted pair fits in a batch")
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        self.eos_id = self.tokenizer.eos_token_id
        self.vocab_size = _vocab_size(self.model, self.tokenizer)
        # Training records these; without them normalize is the identity (mean 0, std 1).
        self.score_mean = float(self.meta.get("score_mean") or 0.0)
        self.score_std = float(self.meta.get("score_std") or 1.0)

        model, pad_id = self.model, self.pad_id
        self.batcher = Batcher(lambda batch: rm.score_batch(model, batch, pad_id),
                               max_batch_size=self.s.max_batch_size, max_batch_tokens=self.s.max_batch_tokens,
                               max_wait_s=self.s.max_wait_ms / 1000.0, max_queue=self.s.max_queue,
                               on_batch=_observe_batch)
        await self.batcher.start()
        QUEUE_DEPTH.set_function(lambda: self.batcher.depth if self.batcher else 0)
        if self.s.http_port:
            from services.reward.http import start_http
            self.http_runner = await start_http(self, self.s.host, self.s.http_port, self.s.auth_token,
                                                self.s.tls_cert, self.s.tls_key)
        log.info("reward model %s loaded: version %s, max length %d, vocab %d, mean %.4f std %.4f",
                 self.s.model, self.model_version, self.max_length, self.vocab_size, self.score_mean, self.score_std)

    async def stop(self) -> None:
        if self.http_runner is not None:
            await self.http_runner.cleanup()
            self.http_runner = None
        if self.batcher is not None:
            await self.batcher.stop()
            self.batcher = None
        self._tokenize_pool.shutdown(wait=False, cancel_futures=True)

    # ---- the core path, shared with HTTP ---------------------------------------------------

    def check_truncation(self, truncation: int) -> int:
        if truncation not in TRUNCATION_NAMES:
            raise InvalidArgument(
                f"truncation must be TRUNCATION_REJECT (1), TRUNCATION_KEEP_END_OF_PROMPT (2) or unset (0), "
                f"got {truncation}")
        return truncation

    def check_text(self, text: str, field: str) -> str:
        if not text:
            raise InvalidArgument(f"{field} must not be empty")
        n = len(text.encode("utf-8"))
        if n > self.s.max_text_bytes:
            raise InvalidArgument(f"{field} is {n} bytes, limit --max-text-bytes={self.s.max_text_bytes}")
        return text

    def check_ids(self, ids: Sequence[int], field: str) -> list[int]:
        if not ids:
            raise InvalidArgument(f"{field} must not be empty")
        if len(ids) > self.max_length:
            raise InvalidArgument(f"{field} holds {len(ids)} tokens, limit --max-length={self.max_length}")
        ids = list(ids)
        if min(ids) < 0 or max(ids) >= self.vocab_size:
            j, t = next((j, t) for j, t in enumerate(ids) if not 0 <= t < self.vocab_size)
            raise InvalidArgument(f"{field}[{j}] = {t} is not in [0, {self.vocab_size}) (the vocabulary)")
        return ids

    def encode(self, prompt: Input, response: Input, truncation: int, field: str) -> tuple[list[int], bool]:
        """prompt_ids + response_ids + [eos] fitted to max_length, exactly as training encodes a pair."""
        rm, tok, mode = self._rm, self.tokenizer, TRUNCATION_NAMES[truncation]
        try:
            if isinstance(prompt, str) and isinstance(response, str):
                return rm.encode(tok, prompt, response, self.max_length, mode)
            # Token ids are used as they are: the prompt's already templated, the response's
            # maybe ending in EOS already (a completion that stopped on it).
            prompt_ids = list(tok(format_prompt(tok, prompt), add_special_tokens=False)["input_ids"]) \
                if isinstance(prompt, str) else prompt
            response_ids = list(tok(response, add_special_tokens=False)["input_ids"]) \
                if isinstance(response, str) else list(response)
            if not response_ids or response_ids[-1] != self.eos_id:
                response_ids.append(self.eos_id)
            return rm.fit(prompt_ids, response_ids, self.max_length, mode)
        except InvalidArgument as exc:
            raise InvalidArgument(f"{field}: {exc} (--max-length={self.max_length}, "
                                  f"truncation={reward_pb2.Truncation.Name(truncation)})") from None

    async def score_pairs(self, pairs: Sequence[tuple[Input, Input]], truncation: int, normalize: bool,
                          field: str = "pairs", names: Sequence[str] | None = None) -> list[PairResult]:
        """Checked inputs in, one result per pair out (same order). Raises services.common.errors,
        naming a pair as names[i] (default f"{field}[i]")."""
        if self.batcher is None:
            raise Unavailable("the reward model is not loaded yet")
        self.check_truncation(truncation)
        names = names or [f"{field}[{i}]" for i in range(len(pairs))]
        # Tokenizing 256 long texts takes a while: off the event loop.
        encoded = await asyncio.get_running_loop().run_in_executor(
            self._tokenize_pool, lambda: [self.encode(p, r, truncation, name) for (p, r), name in zip(pairs, names)])
        raw = await self.batcher.submit([ids for ids, _ in encoded])
        SAMPLES.inc(len(raw))
        for r in raw:
            SCORE.observe(r)
        return [PairResult((r - self.score_mean) / self.score_std if normalize else r, r, truncated, len(ids))
                for r, (ids, truncated) in zip(raw, encoded)]

    def check_count(self, n: int, field: str = "pairs") -> None:
        if not 1 <= n <= self.s.max_pairs:
            raise InvalidArgument(f"{field} must hold 1 to {self.s.max_pairs} pairs (--max-pairs), got {n}")

    # ---- proto <-> core --------------------------------------------------------------------

    def _input(self, x: common_pb2.TextOrTokens, field: str) -> Input:
        kind = x.WhichOneof("input")
        if kind == "text":
            return self.check_text(x.text, f"{field}.text")
        if kind == "token_ids":
            return self.check_ids(x.token_ids.ids, f"{field}.token_ids.ids")
        raise InvalidArgument(f"{field} must not be empty (set text or token_ids)")

    async def _score(self, request: reward_pb2.ScoreRequest) -> reward_pb2.ScoreResponse:
        if len(request.request_id.encode()) > MAX_REQUEST_ID_BYTES:
            raise InvalidArgument(f"request_id is {len(request.request_id.encode())} bytes, limit {MAX_REQUEST_ID_BYTES}")
        self.check_count(len(request.pairs))
        self.check_truncation(request.truncation)
        pairs = [(self._input(p.prompt, f"pairs[{i}].prompt"), self._input(p.response, f"pairs[{i}].response"))
                 for i, p in enumerate(request.pairs)]
        results = await self.score_pairs(pairs, request.truncation, request.normalize)
        return reward_pb2.ScoreResponse(
            results=[reward_pb2.ScoreResult(score=r.score, raw_score=r.raw_score, truncated=r.truncated,
                                            num_tokens=r.num_tokens) for r in results],
            model_version=self.model_version, request_id=request.request_id)

    async def Score(self, request, context):
        REQUESTS.labels("Score").inc()
        return await self._score(request)

    async def ScoreStream(self, request_iterator, context):
        """Pipelined: each request is submitted as soon as it arrives; answers go out in arrival order."""
        REQUESTS.labels("ScoreStream").inc()
        inflight: asyncio.Queue = asyncio.Queue(maxsize=STREAM_WINDOW)

        async def read():
            try:
                async for request in request_iterator:
                    REQUESTS.labels("ScoreStream.message").inc()
                    await inflight.put(asyncio.ensure_future(self._score(request)))
            finally:
                await inflight.put(None)

        reader = asyncio.create_task(read())
        try:
            index = 0
            while (task := await inflight.get()) is not None:
                try:
                    reply = await task
                except ServiceError as exc:  # the status ends the stream; say which message caused it
                    raise type(exc)(f"ScoreStream message {index}: {exc}") from None
                yield reply
                index += 1
            await reader  # surfaces an error of the request stream itself
        finally:
            reader.cancel()
            while not inflight.empty():
                task = inflight.get_nowait()
                if task is not None:
                    task.cancel()

    async def Compare(self, request, context):
        REQUESTS.labels("Compare").inc()
        self.check_truncation(request.truncation)
        prompt = self._input(request.prompt, "prompt")
        first, second = self._input(request.first, "first"), self._input(request.second, "second")
        a, b = await self.score_pairs([(prompt, first), (prompt, second)], request.truncation, normalize=False,
                                      names=["(prompt, first)", "(prompt, second)"])
        return reward_pb2.CompareResponse(
            first_score=a.raw_score, second_score=b.raw_score, prob_first_preferred=sigmoid(a.raw_score - b.raw_score),
            truncated=a.truncated or b.truncated, model_version=self.model_version)

    async def GetModelInfo(self, request, context):
        REQUESTS.labels("GetModelInfo").inc()
        if self.model is None:
            raise Unavailable("the reward model is not loaded yet")
        config = self.model.config
        return reward_pb2.RewardModelInfo(
            model_name=pathlib.Path(self.s.model).resolve().name,
            architecture=(getattr(config, "architectures", None) or [type(self.model).__name__])[0],
            dtype=str(next(self.model.parameters()).dtype).removeprefix("torch."),
            max_length=self.max_length, model_version=self.model_version,
            score_mean=self.score_mean, score_std=self.score_std,
            eval_accuracy=float(self.meta.get("eval_accuracy") or 0.0), instance_id=self.instance_id,
            max_pairs=self.s.max_pairs, max_batch_size=self.s.max_batch_size, max_batch_tokens=self.s.max_batch_tokens)


def _observe_batch(stats: BatchStats) -> None:
    BATCH_SIZE.observe(stats.size)
    BATCH_TOKENS.observe(stats.padded_tokens)
    INFERENCE_SECONDS.observe(stats.inference_seconds)
    for q in stats.queue_seconds:
        QUEUE_SECONDS.observe(q)


def _model_max_length(model, tokenizer) -> int:
    limits = [getattr(model.config, "max_position_embeddings", None), getattr(tokenizer, "model_max_length", None)]
    limits = [int(x) for x in limits if x and x < 1_000_000]  # HF uses 1e30 for "no limit"
    return min(limits) if limits else 512


def _vocab_size(model, tokenizer) -> int:
    """Rows of the embedding: the ids the model can read (may exceed the tokenizer's, padded for speed)."""
    return int(getattr(model.config, "vocab_size", None) or len(tokenizer))
