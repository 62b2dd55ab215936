"""Command line: ``elfish-mpi train|inspect|evaluate|export|validate|config`` (and bench, report, calibrate, perf). ``main(argv) -> int``.

``train`` runs under MPI (``mpiexec -n N elfish-mpi train ...``): rank 0 aggregates, ranks
1..N-1 are workers. Rank 0 checks the config, the data and the run directory before any
rank does work, and every rank leaves with the same exit code when something is wrong. An
exception on any rank after that aborts the whole job with a message naming the rank.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import time
import traceback
from pathlib import Path

from . import supervisor
from .config import Config, ConfigError, load_config, parse_override

# Changes between a checkpoint's config and the resuming one that are safe.
SAFE_RESUME_KEYS = {
    "run.rounds", "run.out", "run.round_timeout", "run.stop_grace", "run.eval_every", "run.threads", "run.overlap_eval",
    "run.eval_on", "workers.match_seconds",
    "checkpoint.every", "checkpoint.keep", "data.path",
}


class UsageError(Exception):
    """A problem with what the user asked for (exit 2, no traceback)."""


class MPIParser(argparse.ArgumentParser):
    """The parser of a command that every MPI rank runs: a usage error raises UsageError
    instead of exiting, so that :func:`parse_or_report` prints it on rank 0 only."""

    def error(self, message):
        raise UsageError(message)


def parse_or_report(parser: argparse.ArgumentParser, argv: list[str], prog: str,
                    under_mpi: bool = False) -> argparse.Namespace | None:
    """The parsed arguments, or None after rank 0 (or a process outside MPI) printed the usage error."""
    try:
        return parser.parse_args(argv)
    except UsageError as exc:
        rank = supervisor.launcher_rank()
        if rank is None and under_mpi:
            from .comm import world_rank  # a launcher whose variables are not known: MPI knows

            rank = world_rank()
        if not rank:
            parser.print_usage(sys.stderr)
            print(f"{prog}: error: {exc}", file=sys.stderr)
        return None


def build_parser() -> argparse.ArgumentParser:
    p = MPIParser(prog="elfish-mpi", description="ELFISH resource-aware federated learning on heterogeneous workers, over MPI.")
    p.add_argument("--version", action="store_true", help="print the program's version (and git commit) and exit")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    keys = Config.describe()
    t = sub.add_parser(
        "train",
        help="run a federated training job (under mpiexec / srun)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Run a federated training job: mpiexec -n 5 elfish-mpi train --config FILE",
        epilog="configuration keys (TOML sections; override any with --set section.key=value):\n\n" + keys,
    )
    t.add_argument("--config", help="TOML config file (default: the built-in defaults; with --resume: the checkpoint's config)")
    t.add_argument("--out", help="run directory (overrides run.out); must not hold another run's checkpoint")
    t.add_argument("--resume", metavar="CHECKPOINT", help="continue from a checkpoint file, or from the newest valid one in a run "
                   "directory; the run goes on in that run directory (or --out, a fresh one; a file outside a run "
                   "directory needs --out)")
    t.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="override a config value (repeatable)")
    i = sub.add_parser("inspect", help="print a checkpoint's summary")
    i.add_argument("checkpoint")
    i.add_argument("--json", action="store_true", help="print the metrics as JSON")
    i.add_argument("--masks", type=int, metavar="ROUND", help="print the neurons each client kept in round ROUND")
    e = sub.add_parser("evaluate", help="accuracy and loss of a checkpoint's global model on a test set, per class too")
    e.add_argument("checkpoint", help="a checkpoint file or a run directory (its checkpoint.h5)")
    e.add_argument("--data", metavar="NAME", help="data set (default: the run's data.name)")
    e.add_argument("--data-path", metavar="PATH", help="its file or directory (default: the run's data.path, or the standard places)")
    e.add_argument("--samples", type=int, metavar="N", help="N test images, as data.test_samples takes them (default: the run's data.test_samples; 0: all)")
    e.add_argument("--json", action="store_true", help="print the results as JSON")
    x = sub.add_parser("export", help="write a checkpoint's global model (or a slimmer sub-network) as safetensors, ONNX or a torch state_dict")
    x.add_argument("checkpoint", help="a checkpoint file or a run directory (its checkpoint.h5)")
    x.add_argument("--format", default="safetensors", help="safetensors (default), onnx (an ONNX graph with a free batch "
                   "size; needs onnx and onnxscript) or pt (a torch state_dict and metadata)")
    x.add_argument("--out", required=True, help="the file to write")
    x.add_argument("--keep", type=float, default=1.0, metavar="R", help="a sub-network keeping this share of each "
                   "neuron group's units (those with the largest weights); default 1: the whole model")
    v = sub.add_parser("validate", help="verify a checkpoint (layout and checksums) without running")
    v.add_argument("checkpoint")
    for name, text in (
        ("bench", "run strategies side by side and write tables and plots (elfish-mpi bench --help)"),
        ("report", "plots and a table of runs from their checkpoints (elfish-mpi report --help)"),
        ("calibrate", "measure each worker's achieved speed under a throttle (under mpiexec)"),
        ("perf", "micro-benchmarks: soft-training speed, update transports"),
    ):
        sub.add_parser(name, help=text, add_help=False)
    c = sub.add_parser("config", help="print the resolved config as JSON (or every key with --keys)")
    c.add_argument("--config")
    c.add_argument("--set", action="append", default=[])
    c.add_argument("--keys", action="store_true")
    return p


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def config_differences(old: dict, new: dict) -> tuple[list[str], list[str]]:
    """(unsafe, safe) differences between two config dicts, as 'key: old -> new' lines."""
    a, b = _flatten(old), _flatten(new)
    unsafe, safe = [], []
    for key in sorted(set(a) | set(b)):
        if a.get(key) != b.get(key):
            line = f"{key}: {json.dumps(a.get(key))} -> {json.dumps(b.get(key))}"
            (safe if key in SAFE_RESUME_KEYS else unsafe).append(line)
    return unsafe, safe


# Keys added after checkpoints were first written, with the behaviour those checkpoints had:
# a checkpoint without the key resumes (or compares) as it ran, not with today's default.
LEGACY_DEFAULTS = {("strategy", "weighting"): "samples", ("strategy", "fallback"): "none",
                   ("workers", "match_seconds"): 0.0}


def with_legacy_defaults(raw: dict) -> dict:
    out = json.loads(json.dumps(raw))
    for (section, key), value in LEGACY_DEFAULTS.items():
        if isinstance(out.get(section), dict) and key not in out[section]:
            out[section][key] = value
    return out


def normalized_config(raw: dict) -> dict:
    """A checkpoint's config dict with every key present: a key it predates takes the behaviour
    it ran with (LEGACY_DEFAULTS), any other its default, so that it compares equal to a config
    that leaves the key at its default."""
    try:
        return Config.from_dict(with_legacy_defaults(raw)).to_dict()
    except ConfigError:
        return raw


# ---------------------------------------------------------------------------- train
def _set_value(overrides: list[str], section: str, key: str):
    """The value the last ``--set section.key=...`` gives, or None."""
    value = None
    for text in overrides:
        s, k, v = parse_override(text)
        if (s, k) == (section, key):
            value = v
    return value


def run_dir_of(path: Path) -> Path | None:
    """The run directory a ``--resume`` argument belongs to: the directory itself, or the one
    holding ``checkpoint.h5`` / ``checkpoints/round-N.h5``; None for a file elsewhere."""
    from . import checkpoint as ckptmod

    if path.is_dir():
        return path
    if path.name == ckptmod.LATEST_NAME:
        return path.parent
    if path.parent.name == ckptmod.HISTORY_DIR:
        return path.parent.parent
    return None


def prepare(args, num_workers: int) -> dict:
    """Rank 0's checks before any work. Raises ConfigError/DataError/CheckpointError/UsageError."""
    from . import checkpoint as ckptmod
    from . import data as datamod
    from .models import spec_of
    from .strategies import make_strategy

    notes = []
    ckpt = None
    if args.resume:
        src = Path(args.resume)
        if src.is_dir():
            path, skipped = ckptmod.find_latest_valid(src)
            notes += skipped
        else:
            path = src
            ckptmod.validate(path)
        ckpt = ckptmod.read(path)
        notes.append(f"resuming from {path} (round {ckpt.round})")
    if args.config:
        cfg = load_config(args.config, args.set)
    elif ckpt is not None:
        raw = with_legacy_defaults(ckpt.config)
        for text in args.set:
            section, key, value = parse_override(text)
            raw.setdefault(section, {})[key] = value
        cfg = Config.from_dict(raw)
    else:  # the defaults, with any --set overrides
        cfg = load_config(None, args.set)
    explicit_out = args.out or _set_value(args.set, "run", "out")
    if ckpt is not None:
        own = run_dir_of(Path(args.resume))
        if explicit_out:
            cfg.run.out = str(explicit_out)
        elif own is not None:
            if Path(cfg.run.out).resolve() != own.resolve() and args.config:
                notes.append(f"run.out = {cfg.run.out} of {args.config} is not used: a resumed run writes into its own directory")
            cfg.run.out = str(own)
        else:
            raise UsageError(
                f"{args.resume} is not in a run directory (DIR/checkpoint.h5 or DIR/checkpoints/round-N.h5); "
                "say where the resumed run goes with --out"
            )
        target = Path(cfg.run.out).resolve()
        if (own is None or target != own.resolve()) and ckptmod.holds_checkpoints(target):
            raise UsageError(
                f"run directory {cfg.run.out} holds another run's checkpoint; a resumed run writes into its own "
                f"directory{f' ({own})' if own is not None else ''} or into a fresh --out"
            )
        newest = ckptmod.newest_round(target)
        if newest is not None and newest > ckpt.round:
            raise UsageError(
                f"run directory {cfg.run.out} holds rounds up to {newest}; resuming round {ckpt.round} there would "
                "overwrite them: continue it with --resume DIR, or send this resume to a fresh --out"
            )
    elif args.out:
        cfg.run.out = args.out
    cfg.check_world(num_workers)
    from .clients import client_speeds

    num_clients = cfg.num_clients(num_workers)
    speeds = client_speeds(cfg, num_clients)
    if not cfg.pinned(num_workers) and cfg.workers.throttle == "none" and min(speeds) < 1.0:
        raise ConfigError(
            "workers.throttle = 'none' does not slow a client down, and with more clients than worker ranks the "
            "clients' speeds would be planned for but never felt: use sleep or virtual (or leave the speeds at 1)"
        )
    if cfg.workers.trace:
        from .fleet import load_trace

        load_trace(cfg.workers.trace, num_clients)
    out = Path(cfg.run.out).resolve()
    if out.exists() and not out.is_dir():
        raise UsageError(f"run directory {out} exists and is not a directory")
    if ckpt is None and ckptmod.holds_checkpoints(out):
        raise UsageError(
            f"run directory {out} already holds a checkpoint; continue it with --resume {cfg.run.out} "
            f"or choose another --out"
        )
    if ckpt is not None:
        unsafe, safe = config_differences(normalized_config(ckpt.config), cfg.to_dict())
        if unsafe:
            raise UsageError(
                "the config differs from the checkpoint's in ways a resumed run cannot follow:\n  " + "\n  ".join(unsafe)
            )
        notes += [f"config change allowed on resume: {line}" for line in safe]
        try:
            ck_workers = int(ckpt.attrs.get("num_workers", num_workers))
        except (TypeError, ValueError):
            raise UsageError(f"{path}: attribute num_workers = {ckpt.attrs.get('num_workers')!r} is not a number") from None
        if ck_workers != num_workers:
            raise UsageError(f"the checkpoint was written by a job with {ck_workers} workers; this job has {num_workers}")
    data_path = str(datamod.resolve_path(cfg.data.name, cfg.data.path))
    test = datamod.load_test_data(cfg.data.name, data_path, cfg.data.test_samples)
    in_shape = tuple(int(s) for s in test.images.shape[1:])
    try:
        spec = spec_of(cfg.model, test.num_classes, in_shape)
    except ValueError as exc:
        raise ConfigError(f"model.name = {cfg.model.name!r}: {exc}") from None
    if ckpt is not None:
        from .submodel import layout

        expect = {k: tuple(s) for k, s, _ in layout(spec)}
        got = {k: tuple(v.shape) for k, v in ckpt.model.items()}
        if expect != got:
            raise UsageError(f"the checkpoint's model does not fit {cfg.model.name} on {cfg.data.name}")
        check_resume_state(ckpt, spec, cfg, num_workers, path, speeds)
    if cfg.data.partition == "natural":  # (the other partitions check their sizes as they split)
        datamod.ClientParts(cfg.data.name, data_path, num_clients, "natural", cfg.run.seed)
    return {
        "config": cfg.to_dict(),
        "data_path": data_path,
        "num_classes": test.num_classes,
        "in_shape": in_shape,
        "test_images": len(test.labels),
        "resume": ckpt is not None,
        # a strategy that does not plan (fedavg, elfish with fixed keep ratios) does not profile
        "profile": ckpt is None and make_strategy(cfg, spec, num_clients).needs_planner,
        # the cgroup quotas are matched at start-up, unless no round is left to run
        "match_quotas": cfg.workers.matches_quotas and (ckpt is None or ckpt.round < cfg.run.rounds),
        "speeds": speeds,  # each client's starting capacity (clients.py), the same on every rank
        "notes": notes,
        "job_id": f"{os.getpid()}-{int(time.time())}",
        "_test": test,
        "_ckpt": ckpt,
    }


