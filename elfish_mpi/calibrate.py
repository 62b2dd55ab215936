"""``elfish-mpi calibrate``: measure how well a throttle makes workers as slow as asked.

Run under MPI, one rank per worker plus rank 0::

    mpiexec -n 5 elfish-mpi calibrate --throttle cgroup --capacity 1,1,0.5,0.25

Every worker attaches its throttle, takes a few untimed steps, then all start together
(barrier); under the cgroup throttle the workers first match their quotas as a training job
does (``--match-seconds``, :func:`worker.match_quotas`); then they train the full model for
``--steps`` steps on their share of the data.
Rank 0 prints, per worker, its busy time (wall seconds, or the virtual clock for the
virtual throttle), its achieved speed relative to a capacity-1 worker, the error against
the asked capacity and a verdict (OK within 20 %, else OFF).

Exit status (the same on every rank): 0 all workers within 20 %, 1 some worker off,
2 a usage, data or throttle error (one line on rank 0's stderr).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
import traceback

import numpy as np

from .cli import MPIParser, UsageError, parse_or_report
from .config import FLEETS
from .throttle import MODES, TOLERANCE, Throttle, ThrottleError

PROG = "elfish-mpi calibrate"


def build_parser() -> argparse.ArgumentParser:
    p = MPIParser(
        prog=PROG,
        description="Measure the achieved speed of throttled workers training the full model "
        "(run under MPI: mpiexec -n WORKERS+1 elfish-mpi calibrate ...).",
    )
    p.add_argument("--throttle", choices=MODES, default="sleep", help="throttle to calibrate (default: sleep)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--capacity", help="comma-separated capacity per worker, e.g. 1,1,0.5,0.25 (default: all 1)")
    g.add_argument("--fleet", choices=sorted(FLEETS), help="a named fleet, repeated over the workers")
    p.add_argument("--steps", type=int, default=30, help="timed training steps per worker (default: 30)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps before the timing (default: 3)")
    p.add_argument(
        "--match-seconds", type=float, default=2.0, metavar="S",
        help="cgroup: before the timing, scale each quota by the CPU per step a worker needed over the "
             "full-speed workers', measured over S seconds, as a training job does with workers.match_seconds "
             "(default: 2; 0: quotas as computed)",
    )
    p.add_argument("--model", default="lenet", help="model (default: lenet)")
    p.add_argument("--dataset", default="fashion-mnist", help="data set (default: fashion-mnist)")
    p.add_argument("--data", default="", metavar="PATH", help="data set path (default: the standard places)")
    p.add_argument("--batch-size", type=int, default=32, help="mini-batch size (default: 32)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per worker (default: 1)")
    p.add_argument("--job-id", default="", help="names the cgroups (default: derived from rank 0's pid)")
    return p


def parse_capacities(args, num_workers: int) -> list[float]:
    if args.capacity:
        try:
            caps = [float(x) for x in args.capacity.split(",") if x.strip()]
        except ValueError:
            raise UsageError(f"--capacity {args.capacity!r}: expected comma-separated numbers") from None
        if len(caps) != num_workers:
            raise UsageError(
                f"--capacity has {len(caps)} value(s) but the job has {num_workers} worker rank(s) "
                f"(mpiexec -n {len(caps) + 1} matches it)"
            )
    elif args.fleet:
        preset = FLEETS[args.fleet]
        caps = [float(preset[i % len(preset)]) for i in range(num_workers)]
    else:
        caps = [1.0] * num_workers
    for c in caps:
        if not (0.0 < c <= 1.0):
            raise UsageError(f"capacity {c:g} must be in (0, 1]")
    return caps


def _prepare(args, num_workers: int) -> dict:
    """Rank 0's checks: capacities, data set, model."""
    from . import data as datamod
    from .models import spec_of

    if num_workers < 1:
        raise UsageError("calibrate needs at least 2 MPI ranks: rank 0 reports, ranks 1.. are workers")
    if args.steps < 1 or args.batch_size < 1 or args.threads < 1 or args.warmup < 0 or not 0 <= args.match_seconds <= 600:
        raise UsageError("--steps, --batch-size and --threads must be >= 1, --warmup >= 0, --match-seconds in [0, 600]")
    caps = parse_capacities(args, num_workers)
    path = str(datamod.resolve_path(args.dataset, args.data))
    test = datamod.load_test_data(args.dataset, path, max_samples=1)
    in_shape = tuple(int(s) for s in test.images.shape[1:])
    try:
        spec_of({"name": args.model}, test.num_classes, in_shape)
    except ValueError as exc:
        raise UsageError(f"--model {args.model}: {exc}") from None
    return {
        "capacities": caps,
        "data_path": path,
        "num_classes": int(test.num_classes),
        "in_shape": in_shape,
        "job_id": args.job_id or f"cal{os.getpid()}",
    }


