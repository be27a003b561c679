"""Start a server as a child process and wait until its health says SERVING.

Used by the demo and the tests: every server there is the real `rlhf serve ...` process.
Children run in their own process group, so a kill also reaches vLLM's engine process.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.common.channel import create_channel
from services.common.config import ClientConfig


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rlhf_command(*args: str) -> list[str]:
    """`rlhf ARGS...` run with this interpreter, so it works without the console script on PATH."""
    return [sys.executable, "-m", "services.cli", *args]


def health_status(address: str, service: str, config: ClientConfig | None = None, timeout: float = 2.0) -> int | None:
    """The health status of `service` at `address`, or None when it does not answer."""
    with create_channel(address, config or ClientConfig()) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout)
            return reply.status
        except grpc.RpcError:
            return None


class ChildServer:
    """A server process: `with ChildServer(rlhf_command("serve", "reward", ...), port=p, service=...) as s:`."""

    def __init__(self, argv: list[str], *, port: int, service: str, env: dict | None = None,
                 log_path: str | os.PathLike | None = None, ready_timeout: float = 300.0,
                 client_config: ClientConfig | None = None, host: str = "127.0.0.1", cpus: list[int] | None = None):
        self.argv, self.port, self.service, self.cpus = argv, port, service, cpus
        self.env = {**os.environ, **(env or {})}
        self.log_path, self.ready_timeout = log_path, ready_timeout
        self.client_config = client_config or ClientConfig()
        self.address = f"{host}:{port}"
        self.proc: subprocess.Popen | None = None
        self._log = None

    def start(self) -> "ChildServer":
        self._log = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL
        # On `cpus` from its first instruction: thread pools (torch's, vLLM's OpenMP) size themselves
        # by the CPUs they see at start, and pinning them later oversubscribes the CPUs left.
        pin_self = (lambda: os.sched_setaffinity(0, self.cpus)) if self.cpus else None
        self.proc = subprocess.Popen(self.argv, env=self.env, stdout=self._log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True, preexec_fn=pin_self)
        return self

    def wait_ready(self) -> "ChildServer":
        deadline = time.monotonic() + self.ready_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.argv[3:5]} exited with {self.proc.returncode} before serving\n{self.log_tail()}")
            if health_status(self.address, self.service, self.client_config, timeout=1.0) == health_pb2.HealthCheckResponse.SERVING:
                return self
            time.sleep(0.25)
        self.kill()
        raise TimeoutError(f"{self.service} at {self.address} not serving after {self.ready_timeout:.0f} s\n{self.log_tail()}")

    def log_tail(self, lines: int = 40) -> str:
        if not self.log_path:
            return ""
        with open(self.log_path, errors="replace") as f:
            return "".join(f.readlines()[-lines:])

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def terminate(self, timeout: float = 60.0) -> int | None:
        """SIGTERM (the server drains), then SIGKILL of the whole group if it does not exit in time."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        self._kill_group()
        return self.proc.wait()

    def kill(self) -> None:
        """SIGKILL, like a crashed node: no drain."""
        if self.proc is not None:
            self._kill_group()
            self.proc.wait()

    def _kill_group(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        if self._log not in (None, subprocess.DEVNULL):
            self._log.close()
            self._log = None

    def __enter__(self) -> "ChildServer":
        try:
            return self.start().wait_ready()
        except BaseException:
            self.kill()
            raise

    def __exit__(self, *exc) -> None:
        self.terminate()


def pin(pid: int, cpus: list[int]) -> None:
    """Every thread of a process on `cpus`. sched_setaffinity moves one thread: a process's
    thread pools (torch's, gRPC's) keep the CPUs they had."""
    import psutil

    for thread in psutil.Process(pid).threads():
        try:
            os.sched_setaffinity(thread.id, cpus)
        except OSError:  # a thread that ended meanwhile
            pass
