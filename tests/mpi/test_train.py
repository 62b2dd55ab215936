"""End-to-end training on real ranks, in-process on COMM_WORLD.

Run with `mpiexec -n 3 python -m pytest --with-mpi tests/mpi` (any size >= 3 works)."""
import shutil
import tempfile
from pathlib import Path

import h5py
import numpy as np
import pytest
from mpi4py import MPI

from elfish_mpi import aggregator, checkpoint
from elfish_mpi.cli import main
from elfish_mpi.comm import Comm
from elfish_mpi.masking import select
from elfish_mpi.models import lenet
from elfish_mpi.submodel import param_index
from elfish_mpi.checkpoint import kept_neurons

pytestmark = [pytest.mark.mpi(min_size=3), pytest.mark.timeout(300)]

SAMPLE = Path(__file__).resolve().parents[1] / "data" / "fashion-mnist"
WORLD = MPI.COMM_WORLD
WORKERS = WORLD.size - 1
LENET_KEYS = sorted(f"{layer}.{kind}" for layer in ("conv1", "conv2", "fc1", "fc2") for kind in ("weight", "bias"))


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


def kept_values(f: h5py.File, rnd: int, worker: int) -> int:
    """How many of the model's values worker ``worker`` trained in round ``rnd`` (its masks)."""
    return param_index(lenet(), {name: kept_neurons(f, rnd, worker, name) for name in ("conv1", "conv2", "fc1")}).size


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
        kept = [kept_neurons(f, r, 1, "conv2") for r in (1, 2, 3)]
        assert all(k.dtype == np.int32 and np.all(np.diff(k) > 0) and k.size == 25 for k in kept)
        assert not np.array_equal(kept[0], kept[1]) and not np.array_equal(kept[1], kept[2])
        full = kept_neurons(f, 1, 0, "conv2")
        np.testing.assert_array_equal(full, np.arange(50))
        assert f["coverage/conv2"].shape == (50,) and f["coverage/conv2"][()].sum() == 3 * 50 + 3 * 25 * (WORKERS - 1)
        assert "step_time" not in f.get("profiles", {})  # fixed keep ratios: nothing to plan, no profiling
        assert 0.0 <= f["metrics/test_accuracy"][-1] <= 1.0
    history = sorted(p.name for p in (out / "checkpoints").glob("round-*.h5"))
    assert history == ["round-000001.h5", "round-000002.h5", "round-000003.h5"]
    assert (out / "metrics.csv").read_text().count("\n") == 4


@pytest.mark.parametrize("transport", ["gather", "reduce"])
def test_untrained_neurons_keep_their_weights_exactly(transport):
    out = shared_dir() / f"untrained-{transport}"
    # Every worker soft-trains a quarter of each layer, so some neurons go untrained in a round.
    rc = train(out, "--set", f"strategy.keep_ratios={[0.25] * WORKERS}", "--set", "strategy.min_keep=0.1",
               "--set", f"strategy.transport={transport}")
    assert rc == 0
    if WORLD.rank != 0:
        return
    before = model_of(out / "checkpoints" / "round-000001.h5")
    after = model_of(out / "checkpoints" / "round-000002.h5")
    with h5py.File(out / "checkpoint.h5", "r") as f:
        # the updates went the way asked: dense float64 sums, or the kept values alone
        size = sum(v.size for v in after.values())
        sent = f["workers/bytes_sent"][()]
        if transport == "reduce":
            np.testing.assert_array_equal(sent, 2 * 8 * size)
        else:
            np.testing.assert_array_equal(sent, [[4 * kept_values(f, r, w) for w in range(WORKERS)] for r in (1, 2)])
            assert np.all(sent < 4 * size / 2)
        checked = 0
        for layer in ("conv1", "conv2", "fc1"):
            trained = set()
            for w in range(WORKERS):
                trained |= set(kept_neurons(f, 2, w, layer).tolist())
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
    assert sorted(a) == sorted(b) == sorted(c) == LENET_KEYS
    for key in a:
        assert np.array_equal(a[key], b[key]), f"two runs differ in {key}"
        assert np.array_equal(a[key], c[key]), f"resumed run differs in {key}"


