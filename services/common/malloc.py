"""glibc malloc settings for the processes that stream weight pushes.

glibc serves each allocation above its mmap threshold (128 KiB at start) with fresh pages
from mmap and gives them back on free. gRPC Python copies every 1 MiB chunk of a push into
new buffers on both ends, so without this each copy page-faults its way through newly
zeroed memory: in a loopback microbenchmark of the push stream (one process) it ran at a
third of the speed it reaches when the freed buffers are reused from the heap. Raising both
thresholds keeps them for reuse; the heap still shrinks once more than `trim_threshold`
bytes are free at its top.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger(__name__)

M_TRIM_THRESHOLD = -1  # from glibc's malloc.h
M_MMAP_THRESHOLD = -3


def reuse_large_buffers(mmap_threshold: int = 32 << 20, trim_threshold: int = 64 << 20) -> bool:
    """Apply the settings to this process; False where the C library is not glibc."""
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    ok = bool(mallopt(M_MMAP_THRESHOLD, mmap_threshold)) and bool(mallopt(M_TRIM_THRESHOLD, trim_threshold))
    log.debug("malloc: mmap threshold %d, trim threshold %d (%s)", mmap_threshold, trim_threshold,
              "applied" if ok else "refused")
    return ok
