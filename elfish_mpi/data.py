"""Data sets, partitions and loading for elfish-mpi.

This module is pure: it needs numpy only (Pillow is imported lazily, and only
to decode the CIFAR-10 JPEG npz).  It never unpickles anything: npz files are
read with ``allow_pickle=False`` and the pickled CIFAR-10 "python" batches are
not supported (use the official *binary* batches instead).

Supported formats (see data/README.md for the full description):

* ``fashion-mnist`` / ``mnist``: a directory holding the four official IDX
  files (gzip'ed or raw), or a Keras-layout npz (``x_train``, ``y_train``,
  ``x_test``, ``y_test``).
* ``femnist``: an npz with ``x_*``, ``y_*`` and ``client_*`` (writer index),
  or a LEAF JSON directory (``train/*.json``, ``test/*.json``).
* ``cifar10``: a directory with the CIFAR-10 binary batches, or the JPEG npz
  ``cifar10_jpeg.npz`` (``jpeg_*``, ``offsets_*``, ``y_*``).
* ``npz``: any Keras-layout npz given by path.

Images are kept as uint8 (N, C, H, W) until the caller has taken its subset;
:func:`normalize` turns that subset into float32.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import pathlib
import zipfile
import zlib
from dataclasses import dataclass
from typing import Callable

import numpy as np

__all__ = [
    "DATASETS",
    "PARTITIONS",
    "DataError",
    "Split",
    "resolve_path",
    "load_split",
    "normalize",
    "partition",
    "load_worker_data",
    "load_test_data",
    "read_idx",
    "write_idx",
]


class DataError(ValueError):
    """Clear, user-facing message (names the path(s) tried and what was wrong)."""


DATASETS = ("fashion-mnist", "mnist", "femnist", "cifar10", "npz")
PARTITIONS = ("iid", "dirichlet", "shards", "natural")
SPLITS = ("train", "test")

_NUM_CLASSES = {"fashion-mnist": 10, "mnist": 10, "femnist": 62, "cifar10": 10}

# Names looked for under every search directory, in order.
_CANDIDATES = {
    "fashion-mnist": ("fashion-mnist", "fashion-mnist.npz", "fashion_mnist.npz"),
    "mnist": ("mnist", "mnist.npz"),
    "femnist": ("femnist", "femnist.npz"),
    "cifar10": ("cifar10", "cifar-10-batches-bin", "cifar10_jpeg.npz", "cifar10.npz"),
    "npz": (),
}

_IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_IDX_IMAGES_MAGIC = 0x00000803
_IDX_LABELS_MAGIC = 0x00000801

_CIFAR_TRAIN = tuple(f"data_batch_{i}.bin" for i in range(1, 6))
_CIFAR_TEST = ("test_batch.bin",)
_CIFAR_RECORD = 1 + 3 * 32 * 32

_NPZ_ERRORS = (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error, KeyError)


@dataclass
class Split:
    images: np.ndarray  # uint8, shape (N, C, H, W)  (C=1 for grey, 3 for CIFAR)
    labels: np.ndarray  # int64, shape (N,)
    num_classes: int
    groups: np.ndarray | None  # int64 (N,) writer/client id per sample (FEMNIST), else None

    def __len__(self) -> int:
        return int(self.labels.shape[0])


# --------------------------------------------------------------------------- paths


def _check_name(name: str) -> None:
    if name not in DATASETS:
        raise DataError(f"unknown data set {name!r}; choose one of {', '.join(DATASETS)}")


def _usable(name: str, p: pathlib.Path) -> str:
    """'' when `p` looks like a copy of data set `name`, else the reason it does not."""
    if not p.exists():
        return "missing"
    if p.is_file():
        return "" if p.suffix == ".npz" else "not an npz file"
    if name in ("fashion-mnist", "mnist"):
        imgs = _IDX_FILES["train"][0]
        if (p / imgs).is_file() or (p / (imgs + ".gz")).is_file():
            return ""
        return f"directory without {imgs}[.gz]"
    if name == "femnist":
        if _leaf_root(p) is not None:
            return ""
        return "directory without LEAF train/ and test/ JSON folders"
    if name == "cifar10":
        if _cifar_root(p) is not None:
            return ""
        return "directory without CIFAR-10 binary batches"
    return "a directory, not an npz file"


def resolve_path(name: str, path: str = "") -> pathlib.Path:
    """Where the data set lives.

    If `path` is non-empty it is used as given (file or directory) and must exist;
    a directory that is not itself in a known format but holds the data set under
    one of its usual names (e.g. ``mnist.npz``) resolves to that entry.
    Otherwise these places are tried in order, for each of the data set's usual
    names (e.g. ``mnist`` and ``mnist.npz``):

    1. ``$ELFISH_DATA/<name>`` (when ``ELFISH_DATA`` is set),
    2. ``/usr/share/datasets/<name>`` (Debian's ``dataset-fashion-mnist``),
    3. ``~/.cache/elfish-mpi/<name>``,
    4. ``../shared/datasets/<name>`` relative to the current directory.

    Raises DataError listing every place tried.
    """
    _check_name(name)
    if path:
        p = pathlib.Path(path).expanduser()
        if not p.exists():
            raise DataError(f"{name} data path {str(p)!r} does not exist")
        if p.is_dir() and _usable(name, p):
            # A directory holding the data set under one of its usual names,
            # e.g. ../shared/datasets for mnist -> ../shared/datasets/mnist.npz.
            for cand in _CANDIDATES[name]:
                if not _usable(name, p / cand):
                    return p / cand
        return p
    if name == "npz":
        raise DataError("data set 'npz' needs an explicit path to a Keras-layout .npz file")

    bases: list[pathlib.Path] = []
    tried: list[str] = []
    env = os.environ.get("ELFISH_DATA", "")
    if env:
        bases.append(pathlib.Path(env).expanduser())
    else:
        tried.append("$ELFISH_DATA (not set)")
    bases.append(pathlib.Path("/usr/share/datasets"))
    try:
        bases.append(pathlib.Path.home() / ".cache" / "elfish-mpi")
    except RuntimeError:  # no home directory
        tried.append("~/.cache/elfish-mpi (no home directory)")
    bases.append(pathlib.Path.cwd().parent / "shared" / "datasets")

    for base in bases:
        for cand in _CANDIDATES[name]:
            p = base / cand
            why = _usable(name, p)
            if not why:
                return p
            tried.append(f"{p} ({why})")
    lines = "\n  - ".join(tried)
    raise DataError(
        f"could not find the {name} data set. Tried:\n  - {lines}\n"
        "Pass its path explicitly or set ELFISH_DATA to a directory holding it "
        "(see data/README.md)."
    )


# --------------------------------------------------------------------------- IDX


def _open_maybe_gzip(path: pathlib.Path):
    with open(path, "rb") as f:
        head = f.read(2)
    if head == b"\x1f\x8b":
        return gzip.open(path, "rb")
    return open(path, "rb")


def _readinto_exact(f, buf: np.ndarray) -> int:
    view = memoryview(buf).cast("B")
    got = 0
    while got < len(view):
        n = f.readinto(view[got:])
        if not n:
            break
        got += n
    return got


def _idx_header(f, path: pathlib.Path) -> tuple[int, tuple[int, ...]]:
    head = f.read(4)
    if len(head) < 4:
        raise DataError(f"{path}: truncated IDX file (no header)")
    magic = int.from_bytes(head, "big")
    if head[0] != 0 or head[1] != 0 or head[2] != 0x08 or not 1 <= head[3] <= 4:
        raise DataError(f"{path}: not an unsigned-byte IDX file (magic 0x{magic:08x})")
    ndim = head[3]
    raw = f.read(4 * ndim)
    if len(raw) < 4 * ndim:
        raise DataError(f"{path}: truncated IDX header")
    dims = tuple(int.from_bytes(raw[4 * i : 4 * i + 4], "big") for i in range(ndim))
    return magic, dims


def _read_rows(f, dims: tuple[int, ...], rows, path: pathlib.Path) -> np.ndarray:
    """Only ``rows`` (first-axis indices, any order) of an IDX body, read in blocks of about
    4 MiB: memory is the rows kept plus one block, not the whole file."""
    rows = np.asarray(rows, dtype=np.int64).ravel()
    if rows.size and (rows.min() < 0 or rows.max() >= dims[0]):
        raise DataError(f"{path}: rows {rows.min()}..{rows.max()} asked of a file of {dims[0]}")
    order = np.argsort(rows, kind="stable")
    wanted = rows[order]
    row_bytes = int(np.prod(dims[1:], dtype=np.int64))
    out = np.empty((rows.size,) + tuple(dims[1:]), dtype=np.uint8)
    block = np.empty((max(1, (4 << 20) // max(row_bytes, 1)),) + tuple(dims[1:]), dtype=np.uint8)
    done = 0
    for start in range(0, dims[0], block.shape[0]):
        n = min(block.shape[0], dims[0] - start)
        got = _readinto_exact(f, block[:n])
        if got < n * row_bytes:
            raise DataError(
                f"{path}: truncated IDX file: header says {dims[0] * row_bytes} data bytes {dims}, "
                f"found {start * row_bytes + got}"
            )
        stop = int(np.searchsorted(wanted, start + n))
        out[order[done:stop]] = block[wanted[done:stop] - start]
        done = stop
    return out


def read_idx(path: str | os.PathLike, expect_magic: int | None = None, header_only: bool = False, rows=None):
    """Read an IDX file (gzip'ed or raw) into a uint8 array shaped like its header.

    With ``header_only`` return ``(magic, dims)`` without reading the data; with ``rows``
    only those first-axis entries (in the order given), never holding the whole file.
    Any problem raises DataError naming the file.
    """
    path = pathlib.Path(path)
    try:
        with _open_maybe_gzip(path) as f:
            magic, dims = _idx_header(f, path)
            if expect_magic is not None and magic != expect_magic:
                raise DataError(
                    f"{path}: wrong IDX magic 0x{magic:08x}, expected 0x{expect_magic:08x}"
                )
            if header_only:
                return magic, dims
            if rows is not None:
                out = _read_rows(f, dims, rows, path)
                if f.read(1):
                    raise DataError(f"{path}: IDX file is longer than its header says {dims}")
                return out
            size = int(np.prod(dims, dtype=np.int64))
            out = np.empty(dims, dtype=np.uint8)
            got = _readinto_exact(f, out)
            if got < size:
                raise DataError(
                    f"{path}: truncated IDX file: header says {size} data bytes {dims}, found {got}"
                )
            if f.read(1):
                raise DataError(f"{path}: IDX file is longer than its header says {dims}")
            return out
    except DataError:
        raise
    except (OSError, EOFError, zlib.error) as e:
        raise DataError(f"{path}: cannot read IDX file: {e}") from None


def write_idx(path: str | os.PathLike, array: np.ndarray) -> None:
    """Write a uint8 array as an IDX file; gzip'ed (reproducibly) when the name ends in .gz."""
    arr = np.ascontiguousarray(array, dtype=np.uint8)
    if not 1 <= arr.ndim <= 4:
        raise DataError(f"{path}: IDX needs 1 to 4 dimensions, got {arr.ndim}")
    header = bytes([0, 0, 0x08, arr.ndim]) + b"".join(
        int(d).to_bytes(4, "big") for d in arr.shape
    )
    path = pathlib.Path(path)
    with open(path, "wb") as raw:
        if path.suffix == ".gz":
            with gzip.GzipFile(filename="", mode="wb", fileobj=raw, compresslevel=9, mtime=0) as f:
                f.write(header)
                f.write(arr.tobytes())
        else:
            raw.write(header)
            raw.write(arr.tobytes())


def _find_idx(root: pathlib.Path, stem: str) -> pathlib.Path:
    for cand in (root / (stem + ".gz"), root / stem):
        if cand.is_file():
            return cand
    raise DataError(f"{root}: missing IDX file {stem}[.gz]")


# --------------------------------------------------------------------------- sources


@dataclass
class _Source:
    """Labels (and groups) read eagerly; images read only for the indices asked for."""

    labels: np.ndarray
    groups: np.ndarray | None
    num_classes: int
    fetch: Callable[[np.ndarray | None], np.ndarray]
    where: str

    def take(self, idx: np.ndarray | None = None) -> Split:
        images = self.fetch(idx)
        labels = self.labels if idx is None else self.labels[idx]
        groups = self.groups if (self.groups is None or idx is None) else self.groups[idx]
        if images.shape[0] != labels.shape[0]:
            raise DataError(
                f"{self.where}: {images.shape[0]} images but {labels.shape[0]} labels"
            )
        return Split(
            images=images,
            labels=np.ascontiguousarray(labels, dtype=np.int64),
            num_classes=self.num_classes,
            groups=None if groups is None else np.ascontiguousarray(groups, dtype=np.int64),
        )


def _check_labels(labels: np.ndarray, num_classes: int, where: str) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.ndim == 2 and labels.shape[1] == 1:
        labels = labels[:, 0]
    if labels.ndim != 1:
        raise DataError(f"{where}: labels must be 1-D, got shape {labels.shape}")
    if labels.dtype.kind not in "iu":
        raise DataError(f"{where}: labels must be integers, got {labels.dtype}")
    labels = labels.astype(np.int64)
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise DataError(
            f"{where}: labels must lie in 0..{num_classes - 1}, "
            f"found {labels.min()}..{labels.max()}"
        )
    return labels


def _subset(arr: np.ndarray, idx: np.ndarray | None) -> np.ndarray:
    return arr if idx is None else arr[idx]


def _idx_source(root: pathlib.Path, split: str, num_classes: int) -> _Source:
    img_path = _find_idx(root, _IDX_FILES[split][0])
    lab_path = _find_idx(root, _IDX_FILES[split][1])
    labels = read_idx(lab_path, _IDX_LABELS_MAGIC)
    if labels.ndim != 1:
        raise DataError(f"{lab_path}: label IDX must be 1-D, got {labels.shape}")
    _, dims = read_idx(img_path, _IDX_IMAGES_MAGIC, header_only=True)
    if len(dims) != 3:
        raise DataError(f"{img_path}: image IDX must be 3-D (N, H, W), got {dims}")
    if dims[0] != labels.shape[0]:
        raise DataError(
            f"{img_path} holds {dims[0]} images but {lab_path} holds {labels.shape[0]} labels"
        )
    labels = _check_labels(labels, num_classes, str(lab_path))

    def fetch(idx):  # a worker's part: only its rows are ever held
        imgs = read_idx(img_path, _IDX_IMAGES_MAGIC, rows=idx)
        if imgs.shape[1:] != dims[1:] or (idx is None and imgs.shape != dims):
            raise DataError(f"{img_path}: changed while reading")
        return np.ascontiguousarray(imgs[:, None, :, :])

    return _Source(labels, None, num_classes, fetch, str(img_path))


def _npz_open(path: pathlib.Path):
    try:
        return np.load(path, allow_pickle=False)
    except _NPZ_ERRORS as e:
        raise DataError(f"{path}: cannot read npz file: {e}") from None


def _npz_get(path: pathlib.Path, key: str) -> np.ndarray:
    with _npz_open(path) as z:
        if key not in z.files:
            raise DataError(f"{path}: npz has no array {key!r} (it holds {', '.join(z.files)})")
        try:
            return z[key]
        except _NPZ_ERRORS as e:
            raise DataError(f"{path}: cannot read array {key!r}: {e}") from None


def _npz_keys(path: pathlib.Path) -> list[str]:
    with _npz_open(path) as z:
        return list(z.files)


def _to_nchw(x: np.ndarray, where: str) -> np.ndarray:
    if x.dtype != np.uint8:
        if x.dtype.kind in "iu" and (x.size == 0 or (x.min() >= 0 and x.max() <= 255)):
            x = x.astype(np.uint8)
        else:
            raise DataError(f"{where}: images must be uint8 (0..255), got {x.dtype}")
    if x.ndim == 3:
        return np.ascontiguousarray(x[:, None, :, :])
    if x.ndim == 4:
        if x.shape[3] in (1, 3):
            return np.ascontiguousarray(x.transpose(0, 3, 1, 2))
        if x.shape[1] in (1, 3):
            return np.ascontiguousarray(x)
    raise DataError(
        f"{where}: images must be (N,H,W), (N,H,W,C) or (N,C,H,W) with C in 1 or 3, "
        f"got shape {x.shape}"
    )


def _keras_source(
    path: pathlib.Path, split: str, num_classes: int | None, group_key: str | None = None
) -> _Source:
    keys = _npz_keys(path)
    xk, yk = f"x_{split}", f"y_{split}"
    for k in (xk, yk):
        if k not in keys:
            raise DataError(f"{path}: npz has no array {k!r} (it holds {', '.join(keys)})")
    if num_classes is None:
        if "y_train" not in keys:
            raise DataError(f"{path}: npz has no array 'y_train' to count classes from")
        ytr = _check_labels(_npz_get(path, "y_train"), np.iinfo(np.int64).max, str(path))
        num_classes = int(ytr.max()) + 1 if ytr.size else 0
    labels = _check_labels(_npz_get(path, yk), num_classes, f"{path}[{yk}]")
    groups = None
    if group_key is not None and group_key in keys:
        groups = np.asarray(_npz_get(path, group_key)).astype(np.int64).ravel()
        if groups.shape[0] != labels.shape[0]:
            raise DataError(
                f"{path}: {group_key} has {groups.shape[0]} entries for {labels.shape[0]} labels"
            )

    def fetch(idx):
        x = _npz_get(path, xk)
        if x.ndim < 1 or x.shape[0] != labels.shape[0]:
            raise DataError(
                f"{path}: {xk} holds {x.shape[0] if x.ndim else 0} images "
                f"but {yk} holds {labels.shape[0]} labels"
            )
        return _to_nchw(_subset(x, idx), f"{path}[{xk}]")

    return _Source(labels, groups, num_classes, fetch, str(path))


def _jpeg_source(path: pathlib.Path, split: str) -> _Source:
    jk, ok, yk = f"jpeg_{split}", f"offsets_{split}", f"y_{split}"
    labels = _check_labels(_npz_get(path, yk), 10, f"{path}[{yk}]")
    offsets = np.asarray(_npz_get(path, ok)).astype(np.int64)
    n = labels.shape[0]
    if offsets.shape != (n + 1,) or (n and (offsets[0] < 0 or np.any(np.diff(offsets) <= 0))):
        raise DataError(f"{path}: {ok} must be {n + 1} increasing offsets, got shape {offsets.shape}")

    def fetch(idx):
        try:
            from PIL import Image
        except ImportError:
            raise DataError(
                f"{path}: decoding the CIFAR-10 JPEG npz needs Pillow (pip install pillow)"
            ) from None
        blob = _npz_get(path, jk)
        if blob.ndim != 1 or blob.dtype != np.uint8 or blob.shape[0] < offsets[-1]:
            raise DataError(f"{path}: {jk} must be a 1-D uint8 array of at least {offsets[-1]} bytes")
        sel = np.arange(n) if idx is None else np.asarray(idx, dtype=np.int64)
        out = np.empty((sel.shape[0], 3, 32, 32), dtype=np.uint8)
        for j, i in enumerate(sel):
            data = blob[offsets[i] : offsets[i + 1]].tobytes()
            try:
                with Image.open(io.BytesIO(data)) as im:
                    arr = np.asarray(im.convert("RGB"), dtype=np.uint8)
            except Exception as e:  # Pillow raises many types for bad data
                raise DataError(f"{path}: cannot decode JPEG image {i} of {split}: {e}") from None
            if arr.shape != (32, 32, 3):
                raise DataError(f"{path}: image {i} of {split} is {arr.shape}, expected 32x32 RGB")
            out[j] = arr.transpose(2, 0, 1)
        return out

    return _Source(labels, None, 10, fetch, str(path))


def _cifar_root(p: pathlib.Path) -> pathlib.Path | None:
    for root in (p, p / "cifar-10-batches-bin"):
        if (root / _CIFAR_TRAIN[0]).is_file() or (root / _CIFAR_TEST[0]).is_file():
            return root
    return None


def _cifar_bin_source(p: pathlib.Path, split: str) -> _Source:
    root = _cifar_root(p)
    if root is None:
        raise DataError(
            f"{p}: no CIFAR-10 binary batches (data_batch_1.bin ... test_batch.bin) here "
            "or in cifar-10-batches-bin/; the pickled python batches are not supported"
        )
    names = _CIFAR_TRAIN if split == "train" else _CIFAR_TEST
    missing = [n for n in names if not (root / n).is_file()]
    if missing:
        raise DataError(f"{root}: missing CIFAR-10 binary batch(es) {', '.join(missing)}")
    maps = []
    for n in names:
        f = root / n
        size = f.stat().st_size
        if size == 0 or size % _CIFAR_RECORD:
            raise DataError(
                f"{f}: size {size} is not a positive multiple of the {_CIFAR_RECORD}-byte "
                "CIFAR-10 record (truncated or not a binary batch)"
            )
        try:
            maps.append(np.memmap(f, dtype=np.uint8, mode="r").reshape(-1, _CIFAR_RECORD))
        except (OSError, ValueError) as e:
            raise DataError(f"{f}: cannot read: {e}") from None
    labels = _check_labels(
        np.concatenate([m[:, 0] for m in maps]), 10, ", ".join(str(root / n) for n in names)
    )
    bounds = np.cumsum([0] + [m.shape[0] for m in maps])

    def fetch(idx):
        sel = np.arange(bounds[-1]) if idx is None else np.asarray(idx, dtype=np.int64)
        out = np.empty((sel.shape[0], 3, 32, 32), dtype=np.uint8)
        which = np.searchsorted(bounds, sel, side="right") - 1
        for b, m in enumerate(maps):
            pos = np.flatnonzero(which == b)
            if pos.size:
                out[pos] = m[sel[pos] - bounds[b], 1:].reshape(-1, 3, 32, 32)
        return out

    return _Source(labels, None, 10, fetch, str(root))


def _leaf_root(p: pathlib.Path) -> pathlib.Path | None:
    for root in (p, p / "data"):
        if (root / "train").is_dir() and (root / "test").is_dir():
            return root
    return None


def _leaf_read(path: pathlib.Path) -> dict:
    try:
        with open(path, "r", encoding="utf-8") as f:
            obj = json.load(f)
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: cannot read LEAF JSON: {e}") from None
    if not isinstance(obj, dict) or "users" not in obj or "user_data" not in obj:
        raise DataError(f"{path}: not a LEAF JSON file (needs 'users' and 'user_data')")
    return obj


def _leaf_source(p: pathlib.Path, split: str) -> _Source:
    root = _leaf_root(p)
    if root is None:
        raise DataError(f"{p}: not a LEAF directory (needs train/ and test/ holding *.json)")
    files = {s: sorted((root / s).glob("*.json")) for s in SPLITS}
    if not files[split]:
        raise DataError(f"{root / split}: no LEAF *.json files")

    train_users: set[str] = set()
    if split == "test":
        for f in files["train"]:
            train_users.update(map(str, _leaf_read(f)["users"]))
    xs, ys, us = [], [], []
    for f in files[split]:
        obj = _leaf_read(f)
        for user in obj["users"]:
            user = str(user)
            if split == "train":
                train_users.add(user)
            d = obj["user_data"].get(user)
            if d is None:
                raise DataError(f"{f}: user {user!r} listed but has no user_data")
            try:
                x = np.asarray(d["x"], dtype=np.float32)
                y = np.asarray(d["y"], dtype=np.int64)
            except (KeyError, TypeError, ValueError) as e:
                raise DataError(f"{f}: bad data for user {user!r}: {e}") from None
            if x.ndim == 1 and x.size == 0:
                x = x.reshape(0, 784)
            elif x.ndim > 2:
                x = x.reshape(x.shape[0], -1)
            if x.ndim != 2 or x.shape[1] != 784 or y.shape != (x.shape[0],):
                raise DataError(
                    f"{f}: user {user!r} needs x of N*784 values and N labels, "
                    f"got x {x.shape} and y {y.shape}"
                )
            img = np.rint((1.0 - np.clip(x, 0.0, 1.0)) * 255.0).astype(np.uint8)
            xs.append(img.reshape(-1, 1, 28, 28))
            ys.append(y)
            us.append(user)
    # Writer index: position in the sorted list of train users; users seen only
    # in the test split come after them.
    order = {u: i for i, u in enumerate(sorted(train_users))}
    for u in sorted(set(us) - train_users):
        order[u] = len(order)
    where = str(root / split)
    images = np.concatenate(xs) if xs else np.empty((0, 1, 28, 28), np.uint8)
    labels = _check_labels(np.concatenate(ys) if ys else np.empty(0, np.int64), 62, where)
    groups = np.repeat(
        np.array([order[u] for u in us], dtype=np.int64), [y.shape[0] for y in ys]
    )
    return _Source(labels, groups, 62, lambda idx: _subset(images, idx), where)


def _open_source(name: str, path: str, split: str) -> _Source:
    _check_name(name)
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}; choose 'train' or 'test'")
    p = resolve_path(name, path)
    if p.is_file():
        if name == "cifar10":
            keys = _npz_keys(p)
            if f"jpeg_{split}" in keys:
                return _jpeg_source(p, split)
            return _keras_source(p, split, 10)
        if name == "femnist":
            return _keras_source(p, split, 62, group_key=f"client_{split}")
        return _keras_source(p, split, _NUM_CLASSES.get(name))
    if not p.is_dir():
        raise DataError(f"{p}: neither a file nor a directory")
    if name in ("fashion-mnist", "mnist"):
        return _idx_source(p, split, 10)
    if name == "femnist":
        return _leaf_source(p, split)
    if name == "cifar10":
        return _cifar_bin_source(p, split)
    raise DataError(f"{p}: data set 'npz' needs a .npz file, not a directory")


def load_split(name: str, path: str = "", split: str = "train") -> Split:
    """Load the whole `split` ("train" or "test") of data set `name` as uint8 NCHW."""
    return _open_source(name, path, split).take(None)


# --------------------------------------------------------------------------- transforms


def normalize(images: np.ndarray) -> np.ndarray:
    """uint8 (N,C,H,W) -> float32 in [-1, 1]: (x/255 - 0.5)/0.5 for every channel."""
    x = np.asarray(images).astype(np.float32)
    x *= np.float32(2.0 / 255.0)
    x -= np.float32(1.0)
    return x


# --------------------------------------------------------------------------- partitions


def _dirichlet_draw(labels, classes, num_workers, alpha, rng) -> list[list[np.ndarray]]:
    parts: list[list[np.ndarray]] = [[] for _ in range(num_workers)]
    for c in classes:
        idx = rng.permutation(np.flatnonzero(labels == c))
        p = rng.dirichlet(np.full(num_workers, alpha))
        p = np.nan_to_num(p, nan=0.0)
        if p.sum() <= 0:
            p = np.zeros(num_workers)
            p[rng.integers(num_workers)] = 1.0
        p = p / p.sum()
        cuts = (np.cumsum(p)[:-1] * idx.shape[0]).round().astype(np.int64)
        for w, chunk in enumerate(np.split(idx, cuts)):
            if chunk.size:
                parts[w].append(chunk)
    return parts


def partition(
    labels: np.ndarray,
    num_workers: int,
    scheme: str,
    seed: int,
    alpha: float = 0.5,
    groups: np.ndarray | None = None,
    shards_per_worker: int = 2,
) -> list[np.ndarray]:
    """Split sample indices 0..N-1 among `num_workers` workers.

    Returns one sorted int64 index array per worker; partitions are disjoint,
    every worker gets at least one sample and the result depends only on the
    inputs and `seed`.  Schemes: iid, dirichlet (label skew with concentration
    `alpha`), shards (McMahan et al.: sort by label, `shards_per_worker` shards
    each), natural (whole writers from `groups`, round-robin after a seeded
    shuffle).
    """
    labels = np.asarray(labels).ravel()
    n = int(labels.shape[0])
    if scheme not in PARTITIONS:
        raise DataError(f"unknown partition scheme {scheme!r}; choose one of {', '.join(PARTITIONS)}")
    if int(num_workers) != num_workers or num_workers < 1:
        raise DataError(f"num_workers must be a positive integer, got {num_workers!r}")
    num_workers = int(num_workers)
    if n < num_workers:
        raise DataError(
            f"cannot give each of {num_workers} clients a sample: only {n} training samples"
        )
    rng = np.random.default_rng(seed)

    if scheme == "iid":
        parts = np.array_split(rng.permutation(n), num_workers)

    elif scheme == "dirichlet":
        if not alpha > 0:
            raise DataError(f"dirichlet partition needs alpha > 0, got {alpha!r}")
        classes = np.unique(labels)
        for _ in range(20):
            drawn = _dirichlet_draw(labels, classes, num_workers, float(alpha), rng)
            if all(drawn):
                break
        parts = [np.concatenate(d) if d else np.empty(0, np.int64) for d in drawn]
        # Repair: an empty worker takes one random sample from the largest worker.
        for w in range(num_workers):
            if parts[w].size == 0:
                big = int(np.argmax([q.size for q in parts]))
                k = int(rng.integers(parts[big].size))
                parts[w] = parts[big][k : k + 1]
                parts[big] = np.delete(parts[big], k)

    elif scheme == "shards":
        s = int(shards_per_worker)
        if s < 1:
            raise DataError(f"shards_per_worker must be >= 1, got {shards_per_worker!r}")
        total = num_workers * s
        if n < total:
            raise DataError(
                f"shards partition needs at least {total} samples "
                f"({num_workers} clients x {s} shards), got {n}"
            )
        order = rng.permutation(n)
        order = order[np.argsort(labels[order], kind="stable")]
        shards = np.array_split(order, total)
        pick = rng.permutation(total)
        parts = [np.concatenate([shards[j] for j in pick[w * s : (w + 1) * s]]) for w in range(num_workers)]

    else:  # natural
        if groups is None:
            raise DataError("natural partition needs a data set with writers, e.g. femnist")
        groups = np.asarray(groups).ravel()
        if groups.shape[0] != n:
            raise DataError(f"natural partition: {groups.shape[0]} writer ids for {n} samples")
        writers = np.unique(groups)
        if writers.shape[0] < num_workers:
            raise DataError(
                f"natural partition: only {writers.shape[0]} writers for {num_workers} clients "
                f"(one writer a client at most; lower clients.count)"
            )
        shuffled = rng.permutation(writers)
        worker_of_writer = np.empty(writers.shape[0], dtype=np.int64)
        worker_of_writer[np.searchsorted(writers, shuffled)] = (
            np.arange(writers.shape[0]) % num_workers
        )
        worker_of = worker_of_writer[np.searchsorted(writers, groups)]
        parts = [np.flatnonzero(worker_of == w) for w in range(num_workers)]

    out = [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]
    if any(p.size == 0 for p in out):  # cannot happen given the checks above
        raise DataError(f"{scheme} partition left a client without samples")
    return out


# --------------------------------------------------------------------------- per worker


class ClientParts:
    """The train split cut into ``count`` clients (a :func:`partition`; ``max_samples`` caps
    each client's part as :func:`test_rows` picks). Labels are read once; a client's images
    are read the first time it is asked for and kept, so a rank holds only the clients it has
    trained (uint8, as stored)."""

    def __init__(self, name: str, path: str, count: int, scheme: str, seed: int, alpha: float = 0.5,
                 max_samples: int = 0, shards_per_worker: int = 2):
        self.src = _open_source(name, path, "train")
        parts = partition(self.src.labels, count, scheme, seed, alpha=alpha, groups=self.src.groups,
                          shards_per_worker=shards_per_worker)
        self.rows = []
        for idx in parts:
            rows = test_rows(self.src.labels[idx], max_samples)
            self.rows.append(idx if rows is None else idx[rows])
        self._held: dict[int, Split] = {}

    def __len__(self) -> int:
        return len(self.rows)

    def size(self, client: int) -> int:
        return int(self.rows[client].shape[0])

    def load(self, clients) -> None:
        """Read the images of ``clients`` not held yet, in one pass over the file."""
        missing = [int(c) for c in clients if int(c) not in self._held]
        if not missing:
            return
        union = np.unique(np.concatenate([self.rows[c] for c in missing]))
        split = self.src.take(union)
        for c in missing:
            pos = np.searchsorted(union, self.rows[c])
            self._held[c] = Split(images=np.ascontiguousarray(split.images[pos]), labels=split.labels[pos],
                                  num_classes=split.num_classes,
                                  groups=None if split.groups is None else split.groups[pos])

    def client(self, client: int) -> Split:
        """Client ``client``'s part (read now if not held)."""
        self.load([client])
        return self._held[int(client)]


def load_worker_data(
    name: str,
    path: str,
    num_workers: int,
    worker_index: int,
    scheme: str,
    seed: int,
    alpha: float = 0.5,
    max_samples: int = 0,
    shards_per_worker: int = 2,
) -> Split:
    """The train split restricted to part `worker_index` (0-based) of its partition into
    `num_workers` parts (clients).

    Only that part's images are materialised.  With ``max_samples > 0`` the
    first `max_samples` of the part's (sorted) indices are kept (a fixed shuffle of them
    where the file stores the set in class order: :func:`test_rows`).
    """
    if not 0 <= worker_index < num_workers:
        raise DataError(f"worker_index {worker_index} out of range for {num_workers} workers")
    parts = ClientParts(name, path, num_workers, scheme, seed, alpha=alpha, max_samples=max_samples,
                        shards_per_worker=shards_per_worker)
    return parts.client(worker_index)


_ORDER_STREAM = 0x6F726465  # the fixed shuffle of a set stored in class order (independent of run.seed)


def test_rows(labels: np.ndarray, max_samples: int) -> np.ndarray | None:
    """Which images ``data.test_samples`` (and ``data.max_samples``) keeps, in which order: all,
    in file order (None), when it is 0; else the first ``max_samples``. But where the file stores
    the set in class order (labels never decrease, as in the CIFAR-10 npz), a fixed shuffle of
    it (the same for every run and rank), or its first ``max_samples``: so that each class keeps
    its share of a subset, and each 100-image evaluation chunk holds a mix of classes (a model
    that normalizes with batch statistics, as static BatchNorm does, sees a batch like any other)."""
    n = labels.shape[0]
    k = n if not max_samples or max_samples <= 0 else min(int(max_samples), n)
    if n > 1 and labels[0] != labels[-1] and np.all(np.diff(labels.astype(np.int64)) >= 0):
        return np.random.default_rng([0, _ORDER_STREAM]).permutation(n)[:k]
    return None if k == n else np.arange(k)


def load_test_data(name: str, path: str = "", max_samples: int = 0) -> Split:
    """The test split, or the subset of it that :func:`test_rows` picks."""
    src = _open_source(name, path, "test")
    return src.take(test_rows(src.labels, max_samples))


# ---------------------------------------------------------------------------- mini-batch order
_DATA_STREAM = 0x64617461


class Sampler:
    """Mini-batches in a seeded per-epoch order; its whole state is ``cursor``."""

    def __init__(self, n: int, batch_size: int, seed: int, worker: int, cursor: int = 0):
        self.n, self.batch_size, self.seed, self.worker = n, batch_size, seed, worker
        self.cursor = int(cursor)
        self._epoch, self._perm = -1, None

    def _order(self, epoch: int) -> np.ndarray:
        if epoch != self._epoch:
            rng = np.random.default_rng([self.seed, _DATA_STREAM, self.worker, epoch])
            self._epoch, self._perm = epoch, rng.permutation(self.n)
        return self._perm

    def next(self) -> np.ndarray:
        out = []
        need = min(self.batch_size, self.n) if self.n else 0
        while need:
            epoch, pos = divmod(self.cursor, self.n)
            take = min(need, self.n - pos)
            out.append(self._order(epoch)[pos : pos + take])
            self.cursor += take
            need -= take
        return np.concatenate(out)
