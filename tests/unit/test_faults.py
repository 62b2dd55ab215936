"""Faults during a real `mpiexec -n 3 elfish-mpi train` job: a worker killed, a worker
stalled, a non-finite update, and a SIGTERM to every rank (as SLURM preempts a job).
Rank pids are found below mpiexec in /proc (proc_tools.rank_pids).

Each job is tiny (fashion-mnist sample, 2 local steps, throttle none) and every wait has a
deadline; a job still alive at the end of a test is killed by its pids.
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

from elfish_mpi import checkpoint as ckptmod
from elfish_mpi.signals import EXIT_PREEMPTED
from proc_tools import all_gone, alive, clean_env, descendants, mpiexec, rank_pids

ROOT = Path(__file__).resolve().parents[2]
SAMPLE = ROOT / "tests" / "data" / "fashion-mnist"
JOB_TIMEOUT = 240  # seconds any one job may take, start-up included
MASKABLE = ["conv1", "conv2", "fc1"]  # LeNet's layers of neurons that masks thin

pytestmark = pytest.mark.timeout(600)


# --------------------------------------------------------------------------- launching and watching jobs


def job_args(out: Path, rounds: int, *extra: str) -> list[str]:
    return [
        "--out", str(out), "--set", f"data.path={SAMPLE}", "--set", "data.test_samples=200",
        "--set", "data.max_samples=300", "--set", f"run.rounds={rounds}", "--set", "train.local_steps=2",
        "--set", "workers.throttle=none", "--set", "checkpoint.every=1", *extra,
    ]


def train_cmd(n: int, *args: str, shim: str | None = None, launcher: list[str] | None = None) -> list[str]:
    """``launcher``: the MPI launcher and the Python to run (default: this Python's mpiexec)."""
    entry = ["-c", shim] if shim else ["-m", "elfish_mpi"]
    launcher = launcher or [mpiexec(), "-n", str(n), sys.executable]
    return [*launcher, *entry, "train", *args]


# Debian's Open MPI and a Python whose mpi4py is built against it (launch/setup-openmpi.sh).
OPENMPI_PYTHON = Path(os.environ.get("ELFISH_OPENMPI_PYTHON", ROOT / ".venv-openmpi" / "bin" / "python"))
OPENMPI_MPIEXEC = shutil.which("mpiexec.openmpi")


# Runs `elfish-mpi train` with worker rank RANK failing so that it never delivers its update of
# round ROUND: "training" stops it (SIGSTOP) in round ROUND after it received the model;
# "between-rounds" stops it right after it sent its update of round ROUND - 1, before round
# ROUND's plan arrives; "evaluating" stops it before it sends its share of the evaluation of
# round ROUND - 1's model (which came with round ROUND's plan); "die-sending" posts its update of round ROUND and dies (SIGKILL)
# before the transfer completes. The signal lands at the same point every time, which a signal
# sent from outside at a chosen moment cannot promise.
STALL_SHIM = """
import os, signal, sys
from elfish_mpi import supervisor
if supervisor.wanted():  # this process supervises; the rank (its child) runs this again
    sys.exit(supervisor.run())
import numpy as np
from elfish_mpi import comm as _comm, worker as _worker
from elfish_mpi.cli import main
RANK, ROUND, WHERE = {rank}, {round}, {where!r}
_train, _post, _bcast = _worker.Worker.train_client, _comm.Comm.post_update, _comm.Comm.bcast_obj
_send_eval = _comm.Comm.send_eval
_sent = [0]

def train_client(self, rnd, kept, *args, **kwargs):
    if WHERE == "training" and self.comm.rank == RANK and rnd == ROUND:
        os.kill(os.getpid(), signal.SIGSTOP)
    return _train(self, rnd, kept, *args, **kwargs)

def post_update(self, stats, values):
    if WHERE == "die-sending" and self.rank == RANK and _sent[0] == ROUND - 1:
        self.comm.Isend(np.ascontiguousarray(stats, dtype=np.float64), dest=0, tag=_comm.TAG_STATS)
        self.comm.Isend(np.ascontiguousarray(values, dtype=np.float32), dest=0, tag=_comm.TAG_VALUES)
        os.kill(os.getpid(), signal.SIGKILL)  # gone while rank 0 receives the update
    _sent[0] += 1
    return _post(self, stats, values)

def bcast_obj(self, *args, **kwargs):
    if WHERE == "between-rounds" and self.rank == RANK and _sent[0] == ROUND - 1:
        os.kill(os.getpid(), signal.SIGSTOP)
    return _bcast(self, *args, **kwargs)

def send_eval(self, buf):
    if WHERE == "evaluating" and self.rank == RANK and _sent[0] == ROUND - 1:
        os.kill(os.getpid(), signal.SIGSTOP)
    _send_eval(self, buf)

_worker.Worker.train_client = train_client
_comm.Comm.post_update = post_update
_comm.Comm.send_eval = send_eval
_comm.Comm.bcast_obj = bcast_obj
sys.exit(main(sys.argv[1:]))
"""


def run_job(n: int, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(train_cmd(n, *args), capture_output=True, text=True, timeout=JOB_TIMEOUT,
                          env=env or clean_env(), cwd=ROOT)


class Job:
    """A training job started in the background, output going to files."""

    def __init__(self, tmp: Path, n: int, args: list[str], env: dict | None = None, shim: str | None = None,
                 launcher: list[str] | None = None):
        self.n = n
        self.out_path, self.err_path = tmp / "job.stdout", tmp / "job.stderr"
        with open(self.out_path, "w") as so, open(self.err_path, "w") as se:
            self.proc = subprocess.Popen(train_cmd(n, *args, shim=shim, launcher=launcher), stdout=so, stderr=se,
                                         env=env or clean_env(), cwd=ROOT, start_new_session=True)
        self.pids: dict[int, int] = {}
        self.t_start = time.monotonic()

    @property
    def stdout(self) -> str:
        return self.out_path.read_text()

    @property
    def stderr(self) -> str:
        return self.err_path.read_text()

    def wait_for(self, what: str, predicate, timeout: float = JOB_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            if self.proc.poll() is not None:
                pytest.fail(f"job ended (rc {self.proc.returncode}) before {what}:\n{self.stdout}\n{self.stderr}")
            if time.monotonic() > deadline:
                pytest.fail(f"no {what} within {timeout} s:\n{self.stdout}\n{self.stderr}")
            time.sleep(0.02)

    def ranks(self) -> dict[int, int]:
        def found():
            self.pids = rank_pids(self.proc.pid)
            return len(self.pids) == self.n
        self.wait_for(f"{self.n} rank processes", found, timeout=60)
        return dict(self.pids)

    def wait(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail(f"job still running {timeout} s later:\n{self.stdout}\n{self.stderr}")

    def kill(self) -> None:
        """Leave nothing behind: continue and kill the ranks we know, then mpiexec's group."""
        for pid in list(self.pids.values()) + descendants(self.proc.pid):
            for sig in (signal.SIGCONT, signal.SIGKILL):
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass


@pytest.fixture
def jobs():
    started: list[Job] = []
    yield started
    for job in started:
        job.kill()


def history_round(out: Path) -> int:
    rounds = [int(m.group(1)) for p in (out / "checkpoints").glob("round-*.h5")
              if (m := re.fullmatch(r"round-(\d+)\.h5", p.name))]
    return max(rounds, default=0)


def latest_valid(out: Path) -> ckptmod.Checkpoint:
    path, _notes = ckptmod.find_latest_valid(out)
    assert path.name in ("checkpoint.h5",) or path.parent.name == "checkpoints"
    return ckptmod.validate(path)


def model_of(path: Path) -> dict[str, np.ndarray]:
    with h5py.File(path, "r") as f:
        return {k: f["model"][k][()] for k in f["model"]}


# --------------------------------------------------------------------------- tests


def check_killed_job(job: Job, t_kill: float, out: Path) -> str:
    """The whole job ended soon after the kill, with an error status and intact checkpoints
    (round 2's, or round 1's if rank 0 was killed while writing round 2's). Returns the output."""
    rc = job.wait(timeout=60)
    elapsed = time.monotonic() - t_kill
    assert rc != 0
    assert elapsed < 30, f"job took {elapsed:.1f} s to end after the kill"
    assert all_gone(job.pids.values()), "a rank outlived the job"
    latest = ckptmod.validate(out / "checkpoint.h5").round
    assert latest in (1, 2)
    assert latest_valid(out).round in (latest, 2)
    return job.stdout + job.stderr


def open_mpi_launcher() -> tuple[list[str], dict]:
    if not (OPENMPI_PYTHON.exists() and OPENMPI_MPIEXEC):
        pytest.skip("needs mpiexec.openmpi and ELFISH_OPENMPI_PYTHON (launch/setup-openmpi.sh makes .venv-openmpi)")
    return ([OPENMPI_MPIEXEC, "--oversubscribe", "-n", "3", str(OPENMPI_PYTHON)],
            clean_env(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1"))


# The launcher's own report of the kill: MPICH's hydra names a pid (rank 2's, or one it killed
# in its clean-up), Open MPI the rank.
LAUNCHER_SAYS = {"mpich": "YOUR APPLICATION TERMINATED WITH THE EXIT STRING: Killed (signal 9)",
                 "open_mpi": "noticed that process rank 2 with PID"}


@pytest.mark.parametrize("mpi", ["mpich", "open_mpi"])
def test_killed_worker_ends_the_job_and_keeps_the_checkpoint(tmp_path, jobs, mpi):
    # Prepare: worker rank 2 holds still between rounds 2 and 3 (its update of round 2 sent),
    # so that the kill lands when no transfer with it is under way
    launcher, env = open_mpi_launcher() if mpi == "open_mpi" else (None, None)
    out = tmp_path / "run"
    job = Job(tmp_path, 3, job_args(out, 200), env=env, launcher=launcher,
              shim=STALL_SHIM.format(rank=2, round=3, where="between-rounds"))
    jobs.append(job)
    pids = job.ranks()
    job.wait_for("worker rank 2 to hold", lambda: stopped(pids[2]))

    # Execute: SIGKILL worker rank 2 (found by its rank variable below mpiexec)
    os.kill(pids[2], signal.SIGKILL)
    text = check_killed_job(job, time.monotonic(), out)

    # Assert: worker rank 2's supervisor named it, its pid, the signal and where it was; no
    # other rank is said to have died (the launcher's clean-up takes the others' supervisors
    # along); the launcher reported the kill its own way
    assert (f"elfish-mpi: error: worker rank 2 (pid {pids[2]} on {os.uname().nodename}) was killed by signal 9 "
            "(SIGKILL): by a person, the batch system or the out-of-memory killer after its update of round 2, "
            "before round 3's plan arrived\n") in text, text
    assert text.count("was killed by signal") == 1, text
    assert "Traceback" not in text, text
    assert LAUNCHER_SAYS[mpi] in text, text


def test_worker_killed_while_sending_its_update_is_named(tmp_path, jobs):
    # Prepare / Execute: worker rank 2 posts its round-3 update, then dies (SIGKILL) at once
    out = tmp_path / "run"
    job = Job(tmp_path, 3, job_args(out, 200), shim=STALL_SHIM.format(rank=2, round=3, where="die-sending"))
    jobs.append(job)
    victim = job.ranks()[2]
    job.wait_for("worker rank 2 to die", lambda: not alive(victim))
    text = check_killed_job(job, time.monotonic(), out)

    # Assert: the output names worker rank 2 and round 3, once
    assert f"elfish-mpi: error: worker rank 2 (pid {victim} on " in text, text
    assert "was killed by signal 9 (SIGKILL): by a person, the batch system or the out-of-memory killer in round 3\n" in text, text
    assert text.count("was killed by signal") == 1, text


def test_killed_aggregator_is_named_with_its_round(tmp_path, jobs):
    # Prepare: a long run, past its first checkpoint
    out = tmp_path / "run"
    job = Job(tmp_path, 3, job_args(out, 200))
    jobs.append(job)
    job.wait_for("round 2's checkpoint", lambda: history_round(out) >= 2)
    pids = job.ranks()

    # Execute: SIGKILL rank 0
    os.kill(pids[0], signal.SIGKILL)
    rc = job.wait(timeout=60)

    # Assert: the job ended, the aggregator named, a valid checkpoint left
    text = job.stdout + job.stderr
    assert rc != 0
    assert all_gone(job.pids.values()), "a rank outlived the job"
    m = re.search(rf"elfish-mpi: error: the aggregator, rank 0 \(pid {pids[0]} on \S+\) was killed by signal 9 "
                  r"\(SIGKILL\): .* in round (\d+)\n", text)
    assert m and int(m.group(1)) >= 3, text
    assert text.count("was killed by signal") == 1, text
    assert "Traceback" not in text, text
    assert latest_valid(out).round >= 2


def stopped(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] in ("T", "t")
    except OSError:
        return False


def run_stalled(tmp_path: Path, jobs: list, where: str, timeout: int = 3, rnd: int = 3,
                extra: tuple[str, ...] = ()) -> tuple[Job, float]:
    """A job whose worker rank 2 stops itself in round ``rnd`` at ``where``; returns it once
    ended (or once it outlived timeout + 12 s) and how long that took after the stop."""
    out = tmp_path / "run"
    job = Job(tmp_path, 3, job_args(out, 200, "--set", f"run.round_timeout={timeout}", *extra),
              shim=STALL_SHIM.format(rank=2, round=rnd, where=where))
    jobs.append(job)
    victim = job.ranks()[2]
    job.wait_for("worker rank 2 to stop", lambda: stopped(victim), timeout=JOB_TIMEOUT)
    t_stop = time.monotonic()
    try:
        job.proc.wait(timeout=timeout + 12)
    except subprocess.TimeoutExpired:
        pass
    return job, time.monotonic() - t_stop


def check_stall_reported(job: Job, elapsed: float, timeout: int = 3,
                         expect: str = "round 3: no update from worker rank(s) 2 within run.round_timeout = 3 s") -> None:
    assert job.proc.poll() is not None, (
        f"job still running {elapsed:.0f} s after worker rank 2 stopped (round_timeout {timeout} s):\n"
        + job.stdout[-400:] + job.stderr[-2000:])
    assert job.proc.returncode != 0
    assert elapsed < timeout + 12, f"job took {elapsed:.1f} s to end (round_timeout {timeout} s)"
    assert expect in job.stderr, job.stderr
    assert all_gone(job.pids.values()), "a rank outlived the job"
    out = Path(job.stdout.split(" out ", 1)[1].split("\n", 1)[0])
    # Rounds 1 and 2 were checkpointed (checkpoint.every = 1), intact; round 3 was not.
    assert ckptmod.validate(out / "checkpoint.h5").round == 2
    assert latest_valid(out).round == 2


def test_worker_stalled_while_training_times_out_naming_rank_and_round(tmp_path, jobs):
    # Execute: worker rank 2 stops (SIGSTOP) after receiving round 3's model
    job, elapsed = run_stalled(tmp_path, jobs, "training")

    # Assert: rank 0 gave up after run.round_timeout, named rank and round, and ended the job
    check_stall_reported(job, elapsed)


def test_worker_stalled_between_rounds_times_out_naming_rank_and_round(tmp_path, jobs):
    # Execute: worker rank 2 stops (SIGSTOP) right after sending its round-2 update, before
    # round 3's plan and model arrive (as when it stalls while rank 0 writes a checkpoint)
    job, elapsed = run_stalled(tmp_path, jobs, "between-rounds")

    # Assert: as when stalled while training, but the broadcast is what times out: a collective
    # cannot tell which rank is missing
    check_stall_reported(job, elapsed, expect="round 3: the broadcast of the model (a worker rank stopped answering) "
                                              "did not complete within run.round_timeout = 3 s")


def worker_stopped_in_round_3(tmp_path: Path, jobs: list, out: Path, stop_grace: float) -> tuple[Job, dict[int, int]]:
    """A job (round_timeout far away) whose worker rank 2 has stopped itself (SIGSTOP) in round 3."""
    job = Job(tmp_path, 3, job_args(out, 200, "--set", "run.round_timeout=300", "--set", f"run.stop_grace={stop_grace}"),
              shim=STALL_SHIM.format(rank=2, round=3, where="training"))
    jobs.append(job)
    pids = job.ranks()
    job.wait_for("worker rank 2 to stop", lambda: stopped(pids[2]))
    return job, pids


def test_stop_signal_while_a_worker_is_stuck_ends_after_stop_grace(tmp_path, jobs):
    # Prepare: worker rank 2 stops (SIGSTOP) in round 3; round_timeout far away
    out = tmp_path / "run"
    job, pids = worker_stopped_in_round_3(tmp_path, jobs, out, stop_grace=2)

    # Execute: SIGTERM to rank 0, as a batch system that preempts or cancels the job
    os.kill(pids[0], signal.SIGTERM)
    t_term = time.monotonic()
    rc = job.wait(timeout=60)
    elapsed = time.monotonic() - t_term

    # Assert: rank 0 gave the round run.stop_grace, then stopped without it, said so, and
    # left with the preemption code; round 2's checkpoint is intact
    assert elapsed < 2 + 12, f"job took {elapsed:.1f} s to end after SIGTERM (stop_grace 2 s)"
    assert rc == EXIT_PREEMPTED, job.stdout + job.stderr
    assert ("elfish-mpi: rank 0: StopTimeout: round 3: SIGTERM received, and no update came from worker rank(s) 2 "
            f"within run.stop_grace = 2 s; stopped without that round: continue from the last checkpoint with --resume {out}") in job.stderr, job.stderr
    assert "was killed by signal" not in job.stderr  # rank 0 said why; its supervisor stays quiet
    assert all_gone(job.pids.values()), "a rank outlived the job"
    assert latest_valid(out).round == 2


def test_sigusr1_waits_for_a_slow_round_past_stop_grace(tmp_path, jobs):
    # Prepare: worker rank 2 stops (SIGSTOP) in round 3, as a slow worker
    out = tmp_path / "run"
    job, pids = worker_stopped_in_round_3(tmp_path, jobs, out, stop_grace=1)

    # Execute: SIGUSR1 (the time-limit warning) to every rank; the slow worker goes on 4 s later
    for pid in pids.values():
        os.kill(pid, signal.SIGUSR1)
    time.sleep(4)
    assert job.proc.poll() is None, job.stderr  # still waiting for round 3, past stop_grace
    os.kill(pids[2], signal.SIGCONT)
    rc = job.wait(timeout=60)

    # Assert: round 3 was finished and checkpointed, then the job stopped
    assert rc == EXIT_PREEMPTED, job.stdout + job.stderr
    assert "SIGUSR1 received: stopped after round 3 with a checkpoint" in job.stdout, job.stdout + job.stderr
    assert ckptmod.validate(out / "checkpoint.h5").round == 3
    assert "StopTimeout" not in job.stderr


def test_non_finite_update_is_rejected_and_not_counted(tmp_path):
    # Prepare: worker rank 2 (index 1) sends NaNs in round 2
    out = tmp_path / "run"

    # Execute
    res = run_job(3, *job_args(out, 3), env=clean_env(ELFISH_FAULT_NAN="2:2"))

    # Assert
    assert res.returncode == 0, res.stderr
    assert "round 2: rejected the non-finite update of worker rank 2" in res.stdout
    assert res.stdout.count("rejected the non-finite update") == 1
    ck = ckptmod.validate(out / "checkpoint.h5")
    assert ck.round == 3
    assert sorted(ck.coverage) == MASKABLE and sorted(ck.masks) == [1, 2, 3]  # the loops below check something
    np.testing.assert_array_equal(ck.workers["rejected"], [[0, 0], [0, 1], [0, 0]])
    np.testing.assert_array_equal(ck.metrics["updates_accepted"], [2, 1, 2])
    for key, arr in ck.model.items():
        assert np.all(np.isfinite(arr)), key
    # Coverage counts every accepted (round, worker) mask, and not worker 1's in round 2.
    for layer, cov in ck.coverage.items():
        expect = np.zeros_like(cov)
        for rnd, per_worker in ck.masks.items():
            for w, kept in enumerate(per_worker):
                if (rnd, w) != (2, 1):
                    expect[kept[layer]] += 1
        np.testing.assert_array_equal(cov, expect, err_msg=layer)
        assert ck.masks[2][1][layer].size > 0  # so counting it would have shown
    r1 = ckptmod.read(out / "checkpoints" / "round-000001.h5")
    r2 = ckptmod.read(out / "checkpoints" / "round-000002.h5")
    assert sorted(r2.coverage) == MASKABLE
    for layer in r2.coverage:
        grown = r2.coverage[layer] - r1.coverage[layer]
        only_w0 = np.zeros_like(grown)
        only_w0[r2.masks[2][0][layer]] = 1
        np.testing.assert_array_equal(grown, only_w0, err_msg=layer)


def test_sigterm_to_every_rank_stops_with_checkpoint_and_resume_is_bitwise_identical(tmp_path, jobs):
    # Prepare: fixed keep ratios so that the run does not depend on timings
    rounds = 10
    fixed = ("--set", "strategy.keep_ratios=[1.0, 0.5]", "--set", "checkpoint.keep=0")
    out = tmp_path / "run"
    job = Job(tmp_path, 3, job_args(out, rounds, *fixed))
    jobs.append(job)
    job.wait_for("round 1's checkpoint", lambda: (out / "checkpoint.h5").exists())
    pids = job.ranks()

    # Execute: SIGTERM to every rank, as SLURM does on preemption
    for pid in pids.values():
        os.kill(pid, signal.SIGTERM)
    rc = job.wait(timeout=120)

    # Assert: stopped early with exit code 75 (hydra passes it through) and a checkpoint
    assert rc == EXIT_PREEMPTED, job.stdout + job.stderr
    m = re.search(r"SIGTERM received: stopped after round (\d+) with a checkpoint; continue with --resume (\S+)",
                  job.stdout)
    assert m, job.stdout + job.stderr
    stopped = int(m.group(1))
    assert m.group(2) == str(out)
    assert 1 <= stopped < rounds
    assert ckptmod.validate(out / "checkpoint.h5").round == stopped
    assert "Traceback" not in job.stderr
    assert "was killed by signal" not in job.stderr  # the supervisors left quietly

    # Execute: resume, and an uninterrupted run for comparison
    resumed = run_job(3, "--resume", str(out))
    reference = run_job(3, *job_args(tmp_path / "ref", rounds, *fixed))

    # Assert
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming from {out / 'checkpoint.h5'} (round {stopped})" in resumed.stdout
    assert f"done: {rounds} rounds" in resumed.stdout
    assert reference.returncode == 0, reference.stderr
    assert ckptmod.validate(out / "checkpoint.h5").round == rounds
    got, want = model_of(out / "checkpoint.h5"), model_of(tmp_path / "ref" / "checkpoint.h5")
    assert list(got) == list(want) and len(want) == 8  # LeNet: 4 layers' weights and biases
    for key in want:
        assert got[key].dtype == want[key].dtype and got[key].tobytes() == want[key].tobytes(), key


def test_worker_stalled_while_evaluating_costs_no_figure(tmp_path, jobs):
    # Prepare / Execute: 300 test images are 3 chunks; the first evaluation (round 1's model,
    # sent with round 2's plan) is split by capacity, one chunk each to rank 0 and both
    # workers; worker rank 2 stops before sending its result
    out = tmp_path / "run"
    job, _ = run_stalled(tmp_path, jobs, "evaluating", rnd=2, extra=("--set", "data.test_samples=300"))
    # Assert: the job ends naming the rank, and round 1's checkpoint holds round 1's figures,
    # which rank 0 computed alone: the same as a one-process evaluation of its model
    assert job.proc.poll() is not None and job.proc.returncode != 0, job.stderr[-2000:]
    assert "round 1: evaluation: no evaluation result from worker rank(s) 2 within run.round_timeout = 3 s" in job.stderr, job.stderr
    assert all_gone(job.pids.values()), "a rank outlived the job"
    ck = ckptmod.validate(out / "checkpoint.h5")
    assert ck.round == 1 and ck.metrics["eval_root_share"][0] == 1.0
    from elfish_mpi import data as datamod
    from elfish_mpi.evaluation import evaluate
    from elfish_mpi.models import lenet
    from elfish_mpi.submodel import flat_from_state_dict, full_model
    import torch

    model = full_model(lenet(), flat_from_state_dict(lenet(), ck.model))
    test = datamod.load_test_data("fashion-mnist", str(SAMPLE), 300)
    torch.set_num_threads(1)
    here = evaluate(model, torch.from_numpy(datamod.normalize(test.images)), torch.from_numpy(test.labels))
    assert here == (ck.metrics["test_accuracy"][0], ck.metrics["test_loss"][0])


def test_metrics_csv_follows_every_round_between_checkpoints(tmp_path, jobs):
    # Prepare / Execute: no checkpoint before round 10; worker rank 2 stops while training round 3
    out = tmp_path / "run"
    job, _ = run_stalled(tmp_path, jobs, "training", extra=("--set", "checkpoint.every=10"))
    # Assert: no checkpoint was due, yet metrics.csv holds rounds 1 and 2
    assert job.proc.poll() is not None and job.proc.returncode != 0, job.stderr[-2000:]
    assert not (out / "checkpoint.h5").exists()
    rows = (out / "metrics.csv").read_text().splitlines()
    assert rows[0].startswith("round,") and [r.split(",")[0] for r in rows[1:]] == ["1", "2"], rows
