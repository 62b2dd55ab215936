"""Emulated heterogeneity: make a worker of capacity c behave as if it were 1/c times slower.

- ``sleep``: after each step the worker sleeps (1/c - 1) times the step's wall time, so
  its wall time is compute time / c.
- ``virtual``: no sleeping; every time the worker reports is its virtual clock,
  the CPU time it used divided by c (robust on an oversubscribed machine).
- ``none``: wall time as it is (the cluster's real heterogeneity).

A :class:`Throttle` runs a unit of work and returns the time it reports for it, in the
clock that planning uses; it also keeps the virtual clock for every mode.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

MODES = ("sleep", "virtual", "none")


@dataclass
class StepTime:
    reported: float  # what planning sees (wall for sleep/none, virtual for virtual)
    wall: float  # wall seconds including any throttle sleep
    virtual: float  # CPU seconds / capacity


@dataclass
class Throttle:
    capacity: float = 1.0
    mode: str = "none"
    slept: float = field(default=0.0, init=False)

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"unknown throttle {self.mode!r}; choose one of: {', '.join(MODES)}")
        if not 0.0 < self.capacity <= 1.0:
            raise ValueError(f"capacity {self.capacity} must be in (0, 1]")

    def run(self, fn, *args, **kwargs):
        """Run ``fn`` under the throttle; returns (fn's result, StepTime)."""
        w0, c0 = time.perf_counter(), time.thread_time()
        result = fn(*args, **kwargs)
        compute_wall = time.perf_counter() - w0
        cpu = time.thread_time() - c0
        if self.mode == "sleep" and self.capacity < 1.0:
            pause = compute_wall * (1.0 / self.capacity - 1.0)
            time.sleep(pause)
            self.slept += pause
        wall = time.perf_counter() - w0
        virtual = cpu / self.capacity
        reported = virtual if self.mode == "virtual" else wall
        return result, StepTime(reported, wall, virtual)
