"""Flags and settings shared by every server and every client."""
from __future__ import annotations

import argparse
import dataclasses
import os
import pathlib

TOKEN_ENV = "RLHF_AUTH_TOKEN"
PUSH_TOKEN_ENV = "RLHF_PUSH_TOKEN"  # weight pushes to the policy replicas (the trainer and the replicas hold it)


def add_server_args(p: argparse.ArgumentParser, *, port: int, metrics_port: int) -> None:
    g = p.add_argument_group("server")
    g.add_argument("--host", default="0.0.0.0", help="address to bind (default 0.0.0.0)")
    g.add_argument("--port", type=int, default=port, help=f"gRPC port (default {port})")
    g.add_argument("--metrics-port", type=int, default=metrics_port,
                   help=f"Prometheus /metrics HTTP port (default {metrics_port}; 0 = off)")
    g.add_argument("--auth-token-file", default=None,
                   help=f"file holding the bearer token required on every RPC but health and reflection "
                        f"(default: ${TOKEN_ENV}; neither = auth off)")
    g.add_argument("--tls-cert", default=None, help="PEM server certificate (TLS on when given)")
    g.add_argument("--tls-key", default=None, help="PEM private key of --tls-cert")
    g.add_argument("--tls-ca", default=None, help="PEM CA bundle: require client certificates signed by it (mTLS)")
    g.add_argument("--max-message-bytes", type=int, default=64 << 20, help="largest message in or out (default 64 MiB)")
    g.add_argument("--max-concurrent-rpcs", type=int, default=None, help="RPCs in flight before RESOURCE_EXHAUSTED")
    g.add_argument("--grace-seconds", type=float, default=20.0,
                   help="on SIGTERM, how long in-flight RPCs may take to finish (default 20)")
    g.add_argument("--drain-linger-s", type=float, default=0.0,
                   help="on SIGTERM, how long to keep serving new RPCs after health turns NOT_SERVING, before "
                        "refusing them and draining: the time a load balancer takes to stop sending "
                        "(default 0; on Kubernetes, with a preStop hook)")


def add_client_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("client")
    g.add_argument("--client-auth-token-file", default=None,
                   help=f"bearer token sent to the services (default: ${TOKEN_ENV})")
    g.add_argument("--client-tls-ca", default=None, help="PEM CA that signed the services' certificates (TLS on when given)")
    g.add_argument("--client-tls-cert", default=None, help="PEM client certificate for mTLS")
    g.add_argument("--client-tls-key", default=None, help="PEM key of --client-tls-cert")
    g.add_argument("--client-push-token-file", default=None,
                   help=f"push token for weight pushes to the policy replicas (default: ${PUSH_TOKEN_ENV})")


def read_token(path: str | None) -> str | None:
    """The token from a file (Kubernetes Secret mount) or the environment; None = auth off."""
    if path:
        return pathlib.Path(path).read_text().strip() or None
    return os.environ.get(TOKEN_ENV) or None


def read_push_token(path: str | None) -> str | None:
    """The push token from a file or $RLHF_PUSH_TOKEN; None = pushes need the bearer token only."""
    if path:
        return pathlib.Path(path).read_text().strip() or None
    return os.environ.get(PUSH_TOKEN_ENV) or None


@dataclasses.dataclass
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 0
    metrics_port: int = 0
    auth_token: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_ca: str | None = None
    max_message_bytes: int = 64 << 20
    max_concurrent_rpcs: int | None = None
    grace_seconds: float = 20.0
    drain_linger_s: float = 0.0

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "ServerConfig":
        return cls(
            host=args.host, port=args.port, metrics_port=args.metrics_port,
            auth_token=read_token(args.auth_token_file),
            tls_cert=args.tls_cert, tls_key=args.tls_key, tls_ca=args.tls_ca,
            max_message_bytes=args.max_message_bytes, max_concurrent_rpcs=args.max_concurrent_rpcs,
            grace_seconds=args.grace_seconds, drain_linger_s=args.drain_linger_s,
        )


@dataclasses.dataclass
class ClientConfig:
    auth_token: str | None = None
    tls_ca: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    max_message_bytes: int = 64 << 20
    push_token: str | None = None  # sent with weight pushes (metadata rlhf-push-token)

    @classmethod
    def from_env(cls) -> "ClientConfig":
        return cls(auth_token=read_token(None), push_token=read_push_token(None))

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "ClientConfig":
        return cls(auth_token=read_token(args.client_auth_token_file), tls_ca=args.client_tls_ca,
                   tls_cert=args.client_tls_cert, tls_key=args.client_tls_key,
                   push_token=read_push_token(getattr(args, "client_push_token_file", None)))
