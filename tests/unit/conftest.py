"""Fixtures of the unit tests that run asyncio cores (the reward scorer, its worker pool)."""
from __future__ import annotations

import asyncio
import threading

import pytest


@pytest.fixture(scope="module")
def loop():
    """One event loop in a thread for the module: what starts once (a scorer, a pool of processes)
    serves every test; a test hands it coroutines with asyncio.run_coroutine_threadsafe."""
    lp = asyncio.new_event_loop()
    t = threading.Thread(target=lp.run_forever, daemon=True)
    t.start()
    yield lp
    lp.call_soon_threadsafe(lp.stop)
    t.join()
