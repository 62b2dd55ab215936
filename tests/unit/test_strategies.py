"""Unit tests for elfish_mpi.strategies: what each strategy asks every worker to train."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from elfish_mpi.config import load_config
from elfish_mpi.models import alexnet, lenet
from elfish_mpi.planner import Planner
from elfish_mpi.strategies import Elfish, FedAvg, make_strategy

torch.set_num_threads(1)

LENET = lenet()
FULL = {"conv1": 1.0, "conv2": 1.0, "fc1": 1.0}


def ratios(plan):
    return [a.ratios for a in plan]


def with_planner(strategy, beta=(1.0, 4.0)):
    """A planner whose workers are 1x and 4x slow, compute-bound (alpha = 0)."""
    strategy.planner = Planner(LENET, np.zeros(len(beta)), np.array(beta), min_keep=0.25, local_steps=10)
    return strategy


@pytest.mark.parametrize("spec", [lenet(), alexnet()], ids=["lenet", "alexnet"])
def test_fedavg_gives_all_one_ratios(spec):
    # Prepare
    cfg = load_config(None, ["strategy.name=fedavg", "strategy.aggregation=naive", "strategy.mask_policy=random"])

    # Execute
    strategy = make_strategy(cfg, spec, 3)
    plans = [strategy.configure(r) for r in range(3)]

    # Assert
    assert isinstance(strategy, FedAvg)
    assert not strategy.needs_planner
    for plan in plans:
        assert ratios(plan) == [{name: 1.0 for name in spec.maskable}] * 3
        assert all(a.steps == cfg.train.local_steps and a.time_limit == 0 and a.mu == 0 for a in plan)
    # whatever the config says, fedavg trains the full model
    assert strategy.mask_policy == "ordered"
    assert strategy.aggregation == "balanced"


def test_elfish_fixed_keep_ratios_are_uniform_per_layer():
    # Prepare
    cfg = load_config(None, ["strategy.keep_ratios=[1.0, 0.5, 0.25]", "strategy.mask_policy=rolling"])

    # Execute
    strategy = make_strategy(cfg, LENET, 3)
    plan = ratios(strategy.configure(0))

    # Assert
    assert isinstance(strategy, Elfish)
    assert not strategy.needs_planner
    assert plan == [FULL, {"conv1": 0.5, "conv2": 0.5, "fc1": 0.5}, {"conv1": 0.25, "conv2": 0.25, "fc1": 0.25}]
    assert ratios(strategy.configure(7)) == plan
    assert strategy.mask_policy == "rolling"
    assert strategy.aggregation == "balanced"
    assert strategy.balance == cfg.strategy.balance


def test_elfish_without_fixed_ratios_uses_the_planner():
    strategy = with_planner(make_strategy(load_config(None, ["strategy.aggregation=naive"]), LENET, 2))
    plan = ratios(strategy.configure(0))
    assert plan == strategy.planner.plan()
    assert plan[0] == FULL and min(plan[1].values()) < 1.0
    assert strategy.aggregation == "naive"


def test_elfish_observe_reaches_the_planner():
    strategy = with_planner(make_strategy(load_config(), LENET, 2), beta=(1.0, 1.0))
    assert ratios(strategy.configure(0)) == [FULL, FULL]
    strategy.observe(1, FULL, 3.0)
    assert strategy.planner.scale[1] == pytest.approx(2.0)
    assert min(strategy.configure(1)[1].ratios.values()) < 1.0


def test_fedavg_drop_sets_a_deadline_from_the_fastest_worker():
    strategy = with_planner(make_strategy(load_config(None, ["strategy.name=fedavg-drop"]), LENET, 2))
    plan = strategy.configure(1)
    assert ratios(plan) == [FULL, FULL]
    expected = strategy.planner.target_step() * strategy.cfg.train.local_steps
    assert [a.time_limit for a in plan] == pytest.approx([expected, expected])
    explicit = with_planner(make_strategy(load_config(None, ["strategy.name=fedavg-drop", "strategy.deadline=2.5"]), LENET, 2))
    assert [a.time_limit for a in explicit.configure(1)] == [2.5, 2.5]


def test_fedprox_partial_gives_stragglers_fewer_steps_and_a_proximal_term():
    cfg = load_config(None, ["strategy.name=fedprox-partial", "strategy.mu=0.1", "train.local_steps=20"])
    strategy = with_planner(make_strategy(cfg, LENET, 2))
    plan = strategy.configure(1)
    assert ratios(plan) == [FULL, FULL]
    assert plan[0].steps == 20
    assert 4 <= plan[1].steps <= 6  # 4x slower: about a quarter of the steps (plus the slack)
    assert all(a.mu == 0.1 for a in plan)


def test_heterofl_widths_are_static_nested_and_uniform():
    strategy = with_planner(make_strategy(load_config(None, ["strategy.name=heterofl"]), LENET, 2))
    first = strategy.configure(1)
    strategy.observe(1, first[1].ratios, 100.0)  # a measurement does not change HeteroFL's widths
    later = strategy.configure(5)
    assert ratios(first) == ratios(later)
    assert first[0].ratios == FULL
    assert len(set(first[1].ratios.values())) == 1 and first[1].ratios["conv1"] < 1.0
    assert strategy.mask_policy == "ordered" and strategy.balance == 0.0


def test_fedrolex_rolls_the_heterofl_widths():
    strategy = with_planner(make_strategy(load_config(None, ["strategy.name=fedrolex"]), LENET, 2))
    assert strategy.mask_policy == "rolling"
    assert ratios(strategy.configure(1)) == ratios(strategy.configure(2))


def test_elfish_without_planner_or_ratios_fails_loudly():
    strategy = make_strategy(load_config(), LENET, 2)
    with pytest.raises(AttributeError):
        strategy.configure(0)


def test_observe_without_planner_is_a_no_op():
    strategy = make_strategy(load_config(None, ["strategy.name=fedavg"]), LENET, 2)
    strategy.observe(0, {"conv1": 1.0}, 1.0)
    assert strategy.planner is None
