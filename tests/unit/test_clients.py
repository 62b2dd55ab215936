"""Clients apart from ranks (clients.py): selection, placement, speeds; their configuration
checks; a client's data (data.ClientParts)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from elfish_mpi import clients, data
from elfish_mpi.config import Config, ConfigError, load_config

ROOT = Path(__file__).resolve().parents[2]
FMNIST = ROOT / "tests" / "data" / "fashion-mnist"
FEMNIST = ROOT / "tests" / "data" / "femnist_sample.npz"
TESTBED = ROOT / "launch" / "devices" / "elfish-testbed.csv"
CIFAR = ROOT.parent / "shared" / "datasets" / "cifar10_jpeg.npz"


def cfg_of(**sections) -> Config:
    return Config.from_dict(sections)


# -- selection ---------------------------------------------------------------------------


def test_every_client_takes_part_when_per_round_is_all():
    assert clients.select(7, 7, seed=3, round=5).tolist() == list(range(7))


def test_selection_is_a_function_of_seed_and_round_alone():
    # Prepare / Execute: the same (seed, round) twice, other rounds, another seed
    a = clients.select(1000, 100, seed=1, round=12)
    again = clients.select(1000, 100, seed=1, round=12)
    other_round = clients.select(1000, 100, seed=1, round=13)
    other_seed = clients.select(1000, 100, seed=2, round=12)
    # Assert: sorted, distinct, in range; repeatable; a different draw elsewhere
    assert a.shape == (100,) and np.all(np.diff(a) > 0) and a[0] >= 0 and a[-1] < 1000
    assert np.array_equal(a, again)
    assert not np.array_equal(a, other_round) and not np.array_equal(a, other_seed)


def test_selection_is_uniform_over_the_clients():
    # 2,000 rounds of 10 out of 50: each client is expected 400 times (binomial sd 19)
    counts = np.zeros(50)
    for r in range(1, 2001):
        counts[clients.select(50, 10, seed=0, round=r)] += 1
    assert counts.sum() == 20000
    assert np.all(np.abs(counts - 400) < 100), counts


# -- placement ---------------------------------------------------------------------------


def test_pinned_clients_go_to_their_own_ranks():
    assert clients.place(np.array([0, 2, 3]), [5.0, 1.0, 1.0], num_workers=4, pinned=True).tolist() == [1, 3, 4]


def test_placement_balances_the_predicted_time():
    # Prepare: 30 clients with costs from 1 to 30 on 4 ranks
    sel = np.arange(100, 130)
    costs = np.arange(1.0, 31.0)
    # Execute
    ranks = clients.place(sel, costs, num_workers=4, pinned=False)
    # Assert: every rank used; loads within the largest single cost of each other (LPT's bound),
    # and the same answer again
    loads = np.bincount(ranks - 1, weights=costs, minlength=4)
    assert set(ranks.tolist()) == {1, 2, 3, 4}
    assert loads.max() - loads.min() <= costs.max()
    assert loads.max() <= costs.sum() / 4 + costs.max()
    assert np.array_equal(ranks, clients.place(sel, costs, num_workers=4, pinned=False))


def test_placement_is_longest_first_onto_the_least_loaded_rank():
    # 5 onto rank 1; 4 onto rank 2; 3 onto rank 2 (4 < 5); 3 onto rank 1 (5 < 7); 3 onto rank 2 (7 < 8)
    ranks = clients.place(np.array([10, 11, 12, 13, 14]), [5.0, 4.0, 3.0, 3.0, 3.0], num_workers=2, pinned=False)
    assert ranks.tolist() == [1, 2, 2, 1, 2]  # (round robin would give 1, 2, 1, 2, 1)


def test_placement_puts_the_slowest_client_alone_when_it_outweighs_the_rest():
    ranks = clients.place(np.arange(5), [100.0, 1.0, 1.0, 1.0, 1.0], num_workers=2, pinned=False)
    assert ranks[0] not in ranks[1:]


# -- speeds ------------------------------------------------------------------------------


def test_default_speeds_are_the_workers_capacities_repeated_over_the_clients():
    cfg = cfg_of(workers={"fleet": "tiers"}, clients={"count": 5})
    assert clients.client_speeds(cfg, 5) == [1.0, 0.5, 0.25, 1.0, 0.5]
    listed = cfg_of(workers={"capacity": [1.0, 0.5, 0.5]}, clients={"count": 3})
    assert clients.client_speeds(listed, 3) == [1.0, 0.5, 0.5]


def test_lognormal_speeds_are_drawn_from_the_seed_with_the_fastest_at_one():
    cfg = cfg_of(clients={"count": 300, "speed": "lognormal", "sigma": 0.5})
    s = np.asarray(clients.client_speeds(cfg, 300))
    assert s.max() == 1.0 and s.min() > 0 and len(np.unique(s)) == 300
    assert np.array_equal(s, clients.client_speeds(cfg, 300))
    other = cfg_of(run={"seed": 1}, clients={"count": 300, "speed": "lognormal"})
    assert not np.array_equal(s, clients.client_speeds(other, 300))
    # the log of the speeds has the asked spread (sd of 300 draws: within 15%)
    assert abs(np.log(s).std() - 0.5) < 0.075


def test_tiers_speeds_are_the_three_tiers():
    cfg = cfg_of(clients={"count": 90, "speed": "tiers"})
    s = clients.client_speeds(cfg, 90)
    assert set(s) == {1.0, 0.5, 0.25}


def test_a_device_table_gives_each_client_a_device_of_it():
    cfg = cfg_of(clients={"count": 60, "speed": str(TESTBED)})
    s = np.asarray(clients.client_speeds(cfg, 60))
    # speeds over the table's fastest (Jetson Nano: 1/16 a minute): 1, 16/80, 16/30
    assert set(np.round(s, 3)) == {1.0, 0.2, 0.533}


@pytest.mark.parametrize("text, message", [
    ("device,speed\nnano,1\npi,fast\n", "line 3: speed 'fast' is not a number"),
    ("device,speed\nnano,1\npi,-2\n", "line 3: speed '-2' must be a positive number"),
    ("device,speed\nnano\n", "line 2: expected a device name and a speed"),
    ("name,speed\nnano,1\n", "the first line must be the header device,speed"),
    ("device,speed\n# nothing\n", "no devices after the header"),
])
def test_a_device_table_with_a_bad_row_is_refused_naming_the_line(tmp_path, text, message):
    table = tmp_path / "devices.csv"
    table.write_text(text)
    cfg = cfg_of(clients={"count": 4, "speed": str(table)})
    with pytest.raises(ConfigError, match=message):
        clients.client_speeds(cfg, 4)


def test_a_missing_device_table_is_refused():
    cfg = cfg_of(clients={"count": 4, "speed": "/nonexistent/devices.csv"})
    with pytest.raises(ConfigError, match="cannot read it"):
        clients.client_speeds(cfg, 4)


# -- configuration -----------------------------------------------------------------------


@pytest.mark.parametrize("sets, num_workers, message", [
    (["clients.count=10", "clients.per_round=11"], 3, "clients.per_round = 11 is more than clients.count = 10"),
    (["clients.per_round=4"], 3, "clients.per_round = 4 is more than the 3 client"),
    (["clients.count=10", "workers.capacity=[1.0, 0.5, 0.5]"], 3, "workers.capacity has 3 value.s. but the job has 10 clients"),
    (["clients.count=10", "workers.throttle=\"cgroup\""], 3, "use sleep or virtual"),
    (["clients.count=10", "workers.throttle=\"affinity\""], 3, "use sleep or virtual"),
    (["clients.count=10", "clients.speed=\"lognormal\"", "workers.fleet=\"tiers\""], 3, "either workers.fleet or clients.speed"),
    (["clients.count=10", "strategy.keep_ratios=[1.0, 0.5, 0.5]"], 3, "keep_ratios has 3 value.s. but the job has 10 clients"),
    (["clients.speed=\"fast\""], 3, "clients.speed = 'fast' is not allowed"),
    (["clients.selection=\"round-robin\""], 3, "clients.selection = 'round-robin' is not allowed"),
    (["clients.count=-1"], 3, "clients.count = -1 must be an integer >= 0"),
])
def test_bad_client_settings_are_refused_by_name(sets, num_workers, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [s for s in sets]).check_world(num_workers)


def test_the_default_is_one_pinned_client_per_worker_rank_all_taking_part():
    cfg = load_config(None, [])
    cfg.check_world(4)
    built = clients.build(cfg, 4)
    assert (built.count, built.per_round, built.pinned) == (4, 4, True)
    pooled = clients.build(load_config(None, ["clients.count=40", "clients.per_round=8"]), 4)
    assert (pooled.count, pooled.per_round, pooled.pinned) == (40, 8, False)


# -- a client's data ---------------------------------------------------------------------


def test_a_client_part_is_its_share_of_the_partition_read_when_asked():
    # Prepare: 30 clients of Fashion-MNIST's test copy in the repo, dirichlet
    parts = data.ClientParts("fashion-mnist", str(FMNIST), 30, "dirichlet", 4, alpha=0.3)
    src = data.load_split("fashion-mnist", str(FMNIST), "train")
    expect = data.partition(src.labels, 30, "dirichlet", 4, alpha=0.3)
    # Execute: read clients 3 and 17 only
    parts.load([3, 17])
    # Assert: only those are held, each exactly its part of the partition
    assert sorted(parts._held) == [3, 17]
    for c in (3, 17, 25):
        got = parts.client(c)
        np.testing.assert_array_equal(got.images, src.images[expect[c]])
        np.testing.assert_array_equal(got.labels, src.labels[expect[c]])
    assert sum(parts.size(c) for c in range(30)) == len(src.labels)


def test_natural_partition_gives_each_client_one_writer():
    src = data.load_split("femnist", str(FEMNIST), "train")
    writers = len(np.unique(src.groups))
    parts = data.ClientParts("femnist", str(FEMNIST), writers, "natural", 0)
    held = [np.unique(parts.client(c).groups) for c in range(writers)]
    assert all(len(h) == 1 for h in held)
    assert sorted(int(h[0]) for h in held) == sorted(np.unique(src.groups).tolist())  # each writer once
    with pytest.raises(data.DataError, match=f"only {writers} writers for {writers + 1} clients"):
        data.ClientParts("femnist", str(FEMNIST), writers + 1, "natural", 0)


@pytest.mark.skipif(not CIFAR.exists(), reason=f"needs the CIFAR-10 npz at {CIFAR}")
def test_a_class_ordered_set_gives_each_client_its_capped_shuffled_rows():
    # Prepare: the CIFAR-10 npz stores its training set in class order; 4 clients, 10 images each
    parts = data.ClientParts("cifar10", str(CIFAR), 4, "iid", 0, max_samples=10)
    src = data.load_split("cifar10", str(CIFAR), "train")
    # Execute: two clients read together (one pass over the union of their rows)
    parts.load([0, 3])
    # Assert: each client's images are exactly its rows, in their shuffled order
    for c in (0, 3):
        rows = parts.rows[c]
        assert len(rows) == 10 and not np.all(np.diff(rows) > 0)
        np.testing.assert_array_equal(parts.client(c).images, src.images[rows])
        np.testing.assert_array_equal(parts.client(c).labels, src.labels[rows])
