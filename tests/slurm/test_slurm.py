"""launch/slurm/elfish.sbatch on a real one-node SLURM cluster (tests/slurm/cluster.sh).

Checks that srun --mpi=pmi2 starts one MPI world with the MPICH wheel, that the template's
srun takes its MPI plugin from ELFISH_SRUN_MPI and passes on --cpus-per-task (which sets the
torch threads), that sweep.sbatch maps array tasks to (strategy, seed), that a worker killed
under srun is named and ends the job, and preempts a running job twice over: `scontrol
requeue` (SLURM sends SIGTERM to the tasks and requeues the job itself) and `scancel --batch --signal=USR1` (the time-limit warning: the
batch script forwards it, the run checkpoints and the script requeues its own job). Each
time the job must restart, resume from its checkpoint and finish with a model bitwise
identical to an uninterrupted run of the same config.

Runs as root with Debian's slurm-wlm and munge (tests/slurm/cluster.sh installs them with
apt-get when missing). Skipped unless ELFISH_SLURM_TESTS=1, or the daemons are installed
and we are root; ELFISH_SLURM_TESTS=0 always skips. Run it on its own, not under mpiexec:

    python -m pytest -v tests/slurm
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from slurm_tools import ROOT, SAMPLE, SBATCH, SLURM_TOOLS, Cluster, booted, skip_reason, tail

CLUSTER = ROOT / "tests" / "slurm" / "cluster.sh"
SWEEP = ROOT / "launch" / "slurm" / "sweep.sbatch"
RANKS = 3  # rank 0 aggregates, two workers
ROUNDS = 12
# Slow enough that the job is still running when it is preempted after round 2, on a
# loaded 2-core machine and on a fast one; ELFISH_SLURM_TEST_STEPS overrides.
LOCAL_STEPS = int(os.environ.get("ELFISH_SLURM_TEST_STEPS", "40"))

_REASON = skip_reason(SLURM_TOOLS, "SLURM is not installed ({missing} missing): apt-get install slurm-wlm munge, "
                                   "or set ELFISH_SLURM_TESTS=1 to let tests/slurm/cluster.sh install it")
pytestmark = [pytest.mark.skipif(_REASON is not None, reason=_REASON or ""), pytest.mark.timeout(900)]


# ----------------------------------------------------------------------------- helpers
def wait_for(what: str, predicate, timeout: float, poll: float = 0.5, diagnose=lambda: ""):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}\n{diagnose()}")
        time.sleep(poll)


def latest_round(run: Path) -> int:
    rounds = [int(m.group(1)) for p in (run / "checkpoints").glob("round-*.h5")
              if (m := re.fullmatch(r"round-(\d+)\.h5", p.name))]
    return max(rounds, default=0)


def final_model(path: Path) -> tuple[int, dict]:
    import h5py

    with h5py.File(path, "r") as f:
        return int(f.attrs["round"]), {k: f["model"][k][()] for k in f["model"]}


def write_config(path: Path) -> Path:
    path.write_text(f"""\