def check_resume_state(ckpt, spec, cfg: Config, num_workers: int, path, speeds=None) -> None:
    """What a resumed run reads besides the model must fit this job, or the run is refused."""
    import numpy as np

    from .profiling import configurations
    from .strategies import make_strategy

    problems = []
    num_clients = cfg.num_clients(num_workers)
    cursor = ckpt.state.get("cursor")
    if cursor is None or cursor.shape != (num_clients,):
        problems.append(f"/state/cursor must hold one data position per client ({num_clients})")
    stored = ckpt.state.get("client_speed")
    if stored is not None and speeds is not None and not np.array_equal(np.asarray(stored, dtype=np.float64), speeds):
        problems.append("the clients' speeds differ from those the run started with (/state/client_speed): "
                        "was the clients.speed table edited?")
    for g in spec.groups:
        cov = ckpt.coverage.get(g.name)
        if cov is None or cov.shape != (g.size,):
            problems.append(f"/coverage/{g.name} must have shape ({g.size},)")
    if make_strategy(cfg, spec, num_clients).needs_planner:
        configs = len(configurations(spec, cfg.strategy.profile))
        for name in ("step_time", "macs"):
            arr = ckpt.profiles.get(name)
            if arr is None or arr.shape != (num_workers, configs):
                problems.append(f"/profiles/{name} must have shape ({num_workers}, {configs}) for planning")
        for name in ("planner_alpha", "planner_beta", "planner_scale"):
            arr = ckpt.state.get(name)
            if arr is not None and arr.shape != (num_clients,):
                problems.append(f"/state/{name} must hold one value per client ({num_clients})")
    if problems:
        raise UsageError(f"{path} cannot be resumed by this job: " + "; ".join(problems))


