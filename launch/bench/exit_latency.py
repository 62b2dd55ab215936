"""How long a finished job takes to return after its summary line (docs/benchmarks.md,
section 10, "Job exit").

    python launch/bench/exit_latency.py --ranks 5,9 --repeats 5

Each repeat runs `mpiexec -n N elfish-mpi train` (FedAvg, no throttle, 2 rounds of 5 steps
on the Fashion-MNIST sample, 200 test images) in a fresh temporary run directory, reads its
output as it comes, and times from the moment the `done:` line arrives to mpiexec's return.
It also checks the exit status (0) and that the run left its checkpoint.
"""
from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests" / "unit"))
from proc_tools import clean_env, mpiexec  # noqa: E402


def one(ranks: int) -> tuple[float, float]:
    """(seconds from the summary line to mpiexec's return, the whole job's seconds)."""
    with tempfile.TemporaryDirectory(prefix="elfish-exit-") as tmp:
        out = Path(tmp) / "run"
        cmd = [mpiexec(), "-n", str(ranks), sys.executable, "-m", "elfish_mpi", "train", "--out", str(out),
               "--set", f"data.path={ROOT / 'tests' / 'data' / 'fashion-mnist'}", "--set", "data.test_samples=200",
               "--set", "data.max_samples=300", "--set", "run.rounds=2", "--set", "train.local_steps=5",
               "--set", "strategy.name=fedavg", "--set", "workers.throttle=none"]
        t0 = time.monotonic()
        job = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=clean_env(), cwd=ROOT)
        t_done, text = None, []
        for line in job.stdout:
            text.append(line)
            if line.startswith("done:"):
                t_done = time.monotonic()
        code = job.wait(timeout=300)
        t_end = time.monotonic()
        if code != 0 or t_done is None or not (out / "checkpoint.h5").exists():
            raise SystemExit(f"the job failed (exit {code}):\n{''.join(text)}")
        return t_end - t_done, t_end - t0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ranks", default="5,9", help="comma-separated job sizes (default: 5,9)")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    print("ranks  after summary (s): median [min, max]  whole job (s): median")
    for n in (int(x) for x in args.ranks.split(",")):
        runs = [one(n) for _ in range(args.repeats)]
        after = [a for a, _ in runs]
        print(f"{n:5d}  {statistics.median(after):.2f} [{min(after):.2f}, {max(after):.2f}]"
              f"  {statistics.median(t for _, t in runs):.1f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
