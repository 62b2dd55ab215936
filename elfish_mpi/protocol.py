"""The round protocol: what rank 0 sends every worker each round and what comes back.

Declared once here and imported by both sides (aggregator.py, worker.py, perf.py). Per round:

1. rank 0 broadcasts a :class:`Plan` (a small frozen dataclass, the only pickled message);
2. if the plan does not say stop: when it trains, the round's masks as one packed bit buffer
   (``Bcast`` of ``uint8``, :func:`pack_masks`: one row per slot, i.e. per client taking
   part, one bit per maskable neuron, groups in the model's order); then the global model
   (``Bcast`` of float32);
3. when the plan says ``evaluate`` (the round whose model that broadcast is), each worker
   given test chunks in ``eval_chunks`` evaluates them first and sends its
   :func:`eval_buffer` (evaluation.py's chunk results) to rank 0;
4. when it trains, each worker trains its slots one after another (each from the global
   model just received) and sends back, per slot and in slot order, one :data:`UPDATE`
   record (a numpy structured dtype of float64 fields, sent as its raw buffer) and the
   update (transport.py). A worker with no slot this round sends nothing (gather) or
   zeros to the reduction (reduce).

A plan that only evaluates (``train`` false: after the last round, before a stop, or every
evaluated round with ``run.overlap_eval = false``) is followed by the model's broadcast and
step 3, no masks and no training.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .models import ModelSpec

# The record every worker sends with its update: one float64 per field, in this order.
UPDATE = np.dtype([
    ("client", "f8"),  # the client this update is of
    ("busy_time", "f8"),  # wall seconds of training: from the model received (and evaluated) to update ready
    ("step_time", "f8"),  # mean seconds per step in the planning clock (wall, or virtual for throttle=virtual)
    ("virtual_time", "f8"),  # CPU seconds / capacity spent training this round
    ("num_samples", "f8"),  # training samples the client holds
    ("train_loss", "f8"),  # mean loss over the round's steps
    ("steps", "f8"),  # steps taken
    ("cursor", "f8"),  # samples consumed since the start of the run (data order position)
    ("weight", "f8"),  # aggregation weight (num_samples or 1) * keep_ratio ** balance
    ("bytes_sent", "f8"),  # payload bytes of this update
    ("late", "f8"),  # 1: stopped at the round's time limit (the update is dropped)
    ("finite", "f8"),  # 1: every value of the update is finite
    ("signal", "f8"),  # 1: this rank received a stop signal (SIGTERM / SIGUSR1)
    ("peak_memory", "f8"),  # bytes: the most resident memory this rank has held so far
    ("bytes_received", "f8"),  # bytes of rank 0's broadcasts this round (plan, masks, model), on the rank's first slot
])


def peak_memory() -> float:
    """Bytes: the most resident memory this process has held so far (ru_maxrss: KiB on Linux,
    bytes on macOS)."""
    import resource
    import sys

    peak = float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
    return peak if sys.platform == "darwin" else peak * 1024.0
UPDATE_FIELDS = len(UPDATE.names)


def new_update(**values: float) -> np.ndarray:
    """A 0-d :data:`UPDATE` record; fields not given are 0."""
    rec = np.zeros((), dtype=UPDATE)
    for name, value in values.items():
        rec[name] = value
    return rec


def update_buffer(rec: np.ndarray) -> np.ndarray:
    """The float64 buffer a record travels as."""
    return np.frombuffer(np.ascontiguousarray(rec).tobytes(), dtype=np.float64)


def updates_from_buffer(buf: np.ndarray) -> np.ndarray:
    """(slots, fields) float64 as received -> a (slots,) :data:`UPDATE` array."""
    buf = np.ascontiguousarray(buf, dtype=np.float64)
    return buf.view(UPDATE).reshape(buf.shape[0])


@dataclass(frozen=True)
class Task:
    """What one client does in a round (its slot of the :class:`Plan`)."""

    client: int
    steps: int
    time_limit: float  # seconds of training after which it stops; its update is dropped (0: none)
    mu: float  # proximal coefficient
    capacity: float
    cursor: int  # where the client's data order stands (samples drawn since the start of the run)
    balance: float
    weighting: str  # "samples" or "count"


@dataclass(frozen=True)
class Plan:
    """Rank 0's message at the start of every round (``stop``: the run ends instead).

    A training plan has one *slot* per client taking part, in client order: ``clients[i]`` is
    trained by worker rank ``ranks[i]`` with ``steps[i]``, ``time_limit[i]``, ``mu[i]``,
    ``capacity[i]`` from data position ``cursor[i]``, and its mask is row ``i`` of the packed
    masks. A rank trains its slots in this order and sends one update per slot, in this order.
    ``rank_capacity`` is each worker rank's capacity outside training (what it evaluates at,
    and what rank 0 splits the test set by)."""

    round: int
    clients: tuple[int, ...] = ()
    ranks: tuple[int, ...] = ()
    steps: tuple[int, ...] = ()
    time_limit: tuple[float, ...] = ()
    mu: tuple[float, ...] = ()
    capacity: tuple[float, ...] = ()
    cursor: tuple[int, ...] = ()
    rank_capacity: tuple[float, ...] = ()
    balance: float = 0.0
    weighting: str = "samples"
    evaluate: int = 0  # the round whose model is broadcast, when the workers evaluate it (0: no)
    eval_chunks: tuple[tuple[int, int], ...] = ()  # each worker's test chunks (first, stop) to evaluate
    train: bool = True  # false: the workers only evaluate
    stop: bool = False

    @classmethod
    def stop_message(cls) -> "Plan":
        return cls(round=0, stop=True)

    @classmethod
    def evaluate_only(cls, rnd: int, eval_chunks: tuple[tuple[int, int], ...], rank_capacity: tuple[float, ...]) -> "Plan":
        return cls(round=rnd, evaluate=rnd, eval_chunks=eval_chunks, rank_capacity=rank_capacity, train=False)

    def slots_of(self, rank: int) -> list[int]:
        """The slots worker rank ``rank`` trains, in order."""
        return [i for i, r in enumerate(self.ranks) if r == rank]

    def task(self, slot: int) -> Task:
        return Task(
            client=int(self.clients[slot]), steps=int(self.steps[slot]), time_limit=float(self.time_limit[slot]),
            mu=float(self.mu[slot]), capacity=float(self.capacity[slot]), cursor=int(self.cursor[slot]),
            balance=float(self.balance), weighting=self.weighting,
        )


def eval_buffer(chunks: int) -> np.ndarray:
    """A worker's evaluation result: row 0 is (wall seconds it took, 0), then one row
    (correct predictions, loss sum) per test chunk of its share, in chunk order."""
    return np.zeros((chunks + 1, 2), dtype=np.float64)


def mask_bits(spec: ModelSpec) -> int:
    """Bits of one slot's row: one per maskable neuron."""
    widths = spec.full_widths()
    return sum(widths[name] for name in spec.maskable)


