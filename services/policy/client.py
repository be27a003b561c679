"""Clients of PolicyService, synchronous and asyncio. grpc + protobuf + stubs only.

    client = PolicyClient("127.0.0.1:50051")
    results = client.generate(["Hello"], max_tokens=32, temperature=0.0, logprobs=True)
    results = client.generate([[{"role": "user", "content": "Hello"}]])  # chat-templated by the server
    client.push_weights(model.state_dict(), version=1)

push_weights streams tensors without a second copy of the model on the sending side:
each tensor is converted to the served dtype on its own, its bytes are sliced into
chunks with memoryview and hashed as they go (the checksum travels last, XXH3-128 unless
digest="sha256" is asked for). A sender that must not hold the whole model (a sharded
trainer) passes TensorRefs: each is gathered when its bytes are due and dropped once sent.
Tensors are handled by duck typing, so this module never imports torch; a caller holding
torch tensors has torch in sys.modules already.

push() is the trainer's: the same stream with the header's other options (PushOptions: a
delta and its base, the image digest, staging for a two-phase commit, a relay plan) and
the bytes it sent counted, for the trainer's egress. A delta's payload is given as
TensorRefs whose get() returns each tensor's encoded entry (bytes-like), encoded by the
sender (services.ml.delta).
"""
from __future__ import annotations

import dataclasses
import sys
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Mapping
from typing import Any

from rlhf.v1 import common_pb2, policy_pb2, policy_pb2_grpc
from services.common.channel import create_channel
from services.common.config import ClientConfig
from services.policy.results import Completion, PromptResult
from services.policy.wire import DIGEST_ENUM, DIGESTS, DTYPE_ENUM, ELEMENT_SIZE, FINISH_NAME, PUSH_TOKEN_KEY, encode_chunk

SERVICE = "rlhf.v1.PolicyService"
# UpdateWeights with the requests passed through as serialized by weight_messages.
UPDATE_WEIGHTS = dict(method=f"/{SERVICE}/UpdateWeights", request_serializer=None,
                      response_deserializer=policy_pb2.UpdateWeightsResponse.FromString)
RETRY_METHODS = ((SERVICE, "Generate"), (SERVICE, "GetModelInfo"))
SAMPLING_FIELDS = {f.name for f in policy_pb2.SamplingParams.DESCRIPTOR.fields}


@dataclasses.dataclass(frozen=True)
class TensorRef:
    """A tensor known by name and shape before it exists. push_weights builds the header
    from these, then calls each get() exactly once, in order, when its bytes are due, and
    drops the result once they are sent. With encoded_bytes, get() returns that many bytes
    of a delta entry instead of the tensor (a delta push)."""
    name: str
    shape: tuple[int, ...]
    get: Callable[[], Any]
    encoded_bytes: int = 0


@dataclasses.dataclass(frozen=True)
class PushOptions:
    """The WeightsHeader fields beyond the tensors (policy.proto says what each does)."""
    full: bool = True
    delta_base: int | None = None  # a delta against this version (the TensorRefs carry encoded entries)
    base_digest: bytes = b""
    image_digest: bytes = b""
    digest_segments: int = 1
    stage_only: bool = False
    keep_previous: bool = False
    relay: tuple[str, ...] | None = None  # pass the push on to these replicas; () = report outcomes, relay to none
    fanout: int = 1


@dataclasses.dataclass
class PushResult:
    response: policy_pb2.UpdateWeightsResponse
    sent_bytes: int  # serialized messages sent, header and commit included: this client's egress
    payload_bytes: int  # the chunks' data alone


def to_results(response: policy_pb2.GenerateResponse) -> list[PromptResult]:
    return [PromptResult(list(r.prompt_token_ids), [
        Completion(c.index, list(c.token_ids), c.text, list(c.logprobs), FINISH_NAME[c.finish_reason],
                   c.weight_version, c.stop_string) for c in r.completions], list(r.prompt_logprobs))
            for r in response.results]


def _prompt(p) -> common_pb2.TextOrTokens:
    """A prompt: text, token ids, or a conversation ({"role", "content"} dicts)."""
    if isinstance(p, str):
        return common_pb2.TextOrTokens(text=p)
    if p and isinstance(p[0], Mapping):
        return common_pb2.TextOrTokens(messages=common_pb2.ChatMessages(messages=[
            common_pb2.ChatMessage(role=m["role"], content=m["content"]) for m in p]))
    return common_pb2.TextOrTokens(token_ids=common_pb2.TokenIds(ids=list(p)))


