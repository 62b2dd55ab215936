"""Crash consistency of the run directory: SIGKILL at random moments, then resume.

* a process writing big checkpoints with ``checkpoint.rotate`` is killed at seeded random
  moments (nearly always inside a write);
* a real ``mpiexec -n 3 elfish-mpi train`` job (checkpoint.every = 1, so writes are frequent)
  is killed as a whole (every process of the job) at seeded random moments, some of them
  while a checkpoint file is being written, then resumed, killed again, ... and finally
  resumed to the end.

After every kill: every checkpoint file in the run directory validates (writes are atomic),
``find_latest_valid`` picks the one with the highest round, never a ``*.tmp`` file, and the
next writer removes the temporary files the killed one left.
"""
from __future__ import annotations

import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from elfish_mpi import checkpoint as ck
from elfish_mpi.checkpoint import Checkpoint, CheckpointError
from proc_tools import alive, clean_env, descendants, mpiexec, rank_pids

ROOT = Path(__file__).resolve().parents[2]
SAMPLE = ROOT / "tests" / "data" / "fashion-mnist"
JOB_TIMEOUT = 180

TEMP_RE = re.compile(r"^\..+\.(\d+)(?:-[0-9a-f]+)?\.tmp$")


# --------------------------------------------------------------------------- helpers


def small_ckpt(rnd: int, workers: int = 2, model: dict | None = None) -> Checkpoint:
    return Checkpoint(
        round=rnd, config={"run": {"rounds": 100}}, strategy="elfish",
        model=model if model is not None else {"w": np.full((4, 3), float(rnd), dtype=np.float32)},
        metrics={"round": np.arange(1, rnd + 1, dtype=np.int64)},
        workers={"keep_ratio": np.ones((rnd, workers))},
        masks={}, coverage={}, profiles={},
    )


def candidates(run_dir: Path) -> list[Path]:
    """Every file find_latest_valid may consider."""
    found = [run_dir / "checkpoint.h5"] if (run_dir / "checkpoint.h5").exists() else []
    return found + sorted((run_dir / "checkpoints").glob("round-*.h5"))


def temp_files(run_dir: Path) -> list[Path]:
    return sorted(p for d in (run_dir, run_dir / "checkpoints") if d.is_dir()
                  for p in d.iterdir() if p.name.endswith(".tmp"))


def temp_pids(run_dir: Path) -> set[int]:
    pids = set()
    for p in temp_files(run_dir):
        m = TEMP_RE.match(p.name)
        assert m, f"unexpected temporary file name {p.name}"
        pids.add(int(m.group(1)))
    return pids


def check_run_dir(run_dir: Path) -> int | None:
    """After a kill: every checkpoint file validates and find_latest_valid picks the newest
    by round, never a temporary file. Returns that round (None if nothing was written)."""
    files = candidates(run_dir)
    if not files:
        with pytest.raises(CheckpointError, match="no checkpoint found"):
            ck.find_latest_valid(run_dir)
        return None
    rounds = {}
    for p in files:
        rounds[p] = ck.validate(p).round  # atomic writes: no file is ever half-written
    path, notes = ck.find_latest_valid(run_dir)
    assert path in rounds, f"find_latest_valid chose {path}, not a checkpoint file"
    assert not path.name.startswith(".") and path.suffix == ".h5"
    assert rounds[path] == max(rounds.values()), (path, rounds, notes)
    if path.name != "checkpoint.h5":  # it says why it did not take checkpoint.h5
        assert notes, (path, rounds)
    return rounds[path]


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait(timeout=60)
    return proc.pid


# --------------------------------------------------------------------------- find_latest_valid and stale temps


