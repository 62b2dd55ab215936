"""``elfish-mpi bench``: run several strategies on the same config and seeds, then compare them.

    elfish-mpi bench --config FILE --strategies fedavg,elfish --out DIR -n NP
                     [--seeds 0,1,2] [--fleets quickstart,paper] [--partitions iid,dirichlet]
                     [--set section.key=value ...] [--target-accuracy 0.7] [--launcher mpiexec]
                     [--time-budget SECONDS] [--timeline-rounds 5] [--run-timeout 3600]

For every fleet x partition x strategy x seed the bench launches one training job,

    LAUNCHER -n NP python -m elfish_mpi train [--config FILE] --out DIR/runs/<fleet>/<partition>/<strategy>/seed<S>
        --set strategy.name=... --set run.seed=S [--set workers.fleet=F --set workers.capacity=[]]
        [--set data.partition=P] [the bench's --set ...]

one after the other (they would otherwise compete for the cores and spoil each other's
timings). A strategy name may carry the suffix ``-naive`` (``elfish-naive``, ``fedavg-naive``,
...): the base strategy with ``strategy.aggregation=naive``. A run directory that already
holds a finished checkpoint is skipped, one with an unfinished checkpoint is resumed (``train
--resume``), so an interrupted bench continues where it stopped when started again with the
same command. A failed run is reported with the tail of its stderr and the bench goes on; it
exits with 1 at the end if any run failed (2: a usage or config error before any run).

Each run directory also gets ``stdout.log`` and ``stderr.log`` of its job. From the checkpoints
the bench writes into DIR: ``results.csv`` (one row per run), ``summary.csv`` and
``summary.md`` (per fleet/partition and strategy, aggregated over seeds), and the plots
``accuracy_vs_wall.png``, ``accuracy_vs_virtual.png`` and ``timeline.png`` (prefixed with
``<fleet>_<partition>_`` when the bench covers several fleets or partitions).

Everything after the runs (loading, metrics, tables, plots) is a set of pure functions over
:class:`RunResult` objects, usable without MPI.
"""
from __future__ import annotations

import argparse
import csv
import datetime as _dt
import io
import math
import os
import platform
import queue
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .checkpoint import write_text_atomic

from .config import STRATEGIES, Config, ConfigError, load_config, parse_override

NAIVE_SUFFIX = "-naive"
ROUND_RE = re.compile(r"^round\s+(\d+)/(\d+)\s+acc\s+(-|[0-9.]+%)")
STDERR_TAIL_LINES = 25


class BenchUsageError(Exception):
    """A problem with the bench's arguments (exit 2)."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise BenchUsageError(message)


# --------------------------------------------------------------------------- #
# the plan
# --------------------------------------------------------------------------- #


def variant_overrides(name: str) -> list[str]:
    """``--set`` values for a strategy variant: ``elfish`` -> strategy.name=elfish;
    ``elfish-naive`` -> strategy.name=elfish, strategy.aggregation=naive (any ``NAME-naive``)."""
    if name in STRATEGIES:
        return [f"strategy.name={name}"]
    if name.endswith(NAIVE_SUFFIX) and name[: -len(NAIVE_SUFFIX)] in STRATEGIES:
        return [f"strategy.name={name[: -len(NAIVE_SUFFIX)]}", "strategy.aggregation=naive"]
    raise BenchUsageError(
        f"unknown strategy {name!r}; choose from {', '.join(STRATEGIES)}, each optionally with the suffix "
        f"{NAIVE_SUFFIX} (naive aggregation)"
    )


def _split_list(text: str | None) -> list[str]:
    if text is None:
        return []
    return [part.strip() for part in text.split(",") if part.strip()]


def parse_seeds(text: str) -> list[int]:
    seeds = []
    for part in _split_list(text):
        try:
            seed = int(part)
        except ValueError:
            raise BenchUsageError(f"--seeds: {part!r} is not an integer") from None
        if seed < 0:
            raise BenchUsageError(f"--seeds: {seed} must be >= 0")
        if seed not in seeds:
            seeds.append(seed)
    if not seeds:
        raise BenchUsageError("--seeds: give at least one seed, e.g. --seeds 0,1,2")
    return seeds


@dataclass
class RunSpec:
    """One training job of the bench."""

    fleet: str
    partition: str
    strategy: str  # the variant's name, e.g. elfish-naive
    seed: int
    run_dir: Path
    overrides: list[str]  # the --set values handed to `train`, in order
    rounds: int
    config: dict  # the resolved config the job will run with (run.out = run_dir)

    @property
    def label(self) -> str:
        return f"{self.fleet}/{self.partition} {self.strategy} seed {self.seed}"


def _check_user_sets(sets: list[str], *, fleets: bool, partitions: bool, naive: bool) -> None:
    controlled = {
        "run.seed": "use --seeds",
        "run.out": "the bench chooses each run directory under --out",
        "strategy.name": "use --strategies",
    }
    if fleets:
        controlled["workers.fleet"] = "use --fleets (or leave --fleets out)"
        controlled["workers.capacity"] = "--fleets replaces the capacity list (leave --fleets out to use it)"
    if partitions:
        controlled["data.partition"] = "use --partitions (or leave --partitions out)"
    if naive:
        controlled["strategy.aggregation"] = "a -naive strategy sets it; name the variants instead"
    for text in sets:
        try:
            section, key, _value = parse_override(text)
        except ConfigError as exc:
            raise BenchUsageError(str(exc)) from None
        dotted = f"{section}.{key}"
        if dotted in controlled:
            raise BenchUsageError(f"--set {text!r}: the bench sets {dotted} for each run; {controlled[dotted]}")


def fleet_label(cfg: Config) -> str:
    if cfg.workers.fleet:
        return cfg.workers.fleet
    return "custom" if cfg.workers.capacity else "uniform"


def plan_runs(
    *,
    config: str | None,
    strategies: list[str],
    seeds: list[int],
    fleets: list[str],
    partitions: list[str],
    sets: list[str],
    out: Path,
    num_workers: int,
) -> list[RunSpec]:
    """Every run of the bench, its overrides and resolved config. Raises BenchUsageError/ConfigError."""
    if not strategies:
        raise BenchUsageError("--strategies: give at least one strategy, e.g. --strategies fedavg,elfish")
    if len(set(strategies)) != len(strategies):
        raise BenchUsageError("--strategies: a strategy is listed twice")
    variants = {s: variant_overrides(s) for s in strategies}
    _check_user_sets(sets, fleets=bool(fleets), partitions=bool(partitions), naive=any(len(v) > 1 for v in variants.values()))
    base = load_config(config, sets)
    fleet_axis = [(f, [f"workers.fleet={f}", "workers.capacity=[]"]) for f in fleets] or [(fleet_label(base), [])]
    part_axis = [(p, [f"data.partition={p}"]) for p in partitions] or [(base.data.partition, [])]
    runs = []
    for fleet, fleet_sets in fleet_axis:
        for part, part_sets in part_axis:
            for strategy in strategies:
                for seed in seeds:
                    overrides = [*variants[strategy], f"run.seed={seed}", *fleet_sets, *part_sets, *sets]
                    run_dir = (out / "runs" / fleet / part / strategy / f"seed{seed}").resolve()
                    cfg = load_config(config, overrides)
                    cfg.run.out = str(run_dir)
                    cfg.check_world(num_workers)
                    runs.append(RunSpec(fleet, part, strategy, seed, run_dir, overrides, cfg.run.rounds, cfg.to_dict()))
    return runs


def resolve_launcher(text: str) -> list[str]:
    """The launcher's words; a bare program name is looked up next to sys.executable, then on PATH."""
    words = shlex.split(text)
    if not words:
        raise BenchUsageError("--launcher is empty")
    prog = words[0]
    if os.sep not in prog:
        local = Path(sys.executable).with_name(prog)
        if local.exists() and os.access(local, os.X_OK):
            words[0] = str(local)
        else:
            found = shutil.which(prog)
            if found is None:
                raise BenchUsageError(f"--launcher: {prog!r} was found neither next to {sys.executable} nor on PATH")
            words[0] = found
    return words


