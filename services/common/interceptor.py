"""One server interceptor around every handler: bearer-token auth, the grpc_server_*
metrics (the names go-grpc-prometheus uses) and the mapping of exceptions to status."""
from __future__ import annotations

import asyncio
import contextlib
import hmac
import time
from typing import Iterable

import grpc
from prometheus_client import Counter, Histogram

from services.common import errors
from services.common.status import to_status

# Kubernetes' native gRPC probes and grpcurl must work without a token.
OPEN_SERVICES = frozenset({
    "grpc.health.v1.Health",
    "grpc.reflection.v1alpha.ServerReflection",
    "grpc.reflection.v1.ServerReflection",
})

_LABELS = ["grpc_type", "grpc_service", "grpc_method"]
STARTED = Counter("grpc_server_started_total", "RPCs started on the server.", _LABELS)
HANDLED = Counter("grpc_server_handled_total", "RPCs completed on the server, by status code.", _LABELS + ["grpc_code"])
HANDLING = Histogram(
    "grpc_server_handling_seconds", "Time from the start of an RPC to its end on the server.", _LABELS,
    buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300),
)


def _context_code(context) -> grpc.StatusCode | None:
    code = context.code()
    if code is None or isinstance(code, grpc.StatusCode):
        return code
    return next((c for c in grpc.StatusCode if c.value[0] == code), None)  # some versions return the int


class _Rpc:
    """Bookkeeping of one call: its labels, start time and final code."""

    def __init__(self, grpc_type: str, service: str, method: str):
        self.labels = (grpc_type, service, method)
        self.start = time.perf_counter()
        self.code = grpc.StatusCode.OK
        STARTED.labels(*self.labels).inc()

    def __str__(self) -> str:
        return f"{self.labels[1]}/{self.labels[2]} ({time.perf_counter() - self.start:.1f} s)"

    async def fail(self, exc: BaseException, context) -> None:
        """Record why the call ended; for our own exceptions, abort with the mapped status."""
        if isinstance(exc, (asyncio.CancelledError, GeneratorExit)):
            self.code = grpc.StatusCode.CANCELLED
        elif isinstance(exc, grpc.aio.AbortError):
            self.code = _context_code(context) or grpc.StatusCode.UNKNOWN
        else:
            self.code, message = to_status(exc, "/".join(self.labels[1:]))
            await context.abort(self.code, message)  # raises AbortError

    def done(self, context) -> None:
        if self.code == grpc.StatusCode.OK:
            self.code = _context_code(context) or grpc.StatusCode.OK
        HANDLED.labels(*self.labels, self.code.name).inc()
        HANDLING.labels(*self.labels).observe(time.perf_counter() - self.start)


class ServerInterceptor(grpc.aio.ServerInterceptor):
    """`token`: what every RPC but health and reflection needs (None: auth off). `admin_token`: the
    only token `admin_methods` ("pkg.Service/Method") accept, and one that every other RPC accepts
    too (None: they take `token` like the rest)."""

    def __init__(self, token: str | None, admin_token: str | None = None, admin_methods: Iterable[str] = ()):
        self._expected = f"Bearer {token}".encode() if token else None
        self._admin = f"Bearer {admin_token}".encode() if admin_token else None
        self._admin_methods = frozenset(admin_methods)
        # Until the service has loaded its model, only health and reflection answer.
        self.ready = False
        # Set on SIGTERM: new RPCs get UNAVAILABLE while the ones in flight finish.
        self.draining = False
        self.active: set[_Rpc] = set()  # the calls being handled (the drain waits for them)

    @property
    def in_flight(self) -> int:
        return len(self.active)

    def _authorized(self, service: str, metadata) -> bool:
        if self._expected is None or service in OPEN_SERVICES:
            return True
        return hmac.compare_digest(_bearer(metadata), self._expected)  # constant time

    def _auth_denial(self, service: str, method: str, metadata) -> tuple[grpc.StatusCode, str] | None:
        if self._admin is not None and service not in OPEN_SERVICES:
            given = _bearer(metadata)
            if hmac.compare_digest(given, self._admin):
                return None
            if f"{service}/{method}" in self._admin_methods:
                if self._expected is not None and hmac.compare_digest(given, self._expected):
                    return (grpc.StatusCode.PERMISSION_DENIED, f"{method} needs the admin token (the server's "
                                                               f"--admin-token-file); this token may not call it")
                return (grpc.StatusCode.UNAUTHENTICATED, f"{method} needs the admin token (the server's "
                                                         f"--admin-token-file) in the 'authorization' metadata")
        if not self._authorized(service, metadata):
            return grpc.StatusCode.UNAUTHENTICATED, "missing or invalid bearer token in the 'authorization' metadata"
        return None

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if handler is None:
            return None
        service, method = details.method.lstrip("/").split("/", 1)
        if service in OPEN_SERVICES:
            # As they are: health's Watch writes with context.write (no generator to wrap),
            # and probes need neither a token nor metrics.
            return handler
        denial = self._auth_denial(service, method, details.invocation_metadata)
        if denial is None and not self.ready:
            denial = (grpc.StatusCode.UNAVAILABLE, f"{service} is loading its model; retry when health says SERVING")
        elif denial is None and self.draining:
            denial = (grpc.StatusCode.UNAVAILABLE, f"{service} is shutting down; retry on another replica")
        if denial:
            return _refusal(handler, service, method, denial)
        return _wrap(handler, service, method, self)


