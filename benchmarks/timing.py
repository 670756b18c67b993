"""Timing and memory measurement, framework-neutral (stdlib only).

Repeated cases (forwards, train steps) are timed together by `Rounds`: each case is built and warmed
up (the first call compiles), then the timed runs go round-robin over the cases, so that a slow
spell of the machine (other processes, a busy host) falls on every case alike instead of on
whichever case it happened to meet. Each case reports the median and minimum wall time, the median
process CPU time, and its memory, measured apart from the timed runs:

  * `static_mb`: resident memory the case added when it was built and warmed up (its weights or
    adapter, optimizer state, compiled program);
  * `transient_mb`: the high-water mark of one more run above the memory resident before it
    (activations, gradients, temporaries);
  * `peak_rss_mb`: the process before any case of the group + static + transient, i.e. the peak of a
    process that holds the base model and this case only.

Host memory is the resident set (VmRSS) and its high-water mark (VmHWM, reset through
/proc/self/clear_refs), read after glibc's `malloc_trim` has returned freed heap pages, so that
memory one case freed does not hide what the next one needs; a side may add device memory through
`Memory`. One-shot operations (adapter
creation, merge_and_unload) go through `measure_fresh`, with a fresh object per run.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import os
import statistics
import time
from collections.abc import Callable
from typing import Any, Optional


def _status_mb(field: str) -> float:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return float(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def rss_mb() -> float:
    """Current resident set size of this process, MiB."""
    return _status_mb("VmRSS")


def trim_heap() -> None:
    """Returns freed heap pages to the OS (glibc `malloc_trim(0)`; a no-op elsewhere)."""
    try:
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def reset_peak_rss() -> None:
    """Resets the resident high-water mark to the current RSS (Linux >= 4.0; a no-op elsewhere)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


class Memory:
    """Host memory, plus device memory where a side gives hooks (MiB): `device_current` (in use now),
    `device_peak` (peak since `device_reset`, or since the start where there is no reset)."""

    def __init__(self, device_current: Optional[Callable[[], float]] = None,
                 device_peak: Optional[Callable[[], float]] = None,
                 device_reset: Optional[Callable[[], None]] = None) -> None:
        self._current, self._peak, self._reset = device_current, device_peak, device_reset
        # Objects alive now (frameworks, the base model) are left out of later collections, which keeps
        # the collection before each reading cheap.
        gc.freeze()

    @property
    def has_device(self) -> bool:
        return self._current is not None

    def current(self) -> dict[str, float]:
        """Memory in use now (after collecting garbage and returning freed heap pages to the OS)."""
        gc.collect()
        trim_heap()
        return {"rss": rss_mb(), **({"device": self._current()} if self._current else {})}

    def reset(self) -> None:
        reset_peak_rss()
        if self._reset:
            self._reset()

    def peak(self) -> dict[str, float]:
        return {"rss": _status_mb("VmHWM"), **({"device": self._peak()} if self._peak else {})}

    @property
    def resettable_device(self) -> bool:
        return self._reset is not None


def _stats(walls: list[float], cpus: list[float]) -> dict[str, float]:
    return {"median_s": statistics.median(walls), "min_s": min(walls), "cpu_s": statistics.median(cpus)}


