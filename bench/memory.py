"""Wall time and resident memory of one call, shared by the bench scripts.

The peak is sampled every 5 ms from /proc (Linux), so it sees memory that a
call allocates and frees before returning, which ru_maxrss alone would hide
behind whatever the process held earlier.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any


def rss() -> int:
    """Resident set size of this process in bytes."""
    pages = Path("/proc/self/statm").read_text().split()[1]
    return int(pages) * os.sysconf("SC_PAGE_SIZE")


def peak_rss() -> int:
    """Peak resident set size of this process so far, in bytes (Linux ru_maxrss is KiB)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def measure(fn: Callable[[], Any]) -> tuple[Any, float, int]:
    """Run ``fn``; return its result, wall seconds and peak RSS increase in bytes."""
    base, peak, stop = rss(), [0], threading.Event()

    def sample() -> None:
        while not stop.wait(0.005):
            peak[0] = max(peak[0], rss())

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    t0 = time.perf_counter()
    out = fn()
    dt = time.perf_counter() - t0
    stop.set()
    th.join()
    return out, dt, max(peak[0], rss()) - base
