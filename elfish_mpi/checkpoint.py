"""HDF5 checkpoints of an elfish-mpi run (written by rank 0).

A checkpoint is a single HDF5 file holding everything needed to inspect a run
and to resume it. The module is pure (numpy + h5py); files are never pickled.

File layout (``format_version`` 2)
----------------------------------

Root attributes:

================  ==========================================================
``format``        ``"elfish-mpi"``
``format_version`` ``2`` (integer; files of version 1 are read too)
``round``         number of rounds completed (integer >= 0)
``config``        the full run configuration as a JSON string
``strategy``      name of the strategy (string)
*others*          extra attributes (``Checkpoint.attrs``; str/int/float)
================  ==========================================================

String attributes (root attributes and ``units``) are stored as fixed-length
UTF-8 strings, so they live in the checksummed object header rather than in the
unchecksummed global heap (a damaged global heap can make HDF5 loop forever).
Opened directly with h5py they read back as ``bytes``
(``f.attrs["format"].decode()``); :func:`read` returns ``str``.

Groups and datasets:

``/model/<key>``
    One dataset per floating-point ``state_dict`` entry (parameters and float
    buffers), named verbatim (e.g. ``conv1.weight``,
    ``layer1.0.n1.running_mean``), dtype as given (typically float32). Creation order is
    tracked, so keys come back in ``state_dict`` order.
``/metrics/<name>``
    One value per completed round, shape ``(round,)``, chunked with
    ``maxshape=(None,)``. E.g. ``round``, ``round_time``, ``virtual_time``,
    ``test_accuracy``, ``test_loss``.
``/workers/<name>``
    Per-round values of each client that took part, shape ``(round, slots)``,
    ``maxshape=(None, slots)``: a column (slot) per client of the round, in
    client order; ``client`` and ``rank`` name the client and the worker rank
    that trained it (with one client pinned to each worker rank and all taking
    part, the default, column w is worker rank w + 1's client w). E.g.
    ``keep_ratio``, ``busy_time``, ``idle_time``, ``virtual_time``,
    ``num_samples``, ``steps``. Every dataset has the same number of columns
    (``clients.per_round``). Files without ``client``/``rank`` hold one column a worker.
``/masks/round``
    int64 ``(rounds,)``: the 1-based rounds whose masks follow, in order.
``/masks/<group>``
    uint8 ``(rounds, slots, ceil(neurons / 8))``, ``maxshape=(None, slots,
    bytes)``: which neurons of the neuron group ``<group>`` (models.py; for
    LeNet and AlexNet a group is named after its layer) each client of the round
    (the slots of ``/workers``) kept (trained), one bit a neuron, packed as ``numpy.packbits`` packs them (first
    neuron in the highest bit of the first byte); attribute ``neurons``. The
    kept indices of worker ``w`` in the ``i``-th round listed:
    ``np.flatnonzero(np.unpackbits(ds[i, w], count=ds.attrs["neurons"]))``.
    Version 1 stored ``/masks/round_NNNNNN/worker_NN/<layer>`` (sorted int32
    indices), a group a round and worker: it grew with rounds x workers x
    layers in HDF5 objects.
``/coverage/<group>``
    int64 ``(neurons,)``: how often each neuron has been trained so far.
``/profiles/<name>``
    Profiling results, e.g. ``step_time`` ``(workers, configs)`` and
    ``keep_ratios`` ``(configs, groups)``.
``/state/<name>``
    Resume state: RNG states, data cursors, planner state (numeric arrays;
    raw bytes are stored as uint8).

Metrics and worker datasets carry a ``units`` attribute where the unit is
known: ``"s"`` for ``round_time``, ``virtual_time``, ``busy_time`` and
``idle_time``; ``"fraction 0..1"`` for ``test_accuracy`` and ``keep_ratio``.

Every dataset with at least one element is written with the ``fletcher32``
checksum filter (which implies chunked storage); empty datasets are stored
without filters. Zero-dimensional arrays (e.g. ``bn.num_batches_tracked``) are
stored as shape ``(1,)`` with the attribute ``scalar=1`` (HDF5 cannot chunk a
scalar dataset) and come back as 0-d arrays. Files are written with the
HDF5 1.10 file format, whose metadata (superblock, object headers, chunk
indexes) is checksummed as well; they need HDF5 >= 1.10 to read.

Dataset and attribute names must not contain ``/`` (or NUL) and must not be
empty, ``.`` or ``..``.

Run directory layout (see :func:`rotate`)
-----------------------------------------

``run_dir/checkpoint.h5``
    the latest checkpoint;
``run_dir/checkpoints/round-NNNNNN.h5``
    history, the last ``keep`` rounds.

Writes are atomic: a temporary file (``.<name>.<random>.tmp``, in the same
directory, so ``round-*.h5`` globs never match it) is written, fsync'ed and
renamed over the target.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "SUPPORTED_VERSIONS",
    "UNITS",
    "Checkpoint",
    "CheckpointError",
    "write",
    "read",
    "validate",
    "summary",
    "rotate",
    "find_latest_valid",
    "remove_stale_temps",
    "kept_neurons",
]

FORMAT = "elfish-mpi"
FORMAT_VERSION = 2
SUPPORTED_VERSIONS = (1, 2)

LATEST_NAME = "checkpoint.h5"
HISTORY_DIR = "checkpoints"
_HISTORY_RE = re.compile(r"^round-(\d{6,})\.h5$")
_ROUND_RE = re.compile(r"^round_(\d{6,})$")
_WORKER_RE = re.compile(r"^worker_(\d{2,})$")

#: ``units`` attribute of metrics / workers datasets, by name.
UNITS = {
    "round_time": "s",
    "virtual_time": "s",
    "busy_time": "s",
    "idle_time": "s",
    "eval_time": "s",
    "checkpoint_time": "s",
    "wall_clock": "s",
    "step_time": "s",
    "peak_memory": "bytes",
    "bytes_received": "bytes",
    "root_busy_time": "s",
    "eval_root_time": "s",
    "root_cpu_time": "s",
    "bytes_sent": "bytes",
    "test_accuracy": "fraction 0..1",
    "keep_ratio": "fraction 0..1",
}

_RESERVED_ATTRS = ("format", "format_version", "round", "config", "strategy")
_ARRAY_GROUPS = ("model", "metrics", "workers", "coverage", "profiles", "state")
_REQUIRED_GROUPS = ("model", "metrics", "workers")
_NUMERIC_KINDS = "biufc"
# Object header v2, checksummed metadata; readable by HDF5 >= 1.10.
_LIBVER = ("v110", "latest")
_CHUNK_ELEMENTS = 4096


class CheckpointError(ValueError):
    """A checkpoint cannot be written or read; the message names the file and what is wrong."""


@dataclass
class Checkpoint:
    round: int
    config: dict
    strategy: str
    model: dict[str, np.ndarray]
    metrics: dict[str, np.ndarray]
    workers: dict[str, np.ndarray]
    masks: dict[int, list[dict[str, np.ndarray]]]
    coverage: dict[str, np.ndarray]
    profiles: dict[str, np.ndarray]
    state: dict[str, np.ndarray] = field(default_factory=dict)
    attrs: dict[str, object] = field(default_factory=dict)


# --------------------------------------------------------------------------- #
# writing
# --------------------------------------------------------------------------- #


def _check_name(what: str, name: object) -> str:
    if not isinstance(name, str):
        raise CheckpointError(f"{what}: name {name!r} is not a string")
    if name in ("", ".", "..") or "/" in name or "\x00" in name:
        raise CheckpointError(
            f"{what}: invalid name {name!r} (must be non-empty, not '.'/'..', without '/' or NUL)"
        )
    return name


def _as_array(what: str, value: object) -> np.ndarray:
    if isinstance(value, (bytes, bytearray, memoryview)):
        raise CheckpointError(f"{what}: raw bytes must be given as a uint8 array (np.frombuffer(b, np.uint8))")
    try:
        arr = np.asarray(value)
    except Exception as exc:  # e.g. ragged sequences
        raise CheckpointError(f"{what}: cannot convert to an array: {exc}") from exc
    if arr.dtype.kind not in _NUMERIC_KINDS:
        raise CheckpointError(f"{what}: unsupported dtype {arr.dtype} (only numeric/bool arrays can be stored)")
    return arr


def _array_dict(group: str, items: object) -> dict[str, np.ndarray]:
    if not isinstance(items, dict):
        raise CheckpointError(f"{group}: expected a dict of name -> array, got {type(items).__name__}")
    return {_check_name(group, k): _as_array(f"{group}/{k}", v) for k, v in items.items()}


def _attr_scalar(what: str, value: object) -> object:
    if isinstance(value, (bool, np.bool_)):
        raise CheckpointError(f"{what}: bool attributes are not supported (use int 0/1)")
    if isinstance(value, (int, np.integer)):
        return np.int64(value)
    if isinstance(value, (float, np.floating)):
        return np.float64(value)
    if isinstance(value, str):
        return _fixed_str(value)
    raise CheckpointError(f"{what}: attribute value {value!r} is not a str, int or float")


def _fixed_str(text: str) -> np.ndarray:
    raw = text.encode("utf-8")
    return np.array(raw, dtype=h5py.string_dtype("utf-8", max(len(raw), 1)))


def _prepare(ckpt: Checkpoint) -> dict:
    """Check and normalise a checkpoint before any file is touched."""
    if not isinstance(ckpt, Checkpoint):
        raise CheckpointError(f"expected a Checkpoint, got {type(ckpt).__name__}")
    rnd = ckpt.round
    if isinstance(rnd, (bool, np.bool_)) or not isinstance(rnd, (int, np.integer)) or rnd < 0:
        raise CheckpointError(f"round must be an integer >= 0, got {rnd!r}")
    rnd = int(rnd)
    if not isinstance(ckpt.config, dict):
        raise CheckpointError(f"config must be a dict, got {type(ckpt.config).__name__}")
    try:
        config_json = json.dumps(ckpt.config)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"config is not JSON-serialisable: {exc}") from exc
    if not isinstance(ckpt.strategy, str):
        raise CheckpointError(f"strategy must be a str, got {type(ckpt.strategy).__name__}")

    attrs = {}
    if not isinstance(ckpt.attrs, dict):
        raise CheckpointError(f"attrs must be a dict, got {type(ckpt.attrs).__name__}")
    for k, v in ckpt.attrs.items():
        _check_name("attrs", k)
        if k in _RESERVED_ATTRS:
            raise CheckpointError(f"attrs: {k!r} is reserved for the checkpoint format")
        attrs[k] = _attr_scalar(f"attrs/{k}", v)

    groups = {g: _array_dict(g, getattr(ckpt, g)) for g in _ARRAY_GROUPS}
    for name, arr in groups["metrics"].items():
        if arr.ndim != 1 or arr.shape[0] != rnd:
            raise CheckpointError(f"metrics/{name}: expected shape ({rnd},) (one row per round), got {arr.shape}")
    for name, arr in groups["workers"].items():
        if arr.ndim != 2 or arr.shape[0] != rnd:
            raise CheckpointError(
                f"workers/{name}: expected shape ({rnd}, workers) (one row per round), got {arr.shape}"
            )
    if _worker_counts(groups["workers"]) is not None:
        raise CheckpointError(f"workers: {_worker_counts(groups['workers'])}")

    if not isinstance(ckpt.masks, dict):
        raise CheckpointError(f"masks: expected a dict round -> list, got {type(ckpt.masks).__name__}")
    masks: dict[int, list[dict[str, np.ndarray]]] = {}
    for r, per_worker in ckpt.masks.items():
        if isinstance(r, (bool, np.bool_)) or not isinstance(r, (int, np.integer)) or not 1 <= r <= rnd:
            raise CheckpointError(f"masks: round key {r!r} must be an integer in 1..{rnd} (1-based, completed rounds)")
        if not isinstance(per_worker, (list, tuple)):
            raise CheckpointError(f"masks[{r}]: expected a list over workers, got {type(per_worker).__name__}")
        out = []
        for w, layers in enumerate(per_worker):
            if not isinstance(layers, dict):
                raise CheckpointError(f"masks[{r}][{w}]: expected a dict layer -> indices")
            norm = {}
            for layer, idx in layers.items():
                what = f"masks[{r}][{w}][{layer!r}]"
                _check_name(what, layer)
                arr = _as_array(what, idx)
                if arr.ndim != 1 or (arr.size and arr.dtype.kind not in "iu"):
                    raise CheckpointError(f"{what}: expected a 1-D integer array, got {arr.dtype} {arr.shape}")
                if arr.size and (arr.min() < 0 or arr.max() > np.iinfo(np.int32).max):
                    raise CheckpointError(f"{what}: indices must lie in 0..2**31-1")
                arr = np.sort(arr.astype(np.int32))
                if arr.size > 1 and np.any(arr[1:] == arr[:-1]):
                    raise CheckpointError(f"{what}: duplicate neuron indices")
                norm[layer] = arr
            out.append(norm)
        masks[int(r)] = out

    return {"round": rnd, "config": config_json, "strategy": ckpt.strategy, "attrs": attrs,
            "groups": groups, "masks": masks, "packed_masks": _pack_history(masks, groups.get("coverage", {}))}


def _pack_history(masks: dict[int, list[dict[str, np.ndarray]]], coverage: dict[str, np.ndarray]):
    """(rounds, {layer: uint8 (rounds, workers, bytes)}, {layer: neurons}) of version 2's
    /masks. A layer has as many neurons as its /coverage entry, else its largest index + 1."""
    rounds = sorted(masks)
    if not rounds:
        return [], {}, {}
    layers = list(masks[rounds[0]][0]) if masks[rounds[0]] else []
    workers = len(masks[rounds[0]])
    for r in rounds:
        if len(masks[r]) != workers:
            raise CheckpointError(f"masks[{r}]: {len(masks[r])} workers, but round {rounds[0]} has {workers}")
        for w, kept in enumerate(masks[r]):
            if sorted(kept) != sorted(layers):
                raise CheckpointError(f"masks[{r}][{w}]: layers {sorted(kept)}, but the others have {sorted(layers)}")
    widths = {}
    for layer in layers:
        top = max((int(m[layer][-1]) + 1 for r in rounds for m in masks[r] if m[layer].size), default=0)
        cov = coverage.get(layer)
        width = int(cov.shape[0]) if cov is not None and cov.ndim == 1 else top
        if top > width:
            raise CheckpointError(f"masks: layer {layer!r} has neuron {top - 1}, but coverage/{layer} has {width} neurons")
        widths[layer] = width
    packed = {}
    for layer in layers:
        bits = np.zeros((len(rounds), workers, widths[layer]), dtype=bool)
        for i, r in enumerate(rounds):
            for w, kept in enumerate(masks[r]):
                bits[i, w, kept[layer]] = True
        packed[layer] = np.packbits(bits, axis=2)
    return rounds, packed, widths


def _worker_counts(workers: dict[str, np.ndarray]) -> str | None:
    """None if every (round, workers) dataset has the same number of columns, else the problem."""
    counts = {name: arr.shape[1] for name, arr in workers.items()}
    if len(set(counts.values())) <= 1:
        return None
    listed = ", ".join(f"{name} {n}" for name, n in counts.items())
    return f"datasets disagree on the number of workers (columns: {listed})"


def _create(group: h5py.Group, name: str, arr: np.ndarray, *, extendable: bool = False,
            units: str | None = None) -> None:
    scalar = arr.ndim == 0
    if scalar:
        arr = arr.reshape(1)
    kwargs: dict = {}
    if extendable:
        if arr.ndim == 1:
            kwargs["maxshape"] = (None,)
            kwargs["chunks"] = (min(max(arr.shape[0], 1), _CHUNK_ELEMENTS),)
        else:
            cols = arr.shape[1]
            kwargs["maxshape"] = (None, cols if cols else None)
            rows = min(max(arr.shape[0], 1), max(1, _CHUNK_ELEMENTS // max(cols, 1)))
            kwargs["chunks"] = (rows, max(cols, 1))
    if arr.size:
        kwargs["fletcher32"] = True
    ds = group.create_dataset(name, data=arr, **kwargs)
    if scalar:
        ds.attrs["scalar"] = np.int64(1)
    if units is not None:
        ds.attrs["units"] = _fixed_str(units)


def _new_group(parent: h5py.Group, name: str) -> h5py.Group:
    return parent.create_group(name, track_order=True)


def _write_open(f: h5py.File, plan: dict) -> None:
    f.attrs["format"] = _fixed_str(FORMAT)
    f.attrs["format_version"] = np.int64(FORMAT_VERSION)
    f.attrs["round"] = np.int64(plan["round"])
    f.attrs["config"] = _fixed_str(plan["config"])
    f.attrs["strategy"] = _fixed_str(plan["strategy"])
    for k, v in plan["attrs"].items():
        f.attrs[k] = v
    for gname, items in plan["groups"].items():
        g = _new_group(f, gname)
        for name, arr in items.items():
            if gname in ("metrics", "workers"):
                _create(g, name, arr, extendable=True, units=UNITS.get(name))
            else:
                _create(g, name, arr)
    mg = _new_group(f, "masks")
    rounds, packed, widths = plan["packed_masks"]
    _create(mg, "round", np.asarray(rounds, dtype=np.int64), extendable=True)
    for layer, bits in packed.items():
        kwargs: dict = {"maxshape": (None,) + bits.shape[1:], "chunks": (1,) + tuple(max(n, 1) for n in bits.shape[1:])}
        if bits.size:
            kwargs["fletcher32"] = True
        ds = mg.create_dataset(layer, data=bits, **kwargs)
        ds.attrs["neurons"] = np.int64(widths[layer])


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:  # e.g. platforms that cannot open directories
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write a small text file (metrics.csv, bench reports) atomically: a temporary file in
    the same directory, fsync'ed, then renamed over ``path``."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write(path: str | os.PathLike, ckpt: Checkpoint, *, timed: str | None = None) -> float:
    """Write ``ckpt`` to ``path`` atomically; return the seconds it took.

    With ``timed`` (the name of a metrics series), the file records its own writing time:
    the seconds from the call until every dataset is written (close and fsync excluded)
    become the last value of ``metrics/<timed>``, in the file and in ``ckpt.metrics``, so
    a run resumed from this file holds the same record as one that went on.

    The checkpoint is checked first (:class:`CheckpointError` on bad input,
    before any file is created). It is then written to a temporary file in the
    same directory (``.<name>.<random>.tmp``), closed, fsync'ed, renamed onto
    ``path`` with :func:`os.replace`, and the directory is fsync'ed. On any
    exception the temporary file is removed and the exception re-raised; an
    existing file at ``path`` is left untouched.
    """
    started = time.perf_counter()
    path = Path(path)
    plan = _prepare(ckpt)
    if timed is not None and (timed not in plan["groups"]["metrics"] or plan["round"] < 1):
        raise CheckpointError(f"timed: metrics/{timed} must exist and hold at least one round")
    directory = path.parent
    tmp = directory / f".{path.name}.{os.getpid()}-{os.urandom(6).hex()}.tmp"
    try:
        with h5py.File(tmp, "w-", libver=_LIBVER, track_order=True) as f:
            _write_open(f, plan)
            seconds = time.perf_counter() - started
            if timed is not None:
                f["metrics"][timed][-1] = seconds
                ckpt.metrics[timed][-1] = seconds
            f.flush()
        # fsync after close: closing still writes metadata (superblock status flags).
        _fsync_path(tmp)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    _fsync_dir(directory)
    return seconds


def _copy_atomic(src: Path, dst: Path) -> None:
    """``dst`` becomes a byte copy of ``src``, atomically (temporary file, fsync, rename)."""
    tmp = dst.parent / f".{dst.name}.{os.getpid()}-{os.urandom(6).hex()}.tmp"
    try:
        shutil.copyfile(src, tmp)
        _fsync_path(tmp)
        os.replace(tmp, dst)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(dst.parent)


# --------------------------------------------------------------------------- #
# reading
# --------------------------------------------------------------------------- #


def _attr_to_str(value: object) -> str | None:
    if isinstance(value, np.ndarray) and value.ndim == 0:
        value = value[()]
    if isinstance(value, (bytes, np.bytes_)):
        try:
            return bytes(value).decode("utf-8")
        except UnicodeDecodeError:  # not text: treated like any other non-string value
            return None
    if isinstance(value, str):
        return str(value)
    return None


def _show(value: object) -> str:
    """An attribute value for an error message: numpy types as plain Python values."""
    if isinstance(value, np.ndarray):
        value = value.tolist() if value.ndim else value[()]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, bytes):
        value = _attr_to_str(value) or value
    return repr(value)


def _attr_to_python(value: object) -> object:
    if isinstance(value, np.ndarray) and value.ndim == 0:
        value = value[()]
    if isinstance(value, (bytes, np.bytes_, str)):
        text = _attr_to_str(value)
        return bytes(value) if text is None else text
    if isinstance(value, (bool, np.bool_)):
        return int(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value)
    return value


def _attr_int(value: object) -> int | None:
    if isinstance(value, np.ndarray) and value.shape in ((), (1,)):
        value = value.reshape(())[()]
    if isinstance(value, (bool, np.bool_)):
        return None
    if isinstance(value, (int, np.integer)):
        return int(value)
    return None


class _Reader:
    def __init__(self, path: Path, f: h5py.File):
        self.path = path
        self.f = f
        self.file_size = os.path.getsize(path)

    def fail(self, msg: str) -> CheckpointError:
        return CheckpointError(f"{self.path}: {msg}")

    def load(self, ds: h5py.Dataset, *, kinds: str = _NUMERIC_KINDS) -> np.ndarray:
        where = ds.name
        if ds.dtype.kind not in kinds:
            raise self.fail(f"{where}: unexpected dtype {ds.dtype}")
        if ds.shape is None:
            raise self.fail(f"{where}: dataset has no shape")
        if ds.size * ds.dtype.itemsize > self.file_size:
            raise self.fail(f"{where}: dataset claims {ds.size * ds.dtype.itemsize} bytes, "
                            f"more than the file holds (corrupt)")
        try:
            arr = ds[()]
        except OSError as exc:
            raise self.fail(f"{where}: checksum mismatch or corrupt data ({exc})") from exc
        arr = np.asarray(arr)
        if arr.dtype.kind not in kinds:
            raise self.fail(f"{where}: unexpected dtype {arr.dtype}")
        if _attr_int(ds.attrs.get("scalar")) == 1 and arr.shape == (1,):
            arr = arr.reshape(())
        return arr

    def child(self, parent: h5py.Group, key: str) -> object:
        """``parent[key]``, refusing links: the writer stores none, and following a soft or
        external link would read another object or another file (or fail obscurely)."""
        link = parent.get(key, getlink=True)
        where = f"{parent.name.rstrip('/')}/{key}"
        if isinstance(link, h5py.SoftLink):
            raise self.fail(f"'{where}' is a soft link to {link.path!r}, not stored data")
        if isinstance(link, h5py.ExternalLink):
            raise self.fail(f"'{where}' is an external link to {link.filename!r}, not stored data")
        return parent[key]

    def group(self, name: str, *, required: bool) -> h5py.Group | None:
        if name not in self.f:
            if required:
                raise self.fail(f"missing required group '/{name}'")
            return None
        g = self.child(self.f, name)
        if not isinstance(g, h5py.Group):
            raise self.fail(f"'/{name}' is not a group")
        return g

    def arrays(self, name: str, *, required: bool) -> dict[str, np.ndarray]:
        g = self.group(name, required=required)
        out: dict[str, np.ndarray] = {}
        if g is None:
            return out
        for key in g:
            obj = self.child(g, key)
            if not isinstance(obj, h5py.Dataset):
                raise self.fail(f"'/{name}/{key}' is not a dataset")
            out[key] = self.load(obj)
        return out

    def masks(self, version: int) -> dict[int, list[dict[str, np.ndarray]]]:
        g = self.group("masks", required=False)
        out: dict[int, list[dict[str, np.ndarray]]] = {}
        if g is None:
            return out
        if version >= 2:
            return self.packed_masks(g)
        for rname in g:
            m = _ROUND_RE.match(rname)
            rg = self.child(g, rname)
            if m is None or not isinstance(rg, h5py.Group):
                raise self.fail(f"unexpected entry '/masks/{rname}' (expected group round_NNNNNN)")
            workers: dict[int, dict[str, np.ndarray]] = {}
            for wname in rg:
                wm = _WORKER_RE.match(wname)
                wg = self.child(rg, wname)
                if wm is None or not isinstance(wg, h5py.Group):
                    raise self.fail(f"unexpected entry '/masks/{rname}/{wname}' (expected group worker_NN)")
                layers = {}
                for layer in wg:
                    ds = self.child(wg, layer)
                    if not isinstance(ds, h5py.Dataset):
                        raise self.fail(f"'{ds.name}' is not a dataset")
                    arr = self.load(ds, kinds="iu")
                    if arr.ndim != 1:
                        raise self.fail(f"'{ds.name}': expected 1-D indices, got shape {arr.shape}")
                    layers[layer] = arr
                workers[int(wm.group(1))] = layers
            if sorted(workers) != list(range(len(workers))):
                raise self.fail(f"'/masks/{rname}': worker groups are not numbered 0..{len(workers) - 1}")
            out[int(m.group(1))] = [workers[i] for i in range(len(workers))]
        return dict(sorted(out.items()))

    def packed_masks(self, g: h5py.Group) -> dict[int, list[dict[str, np.ndarray]]]:
        """Version 2: /masks/round and one packed-bit dataset a layer."""
        if "round" not in g:
            raise self.fail("'/masks' has no 'round' dataset (format_version 2)")
        rounds = self.load(self.child(g, "round"), kinds="iu")
        if rounds.ndim != 1 or (rounds.size and (rounds.min() < 1 or np.any(np.diff(rounds) <= 0))):
            raise self.fail(f"'/masks/round' must list increasing rounds >= 1, got {rounds.tolist()[:10]}")
        out: dict[int, list[dict[str, np.ndarray]]] = {int(r): [] for r in rounds}
        workers = None
        for layer in g:
            if layer == "round":
                continue
            ds = self.child(g, layer)
            if not isinstance(ds, h5py.Dataset):
                raise self.fail(f"'{g.name}/{layer}' is not a dataset")
            neurons = _attr_int(ds.attrs.get("neurons"))
            bits = self.load(ds, kinds="u")
            if neurons is None or neurons < 0 or bits.dtype != np.uint8 or bits.ndim != 3 \
                    or bits.shape[0] != rounds.size or bits.shape[2] != (neurons + 7) // 8:
                raise self.fail(f"'{ds.name}': expected uint8 (rounds {rounds.size}, workers, ceil(neurons / 8)) "
                                f"with attribute neurons, got {bits.dtype} {bits.shape}, neurons {_show(ds.attrs.get('neurons'))}")
            if workers is not None and bits.shape[1] != workers:
                raise self.fail(f"'{ds.name}': {bits.shape[1]} workers, the other layers {workers}")
            workers = bits.shape[1]
            kept = np.unpackbits(bits, axis=2, count=neurons)
            for i, r in enumerate(rounds):
                per_worker = out[int(r)]
                while len(per_worker) < workers:
                    per_worker.append({})
                for w in range(workers):
                    per_worker[w][layer] = np.flatnonzero(kept[i, w]).astype(np.int32)
        return out

    def checkpoint(self, load_masks: bool) -> Checkpoint:
        attrs = self.f.attrs
        if "format" not in attrs:
            raise self.fail(f"not an {FORMAT} checkpoint (no 'format' attribute)")
        fmt = _attr_to_str(attrs["format"])
        if fmt != FORMAT:
            raise self.fail(f"not an {FORMAT} checkpoint (format is {_show(attrs['format'])})")
        if "format_version" not in attrs:
            raise self.fail("missing required attribute 'format_version'")
        version = _attr_int(attrs["format_version"])
        if version not in SUPPORTED_VERSIONS:
            supported = ", ".join(str(v) for v in SUPPORTED_VERSIONS)
            raise self.fail(f"unsupported format_version {_show(attrs['format_version'])}; "
                            f"this version of elfish-mpi supports format_version {supported}")
        for name in ("round", "config", "strategy"):
            if name not in attrs:
                raise self.fail(f"missing required attribute '{name}'")
        rnd = _attr_int(attrs["round"])
        if rnd is None or rnd < 0:
            raise self.fail(f"attribute 'round' must be an integer >= 0, got {_show(attrs['round'])}")
        config_text = _attr_to_str(attrs["config"])
        if config_text is None:
            raise self.fail("attribute 'config' is not a (UTF-8) string")
        try:
            config = json.loads(config_text)
        except ValueError as exc:
            raise self.fail(f"attribute 'config' is not valid JSON: {exc}") from exc
        if not isinstance(config, dict):
            raise self.fail("attribute 'config' is not a JSON object")
        strategy = _attr_to_str(attrs["strategy"])
        if strategy is None:
            raise self.fail("attribute 'strategy' is not a (UTF-8) string")
        extra = {k: _attr_to_python(attrs[k]) for k in attrs if k not in _RESERVED_ATTRS}

        for g in _REQUIRED_GROUPS:
            self.group(g, required=True)
        groups = {g: self.arrays(g, required=g in _REQUIRED_GROUPS) for g in _ARRAY_GROUPS}
        for name, arr in groups["metrics"].items():
            if arr.ndim != 1 or arr.shape[0] != rnd:
                raise self.fail(f"metrics/{name} has shape {arr.shape}, expected ({rnd},) for round {rnd}")
        for name, arr in groups["workers"].items():
            if arr.ndim != 2 or arr.shape[0] != rnd:
                raise self.fail(f"workers/{name} has shape {arr.shape}, expected ({rnd}, workers) for round {rnd}")
        if _worker_counts(groups["workers"]) is not None:
            raise self.fail(f"workers: {_worker_counts(groups['workers'])}")
        masks = self.masks(version) if load_masks else {}
        return Checkpoint(round=rnd, config=config, strategy=strategy, masks=masks, attrs=extra, **groups)

    def verify_all(self) -> None:
        datasets: list[h5py.Dataset] = []

        def visit(_name: str, obj: object) -> None:
            if isinstance(obj, h5py.Dataset):
                datasets.append(obj)

        self.f.visititems(visit)
        for ds in datasets:
            self.load(ds)


def kept_neurons(f: h5py.File, rnd: int, worker: int, layer: str) -> np.ndarray:
    """The sorted neurons of ``layer`` that slot ``worker`` (the round's column in /workers: its
    client is /workers/client; rank - 1 where clients are pinned and all take part) kept in round ``rnd``,
    from an h5py file open for reading (format_version 2, or 1)."""
    if "masks/round" not in f:  # format_version 1
        return np.asarray(f[f"masks/round_{rnd:06d}/worker_{worker:02d}/{layer}"][()], dtype=np.int32)
    where = np.flatnonzero(f["masks/round"][()] == rnd)
    if where.size == 0:
        raise KeyError(f"no masks of round {rnd} in {f.filename}")
    ds = f[f"masks/{layer}"]
    return np.flatnonzero(np.unpackbits(ds[int(where[0]), worker], count=int(ds.attrs["neurons"]))).astype(np.int32)


def _open_and(path: str | os.PathLike, action):
    """Open ``path`` read-only and run ``action(reader)``; turn every failure into CheckpointError."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file")
    if not path.is_file():
        raise CheckpointError(f"{path}: not a regular file")
    try:
        f = h5py.File(path, "r")
    except Exception as exc:
        raise CheckpointError(f"{path}: not a readable HDF5 file (truncated or corrupt?): {exc}") from exc
    try:
        result = action(_Reader(path, f))
    except CheckpointError:
        raise
    except OSError as exc:
        raise CheckpointError(f"{path}: checksum mismatch or corrupt data ({exc})") from exc
    except Exception as exc:
        raise CheckpointError(f"{path}: corrupt or malformed checkpoint ({type(exc).__name__}: {exc})") from exc
    finally:
        try:
            f.close()
        except Exception:
            pass
    return result


