"""Analysis of finished (or running) jobs from their HDF5 checkpoints, as pandas DataFrames.

    from elfish_mpi import analysis
    run = analysis.open_run("runs/quickstart")       # a run directory or a checkpoint file
    run.metrics                  # one row per round (index: round): test_accuracy, round_time, ...
    run.workers                  # one row per round and client taking part: round, worker, client, rank, keep_ratio, ...
    run.per_worker("busy_time")  # the same as a (rounds, clients a round) array
    run.coverage["conv1"]        # how often each neuron of a group was trained
    run.masks(3)                 # per client of round 3 (column), the kept neurons of every group
    table = analysis.results_table([run, analysis.open_run("runs/fedavg")])   # one row per run

Every checkpoint ``format_version`` the program can resume is read (checkpoint.read); any
other is refused with a message that says so. ``elfish-mpi report``, ``evaluate`` and
``bench`` read runs through this module; the tables (a row per run, a summary per strategy
over seeds) are made here with pandas, the plots in report.py.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from . import checkpoint as ckptmod


@dataclass
class Run:
    """One run's records. ``fleet``, ``partition``, ``strategy`` and ``seed`` label it in tables
    (from the run's config unless given); ``label`` names it in plots."""

    metrics: pd.DataFrame
    workers: pd.DataFrame
    strategy: str
    seed: int
    fleet: str = ""
    partition: str = ""
    config: dict = field(default_factory=dict)
    run_dir: str = ""
    label: str = ""
    checkpoint: ckptmod.Checkpoint | None = None
    path: str = ""

    @property
    def rounds(self) -> int:
        return int(len(self.metrics))

    @property
    def num_workers(self) -> int:
        return int(self.workers["worker"].nunique()) if len(self.workers) else 0

    def per_worker(self, name: str) -> np.ndarray:
        """``/workers/<name>`` as a (rounds, workers) float array."""
        if name not in self.workers:
            raise KeyError(f"{self.label or self.run_dir}: no per-worker record {name!r}")
        table = self.workers.pivot(index="round", columns="worker", values=name)
        return table.to_numpy(dtype=float)

    @property
    def model_config(self) -> dict:
        """The run's ``[model]`` section (``name`` from the checkpoint's ``model`` attribute where
        it has one), as ``models.spec_of`` takes it."""
        model = dict(self.config.get("model", {}) if isinstance(self.config, dict) else {})
        attrs = self.checkpoint.attrs if self.checkpoint is not None else {}
        model["name"] = str(attrs.get("model") or model.get("name", "lenet"))
        return model

    def has(self, name: str) -> bool:
        return name in self.workers or name in self.metrics

    def clock(self, kind: str = "wall") -> np.ndarray:
        """Time at the end of each round: ``wall`` (metrics/wall_clock) or ``virtual`` (the
        cumulative sum of metrics/virtual_time, each round's slowest worker)."""
        if kind == "virtual":
            return np.cumsum(self.metrics["virtual_time"].to_numpy(dtype=float))
        if kind == "wall":
            return self.metrics["wall_clock"].to_numpy(dtype=float)
        raise ValueError(f"the clock is 'wall' or 'virtual', not {kind!r}")

    @property
    def coverage(self) -> dict[str, np.ndarray]:
        return {} if self.checkpoint is None else dict(self.checkpoint.coverage)

    @property
    def profiles(self) -> dict[str, np.ndarray]:
        return {} if self.checkpoint is None else dict(self.checkpoint.profiles)

    def masks(self, round: int) -> list[dict[str, np.ndarray]]:
        """Per worker, the sorted kept neurons of every group in ``round`` (as recorded)."""
        ck = ckptmod.read(self.path, load_masks=True)
        if round not in ck.masks:
            raise KeyError(f"{self.path}: no masks of round {round} (rounds {min(ck.masks, default=0)}..{max(ck.masks, default=0)})")
        return ck.masks[round]

    @classmethod
    def from_arrays(cls, metrics: dict, workers: dict, *, strategy: str, seed: int = 0, **kw) -> "Run":
        """A run from arrays: ``metrics`` name -> (rounds,), ``workers`` name -> (rounds, workers)."""
        m = pd.DataFrame({k: np.asarray(v) for k, v in metrics.items()})
        rounds = np.asarray(metrics["round"], dtype=np.int64) if "round" in metrics else np.arange(1, len(m) + 1)
        m.index = pd.Index(rounds, name="round")
        m = m.drop(columns="round", errors="ignore")
        return cls(m, _long(workers, rounds), strategy=strategy, seed=int(seed), **kw)


def _long(workers: dict, rounds: np.ndarray) -> pd.DataFrame:
    """(rounds, slots) arrays -> one row per round and slot (columns round, worker, client,
    rank, ...). A slot is one client taking part in the round; ``worker`` is its column (with one
    client pinned to each rank, all taking part, the worker rank - 1), ``client`` and ``rank``
    come from /workers/client and /workers/rank (older checkpoints: the column and column + 1)."""
    arrays = {k: np.asarray(v, dtype=float) for k, v in workers.items() if np.asarray(v).ndim == 2}
    if not arrays:
        return pd.DataFrame(columns=["round", "worker", "client", "rank"])
    n, w = next(iter(arrays.values())).shape
    frame = {"round": np.repeat(rounds[:n], w), "worker": np.tile(np.arange(w), n)}
    for name, default in (("client", np.tile(np.arange(w), n)), ("rank", np.tile(np.arange(1, w + 1), n))):
        given = arrays.pop(name, None)
        if given is not None and given.shape == (n, w):
            flat = given[:n].reshape(-1)
            default = np.where(np.isfinite(flat), flat, default).astype(np.int64)  # (rounds before clients: NaN)
        frame[name] = default
    frame.update({k: v[:n].reshape(-1) for k, v in arrays.items() if v.shape == (n, w)})
    return pd.DataFrame(frame)


def checkpoint_path(path: str | Path) -> Path:
    p = Path(path)
    return p / ckptmod.LATEST_NAME if p.is_dir() else p


def open_run(path: str | Path, *, rounds: int | None = None, label: str = "", **tags) -> Run:
    """A run from its directory (its ``checkpoint.h5``) or a checkpoint file; ``rounds``
    truncates the records (a bench's run may hold more rounds than the bench asked for)."""
    file = checkpoint_path(path)
    ck = ckptmod.read(file, load_masks=False)
    n = ck.round if rounds is None else min(ck.round, int(rounds))
    metrics = {k: np.asarray(v)[:n] for k, v in ck.metrics.items() if np.asarray(v).ndim == 1}
    metrics.setdefault("round", np.arange(1, n + 1))
    workers = {k: np.asarray(v)[:n] for k, v in ck.workers.items()}
    cfg = ck.config if isinstance(ck.config, dict) else {}
    run_dir = file.parent if file.name == ckptmod.LATEST_NAME or file.parent.name != "checkpoints" else file.parent.parent
    tags.setdefault("strategy", ck.strategy)
    tags.setdefault("seed", int(cfg.get("run", {}).get("seed", 0)))
    tags.setdefault("fleet", str(cfg.get("workers", {}).get("fleet", "") or "custom"))
    tags.setdefault("partition", str(cfg.get("data", {}).get("partition", "")))
    return Run.from_arrays(metrics, workers, config=cfg, run_dir=str(run_dir), label=label or str(Path(path)),
                           checkpoint=ck, path=str(file), **tags)


# --------------------------------------------------------------------------- measures
def time_to_target(accuracy, clock, target: float | None) -> float:
    """Time (of ``clock``) at which the test accuracy first reaches ``target`` (nan: never, or no
    target). Rounds without an evaluation (nan accuracy) never count."""
    if target is None or not math.isfinite(target):
        return math.nan
    acc = np.asarray(accuracy, dtype=float)
    hit = np.flatnonzero(np.nan_to_num(acc, nan=-np.inf) >= target - 1e-12)
    return float(np.asarray(clock, dtype=float)[hit[0]]) if hit.size else math.nan


def accuracy_at_budget(accuracy, clock, budget: float | None) -> float:
    """Test accuracy of the last evaluated round that ended within ``budget`` (nan: none)."""
    if budget is None:
        return math.nan
    acc = np.asarray(accuracy, dtype=float)
    ok = np.flatnonzero(np.isfinite(acc) & (np.asarray(clock, dtype=float) <= budget))
    return float(acc[ok[-1]]) if ok.size else math.nan


def idle_share(idle_time, round_time) -> float:
    """Share of the workers' round time spent waiting: sum idle / sum(round_time * workers)."""
    idle = np.asarray(idle_time, dtype=float)
    total = float(np.asarray(round_time, dtype=float).sum()) * idle.shape[1]
    return float(idle.sum()) / total if total > 0 else math.nan


def final_accuracy(accuracy) -> float:
    acc = np.asarray(accuracy, dtype=float)
    acc = acc[np.isfinite(acc)]
    return float(acc[-1]) if acc.size else math.nan


# --------------------------------------------------------------------------- tables
RESULT_COLUMNS = [
    "fleet", "partition", "strategy", "seed", "rounds", "final_accuracy", "best_accuracy", "target_accuracy",
    "time_to_target", "median_round_time", "median_virtual_round_time", "idle_share", "bytes_per_round",
    "accuracy_at_budget", "wall_clock", "run_dir",
]
SUMMARY_COLUMNS = [
    "fleet", "partition", "strategy", "seeds", "final_accuracy_mean", "final_accuracy_std", "final_accuracy_min",
    "final_accuracy_max", "best_accuracy_mean", "time_to_target_mean", "target_reached", "median_round_time",
    "speedup_vs_fedavg", "median_virtual_round_time", "virtual_speedup_vs_fedavg", "idle_share", "bytes_per_round",
    "accuracy_at_budget_mean",
]


def run_row(r: Run, target: float = math.nan, budget: float | None = None, clock: str = "wall") -> dict:
    m = r.metrics
    acc = m["test_accuracy"].to_numpy(dtype=float)
    t = r.clock(clock)
    return {
        "fleet": r.fleet, "partition": r.partition, "strategy": r.strategy, "seed": r.seed, "rounds": r.rounds,
        "final_accuracy": final_accuracy(acc),
        "best_accuracy": float(np.nanmax(acc)) if np.isfinite(acc).any() else math.nan,
        "target_accuracy": target,
        "time_to_target": time_to_target(acc, t, target),
        "median_round_time": float(m["round_time"].median()),
        "median_virtual_round_time": float(m["virtual_time"].median()),
        "idle_share": idle_share(r.per_worker("idle_time"), m["round_time"]),
        "bytes_per_round": float(r.workers.groupby("round")["bytes_sent"].sum().mean()),
        "accuracy_at_budget": accuracy_at_budget(acc, t, budget),
        "wall_clock": float(m["wall_clock"].iloc[-1]),
        "run_dir": r.run_dir,
    }


def results_table(runs: list[Run], target_accuracy: float | None = None, budget: float | None = None,
                  clock: str = "wall") -> pd.DataFrame:
    """One row per run (:data:`RESULT_COLUMNS`). The accuracy target is ``target_accuracy``, or
    else FedAvg's final accuracy of the same fleet, partition and seed (nan where none ran)."""
    rows = pd.DataFrame([run_row(r, math.nan, budget, clock) for r in runs], columns=RESULT_COLUMNS)
    if target_accuracy is not None:
        rows["target_accuracy"] = float(target_accuracy)
    else:
        base = rows[rows["strategy"] == "fedavg"].groupby(["fleet", "partition", "seed"])["final_accuracy"].last()
        keys = pd.MultiIndex.from_frame(rows[["fleet", "partition", "seed"]])
        rows["target_accuracy"] = base.reindex(keys).to_numpy(dtype=float)
    rows["time_to_target"] = [time_to_target(r.metrics["test_accuracy"], r.clock(clock), t)
                              for r, t in zip(runs, rows["target_accuracy"])]
    return rows


def summarize(results: pd.DataFrame, strategy_order: list[str] | None = None) -> pd.DataFrame:
    """Per fleet, partition and strategy over seeds (:data:`SUMMARY_COLUMNS`). Round times are
    the mean over seeds of each run's median; the speedups are FedAvg's over the strategy's."""
    keys = ["fleet", "partition", "strategy"]
    g = results.groupby(keys, sort=False, dropna=False)
    out = g.agg(
        seeds=("seed", "size"),
        final_accuracy_mean=("final_accuracy", "mean"), final_accuracy_std=("final_accuracy", "std"),
        final_accuracy_min=("final_accuracy", "min"), final_accuracy_max=("final_accuracy", "max"),
        best_accuracy_mean=("best_accuracy", "mean"), time_to_target_mean=("time_to_target", "mean"),
        target_reached=("time_to_target", "count"),
        median_round_time=("median_round_time", "mean"), median_virtual_round_time=("median_virtual_round_time", "mean"),
        idle_share=("idle_share", "mean"), bytes_per_round=("bytes_per_round", "mean"),
        accuracy_at_budget_mean=("accuracy_at_budget", "mean"),
    ).reset_index()
    out["final_accuracy_std"] = out["final_accuracy_std"].fillna(0.0)  # one seed: no spread
    base = out[out["strategy"] == "fedavg"].set_index(["fleet", "partition"])
    cell = pd.MultiIndex.from_frame(out[["fleet", "partition"]])
    for col, speed in (("median_round_time", "speedup_vs_fedavg"), ("median_virtual_round_time", "virtual_speedup_vs_fedavg")):
        fed = base[col].reindex(cell).to_numpy(dtype=float)
        mine = out[col].to_numpy(dtype=float)
        out[speed] = np.where(mine > 0, fed / np.where(mine > 0, mine, 1.0), np.nan)
    order = list(strategy_order or [])
    order += [s for s in dict.fromkeys(out["strategy"]) if s not in order]
    cells = list(dict.fromkeys(zip(out["fleet"], out["partition"])))
    out["_cell"] = [cells.index(c) for c in zip(out["fleet"], out["partition"])]
    out["_order"] = [order.index(s) for s in out["strategy"]]
    out = out.sort_values(["_cell", "_order"], kind="stable").drop(columns=["_cell", "_order"]).reset_index(drop=True)
    return out[SUMMARY_COLUMNS]


def to_csv(table: pd.DataFrame, columns: list[str] | None = None) -> str:
    """CSV text: floats to 6 significant digits, nan as an empty cell."""
    return table[columns or list(table.columns)].to_csv(index=False, float_format="%.6g", lineterminator="\n")


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


def summary_markdown(summary: pd.DataFrame, header: dict, *, budget: float | None, failures: list[str] = (),
                     plots: dict | None = None, clock: str = "wall") -> str:
    """A bench's Markdown report: a header (command, date, host), then one table per fleet/partition."""
    lines = ["# elfish-mpi bench", ""]
    lines += [f"- **{key}**: {value}" for key, value in header.items()]
    lines += [
        "",
        "Final accuracy: test accuracy after the last round (mean ± sample std over seeds). "
        f"Time to target ({clock} clock): {'wall-clock' if clock == 'wall' else 'cumulative virtual'} seconds of training until the test accuracy first reached the target "
        "(mean over the seeds that reached it; reached/seeds in brackets). Round times: median over rounds, "
        "mean over seeds; virtual: the slowest client's CPU time / capacity. Speedup: FedAvg's median round "
        "time / the strategy's. Idle share: worker time spent waiting for the round to end. MB/round: "
        "update payload sent to rank 0 by all workers, per round.",
        "",
    ]
    for (fleet, part), cell in summary.groupby(["fleet", "partition"], sort=False, dropna=False):
        lines += [f"## fleet `{fleet}`, partition `{part}`", ""]
        cols = ["strategy", "seeds", "final accuracy", "time to target", "median round", "speedup",
                "median virtual round", "virtual speedup", "idle share", "MB/round"]
        if budget is not None:
            cols.append(f"accuracy at {budget:g} s ({clock})")
        lines.append("| " + " | ".join(cols) + " |")
        lines.append("|" + "|".join(["---"] + ["---:"] * (len(cols) - 1)) + "|")
        for s in cell.to_dict("records"):
            acc = _pct(s["final_accuracy_mean"])
            if s["seeds"] > 1:
                acc += f" ± {s['final_accuracy_std'] * 100:.2f}"
            ttt = (_secs(s["time_to_target_mean"]) if s["target_reached"] else "not reached") + f" ({s['target_reached']}/{s['seeds']})"
            row = [s["strategy"], str(s["seeds"]), acc, ttt, _secs(s["median_round_time"]), _times(s["speedup_vs_fedavg"]),
                   _secs(s["median_virtual_round_time"]), _times(s["virtual_speedup_vs_fedavg"]), _pct(s["idle_share"]),
                   _mb(s["bytes_per_round"])]
            if budget is not None:
                row.append(_pct(s["accuracy_at_budget_mean"]))
            lines.append("| " + " | ".join(row) + " |")
        lines.append("")
        if plots and (fleet, part) in plots:
            lines += [f"![{name}]({name})" for name in plots[(fleet, part)]] + [""]
    if failures:
        lines += ["## Failed runs", ""] + [f"- {f}" for f in failures] + [""]
    return "\n".join(lines)