def known_errors():
    from .checkpoint import CheckpointError
    from .data import DataError
    from .comm import RankFailure, RoundTimeout
    from .throttle import ThrottleError

    return (ConfigError, DataError, CheckpointError, UsageError, ThrottleError, RoundTimeout, RankFailure)


def train(args) -> int:
    from . import signals
    from .comm import Comm, StopTimeout

    signals.install()
    comm = Comm()
    supervisor.identify("the aggregator, rank 0" if comm.rank == 0 else f"worker rank {comm.rank}")
    if comm.rank > 0:  # torch and the round loop, loaded while rank 0 checks the job (prepare) instead of after
        from . import worker  # noqa: F401
    # Rank 0 checks everything; keys starting with "_" (test data, the checkpoint) stay on it.
    setup, error = comm.from_root(lambda: prepare(args, comm.size - 1), known_errors(),
                                  public=lambda s: {k: v for k, v in s.items() if not k.startswith("_")})
    if error:
        if comm.rank == 0:
            print(f"elfish-mpi: error: {error}", file=sys.stderr, flush=True)
        return 2

    try:
        return run_job(comm, setup)
    except Exception as exc:
        known = known_errors()
        detail = "" if isinstance(exc, known) else "\n" + traceback.format_exc()
        code = 1
        if isinstance(exc, StopTimeout):  # told to stop, and rank 0 could not finish in time
            dropped = "; stopped without that round" if str(exc).startswith("round ") else "; stopped"
            detail = f"{dropped}: continue from the last checkpoint with --resume {setup['config']['run']['out']}"
            code = signals.EXIT_PREEMPTED
        print(f"elfish-mpi: rank {comm.rank}: {type(exc).__name__}: {exc}{detail}", file=sys.stderr, flush=True)
        supervisor.release()  # this rank has said why it ends
        comm.abort(code)
        return code


