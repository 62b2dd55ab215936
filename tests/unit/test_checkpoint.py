"""Tests for elfish_mpi.checkpoint: real HDF5 files in tmp_path."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import h5py
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from elfish_mpi import checkpoint as ck
from elfish_mpi.checkpoint import Checkpoint, CheckpointError

ROUNDS = 3
WORKERS = 2


def make_ckpt(rounds: int = ROUNDS, workers: int = WORKERS, seed: int = 0) -> Checkpoint:
    rng = np.random.default_rng(seed)
    return Checkpoint(
        round=rounds,
        config={"rounds": 10, "lr": 0.05, "model": {"name": "lenet", "width": [6, 16]}, "note": "café"},
        strategy="elfish",
        model={
            "conv1.weight": rng.standard_normal((6, 1, 5, 5)).astype(np.float32),
            "conv1.bias": rng.standard_normal(6).astype(np.float32),
            "bn1.running_mean": rng.standard_normal(6).astype(np.float64),
            "bn1.num_batches_tracked": np.array(42, dtype=np.int64),
            "fc.weight": rng.standard_normal((10, 16)).astype(np.float32),
        },
        metrics={
            "round": np.arange(1, rounds + 1, dtype=np.int64),
            "round_time": rng.random(rounds),
            "virtual_time": np.cumsum(rng.random(rounds)),
            "test_accuracy": np.linspace(0.3, 0.8, rounds),
            "test_loss": rng.random(rounds).astype(np.float32),
        },
        workers={
            "keep_ratio": rng.uniform(0.25, 1.0, (rounds, workers)),
            "busy_time": rng.random((rounds, workers)),
            "idle_time": rng.random((rounds, workers)),
            "num_samples": rng.integers(10, 100, (rounds, workers)),
        },
        masks={
            r: [
                {"conv1": rng.permutation(6)[: 2 + w].astype(np.int64), "fc": np.array([9, 0, 4])}
                for w in range(workers)
            ]
            for r in range(1, rounds + 1)
        },
        coverage={"conv1": rng.integers(0, 5, 6).astype(np.int64), "fc": np.zeros(10, dtype=np.int64)},
        profiles={
            "step_time": rng.random((workers, 4)),
            "keep_ratios": rng.random((4, 2)).astype(np.float32),
        },
        state={
            "rng_bytes": np.frombuffer(b"\x00\x01state\xff", dtype=np.uint8).copy(),
            "data_cursor": np.array([5, 17], dtype=np.int64),
            "empty": np.zeros((0,), dtype=np.float64),
        },
        attrs={"hostname": "node-1", "world_size": workers + 1, "wall_time": 12.5},
    )


def assert_arrays_equal(got: dict, want: dict) -> None:
    assert list(got) == list(want)
    for key, arr in want.items():
        arr = np.asarray(arr)
        assert got[key].dtype == arr.dtype, key
        assert got[key].shape == arr.shape, key
        np.testing.assert_array_equal(got[key], arr, err_msg=key)


@pytest.fixture
def ckpt_path(tmp_path: Path) -> Path:
    path = tmp_path / "ckpt.h5"
    ck.write(path, make_ckpt())
    return path


def data_offset(path: Path, dataset: str) -> int:
    with h5py.File(path, "r") as f:
        ds = f[dataset]
        assert ds.fletcher32 and ds.chunks is not None
        return ds.id.get_chunk_info(0).byte_offset


def flip_byte(path: Path, offset: int) -> None:
    with open(path, "r+b") as fh:
        fh.seek(offset)
        value = fh.read(1)[0]
        fh.seek(offset)
        fh.write(bytes([value ^ 0xFF]))


# --------------------------------------------------------------------------- round trip and layout


def test_round_trip_keeps_every_field(ckpt_path: Path) -> None:
    # Prepare
    want = make_ckpt()

    # Execute
    got = ck.read(ckpt_path)

    # Assert
    assert got.round == want.round
    assert got.config == want.config
    assert got.strategy == want.strategy
    assert got.attrs == want.attrs
    for group in ("model", "metrics", "workers", "coverage", "profiles", "state"):
        assert_arrays_equal(getattr(got, group), getattr(want, group))
    assert got.model["bn1.num_batches_tracked"].shape == ()
    assert sorted(got.masks) == [1, 2, 3]
    for r, per_worker in want.masks.items():
        assert len(got.masks[r]) == WORKERS
        for w, layers in enumerate(per_worker):
            assert list(got.masks[r][w]) == list(layers)
            for layer, idx in layers.items():
                stored = got.masks[r][w][layer]
                assert stored.dtype == np.int32
                np.testing.assert_array_equal(stored, np.sort(idx))


def test_read_without_masks_skips_them(ckpt_path: Path) -> None:
    got = ck.read(ckpt_path, load_masks=False)

    assert got.masks == {}
    assert got.round == ROUNDS


def test_layout_matches_the_documented_format(ckpt_path: Path) -> None:
    with h5py.File(ckpt_path, "r") as f:
        assert f.attrs["format"].decode() == "elfish-mpi"
        assert int(f.attrs["format_version"]) == 2
        assert int(f.attrs["round"]) == ROUNDS
        assert f.attrs["strategy"].decode() == "elfish"
        assert f.attrs["hostname"].decode() == "node-1"
        assert int(f.attrs["world_size"]) == WORKERS + 1
        assert set(f) == {"model", "metrics", "workers", "masks", "coverage", "profiles", "state"}

        weight = f["model/conv1.weight"]
        assert weight.dtype == np.float32 and weight.shape == (6, 1, 5, 5)
        assert weight.fletcher32 and weight.chunks is not None
        assert list(f["model"]) == list(make_ckpt().model)  # state_dict order kept

        acc = f["metrics/test_accuracy"]
        assert acc.maxshape == (None,) and acc.chunks is not None and acc.fletcher32
        assert acc.attrs["units"].decode() == "fraction 0..1"
        assert f["metrics/round_time"].attrs["units"].decode() == "s"
        assert "units" not in f["metrics/test_loss"].attrs

        busy = f["workers/busy_time"]
        assert busy.shape == (ROUNDS, WORKERS) and busy.maxshape == (None, WORKERS)
        assert busy.attrs["units"].decode() == "s"

        # masks: one packed-bit dataset a layer, rounds on the first axis, as the docstring says
        assert set(f["masks"]) == {"round", "conv1", "fc"}
        np.testing.assert_array_equal(f["masks/round"][()], np.arange(1, ROUNDS + 1))
        mask = f["masks/conv1"]
        assert mask.dtype == np.uint8 and mask.fletcher32 and mask.shape == (ROUNDS, WORKERS, 1)
        assert mask.maxshape == (None, WORKERS, 1) and int(mask.attrs["neurons"]) == 6
        assert f["masks/fc"].shape == (ROUNDS, WORKERS, 2) and int(f["masks/fc"].attrs["neurons"]) == 10
        kept = np.flatnonzero(np.unpackbits(mask[1, 1], count=int(mask.attrs["neurons"])))
        np.testing.assert_array_equal(kept, np.sort(make_ckpt().masks[2][1]["conv1"]))

        assert f["coverage/conv1"].dtype == np.int64
        assert f["profiles/step_time"].shape == (WORKERS, 4)
        assert f["state/rng_bytes"].dtype == np.uint8
        assert f["state/empty"].size == 0 and not f["state/empty"].fletcher32
        assert f["model/bn1.num_batches_tracked"].fletcher32


def test_zero_rounds_checkpoint_round_trips(tmp_path: Path) -> None:
    path = tmp_path / "r0.h5"
    want = make_ckpt(rounds=0)

    ck.write(path, want)
    got = ck.validate(path)

    assert got.round == 0 and got.masks == {}
    assert got.metrics["test_accuracy"].shape == (0,)
    assert got.workers["keep_ratio"].shape == (0, WORKERS)


# --------------------------------------------------------------------------- write: input checks and atomicity


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda c: c.model.update({"bad/key": np.zeros(2)}), "bad/key"),
        (lambda c: c.model.update({"obj": np.array([object()], dtype=object)}), "model/obj"),
        (lambda c: c.metrics.update({"test_loss": np.zeros(ROUNDS + 1)}), "metrics/test_loss"),
        (lambda c: c.workers.update({"keep_ratio": np.zeros(ROUNDS)}), "workers/keep_ratio"),
        (lambda c: c.masks.update({0: []}), "1-based"),
        (lambda c: c.attrs.update({"round": 1}), "reserved"),
        (lambda c: c.config.update({"fn": print}), "JSON"),
    ],
)
def test_write_rejects_bad_checkpoint_without_touching_files(tmp_path: Path, change, message) -> None:
    # Prepare
    path = tmp_path / "ckpt.h5"
    ck.write(path, make_ckpt())
    before = path.read_bytes()
    bad = make_ckpt()
    change(bad)

    # Execute
    with pytest.raises(CheckpointError, match=message):
        ck.write(path, bad)

    # Assert
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.h5"]


def test_write_failing_halfway_leaves_old_file_and_no_temp(tmp_path: Path, monkeypatch) -> None:
    # Prepare: an existing checkpoint, and h5py failing on the 6th dataset of the next write
    path = tmp_path / "ckpt.h5"
    ck.write(path, make_ckpt(seed=1))
    before = path.read_bytes()
    real_create = h5py.Group.create_dataset
    calls = []

    def failing_create(self, name, *args, **kwargs):
        calls.append(name)
        if len(calls) == 6:
            raise OSError("disk full (simulated)")
        return real_create(self, name, *args, **kwargs)

    monkeypatch.setattr(h5py.Group, "create_dataset", failing_create)

    # Execute
    with pytest.raises(OSError, match="simulated"):
        ck.write(path, make_ckpt(seed=2))

    # Assert
    assert len(calls) == 6
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.h5"]


def test_write_failing_at_rename_leaves_old_file_and_no_temp(tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "ckpt.h5"
    ck.write(path, make_ckpt(seed=1))
    before = path.read_bytes()

    def failing_replace(src, dst):
        raise OSError("rename failed (simulated)")

    monkeypatch.setattr(os, "replace", failing_replace)

    with pytest.raises(OSError, match="simulated"):
        ck.write(path, make_ckpt(seed=2))

    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.h5"]


def test_write_goes_through_hidden_temp_file_with_fsync(tmp_path: Path, monkeypatch) -> None:
    # Prepare: spy on os.replace and os.fsync
    path = tmp_path / "ckpt.h5"
    real_replace, real_fsync = os.replace, os.fsync
    replaced, fsynced = [], []
    monkeypatch.setattr(os, "replace", lambda s, d: (replaced.append((Path(s), Path(d))), real_replace(s, d)))
    monkeypatch.setattr(os, "fsync", lambda fd: (fsynced.append(fd), real_fsync(fd)))

    # Execute
    ck.write(path, make_ckpt())

    # Assert
    [(src, dst)] = replaced
    assert dst == path
    assert src.parent == tmp_path and src.name.startswith(".") and src.name.endswith(".tmp")
    assert not src.exists()
    assert len(fsynced) >= 2  # the file and its directory
    assert ck.read(path).round == ROUNDS


# --------------------------------------------------------------------------- read: damaged and wrong files


def test_missing_file_raises_checkpoint_error(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="no such file"):
        ck.read(tmp_path / "nope.h5")


def test_non_hdf5_file_raises_checkpoint_error(tmp_path: Path) -> None:
    path = tmp_path / "ckpt.h5"
    path.write_text("this is not HDF5\n")

    with pytest.raises(CheckpointError, match="ckpt.h5"):
        ck.read(path)


@pytest.mark.parametrize("keep_fraction", [0.0, 0.1, 0.5, 0.9, 0.99])
def test_truncated_file_raises_checkpoint_error(ckpt_path: Path, keep_fraction: float) -> None:
    data = ckpt_path.read_bytes()
    ckpt_path.write_bytes(data[: int(len(data) * keep_fraction)])

    with pytest.raises(CheckpointError, match=str(ckpt_path.name)):
        ck.validate(ckpt_path)


def test_flipped_model_byte_is_caught_by_checksum(ckpt_path: Path) -> None:
    flip_byte(ckpt_path, data_offset(ckpt_path, "model/fc.weight") + 7)

    with pytest.raises(CheckpointError, match="checksum mismatch or corrupt data") as err:
        ck.validate(ckpt_path)
    assert "fc.weight" in str(err.value)


def test_validate_checks_data_that_read_skipped(ckpt_path: Path) -> None:
    # Prepare: damage a mask, which read(load_masks=False) never looks at
    flip_byte(ckpt_path, data_offset(ckpt_path, "masks/fc"))

    # Execute / Assert
    assert ck.read(ckpt_path, load_masks=False).round == ROUNDS
    with pytest.raises(CheckpointError, match="checksum mismatch"):
        ck.validate(ckpt_path)


def set_root_attr(path: Path, name: str, value) -> None:
    with h5py.File(path, "r+") as f:
        f.attrs[name] = value


def test_unsupported_format_version_names_supported_versions(ckpt_path: Path) -> None:
    set_root_attr(ckpt_path, "format_version", 3)  # a file from a newer elfish-mpi

    with pytest.raises(CheckpointError, match="unsupported format_version") as err:
        ck.read(ckpt_path)
    assert "supports format_version 1, 2" in str(err.value)


def test_wrong_format_is_rejected(ckpt_path: Path) -> None:
    set_root_attr(ckpt_path, "format", "something-else")

    with pytest.raises(CheckpointError, match="not an elfish-mpi checkpoint"):
        ck.read(ckpt_path)


def test_invalid_config_json_is_rejected(ckpt_path: Path) -> None:
    set_root_attr(ckpt_path, "config", "{not json")

    with pytest.raises(CheckpointError, match="'config' is not valid JSON"):
        ck.read(ckpt_path)


def test_rows_not_matching_round_are_rejected(ckpt_path: Path) -> None:
    set_root_attr(ckpt_path, "round", ROUNDS + 2)

    with pytest.raises(CheckpointError, match=r"expected \(5,\)"):
        ck.read(ckpt_path)


@pytest.mark.parametrize("attr", ["format", "round", "config", "strategy"])
def test_missing_root_attribute_is_rejected(ckpt_path: Path, attr: str) -> None:
    with h5py.File(ckpt_path, "r+") as f:
        del f.attrs[attr]

    with pytest.raises(CheckpointError, match=attr):
        ck.read(ckpt_path)


@pytest.mark.parametrize("group", ["model", "metrics", "workers"])
def test_missing_required_group_is_rejected(ckpt_path: Path, group: str) -> None:
    with h5py.File(ckpt_path, "r+") as f:
        del f[group]

    with pytest.raises(CheckpointError, match=f"missing required group '/{group}'"):
        ck.read(ckpt_path)


# --------------------------------------------------------------------------- validate(expect_model)


def test_expect_model_matching_shapes_passes(ckpt_path: Path) -> None:
    expect = {k: v.shape for k, v in make_ckpt().model.items()}

    assert ck.validate(ckpt_path, expect_model=expect).round == ROUNDS


def test_expect_model_lists_every_mismatch(ckpt_path: Path) -> None:
    # Prepare: one wrong shape, one missing key, one unexpected key (fc.weight absent)
    expect = {k: v.shape for k, v in make_ckpt().model.items()}
    expect["conv1.weight"] = (6, 3, 5, 5)
    expect["fc2.weight"] = (10, 10)
    del expect["fc.weight"]

    # Execute
    with pytest.raises(CheckpointError) as err:
        ck.validate(ckpt_path, expect_model=expect)

    # Assert
    msg = str(err.value)
    assert "'conv1.weight' has shape (6, 1, 5, 5), expected (6, 3, 5, 5)" in msg
    assert "missing model key 'fc2.weight'" in msg
    assert "unexpected model key 'fc.weight'" in msg


def test_summary_reports_round_strategy_accuracy_and_keep_ratio() -> None:
    c = make_ckpt()
    text = ck.summary(c)

    n_values = sum(a.size for a in c.model.values())
    assert "round 3" in text and "'elfish'" in text
    assert f"{n_values:,} values" in text
    assert "0.8000" in text
    assert f"mean keep ratio {c.workers['keep_ratio'].mean():.3f}" in text


# --------------------------------------------------------------------------- run directory


def history_names(run_dir: Path) -> list[str]:
    return sorted(p.name for p in (run_dir / "checkpoints").iterdir())


def test_rotate_keeps_exactly_the_last_keep_history_files(tmp_path: Path) -> None:
    # Execute
    paths = [ck.rotate(tmp_path, make_ckpt(rounds=r), keep=2) for r in range(1, 6)]

    # Assert
    assert paths[-1] == tmp_path / "checkpoints" / "round-000005.h5"
    assert history_names(tmp_path) == ["round-000004.h5", "round-000005.h5"]
    assert ck.read(tmp_path / "checkpoint.h5").round == 5
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.h5", "checkpoints"]
    latest, history = tmp_path / "checkpoint.h5", paths[-1]
    assert os.stat(latest).st_ino != os.stat(history).st_ino and os.stat(latest).st_nlink == 1


def test_rotate_with_keep_zero_keeps_all(tmp_path: Path) -> None:
    for r in range(1, 5):
        ck.rotate(tmp_path, make_ckpt(rounds=r), keep=0)

    assert history_names(tmp_path) == [f"round-{r:06d}.h5" for r in range(1, 5)]


def test_find_latest_valid_prefers_checkpoint_h5(tmp_path: Path) -> None:
    for r in range(1, 4):
        ck.rotate(tmp_path, make_ckpt(rounds=r), keep=3)

    path, skipped = ck.find_latest_valid(tmp_path)

    assert path == tmp_path / "checkpoint.h5"
    assert skipped == []


def test_find_latest_valid_falls_back_to_history_when_latest_is_damaged(tmp_path: Path) -> None:
    # Prepare: damage checkpoint.h5 and the newest history file
    for r in range(1, 4):
        ck.rotate(tmp_path, make_ckpt(rounds=r), keep=3)
    latest = tmp_path / "checkpoint.h5"
    latest.write_bytes(latest.read_bytes()[:1000])
    newest = tmp_path / "checkpoints" / "round-000003.h5"
    flip_byte(newest, data_offset(newest, "model/conv1.weight"))

    # Execute
    path, skipped = ck.find_latest_valid(tmp_path)

    # Assert
    assert path == tmp_path / "checkpoints" / "round-000002.h5"
    assert len(skipped) == 2
    assert "checkpoint.h5" in skipped[0]
    assert "round-000003.h5" in skipped[1] and "checksum mismatch" in skipped[1]
    assert ck.read(path).round == 2


def test_find_latest_valid_raises_when_nothing_is_valid(tmp_path: Path) -> None:
    ck.rotate(tmp_path, make_ckpt(rounds=1), keep=1)
    for p in (tmp_path / "checkpoint.h5", tmp_path / "checkpoints" / "round-000001.h5"):
        p.write_bytes(b"garbage")

    with pytest.raises(CheckpointError, match="no valid checkpoint") as err:
        ck.find_latest_valid(tmp_path)
    assert "checkpoint.h5" in str(err.value) and "round-000001.h5" in str(err.value)


def test_find_latest_valid_in_empty_run_dir(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="no checkpoint found"):
        ck.find_latest_valid(tmp_path)


# --------------------------------------------------------------------------- property: damage never escapes as another error


@pytest.fixture(scope="module")
def valid_file_bytes(tmp_path_factory) -> bytes:
    path = tmp_path_factory.mktemp("valid") / "ckpt.h5"
    ck.write(path, make_ckpt())
    return path.read_bytes()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_damaged_file_reads_fine_or_raises_checkpoint_error(valid_file_bytes: bytes, data) -> None:
    # Prepare: truncate, or overwrite random bytes of, a valid checkpoint
    size = len(valid_file_bytes)
    damaged = bytearray(valid_file_bytes)
    if data.draw(st.booleans(), label="truncate"):
        damaged = damaged[: data.draw(st.integers(0, size - 1), label="length")]
    else:
        edits = data.draw(
            st.lists(st.tuples(st.integers(0, size - 1), st.integers(0, 255)), min_size=1, max_size=16),
            label="edits",
        )
        for offset, value in edits:
            damaged[offset] = value

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "ckpt.h5"
        path.write_bytes(bytes(damaged))

        # Execute / Assert: any other exception type fails the test
        for load in (ck.read, ck.validate):
            try:
                result = load(path)
            except CheckpointError:
                continue
            assert result.round == ROUNDS


def as_version_1(path: Path) -> None:
    """Rewrite a checkpoint's masks in format_version 1's layout (a group a round and worker)."""
    masks = ck.read(path).masks
    with h5py.File(path, "r+") as f:
        del f["masks"]
        g = f.create_group("masks")
        for r, per_worker in masks.items():
            for w, layers in enumerate(per_worker):
                for layer, idx in layers.items():
                    g.create_dataset(f"round_{r:06d}/worker_{w:02d}/{layer}", data=idx.astype(np.int32))
        f.attrs["format_version"] = np.int64(1)


def test_a_version_1_checkpoint_is_still_read(ckpt_path: Path) -> None:
    # Prepare
    want = ck.read(ckpt_path).masks
    as_version_1(ckpt_path)
    # Execute
    got = ck.read(ckpt_path)
    # Assert: the same kept neurons, and the file is valid
    assert sorted(got.masks) == sorted(want) == [1, 2, 3]
    for r in want:
        for w in range(WORKERS):
            for layer in ("conv1", "fc"):
                np.testing.assert_array_equal(got.masks[r][w][layer], want[r][w][layer])
    ck.validate(ckpt_path)


def test_masks_that_do_not_fit_their_layer_are_refused(tmp_path: Path) -> None:
    # a neuron beyond the layer's coverage, and a round with a worker missing
    bad = make_ckpt()
    bad.masks[2][1]["fc"] = np.array([0, 10])
    with pytest.raises(CheckpointError, match="neuron 10, but coverage/fc has 10 neurons"):
        ck.write(tmp_path / "a.h5", bad)
    short = make_ckpt()
    short.masks[3] = short.masks[3][:1]
    with pytest.raises(CheckpointError, match=r"masks\[3\]: 1 workers, but round 1 has 2"):
        ck.write(tmp_path / "b.h5", short)
    assert not (tmp_path / "a.h5").exists() and not (tmp_path / "b.h5").exists()


def test_inspect_shows_the_kept_neurons_of_any_round(ckpt_path: Path, capsys) -> None:
    from elfish_mpi.cli import main

    # Execute
    assert main(["inspect", str(ckpt_path), "--masks", "2"]) == 0
    out = capsys.readouterr().out.splitlines()
    # Assert: a line per worker and layer, the neurons the file holds
    want = make_ckpt().masks[2]
    assert len(out) == WORKERS * 2
    for w in range(WORKERS):
        kept = np.sort(want[w]["conv1"])
        assert f"round 2 worker {w} (rank {w + 1}) conv1: {kept.size} kept: {' '.join(map(str, kept))}" in out
    assert "round 2 worker 1 (rank 2) fc: 3 kept: 0 4 9" in out
    # a round the file does not hold: one clear line, exit 2
    assert main(["inspect", str(ckpt_path), "--masks", "9"]) == 2
    assert "holds the masks of rounds 1 to 3, not of round 9" in capsys.readouterr().err
