"""How a round's updates travel from the workers to rank 0: both ends of both transports.

- ``gather``: each worker sends its stats vector and the change of its kept values only
  (float32, in ``submodel.param_index`` order); rank 0 receives them point to point, so it
  can name a worker that is late, and folds the accepted ones into the weighted sums.
- ``reduce``: each worker sends its stats vector, then takes part in an MPI sum of dense
  float64 arrays ``[weight * delta, weight]`` over the whole model (zeros where it trained
  nothing, and everywhere when its update is not to count).

Either way rank 0 ends with ``num = sum_k w_k m_k delta_k`` and ``den = sum_k w_k m_k``
(aggregation.py). The round loop and ``elfish-mpi perf transport`` both use these
functions, so the benchmark measures the code that runs.
"""
from __future__ import annotations

import numpy as np

from .aggregation import accumulate

TRANSPORTS = ("gather", "reduce")


def payload(transport: str, size: int, idx: np.ndarray, delta: np.ndarray, weight: float, counts: bool) -> np.ndarray:
    """What a worker sends besides its stats: its kept values' change (gather), or the dense
    weighted sums (reduce; all zeros when ``counts`` is false: a dropped or non-finite update)."""
    if transport == "gather":
        return np.ascontiguousarray(delta, dtype=np.float32)
    if transport != "reduce":
        raise ValueError(f"unknown transport {transport!r}; choose one of: {', '.join(TRANSPORTS)}")
    dense = np.zeros((2, size), dtype=np.float64)
    if counts:
        dense[0, idx] = weight * np.asarray(delta, dtype=np.float64)
        dense[1, idx] = weight
    return dense


def send(comm, transport: str, stats: np.ndarray, data: np.ndarray, timeout: float) -> None:
    """A worker's half of the round's collection."""
    if transport == "gather":
        comm.send_update(stats, data)
    else:
        comm.send_stats(stats)
        comm.reduce_sum(data, timeout)


def receive(comm, transport: str, sizes: list[int], size: int, stats_len: int, timeout: float):
    """Rank 0's half: ``(stats, values, summed)``; ``values`` (each worker's kept values) for
    gather, ``summed`` (the reduced ``[num, den]``) for reduce, the other None."""
    if transport == "gather":
        stats, values = comm.recv_updates(sizes, stats_len, timeout)
        return stats, values, None
    stats = comm.recv_stats(len(sizes), stats_len, timeout)
    summed = comm.reduce_sum(np.zeros((2, size), dtype=np.float64), timeout)
    return stats, None, summed


def fold(size: int, idxs: list[np.ndarray], values, summed, weights: np.ndarray, accepted: np.ndarray):
    """``(num, den)`` of the accepted updates from what :func:`receive` returned. (With
    reduce the workers left out the updates that do not count themselves.)"""
    if summed is not None:
        return summed[0], summed[1]
    return accumulate(size, ((idxs[w], values[w], weights[w]) for w in np.flatnonzero(accepted)))
