"""Keep ratios per client and neuron group, from the profiles and a round deadline. Pure.

Each client c has a cost model ``t_c(cfg) = scale_c * (alpha_c + beta_c * macs(cfg)/macs(full))``
per training step (see profiling.py): its rank's fit when each client is pinned to its own
rank (the rank profiled at the client's capacity), else the mean of the ranks' fits at full
speed over the client's speed. ``scale_c`` starts at 1 and follows the round times actually
measured (an exponential moving average of measured / predicted), so a client that slows
down during the run is re-planned the next time it takes part. (Below, "worker" is a client.)

The round deadline (:meth:`Planner.round_deadline`) is the one every strategy faces:
``strategy.deadline`` when set, used bare; by default the fastest worker's predicted
full-model round time plus ``slack`` (10%), a margin inside the deadline so that timing
noise does not thin a worker that is as fast as the fastest. ELFISH and HeteroFL/FedRolex
plan to meet it, FedProx with partial work fits its steps into it, and FedAvg with a
deadline drops an update that misses it. A worker that meets it with the full model
trains the full model. Otherwise the planner removes neurons greedily, ``step`` of a group's width
(at least one unit: a neuron, or a whole head or GroupNorm group) at a time: each move cuts the
group whose neurons are the most resource-intensive, i.e. the cut that saves the most predicted
time per unit it really removes, never below ``min_keep`` (in whole units, rounded up) and never
a move that saves nothing, until the prediction meets the deadline or every group is at its
floor. Its plans are whole numbers of units: a group's ratio is its kept count over its
units. (The nested widths of HeteroFL/FedRolex, :meth:`Planner.plan_uniform`, are multiples
of ``step`` instead, one ratio for every group, rounded up to whole units when masks are drawn.)

When even the floor misses the deadline, ``strategy.fallback = "steps"`` has the worker take
only the local steps that fit in it (:meth:`Planner.steps_within` at its plan, recorded in
``/workers/steps``); ``"none"`` (pure ELFISH) keeps every step and the round waits.
"""
from __future__ import annotations

import math

import numpy as np

from .masking import keep_count
from .models import ModelSpec
from .profiling import macs_fraction


