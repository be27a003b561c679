"""Dynamic batching of reward-model forward passes across concurrent requests.

Requests put sequences (token-id lists) on one bounded queue; a single loop
takes what is waiting, sorts it by length so that sequences of similar length
share a batch (less padding), cuts it into the cheapest batches that respect
max_batch_size and max_batch_tokens (padded: rows x longest row), and runs each
forward pass in a worker thread. Torch releases the GIL during the forward, so
the event loop keeps accepting requests while the model computes.

No gRPC and no torch here: `forward` is any function from a list of id lists
to a list of floats.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import itertools
import logging
import math
import time
from collections import deque
from typing import Callable, Sequence

from services.common.errors import InvalidArgument, ResourceExhausted

log = logging.getLogger(__name__)

Forward = Callable[[list[list[int]]], list[float]]


@dataclasses.dataclass
class BatchStats:
    """What one forward pass looked like; handed to `on_batch` (metrics)."""
    size: int
    padded_tokens: int
    queue_seconds: list[float]
    inference_seconds: float
    ok: bool


@dataclasses.dataclass
class _Item:
    ids: list[int]
    future: asyncio.Future
    enqueued: float


def padded_tokens(lengths: Sequence[int]) -> int:
    return len(lengths) * max(lengths) if lengths else 0


# What one more forward pass costs, in padded tokens. On CPU a forward of the tiny
# model costs ~1.6 ms before any token (Python, kernel launches), the time of ~50
# tokens; on a GPU it is worth far more tokens, so there it pays to batch wider.
BATCH_OVERHEAD_TOKENS = 64


def plan_batches(lengths: Sequence[int], max_batch_size: int, max_batch_tokens: int,
                 overhead_tokens: int = BATCH_OVERHEAD_TOKENS) -> list[list[int]]:
    """Indices into `lengths`, grouped into batches that respect both limits.

    Cost model: each batch costs overhead_tokens + rows x longest row (the padded
    tensor). Sorted by length, the cheapest grouping is a run of contiguous
    slices, found by dynamic programming over the cut points: one long row no
    longer pads a batch of short ones, and short rows are not run one by one.
    A single row longer than max_batch_tokens runs alone (the server rejects
    such rows before they get here; see --max-length).
    """
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    sorted_lengths = [lengths[i] for i in order]
    n = len(order)
    best = [0.0] + [math.inf] * n  # best[j]: cheapest plan for the j shortest rows
    cut = [0] * (n + 1)  # cut[j]: where the last batch of that plan starts
    for j in range(1, n + 1):
        longest = sorted_lengths[j - 1]
        for k in range(j - 1, max(-1, j - 1 - max_batch_size), -1):  # last batch = rows k..j-1
            rows = j - k
            if rows > 1 and rows * longest > max_batch_tokens:
                break
            cost = best[k] + overhead_tokens + rows * longest
            if cost < best[j]:
                best[j], cut[j] = cost, k
    batches = []
    j = n
    while j > 0:
        batches.append(order[cut[j]:j])
        j = cut[j]
    return batches[::-1]


class Batcher:
    """Collects sequences from many callers and scores them in padded batches.

    Results come back to each caller in the order it submitted them. A forward
    pass that raises fails the futures of its own batch only.
    """

    def __init__(self, forward: Forward, *, max_batch_size: int = 64, max_batch_tokens: int = 16384,
                 max_wait_s: float = 0.005, max_queue: int = 4096,
                 on_batch: Callable[[BatchStats], None] | None = None):
        if max_batch_size < 1 or max_batch_tokens < 1 or max_queue < 1 or max_wait_s < 0:
            raise ValueError("max_batch_size, max_batch_tokens and max_queue must be >= 1, max_wait_s >= 0")
        self.forward = forward
        self.max_batch_size = max_batch_size
        self.max_batch_tokens = max_batch_tokens
        self.max_wait_s = max_wait_s
        self.max_queue = max_queue
        self.on_batch = on_batch
        self._queue: deque[_Item] = deque()
        self._wakeup: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        # One thread: a second concurrent forward would only compete for the same cores.
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="reward-forward")

    @property
    def depth(self) -> int:
        """Sequences waiting for a forward pass (not counting the one running)."""
        return len(self._queue)

    async def start(self) -> None:
        self._wakeup = asyncio.Event()
        self._task = asyncio.create_task(self._loop(), name="reward-batcher")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
        while self._queue:
            item = self._queue.popleft()
            if not item.future.done():
                item.future.cancel()
        self._executor.shutdown(wait=True)

    async def submit(self, seqs: Sequence[list[int]]) -> list[float]:
        """Score `seqs`; the results are in the same order."""
        if self._task is None or self._wakeup is None:
            raise RuntimeError("Batcher.start() was not awaited")
        if not seqs:
            return []
        if any(len(s) == 0 for s in seqs):
            raise InvalidArgument("a sequence to score must hold at least one token")
        if len(self._queue) + len(seqs) > self.max_queue:
            raise ResourceExhausted(
                f"reward queue is full: {len(self._queue)} pairs waiting + {len(seqs)} new "
                f"> --max-queue={self.max_queue}; retry later")
        loop = asyncio.get_running_loop()
        now = time.monotonic()
        items = [_Item(list(s), loop.create_future(), now) for s in seqs]
        self._queue.extend(items)
        self._wakeup.set()
        # If the caller goes away, gather cancels the futures and the loop skips them.
        return list(await asyncio.gather(*(it.future for it in items)))

    async def _loop(self) -> None:
        assert self._wakeup is not None
        while True:
            if not self._queue:
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            # Give a batch up to max_wait to fill, counted from the oldest waiting item;
            # stop waiting early once a full batch is there.
            deadline = self._queue[0].enqueued + self.max_wait_s
            while len(self._queue) < self.max_batch_size and not self._tokens_full():
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._wakeup.clear()
                try:
                    await asyncio.wait_for(self._wakeup.wait(), remaining)
                except asyncio.TimeoutError:
                    break
            await self._run_window()

    def _tokens_full(self) -> bool:
        lengths = [len(it.ids) for it in itertools.islice(self._queue, self.max_batch_size)]
        return padded_tokens(lengths) >= self.max_batch_tokens

    async def _run_window(self) -> None:
        """Take a window of waiting items in arrival order, bucket it by length, run it.

        The window is a few batches wide: wide enough that sorting by length
        saves padding, narrow enough that a newcomer waits at most one window.
        """
        window: list[_Item] = []
        limit = 4 * self.max_batch_size
        while self._queue and len(window) < limit:
            item = self._queue.popleft()
            if not item.future.done():  # cancelled callers are skipped
                window.append(item)
        if not window:
            return
        loop = asyncio.get_running_loop()
        for idx in plan_batches([len(it.ids) for it in window], self.max_batch_size, self.max_batch_tokens):
            batch = [window[i] for i in idx if not window[i].future.done()]
            if not batch:
                continue
            start = time.monotonic()
            queue_seconds = [start - it.enqueued for it in batch]
            ok = True
            try:
                scores = await loop.run_in_executor(self._executor, self.forward, [it.ids for it in batch])
                if len(scores) != len(batch):
                    raise RuntimeError(f"forward returned {len(scores)} scores for {len(batch)} sequences")
            except Exception as exc:  # the batch fails, the batcher goes on
                log.exception("reward forward pass failed for a batch of %d", len(batch))
                ok = False
                for it in batch:
                    if not it.future.done():
                        it.future.set_exception(exc)
            else:
                for it, s in zip(batch, scores):
                    if not it.future.done():
                        it.future.set_result(float(s))
            if self.on_batch is not None:
                self.on_batch(BatchStats(len(batch), padded_tokens([len(it.ids) for it in batch]),
                                         queue_seconds, time.monotonic() - start, ok))
