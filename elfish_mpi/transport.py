"""How a round's updates travel from the workers to rank 0: both ends of both transports.

- ``gather``: each worker sends, per client it trained, its :data:`protocol.UPDATE` record and
  the change of the kept values only (float32, in ``submodel.param_index`` order); rank 0
  receives them point to point in client order, so it can name a worker that is late, and
  folds the accepted ones into the weighted sums.
- ``reduce``: each worker sends its clients' records, then takes part in an MPI sum of dense
  float64 arrays ``[weight * delta, weight]`` over the whole model: the sum of its clients'
  (zeros where they trained nothing, and everywhere for an update that is not to count).

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


class Outbox:
    """A worker's half of a round's collection: one :data:`protocol.UPDATE` record and payload
    per client it trained, sent as each is ready without waiting for rank 0 to take it (rank 0
    takes them in client order, which may not be this rank's order in time), and
    :meth:`close` at the end of the round: it waits for the sends, and under reduce adds this
    rank's part to the MPI sum (the sum of its clients' payloads; zeros when it had none)."""

    LIMIT = 256 * 2**20  # bytes of payloads held unsent before a new one waits for the oldest

    def __init__(self, comm, transport: str, size: int, timeout: float):
        if transport not in TRANSPORTS:
            raise ValueError(f"unknown transport {transport!r}; choose one of: {', '.join(TRANSPORTS)}")
        self.comm, self.transport, self.size, self.timeout = comm, transport, size, timeout
        self.pending: list = []  # (requests, buffers): a buffer lives until its send completes
        self.dense: np.ndarray | None = None

    def _held(self) -> int:
        return sum(b.nbytes for _, buffers in self.pending for b in buffers)

    def send(self, record: np.ndarray, data: np.ndarray) -> None:
        stats = update_buffer(record)
        if self.transport == "gather":
            # let the finished sends go (testing them also moves MPI along), and hold at most
            # LIMIT bytes: past it, wait for the oldest (rank 0 takes them in client order)
            self.pending = [p for p in self.pending if not self.comm.sends_done(p[0])]
            while self.pending and self._held() + data.nbytes > self.LIMIT:
                self.comm.wait_sends(self.pending.pop(0)[0])
            self.pending.append(self.comm.post_update(stats, data))
            return
        self.pending.append(self.comm.post_stats(stats))
        if self.dense is None:
            self.dense = np.array(data, dtype=np.float64, copy=True)
        else:
            self.dense += data

    def close(self) -> None:
        for requests, _ in self.pending:
            self.comm.wait_sends(requests)
        self.pending = []
        if self.transport == "reduce":
            dense = self.dense if self.dense is not None else np.zeros((2, self.size), dtype=np.float64)
            self.comm.reduce_sum(dense, self.timeout)
        self.dense = None


def receive(comm, transport: str, sources: list[int], sizes: list[int], size: int, timeout: float, on_update):
    """Rank 0's half: the :data:`protocol.UPDATE` record of every slot (slot i's from worker
    rank ``sources[i]``, a slot's ``sizes[i]`` kept values), and the reduced ``[num, den]`` for
    reduce (None for gather). With gather, each slot's record and kept values go to
    ``on_update(i, record, values)`` in slot order as they arrive (the values buffer is
    reused: fold it, do not keep it)."""
    if transport == "gather":
        def arrived(i: int, row: np.ndarray, values: np.ndarray) -> None:
            on_update(i, updates_from_buffer(row[None])[0], values)

        stats = comm.stream_updates(sources, sizes, UPDATE_FIELDS, timeout, arrived)
        return updates_from_buffer(stats), None
    stats = comm.recv_stats(sources, UPDATE_FIELDS, timeout)
    summed = comm.reduce_sum(np.zeros((2, size), dtype=np.float64), timeout)
    return updates_from_buffer(stats), summed
