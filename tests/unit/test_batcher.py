"""The reward batcher on a plain-Python forward: batch limits, waiting, order, queue limit, failures."""
from __future__ import annotations

import asyncio
import threading
import time

import pytest

from services.common.errors import InvalidArgument, ResourceExhausted
from services.reward.batcher import Batcher, plan_batches


class RecordingForward:
    """Scores a sequence as sum(ids) and records every batch it saw (in the worker thread)."""

    def __init__(self, delay: float = 0.0, fail_if=None):
        self.batches: list[list[list[int]]] = []
        self.delay = delay
        self.fail_if = fail_if
        self.thread_names: set[str] = set()

    def __call__(self, batch):
        self.batches.append([list(s) for s in batch])
        self.thread_names.add(threading.current_thread().name)
        if self.delay:
            time.sleep(self.delay)
        if self.fail_if is not None and any(self.fail_if(s) for s in batch):
            raise RuntimeError("boom")
        return [float(sum(s)) for s in batch]


def run(coro):
    return asyncio.run(coro)


async def started(forward, **kw) -> Batcher:
    b = Batcher(forward, **kw)
    await b.start()
    return b


def test_plan_batches_respects_size_and_padded_tokens():
    lengths = [5, 1, 9, 3, 3, 7, 2, 8, 4, 6]
    batches = plan_batches(lengths, max_batch_size=3, max_batch_tokens=16, overhead_tokens=1000)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    for b in batches:
        assert len(b) <= 3
        assert len(b) * max(lengths[i] for i in b) <= 16
    assert len(batches) == 5  # the fewest the limits allow, when a forward costs much
    # Sorted by length: consecutive batches never overlap in length range (bucketing).
    ranges = [(min(lengths[i] for i in b), max(lengths[i] for i in b)) for b in batches]
    assert all(hi <= lo2 for (_, hi), (lo2, _) in zip(ranges, ranges[1:]))


def test_plan_batches_row_longer_than_budget_runs_alone():
    assert plan_batches([50, 2, 2], max_batch_size=8, max_batch_tokens=10, overhead_tokens=100) == [[1, 2], [0]]


def test_plan_batches_trades_padding_against_per_batch_overhead():
    # One long row would pad eight short ones to 100 tokens each: it goes alone.
    assert plan_batches([100] + [5] * 8, 64, 10_000, overhead_tokens=10) == [[1, 2, 3, 4, 5, 6, 7, 8], [0]]
    # Similar lengths: one batch, not one forward per row.
    assert plan_batches([10, 11, 12, 13], 64, 10_000, overhead_tokens=10) == [[0, 1, 2, 3]]
    # No overhead: every row alone (no padding at all); huge overhead: as few batches as the limits allow.
    assert len(plan_batches([1, 2, 3, 4], 64, 10_000, overhead_tokens=0)) == 4
    assert [len(b) for b in plan_batches([1, 2, 3, 4, 5], 2, 10_000, overhead_tokens=10**6)] in ([1, 2, 2], [2, 2, 1], [2, 1, 2])


def test_concurrent_requests_share_batches_and_results_keep_order():
    fwd = RecordingForward()

    async def main():
        b = await started(fwd, max_batch_size=64, max_batch_tokens=10_000, max_wait_s=0.05)
        reqs = [[[i, 1], [i] * 5, [i, 2, 3]] for i in range(10)]
        out = await asyncio.gather(*(b.submit(r) for r in reqs))
        await b.stop()
        return reqs, out

    reqs, out = run(main())
    for r, o in zip(reqs, out):
        assert o == [float(sum(s)) for s in r]
    # 30 sequences arriving together within max_wait are scored in one window,
    # far fewer forwards than sequences, all in the worker thread.
    assert sum(len(b) for b in fwd.batches) == 30
    assert len(fwd.batches) <= 3
    assert all(name.startswith("reward-forward") for name in fwd.thread_names)