def sampling_params(**sampling) -> policy_pb2.SamplingParams:
    unknown = set(sampling) - SAMPLING_FIELDS
    if unknown:
        raise TypeError(f"unknown sampling parameters {sorted(unknown)}; known: {sorted(SAMPLING_FIELDS)}")
    return policy_pb2.SamplingParams(**{k: v for k, v in sampling.items() if v is not None})


def generate_request(prompts, require_weight_version: int = 0, request_id: str = "", **sampling):
    """prompts: texts, token id lists or conversations (a single one is one prompt)."""
    if isinstance(prompts, str) or (prompts and isinstance(prompts[0], (int, Mapping))):
        prompts = [prompts]
    return policy_pb2.GenerateRequest(prompts=[_prompt(p) for p in prompts], params=sampling_params(**sampling),
                                      require_weight_version=require_weight_version, request_id=request_id)


# ---- weight push ------------------------------------------------------------------------

def tensor_bytes(t, dtype: str) -> memoryview:
    """A C-ordered byte view of tensor `t` in `dtype`, copying only when it must (device,
    dtype, layout). Torch tensors and numpy arrays by duck typing; bytes-like objects are
    taken as they are (a delta's entries)."""
    if isinstance(t, (bytes, bytearray, memoryview)):
        return memoryview(t).cast("B")
    if hasattr(t, "detach"):  # torch.Tensor
        torch = sys.modules["torch"]
        t = t.detach().to(device="cpu", dtype=getattr(torch, dtype)).contiguous()
        if dtype == "bfloat16":  # numpy has no bfloat16: same bytes as int16
            t = t.view(torch.int16)
        return memoryview(t.numpy()).cast("B")
    np = sys.modules["numpy"]
    return memoryview(np.ascontiguousarray(t, dtype=np.dtype(dtype).newbyteorder("<"))).cast("B")


def _same_storage(t) -> int | None:
    ptr = getattr(t, "data_ptr", None)
    return ptr() if callable(ptr) else None


def plan_push(named_tensors, info: policy_pb2.PolicyModelInfo) -> list[tuple]:
    """(name, get, shape) in sending order, from a state_dict, (name, tensor) pairs or
    TensorRefs (a delta's with a fourth item, encoded_bytes). A tied alias the server does
    not list (an lm_head sharing the embedding's storage, as in a Hugging Face state_dict)
    is sent once, under the name the server knows; TensorRefs are sent as given."""
    items = list(named_tensors.items() if isinstance(named_tensors, Mapping) else named_tensors)
    refs = [i for i in items if isinstance(i, TensorRef)]
    if refs:
        if len(refs) != len(items):
            raise TypeError("push_weights takes TensorRefs or (name, tensor) pairs, not a mix of them")
        return [(r.name, r.get, tuple(int(d) for d in r.shape), *((r.encoded_bytes,) if r.encoded_bytes else ()))
                for r in refs]
    accepted = {t.name for t in info.tensors}
    listed_ptrs = {_same_storage(t) for name, t in items if name in accepted} - {None}
    return [(name, lambda t=t: t, tuple(int(d) for d in t.shape)) for name, t in items
            if name in accepted or _same_storage(t) not in listed_ptrs]


def weights_header(plan, version: int, dtype: str, digest: str = "xxh3_128",
                   options: PushOptions | None = None) -> policy_pb2.WeightsHeader:
    o = options or PushOptions()
    size = ELEMENT_SIZE[dtype]
    specs = []
    for name, _, shape, *encoded in plan:
        encoded = encoded[0] if encoded else 0
        n = 1
        for d in shape:
            n *= d
        specs.append(policy_pb2.TensorSpec(name=name, dtype=DTYPE_ENUM[dtype], shape=shape, nbytes=n * size,
                                           encoded_bytes=encoded))
    header = policy_pb2.WeightsHeader(version=version, tensors=specs, full=o.full, digest=DIGEST_ENUM[digest],
                                      image_digest=o.image_digest, digest_segments=o.digest_segments,
                                      stage_only=o.stage_only, keep_previous=o.keep_previous)
    if o.delta_base is not None:
        header.delta.CopyFrom(policy_pb2.DeltaBase(version=o.delta_base, image_digest=o.base_digest))
    if o.relay is not None:
        header.relay.CopyFrom(policy_pb2.RelayPlan(addresses=list(o.relay), fanout=o.fanout))
    return header


