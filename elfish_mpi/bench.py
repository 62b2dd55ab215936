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
import datetime as _dt
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
from dataclasses import dataclass
from pathlib import Path


from . import analysis
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
    """Progress of a bench: on a terminal a tqdm bar per run (rounds done, accuracy, elapsed and
    remaining time); otherwise (a log file, CI) plain lines when a run starts and ends, and
    messages. Every line goes through tqdm.write, so bars and lines do not overwrite each other."""

    def __init__(self, total: int, stream=None, tty: bool | None = None):
        self.total = total
        self.stream = stream if stream is not None else sys.stdout
        self.tty = self.stream.isatty() if tty is None else tty
        self.bar = None

    def line(self, i: int, run: RunSpec, rnd: int, rounds: int, acc: float | None, elapsed: float, state: str = "") -> str:
        acc_s = f"{acc:6.2%}" if acc is not None and math.isfinite(acc) else "   -  "
        head = f"[{i}/{self.total}] {run.fleet}/{run.partition} {run.strategy} seed {run.seed}"
        text = f"{head}  round {rnd}/{rounds}  acc {acc_s}  {_fmt_elapsed(elapsed)}"
        return f"{text}  {state}" if state else text

    def start(self, i: int, run: RunSpec) -> None:
        from tqdm import tqdm

        self.close()
        if self.tty:
            self.bar = tqdm(total=run.rounds, desc=f"[{i}/{self.total}] {run.fleet}/{run.partition} {run.strategy} seed {run.seed}",
                            unit="round", file=self.stream, leave=False, dynamic_ncols=True, mininterval=0.5)
        else:
            self.message(self.line(i, run, 0, run.rounds, None, 0.0, "starting"))

    def round(self, rnd: int, rounds: int, acc: float | None) -> None:
        if self.bar is not None:
            self.bar.total = rounds
            self.bar.n = rnd
            if acc is not None and math.isfinite(acc):
                self.bar.set_postfix_str(f"acc {acc:.2%}", refresh=False)
            self.bar.refresh()

    def tick(self) -> None:
        if self.bar is not None:
            self.bar.refresh()  # (the elapsed time moves on a terminal)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def end(self, text: str) -> None:
        self.close()
        self.message(text)

    def message(self, text: str) -> None:
        from tqdm import tqdm

        tqdm.write(text, file=self.stream)
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
        progress.start(index, run)
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
                        progress.round(state["round"], state["rounds"], state["acc"])
                        continue
                elapsed = time.monotonic() - t0
                progress.tick()
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
            progress.close()
            raise
        proc.wait()
        reader.join(timeout=5)
    elapsed = time.monotonic() - t0
    final = progress.line(index, run, state["round"], state["rounds"], state["acc"], elapsed)
    if timed_out:
        progress.end(final + f"  FAILED (over --run-timeout {timeout:g}s)")
        return RunOutcome(run, "failed", f"killed after {timeout:g} s (--run-timeout)\n{_tail(err_log)}", elapsed)
    if proc.returncode != 0:
        progress.end(final + f"  FAILED (exit {proc.returncode})")
        return RunOutcome(run, "failed", f"exit status {proc.returncode}\n{_tail(err_log)}", elapsed)
    status, detail = checkpoint_state(run)
    if status != "done":
        progress.end(final + "  FAILED (no finished checkpoint)")
        what = {"new": "no checkpoint", "partial": f"an unfinished checkpoint ({detail})"}.get(status, detail)
        return RunOutcome(run, "failed", f"the job exited with status 0 but left {what} in {run.run_dir}\n{_tail(err_log)}", elapsed)
    progress.end(final + "  done")
    return RunOutcome(run, "done", "", elapsed)


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
                        "(each round's slowest client's CPU time / capacity; robust on a shared machine)")
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
            results.append(analysis.open_run(run.run_dir, rounds=run.rounds, fleet=run.fleet, partition=run.partition,
                                             strategy=run.strategy, seed=run.seed, label=run.label))
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


def write_reports(results: list, out: Path, *, argv: list[str], np_: int, runs: list[RunSpec],
                  strategies: list[str], target_accuracy: float | None, budget: float | None,
                  timeline_rounds: int, failures: list[str], clock: str = "wall") -> None:
    """results.csv, summary.csv and summary.md (analysis.py's tables) and the plots (report.py)."""
    from . import report

    rows = analysis.results_table(results, target_accuracy, budget, clock)
    write_text_atomic(out / "results.csv", analysis.to_csv(rows, analysis.RESULT_COLUMNS))
    summary = analysis.summarize(rows, strategies)
    write_text_atomic(out / "summary.csv", analysis.to_csv(summary, analysis.SUMMARY_COLUMNS))
    colors = report.strategy_colors(strategies)
    cells = list(dict.fromkeys((r.fleet, r.partition) for r in results))
    several = len(cells) > 1
    plots = {}
    for fleet, part in cells:
        cell = [r for r in results if (r.fleet, r.partition) == (fleet, part)]
        targets = set(rows.loc[(rows["fleet"] == fleet) & (rows["partition"] == part), "target_accuracy"].tolist())
        target = targets.pop() if len(targets) == 1 else None
        plots[(fleet, part)] = report.write_plots(
            cell, out, prefix=f"{fleet}_{part}_" if several else "", title=f"fleet {fleet}, {part} partition",
            timeline_rounds=timeline_rounds, colors=colors, target=target,
            target_label="target" if target_accuracy is not None else "target (FedAvg's final accuracy)",
        )
    md = analysis.summary_markdown(summary, _header(argv, np_, runs, target_accuracy), budget=budget, failures=failures,
                                   plots=plots, clock=clock)
    write_text_atomic(out / "summary.md", md)
