"""Unit tests for elfish_mpi.strategies: what each strategy asks every worker to train."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from elfish_mpi.aggregation import aggregate
from elfish_mpi.config import load_config
from elfish_mpi.masking import make_masks
from elfish_mpi.models import alexnet, lenet
from elfish_mpi.planner import Planner
from elfish_mpi.strategies import Elfish, FedAvg, PlannerMissing, make_strategy

torch.set_num_threads(1)

LENET = lenet()
FULL = {"conv1": 1.0, "conv2": 1.0, "fc1": 1.0}


def ratios(plan):
    return [a.ratios for a in plan]


def with_planner(strategy, beta=(1.0, 4.0)):
    """A planner whose workers are 1x and 4x slow, compute-bound (alpha = 0), made from the
    strategy's config as the round loop makes it."""
    s = strategy.cfg.strategy
    strategy.planner = Planner(
        LENET, np.zeros(len(beta)), np.array(beta), min_keep=s.min_keep,
        local_steps=strategy.cfg.train.local_steps, deadline=s.deadline,
    )
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
    # Prepare
    strategy = with_planner(make_strategy(load_config(None, ["strategy.name=fedavg-drop"]), LENET, 2))
    steps = strategy.cfg.train.local_steps

    # Execute
    plan = strategy.configure(1)

    # Assert: the fastest worker's predicted full round (1 s per step) plus the 10% slack
    assert ratios(plan) == [FULL, FULL]
    assert [a.time_limit for a in plan] == pytest.approx([1.1 * steps, 1.1 * steps])
    explicit = with_planner(make_strategy(load_config(None, ["strategy.name=fedavg-drop", "strategy.deadline=2.5"]), LENET, 2))
    assert [a.time_limit for a in explicit.configure(1)] == [2.5, 2.5]


PLANNING = ["fedavg-drop", "fedprox-partial", "heterofl", "fedrolex", "elfish"]


