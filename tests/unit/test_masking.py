"""Unit tests for elfish_mpi.masking: keep counts and the random / rolling / ordered policies."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from elfish_mpi import masking
from elfish_mpi.masking import compute_ratio, keep_count, keep_ratio, make_masks, select
from elfish_mpi.models import alexnet, lenet

torch.set_num_threads(1)


# -- keep_count ------------------------------------------------------------------


@pytest.mark.parametrize(
    "width, ratio, expected",
    [
        (20, 1.0, 20),
        (20, 0.5, 10),
        (20, 0.25, 5),
        (20, 0.0, 1),  # never below one neuron
        (20, 0.01, 1),
        (20, 1.7, 20),  # never above the width
        (500, 0.75, 375),
        (1, 0.25, 1),
        (50, 0.25, 13),  # rounded up: 12 would be 24% < the 25% asked for
        (384, 0.3, 116),  # 115.2 -> 116
        (100, 0.07, 7),  # 7.000000000000001 in floating point: still 7
    ],
)
def test_keep_count(width, ratio, expected):
    assert keep_count(width, ratio) == expected


def test_keep_count_bounds_over_a_grid():
    for width in (1, 2, 7, 50, 384):
        for ratio in np.linspace(0.0, 1.2, 25):
            k = keep_count(width, float(ratio))
            assert isinstance(k, int)
            assert 1 <= k <= width
            if 0 < ratio <= 1:
                assert k >= width * ratio - 1e-9  # never below the ratio asked for
                assert k - 1 < max(width * ratio, 1)  # and no more than one neuron above it


# -- random policy ---------------------------------------------------------------


def _random(width, k, *, seed=0, round=0, worker=0, layer=0):
    return select("random", width, k, seed=seed, round=round, worker=worker, layer=layer)


def test_random_is_sorted_unique_in_range_and_sized():
    # Execute
    kept = _random(50, 17, seed=3, round=4, worker=1, layer=2)

    # Assert
    assert kept.size == 17
    assert np.all(np.diff(kept) > 0)  # strictly increasing: sorted and unique
    assert kept.min() >= 0 and kept.max() < 50
    assert np.issubdtype(kept.dtype, np.integer)


def test_random_is_deterministic_in_seed_round_worker_layer():
    # Prepare
    key = dict(seed=7, round=11, worker=2, layer=1)

    # Execute
    a = _random(50, 25, **key)
    b = _random(50, 25, **key)

    # Assert
    np.testing.assert_array_equal(a, b)
    # changing any one coordinate gives a different set
    for name, other in (("seed", 8), ("round", 12), ("worker", 3), ("layer", 0)):
        c = _random(50, 25, **dict(key, **{name: other}))
        assert not np.array_equal(a, c), name


def test_random_differs_across_rounds():
    # Execute
    sets = {tuple(_random(50, 25, seed=0, round=r, worker=0, layer=0)) for r in range(10)}

    # Assert
    assert len(sets) >= 9


def test_random_differs_across_workers():
    sets = {tuple(_random(50, 25, seed=0, round=5, worker=w, layer=0)) for w in range(8)}
    assert len(sets) >= 7


def test_random_covers_every_neuron_over_many_rounds():
    # Prepare
    width, k = 50, 10
    seen = np.zeros(width, dtype=int)

    # Execute
    for r in range(60):
        seen[_random(width, k, seed=1, round=r, worker=0, layer=0)] += 1

    # Assert
    assert np.all(seen > 0)
    assert seen.sum() == 60 * k
    # roughly uniform: expected 12 per neuron
    assert seen.max() < 30


# -- rolling policy --------------------------------------------------------------


def test_rolling_window_moves_by_one_each_round_and_wraps():
    width, k = 8, 3
    for r in range(3 * width):
        # Execute
        kept = select("rolling", width, k, seed=0, round=r, worker=0, layer=0)

        # Assert
        expected = np.sort((r + np.arange(k)) % width)
        np.testing.assert_array_equal(kept, expected)
    # explicit wrap: start at width - 1
    np.testing.assert_array_equal(select("rolling", 8, 3, seed=0, round=7, worker=0, layer=0), [0, 1, 7])
    np.testing.assert_array_equal(select("rolling", 8, 3, seed=0, round=8, worker=0, layer=0), [0, 1, 2])


def test_rolling_covers_every_neuron_within_one_period():
    seen = set()
    for r in range(10):
        seen.update(select("rolling", 10, 2, seed=0, round=r, worker=0, layer=0).tolist())
    assert seen == set(range(10))


# -- ordered policy --------------------------------------------------------------


def test_ordered_keeps_the_first_k_every_round():
    for r in range(5):
        kept = select("ordered", 20, 6, seed=r, round=r, worker=r, layer=r)
        np.testing.assert_array_equal(kept, np.arange(6))


# -- common ----------------------------------------------------------------------


@pytest.mark.parametrize("policy", masking.POLICIES)
def test_ratio_one_keeps_all_under_every_policy(policy):
    # Prepare
    spec = lenet()
    ratios = {name: 1.0 for name in spec.maskable}

    # Execute
    for r in (0, 3, 17):
        kept = make_masks(spec, ratios, policy, seed=5, round=r, worker=2)

        # Assert
        assert set(kept) == set(spec.maskable)
        for g in spec.groups:
            np.testing.assert_array_equal(kept[g.name], np.arange(g.size))
        assert keep_ratio(spec, kept) == 1.0
        assert compute_ratio(spec, kept) == 1.0


@pytest.mark.parametrize("policy", masking.POLICIES)
def test_select_k_equal_width_keeps_all(policy):
    np.testing.assert_array_equal(select(policy, 9, 9, seed=0, round=4, worker=1, layer=0), np.arange(9))


def test_unknown_policy_raises():
    with pytest.raises(ValueError, match="magnitude"):
        select("magnitude", 10, 5, seed=0, round=0, worker=0, layer=0)


@pytest.mark.parametrize("k", [0, -1, 11])
def test_impossible_k_raises(k):
    with pytest.raises(ValueError):
        select("random", 10, k, seed=0, round=0, worker=0, layer=0)


def test_make_masks_sizes_follow_keep_count_and_skip_the_classifier():
    # Prepare
    spec = alexnet()
    ratios = {"conv1": 0.5, "conv2": 0.25, "fc1": 0.75}  # fc2 absent: full

    # Execute
    kept = make_masks(spec, ratios, "random", seed=0, round=1, worker=0)

    # Assert
    assert set(kept) == {"conv1", "conv2", "fc1", "fc2"}
    assert "fc3" not in kept  # the classifier is never masked
    assert len(kept["conv1"]) == 32
    assert len(kept["conv2"]) == 16
    assert len(kept["fc1"]) == 288
    assert len(kept["fc2"]) == 192
    # different layers draw different sets even at the same width and ratio
    again = make_masks(spec, {"conv1": 0.5, "conv2": 0.5}, "random", seed=0, round=1, worker=0)
    assert not np.array_equal(again["conv1"], again["conv2"])


def test_keep_ratio_is_the_mean_layer_share():
    # Prepare
    spec = lenet()
    kept = {"conv1": np.arange(10), "conv2": np.arange(50), "fc1": np.arange(100)}

    # Execute / Assert
    assert keep_ratio(spec, kept) == pytest.approx((0.5 + 1.0 + 0.2) / 3)
    assert keep_ratio(spec, {"conv1": np.arange(10)}) == pytest.approx((0.5 + 1.0 + 1.0) / 3)
    assert keep_ratio(spec, {}) == 1.0
    uniform = make_masks(spec, {"conv1": 0.5, "conv2": 0.5, "fc1": 0.5}, "random", seed=0, round=0, worker=0)
    assert keep_ratio(spec, uniform) == pytest.approx(0.5)


def test_compute_ratio_is_the_share_of_macs():
    # Prepare
    spec = lenet()
    kept = {"conv1": np.arange(10), "conv2": np.arange(25), "fc1": np.arange(250)}
    hand_half = 10 * 1 * 25 * 24 * 24 + 25 * 10 * 25 * 8 * 8 + (25 * 16) * 250 + 250 * 10
    hand_full = 20 * 1 * 25 * 24 * 24 + 50 * 20 * 25 * 8 * 8 + 800 * 500 + 500 * 10

    # Execute / Assert
    assert compute_ratio(spec, kept) == pytest.approx(hand_half / hand_full)
    assert compute_ratio(spec, {}) == 1.0
    # thinning conv1 also saves conv2's input channels: more than its own share
    only_conv1 = compute_ratio(spec, {"conv1": np.arange(10)})
    assert only_conv1 < 1.0 - (20 * 25 * 576 / 2) / hand_full
