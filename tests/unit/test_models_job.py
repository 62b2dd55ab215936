"""Jobs of the models beyond LeNet, launched with mpiexec as a user launches them: ResNet-18
with static BatchNorm on CIFAR-10, vit-tiny on Fashion-MNIST (planned from quick profiles),
and the README's own-model example, copied out of the README and run as written there.
Each checkpoints, and resuming it gives bit for bit the model of an uninterrupted run."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

from elfish_mpi.checkpoint import kept_neurons
from proc_tools import clean_env, mpiexec

ROOT = Path(__file__).resolve().parents[2]
SAMPLE = ROOT / "tests" / "data" / "fashion-mnist"
CIFAR = ROOT.parent / "shared" / "datasets" / "cifar10_jpeg.npz"
TIMEOUT = 400


def launch(*args: str, pythonpath: str = "") -> subprocess.CompletedProcess:
    env = clean_env(**({"PYTHONPATH": pythonpath} if pythonpath else {}))
    cmd = [mpiexec(), "-n", "3", sys.executable, "-m", "elfish_mpi", "train", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT, env=env, cwd=ROOT)


def small(out: Path, rounds: int, *extra: str) -> list[str]:
    return ["--out", str(out), "--set", "data.test_samples=200", "--set", "data.max_samples=200",
            "--set", f"run.rounds={rounds}", "--set", "train.local_steps=2", "--set", "train.batch_size=16",
            "--set", "workers.throttle=none", "--set", "workers.capacity=[1,0.5]", "--set", "checkpoint.every=1", *extra]


def models_equal(a: Path, b: Path) -> list[str]:
    with h5py.File(a, "r") as fa, h5py.File(b, "r") as fb:
        assert sorted(fa["model"]) == sorted(fb["model"])
        return [k for k in fa["model"] if not np.array_equal(fa["model"][k][()], fb["model"][k][()])]


def run_and_resume(tmp_path: Path, *extra: str, pythonpath: str = "") -> Path:
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    res = launch(*small(whole, 2, *extra), pythonpath=pythonpath)
    assert res.returncode == 0, res.stderr
    res = launch(*small(resumed, 1, *extra), pythonpath=pythonpath)
    assert res.returncode == 0, res.stderr
    res = launch(*small(resumed, 2, *extra), "--resume", str(resumed), pythonpath=pythonpath)
    assert res.returncode == 0, res.stderr
    assert models_equal(whole / "checkpoint.h5", resumed / "checkpoint.h5") == []
    return whole


@pytest.mark.timeout(3 * TIMEOUT + 60)  # (three jobs, each with its own timeout)
@pytest.mark.skipif(not CIFAR.exists(), reason=f"needs the CIFAR-10 npz at {CIFAR}")
def test_resnet18_static_bn_on_cifar10_runs_and_resumes_exactly(tmp_path):
    out = run_and_resume(tmp_path, "--set", "model.name=resnet18", "--set", "data.name=cifar10",
                         "--set", f"data.path={CIFAR}", "--set", "strategy.keep_ratios=[1,0.5]")
    with h5py.File(out / "checkpoint.h5", "r") as f:
        assert f.attrs["groups"].decode().split(",")[:4] == [f"layer{s}.stream" for s in range(1, 5)]
        assert f["model/layer1.0.n1.weight"].shape == (64,) and "layer1.0.n1.running_mean" not in f["model"]
        kept = kept_neurons(f, 2, 1, "layer4.stream")
        assert kept.size == 256 and np.all(np.diff(kept) > 0)  # half of a 512-channel stream
        acc = f["metrics/test_accuracy"][()]
        assert np.all(np.isfinite(acc)) and np.all(f["workers/rejected"][()] == 0)


@pytest.mark.timeout(4 * TIMEOUT + 60)
def test_vit_tiny_on_fashion_mnist_plans_heads_and_resumes_exactly(tmp_path):
    out = run_and_resume(tmp_path, "--set", "model.name=vit-tiny", "--set", f"data.path={SAMPLE}",
                         "--set", "strategy.keep_ratios=[1,0.5]")
    with h5py.File(out / "checkpoint.h5", "r") as f:
        kept = kept_neurons(f, 1, 1, "blocks.0.heads")
        assert kept.size == 2  # whole heads: 2 of 4
        assert f["workers/keep_ratio_blocks.3.mlp"][0, 1] == 0.5
    # the planner path: quick profiles of the whole transformer, then per-group plans
    planned = tmp_path / "planned"
    res = launch(*small(planned, 2, "--set", "model.name=vit-tiny", "--set", f"data.path={SAMPLE}",
                       "--set", "strategy.profile=quick", "--set", "workers.throttle=virtual"))
    assert res.returncode == 0, res.stderr
    with h5py.File(planned / "checkpoint.h5", "r") as f:
        assert f["profiles/step_time"].shape == (2, 2) and np.all(f["profiles/macs"][0] > 0)
        assert f["profiles/macs"][0, 1] < f["profiles/macs"][0, 0]


def readme_example() -> tuple[str, list[str]]:
    """The own-model section's Python file and its launch command, as the README prints them."""
    text = (ROOT / "README.md").read_text()
    section = text[text.index("### Your own model"):]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    command = re.search(r"```bash\n(.*?)```", section, re.S).group(1).replace("\\\n", " ")
    return code, command.split()


