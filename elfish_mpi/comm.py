"""The MPI layer: the only module that imports mpi4py.

Tensors travel as contiguous numpy buffers (``Bcast``, ``Gather``, ``Ireduce``, ``Isend`` /
``Irecv``); lowercase pickled calls carry only small control messages (the round plan).
Rank 0 never blocks without a deadline while collecting updates: it polls non-blocking
requests and raises :class:`RoundTimeout` naming the worker ranks it still waits for.
"""
from __future__ import annotations

import sys
import time
import traceback

import numpy as np
from mpi4py import MPI

from . import signals

TAG_STATS = 11
TAG_VALUES = 12
TAG_EVAL = 13
_POLL = 0.0005


def library_version() -> str:
    """The MPI library's version, its first line (e.g. "MPICH Version: 5.0.2")."""
    return " ".join(MPI.Get_library_version().splitlines()[0].split())


def world_rank() -> int:
    """This process's rank in MPI_COMM_WORLD (0 outside a launcher)."""
    return MPI.COMM_WORLD.Get_rank()


class RoundTimeout(RuntimeError):
    """Workers did not deliver their update in time."""


class RankFailure(RuntimeError):
    """A worker rank failed (its process died or its connection broke)."""


class StopTimeout(RoundTimeout):
    """A stop signal arrived and the round under way did not finish within ``stop_grace``."""


