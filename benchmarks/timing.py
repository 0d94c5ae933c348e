"""Wall and CPU time of a block, shared by the benchmark scripts (run as `python benchmarks/<name>.py`)."""
from __future__ import annotations

import time


class Timer:
    """`with Timer() as t: ...` leaves t.wall and t.cpu (seconds; CPU time of this process)."""

    def __enter__(self):
        self.wall, self.cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc):
        self.wall, self.cpu = time.perf_counter() - self.wall, time.process_time() - self.cpu


def best_of(fn, repeats: int) -> Timer:
    """Fastest of `repeats` runs by CPU time (least disturbed by other processes)."""
    best = None
    for _ in range(repeats):
        with Timer() as t:
            fn()
        if best is None or t.cpu < best.cpu:
            best = t
    return best