def test_reduce_transport_trains_the_model_the_gather_transport_trains():
    # Prepare / Execute: one seed and fixed keep ratios; the updates travel two ways
    base = shared_dir()
    assert train(base / "gather", "--set", "strategy.transport=gather", rounds=3) == 0
    assert train(base / "reduce", "--set", "strategy.transport=reduce", rounds=3) == 0

    # Assert
    if WORLD.rank != 0:
        return
    g, r = model_of(base / "gather" / "checkpoint.h5"), model_of(base / "reduce" / "checkpoint.h5")
    assert sorted(g) == sorted(r) == LENET_KEYS
    for key in g:
        # Both form the same float64 sums; only the order of the additions may differ (none does
        # with two workers: the sum of two updates and rank 0's zeros is exact in any order).
        if WORKERS == 2:
            assert g[key].tobytes() == r[key].tobytes(), key
        np.testing.assert_allclose(r[key], g[key], rtol=1e-5, atol=1e-6, err_msg=key)
    with h5py.File(base / "gather" / "checkpoint.h5", "r") as fg, h5py.File(base / "reduce" / "checkpoint.h5", "r") as fr:
        np.testing.assert_array_equal(fr["metrics/updates_accepted"][()], [WORKERS] * 3)
        np.testing.assert_allclose(fr["metrics/test_loss"][()], fg["metrics/test_loss"][()], rtol=1e-4)
        # and they did travel differently: the whole model twice in float64, or the kept values
        size = sum(v.size for v in g.values())
        np.testing.assert_array_equal(fr["workers/bytes_sent"][()], 2 * 8 * size)
        kept = np.array([[kept_values(fg, rnd, w) for w in range(WORKERS)] for rnd in (1, 2, 3)])
        np.testing.assert_array_equal(fg["workers/bytes_sent"][()], 4 * kept)
        assert np.all(kept[:, 0] == size) and np.all(kept[:, 1:] < size)  # worker 0 keeps everything


def spy_on_round_steps(monkeypatch) -> list[str]:
    """What rank 0 does, in order: "plan R" (round R starts: its plan goes to the workers),
    "evaluate R" (rank 0 starts the evaluation of round R's model), "send R" (round R's model
    goes to the workers in an evaluation-only plan) and "checkpoint R" (round R's file written)."""
    events: list[str] = []
    bcast_obj, evaluate, rotate = Comm.bcast_obj, aggregator.Aggregator.evaluate, checkpoint.rotate

    def spy_bcast_obj(self, obj, *args, **kwargs):
        if getattr(obj, "round", 0) and not getattr(obj, "stop", False):  # a round's plan (not set-up, not stop)
            events.append(f"plan {obj.round}" if obj.train else f"send {obj.evaluate}")
        return bcast_obj(self, obj, *args, **kwargs)

    def spy_evaluate(self, rnd, *args, **kwargs):
        events.append(f"evaluate {rnd}")
        return evaluate(self, rnd, *args, **kwargs)

    def spy_rotate(run_dir, ck, *args, **kwargs):
        events.append(f"checkpoint {ck.round}")
        return rotate(run_dir, ck, *args, **kwargs)

    monkeypatch.setattr(Comm, "bcast_obj", spy_bcast_obj)
    monkeypatch.setattr(aggregator.Aggregator, "evaluate", spy_evaluate)
    monkeypatch.setattr(checkpoint, "rotate", spy_rotate)
    return events


