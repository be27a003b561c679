"""Client channels: the same auth, TLS, keepalive and size options as the servers, retries
on UNAVAILABLE for idempotent methods only, and round_robin over every address a DNS name
resolves to (a headless Kubernetes Service gives one client all replicas).

Imports grpc only: clients must not pull torch or vllm.
"""
from __future__ import annotations

import json
import pathlib
from collections.abc import Iterable

import grpc

from services.common.config import ClientConfig

DEFAULT_MAX_MESSAGE_BYTES = 64 << 20


def channel_options(max_message_bytes: int) -> list[tuple[str, int]]:
    return [
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.keepalive_time_ms", 30_000),
        ("grpc.keepalive_timeout_ms", 10_000),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
    ]


def service_config(retry_methods: Iterable[tuple[str, str]], max_attempts: int = 5) -> str:
    methods = [{"service": s, "method": m} for s, m in retry_methods]
    config: dict = {"loadBalancingConfig": [{"round_robin": {}}]}
    if methods:
        config["methodConfig"] = [{
            "name": methods,
            "retryPolicy": {
                "maxAttempts": max_attempts,
                "initialBackoff": "0.1s",
                "maxBackoff": "2s",
                "backoffMultiplier": 2,
                "retryableStatusCodes": ["UNAVAILABLE"],
            },
        }]
    return json.dumps(config)


class _Metadata(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor,
                grpc.StreamUnaryClientInterceptor, grpc.StreamStreamClientInterceptor):
    """Adds the bearer token to every call of a synchronous channel."""

    def __init__(self, metadata: tuple[tuple[str, str], ...]):
        self._metadata = metadata

    def _details(self, details):
        return details._replace(metadata=tuple(details.metadata or ()) + self._metadata)

    def intercept_unary_unary(self, continuation, details, request):
        return continuation(self._details(details), request)

    def intercept_unary_stream(self, continuation, details, request):
        return continuation(self._details(details), request)

    def intercept_stream_unary(self, continuation, details, request_iterator):
        return continuation(self._details(details), request_iterator)

    def intercept_stream_stream(self, continuation, details, request_iterator):
        return continuation(self._details(details), request_iterator)


def _aio_interceptors(metadata: tuple[tuple[str, str], ...]) -> list:
    """grpc.aio files an interceptor under the first kind it is, so one class per kind."""

    def add(details):
        md = grpc.aio.Metadata(*(details.metadata or ()), *metadata)
        return details._replace(metadata=md)

    class UU(grpc.aio.UnaryUnaryClientInterceptor):
        async def intercept_unary_unary(self, continuation, details, request):
            return await continuation(add(details), request)

    class US(grpc.aio.UnaryStreamClientInterceptor):
        async def intercept_unary_stream(self, continuation, details, request):
            return await continuation(add(details), request)

    class SU(grpc.aio.StreamUnaryClientInterceptor):
        async def intercept_stream_unary(self, continuation, details, request_iterator):
            return await continuation(add(details), request_iterator)

    class SS(grpc.aio.StreamStreamClientInterceptor):
        async def intercept_stream_stream(self, continuation, details, request_iterator):
            return await continuation(add(details), request_iterator)

    return [UU(), US(), SU(), SS()]


def create_channel(target: str, config: ClientConfig | None = None, *, aio: bool = False,
                   retry_methods: Iterable[tuple[str, str]] = ()):
    """A grpc.Channel (or grpc.aio.Channel) to `target` ("host:port" or "dns:///name:port")."""
    config = config or ClientConfig.from_env()
    options = channel_options(config.max_message_bytes) + [
        ("grpc.service_config", service_config(retry_methods)),
        ("grpc.enable_retries", 1),
    ]
    creds = None
    if config.tls_ca or config.tls_cert:
        read = lambda p: pathlib.Path(p).read_bytes() if p else None  # noqa: E731
        creds = grpc.ssl_channel_credentials(read(config.tls_ca), read(config.tls_key), read(config.tls_cert))
    metadata = (("authorization", f"Bearer {config.auth_token}"),) if config.auth_token else ()
    if aio:
        interceptors = _aio_interceptors(metadata) if metadata else None
        if creds:
            return grpc.aio.secure_channel(target, creds, options=options, interceptors=interceptors)
        return grpc.aio.insecure_channel(target, options=options, interceptors=interceptors)
    channel = grpc.secure_channel(target, creds, options=options) if creds else grpc.insecure_channel(target, options=options)
    return grpc.intercept_channel(channel, _Metadata(metadata)) if metadata else channel
