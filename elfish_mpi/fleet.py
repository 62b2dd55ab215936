"""Capacity traces: how each worker's capacity changes over the rounds. Pure.

A trace is a CSV file with a header ``round,w1,...,wN`` and rows ``R,c1,...,cN``: from
round R on (until the next row) client i runs at capacity ci (a column a client: with the
default one client a worker rank, a column a worker). Rounds before the first row use the
clients' starting capacities (``workers.capacity``, ``workers.fleet`` or ``clients.speed``).
"""
from __future__ import annotations

import csv
import math
from pathlib import Path

from .config import ConfigError


class Trace:
    def __init__(self, rows: list[tuple[int, list[float]]]):
        self.rows = sorted(rows)

    def capacities(self, round: int, start: list[float]) -> list[float]:
        current = list(start)
        for r, caps in self.rows:
            if r > round:
                break
            current = list(caps)
        return current


def load_trace(path: str | Path, num_workers: int) -> Trace:
    p = Path(path)
    try:
        with p.open(newline="", encoding="utf-8") as fh:
            table = [row for row in csv.reader(fh) if row and not row[0].lstrip().startswith("#")]
    except OSError as exc:
        raise ConfigError(f"workers.trace = {str(p)!r}: cannot read it ({exc.strerror or exc})") from None
    except UnicodeDecodeError:
        raise ConfigError(f"workers.trace = {str(p)!r}: not a text CSV file") from None
    if not table or table[0][0].strip() != "round":
        raise ConfigError(f"workers.trace = {str(p)!r}: the first line must be the header round,w1,...,w{num_workers}")
    if len(table[0]) != num_workers + 1:
        raise ConfigError(
            f"workers.trace = {str(p)!r}: the header has {len(table[0]) - 1} column(s) but the job has {num_workers} client(s) (one a worker rank unless clients.count says otherwise)"
        )
    rows = []
    for line_no, row in enumerate(table[1:], start=2):
        if len(row) != num_workers + 1:
            raise ConfigError(f"workers.trace = {str(p)!r}, line {line_no}: expected {num_workers + 1} values, got {len(row)}")
        try:
            r = int(row[0])
            caps = [float(c) for c in row[1:]]
        except ValueError:
            raise ConfigError(f"workers.trace = {str(p)!r}, line {line_no}: not numbers: {','.join(row)}") from None
        if r < 1 or not all(math.isfinite(c) and 0.0 < c <= 1.0 for c in caps):
            raise ConfigError(
                f"workers.trace = {str(p)!r}, line {line_no}: round must be >= 1 and capacities in (0, 1]"
            )
        rows.append((r, caps))
    if not rows:
        raise ConfigError(f"workers.trace = {str(p)!r}: no rows after the header")
    return Trace(rows)