def run_job(comm, setup: dict) -> int:
    import torch

    from . import data as datamod
    from .aggregator import Aggregator
    from .models import spec_of
    from .worker import Worker

    cfg = Config.from_dict(setup["config"])
    torch.set_num_threads(cfg.run.threads)
    if comm.rank == 0:  # (a worker waits for rank 0, which may be writing the final checkpoint)
        comm.stop_grace = cfg.run.stop_grace
    # (rank 0 checked the model in prepare; the workers skip that forward pass: 1 s of imports each)
    spec = spec_of(cfg.model, setup["num_classes"], tuple(setup["in_shape"]), check=comm.rank == 0)
    # Every rank sets up its part; an error on any rank (a worker's data, its throttle) is
    # reported by rank 0 and every rank leaves with exit code 2, before any round.
    hosts = comm.allgather_obj(socket.gethostname())
    peers = comm.core_peers()  # the ranks sharing this one's cores (node-local communicator)
    role, error = None, None
    try:
        if comm.rank == 0:
            test = setup.pop("_test")
            x = torch.from_numpy(datamod.normalize(test.images))
            y = torch.from_numpy(test.labels.astype("int64"))
            del test
            from . import provenance
            from .comm import library_version

            made_by = provenance.collect(comm.size, hosts, library_version())
            role = Aggregator(comm, cfg, spec, dict(setup, resume_ckpt=setup["_ckpt"], provenance=made_by), (x, y))
        else:
            role = Worker(comm, cfg, spec, setup, peers)
    except known_errors() as exc:
        error = f"rank {comm.rank}: {exc}"
    except Exception as exc:
        error = f"rank {comm.rank}: {type(exc).__name__}: {exc}\n{traceback.format_exc()}"
    verdict = comm.agree(error)
    if verdict:
        if comm.rank == 0:
            print(f"elfish-mpi: error: {verdict}", file=sys.stderr, flush=True)
        if role is not None and hasattr(role, "throttle"):
            role.throttle.detach()
        return 2
    if comm.rank == 0:
        for note in setup["notes"]:
            print(f"elfish-mpi: {note}", flush=True)
        speeds = setup["speeds"]
        if len(speeds) == comm.size - 1:
            who = f"{comm.size - 1} workers, capacities [{' '.join(f'{c:g}' for c in speeds)}]"
            if cfg.per_round(comm.size - 1) < len(speeds):
                who += f", {cfg.per_round(comm.size - 1)} of them a round"
        else:
            who = (f"{len(speeds)} clients ({cfg.per_round(comm.size - 1)} a round) on {comm.size - 1} workers, "
                   f"capacities {min(speeds):.3g}..{max(speeds):.3g} (median {sorted(speeds)[len(speeds) // 2]:.3g})")
        print(
            f"elfish-mpi: {cfg.strategy.name} on {cfg.data.name} ({cfg.data.partition}), {cfg.model.name}, "
            f"{who}, throttle {cfg.workers.throttle}, out {cfg.run.out}",
            flush=True,
        )
        code = role.run()
    else:
        role.run(do_profile=setup["profile"])
        code = 0
    # Every rank leaves with rank 0's verdict (0: done, EXIT_PREEMPTED: stopped by a signal).
    return int(comm.bcast_obj(code, what="the broadcast of the exit code (a worker rank stopped answering)"))


