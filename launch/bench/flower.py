"""Side by side with Flower's simulation (docs/benchmarks.md, section 15): the same FedAvg job run
by ``mpiexec -n CLIENTS+1 python -m elfish_mpi train`` and by Flower's simulation runtime (Ray),
alternated, for each clients count and repeat.

The job: LeNet on Fashion-MNIST, the training set split iid over the clients (run.seed), the same
initial weights, ``--steps`` SGD steps of ``--batch`` images at ``--lr`` per client and round in
the same batch order, FedAvg weighted by sample counts, the global model evaluated every round on
``--test-samples`` test images (0: all 10,000), one torch thread per process. Ours: strategy
fedavg, workers.throttle = none, every capacity 1, run.eval_every = 1. Flower's:
launch/bench/flower_app.py, in its own virtualenv (``--venv``, made here when missing: torch
first, then flwr[simulation], numpy, h5py; elfish_mpi comes from this repository on PYTHONPATH),
with Ray's ``client_resources`` of ``--cpus-per-client`` CPUs.

Measured for each run, from the launch of the process (``time.time()`` just before it starts):

* total: until the process (mpiexec / the Flower driver) has exited;
* round ends: when a round's evaluated accuracy is known: for ours the time rank 0's
  ``round r/R`` line reaches this script (printed, flushed, after the round's evaluation, which
  with run.overlap_eval happens early in round r+1); for Flower the end of the ServerApp's
  ``evaluate_fn`` of round r (after the round's training, aggregation and evaluation);
* time to round 1: the first round end; round period: the median time between successive round
  ends;
* start-up: until rank 0's round clock starts (after every rank is up: its last round end less
  metrics/wall_clock and the last evaluation) / until the ServerApp's strategy starts (Ray's actors
  start later, in round 1); after the last round: the last round end to the exit; of which
  shut-down: from rank 0's ``done:`` line (after the final checkpoint) / the strategy's end to the
  exit (MPI_Finalize and the ranks' exit / Ray's shut-down and the driver's exit);
* peak memory: every 0.2 s this script reads /proc/PID/status of every process of the job (the
  launched process's session and its descendants: mpiexec, hydra's proxy and the ranks; the
  Flower driver and all of Ray's processes and actors); per process its peak resident set size
  (VmHWM, the last value read before it exited), summed over the processes. Also the largest sum
  of the processes' current RSS (VmRSS) seen in one sample. Both count pages shared between
  processes (torch's libraries) once per process, on both sides alike;
* the accuracy, test loss and training loss of every round.

Writes ``--out``: results.csv (a row per run), curves.csv (a row per run and round), summary.json,
summary.md (the medians per setting, the ratios Flower/ours, the largest accuracy difference per
round), and runs/ (each run's directory or JSON and its output).

    python launch/bench/flower.py --clients 4,8 --rounds 15 --repeats 3 --out runs/benchmarks/15-flower
"""
from __future__ import annotations

import argparse
import csv
import datetime
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))  # this repository's elfish_mpi, whatever PYTHONPATH says
FLWR = "flwr[simulation]==1.42.0"
TORCH = "torch==2.13.0"
PAGE = os.sysconf("SC_PAGE_SIZE")


# ----------------------------------------------------------------------------- Flower's virtualenv


def ensure_venv(venv: Path) -> Path:
    """The Flower virtualenv's python, made first if missing (torch pinned first: a bare torch
    requirement would pull a CUDA build)."""
    py = venv / "bin" / "python"
    marker = venv / ".flower-bench"
    want = f"{TORCH} {FLWR} numpy h5py\n"
    if py.exists() and marker.exists() and marker.read_text() == want:
        return py
    print(f"flower.py: making {venv} ({want.strip()})", flush=True)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(py), "-m", "pip", "install", "-q"]
    subprocess.run([*pip, TORCH], check=True)
    subprocess.run([*pip, FLWR, "numpy", "h5py"], check=True)
    subprocess.run([str(py), "-c", "import flwr, ray, torch, h5py"], check=True)
    marker.write_text(want)
    return py


def venv_versions(py: Path) -> dict:
    code = "import json, importlib.metadata as m; print(json.dumps({p: m.version(p) for p in ('flwr', 'ray', 'torch', 'numpy')}))"
    out = subprocess.run([str(py), "-c", code], capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


# ----------------------------------------------------------------------------- memory of a job


def _status(pid: int) -> dict | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            text = f.read()
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2:].split()  # (after the command name, which may hold spaces)
    out = {"name": stat[stat.index("(") + 1:stat.rindex(")")], "ppid": int(fields[1]), "sid": int(fields[3]),
           "start": int(fields[19])}
    for key in ("VmHWM", "VmRSS"):
        m = re.search(rf"^{key}:\s+(\d+) kB", text, re.M)
        out[key] = int(m.group(1)) * 1024 if m else 0
    return out


