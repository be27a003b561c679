"""PolicyService over gRPC: proto <-> services.policy.engine, field by field.

Transport only: no torch and no vLLM here (the engine imports vLLM when it starts), no
push protocol either (weights.PushSession). Bad input raises the exceptions of
services.common.errors; the runtime maps them to status codes.
"""
from __future__ import annotations

import asyncio
import logging
import time

import grpc

from rlhf.v1 import common_pb2, policy_pb2, policy_pb2_grpc
from services.common.errors import DeadlineExceeded, FailedPrecondition, InvalidArgument, ServiceError
from services.policy.engine import INSTANCE_ID, PolicyEngine
from services.common.text import ChatMessage
from services.policy.limits import Chat, Prompt, Sampling
from services.policy.metrics import UPDATE_SECONDS, UPDATES
from services.policy.weights import TensorSpec
from services.policy.wire import DIGEST_NAME, DTYPE_ENUM, DTYPE_NAME, FINISH_ENUM, Chunk, decode_request

log = logging.getLogger(__name__)


def _prompt(p: common_pb2.TextOrTokens, field: str) -> Prompt:
    kind = p.WhichOneof("input")
    if kind == "text":
        return p.text
    if kind == "token_ids":
        return list(p.token_ids.ids)
    if kind == "messages":
        return Chat(tuple(ChatMessage(m.role, m.content) for m in p.messages.messages))
    raise InvalidArgument(f"{field} must set text, token_ids or messages")


def _sampling(p: policy_pb2.SamplingParams) -> Sampling:
    opt = lambda name: getattr(p, name) if p.HasField(name) else None  # noqa: E731
    return Sampling(n=opt("n"), temperature=opt("temperature"), top_p=opt("top_p"), top_k=opt("top_k"),
                    max_tokens=opt("max_tokens"), stop=list(p.stop), stop_token_ids=list(p.stop_token_ids),
                    seed=opt("seed"), ignore_eos=p.ignore_eos, logprobs=p.logprobs)


def _spec(t: TensorSpec) -> policy_pb2.TensorSpec:
    return policy_pb2.TensorSpec(name=t.name, dtype=DTYPE_ENUM[t.dtype], shape=list(t.shape), nbytes=t.nbytes)


async def _within(requests, idle_s: float):
    """The stream's messages; DeadlineExceeded when none comes for `idle_s` seconds (a
    stalled pusher must not hold its staging file and a file descriptor for ever)."""
    it = aiter(requests)
    while True:
        try:
            msg = await asyncio.wait_for(anext(it), idle_s)
        except StopAsyncIteration:
            return
        except TimeoutError:
            raise DeadlineExceeded(f"UpdateWeights: no message for {idle_s:g} s (the server's "
                                   f"--push-idle-timeout-s); the push was dropped, nothing was applied") from None
        yield msg


