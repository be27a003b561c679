"""The runtime's interceptor on a real grpc.aio server with one method of each kind: a refused call
(no token, loading, draining) gets its status without its request ever being read or parsed."""
from __future__ import annotations

import asyncio

import grpc
import pytest

from services.common.interceptor import ServerInterceptor

SERVICE, TOKEN = "test.Echo", "tok"


class Echo:
    """Unary, server-, client- and bidi-streaming echo handlers; counts the requests it decodes."""

    def __init__(self):
        self.decoded = 0

    def decode(self, data: bytes) -> bytes:
        self.decoded += 1
        return data

    def handler(self) -> grpc.GenericRpcHandler:
        async def unary(request, context):
            return request

        async def server_stream(request, context):
            yield request

        async def client_stream(requests, context):
            return b"".join([r async for r in requests])

        async def bidi(requests, context):
            async for r in requests:
                yield r

        codec = dict(request_deserializer=self.decode, response_serializer=None)
        return grpc.method_handlers_generic_handler(SERVICE, {
            "Unary": grpc.unary_unary_rpc_method_handler(unary, **codec),
            "ServerStream": grpc.unary_stream_rpc_method_handler(server_stream, **codec),
            "ClientStream": grpc.stream_unary_rpc_method_handler(client_stream, **codec),
            "Bidi": grpc.stream_stream_rpc_method_handler(bidi, **codec),
        })


async def call_each_kind(port: int, metadata) -> dict[str, tuple[grpc.StatusCode, object]]:
    body = b"x" * (1 << 20)
    out = {}
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}",
                                         options=[("grpc.max_send_message_length", 8 << 20)]) as ch:
        calls = {
            "Unary": lambda: ch.unary_unary(f"/{SERVICE}/Unary")(body, metadata=metadata, timeout=10),
            "ServerStream": lambda: _collect(ch.unary_stream(f"/{SERVICE}/ServerStream")(body, metadata=metadata,
                                                                                      timeout=10)),
            "ClientStream": lambda: ch.stream_unary(f"/{SERVICE}/ClientStream")(iter([body, body]), metadata=metadata,
                                                                               timeout=10),
            "Bidi": lambda: _collect(ch.stream_stream(f"/{SERVICE}/Bidi")(iter([body]), metadata=metadata, timeout=10)),
        }
        for name, call in calls.items():
            try:
                out[name] = (grpc.StatusCode.OK, await call())
            except grpc.aio.AioRpcError as e:
                out[name] = (e.code(), e.details())
    return out


async def _collect(stream):
    return [m async for m in stream]


@pytest.mark.parametrize("state, metadata, code, words", [
    ("ready", None, grpc.StatusCode.UNAUTHENTICATED, "bearer token"),
    ("ready", (("authorization", "Bearer nope"),), grpc.StatusCode.UNAUTHENTICATED, "bearer token"),
    ("loading", (("authorization", f"Bearer {TOKEN}"),), grpc.StatusCode.UNAVAILABLE, "loading"),
    ("draining", (("authorization", f"Bearer {TOKEN}"),), grpc.StatusCode.UNAVAILABLE, "shutting down"),
])
def test_refused_calls_of_every_kind_are_never_read(state, metadata, code, words):
    async def main():
        echo, interceptor = Echo(), ServerInterceptor(TOKEN)
        interceptor.ready = state != "loading"
        interceptor.draining = state == "draining"
        server = grpc.aio.server(interceptors=[interceptor],
                                 options=[("grpc.max_receive_message_length", 8 << 20)])
        server.add_generic_rpc_handlers([echo.handler()])
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            refused = await call_each_kind(port, metadata)
            interceptor.ready, interceptor.draining = True, False
            served = await call_each_kind(port, (("authorization", f"Bearer {TOKEN}"),))
        finally:
            await server.stop(None)
        return refused, served, echo.decoded, interceptor.in_flight

    refused, served, decoded, in_flight = asyncio.run(main())
    assert {k: c for k, (c, _) in refused.items()} == dict.fromkeys(refused, code)
    assert all(words in details for _, details in refused.values()), refused
    body = b"x" * (1 << 20)
    assert served == {"Unary": (grpc.StatusCode.OK, body), "ServerStream": (grpc.StatusCode.OK, [body]),
                      "ClientStream": (grpc.StatusCode.OK, body + body), "Bidi": (grpc.StatusCode.OK, [body])}
    assert decoded == 5  # the served calls' five requests; the refused calls' none
    assert in_flight == 0