class JobMemory:
    """Samples, every ``interval`` seconds, the processes of the job rooted at ``root`` (a session
    leader): its session and its descendants."""

    def __init__(self, root: int, interval: float = 0.2):
        self.root, self.interval = root, interval
        self.hwm: dict[tuple[int, int], int] = {}  # (pid, start time) -> peak RSS read
        self.names: dict[tuple[int, int], str] = {}
        self.rss_peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def sample(self) -> int:
        procs = {}
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                st = _status(int(entry))
                if st is not None:
                    procs[int(entry)] = st
        job = {p for p, st in procs.items() if st["sid"] == self.root or p == self.root}
        grew = True
        while grew:  # descendants (a process that left the session: Ray's, if any)
            more = {p for p, st in procs.items() if st["ppid"] in job and p not in job}
            job |= more
            grew = bool(more)
        rss = 0
        for p in job:
            st = procs[p]
            key = (p, st["start"])
            self.hwm[key] = max(self.hwm.get(key, 0), st["VmHWM"])
            self.names[key] = st["name"]
            rss += st["VmRSS"]
        self.rss_peak = max(self.rss_peak, rss)
        return len(job)

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def hwm_sum(self) -> int:
        return sum(self.hwm.values())

    def processes(self) -> list[str]:
        """``name:MiB`` of every process seen, largest first."""
        rows = sorted(((v, self.names[k]) for k, v in self.hwm.items()), reverse=True)
        return [f"{n}:{v / 2**20:.0f}" for v, n in rows]


def _leftovers(sid: int) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            st = _status(int(entry))
            if st is not None and st["sid"] == sid:
                out.append(int(entry))
    return out


def launch(cmd: list[str], env: dict, log: Path, timeout: float, on_line=None) -> dict:
    """Run ``cmd`` in its own session, sampling its memory; stdout+stderr to ``log`` (each line
    passed to ``on_line(text, time)`` as it arrives). Returns the times and the memory."""
    log.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, cwd=ROOT,
                            start_new_session=True, text=True, bufsize=1)
    mem = JobMemory(proc.pid)
    timer = threading.Timer(timeout, lambda: os.killpg(proc.pid, signal.SIGKILL))
    timer.daemon = True
    timer.start()
    try:
        with open(log, "w") as f:
            for line in proc.stdout:
                now = time.time()
                f.write(line)
                if on_line is not None:
                    on_line(line, now)
        rc = proc.wait()
        t_exit = time.time()
    except BaseException:
        os.killpg(proc.pid, signal.SIGKILL)
        raise
    finally:
        timer.cancel()
    # processes of the job still alive after it exited (none expected): waited for, up to 30 s
    left, t_end = _leftovers(proc.pid), time.time()
    while left and time.time() - t_end < 30:
        time.sleep(0.2)
        left = _leftovers(proc.pid)
    mem.stop()
    mem.sample()
    if left:
        for p in left:
            try:
                os.kill(p, signal.SIGKILL)
            except ProcessLookupError:
                pass
    if rc:
        tail = "".join(open(log).readlines()[-40:])
        raise SystemExit(f"flower.py: {' '.join(cmd[:6])} ... exited with {rc}; the end of {log}:\n{tail}")
    return {"t_launch": t0, "t_exit": t_exit, "total_s": t_exit - t0, "lingering": len(left),
            "peak_hwm_sum": mem.hwm_sum, "peak_rss_sum": mem.rss_peak, "processes": mem.processes()}


# ----------------------------------------------------------------------------- the two jobs


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PMI_", "PMIX_", "HYDRA_", "OMPI_"))}
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["PYTHONUNBUFFERED"] = "1"
    return env


_ROUND_LINE = re.compile(r"^round\s+(\d+)/(\d+)\s")


