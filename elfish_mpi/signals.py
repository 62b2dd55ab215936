"""Preemption: SIGTERM / SIGUSR1 ask the job to checkpoint and stop at the end of the round.

SLURM sends SIGTERM to every task when it preempts or requeues a job (and SIGKILL after
``KillWait``), and ``#SBATCH --signal=B:USR1@T`` warns the batch script T seconds before the
time limit. Every rank records the request (and when it came); rank 0 ends the run after
the current round, with a checkpoint, and every rank exits with :data:`EXIT_PREEMPTED`.
After SIGTERM, SIGKILL follows; a wait of rank 0 that has not ended ``run.stop_grace``
seconds after the SIGTERM (a rank is dead or stuck) is given up: rank 0 says so and aborts
the job with the same code, its last checkpoint kept.
"""
from __future__ import annotations

import signal
import time

EXIT_PREEMPTED = 75  # EX_TEMPFAIL: stopped early with a checkpoint; resume to continue
_received: list[tuple[int, float]] = []  # (signal, time.monotonic() when it arrived)


def _handler(signum, frame) -> None:
    _received.append((signum, time.monotonic()))


def install() -> None:
    for sig in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, _handler)


def ignore_from_now() -> None:
    """The job's verdict is in: a stop signal that arrives while the process exits (srun's
    SIGTERM to the tasks still running once one has exited with EXIT_PREEMPTED, under
    --kill-on-bad-exit) must not turn that exit into death by signal. Python's own handlers
    are reset to the default during the interpreter's teardown; an ignored signal stays ignored."""
    for sig in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, signal.SIG_IGN)


def requested() -> str | None:
    """The name of the first stop signal received, or None."""
    return signal.Signals(_received[0][0]).name if _received else None


def terminated_at() -> float | None:
    """When (``time.monotonic()``) the first SIGTERM arrived, or None. SIGTERM is followed by
    SIGKILL (SLURM's KillWait); SIGUSR1 is an early warning, with time to finish the round."""
    return next((t for sig, t in _received if sig == signal.SIGTERM), None)
