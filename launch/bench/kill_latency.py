"""How long a job takes to end after one of its ranks is killed with SIGKILL, and whether
the output names the rank (docs/benchmarks.md, section 8).

    python launch/bench/kill_latency.py --repeats 10 --rank 2

Each repeat starts `mpiexec -n 3 elfish-mpi train` on the Fashion-MNIST sample in a fresh
temporary run directory, waits for round 3's checkpoint, SIGKILLs the training process of
MPI rank --rank (found below mpiexec by its rank variable), and times until mpiexec returns.
"""
from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests" / "unit"))
from proc_tools import clean_env, mpiexec, rank_pids  # noqa: E402


def one(rank: int, launcher: list[str]) -> tuple[float, str]:
    with tempfile.TemporaryDirectory(prefix="elfish-kill-") as tmp:
        out = Path(tmp) / "run"
        cmd = [*launcher, sys.executable, "-m", "elfish_mpi", "train", "--out", str(out),
               "--set", f"data.path={ROOT / 'tests' / 'data' / 'fashion-mnist'}", "--set", "data.test_samples=200",
               "--set", "data.max_samples=300", "--set", "run.rounds=100000", "--set", "train.local_steps=2",
               "--set", "workers.throttle=none", "--set", "checkpoint.every=1", "--set", "checkpoint.keep=0"]
        job = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=clean_env(),
                               cwd=ROOT, start_new_session=True)
        deadline = time.monotonic() + 300
        while not (out / "checkpoints" / "round-000003.h5").exists():
            if job.poll() is not None or time.monotonic() > deadline:
                job.kill()
                raise SystemExit(f"the job ended or stalled before round 3:\n{job.communicate()[0]}")
            time.sleep(0.02)
        victim = rank_pids(job.pid)[rank]
        os.kill(victim, signal.SIGKILL)
        t_kill = time.monotonic()
        text = job.communicate(timeout=300)[0]
        elapsed = time.monotonic() - t_kill
        named = [line for line in text.splitlines() if f"(pid {victim} on " in line and "was killed by signal" in line]
        return elapsed, named[0] if named else ""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--rank", type=int, default=2, help="MPI rank to kill (0: the aggregator)")
    args = parser.parse_args()
    launcher = [mpiexec(), "-n", "3"]
    times, named = [], 0
    for i in range(args.repeats):
        elapsed, line = one(args.rank, launcher)
        times.append(elapsed)
        named += bool(line)
        print(f"kill {i + 1}: job ended {elapsed:.3f} s after the SIGKILL; {line or 'NOT NAMED'}", flush=True)
    print(f"rank {args.rank}, {args.repeats} kills: median {statistics.median(times):.3f} s, "
          f"max {max(times):.3f} s; named {named} of {args.repeats}")
    return 0 if named == args.repeats else 1


if __name__ == "__main__":
    sys.exit(main())
