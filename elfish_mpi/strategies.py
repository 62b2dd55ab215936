"""Strategies: what each worker trains in a round, and how updates combine. No MPI here.

A strategy answers ``configure(round) -> list of per-layer keep ratios`` (one dict per
worker) and names its mask policy and aggregation. The round loop turns the ratios into
masks (masking.py) and the updates into the new model (aggregation.py).

- ``fedavg`` (McMahan et al., 2017): every worker trains the full model; the round waits
  for the slowest worker. Aggregation over full updates (balanced == naive here).
- ``elfish`` (Xu et al., 2019): a straggler soft-trains a sub-network. Keep ratios come
  from ``strategy.keep_ratios`` if given, else from the planner (profiles + deadline,
  re-planned from measured round times); masks follow ``strategy.mask_policy`` (random:
  a different set every round); aggregation follows ``strategy.aggregation``.
"""
from __future__ import annotations

from .config import Config
from .models import ModelSpec
from .planner import Planner


class Strategy:
    name = "base"

    def __init__(self, cfg: Config, spec: ModelSpec, num_workers: int):
        self.cfg = cfg
        self.spec = spec
        self.num_workers = num_workers
        self.planner: Planner | None = None

    @property
    def mask_policy(self) -> str:
        return self.cfg.strategy.mask_policy

    @property
    def aggregation(self) -> str:
        return self.cfg.strategy.aggregation

    @property
    def needs_planner(self) -> bool:
        return False

    def full(self) -> dict[str, float]:
        return {name: 1.0 for name in self.spec.maskable}

    def configure(self, round: int) -> list[dict[str, float]]:
        raise NotImplementedError

    def observe(self, worker: int, ratios: dict[str, float], measured_step: float) -> None:
        if self.planner is not None:
            self.planner.observe(worker, ratios, measured_step)


class FedAvg(Strategy):
    name = "fedavg"

    @property
    def mask_policy(self) -> str:
        return "ordered"

    @property
    def aggregation(self) -> str:
        return "balanced"

    def configure(self, round: int) -> list[dict[str, float]]:
        return [self.full() for _ in range(self.num_workers)]


class Elfish(Strategy):
    name = "elfish"

    @property
    def needs_planner(self) -> bool:
        return not self.cfg.strategy.keep_ratios

    def configure(self, round: int) -> list[dict[str, float]]:
        fixed = self.cfg.strategy.keep_ratios
        if fixed:
            return [{name: r for name in self.spec.maskable} for r in fixed]
        assert self.planner is not None, "elfish without fixed keep ratios needs a planner"
        return self.planner.plan()


STRATEGIES = {"fedavg": FedAvg, "elfish": Elfish}


def make_strategy(cfg: Config, spec: ModelSpec, num_workers: int) -> Strategy:
    return STRATEGIES[cfg.strategy.name](cfg, spec, num_workers)