def read(path: str | os.PathLike, *, load_masks: bool = True) -> Checkpoint:
    """Read a checkpoint; every problem is reported as :class:`CheckpointError`.

    With ``load_masks=False`` the (potentially large) mask history is skipped
    and ``Checkpoint.masks`` is empty.
    """
    return _open_and(path, lambda r: r.checkpoint(load_masks))


def validate(path: str | os.PathLike, *, expect_model: dict[str, tuple] | None = None) -> Checkpoint:
    """:func:`read` the checkpoint, then read every dataset in the file (verifying checksums).

    If ``expect_model`` (state_dict key -> shape) is given, the model must have
    exactly those keys and shapes; all mismatches are listed in one
    :class:`CheckpointError`.
    """
    def action(r: _Reader) -> Checkpoint:
        ckpt = r.checkpoint(load_masks=True)
        r.verify_all()
        return ckpt

    ckpt = _open_and(path, action)
    if expect_model is not None:
        problems = []
        for key, shape in expect_model.items():
            if key not in ckpt.model:
                problems.append(f"missing model key {key!r} (expected shape {tuple(shape)})")
            elif tuple(ckpt.model[key].shape) != tuple(shape):
                problems.append(f"model key {key!r} has shape {tuple(ckpt.model[key].shape)}, "
                                f"expected {tuple(shape)}")
        for key in ckpt.model:
            if key not in expect_model:
                problems.append(f"unexpected model key {key!r} (shape {tuple(ckpt.model[key].shape)})")
        if problems:
            raise CheckpointError(f"{Path(path)}: model does not match:\n  " + "\n  ".join(problems))
    return ckpt