def _bearer(metadata) -> bytes:
    given = next((m.value for m in metadata or () if m.key == "authorization"), "")
    return given.encode() if isinstance(given, str) else given


class _Undecodable:
    """Bytes that did not parse as the request message. grpc answers UNKNOWN when a
    deserializer raises; the handler answers INVALID_ARGUMENT for it instead."""

    def __init__(self, error: Exception):
        self.error = error


def _lenient(deserializer):
    if deserializer is None:
        return None

    def decode(data: bytes):
        try:
            return deserializer(data)
        except Exception as exc:  # noqa: BLE001 - any parse failure is the caller's
            return _Undecodable(exc)

    return decode


def _checked(request, what: str):
    if isinstance(request, _Undecodable):
        raise errors.InvalidArgument(f"the request is not a valid {what}: {request.error}")
    return request


async def _checked_stream(requests, what: str):
    async for request in requests:
        yield _checked(request, what)


_GRPC_TYPES = {(False, False): "unary", (False, True): "server_stream",
               (True, False): "client_stream", (True, True): "bidi_stream"}


def _refusal(handler: grpc.RpcMethodHandler, service: str, method: str,
             denial: tuple[grpc.StatusCode, str]) -> grpc.RpcMethodHandler:
    """A handler that refuses the call without reading its request.

    For a unary request grpc reads and parses the whole message before calling the
    handler, so a refusal there would come after an anonymous caller's 60 MB had
    been received and decoded. A request-streaming handler is called first and reads
    only when asked; this one never asks, so flow control keeps the body on the
    caller's side. The wire format of a unary call and of a stream of one message is
    the same, so the caller sees its status as usual.
    """
    grpc_type = _GRPC_TYPES[(handler.request_streaming, handler.response_streaming)]

    async def refuse(request_iterator, context):
        rpc = _Rpc(grpc_type, service, method)
        rpc.code = denial[0]
        try:
            await context.abort(*denial)
        finally:
            rpc.done(context)

    async def refuse_stream(request_iterator, context):
        await refuse(request_iterator, context)
        yield  # never reached: makes this an async generator, as a streaming handler must be

    if handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(refuse_stream)
    return grpc.stream_unary_rpc_method_handler(refuse)


@contextlib.asynccontextmanager
async def _tracked(owner: "ServerInterceptor", labels: tuple[str, str, str], context):
    """One call's bookkeeping, whatever its shape: counted in `owner.active` (the drain waits
    for it), an exception mapped to its status, its metrics recorded at the end."""
    rpc = _Rpc(*labels)
    owner.active.add(rpc)
    try:
        yield rpc
    except BaseException as exc:
        await rpc.fail(exc, context)
        raise
    finally:
        owner.active.discard(rpc)
        rpc.done(context)


def _wrap(handler: grpc.RpcMethodHandler, service: str, method: str,
          owner: "ServerInterceptor") -> grpc.RpcMethodHandler:
    """The handler with bookkeeping and error mapping around it."""
    streaming_in, streaming_out = handler.request_streaming, handler.response_streaming
    labels = (_GRPC_TYPES[(streaming_in, streaming_out)], service, method)
    codec = dict(request_deserializer=_lenient(handler.request_deserializer),
                 response_serializer=handler.response_serializer)
    what = f"{service}/{method} request"
    check = (lambda r: _checked_stream(r, what)) if streaming_in else (lambda r: _checked(r, what))

    if not streaming_out:
        behavior = handler.stream_unary if streaming_in else handler.unary_unary

        async def call(request, context):
            async with _tracked(owner, labels, context):
                return await behavior(check(request), context)

        make = grpc.stream_unary_rpc_method_handler if streaming_in else grpc.unary_unary_rpc_method_handler
        return make(call, **codec)

    behavior = handler.stream_stream if streaming_in else handler.unary_stream

    async def stream(request, context):
        async with _tracked(owner, labels, context):
            async for response in behavior(check(request), context):
                yield response

    make = grpc.stream_stream_rpc_method_handler if streaming_in else grpc.unary_stream_rpc_method_handler
    return make(stream, **codec)