def train_command(run: RunSpec, launcher: list[str], np_: int, config: str | None, resume: bool) -> list[str]:
    cmd = [*launcher, "-n", str(np_), sys.executable, "-m", "elfish_mpi", "train"]
    if config is not None:
        cmd += ["--config", str(Path(config).resolve())]
    cmd += ["--out", str(run.run_dir)]
    if resume:
        cmd += ["--resume", str(run.run_dir)]
    for text in run.overrides:
        cmd += ["--set", text]
    return cmd


def checkpoint_state(run: RunSpec) -> tuple[str, str]:
    """('new' | 'partial' | 'done' | 'conflict', detail) for a run directory."""
    from . import checkpoint as ckptmod
    from .cli import config_differences, normalized_config

    path = run.run_dir / ckptmod.LATEST_NAME
    if not path.exists():
        history = run.run_dir / ckptmod.HISTORY_DIR
        if history.is_dir() and any(history.glob("round-*.h5")):
            return "partial", "history checkpoints only"
        return "new", ""
    try:
        ck = ckptmod.read(path, load_masks=False)
    except ckptmod.CheckpointError as exc:
        return "partial", f"unreadable checkpoint ({exc})"
    unsafe, _safe = config_differences(normalized_config(ck.config), normalized_config(run.config))
    if unsafe:
        return "conflict", (
            f"{run.run_dir} holds a run with another configuration ({'; '.join(unsafe[:3])}); "
            "delete it or choose another --out"
        )
    if ck.round >= run.rounds:
        return "done", f"round {ck.round}"
    return "partial", f"round {ck.round} of {run.rounds}"


# --------------------------------------------------------------------------- #
# running, with a live status line
# --------------------------------------------------------------------------- #


def _fmt_elapsed(seconds: float) -> str:
    seconds = max(0.0, seconds)
    if seconds < 60:
        return f"{seconds:5.1f}s"
    minutes, sec = divmod(int(round(seconds)), 60)
    if minutes < 60:
        return f"{minutes}m{sec:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


class Progress:
    """One status line per run. On a TTY it is redrawn in place (``\\r``); otherwise plain lines
    are printed: when a run starts, at most every ``interval`` seconds while it runs, and when it ends."""

    def __init__(self, total: int, stream=None, tty: bool | None = None, interval: float = 10.0):
        self.total = total
        self.stream = stream if stream is not None else sys.stdout
        self.tty = self.stream.isatty() if tty is None else tty
        self.interval = interval
        self._width = 0
        self._last_plain = 0.0

    def line(self, i: int, run: RunSpec, rnd: int, rounds: int, acc: float | None, elapsed: float, state: str = "") -> str:
        acc_s = f"{acc:6.2%}" if acc is not None and math.isfinite(acc) else "   -  "
        head = f"[{i}/{self.total}] {run.fleet}/{run.partition} {run.strategy} seed {run.seed}"
        text = f"{head}  round {rnd}/{rounds}  acc {acc_s}  {_fmt_elapsed(elapsed)}"
        return f"{text}  {state}" if state else text

    def update(self, text: str, *, final: bool = False, force: bool = False) -> None:
        if self.tty:
            cols = shutil.get_terminal_size((100, 20)).columns
            text = text[: max(cols - 1, 20)]
            pad = " " * max(0, self._width - len(text))
            self.stream.write("\r" + text + pad + ("\n" if final else ""))
            self._width = 0 if final else len(text)
        else:
            now = time.monotonic()
            if not (final or force or now - self._last_plain >= self.interval):
                return
            self._last_plain = now
            self.stream.write(text + "\n")
        self.stream.flush()

    def message(self, text: str) -> None:
        """A line of its own (ends a status line left open on a TTY)."""
        if self.tty and self._width:
            self.stream.write("\n")
            self._width = 0
        self.stream.write(text + "\n")
        self.stream.flush()