def test_history_written_just_before_a_crash_is_preferred(tmp_path: Path) -> None:
    # Prepare: rounds 1..3 rotated, then round 4 reached only the history (killed before checkpoint.h5)
    for r in range(1, 4):
        ck.rotate(tmp_path, small_ckpt(r), keep=3)
    ck.write(tmp_path / "checkpoints" / "round-000004.h5", small_ckpt(4))

    # Execute
    path, notes = ck.find_latest_valid(tmp_path)

    # Assert
    assert path == tmp_path / "checkpoints" / "round-000004.h5"
    assert ck.read(path).round == 4
    assert len(notes) == 1 and "round 3" in notes[0] and "round 4" in notes[0] and str(path) in notes[0]


def test_damaged_newer_history_falls_back_to_checkpoint_h5(tmp_path: Path) -> None:
    for r in range(1, 4):
        ck.rotate(tmp_path, small_ckpt(r), keep=3)
    newer = tmp_path / "checkpoints" / "round-000004.h5"
    ck.write(newer, small_ckpt(4))
    newer.write_bytes(newer.read_bytes()[:500])

    path, notes = ck.find_latest_valid(tmp_path)

    assert path == tmp_path / "checkpoint.h5" and ck.read(path).round == 3
    assert len(notes) == 1 and "round-000004.h5" in notes[0]


def test_equal_rounds_prefer_checkpoint_h5_and_older_history_is_not_read(tmp_path: Path) -> None:
    for r in range(1, 4):
        ck.rotate(tmp_path, small_ckpt(r), keep=3)
    (tmp_path / "checkpoints" / "round-000001.h5").write_bytes(b"garbage")  # never looked at

    path, notes = ck.find_latest_valid(tmp_path)

    assert path == tmp_path / "checkpoint.h5" and notes == []


def test_temporary_files_are_never_candidates(tmp_path: Path) -> None:
    # Prepare: valid checkpoints of a higher round hidden in temporary files
    ck.rotate(tmp_path, small_ckpt(2), keep=3)
    for name in (".checkpoint.h5.999999-abcdef.tmp", "checkpoints/.round-000009.h5.999999-abcdef.tmp"):
        ck.write(tmp_path / name, small_ckpt(9))
    (tmp_path / "checkpoints" / "round-000010.h5.tmp").write_bytes(b"")

    path, notes = ck.find_latest_valid(tmp_path)

    assert path == tmp_path / "checkpoint.h5" and ck.read(path).round == 2 and notes == []


def test_rotate_removes_temporary_files_of_dead_writers_only(tmp_path: Path) -> None:
    # Prepare: temporary files of a dead writer, of a live process, of this process, and other files
    dead = dead_pid()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (tmp_path / "checkpoints").mkdir()
        stale = [tmp_path / f".checkpoint.h5.{dead}-0a1b2c.tmp",
                 tmp_path / "checkpoints" / f".round-000003.h5.{dead}-ffee00.tmp",
                 tmp_path / f".metrics.csv.{dead}.tmp"]
        kept = [tmp_path / f".checkpoint.h5.{live.pid}-0a1b2c.tmp",
                tmp_path / "checkpoints" / f".round-000003.h5.{os.getpid()}-ffee00.tmp",
                tmp_path / "notes.tmp", tmp_path / "checkpoints" / "round-000001.h5.tmp",
                tmp_path / f"keep.{dead}.tmp", tmp_path / f".notes.txt.{dead}.tmp",
                tmp_path / f".data.h5.{dead}.tmp"]
        for p in stale + kept:
            p.write_bytes(b"partial")

        # Execute
        ck.rotate(tmp_path, small_ckpt(1), keep=2)

        # Assert
        assert not any(p.exists() for p in stale)
        assert all(p.read_bytes() == b"partial" for p in kept)
        assert ck.find_latest_valid(tmp_path)[0] == tmp_path / "checkpoint.h5"
    finally:
        live.kill()
        live.wait(timeout=60)


# --------------------------------------------------------------------------- SIGKILL inside rotate

