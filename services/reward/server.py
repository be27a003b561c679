"""RewardService over gRPC: messages in, the core's dataclasses out, field by field.

All checks, encoding and scoring are the core's (services.reward.scorer); this module turns
protobuf into the core's inputs (naming each field as the contract does) and the results back.
"""
from __future__ import annotations

import asyncio

from rlhf.v1 import common_pb2, reward_pb2, reward_pb2_grpc
from services.common.errors import InvalidArgument, ServiceError
from services.common.text import ChatMessage
from services.reward.scorer import CompareResult, LoadResult, ModelInfo, Pair, PairResult, Scorer
from services.reward.tokens import Input

SERVICE_NAME = reward_pb2.DESCRIPTOR.services_by_name["RewardService"].full_name
MAX_REQUEST_ID_BYTES = 128
STREAM_WINDOW = 64  # requests of one ScoreStream in flight at once (back-pressure on a fast writer)


def truncation_name(value: int) -> str:
    """The core's name of a Truncation enum value: TRUNCATION_KEEP_END_OF_PROMPT -> keep_end_of_prompt."""
    if value == reward_pb2.TRUNCATION_UNSPECIFIED:
        return "reject"
    try:
        return reward_pb2.Truncation.Name(value).removeprefix("TRUNCATION_").lower()
    except ValueError:
        raise InvalidArgument(f"truncation must be TRUNCATION_REJECT (1), TRUNCATION_KEEP_END_OF_PROMPT (2) "
                              f"or unset (0), got {value}") from None


def _input(x: common_pb2.TextOrTokens, field: str) -> tuple[Input, str]:
    """The core's form of one input, and its field name down to the set member."""
    kind = x.WhichOneof("input")
    if kind == "text":
        return x.text, f"{field}.text"
    if kind == "token_ids":
        return list(x.token_ids.ids), f"{field}.token_ids.ids"
    if kind == "messages":
        return tuple(ChatMessage(m.role, m.content) for m in x.messages.messages), f"{field}.messages.messages"
    raise InvalidArgument(f"{field} must not be empty (set text, token_ids or messages)")


def _pair(prompt: common_pb2.TextOrTokens, response: common_pb2.TextOrTokens, name: str,
          prompt_field: str, response_field: str) -> Pair:
    (p, pf), (r, rf) = _input(prompt, prompt_field), _input(response, response_field)
    return Pair(p, r, name, pf, rf)


def _result(r: PairResult) -> reward_pb2.ScoreResult:
    return reward_pb2.ScoreResult(score=r.score, raw_score=r.raw_score, truncated=r.truncated,
                                  num_tokens=r.num_tokens, components=r.components, model_version=r.model_version)


def _compare(r: CompareResult) -> reward_pb2.CompareResponse:
    return reward_pb2.CompareResponse(first_score=r.first_score, second_score=r.second_score,
                                      prob_first_preferred=r.prob_first_preferred, truncated=r.truncated,
                                      model_version=r.model_version)


def _loaded(r: LoadResult) -> reward_pb2.LoadModelResponse:
    return reward_pb2.LoadModelResponse(model_version=r.model_version, previous_version=r.previous_version,
                                        load_seconds=r.load_seconds, weights_version=r.weights_version,
                                        model_path=r.model_path, changed=r.changed)


def _info(i: ModelInfo) -> reward_pb2.RewardModelInfo:
    return reward_pb2.RewardModelInfo(
        model_name=i.model_name, architecture=i.architecture, dtype=i.dtype, max_length=i.max_length,
        model_version=i.model_version, score_mean=i.score_mean, score_std=i.score_std,
        eval_accuracy=i.eval_accuracy, instance_id=i.instance_id, max_pairs=i.max_pairs,
        max_batch_size=i.max_batch_size, max_batch_tokens=i.max_batch_tokens,
        components=[reward_pb2.RewardComponent(name=c.name, weight=c.weight, kind=c.kind, source=c.source)
                    for c in i.components],
        max_text_bytes=i.max_text_bytes, weights_version=i.weights_version, model_path=i.model_path,
        loaded_at=i.loaded_at, model_roots=i.model_roots)


class RewardServicer(reward_pb2_grpc.RewardServiceServicer):
    def __init__(self, scorer: Scorer):
        self.scorer = scorer

    def add_to_server(self, server) -> None:
        reward_pb2_grpc.add_RewardServiceServicer_to_server(self, server)

    async def _score(self, request: reward_pb2.ScoreRequest) -> reward_pb2.ScoreResponse:
        if len(request.request_id.encode()) > MAX_REQUEST_ID_BYTES:
            raise InvalidArgument(f"request_id is {len(request.request_id.encode())} bytes, limit {MAX_REQUEST_ID_BYTES}")
        self.scorer.check_count(len(request.pairs))
        truncation = truncation_name(request.truncation)
        pairs = [_pair(p.prompt, p.response, f"pairs[{i}]", f"pairs[{i}].prompt", f"pairs[{i}].response")
                 for i, p in enumerate(request.pairs)]
        results = await self.scorer.score(pairs, truncation, request.normalize)
        # One version scored them all (the one served when the request came)
        return reward_pb2.ScoreResponse(results=[_result(r) for r in results], model_version=results[0].model_version,
                                        request_id=request.request_id)

    async def Score(self, request, context):
        return await self._score(request)

    async def ScoreStream(self, request_iterator, context):
        """Pipelined: each request is submitted as soon as it arrives; answers go out in arrival order."""
        inflight: asyncio.Queue = asyncio.Queue(maxsize=STREAM_WINDOW)

        async def read():
            try:
                async for request in request_iterator:
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
        truncation = truncation_name(request.truncation)
        first = _pair(request.prompt, request.first, "(prompt, first)", "prompt", "first")
        second = _pair(request.prompt, request.second, "(prompt, second)", "prompt", "second")
        return _compare(await self.scorer.compare(first, second, truncation))

    async def GetModelInfo(self, request, context):
        return _info(self.scorer.info())

    async def LoadModel(self, request, context):
        return _loaded(await self.scorer.load_model(request.model_path, request.expected_weights_version,
                                                    request.if_version))
