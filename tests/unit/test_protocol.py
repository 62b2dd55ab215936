"""Unit tests for elfish_mpi.protocol: the round's messages survive their wire form exactly."""
from __future__ import annotations

import pickle

import numpy as np
import pytest

from elfish_mpi.masking import make_masks
from elfish_mpi.models import alexnet, lenet
from elfish_mpi.protocol import (
    UPDATE, Plan, mask_bits, mask_buffer, new_update, pack_masks, unpack_masks, update_buffer, updates_from_buffer,
)


@pytest.mark.parametrize("spec", [lenet(), alexnet()], ids=["lenet", "alexnet"])
@pytest.mark.parametrize("policy", ["random", "rolling", "ordered"])
def test_packed_masks_unpack_to_the_same_kept_neurons(spec, policy):
    # Prepare: 5 workers at different ratios, per-layer ratios that differ too
    ratios = [{name: r * (1 - 0.1 * i) for i, name in enumerate(spec.maskable)} for r in (1.0, 0.8, 0.5, 0.3, 0.25)]
    masks = [make_masks(spec, ratios[w], policy, seed=3, round=7, worker=w) for w in range(5)]

    # Execute
    packed = pack_masks(spec, masks)
    back = [unpack_masks(spec, packed, w) for w in range(5)]

    # Assert
    assert packed.dtype == np.uint8 and packed.shape == mask_buffer(spec, 5).shape
    assert packed.shape[1] == (mask_bits(spec) + 7) // 8  # one bit per maskable neuron
    for w in range(5):
        assert list(back[w]) == list(spec.maskable)
        for name in spec.maskable:
            np.testing.assert_array_equal(back[w][name], masks[w][name])
            assert back[w][name].dtype == np.int32


def test_a_mask_that_is_not_a_prefix_or_window_survives():
    # any set rank 0 computes, not only what a policy draws
    spec = lenet()
    kept = {"conv1": np.array([0, 19]), "conv2": np.array([3, 4, 49]), "fc1": np.arange(0, 500, 7)}
    back = unpack_masks(spec, pack_masks(spec, [kept]), 0)
    for name in spec.maskable:
        np.testing.assert_array_equal(back[name], kept[name])


def test_update_record_round_trips_through_its_buffer():
    # Prepare
    rec = new_update(busy_time=1.5, weight=300.0 * 0.5**0.5, late=1.0, cursor=2**40)
    other = new_update(finite=1.0, steps=10)

    # Execute
    received = updates_from_buffer(np.stack([update_buffer(rec), update_buffer(other)]))

    # Assert
    assert received.dtype == UPDATE and received.shape == (2,)
    assert received["busy_time"][0] == 1.5 and received["weight"][0] == 300.0 * 0.5**0.5
    assert received["cursor"][0] == 2**40 and received["late"].tolist() == [1.0, 0.0]
    assert received["steps"].tolist() == [0.0, 10.0] and received["finite"].tolist() == [0.0, 1.0]
    assert update_buffer(rec).dtype == np.float64 and update_buffer(rec).size == len(UPDATE.names)


def test_new_update_refuses_an_unknown_field():
    with pytest.raises(ValueError):
        new_update(bogus=1.0)


def test_plan_gives_each_slot_its_task_and_each_rank_its_slots_and_pickles():
    # three clients on two ranks: rank 2 trains clients 4 and 9, in that order
    plan = Plan(round=4, clients=(4, 7, 9), ranks=(2, 1, 2), steps=(10, 3, 5), time_limit=(0.0, 2.5, 0.0),
                mu=(0.01, 0.01, 0.0), capacity=(1.0, 0.25, 0.5), cursor=(64, 0, 96), rank_capacity=(1.0, 1.0),
                balance=0.5, weighting="count")
    again = pickle.loads(pickle.dumps(plan))
    assert again == plan and not again.stop
    assert again.slots_of(2) == [0, 2] and again.slots_of(1) == [1] and again.slots_of(3) == []
    task = again.task(2)
    assert (task.client, task.steps, task.time_limit, task.capacity, task.cursor, task.weighting) == (9, 5, 0.0, 0.5, 96, "count")
    assert Plan.stop_message().stop


@pytest.mark.parametrize("bad", [[-1, 3], [3, 1], [2, 2], [0, 20]])
def test_pack_masks_refuses_indices_it_cannot_carry(bad):
    # a negative index would land in another layer's bits; unsorted ones would not match rank 0's order
    spec = lenet()
    kept = {"conv1": np.array(bad), "conv2": np.arange(50), "fc1": np.arange(500)}
    with pytest.raises(ValueError, match="sorted, unique and in 0..19"):
        pack_masks(spec, [kept])
