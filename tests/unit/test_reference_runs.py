"""Today's configurations give the results they gave before clients existed, bit for bit:
three runs (elfish with fixed keep ratios and random masks; fedrolex over the reduce
transport; heterofl on FEMNIST's natural partition) end with the checkpoints whose
fingerprints tests/data/reference/fingerprints.json holds, made by the code of commit
740a812. Floating-point results depend on the torch build, so the test runs only with the
torch version that made them."""
from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from proc_tools import clean_env, mpiexec

ROOT = Path(__file__).resolve().parents[2]
REFERENCE = json.loads((ROOT / "tests" / "data" / "reference" / "fingerprints.json").read_text())
FEMNIST = ROOT.parent / "shared" / "datasets" / "femnist.npz"
COMMON = ["data.path=tests/data/fashion-mnist", "data.test_samples=300", "workers.throttle=virtual",
          "train.local_steps=4", "run.rounds=3", "workers.capacity=[1.0,0.5,0.25]"]
RUNS = {
    "elfish-fixed": ["strategy.keep_ratios=[1.0,0.5,0.25]"],
    "fedrolex-reduce": ["strategy.name=fedrolex", "strategy.keep_ratios=[1.0,0.5,0.25]", "strategy.transport=reduce"],
    "femnist-natural": ["strategy.name=heterofl", "strategy.keep_ratios=[1.0,0.5,0.25]", "data.name=femnist",
                        f"data.path={FEMNIST}", "data.partition=natural", "data.max_samples=200"],
}


def fingerprint(path: Path) -> str:
    h = hashlib.sha256()
    with h5py.File(path, "r") as f:
        for k in f["model"]:
            h.update(k.encode())
            h.update(np.ascontiguousarray(f["model"][k][()]).tobytes())
        for k in sorted(f["masks"]):
            h.update(k.encode())
            h.update(np.ascontiguousarray(f["masks"][k][()]).tobytes())
        h.update(np.ascontiguousarray(f["state/cursor"][()]).tobytes())
        h.update(np.ascontiguousarray(f["metrics/test_accuracy"][()]).tobytes())
    return h.hexdigest()


@pytest.mark.skipif(torch.__version__ != REFERENCE["torch"],
                    reason=f"the fingerprints were made with torch {REFERENCE['torch']}, this is {torch.__version__}")
@pytest.mark.timeout(3 * 300 + 60)
@pytest.mark.parametrize("name", sorted(RUNS))
def test_a_config_of_before_clients_gives_its_result_of_then(tmp_path, name):
    if "femnist" in name and not FEMNIST.exists():
        pytest.skip(f"needs {FEMNIST}")
    cmd = [mpiexec(), "-n", "4", sys.executable, "-m", "elfish_mpi", "train", "--config", "launch/configs/quickstart.toml",
           "--out", str(tmp_path / name)]
    for s in COMMON + RUNS[name]:
        cmd += ["--set", s]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=clean_env(), cwd=ROOT)
    assert res.returncode == 0, res.stderr
    assert fingerprint(tmp_path / name / "checkpoint.h5") == REFERENCE["runs"][name]
