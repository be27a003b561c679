"""PolicyService over gRPC: proto <-> services.policy.engine, field by field.

Transport only: no torch and no vLLM here (the engine imports vLLM when it starts), no
push protocol either (weights.PushSession), and what a relayed push passes on goes through
services.policy.relay. Bad input raises the exceptions of services.common.errors; the
runtime maps them to status codes (and services.common.status names them in the outcomes
of a relayed push).
"""
from __future__ import annotations

import asyncio
import hmac
import logging
import time

import grpc

from rlhf.v1 import common_pb2, policy_pb2, policy_pb2_grpc
from services.common.config import ClientConfig
from services.common.errors import (DeadlineExceeded, FailedPrecondition, InvalidArgument, PermissionDenied,
                                    ServiceError)
from services.common.status import to_status
from services.policy.engine import INSTANCE_ID, PolicyEngine, UpdateResult
from services.common.text import ChatMessage
from services.policy.limits import Chat, Prompt, Sampling
from services.policy.metrics import UPDATE_SECONDS, UPDATES
from services.policy.relay import Relay
from services.policy.weights import TensorSpec
from services.policy.wire import (DIGEST_NAME, DTYPE_ENUM, DTYPE_NAME, FINISH_ENUM, MAX_ADDRESS_BYTES, MAX_FANOUT,
                                  MAX_RELAY_ADDRESSES, PUSH_TOKEN_KEY, Chunk, decode_request, encode_chunk)

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
                    seed=opt("seed"), ignore_eos=p.ignore_eos, logprobs=p.logprobs,
                    prompt_logprobs=p.prompt_logprobs)


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


def _check_relay(plan: policy_pb2.RelayPlan) -> None:
    if len(plan.addresses) > MAX_RELAY_ADDRESSES:
        raise InvalidArgument(f"header.relay.addresses holds at most {MAX_RELAY_ADDRESSES}, got {len(plan.addresses)}")
    for i, address in enumerate(plan.addresses):
        if not address or len(address.encode()) > MAX_ADDRESS_BYTES:
            raise InvalidArgument(f"header.relay.addresses[{i}] must be non-empty and at most {MAX_ADDRESS_BYTES} "
                                  f"bytes, got {len(address.encode())} bytes")
    if len(set(plan.addresses)) != len(plan.addresses):
        raise InvalidArgument("header.relay.addresses must not repeat an address")
    if plan.fanout > MAX_FANOUT:
        raise InvalidArgument(f"header.relay.fanout must be in [1, {MAX_FANOUT}] (0 means 1), got {plan.fanout}")


def _response(r: UpdateResult, transfer_seconds: float = 0.0) -> policy_pb2.UpdateWeightsResponse:
    return policy_pb2.UpdateWeightsResponse(
        version=r.version, previous_version=r.previous_version, bytes=r.bytes, tensors=r.tensors,
        transfer_seconds=transfer_seconds or r.transfer_seconds, apply_seconds=r.apply_seconds, staged=r.staged,
        image_digest=r.image_digest, tensors_reloaded=r.tensors_reloaded, stage_seconds=r.stage_seconds,
        changed_elements=r.changed_elements)


def _result_label(e: BaseException) -> str:
    if isinstance(e, asyncio.CancelledError):
        return "cancelled"
    if isinstance(e, FailedPrecondition):
        return "failed_precondition"
    if isinstance(e, InvalidArgument):
        return "invalid_argument"
    return "refused" if isinstance(e, ServiceError) else "error"


