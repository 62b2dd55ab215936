"""The supervisor each `elfish-mpi train` process runs its rank under (elfish_mpi.supervisor),
driven with real processes and real signals, without MPI (test_faults and tests/slurm run it
under mpiexec and srun)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from proc_tools import alive, clean_env

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.timeout(120)

# A stand-in for `elfish-mpi train`: supervises itself, and the rank (the child) says who and
# where it is, prints "ready PID", then does what argv[1] says.
PROGRAM = """
import os, signal, sys, time
from elfish_mpi import supervisor
if supervisor.wanted():
    sys.exit(supervisor.run())
def on_stop(signum, frame):
    print("rank got", signal.Signals(signum).name, flush=True)
    sys.exit(75)
signal.signal(signal.SIGTERM, on_stop)
signal.signal(signal.SIGUSR1, on_stop)
supervisor.attach()
supervisor.identify("worker rank 5")
supervisor.note("in round 7")
print("ready", os.getpid(), flush=True)
action = sys.argv[1]
if action == "exit3":
    sys.exit(3)
if action == "released-then-killed":
    supervisor.release()
    os.kill(os.getpid(), signal.SIGKILL)
if action == "segfault":
    os.kill(os.getpid(), signal.SIGSEGV)
time.sleep(60)
"""


def start(action: str, **env: str) -> tuple[subprocess.Popen, int]:
    """The supervising process, and the pid of its rank once that is ready."""
    proc = subprocess.Popen([sys.executable, "-c", PROGRAM, action], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, cwd=ROOT, env=clean_env(**env), start_new_session=True)
    line = proc.stdout.readline().split()
    assert line and line[0] == "ready", proc.stderr.read()
    return proc, int(line[1])


def test_a_rank_killed_by_sigkill_is_named_and_the_supervisor_ends_the_same_way():
    # Prepare
    proc, rank = start("sleep")
    assert rank != proc.pid

    # Execute
    os.kill(rank, signal.SIGKILL)
    _, err = proc.communicate(timeout=30)

    # Assert: one line naming who, the pid, the host, the signal and where; then the
    # supervisor itself ends by SIGKILL, as the launcher would have seen the rank end
    assert err == (f"elfish-mpi: error: worker rank 5 (pid {rank} on {os.uname().nodename}) was killed by signal 9 "
                   "(SIGKILL): by a person, the batch system or the out-of-memory killer in round 7\n")
    assert proc.returncode == -signal.SIGKILL


def test_a_crash_in_native_code_is_named_with_its_signal():
    # Execute: the rank dies of SIGSEGV
    proc, rank = start("segfault")
    _, err = proc.communicate(timeout=30)

    # Assert
    assert f"worker rank 5 (pid {rank} on " in err
    assert "was killed by signal 11 (SIGSEGV): a crash in native code in round 7\n" in err
    assert proc.returncode == -signal.SIGSEGV


def test_an_exit_code_passes_through_without_a_message():
    # Execute
    proc, _ = start("exit3")
    out, err = proc.communicate(timeout=30)

    # Assert
    assert proc.returncode == 3
    assert err == ""


def test_a_released_rank_that_is_then_killed_is_not_reported():
    # Execute: the rank said why it ends (an error before MPI_Abort), then it is killed
    proc, _ = start("released-then-killed")
    _, err = proc.communicate(timeout=30)

    # Assert
    assert err == ""
    assert proc.returncode == 128 + signal.SIGKILL


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1])
def test_stop_signals_to_the_supervisor_reach_the_rank(sig):
    # Prepare
    proc, _ = start("sleep")

    # Execute: a launcher signals the process it started: the supervisor
    os.kill(proc.pid, sig)
    out, err = proc.communicate(timeout=30)

    # Assert: the rank handled it and its exit code came back
    assert f"rank got {sig.name}" in out, err
    assert proc.returncode == 75
    assert err == ""


def test_a_stop_signal_at_start_up_waits_for_the_ranks_handler():
    # Execute: SIGTERM to the supervisor at once, before the rank has started Python
    proc = subprocess.Popen([sys.executable, "-c", PROGRAM, "sleep"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, cwd=ROOT, env=clean_env(), start_new_session=True)
    deadline = time.monotonic() + 20
    while not [c for c in Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()]:
        assert time.monotonic() < deadline
        time.sleep(0.001)
    os.kill(proc.pid, signal.SIGTERM)
    out, err = proc.communicate(timeout=30)

    # Assert: the rank was not killed by the signal: it was held until its handler was in place
    assert "rank got SIGTERM" in out, (out, err)
    assert proc.returncode == 75
    assert "was killed by signal" not in err


def test_a_signal_sent_to_every_process_ends_the_rank_quietly():
    # Prepare: SIGHUP ends the rank (it has no handler for it)
    proc, rank = start("sleep")

    # Execute: a launcher or a terminal signals every process: supervisor and rank alike
    os.killpg(proc.pid, signal.SIGHUP)
    _, err = proc.communicate(timeout=30)

    # Assert: no news (every rank would otherwise report it); the supervisor ends the same way
    assert err == ""
    assert proc.returncode == -signal.SIGHUP


def test_the_same_signal_sent_to_the_rank_alone_is_reported():
    # Execute
    proc, rank = start("sleep")
    os.kill(rank, signal.SIGHUP)
    _, err = proc.communicate(timeout=30)

    # Assert
    assert f"worker rank 5 (pid {rank} on {os.uname().nodename}) was killed by signal 1 (SIGHUP) in round 7\n" in err
    assert proc.returncode == -signal.SIGHUP


def test_the_rank_dies_with_its_supervisor():
    # Prepare
    proc, rank = start("sleep")

    # Execute: the supervisor is killed alone (a launcher that kills only the pid it started)
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=30)

    # Assert: the rank does not linger as an orphan
    deadline = time.monotonic() + 10
    while alive(rank):
        assert time.monotonic() < deadline, "the rank outlived its supervisor"
        time.sleep(0.02)


def test_a_whole_process_group_killed_at_once_is_not_reported():
    # Prepare: supervisor and rank share a process group, as under an MPI launcher
    proc, _ = start("sleep")

    # Execute: the launcher's clean-up of the other ranks: SIGKILL to the process group
    os.killpg(proc.pid, signal.SIGKILL)
    _, err = proc.communicate(timeout=30)

    # Assert: nobody claims that this rank died first; the supervisor went with the group
    assert err == ""
    assert proc.returncode == -signal.SIGKILL


def test_elfish_supervise_0_runs_the_rank_directly():
    # Execute
    proc, rank = start("exit3", ELFISH_SUPERVISE="0")
    proc.communicate(timeout=30)

    # Assert
    assert rank == proc.pid
    assert proc.returncode == 3
