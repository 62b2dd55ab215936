"""Unit tests for elfish_mpi.profiling (cost model fit) and elfish_mpi.planner (keep ratios)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from elfish_mpi import profiling
from elfish_mpi.masking import keep_count, make_masks
from elfish_mpi.models import ModelSpec, alexnet, chain_groups, Chain, lenet
from elfish_mpi.planner import Planner
from elfish_mpi.profiling import configurations, fit_cost, macs_fraction

torch.set_num_threads(1)

LENET = lenet()
FULL = {name: 1.0 for name in LENET.maskable}


def _planner(alpha, beta, spec=LENET, **kw) -> Planner:
    kw.setdefault("min_keep", 0.25)
    kw.setdefault("local_steps", 10)
    return Planner(spec, np.asarray(alpha, float), np.asarray(beta, float), **kw)


# -- profiling ------------------------------------------------------------------------


@pytest.mark.parametrize("spec", [lenet(), alexnet()], ids=["lenet", "alexnet"])
def test_configurations_shape_and_rows(spec):
    # Execute
    cfgs = configurations(spec)

    # Assert
    n = len(spec.maskable)
    assert cfgs.shape == (len(profiling.UNIFORM_RATIOS) + n, n)
    for i, r in enumerate(profiling.UNIFORM_RATIOS):
        assert np.all(cfgs[i] == r)
    layer_rows = cfgs[len(profiling.UNIFORM_RATIOS):]
    np.testing.assert_array_equal(layer_rows, np.where(np.eye(n, dtype=bool), profiling.LAYER_RATIO, 1.0))
    assert profiling.ratios_of(spec, cfgs[-1]) == {**{k: 1.0 for k in spec.maskable}, spec.maskable[-1]: 0.5}


@pytest.mark.parametrize("name, shape", [("lenet", (1, 28, 28)), ("alexnet", (3, 32, 32)), ("resnet18", (3, 32, 32)),
                                         ("vit-tiny", (1, 28, 28))])
@pytest.mark.parametrize("kind", ["layers", "quick"])
def test_rank_0_counts_the_costs_of_the_sub_networks_the_workers_time(name, shape, kind):
    # Prepare: what a worker builds and times for each profiling configuration (Worker.profile)
    from elfish_mpi.models import get_spec
    from elfish_mpi.submodel import build_submodel, flat_params

    spec = get_spec(name, 10, shape)
    base = flat_params(spec.init_module())
    for row in configurations(spec, kind):
        ratios = profiling.ratios_of(spec, row)
        model, _ = build_submodel(spec, make_masks(spec, ratios, "ordered", seed=0, round=0, worker=2), base)
        # Execute: what rank 0 counts for it (Aggregator.gather_profiles)
        widths = profiling.widths_for(spec, ratios)
        # Assert: the same sub-network
        assert widths == model.widths
        assert sum(p.numel() for p in model.parameters()) == spec.num_params(widths)


def test_macs_fraction_and_memory_shrink_with_ratio():
    assert macs_fraction(LENET, FULL) == 1.0
    fracs = [macs_fraction(LENET, {k: r for k in FULL}) for r in profiling.UNIFORM_RATIOS]
    mems = [profiling.memory_bytes(LENET, {k: r for k in FULL}, 32) for r in profiling.UNIFORM_RATIOS]
    assert fracs == sorted(fracs, reverse=True) and len(set(fracs)) == len(fracs)
    assert mems == sorted(mems, reverse=True) and len(set(mems)) == len(mems)


def test_fit_cost_recovers_exact_affine_data():
    # Prepare
    x = np.array([macs_fraction(LENET, profiling.ratios_of(LENET, row)) for row in configurations(LENET)])
    y = 0.002 + 0.0125 * x

    # Execute
    alpha, beta = fit_cost(x, y)

    # Assert
    assert alpha == pytest.approx(0.002, rel=1e-9, abs=1e-12)
    assert beta == pytest.approx(0.0125, rel=1e-9)


def test_fit_cost_non_negative_on_noisy_data():
    rng = np.random.default_rng(0)
    x = np.array([1.0, 0.6, 0.3, 0.1, 0.95, 0.9, 0.98])
    for _ in range(50):
        y = np.abs(0.01 * x + rng.normal(0.0, 0.01, x.size)) + 1e-6
        alpha, beta = fit_cost(x, y)
        assert alpha >= 0.0 and beta >= 0.0
        assert np.isfinite(alpha) and np.isfinite(beta)


def test_fit_cost_decreasing_times_become_fixed_cost():
    # Prepare: time falls as compute grows (pure noise)
    x = np.array([1.0, 0.5, 0.25])
    y = np.array([1.0, 2.0, 3.0])

    # Execute
    alpha, beta = fit_cost(x, y)

    # Assert
    assert alpha == pytest.approx(2.0)
    assert 0.0 <= beta < 1e-9


def test_fit_cost_negative_intercept_goes_through_the_origin():
    x = np.array([1.0, 0.5, 0.25])
    y = -0.5 + 2.0 * x  # 1.5, 0.5, 0.0 -> the zero time is dropped
    alpha, beta = fit_cost(x, y)
    assert alpha == 0.0
    xs, ys = x[:2], y[:2]
    assert beta == pytest.approx(float(xs @ ys / (xs @ xs)))


def test_fit_cost_degenerate_inputs():
    # a single configuration, or every configuration at the same compute
    assert fit_cost(np.array([0.5]), np.array([2.0])) == (0.0, pytest.approx(4.0))
    assert fit_cost(np.array([0.5, 0.5]), np.array([1.0, 3.0])) == (0.0, pytest.approx(4.0))
    # no usable time at all
    assert fit_cost(np.array([1.0, 0.5]), np.array([np.nan, 0.0])) == (0.0, 1.0)
    # invalid times are ignored
    alpha, beta = fit_cost(np.array([1.0, 0.5, 0.25, 0.75]), np.array([3.0, 2.0, 1.5, np.inf]))
    assert alpha == pytest.approx(1.0) and beta == pytest.approx(2.0)


# -- planner --------------------------------------------------------------------------


def test_worker_as_fast_as_the_deadline_keeps_all():
    # Prepare
    planner = _planner([0.001, 0.001], [0.01, 0.0105])  # second within the slack

    # Execute
    plans = planner.plan()

    # Assert
    assert plans == [FULL, FULL]


def test_4x_slower_worker_meets_the_deadline_above_min_keep():
    # Prepare
    planner = _planner([0.0, 0.0], [1.0, 4.0], min_keep=0.25)

    # Execute
    fast, slow = planner.plan()

    # Assert
    assert fast == FULL
    target = planner.deadline_step()
    assert target == pytest.approx(1.0 * (1 + planner.slack))  # the fastest full step, + 10% margin
    assert planner.predict(1, slow) <= target
    assert planner.predict(1, slow) > 0.5  # it did not cut far more than needed
    assert set(slow) == set(FULL)
    assert all(0.25 - 1e-9 <= r <= 1.0 for r in slow.values())
    assert min(slow.values()) < 1.0


def test_unreachable_deadline_puts_every_layer_at_min_keep():
    # Prepare: the second worker's fixed cost alone exceeds the deadline
    planner = _planner([0.0, 5.0], [1.0, 1.0], min_keep=0.25)

    # Execute
    plans = planner.plan()

    # Assert
    assert plans[0] == FULL
    # the floor in whole neurons, rounded up: 5 of 20, 13 of 50, 125 of 500
    assert plans[1] == {"conv1": 5 / 20, "conv2": 13 / 50, "fc1": 125 / 500}


def test_plans_are_whole_neurons_and_credit_the_neurons_really_removed():
    # Prepare: workers from 1x to 6x slow (compute-bound), on both models
    for spec in (lenet(), alexnet()):
        widths = spec.full_widths()
        planner = _planner([0.0] * 6, [1.0, 1.5, 2.0, 3.0, 4.5, 6.0], spec=spec)

        # Execute
        plans = planner.plan()

        # Assert: every ratio is a kept count over the width, make_masks keeps exactly that count,
        # and each plan meets the deadline unless every layer is at its floor
        floor = {name: keep_count(width, 0.25) / width for name, width in widths.items()}
        for w, plan in enumerate(plans):
            kept = make_masks(spec, plan, "random", seed=0, round=1, worker=w)
            for name, r in plan.items():
                assert r * widths[name] == pytest.approx(round(r * widths[name]))
                assert kept[name].size == round(r * widths[name])
            assert planner.predict(w, plan) <= planner.deadline_step() or plan == floor


def test_a_move_that_saves_nothing_is_not_made():
    # Prepare: the second worker's time is all fixed cost: no cut saves anything
    planner = _planner([0.0, 3.0], [1.0, 0.0])

    # Execute
    fast, slow = planner.plan()

    # Assert: it keeps the full model (thinning it would cost accuracy for no time)
    assert fast == FULL and slow == FULL


def test_fallback_steps_engage_only_when_masking_cannot_meet_the_deadline():
    from elfish_mpi.config import load_config
    from elfish_mpi.strategies import make_strategy

    def planned(fallback, alpha, beta):
        strategy = make_strategy(load_config(None, [f"strategy.fallback={fallback}", "train.local_steps=10"]), LENET, 3)
        strategy.planner = _planner(alpha, beta)
        return strategy.configure(1), strategy.planner

    # Prepare / Execute: worker 2 is 4x slow (masking suffices); worker 3 has a fixed cost of
    # 1 s per step, which no mask removes, against a deadline of 1.1 s per step
    alpha, beta = [0.0, 0.0, 1.0], [1.0, 4.0, 4.0]
    on, planner = planned("steps", alpha, beta)
    off, _ = planned("none", alpha, beta)

    # Assert
    assert [a.steps for a in on[:2]] == [10, 10]  # masking met the deadline: no fallback
    floor = {"conv1": 5 / 20, "conv2": 13 / 50, "fc1": 125 / 500}
    assert on[2].ratios == floor and off[2].ratios == floor
    expected = int(planner.round_deadline() // planner.predict(2, floor))
    assert 1 <= on[2].steps == expected < 10
    assert planner.predict(2, floor) * on[2].steps <= planner.round_deadline()
    assert [a.steps for a in off] == [10, 10, 10]  # pure ELFISH: every step, the round waits


def test_first_cut_on_lenet_is_the_most_expensive_per_neuron_layer():
    # Prepare: the slow worker needs exactly one cut of conv1 (1 of 20 neurons saves
    # 14400 of its own MACs and 80000 of conv2's, about 4.1 % of the model)
    planner = _planner([0.0, 0.0], [1.0, 1.12])
    gains = {}
    for name, width in (("conv1", 20), ("conv2", 50), ("fc1", 500)):
        cut = dict(FULL, **{name: 0.95})
        gains[name] = (planner.predict(1, FULL) - planner.predict(1, cut)) / (0.05 * width)

    # Execute
    plans = planner.plan()

    # Assert
    assert max(gains, key=gains.get) == "conv1"
    assert plans[1] == {"conv1": 0.95, "conv2": 1.0, "fc1": 1.0}


def test_greedy_ranks_cuts_per_neuron_not_by_total_saving():
    # Prepare: fc-only model; cutting 'narrow' (1 of 20 neurons) saves 1010 MACs,
    # cutting 'wide' (50 of 1000 neurons) saves more in total (1100) but far less per neuron
    layers = (("narrow", "fc", 20, 0, 0, 0), ("wide", "fc", 1000, 0, 0, 0), ("out", "fc", 2, 0, 0, 0))
    spec = ModelSpec("toy", lambda: (Chain((1, 1, 10), layers), chain_groups((1, 1, 10), layers)), (1, 1, 10), 2)
    assert spec.macs() == 20 * 10 + 1000 * 20 + 2 * 1000
    assert spec.macs() - spec.macs({"narrow": 19}) == 10 + 1000
    assert spec.macs() - spec.macs({"wide": 950}) == 50 * 20 + 2 * 50
    planner = _planner([0.0, 0.0], [1.0, 1.15], spec=spec)

    # Execute
    plans = planner.plan()

    # Assert
    assert plans[1] == {"narrow": 0.95, "wide": 1.0}


def test_observe_slow_measurement_increases_scale_and_shrinks_the_plan():
    # Prepare
    planner = _planner([0.0, 0.0], [1.0, 1.0])
    assert planner.plan() == [FULL, FULL]

    # Execute
    planner.observe(1, FULL, 2.0)  # measured twice the prediction
    plans = planner.plan()

    # Assert
    assert planner.scale[0] == 1.0
    assert planner.scale[1] == pytest.approx(1.5)  # EMA with smoothing 0.5
    assert plans[0] == FULL
    assert min(plans[1].values()) < 1.0
    assert planner.predict(1, plans[1]) <= 1.0 * (1 + planner.slack)
    assert macs_fraction(LENET, plans[1]) < 1.0


def test_observe_ignores_invalid_measurements():
    planner = _planner([0.0, 0.0], [1.0, 1.0])
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        planner.observe(1, FULL, bad)
    np.testing.assert_array_equal(planner.scale, [1.0, 1.0])


def test_replan_false_ignores_observe():
    # Prepare
    planner = _planner([0.0, 0.0], [1.0, 1.0], replan=False)

    # Execute
    planner.observe(1, FULL, 10.0)

    # Assert
    np.testing.assert_array_equal(planner.scale, [1.0, 1.0])
    assert planner.plan() == [FULL, FULL]


def test_state_round_trip():
    # Prepare
    planner = _planner([0.01, 0.0], [1.0, 3.0])
    planner.observe(1, FULL, 5.0)
    planner.observe(0, FULL, 0.5)
    state = planner.state()

    # Execute
    other = _planner([0.0, 0.0], [1.0, 1.0])
    other.load_state(state)

    # Assert
    for key in ("planner_alpha", "planner_beta", "planner_scale"):
        np.testing.assert_array_equal(other.state()[key], state[key])
    assert other.plan() == planner.plan()
    # the state is a copy: mutating it does not change the planner
    state["planner_scale"][:] = 99.0
    assert planner.scale[1] != 99.0


def test_explicit_deadline():
    # Prepare: 10 steps in 5 s -> 0.5 s per step (an explicit deadline has no slack on top)
    tight = _planner([0.0, 0.0], [1.0, 1.0], deadline=5.0, local_steps=10)
    loose = _planner([0.0, 0.0], [1.0, 3.0], deadline=100.0, local_steps=10)

    # Execute
    tight_plans = tight.plan()
    loose_plans = loose.plan()

    # Assert
    assert tight.deadline_step() == pytest.approx(0.5)
    for w, plan in enumerate(tight_plans):
        assert min(plan.values()) < 1.0
        assert tight.predict(w, plan) <= 0.5 + 1e-12
    assert loose.deadline_step() == pytest.approx(10.0)
    assert loose_plans == [FULL, FULL]


def greedy_on_predicted_time(planner: Planner, worker: int, target: float) -> dict[str, float]:
    """The planner's greedy as it was written before its order of cuts was computed once: each
    move compares the predicted seconds it saves per neuron removed."""
    import math

    widths = {g.name: g.units for g in planner.spec.groups}
    ratios = lambda kept: {n: kept[n] / widths[n] for n in widths}  # noqa: E731
    kept = dict(widths)
    floor = {n: keep_count(w, planner.min_keep) for n, w in widths.items()}
    current = planner.predict(worker, ratios(kept))
    while current > target:
        best, best_gain, best_time = None, 0.0, current
        for n, w in widths.items():
            k = max(floor[n], kept[n] - max(1, math.ceil(planner.step * w - 1e-9)))
            if k >= kept[n]:
                continue
            trial = dict(kept, **{n: k})
            t = planner.predict(worker, ratios(trial))
            if t >= current:
                continue
            gain = (current - t) / (kept[n] - k)
            if best is None or gain > best_gain:
                best, best_gain, best_time = trial, gain, t
        if best is None:
            break
        kept, current = best, best_time
    return ratios(kept)


@pytest.mark.parametrize("spec", [LENET, alexnet(10, (3, 32, 32))], ids=["lenet", "alexnet"])
def test_the_order_of_cuts_computed_once_plans_what_the_greedy_on_predicted_time_plans(spec):
    # Prepare: 300 clients of random affine costs and scales, targets from loose to unreachable
    rng = np.random.default_rng(5)
    planner = Planner(spec, rng.uniform(0.001, 0.01, 300), rng.uniform(0.005, 0.05, 300), min_keep=0.25, local_steps=10)
    planner.scale = rng.uniform(0.5, 2.0, 300)
    # Execute / Assert: the same plan for every client and target (and many different plans)
    seen = set()
    for target in (0.005, 0.01, 0.02, 0.04):
        for w in range(300):
            plan = planner.plan_worker(w, target)
            assert plan == greedy_on_predicted_time(planner, w, target), (w, target)
            seen.add(tuple(sorted(plan.items())))
    assert len(seen) > 10
