"""The trainer's collectives in a group of one (a plain `rlhf train ...` process)."""
from __future__ import annotations

import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[2]

# Run in a process of its own: a process group (and libgomp's count of threads) lives as long as
# the process does.
GROUP_OF_ONE = r"""
import os
import torch
from services.trainer import distributed

torch.set_num_threads(2)  # an OpenMP pool of two, whatever the CPUs of the machine
d = distributed.init("cpu", "float32")
torch.ones(1 << 22).add_(1)  # the main thread's pool exists
threads = len(os.listdir("/proc/self/task"))
big = {"samples": list(range(200_000))}  # pickled, MBs: gloo would copy it with parallel kernels
assert distributed.all_gather_object(big) == [big]
assert distributed.broadcast_object(big, d) is big
assert distributed.agree(lambda: big, d, (ValueError,)) == [big]
assert distributed.all_sum([1, 2.5, torch.tensor(3.0)], d) == [1.0, 2.5, 3.0]
assert distributed.all_max([False, 1, True], d) == [False, True, True]
local = torch.randn(64, 4096)
assert distributed.gather_rows(local, d) is local
after = len(os.listdir("/proc/self/task"))
print("threads", threads, after)
assert after == threads, f"{after - threads} thread(s) started by the collectives of a group of one"
distributed.close()
"""


def test_collectives_of_a_group_of_one_are_the_identity_and_start_no_thread():
    """gloo runs a collective on a worker thread of its own; a large object's copies there start a
    second OpenMP pool, after which libgomp stops spinning in every pool of the process (the PPO
    update's OpenMP workers then sleep between parallel regions: thousands of context switches
    an update). In a group of one the collectives are skipped."""
    result = subprocess.run([sys.executable, "-c", GROUP_OF_ONE], capture_output=True, text=True, cwd=ROOT,
                            timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    assert result.stdout.startswith("threads")
