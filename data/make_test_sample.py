#!/usr/bin/env python3
"""Cut the small real-data samples kept under tests/data/ from full copies.

Fashion-MNIST (the first N train and M test images of the official IDX files,
written back as gzip'ed IDX with the official names):

    python data/make_test_sample.py fashion-mnist /usr/share/datasets/fashion-mnist \
        tests/data/fashion-mnist --train 3000 --test 1000

FEMNIST (all train and test images of the first K writers that have training
data, writer indices renumbered 0..K-1, same keys as the full npz):

    python data/make_test_sample.py femnist ../shared/datasets/femnist.npz \
        tests/data/femnist_sample.npz --writers 12

The output is byte-for-byte reproducible (gzip mtime 0).
"""

from __future__ import annotations

import argparse
import pathlib
import sys

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from elfish_mpi.data import _IDX_FILES, _find_idx, read_idx, write_idx  # noqa: E402


def idx_sample(src: pathlib.Path, out: pathlib.Path, counts: dict[str, int]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for split, n in counts.items():
        for stem in _IDX_FILES[split]:
            arr = read_idx(_find_idx(src, stem))
            if n > arr.shape[0]:
                raise SystemExit(f"{stem}: asked for {n} samples, source holds {arr.shape[0]}")
            dst = out / (stem + ".gz")
            write_idx(dst, arr[:n])
            print(f"{dst}: {arr[:n].shape}")


def femnist_sample(src: pathlib.Path, out: pathlib.Path, num_writers: int) -> None:
    with np.load(src, allow_pickle=False) as z:
        d = {k: z[k] for k in z.files}
    keep = np.unique(d["client_train"])[:num_writers]  # first writers with training data
    remap = {int(w): i for i, w in enumerate(keep)}
    res = {}
    for split in ("train", "test"):
        mask = np.isin(d[f"client_{split}"], keep)
        res[f"x_{split}"] = d[f"x_{split}"][mask]
        res[f"y_{split}"] = d[f"y_{split}"][mask]
        res[f"client_{split}"] = np.array(
            [remap[int(c)] for c in d[f"client_{split}"][mask]], dtype=d[f"client_{split}"].dtype
        )
    res["writers"] = d["writers"][keep]
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(out, **res)
    print(f"{out}: {len(keep)} writers, {res['x_train'].shape[0]} train / "
          f"{res['x_test'].shape[0]} test images, {out.stat().st_size} bytes")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="kind", required=True)
    a = sub.add_parser("fashion-mnist", help="IDX sample (works for MNIST too)")
    a.add_argument("src", type=pathlib.Path, help="directory with the four official IDX files")
    a.add_argument("out", type=pathlib.Path, help="output directory")
    a.add_argument("--train", type=int, default=3000, help="training samples to keep")
    a.add_argument("--test", type=int, default=1000, help="test samples to keep")
    b = sub.add_parser("femnist", help="FEMNIST npz sample of the first writers")
    b.add_argument("src", type=pathlib.Path, help="femnist.npz")
    b.add_argument("out", type=pathlib.Path, help="output .npz")
    b.add_argument("--writers", type=int, default=12, help="writers to keep")
    args = ap.parse_args(argv)
    if args.kind == "fashion-mnist":
        idx_sample(args.src, args.out, {"train": args.train, "test": args.test})
    else:
        femnist_sample(args.src, args.out, args.writers)


if __name__ == "__main__":
    main()
