"""What produced a run: the program and library versions, the job and the command line.

Rank 0 collects it once per job (:func:`collect`) and every checkpoint it writes records it as
root attributes named ``provenance_<key>`` (strings), so a file analysed on another machine
says which code, libraries, MPI and job made it. A resumed run records its own job's.
"""
from __future__ import annotations

import os
import platform
import shlex
import subprocess
import sys
from pathlib import Path

from . import __version__

PREFIX = "provenance_"
JOB_ID_VARS = ("SLURM_JOB_ID", "PBS_JOBID", "LSB_JOBID", "COBALT_JOBID", "FLUX_JOB_ID", "JOB_ID")


def git_commit() -> str:
    """The commit of the checkout this package runs from ("+dirty" with local changes), or ""."""
    root = Path(__file__).resolve().parents[1]
    if not (root / ".git").exists():
        return ""
    try:
        out = subprocess.run(["git", "-C", str(root), "describe", "--always", "--dirty=+dirty", "--abbrev=12"],
                             capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return ""
    return out.stdout.strip() if out.returncode == 0 else ""


def version_line() -> str:
    """``elfish-mpi 0.1.0`` (and the git commit when run from a checkout)."""
    commit = git_commit()
    return f"elfish-mpi {__version__}" + (f" (git {commit})" if commit else "")


def _module_version(name: str) -> str:
    module = sys.modules.get(name)
    if module is None:
        try:
            module = __import__(name)
        except ImportError:
            return "not installed"
    return str(getattr(module, "__version__", "unknown"))


def collect(world_size: int, hostnames: list[str], mpi_library: str) -> dict[str, str]:
    """Everything recorded, as strings (the keys without the ``provenance_`` prefix)."""
    job = next((f"{var}={os.environ[var]}" for var in JOB_ID_VARS if os.environ.get(var)), "")
    return {
        "program": __version__,
        "git_commit": git_commit(),
        "python": platform.python_version(),
        "torch": _module_version("torch"),
        "numpy": _module_version("numpy"),
        "h5py": _module_version("h5py"),
        "mpi4py": _module_version("mpi4py"),
        "mpi_library": mpi_library,
        "job_id": job,
        "world_size": str(int(world_size)),
        "hostnames": ",".join(sorted(set(hostnames))),
        "command_line": shlex.join(getattr(sys, "orig_argv", sys.argv)),
    }


def as_attrs(info: dict[str, str]) -> dict[str, str]:
    return {PREFIX + key: value for key, value in info.items()}


def from_attrs(attrs: dict) -> dict[str, str]:
    """The provenance a checkpoint's attributes hold (empty for files written before it was kept)."""
    return {key[len(PREFIX):]: str(value) for key, value in attrs.items() if key.startswith(PREFIX)}
