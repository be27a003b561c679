"""Clients of RewardService, sync and asyncio. Base install only: grpc + protobuf + the stubs.

    with RewardClient("localhost:50052") as rm:
        scores = rm.scores([("What is 2+2?", "4"), ("Hi", "Hello!")])

A prompt or response is a str (the server tokenizes it and applies the chat template to a
prompt), a list of token ids (used as they are: the prompt ids must already be templated, the
response ids with or without the final EOS), or, for a prompt, a conversation: a list of
{"role": ..., "content": ...} dicts, rendered by the served model's chat template.
"""
from __future__ import annotations

from typing import AsyncIterable, AsyncIterator, Iterable, Iterator, Mapping, Sequence, Union

from rlhf.v1 import common_pb2, reward_pb2, reward_pb2_grpc
from services.common.channel import create_channel
from services.common.config import ClientConfig

SERVICE = "rlhf.v1.RewardService"
# Idempotent calls, retried on UNAVAILABLE (a restarting or draining replica). Not LoadModel: a
# retry would not know whether the swap it asked for happened (call it again: see load_model).
RETRY_METHODS = ((SERVICE, "Score"), (SERVICE, "Compare"), (SERVICE, "GetModelInfo"))

Text = Union[str, Sequence[int], Sequence[Mapping[str, str]]]
Pair = tuple[Text, Text]


def text_or_tokens(x: Text) -> common_pb2.TextOrTokens:
    if isinstance(x, str):
        return common_pb2.TextOrTokens(text=x)
    if x and isinstance(x[0], Mapping):
        return common_pb2.TextOrTokens(messages=common_pb2.ChatMessages(
            messages=[common_pb2.ChatMessage(role=m["role"], content=m["content"]) for m in x]))
    return common_pb2.TextOrTokens(token_ids=common_pb2.TokenIds(ids=list(x)))


def truncation_value(t: str | int) -> int:
    """"reject" / "keep_end_of_prompt" (the enum's names, lower case, without TRUNCATION_) or the
    enum value itself (passed through unchecked: the server checks)."""
    if isinstance(t, str):
        try:
            return reward_pb2.Truncation.Value("TRUNCATION_" + t.upper())
        except ValueError:
            raise ValueError(f"truncation must be reject or keep_end_of_prompt, got {t!r}") from None
    return int(t)


def score_request(pairs: Iterable[Pair], truncation: str | int = "reject", normalize: bool = False,
                  request_id: str = "") -> reward_pb2.ScoreRequest:
    return reward_pb2.ScoreRequest(
        pairs=[reward_pb2.ScorePair(prompt=text_or_tokens(p), response=text_or_tokens(r)) for p, r in pairs],
        truncation=truncation_value(truncation), normalize=normalize, request_id=request_id)


def compare_request(prompt: Text, first: Text, second: Text, truncation: str | int = "reject") -> reward_pb2.CompareRequest:
    return reward_pb2.CompareRequest(prompt=text_or_tokens(prompt), first=text_or_tokens(first),
                                     second=text_or_tokens(second), truncation=truncation_value(truncation))


def load_model_request(path: str, expected_weights_version: str = "", if_version: str = "",
                       ) -> reward_pb2.LoadModelRequest:
    return reward_pb2.LoadModelRequest(model_path=path, expected_weights_version=expected_weights_version,
                                       if_version=if_version)


