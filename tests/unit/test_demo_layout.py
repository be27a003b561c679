"""The demo's deployed layout for comparing rollout modes: a child server on its CPUs from its
first instruction (thread pools size themselves by what they see at start), the trainer moved
with every thread and moved back."""
from __future__ import annotations

import os
import sys
import threading

import pytest
import torch

from services.demo.launch import ChildServer
from services.demo.pipeline import deployed_cpus, trainer_on

CPUS = sorted(os.sched_getaffinity(0))
needs_two = pytest.mark.skipif(len(CPUS) < 2, reason="the layout needs 2 CPUs (CI and this project's machines have 2)")


def test_layout_only_when_modes_are_compared():
    assert deployed_cpus(["sync"]) is None
    expected = (CPUS[:1], CPUS[1:2]) if len(CPUS) >= 2 else None  # one CPU: nothing to split
    assert deployed_cpus(["sync", "one_step_off"]) == expected


@needs_two
def test_a_child_server_starts_on_its_cpus(tmp_path):
    seen = tmp_path / "affinity"
    code = f"import os; open({str(seen)!r}, 'w').write(repr(sorted(os.sched_getaffinity(0))))"
    child = ChildServer([sys.executable, "-c", code], port=0, service="none", cpus=CPUS[1:2]).start()
    assert child.proc.wait(60) == 0
    assert seen.read_text() == repr(CPUS[1:2])


@needs_two
def test_trainer_on_moves_every_thread_and_back():
    threads = torch.get_num_threads()
    stop = threading.Event()
    worker = threading.Thread(target=stop.wait)
    worker.start()
    try:
        with trainer_on(CPUS[1:2]):
            assert sorted(os.sched_getaffinity(worker.native_id)) == CPUS[1:2]
            assert sorted(os.sched_getaffinity(0)) == CPUS[1:2]
            assert torch.get_num_threads() == 1
        assert sorted(os.sched_getaffinity(worker.native_id)) == CPUS
        assert torch.get_num_threads() == threads
    finally:
        stop.set()
        worker.join()