# --------------------------------------------------------------------------- #
# reporting
# --------------------------------------------------------------------------- #


def summary(ckpt: Checkpoint) -> str:
    """A few human-readable lines describing ``ckpt``."""
    n_values = sum(int(np.asarray(a).size) for a in ckpt.model.values())
    n_bytes = sum(int(np.asarray(a).nbytes) for a in ckpt.model.values())
    lines = [
        f"round {ckpt.round}, strategy {ckpt.strategy!r}",
        f"model: {len(ckpt.model)} tensors, {n_values:,} values ({n_bytes / 1024:.1f} KiB)",
    ]
    groups = str(ckpt.attrs.get("groups") or ckpt.attrs.get("maskable_layers") or "")
    if ckpt.attrs.get("model") or groups:
        names = [g for g in groups.split(",") if g]
        shown = ", ".join(names[:6]) + (f", ... ({len(names)} in all)" if len(names) > 6 else "")
        lines.append(f"{ckpt.attrs.get('model', '?')}: neuron groups {shown or 'none recorded'}")
    acc = np.asarray(ckpt.metrics.get("test_accuracy", np.empty(0)), dtype=float).ravel()
    finite = np.flatnonzero(np.isfinite(acc))
    if finite.size:
        i = int(finite[-1])
        rounds = ckpt.metrics.get("round")
        at = int(rounds[i]) if rounds is not None and len(rounds) > i and np.isfinite(rounds[i]) else i + 1
        lines.append(f"last test accuracy: {acc[i]:.4f} (round {at})")
    else:
        lines.append("last test accuracy: none recorded")
    keep = ckpt.workers.get("keep_ratio")
    if keep is not None and np.asarray(keep).ndim == 2 and np.asarray(keep).size:
        with np.errstate(all="ignore"):
            per_worker = np.nanmean(np.asarray(keep, dtype=float), axis=0)
        if np.all(np.isnan(per_worker)):
            lines.append(f"workers: {per_worker.size}, keep ratio not recorded")
        else:
            lines.append(f"workers: {per_worker.size}, mean keep ratio {np.nanmean(per_worker):.3f} "
                         f"(per worker {np.nanmin(per_worker):.3f}..{np.nanmax(per_worker):.3f})")
    else:
        n_workers = next((np.asarray(a).shape[1] for a in ckpt.workers.values() if np.asarray(a).ndim == 2), 0)
        lines.append(f"workers: {n_workers}, keep ratio not recorded")
    from .provenance import from_attrs

    made = from_attrs(ckpt.attrs)
    if made:
        program = f"elfish-mpi {made.get('program', '?')}" + (f" (git {made['git_commit']})" if made.get("git_commit") else "")
        lines.append(f"written by: {program}; Python {made.get('python', '?')}, torch {made.get('torch', '?')}, "
                     f"numpy {made.get('numpy', '?')}, h5py {made.get('h5py', '?')}, mpi4py {made.get('mpi4py', '?')}")
        lines.append(f"MPI: {made.get('mpi_library', '?')}; {made.get('world_size', '?')} ranks on {made.get('hostnames', '?')}"
                     + (f"; job {made['job_id']}" if made.get("job_id") else ""))
        lines.append(f"command: {made.get('command_line', '?')}")
    else:
        lines.append("written by: not recorded (a checkpoint from before elfish-mpi recorded it)")
    return "\n".join(lines)


