"""What the SLURM tests share (test_slurm.py on the one-node cluster of cluster.sh,
test_two_nodes.py on the several-node one of cluster2.sh): when they are skipped, booting and
taking down a test cluster for a module, and ``Cluster``, the handle the tests use: the
cluster's environment, commands run against it with a deadline, its jobs' records and the
tails of its daemons' logs for a failure's message.

Imported by its name: pytest puts this directory (it has no __init__.py) on sys.path.
"""
from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SBATCH = ROOT / "launch" / "slurm" / "elfish.sbatch"
SAMPLE = ROOT / "tests" / "data" / "fashion-mnist"
# What every test cluster needs installed (the daemons and the client commands the tests run).
SLURM_TOOLS = ("slurmctld", "slurmd", "munged", "sbatch", "srun", "scontrol", "squeue", "scancel", "sinfo")


def installed(name: str) -> bool:
    return shutil.which(name) is not None or os.access(f"/usr/sbin/{name}", os.X_OK)


def skip_reason(tools: tuple[str, ...], not_installed: str, switch: str | None = None) -> str | None:
    """Why the SLURM tests are skipped here, or None: ELFISH_SLURM_TESTS=0 (or ``switch``=0)
    always skips; ELFISH_SLURM_TESTS=1 never does (the cluster script installs what is
    missing); otherwise they need root and ``tools`` installed (``not_installed``, with
    {missing} for the missing ones, says what to do)."""
    flag = os.environ.get("ELFISH_SLURM_TESTS", "")
    if flag == "0":
        return "ELFISH_SLURM_TESTS=0"
    if switch and os.environ.get(switch, "") == "0":
        return f"{switch}=0"
    if flag == "1":
        return None
    if os.geteuid() != 0:
        return "the SLURM tests boot slurmctld/slurmd/munged as root: run as root, or set ELFISH_SLURM_TESTS=1"
    missing = [d for d in tools if not installed(d)]
    if missing:
        return not_installed.format(missing=", ".join(missing))
    return None


def tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError as exc:
        return f"({path}: {exc})"


@contextlib.contextmanager
def booted(script: Path, path: Path, what: str, down_timeout: float, env: dict | None = None):
    """`bash SCRIPT up PATH` (in ``env``), then the body, then `bash SCRIPT down PATH`, also
    when the body fails; a failed `up` is taken down too and fails with its output."""
    t0 = time.monotonic()
    p = subprocess.run(["bash", str(script), "up", str(path)], env=env, capture_output=True, text=True, timeout=600)
    if p.returncode != 0:
        subprocess.run(["bash", str(script), "down", str(path)], capture_output=True, timeout=down_timeout)
        raise AssertionError(f"{script.name} up failed ({p.returncode}):\n{p.stdout}\n{p.stderr}")
    print(f"\n{what} up in {time.monotonic() - t0:.1f} s: {path}", file=sys.stderr)
    try:
        yield
    finally:
        p = subprocess.run(["bash", str(script), "down", str(path)], capture_output=True, text=True,
                           timeout=down_timeout)
        if p.returncode != 0:
            print(f"{script.name} down failed ({p.returncode}):\n{p.stdout}\n{p.stderr}", file=sys.stderr)


class Cluster:
    """A test cluster booted in ``path``. ``env`` is this process's environment without an
    enclosing job's or launcher's variables (the prefixes in ``DROP``), with what DIR/env,
    the file users source, exports (SLURM_CONF, and cluster2.sh's MPI settings)."""

    DROP: tuple[str, ...] = ("SLURM_", "PMI_", "PMIX_", "HYDRA_", "OMPI_")
    RUN_TIMEOUT = 30.0  # run()'s deadline unless given one

    def __init__(self, path: Path):
        self.path = path
        env = {k: v for k, v in os.environ.items() if not k.startswith(self.DROP)}
        for line in (path / "env").read_text().splitlines():
            if line.startswith("export "):
                for word in line.split()[1:]:
                    key, _, value = word.partition("=")
                    env[key] = value
        self.env = env

    def run(self, *cmd: str, timeout: float | None = None, check: bool = True, cwd: Path | None = None,
            env: dict | None = None) -> subprocess.CompletedProcess:
        """``cmd`` in ``env`` (by default the cluster's); a command that outlives its deadline,
        or with ``check`` exits non-zero, fails with its output and the daemons' logs."""
        timeout = self.RUN_TIMEOUT if timeout is None else timeout
        try:
            p = subprocess.run(cmd, env=env or self.env, cwd=cwd, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired as exc:
            raise AssertionError(f"{' '.join(cmd)} did not end within {timeout:.0f} s:\n"
                                 f"{exc.stdout or ''}\n{exc.stderr or ''}\n{self.logs()}") from None
        if check and p.returncode != 0:
            raise AssertionError(f"{' '.join(cmd)} exited with {p.returncode}:\n{p.stdout[-4000:]}\n"
                                 f"{p.stderr[-4000:]}\n{self.logs()}")
        return p

    def job(self, jobid: str) -> dict:
        out = self.run("scontrol", "show", "job", "-o", jobid, check=False).stdout
        return dict(re.findall(r"(\w+)=(\S*)", out))

    def log_files(self) -> list[Path]:
        return [self.path / "slurmctld.log", self.path / "slurmd.log"]

    def logs(self) -> str:
        """The last 25 lines of each daemon's log."""
        return "\n".join(f"--- {f.relative_to(self.path)}\n{tail(f, 25)}" for f in self.log_files())
