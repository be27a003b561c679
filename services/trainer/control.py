"""What the training loop shares with TrainerService: status, metrics, pause and
checkpoint requests. The loop runs on the main thread, the server on its own event loop
thread; everything here is safe across the two. No gRPC."""
from __future__ import annotations

import asyncio
import concurrent.futures
import threading
import time


class Control:
    def __init__(self, total_steps: int):
        self._lock = threading.Lock()
        self.phase = "STARTING"
        self.step = 0
        self.total_steps = total_steps
        self.weight_version = 0
        self.replicas: list[dict] = []
        self.message = ""
        self.history: list[dict] = []
        self._resume = threading.Event()
        self._resume.set()
        self._checkpoints: list[concurrent.futures.Future] = []
        self._watchers: list[tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = []

    # --- written by the loop -------------------------------------------------
    def set_phase(self, phase: str, message: str = "") -> None:
        with self._lock:
            self.phase, self.message = phase, message

    def record(self, metrics: dict) -> None:
        """One finished step: keep it and hand it to every WatchMetrics stream."""
        with self._lock:
            self.step = metrics["step"]
            self.history.append(metrics)
            watchers = list(self._watchers)
        for loop, queue in watchers:
            loop.call_soon_threadsafe(queue.put_nowait, metrics)

    def finish(self, phase: str, message: str = "") -> None:
        self.set_phase(phase, message)
        with self._lock:
            watchers = list(self._watchers)
        for loop, queue in watchers:
            loop.call_soon_threadsafe(queue.put_nowait, None)

    def wait_if_paused(self, serve_checkpoints) -> None:
        """Block while paused; checkpoint requests are still served meanwhile."""
        if self._resume.is_set():
            return
        previous = self.phase
        self.set_phase("PAUSED")
        while not self._resume.wait(0.2):
            serve_checkpoints()
        self.set_phase(previous)

    def take_checkpoint_requests(self) -> list[concurrent.futures.Future]:
        with self._lock:
            requests, self._checkpoints = self._checkpoints, []
        return requests

    # --- called by the server -----------------------------------------------
    def pause(self) -> None:
        self._resume.clear()

    def resume(self) -> None:
        self._resume.set()

    @property
    def paused(self) -> bool:
        return not self._resume.is_set()

    def request_checkpoint(self) -> concurrent.futures.Future:
        """Resolved by the loop with (path, step) after the current step."""
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
            if self.phase in ("FINISHED", "FAILED"):
                queue.put_nowait(None)
            self._watchers.append((asyncio.get_running_loop(), queue))
        return queue

    def unwatch(self, queue: asyncio.Queue) -> None:
        with self._lock:
            self._watchers = [(l, q) for l, q in self._watchers if q is not queue]

    def snapshot(self) -> dict:
        with self._lock:
            return dict(phase=self.phase, step=self.step, total_steps=self.total_steps,
                        weight_version=self.weight_version, replicas=list(self.replicas),
                        last=self.history[-1] if self.history else None, paused=self.paused,
                        message=self.message, time=time.time())
