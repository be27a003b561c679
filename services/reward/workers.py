"""The user's reward functions (module:function) run here: in worker processes, each call under a
time limit, so that no function can stall the server.

A thread cannot be stopped, and a function that never returns holds its thread for good; one that
spins in C code (a backtracking `re` match) also holds the GIL, and with it the event loop, health
and every other request. A process can be killed. So:

- a request's pairs go to one idle worker in one message (one round trip per request, not per
  pair); the worker calls every function on every pair and answers with the values, or with the
  first failure, named as RewardFunction names it (function, source, pair);
- before each call the worker writes the call's start time (the system-wide monotonic clock) and
  which function and pair it is into a few bytes of shared memory; the server thread that waits for
  the answer kills the worker as soon as one call has run longer than the limit, and the request
  fails with INVALID_ARGUMENT naming the function, the pair and the limit;
- a killed worker, or one that died on its own (os._exit, a crash, the OOM killer), is replaced by
  a fresh one in the background; the others go on serving meanwhile.

A time-out is INVALID_ARGUMENT, as a function that raises is: how long a function takes is a
property of the pair it is given, so the same request would time out again (DEADLINE_EXCEEDED is
what clients, the trainer included, retry: each retry would hold a worker for the whole limit).

Workers are fresh interpreters (not forks of a server that runs threads and torch), started with
the server's import path, and import the functions by their spec, as the server did at start. No
gRPC here.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import json
import logging
import mmap
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from multiprocessing.connection import Connection
from typing import Sequence

from services.common.errors import InvalidArgument
from services.reward import metrics
from services.reward.rules import ConfigError, RewardFunction, load_function

log = logging.getLogger(__name__)

START_TIMEOUT_S = 120.0  # importing the user's module in a fresh interpreter
# (prompt, response, the pair's name in errors: "pairs[3]")
Texts = Sequence[tuple[str, str, str]]
# The worker's main, run as `python -c BOOT SYS_PATH CONN_FD PROGRESS_FD SERVER_PID`.
BOOT = ("import json, sys; sys.path[:0] = json.loads(sys.argv[1]); "
        "from services.reward.workers import _main; _main(*map(int, sys.argv[2:]))")


class Progress:
    """Which function the worker is calling, on which pair, since when (time.monotonic(), the
    system-wide clock): three doubles in a small file both processes map. Written one double at a
    time (an aligned 8-byte store), never with struct.pack_into, which zeroes the whole buffer
    before it writes: a reader in between saw a start time of 0 and killed a healthy worker."""
    SIZE = 3 * 8

    def __init__(self, fd: int):
        self.map = mmap.mmap(fd, self.SIZE)
        self.slots = memoryview(self.map).cast("d")

    def set(self, function: int, pair: int, started: float) -> None:
        self.slots[0], self.slots[1] = function, pair
        self.slots[2] = started  # last: the time limit reads it alone

    def get(self) -> tuple[int, int, float]:
        return int(self.slots[0]), int(self.slots[1]), self.slots[2]


def _main(conn_fd: int, progress_fd: int, parent: int) -> None:
    """A worker: import the functions named in the first message, then answer one batch of texts
    at a time, until the server closes its end."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group; the server stops us
    threading.Thread(target=_leave_with, args=(parent,), daemon=True).start()
    conn, progress = Connection(conn_fd), Progress(progress_fd)
    try:
        functions = [load_function(spec) for spec in conn.recv()]
    except BaseException as exc:  # noqa: BLE001 - said to the server, which refuses to start
        conn.send(("error", f"{type(exc).__name__}: {exc}"))
        return
    conn.send(("ready", os.getpid()))
    while True:
        try:
            texts = conn.recv()
        except (EOFError, OSError):
            return
        conn.send(_apply(functions, texts, progress))


def _apply(functions: list[RewardFunction], texts: Texts, progress: Progress) -> tuple[str, object]:
    values = []
    for i, (prompt, response, name) in enumerate(texts):
        row = []
        for j, f in enumerate(functions):
            progress.set(j, i, time.monotonic())
            try:
                row.append(f(prompt, response, name))  # catches BaseException, checks the value
            except InvalidArgument as exc:
                return "failed", (j, str(exc))
        values.append(row)
    return "ok", values


def _leave_with(parent: int) -> None:
    """A worker whose server died without stopping it (SIGKILL) leaves, even in the middle of a call
    that would never end (as long as the call lets this thread run)."""
    while os.getppid() == parent:
        time.sleep(1.0)
    os._exit(0)