# --------------------------------------------------------------------------- #
# run directory
# --------------------------------------------------------------------------- #


def _history(run_dir: Path) -> list[tuple[int, Path]]:
    """History files as (round, path), oldest first."""
    hist_dir = run_dir / HISTORY_DIR
    if not hist_dir.is_dir():
        return []
    found = []
    for p in hist_dir.glob("round-*.h5"):
        m = _HISTORY_RE.match(p.name)
        if m is not None and p.is_file():
            found.append((int(m.group(1)), p))
    return sorted(found)


def rotate(run_dir: str | os.PathLike, ckpt: Checkpoint, keep: int, *, timed: str | None = None) -> Path:
    """Save ``ckpt`` into ``run_dir`` and prune the history.

    Writes ``run_dir/checkpoints/round-NNNNNN.h5`` atomically (``timed``: see
    :func:`write`), then ``run_dir/checkpoint.h5`` atomically as a byte copy of it
    (a separate file, not a link), then
    deletes the oldest history files so that only the newest ``keep`` remain
    (``keep=0`` keeps all; the file just written is never deleted). Returns
    the history path. Temporary files left behind by a killed writer are
    removed first (see :func:`remove_stale_temps`).
    """
    if isinstance(keep, bool) or not isinstance(keep, (int, np.integer)) or keep < 0:
        raise ValueError(f"keep must be an integer >= 0, got {keep!r}")
    _prepare(ckpt)  # reject a bad checkpoint before creating anything
    run_dir = Path(run_dir)
    hist_dir = run_dir / HISTORY_DIR
    hist_dir.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(run_dir)
    hist_path = hist_dir / f"round-{int(ckpt.round):06d}.h5"
    write(hist_path, ckpt, timed=timed)
    _copy_atomic(hist_path, run_dir / LATEST_NAME)
    if keep:
        history = _history(run_dir)
        excess = len(history) - keep
        for _rnd, p in history:
            if excess <= 0:
                break
            if p == hist_path:
                continue
            p.unlink(missing_ok=True)
            excess -= 1
        _fsync_dir(hist_dir)
    return hist_path