def _known_errors():
    from .data import DataError

    return (UsageError, DataError, ThrottleError, ValueError)


class _Work:
    """One worker's model, optimiser and data for the timed steps."""

    def __init__(self, args, setup: dict, index: int, num_workers: int):
        import torch

        from . import data as datamod
        from .models import spec_of
        from .optim import SGD

        torch.set_num_threads(args.threads)
        torch.manual_seed(index)
        need = args.batch_size * 8
        part = datamod.load_worker_data(
            args.dataset, setup["data_path"], num_workers, index, "iid", 0, max_samples=need
        )
        self.x = torch.from_numpy(datamod.normalize(part.images))
        self.y = torch.from_numpy(part.labels.astype(np.int64))
        spec = spec_of({"name": args.model}, setup["num_classes"], tuple(setup["in_shape"]))
        self.model = spec.init_module()
        self.opt = SGD(self.model.parameters(), lr=0.01)
        self.batch_size, self.cursor = args.batch_size, 0

    def batch(self):
        n = len(self.y)
        idx = (np.arange(self.batch_size) + self.cursor) % n
        self.cursor = (self.cursor + self.batch_size) % n
        return self.x[idx], self.y[idx]


def _table(rows: np.ndarray, caps: list[float], mode: str, details: list[str]) -> tuple[str, bool]:
    """Rank 0's report from the workers' rows [busy_wall, virtual, cpu]."""
    busy_wall, virtual, cpu = rows[:, 0], rows[:, 1], rows[:, 2]
    clock = virtual if mode == "virtual" else busy_wall
    caps_a = np.asarray(caps, dtype=np.float64)
    full = caps_a >= 1.0
    if full.any():
        # Full speed is what a capacity-1 worker achieves: the median over them, not the
        # fastest (the fastest of several equally throttled workers is biased by their noise:
        # every other worker would look slower than it is).
        ref = float(np.median(clock[full]))
        ref_note = "the capacity-1 workers' median"
    else:
        ref = float((clock * caps_a).min())  # what the best worker implies for full speed
        ref_note = "the minimum busy time x capacity"
    lines = [
        f"{PROG}: throttle {mode}, {len(caps)} worker(s); busy time = "
        + ("virtual clock (CPU s / capacity)" if mode == "virtual" else "wall seconds")
        + f"; speed relative to {ref_note}",
    ]
    lines += [f"  worker {i + 1}: {d}" for i, d in enumerate(details)]
    lines.append(f"{'worker':>6} {'capacity':>8} {'busy_s':>8} {'wall_s':>8} {'cpu_s':>7} {'speed':>6} {'error':>7}  verdict")
    ok_all = True
    for i, c in enumerate(caps):
        speed = ref / clock[i] if clock[i] > 0 else float("inf")
        err = speed / c - 1.0
        ok = abs(err) <= TOLERANCE
        ok_all &= ok
        lines.append(
            f"{i + 1:>6} {c:>8.3g} {clock[i]:>8.3f} {busy_wall[i]:>8.3f} {cpu[i]:>7.3f} {speed:>6.3f} "
            f"{err * 100:>+6.1f}%  {'OK' if ok else 'OFF'}"
        )
    lines.append(
        f"{PROG}: " + ("all workers within" if ok_all else "some workers are off by more than") + f" {TOLERANCE:.0%}"
    )
    return "\n".join(lines), ok_all


