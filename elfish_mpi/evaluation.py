"""Evaluation of the global model on the test set, in fixed chunks that any rank can compute.

The test set (its first ``data.test_samples`` images, or all) is cut into chunks of
:data:`CHUNK` images. A chunk's result is its number of correct predictions and the float64
sum of its losses, from one forward pass over the chunk; the model's accuracy and mean loss
are the sums over all chunks, taken in chunk order. Which rank computes a chunk therefore
changes nothing: the result is the same bit for bit whether rank 0 evaluates every chunk
(``run.eval_on = "root"``) or the ranks share them (``"all"``, :func:`shares`).

Pure (numpy and torch); who evaluates what, and when, is decided by the round loop.
"""
from __future__ import annotations

import numpy as np
import torch
from torch.nn import functional as F

CHUNK = 100  # test images per chunk: one forward pass (LeNet: 0.14 ms an image at 100, 0.27 at 1,000 on one core)


def num_chunks(n: int) -> int:
    return (int(n) + CHUNK - 1) // CHUNK


def shares(n: int, weights) -> list[tuple[int, int]]:
    """Contiguous chunk ranges ``(first, stop)`` of ``n`` test images, one per rank, in
    proportion to ``weights`` (largest remainder; a rank of weight 0 gets none). Depends on
    its arguments only, so every rank computes the same split."""
    w = np.asarray(weights, dtype=np.float64)
    if w.ndim != 1 or w.size == 0 or np.any(w < 0) or not np.isfinite(w).all() or w.sum() <= 0:
        raise ValueError(f"evaluation weights must be >= 0 with a positive sum, got {list(weights)}")
    k = num_chunks(n)
    exact = k * w / w.sum()
    count = np.floor(exact).astype(np.int64)
    rest = k - int(count.sum())
    order = np.lexsort((np.arange(w.size), -(exact - count)))  # largest remainder, then lowest rank
    count[order[:rest]] += 1
    stops = np.cumsum(count)
    return [(int(s - c), int(s)) for s, c in zip(stops, count)]


def rank_shares(n: int, eval_on: str, capacities) -> list[tuple[int, int]]:
    """Every rank's chunk range, rank 0 first: all of them on rank 0 (``"root"``), or shared
    in proportion to capacity, rank 0 counting as 1 (``"all"``)."""
    if eval_on == "root":
        k = num_chunks(n)
        return [(0, k)] + [(k, k)] * len(capacities)
    if eval_on != "all":
        raise ValueError(f"unknown run.eval_on {eval_on!r}; choose all or root")
    return shares(n, [1.0, *capacities])


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


def evaluate(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """(accuracy, mean loss) of ``model`` on the whole of ``x``, ``y``: the same chunks, on one rank."""
    return combine(evaluate_chunks(model, x, y), len(y))
