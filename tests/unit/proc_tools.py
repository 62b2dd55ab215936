"""Finding and watching the processes of a real `mpiexec ... elfish-mpi train` job in /proc,
for the tests that kill, stop or signal them (test_faults, test_crash_resume).

Each rank runs under a supervisor (elfish_mpi.supervisor): mpiexec starts the supervisor,
which runs the rank as its child with ELFISH_SUPERVISOR_FD set (in /proc/PID/environ,
the environment the process started with, even after the rank has taken it out). ``rank_pids`` returns the
ranks themselves, found by PMI_RANK (or Open MPI's OMPI_COMM_WORLD_RANK) in their environment.
"""
from __future__ import annotations

import os
import shutil
import sys
import time
from pathlib import Path


def mpiexec() -> str:
    local = Path(sys.executable).with_name("mpiexec")
    return str(local) if local.exists() else (shutil.which("mpiexec") or "mpiexec")


def clean_env(**extra: str) -> dict:
    """This environment without a launcher's variables (a test may itself run under one)."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("PMI_", "PMIX_", "HYDRA_", "OMPI_", "MPI_LOCALRANK", "ELFISH_SUPERVISOR_"))}
    env.update(extra)
    return env


def _children_map() -> dict[int, list[int]]:
    out: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as fh:
                ppid = int(fh.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        out.setdefault(ppid, []).append(int(entry))
    return out


def descendants(root: int) -> list[int]:
    children, found, todo = _children_map(), [], [root]
    while todo:
        for c in children.get(todo.pop(), []):
            found.append(c)
            todo.append(c)
    return found


def _environ(pid: int) -> list[bytes]:
    try:
        with open(f"/proc/{pid}/environ", "rb") as fh:
            return fh.read().split(b"\0")
    except OSError:
        return []


RANK_VARS = (b"PMI_RANK=", b"OMPI_COMM_WORLD_RANK=")  # MPICH's hydra and SLURM; Open MPI


def is_rank(pid: int) -> bool:
    """The process runs a rank's training (not the supervisor around it)."""
    env = _environ(pid)
    supervised = any(e.startswith(b"ELFISH_SUPERVISOR_FD=") for e in env)
    return any(e.startswith(RANK_VARS) for e in env) and (supervised or b"ELFISH_SUPERVISE=0" in env)


def rank_pids(root: int) -> dict[int, int]:
    """MPI rank -> pid of each rank's training process below ``root`` (rank from PMI_RANK or
    OMPI_COMM_WORLD_RANK)."""
    ranks = {}
    for pid in descendants(root):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as fh:
                if b"elfish_mpi" not in fh.read():
                    continue
        except OSError:
            continue
        if is_rank(pid):
            for item in _environ(pid):
                for var in RANK_VARS:
                    if item.startswith(var):
                        ranks[int(item[len(var):])] = pid
    return ranks


def alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def all_gone(pids, timeout: float = 10.0) -> bool:
    """Whether every pid has exited (zombies count as gone) within ``timeout`` s: after
    mpiexec returns, the launcher's SIGKILLs may still be landing on the ranks."""
    deadline = time.monotonic() + timeout
    while any(alive(pid) for pid in pids):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True