def weight_messages(plan, version: int, full: bool, dtype: str, chunk_bytes: int,
                    digest: str = "xxh3_128", options: PushOptions | None = None) -> Iterator[bytes]:
    """The serialized UpdateWeightsRequest messages of a push: header, chunks, commit.
    One converted tensor alive at a time: each get() is called when its bytes are due and
    its result dropped once they are sent. Small tensors are packed together so a layer
    norm does not cost a message of its own. Chunks are encoded by services.policy.wire
    (one copy of the payload); `UpdateWeightsRequest.FromString` reads any of them."""
    options = dataclasses.replace(options or PushOptions(), full=full)
    header = weights_header(plan, version, dtype, digest, options)
    specs = list(header.tensors)
    yield policy_pb2.UpdateWeightsRequest(header=header).SerializeToString()
    checksum = DIGESTS[digest]()
    offset = 0
    pending = bytearray()

    def chunk(data) -> bytes:
        nonlocal offset
        checksum.update(data)
        msg = encode_chunk(offset, data)
        offset += len(data)
        return msg

    for (name, get, shape, *_), spec in zip(plan, specs):
        encoded = spec.encoded_bytes
        view = tensor_bytes(get(), dtype)
        if len(view) != (encoded or spec.nbytes):
            if encoded:
                raise ValueError(f"the delta entry of {name!r} has {len(view)} bytes; its TensorRef announced {encoded}")
            raise ValueError(f"tensor {name!r} has {len(view)} bytes in {dtype}; its shape {list(shape)} "
                             f"announced {spec.nbytes}")
        start = 0
        if pending:  # top up the pending chunk first
            take = min(chunk_bytes - len(pending), len(view))
            pending += view[:take]
            start = take
            if len(pending) == chunk_bytes:
                yield chunk(pending)
                pending = bytearray()
        while len(view) - start >= chunk_bytes:
            yield chunk(view[start:start + chunk_bytes])
            start += chunk_bytes
        pending += view[start:]
        del view  # the tensor too, unless the caller still holds it
    if pending:
        yield chunk(pending)
    yield policy_pb2.UpdateWeightsRequest(commit=policy_pb2.WeightsCommit(digest=checksum.digest())).SerializeToString()


# 1 MiB: against the real server on loopback, pushes of 1 MiB chunks ran at about 2 GB/s,
# 256 KiB at 1.0-1.35 and 4 MiB at 0.4-0.6 (gRPC Python joins a message's slices into one
# bytes object, which costs more for larger messages; smaller ones cost more per message).
CHUNK_BYTES = 1 << 20


# ---- clients ----------------------------------------------------------------------------

def _push_metadata(config: ClientConfig | None) -> tuple[tuple[str, str], ...] | None:
    token = (config or ClientConfig.from_env()).push_token
    return ((PUSH_TOKEN_KEY, token),) if token else None


class _Counted:
    """The messages of a push, their bytes counted as they go (the sender's egress)."""

    def __init__(self, messages: Iterator[bytes], payload: int):
        self.messages, self.sent, self.payload = messages, 0, payload

    def __iter__(self):
        for msg in self.messages:
            self.sent += len(msg)
            yield msg

    def result(self, response) -> PushResult:
        return PushResult(response, self.sent, self.payload)