class Planner:
    def __init__(
        self,
        spec: ModelSpec,
        alpha: np.ndarray,
        beta: np.ndarray,
        *,
        min_keep: float,
        local_steps: int,
        deadline: float = 0.0,
        replan: bool = True,
        step: float = 0.05,
        smoothing: float = 0.5,
        slack: float = 0.1,
    ):
        self.spec = spec
        self.alpha = np.asarray(alpha, dtype=np.float64).copy()
        self.beta = np.asarray(beta, dtype=np.float64).copy()
        self.scale = np.ones_like(self.alpha)
        self.min_keep = float(min_keep)
        self.local_steps = int(local_steps)
        self.deadline = float(deadline)
        self.replan = bool(replan)
        self.step = float(step)
        self.smoothing = float(smoothing)
        self.slack = float(slack)
        self._widths = {g.name: g.units for g in spec.groups}  # planned in whole units (a neuron, a head)

    @property
    def num_workers(self) -> int:
        return self.alpha.size

    def predict(self, worker: int, ratios: dict[str, float]) -> float:
        """Predicted seconds per training step of ``worker`` at ``ratios``."""
        base = self.alpha[worker] + self.beta[worker] * macs_fraction(self.spec, ratios)
        return float(self.scale[worker] * base)

    def round_deadline(self) -> float:
        """Seconds of training per round that every strategy faces (see the module docstring)."""
        if self.deadline > 0:
            return self.deadline
        full = macs_fraction(self.spec, {name: 1.0 for name in self._widths})
        fastest = float(np.min(self.scale * (self.alpha + self.beta * full)))  # (predict, for every client at once)
        return fastest * self.local_steps * (1.0 + self.slack)

    def deadline_step(self) -> float:
        """Seconds per step a worker must meet: the round deadline over the local steps."""
        return self.round_deadline() / self.local_steps

    def plan_worker(self, worker: int, target: float) -> dict[str, float]:
        """Keep ratios (each a whole number of units over the group's units) that meet
        ``target`` seconds per step, cutting greedily where a removed neuron saves the most:
        the first configuration of :meth:`cut_path` whose prediction meets it (or the path's
        last, every group at its floor). A worker's predicted time is an increasing function of
        the MACs fraction (``scale * beta > 0``), so the greedy's order of cuts is the same for
        every worker and is computed once; where it is not, cutting saves nothing and the worker
        keeps the full model."""
        path = self.cut_path()
        a, b, sc = self.alpha[worker], self.beta[worker], self.scale[worker]
        if not sc * b > 0:
            return dict(path[0][0])
        for ratios, fraction in path:
            if float(sc * (a + b * fraction)) <= target:
                return dict(ratios)
        return dict(path[-1][0])

    def cut_path(self) -> list[tuple[dict[str, float], float]]:
        """The greedy's cuts, from the full model to every group at its floor: each move takes
        ``step`` of one group's width (at least one unit) off the group that removes the most
        MACs per unit really removed, never below ``min_keep`` (whole units, rounded up) and
        never a move that removes nothing; (ratios, MACs fraction) after each move."""
        if getattr(self, "_path", None) is not None:
            return self._path
        kept = dict(self._widths)
        floor = {name: keep_count(width, self.min_keep) for name, width in self._widths.items()}
        current = macs_fraction(self.spec, self._ratios(kept))
        path = [(self._ratios(kept), current)]
        while True:
            best, best_gain, best_f = None, 0.0, current
            for name, width in self._widths.items():
                k = max(floor[name], kept[name] - max(1, math.ceil(self.step * width - 1e-9)))
                if k >= kept[name]:
                    continue  # at its floor
                trial = dict(kept, **{name: k})
                f = macs_fraction(self.spec, self._ratios(trial))
                if f >= current:
                    continue  # a move that saves nothing is no move
                gain = (current - f) / (kept[name] - k)  # MACs removed per neuron really removed
                if best is None or gain > best_gain:
                    best, best_gain, best_f = trial, gain, f
            if best is None:
                break
            kept, current = best, best_f
            path.append((self._ratios(kept), current))
        self._path = path
        return path

    def _ratios(self, kept: dict[str, int]) -> dict[str, float]:
        return {name: kept[name] / width for name, width in self._widths.items()}

    def plan(self, clients=None) -> list[dict[str, float]]:
        """The plans of ``clients`` (default: every client), in that order."""
        target = self.deadline_step()
        return [self.plan_worker(int(w), target) for w in (range(self.num_workers) if clients is None else clients)]

    def plan_uniform(self) -> list[float]:
        """One keep ratio per worker for every group (nested-width methods): the largest
        multiple of ``step`` (>= min_keep) whose prediction meets the deadline."""
        target = self.deadline_step()
        out = []
        for w in range(self.num_workers):
            r = 1.0
            while r - self.step >= self.min_keep - 1e-9 and self.predict(w, {n: r for n in self._widths}) > target:
                r = round(r - self.step, 10)
            out.append(r)
        return out

    def steps_within(self, worker: int, steps: int, ratios: dict[str, float] | None = None) -> int:
        """How many of ``steps`` steps ``worker`` fits in the round deadline at ``ratios``
        (default: the full model); at least 1."""
        t = self.predict(worker, ratios or {n: 1.0 for n in self._widths})
        return int(max(1, min(steps, np.floor(self.round_deadline() / t + 1e-9)))) if t > 0 else steps

    def observe(self, worker: int, ratios: dict[str, float], measured_step: float) -> None:
        """Fold a measured time per step into the worker's scale."""
        if not self.replan or not np.isfinite(measured_step) or measured_step <= 0:
            return
        base = self.alpha[worker] + self.beta[worker] * macs_fraction(self.spec, ratios)
        if base <= 0:
            return
        s = self.smoothing
        self.scale[worker] = (1 - s) * self.scale[worker] + s * (measured_step / base)

    # -- checkpoint state ----------------------------------------------------
    def state(self) -> dict[str, np.ndarray]:
        return {"planner_alpha": self.alpha.copy(), "planner_beta": self.beta.copy(), "planner_scale": self.scale.copy()}

    def load_state(self, state: dict) -> None:
        self.alpha = np.asarray(state["planner_alpha"], dtype=np.float64).copy()
        self.beta = np.asarray(state["planner_beta"], dtype=np.float64).copy()
        self.scale = np.asarray(state["planner_scale"], dtype=np.float64).copy()
