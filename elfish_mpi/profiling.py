"""Profiles and the cost model. Pure: measuring happens at the worker's edge (worker.py).

A profile is measured at a fixed list of *configurations*, each a keep ratio per neuron
group (``strategy.profile``): ``layers``, the whole model at 1, 0.75, 0.5 and 0.25, and then
each group alone at 0.5 (the others full), which tells how much each group's
neurons cost on that worker, in two timing passes; or ``quick``, the whole model at 1 and
0.25 in one pass: the two points the affine cost model below needs, for jobs of many ranks
on few cores, where every step of profiling is slow (the rounds then refine each worker's
model, planner.observe).

For every configuration a worker reports its time per training step (in its planning
clock), the MACs of a training step's forward pass, and an estimate of the memory the step
needs (parameters, gradients and activations of the batch, float32).

The cost model of a worker is affine in compute: ``t(cfg) = alpha + beta * macs(cfg) /
macs(full)``, fitted by least squares with alpha, beta >= 0 over all its configurations.
"""
from __future__ import annotations

import numpy as np

from .masking import keep_count
from .models import ModelSpec

UNIFORM_RATIOS = (1.0, 0.75, 0.5, 0.25)
QUICK_RATIOS = (1.0, 0.25)
LAYER_RATIO = 0.5
PROFILES = ("layers", "quick")


def passes(kind: str = "layers") -> int:
    """Timing passes over the configurations (the median over all samples is kept)."""
    return 2 if kind == "layers" else 1


def configurations(spec: ModelSpec, kind: str = "layers") -> np.ndarray:
    """(configs, groups) keep ratios that every worker profiles."""
    if kind not in PROFILES:
        raise ValueError(f"unknown profile {kind!r}; choose one of: {', '.join(PROFILES)}")
    names = spec.maskable
    if kind == "quick":
        return np.asarray([[r] * len(names) for r in QUICK_RATIOS], dtype=np.float64)
    rows = [[r] * len(names) for r in UNIFORM_RATIOS]
    for i in range(len(names)):
        row = [1.0] * len(names)
        row[i] = LAYER_RATIO
        rows.append(row)
    return np.asarray(rows, dtype=np.float64)


def ratios_of(spec: ModelSpec, row) -> dict[str, float]:
    return dict(zip(spec.maskable, (float(r) for r in row)))


def widths_for(spec: ModelSpec, ratios: dict[str, float]) -> dict[str, int]:
    """Neurons per group at ``ratios`` (whole units, rounded up as masks are)."""
    return {g.name: keep_count(g.units, ratios.get(g.name, 1.0)) * g.unit for g in spec.groups}


def macs_fraction(spec: ModelSpec, ratios: dict[str, float]) -> float:
    return spec.macs_share(widths_for(spec, ratios))


def memory_bytes(spec: ModelSpec, ratios: dict[str, float], batch_size: int) -> float:
    widths = widths_for(spec, ratios)
    return 4.0 * (3 * spec.num_params(widths) + batch_size * spec.activation_floats(widths))


def fit_cost(macs_frac: np.ndarray, times: np.ndarray) -> tuple[float, float]:
    """Least-squares (alpha, beta) >= 0 of times ~ alpha + beta * macs_frac."""
    x = np.asarray(macs_frac, dtype=np.float64)
    y = np.asarray(times, dtype=np.float64)
    ok = np.isfinite(y) & (y > 0)
    x, y = x[ok], y[ok]
    if x.size == 0:
        return 0.0, 1.0
    if x.size == 1 or np.ptp(x) < 1e-12:
        return 0.0, float(np.mean(y / np.maximum(x, 1e-12)))
    a = np.stack([np.ones_like(x), x], axis=1)
    alpha, beta = np.linalg.lstsq(a, y, rcond=None)[0]
    if beta <= 0:  # timing noise swamped the signal: all cost is fixed
        return float(np.mean(y)), 1e-12
    if alpha < 0:  # through the origin
        return 0.0, float(np.dot(x, y) / np.dot(x, x))
    return float(alpha), float(beta)
