"""Plots of runs (matplotlib, PNG), for ``elfish-mpi report`` and ``bench``.

    elfish-mpi report RUN [RUN ...] --out DIR [--timeline-rounds N]

A RUN is a run directory, a checkpoint file or a bench directory (all of its runs). DIR gets:

- ``curves.png``: test accuracy and loss against round, wall-clock time and virtual time,
  every run overlaid;
- ``timeline.png``: per run (the first six), each worker's busy and idle time in the first
  rounds (Gantt);
- ``keep_ratio.png``: per run, each worker's keep ratio per round;
- ``coverage-<run>.png``: per run, how many worker-rounds trained each neuron of each group;
- ``bytes.png``: per run, the bytes each worker sent per round;
- ``report.md``: the runs' table and the plots.

Lines differ in dash pattern and marker as well as colour, so the plots read in grey scale;
every axis says its unit. Pure functions of :class:`analysis.Run` objects.
"""
from __future__ import annotations

import argparse
import math
import re
from pathlib import Path

import numpy as np

from . import analysis
from .analysis import Run
from .checkpoint import write_text_atomic

PALETTE = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22", "#7f7f7f"]
DASHES = ["-", "--", ":", "-."]
MARKERS = ["o", "s", "^", "D", "v", "x", "P", "*"]
MAX_TIMELINES = 6  # runs drawn in the report's timeline (the first ones given)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def strategy_colors(strategies: list[str]) -> dict[str, str]:
    return {s: PALETTE[i % len(PALETTE)] for i, s in enumerate(strategies)}


def style(i: int) -> dict:
    """Colour, dash pattern and marker of the i-th line (distinct in grey scale too)."""
    return {"color": PALETTE[i % len(PALETTE)], "linestyle": DASHES[i % len(DASHES)], "marker": MARKERS[i % len(MARKERS)]}


def _save(fig, path: Path) -> Path:
    path = Path(path)
    fig.savefig(path)
    _pyplot().close(fig)
    return path