class PolicyClient:
    def __init__(self, target: str, config: ClientConfig | None = None, *, timeout: float | None = None):
        self.channel = create_channel(target, config, retry_methods=RETRY_METHODS)
        self.stub = policy_pb2_grpc.PolicyServiceStub(self.channel)
        self._update_weights = self.channel.stream_unary(**UPDATE_WEIGHTS)
        self.timeout = timeout
        self.push_metadata = _push_metadata(config)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> "PolicyClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def model_info(self, timeout: float | None = None) -> policy_pb2.PolicyModelInfo:
        return self.stub.GetModelInfo(common_pb2.GetModelInfoRequest(), timeout=timeout or self.timeout)

    def generate(self, prompts, *, require_weight_version: int = 0, request_id: str = "", raw: bool = False,
                 **sampling) -> list[PromptResult] | policy_pb2.GenerateResponse:
        """prompts: texts, token id lists or conversations; sampling: the fields of SamplingParams."""
        reply = self.stub.Generate(generate_request(prompts, require_weight_version, request_id, **sampling),
                                   timeout=self.timeout)
        return reply if raw else to_results(reply)

    def generate_stream(self, prompt, *, require_weight_version: int = 0, request_id: str = "",
                        **sampling) -> Iterator[policy_pb2.GenerateStreamResponse]:
        return self.stub.GenerateStream(policy_pb2.GenerateStreamRequest(
            prompt=_prompt(prompt), params=sampling_params(**sampling),
            require_weight_version=require_weight_version, request_id=request_id), timeout=self.timeout)

    def push_weights(self, named_tensors: Mapping | Iterable, version: int, *, full: bool = True,
                     chunk_bytes: int = CHUNK_BYTES, digest: str = "xxh3_128",
                     timeout: float | None = None) -> policy_pb2.UpdateWeightsResponse:
        """Stream a state_dict, (name, tensor) pairs or TensorRefs as weight version `version`."""
        info = self.model_info()
        plan = plan_push(named_tensors, info)
        return self._update_weights(weight_messages(plan, version, full, info.dtype, chunk_bytes, digest),
                                    timeout=timeout or self.timeout, metadata=self.push_metadata)

    def push(self, named_tensors: Mapping | Iterable, version: int, dtype: str, options: PushOptions | None = None,
             *, chunk_bytes: int = CHUNK_BYTES, timeout: float | None = None) -> PushResult:
        """A push with every header option (PushOptions), in the served `dtype` the caller
        knows already (GetModelInfo), its egress counted."""
        options = options or PushOptions()
        plan = plan_push(named_tensors, policy_pb2.PolicyModelInfo(tensors=[]) if options.delta_base is not None
                         else self.model_info())
        header = weights_header(plan, version, dtype, options=options)
        payload = sum(t.encoded_bytes or t.nbytes for t in header.tensors)
        messages = _Counted(weight_messages(plan, version, options.full, dtype, chunk_bytes, options=options), payload)
        response = self._update_weights(iter(messages), timeout=timeout or self.timeout, metadata=self.push_metadata)
        return messages.result(response)

    def commit_weights(self, version: int, timeout: float | None = None) -> policy_pb2.UpdateWeightsResponse:
        return self.stub.CommitWeights(policy_pb2.CommitWeightsRequest(version=version),
                                       timeout=timeout or self.timeout, metadata=self.push_metadata)

    def abort_weights(self, version: int, timeout: float | None = None) -> bool:
        return self.stub.AbortWeights(policy_pb2.AbortWeightsRequest(version=version), timeout=timeout or self.timeout,
                                      metadata=self.push_metadata).aborted

    def rollback_weights(self, version: int, timeout: float | None = None) -> policy_pb2.UpdateWeightsResponse:
        return self.stub.RollbackWeights(policy_pb2.RollbackWeightsRequest(version=version),
                                         timeout=timeout or self.timeout, metadata=self.push_metadata)


class AsyncPolicyClient:
    def __init__(self, target: str, config: ClientConfig | None = None, *, timeout: float | None = None):
        self.channel = create_channel(target, config, aio=True, retry_methods=RETRY_METHODS)
        self.stub = policy_pb2_grpc.PolicyServiceStub(self.channel)
        self._update_weights = self.channel.stream_unary(**UPDATE_WEIGHTS)
        self.timeout = timeout
        self.push_metadata = _push_metadata(config)

    async def close(self) -> None:
        await self.channel.close()

    async def __aenter__(self) -> "AsyncPolicyClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def model_info(self, timeout: float | None = None) -> policy_pb2.PolicyModelInfo:
        return await self.stub.GetModelInfo(common_pb2.GetModelInfoRequest(), timeout=timeout or self.timeout)

    async def generate(self, prompts, *, require_weight_version: int = 0, request_id: str = "", raw: bool = False,
                       **sampling) -> list[PromptResult] | policy_pb2.GenerateResponse:
        reply = await self.stub.Generate(generate_request(prompts, require_weight_version, request_id, **sampling),
                                         timeout=self.timeout)
        return reply if raw else to_results(reply)

    async def generate_stream(self, prompt, *, require_weight_version: int = 0, request_id: str = "",
                              **sampling) -> AsyncIterator[policy_pb2.GenerateStreamResponse]:
        call = self.stub.GenerateStream(policy_pb2.GenerateStreamRequest(
            prompt=_prompt(prompt), params=sampling_params(**sampling),
            require_weight_version=require_weight_version, request_id=request_id), timeout=self.timeout)
        async for msg in call:
            yield msg

    async def push_weights(self, named_tensors: Mapping | Iterable, version: int, *, full: bool = True,
                           chunk_bytes: int = CHUNK_BYTES, digest: str = "xxh3_128",
                           timeout: float | None = None) -> policy_pb2.UpdateWeightsResponse:
        info = await self.model_info()
        plan = plan_push(named_tensors, info)

        async def messages():
            # Converting and hashing a chunk is quick; the generator runs between sends.
            for msg in weight_messages(plan, version, full, info.dtype, chunk_bytes, digest):
                yield msg

        return await self._update_weights(messages(), timeout=timeout or self.timeout, metadata=self.push_metadata)