class Comm:
    def __init__(self, comm: MPI.Comm | None = None):
        self.comm = comm if comm is not None else MPI.COMM_WORLD
        self.rank = self.comm.Get_rank()
        self.size = self.comm.Get_size()
        # After SIGTERM, no wait lasts more than this many seconds past the signal or its own
        # start (StopTimeout): a job told to stop must not outlive its batch system's grace
        # waiting for a rank that is dead. (SIGUSR1, an early warning, has no such limit.)
        self.stop_grace: float | None = None
        # What this rank spent waiting for others (seconds) and received in broadcasts (bytes),
        # since it started: the round loop records their growth per round.
        self.waited = 0.0
        self.received = 0

    def _stop_overdue(self, started: float) -> bool:
        at = signals.terminated_at() if self.stop_grace is not None else None
        return at is not None and time.monotonic() > max(at, started) + self.stop_grace

    def _stop_timeout(self, what: str) -> StopTimeout:
        return StopTimeout(f"SIGTERM received, and {what} within run.stop_grace = {self.stop_grace:g} s")

    # -- waiting ------------------------------------------------------------
    def wait(self, req, timeout: float | None = None, what: str = "") -> None:
        """Complete a request by polling with short sleeps. A blocking MPI call busy-polls,
        which on an oversubscribed node takes a core away from the ranks doing real work.
        With ``timeout``, raise :class:`RoundTimeout` when it has not completed in time."""
        started = time.monotonic()
        deadline = None if timeout is None else started + timeout
        try:
            while not self._test(req, "another", what or "a transfer", waiter="this rank"):
                if deadline is not None and time.monotonic() > deadline:
                    raise RoundTimeout(f"{what} did not complete within run.round_timeout = {timeout:g} s")
                if self._stop_overdue(started):
                    raise self._stop_timeout(f"{what or 'a transfer'} did not complete")
                time.sleep(_POLL)
        finally:
            self.waited += time.monotonic() - started

    # -- control ------------------------------------------------------------
    def bcast_obj(self, obj=None, timeout: float | None = None,
                  what: str = "the broadcast of the round's plan (a worker rank stopped answering)"):
        """Broadcast a small picklable control message from rank 0 (polling, see :meth:`wait`)."""
        if self.rank == 0:
            payload = np.frombuffer(MPI.pickle.dumps(obj), dtype=np.uint8)
            n = np.array([payload.size], dtype=np.int64)
        else:
            n = np.zeros(1, dtype=np.int64)
        self.wait(self.comm.Ibcast(n, root=0), timeout, what)
        buf = np.array(payload, copy=True) if self.rank == 0 else np.empty(int(n[0]), dtype=np.uint8)
        self.wait(self.comm.Ibcast(buf, root=0), timeout, what)
        if self.rank != 0:
            self.received += n.nbytes + buf.nbytes
        return obj if self.rank == 0 else MPI.pickle.loads(buf.tobytes())

    def allgather_obj(self, obj) -> list:
        """Every rank's small object, on every rank (start-up only)."""
        return self.comm.allgather(obj)

    def gather_obj(self, obj) -> list | None:
        """Every rank's small object at rank 0 (start-up only)."""
        return self.comm.gather(obj, root=0)

    def from_root(self, make, known: tuple, public=lambda value: value) -> tuple:
        """Rank 0 runs ``make()`` (checks and set-up); every rank gets ``(value, None)``, or
        ``(None, error)`` when it raised: a ``known`` error's message, any other's type,
        message and traceback. Rank 0 keeps the whole value, the others get ``public(value)``
        (start-up only)."""
        if self.rank != 0:
            msg = self.bcast_obj(None)
            return msg["value"], msg["error"]
        value, error = None, None
        try:
            value = make()
        except known as exc:
            error = str(exc)
        except Exception as exc:  # an unexpected failure of the checks themselves
            error = f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"
        self.bcast_obj({"error": error, "value": None if error else public(value)})
        return (None, error) if error else (value, None)

    def agree(self, error: str | None) -> str | None:
        """Every rank's set-up error (or None) -> the first one, on every rank (start-up only)."""
        errors = [e for e in (self.gather_obj(error) or []) if e]
        return self.bcast_obj(errors[0] if errors else None)

    def core_peers(self) -> list[int]:
        """The ranks (of this communicator) that share cores with this one: on the same node
        (MPI's node-local communicator, ``COMM_TYPE_SHARED``) with a CPU set that meets this
        rank's (``sched_getaffinity``: what ``srun --cpu-bind`` or ``mpiexec -bind-to`` left
        it). Unbound ranks of a node all share; ranks bound to cores of their own share with
        none but themselves. Collective over the communicator."""
        import os

        mine = set(os.sched_getaffinity(0))
        node = self.comm.Split_type(MPI.COMM_TYPE_SHARED, key=self.rank)
        try:
            seen = node.allgather((self.rank, sorted(mine)))
        finally:
            node.Free()
        return sorted(r for r, cores in seen if mine & set(cores))

    def barrier(self) -> None:
        self.wait(self.comm.Ibarrier())

    def abort(self, code: int = 1) -> None:
        sys.stdout.flush()
        sys.stderr.flush()
        # The launcher forwards a rank's output asynchronously; an immediate abort can tear
        # the job down before the message that explains it has reached the user.
        time.sleep(0.5)
        self.comm.Abort(code)

    # -- tensors ------------------------------------------------------------
    def bcast_array(self, arr: np.ndarray, timeout: float | None = None,
                    what: str = "the broadcast of the model (a worker rank stopped answering)") -> np.ndarray:
        """Broadcast ``arr`` from rank 0 in place (every rank passes a buffer of the same shape)."""
        self.wait(self.comm.Ibcast(arr, root=0), timeout, what)
        if self.rank != 0:
            self.received += arr.nbytes
        return arr

    def gather_rows(self, row: np.ndarray) -> np.ndarray | None:
        """Every rank gives a float64 row of the same length; rank 0 gets (size, len)."""
        row = np.ascontiguousarray(row, dtype=np.float64)
        out = np.empty((self.size, row.size), dtype=np.float64) if self.rank == 0 else None
        self.wait(self.comm.Igather(row, out, root=0))
        return out

    def post_update(self, stats: np.ndarray, values: np.ndarray) -> tuple[list, tuple]:
        """Start sending one client's round result to rank 0: a float64 stats vector, then its
        kept values (float32). Returns (requests, buffers): keep both until :meth:`wait_sends`."""
        stats = np.ascontiguousarray(stats, dtype=np.float64)
        values = np.ascontiguousarray(values, dtype=np.float32)
        return [self.comm.Isend(stats, dest=0, tag=TAG_STATS), self.comm.Isend(values, dest=0, tag=TAG_VALUES)], (stats, values)

    def post_stats(self, stats: np.ndarray) -> tuple[list, tuple]:
        stats = np.ascontiguousarray(stats, dtype=np.float64)
        return [self.comm.Isend(stats, dest=0, tag=TAG_STATS)], (stats,)

    def wait_sends(self, requests: list) -> None:
        for req in requests:
            self.wait(req)

    @staticmethod
    def sends_done(requests: list) -> bool:
        """Whether every one of ``requests`` (sends) has completed (testing also progresses them)."""
        return bool(MPI.Request.Testall(requests))

    @staticmethod
    def _test(request, owner, what: str, status=None, waiter: str = "") -> bool:
        """Whether ``request`` completed; RankFailure naming ``owner`` when its rank failed
        (with ``waiter``: a rank's wait in a collective, where MPI does not say which rank)."""
        try:
            return request.Test(status)
        except MPI.Exception as exc:
            error = exc.Get_error_string().splitlines()[0]
            if waiter:
                raise RankFailure(f"{owner} rank failed while {waiter} waited for {what}: {error}") from None
            raise RankFailure(f"worker rank {owner} failed while rank 0 waited for its {what}: {error}") from None

    def _wait_all(self, requests: list, owners: list, timeout: float, what: str) -> None:
        started = time.monotonic()
        try:
            self._wait_all_from(started, requests, owners, timeout, what)
        finally:
            self.waited += time.monotonic() - started

    def _wait_all_from(self, started: float, requests: list, owners: list, timeout: float, what: str) -> None:
        pending = set(range(len(requests)))
        deadline = started + timeout
        while pending:
            for i in list(pending):
                if self._test(requests[i], owners[i], what):
                    pending.discard(i)
            if not pending:
                break
            timed_out, stop = time.monotonic() > deadline, self._stop_overdue(started)
            if timed_out or stop:
                self._give_up([requests[i] for i in pending], [owners[i] for i in pending], timed_out, timeout, what)
            time.sleep(_POLL)

    def _give_up(self, requests: list, owners: list, timed_out: bool, timeout: float, what: str):
        """Withdraw the receives still pending (so that no late message lands in them) and raise
        RoundTimeout (or StopTimeout) naming their ranks."""
        for req in requests:
            try:
                req.Cancel()
            except MPI.Exception:
                pass
        late = ", ".join(map(str, sorted(set(owners))))
        if timed_out:
            raise RoundTimeout(f"no {what} from worker rank(s) {late} within run.round_timeout = {timeout:g} s")
        raise self._stop_timeout(f"no {what} came from worker rank(s) {late}")

    def stream_updates(self, sources: list[int], sizes: list[int], stats_len: int, timeout: float, on_update) -> np.ndarray:
        """Rank 0: every slot's stats (returned, a row a slot) and kept values (``sizes[i]``
        float32 values from worker rank ``sources[i]``; a rank's slots come in slot order).
        Each slot's values go to ``on_update(i, stats_row, values)`` in slot order (so that sums
        come out the same in every run), received into one reused buffer: memory does not grow
        with the number of slots. A worker does not wait for rank 0 to take its sends. On a
        timeout the ranks named are the one whose values rank 0 waits for and every one whose
        stats (sent first) are missing."""
        n = len(sizes)
        stats = np.empty((n, stats_len), dtype=np.float64)
        stat_reqs = [self.comm.Irecv(stats[i], source=sources[i], tag=TAG_STATS) for i in range(n)]
        stats_in = np.zeros(n, dtype=bool)
        buf = np.empty(max(sizes, default=0), dtype=np.float32)
        started = time.monotonic()
        deadline = started + timeout
        for i in range(n):
            values = buf[: sizes[i]]
            req = self.comm.Irecv(values, source=sources[i], tag=TAG_VALUES)
            status = MPI.Status()
            t_wait = time.monotonic()
            while True:
                for v in np.flatnonzero(~stats_in):
                    stats_in[v] = self._test(stat_reqs[v], sources[v], "update")
                if stats_in[i] and self._test(req, sources[i], "update", status):
                    break
                timed_out, stop = time.monotonic() > deadline, self._stop_overdue(started)
                if timed_out or stop:
                    late = sorted({sources[i]} | {sources[v] for v in np.flatnonzero(~stats_in)})
                    waiting = [req] + [stat_reqs[v] for v in np.flatnonzero(~stats_in)]
                    self.waited += time.monotonic() - t_wait
                    self._give_up(waiting, late, timed_out, timeout, "update")
                time.sleep(_POLL)
            self.waited += time.monotonic() - t_wait
            got = status.Get_count(MPI.FLOAT)
            if got != sizes[i]:  # (a longer message fails in MPI; a shorter one would not)
                raise RankFailure(f"worker rank {sources[i]} sent {got} values for an update of {sizes[i]}")
            on_update(i, stats[i], values)
        return stats

    def send_eval(self, buf: np.ndarray) -> None:
        """A worker's evaluation result (protocol.eval_buffer) to rank 0."""
        self.wait(self.comm.Isend(np.ascontiguousarray(buf, dtype=np.float64), dest=0, tag=TAG_EVAL))

    def recv_evals(self, bufs: dict[int, np.ndarray], timeout: float, meanwhile=None) -> None:
        """Rank 0: worker ``w``'s evaluation result into ``bufs[w]`` (from rank w + 1), for
        every ``w`` given; RoundTimeout naming the ranks still missing after ``timeout``. The
        receives are posted first, then ``meanwhile()`` runs (rank 0's own share), so that
        no worker's send waits for rank 0 however large its result."""
        reqs = [self.comm.Irecv(buf, source=w + 1, tag=TAG_EVAL) for w, buf in bufs.items()]
        if meanwhile is not None:
            meanwhile()
        self._wait_all(reqs, [w + 1 for w in bufs], timeout, "evaluation result")

    def recv_stats(self, sources: list[int], stats_len: int, timeout: float) -> np.ndarray:
        """Rank 0: a stats row per slot, slot i's from worker rank ``sources[i]``."""
        stats = np.empty((len(sources), stats_len), dtype=np.float64)
        reqs = [self.comm.Irecv(stats[i], source=src, tag=TAG_STATS) for i, src in enumerate(sources)]
        self._wait_all(reqs, list(sources), timeout, "update")
        return stats

    def reduce_sum(self, arr: np.ndarray, timeout: float) -> np.ndarray | None:
        """Sum of every rank's ``arr`` at rank 0 (rank 0 contributes its own, usually zeros)."""
        arr = np.ascontiguousarray(arr)
        out = np.empty_like(arr) if self.rank == 0 else None
        req = self.comm.Ireduce(arr, out, op=MPI.SUM, root=0)
        if self.rank == 0:
            self._wait_all([req], ["(reduction)"], timeout, "reduction contribution")
        else:
            self.wait(req)
        return out