def _child_env() -> dict:
    # A bench started under an MPI launcher must not hand its own rank's settings to the jobs.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PMI_", "PMIX_", "HYDRA_", "OMPI_", "MPI_LOCALRANK"))}
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _kill_group(proc: subprocess.Popen, grace: float = 5.0) -> None:
    """End the job we started (its own process group: the launcher and the ranks)."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=grace)
            return
        except subprocess.TimeoutExpired:
            continue


def _tail(path: Path, lines: int = STDERR_TAIL_LINES) -> str:
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""
    return "\n".join(text.rstrip().splitlines()[-lines:])


@dataclass
class RunOutcome:
    run: RunSpec
    status: str  # done | skipped | failed
    detail: str = ""
    elapsed: float = 0.0


def execute(run: RunSpec, cmd: list[str], progress: Progress, index: int, timeout: float) -> RunOutcome:
    """Run one job, following its round lines on the status line. Never raises for a job's failure."""
    run.run_dir.mkdir(parents=True, exist_ok=True)
    out_log = run.run_dir / "stdout.log"
    err_log = run.run_dir / "stderr.log"
    lines: queue.Queue = queue.Queue()
    t0 = time.monotonic()
    state = {"round": 0, "rounds": run.rounds, "acc": None}
    with open(out_log, "a", encoding="utf-8") as out_fh, open(err_log, "a", encoding="utf-8") as err_fh:
        out_fh.write(f"# {shlex.join(cmd)}\n")
        out_fh.flush()
        try:
            proc = subprocess.Popen(
                cmd, stdout=subprocess.PIPE, stderr=err_fh, stdin=subprocess.DEVNULL, text=True,
                bufsize=1, env=_child_env(), start_new_session=True,
            )
        except OSError as exc:
            return RunOutcome(run, "failed", f"could not start {cmd[0]}: {exc}")

        def pump():
            try:
                for text in proc.stdout:
                    lines.put(text)
                    out_fh.write(text)
                    out_fh.flush()
            except (OSError, ValueError):  # the log was closed under us (Ctrl-C)
                pass
            finally:
                lines.put(None)

        reader = threading.Thread(target=pump, daemon=True)
        reader.start()
        progress.update(progress.line(index, run, 0, run.rounds, None, 0.0, "starting"), force=True)
        timed_out = False
        try:
            eof = False
            while True:
                try:
                    text = lines.get(timeout=1.0)
                except queue.Empty:
                    text = ""
                if text is None:
                    eof = True
                elif text:
                    m = ROUND_RE.match(text.strip())
                    if m:
                        state["round"], state["rounds"] = int(m.group(1)), int(m.group(2))
                        state["acc"] = float(m.group(3)[:-1]) / 100 if m.group(3) != "-" else state["acc"]
                        progress.update(progress.line(index, run, state["round"], state["rounds"], state["acc"], time.monotonic() - t0))
                        continue
                elapsed = time.monotonic() - t0
                if progress.tty:
                    progress.update(progress.line(index, run, state["round"], state["rounds"], state["acc"], elapsed))
                if eof:  # the job closed its stdout: wait for it to exit
                    try:
                        proc.wait(timeout=max(timeout - elapsed, 0.1))
                        break
                    except subprocess.TimeoutExpired:
                        elapsed = timeout + 1
                if elapsed > timeout:
                    timed_out = True
                    _kill_group(proc)
                    break
        except BaseException:  # Ctrl-C: end the job, keep what it checkpointed for a later resume
            _kill_group(proc)
            raise
        proc.wait()
        reader.join(timeout=5)
    elapsed = time.monotonic() - t0
    final = progress.line(index, run, state["round"], state["rounds"], state["acc"], elapsed)
    if timed_out:
        progress.update(final + f"  FAILED (over --run-timeout {timeout:g}s)", final=True)
        return RunOutcome(run, "failed", f"killed after {timeout:g} s (--run-timeout)\n{_tail(err_log)}", elapsed)
    if proc.returncode != 0:
        progress.update(final + f"  FAILED (exit {proc.returncode})", final=True)
        return RunOutcome(run, "failed", f"exit status {proc.returncode}\n{_tail(err_log)}", elapsed)
    status, detail = checkpoint_state(run)
    if status != "done":
        progress.update(final + "  FAILED (no finished checkpoint)", final=True)
        what = {"new": "no checkpoint", "partial": f"an unfinished checkpoint ({detail})"}.get(status, detail)
        return RunOutcome(run, "failed", f"the job exited with status 0 but left {what} in {run.run_dir}\n{_tail(err_log)}", elapsed)
    progress.update(final + "  done", final=True)
    return RunOutcome(run, "done", "", elapsed)


# --------------------------------------------------------------------------- #
# results (pure)
# --------------------------------------------------------------------------- #


@dataclass
class RunResult:
    fleet: str
    partition: str
    strategy: str
    seed: int
    metrics: dict[str, np.ndarray]
    workers: dict[str, np.ndarray]
    config: dict = field(default_factory=dict)
    run_dir: str = ""

    @property
    def rounds(self) -> int:
        return int(len(self.metrics["round"]))

    @property
    def num_workers(self) -> int:
        return int(self.workers["busy_time"].shape[1])


def load_result(run: RunSpec) -> RunResult:
    """A finished run's metrics (truncated to the run's rounds)."""
    from . import checkpoint as ckptmod

    ck = ckptmod.read(run.run_dir / ckptmod.LATEST_NAME, load_masks=False)
    n = min(ck.round, run.rounds)
    metrics = {k: np.asarray(v)[:n] for k, v in ck.metrics.items()}
    workers = {k: np.asarray(v)[:n] for k, v in ck.workers.items()}
    return RunResult(run.fleet, run.partition, run.strategy, run.seed, metrics, workers, ck.config, str(run.run_dir))