@pytest.mark.timeout(3 * TIMEOUT + 60)
def test_the_readme_own_model_example_runs_as_written_and_resumes_exactly(tmp_path):
    # Prepare: my_model.py as the README prints it, and its command line
    code, command = readme_example()
    assert code.startswith("# my_model.py")
    (tmp_path / "my_model.py").write_text(code)
    assert command[:5] == ["PYTHONPATH=.", "mpiexec", "-n", "5", "elfish-mpi"]
    args = command[6:]
    model = args[args.index("--set") + 1]
    assert model == "model.name=my_model:factory"
    config = args[args.index("--config") + 1]

    # Execute: the README's config and model (3 ranks and the test sample here, to be quick)
    out = run_and_resume(tmp_path, "--config", str(ROOT / config), "--set", model, "--set", f"data.path={SAMPLE}",
                         "--set", "strategy.keep_ratios=[1,0.25]", "--set", "strategy.min_keep=0.25",
                         pythonpath=str(tmp_path))

    # Assert: the BatchNorm running statistics are part of the model and were soft-trained
    with h5py.File(out / "checkpoint.h5", "r") as f:
        assert f.attrs["model"].decode() == "my_model:factory" and f.attrs["groups"].decode() == "channels"
        assert f["model/bn1.running_var"].shape == (32,)
        kept = kept_neurons(f, 2, 1, "channels")
        assert kept.size == 8
        with h5py.File(out / "checkpoints" / "round-000001.h5", "r") as g:
            before, after = g["model/bn1.running_mean"][()], f["model/bn1.running_mean"][()]
        assert not np.array_equal(before, after)


def test_a_model_whose_groups_do_not_fit_is_refused_in_one_line(tmp_path):
    (tmp_path / "broken.py").write_text(
        "from torch import nn\nfrom elfish_mpi.models import group\n"
        "def factory(num_classes, in_shape):\n"
        "    net = nn.Sequential(nn.Conv2d(1, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 26 * 26, num_classes))\n"
        "    return net, [group('c', 8, [('0.weight', 0), ('0.bias', 0)])]\n"
    )
    res = launch(*small(tmp_path / "run", 1, "--set", "model.name=broken:factory", "--set", f"data.path={SAMPLE}"),
                 pythonpath=str(tmp_path))
    assert res.returncode == 2, res.stderr
    assert "model.name = 'broken:factory'" in res.stderr and "sub-networks do not run" in res.stderr
    assert "Traceback" not in res.stderr and not (tmp_path / "run").exists()
