"""Strategies: what each client trains in a round, and how updates combine. No MPI here.
(Below, "worker" is a client: with the default one client a worker rank, the same thing.)

A strategy's ``configure(round, clients)`` (its rule: ``assign``) gives one :class:`Assignment` per client taking part: keep ratio per
neuron group, local steps, a time limit and a proximal coefficient. It also names the
mask policy (which neurons the ratios keep), the weighting of the updates and the balancing
exponent. It owns its aggregation rule: ``begin`` opens a round's sums, ``aggregate`` folds
each accepted update into them as it arrives, ``finish`` returns the new model (by default
the masked, weighted recovery of aggregation.py, ``balanced`` or ``naive``). The round loop
calls these and knows no rule by name; a new rule is a new method. (With
``strategy.transport = reduce`` MPI forms the sums from the workers' weighted updates, so
``aggregate`` is not called there; ``begin`` and ``finish`` are.) Every strategy runs on the
same MPI path, data, seeds and throttled fleet, so they compare fairly; every strategy
that has a round deadline faces the same one, :meth:`Planner.round_deadline`.

Weighting (``strategy.weighting``): ``samples`` weighs a worker's update by its number of
training samples, ``count`` counts every worker that trained an element once (HeteroFL's
and FedRolex's official code); ``auto`` is each strategy's own paper's rule.

- ``fedavg`` (McMahan et al., AISTATS 2017): every worker trains the full model for
  ``train.local_steps``; the round waits for the slowest worker; sample-weighted average.
- ``fedavg-drop`` (FedAvg with a round deadline, as deployed by Bonawitz et al., 2019):
  full model; a worker that has not finished by the round deadline stops there and its
  update is dropped.
- ``fedprox-partial`` (Li et al., MLSys 2020, "FedProx"): full model; a straggler does only
  the steps that fit in the round deadline (partial work), and every worker's local loss
  carries the proximal term ``mu/2 * ||w - w_global||^2``. Steps re-planned from measured
  times.
- ``heterofl`` (Diao et al., ICLR 2021): static nested sub-models: a worker keeps the first
  ``k`` neurons of every group, one width ratio per worker fixed from the profiles at the
  start; each parameter is averaged over the workers that hold it, each counted once.
- ``fedrolex`` (Alam et al., NeurIPS 2022): the widths of HeteroFL, but the kept window of
  each group rolls by one unit (neuron) every round, so every neuron is trained over time;
  parameter-wise averaging as in HeteroFL.
- ``elfish`` (Xu et al., 2019): profile-guided per-group keep ratios that cut the most
  resource-intensive neurons first, re-planned every round from measured times (or fixed
  by ``strategy.keep_ratios``); a fresh random mask every round (``strategy.mask_policy``);
  a worker that misses the deadline even with every group at ``min_keep`` takes the steps
  that fit (``strategy.fallback = steps``, the default) or all of them (``none``);
  ``strategy.aggregation`` balanced (default) or naive (the ablation), weights
  ``num_samples * keep_ratio ** strategy.balance`` (1 instead of num_samples with
  ``strategy.weighting = count``).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .aggregation import RoundSums, combine
from .config import Config, ConfigError
from .models import ModelSpec
from .planner import Planner


@dataclass
class Assignment:
    ratios: dict  # neuron group -> keep ratio
    steps: int  # local SGD steps
    time_limit: float = 0.0  # seconds of training after which the worker stops and is dropped (0: none)
    mu: float = 0.0  # proximal coefficient


class PlannerMissing(RuntimeError):
    """A strategy that plans from the profiles was asked for a plan before it had a planner."""


class Strategy:
    name = "base"
    mask_policy = "ordered"
    uses_planner = False
    cuts = False  # whether a client may train a sub-network (else the full model, whose MACs share is 1 uncounted)
    paper_weighting = "samples"  # the rule of the strategy's own paper (strategy.weighting = auto)

    def __init__(self, cfg: Config, spec: ModelSpec, num_clients: int):
        self.cfg = cfg
        self.spec = spec
        self.num_clients = num_clients
        self.planner: Planner | None = None

    @property
    def aggregation(self) -> str:
        return "balanced"

    @property
    def balance(self) -> float:
        return 0.0

    @property
    def weighting(self) -> str:
        """``samples`` or ``count``: what a worker's update weighs before the balance factor."""
        chosen = self.cfg.strategy.weighting
        return self.paper_weighting if chosen == "auto" else chosen

    def require_planner(self) -> Planner:
        if self.planner is None:
            raise PlannerMissing(
                f"strategy {self.name!r} plans from the workers' profiles, and no planner was made "
                "(the profiles were not gathered)"
            )
        return self.planner

    def round_deadline(self) -> float:
        """Seconds of training per round this strategy allows (0: none): an explicit
        ``strategy.deadline``, or the planner's default one."""
        if not self.uses_planner:
            return 0.0
        if self.cfg.strategy.deadline:
            return self.cfg.strategy.deadline
        return self.require_planner().round_deadline() if self.needs_planner else 0.0

    @property
    def needs_planner(self) -> bool:
        return self.uses_planner

    def full(self) -> dict[str, float]:
        return {name: 1.0 for name in self.spec.maskable}

    def uniform(self, r: float) -> dict[str, float]:
        return {name: r for name in self.spec.maskable}

    def configure(self, round: int, clients=None) -> list[Assignment]:
        """What each of ``clients`` (this round's, in client order; default: all) trains."""
        return self.assign(round, range(self.num_clients) if clients is None else clients)

    def assign(self, round: int, clients) -> list[Assignment]:
        """Each strategy's rule for :meth:`configure` (``clients`` given)."""
        steps = self.cfg.train.local_steps
        return [Assignment(self.full(), steps) for _ in clients]

    def observe(self, worker: int, ratios: dict[str, float], measured_step: float) -> None:
        if self.planner is not None:
            self.planner.observe(worker, ratios, measured_step)

    # -- aggregation: begin a round's sums, fold each accepted update as it arrives, finish
    def begin(self, size: int) -> RoundSums:
        return RoundSums(size)

    def aggregate(self, sums: RoundSums, idx: np.ndarray, delta: np.ndarray, weight: float) -> None:
        """Fold one accepted update (the change of the elements ``idx``) into the round's sums."""
        sums.add(idx, delta, weight)

    def finish(self, global_flat: np.ndarray, sums: RoundSums) -> np.ndarray:
        """The new global model; an element no accepted update trained keeps its value."""
        return combine(global_flat, sums.num, sums.den, sums.total, self.aggregation)


