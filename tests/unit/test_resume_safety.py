"""Jobs launched with mpiexec as a user launches them: a resume writes only into its own run
directory (or a fresh --out), what the checkpoint records is what happened (kept shares,
its own writing time, the same on resume), and usage errors are printed once per job."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

from proc_tools import clean_env
from test_cli_job import ROOT, TIMEOUT, launch, snapshot, tiny
from test_faults import open_mpi_launcher
from elfish_mpi.checkpoint import kept_neurons

pytestmark = pytest.mark.timeout(600)


def write_config(path: Path, out: Path) -> Path:
    path.write_text(f'[run]\nout = "{out}"\n')
    return path


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory) -> tuple[Path, Path]:
    """Two finished 1-round runs, ``other`` and ``mine``, LeNet with worker 2 at keep ratio 0.25."""
    base = tmp_path_factory.mktemp("two")
    runs = []
    for name in ("other", "mine"):
        out = base / name
        res = launch(3, *tiny(out, 1), "--set", "strategy.keep_ratios=[1.0, 0.25]")
        assert res.returncode == 0, res.stderr
        runs.append(out)
    return runs[0], runs[1]


def test_resume_with_another_runs_config_writes_only_into_its_own_directory(two_runs, tmp_path):
    # Prepare: other.toml's run.out is the other run's directory (the review's reproduction)
    other, mine = two_runs
    config = write_config(tmp_path / "other.toml", other)
    before = snapshot(other)
    args = tiny(mine, 3, 2, "--set", "strategy.keep_ratios=[1.0, 0.25]")
    args = args[2:]  # no --out: where the run goes is the point of the test
    # Execute
    res = launch(3, "--resume", str(mine), "--config", str(config), *args)
    # Assert: the resumed run went on in its own directory; the other run is untouched
    assert res.returncode == 0, res.stderr
    assert f"run.out = {other} of {config} is not used" in res.stdout
    assert snapshot(other) == before
    with h5py.File(mine / "checkpoint.h5", "r") as f:
        assert int(f.attrs["round"]) == 3


@pytest.mark.parametrize("how", ["--out", "--set"])
def test_resume_into_another_runs_directory_is_refused(two_runs, how):
    # Prepare
    other, mine = two_runs
    before_other, before_mine = snapshot(other), snapshot(mine)
    where = ["--out", str(other)] if how == "--out" else ["--set", f"run.out={other}"]
    # Execute
    res = launch(3, "--resume", str(mine), *where, "--set", "run.rounds=9")
    # Assert: one clear line, exit 2, nothing touched
    assert res.returncode == 2, res.stdout + res.stderr
    errors = [line for line in res.stderr.splitlines() if line.startswith("elfish-mpi: error:")]
    assert errors == [
        f"elfish-mpi: error: run directory {other} holds another run's checkpoint; a resumed run writes "
        f"into its own directory ({mine}) or into a fresh --out"
    ]
    assert snapshot(other) == before_other and snapshot(mine) == before_mine


def test_resume_from_a_loose_file_needs_an_out(two_runs, tmp_path):
    # Prepare: a copy of a checkpoint outside any run directory
    _, mine = two_runs
    loose = tmp_path / "copy.h5"
    loose.write_bytes((mine / "checkpoint.h5").read_bytes())
    # Execute
    refused = launch(3, "--resume", str(loose), "--set", "run.rounds=9")
    fresh = tmp_path / "continued"
    done = launch(3, "--resume", str(loose), "--out", str(fresh), "--set", "run.rounds=4")
    # Assert
    assert refused.returncode == 2 and "say where the resumed run goes with --out" in refused.stderr
    assert done.returncode == 0, done.stderr
    with h5py.File(fresh / "checkpoint.h5", "r") as f:
        assert int(f.attrs["round"]) == 4


def test_records_are_what_happened_and_survive_a_resume(tmp_path):
    # Prepare: 2 rounds, a checkpoint every round; then resume it to round 3
    out = tmp_path / "run"
    fixed = ("--set", "strategy.keep_ratios=[1.0, 0.25]")
    first = launch(3, *tiny(out, 2), *fixed)
    assert first.returncode == 0, first.stderr
    with h5py.File(out / "checkpoint.h5", "r") as f:
        at_2 = {k: f["metrics"][k][()] for k in f["metrics"]}
    # Execute
    resumed = launch(3, *tiny(out, 3), *fixed, "--resume", str(out))
    # Assert
    assert resumed.returncode == 0, resumed.stderr
    with h5py.File(out / "checkpoint.h5", "r") as f:
        widths = {"conv1": 20, "conv2": 50, "fc1": 500}
        for layer, width in widths.items():
            kept = np.array([[kept_neurons(f, r, w, layer).size for w in range(2)] for r in (1, 2, 3)])
            np.testing.assert_array_equal(f[f"workers/keep_ratio_{layer}"][()], kept / width)
        # conv2 keeps 13 of 50 at ratio 0.25 (keep counts round up): 0.26 is recorded, not 0.25
        assert f["workers/keep_ratio_conv2"][0, 1] == pytest.approx(0.26)
        # every checkpointed round records its own writing time, and the resumed run kept it
        ck_time = f["metrics/checkpoint_time"][()]
        assert np.all(at_2["checkpoint_time"] > 0) and np.all(ck_time > 0)
        np.testing.assert_array_equal(ck_time[:2], at_2["checkpoint_time"])
    with h5py.File(out / "checkpoints" / "round-000002.h5", "r") as f:
        np.testing.assert_array_equal(f["metrics/checkpoint_time"][()], at_2["checkpoint_time"])


def usage_error_lines(cmd: list[str], env: dict) -> tuple[int, list[str]]:
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT, env=env, cwd=ROOT)
    return res.returncode, [line for line in res.stderr.splitlines() if "error: unrecognized arguments" in line]


def test_usage_error_is_printed_once_under_mpich():
    # MPICH's hydra sets PMI_RANK
    cmd = [str(Path(sys.executable).with_name("mpiexec")), "-n", "3", sys.executable, "-m", "elfish_mpi", "train", "--bogus"]
    code, lines = usage_error_lines(cmd, clean_env())
    assert code != 0 and lines == ["elfish-mpi: error: unrecognized arguments: --bogus"]


def test_usage_error_is_printed_once_without_the_launchers_rank_variable():
    # Prepare: Open MPI with OMPI_COMM_WORLD_RANK removed from the ranks' environment stands for
    # srun --mpi=pmix, which sets PMIX_RANK (and SLURM_PROCID) but neither PMI_RANK nor
    # OMPI_COMM_WORLD_RANK.
    launcher, env = open_mpi_launcher()
    cmd = [*launcher[:-1], "env", "-u", "OMPI_COMM_WORLD_RANK", launcher[-1], "-m", "elfish_mpi", "train", "--bogus"]
    # Execute
    code, lines = usage_error_lines(cmd, env)
    # Assert
    assert code != 0 and lines == ["elfish-mpi: error: unrecognized arguments: --bogus"]


def test_resume_of_an_older_round_into_its_own_directory_is_refused(tmp_path):
    # Prepare: a 2-round run with a checkpoint every round
    out = tmp_path / "run"
    first = launch(3, *tiny(out, 2))
    assert first.returncode == 0, first.stderr
    before = snapshot(out)
    older = out / "checkpoints" / "round-000001.h5"
    # Execute: resuming round 1 there would overwrite round 2 (and a later --resume DIR would
    # mix the two branches)
    res = launch(3, "--resume", str(older), "--set", "run.rounds=3")
    # Assert
    assert res.returncode == 2, res.stdout + res.stderr
    assert f"run directory {out} holds rounds up to 2; resuming round 1 there would overwrite them" in res.stderr
    assert snapshot(out) == before


def test_a_directory_with_only_history_files_is_not_reused(two_runs, tmp_path):
    # Prepare: another run's directory that lost its checkpoint.h5 but keeps its history
    other, mine = two_runs
    history_only = tmp_path / "history-only"
    (history_only / "checkpoints").mkdir(parents=True)
    for p in (other / "checkpoints").glob("round-*.h5"):
        (history_only / "checkpoints" / p.name).write_bytes(p.read_bytes())
    before = snapshot(history_only)
    # Execute
    fresh = launch(3, *tiny(history_only, 1))
    resumed = launch(3, "--resume", str(mine), "--out", str(history_only), "--set", "run.rounds=9")
    # Assert
    assert fresh.returncode == 2 and "already holds a checkpoint" in fresh.stderr
    assert resumed.returncode == 2 and "holds another run's checkpoint" in resumed.stderr
    assert snapshot(history_only) == before


NEW_METRICS = ("eval_root_share", "eval_root_time", "root_busy_time", "root_cpu_time", "peak_memory")
NEW_WORKERS = ("eval_time", "peak_memory", "bytes_received")


def test_a_checkpoint_from_before_the_spread_evaluation_resumes(tmp_path):
    # Prepare: a 2-round run, made to look like one written before these records and before
    # format_version 2 (masks a group a round and worker)
    out = tmp_path / "run"
    assert launch(3, *tiny(out, 2)).returncode == 0
    path = out / "checkpoint.h5"
    with h5py.File(path, "r") as f:
        before = {(r, w, layer): kept_neurons(f, r, w, layer) for r in (1, 2) for w in range(2) for layer in ("conv1", "conv2", "fc1")}
    with h5py.File(path, "r+") as f:
        for name in NEW_METRICS:
            del f[f"metrics/{name}"]
        for name in NEW_WORKERS:
            del f[f"workers/{name}"]
        del f["masks"]
        for (r, w, layer), kept in before.items():
            f.create_dataset(f"masks/round_{r:06d}/worker_{w:02d}/{layer}", data=kept)
        f.attrs["format_version"] = np.int64(1)
    # Execute
    res = launch(3, *tiny(out, 3), "--resume", str(out))
    # Assert: the new records are NaN where the older run had none, measured after
    assert res.returncode == 0, res.stderr
    with h5py.File(path, "r") as f:
        assert int(f.attrs["format_version"]) == 2 and int(f.attrs["round"]) == 3
        for group, names in (("metrics", NEW_METRICS), ("workers", NEW_WORKERS)):
            for name in names:
                arr = f[f"{group}/{name}"][()]
                assert arr.shape[0] == 3 and np.all(np.isnan(arr[:2])) and np.all(np.isfinite(arr[2])), (name, arr)
        for (r, w, layer), kept in before.items():  # the older rounds' masks, now packed
            np.testing.assert_array_equal(kept_neurons(f, r, w, layer), kept)
        assert kept_neurons(f, 3, 1, "conv2").size > 0
