"""What the evaluation and a training step cost in CPU time on one core (docs/benchmarks.md,
section 10): LeNet's evaluation of the Fashion-MNIST test set layer by layer, in the chunks
and with the pooling that ``evaluation.evaluate_chunks`` uses, and a LeNet training step of
a batch with ``optim.SGD`` (what the workers run) and with ``torch.optim.SGD``.

    python launch/bench/cpu_costs.py [--images 10000] [--repeats 3]

Each figure is the median over the repeats of the process CPU time (one torch thread).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from elfish_mpi import data as datamod  # noqa: E402
from elfish_mpi.evaluation import CHUNK, evaluate_chunks  # noqa: E402
from elfish_mpi.models import get_spec, max_pool  # noqa: E402
from elfish_mpi.optim import SGD  # noqa: E402


def cpu(fn) -> float:
    t = time.process_time()
    fn()
    return time.process_time() - t


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=10000, help="test images (0: all)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--steps", type=int, default=200, help="training steps timed per repeat")
    p.add_argument("--batch", type=int, default=32)
    a = p.parse_args()
    torch.set_num_threads(1)
    test = datamod.load_test_data("fashion-mnist", str(datamod.resolve_path("fashion-mnist", "")), a.images)
    x = torch.from_numpy(datamod.normalize(test.images))
    y = torch.from_numpy(test.labels.astype("int64"))
    spec = get_spec("lenet", test.num_classes, tuple(test.images.shape[1:]))
    torch.manual_seed(0)
    m = spec.init_module().eval()
    chunks = [x[i : i + CHUNK] for i in range(0, len(y), CHUNK)]

    def layers() -> dict[str, float]:  # LeNet's chain: conv1, relu, pool, conv2, relu, pool, fc1, relu, fc2
        t = dict.fromkeys(("conv1", "conv2", "pooling", "relu", "fc1", "fc2"), 0.0)
        with torch.inference_mode():
            for xs in chunks:
                for conv in ("conv1", "conv2"):
                    c0 = time.process_time()
                    xs = getattr(m, conv)(xs)
                    c1 = time.process_time()
                    xs = F.relu(xs)
                    c2 = time.process_time()
                    xs = max_pool(xs, 2)
                    c3 = time.process_time()
                    t[conv] += c1 - c0
                    t["relu"] += c2 - c1
                    t["pooling"] += c3 - c2
                xs = xs.flatten(1)
                c0 = time.process_time()
                xs = F.relu(m.fc1(xs))
                c1 = time.process_time()
                m.fc2(xs)
                t["fc1"] += c1 - c0
                t["fc2"] += time.process_time() - c1
        return t

    whole = [cpu(lambda: evaluate_chunks(m, x, y)) for _ in range(a.repeats)]
    parts = [layers() for _ in range(a.repeats)]
    print(f"LeNet evaluation of {len(y)} Fashion-MNIST test images in chunks of {CHUNK}, one thread, "
          f"median of {a.repeats} (CPU seconds):")
    print(f"  evaluate_chunks: {statistics.median(whole):.3f}")
    for k in parts[0]:
        print(f"  {k:8s} {statistics.median([q[k] for q in parts]):.3f}")

    xb, yb = x[: a.batch], y[: a.batch]

    def steps(make) -> float:
        torch.manual_seed(0)
        net = spec.init_module()
        opt = make(net.parameters())

        def run(n):
            for _ in range(n):
                opt.zero_grad(set_to_none=True)
                F.cross_entropy(net(xb), yb).backward()
                opt.step()
        run(10)  # (warm-up)
        return cpu(lambda: run(a.steps)) / a.steps

    ours, ref = [], []
    for _ in range(a.repeats):  # (alternated)
        ours.append(steps(lambda ps: SGD(ps, lr=0.05)))
        ref.append(steps(lambda ps: torch.optim.SGD(ps, lr=0.05)))
    print(f"LeNet training step, batch {a.batch}, {a.steps} steps, median of {a.repeats} (CPU ms a step):")
    print(f"  optim.SGD        {1e3 * statistics.median(ours):.2f}")
    print(f"  torch.optim.SGD  {1e3 * statistics.median(ref):.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
