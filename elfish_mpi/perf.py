"""Micro-benchmarks behind docs/benchmarks.md: ``elfish-mpi perf soft-training|transport``.

- ``soft-training``: seconds per training step of the physically smaller sub-network at
  keep ratio r (every neuron group at r), against the multiply-accumulate count's
  prediction, per model. Single process; real images (CIFAR-10 for alexnet and resnet18,
  Fashion-MNIST for the others).
- ``transport`` (under MPI): the time rank 0 needs to receive and fold the round's updates
  by each transport: ``gather`` (every worker sends its kept values; rank 0 scatters them)
  and ``reduce`` (an MPI sum of dense weighted updates and coverage), at given keep ratios;
  both ends run the round loop's own code (transport.py).
- ``overhead CHECKPOINT...``: the share of a run's time (start-up profiling plus the rounds'
  wall clock) not spent in local training by each round's slowest worker.
- ``communication CHECKPOINT...``: bytes each worker sent per round against its keep ratio.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time

import numpy as np


CIFAR_MODELS = ("alexnet", "resnet18")  # measured on CIFAR-10 images; the others on Fashion-MNIST


def _real_batch(model: str, data_path: str, batch: int):
    import torch

    from . import data as datamod

    name = "cifar10" if model in CIFAR_MODELS else "fashion-mnist"
    split = datamod.load_test_data(name, datamod.resolve_path(name, data_path), max_samples=max(batch, 256))
    x = torch.from_numpy(datamod.normalize(split.images))
    y = torch.from_numpy(split.labels.astype(np.int64))
    return x, y, split.num_classes, tuple(split.images.shape[1:])


def soft_training(args) -> int:
    import torch

    from .masking import compute_ratio, make_masks
    from .models import get_spec
    from .submodel import build_submodel, flat_params
    from .optim import SGD
    from .worker import train_step

    torch.set_num_threads(args.threads)
    ratios = [float(r) for r in args.ratios.split(",")]
    print(f"soft-training step time, batch {args.batch_size}, {args.steps} steps x {args.repeats} repeats, "
          f"{args.threads} thread(s); median of repeats\n")
    print("| model | keep ratio | MACs share | ms / step | measured speed-up | predicted speed-up (MACs) |")
    print("|---|---|---|---|---|---|")
    for model in args.models.split(","):
        data_path = args.cifar_path if model in CIFAR_MODELS else args.fashion_path
        x, y, classes, shape = _real_batch(model, data_path, args.batch_size)
        spec = get_spec(model, classes, shape, args.norm)
        torch.manual_seed(0)
        full = flat_params(spec.init_module())
        nets = {}
        for r in ratios:
            kept = make_masks(spec, {n: r for n in spec.maskable}, "random", seed=0, round=1, worker=0)
            net, _ = build_submodel(spec, kept, full)
            nets[r] = (net, SGD(net.parameters(), lr=0.01), compute_ratio(spec, kept))
        times = {r: [] for r in ratios}
        n = len(y)
        for rep in range(args.repeats):  # interleave ratios so that machine noise hits all alike
            for r in ratios:
                net, opt, _ = nets[r]
                train_step(net, opt, x[: args.batch_size], y[: args.batch_size])  # warm-up
                t0 = time.perf_counter()
                for s in range(args.steps):
                    i = (s * args.batch_size) % max(n - args.batch_size, 1)
                    train_step(net, opt, x[i : i + args.batch_size], y[i : i + args.batch_size])
                times[r].append((time.perf_counter() - t0) / args.steps)
        base = statistics.median(times[ratios[0]])
        base_macs = nets[ratios[0]][2]
        for r in ratios:
            t = statistics.median(times[r])
            share = nets[r][2]
            print(f"| {model} | {r:.2f} | {share:.3f} | {1e3 * t:.2f} | {base / t:.2f}x | {base_macs / share:.2f}x |")
    return 0


def transport(args) -> int:
    from .comm import Comm
    from .masking import make_masks
    from .models import get_spec
    from .submodel import num_params, param_index
    from .protocol import new_update
    from .aggregation import RoundSums
    from .transport import Outbox, payload, receive

    comm = Comm()
    workers = comm.size - 1
    if workers < 1:
        print("elfish-mpi perf transport: run it under mpiexec with at least 2 ranks", file=sys.stderr)
        return 2
    shape = (1, 28, 28) if args.model == "lenet" else (3, 32, 32)
    spec = get_spec(args.model, 10, shape)
    keep = [float(r) for r in args.keep.split(",")] if args.keep else [1.0] * workers
    keep = [keep[i % len(keep)] for i in range(workers)]
    masks = [make_masks(spec, {n: keep[w] for n in spec.maskable}, "random", seed=0, round=1, worker=w) for w in range(workers)]
    idxs = [param_index(spec, m) for m in masks]
    size = num_params(spec)
    rng = np.random.default_rng(comm.rank)
    results = {}
    for mode in ("gather", "reduce"):
        samples = []
        for rep in range(args.repeats + 1):
            comm.barrier()
            t0 = time.perf_counter()
            if comm.rank == 0:  # the round loop's own receive and fold (transport.py, aggregation.RoundSums)
                sums = RoundSums(size)
                records, summed = receive(comm, mode, list(range(1, workers + 1)), [len(i) for i in idxs], size, 600,
                                          lambda w, rec, values: sums.add(idxs[w], values, rec["weight"]))
                if summed is not None:
                    sums.add_sums(summed[0], summed[1], float(records["weight"].sum()))
            else:  # a worker's own payload and send
                idx = idxs[comm.rank - 1]
                delta = rng.standard_normal(len(idx)).astype(np.float32)
                outbox = Outbox(comm, mode, size, 600)
                outbox.send(new_update(client=comm.rank - 1, weight=1.0), payload(mode, size, idx, delta, 1.0, True))
                outbox.close()
            comm.barrier()
            if rep:  # the first repetition warms up
                samples.append(time.perf_counter() - t0)
        results[mode] = statistics.median(samples)
    if comm.rank == 0:
        sent = {"gather": 4 * sum(len(i) for i in idxs), "reduce": 16 * size * workers}
        print(f"transport, {args.model} ({size} parameters), {workers} workers, keep {keep}, median of {args.repeats}\n")
        print("| transport | ms per round | bytes sent by workers per round |")
        print("|---|---|---|")
        for mode in ("gather", "reduce"):
            print(f"| {mode} | {1e3 * results[mode]:.2f} | {sent[mode]:,} |")
    return 0


def overhead(args) -> int:
    """Share of a run's time not spent in local training, from its checkpoint.

    The run's time is the start-up profiling plus the wall clock of the rounds (evaluation
    and checkpoint writing overlap the next round's training, except after the last round).
    Local training is, per round, the busy time of the round's slowest worker; the rest of
    a round (planning, broadcast, collecting, aggregation, and rank 0's evaluation where it
    outlasts the workers' training) is overhead."""
    from . import checkpoint as ckptmod

    print("| run | rounds | median round (s) | local training | rest of the rounds | profiling | overhead share | overhead without profiling |")
    print("|---|---|---|---|---|---|---|---|")
    for path in args.checkpoints:
        ck = ckptmod.read(path, load_masks=False)
        m, w = ck.metrics, ck.workers
        rt = np.asarray(m["round_time"], dtype=float)
        busy = np.asarray(w["busy_time"], dtype=float).max(axis=1).sum()  # the round's last worker
        prof = float(np.asarray(ck.profiles.get("profiling_time", [0.0])).sum())
        rounds_wall = float(np.asarray(m["wall_clock"], dtype=float)[-1])
        total = rounds_wall + prof
        rest = rounds_wall - busy
        print(f"| {path} | {len(rt)} | {np.median(rt):.3f} | {busy / total:.1%} | {rest / total:.1%} | "
              f"{prof / total:.1%} | {(rest + prof) / total:.1%} | {rest / rounds_wall:.1%} |")
    return 0


def communication(args) -> int:
    """Bytes each worker sent per round against its keep ratio, from a checkpoint."""
    from . import checkpoint as ckptmod

    print("| run | worker (rank) | mean keep ratio | mean compute ratio | bytes sent per round | share of a full update |")
    print("|---|---|---|---|---|---|")
    for path in args.checkpoints:
        ck = ckptmod.read(path, load_masks=False)
        w = ck.workers
        full = 4.0 * sum(int(np.asarray(v).size) for v in ck.model.values())
        sent = np.asarray(w["bytes_sent"], dtype=float)
        keep = np.asarray(w["keep_ratio"], dtype=float)
        comp = np.asarray(w.get("compute_ratio", np.full_like(keep, np.nan)), dtype=float)
        for i in range(sent.shape[1]):
            print(f"| {path} | {i + 1} | {keep[:, i].mean():.3f} | {comp[:, i].mean():.3f} | "
                  f"{sent[:, i].mean():,.0f} | {sent[:, i].mean() / full:.1%} |")
    return 0


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="elfish-mpi perf", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="what", required=True)
    s = sub.add_parser("soft-training", help="step time of sub-networks at keep ratios r")
    s.add_argument("--models", default="lenet,alexnet")
    s.add_argument("--ratios", default="1,0.75,0.5,0.25")
    s.add_argument("--batch-size", type=int, default=32)
    s.add_argument("--steps", type=int, default=20)
    s.add_argument("--repeats", type=int, default=7)
    s.add_argument("--threads", type=int, default=1)
    s.add_argument("--norm", default="static-bn", help="resnet18's model.norm")
    s.add_argument("--fashion-path", default="", help="Fashion-MNIST location (default: the standard places)")
    s.add_argument("--cifar-path", default="", help="CIFAR-10 location (default: the standard places)")
    t = sub.add_parser("transport", help="gather vs reduce of the round's updates (run under mpiexec)")
    t.add_argument("--model", default="lenet", choices=("lenet", "alexnet"))
    t.add_argument("--keep", default="", help="keep ratio per worker, comma separated (cycled)")
    t.add_argument("--repeats", type=int, default=20)
    o = sub.add_parser("overhead", help="share of a run's time not spent in local training (from checkpoints)")
    o.add_argument("checkpoints", nargs="+")
    c = sub.add_parser("communication", help="bytes sent per round against keep ratio (from checkpoints)")
    c.add_argument("checkpoints", nargs="+")
    args = p.parse_args(argv)
    return {"soft-training": soft_training, "transport": transport, "overhead": overhead,
            "communication": communication}[args.what](args)