def time_to_target(accuracy, wall_clock, target: float | None) -> float:
    """Wall-clock seconds at which the test accuracy first reaches ``target`` (nan: never, or no target).
    Rounds without an evaluation (nan accuracy) never count."""
    if target is None or not math.isfinite(target):
        return math.nan
    acc = np.asarray(accuracy, dtype=float)
    wall = np.asarray(wall_clock, dtype=float)
    hit = np.flatnonzero(np.nan_to_num(acc, nan=-np.inf) >= target - 1e-12)
    return float(wall[hit[0]]) if hit.size else math.nan


def accuracy_at_budget(accuracy, wall_clock, budget: float | None) -> float:
    """Test accuracy of the last evaluated round that ended within ``budget`` wall seconds (nan: none)."""
    if budget is None:
        return math.nan
    acc = np.asarray(accuracy, dtype=float)
    wall = np.asarray(wall_clock, dtype=float)
    ok = np.flatnonzero(np.isfinite(acc) & (wall <= budget))
    return float(acc[ok[-1]]) if ok.size else math.nan


def idle_share(idle_time, round_time) -> float:
    """Share of the workers' round time spent waiting: sum idle / sum(round_time * workers)."""
    idle = np.asarray(idle_time, dtype=float)
    rt = np.asarray(round_time, dtype=float)
    total = float(rt.sum()) * idle.shape[1]
    return float(idle.sum()) / total if total > 0 else math.nan


def final_accuracy(accuracy) -> float:
    acc = np.asarray(accuracy, dtype=float)
    acc = acc[np.isfinite(acc)]
    return float(acc[-1]) if acc.size else math.nan


def targets_for(results: list[RunResult], explicit: float | None) -> dict[tuple, float]:
    """The accuracy target per (fleet, partition, seed): ``explicit`` if given, else FedAvg's final
    accuracy of the same fleet, partition and seed, else nan."""
    fedavg = {(r.fleet, r.partition, r.seed): final_accuracy(r.metrics["test_accuracy"]) for r in results if r.strategy == "fedavg"}
    keys = {(r.fleet, r.partition, r.seed) for r in results}
    if explicit is not None:
        return {k: float(explicit) for k in keys}
    return {k: fedavg.get(k, math.nan) for k in keys}


RESULT_COLUMNS = [
    "fleet", "partition", "strategy", "seed", "rounds", "final_accuracy", "best_accuracy", "target_accuracy",
    "time_to_target", "median_round_time", "median_virtual_round_time", "idle_share", "bytes_per_round",
    "accuracy_at_budget", "wall_clock", "run_dir",
]


def clock_of(r: RunResult, clock: str) -> np.ndarray:
    """Cumulative time at the end of each round: wall (metrics/wall_clock) or virtual
    (the cumulative sum of metrics/virtual_time, each round's slowest worker)."""
    if clock == "virtual":
        return np.cumsum(np.asarray(r.metrics["virtual_time"], dtype=float))
    return np.asarray(r.metrics["wall_clock"], dtype=float)


def result_row(r: RunResult, target: float, budget: float | None, clock: str = "wall") -> dict:
    m, w = r.metrics, r.workers
    acc = np.asarray(m["test_accuracy"], dtype=float)
    t = clock_of(r, clock)
    return {
        "fleet": r.fleet,
        "partition": r.partition,
        "strategy": r.strategy,
        "seed": r.seed,
        "rounds": r.rounds,
        "final_accuracy": final_accuracy(acc),
        "best_accuracy": float(np.nanmax(acc)) if np.isfinite(acc).any() else math.nan,
        "target_accuracy": target,
        "time_to_target": time_to_target(acc, t, target),
        "median_round_time": float(np.median(m["round_time"])),
        "median_virtual_round_time": float(np.median(m["virtual_time"])),
        "idle_share": idle_share(w["idle_time"], m["round_time"]),
        "bytes_per_round": float(np.mean(np.asarray(w["bytes_sent"], dtype=float).sum(axis=1))),
        "accuracy_at_budget": accuracy_at_budget(acc, t, budget),
        "wall_clock": float(m["wall_clock"][-1]),
        "run_dir": r.run_dir,
    }


def result_rows(results: list[RunResult], target_accuracy: float | None = None, budget: float | None = None,
                clock: str = "wall") -> list[dict]:
    targets = targets_for(results, target_accuracy)
    return [result_row(r, targets[(r.fleet, r.partition, r.seed)], budget, clock) for r in results]


def _mean(values) -> float:
    v = np.asarray([x for x in values if math.isfinite(x)], dtype=float)
    return float(v.mean()) if v.size else math.nan


SUMMARY_COLUMNS = [
    "fleet", "partition", "strategy", "seeds", "final_accuracy_mean", "final_accuracy_std", "final_accuracy_min",
    "final_accuracy_max", "best_accuracy_mean", "time_to_target_mean", "target_reached", "median_round_time",
    "speedup_vs_fedavg", "median_virtual_round_time", "virtual_speedup_vs_fedavg", "idle_share", "bytes_per_round",
    "accuracy_at_budget_mean",
]