class Rounds:
    """A group of repeated cases, timed round-robin (see the module docstring).

    Usage: `rounds = Rounds(sync, 2, Memory()); rounds.add("base", lambda: forward); rounds.run(5)`
    gives `{"base": {"median_s": ..., "peak_rss_mb": ...}}`.
    """

    def __init__(self, sync: Callable[[Any], Any], warmup: int, memory: Memory,
                 start: Optional[dict[str, float]] = None) -> None:
        """`start`: `memory.current()` of the process before any case existed (default: now)."""
        self.sync, self.warmup, self.memory = sync, max(warmup, 1), memory
        self.start = start or memory.current()
        self.cases: dict[str, Callable[[], Any]] = {}
        self.first: dict[str, float] = {}
        self.static: dict[str, dict[str, float]] = {}

    def add(self, name: str, build: Callable[[], Callable[[], Any]]) -> None:
        """Builds case `name` (`build()` returns the function to time) and warms it up."""
        before = self.memory.current()
        fn = build()
        t = time.perf_counter()
        self.sync(fn())
        self.first[name] = time.perf_counter() - t
        for _ in range(self.warmup - 1):
            self.sync(fn())
        after = self.memory.current()
        self.static[name] = {k: after[k] - before[k] for k in after}
        self.cases[name] = fn

    def run(self, repeats: int) -> dict[str, dict[str, float]]:
        """`repeats` timed rounds over the cases, then one measured run of each for its memory."""
        if repeats < 1:
            raise ValueError(f"repeats must be >= 1, got {repeats}.")
        walls: dict[str, list[float]] = {n: [] for n in self.cases}
        cpus: dict[str, list[float]] = {n: [] for n in self.cases}
        for _ in range(repeats):
            for name, fn in self.cases.items():
                t, c = time.perf_counter(), time.process_time()
                self.sync(fn())
                walls[name].append(time.perf_counter() - t)
                cpus[name].append(time.process_time() - c)
        transient: dict[str, dict[str, float]] = {}
        for name, fn in self.cases.items():
            before = self.memory.current()
            self.memory.reset()
            self.sync(fn())
            peak = self.memory.peak()
            transient[name] = {k: max(peak[k] - before[k], 0.0) for k in peak}
        return {name: self._summary(name, walls[name], cpus[name], transient[name]) for name in self.cases}

    def _summary(self, name: str, walls: list[float], cpus: list[float], transient: dict[str, float]) -> dict:
        static = self.static[name]
        out = {**_stats(walls, cpus), "first_s": self.first[name],
               "static_mb": round(static["rss"], 1), "transient_mb": round(transient["rss"], 1),
               "peak_rss_mb": round(self.start["rss"] + static["rss"] + transient["rss"], 1)}
        if self.memory.has_device:
            out["static_device_mb"] = round(static["device"], 1)
            if "device" in transient:  # a device peak that resets (PyTorch's); XLA's has none
                out["peak_device_mb"] = round(self.start["device"] + static["device"] + transient["device"], 1)
        return out


def measure_fresh(
    setup: Callable[[], Any],
    fn: Callable[[Any], Any],
    sync: Callable[[Any], Any],
    repeats: int,
    memory: Memory,
    start: dict[str, float],
) -> dict[str, float]:
    """Times `sync(fn(setup()))` with a fresh, untimed `setup()` each run (one-shot operations such as
    adapter creation or merge_and_unload). The first run is reported as `first_s` and not counted.
    `transient_mb` is the high-water mark of a timed `fn` above the memory resident just before it (the
    largest over the runs); `peak_rss_mb` adds it to `start`, the process holding the base model only."""
    walls, cpus, first = [], [], 0.0
    transient: dict[str, float] = {}
    for i in range(repeats + 1):
        obj = setup()
        before = memory.current()
        memory.reset()
        t, c = time.perf_counter(), time.process_time()
        sync(fn(obj))
        wall, cpu = time.perf_counter() - t, time.process_time() - c
        now = memory.peak()
        del obj
        if i == 0:
            first = wall
            continue
        walls.append(wall)
        cpus.append(cpu)
        for k in now:
            transient[k] = max(transient.get(k, 0.0), now[k] - before[k])
    out = {**_stats(walls, cpus), "first_s": first, "transient_mb": round(transient["rss"], 1),
           "peak_rss_mb": round(start["rss"] + transient["rss"], 1)}
    if "device" in transient:
        out["peak_device_mb"] = round(start["device"] + transient["device"], 1)
    return out


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


def isolated(script: str, settings: Any, model: str, case: str, xla_flags: str = "") -> dict[str, Any]:
    """Runs `script SETTINGS OUT --long-case MODEL CASE` (a side script measuring one case) in a fresh
    process with this process's environment (plus `xla_flags` appended to XLA_FLAGS) and CPUs, and returns
    the JSON it wrote (a case killed by SIGKILL, as the OOM killer does, gives `{"failed": ...}`).
    `settings` is the run's `specs.Settings` (its `settings.json` lives in its workdir)."""
    import json
    import subprocess
    import sys
    import tempfile

    settings_path = os.path.join(settings.workdir, "settings.json")
    with tempfile.TemporaryDirectory(dir=settings.workdir) as tmp:
        out = os.path.join(tmp, "case.json")
        cmd = [sys.executable, script, settings_path, out, "--long-case", model, case]
        env = dict(os.environ, XLA_FLAGS=f"{os.environ.get('XLA_FLAGS', '')} {xla_flags}".strip())
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if proc.returncode == -9:  # the kernel's OOM killer (or a user): recorded, the run goes on
            return {"measure": {"failed": "killed by SIGKILL (out of memory)"}, "compiles": 0}
        if proc.returncode:
            raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-6000:]}")
        with open(out) as f:
            return json.load(f)
