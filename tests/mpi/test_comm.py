"""The MPI layer on real ranks: run with `mpiexec -n 3 python -m pytest --with-mpi tests/mpi`."""
import os
import time

import numpy as np
import pytest
from mpi4py import MPI

from elfish_mpi.comm import Comm, RoundTimeout

pytestmark = [pytest.mark.mpi(min_size=3), pytest.mark.timeout(120)]


@pytest.fixture
def comm():
    dup = MPI.COMM_WORLD.Dup()
    yield Comm(dup)
    dup.Free()


def test_bcast_obj_and_array(comm):
    # Prepare
    plan = {"round": 3, "masks": [np.arange(w + 2, dtype=np.int32) for w in range(comm.size - 1)]} if comm.rank == 0 else None
    arr = np.arange(10, dtype=np.float32) * 1.5 if comm.rank == 0 else np.zeros(10, dtype=np.float32)
    # Execute
    got = comm.bcast_obj(plan)
    comm.bcast_array(arr)
    # Assert
    assert got["round"] == 3
    assert [m.tolist() for m in got["masks"]] == [list(range(w + 2)) for w in range(comm.size - 1)]
    np.testing.assert_array_equal(arr, np.arange(10, dtype=np.float32) * 1.5)


def test_gather_rows_stacks_every_rank(comm):
    rows = comm.gather_rows(np.full(4, comm.rank, dtype=np.float64))
    if comm.rank == 0:
        np.testing.assert_array_equal(rows, np.repeat(np.arange(comm.size), 4).reshape(comm.size, 4))
    else:
        assert rows is None


def test_updates_reach_rank_zero_intact_in_worker_order(comm):
    # Prepare: the workers finish in reverse order (rank 1 last)
    sizes = [5 * (w + 1) for w in range(comm.size - 1)]
    if comm.rank == 0:
        seen = []

        def arrived(w, row, values):
            seen.append((w, row.copy(), values.copy()))

        # Execute
        stats = comm.stream_updates(list(range(1, comm.size)), sizes, 3, 30, arrived)
        # Assert: every update intact, handed over in worker order whatever the arrival order
        assert [w for w, _, _ in seen] == list(range(comm.size - 1))
        for w, row, values in seen:
            np.testing.assert_array_equal(row, [w + 1, 2.0, 3.0])
            np.testing.assert_array_equal(stats[w], row)
            np.testing.assert_array_equal(values, np.arange(sizes[w], dtype=np.float32) + w)
    else:
        w = comm.rank - 1
        time.sleep(0.2 * (comm.size - 1 - comm.rank))
        requests, _buffers = comm.post_update(np.array([comm.rank, 2.0, 3.0]), np.arange(sizes[w], dtype=np.float32) + w)
        comm.wait_sends(requests)
    comm.barrier()


def test_several_updates_of_one_rank_arrive_in_slot_order(comm):
    # Prepare: slots alternate between the workers (rank 1, 2, ..., 1, 2, ...), three each; each
    # worker posts all of its sends at once, rank 1 last, and waits only at the end
    workers = comm.size - 1
    sources = [1 + i % workers for i in range(3 * workers)]
    sizes = [3 + i for i in range(len(sources))]
    if comm.rank == 0:
        seen = []

        # Execute
        comm.stream_updates(sources, sizes, 2, 30, lambda i, row, values: seen.append((i, row.copy(), values.copy())))
        # Assert: slot i's record and values, from its own rank, in slot order
        assert [i for i, _, _ in seen] == list(range(len(sources)))
        for i, row, values in seen:
            np.testing.assert_array_equal(row, [sources[i], i])
            np.testing.assert_array_equal(values, np.full(sizes[i], i, dtype=np.float32))
    else:
        time.sleep(0.2 * (comm.size - 1 - comm.rank))
        posted = [comm.post_update(np.array([comm.rank, i], dtype=np.float64), np.full(sizes[i], i, dtype=np.float32))
                  for i, r in enumerate(sources) if r == comm.rank]
        for requests, _buffers in posted:
            comm.wait_sends(requests)
    comm.barrier()


def test_reduce_sum_adds_every_rank(comm):
    out = comm.reduce_sum(np.full((2, 3), float(comm.rank)), timeout=30)
    if comm.rank == 0:
        np.testing.assert_array_equal(out, np.full((2, 3), sum(range(comm.size)), dtype=np.float64))
    else:
        assert out is None  # the sum is rank 0's alone


@pytest.mark.parametrize("rank1_sends, first_named", [("update", 2), ("stats only", 1)])
def test_missing_update_times_out_naming_the_rank(comm, rank1_sends, first_named):
    # Prepare: rank 1 sends its whole update, or its stats but not its values; the others
    # stay silent this round.
    if comm.rank == 0:
        # Execute / Assert: every rank whose update is missing is named (rank 1 too when only
        # its stats came), and no other
        with pytest.raises(RoundTimeout) as info:
            comm.stream_updates(list(range(1, comm.size)), [2] * (comm.size - 1), 1, 0.5, lambda *update: None)
        named = ", ".join(str(r) for r in range(first_named, comm.size))
        assert f"worker rank(s) {named} within" in str(info.value)
    elif comm.rank == 1:
        if rank1_sends == "update":
            comm.wait_sends(comm.post_update(np.ones(1), np.ones(2, dtype=np.float32))[0])
        else:
            comm.wait_sends(comm.post_stats(np.ones(1))[0])
    comm.barrier()


def test_core_peers_are_the_ranks_of_the_node_that_share_cores(comm):
    # Prepare: unbound ranks of one node share every core
    home = os.sched_getaffinity(0)
    assert comm.core_peers() == list(range(comm.size))
    # Execute: bind each rank to one core of its own choosing (rank r to core r mod cores), as
    # srun --cpu-bind or mpiexec -bind-to would
    cores = sorted(home)
    os.sched_setaffinity(0, {cores[comm.rank % len(cores)]})
    try:
        peers = comm.core_peers()
    finally:
        os.sched_setaffinity(0, home)
    # Assert: only the ranks bound to the same core share with it
    assert peers == [q for q in range(comm.size) if q % len(cores) == comm.rank % len(cores)]