def mask_buffer(spec: ModelSpec, slots: int) -> np.ndarray:
    """An empty buffer of the packed masks' shape (a row a slot), for a receiving rank."""
    return np.empty((slots, (mask_bits(spec) + 7) // 8), dtype=np.uint8)


def pack_masks(spec: ModelSpec, masks: list[dict[str, np.ndarray]]) -> np.ndarray:
    """Every slot's kept neurons (sorted indices per group) -> packed bits, a row a slot."""
    widths = spec.full_widths()
    bits = np.zeros((len(masks), mask_bits(spec)), dtype=bool)
    for w, kept in enumerate(masks):
        offset = 0
        for name in spec.maskable:
            idx = np.asarray(kept[name], dtype=np.int64)
            if idx.size and (idx[0] < 0 or idx[-1] >= widths[name] or np.any(np.diff(idx) <= 0)):
                raise ValueError(f"slot {w}, group {name}: kept neurons must be sorted, unique and in 0..{widths[name] - 1}")
            bits[w, offset + idx] = True
            offset += widths[name]
    return np.packbits(bits, axis=1)


def unpack_masks(spec: ModelSpec, packed: np.ndarray, slot: int) -> dict[str, np.ndarray]:
    """One slot's kept neurons (sorted int32 indices per group) from the packed bits."""
    widths = spec.full_widths()
    bits = np.unpackbits(packed[slot], count=mask_bits(spec)).astype(bool)
    kept, offset = {}, 0
    for name in spec.maskable:
        kept[name] = np.flatnonzero(bits[offset : offset + widths[name]]).astype(np.int32)
        offset += widths[name]
    return kept
