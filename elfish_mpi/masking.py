"""Mask policies: which neurons a worker keeps in a round. Pure numpy.

Every choice is a function of (seed, round, worker, group) alone, with no hidden state, so a
resumed run draws exactly the masks an uninterrupted run would have drawn.

- ``random``: a fresh uniformly random set every round (ELFISH's dynamic masking).
- ``rolling``: a contiguous window (wrapping around) whose start moves by one unit (a neuron, or a whole head or GroupNorm group) every
  round (FedRolex's rolling sub-model).
- ``ordered``: always the first k neurons (static nested sub-models, HeteroFL).
A group with ratio 1 keeps every neuron under every policy. A group with a ``unit`` (neurons
kept or dropped together) is drawn in units.
"""
from __future__ import annotations

import math

import numpy as np

from .models import ModelSpec
from .submodel import widths_of

POLICIES = ("random", "rolling", "ordered")
_MASK_STREAM = 0x6D61736B  # separates the mask RNG stream from other seeded streams


def keep_count(width: int, ratio: float) -> int:
    """Neurons kept of ``width`` at keep ratio ``ratio``: at least that share (rounded up, so a
    floor such as ``strategy.min_keep`` holds per layer), at least one, at most all."""
    return int(min(width, max(1, math.ceil(width * ratio - 1e-9))))


def select(policy: str, width: int, k: int, *, seed: int, round: int, worker: int, layer: int) -> np.ndarray:
    if not 1 <= k <= width:
        raise ValueError(f"cannot keep {k} of {width} neurons")
    if k == width:
        return np.arange(width, dtype=np.int32)
    if policy == "random":
        rng = np.random.default_rng([seed, _MASK_STREAM, round, worker, layer])
        return np.sort(rng.choice(width, size=k, replace=False)).astype(np.int32)
    if policy == "rolling":
        start = round % width
        return np.sort((start + np.arange(k)) % width).astype(np.int32)
    if policy == "ordered":
        return np.arange(k, dtype=np.int32)
    raise ValueError(f"unknown mask policy {policy!r}; choose one of: {', '.join(POLICIES)}")


def make_masks(spec: ModelSpec, ratios: dict[str, float], policy: str, *, seed: int, round: int, worker: int) -> dict:
    """Kept neurons of every group for one worker in one round. A group's ratio applies to its
    units (whole attention heads, whole GroupNorm groups); the kept units' neurons are kept."""
    kept = {}
    for gi, g in enumerate(spec.groups):
        k = keep_count(g.units, ratios.get(g.name, 1.0))
        units = select(policy, g.units, k, seed=seed, round=round, worker=worker, layer=gi)
        kept[g.name] = g.neurons(units) if g.unit > 1 else units
    return kept


def keep_ratio(spec: ModelSpec, kept: dict) -> float:
    """A worker's keep ratio: the mean over groups of the share of the group's neurons kept
    (equal to r when every group keeps a share r)."""
    shares = [len(kept[g.name]) / g.size if g.name in kept else 1.0 for g in spec.groups]
    return float(sum(shares) / len(shares)) if shares else 1.0


def compute_ratio(spec: ModelSpec, kept: dict) -> float:
    """Share of the full model's forward multiply-accumulates that the kept sub-network does."""
    return spec.macs_share(widths_of(spec, kept))
