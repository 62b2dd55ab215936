"""Jobs with more clients than worker ranks, launched with mpiexec as a user launches them:
a client's training does not depend on the rank it lands on nor on the clients trained
before it there; a sampled run resumes bit for bit; bad client settings end in one line
with exit 2."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

from proc_tools import clean_env, mpiexec

ROOT = Path(__file__).resolve().parents[2]
SAMPLE = ROOT / "tests" / "data" / "fashion-mnist"
FEMNIST = ROOT / "tests" / "data" / "femnist_sample.npz"
TIMEOUT = 300


def launch(n: int, out: Path, *sets: str) -> subprocess.CompletedProcess:
    cmd = [mpiexec(), "-n", str(n), sys.executable, "-m", "elfish_mpi", "train", "--out", str(out),
           "--set", f"data.path={SAMPLE}", "--set", "data.test_samples=200", "--set", "train.local_steps=3",
           "--set", "train.batch_size=16", "--set", "workers.throttle=virtual", "--set", "checkpoint.every=1"]
    for s in sets:
        cmd += ["--set", s]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT, env=clean_env(), cwd=ROOT)


def read(path: Path) -> dict:
    with h5py.File(path, "r") as f:
        return {
            "model": {k: f["model"][k][()] for k in f["model"]},
            "client": f["workers/client"][()], "rank": f["workers/rank"][()],
            "steps": f["workers/steps"][()], "cursor": f["state/cursor"][()],
            "masks": {k: f["masks"][k][()] for k in f["masks"]},
        }


def same_model(a: dict, b: dict) -> bool:
    return sorted(a["model"]) == sorted(b["model"]) and all(np.array_equal(a["model"][k], b["model"][k]) for k in a["model"])


@pytest.mark.timeout(3 * TIMEOUT + 60)
def test_a_client_trains_the_same_wherever_it_is_placed(tmp_path):
    # Prepare: 3 clients, all in every round, fedavg: pinned one a rank (4 ranks), all three on
    # one worker rank one after another (2 ranks), and 9 clients 3 a round on 2 or 3 workers
    pinned = launch(4, tmp_path / "pinned", "strategy.name=fedavg", "run.rounds=2", "workers.capacity=[]")
    alone = launch(2, tmp_path / "alone", "strategy.name=fedavg", "run.rounds=2", "workers.capacity=[]", "clients.count=3")
    # Assert: the same model: each client on the single rank trained from the round's global
    # model, not from the client trained before it
    assert pinned.returncode == 0, pinned.stderr
    assert alone.returncode == 0, alone.stderr
    a, b = read(tmp_path / "pinned" / "checkpoint.h5"), read(tmp_path / "alone" / "checkpoint.h5")
    assert np.array_equal(b["rank"], np.ones((2, 3))) and np.array_equal(a["rank"], [[1, 2, 3]] * 2)
    assert same_model(a, b)
    assert "3 clients (3 a round) on 1 workers" in alone.stdout


@pytest.mark.timeout(3 * TIMEOUT + 60)
def test_sampled_clients_are_placed_anywhere_with_the_same_result_and_resume_exactly(tmp_path):
    # Prepare: 9 clients of lognormal speeds, 4 a round, elfish with a random mask per client
    # and round at fixed keep ratios (no timing in the plan)
    sets = ["clients.count=9", "clients.per_round=4", "clients.speed=lognormal", "workers.capacity=[]",
            "strategy.keep_ratios=[1,1,0.5,0.5,0.5,0.25,0.25,1,0.75]", "strategy.min_keep=0.25"]
    # Execute: 3 rounds on 2 worker ranks; on 3 worker ranks; 2 rounds then resumed to 3 on 3
    two = launch(3, tmp_path / "two", *sets, "run.rounds=3")
    three = launch(4, tmp_path / "three", *sets, "run.rounds=3")
    first = launch(4, tmp_path / "resumed", *sets, "run.rounds=2")
    assert two.returncode == 0, two.stderr
    assert three.returncode == 0, three.stderr
    assert first.returncode == 0, first.stderr
    resumed = subprocess.run(
        [mpiexec(), "-n", "4", sys.executable, "-m", "elfish_mpi", "train", "--resume", str(tmp_path / "resumed"),
         "--set", "run.rounds=3"], capture_output=True, text=True, timeout=TIMEOUT, env=clean_env(), cwd=ROOT)
    assert resumed.returncode == 0, resumed.stderr
    a, b, c = (read(tmp_path / d / "checkpoint.h5") for d in ("two", "three", "resumed"))
    # Assert: 4 clients a round, the same ones in every run, different from round to round;
    # the placements differ, the models, masks and data positions do not
    assert a["client"].shape == (3, 4)
    assert np.array_equal(a["client"], b["client"]) and np.array_equal(a["client"], c["client"])
    assert len({tuple(row) for row in a["client"]}) == 3
    assert a["rank"].max() == 2 and b["rank"].max() == 3
    for other in (b, c):
        assert same_model(a, other)
        assert all(np.array_equal(a["masks"][k], other["masks"][k]) for k in a["masks"])
        assert np.array_equal(a["cursor"], other["cursor"])
    # a client's data position moved only in the rounds it took part in (3 steps of 16)
    taken = np.bincount(a["client"].astype(int).ravel(), minlength=9)
    assert np.array_equal(a["cursor"], taken * 48) and taken.min() == 0 < taken.max()


@pytest.mark.timeout(4 * TIMEOUT)
@pytest.mark.parametrize("sets, message", [
    (["clients.count=6", "clients.per_round=7"], "clients.per_round = 7 is more than clients.count = 6"),
    (["clients.per_round=3"], "clients.per_round = 3 is more than the 2 client(s) of this job"),
    (["data.name=femnist", f"data.path={FEMNIST}", "data.partition=natural", "clients.count=13"],
     "natural partition: only 12 writers for 13 clients"),
    (["clients.count=6", "clients.speed=BAD_TABLE"], "line 3: speed 'x' is not a number"),
])
def test_bad_client_settings_end_the_job_in_one_line(tmp_path, sets, message):
    table = tmp_path / "devices.csv"
    table.write_text("device,speed\nphone,2.5\ntablet,x\n")
    res = launch(3, tmp_path / "out", "workers.capacity=[]", *[s.replace("BAD_TABLE", str(table)) for s in sets])
    assert res.returncode == 2, res.stdout + res.stderr
    errors = [line for line in res.stderr.splitlines() if line.strip()]
    assert len(errors) == 1 and message in errors[0], res.stderr
    assert "Traceback" not in res.stderr
    assert not (tmp_path / "out" / "checkpoint.h5").exists()


@pytest.mark.timeout(3 * TIMEOUT + 60)
def test_ranks_without_a_client_in_a_round_take_part_in_the_reduce(tmp_path):
    # Prepare: fedavg over the reduce transport, 2 clients a round: pinned to 3 ranks (one idle
    # each round), and 6 clients on 3 ranks (one idle each round) against all 6 on one rank
    common = ["strategy.name=fedavg", "strategy.transport=reduce", "run.rounds=3", "workers.capacity=[]"]
    pinned = launch(4, tmp_path / "pinned", *common, "clients.per_round=2")
    spread = launch(4, tmp_path / "spread", *common, "clients.count=6", "clients.per_round=2")
    alone = launch(2, tmp_path / "alone", *common, "clients.count=6", "clients.per_round=2")
    # Assert: every job completes; the same clients train on 3 ranks as on 1, to the same model
    # (up to the order of the floating-point sums, which the reduction over ranks sets)
    for res in (pinned, spread, alone):
        assert res.returncode == 0, res.stderr
    p, s, a = (read(tmp_path / d / "checkpoint.h5") for d in ("pinned", "spread", "alone"))
    assert p["client"].shape == (3, 2) and np.array_equal(p["rank"], p["client"] + 1)
    assert np.array_equal(s["client"], a["client"]) and set(np.unique(s["rank"])) <= {1, 2, 3} and np.all(a["rank"] == 1)
    for k in s["model"]:
        np.testing.assert_allclose(s["model"][k], a["model"][k], rtol=1e-5, atol=1e-7)
    with h5py.File(tmp_path / "spread" / "checkpoint.h5", "r") as f:
        assert np.all(f["metrics/updates_accepted"][()] == 2)


@pytest.mark.timeout(3 * TIMEOUT + 60)
def test_a_checkpoint_from_before_clients_resumes_and_reads(tmp_path):
    # Prepare: a 2-round run whose checkpoint loses what clients added (/workers/client, rank,
    # /state/client_speed), as a checkpoint written before clients existed lacks them
    first = launch(3, tmp_path / "run", "strategy.name=fedavg", "run.rounds=2", "workers.capacity=[]")
    assert first.returncode == 0, first.stderr
    with h5py.File(tmp_path / "run" / "checkpoint.h5", "r+") as f:
        for name in ("workers/client", "workers/rank", "state/client_speed"):
            del f[name]
    # Execute: resume it to round 3; read it back
    res = subprocess.run(
        [mpiexec(), "-n", "3", sys.executable, "-m", "elfish_mpi", "train", "--resume", str(tmp_path / "run"),
         "--set", "run.rounds=3"], capture_output=True, text=True, timeout=TIMEOUT, env=clean_env(), cwd=ROOT)
    assert res.returncode == 0, res.stderr
    from elfish_mpi import analysis

    run = analysis.open_run(tmp_path / "run")
    shown = subprocess.run([sys.executable, "-m", "elfish_mpi", "inspect", str(tmp_path / "run" / "checkpoint.h5"),
                            "--masks", "1"], capture_output=True, text=True, timeout=60, env=clean_env(), cwd=ROOT)
    # Assert: the earlier rounds count as one client a worker rank, in the records and for inspect
    c = read(tmp_path / "run" / "checkpoint.h5")
    assert np.array_equal(c["client"], [[0, 1]] * 3) and np.array_equal(c["rank"], [[1, 2]] * 3)
    assert run.workers["client"].tolist() == [0, 1] * 3 and run.workers["rank"].tolist() == [1, 2] * 3
    assert shown.returncode == 0 and "round 1 worker 1 (rank 2) conv1" in shown.stdout, shown.stderr
