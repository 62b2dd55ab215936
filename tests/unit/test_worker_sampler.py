"""Unit tests for elfish_mpi.data.Sampler (worker.Sampler): seeded epoch order whose whole state is a cursor."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from elfish_mpi.worker import Sampler

torch.set_num_threads(1)


def _draw(sampler: Sampler, batches: int) -> list[np.ndarray]:
    return [sampler.next() for _ in range(batches)]


@pytest.mark.parametrize("n, batch", [(10, 3), (12, 4), (7, 7), (100, 32)])
def test_every_index_once_per_epoch(n, batch):
    # Prepare
    sampler = Sampler(n, batch, seed=1, worker=0)
    epochs = 4

    # Execute
    stream = np.concatenate(_draw(sampler, -(-epochs * n // batch)))[: epochs * n]

    # Assert
    assert sampler.cursor >= epochs * n
    orders = stream.reshape(epochs, n)
    for order in orders:
        np.testing.assert_array_equal(np.sort(order), np.arange(n))
    # a fresh order each epoch
    assert len({tuple(o) for o in orders}) == epochs


def test_batches_have_the_batch_size_and_cross_epochs():
    sampler = Sampler(10, 3, seed=0, worker=0)
    batches = _draw(sampler, 5)
    assert [b.size for b in batches] == [3, 3, 3, 3, 3]
    assert sampler.cursor == 15
    assert batches[3].dtype.kind == "i"
    assert all(np.unique(b).size == b.size for b in batches[:3])


def test_deterministic_in_seed_and_worker():
    # Execute
    a = np.concatenate(_draw(Sampler(50, 8, seed=3, worker=2), 20))
    b = np.concatenate(_draw(Sampler(50, 8, seed=3, worker=2), 20))
    other_worker = np.concatenate(_draw(Sampler(50, 8, seed=3, worker=1), 20))
    other_seed = np.concatenate(_draw(Sampler(50, 8, seed=4, worker=2), 20))

    # Assert
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, other_worker)
    assert not np.array_equal(a, other_seed)


@pytest.mark.parametrize("consumed_batches", [0, 1, 3, 4, 9])
def test_resumes_exactly_from_a_cursor(consumed_batches):
    # Prepare: n=10, batch=3 -> cursors 0, 3, 9, 12, 27 (mid-epoch and at later epochs)
    first = Sampler(10, 3, seed=5, worker=1)
    _draw(first, consumed_batches)
    cursor = first.cursor

    # Execute
    resumed = Sampler(10, 3, seed=5, worker=1, cursor=cursor)
    continued = _draw(first, 8)
    restarted = _draw(resumed, 8)

    # Assert
    assert cursor == 3 * consumed_batches
    for a, b in zip(continued, restarted):
        np.testing.assert_array_equal(a, b)
    assert resumed.cursor == first.cursor


def test_resume_at_a_cursor_that_no_batch_boundary_hits():
    # the sampler started at cursor c continues like one that consumed c samples in any way
    reference = np.concatenate(_draw(Sampler(11, 1, seed=2, worker=0), 60))
    for c in (0, 5, 11, 17, 22, 40):
        got = np.concatenate(_draw(Sampler(11, 4, seed=2, worker=0, cursor=c), 5))
        np.testing.assert_array_equal(got, reference[c : c + 20])


def test_batch_larger_than_n():
    # Prepare
    sampler = Sampler(5, 32, seed=0, worker=0)

    # Execute
    batches = _draw(sampler, 3)

    # Assert
    for b in batches:
        assert b.size == 5
        np.testing.assert_array_equal(np.sort(b), np.arange(5))
    assert sampler.cursor == 15
    reference = np.concatenate(_draw(Sampler(5, 1, seed=0, worker=0), 15))
    np.testing.assert_array_equal(np.concatenate(batches), reference)
