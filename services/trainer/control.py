"""What the training loop shares with TrainerService: phase, status, metrics, pause and checkpoint
requests. The loop runs on the main thread, the server on its own event-loop thread; everything
here is safe across the two. No gRPC: the server maps these to messages."""
from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import enum
import pathlib
import threading
import time

from services.trainer.metrics import StepMetrics


class Phase(enum.Enum):
    """Where the run is; TrainerStatus.phase (PHASE_<name>)."""
    STARTING = "starting"
    SYNCING = "syncing"  # bringing policy replicas to the trainer's weights
    GENERATING = "generate"
    SCORING = "score"
    REFERENCE = "reference"  # old-policy and reference logprobs, values, advantages
    TRAINING = "train"
    PUSHING = "push"
    PAUSED = "paused"
    CHECKPOINTING = "checkpoint"
    FINISHED = "finished"
    FAILED = "failed"
    WAITING = "waiting"  # for a dependency that fails


@dataclasses.dataclass(frozen=True)
class ReplicaStatus:
    """A replica as the trainer last saw it (TrainerService shows these)."""
    address: str
    instance_id: str
    weight_version: int
    in_sync: bool
    available: bool


@dataclasses.dataclass(frozen=True)
class Waiting:
    """A dependency the run waits for: which, since when (wall time), and its last error."""
    dependency: str
    since: float
    message: str


@dataclasses.dataclass(frozen=True)
class Status:
    phase: Phase
    step: int
    total_steps: int
    weight_version: int
    replicas: list[ReplicaStatus]
    last: StepMetrics | None
    paused: bool
    message: str
    waiting: Waiting | None = None  # set while a dependency fails; phase is then WAITING
    canary: object = None  # the last canary verdict (services.trainer.canary.Verdict)


@dataclasses.dataclass(frozen=True)
class Checkpoint:
    path: pathlib.Path
    step: int


class Control:
    def __init__(self, total_steps: int):
        self._lock = threading.Lock()
        self.phase = Phase.STARTING
        self.total_steps = total_steps
        self.weight_version = 0
        self.replicas: list[ReplicaStatus] = []
        self.message = ""
        self.canary = None
        self.history: list[StepMetrics] = []
        self._resume = threading.Event()
        self._resume.set()
        self._checkpoints: list[concurrent.futures.Future] = []
        self._watchers: list[tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = []
        # Dependencies failing right now, by name. Set by whichever thread calls them (a one_step_off
        # rollout scores in the background while the main thread waits in another phase), so the
        # status shows the wait whatever the loop's phase says.
        self._waiting: dict[str, Waiting] = {}

    # --- written by the loop -------------------------------------------------
    def set_phase(self, phase: Phase, message: str = "") -> None:
        with self._lock:
            self.phase, self.message = phase, message

    def dependency_failing(self, dependency: str, message: str) -> None:
        """A call to `dependency` failed and is being retried; the first failure sets the time."""
        with self._lock:
            since = self._waiting[dependency].since if dependency in self._waiting else time.time()
            self._waiting[dependency] = Waiting(dependency, since, message)

    def dependency_ok(self, dependency: str) -> None:
        with self._lock:
            self._waiting.pop(dependency, None)

    def set_replicas(self, replicas: list[ReplicaStatus]) -> None:
        with self._lock:
            self.replicas = list(replicas)

    def set_canary(self, verdict) -> None:
        with self._lock:
            self.canary = verdict

    def record(self, metrics: StepMetrics) -> None:
        """One finished step: keep it and hand it to every WatchMetrics stream."""
        with self._lock:
            self.history.append(metrics)
            self.weight_version = metrics.pushed_version
            watchers = list(self._watchers)
        for loop, queue in watchers:
            loop.call_soon_threadsafe(queue.put_nowait, metrics)

    def finish(self, phase: Phase, message: str = "") -> None:
        self.set_phase(phase, message)
        with self._lock:
            watchers = list(self._watchers)
        for loop, queue in watchers:
            loop.call_soon_threadsafe(queue.put_nowait, None)

    def checkpoint_requested(self) -> bool:
        with self._lock:
            return bool(self._checkpoints)

    def checkpoint_done(self, checkpoint: Checkpoint) -> None:
        """Answer every request that came before this checkpoint: one checkpoint serves them all.
        A request whose caller went away (a cancelled RPC) is skipped."""
        with self._lock:
            requests, self._checkpoints = self._checkpoints, []
        for future in requests:
            if future.set_running_or_notify_cancel():
                future.set_result(checkpoint)

    def wait_for_resume(self, timeout: float) -> bool:
        return self._resume.wait(timeout)

    # --- called by the server -----------------------------------------------
    def pause(self) -> None:
        self._resume.clear()

    def resume(self) -> None:
        self._resume.set()

    @property
    def paused(self) -> bool:
        return not self._resume.is_set()

    def request_checkpoint(self) -> concurrent.futures.Future:
        """Resolved by the loop with a Checkpoint after the current step."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        with self._lock:
            self._checkpoints.append(future)
        return future

    def watch(self, include_history: bool) -> asyncio.Queue:
        queue: asyncio.Queue = asyncio.Queue()
        with self._lock:
            if include_history:
                for m in self.history:
                    queue.put_nowait(m)
            if self.phase in (Phase.FINISHED, Phase.FAILED):
                queue.put_nowait(None)
            self._watchers.append((asyncio.get_running_loop(), queue))
        return queue

    def unwatch(self, queue: asyncio.Queue) -> None:
        with self._lock:
            self._watchers = [(l, q) for l, q in self._watchers if q is not queue]

    def snapshot(self) -> Status:
        with self._lock:
            phase, message = self.phase, self.message
            waiting = min(self._waiting.values(), key=lambda w: w.since, default=None)  # the longest wait
            if waiting is not None and phase not in (Phase.FINISHED, Phase.FAILED):
                phase = Phase.WAITING
                message = (f"waiting for {waiting.dependency} since "
                           f"{time.strftime('%H:%M:%S', time.gmtime(waiting.since))} UTC "
                           f"({time.time() - waiting.since:.0f} s): {waiting.message}")
            return Status(phase, self.history[-1].step if self.history else 0, self.total_steps,
                          self.weight_version, list(self.replicas), self.history[-1] if self.history else None,
                          self.paused, message, waiting, self.canary)


@contextlib.contextmanager
def phase(seconds: dict[str, float], p: Phase, control: Control):
    """Time one phase of the step and show it in GetStatus."""
    control.set_phase(p)
    start = time.perf_counter()
    try:
        yield
    finally:
        seconds[p.value] = seconds.get(p.value, 0.0) + time.perf_counter() - start