class _Worker:
    """One worker process, its socket and its progress. One request uses it at a time."""

    def __init__(self, specs: list[str]):
        ours, theirs = socket.socketpair()
        with tempfile.TemporaryFile() as f:
            f.truncate(Progress.SIZE)
            self.progress = Progress(f.fileno())
            self.process = subprocess.Popen(
                [sys.executable, "-c", BOOT, json.dumps([p for p in sys.path if p]), str(theirs.fileno()),
                 str(f.fileno()), str(os.getpid())],
                pass_fds=(theirs.fileno(), f.fileno()), stdin=subprocess.DEVNULL)
        theirs.close()
        self.conn = Connection(ours.detach())
        self.conn.send(specs)

    def wait_ready(self, timeout: float) -> None:
        if not self.conn.poll(timeout):
            self.kill()
            raise ConfigError(f"a reward function worker did not start within {timeout:.0f} s")
        try:
            kind, detail = self.conn.recv()
        except (EOFError, OSError):
            self.kill()
            raise ConfigError(f"a reward function worker died at start (exit code {self.process.returncode})") from None
        if kind != "ready":
            self.kill()
            raise ConfigError(f"a reward function worker could not load the functions: {detail}")

    @property
    def alive(self) -> bool:
        return self.process.poll() is None and not self.conn.closed

    def kill(self) -> None:
        self.process.kill()
        self.process.wait(10)
        self.conn.close()

    def call(self, texts: Texts, functions: list[RewardFunction], limit: float) -> list[list[float]] | Failure:
        """The values of every function on every pair, or the first failure. Runs in a thread of the
        pool, which waits for the answer and enforces the limit."""
        self.progress.set(-1, -1, time.monotonic())  # until the worker writes its first call's start
        try:
            self.conn.send(list(texts))
            while True:
                left = self.progress.get()[2] + limit - time.monotonic()
                if left > 0 and self.conn.poll(left):
                    kind, payload = self.conn.recv()
                    if kind == "ok":
                        return payload
                    j, message = payload
                    return Failure(functions[j].name, "error", message)
                if time.monotonic() - self.progress.get()[2] >= limit:
                    self.kill()  # first: then the progress says which call it was, and stays so
                    f, pair = self._running(functions, texts)
                    return Failure(f.name, "timeout", f"reward function {f.name} ({f.source}) took longer than the "
                                                      f"time limit of {limit:g} s (--reward-function-timeout-s) on "
                                                      f"{pair}; it was stopped")
        except (EOFError, OSError):  # the worker died (or the pool is stopping and closed the socket)
            self.process.wait(10)
            self.conn.close()
            f, pair = self._running(functions, texts)
            return Failure(f.name, "crash", f"reward function {f.name} ({f.source}) ended its worker process on "
                                            f"{pair} (exit code {self.process.returncode})")

    def _running(self, functions: list[RewardFunction], texts: Texts) -> tuple[RewardFunction, str]:
        """The function and the pair the worker was at (the first ones before it began)."""
        j, i, _ = self.progress.get()
        return functions[max(j, 0)], texts[max(i, 0)][2]


@dataclasses.dataclass(frozen=True)
class Failure:
    function: str  # its name
    reason: str  # "error" (raised, or returned no finite number), "timeout" or "crash"
    message: str  # for the caller: the function, its source, the pair and what happened


class FunctionPool:
    """`workers` processes that run `functions`, each call within `time_limit_s` seconds."""

    def __init__(self, functions: list[RewardFunction], workers: int, time_limit_s: float):
        self.functions, self.size, self.limit = list(functions), workers, time_limit_s
        self._specs = [f"{f.name}={f.source}" for f in functions]
        self._idle: asyncio.Queue[_Worker] | None = None
        self._workers: set[_Worker] = set()
        # One waiting thread per worker: a request never waits for a thread, only for a worker.
        self._threads = concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="reward-functions")
        self._closed = False
        self._replacing: set[asyncio.Task] = set()

    async def start(self) -> None:
        self._idle = asyncio.Queue()
        started = await asyncio.gather(*(asyncio.to_thread(self._spawn) for _ in range(self.size)),
                                       return_exceptions=True)
        failed = [w for w in started if isinstance(w, BaseException)]
        for w in started:
            if not isinstance(w, BaseException):
                self._idle.put_nowait(w)
        if failed:
            await self.stop()
            raise failed[0]
        log.info("%d reward function workers (pids %s), time limit %g s per call", self.size,
                 ", ".join(str(w.process.pid) for w in self._workers), self.limit)

    def _spawn(self) -> _Worker:
        worker = _Worker(self._specs)
        self._workers.add(worker)
        try:
            worker.wait_ready(START_TIMEOUT_S)
        except BaseException:
            self._workers.discard(worker)
            raise
        return worker

    async def apply(self, texts: Texts) -> list[list[float]]:
        """values[pair][function], in the order of `texts` and of the functions. InvalidArgument
        names the function and the pair that failed, timed out or ended its worker."""
        assert self._idle is not None, "FunctionPool.start() was not awaited"
        worker = await self._idle.get()
        loop = asyncio.get_running_loop()
        future = self._threads.submit(worker.call, texts, self.functions, self.limit)
        # The worker goes back (or is replaced) when its call is over, even if this request was
        # cancelled meanwhile: the thread cannot be, and the worker is busy until it answers.
        future.add_done_callback(lambda _: loop.call_soon_threadsafe(self._release, worker))
        outcome = await asyncio.wrap_future(future)
        if isinstance(outcome, Failure):
            metrics.FUNCTION_FAILURES.labels(outcome.function, outcome.reason).inc()
            raise InvalidArgument(outcome.message)
        return outcome

    def _release(self, worker: _Worker) -> None:
        if self._closed:
            return
        if worker.alive:
            self._idle.put_nowait(worker)
            return
        self._workers.discard(worker)
        task = asyncio.ensure_future(self._replace())
        self._replacing.add(task)
        task.add_done_callback(self._replacing.discard)

    async def _replace(self) -> None:
        delay = 1.0
        while not self._closed:
            try:
                worker = await asyncio.to_thread(self._spawn)
            except Exception as exc:  # noqa: BLE001 - keep trying: the others serve meanwhile
                log.error("could not start a reward function worker (%s); retrying in %.0f s", exc, delay)
                await asyncio.sleep(delay)
                delay = min(2 * delay, 30.0)
                continue
            metrics.FUNCTION_WORKER_STARTS.inc()
            if self._closed:
                worker.kill()
            else:
                self._idle.put_nowait(worker)
            return

    async def stop(self) -> None:
        self._closed = True
        for task in list(self._replacing):
            task.cancel()
        for worker in list(self._workers):
            worker.kill()
        self._workers.clear()
        self._threads.shutdown(wait=False, cancel_futures=True)
