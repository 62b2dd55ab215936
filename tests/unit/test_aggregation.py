"""Unit tests for elfish_mpi.aggregation: balanced and naive masked weighted recovery."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from elfish_mpi.aggregation import accumulate, aggregate, combine, worker_weight

torch.set_num_threads(1)

GLOBAL = np.array([1.0, 2.0, -3.0, 0.1, 7.25], dtype=np.float32)


def _updates():
    # worker A (weight 1) trained 0,1,2; worker B (weight 3) trained 1,2,3; nobody trained 4
    a = (np.array([0, 1, 2]), np.array([0.5, 1.0, -2.0], dtype=np.float32), 1.0)
    b = (np.array([1, 2, 3]), np.array([2.0, 4.0, 0.4], dtype=np.float32), 3.0)
    return [a, b]


def test_balanced_is_the_weighted_mean_over_trainers():
    # Execute
    new = aggregate(GLOBAL, _updates(), "balanced")

    # Assert
    expected = np.array(
        [
            1.0 + 0.5,  # only A
            2.0 + (1 * 1.0 + 3 * 2.0) / 4,  # A and B
            -3.0 + (1 * -2.0 + 3 * 4.0) / 4,
            0.1 + 0.4,  # only B: its whole delta, whatever its weight
            7.25,  # nobody
        ]
    )
    assert new.dtype == np.float32
    np.testing.assert_allclose(new, expected, rtol=0, atol=1e-6)


def test_naive_divides_by_the_total_weight():
    # Execute
    new = aggregate(GLOBAL, _updates(), "naive")

    # Assert
    expected = np.array(
        [
            1.0 + (1 * 0.5) / 4,
            2.0 + (1 * 1.0 + 3 * 2.0) / 4,
            -3.0 + (1 * -2.0 + 3 * 4.0) / 4,
            0.1 + (3 * 0.4) / 4,
            7.25,
        ]
    )
    np.testing.assert_allclose(new, expected, rtol=0, atol=1e-6)


def test_disjoint_index_sets_balanced_apply_each_delta_whole():
    # Prepare
    a = (np.array([0, 2]), np.array([1.0, -1.0], dtype=np.float32), 5.0)
    b = (np.array([1, 3]), np.array([0.5, 0.25], dtype=np.float32), 1.0)

    # Execute
    bal = aggregate(GLOBAL, [a, b], "balanced")
    nai = aggregate(GLOBAL, [a, b], "naive")

    # Assert
    np.testing.assert_allclose(bal, GLOBAL + np.array([1.0, 0.5, -1.0, 0.25, 0.0], dtype=np.float32), atol=1e-6)
    np.testing.assert_allclose(nai, GLOBAL + np.array([5 / 6, 0.5 / 6, -5 / 6, 0.25 / 6, 0.0]), atol=1e-6)


@pytest.mark.parametrize("mode", ["balanced", "naive"])
def test_untrained_elements_keep_their_value_bitwise(mode):
    # Prepare: awkward float32 values that float64 round trips could disturb
    glob = np.array([np.float32(1) / np.float32(3), np.nextafter(np.float32(2), np.float32(3)), -0.0, 1e-38, 7.1],
                    dtype=np.float32)
    updates = [(np.array([1]), np.array([0.3], dtype=np.float32), 2.0)]

    # Execute
    new = aggregate(glob, updates, mode)

    # Assert
    untrained = [0, 2, 3, 4]
    assert new[untrained].tobytes() == glob[untrained].tobytes()
    assert new[1] != glob[1]
    assert glob[1] == np.nextafter(np.float32(2), np.float32(3))  # the input is not modified


@pytest.mark.parametrize("mode", ["balanced", "naive"])
def test_no_updates_leaves_the_model_unchanged(mode):
    new = aggregate(GLOBAL, [], mode)
    assert new.tobytes() == GLOBAL.tobytes()
    assert new is not GLOBAL


@pytest.mark.parametrize("mode", ["balanced", "naive"])
def test_full_updates_with_equal_weights_are_fedavg(mode):
    # Prepare
    rng = np.random.default_rng(0)
    glob = rng.normal(size=50).astype(np.float32)
    deltas = [rng.normal(size=50).astype(np.float32) for _ in range(3)]
    full = np.arange(50)

    # Execute
    new = aggregate(glob, [(full, d, 2.5) for d in deltas], mode)

    # Assert
    fedavg = glob.astype(np.float64) + np.mean(np.stack(deltas).astype(np.float64), axis=0)
    np.testing.assert_allclose(new, fedavg, rtol=1e-6, atol=1e-6)


def test_full_updates_with_sample_weights_are_weighted_fedavg():
    # Prepare
    glob = np.zeros(4, dtype=np.float32)
    full = np.arange(4)
    d1, d2 = np.full(4, 1.0, np.float32), np.full(4, 4.0, np.float32)

    # Execute
    bal = aggregate(glob, [(full, d1, 100.0), (full, d2, 300.0)], "balanced")
    nai = aggregate(glob, [(full, d1, 100.0), (full, d2, 300.0)], "naive")

    # Assert
    np.testing.assert_allclose(bal, np.full(4, 3.25), atol=1e-6)
    np.testing.assert_array_equal(bal, nai)


@pytest.mark.parametrize(
    "n, r, b, expected",
    [
        (100, 1.0, 0.5, 100.0),
        (100, 0.25, 0.5, 50.0),
        (100, 0.25, 0.0, 100.0),
        (60, 0.5, 1.0, 30.0),
        (10, 0.5, 2.0, 2.5),
    ],
)
def test_worker_weight(n, r, b, expected):
    assert worker_weight(n, r, b) == pytest.approx(expected)
    assert isinstance(worker_weight(n, r, b), float)


def test_accumulate_sums_and_repeated_workers():
    # Execute
    num, den = accumulate(5, _updates())

    # Assert
    assert num.dtype == den.dtype == np.float64
    np.testing.assert_allclose(num, [0.5, 1.0 + 6.0, -2.0 + 12.0, 1.2, 0.0], atol=1e-6)
    np.testing.assert_allclose(den, [1.0, 4.0, 4.0, 3.0, 0.0])


def test_combine_unknown_mode_raises():
    num, den = accumulate(5, _updates())
    with pytest.raises(ValueError, match="mean"):
        combine(GLOBAL, num, den, 4.0, "mean")


def test_combine_naive_with_zero_total_weight_returns_the_model():
    num, den = np.zeros(5), np.zeros(5)
    new = combine(GLOBAL, num, den, 0.0, "naive")
    assert new.tobytes() == GLOBAL.tobytes()


# -- property ----------------------------------------------------------------------


@st.composite
def _rounds(draw):
    size = draw(st.integers(1, 12))
    floats = st.floats(-100.0, 100.0, allow_nan=False, allow_infinity=False, width=32)
    glob = np.array(draw(st.lists(floats, min_size=size, max_size=size)), dtype=np.float32)
    updates = []
    for _ in range(draw(st.integers(1, 4))):
        member = draw(st.lists(st.booleans(), min_size=size, max_size=size))
        idx = np.flatnonzero(member)
        delta = np.array(draw(st.lists(floats, min_size=idx.size, max_size=idx.size)), dtype=np.float32)
        weight = draw(st.floats(0.01, 1000.0, allow_nan=False))
        updates.append((idx, delta, weight))
    return glob, updates


@settings(max_examples=150, deadline=None)
@given(_rounds())
def test_balanced_result_lies_within_the_trainers_candidates(case):
    # Prepare
    glob, updates = case

    # Execute
    new = aggregate(glob, updates, "balanced")

    # Assert
    for j in range(glob.size):
        candidates = [
            float(glob[j]) + float(delta[list(idx).index(j)]) for idx, delta, _ in updates if j in set(idx.tolist())
        ]
        if not candidates:
            assert new[j:j + 1].tobytes() == glob[j:j + 1].tobytes()
            continue
        lo, hi = min(candidates), max(candidates)
        tol = float(np.spacing(np.float32(max(abs(lo), abs(hi), 1e-30))))
        assert lo - tol <= float(new[j]) <= hi + tol