def run_ours(args, clients: int, out: Path) -> dict:
    from elfish_mpi.analysis import open_run
    from elfish_mpi.bench import resolve_launcher

    run_dir = out / "run"
    ranks = args.ours_workers if 0 < args.ours_workers < clients else clients  # worker ranks
    cmd = [*resolve_launcher("mpiexec"), "-n", str(ranks + 1), sys.executable, "-m", "elfish_mpi", "train",
           "--out", str(run_dir)]
    if ranks < clients:  # the clients trained one after another on fewer ranks (clients.count)
        cmd += ["--set", f"clients.count={clients}"]
    caps = "[" + ",".join(["1"] * clients) + "]"
    for s in ("strategy.name=fedavg", "workers.throttle=none", f"workers.capacity={caps}", f"run.rounds={args.rounds}",
              f"train.local_steps={args.steps}", f"train.batch_size={args.batch}", f"train.lr={args.lr}",
              "train.momentum=0.0", f"data.test_samples={args.test_samples}", "data.partition=iid", "model.name=lenet",
              "data.name=fashion-mnist", f"run.seed={args.seed}", "run.eval_every=1", f"run.threads={args.threads}",
              f"run.overlap_eval={'true' if args.overlap_eval else 'false'}"):
        cmd += ["--set", s]
    ends: dict[int, float] = {}

    def on_line(line: str, now: float) -> None:
        m = _ROUND_LINE.match(line)
        if m:
            ends[int(m.group(1))] = now
        elif line.startswith("done: "):  # rank 0's summary, after the last checkpoint
            ends[0] = now

    res = launch(cmd, _env(), out / "output.log", args.timeout, on_line)
    run = open_run(run_dir)
    m = run.metrics
    rounds = list(range(1, args.rounds + 1))
    t_done = ends.pop(0, float("nan")) - res["t_launch"]
    if sorted(ends) != rounds or len(m) != args.rounds:
        raise SystemExit(f"flower.py: {run_dir}: rounds reported {sorted(ends)}, recorded {len(m)}")
    t_end = np.array([ends[r] for r in rounds]) - res["t_launch"]
    wall = m["wall_clock"].to_numpy(float)
    # rank 0's round clock starts after start-up; its last round ends (wall_clock) and is then
    # evaluated (eval_time) before its line is printed: when the clock started, from the launch
    startup = t_end[-1] - wall[-1] - float(m["eval_time"].to_numpy(float)[-1])
    res.update(
        t_end=t_end.tolist(), accuracy=m["test_accuracy"].to_numpy(float).tolist(),
        test_loss=m["test_loss"].to_numpy(float).tolist(), train_loss=m["train_loss"].to_numpy(float).tolist(),
        startup_s=startup, shutdown_s=res["total_s"] - t_done, train_s=float(np.median(m["round_time"].to_numpy(float))),
        eval_s=float(np.median(m["eval_time"].to_numpy(float))),
        rank_peak_sum=float(np.nanmax(m["peak_memory"].to_numpy(float))
                            + np.nansum(np.nanmax(run.per_worker("peak_memory"), axis=0))),
    )
    return res


def run_flower(args, py: Path, clients: int, out: Path) -> dict:
    js = out.with_suffix(".json")
    cmd = [str(py), str(ROOT / "launch" / "bench" / "flower_app.py"), "--clients", str(clients),
           "--rounds", str(args.rounds), "--out", str(js), "--steps", str(args.steps), "--batch", str(args.batch),
           "--lr", str(args.lr), "--test-samples", str(args.test_samples), "--seed", str(args.seed),
           "--threads", str(args.threads), "--cpus-per-client", str(args.cpus_per_client)]
    env = _env()
    env["OMP_NUM_THREADS"] = str(args.threads)
    res = launch(cmd, env, out.with_suffix(".log"), args.timeout)
    rec = json.loads(js.read_text())
    rows = rec["rounds"]
    t0 = res["t_launch"]
    t_end = np.array([r["t_end"] for r in rows]) - t0
    t_agg = np.array([r["t_aggregated"] for r in rows]) - t0
    starts = np.concatenate([[rec["t_strategy_start"] - t0], t_end[:-1]])
    res.update(
        t_end=t_end.tolist(), accuracy=[r["test_accuracy"] for r in rows], test_loss=[r["test_loss"] for r in rows],
        train_loss=[r["train_loss"] for r in rows], startup_s=rec["t_strategy_start"] - t0,
        shutdown_s=res["total_s"] - (rec["t_strategy_end"] - t0),
        train_s=float(np.median(t_agg - starts)), eval_s=float(np.median(t_end - t_agg)),
        import_s=rec["t_script"] - t0, versions=rec.get("versions", {}),
    )
    return res


# ----------------------------------------------------------------------------- report