def summarize(rows: list[dict], strategy_order: list[str] | None = None) -> list[dict]:
    """Aggregate the per-run rows over seeds: one row per fleet, partition and strategy.
    Round times are the mean over seeds of each run's median; the speedups are FedAvg's over the strategy's."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault((row["fleet"], row["partition"], row["strategy"]), []).append(row)
    order = list(strategy_order or [])
    order += [s for s in dict.fromkeys(k[2] for k in groups) if s not in order]
    cells = list(dict.fromkeys((k[0], k[1]) for k in groups))
    out = []
    for fleet, part in cells:
        base = groups.get((fleet, part, "fedavg"))
        base_rt = _mean(r["median_round_time"] for r in base) if base else math.nan
        base_vt = _mean(r["median_virtual_round_time"] for r in base) if base else math.nan
        for strategy in order:
            g = groups.get((fleet, part, strategy))
            if not g:
                continue
            final = np.asarray([r["final_accuracy"] for r in g], dtype=float)
            ttt = [r["time_to_target"] for r in g]
            rt = _mean(r["median_round_time"] for r in g)
            vt = _mean(r["median_virtual_round_time"] for r in g)
            out.append({
                "fleet": fleet,
                "partition": part,
                "strategy": strategy,
                "seeds": len(g),
                "final_accuracy_mean": float(np.mean(final)),
                "final_accuracy_std": float(np.std(final, ddof=1)) if len(final) > 1 else 0.0,
                "final_accuracy_min": float(np.min(final)),
                "final_accuracy_max": float(np.max(final)),
                "best_accuracy_mean": _mean(r["best_accuracy"] for r in g),
                "time_to_target_mean": _mean(ttt),
                "target_reached": sum(1 for t in ttt if math.isfinite(t)),
                "median_round_time": rt,
                "speedup_vs_fedavg": base_rt / rt if rt > 0 else math.nan,
                "median_virtual_round_time": vt,
                "virtual_speedup_vs_fedavg": base_vt / vt if vt > 0 else math.nan,
                "idle_share": _mean(r["idle_share"] for r in g),
                "bytes_per_round": _mean(r["bytes_per_round"] for r in g),
                "accuracy_at_budget_mean": _mean(r["accuracy_at_budget"] for r in g),
            })
    return out


def _csv_cell(value) -> str:
    if isinstance(value, float):
        return "" if not math.isfinite(value) else f"{value:.6g}"
    return str(value)


def to_csv(rows: list[dict], columns: list[str]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(columns)
    for row in rows:
        w.writerow([_csv_cell(row.get(c, "")) for c in columns])
    return buf.getvalue()


def _pct(x: float) -> str:
    return f"{x:.2%}" if math.isfinite(x) else "–"


def _secs(x: float) -> str:
    if not math.isfinite(x):
        return "–"
    return f"{x:.3f} s" if x < 10 else f"{x:.1f} s"


def _times(x: float) -> str:
    return f"{x:.2f}×" if math.isfinite(x) else "–"


def _mb(x: float) -> str:
    return f"{x / 1e6:.2f}" if math.isfinite(x) else "–"


def summary_markdown(summary: list[dict], header: dict, *, budget: float | None, failures: list[str] = (), plots: dict | None = None,
                     clock: str = "wall") -> str:
    """The Markdown report: a header (command, date, host), then one table per fleet/partition."""
    lines = ["# elfish-mpi bench", ""]
    for key, value in header.items():
        lines.append(f"- **{key}**: {value}")
    lines.append("")
    lines += [
        "Final accuracy: test accuracy after the last round (mean ± sample std over seeds). "
        f"Time to target ({clock} clock): {'wall-clock' if clock == 'wall' else 'cumulative virtual'} seconds of training until the test accuracy first reached the target "
        "(mean over the seeds that reached it; reached/seeds in brackets). Round times: median over rounds, "
        "mean over seeds; virtual: the slowest worker's CPU time / capacity. Speedup: FedAvg's median round "
        "time / the strategy's. Idle share: worker time spent waiting for the round to end. MB/round: "
        "update payload sent to rank 0 by all workers, per round.",
        "",
    ]
    cells = list(dict.fromkeys((s["fleet"], s["partition"]) for s in summary))
    for fleet, part in cells:
        lines += [f"## fleet `{fleet}`, partition `{part}`", ""]
        cols = ["strategy", "seeds", "final accuracy", "time to target", "median round", "speedup",
                "median virtual round", "virtual speedup", "idle share", "MB/round"]
        if budget is not None:
            cols.append(f"accuracy at {budget:g} s ({clock})")
        lines.append("| " + " | ".join(cols) + " |")
        lines.append("|" + "|".join(["---"] + ["---:"] * (len(cols) - 1)) + "|")
        for s in summary:
            if (s["fleet"], s["partition"]) != (fleet, part):
                continue
            acc = _pct(s["final_accuracy_mean"])
            if s["seeds"] > 1:
                acc += f" ± {s['final_accuracy_std'] * 100:.2f}"
            ttt = _secs(s["time_to_target_mean"]) if s["target_reached"] else "not reached"
            ttt += f" ({s['target_reached']}/{s['seeds']})"
            cells_ = [
                s["strategy"], str(s["seeds"]), acc, ttt, _secs(s["median_round_time"]), _times(s["speedup_vs_fedavg"]),
                _secs(s["median_virtual_round_time"]), _times(s["virtual_speedup_vs_fedavg"]), _pct(s["idle_share"]),
                _mb(s["bytes_per_round"]),
            ]
            if budget is not None:
                cells_.append(_pct(s["accuracy_at_budget_mean"]))
            lines.append("| " + " | ".join(cells_) + " |")
        lines.append("")
        if plots and (fleet, part) in plots:
            lines += [f"![{name}]({name})" for name in plots[(fleet, part)]]
            lines.append("")
    if failures:
        lines += ["## Failed runs", ""]
        lines += [f"- {f}" for f in failures]
        lines.append("")
    return "\n".join(lines)


# --------------------------------------------------------------------------- #
# plots (pure: results in, PNG out)
# --------------------------------------------------------------------------- #


def strategy_colors(strategies: list[str]) -> dict[str, str]:
    palette = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22", "#7f7f7f"]
    return {s: palette[i % len(palette)] for i, s in enumerate(strategies)}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def curve_over_seeds(results: list[RunResult], axis: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(x, mean, min, max) over seeds, aligned by round: x is the mean over seeds of the cumulative
    time at the end of each evaluated round (``axis`` wall: metrics/wall_clock; virtual: cumsum of
    metrics/virtual_time); the accuracy's mean, min and max are taken at that round."""
    n = min(r.rounds for r in results)
    xs, accs = [], []
    for r in results:
        if axis == "wall":
            x = np.asarray(r.metrics["wall_clock"], dtype=float)[:n]
        elif axis == "virtual":
            x = np.cumsum(np.asarray(r.metrics["virtual_time"], dtype=float))[:n]
        else:
            raise ValueError(f"axis must be 'wall' or 'virtual', not {axis!r}")
        xs.append(x)
        accs.append(np.asarray(r.metrics["test_accuracy"], dtype=float)[:n])
    xs, accs = np.vstack(xs), np.vstack(accs)
    ok = np.isfinite(accs).all(axis=0)
    return xs.mean(axis=0)[ok], accs.mean(axis=0)[ok], accs.min(axis=0)[ok], accs.max(axis=0)[ok]


