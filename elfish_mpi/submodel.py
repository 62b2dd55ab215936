"""Sub-networks of kept neurons: slicing them out of the full model and scattering back.

Pure numpy/torch; no MPI. The whole model lives as one flat float32 vector in
``state_dict`` order (``<layer>.weight`` then ``<layer>.bias``, layer by layer). For a choice
of kept neurons per layer, :func:`param_index` returns the positions in that flat vector of
every parameter of the physically smaller sub-network, in the sub-network's own flat order.
So ``sub = full[idx]`` builds the sub-network and ``full[idx] = sub`` maps it back: one
gather and one scatter, whatever the layer types.

A kept-neuron set is a sorted int array per maskable layer; a layer that is absent keeps
all of its neurons (the classifier always does).
"""
from __future__ import annotations

import numpy as np
import torch
from torch.nn.utils import parameters_to_vector, vector_to_parameters

from .models import MaskableCNN, ModelSpec

Kept = dict  # layer name -> sorted int array of kept neuron indices


def full_kept(spec: ModelSpec) -> Kept:
    return {layer.name: np.arange(layer.out, dtype=np.int64) for layer in spec.layers}


def widths_of(spec: ModelSpec, kept: Kept) -> dict[str, int]:
    return {layer.name: (len(kept[layer.name]) if layer.name in kept else layer.out) for layer in spec.layers}


def layout(spec: ModelSpec) -> list[tuple[str, tuple, int]]:
    """(state_dict key, full shape, offset in the flat vector) for every parameter."""
    out, offset, prev = [], 0, spec.in_shape[0]
    for i, layer in enumerate(spec.layers):
        if layer.kind == "conv":
            wshape = (layer.out, prev, layer.kernel, layer.kernel)
        else:
            wshape = (layer.out, prev * spec.input_spatial(i))
        out.append((f"{layer.name}.weight", wshape, offset))
        offset += int(np.prod(wshape))
        out.append((f"{layer.name}.bias", (layer.out,), offset))
        offset += layer.out
        prev = layer.out
    return out


def num_params(spec: ModelSpec) -> int:
    key, shape, offset = layout(spec)[-1]
    return offset + int(np.prod(shape))


def param_index(spec: ModelSpec, kept: Kept) -> np.ndarray:
    """Flat positions (int64) of the sub-network's parameters inside the full flat vector."""
    parts = []
    entries = layout(spec)
    prev_kept = np.arange(spec.in_shape[0], dtype=np.int64)
    prev_full = spec.in_shape[0]
    for i, layer in enumerate(spec.layers):
        (_, _, woff), (_, _, boff) = entries[2 * i], entries[2 * i + 1]
        rows = np.asarray(kept.get(layer.name, np.arange(layer.out)), dtype=np.int64)
        if layer.kind == "conv":
            kk = layer.kernel * layer.kernel
            idx = (rows[:, None, None] * prev_full + prev_kept[None, :, None]) * kk + np.arange(kk)[None, None, :]
        else:
            spatial = spec.input_spatial(i)
            cols = (prev_kept[:, None] * spatial + np.arange(spatial)[None, :]).ravel()
            idx = rows[:, None] * (prev_full * spatial) + cols[None, :]
        parts.append(woff + idx.ravel())
        parts.append(boff + rows)
        prev_kept, prev_full = rows, layer.out
    return np.concatenate(parts)


def flat_params(model: torch.nn.Module) -> np.ndarray:
    return parameters_to_vector(model.parameters()).detach().numpy().astype(np.float32, copy=True)


def load_flat(model: torch.nn.Module, flat: np.ndarray) -> None:
    with torch.no_grad():
        vector_to_parameters(torch.from_numpy(np.ascontiguousarray(flat, dtype=np.float32)), model.parameters())


def build_submodel(spec: ModelSpec, kept: Kept, full_flat: np.ndarray) -> tuple[MaskableCNN, np.ndarray]:
    """The physically smaller network of the kept neurons, initialised from ``full_flat``,
    and the index that maps it back (see :func:`param_index`)."""
    idx = param_index(spec, kept)
    model = MaskableCNN(spec, widths_of(spec, kept))
    load_flat(model, full_flat[idx])
    return model, idx


def scatter(full_shape_size: int, idx: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A sub-network's flat values placed at full positions, and the 0/1 mask of those positions."""
    dense = np.zeros(full_shape_size, dtype=np.float32)
    mask = np.zeros(full_shape_size, dtype=np.float32)
    dense[idx] = values
    mask[idx] = 1.0
    return dense, mask


def state_dict_from_flat(spec: ModelSpec, flat: np.ndarray) -> dict[str, np.ndarray]:
    return {key: flat[off : off + int(np.prod(shape))].reshape(shape).copy() for key, shape, off in layout(spec)}


def flat_from_state_dict(spec: ModelSpec, state: dict) -> np.ndarray:
    parts = []
    for key, shape, _ in layout(spec):
        arr = np.asarray(state[key], dtype=np.float32)
        if arr.shape != tuple(shape):
            raise ValueError(f"{key}: shape {arr.shape} does not fit the model ({tuple(shape)})")
        parts.append(arr.ravel())
    return np.concatenate(parts)