# ---------------------------------------------------------------------- inspection
def inspect(args) -> int:
    from . import checkpoint as ckptmod

    ck = ckptmod.read(args.checkpoint)
    if args.masks is not None:
        if args.masks not in ck.masks:
            rounds = sorted(ck.masks)
            listed = f"rounds {rounds[0]} to {rounds[-1]}" if rounds else "no rounds"
            raise UsageError(f"{args.checkpoint} holds the masks of {listed}, not of round {args.masks}")
        import numpy as np

        row = list(ck.metrics["round"]).index(args.masks) if args.masks in list(ck.metrics.get("round", [])) else None
        client_of, rank_of = ck.workers.get("client"), ck.workers.get("rank")
        pinned = client_of is None or all(np.all(np.isnan(c) | (c == np.arange(len(c)))) for c in client_of)
        for w, layers in enumerate(ck.masks[args.masks]):
            client, rank = w, w + 1  # one client a worker rank (and checkpoints from before clients)
            if row is not None and client_of is not None and np.isfinite(client_of[row, w]):
                client, rank = int(client_of[row, w]), int(rank_of[row, w])
            who = f"worker {w} (rank {rank})" if pinned else f"client {client} (rank {rank})"
            for layer, kept in layers.items():
                print(f"round {args.masks} {who} {layer}: {len(kept)} kept: {' '.join(map(str, kept))}")
        return 0
    if args.json:
        print(json.dumps({k: [float(x) for x in v] for k, v in ck.metrics.items()}))
    else:
        print(ckptmod.summary(ck))
    return 0