class FedAvg(Strategy):
    name = "fedavg"


class FedAvgDrop(Strategy):
    name = "fedavg-drop"
    uses_planner = True

    @property
    def needs_planner(self) -> bool:  # only to derive the default deadline
        return not self.cfg.strategy.deadline

    def assign(self, round: int, clients) -> list[Assignment]:
        steps = self.cfg.train.local_steps
        limit = self.round_deadline()
        return [Assignment(self.full(), steps, time_limit=limit) for _ in clients]


class FedProxPartial(Strategy):
    name = "fedprox-partial"
    uses_planner = True

    def assign(self, round: int, clients) -> list[Assignment]:
        steps = self.cfg.train.local_steps
        mu = self.cfg.strategy.mu
        planner = self.require_planner()
        return [Assignment(self.full(), planner.steps_within(int(c), steps), mu=mu) for c in clients]


class HeteroFL(Strategy):
    name = "heterofl"
    uses_planner = True
    cuts = True
    mask_policy = "ordered"
    paper_weighting = "count"

    def __init__(self, cfg: Config, spec: ModelSpec, num_clients: int):
        super().__init__(cfg, spec, num_clients)
        self.widths: list[float] | None = None

    @property
    def needs_planner(self) -> bool:  # fixed widths plan nothing
        return not self.cfg.strategy.keep_ratios

    def assign(self, round: int, clients) -> list[Assignment]:
        if self.widths is None:  # fixed once for every client, from the profiles
            fixed = self.cfg.strategy.keep_ratios
            self.widths = list(fixed) if fixed else self.require_planner().plan_uniform()
        steps = self.cfg.train.local_steps
        return [Assignment(self.uniform(self.widths[int(c)]), steps) for c in clients]

    def observe(self, worker: int, ratios: dict[str, float], measured_step: float) -> None:
        return None  # static widths


class FedRolex(HeteroFL):
    name = "fedrolex"
    mask_policy = "rolling"


class Elfish(Strategy):
    name = "elfish"
    uses_planner = True
    cuts = True

    @property
    def mask_policy(self) -> str:
        return self.cfg.strategy.mask_policy

    @property
    def aggregation(self) -> str:
        return self.cfg.strategy.aggregation

    @property
    def balance(self) -> float:
        return self.cfg.strategy.balance

    @property
    def needs_planner(self) -> bool:
        return not self.cfg.strategy.keep_ratios

    def assign(self, round: int, clients) -> list[Assignment]:
        steps = self.cfg.train.local_steps
        fixed = self.cfg.strategy.keep_ratios
        if fixed:
            return [Assignment(self.uniform(fixed[int(c)]), steps) for c in clients]
        planner = self.require_planner()
        plans = planner.plan(clients)
        if self.cfg.strategy.fallback == "none":
            return [Assignment(r, steps) for r in plans]
        # the way out when masking alone cannot meet the deadline: fewer steps (all where it can)
        return [Assignment(r, planner.steps_within(int(c), steps, r)) for c, r in zip(clients, plans)]


STRATEGIES = {cls.name: cls for cls in (FedAvg, FedAvgDrop, FedProxPartial, HeteroFL, FedRolex, Elfish)}


def make_strategy(cfg: Config, spec: ModelSpec, num_clients: int) -> Strategy:
    strategy = STRATEGIES[cfg.strategy.name](cfg, spec, num_clients)
    if cfg.strategy.transport == "reduce" and type(strategy).aggregate is not Strategy.aggregate:
        # MPI forms the sums under reduce: a rule of the strategy's own would not run
        raise ConfigError(
            f"strategy.transport = 'reduce' cannot carry strategy {strategy.name!r}'s own aggregation; use 'gather'"
        )
    return strategy