def per_run_row(system: str, clients: int, rep: int, r: dict) -> dict:
    t_end = np.asarray(r["t_end"])
    return {
        "system": system, "clients": clients, "repeat": rep, "total_s": r["total_s"], "round1_s": float(t_end[0]),
        "round_period_s": float(np.median(np.diff(t_end))) if t_end.size > 1 else float("nan"),
        "startup_s": r["startup_s"], "teardown_s": r["total_s"] - float(t_end[-1]), "shutdown_s": r["shutdown_s"],
        "train_s": r["train_s"], "eval_s": r["eval_s"],
        "peak_memory_mib": r["peak_hwm_sum"] / 2**20, "peak_rss_sum_mib": r["peak_rss_sum"] / 2**20,
        "final_accuracy": r["accuracy"][-1], "lingering": r["lingering"], "processes": len(r["processes"]),
    }


METRICS = (("total_s", "total", "s"), ("round1_s", "to round 1", "s"), ("round_period_s", "round period", "s"),
           ("startup_s", "start-up", "s"), ("teardown_s", "after the last round", "s"), ("shutdown_s", "shut-down", "s"),
           ("peak_memory_mib", "peak memory (sum of VmHWM)", "MiB"), ("peak_rss_sum_mib", "peak RSS sum", "MiB"),
           ("final_accuracy", "final accuracy", ""))


