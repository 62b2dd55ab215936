"""Unit tests for elfish_mpi.strategies: the keep ratios fedavg and elfish hand out."""
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
        assert plan == [{name: 1.0 for name in spec.maskable}] * 3
    # whatever the config says, fedavg trains the full model
    assert strategy.mask_policy == "ordered"
    assert strategy.aggregation == "balanced"


def test_elfish_fixed_keep_ratios_are_uniform_per_layer():
    # Prepare
    cfg = load_config(None, ["strategy.keep_ratios=[1.0, 0.5, 0.25]", "strategy.mask_policy=rolling"])

    # Execute
    strategy = make_strategy(cfg, LENET, 3)
    plan = strategy.configure(0)

    # Assert
    assert isinstance(strategy, Elfish)
    assert not strategy.needs_planner
    assert plan == [
        {"conv1": 1.0, "conv2": 1.0, "fc1": 1.0},
        {"conv1": 0.5, "conv2": 0.5, "fc1": 0.5},
        {"conv1": 0.25, "conv2": 0.25, "fc1": 0.25},
    ]
    assert strategy.configure(7) == plan
    assert strategy.mask_policy == "rolling"
    assert strategy.aggregation == "balanced"


def test_elfish_without_fixed_ratios_uses_the_planner():
    # Prepare
    cfg = load_config(None, ["strategy.aggregation=naive"])
    strategy = make_strategy(cfg, LENET, 2)
    assert strategy.needs_planner
    planner = Planner(LENET, np.array([0.0, 0.0]), np.array([1.0, 4.0]), min_keep=0.25, local_steps=10)
    strategy.planner = planner

    # Execute
    plan = strategy.configure(0)

    # Assert
    assert plan == planner.plan()
    assert plan[0] == {"conv1": 1.0, "conv2": 1.0, "fc1": 1.0}
    assert min(plan[1].values()) < 1.0
    assert strategy.aggregation == "naive"


def test_elfish_observe_reaches_the_planner():
    # Prepare
    strategy = make_strategy(load_config(), LENET, 2)
    strategy.planner = Planner(LENET, np.zeros(2), np.ones(2), min_keep=0.25, local_steps=10)
    full = {"conv1": 1.0, "conv2": 1.0, "fc1": 1.0}
    assert strategy.configure(0) == [full, full]

    # Execute
    strategy.observe(1, full, 3.0)

    # Assert
    assert strategy.planner.scale[1] == pytest.approx(2.0)
    assert min(strategy.configure(1)[1].values()) < 1.0


def test_elfish_without_planner_or_ratios_fails_loudly():
    strategy = make_strategy(load_config(), LENET, 2)
    with pytest.raises((AssertionError, AttributeError)):  # AttributeError under python -O
        strategy.configure(0)


def test_observe_without_planner_is_a_no_op():
    strategy = make_strategy(load_config(None, ["strategy.name=fedavg"]), LENET, 2)
    strategy.observe(0, {"conv1": 1.0}, 1.0)
    assert strategy.planner is None