def test_batches_respect_max_size_and_max_tokens():
    fwd = RecordingForward()

    async def main():
        b = await started(fwd, max_batch_size=4, max_batch_tokens=24, max_wait_s=0.05)
        seqs = [[1] * n for n in (1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 3, 3, 2)]
        out = await b.submit(seqs)
        await b.stop()
        return seqs, out

    seqs, out = run(main())
    assert out == [float(len(s)) for s in seqs]
    for batch in fwd.batches:
        assert len(batch) <= 4
        assert len(batch) * max(len(s) for s in batch) <= 24


def test_a_lone_request_waits_for_company_and_a_full_batch_does_not():
    fwd = RecordingForward()

    async def main():
        b = await started(fwd, max_batch_size=64, max_batch_tokens=10_000, max_wait_s=0.2)
        t0 = time.monotonic()
        await b.submit([[1, 2]])
        waited = time.monotonic() - t0
        await b.stop()
        # With a 60 s max wait, a full batch still runs at once: were it to wait, wait_for fails.
        b = await started(fwd, max_batch_size=64, max_batch_tokens=10_000, max_wait_s=60.0)
        await asyncio.wait_for(b.submit([[1]] * 64), timeout=20)
        await b.stop()
        return waited

    assert run(main()) >= 0.18  # waited for company (up to max_wait), then ran alone


def test_queue_limit_raises_resource_exhausted_naming_the_flag():
    fwd = RecordingForward(delay=0.3)

    async def main():
        b = await started(fwd, max_batch_size=2, max_batch_tokens=1000, max_wait_s=0.0, max_queue=4)
        first = asyncio.create_task(b.submit([[1], [2]]))  # taken into the forward pass
        await asyncio.sleep(0.05)
        second = asyncio.create_task(b.submit([[3], [4], [5], [6]]))  # fills the queue
        await asyncio.sleep(0.01)
        with pytest.raises(ResourceExhausted, match=r"--max-queue=4"):
            await b.submit([[7]])
        with pytest.raises(ResourceExhausted, match=r"--max-queue=4"):
            await b.submit([[1]] * 5)  # larger than the queue by itself
        res = await asyncio.gather(first, second)
        after = await b.submit([[8, 1]])  # and it goes on serving
        await b.stop()
        return res, after

    res, after = run(main())
    assert res == [[1.0, 2.0], [3.0, 4.0, 5.0, 6.0]]
    assert after == [9.0]


def test_forward_exception_fails_only_its_batch():
    fwd = RecordingForward(fail_if=lambda s: 99 in s)

    async def main():
        b = await started(fwd, max_batch_size=2, max_batch_tokens=1000, max_wait_s=0.05)
        # Same length so that plan_batches keeps arrival order: [good, bad] [good, good].
        results = await asyncio.gather(
            b.submit([[1, 1]]), b.submit([[99, 0]]), b.submit([[2, 2]]), b.submit([[3, 3]]),
            return_exceptions=True)
        after = await b.submit([[5, 5]])
        await b.stop()
        return results, after

    results, after = run(main())
    assert isinstance(results[0], RuntimeError) and isinstance(results[1], RuntimeError)
    assert results[2] == [4.0] and results[3] == [6.0]
    assert after == [10.0]


def test_cancelled_caller_is_skipped():
    fwd = RecordingForward(delay=0.2)

    async def main():
        b = await started(fwd, max_batch_size=1, max_batch_tokens=1000, max_wait_s=0.0)
        busy = asyncio.create_task(b.submit([[1]]))
        await asyncio.sleep(0.05)
        gone = asyncio.create_task(b.submit([[42]]))
        await asyncio.sleep(0.01)
        gone.cancel()
        assert await b.submit([[2]]) == [2.0]
        await busy
        await b.stop()

    run(main())
    assert [[42]] not in fwd.batches


def test_empty_sequence_is_invalid():
    async def main():
        b = await started(RecordingForward())
        try:
            with pytest.raises(InvalidArgument):
                await b.submit([[1], []])
            assert await b.submit([]) == []
        finally:
            await b.stop()

    run(main())