# Temporary files of write() (".<name>.h5.<pid>-<hex>.tmp") and of the run's metrics.csv.
_TEMP_RE = re.compile(r"^\.(?:.+\.h5\.(\d+)-[0-9a-f]+|metrics\.csv\.(\d+))\.tmp$")


def _pid_running(pid: int) -> bool:
    if pid == os.getpid():
        return True
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    except OSError:
        return True  # unsure: keep the file
    return True


def remove_stale_temps(run_dir: str | os.PathLike) -> list[Path]:
    """Delete the temporary files of :func:`write` (``.<name>.h5.<pid>-<random>.tmp``) and of
    ``metrics.csv`` (``.metrics.csv.<pid>.tmp``) in ``run_dir`` and ``run_dir/checkpoints``
    whose writer process no longer runs on this machine.

    A writer killed between creating its temporary file and renaming it leaves
    the file behind. Files of a running process (this one included) are kept,
    since a live writer may still be filling them. Only rank 0 writes a run
    directory: a writer on another machine sharing it would not be seen as live.
    Returns the paths removed.
    """
    run_dir = Path(run_dir)
    removed = []
    for directory in (run_dir, run_dir / HISTORY_DIR):
        try:
            names = os.listdir(directory)
        except OSError:
            continue
        for name in names:
            m = _TEMP_RE.match(name)
            if m is None or _pid_running(int(m.group(1) or m.group(2))):
                continue
            p = directory / name
            try:
                if p.is_file() and not p.is_symlink():
                    p.unlink()
                    removed.append(p)
            except OSError:
                pass
    return removed


