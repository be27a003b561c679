"""Flags and settings shared by every server and every client."""
from __future__ import annotations

import argparse
import dataclasses
import os
import pathlib

TOKEN_ENV = "RLHF_AUTH_TOKEN"
PUSH_TOKEN_ENV = "RLHF_PUSH_TOKEN"  # weight pushes to the policy replicas (the trainer and the replicas hold it)

# A config file or --set value: far more than any real config holds, far less than what an alias
# bomb ("billion laughs") expands to. PyYAML builds aliases as shared objects, so the bomb loads
# in no time; it explodes later, in whatever walks the tree (validation, printing an error).
MAX_YAML_BYTES = 1 << 20
MAX_YAML_VALUES = 100_000  # scalars, lists and mappings, counting each alias as what it expands to


def load_yaml(text: str, where: str):
    """yaml.safe_load of a config, refused (ValueError naming `where`) when it is over
    MAX_YAML_BYTES or, counting what its aliases expand to, over MAX_YAML_VALUES values, or
    refers to itself. Counted on the node graph before anything is built."""
    import yaml

    if len(text) > MAX_YAML_BYTES:
        raise ValueError(f"{where} is {len(text)} bytes, more than the {MAX_YAML_BYTES} a config may have")
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        values = _expanded_values(node)
        if values > MAX_YAML_VALUES:
            raise ValueError(f"{where} expands to more than {MAX_YAML_VALUES} values (through YAML aliases, "
                             f"*name); a config holds far fewer")
        return loader.construct_document(node)
    except RecursionError:  # PyYAML's parser recurses once per level of nesting
        raise ValueError(f"{where} nests lists or mappings too deeply") from None
    finally:
        loader.dispose()


def read_config(path: str | os.PathLike, where: str) -> str:
    """A config file's text, refused before reading (ValueError naming `where`) when it is larger
    than a config can be."""
    size = os.stat(path).st_size
    if size > MAX_YAML_BYTES:
        raise ValueError(f"{where} is {size} bytes, more than the {MAX_YAML_BYTES} a config may have")
    return pathlib.Path(path).read_text()


def _expanded_values(root) -> int:
    """How many nodes the tree under `root` has once every alias is expanded (a shared node counts
    each time it is reached); MAX_YAML_VALUES + 1 as soon as it is more. Iterative (nesting may be
    deep); a node that contains itself is refused."""
    import yaml

    size: dict[int, int] = {}
    stack: list[tuple[object, bool]] = [(root, False)]
    open_nodes: set[int] = set()
    while stack:
        node, children_done = stack.pop()
        if id(node) in size:
            continue
        if isinstance(node, yaml.ScalarNode):
            size[id(node)] = 1
            continue
        children = ([n for pair in node.value for n in pair] if isinstance(node, yaml.MappingNode)
                    else list(node.value))
        if children_done:
            open_nodes.discard(id(node))
            size[id(node)] = min(1 + sum(size[id(c)] for c in children), MAX_YAML_VALUES + 1)
            continue
        if id(node) in open_nodes:
            raise ValueError("the YAML refers to itself (an alias inside its own anchor)")
        open_nodes.add(id(node))
        stack.append((node, True))
        for child in children:
            if id(child) in open_nodes:
                raise ValueError("the YAML refers to itself (an alias inside its own anchor)")
            if id(child) not in size:
                stack.append((child, False))
    return size[id(root)]


def shorten(text: str, limit: int = 300) -> str:
    """An error message's echo of user input, cut to `limit` characters."""
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text) - limit} more characters)"


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