class PolicyServicer(policy_pb2_grpc.PolicyServiceServicer):
    service_name = "rlhf.v1.PolicyService"

    def __init__(self, engine: PolicyEngine, *, push_idle_timeout_s: float = 60.0, push_token: str | None = None,
                 relay_config: ClientConfig | None = None):
        self.engine = engine
        self.push_idle_timeout_s = push_idle_timeout_s
        self.push_token = push_token  # set: the push RPCs need it on top of the bearer token
        self.relay_config = relay_config or ClientConfig()

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
            "CommitWeights": grpc.unary_unary_rpc_method_handler(
                self.CommitWeights, **codec(pb.CommitWeightsRequest, pb.UpdateWeightsResponse)),
            "AbortWeights": grpc.unary_unary_rpc_method_handler(
                self.AbortWeights, **codec(pb.AbortWeightsRequest, pb.AbortWeightsResponse)),
            "RollbackWeights": grpc.unary_unary_rpc_method_handler(
                self.RollbackWeights, **codec(pb.RollbackWeightsRequest, pb.UpdateWeightsResponse)),
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
                prompt_logprobs=r.prompt_logprobs,
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

    # ---- weights ------------------------------------------------------------------------

    def _check_push_token(self, context, method: str) -> None:
        if not self.push_token:
            return
        given = dict(context.invocation_metadata() or ()).get(PUSH_TOKEN_KEY, "")
        if not hmac.compare_digest(str(given).encode(), self.push_token.encode()):
            raise PermissionDenied(f"{method} needs the push token in the '{PUSH_TOKEN_KEY}' metadata (this server "
                                   f"runs with --push-token-file): only the trainer and the other replicas may push")

    async def UpdateWeights(self, request_iterator, context):
        self._check_push_token(context, "UpdateWeights")
        t0 = time.perf_counter()
        session = self.engine.push_session()
        relay: Relay | None = None
        own_error: BaseException | None = None  # a relayed push goes on past this replica's own refusal
        result = "error"
        try:
            async for msg in _within(request_iterator, self.push_idle_timeout_s):
                header = None if isinstance(msg, Chunk) or msg.WhichOneof("kind") != "header" else msg.header
                if header is not None and header.HasField("relay") and relay is None:
                    # Passed on first: the children start while this replica checks the header.
                    _check_relay(header.relay)
                    relay = Relay(header, self.relay_config, self.push_token,
                                  lambda: session.path if own_error is None else None, self.push_idle_timeout_s)
                try:
                    if own_error is None:
                        await self._receive(session, msg)
                except ServiceError as e:
                    if relay is None:
                        raise
                    own_error = e
                if relay is None:
                    continue
                if isinstance(msg, Chunk):  # staged here first: what is passed on can be replayed
                    await relay.put_chunk(msg.raw or encode_chunk(msg.offset, msg.data), msg.offset, len(msg.data))
                elif msg.WhichOneof("kind") == "commit":
                    await relay.put_commit(msg.SerializeToString())
            if relay is not None:
                await relay.end()
            if own_error is not None:
                raise own_error
            staged = session.end()  # read to the end: nothing may follow the commit
            staged.transfer_seconds = time.perf_counter() - t0
            # Shielded: once the engine starts swapping weights, a client that goes away
            # must not leave it half done.
            applied = await asyncio.shield(self.engine.apply(staged))
            result = "staged" if applied.staged else "ok"
            UPDATE_SECONDS.observe(time.perf_counter() - t0)
            response = _response(applied, staged.transfer_seconds)
            if relay is not None:
                response.outcomes.append(policy_pb2.PushOutcome(code="OK", result=response))
                response.outcomes.extend(await relay.outcomes())
            return response
        except BaseException as e:
            result = _result_label(e)
            if relay is None or not isinstance(e, Exception):
                if relay is not None:
                    relay.cancel()
                raise
            if not relay.ended:  # this replica stops early: its parent routes around it
                relay.cancel()
                raise
            code, details = to_status(e, "UpdateWeights")
            own = policy_pb2.PushOutcome(code=code.name, message=details)
            return policy_pb2.UpdateWeightsResponse(outcomes=[own, *await relay.outcomes()])
        finally:
            session.close()  # a no-op once end() handed the push to the engine
            UPDATES.labels(result).inc()
            if result not in ("ok", "staged"):
                log.warning("UpdateWeights refused (%s)", result)

    @staticmethod
    async def _receive(session, msg) -> None:
        """One message of a push into the session; the writes off the event loop (writing a
        chunk, hashing, checking a delta's base must not stall generation)."""
        if isinstance(msg, Chunk):
            await asyncio.to_thread(session.chunk, msg.offset, msg.data)
        elif (kind := msg.WhichOneof("kind")) == "header":
            h = msg.header
            await asyncio.to_thread(
                session.header, h.version,
                [TensorSpec(t.name, DTYPE_NAME.get(t.dtype, f"DType value {t.dtype}"), tuple(t.shape), t.nbytes,
                            t.encoded_bytes) for t in h.tensors],
                h.full, DIGEST_NAME.get(h.digest, f"Digest value {h.digest}"),
                delta_base=h.delta.version if h.HasField("delta") else None, base_digest=h.delta.image_digest,
                image_digest=h.image_digest, segments=h.digest_segments or 1, stage_only=h.stage_only,
                keep_previous=h.keep_previous, relay=h.HasField("relay"))
        elif kind == "commit":
            await asyncio.to_thread(session.commit, msg.commit.digest)
        else:
            session.empty_message()

    async def CommitWeights(self, request, context):
        self._check_push_token(context, "CommitWeights")
        t0 = time.perf_counter()
        try:
            applied = await asyncio.shield(self.engine.commit(request.version))
        except BaseException as e:
            UPDATES.labels(_result_label(e)).inc()
            raise
        UPDATES.labels("ok").inc()
        UPDATE_SECONDS.observe(time.perf_counter() - t0)
        return _response(applied)

    async def AbortWeights(self, request, context):
        self._check_push_token(context, "AbortWeights")
        return policy_pb2.AbortWeightsResponse(aborted=await self.engine.abort(request.version))

    async def RollbackWeights(self, request, context):
        self._check_push_token(context, "RollbackWeights")
        return _response(await asyncio.shield(self.engine.rollback(request.version)))

    async def GetModelInfo(self, request, context):
        i = self.engine.info()
        return policy_pb2.PolicyModelInfo(
            model_name=i.model_name, architecture=i.architecture, dtype=i.dtype, max_model_len=i.max_model_len,
            backend=i.backend, weight_version=i.weight_version, instance_id=i.instance_id, vocab_size=i.vocab_size,
            eos_token_id=i.eos_token_id, pad_token_id=i.pad_token_id, tensors=[_spec(t) for t in i.tensors],
            max_n=i.max_n, max_prompts=i.max_prompts, engine_config=i.engine_config,
            max_text_bytes=i.max_text_bytes, staged_version=i.staged_version, rollback_version=i.rollback_version)