# --------------------------------------------------------------------------- bench's plots
def curve_over_seeds(runs: list[Run], axis: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(x, mean, min, max) over seeds, aligned by round: x is the mean over seeds of the time at
    the end of each evaluated round (``axis``: wall or virtual); the accuracy's mean, min and max
    are taken at that round."""
    if axis not in ("wall", "virtual"):
        raise ValueError(f"axis must be 'wall' or 'virtual', not {axis!r}")
    n = min(r.rounds for r in runs)
    xs = np.vstack([r.clock(axis)[:n] for r in runs])
    accs = np.vstack([r.metrics["test_accuracy"].to_numpy(dtype=float)[:n] for r in runs])
    ok = np.isfinite(accs).all(axis=0)
    return xs.mean(axis=0)[ok], accs.mean(axis=0)[ok], accs.min(axis=0)[ok], accs.max(axis=0)[ok]


def plot_accuracy(runs: list[Run], axis: str, path: str | Path, *, title: str = "", colors: dict[str, str] | None = None,
                  target: float | None = None, target_label: str = "target") -> Path:
    """Test accuracy against wall-clock or virtual time: per strategy the mean over seeds with a
    min–max band."""
    plt = _pyplot()
    by_strategy: dict[str, list[Run]] = {}
    for r in runs:
        by_strategy.setdefault(r.strategy, []).append(r)
    colors = colors or strategy_colors(list(by_strategy))
    order = [s for s in colors if s in by_strategy] + [s for s in by_strategy if s not in colors]
    fig, ax = plt.subplots(figsize=(8, 5), dpi=120)
    for i, strategy in enumerate(order):
        group = by_strategy[strategy]
        x, mean, lo, hi = curve_over_seeds(group, axis)
        c = colors.get(strategy, "black")
        seeds_note = f", {len(group)} seeds" if len(group) > 1 else ""
        label = f"{strategy} (final {mean[-1]:.1%}{seeds_note})" if mean.size else strategy
        if len(group) > 1:
            ax.fill_between(x, lo * 100, hi * 100, color=c, alpha=0.18, linewidth=0)
        ax.plot(x, mean * 100, color=c, linestyle=DASHES[i % len(DASHES)], marker=MARKERS[i % len(MARKERS)],
                markersize=3.5, linewidth=1.8, label=label)
    if target is not None and math.isfinite(target):
        ax.axhline(target * 100, color="grey", linestyle=":", linewidth=1, label=f"{target_label} {target:.1%}")
    ax.set_xlabel("wall-clock time since training started (s)" if axis == "wall"
                  else "cumulative virtual time (s): per round, the slowest client's CPU time / capacity")
    ax.set_ylabel("test accuracy (%)")
    ax.set_xlim(left=0)
    ax.grid(True, alpha=0.3)
    seeds = sorted({r.seed for r in runs})
    note = f"mean over {len(seeds)} seeds per round, band: min–max accuracy over the seeds" if len(seeds) > 1 else f"seed {seeds[0]}" if seeds else ""
    what = "wall-clock time" if axis == "wall" else "virtual time"
    ax.set_title(f"Test accuracy vs {what}" + (f" — {title}" if title else "") + (f"\n({note})" if note else ""))
    ax.legend(loc="lower right")
    fig.tight_layout()
    return _save(fig, path)


def timeline_panels(runs: list[Run]) -> list[Run]:
    """The runs a bench's timeline draws: FedAvg then ELFISH (each its lowest seed); when neither
    ran, the first two strategies."""
    first: dict[str, Run] = {}
    for r in sorted(runs, key=lambda r: r.seed):
        first.setdefault(r.strategy, r)
    chosen = [first[s] for s in ("fedavg", "elfish") if s in first]
    return chosen or list(first.values())[:2]


def _slots_are_workers(r: Run) -> bool:
    """Whether each /workers column is one worker rank's one client throughout (the default)."""
    w = r.workers
    return not len(w) or (np.array_equal(w["client"], w["worker"]) and np.array_equal(w["rank"], w["worker"] + 1))


def _capacities(r: Run) -> list[float] | None:
    from .config import Config

    if not _slots_are_workers(r):
        return None  # the clients of a column change from round to round: no one capacity a column
    try:
        return Config.from_dict(r.config).capacities(r.num_workers)
    except Exception:  # a config from another version: leave the capacities out
        return None


def plot_timeline(panels: list[Run], rounds: int, path: str | Path, *, title: str = "",
                  colors: dict[str, str] | None = None, names: list[str] | None = None) -> Path:
    """Per-worker Gantt chart of the first ``rounds`` rounds, one panel per run (same x scale):
    a round starts where the previous round's round_time ended; each worker's bar is busy
    (coloured, from the round start) then idle (grey, hatched) until the round ends."""
    plt = _pyplot()
    from matplotlib.patches import Patch

    if not panels:
        raise ValueError("plot_timeline needs at least one run")
    colors = colors or strategy_colors(list(dict.fromkeys(r.strategy for r in panels)))
    names = names or [f"{r.strategy} (seed {r.seed})" for r in panels]
    heights = [max(r.num_workers, 1) for r in panels]
    fig, axes = plt.subplots(
        len(panels), 1, sharex=True, squeeze=False, dpi=120, layout="constrained",
        figsize=(11, 1.6 + sum(0.5 * h + 0.9 for h in heights)),
        gridspec_kw={"height_ratios": [h + 1.2 for h in heights]},
    )
    xmax = max(float(r.metrics["round_time"].to_numpy(dtype=float)[: min(rounds, r.rounds)].sum()) for r in panels) or 1.0
    for ax, r, name in zip(axes[:, 0], panels, names):
        n = min(rounds, r.rounds)
        rt = r.metrics["round_time"].to_numpy(dtype=float)[:n]
        starts = np.concatenate([[0.0], np.cumsum(rt)[:-1]])
        busy = np.minimum(r.per_worker("busy_time")[:n], rt[:, None])
        keep = r.per_worker("keep_ratio")[:n] if r.has("keep_ratio") else None
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
        if not _slots_are_workers(r):  # a column is the round's w-th client (its bar starts at the round's start)
            labels = [f"client slot {w + 1}" for w in range(workers)]
        else:
            labels = [f"worker {w + 1}" + (f" (capacity {caps[w]:g})" if caps else "") for w in range(workers)]
        ax.set_yticklabels(list(reversed(labels)))
        ax.set_ylim(-0.6, workers + 0.1)
        idle = analysis.idle_share(r.per_worker("idle_time")[:n], rt) if n else math.nan
        what = "numbers in the bars: keep ratio (share of the model trained)" if soft else "full model on every worker"
        ax.set_title(f"{name}: {n} rounds in {end:.2f} s, idle share {idle:.0%}; {what}", fontsize=10)
        ax.grid(True, axis="x", alpha=0.3)
    axes[-1, 0].set_xlim(0, xmax * 1.01)
    axes[-1, 0].set_xlabel("wall-clock time since the first round started (s)")
    handles = [Patch(facecolor=c, label=f"busy: {s} training") for s, c in colors.items() if any(r.strategy == s for r in panels)]
    handles.append(Patch(facecolor="#e6e6e6", edgecolor="#9a9a9a", hatch="///", label="idle: waiting for the round to end"))
    fig.suptitle("Per-worker timeline of the first rounds" + (f" — {title}" if title else ""), fontsize=12)
    fig.legend(handles=handles, loc="outside lower center", ncol=len(handles), fontsize=9)
    return _save(fig, path)


def write_plots(runs: list[Run], out: Path, *, prefix: str = "", title: str = "", timeline_rounds: int = 5,
                colors: dict[str, str] | None = None, target: float | None = None, target_label: str = "target") -> list[str]:
    """A bench's three PNGs for one fleet/partition; returns their file names."""
    names = []
    for axis, name in (("wall", "accuracy_vs_wall.png"), ("virtual", "accuracy_vs_virtual.png")):
        plot_accuracy(runs, axis, out / f"{prefix}{name}", title=title, colors=colors, target=target, target_label=target_label)
        names.append(f"{prefix}{name}")
    panels = timeline_panels(runs)
    if panels:
        plot_timeline(panels, timeline_rounds, out / f"{prefix}timeline.png", title=title, colors=colors)
        names.append(f"{prefix}timeline.png")
    return names


# --------------------------------------------------------------------------- report's plots
def plot_curves(runs: list[Run], names: list[str], path: str | Path) -> Path:
    """Test accuracy (top) and loss (bottom) against round, wall-clock and virtual time."""
    plt = _pyplot()
    fig, axes = plt.subplots(2, 3, figsize=(15, 8), dpi=110, squeeze=False)
    xs = (("round", "round"), ("wall", "wall-clock time since training started (s)"),
          ("virtual", "cumulative virtual time (s)"))
    for i, (r, name) in enumerate(zip(runs, names)):
        acc = r.metrics["test_accuracy"].to_numpy(dtype=float)
        loss = r.metrics["test_loss"].to_numpy(dtype=float) if "test_loss" in r.metrics else np.full_like(acc, np.nan)
        ok = np.isfinite(acc)
        for col, (kind, label) in enumerate(xs):
            x = r.metrics.index.to_numpy(dtype=float) if kind == "round" else r.clock(kind)
            axes[0, col].plot(x[ok], acc[ok] * 100, markersize=4, linewidth=1.6, label=name, **style(i))
            axes[1, col].plot(x[ok], loss[ok], markersize=4, linewidth=1.6, label=name, **style(i))
            axes[1, col].set_xlabel(label)
    for col in range(3):
        axes[0, col].set_ylabel("test accuracy (%)")
        axes[1, col].set_ylabel("test loss (cross-entropy, nats)")
        for row in range(2):
            axes[row, col].grid(True, alpha=0.3)
    axes[0, 0].legend(loc="lower right", fontsize=8)
    fig.suptitle("Test accuracy and loss of the global model (evaluated rounds)")
    fig.tight_layout()
    return _save(fig, path)


def _panels(count: int, per_row: int = 2, size=(7, 3.2)):
    plt = _pyplot()
    rows = max(1, math.ceil(count / per_row))
    cols = min(per_row, max(count, 1))
    fig, axes = plt.subplots(rows, cols, figsize=(size[0] * cols, size[1] * rows), dpi=110, squeeze=False)
    for ax in axes.ravel()[count:]:
        ax.set_visible(False)
    return fig, axes.ravel()


def plot_per_worker(runs: list[Run], names: list[str], what: str, ylabel: str, path: str | Path, *, scale: float = 1.0,
                    title: str = "", top: float | None = None) -> Path:
    """One panel per run: ``/workers/<what>`` per worker against round."""
    fig, axes = _panels(len(runs))
    for ax, r, name in zip(axes, runs, names):
        values = r.per_worker(what) * scale
        rounds = np.sort(r.workers["round"].unique())
        for w in range(values.shape[1]):
            ax.plot(rounds, values[:, w], markersize=3.5, linewidth=1.4, label=f"worker {w + 1} (rank {w + 1})", **style(w))
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("round")
        ax.set_ylabel(ylabel)
        ax.set_ylim(0, top if top is not None else max(float(np.nanmax(values)) * 1.08, 1e-9) if values.size else 1.0)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7, loc="best")
    fig.suptitle(title)
    fig.tight_layout()
    return _save(fig, path)


