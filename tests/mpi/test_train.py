"""End-to-end training on real ranks, in-process on COMM_WORLD.

Run with `mpiexec -n 3 python -m pytest --with-mpi tests/mpi` (any size >= 3 works)."""
import shutil
import tempfile
from pathlib import Path

import h5py
import numpy as np
import pytest
from mpi4py import MPI

from elfish_mpi.cli import main

pytestmark = [pytest.mark.mpi(min_size=3), pytest.mark.timeout(300)]

SAMPLE = Path(__file__).resolve().parents[1] / "data" / "fashion-mnist"
WORLD = MPI.COMM_WORLD
WORKERS = WORLD.size - 1


_made: list[str] = []


def shared_dir() -> Path:
    """One temporary directory, named by rank 0, for every rank (removed after the module)."""
    path = tempfile.mkdtemp(prefix="elfish-test-") if WORLD.rank == 0 else None
    _made.append(path)
    return Path(WORLD.bcast(path, root=0))


@pytest.fixture(scope="module", autouse=True)
def _remove_shared_dirs():
    yield
    WORLD.Barrier()  # every rank is done with them
    if WORLD.rank == 0:
        for path in _made:
            shutil.rmtree(path, ignore_errors=True)


def train(out: Path, *extra: str, rounds: int = 2) -> int:
    keep = [1.0] + [0.5] * (WORKERS - 1)
    args = [
        "train", "--out", str(out),
        "--set", f"data.path={SAMPLE}", "--set", "data.test_samples=300", "--set", "data.max_samples=400",
        "--set", f"run.rounds={rounds}", "--set", "train.local_steps=3", "--set", "train.batch_size=16",
        "--set", "workers.throttle=none", "--set", f"strategy.keep_ratios={keep}",
        "--set", "checkpoint.every=1", "--set", "checkpoint.keep=0",
        *extra,
    ]
    return main(args)


def model_of(path: Path) -> dict:
    with h5py.File(path, "r") as f:
        return {k: f["model"][k][()] for k in f["model"]}


def test_run_writes_the_documented_checkpoint():
    out = shared_dir() / "run"
    rc = train(out, rounds=3)
    assert rc == 0
    if WORLD.rank != 0:
        return
    with h5py.File(out / "checkpoint.h5", "r") as f:
        assert f.attrs["format"].decode() == "elfish-mpi" and int(f.attrs["round"]) == 3
        assert f.attrs["strategy"].decode() == "elfish"
        for name in ("round", "round_time", "virtual_time", "test_accuracy", "test_loss"):
            assert f["metrics"][name].shape == (3,), name
        for name in ("keep_ratio", "busy_time", "idle_time", "virtual_time", "num_samples"):
            assert f["workers"][name].shape == (3, WORKERS), name
        np.testing.assert_allclose(f["workers/keep_ratio"][:, 0], 1.0)
        assert np.all(f["workers/keep_ratio"][:, 1:] < 0.6)
        kept = [f[f"masks/round_{r:06d}/worker_01/conv2"][()] for r in (1, 2, 3)]
        assert all(k.dtype == np.int32 and np.all(np.diff(k) > 0) and k.size == 25 for k in kept)
        assert not np.array_equal(kept[0], kept[1]) and not np.array_equal(kept[1], kept[2])
        full = f["masks/round_000001/worker_00/conv2"][()]
        np.testing.assert_array_equal(full, np.arange(50))
        assert f["coverage/conv2"].shape == (50,) and f["coverage/conv2"][()].sum() == 3 * 50 + 3 * 25 * (WORKERS - 1)
        assert f["profiles/step_time"].shape[0] == WORKERS
        assert 0.0 <= f["metrics/test_accuracy"][-1] <= 1.0
    history = sorted(p.name for p in (out / "checkpoints").glob("round-*.h5"))
    assert history == ["round-000001.h5", "round-000002.h5", "round-000003.h5"]
    assert (out / "metrics.csv").read_text().count("\n") == 4


def test_untrained_neurons_keep_their_weights_exactly():
    out = shared_dir() / "untrained"
    # Every worker soft-trains a quarter of each layer, so some neurons go untrained in a round.
    rc = train(out, "--set", f"strategy.keep_ratios={[0.25] * WORKERS}", "--set", "strategy.min_keep=0.1")
    assert rc == 0
    if WORLD.rank != 0:
        return
    before = model_of(out / "checkpoints" / "round-000001.h5")
    after = model_of(out / "checkpoints" / "round-000002.h5")
    with h5py.File(out / "checkpoint.h5", "r") as f:
        checked = 0
        for layer in ("conv1", "conv2", "fc1"):
            trained = set()
            for w in range(WORKERS):
                trained |= set(f[f"masks/round_000002/worker_{w:02d}/{layer}"][()].tolist())
            untrained = sorted(set(range(before[f"{layer}.weight"].shape[0])) - trained)
            checked += len(untrained)
            np.testing.assert_array_equal(after[f"{layer}.weight"][untrained], before[f"{layer}.weight"][untrained])
            np.testing.assert_array_equal(after[f"{layer}.bias"][untrained], before[f"{layer}.bias"][untrained])
            if trained:
                rows = sorted(trained)
                assert not np.array_equal(after[f"{layer}.weight"][rows], before[f"{layer}.weight"][rows])
        assert checked > 0