def plot_accuracy(results: list[RunResult], axis: str, path: str | Path, *, title: str = "",
                  colors: dict[str, str] | None = None, target: float | None = None, target_label: str = "target") -> Path:
    """Test accuracy against wall-clock or virtual time: per strategy the mean over seeds with a
    min–max band."""
    plt = _pyplot()
    by_strategy: dict[str, list[RunResult]] = {}
    for r in results:
        by_strategy.setdefault(r.strategy, []).append(r)
    colors = colors or strategy_colors(list(by_strategy))
    order = [s for s in colors if s in by_strategy] + [s for s in by_strategy if s not in colors]
    fig, ax = plt.subplots(figsize=(8, 5), dpi=120)
    for strategy in order:
        runs = by_strategy[strategy]
        x, mean, lo, hi = curve_over_seeds(runs, axis)
        c = colors.get(strategy, "black")
        seeds_note = f", {len(runs)} seeds" if len(runs) > 1 else ""
        label = f"{strategy} (final {mean[-1]:.1%}{seeds_note})" if mean.size else strategy
        if len(runs) > 1:
            ax.fill_between(x, lo * 100, hi * 100, color=c, alpha=0.18, linewidth=0)
        ax.plot(x, mean * 100, color=c, marker="o", markersize=3.5, linewidth=1.8, label=label)
    if target is not None and math.isfinite(target):
        ax.axhline(target * 100, color="grey", linestyle=":", linewidth=1, label=f"{target_label} {target:.1%}")
    if axis == "wall":
        ax.set_xlabel("wall-clock time since training started (s)")
    else:
        ax.set_xlabel("cumulative virtual time (s): per round, the slowest worker's CPU time / capacity")
    ax.set_ylabel("test accuracy (%)")
    ax.set_xlim(left=0)
    ax.grid(True, alpha=0.3)
    seeds = sorted({r.seed for r in results})
    note = f"mean over {len(seeds)} seeds per round, band: min–max accuracy over the seeds" if len(seeds) > 1 else f"seed {seeds[0]}" if seeds else ""
    what = "wall-clock time" if axis == "wall" else "virtual time"
    ax.set_title(f"Test accuracy vs {what}" + (f" — {title}" if title else "") + (f"\n({note})" if note else ""))
    ax.legend(loc="lower right")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path


def timeline_panels(results: list[RunResult]) -> list[RunResult]:
    """The runs drawn by :func:`plot_timeline`: FedAvg then ELFISH (each its lowest seed); when
    neither ran, the first two strategies."""
    first: dict[str, RunResult] = {}
    for r in sorted(results, key=lambda r: r.seed):
        first.setdefault(r.strategy, r)
    chosen = [first[s] for s in ("fedavg", "elfish") if s in first]
    return chosen or list(first.values())[:2]


def _capacities(r: RunResult) -> list[float] | None:
    try:
        return Config.from_dict(r.config).capacities(r.num_workers)
    except Exception:  # a config from another version: leave the capacities out
        return None