def plot_coverage(run: Run, name: str, path: str | Path) -> Path:
    """One panel per neuron group: how many accepted worker-rounds trained each neuron."""
    cov = run.coverage
    fig, axes = _panels(len(cov), per_row=3, size=(5.5, 3))
    total = run.rounds * max(run.num_workers, 1)
    for ax, (group, counts) in zip(axes, cov.items()):
        counts = np.asarray(counts, dtype=float)
        ax.bar(np.arange(counts.size), counts, width=1.0, color="#555555", edgecolor="none")
        ax.axhline(total, color="black", linestyle="--", linewidth=1, label=f"every worker, every round ({total})")
        low = int(counts.min()) if counts.size else 0
        ax.set_title(f"{group}: {counts.size} neurons, least trained {low}x", fontsize=9)
        ax.set_xlabel("neuron index")
        ax.set_ylabel("worker-rounds that trained it")
        ax.set_ylim(0, max(total, 1) * 1.08)
        ax.legend(fontsize=7, loc="lower right")
    fig.suptitle(f"Coverage after {run.rounds} rounds — {name}")
    fig.tight_layout()
    return _save(fig, path)


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_") or "run"


def expand(paths: list[str]) -> list[tuple[str, Path]]:
    """(name, checkpoint) for every RUN argument: a run directory, a checkpoint file, or a bench
    directory (each of its runs, named by its path inside runs/). A run directory is named after
    itself, a checkpoint file after its directory too (and its round where it is a history file);
    names that would repeat get a suffix."""
    found = []
    for p in map(Path, paths):
        if p.is_dir() and not (p / "checkpoint.h5").exists() and (p / "runs").is_dir():
            runs = sorted((p / "runs").rglob("checkpoint.h5"))
            if not runs:
                raise FileNotFoundError(f"{p}: a bench directory without finished runs")
            found += [(str(c.parent.relative_to(p / "runs")), c) for c in runs]
        elif p.is_dir():
            found.append((p.resolve().name, analysis.checkpoint_path(p)))
        elif p.is_file():
            parent = p.resolve().parent
            run = parent.parent if parent.name == "checkpoints" else parent
            found.append((run.name if p.name == "checkpoint.h5" else f"{run.name}/{p.stem}", p))
        else:
            raise FileNotFoundError(f"{p}: no such run directory or checkpoint")
    seen: dict[str, int] = {}
    named = []
    for name, path in found:
        seen[name] = seen.get(name, 0) + 1
        named.append((name if seen[name] == 1 else f"{name} ({seen[name]})", path))
    slugs: dict[str, int] = {}
    for name, _ in named:  # distinct names must give distinct file names
        slugs[slug(name)] = slugs.get(slug(name), 0) + 1
    return [(name if slugs[slug(name)] == 1 else f"{name} [{i + 1}]", path) for i, (name, path) in enumerate(named)]


