"""How a round's updates travel from the workers to rank 0: both ends of both transports.

- ``gather``: each worker sends its :data:`protocol.UPDATE` record and the change of its kept values only
  (float32, in ``submodel.param_index`` order); rank 0 receives them point to point, so it
  can name a worker that is late, and folds the accepted ones into the weighted sums.
- ``reduce``: each worker sends its record, then takes part in an MPI sum of dense
  float64 arrays ``[weight * delta, weight]`` over the whole model (zeros where it trained
  nothing, and everywhere when its update is not to count).

Either way rank 0 ends with ``num = sum_k w_k m_k delta_k`` and ``den = sum_k w_k m_k``
(aggregation.py) in O(parameters) memory: folded by the strategy's ``aggregate`` as each
update arrives (gather), or formed by MPI from the workers' weighted updates (reduce, where
a strategy's own ``aggregate`` does not run: a new rule needs gather). The round loop and ``elfish-mpi perf transport`` both
use these functions, so the benchmark measures the code that runs.
"""
from __future__ import annotations

import numpy as np

from .config import TRANSPORTS
from .protocol import UPDATE_FIELDS, update_buffer, updates_from_buffer


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


def send(comm, transport: str, record: np.ndarray, data: np.ndarray, timeout: float) -> None:
    """A worker's half of the round's collection: its :data:`protocol.UPDATE` record and ``data``."""
    stats = update_buffer(record)
    if transport == "gather":
        comm.send_update(stats, data)
    else:
        comm.send_stats(stats)
        comm.reduce_sum(data, timeout)


def receive(comm, transport: str, sizes: list[int], size: int, timeout: float, on_update):
    """Rank 0's half: the workers' :data:`protocol.UPDATE` records, and the reduced
    ``[num, den]`` for reduce (None for gather). With gather, each worker's record and kept
    values go to ``on_update(w, record, values)`` as they arrive (the values buffer is reused:
    fold it, do not keep it)."""
    if transport == "gather":
        def arrived(w: int, row: np.ndarray, values: np.ndarray) -> None:
            on_update(w, updates_from_buffer(row[None])[0], values)

        stats = comm.stream_updates(sizes, UPDATE_FIELDS, timeout, arrived)
        return updates_from_buffer(stats), None
    stats = comm.recv_stats(len(sizes), UPDATE_FIELDS, timeout)
    summed = comm.reduce_sum(np.zeros((2, size), dtype=np.float64), timeout)
    return updates_from_buffer(stats), summed
