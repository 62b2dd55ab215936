"""Checkpoint size, write and read time with the mask history of a long run: format_version 2
(one packed-bit dataset a layer) against the layout of version 1 (a group a round and worker,
sorted int32 indices), which this version still reads (docs/benchmarks.md, section 11).

    python launch/bench/checkpoint_size.py

LeNet's three maskable layers, keep ratios drawn from 1, 0.5, 0.25 per worker and layer, random
masks; the same Checkpoint written by checkpoint.write and by the writer of version 1, taken
from the repository's history (commit 40e93c9, the last that wrote version 1: run it in a
git checkout).
"""
from __future__ import annotations

import os
import sys
import tempfile
import time

import numpy as np

from elfish_mpi import checkpoint as ck
from elfish_mpi.masking import make_masks
from elfish_mpi.models import lenet


V1_COMMIT = "40e93c9"


def version_1_writer():
    """checkpoint.py as it was when it wrote format_version 1 (from git), as a module."""
    import importlib.util
    import subprocess
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    text = subprocess.run(["git", "show", f"{V1_COMMIT}:elfish_mpi/checkpoint.py"], cwd=root, check=True,
                          capture_output=True, text=True).stdout
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "checkpoint_v1.py"
        path.write_text(text)
        spec = importlib.util.spec_from_file_location("checkpoint_v1", path)
        module = importlib.util.module_from_spec(spec)
        sys.modules["checkpoint_v1"] = module  # (dataclasses look their module up)
        spec.loader.exec_module(module)
    assert module.FORMAT_VERSION == 1
    return module


def main() -> int:
    spec = lenet()
    old = version_1_writer()
    print("| rounds | workers | version 1 size | version 2 size | version 1 write | version 2 write | version 1 read | version 2 read |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for rounds, workers in ((100, 4), (100, 16), (200, 64)):
        rng = np.random.default_rng(0)
        masks = {r: [make_masks(spec, {n: float(rng.choice([1.0, 0.5, 0.25])) for n in spec.maskable}, "random",
                                seed=0, round=r, worker=w) for w in range(workers)] for r in range(1, rounds + 1)}
        c = ck.Checkpoint(round=rounds, config={}, strategy="elfish", model={"w": np.zeros(10, np.float32)},
                          metrics={"round": np.arange(1, rounds + 1)}, workers={"keep_ratio": np.ones((rounds, workers))},
                          masks=masks, coverage={n: np.zeros(spec.full_widths()[n], np.int64) for n in spec.maskable},
                          profiles={}, state={})
        with tempfile.TemporaryDirectory() as d:
            v1, v2 = os.path.join(d, "v1.h5"), os.path.join(d, "v2.h5")
            t = time.perf_counter()
            ck.write(v2, c)
            write2 = time.perf_counter() - t
            t = time.perf_counter()
            old.write(v1, old.Checkpoint(**{k: getattr(c, k) for k in c.__dataclass_fields__}))
            write1 = time.perf_counter() - t
            t = time.perf_counter()
            r1 = ck.read(v1)
            read1 = time.perf_counter() - t
            t = time.perf_counter()
            r2 = ck.read(v2)
            read2 = time.perf_counter() - t
            same = all(np.array_equal(r1.masks[r][w][n], r2.masks[r][w][n]) for r in masks for w in range(workers) for n in spec.maskable)
            if not same:
                raise SystemExit("checkpoint_size.py: the two layouts read back different masks")
            print(f"| {rounds} | {workers} | {os.path.getsize(v1) / 1e6:.2f} MB | {os.path.getsize(v2) / 1e6:.3f} MB "
                  f"| {write1:.2f} s | {write2:.2f} s | {read1:.2f} s | {read2:.2f} s |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
