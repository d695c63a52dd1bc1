"""Process memory and CPU load during one bench phase (psutil), and freeing memory between variants."""

from __future__ import annotations

import contextlib
import ctypes
import gc
import threading
import time
from typing import Any


def _malloc_trim() -> None:
    """Give freed heap back to the OS so the next phase starts from a true baseline (glibc only)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def free_memory() -> None:
    gc.collect()
    _malloc_trim()


class PhaseMonitor:
    """Samples this process's RSS every `interval` s between __enter__ and __exit__ (max = peak RSS), and the CPU
    time the rest of the machine used meanwhile."""

    def __init__(self, interval: float = 0.02) -> None:
        import psutil

        self.proc = psutil.Process()
        self.interval = interval
        self.peak = self.start = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            with contextlib.suppress(Exception):
                self.peak = max(self.peak, self.proc.memory_info().rss)

    def _busy(self) -> tuple[float, float]:
        import psutil

        sys_t = psutil.cpu_times()
        busy = sum(sys_t) - sys_t.idle - getattr(sys_t, "iowait", 0.0)
        own = self.proc.cpu_times()
        return busy, own.user + own.system + own.children_user + own.children_system

    def __enter__(self) -> PhaseMonitor:
        self.start = self.peak = self.proc.memory_info().rss
        self._t0 = time.perf_counter()
        self._busy0 = self._busy()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.peak = max(self.peak, self.proc.memory_info().rss)
        wall = time.perf_counter() - self._t0
        busy, own = self._busy()
        self.wall_s = wall
        self.own_cores = (own - self._busy0[1]) / wall if wall > 0 else 0.0
        self.other_cores = max(0.0, (busy - self._busy0[0]) - (own - self._busy0[1])) / wall if wall > 0 else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "peak_rss_bytes": self.peak,
            "rss_start_bytes": self.start,
            "own_cores": round(self.own_cores, 2),
            "other_load_cores": round(self.other_cores, 2),
        }
