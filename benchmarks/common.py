"""What the benchmark scripts share: interleaved timing and a description of the machine."""

from __future__ import annotations

import platform
import time
from collections.abc import Callable
from pathlib import Path


def take_turns(fns: dict[str, Callable[[], object]], repeat: int, clock=time.perf_counter,
               warmup: bool = True) -> dict[str, list[float]]:
    """Seconds of each call, ``repeat`` times after one warm-up call each (``warmup=False``: the caller
    has run them already); the functions take turns, so that a load that comes and goes on a shared
    machine hits them alike."""
    for fn in fns.values() if warmup else ():
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeat):
        for name, fn in fns.items():
            t0 = clock()
            fn()
            times[name].append(clock() - t0)
    return times


def cpu_name() -> str:
    """The processor's model name (``/proc/cpuinfo``), else what ``platform`` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