def evaluate(args) -> int:
    """The global model of a checkpoint on a test set: the run's own by default (the same
    images, chunks and figures as the run's evaluation of that round's model)."""
    import torch

    from . import analysis
    from . import data as datamod
    from .evaluation import evaluate as evaluate_model, per_class
    from .models import spec_of
    from .submodel import flat_from_state_dict, full_model, layout

    run = analysis.open_run(args.checkpoint)  # (a run directory or a checkpoint file)
    ck = run.checkpoint
    data = ck.config.get("data", {}) if isinstance(ck.config, dict) else {}
    name = args.data or data.get("name", "fashion-mnist")
    path = args.data_path if args.data_path is not None else (data.get("path", "") if not args.data else "")
    samples = args.samples if args.samples is not None else int(data.get("test_samples", 0))
    if samples < 0:
        raise UsageError(f"--samples {samples} must be >= 0")
    test = datamod.load_test_data(name, str(datamod.resolve_path(name, path)), samples)
    model_cfg = run.model_config
    model_name = model_cfg["name"]
    try:
        spec = spec_of(model_cfg, test.num_classes, tuple(int(s) for s in test.images.shape[1:]))
    except ValueError as exc:
        raise UsageError(f"{args.checkpoint}: {exc}") from None
    expect = {k: tuple(s) for k, s, _ in layout(spec)}
    if {k: tuple(v.shape) for k, v in ck.model.items()} != expect:
        raise UsageError(f"{args.checkpoint}: its {model_name} does not fit {name}'s images and classes")
    torch.set_num_threads(1)  # (the run's evaluation ran on one thread a rank: the same sums)
    model = full_model(spec, flat_from_state_dict(spec, ck.model))
    x = torch.from_numpy(datamod.normalize(test.images))
    y = torch.from_numpy(test.labels.astype("int64"))
    acc, loss = evaluate_model(model, x, y)
    seen, correct = per_class(model, x, y, test.num_classes)
    result = {
        "checkpoint": str(args.checkpoint), "round": ck.round, "data": name, "test_images": int(len(y)),
        "accuracy": acc, "loss": loss,
        "per_class": [{"class": c, "images": int(seen[c]), "accuracy": float(correct[c] / seen[c]) if seen[c] else None}
                      for c in range(test.num_classes)],
    }
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"{args.checkpoint}: round {ck.round}, {name}, {len(y)} test images: accuracy {acc:.4f}, loss {loss:.4f}")
    for row in result["per_class"]:
        shown = "-" if row["accuracy"] is None else f"{row['accuracy']:.4f}"
        print(f"  class {row['class']:3d}: {row['images']:6d} images, accuracy {shown}")
    return 0