def run(comm, args) -> int:
    num_workers = comm.size - 1
    # -- rank 0 checks, everyone learns the outcome ---------------------------------
    setup, error = comm.from_root(lambda: _prepare(args, num_workers), _known_errors())
    if error:
        if comm.rank == 0:
            print(f"{PROG}: error: {error}", file=sys.stderr, flush=True)
        return 2

    # -- workers attach their throttles; errors agreed on through rank 0 -------------
    peers = comm.core_peers()
    throttle, work, error, detail = None, None, None, ""
    if comm.rank > 0:
        index = comm.rank - 1
        local = [r - 1 for r in peers if r > 0]
        try:
            work = _Work(args, setup, index, num_workers)
            throttle = Throttle(setup["capacities"][index], args.throttle)
            throttle.attach(
                worker=index, num_workers=num_workers, job_id=setup["job_id"],
                capacities=setup["capacities"], local_workers=local, threads=args.threads,
            )
            detail = throttle.detail
        except _known_errors() as exc:
            error = str(exc)
        except Exception as exc:
            error = f"rank {comm.rank}: {type(exc).__name__}: {exc}\n{traceback.format_exc()}"
    verdict = comm.agree(error)
    details = (comm.gather_obj(detail) or [None])[1:]  # each worker's throttle, for the table
    try:
        if verdict:
            if comm.rank == 0:
                print(f"{PROG}: error: {verdict}", file=sys.stderr, flush=True)
            return 2

        # -- the timed steps -----------------------------------------------------------
        from .worker import match_quotas, train_step

        row = np.zeros(3)
        if comm.rank > 0:
            for _ in range(args.warmup):
                throttle.run(train_step, work.model, work.opt, *work.batch())
        comm.barrier()  # every worker starts at once, under the same load
        if args.throttle == "cgroup" and args.match_seconds > 0:  # as a training job does (workers.match_seconds)
            step = (lambda: train_step(work.model, work.opt, *work.batch())) if comm.rank > 0 else None
            match_quotas(comm, throttle, step, setup["capacities"], args.match_seconds)
            details = (comm.gather_obj(throttle.detail if throttle is not None else "") or [None])[1:]
            comm.barrier()
        if comm.rank > 0:
            virtual = 0.0
            t0, c0 = time.perf_counter(), time.process_time()
            for _ in range(args.steps):
                _, t = throttle.run(train_step, work.model, work.opt, *work.batch())
                virtual += t.virtual
            row[:] = [time.perf_counter() - t0, virtual, time.process_time() - c0]
        rows = comm.gather_rows(row)
        if comm.rank == 0:
            text, ok = _table(rows[1:], setup["capacities"], args.throttle, details)
            print(text, flush=True)
            code = comm.bcast_obj(0 if ok else 1)
        else:
            code = comm.bcast_obj(None)
        return int(code)
    finally:
        if throttle is not None:
            throttle.detach()


def main(argv: list[str] | None = None) -> int:
    """``elfish-mpi calibrate [options]`` under MPI; returns the exit status (same on every rank)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parse_or_report(parser, argv, PROG, under_mpi=True)
    if args is None:
        return 2
    from .comm import Comm

    comm = Comm()
    try:
        return run(comm, args)
    except Exception as exc:  # an unexpected failure after the agreement points: end the whole job
        print(f"{PROG}: rank {comm.rank}: {type(exc).__name__}: {exc}\n{traceback.format_exc()}", file=sys.stderr, flush=True)
        comm.abort(1)
        return 1


if __name__ == "__main__":
    sys.exit(main())