class RewardClient:
    """Blocking client. `timeout` (seconds) applies to each unary call."""

    def __init__(self, target: str, config: ClientConfig | None = None, timeout: float | None = 60.0):
        self.channel = create_channel(target, config, retry_methods=RETRY_METHODS)
        self.stub = reward_pb2_grpc.RewardServiceStub(self.channel)
        self.timeout = timeout

    def score(self, pairs: Iterable[Pair], truncation: str | int = "reject", normalize: bool = False,
              request_id: str = "") -> reward_pb2.ScoreResponse:
        return self.stub.Score(score_request(pairs, truncation, normalize, request_id), timeout=self.timeout)

    def scores(self, pairs: Iterable[Pair], truncation: str | int = "reject", normalize: bool = False) -> list[float]:
        return [r.score for r in self.score(pairs, truncation, normalize).results]

    def compare(self, prompt: Text, first: Text, second: Text,
                truncation: str | int = "reject") -> reward_pb2.CompareResponse:
        return self.stub.Compare(compare_request(prompt, first, second, truncation), timeout=self.timeout)

    def model_info(self) -> reward_pb2.RewardModelInfo:
        return self.stub.GetModelInfo(common_pb2.GetModelInfoRequest(), timeout=self.timeout)

    def load_model(self, path: str, *, expected_weights_version: str = "", if_version: str = "",
                   timeout: float | None = None) -> reward_pb2.LoadModelResponse:
        """Serve the reward model in `path` (a directory on the server, under its --model-root)
        from now on; see LoadModel in docs/contracts.md. `timeout`: seconds (default: the
        client's). A deadline that runs out does not stop the load: call again with the same path
        to wait for it and learn how it ended. Needs the admin token when the server has one."""
        return self.stub.LoadModel(load_model_request(path, expected_weights_version, if_version),
                                   timeout=timeout or self.timeout)

    def score_stream(self, batches: Iterable[Iterable[Pair]], truncation: str | int = "reject",
                     normalize: bool = False) -> Iterator[reward_pb2.ScoreResponse]:
        """One ScoreResponse per batch of pairs, in order; the server works on later
        batches while earlier ones are being answered."""
        requests = (score_request(b, truncation, normalize, request_id=str(i)) for i, b in enumerate(batches))
        return self.stub.ScoreStream(requests)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> "RewardClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class AsyncRewardClient:
    """asyncio client with the same methods as RewardClient."""

    def __init__(self, target: str, config: ClientConfig | None = None, timeout: float | None = 60.0):
        self.channel = create_channel(target, config, aio=True, retry_methods=RETRY_METHODS)
        self.stub = reward_pb2_grpc.RewardServiceStub(self.channel)
        self.timeout = timeout

    async def score(self, pairs: Iterable[Pair], truncation: str | int = "reject", normalize: bool = False,
                    request_id: str = "") -> reward_pb2.ScoreResponse:
        return await self.stub.Score(score_request(pairs, truncation, normalize, request_id), timeout=self.timeout)

    async def scores(self, pairs: Iterable[Pair], truncation: str | int = "reject",
                     normalize: bool = False) -> list[float]:
        return [r.score for r in (await self.score(pairs, truncation, normalize)).results]

    async def compare(self, prompt: Text, first: Text, second: Text,
                      truncation: str | int = "reject") -> reward_pb2.CompareResponse:
        return await self.stub.Compare(compare_request(prompt, first, second, truncation), timeout=self.timeout)

    async def model_info(self) -> reward_pb2.RewardModelInfo:
        return await self.stub.GetModelInfo(common_pb2.GetModelInfoRequest(), timeout=self.timeout)

    async def load_model(self, path: str, *, expected_weights_version: str = "", if_version: str = "",
                         timeout: float | None = None) -> reward_pb2.LoadModelResponse:
        return await self.stub.LoadModel(load_model_request(path, expected_weights_version, if_version),
                                         timeout=timeout or self.timeout)

    async def score_stream(self, batches: Iterable[Iterable[Pair]] | AsyncIterable[Iterable[Pair]],
                           truncation: str | int = "reject",
                           normalize: bool = False) -> AsyncIterator[reward_pb2.ScoreResponse]:
        async def requests():
            i = 0
            if hasattr(batches, "__aiter__"):
                async for b in batches:
                    yield score_request(b, truncation, normalize, request_id=str(i))
                    i += 1
            else:
                for b in batches:
                    yield score_request(b, truncation, normalize, request_id=str(i))
                    i += 1

        async for response in self.stub.ScoreStream(requests()):
            yield response

    async def close(self) -> None:
        await self.channel.close()

    async def __aenter__(self) -> "AsyncRewardClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()
