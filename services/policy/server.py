"""PolicyService over gRPC: proto <-> services.policy.engine.

No torch and no vLLM here (the engine imports vLLM when it starts). Bad input raises the
exceptions of services.common.errors; the runtime maps them to status codes.
"""
from __future__ import annotations

import asyncio
import logging
import time

import grpc

from rlhf.v1 import common_pb2, policy_pb2, policy_pb2_grpc
from services.common.errors import FailedPrecondition, InvalidArgument, ServiceError
from services.policy import engine as core
from services.policy.engine import REQUESTS, UPDATE_SECONDS, UPDATES, PolicyEngine, Sampling
from services.policy.client import DIGEST_NAME, DTYPE_ENUM, DTYPE_NAME  # wire enums, one table for both ends
from services.policy.weights import TensorSpec
from services.policy.wire import Chunk, decode_request

log = logging.getLogger(__name__)

FINISH = {
    "length": policy_pb2.FINISH_REASON_LENGTH,
    "stop": policy_pb2.FINISH_REASON_STOP,
    "eos": policy_pb2.FINISH_REASON_EOS,
    "abort": policy_pb2.FINISH_REASON_ABORT,
}


def _prompt(p, field: str) -> str | list[int]:
    kind = p.WhichOneof("input")
    if kind == "text":
        return p.text
    if kind == "token_ids":
        return list(p.token_ids.ids)
    raise InvalidArgument(f"{field} must set text or token_ids")


def _sampling(p: policy_pb2.SamplingParams) -> Sampling:
    opt = lambda name: getattr(p, name) if p.HasField(name) else None  # noqa: E731
    return Sampling(n=opt("n"), temperature=opt("temperature"), top_p=opt("top_p"), top_k=opt("top_k"),
                    max_tokens=opt("max_tokens"), stop=list(p.stop), stop_token_ids=list(p.stop_token_ids),
                    seed=opt("seed"), ignore_eos=p.ignore_eos, logprobs=p.logprobs)


def _spec(t: TensorSpec) -> policy_pb2.TensorSpec:
    return policy_pb2.TensorSpec(name=t.name, dtype=DTYPE_ENUM[t.dtype], shape=list(t.shape), nbytes=t.nbytes)


class PolicyServicer(policy_pb2_grpc.PolicyServiceServicer):
    service_name = "rlhf.v1.PolicyService"

    def __init__(self, engine: PolicyEngine):
        self.engine = engine

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

    async def Generate(self, request, context):
        REQUESTS.labels("Generate").inc()
        prompts = [_prompt(p, f"prompts[{i}]") for i, p in enumerate(request.prompts)]
        results = await self.engine.generate(prompts, _sampling(request.params),
                                             require_version=request.require_weight_version,
                                             request_id=request.request_id)
        return policy_pb2.GenerateResponse(
            results=[policy_pb2.PromptResult(
                prompt_token_ids=r.prompt_token_ids,
                completions=[policy_pb2.Completion(
                    index=c.index, token_ids=c.token_ids, text=c.text, logprobs=c.logprobs,
                    finish_reason=FINISH[c.finish_reason], weight_version=c.weight_version,
                    stop_string=c.stop_string) for c in r.completions],
            ) for r in results],
            instance_id=core.INSTANCE_ID)

    async def GenerateStream(self, request, context):
        REQUESTS.labels("GenerateStream").inc()
        if not request.HasField("prompt"):
            raise InvalidArgument("prompt must set text or token_ids")
        stream = self.engine.generate_stream(_prompt(request.prompt, "prompt"), _sampling(request.params),
                                             require_version=request.require_weight_version,
                                             request_id=request.request_id)
        async for d in stream:
            yield policy_pb2.GenerateStreamResponse(
                index=d.index, token_ids=d.token_ids, text=d.text, logprobs=d.logprobs,
                finish_reason=FINISH[d.finish_reason] if d.finish_reason else policy_pb2.FINISH_REASON_UNSPECIFIED,
                weight_version=d.weight_version, prompt_token_ids=d.prompt_token_ids)

    async def UpdateWeights(self, request_iterator, context):
        REQUESTS.labels("UpdateWeights").inc()
        t0 = time.perf_counter()
        stage = staged = None
        result = "error"
        try:
            async for msg in request_iterator:
                kind = "chunk" if isinstance(msg, Chunk) else msg.WhichOneof("kind")
                if stage is None:
                    if kind != "header":
                        raise InvalidArgument(f"the first UpdateWeights message must be a header, got {kind}")
                    h = msg.header
                    specs = [TensorSpec(t.name, DTYPE_NAME.get(t.dtype, f"DType value {t.dtype}"),
                                        tuple(t.shape), t.nbytes) for t in h.tensors]
                    digest = DIGEST_NAME.get(h.digest, f"Digest value {h.digest}")
                    stage = self.engine.begin_push(h.version, specs, h.full, digest)
                elif kind == "chunk":
                    # Off the event loop: writing a chunk must not stall generation.
                    await asyncio.to_thread(stage.write, msg.offset, msg.data)
                elif kind == "commit":
                    staged = await asyncio.to_thread(stage.commit, msg.commit.digest)
                    break
                else:
                    raise InvalidArgument(f"UpdateWeights got a second header or an empty message ({kind}) "
                                          f"after the header")
            if staged is None:
                what = "no header" if stage is None else f"{stage.received} of {stage.total} bytes and no commit"
                raise InvalidArgument(f"UpdateWeights stream ended after {what}; nothing was applied")
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
            if stage is not None and staged is None:  # once committed, the file is the engine's
                self.engine.abandon_push(stage)
            UPDATES.labels(result).inc()
            if result != "ok":
                log.warning("UpdateWeights refused (%s)", result)

    async def GetModelInfo(self, request, context):
        REQUESTS.labels("GetModelInfo").inc()
        info = self.engine.info()
        info["tensors"] = [_spec(t) for t in info["tensors"]]
        return policy_pb2.PolicyModelInfo(**info)
