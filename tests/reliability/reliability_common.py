"""Shared pieces of the reliability suite: the figures table, status-code tallies, raw
(undecoded) calls, server launchers and the load generator of bench/load.py."""
from __future__ import annotations

import collections
import importlib.util
import os
import pathlib
import sys

import grpc

from services.demo.launch import ChildServer, free_port, rlhf_command

ROOT = pathlib.Path(__file__).resolve().parents[2]
ROWS: list[dict] = []  # written to JSON by conftest.py at the end of the session

# What a server may answer to any request, good or bad. UNKNOWN and INTERNAL mean an
# exception escaped a handler; DEADLINE_EXCEEDED under fuzzing means a hang.
ALLOWED = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED,
           grpc.StatusCode.FAILED_PRECONDITION}
REWARD = "rlhf.v1.RewardService"
POLICY = "rlhf.v1.PolicyService"
TRAINER = "rlhf.v1.TrainerService"


def command(nodeid: str) -> str:
    return f'python -m pytest --run-slow "{nodeid}"'


def record(request, check: str, **figures) -> dict:
    """One row of the table; `request` is pytest's, so the row says how to rerun it."""
    row = dict(check=check, command=command(request.node.nodeid), **figures)
    ROWS.append(row)
    return row


class Tally:
    """Status codes seen per RPC, and the cases whose code was not the one expected."""

    def __init__(self):
        self.codes: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
        self.wrong: list[str] = []
        self.failures = 0
        self._seen: set = set()

    def add(self, rpc: str, code: grpc.StatusCode, expected: set | None = None, what: str = "",
            details: str = "") -> None:
        self.codes[rpc][code.name] += 1
        if code not in ALLOWED or (expected is not None and code not in expected):
            want = sorted(c.name for c in expected) if expected else "OK/INVALID_ARGUMENT/RESOURCE_EXHAUSTED/FAILED_PRECONDITION"
            self.fail(rpc, what, f"got {code.name} ({details[:300]}), want {want}")

    def fail(self, rpc: str, what: str, message: str) -> None:
        """Keep the first of each kind of failure (the run goes on, so the figures cover every case)."""
        key = (rpc, what, message[:60])
        if key not in self._seen and len(self.wrong) < 30:
            self._seen.add(key)
            self.wrong.append(f"{rpc} [{what}] {message}")
        self.failures += 1

    def check(self, rpc: str, what: str, fn, *args) -> None:
        """Run an answer check; an AssertionError counts as a failure of this case."""
        try:
            fn(*args)
        except AssertionError as exc:
            self.fail(rpc, what, f"wrong answer: {exc}"[:400])

    def result(self, ok_text: str = "pass") -> str:
        return ok_text if not self.wrong else f"FAIL ({self.failures} cases): " + " | ".join(self.wrong[:5])

    def cases(self, rpc: str | None = None) -> int:
        return sum(sum(c.values()) for r, c in self.codes.items() if rpc is None or r == rpc)

    def summary(self, rpc: str) -> str:
        return ", ".join(f"{k} {v}" for k, v in sorted(self.codes[rpc].items()))


def code_of(call_or_error) -> tuple[grpc.StatusCode, str]:
    """The status of a finished future or an RpcError."""
    try:
        return call_or_error.code(), call_or_error.details() or ""
    except Exception as exc:  # noqa: BLE001
        return grpc.StatusCode.UNKNOWN, repr(exc)


def raw_unary(channel: grpc.Channel, service: str, method: str):
    """A unary callable that sends bytes as they are (the server's decoder sees them)."""
    return channel.unary_unary(f"/{service}/{method}", request_serializer=None, response_deserializer=None)


def raw_stream_unary(channel: grpc.Channel, service: str, method: str):
    return channel.stream_unary(f"/{service}/{method}", request_serializer=None, response_deserializer=None)


def raw_unary_stream(channel: grpc.Channel, service: str, method: str):
    return channel.unary_stream(f"/{service}/{method}", request_serializer=None, response_deserializer=None)


def raw_stream_stream(channel: grpc.Channel, service: str, method: str):
    return channel.stream_stream(f"/{service}/{method}", request_serializer=None, response_deserializer=None)


def server_env(**extra: str) -> dict:
    return {"VLLM_CPU_KVCACHE_SPACE": "1", "TOKENIZERS_PARALLELISM": "false", **extra}


def reward_server(model_dir, log_dir: pathlib.Path, *extra: str, env: dict | None = None,
                  client_config=None, port: int | None = None) -> ChildServer:
    port = port or free_port()
    return ChildServer(rlhf_command("serve", "reward", "--model", str(model_dir), "--host", "127.0.0.1",
                                    "--port", str(port), "--metrics-port", "0", "--device", "cpu", *extra),
                       port=port, service=REWARD, env=server_env(**(env or {})),
                       log_path=log_dir / f"reward-{port}.log", client_config=client_config)


def policy_server(model_dir, log_dir: pathlib.Path, *extra: str, env: dict | None = None,
                  client_config=None) -> ChildServer:
    port = free_port()
    return ChildServer(rlhf_command("serve", "policy", "--model", str(model_dir), "--host", "127.0.0.1",
                                    "--port", str(port), "--metrics-port", "0", "--kv-cache-gib", "1", *extra),
                       port=port, service=POLICY, env=server_env(**(env or {})),
                       log_path=log_dir / f"policy-{port}.log", client_config=client_config)


def tree_rss(pid: int) -> int:
    """Resident bytes of a process and all its descendants (vLLM's engine core is a child)."""
    import psutil

    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0
    total = 0
    for p in procs:
        try:
            total += p.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total


def load_bench():
    """bench/load.py as a module (bench/ is scripts, not a package)."""
    name = "rlhf_bench_load"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, ROOT / "bench" / "load.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def mib(n: float) -> str:
    return f"{n / (1 << 20):.0f} MiB"


def staged_pushes(directory: str | os.PathLike) -> list[str]:
    return sorted(p.name for p in pathlib.Path(directory).glob("rlhf-push-*"))
