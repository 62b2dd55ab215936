"""Masked, weighted, per-element recovery of the global model. Pure numpy.

Worker k trained the parameters at positions ``idx_k`` (its sub-network) and sends their
change ``delta_k``. Its weight is

    w_k = s_k * r_k ** b

with s_k its number of training samples n_k (``strategy.weighting = samples``) or 1
(``count``: each element is averaged over the workers that trained it, each counted once,
as HeteroFL's and FedRolex's code do), r_k its keep ratio (share of neurons kept) and b the
balancing exponent ``strategy.balance``: a soft-trained update, computed by a thinner
network whose neurons co-adapted with fewer peers, counts less than a full one (b > 0), or
the same (b = 0). The exponent is this project's reading of ELFISH's "balances the
contribution from soft-trained models"; the paper gives no formula.

- ``balanced``: every element j is moved by the weighted mean of the changes of the
  workers that trained j:  theta_j += sum_k w_k m_kj delta_kj / sum_k w_k m_kj.
  An element that no worker trained keeps its value exactly.
- ``naive`` (the ablation): masked elements count as zero changes:
  theta_j += sum_k w_k m_kj delta_kj / sum_k w_k.

Both are computed from two sums over workers, ``num = sum_k w_k m_k delta_k`` and
``den = sum_k w_k m_k``, so the MPI layer may form them by a reduction or from gathered
kept values; :func:`combine` finishes either way.
"""
from __future__ import annotations

import numpy as np

MODES = ("balanced", "naive")
WEIGHTINGS = ("samples", "count")


def worker_weight(num_samples: float, keep_ratio: float, balance: float, weighting: str = "samples") -> float:
    if weighting not in WEIGHTINGS:
        raise ValueError(f"unknown weighting {weighting!r}; choose one of: {', '.join(WEIGHTINGS)}")
    base = float(num_samples) if weighting == "samples" else 1.0
    return base * float(keep_ratio) ** float(balance)


class RoundSums:
    """The running sums of one round, O(parameters) whatever the number of updates: ``num``,
    ``den`` and ``total`` (the sum of the weights of the updates folded in)."""

    def __init__(self, size: int):
        self.num = np.zeros(size, dtype=np.float64)
        self.den = np.zeros(size, dtype=np.float64)
        self.total = 0.0

    def add(self, idx: np.ndarray, delta: np.ndarray, weight: float) -> None:
        """Fold one update: the change ``delta`` of the elements ``idx`` (each at most once)."""
        self.num[idx] += weight * np.asarray(delta, dtype=np.float64)
        self.den[idx] += weight
        self.total += float(weight)

    def add_sums(self, num: np.ndarray, den: np.ndarray, total: float) -> None:
        """Fold sums formed elsewhere (an MPI reduction of dense weighted updates)."""
        self.num += num
        self.den += den
        self.total += float(total)


def accumulate(size: int, updates) -> tuple[np.ndarray, np.ndarray]:
    """``updates``: iterable of (idx, delta, weight). Returns (num, den) in float64."""
    sums = RoundSums(size)
    for idx, delta, weight in updates:
        sums.add(idx, delta, weight)
    return sums.num, sums.den


def combine(global_flat: np.ndarray, num: np.ndarray, den: np.ndarray, total_weight: float, mode: str) -> np.ndarray:
    """The new global model from the weighted sums (see the module docstring)."""
    new = np.array(global_flat, dtype=np.float32, copy=True)
    if mode == "balanced":
        trained = den > 0
        new[trained] = (global_flat[trained].astype(np.float64) + num[trained] / den[trained]).astype(np.float32)
    elif mode == "naive":
        if total_weight <= 0:
            return new
        trained = den > 0
        new[trained] = (global_flat[trained].astype(np.float64) + num[trained] / total_weight).astype(np.float32)
    else:
        raise ValueError(f"unknown aggregation {mode!r}; choose one of: {', '.join(MODES)}")
    return new


def aggregate(global_flat: np.ndarray, updates: list, mode: str) -> np.ndarray:
    """One step of recovery: ``updates`` is a list of (idx, delta, weight)."""
    num, den = accumulate(global_flat.size, updates)
    total = float(sum(w for _, _, w in updates))
    return combine(global_flat, num, den, total, mode)