def test_where_and_when_the_model_is_evaluated_changes_no_result(monkeypatch):
    # Prepare: one seed and fixed keep ratios (no timing enters the run); 300 test images are
    # 3 chunks: with run.eval_on = all, rank 0 and the first two workers evaluate one each
    base = shared_dir()
    events = spy_on_round_steps(monkeypatch)
    runs = {
        "overlapped": ("run.overlap_eval=true", "run.eval_on=all"),
        "in-line": ("run.overlap_eval=false", "run.eval_on=all"),
        "rank 0 alone": ("run.overlap_eval=true", "run.eval_on=root"),
    }
    seen = {}

    # Execute
    for name, (overlap, eval_on) in runs.items():
        events[:] = []
        assert train(base / name, "--set", overlap, "--set", eval_on, rounds=3) == 0
        seen[name] = list(events)

    # Assert
    if WORLD.rank != 0:
        return
    # Overlapped: round r is evaluated and written while the workers train round r + 1 (its
    # plan carried round r's model, which the workers given test chunks evaluate first);
    # in-line: before round r + 1 starts. The last round is finished at once either way; where
    # workers take part, the model goes to them in an evaluation-only plan ("send R", first
    # thing in the evaluation: whether they take part follows the measured rates).
    overlapped = ["plan 1", "plan 2", "evaluate 1", "checkpoint 1", "plan 3", "evaluate 2", "checkpoint 2",
                  "evaluate 3", "checkpoint 3"]
    in_line = ["plan 1", "evaluate 1", "checkpoint 1", "plan 2", "evaluate 2", "checkpoint 2",
               "plan 3", "evaluate 3", "checkpoint 3"]
    for name, expected in (("overlapped", overlapped), ("in-line", in_line), ("rank 0 alone", overlapped)):
        assert [e for e in seen[name] if not e.startswith("send")] == expected, (name, seen[name])
        for i, e in enumerate(seen[name]):
            if e.startswith("send"):
                rnd = e.split()[1]
                assert seen[name][i - 1] == f"evaluate {rnd}" and (name == "in-line" or rnd == "3"), (name, seen[name])
    assert "send 1" in seen["in-line"]  # the first evaluation is split by capacity: the workers take part
    assert not any(e.startswith("send") for e in seen["rank 0 alone"])
    # Every round's checkpoint holds the same model, masks and results, bit for bit.
    ref = base / "overlapped"
    for other in ("in-line", "rank 0 alone"):
        for r in (1, 2, 3):
            name = f"checkpoints/round-{r:06d}.h5"
            a, b = model_of(ref / name), model_of(base / other / name)
            assert sorted(a) == sorted(b) == LENET_KEYS
            for key in a:
                assert a[key].tobytes() == b[key].tobytes(), f"{other}, round {r}: {key}"
        with h5py.File(ref / "checkpoint.h5", "r") as fa, h5py.File(base / other / "checkpoint.h5", "r") as fb:
            for name in ("test_accuracy", "test_loss", "train_loss", "updates_accepted"):
                assert fa["metrics"][name].shape == (3,) and np.all(np.isfinite(fa["metrics"][name][()])), name
                assert fa["metrics"][name][()].tobytes() == fb["metrics"][name][()].tobytes(), f"{other}: {name}"
            for r in (1, 2, 3):
                for w in range(WORKERS):
                    for layer in ("conv1", "conv2", "fc1"):
                        np.testing.assert_array_equal(kept_neurons(fa, r, w, layer), kept_neurons(fb, r, w, layer))
            np.testing.assert_array_equal(fa["coverage/conv2"][()], fb["coverage/conv2"][()])
            # who evaluated: round 1 by capacity (3 chunks: rank 0 and the first two workers one
            # each); the workers given chunks record their time, rank 0 its share
            spread, share = fa["workers/eval_time"][()], fa["metrics/eval_root_share"][()]
            assert np.all(spread[0, :2] > 0) and np.all(spread[0, 2:] == 0) and share[0] == 1 / 3, (spread, share)
            assert np.all((spread > 0).any(axis=1) == (share < 1)), (spread, share)
            if other == "rank 0 alone":
                assert np.all(fb["workers/eval_time"][()] == 0) and np.all(fb["metrics/eval_root_share"][()] == 1)


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
    if name == "fedavg-drop":
        # An explicit deadline, far from both workers' CPU times (4 LeNet steps of 16: 0.03 to
        # 0.05 s at full speed, 0.3 to 0.5 s at capacity 0.1): the default one (the fastest
        # worker's prediction + 10%) is a coin toss for a full-speed worker on a shared machine,
        # and capacity 0.25 came within 7% of this one on a quiet machine.
        extra += ["--set", "strategy.deadline=0.12", "--set", f"workers.capacity={caps[:-1] + [0.1]}"]
    # Execute
    rc = train(out, *extra, rounds=3)
    # Assert
    assert rc == 0
    if WORLD.rank != 0:
        return
    slow = WORKERS - 1
    with h5py.File(out / "checkpoint.h5", "r") as f:
        assert int(f.attrs["round"]) == 3 and f.attrs["strategy"].decode() == name
        masks = [kept_neurons(f, r, slow, "conv2") for r in (1, 2, 3)]
        keep = f["workers/keep_ratio"][()]
        assert np.all(np.isfinite(f["model/fc1.weight"][()]))
        if name in ("fedavg", "fedavg-drop", "fedprox-partial"):
            assert np.all(keep == 1.0)
        if name == "fedavg-drop":
            dropped = f["workers/dropped"][()]
            assert dropped[:, -1].sum() == 3  # the 4x straggler misses the deadline every round
            assert dropped[:, 0].sum() <= 1  # a full-speed worker makes it (one noisy round aside)
        if name == "fedprox-partial":
            steps = f["workers/steps"][()]
            assert np.all(steps[:, -1] < steps[:, 0])
        if name == "heterofl":
            assert keep[0, -1] < 1.0 and masks[0].size < 50
            for m in masks:
                np.testing.assert_array_equal(m, np.arange(m.size))  # a static prefix
            assert masks[0].size == masks[1].size == masks[2].size
        if name == "fedrolex":
            assert keep[0, -1] < 1.0 and masks[0].size < 50  # a window that can move
            for i in range(2):
                np.testing.assert_array_equal(masks[i + 1], np.sort((masks[i] + 1) % 50))
        if name == "elfish":
            assert np.all(keep[:, -1] < 1.0)
            # Every thinned layer of the slow worker keeps the random policy's choice of its round ...
            thinned = {}
            for gi, g in enumerate(lenet().groups):
                for r in (1, 2, 3):
                    kept = kept_neurons(f, r, slow, g.name)
                    if kept.size < g.size:
                        want = select("random", g.size, kept.size, seed=0, round=r, worker=WORKERS - 1, layer=gi)
                        np.testing.assert_array_equal(kept, want, err_msg=f"{g.name}, round {r}")
                        thinned[g.name, r] = kept
            # ... so a layer thinned to the same width in consecutive rounds keeps other neurons.
            pairs = [(thinned[name, r], thinned[name, r + 1]) for name, r in thinned
                     if (name, r + 1) in thinned and thinned[name, r].size == thinned[name, r + 1].size]
            widths = [(key, kept.size) for key, kept in thinned.items()]
            assert pairs, f"no layer of the slow worker kept one width for two rounds: {widths}"
            for a, b in pairs:
                assert not np.array_equal(a, b)


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