WRITER = """
import sys
import numpy as np
from elfish_mpi import checkpoint as ck
run_dir, rnd = sys.argv[1], int(sys.argv[2])
model = {"w": np.random.default_rng(rnd).standard_normal(1_500_000).astype(np.float32)}  # 6 MB
print("ready", flush=True)
while True:
    ck.rotate(run_dir, ck.Checkpoint(
        round=rnd, config={"run": {"rounds": 10**6}}, strategy="elfish", model=model,
        metrics={"round": np.arange(1, rnd + 1)}, workers={"keep_ratio": np.ones((rnd, 2))},
        masks={}, coverage={}, profiles={}), keep=2)
    print(rnd, flush=True)
    rnd += 1
"""


def test_writer_killed_at_random_moments_leaves_a_valid_newest_checkpoint(tmp_path: Path) -> None:
    rng = random.Random(20240601)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    latest = None
    stale_pids: set[int] = set()
    hit_a_write = completed = 0
    for trial in range(12):
        # Prepare: a writer continuing after the newest valid checkpoint
        start = (latest or 0) + 1
        proc = subprocess.Popen([sys.executable, "-c", WRITER, str(run_dir), str(start)],
                                stdout=subprocess.PIPE, text=True, cwd=ROOT)
        try:
            assert proc.stdout.readline().strip() == "ready"
            # Execute: SIGKILL at a random moment, mostly in the middle of a write
            time.sleep(rng.uniform(0.0, 0.5))
        finally:
            proc.kill()
            written = proc.communicate(timeout=60)[0].split()
        # Assert
        newest = check_run_dir(run_dir)
        if written:  # it completed a rotate, which removed what earlier writers left
            completed += 1
            assert newest is not None and newest >= int(written[-1])
            assert not (temp_pids(run_dir) & stale_pids), "a killed writer's temporary file survived"
        if newest is not None:
            assert newest >= start - 1
            latest = newest
        if proc.pid in temp_pids(run_dir):
            hit_a_write += 1
        stale_pids |= temp_pids(run_dir)

    assert hit_a_write >= 1, "no kill landed inside a write"
    assert completed >= 1, "no writer completed a rotate: the clean-up of dead writers' files went unchecked"
    ck.rotate(run_dir, small_ckpt(latest + 1), keep=2)  # a live writer cleans up after the dead
    assert temp_files(run_dir) == []
    assert ck.find_latest_valid(run_dir) == (run_dir / "checkpoint.h5", [])


# --------------------------------------------------------------------------- SIGKILL to a whole MPI job


def job_args(out: Path, rounds: int) -> list[str]:
    return [
        "--out", str(out), "--set", f"data.path={SAMPLE}", "--set", "data.test_samples=200",
        "--set", "data.max_samples=300", "--set", f"run.rounds={rounds}", "--set", "train.local_steps=2",
        "--set", "workers.throttle=none", "--set", "checkpoint.every=1", "--set", "checkpoint.keep=3",
    ]


def kill_job(proc: subprocess.Popen) -> list[int]:
    """SIGKILL every process of the job at once. Hydra puts its proxy and each rank in a
    session of their own, so mpiexec's process group alone does not reach them."""
    pids = descendants(proc.pid)
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=60)
    deadline = time.monotonic() + 20
    while any(alive(pid) for pid in pids):
        assert time.monotonic() < deadline, "processes of the killed job still run"
        time.sleep(0.02)
    return pids


def newest_round_file(run_dir: Path) -> int:
    rounds = [int(m.group(1)) for p in (run_dir / "checkpoints").glob("round-*.h5")
              if (m := re.fullmatch(r"round-(\d+)\.h5", p.name))]
    return max(rounds, default=0)


def writing(run_dir: Path, pid: int | None) -> bool:
    """Process ``pid`` is writing a checkpoint file (its temporary file exists)."""
    return any(p.name.startswith((".round-", ".checkpoint.h5.")) and TEMP_RE.match(p.name)
               and int(TEMP_RE.match(p.name).group(1)) == pid for p in temp_files(run_dir))