class PolicyServicer(policy_pb2_grpc.PolicyServiceServicer):
    service_name = "rlhf.v1.PolicyService"

    def __init__(self, engine: PolicyEngine, *, push_idle_timeout_s: float = 60.0):
        self.engine = engine
        self.push_idle_timeout_s = push_idle_timeout_s

    def add_to_server(self, server: grpc.aio.Server) -> None:
        # The generated add_PolicyServiceServicer_to_server, but UpdateWeights reads its
        # chunks with services.policy.wire (no protobuf copies of the payload).
        def codec(request, response):
            return dict(request_deserializer=request.FromString, response_serializer=response.SerializeToString)

        pb = policy_pb2
        handlers = {
            "Generate": grpc.unary_unary_rpc_method_handler(self.Generate, **codec(pb.GenerateRequest,
                                                                                   pb.GenerateResponse)),
            "GenerateStream": grpc.unary_stream_rpc_method_handler(
                self.GenerateStream, **codec(pb.GenerateStreamRequest, pb.GenerateStreamResponse)),
            "UpdateWeights": grpc.stream_unary_rpc_method_handler(
                self.UpdateWeights, request_deserializer=decode_request,
                response_serializer=pb.UpdateWeightsResponse.SerializeToString),
            "GetModelInfo": grpc.unary_unary_rpc_method_handler(
                self.GetModelInfo, **codec(common_pb2.GetModelInfoRequest, pb.PolicyModelInfo)),
        }
        assert set(handlers) == set(pb.DESCRIPTOR.services_by_name["PolicyService"].methods_by_name)
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(self.service_name, handlers),))
        server.add_registered_method_handlers(self.service_name, handlers)

    async def start(self) -> None:
        await self.engine.start()

    async def stop(self) -> None:
        await self.engine.stop()

    async def fatal(self) -> str:
        return await self.engine.dead()

    async def Generate(self, request, context):
        prompts = [_prompt(p, f"prompts[{i}]") for i, p in enumerate(request.prompts)]
        results = await self.engine.generate(prompts, _sampling(request.params),
                                             require_version=request.require_weight_version,
                                             request_id=request.request_id)
        return policy_pb2.GenerateResponse(
            results=[policy_pb2.PromptResult(
                prompt_token_ids=r.prompt_token_ids,
                completions=[policy_pb2.Completion(
                    index=c.index, token_ids=c.token_ids, text=c.text, logprobs=c.logprobs,
                    finish_reason=FINISH_ENUM[c.finish_reason], weight_version=c.weight_version,
                    stop_string=c.stop_string) for c in r.completions],
            ) for r in results],
            instance_id=INSTANCE_ID)

    async def GenerateStream(self, request, context):
        if not request.HasField("prompt"):
            raise InvalidArgument("prompt must set text, token_ids or messages")
        stream = self.engine.generate_stream(_prompt(request.prompt, "prompt"), _sampling(request.params),
                                             require_version=request.require_weight_version,
                                             request_id=request.request_id)
        async for d in stream:
            yield policy_pb2.GenerateStreamResponse(
                index=d.index, token_ids=d.token_ids, text=d.text, logprobs=d.logprobs,
                finish_reason=FINISH_ENUM[d.finish_reason] if d.finish_reason else policy_pb2.FINISH_REASON_UNSPECIFIED,
                weight_version=d.weight_version, prompt_token_ids=d.prompt_token_ids)

    async def UpdateWeights(self, request_iterator, context):
        t0 = time.perf_counter()
        session = self.engine.push_session()
        result = "error"
        try:
            async for msg in _within(request_iterator, self.push_idle_timeout_s):
                if isinstance(msg, Chunk):
                    # Off the event loop: writing a chunk must not stall generation.
                    await asyncio.to_thread(session.chunk, msg.offset, msg.data)
                elif (kind := msg.WhichOneof("kind")) == "header":
                    h = msg.header
                    session.header(h.version, [TensorSpec(t.name, DTYPE_NAME.get(t.dtype, f"DType value {t.dtype}"),
                                                          tuple(t.shape), t.nbytes) for t in h.tensors],
                                   h.full, DIGEST_NAME.get(h.digest, f"Digest value {h.digest}"))
                elif kind == "commit":
                    await asyncio.to_thread(session.commit, msg.commit.digest)
                else:
                    session.empty_message()
            staged = session.end()  # read to the end: nothing may follow the commit
            staged.transfer_seconds = time.perf_counter() - t0
            # Shielded: once the engine starts swapping weights, a client that goes away
            # must not leave it half done.
            applied = await asyncio.shield(self.engine.apply(staged))
            result = "ok"
            UPDATE_SECONDS.observe(time.perf_counter() - t0)
            return policy_pb2.UpdateWeightsResponse(
                version=applied.version, previous_version=applied.previous_version, bytes=applied.bytes,
                tensors=applied.tensors, transfer_seconds=staged.transfer_seconds,
                apply_seconds=applied.apply_seconds)
        except asyncio.CancelledError:
            result = "cancelled"
            raise
        except FailedPrecondition:
            result = "failed_precondition"
            raise
        except InvalidArgument:
            result = "invalid_argument"
            raise
        except ServiceError:
            result = "refused"
            raise
        finally:
            session.close()  # a no-op once end() handed the push to the engine
            UPDATES.labels(result).inc()
            if result != "ok":
                log.warning("UpdateWeights refused (%s)", result)

    async def GetModelInfo(self, request, context):
        i = self.engine.info()
        return policy_pb2.PolicyModelInfo(
            model_name=i.model_name, architecture=i.architecture, dtype=i.dtype, max_model_len=i.max_model_len,
            backend=i.backend, weight_version=i.weight_version, instance_id=i.instance_id, vocab_size=i.vocab_size,
            eos_token_id=i.eos_token_id, pad_token_id=i.pad_token_id, tensors=[_spec(t) for t in i.tensors],
            max_n=i.max_n, max_prompts=i.max_prompts, engine_config=i.engine_config,
            max_text_bytes=i.max_text_bytes)
