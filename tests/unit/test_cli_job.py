"""The `elfish-mpi train` job launched for real with mpiexec, as a user launches it."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
from elfish_mpi.checkpoint import kept_neurons

ROOT = Path(__file__).resolve().parents[2]
SAMPLE = ROOT / "tests" / "data" / "fashion-mnist"
TIMEOUT = 240


def mpiexec() -> str:
    local = Path(sys.executable).with_name("mpiexec")
    return str(local) if local.exists() else (shutil.which("mpiexec") or "mpiexec")


def launch(n: int, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PMI_", "PMIX_", "HYDRA_", "OMPI_", "MPI_LOCALRANK"))}
    cmd = [mpiexec(), "-n", str(n), sys.executable, "-m", "elfish_mpi", "train", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT, env=env, cwd=ROOT)


def tiny(out: Path, rounds: int = 2, workers: int = 2, *extra: str) -> list[str]:
    return [
        "--out", str(out), "--set", f"data.path={SAMPLE}", "--set", "data.test_samples=200",
        "--set", "data.max_samples=300", "--set", f"run.rounds={rounds}", "--set", "train.local_steps=2",
        "--set", "workers.throttle=none", "--set", "checkpoint.every=1", *extra,
    ]


def snapshot(directory: Path) -> dict:
    return {p.relative_to(directory): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("done") / "run"
    res = launch(3, *tiny(out))
    assert res.returncode == 0, res.stderr
    return out


def test_straggler_soft_trains_with_changing_masks(tmp_path):
    # Prepare: the quickstart's fleet (1, 1, 0.5, 0.25) under the sleep throttle, on the test sample.
    out = tmp_path / "run"
    # Execute
    res = launch(
        5, "--config", str(ROOT / "launch" / "configs" / "quickstart.toml"), "--out", str(out),
        "--set", f"data.path={SAMPLE}", "--set", "data.test_samples=500", "--set", "run.rounds=4",
        "--set", "train.local_steps=8",
    )
    # Assert
    assert res.returncode == 0, res.stderr
    lines = [line for line in res.stdout.splitlines() if line.startswith("round ")]
    assert len(lines) == 4 and "done: 4 rounds" in res.stdout
    with h5py.File(out / "checkpoint.h5", "r") as f:
        keep = f["workers/keep_ratio"][()]
        assert np.all(keep[:, 3] < 0.9), keep  # the 4x straggler soft-trains every round
        masks = [kept_neurons(f, r, 3, "conv1") for r in range(1, 5)]
        assert all(m.size < 20 for m in masks), [m.size for m in masks]  # conv1 thinned every round ...
        for i in range(3):  # ... and to other neurons from each round to the next
            assert not np.array_equal(masks[i], masks[i + 1]), (i + 1, masks[i], masks[i + 1])
        assert f["profiles/step_time"].shape[0] == 4


def test_cgroup_quotas_are_matched_at_start_and_recorded(tmp_path):
    # Prepare: the cgroup throttle needs root and a writable hierarchy
    if os.geteuid() != 0 or not Path("/sys/fs/cgroup").exists():
        pytest.skip("the cgroup throttle needs root and a cgroup hierarchy")
    caps = "workers.capacity=[1,0.5]"
    roots = [r for r in (Path("/sys/fs/cgroup/cpu"), Path("/sys/fs/cgroup")) if r.is_dir()]
    groups_before = {g for r in roots for g in r.glob("elfish-*")}
    # Execute: matched (the default) and not
    res = launch(3, *tiny(tmp_path / "matched", 1), "--set", "workers.throttle=cgroup", "--set", caps,
                 "--set", "workers.match_seconds=0.5")
    if "needs a writable cgroup" in res.stderr:  # (root, yet no writable hierarchy: a container)
        pytest.skip(res.stderr.strip().splitlines()[-1])
    off = launch(3, *tiny(tmp_path / "off", 1), "--set", "workers.throttle=cgroup", "--set", caps,
                 "--set", "workers.match_seconds=0")
    # Assert
    assert res.returncode == 0, res.stderr
    assert off.returncode == 0, off.stderr
    line = [x for x in res.stdout.splitlines() if x.startswith("elfish-mpi: cgroup quotas scaled")]
    assert len(line) == 1, res.stdout
    printed = [float(v) for v in line[0].split(": ")[-1].split()]
    with h5py.File(tmp_path / "matched" / "checkpoint.h5", "r") as f:
        corr = f["state/quota_correction"][()]
    assert corr.tolist() == pytest.approx(printed, abs=5e-4)
    assert corr[0] == 1.0 and 0.5 <= corr[1] <= 2.0  # the only full-speed worker is the reference
    assert "quotas scaled" not in off.stdout
    with h5py.File(tmp_path / "off" / "checkpoint.h5", "r") as f:
        assert "quota_correction" not in f["state"]
    # the ranks, leaving at once after the job (cli._leave), leave no group behind
    assert {g for r in roots for g in r.glob("elfish-*")} == groups_before


def test_a_finished_rank_leaves_with_its_exit_handlers_run_and_output_flushed(tmp_path):
    # Prepare: a process that registers an exit handler and prints without flushing
    marker = tmp_path / "handler-ran"
    code = (
        "import atexit, sys\n"
        "from elfish_mpi.cli import _leave\n"
        f"atexit.register(lambda: open({str(marker)!r}, 'w').write('yes'))\n"
        "print('summary line')\n"
        "sys.stderr.write('a warning')\n"
        "_leave(3)\n"
        "print('never')\n"
    )
    # Execute
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT)
    # Assert
    assert res.returncode == 3
    assert res.stdout == "summary line\n" and res.stderr == "a warning"
    assert marker.read_text() == "yes"


def test_bad_config_value_is_refused_without_traceback(tmp_path):
    res = launch(3, *tiny(tmp_path / "run"), "--set", "strategy.mask_policy=sideways")
    assert res.returncode != 0
    assert "strategy.mask_policy" in res.stderr and "random, rolling, ordered" in res.stderr
    assert "Traceback" not in res.stderr
    assert not (tmp_path / "run").exists()


def test_capacity_list_must_match_the_world(tmp_path):
    res = launch(3, *tiny(tmp_path / "run"), "--set", "workers.capacity=[1.0, 0.5, 0.25]")
    assert res.returncode != 0
    assert "workers.capacity has 3 value(s) but the job has 2 worker rank(s)" in res.stderr
    assert "Traceback" not in res.stderr


def test_missing_data_path_is_refused(tmp_path):
    res = launch(3, *tiny(tmp_path / "run"), "--set", f"data.path={tmp_path / 'nowhere'}")
    assert res.returncode != 0
    assert str(tmp_path / "nowhere") in res.stderr and "Traceback" not in res.stderr
    assert not (tmp_path / "run").exists()


def test_existing_run_is_not_overwritten(finished_run):
    before = snapshot(finished_run)
    res = launch(3, *tiny(finished_run))
    assert res.returncode != 0 and "already holds a checkpoint" in res.stderr
    assert snapshot(finished_run) == before


def test_corrupt_checkpoint_given_to_resume_is_refused(finished_run, tmp_path):
    # Prepare: a truncated copy of a good checkpoint.
    bad = tmp_path / "bad.h5"
    data = (finished_run / "checkpoint.h5").read_bytes()
    bad.write_bytes(data[: len(data) // 2])
    before = snapshot(finished_run)
    # Execute
    res = launch(3, *tiny(finished_run, 3), "--resume", str(bad))
    # Assert
    assert res.returncode != 0
    assert str(bad) in res.stderr and "Traceback" not in res.stderr
    assert snapshot(finished_run) == before


def test_resume_with_a_changed_model_is_refused(finished_run):
    before = snapshot(finished_run)
    res = launch(3, *tiny(finished_run, 3), "--resume", str(finished_run), "--set", "train.lr=0.5")
    assert res.returncode != 0
    assert "train.lr: 0.05 -> 0.5" in res.stderr
    assert snapshot(finished_run) == before


def test_a_strategy_that_does_not_plan_does_not_profile(tmp_path):
    # Prepare / Execute: fedavg, and elfish with fixed keep ratios, plan nothing
    runs = {
        "fedavg": launch(3, *tiny(tmp_path / "fedavg", 1), "--set", "strategy.name=fedavg"),
        "fixed": launch(3, *tiny(tmp_path / "fixed", 1), "--set", "strategy.keep_ratios=[1.0, 0.5]"),
        "elfish": launch(3, *tiny(tmp_path / "elfish", 1)),
    }
    # Assert
    for name, res in runs.items():
        assert res.returncode == 0, res.stderr
        with h5py.File(tmp_path / name / "checkpoint.h5", "r") as f:
            profiled = "step_time" in f.get("profiles", {})
        assert profiled == (name == "elfish"), name


def test_a_checkpoint_says_what_wrote_it(finished_run):
    # Prepare
    import socket

    import torch
    from mpi4py import MPI

    import elfish_mpi
    # Execute
    res = subprocess.run([sys.executable, "-m", "elfish_mpi", "inspect", str(finished_run / "checkpoint.h5")],
                         capture_output=True, text=True, timeout=TIMEOUT, cwd=ROOT)
    version = subprocess.run([sys.executable, "-m", "elfish_mpi", "--version"], capture_output=True, text=True,
                             timeout=TIMEOUT, cwd=ROOT)
    # Assert
    with h5py.File(finished_run / "checkpoint.h5", "r") as f:
        made = {k[len("provenance_"):]: f.attrs[k].decode() for k in f.attrs if k.startswith("provenance_")}
    assert made["program"] == elfish_mpi.__version__ and made["torch"] == torch.__version__
    assert made["mpi_library"] == " ".join(MPI.Get_library_version().splitlines()[0].split())
    assert made["world_size"] == "3" and made["hostnames"] == socket.gethostname()
    assert " train " in made["command_line"] and str(finished_run) in made["command_line"]
    assert res.returncode == 0 and f"written by: elfish-mpi {elfish_mpi.__version__}" in res.stdout, res.stdout
    assert f"MPI: {made['mpi_library']}; 3 ranks on {socket.gethostname()}" in res.stdout, res.stdout
    assert version.returncode == 0 and version.stdout.startswith(f"elfish-mpi {elfish_mpi.__version__}"), version


def test_evaluate_gives_the_runs_own_figures_and_per_class(finished_run):
    # Execute: the run's test set (its config: 200 images), then another size
    res = subprocess.run([sys.executable, "-m", "elfish_mpi", "evaluate", str(finished_run / "checkpoint.h5"), "--json"],
                         capture_output=True, text=True, timeout=TIMEOUT, cwd=ROOT)
    more = subprocess.run([sys.executable, "-m", "elfish_mpi", "evaluate", str(finished_run / "checkpoint.h5"),
                           "--samples", "300"], capture_output=True, text=True, timeout=TIMEOUT, cwd=ROOT)
    bad = subprocess.run([sys.executable, "-m", "elfish_mpi", "evaluate", str(finished_run / "checkpoint.h5"),
                          "--data", "cifar10"], capture_output=True, text=True, timeout=TIMEOUT, cwd=ROOT)
    # Assert: bit for bit the accuracy and loss the run recorded for its last round's model
    assert res.returncode == 0, res.stderr
    got = json.loads(res.stdout)
    with h5py.File(finished_run / "checkpoint.h5", "r") as f:
        assert (got["accuracy"], got["loss"]) == (f["metrics/test_accuracy"][-1], f["metrics/test_loss"][-1])
    assert got["test_images"] == 200 and sum(c["images"] for c in got["per_class"]) == 200
    hits = sum(c["images"] * c["accuracy"] for c in got["per_class"] if c["images"])
    assert round(hits) == round(got["accuracy"] * 200)
    assert more.returncode == 0 and "300 test images: accuracy" in more.stdout and more.stdout.count("  class ") == 10
    # a data set the model does not fit (or, where CIFAR-10 is not installed, one not found): one line, exit 2
    assert bad.returncode == 2 and bad.stderr.startswith("elfish-mpi: error: ") and "Traceback" not in bad.stderr, bad.stderr


@pytest.mark.parametrize("fmt", ["safetensors", "onnx", "pt"])
def test_export_round_trips_whole_and_slim(finished_run, tmp_path, fmt):
    import torch

    from elfish_mpi import export as exportmod
    from elfish_mpi.models import get_spec

    # Prepare: the checkpoint's own model, and a batch of test images
    whole, _ = exportmod.model_of(finished_run / "checkpoint.h5")
    x = torch.randn(16, 1, 28, 28)
    for keep in (1.0, 0.5):
        out = tmp_path / f"model-{keep}.{fmt}"
        # Execute
        res = subprocess.run([sys.executable, "-m", "elfish_mpi", "export", str(finished_run / "checkpoint.h5"),
                              "--format", fmt, "--out", str(out), "--keep", str(keep)],
                             capture_output=True, text=True, timeout=TIMEOUT, cwd=ROOT)
        assert res.returncode == 0, res.stderr
        # Assert: loaded back into the model class its metadata describes, it computes what the
        # checkpoint's model (or its sub-network) computes
        if fmt == "onnx":  # through onnxruntime: the graph computes what the checkpoint's model computes
            import onnx
            import onnxruntime

            graph = onnx.load(str(out))
            onnx.checker.check_model(graph)
            meta = {p.key: p.value for p in graph.metadata_props}
            ref, _ = exportmod.model_of(finished_run / "checkpoint.h5", keep)
            got = onnxruntime.InferenceSession(str(out)).run(["logits"], {"images": x.numpy()})[0]
            with torch.no_grad():
                np.testing.assert_allclose(got, ref(x).numpy(), rtol=1e-5, atol=1e-5)
            assert meta["model"] == "lenet" and json.loads(meta["widths"])["conv1"] == (20 if keep == 1.0 else 10)
            continue
        if fmt == "safetensors":
            from safetensors import safe_open
            from safetensors.torch import load_file

            state = load_file(str(out))
            with safe_open(str(out), "pt") as f:
                meta = f.metadata()
        else:
            saved = torch.load(out, weights_only=True)
            state, meta = saved["state_dict"], saved["metadata"]
        spec = get_spec(meta["model"], int(meta["num_classes"]), tuple(json.loads(meta["in_shape"])), meta["norm"])
        model = spec.module(json.loads(meta["widths"]))
        model.load_state_dict(state)
        model.eval()
        ref, _ = exportmod.model_of(finished_run / "checkpoint.h5", keep)
        with torch.no_grad():
            assert torch.equal(model(x), ref(x))
            if keep == 1.0:
                assert torch.equal(model(x), whole(x)) and meta["round"] == "2"
            else:
                assert json.loads(meta["widths"]) == {"conv1": 10, "conv2": 25, "fc1": 250}
    bad = subprocess.run([sys.executable, "-m", "elfish_mpi", "export", str(finished_run / "checkpoint.h5"),
                          "--format", "onnx2", "--out", str(tmp_path / "x")], capture_output=True, text=True,
                         timeout=TIMEOUT, cwd=ROOT)
    assert bad.returncode == 2 and "choose one of safetensors, onnx, pt" in bad.stderr and not (tmp_path / "x").exists()
    # never over a checkpoint (its own source included), nor into a directory that is not there
    source = tmp_path / "source.h5"
    source.write_bytes((finished_run / "checkpoint.h5").read_bytes())
    before = source.read_bytes()
    for target, says in ((source, "is an HDF5 file (a checkpoint?)"), (tmp_path / "no" / "m.pt", "no directory")):
        res = subprocess.run([sys.executable, "-m", "elfish_mpi", "export", str(source), "--format", fmt, "--out", str(target)],
                             capture_output=True, text=True, timeout=TIMEOUT, cwd=ROOT)
        assert res.returncode == 2 and says in res.stderr and "Traceback" not in res.stderr, res.stderr
    assert source.read_bytes() == before