@pytest.mark.timeout(400)
def test_job_killed_at_random_moments_resumes_every_time_and_completes(tmp_path: Path) -> None:
    rng = random.Random(7)
    rounds = 30
    out = tmp_path / "run"
    latest: int | None = None  # newest valid round after the last kill
    expect_note: str | None = None
    last_rank0: int | None = None
    for trial in range(7):
        # Prepare: a fresh start while nothing was written, else --resume DIR
        args = job_args(out, rounds) if latest is None else ["--resume", str(out)]
        log = tmp_path / f"trial{trial}.stdout"
        with open(log, "w") as so:
            proc = subprocess.Popen([mpiexec(), "-n", "3", sys.executable, "-m", "elfish_mpi", "train", *args],
                                    stdout=so, stderr=subprocess.STDOUT, env=clean_env(), cwd=ROOT,
                                    start_new_session=True)
        try:
            # Execute: wait for progress past the last checkpoint, then SIGKILL at a random moment
            deadline = time.monotonic() + JOB_TIMEOUT
            if trial == 0:
                mode = "start-up"
                time.sleep(rng.uniform(0.5, 3.0))  # while starting: before any checkpoint
            else:
                mode = "in-write" if trial % 2 else "after-round"
                base = latest or 0

                def wait_until(cond, poll):
                    while not cond() and proc.poll() is None:
                        assert time.monotonic() < deadline, log.read_text()
                        time.sleep(poll)
                    assert proc.poll() is None, f"trial {trial}: job ended before the kill:\n{log.read_text()}"

                wait_until(lambda: newest_round_file(out) > base, 0.02)  # resumed and checkpointed a new round
                writer = rank_pids(proc.pid).get(0)
                if mode == "in-write":  # the next write has begun: kill inside it
                    wait_until(lambda: writing(out, writer), 0.002)
                    time.sleep(rng.uniform(0.0, 0.01))
                else:
                    time.sleep(rng.uniform(0.0, 0.6))
            this_rank0 = rank_pids(proc.pid).get(0)
        finally:
            killed = kill_job(proc)
        text = log.read_text()

        # Assert: the job resumed where find_latest_valid said, and moved on
        if expect_note is not None:
            assert expect_note in text, f"trial {trial} ({mode}):\n{text}"
        before = latest
        latest = check_run_dir(out)
        if trial > 0:
            assert latest is not None and latest > (before or 0), f"trial {trial} ({mode}) made no progress:\n{text}"
        # The job's rotate removed what the previous killed job left; only its own may remain.
        leftover = temp_pids(out) - ({this_rank0} if this_rank0 else set())
        assert not leftover or trial == 0, f"trial {trial}: temporary files of dead writers {leftover} survived"
        if latest is not None:
            path, _ = ck.find_latest_valid(out)
            expect_note = f"resuming from {path} (round {latest})"
        last_rank0 = this_rank0
        assert not any(alive(pid) for pid in killed)
    assert latest is not None and latest < rounds

    # Execute: resume to the end
    res = subprocess.run([mpiexec(), "-n", "3", sys.executable, "-m", "elfish_mpi", "train", "--resume", str(out)],
                         capture_output=True, text=True, timeout=JOB_TIMEOUT, env=clean_env(), cwd=ROOT)

    # Assert: complete, one metrics row per round despite 7 crashes, nothing left behind
    assert res.returncode == 0, res.stdout + res.stderr
    assert expect_note in res.stdout and f"done: {rounds} rounds" in res.stdout
    final = ck.validate(out / "checkpoint.h5")
    assert final.round == rounds
    np.testing.assert_array_equal(final.metrics["round"], np.arange(1, rounds + 1))
    assert temp_files(out) == [], f"left behind: {temp_files(out)} (last killed rank 0: {last_rank0})"
    assert ck.find_latest_valid(out) == (out / "checkpoint.h5", [])
