"""Timing and memory measurement, framework-neutral (stdlib only).

`measure` runs a case `warmup` times (compilation, allocator warm-up), then `repeats` timed runs, and
reports the median and minimum wall time, the median process CPU time, and the peak memory of the
timed runs. Peak host memory is the process's resident high-water mark (VmHWM), reset before the
timed runs through /proc/self/clear_refs; a side may add device memory through `Memory`.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable
from typing import Any, Optional


def rss_mb() -> float:
    """Current resident set size of this process, MiB."""
    return _status_kb("VmRSS") / 1024


def _status_kb(field: str) -> float:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return float(line.split()[1])
    except OSError:
        pass
    return float("nan")


def reset_peak_rss() -> None:
    """Resets the resident high-water mark to the current RSS (Linux >= 4.0; a no-op elsewhere)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


class Memory:
    """Peak memory of a case: host RSS, plus device bytes where the side provides hooks."""

    def __init__(self, device_reset: Optional[Callable[[], None]] = None,
                 device_peak: Optional[Callable[[], float]] = None) -> None:
        self._device_reset = device_reset
        self._device_peak = device_peak

    def reset(self) -> None:
        reset_peak_rss()
        if self._device_reset:
            self._device_reset()

    def peak(self) -> dict[str, float]:
        out = {"peak_rss_mb": round(_status_kb("VmHWM") / 1024, 1)}
        if self._device_peak:
            out["peak_device_mb"] = round(self._device_peak(), 1)
        return out


def measure(
    fn: Callable[[], Any],
    sync: Callable[[Any], Any],
    warmup: int,
    repeats: int,
    memory: Memory,
) -> dict[str, float]:
    """Times `sync(fn())`. Returns seconds (median_s, min_s, cpu_s, first_s) and peak memory (MiB).

    `first_s` is the first call (compilation included where there is one); `cpu_s` is the median
    process CPU time (all threads) of the timed runs.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}.")
    t = time.perf_counter()
    sync(fn())
    first = time.perf_counter() - t
    for _ in range(max(warmup - 1, 0)):
        sync(fn())
    rss_before = rss_mb()
    memory.reset()
    walls, cpus = [], []
    for _ in range(repeats):
        t, c = time.perf_counter(), time.process_time()
        sync(fn())
        walls.append(time.perf_counter() - t)
        cpus.append(time.process_time() - c)
    return {
        "median_s": statistics.median(walls),
        "min_s": min(walls),
        "cpu_s": statistics.median(cpus),
        "first_s": first,
        "rss_before_mb": round(rss_before, 1),
        **memory.peak(),
    }


def measure_fresh(
    setup: Callable[[], Any],
    fn: Callable[[Any], Any],
    sync: Callable[[Any], Any],
    repeats: int,
    memory: Memory,
) -> dict[str, float]:
    """Times `sync(fn(setup()))` with a fresh, untimed `setup()` each run (one-shot operations such as
    adapter creation or merge_and_unload). The first run is reported as `first_s` and not counted; the
    peak memory is the highest over the timed runs, each measured from just before its `fn`."""
    walls, cpus, peaks, first, rss_before = [], [], [], 0.0, float("nan")
    for i in range(repeats + 1):
        obj = setup()
        rss_before = rss_mb()
        memory.reset()
        t, c = time.perf_counter(), time.process_time()
        sync(fn(obj))
        wall, cpu = time.perf_counter() - t, time.process_time() - c
        peaks.append(memory.peak())
        del obj
        if i == 0:
            first = wall
        else:
            walls.append(wall)
            cpus.append(cpu)
    peak = {k: max(p[k] for p in peaks[1:]) for k in peaks[0]}
    return {
        "median_s": statistics.median(walls),
        "min_s": min(walls),
        "cpu_s": statistics.median(cpus),
        "first_s": first,
        "rss_before_mb": round(rss_before, 1),
        **peak,
    }


def pin_threads(threads: int) -> list[int]:
    """Restricts this process to its first `threads` allowed CPUs (what `taskset` does); returns them.

    Call before importing a framework: XLA:CPU sizes its intra-op pool from the CPUs the process may
    run on, and torch's OpenMP pool reads OMP_NUM_THREADS.
    """
    allowed = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    if allowed and threads < len(allowed):
        os.sched_setaffinity(0, allowed[:threads])
        allowed = allowed[:threads]
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = str(threads)
    return allowed
