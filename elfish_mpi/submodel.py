"""Sub-networks of kept neurons: gathering them out of the full model and scattering back.

Pure numpy/torch; no MPI. The whole model lives as one flat float32 vector: its
floating-point ``state_dict`` entries (parameters, and float buffers such as BatchNorm
running statistics) in ``state_dict`` order (:attr:`models.ModelSpec.entries`). For a
choice of kept neurons per group, :func:`param_index` returns the positions in that flat
vector of every entry of the physically smaller sub-network, in the sub-network's own flat
order. So ``sub = full[idx]`` builds the sub-network and ``full[idx] = sub`` maps it back:
one gather and one scatter, whatever the layer types.

A kept-neuron set is a sorted int array per group; a group that is absent keeps all of
its neurons.
"""
from __future__ import annotations

import numpy as np
import torch

from .models import ModelSpec

Kept = dict  # group name -> sorted int array of kept neuron indices


def full_kept(spec: ModelSpec) -> Kept:
    return {g.name: np.arange(g.size, dtype=np.int64) for g in spec.groups}


def widths_of(spec: ModelSpec, kept: Kept) -> dict[str, int]:
    return {g.name: (len(kept[g.name]) if g.name in kept else g.size) for g in spec.groups}


def layout(spec: ModelSpec) -> list[tuple[str, tuple, int]]:
    """(state_dict key, full shape, offset in the flat vector) for every float state entry."""
    return list(spec.entries)


def num_params(spec: ModelSpec) -> int:
    return spec.flat_size


def param_index(spec: ModelSpec, kept: Kept) -> np.ndarray:
    """Flat positions (int64) of the sub-network's state inside the full flat vector."""
    parts = []
    for key, shape, offset in spec.entries:
        axes = spec._axes.get(key)
        if not axes:
            parts.append(offset + np.arange(int(np.prod(shape, dtype=np.int64)), dtype=np.int64))
            continue
        index = [np.arange(n, dtype=np.int64) for n in shape]
        for axis, gname, block in axes:
            if gname in kept:
                rows = np.asarray(kept[gname], dtype=np.int64)
                index[axis] = (rows[:, None] * block + np.arange(block, dtype=np.int64)[None, :]).ravel()
        strides = np.cumprod((list(shape[1:]) + [1])[::-1])[::-1].astype(np.int64)
        flat = np.zeros([1] * len(shape), dtype=np.int64) + offset
        for d, (ix, st) in enumerate(zip(index, strides)):
            view = [1] * len(shape)
            view[d] = ix.size
            flat = flat + (ix * st).reshape(view)
        parts.append(flat.ravel())
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


def _float_state(model: torch.nn.Module):
    return [t for t in model.state_dict(keep_vars=True).values() if t.is_floating_point()]


def flat_params(model: torch.nn.Module) -> np.ndarray:
    """The model's float state (parameters and float buffers, in state_dict order) as one vector."""
    with torch.no_grad():
        return torch.cat([t.detach().reshape(-1) for t in _float_state(model)]).numpy().astype(np.float32, copy=True)


def load_flat(model: torch.nn.Module, flat: np.ndarray) -> None:
    src = torch.from_numpy(np.ascontiguousarray(flat, dtype=np.float32))
    pos = 0
    with torch.no_grad():
        for t in _float_state(model):
            n = t.numel()
            t.copy_(src[pos : pos + n].view_as(t))
            pos += n
    if pos != src.numel():
        raise ValueError(f"a flat state of {src.numel()} values for a model of {pos}")


def build_submodel(spec: ModelSpec, kept: Kept, full_flat: np.ndarray) -> tuple[torch.nn.Module, np.ndarray]:
    """The physically smaller network of the kept neurons, initialised from ``full_flat``,
    and the index that maps it back (see :func:`param_index`)."""
    idx = param_index(spec, kept)
    model = spec.module(widths_of(spec, kept))
    load_flat(model, full_flat[idx])
    model.widths = widths_of(spec, kept)
    return model, idx


def full_model(spec: ModelSpec, flat: np.ndarray | None = None) -> torch.nn.Module:
    """The full model holding ``flat`` (uninitialised without it)."""
    model = spec.module()
    if flat is not None:
        load_flat(model, flat)
    model.widths = spec.full_widths()
    return model


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
        if key not in state:
            raise ValueError(f"{key}: missing (the model holds {', '.join(list(state)[:4])}...)")
        arr = np.asarray(state[key], dtype=np.float32)
        if arr.shape != tuple(shape):
            raise ValueError(f"{key}: shape {arr.shape} does not fit the model ({tuple(shape)})")
        parts.append(arr.ravel())
    return np.concatenate(parts)