def write_report(paths: list[str], out: str | Path, timeline_rounds: int = 5) -> list[Path]:
    """The report's PNGs and report.md in ``out``; returns the files written."""
    out = Path(out)
    found = expand(paths)
    runs = [analysis.open_run(c, label=name) for name, c in found]
    names = [name for name, _ in found]
    out.mkdir(parents=True, exist_ok=True)
    files = [plot_curves(runs, names, out / "curves.png")]
    files.append(plot_timeline(runs[:MAX_TIMELINES], timeline_rounds, out / "timeline.png", names=names[:MAX_TIMELINES],
                               colors={s: PALETTE[i % len(PALETTE)] for i, s in enumerate(dict.fromkeys(r.strategy for r in runs))}))
    files.append(plot_per_worker(runs, names, "keep_ratio", "keep ratio", out / "keep_ratio.png", top=1.05,
                                 title="Keep ratio per worker and round (mean over neuron groups of the share kept)"))
    files.append(plot_per_worker(runs, names, "bytes_sent", "update sent to rank 0 (MB)", out / "bytes.png", scale=1e-6,
                                 title="Bytes each worker sent per round"))
    for r, name in zip(runs, names):
        if r.coverage:
            files.append(plot_coverage(r, name, out / f"coverage-{slug(name)}.png"))
    table = analysis.results_table(runs)
    table.insert(0, "run", names)
    cols = ["run", "strategy", "seed", "rounds", "final_accuracy", "best_accuracy", "median_round_time",
            "median_virtual_round_time", "idle_share", "bytes_per_round", "wall_clock"]
    shown = table[cols].copy()
    for c in ("final_accuracy", "best_accuracy", "idle_share"):
        shown[c] = [f"{v:.2%}" if math.isfinite(v) else "–" for v in shown[c]]
    for c in ("median_round_time", "median_virtual_round_time", "wall_clock"):
        shown[c] = [f"{v:.3f} s" if math.isfinite(v) else "–" for v in shown[c]]
    shown["bytes_per_round"] = [f"{v / 1e6:.2f} MB" for v in shown["bytes_per_round"]]
    lines = ["# elfish-mpi report", "", f"Runs: {', '.join(f'`{c}`' for _, c in found)}", "",
             "| " + " | ".join(cols) + " |", "|" + "|".join(["---"] * len(cols)) + "|"]
    lines += ["| " + " | ".join(str(v) for v in row) + " |" for row in shown.itertuples(index=False)]
    lines.append("")
    lines += [f"![{f.name}]({f.name})" for f in files]
    md = out / "report.md"
    write_text_atomic(md, "\n".join(lines) + "\n")
    return files + [md]


def main(argv: list[str]) -> int:
    import sys

    p = argparse.ArgumentParser(prog="elfish-mpi report", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", metavar="RUN", help="run directory, checkpoint file or bench directory")
    p.add_argument("--out", required=True, help="directory for the PNGs and report.md")
    p.add_argument("--timeline-rounds", type=int, default=5, help="rounds shown in timeline.png (default: 5)")
    args = p.parse_args(argv)
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print('elfish-mpi report: error: the plots need matplotlib: pip install -e ".[report]"', file=sys.stderr)
        return 2
    if args.timeline_rounds < 1:
        print("elfish-mpi report: error: --timeline-rounds must be >= 1", file=sys.stderr)
        return 2
    from .checkpoint import CheckpointError

    try:
        files = write_report(args.runs, args.out, args.timeline_rounds)
    except (FileNotFoundError, CheckpointError, KeyError, ValueError) as exc:
        print(f"elfish-mpi report: error: {exc.args[0] if isinstance(exc, KeyError) and exc.args else exc}", file=sys.stderr)
        return 2
    print(f"report: wrote {len(files)} files into {args.out} ({', '.join(f.name for f in files)})")
    return 0
