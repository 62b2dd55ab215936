"""Evaluation of the global model on the test set, in fixed chunks that any rank can compute.

The test set (its first ``data.test_samples`` images, or all) is cut into chunks of
:data:`CHUNK` images. A chunk's result is its number of correct predictions and the float64
sum of its losses, from one forward pass over the chunk; the model's accuracy and mean loss
are the sums over all chunks, taken in chunk order. Which rank computes a chunk therefore
changes nothing: the result is the same bit for bit whether rank 0 evaluates every chunk
(``run.eval_on = "root"``) or the ranks share them (``"all"``).

How they share them (:class:`EvalSplit`): round r's model goes out with round r+1's plan;
rank 0 evaluates the first chunks while the workers train, the workers evaluate the rest,
in proportion to their capacity, before they train. Rank 0's time is free (it waits for the
updates anyway), the workers' is not, so rank 0 takes as many chunks as it can evaluate in
the time the workers take to evaluate theirs and train, from the rates measured so far.
The split follows timing; the figures do not.

Pure (numpy and torch); when to evaluate is decided by the round loop.
"""
from __future__ import annotations

import numpy as np
import torch
from torch.nn import functional as F

CHUNK = 100  # test images per chunk: one forward pass (LeNet: 0.14 ms an image at 100, 0.27 at 1,000 on one core)


def num_chunks(n: int) -> int:
    return (int(n) + CHUNK - 1) // CHUNK


def shares(k: int, weights) -> list[tuple[int, int]]:
    """``k`` chunks as contiguous ranges ``(first, stop)``, one per weight, in proportion to
    the weights (largest remainder; a weight of 0 gets none). Depends on its arguments only."""
    w = np.asarray(weights, dtype=np.float64)
    if w.ndim != 1 or w.size == 0 or np.any(w < 0) or not np.isfinite(w).all() or w.sum() <= 0:
        raise ValueError(f"evaluation weights must be >= 0 with a positive sum, got {list(weights)}")
    exact = int(k) * w / w.sum()
    count = np.floor(exact).astype(np.int64)
    rest = int(k) - int(count.sum())
    order = np.lexsort((np.arange(w.size), -(exact - count)))  # largest remainder, then lowest index
    count[order[:rest]] += 1
    stops = np.cumsum(count)
    return [(int(s - c), int(s)) for s, c in zip(stops, count)]


class EvalSplit:
    """Rank 0's chunks (the first ``root``) and the workers' ranges for one evaluation, from the
    rates measured in the earlier ones (rank 0's seconds per chunk, and the workers' part's
    seconds per chunk: its slowest worker's time over the chunks of the part) and the last
    round's training time. The first evaluation splits by capacity, rank 0 counting as 1."""

    MARGIN = 0.8  # share of the workers' training time rank 0 plans to fill (it writes checkpoints too)

    def __init__(self, k: int, eval_on: str):
        if eval_on not in ("all", "root"):
            raise ValueError(f"unknown run.eval_on {eval_on!r}; choose all or root")
        self.k, self.spread = int(k), eval_on == "all"
        self.root_rate: float | None = None
        self.worker_rate: float | None = None
        self.train_time = 0.0

    def root_chunks(self, capacities, overlapped: bool) -> int:
        if not self.spread:
            return self.k
        if self.root_rate is None or self.worker_rate is None:
            return shares(self.k, [1.0, *capacities])[0][1]
        free = self.MARGIN * self.train_time if overlapped else 0.0
        a = self.worker_rate
        k0 = int(np.floor((free + self.k * a) / (self.root_rate + a)))  # k0 * root = free + (k - k0) * a
        return min(max(k0, 0), self.k)

    def split(self, capacities, overlapped: bool) -> tuple[int, tuple[tuple[int, int], ...]]:
        """(rank 0's chunks, each worker's range)."""
        k0 = self.root_chunks(capacities, overlapped)
        if k0 == self.k:
            return k0, tuple((self.k, self.k) for _ in capacities)
        return k0, tuple((k0 + a, k0 + b) for a, b in shares(self.k - k0, capacities))

    @staticmethod
    def _ema(old: float | None, new: float) -> float:
        return new if old is None else 0.5 * old + 0.5 * new

    def observe(self, root_chunks: int, root_seconds: float, worker_chunks: int, worker_seconds: float) -> None:
        """One evaluation's times: rank 0's compute, and the slowest worker's."""
        if root_chunks > 0:
            self.root_rate = self._ema(self.root_rate, root_seconds / root_chunks)
        if worker_chunks > 0:
            self.worker_rate = self._ema(self.worker_rate, worker_seconds / worker_chunks)

    def observe_training(self, seconds: float) -> None:
        self.train_time = float(seconds)


def image_range(n: int, chunks: tuple[int, int]) -> tuple[int, int]:
    """The test images ``[start, stop)`` of a chunk range."""
    first, stop = chunks
    return min(first * CHUNK, n), min(stop * CHUNK, n)


def evaluate_chunks(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> np.ndarray:
    """``(chunks, 2)`` float64: correct predictions and loss sum of each chunk of ``x``, ``y``
    (which start at a chunk boundary)."""
    out = np.zeros((num_chunks(len(y)), 2), dtype=np.float64)
    model.eval()
    with torch.inference_mode():
        for c in range(out.shape[0]):
            xs, ys = x[c * CHUNK : (c + 1) * CHUNK], y[c * CHUNK : (c + 1) * CHUNK]
            logits = model(xs)
            out[c, 0] = int((logits.argmax(1) == ys).sum())
            out[c, 1] = float(F.cross_entropy(logits, ys, reduction="sum"))
    return out


def combine(per_chunk: np.ndarray, n: int) -> tuple[float, float]:
    """(accuracy, mean loss) from every chunk's result, summed in chunk order."""
    per_chunk = np.asarray(per_chunk, dtype=np.float64)
    if per_chunk.shape != (num_chunks(n), 2):
        raise ValueError(f"{n} test images make {num_chunks(n)} chunks, got results of shape {per_chunk.shape}")
    correct = loss = 0.0
    for c in range(per_chunk.shape[0]):  # (an explicit order: numpy's sum may pair differently)
        correct += per_chunk[c, 0]
        loss += per_chunk[c, 1]
    return correct / n, loss / n


def per_class(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """(test images, correct predictions) of each class, in the same chunks."""
    seen = np.zeros(num_classes, dtype=np.int64)
    correct = np.zeros(num_classes, dtype=np.int64)
    model.eval()
    with torch.inference_mode():
        for c in range(num_chunks(len(y))):
            xs, ys = x[c * CHUNK : (c + 1) * CHUNK], y[c * CHUNK : (c + 1) * CHUNK]
            hit = (model(xs).argmax(1) == ys).numpy()
            labels = ys.numpy()
            seen += np.bincount(labels, minlength=num_classes)
            correct += np.bincount(labels[hit], minlength=num_classes)
    return seen, correct


def evaluate(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """(accuracy, mean loss) of ``model`` on the whole of ``x``, ``y``: the same chunks, on one rank."""
    return combine(evaluate_chunks(model, x, y), len(y))
