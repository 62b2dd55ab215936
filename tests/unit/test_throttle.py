"""Unit tests for elfish_mpi.throttle: sleep and virtual emulation of slower workers.

The timing checks compare a throttled run with the busy loop's own measurement of itself,
with generous margins, so they hold on a loaded machine.
"""
from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from elfish_mpi.throttle import Throttle

torch.set_num_threads(1)


def _busy(seconds: float = 0.02) -> tuple[float, float]:
    """Spin the CPU for about ``seconds`` of thread CPU time; returns (wall, cpu) it measured."""
    w0, c0 = time.perf_counter(), time.thread_time()
    x = 0
    while time.thread_time() - c0 < seconds:
        for i in range(1000):
            x += i
    return time.perf_counter() - w0, time.thread_time() - c0


def test_sleep_throttle_stretches_wall_time():
    # Prepare
    throttle = Throttle(capacity=0.5, mode="sleep")

    # Execute
    (inner_wall, inner_cpu), t = throttle.run(_busy)

    # Assert
    assert inner_cpu >= 0.02
    assert t.wall >= 1.6 * inner_wall
    assert t.reported == t.wall  # sleep mode plans with wall time
    assert throttle.slept >= 0.9 * inner_wall
    assert t.virtual == pytest.approx(2 * inner_cpu, rel=0.25)


def test_sleep_throttle_accumulates_slept_time():
    throttle = Throttle(capacity=0.5, mode="sleep")
    throttle.run(_busy, 0.005)
    first = throttle.slept
    throttle.run(_busy, 0.005)
    assert first > 0.0
    assert throttle.slept > first


def test_virtual_throttle_reports_cpu_over_capacity_without_sleeping():
    # Prepare
    throttle = Throttle(capacity=0.25, mode="virtual")

    # Execute
    (inner_wall, inner_cpu), t = throttle.run(_busy)

    # Assert
    assert throttle.slept == 0.0
    assert t.wall < 1.5 * inner_wall + 0.005  # no sleeping: only call overhead on top
    assert t.reported == t.virtual
    assert t.virtual * 0.25 >= inner_cpu  # the throttle's CPU window contains the loop's
    assert t.virtual == pytest.approx(inner_cpu / 0.25, rel=0.25)


@pytest.mark.parametrize("mode", ["sleep", "none"])
def test_full_capacity_or_none_mode_does_not_sleep(mode):
    throttle = Throttle(capacity=1.0 if mode == "sleep" else 0.5, mode=mode)
    (inner_wall, _), t = throttle.run(_busy, 0.01)
    assert throttle.slept == 0.0
    assert t.reported == t.wall
    assert t.wall < 1.5 * inner_wall + 0.005


def test_run_passes_arguments_and_returns_the_result():
    result, t = Throttle().run(lambda a, b=0: a * 10 + b, 4, b=2)
    assert result == 42
    assert t.wall >= 0.0 and t.virtual >= 0.0


@pytest.mark.parametrize("mode", ["busy", "", "Sleep"])
def test_invalid_mode_raises(mode):
    with pytest.raises(ValueError, match="throttle"):
        Throttle(capacity=0.5, mode=mode)


@pytest.mark.parametrize("capacity", [0.0, -0.5, 1.5, float("nan")])
def test_invalid_capacity_raises(capacity):
    with pytest.raises(ValueError, match="capacity"):
        Throttle(capacity=capacity, mode="sleep")


def test_calibrate_measures_against_the_capacity_1_workers_median():
    from elfish_mpi.calibrate import _table

    # Prepare: two capacity-1 workers 10% apart (noise), a 0.5 worker exactly twice their mean
    rows = np.array([[1.0, 1.0, 1.0], [1.1, 1.1, 1.1], [2.1, 2.1, 1.0], [4.2, 4.2, 1.0]])

    # Execute
    text, ok = _table(rows, [1.0, 1.0, 0.5, 0.25], "sleep", ["", "", "", ""])

    # Assert: the 0.5 and 0.25 workers are exact against the median (1.05 s), not 5% slow
    lines = {line.split()[0]: line for line in text.splitlines() if line.strip().endswith(("OK", "OFF"))}
    assert "+0.0%" in lines["3"] and "+0.0%" in lines["4"], text
    assert "median" in text.splitlines()[0] and ok
