"""Many clients on few ranks (docs/benchmarks.md, section 14): 1,000 clients, 100 a round,
trained by 4 and by 16 worker ranks (mpiexec -n 5 and -n 17), LeNet on Fashion-MNIST (iid over
the 1,000 clients: 60 images each), lognormal speeds, the virtual clock, elfish planned
from quick profiles. Per run: start-up, the median round time, rank 0's share of it (its work
outside waiting), the round time against the slowest client's virtual time, the bytes rank 0
receives per round, and the checkpoint's size; then the size of the checkpoint of the same
run after 500 rounds, written by checkpoint.write from the run's own records repeated.

    python launch/bench/clients_scale.py [--ranks 5,17] [--rounds 5] [--data PATH] [--out DIR]
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from elfish_mpi import checkpoint as ck
from elfish_mpi.bench import resolve_launcher

ROOT = Path(__file__).resolve().parents[2]


def run(n: int, rounds: int, data: str, out: Path) -> dict:
    cmd = [*resolve_launcher("mpiexec"), "-n", str(n), sys.executable, "-m", "elfish_mpi", "train", "--out", str(out)]
    for s in (f"data.path={data}", "data.test_samples=2000", "model.name=lenet", f"run.rounds={rounds}",
              "train.local_steps=10", "train.batch_size=20", "workers.throttle=virtual", "clients.count=1000",
              "clients.per_round=100", "clients.speed=lognormal", "strategy.name=elfish", "strategy.profile=quick",
              f"checkpoint.every={rounds}"):
        cmd += ["--set", s]
    t0 = time.perf_counter()
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=3600, cwd=ROOT)
    total = time.perf_counter() - t0
    if res.returncode:
        sys.exit(f"mpiexec -n {n} failed:\n{res.stderr[-3000:]}")
    c = ck.read(out / "checkpoint.h5")
    m, w = c.metrics, c.workers
    rt = np.asarray(m["round_time"])
    return {
        "ranks": n, "total_s": total, "startup_s": total - float(m["wall_clock"][-1]),
        "profiling_s": float(c.profiles.get("profiling_time", [np.nan])[0]),
        "round_s": float(np.median(rt)), "root_share": float(np.median(np.asarray(m["root_busy_time"]) / rt)),
        "root_cpu_s": float(np.median(m["root_cpu_time"])), "root_eval_s": float(np.nanmedian(m["eval_root_time"])),
        "busy_wall_sum_s": float(np.median(np.asarray(w["busy_time"]).sum(axis=1))),
        "virtual_s": float(np.median(m["virtual_time"])), "busy_per_rank_s": float(np.median(
            [np.bincount(w["rank"][i].astype(int) - 1, weights=w["busy_time"][i]).max() for i in range(len(rt))])),
        "received_per_round": float(np.median(np.asarray(w["bytes_sent"]).sum(axis=1))),
        "peak_memory_root_mib": float(np.max(m["peak_memory"])) / 2**20,
        "peak_memory_worker_mib": float(np.max(w["peak_memory"])) / 2**20,
        "checkpoint_bytes": (out / "checkpoint.h5").stat().st_size, "ckpt": c,
    }


def size_after(c: ck.Checkpoint, rounds: int) -> int:
    """The checkpoint of the same run after ``rounds`` rounds: its per-round records and mask
    history repeated (the run's own values), written by checkpoint.write."""
    n = c.round
    reps = -(-rounds // n)
    metrics = {k: np.tile(np.asarray(v), reps)[:rounds] for k, v in c.metrics.items()}
    metrics["round"] = np.arange(1, rounds + 1)
    workers = {k: np.tile(np.asarray(v), (reps, 1))[:rounds] for k, v in c.workers.items()}
    masks = {r: c.masks[(r - 1) % n + 1] for r in range(1, rounds + 1)}
    big = ck.Checkpoint(round=rounds, config=c.config, strategy=c.strategy, model=c.model, metrics=metrics,
                        workers=workers, masks=masks, coverage=c.coverage, profiles=c.profiles, state=c.state, attrs=c.attrs)
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "big.h5"
        ck.write(path, big)
        return path.stat().st_size


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ranks", default="5,17")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--data", default=str(ROOT.parent / "shared" / "datasets" / "fashion-mnist"))
    p.add_argument("--out", default="")
    args = p.parse_args()
    out = Path(args.out or tempfile.mkdtemp(prefix="clients-scale-"))
    rows = [run(int(n), args.rounds, args.data, out / f"n{n}") for n in args.ranks.split(",")]
    print(f"1,000 clients, 100 a round, LeNet on Fashion-MNIST, 10 steps of 20, virtual clock, elfish (quick "
          f"profiles), {args.rounds} rounds, {os.cpu_count()} cores; medians over the rounds\n")
    print("| ranks | outside the rounds s | profiling s | round s | rank 0 busy share | rank 0 CPU s | of which evaluating s | "
          "slowest client virtual s | busiest rank's training s | clients' busy wall time, summed s | bytes to rank 0 / round "
          "| peak MiB rank 0 / worker | checkpoint |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['ranks']} | {r['startup_s']:.1f} | {r['profiling_s']:.1f} | {r['round_s']:.2f} | {r['root_share']:.1%} "
              f"| {r['root_cpu_s']:.2f} | {r['root_eval_s']:.2f} | {r['virtual_s']:.3f} | {r['busy_per_rank_s']:.2f} "
              f"| {r['busy_wall_sum_s']:.2f} | {r['received_per_round'] / 1e6:.2f} MB "
              f"| {r['peak_memory_root_mib']:.0f} / {r['peak_memory_worker_mib']:.0f} | {r['checkpoint_bytes'] / 1e6:.2f} MB |")
    print(f"\ncheckpoint after 500 rounds (the records of {rows[0]['ranks']} ranks' run repeated): "
          f"{size_after(rows[0]['ckpt'], 500) / 1e6:.1f} MB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