def plot_timeline(panels: list[RunResult], rounds: int, path: str | Path, *, title: str = "",
                  colors: dict[str, str] | None = None) -> Path:
    """Per-worker Gantt chart of the first ``rounds`` rounds, one panel per run (same x scale):
    a round starts where the previous round's round_time ended; each worker's bar is busy
    (coloured, from the round start) then idle (grey, hatched) until the round ends."""
    plt = _pyplot()
    from matplotlib.patches import Patch

    if not panels:
        raise ValueError("plot_timeline needs at least one run")
    colors = colors or strategy_colors([r.strategy for r in panels])
    heights = [max(r.num_workers, 1) for r in panels]
    fig, axes = plt.subplots(
        len(panels), 1, sharex=True, squeeze=False, dpi=120, layout="constrained",
        figsize=(11, 1.6 + sum(0.5 * h + 0.9 for h in heights)),
        gridspec_kw={"height_ratios": [h + 1.2 for h in heights]},
    )
    def span(r):
        rt = np.asarray(r.metrics["round_time"], dtype=float)[: min(rounds, r.rounds)]
        return float(rt.sum())

    xmax = max(span(r) for r in panels) or 1.0
    for ax, r in zip(axes[:, 0], panels):
        n = min(rounds, r.rounds)
        rt = np.asarray(r.metrics["round_time"], dtype=float)[:n]
        starts = np.concatenate([[0.0], np.cumsum(rt)[:-1]])
        busy = np.minimum(np.asarray(r.workers["busy_time"], dtype=float)[:n], rt[:, None])
        keep = np.asarray(r.workers["keep_ratio"], dtype=float)[:n] if "keep_ratio" in r.workers else None
        soft = keep is not None and bool((keep < 0.995).any())
        end = float(starts[-1] + rt[-1]) if n else 0.0
        caps = _capacities(r)
        color = colors.get(r.strategy, "#1f77b4")
        workers = r.num_workers
        for w in range(workers):
            y = workers - 1 - w  # worker 1 on top
            ax.broken_barh([(starts[i], busy[i, w]) for i in range(n)], (y - 0.35, 0.7),
                           facecolors=color, edgecolors="white", linewidth=0.5)
            ax.broken_barh([(starts[i] + busy[i, w], rt[i] - busy[i, w]) for i in range(n)], (y - 0.35, 0.7),
                           facecolors="#e6e6e6", edgecolors="#9a9a9a", hatch="///", linewidth=0.5)
            if soft:  # the keep ratio inside each busy bar wide enough to hold it
                for i in range(n):
                    wide = busy[i, w] / xmax
                    text = f"keep {keep[i, w]:.2f}" if wide > 0.075 else f"{keep[i, w]:.2f}" if wide > 0.025 else ""
                    if text:
                        ax.text(starts[i] + busy[i, w] / 2, y, text, ha="center", va="center", fontsize=7, color="white")
        for i in range(n):
            ax.axvline(starts[i], color="black", linewidth=0.8, alpha=0.5)
            wide = rt[i] / xmax
            text = f"round {i + 1}" if wide > 0.06 else f"{i + 1}" if wide > 0.015 else ""
            if text:
                ax.text(starts[i] + rt[i] / 2, workers - 0.45, text, ha="center", va="bottom", fontsize=8)
        ax.axvline(end, color="black", linewidth=0.8, alpha=0.5)
        ax.set_yticks(range(workers))
        labels = [f"worker {w + 1}" + (f" (capacity {caps[w]:g})" if caps else "") for w in range(workers)]
        ax.set_yticklabels(list(reversed(labels)))
        ax.set_ylim(-0.6, workers + 0.1)
        idle = idle_share(np.asarray(r.workers["idle_time"], dtype=float)[:n], rt) if n else math.nan
        what = "numbers in the bars: keep ratio (share of the model trained)" if soft else "full model on every worker"
        ax.set_title(f"{r.strategy} (seed {r.seed}): {n} rounds in {end:.2f} s, idle share {idle:.0%}; {what}", fontsize=10)
        ax.grid(True, axis="x", alpha=0.3)
    axes[-1, 0].set_xlim(0, xmax * 1.01)
    axes[-1, 0].set_xlabel("wall-clock time since the first round started (s)")
    handles = [Patch(facecolor=colors.get(r.strategy, "#1f77b4"), label=f"busy: {r.strategy} training") for r in panels]
    handles.append(Patch(facecolor="#e6e6e6", edgecolor="#9a9a9a", hatch="///", label="idle: waiting for the round to end"))
    fig.suptitle("Per-worker timeline of the first rounds" + (f" — {title}" if title else ""), fontsize=12)
    fig.legend(handles=handles, loc="outside lower center", ncol=len(handles), fontsize=9)
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path


def write_plots(results: list[RunResult], out: Path, *, prefix: str = "", title: str = "", timeline_rounds: int = 5,
                colors: dict[str, str] | None = None, target: float | None = None, target_label: str = "target") -> list[str]:
    """The three PNGs for one fleet/partition; returns their file names."""
    names = []
    for axis, name in (("wall", "accuracy_vs_wall.png"), ("virtual", "accuracy_vs_virtual.png")):
        plot_accuracy(results, axis, out / f"{prefix}{name}", title=title, colors=colors, target=target,
                      target_label=target_label)
        names.append(f"{prefix}{name}")
    panels = timeline_panels(results)
    if panels:
        plot_timeline(panels, timeline_rounds, out / f"{prefix}timeline.png", title=title, colors=colors)
        names.append(f"{prefix}timeline.png")
    return names