def summarize(rows: list[dict], curves: dict, header: dict) -> tuple[dict, str]:
    summary = {"header": header, "settings": []}
    lines = [f"# Side by side with Flower's simulation ({header['date']})", "",
             "Setting: " + header["setting"], "", "Versions: " + header["versions"], "",
             "| clients | system | runs | total | to round 1 | round period | start-up | after the last round "
             "| of which shut-down | peak memory (sum of VmHWM) | peak RSS sum | final accuracy |",
             "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for clients in sorted({r["clients"] for r in rows}):
        med = {}
        for system in ("ours", "flower"):
            sel = [r for r in rows if r["clients"] == clients and r["system"] == system]
            if not sel:
                continue
            med[system] = {k: float(np.median([r.get(k, np.nan) for r in sel])) for k, _, _ in METRICS}
            med[system]["runs"] = len(sel)
            v = med[system]
            lines.append(f"| {clients} | {system} | {len(sel)} | {v['total_s']:.1f} s | {v['round1_s']:.1f} s "
                         f"| {v['round_period_s']:.2f} s | {v['startup_s']:.1f} s | {v['teardown_s']:.1f} s | {v['shutdown_s']:.1f} s "
                         f"| {v['peak_memory_mib']:.0f} MiB | {v['peak_rss_sum_mib']:.0f} MiB | {v['final_accuracy']:.2%} |")
        entry = {"clients": clients, "median": med}
        if len(med) == 2:
            ratio = {k: med["flower"][k] / med["ours"][k] for k, _, _ in METRICS if k != "final_accuracy"}
            entry["ratio"] = ratio
            lines.append(f"| {clients} | **Flower / ours** | | **{ratio['total_s']:.2f}x** | {ratio['round1_s']:.2f}x "
                         f"| **{ratio['round_period_s']:.2f}x** | {ratio['startup_s']:.2f}x | {ratio['teardown_s']:.2f}x | {ratio['shutdown_s']:.2f}x "
                         f"| {ratio['peak_memory_mib']:.2f}x | {ratio['peak_rss_sum_mib']:.2f}x | |")
            a, b = np.asarray(curves[("ours", clients)]), np.asarray(curves[("flower", clients)])
            # (every run of a system gives the same curve: the job is deterministic; checked here)
            entry["accuracy_spread_within"] = {"ours": float(np.ptp(a, axis=0).max()), "flower": float(np.ptp(b, axis=0).max())}
            diff = np.abs(a[:, None, :] - b[None, :, :]).max(axis=(0, 1))
            entry["accuracy_diff_per_round"] = diff.tolist()
            entry["accuracy_ours"] = a[0].tolist()
            entry["accuracy_flower"] = b[0].tolist()
        summary["settings"].append(entry)
    lines += ["", "Accuracy per round (first run of each; the largest |ours - Flower| over all pairs of runs):", ""]
    for entry in summary["settings"]:
        if "accuracy_diff_per_round" in entry:
            lines.append(f"- {entry['clients']} clients: largest difference {max(entry['accuracy_diff_per_round']):.4f} "
                         f"(per round: {' '.join(f'{d:.4f}' for d in entry['accuracy_diff_per_round'])}); "
                         f"spread between repeats: ours {entry['accuracy_spread_within']['ours']:.4f}, "
                         f"Flower {entry['accuracy_spread_within']['flower']:.4f}")
            lines.append(f"  - ours:   {' '.join(f'{x:.4f}' for x in entry['accuracy_ours'])}")
            lines.append(f"  - Flower: {' '.join(f'{x:.4f}' for x in entry['accuracy_flower'])}")
    return summary, "\n".join(lines) + "\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--clients", default="4,8", help="clients counts, comma-separated (ours: mpiexec -n CLIENTS+1)")
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default="runs/benchmarks/15-flower")
    p.add_argument("--steps", type=int, default=20, help="local SGD steps per client and round")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--test-samples", type=int, default=0, help="test images (0: all 10,000)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch threads per process (run.threads)")
    p.add_argument("--overlap-eval", choices=("true", "false"), default="true", help="ours: run.overlap_eval")
    p.add_argument("--cpus-per-client", type=float, default=1.0, help="Flower: Ray's client_resources num_cpus")
    p.add_argument("--ours-workers", type=int, default=0,
                   help="ours: worker ranks (0: one a client; fewer: clients.count = CLIENTS, each rank training "
                        "its clients one after another, as Flower's actors do)")
    p.add_argument("--venv", default=str(ROOT / ".venv-flower"), help="Flower's virtualenv (made when missing)")
    p.add_argument("--timeout", type=float, default=1800, help="seconds a run may take before it is killed")
    args = p.parse_args()
    args.overlap_eval = args.overlap_eval == "true"
    counts = [int(c) for c in args.clients.split(",") if c.strip()]
    out = Path(args.out)
    (out / "runs").mkdir(parents=True, exist_ok=True)
    py = ensure_venv(Path(args.venv))
    versions = venv_versions(py)
    import torch
    import mpi4py
    from mpi4py import MPI

    header = {
        "date": datetime.date.today().isoformat(), "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "setting": (f"LeNet, Fashion-MNIST iid over {args.clients} clients, seed {args.seed}, {args.rounds} rounds, "
                    f"{args.steps} local SGD steps of batch {args.batch} at lr {args.lr} (no momentum), FedAvg by "
                    f"sample count, every round's global model evaluated on "
                    f"{args.test_samples or 'all 10,000'} test images, {args.threads} torch thread(s) a process; "
                    f"ours: strategy fedavg, throttle none, capacities 1, "
                    f"{'one rank a client' if not 0 < args.ours_workers < min(counts) else f'{args.ours_workers} worker ranks'}, run.overlap_eval = "
                    f"{str(args.overlap_eval).lower()}; Flower: {args.cpus_per_client:g} CPU a client "
                    f"(Ray client_resources), no client-side evaluation; {args.repeats} repeats, alternated"),
        "versions": (f"ours: torch {torch.__version__}, mpi4py {mpi4py.__version__}, {MPI.Get_library_version().split(chr(10))[0].strip()}; "
                     f"Flower: flwr {versions['flwr']}, ray {versions['ray']}, torch {versions['torch']}"),
    }
    rows, curves, raw = [], {}, []
    for rep in range(args.repeats):
        for clients in counts:
            order = ("ours", "flower") if rep % 2 == 0 else ("flower", "ours")
            for system in order:
                tag = f"{system}-c{clients}-r{rep}"
                print(f"flower.py: {tag} ...", flush=True)
                if system == "ours":
                    res = run_ours(args, clients, out / "runs" / tag)
                else:
                    res = run_flower(args, py, clients, out / "runs" / tag)
                row = per_run_row(system, clients, rep, res)
                print("   " + "  ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()
                                         if k not in ("system", "clients", "repeat")), flush=True)
                rows.append(row)
                curves.setdefault((system, clients), []).append(res["accuracy"])
                raw.append({"system": system, "clients": clients, "repeat": rep, **{k: v for k, v in res.items()}})
    with open(out / "results.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    with open(out / "curves.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["system", "clients", "repeat", "round", "t_end_s", "test_accuracy", "test_loss", "train_loss"])
        for r in raw:
            for i, t in enumerate(r["t_end"]):
                w.writerow([r["system"], r["clients"], r["repeat"], i + 1, f"{t:.3f}", r["accuracy"][i],
                            r["test_loss"][i], r["train_loss"][i]])
    summary, text = summarize(rows, curves, header)
    summary["runs"] = raw
    (out / "summary.json").write_text(json.dumps(summary, indent=1, default=float))
    (out / "summary.md").write_text(text)
    print()
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