@pytest.mark.parametrize("deadline", [0.0, 12.0, 25.0, 33.0])
def test_every_strategy_faces_the_same_deadline(deadline):
    # Prepare: workers 1x, 2.5x and 4x slow, compute-bound; 10 steps of 1 s at full speed
    beta = (1.0, 2.5, 4.0)
    made = {
        name: with_planner(make_strategy(load_config(None, [f"strategy.name={name}", f"strategy.deadline={deadline}"]), LENET, 3), beta)
        for name in PLANNING
    }

    # Execute
    deadlines = {name: s.round_deadline() for name, s in made.items()}
    plans = {name: s.configure(1) for name, s in made.items()}

    # Assert: one deadline for all; each strategy's work fits in it (no slack on top)
    expected = deadline or 1.1 * 10
    assert deadlines == pytest.approx({name: expected for name in PLANNING})
    assert [a.time_limit for a in plans["fedavg-drop"]] == pytest.approx([expected] * 3)
    for name in ("elfish", "heterofl", "fedrolex", "fedprox-partial"):
        planner = made[name].planner
        for w, a in enumerate(plans[name]):
            predicted = planner.predict(w, a.ratios) * a.steps
            at_floor = all(r <= made[name].cfg.strategy.min_keep + 1e-9 for r in a.ratios.values())
            assert predicted <= expected + 1e-9 or at_floor, (name, w, predicted, expected)
    # fedprox-partial takes as many full steps as fit
    for w, a in enumerate(plans["fedprox-partial"]):
        assert a.steps == max(1, min(10, int(expected // beta[w] + 1e-9)))


def test_fedprox_partial_gives_stragglers_fewer_steps_and_a_proximal_term():
    cfg = load_config(None, ["strategy.name=fedprox-partial", "strategy.mu=0.1", "train.local_steps=20"])
    strategy = with_planner(make_strategy(cfg, LENET, 2))
    plan = strategy.configure(1)
    assert ratios(plan) == [FULL, FULL]
    assert plan[0].steps == 20
    assert plan[1].steps == 5  # 4x slower: the full steps that fit in 22 s (20 steps of 1 s, + 10%)
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


def window_start(kept: np.ndarray, width: int) -> int:
    """The first neuron of the window of consecutive neurons (wrapping around) that ``kept`` is."""
    members = set(kept.tolist())
    starts = [i for i in members if (i - 1) % width not in members]
    assert len(starts) == 1, f"{sorted(members)} is not one window of consecutive neurons of {width}"
    return starts[0]


def test_fedrolex_rolls_the_heterofl_widths():
    # Prepare: FedRolex and HeteroFL over the same fleet (1x and 4x slow); rounds enough for
    # the windows of conv1 (20 neurons) and conv2 (50) to wrap around
    rolex = with_planner(make_strategy(load_config(None, ["strategy.name=fedrolex"]), LENET, 2))
    hetero = with_planner(make_strategy(load_config(None, ["strategy.name=heterofl"]), LENET, 2))
    rounds = list(range(1, 53))

    # Execute: what the slow worker trains, round by round
    plans = [rolex.configure(r) for r in rounds]
    kept = [make_masks(LENET, plan[1].ratios, rolex.mask_policy, seed=0, round=r, worker=1)
            for r, plan in zip(rounds, plans)]

    # Assert: HeteroFL's widths every round, the slow worker thinned
    assert all(ratios(plan) == ratios(hetero.configure(r)) for r, plan in zip(rounds, plans))
    assert plans[0][1].ratios["conv1"] < 1.0
    widths = LENET.full_widths()
    for layer in LENET.maskable:
        width = widths[layer]
        assert {k[layer].size for k in kept} == {kept[0][layer].size} and kept[0][layer].size < width, layer
        # one window of consecutive neurons, whose start moves by one neuron every round ...
        starts = [window_start(k[layer], width) for k in kept]
        assert [(b - a) % width for a, b in zip(starts, starts[1:])] == [1] * (len(rounds) - 1), (layer, starts)
        # ... and wraps around from the last neuron to the first
        if width < len(rounds):
            assert any(b < a for a, b in zip(starts, starts[1:])), (layer, starts)


@pytest.mark.parametrize("name", PLANNING)
def test_a_planning_strategy_without_planner_fails_loudly(name):
    strategy = make_strategy(load_config(None, [f"strategy.name={name}"]), LENET, 2)
    with pytest.raises(PlannerMissing, match=f"strategy '{name}' plans from the workers' profiles"):
        strategy.configure(0)


@pytest.mark.parametrize("name, expected", [
    ("fedavg", "samples"), ("fedavg-drop", "samples"), ("fedprox-partial", "samples"),
    ("heterofl", "count"), ("fedrolex", "count"), ("elfish", "samples"),
])
def test_weighting_defaults_to_each_papers_rule_and_can_be_chosen(name, expected):
    auto = make_strategy(load_config(None, [f"strategy.name={name}"]), LENET, 2)
    assert auto.weighting == expected
    for chosen in ("samples", "count"):
        assert make_strategy(load_config(None, [f"strategy.name={name}", f"strategy.weighting={chosen}"]), LENET, 2).weighting == chosen


def test_observe_without_planner_is_a_no_op():
    # fedavg and elfish with fixed keep ratios have no planner: a measurement changes nothing
    for overrides in (["strategy.name=fedavg"], ["strategy.keep_ratios=[1.0, 0.5]"]):
        strategy = make_strategy(load_config(None, overrides), LENET, 2)
        before = strategy.configure(1)
        strategy.observe(1, before[1].ratios, 100.0)
        assert strategy.planner is None and strategy.configure(2) == before


@pytest.mark.parametrize("mode", ["balanced", "naive"])
def test_the_strategy_folds_updates_as_they_arrive_into_the_recovered_model(mode):
    # Prepare: three updates over a 6-element model; element 5 is trained by nobody
    strategy = make_strategy(load_config(None, [f"strategy.aggregation={mode}"]), LENET, 3)
    glob = np.linspace(-1, 1, 6).astype(np.float32)
    updates = [(np.array([0, 1, 2]), np.array([0.5, -0.25, 1.0], np.float32), 300.0),
               (np.array([1, 3]), np.array([0.75, 2.0], np.float32), 150.0),
               (np.array([0, 4]), np.array([-1.0, 0.125], np.float32), 75.0)]

    # Execute: one update at a time, the buffer of each reused afterwards as the round loop does
    sums = strategy.begin(glob.size)
    for idx, delta, weight in updates:
        buf = delta.copy()
        strategy.aggregate(sums, idx, buf, weight)
        buf[:] = np.nan
    new = strategy.finish(glob, sums)

    # Assert: the same as the pure reference over the whole list; the untrained element kept
    np.testing.assert_array_equal(new, aggregate(glob, updates, mode))
    assert new[5] == glob[5] and sums.total == 525.0
    num = np.zeros(6)
    num[[0, 1, 2]] += 300 * np.array([0.5, -0.25, 1.0])
    num[[1, 3]] += 150 * np.array([0.75, 2.0])
    num[[0, 4]] += 75 * np.array([-1.0, 0.125])
    den = np.array([375.0, 450.0, 300.0, 150.0, 75.0, 0.0])
    expect = glob.astype(np.float64).copy()
    trained = den > 0
    expect[trained] += num[trained] / (den[trained] if mode == "balanced" else 525.0)
    np.testing.assert_allclose(new, expect.astype(np.float32), rtol=1e-6)


def test_a_strategy_with_its_own_aggregation_is_refused_under_reduce(monkeypatch):
    # Prepare: a rule of its own (here: updates count double), which MPI's reduce would skip
    from elfish_mpi import strategies
    from elfish_mpi.config import ConfigError

    class Doubled(strategies.Elfish):
        name = "elfish"

        def aggregate(self, sums, idx, delta, weight):
            sums.add(idx, delta, 2 * weight)

    monkeypatch.setitem(strategies.STRATEGIES, "elfish", Doubled)

    # Execute / Assert
    assert isinstance(make_strategy(load_config(), LENET, 2), Doubled)  # gather: its rule runs
    with pytest.raises(ConfigError, match="cannot carry strategy 'elfish''s own aggregation; use 'gather'"):
        make_strategy(load_config(None, ["strategy.transport=reduce"]), LENET, 2)