# tests/slurm: a small deterministic run (fixed keep ratios)
[run]
rounds = {ROUNDS}
seed = 3
[data]
name = "fashion-mnist"
path = "{SAMPLE}"
test_samples = 200
max_samples = 300
[train]
local_steps = {LOCAL_STEPS}
batch_size = 16
[workers]
throttle = "none"
[strategy]
name = "elfish"
keep_ratios = [1.0, 0.5]
[checkpoint]
every = 1
keep = 0
""")
    return path


# ---------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    path = tmp_path_factory.mktemp("slurm")
    with booted(CLUSTER, path, "SLURM test cluster", down_timeout=120):
        yield Cluster(path)


@pytest.fixture(scope="module")
def config(tmp_path_factory):
    return write_config(tmp_path_factory.mktemp("config") / "small.toml")


@pytest.fixture(scope="module")
def reference(tmp_path_factory, config):
    """The same config run without interruption, under plain mpiexec."""
    out = tmp_path_factory.mktemp("reference") / "run"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "PMI_", "PMIX_", "HYDRA_"))}
    p = subprocess.run(
        ["mpiexec", "-n", str(RANKS), sys.executable, "-m", "elfish_mpi", "train", "--config", str(config), "--out", str(out)],
        env=env, capture_output=True, text=True, timeout=600,
    )
    assert p.returncode == 0, f"reference run failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
    rnd, model = final_model(out / "checkpoint.h5")
    assert rnd == ROUNDS
    return model


# ------------------------------------------------------------------------------- tests
def test_srun_pmi2_starts_one_mpi_world(cluster):
    """srun --mpi=pmi2 with the MPICH wheel: one world of RANKS processes, not RANKS singletons."""
    code = ("from mpi4py import MPI; c = MPI.COMM_WORLD; "
            "print('rank', c.rank, 'size', c.size, 'sum', c.allreduce(c.rank), flush=True)")
    out = cluster.run("srun", "--mpi=pmi2", "-n", str(RANKS), sys.executable, "-c", code, timeout=120).stdout
    lines = sorted(line for line in out.splitlines() if line.startswith("rank"))
    expect_sum = RANKS * (RANKS - 1) // 2
    assert lines == [f"rank {r} size {RANKS} sum {expect_sum}" for r in range(RANKS)], out


def submit(cluster: Cluster, workdir: Path, config: Path, run: Path) -> str:
    out = cluster.run(
        "sbatch", "--parsable", f"--ntasks={RANKS}",
        f"--export=ALL,ELFISH_CONFIG={config},ELFISH_OUT={run}",
        str(SBATCH), cwd=workdir,
    ).stdout
    return out.strip().split(";")[0]


def preempt_and_finish(cluster: Cluster, tmp_path: Path, config: Path, preempt) -> tuple[str, Path, dict]:
    """Submit, let round 2 be checkpointed, preempt(jobid), wait for the restart and the end."""
    run = tmp_path / "run"
    jobid = submit(cluster, tmp_path, config, run)
    output = tmp_path / f"elfish-{jobid}.out"  # the template's --output=elfish-%j.out, in the submit dir

    def diagnose():
        return f"job: {cluster.job(jobid)}\n--- {output.name}\n{tail(output, 60)}\n{cluster.logs()}"

    def job_state():
        return cluster.job(jobid).get("JobState", "?")

    def check_alive():
        state = job_state()
        if state in ("FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"):
            raise AssertionError(f"job {jobid} ended {state}\n{diagnose()}")
        return state

    wait_for("round 2's checkpoint", lambda: check_alive() and latest_round(run) >= 2, 300, 0.2, diagnose)
    state, done = job_state(), latest_round(run)
    assert state == "RUNNING" and done < ROUNDS, (
        f"the job is {state} at round {done}: too fast to preempt (raise ELFISH_SLURM_TEST_STEPS)\n{diagnose()}"
    )
    t_preempt = time.monotonic()
    preempt(jobid)
    wait_for("the job to be requeued", lambda: int(cluster.job(jobid).get("Restarts", "0")) >= 1, 120, 0.5, diagnose)
    wait_for("the job to complete", lambda: check_alive() == "COMPLETED", 600, 1.0, diagnose)
    info = cluster.job(jobid)
    print(f"\njob {jobid}: preempted at round {done}; restarted and completed {time.monotonic() - t_preempt:.0f} s later",
          file=sys.stderr)
    assert info.get("ExitCode") == "0:0", diagnose()
    return jobid, run, info


def check_resumed(output: Path, run: Path, reference: dict, stop_note: str):
    text = output.read_text(errors="replace")
    assert stop_note in text, text  # the run stopped at a round's end with a checkpoint ...
    assert re.search(r"elfish-mpi: resuming from \S+ \(round (\d+)\)", text), text  # ... and resumed from it
    assert f"round   {ROUNDS}/{ROUNDS}" in text and "round    1/" in text, text  # one appended output file
    rnd, model = final_model(run / "checkpoint.h5")
    assert rnd == ROUNDS
    assert sorted(model) == sorted(reference)
    for name in reference:
        assert model[name].dtype == reference[name].dtype and model[name].tobytes() == reference[name].tobytes(), name
    p = subprocess.run([sys.executable, "-m", "elfish_mpi", "validate", str(run / "checkpoint.h5")],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr


def test_requeue_by_slurm_resumes_bitwise(cluster, config, reference, tmp_path):
    """scontrol requeue: SIGTERM to the tasks -> checkpoint -> SLURM requeues -> resume -> same model."""
    jobid, run, info = preempt_and_finish(
        cluster, tmp_path, config, lambda j: cluster.run("scontrol", "requeue", j)
    )
    output = tmp_path / f"elfish-{jobid}.out"
    check_resumed(output, run, reference, "SIGTERM received: stopped after round")
    assert int(info["Restarts"]) == 1


def test_usr1_checkpoints_requeues_itself_and_resumes_bitwise(cluster, config, reference, tmp_path):
    """The time-limit warning: SIGUSR1 to the batch shell only -> forwarded -> checkpoint ->
    the script requeues its own job and exits 0 -> resume -> same model."""
    jobid, run, info = preempt_and_finish(
        cluster, tmp_path, config, lambda j: cluster.run("scancel", "--batch", "--signal=USR1", j)
    )
    output = tmp_path / f"elfish-{jobid}.out"
    check_resumed(output, run, reference, "SIGUSR1 received: stopped after round")
    text = output.read_text(errors="replace")
    assert f"requeueing job {jobid}" in text, text
    assert int(info["Restarts"]) == 1


def slurm_rank_pid(jobid: str, rank: int) -> int | None:
    """The pid of MPI rank ``rank``'s training process in SLURM job ``jobid`` (not its
    supervisor, elfish_mpi.supervisor): PMI_RANK and ELFISH_SUPERVISOR_FD in its environment."""
    want = {f"SLURM_JOB_ID={jobid}".encode(), f"PMI_RANK={rank}".encode()}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as fh:
                env = fh.read().split(b"\0")
        except OSError:
            continue
        if want <= set(env) and any(e.startswith(b"ELFISH_SUPERVISOR_FD=") for e in env):
            return int(entry)
    return None


def test_killed_worker_is_named_and_ends_the_job(cluster, config, tmp_path):
    """SIGKILL to worker rank 2 under srun: the output names the rank, its pid and the round,
    srun (--kill-on-bad-exit) ends the job within KillWait, and the checkpoint is intact."""
    from elfish_mpi import checkpoint as ckptmod

    # Prepare: a long run, past round 2's checkpoint
    run = tmp_path / "run"
    out = cluster.run(
        "sbatch", "--parsable", f"--ntasks={RANKS}",
        f"--export=ALL,ELFISH_CONFIG={config},ELFISH_OUT={run},ELFISH_ARGS=--set run.rounds=1000",
        str(SBATCH), cwd=tmp_path,
    ).stdout
    jobid = out.strip().split(";")[0]
    output = tmp_path / f"elfish-{jobid}.out"

    def diagnose():
        return f"job: {cluster.job(jobid)}\n--- {output.name}\n{tail(output, 60)}\n{cluster.logs()}"

    wait_for("round 2's checkpoint", lambda: latest_round(run) >= 2, 300, 0.2, diagnose)
    victim = wait_for("worker rank 2's process", lambda: slurm_rank_pid(jobid, 2), 30, 0.2, diagnose)

    # Execute
    os.kill(victim, 9)
    t_kill = time.monotonic()
    wait_for("the job to end", lambda: cluster.job(jobid).get("JobState") not in ("RUNNING", "PENDING", "COMPLETING"),
             120, 0.2, diagnose)
    elapsed = time.monotonic() - t_kill

    # Assert: srun (--kill-on-bad-exit) cancels the step: SIGTERM, and SIGKILL KillWait later;
    # the other worker, waiting for rank 0, goes at KillWait at the latest.
    kill_wait = int(re.search(r"KillWait\s*=\s*(\d+)", cluster.run("scontrol", "show", "config").stdout).group(1))
    text = output.read_text(errors="replace")
    assert elapsed < kill_wait + 15, f"the job took {elapsed:.1f} s to end (KillWait {kill_wait} s)\n{diagnose()}"
    # Rank 0 either finished the round under way (the worker had delivered its update) and
    # stopped cleanly, or gave up on it after run.stop_grace, or saw the worker's death itself
    # in the receive of its update (MPI reported it before SIGTERM came); either way it said so.
    assert ("SIGTERM received: stopped after round" in text
            or ("SIGTERM received, and " in text and "within run.stop_grace = 20 s; stopped without that round" in text)
            or re.search(r"rank 0: RankFailure: round \d+: worker rank 2 failed while rank 0 waited for its update", text)), text
    assert cluster.job(jobid)["JobState"] == "FAILED", diagnose()
    m = re.search(rf"elfish-mpi: error: worker rank 2 \(pid {victim} on \S+\) was killed by signal 9 \(SIGKILL\): "
                  r"by a person, the batch system or the out-of-memory killer (in round \d+|after its update of round)", text)
    assert m, text
    assert text.count("was killed by signal") == 1, text
    assert "Traceback" not in text, text
    ck = ckptmod.validate(run / "checkpoint.h5")
    assert ck.round >= 2


TINY = """\
[run]
rounds = {rounds}
[data]
path = "{sample}"
test_samples = 100
max_samples = 100
[train]
local_steps = 2
[workers]
throttle = "none"
"""


def run_tiny_job(cluster: Cluster, tmp_path: Path, *sbatch_options: str, export: str = "") -> tuple[dict, str, Path]:
    """elfish.sbatch with a one-round config, to its end: (job record, output file text, run dir)."""
    config = tmp_path / "tiny.toml"
    config.write_text(TINY.format(sample=SAMPLE, rounds=1))
    run = tmp_path / "run"
    out = cluster.run(
        "sbatch", "--parsable", f"--ntasks={RANKS}", *sbatch_options,
        f"--export=ALL,ELFISH_CONFIG={config},ELFISH_OUT={run}{export}", str(SBATCH), cwd=tmp_path,
    ).stdout
    jobid = out.strip().split(";")[0]
    output = tmp_path / f"elfish-{jobid}.out"

    def diagnose():
        return f"job: {cluster.job(jobid)}\n--- {output.name}\n{tail(output, 60)}\n{cluster.logs()}"

    wait_for("the job to end", lambda: cluster.job(jobid).get("JobState") not in ("RUNNING", "PENDING", "COMPLETING", "?", None),
             300, 0.5, diagnose)
    return cluster.job(jobid), output.read_text(errors="replace"), run


def srun_line(text: str) -> str:
    """The srun command line the template logged."""
    m = re.search(r"^elfish-slurm: .* tasks: (srun .*)$", text, re.M)
    assert m, text
    return m.group(1)


@pytest.mark.parametrize("plugin", ["none", "pmix", ""])
def test_srun_mpi_plugin_is_ELFISH_SRUN_MPI(cluster, tmp_path, plugin):
    """ELFISH_SRUN_MPI replaces the template's pmi2: none gives singletons, pmix gives the tasks
    a PMIx server (which the MPICH wheel refuses), empty leaves --mpi out (the site's MpiDefault,
    pmi2 on the test cluster: one world, the run completes)."""
    # Prepare
    if plugin:
        probe = subprocess.run(["srun", f"--mpi={plugin}", "-n", "1", "true"], env=cluster.env,
                               capture_output=True, text=True, timeout=120)
        if probe.returncode != 0:  # e.g. mpi/pmix without libpmix2
            pytest.skip(f"srun --mpi={plugin} does not work on this cluster: {probe.stderr.strip()[-300:]}")

    # Execute
    info, text, run = run_tiny_job(cluster, tmp_path, export=f",ELFISH_SRUN_MPI={plugin}")

    # Assert: srun got the plugin asked for, and the tasks show it
    line = srun_line(text)
    if plugin:
        assert line.startswith(f"srun --mpi={plugin} --kill-on-bad-exit=1 python -m elfish_mpi train"), line
        assert info["JobState"] == "FAILED", text
    if plugin == "none":  # N worlds of size 1, each refusing to run alone
        assert "elfish-mpi: error: elfish-mpi needs at least 2 MPI ranks" in text, text
        assert "workers, capacities" not in text, text  # no world of RANKS ranks started a run
    elif plugin == "pmix":  # MPICH's PMI-1 client finds a PMIx server
        assert "unsupported PMI version PMIx" in text, text
    else:
        assert line.startswith("srun --kill-on-bad-exit=1 python -m elfish_mpi train") and "--mpi" not in line, line
        assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", text
        assert f"{RANKS - 1} workers" in text, text


def test_cpus_per_task_gives_each_rank_as_many_torch_threads(cluster, tmp_path):
    """sbatch --cpus-per-task=2: srun is passed it again (SLURM >= 22.05 does not inherit it),
    and run.threads, left out of the config, is 2 on every rank (the checkpoint's config)."""
    from elfish_mpi import checkpoint as ckptmod

    # Execute
    info, text, run = run_tiny_job(cluster, tmp_path, "--cpus-per-task=2")

    # Assert
    assert "--cpus-per-task=2 python -m elfish_mpi train" in srun_line(text), text
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", text
    ck = ckptmod.read(run / "checkpoint.h5")
    assert ck.config["run"]["threads"] == 2


def test_sweep_maps_array_tasks_to_strategy_and_seed(cluster, tmp_path):
    """sweep.sbatch: task i -> (STRATEGIES[i // #seeds], SEEDS[i % #seeds]) in OUT/<strategy>/seed<S>;
    a task beyond the sweep fails with exit 2."""
    from elfish_mpi import checkpoint as ckptmod

    config = tmp_path / "sweep.toml"
    config.write_text(TINY.format(sample=SAMPLE, rounds=2))
    cluster.env.update(ELFISH_STRATEGIES="fedavg,elfish", ELFISH_SEEDS="7")
    try:
        out = cluster.run(
            "sbatch", "--parsable", "--array=0-2", f"--ntasks={RANKS}",
            f"--export=ALL,ELFISH_CONFIG={config},ELFISH_OUT={tmp_path / 'sweep'}", str(SWEEP), cwd=tmp_path,
        ).stdout
    finally:
        for key in ("ELFISH_STRATEGIES", "ELFISH_SEEDS"):
            del cluster.env[key]
    array = out.strip().split(";")[0]

    def tasks():
        text = cluster.run("scontrol", "show", "job", "-o", array, check=False).stdout
        return [dict(re.findall(r"(\w+)=(\S*)", line)) for line in text.splitlines() if "ArrayTaskId=" in line]

    def diagnose():
        logs = "\n".join(f"--- {p.name}\n{tail(p, 30)}" for p in sorted(tmp_path.glob("elfish-sweep-*.out")))
        return f"{tasks()}\n{logs}\n{cluster.logs()}"

    ended = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY")
    wait_for("the sweep to end", lambda: len(t := tasks()) == 3 and all(x.get("JobState") in ended for x in t),
             400, 1.0, diagnose)
    by_task = {int(t["ArrayTaskId"]): t for t in tasks()}
    assert [by_task[i]["JobState"] for i in (0, 1)] == ["COMPLETED", "COMPLETED"], diagnose()
    assert by_task[2]["JobState"] == "FAILED" and by_task[2]["ExitCode"] == "2:0", diagnose()
    assert "array task 2 is out of range" in (tmp_path / f"elfish-sweep-{array}_2.out").read_text()
    for strategy in ("fedavg", "elfish"):
        ck = ckptmod.read(tmp_path / "sweep" / strategy / "seed7" / "checkpoint.h5")
        assert (ck.strategy, ck.round, ck.config["run"]["seed"]) == (strategy, 2, 7)