def export(args) -> int:
    from . import export as exportmod

    try:
        meta = exportmod.write(args.checkpoint, args.out, args.format, args.keep)
    except exportmod.ExportError as exc:
        raise UsageError(str(exc)) from None
    print(f"{args.out}: {meta['model']} of round {meta['round']} at keep {meta['keep']} ({args.format}), widths {meta['widths']}")
    return 0


def validate(args) -> int:
    from . import checkpoint as ckptmod

    ck = ckptmod.validate(args.checkpoint)
    print(f"{args.checkpoint}: valid elfish-mpi checkpoint, round {ck.round}, strategy {ck.strategy}")
    return 0


def show_config(args) -> int:
    if args.keys:
        print(Config.describe())
        return 0
    print(json.dumps(load_config(args.config, args.set).to_dict(), indent=2))
    return 0


def _leave(code: int) -> None:
    """End a finished rank at once: what the interpreter's own exit would do that matters (the
    atexit handlers: a throttle's cgroup removed; MPI finalized; output flushed; the C exit
    handlers), without tearing down every module and object one by one, which took 1.6-2.2 s
    a rank with torch loaded and kept ``mpiexec`` from returning for 2.4 s after the summary
    line."""
    import atexit

    atexit._run_exitfuncs()
    try:
        MPI = sys.modules.get("mpi4py.MPI")  # (not imported: nothing to finalize)
        if MPI is not None and MPI.Is_initialized() and not MPI.Is_finalized():
            MPI.Finalize()
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass
        # The C library's exit, not os._exit: it runs the C-level exit handlers, and MPICH's
        # process-manager client says goodbye to the launcher in one of them; a process that
        # leaves without it makes MPICH's mpiexec end the others with SIGKILL.
        try:
            import ctypes

            ctypes.PyDLL(None).exit(int(code))  # (PyDLL: holding the GIL, no Python thread runs meanwhile)
        finally:
            os._exit(code)


def main(argv: list[str] | None = None) -> int:
    as_program = argv is None  # (called by the `elfish-mpi` script or `python -m elfish_mpi`)
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "train":
        if as_program and supervisor.wanted():  # run the rank as a child, to name it if it dies without a word
            return supervisor.run()
        from . import signals

        signals.install()  # catch a stop signal from the very start, before the heavy imports
        supervisor.attach()
    if argv and argv[0] in ("bench", "calibrate", "perf", "report"):  # commands with parsers of their own
        import importlib

        return importlib.import_module(f".{argv[0]}", __package__).main(argv[1:])
    parser = build_parser()
    args = parse_or_report(parser, argv, "elfish-mpi", under_mpi=argv[:1] == ["train"])
    if args is None:
        return 2
    if getattr(args, "version", False) and args.command is None:
        from .provenance import version_line

        print(version_line())
        return 0
    if args.command is None:
        parser.print_help()
        return 2
    if args.command == "train":
        code = train(args)
        if as_program:
            from . import signals

            signals.ignore_from_now()
            _leave(code)
        return code
    commands = {"inspect": inspect, "evaluate": evaluate, "export": export, "validate": validate, "config": show_config}
    try:
        return commands[args.command](args)
    except known_errors() as exc:
        print(f"elfish-mpi: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