def test_same_seed_same_model_and_resume_is_exact():
    base = shared_dir()
    assert train(base / "a", rounds=4) == 0
    assert train(base / "b", rounds=4) == 0
    assert train(base / "c", rounds=2) == 0
    assert train(base / "c", "--resume", str(base / "c"), rounds=4) == 0
    if WORLD.rank != 0:
        return
    a, b, c = (model_of(base / d / "checkpoint.h5") for d in "abc")
    for key in a:
        assert np.array_equal(a[key], b[key]), f"two runs differ in {key}"
        assert np.array_equal(a[key], c[key]), f"resumed run differs in {key}"


@pytest.mark.parametrize("strategy", ["fedavg", "fedavg-drop", "fedprox-partial", "heterofl", "fedrolex", "elfish", "elfish-naive"])
def test_every_strategy_runs_on_the_same_path(strategy):
    # Prepare: the last worker is 4x slow on the virtual clock, so the planners thin it.
    out = shared_dir() / strategy
    name, _, naive = strategy.partition("-naive")
    caps = [1.0] * (WORKERS - 1) + [0.25]
    extra = ["--set", f"strategy.name={name}", "--set", f"workers.capacity={caps}", "--set", "workers.throttle=virtual",
             "--set", "strategy.keep_ratios=[]", "--set", "train.local_steps=4"]
    if naive:
        extra += ["--set", "strategy.aggregation=naive"]
    # Execute
    rc = train(out, *extra, rounds=3)
    # Assert
    assert rc == 0
    if WORLD.rank != 0:
        return
    slow = f"worker_{WORKERS - 1:02d}"
    with h5py.File(out / "checkpoint.h5", "r") as f:
        assert int(f.attrs["round"]) == 3 and f.attrs["strategy"].decode() == name
        masks = [f[f"masks/round_{r:06d}/{slow}/conv2"][()] for r in (1, 2, 3)]
        keep = f["workers/keep_ratio"][()]
        assert np.all(np.isfinite(f["model/fc1.weight"][()]))
        if name in ("fedavg", "fedavg-drop", "fedprox-partial"):
            assert np.all(keep == 1.0)
        if name == "fedavg-drop":
            dropped = f["workers/dropped"][()]
            assert dropped[:, -1].sum() == 3  # the 4x straggler misses the deadline every round
            assert dropped[:, 0].sum() < 3  # a full-speed worker makes it (timing noise aside)
        if name == "fedprox-partial":
            steps = f["workers/steps"][()]
            assert np.all(steps[:, -1] < steps[:, 0])
        if name == "heterofl":
            assert keep[0, -1] < 1.0
            for m in masks:
                np.testing.assert_array_equal(m, np.arange(m.size))  # a static prefix
            assert masks[0].size == masks[1].size == masks[2].size
        if name == "fedrolex":
            assert keep[0, -1] < 1.0
            assert all(np.array_equal(masks[i + 1], np.sort((masks[i] + 1) % 50)) for i in range(2))
        if name == "elfish":
            assert np.all(keep[:, -1] < 1.0)
            assert all(not np.array_equal(masks[i], masks[i + 1]) for i in range(2) if masks[i].size == masks[i + 1].size)


def test_capacity_trace_slows_a_worker_and_elfish_replans():
    # Prepare: worker rank 1 runs at full speed, then from round 3 on at a quarter (virtual clock).
    base = shared_dir()
    trace = base / "trace.csv"
    if WORLD.rank == 0:
        header = ",".join(f"w{i + 1}" for i in range(WORKERS))
        slow = ",".join(["0.25"] + ["1.0"] * (WORKERS - 1))
        trace.write_text(f"round,{header}\n3,{slow}\n")
    WORLD.Barrier()
    # Execute
    rc = train(base / "run", "--set", "strategy.keep_ratios=[]", "--set", "workers.throttle=virtual",
               "--set", f"workers.trace={trace}", "--set", "train.local_steps=6", rounds=5)
    # Assert
    assert rc == 0
    if WORLD.rank != 0:
        return
    with h5py.File(base / "run" / "checkpoint.h5", "r") as f:
        cap = f["workers/capacity"][()]
        keep = f["workers/keep_ratio"][()]
    np.testing.assert_array_equal(cap[:2, 0], [1.0, 1.0])
    np.testing.assert_array_equal(cap[2:, 0], [0.25, 0.25, 0.25])
    assert keep[-1, 0] < 0.9 and keep[-1, 0] < keep[0, 0]  # re-planned once its measured time grew
