"""How a job scales with its ranks on this machine: `elfish-mpi train` at each size, then a
table from the checkpoints (docs/benchmarks.md, section 10).

    python launch/bench/ranks.py --ranks 5,17,33,65 --out runs/benchmarks/10-ranks [--set KEY=VALUE ...]

Each size runs `mpiexec -n N python -m elfish_mpi train` with the bench config, the virtual
throttle (no sleeping: every rank's time is real work), the quickstart fleet repeated over the
workers and the given overrides, and reports: the job's wall time from launch to exit, the
start-up (launch to every rank set up: imports, data, throttles), the profiling, the median
round and the median of each round's slowest worker's training (busy) time, their ratio,
rank 0's median time per round not spent waiting for other ranks (`root_busy_time`), and
that time less its own share of the evaluation (`eval_root_time`, the round before's), the
CPU time rank 0 used per round (`root_cpu_time`: wall time on a crowded node includes waiting
for a core), the
median bytes a worker receives per round, and the peak resident memory of rank 0 and of the
workers (mean and largest).
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import h5py
import numpy as np

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "launch" / "configs" / "bench-fashion-mnist.toml"
MIB = 1024.0 * 1024.0


def mpiexec() -> str:
    local = Path(sys.executable).with_name("mpiexec")
    return str(local) if local.exists() else (shutil.which("mpiexec") or "mpiexec")


def run(n: int, out: Path, sets: list[str], timeout: float) -> dict:
    cmd = [mpiexec(), "-n", str(n), sys.executable, "-m", "elfish_mpi", "train", "--config", str(CONFIG),
           "--out", str(out), "--set", "workers.throttle=virtual"]
    for s in sets:
        cmd += ["--set", s]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PMI_", "PMIX_", "HYDRA_", "OMPI_"))}
    t0 = time.perf_counter()
    started = None
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=ROOT) as proc:
        watchdog = threading.Timer(timeout, proc.terminate)  # (mpiexec passes SIGTERM on to the ranks)
        watchdog.start()
        for line in proc.stdout:
            if started is None and line.startswith("elfish-mpi: ") and " workers, capacities " in line:
                started = time.perf_counter() - t0  # every rank is set up (before profiling)
            print(f"  [{n} ranks] {line.rstrip()}", flush=True)
        proc.wait()
        watchdog.cancel()
    total = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"ranks.py: the job of {n} ranks failed (exit {proc.returncode}); see its output above")
    with h5py.File(out / "checkpoint.h5", "r") as f:
        m, w = f["metrics"], f["workers"]
        busy = w["busy_time"][()].max(axis=1)
        round_time = m["round_time"][()]
        profiling = float(f["profiles/profiling_time"][0]) if "profiles/profiling_time" in f else 0.0
        row = {
            "ranks": n,
            "rounds": int(round_time.size),
            "job_s": total,
            "startup_s": started if started is not None else float("nan"),
            "profiling_s": profiling,
            "median_round_s": float(np.median(round_time[1:] if round_time.size > 1 else round_time)),
            "median_slowest_busy_s": float(np.median(busy[1:] if busy.size > 1 else busy)),
            "rank0_busy_s": float(np.median(m["root_busy_time"][1:] if round_time.size > 1 else m["root_busy_time"][()])),
            # (the evaluation rank 0 does in round r + 1 is round r's: shift by one)
            "rank0_busy_without_eval_s": float(np.median(m["root_busy_time"][1:] - m["eval_root_time"][:-1]))
            if round_time.size > 1 else float("nan"),
            "rank0_cpu_s": float(np.median(m["root_cpu_time"][1:] if round_time.size > 1 else m["root_cpu_time"][()])),
            "received_per_worker_kb": float(np.median(w["bytes_received"][1:] if round_time.size > 1 else w["bytes_received"][()])) / 1e3,
            "rank0_peak_mib": float(m["peak_memory"][-1]) / MIB,
            "worker_peak_mean_mib": float(w["peak_memory"][-1].mean()) / MIB,
            "worker_peak_max_mib": float(w["peak_memory"][-1].max()) / MIB,
        }
    row["round_over_busy"] = row["median_round_s"] / row["median_slowest_busy_s"]
    return row


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ranks", default="5,17,33,65", help="comma-separated MPI sizes")
    ap.add_argument("--out", default="runs/benchmarks/10-ranks")
    ap.add_argument("--set", action="append", default=[], dest="sets", help="config override (repeatable)")
    ap.add_argument("--timeout", type=float, default=1800.0, help="seconds per job")
    args = ap.parse_args(argv)
    out = Path(args.out)
    if out.exists():
        raise SystemExit(f"ranks.py: {out} exists; choose another --out")
    out.mkdir(parents=True)
    rows = [run(int(n), out / f"n{int(n)}", args.sets, args.timeout) for n in args.ranks.split(",")]
    cols = list(rows[0])
    lines = ["| " + " | ".join(cols) + " |", "|" + "---:|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join(f"{r[c]:.2f}" if isinstance(r[c], float) else str(r[c]) for c in cols) + " |")
    table = "\n".join(lines)
    settings = " ".join(f"--set {s}" for s in args.sets)
    (out / "summary.md").write_text(
        f"# ranks\n\ncommand: `python launch/bench/ranks.py --ranks {args.ranks} --out {args.out} {settings}`\n\n{table}\n")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