def holds_checkpoints(run_dir: str | os.PathLike) -> bool:
    """Whether ``run_dir`` holds a run's checkpoint (``checkpoint.h5`` or history files)."""
    run_dir = Path(run_dir)
    return (run_dir / LATEST_NAME).exists() or bool(_history(run_dir))


def newest_round(run_dir: str | os.PathLike) -> int | None:
    """The highest round any checkpoint in ``run_dir`` claims (history file names and the
    round of a readable ``checkpoint.h5``); None when there is none."""
    run_dir = Path(run_dir)
    rounds = [r for r, _ in _history(run_dir)]
    try:
        with h5py.File(run_dir / LATEST_NAME, "r") as f:
            rounds.append(int(f.attrs["round"]))
    except (OSError, KeyError, TypeError, ValueError):
        pass
    return max(rounds) if rounds else None


def find_latest_valid(run_dir: str | os.PathLike) -> tuple[Path, list[str]]:
    """Find the checkpoint to resume from: the valid one with the highest round.

    Candidates: ``run_dir/checkpoint.h5`` and ``run_dir/checkpoints/round-*.h5``.
    :func:`rotate` writes the history file before ``checkpoint.h5``, so a crash
    between the two leaves a history file one round newer than
    ``checkpoint.h5``; it is preferred then. On equal rounds ``checkpoint.h5``
    wins. Damaged candidates are skipped. Returns the chosen path plus messages
    about the candidates skipped (and why another file than ``checkpoint.h5``
    was chosen). Temporary files (``.*.tmp``) are never candidates. Raises
    :class:`CheckpointError` listing what was tried if none is valid.
    """
    run_dir = Path(run_dir)
    latest = run_dir / LATEST_NAME
    history = list(reversed(_history(run_dir)))  # newest first, by the round in the name
    skipped: list[str] = []
    best: tuple[int, Path] | None = None
    if latest.exists():
        try:
            best = (validate(latest).round, latest)
        except CheckpointError as exc:
            skipped.append(f"skipped damaged checkpoint {exc}")
    elif history:
        skipped.append(f"{latest}: missing; falling back to the history in {run_dir / HISTORY_DIR}")
    for name_round, p in history:
        if best is not None and name_round <= best[0]:
            break  # neither this one nor the older ones are newer than what we have
        try:
            rnd = validate(p).round
        except CheckpointError as exc:
            skipped.append(f"skipped damaged checkpoint {exc}")
            continue
        if best is None or rnd > best[0]:
            if best is not None:
                skipped.append(f"{best[1]} holds round {best[0]}, but {p} holds round {rnd} "
                               f"(interrupted between the two writes); using {p}")
            best = (rnd, p)
            break
    if best is not None:
        return best[1], skipped
    if not latest.exists() and not history:
        raise CheckpointError(f"{run_dir}: no checkpoint found (looked for {LATEST_NAME} and "
                              f"{HISTORY_DIR}/round-*.h5)")
    raise CheckpointError(f"{run_dir}: no valid checkpoint; tried:\n  " + "\n  ".join(skipped))
