"""Clients apart from ranks: who takes part in a round, how fast each client is, and which
worker rank trains it. Pure (numpy); every rank can compute the same answers.

A *client* is a device with its own data (its part of ``data.partition`` over
``clients.count``), its own speed (a capacity in (0, 1]) and its own data order. A worker
rank is where clients are trained. With as many clients as worker ranks (the default) each
client is *pinned* to its rank (client c on rank c + 1), which is how the real throttles
(cgroup, affinity) slow a device down. With more clients, rank 0 *places* each round's
clients on the ranks, balanced by their predicted time (:func:`place`), and a rank trains its
clients one after another, each from the round's global model. A client's results do not
depend on where it is trained: its mask, data order and sampler follow from the seed, the
round and its id, and rank 0 folds the updates in client order.

Selection (``clients.selection = uniform``): round r takes ``clients.per_round`` clients
uniformly at random without replacement, from ``run.seed`` and ``r`` alone
(:func:`select`), so a resumed run selects what the uninterrupted run did, and every strategy
of a comparison sees the same clients in the same rounds. (Availability traces would be
another selection: a function of the seed, the round and the trace.)
"""
from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .config import FLEETS, Config, ConfigError

_SELECT_STREAM = 0x73656C65  # "sele"
_SPEED_STREAM = 0x73706565  # "spee"


@dataclass(frozen=True)
class Clients:
    """The job's clients: how many, how many a round, their starting speeds, and whether each
    is pinned to its own worker rank."""

    count: int
    per_round: int
    speeds: tuple[float, ...]
    pinned: bool
    seed: int

    def select(self, round: int) -> np.ndarray:
        return select(self.count, self.per_round, self.seed, round)


def build(cfg: Config, num_workers: int, speeds=None) -> Clients:
    """The job's clients (``speeds``: the clients' capacities when already drawn, as rank 0
    hands them to the workers)."""
    count = cfg.num_clients(num_workers)
    speeds = client_speeds(cfg, count) if speeds is None else [float(v) for v in speeds]
    if len(speeds) != count:
        raise ConfigError(f"{len(speeds)} client speeds for {count} clients")
    return Clients(
        count=count, per_round=cfg.per_round(num_workers), speeds=tuple(speeds),
        pinned=cfg.pinned(num_workers), seed=cfg.run.seed,
    )


def rank_capacities(capacity, num_workers: int) -> list[float]:
    """Each worker rank's capacity outside training (profiling, evaluation) from the clients'
    ``capacity``: its own client's where each client is pinned to its rank, else full speed (a
    rank hosts clients of every speed, and slows to each one's while it trains it)."""
    return [float(c) for c in capacity] if len(capacity) == num_workers else [1.0] * num_workers


def select(count: int, per_round: int, seed: int, round: int) -> np.ndarray:
    """Round ``round``'s clients, sorted: all of them, or ``per_round`` drawn uniformly without
    replacement from (seed, round) alone."""
    if per_round >= count:
        return np.arange(count, dtype=np.int64)
    rng = np.random.default_rng([seed, _SELECT_STREAM, round])
    return np.sort(rng.choice(count, size=per_round, replace=False)).astype(np.int64)


def place(clients: np.ndarray, costs: np.ndarray, num_workers: int, pinned: bool) -> np.ndarray:
    """The worker rank (1-based) of each of ``clients``: its own rank when pinned; otherwise
    longest predicted time first, each onto the rank with the least predicted time so far
    (ties: the lower client id, the lower rank). Deterministic in its inputs."""
    clients = np.asarray(clients, dtype=np.int64)
    if pinned:
        return clients + 1
    costs = np.asarray(costs, dtype=np.float64)
    order = sorted(range(len(clients)), key=lambda i: (-costs[i], clients[i]))
    load = np.zeros(num_workers, dtype=np.float64)
    ranks = np.empty(len(clients), dtype=np.int64)
    for i in order:
        r = int(np.argmin(load))  # (argmin takes the first, i.e. the lowest rank, on a tie)
        ranks[i] = r + 1
        load[r] += costs[i]
    return ranks


def client_speeds(cfg: Config, count: int) -> list[float]:
    """Each client's capacity at the start of the run (``clients.speed``)."""
    kind = cfg.clients.speed
    if kind == "":
        return cfg.capacities(count)
    rng = np.random.default_rng([cfg.run.seed, _SPEED_STREAM])
    if kind == "lognormal":
        draws = np.exp(cfg.clients.sigma * rng.standard_normal(count))
        return [float(v) for v in draws / draws.max()]
    if kind == "tiers":
        tiers = np.asarray(FLEETS["tiers"], dtype=np.float64)
        return [float(v) for v in tiers[rng.integers(len(tiers), size=count)]]
    table = load_speed_table(kind)
    speeds = np.asarray([s for _, s in table], dtype=np.float64)
    return [float(v) for v in speeds[rng.integers(len(table), size=count)] / speeds.max()]


def load_speed_table(path: str | Path) -> list[tuple[str, float]]:
    """A CSV table of devices: a header ``device,speed`` (more columns are allowed and ignored:
    a source, a note), then one row per device with a positive speed in any unit where more is
    faster (images per second, 1 / seconds per round). Lines starting with ``#`` are comments."""
    p = Path(path)
    where = f"clients.speed = {str(p)!r}"
    try:
        with p.open(newline="", encoding="utf-8") as fh:
            rows = [(n, row) for n, row in enumerate(csv.reader(fh), start=1) if row and not row[0].lstrip().startswith("#")]
    except OSError as exc:
        raise ConfigError(f"{where}: cannot read it ({exc.strerror or exc})") from None
    except (UnicodeDecodeError, csv.Error):
        raise ConfigError(f"{where}: not a text CSV file") from None
    if not rows or [c.strip() for c in rows[0][1][:2]] != ["device", "speed"]:
        raise ConfigError(f"{where}: the first line must be the header device,speed")
    table = []
    for line, row in rows[1:]:
        if len(row) < 2 or not row[0].strip():
            raise ConfigError(f"{where}, line {line}: expected a device name and a speed, got {','.join(row)!r}")
        try:
            speed = float(row[1])
        except ValueError:
            raise ConfigError(f"{where}, line {line}: speed {row[1]!r} is not a number") from None
        if not (math.isfinite(speed) and speed > 0):
            raise ConfigError(f"{where}, line {line}: speed {row[1]!r} must be a positive number")
        table.append((row[0].strip(), speed))
    if not table:
        raise ConfigError(f"{where}: no devices after the header")
    return table