# --------------------------------------------------------------------------- #
# command line
# --------------------------------------------------------------------------- #


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="elfish-mpi bench",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Run several strategies on the same config and seeds (one MPI job each, one after the other) "
        "and compare them: results.csv, summary.md, summary.csv and plots in --out.",
        epilog="A strategy NAME-naive (e.g. elfish-naive) runs NAME with strategy.aggregation=naive.\n"
        "Runs already finished in --out are skipped and unfinished ones resumed, so the same command continues "
        "an interrupted bench.\nExit status: 0 all runs finished, 1 a run failed, 2 bad arguments or config.",
    )
    p.add_argument("--config", help="TOML config of every run (default: the built-in defaults plus --set)")
    p.add_argument("--strategies", required=True, help="comma-separated strategies, e.g. fedavg,elfish,elfish-naive")
    p.add_argument("--out", required=True, help="bench directory: runs/, results.csv, summary.*, *.png")
    p.add_argument("-n", "--np", dest="np", type=int, required=True, help="MPI ranks per run (1 aggregator + workers)")
    p.add_argument("--seeds", default="0", help="comma-separated seeds (default: 0)")
    p.add_argument("--fleets", help="comma-separated workers.fleet presets (default: the config's workers)")
    p.add_argument("--partitions", help="comma-separated data.partition values (default: the config's)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="override a config value in every run (repeatable)")
    p.add_argument("--target-accuracy", type=float, help="accuracy (0..1) for time-to-target; default: FedAvg's final accuracy of the same fleet, partition and seed")
    p.add_argument("--launcher", default="mpiexec", help="MPI launcher command, given -n NP (default: mpiexec, looked up next to python first)")
    p.add_argument("--time-budget", type=float, help="seconds (of --clock): also report the accuracy reached within this budget")
    p.add_argument("--clock", choices=("wall", "virtual"), default="wall",
                   help="time axis of time-to-target and --time-budget: wall clock, or cumulative virtual time "
                        "(each round's slowest worker's CPU time / capacity; robust on a shared machine)")
    p.add_argument("--timeline-rounds", type=int, default=5, help="rounds shown in timeline.png (default: 5)")
    p.add_argument("--run-timeout", type=float, default=3600.0, help="seconds one run may take before it is killed (default: 3600)")
    return p


def _header(argv: list[str], np_: int, runs: list[RunSpec], target: float | None) -> dict:
    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        affinity = os.cpu_count()
    rounds = sorted({r.rounds for r in runs})
    return {
        "command": f"`elfish-mpi bench {shlex.join(argv)}`",
        "date": _dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M:%S %Z"),
        "host": f"{platform.node()}, {os.cpu_count()} cores ({affinity} usable), Python {platform.python_version()}",
        "runs": f"{len(runs)} × {np_} MPI ranks ({np_ - 1} workers), {'/'.join(map(str, rounds))} rounds each",
        "target accuracy": f"{target:.2%}" if target is not None else "FedAvg's final accuracy of the same fleet, partition and seed",
    }


def main(argv: list[str]) -> int:
    argv = list(argv)
    parser = build_parser()
    try:
        try:
            args = parser.parse_args(argv)
        except SystemExit as exc:  # --help
            return int(exc.code or 0)
        if args.np < 2:
            raise BenchUsageError("-n must be at least 2 (rank 0 aggregates, the others train)")
        try:
            import matplotlib  # noqa: F401  (the plots; checked before any run starts)
        except ImportError:
            raise BenchUsageError('the bench draws its plots with matplotlib: pip install -e ".[bench]"') from None
        if args.timeline_rounds < 1:
            raise BenchUsageError("--timeline-rounds must be >= 1")
        if args.run_timeout <= 0:
            raise BenchUsageError("--run-timeout must be > 0")
        if args.target_accuracy is not None and not 0 <= args.target_accuracy <= 1:
            raise BenchUsageError("--target-accuracy is a fraction in 0..1 (e.g. 0.7)")
        strategies = _split_list(args.strategies)
        seeds = parse_seeds(args.seeds)
        fleets, partitions = _split_list(args.fleets), _split_list(args.partitions)
        out = Path(args.out)
        runs = plan_runs(config=args.config, strategies=strategies, seeds=seeds, fleets=fleets, partitions=partitions,
                         sets=args.set, out=out, num_workers=args.np - 1)
        launcher = resolve_launcher(args.launcher)
    except (BenchUsageError, ConfigError) as exc:
        parser.print_usage(sys.stderr)
        print(f"elfish-mpi bench: error: {exc}", file=sys.stderr)
        return 2

    out.mkdir(parents=True, exist_ok=True)
    progress = Progress(len(runs))
    progress.message(
        f"bench: {len(runs)} runs ({len({r.fleet for r in runs})} fleet(s) x {len({r.partition for r in runs})} "
        f"partition(s) x {len(strategies)} strategies x {len(seeds)} seed(s)), {args.np} ranks each, into {out}"
    )
    outcomes: list[RunOutcome] = []
    try:
        for i, run in enumerate(runs, 1):
            status, detail = checkpoint_state(run)
            if status == "done":
                progress.message(f"[{i}/{len(runs)}] {run.label}: finished earlier ({detail}), skipped")
                outcomes.append(RunOutcome(run, "skipped", detail))
                continue
            if status == "conflict":
                progress.message(f"[{i}/{len(runs)}] {run.label}: FAILED: {detail}")
                outcomes.append(RunOutcome(run, "failed", detail))
                continue
            if status == "partial":
                progress.message(f"[{i}/{len(runs)}] {run.label}: resuming ({detail})")
            cmd = train_command(run, launcher, args.np, args.config, resume=status == "partial")
            outcome = execute(run, cmd, progress, i, args.run_timeout)
            if outcome.status == "failed":
                progress.message(f"  {run.label} failed: {outcome.detail.rstrip()}\n  (logs in {run.run_dir})")
            outcomes.append(outcome)
    except KeyboardInterrupt:
        progress.message("bench: interrupted; run the same command again to continue where it stopped")
        return 130

    finished = [o.run for o in outcomes if o.status in ("done", "skipped")]
    failures = [f"{o.run.label}: {o.detail.strip().splitlines()[0] if o.detail.strip() else 'failed'} (logs in {o.run.run_dir})"
                for o in outcomes if o.status == "failed"]
    results = []
    for run in finished:
        try:
            results.append(load_result(run))
        except Exception as exc:  # a checkpoint that went bad since: report, go on
            failures.append(f"{run.label}: cannot read its checkpoint: {exc}")
    if results:
        write_reports(results, out, argv=argv, np_=args.np, runs=runs, strategies=strategies,
                      target_accuracy=args.target_accuracy, budget=args.time_budget, clock=args.clock,
                      timeline_rounds=args.timeline_rounds, failures=failures)
        progress.message(f"bench: wrote {out / 'results.csv'}, {out / 'summary.md'}, {out / 'summary.csv'} and the plots")
    if failures:
        progress.message(f"bench: {len(failures)} of {len(runs)} runs failed:\n  " + "\n  ".join(failures))
        return 1
    return 0


def write_reports(results: list[RunResult], out: Path, *, argv: list[str], np_: int, runs: list[RunSpec],
                  strategies: list[str], target_accuracy: float | None, budget: float | None,
                  timeline_rounds: int, failures: list[str], clock: str = "wall") -> None:
    rows = result_rows(results, target_accuracy, budget, clock)
    write_text_atomic(out / "results.csv", to_csv(rows, RESULT_COLUMNS))
    summary = summarize(rows, strategies)
    write_text_atomic(out / "summary.csv", to_csv(summary, SUMMARY_COLUMNS))
    colors = strategy_colors(strategies)
    cells = list(dict.fromkeys((r.fleet, r.partition) for r in results))
    several = len(cells) > 1
    plots = {}
    for fleet, part in cells:
        cell = [r for r in results if (r.fleet, r.partition) == (fleet, part)]
        targets = {row["target_accuracy"] for row in rows if (row["fleet"], row["partition"]) == (fleet, part)}
        target = targets.pop() if len(targets) == 1 else None
        plots[(fleet, part)] = write_plots(
            cell, out, prefix=f"{fleet}_{part}_" if several else "", title=f"fleet {fleet}, {part} partition",
            timeline_rounds=timeline_rounds, colors=colors, target=target,
            target_label="target" if target_accuracy is not None else "target (FedAvg's final accuracy)",
        )
    md = summary_markdown(summary, _header(argv, np_, runs, target_accuracy), budget=budget, failures=failures, plots=plots,
                          clock=clock)
    write_text_atomic(out / "summary.md", md)
