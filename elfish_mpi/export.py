"""The global model of a checkpoint, out of elfish-mpi: a safetensors file, an ONNX graph or a
torch state_dict (``elfish-mpi export``), whole or as a slimmer sub-network (``--keep R``).

The file carries the model's description as metadata (model name and norm, classes, input
shape, the width of every neuron group, the keep ratio, the round and the source
checkpoint), which is what ``models.get_spec(name, classes, in_shape, norm).module(widths)``
needs to build the module that loads it back (``load_state_dict``).

A sub-network at keep ratio R keeps, in every group, the ceil(R x units) units whose slices
(incoming and outgoing weights, norm parameters) have the largest L1 norm (the usual
magnitude criterion; ties to the lower index), gathered exactly as a worker's sub-network is
(``submodel.build_submodel``).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from .masking import keep_count
from .models import ModelSpec, spec_of
from .provenance import from_attrs
from .submodel import build_submodel, flat_from_state_dict, full_model

FORMATS = ("safetensors", "onnx", "pt")


class ExportError(ValueError):
    """A clear, user-facing reason the export cannot be made."""


def strongest(spec: ModelSpec, state: dict, keep: float) -> dict[str, np.ndarray]:
    """Per group, the sorted indices of the neurons of the ceil(keep x units) units with the
    largest L1 norm over the group's slices."""
    kept = {}
    for g in spec.groups:
        norm = np.zeros(g.units, dtype=np.float64)
        for s in g.slices:
            t = np.moveaxis(np.abs(np.asarray(state[s.tensor], dtype=np.float64)), s.axis, 0)
            norm += t.reshape(g.units, -1).sum(axis=1)
        k = keep_count(g.units, keep)
        order = np.lexsort((np.arange(norm.size), -norm))  # largest first, then lowest index
        units = np.sort(order[:k])
        kept[g.name] = g.neurons(units)
    return kept


def model_of(path: str | Path, keep: float = 1.0) -> tuple[torch.nn.Module, dict[str, str]]:
    """The checkpoint's global model (or its sub-network at ``keep``) and its metadata."""
    if not 0.0 < keep <= 1.0:
        raise ExportError(f"--keep {keep:g} must lie in (0, 1]")
    from . import analysis

    run = analysis.open_run(path)  # (a run directory or a checkpoint file)
    ck, attrs = run.checkpoint, run.checkpoint.attrs
    model_cfg = run.model_config
    name = model_cfg["name"]
    if not ck.model:
        raise ExportError(f"{path}: the checkpoint holds no model")
    in_shape, classes = _input_shape(ck)
    try:
        spec = spec_of(model_cfg, classes, in_shape)
    except ValueError as exc:
        raise ExportError(f"{path}: {exc}") from None
    flat = flat_from_state_dict(spec, ck.model)
    if keep < 1.0:
        model, _ = build_submodel(spec, strongest(spec, ck.model, keep), flat)
    else:
        model = full_model(spec, flat)
    widths = {g: int(n) for g, n in model.widths.items()}
    meta = {
        "format": "elfish-mpi model", "model": name, "norm": str(model_cfg.get("norm", "static-bn")), "num_classes": str(classes), "in_shape": json.dumps(list(in_shape)),
        "widths": json.dumps(widths), "keep": f"{keep:g}", "round": str(ck.round), "checkpoint": str(path),
        "program": from_attrs(attrs).get("program", ""),
    }
    return model.eval(), meta


def _input_shape(ck) -> tuple[tuple[int, ...], int]:
    """The run's image shape and number of classes: its data set's, read from one test image
    where the data is here, else those of the named data set."""
    from . import data as datamod

    data = ck.config.get("data", {}) if isinstance(ck.config, dict) else {}
    name = data.get("name", "fashion-mnist")
    try:
        test = datamod.load_test_data(name, str(datamod.resolve_path(name, data.get("path", ""))), 1)
        return tuple(int(s) for s in test.images.shape[1:]), int(test.num_classes)
    except datamod.DataError:
        known = {"fashion-mnist": ((1, 28, 28), 10), "mnist": ((1, 28, 28), 10), "femnist": ((1, 28, 28), 62),
                 "cifar10": ((3, 32, 32), 10)}
        if name in known:
            return known[name]
        raise ExportError(f"the run's data set {name!r} is not here to tell the input shape; export where it is") from None


def _is_hdf5(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(8) == b"\x89HDF\r\n\x1a\n"


def _write_onnx(model: torch.nn.Module, meta: dict[str, str], path: Path) -> None:
    """The model as an ONNX graph (torch.onnx's exporter: input ``images`` (batch, C, H, W) with
    a free batch size, output ``logits``), the metadata as the graph's metadata_props."""
    import contextlib
    import io
    import warnings

    try:
        import onnx
        import onnxscript  # noqa: F401  (torch.onnx's exporter needs it)
    except ImportError:
        raise ExportError('--format onnx needs the onnx and onnxscript packages: pip install -e ".[export]"') from None
    example = torch.zeros((2, *json.loads(meta["in_shape"])))
    chatter = io.StringIO()
    with warnings.catch_warnings(), contextlib.redirect_stdout(chatter), contextlib.redirect_stderr(chatter):
        warnings.simplefilter("ignore")
        try:
            torch.onnx.export(model, (example,), str(path), input_names=["images"], output_names=["logits"],
                              dynamic_shapes=({0: "batch"},), dynamo=True, verbose=False)
        except Exception as exc:
            raise ExportError(f"torch.onnx could not export {meta['model']}: {type(exc).__name__}: {(str(exc).splitlines() or [''])[0]}") from None
    graph = onnx.load(str(path))
    for key, value in meta.items():
        graph.metadata_props.add(key=key, value=value)
    onnx.checker.check_model(graph)
    onnx.save(graph, str(path))


def write(path: str | Path, out: str | Path, fmt: str, keep: float = 1.0) -> dict[str, str]:
    """Export; returns the metadata written. safetensors needs the ``safetensors`` package."""
    if fmt not in FORMATS:
        raise ExportError(f"--format {fmt!r}: choose one of {', '.join(FORMATS)}")
    out = Path(out)
    if not out.parent.is_dir():
        raise ExportError(f"--out {out}: no directory {out.parent}")
    if out.exists() and (out.is_dir() or _is_hdf5(out)):  # never over a checkpoint (the source included)
        raise ExportError(f"--out {out} is {'a directory' if out.is_dir() else 'an HDF5 file (a checkpoint?)'}; "
                          "choose another file")
    model, meta = model_of(path, keep)
    state = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    tmp = out.with_name(f".{out.name}.tmp")
    if fmt == "safetensors":
        try:
            from safetensors.torch import save_file
        except ImportError:
            raise ExportError("--format safetensors needs the safetensors package: pip install safetensors") from None
        save_file(state, str(tmp), metadata=meta)
    elif fmt == "onnx":
        _write_onnx(model, meta, tmp)
    else:
        torch.save({"state_dict": state, "metadata": meta}, tmp)
    tmp.replace(out)  # (never a half-written file where the user asked for one)
    return meta
