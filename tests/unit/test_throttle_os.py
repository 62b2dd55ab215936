"""The throttles that act on the operating system: cgroup CPU quotas and CPU affinity.

The cgroup tests that change the real hierarchy run in a subprocess (it moves itself into
a group and out again), and skip, saying why, where this is not root or no cgroup
hierarchy is writable. The error path runs against fake hierarchies.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from elfish_mpi.throttle import (
    Throttle,
    ThrottleError,
    affinity_plan,
    cgroup_quota,
    fair_share,
    quota_corrections,
)

CORES = len(os.sched_getaffinity(0))


# ---------------------------------------------------------------------------------- quota maths


def test_fair_share_is_cores_per_worker_capped_at_threads():
    assert fair_share(2, 4) == 0.5
    assert fair_share(16, 4) == 4.0
    assert fair_share(16, 4, threads=1) == 1.0  # a single-threaded worker cannot use 4 cores
    assert fair_share(2, 4, threads=1) == 0.5


@pytest.mark.parametrize(
    "capacity, share, expect",
    [
        (1.0, 0.5, (5000, 10_000)),
        (0.5, 0.5, (5000, 20_000)),  # the same 5 ms burst, twice as far apart
        (0.25, 0.5, (5000, 40_000)),
        (1.0, 2.0, (20_000, 10_000)),  # two cores' worth
        (0.1, 0.5, (5000, 100_000)),
        (0.3, 0.4, (4000, 33_333)),  # the quota is rounded from the rounded period
        (1.0, 0.05, (1000, 20_000)),  # a 0.5 ms burst would be below the kernel's 1 ms minimum
        (0.5, 0.05, (1000, 40_000)),
        (0.004, 0.5, (2000, 1_000_000)),  # the period stops at the kernel's 1 s maximum
    ],
)
def test_cgroup_quota(capacity, share, expect):
    quota, period = cgroup_quota(capacity, share)
    assert (quota, period) == expect
    assert quota / period == pytest.approx(capacity * share, rel=1e-3)


@pytest.mark.parametrize("share", [0.5, 0.4, 1.0, 2.0])
def test_cgroup_quota_gives_every_capacity_the_same_burst(share):
    # Prepare: the finding's fleet; a throttled process refills its caches after every pause,
    # so a worker running in shorter bursts than a full-speed one needs more CPU per step
    caps = [1.0, 0.5, 0.25, 0.2, 0.1]

    # Execute
    quotas = {c: cgroup_quota(c, share) for c in caps}

    # Assert: each runs share x 10 ms at a time, capacity c waits 1/c as long between bursts
    full_quota, full_period = quotas[1.0]
    for c, (quota, period) in quotas.items():
        assert quota == full_quota, f"capacity {c}: burst {quota} us, a full-speed worker's {full_quota} us"
        assert period == pytest.approx(full_period / c, abs=1)
        assert quota / period == pytest.approx(c * share, rel=1e-3)


def test_quota_corrections_scale_by_cpu_per_step_over_the_full_speed_workers_median():
    # Prepare: two full-speed workers (16 and 18 ms a step: median 17), a 0.5 that needs 10%
    # more CPU per step, a 0.25 that needs 20% more
    cpu = [0.016, 0.018, 0.0187, 0.0204]
    # Execute
    corr = quota_corrections(cpu, [1, 1, 0.5, 0.25])
    # Assert
    assert corr == pytest.approx([16 / 17, 18 / 17, 1.1, 1.2])


def test_quota_corrections_reference_the_fastest_tier_and_stay_in_range():
    # no capacity-1 worker: the highest capacity present is the reference
    assert quota_corrections([0.02, 0.024], [0.5, 0.25]) == pytest.approx([1.0, 1.2])
    # a worker 5x or 0.1x the reference is held to the range; one with no measurement keeps 1
    assert quota_corrections([0.01, 0.05, 0.001, 0.0], [1, 0.5, 0.5, 0.5]) == pytest.approx([1.0, 1.33, 0.75, 1.0])
    # no valid reference: nothing is scaled
    assert quota_corrections([0.0, 0.02], [1, 0.5]) == [1.0, 1.0]
    with pytest.raises(ValueError, match="2 CPU times for 3 capacities"):
        quota_corrections([0.1, 0.1], [1, 1, 1])


def test_correct_refuses_a_factor_that_is_not_positive():
    t = Throttle(0.5, "cgroup")
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="must be a positive number"):
            t.correct(bad)
    t.correct(1.1)  # not attached: kept for when it is
    assert t.correction == 1.1


# ---------------------------------------------------------------------------------- real cgroup

ATTACH = """
import json, os, sys
from elfish_mpi.throttle import Throttle, ThrottleError

def own():
    return open("/proc/self/cgroup").read().splitlines()

def quota(g, v):
    if v == 2:
        return (g / "cpu.max").read_text().split()
    return [(g / "cpu.cfs_quota_us").read_text().strip(), (g / "cpu.cfs_period_us").read_text().strip()]

t = Throttle(0.5, "cgroup")
try:
    t.attach(worker=1, num_workers=4, job_id="unittest%d" % os.getpid(), threads=1)
except ThrottleError as exc:
    print(json.dumps({"skip": str(exc)}))
    sys.exit(0)
g, v = t.cgroup, t._cgroup_version
out = {"group": str(g), "version": v, "pid": os.getpid(), "share": t.share, "quota": quota(g, v),
       "procs": (g / "cgroup.procs").read_text().split(), "own": own()}
t.capacity = 1.0  # a capacity trace changes it mid-run: the quota follows
out["quota_full"] = quota(g, v)
t.correct(1.2)  # match_quotas measured 20% more CPU per step than a full-speed worker's
out["quota_corrected_full"] = quota(g, v)  # (at most a full-speed worker's quota)
t.capacity = 0.5  # the correction holds through a capacity change
out["quota_half_corrected"] = quota(g, v)
if "--no-detach" in sys.argv:  # leave it to atexit
    print(json.dumps(out))
    sys.exit(0)
t.detach()
t.detach()  # twice is fine
out["exists_after"] = g.exists()
out["own_after"] = own()
print(json.dumps(out))
"""


def _attach(*extra) -> dict:
    if os.geteuid() != 0:
        pytest.skip("cgroup throttling needs root (or a delegated cgroup v2 subtree) to create groups")
    proc = subprocess.run([sys.executable, "-c", ATTACH, *extra], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout.strip().splitlines()[-1])
    if "skip" in info:
        pytest.skip(f"no writable cgroup hierarchy on this machine: {info['skip']}")
    return info


def test_cgroup_attach_sets_quota_moves_process_and_detach_removes_group():
    info = _attach()
    share = min(CORES / 4, 1.0)
    quota, period = cgroup_quota(0.5, share)
    group = Path(info["group"])
    # Prepare/Execute happened in the child; Assert on what it saw
    assert group.name.startswith("elfish-unittest") and group.name.endswith("-w1")
    assert info["share"] == pytest.approx(share)
    assert info["quota"] == [str(quota), str(period)]
    assert str(info["pid"]) in info["procs"]  # the whole process (cgroup.procs), not one thread
    assert any(line.endswith("/" + group.name) for line in info["own"]), info["own"]
    full_quota, full_period = cgroup_quota(1.0, share)
    assert info["quota_full"] == [str(full_quota), str(full_period)]
    assert info["quota_corrected_full"] == info["quota_full"]  # capacity x correction is held to 1
    assert info["quota_half_corrected"] == [str(q) for q in cgroup_quota(0.6, share)]
    assert info["quota_half_corrected"] != [str(q) for q in cgroup_quota(0.5, share)]
    assert info["exists_after"] is False
    assert not any(group.name in line for line in info["own_after"])
    assert not group.exists()


def test_cgroup_group_is_removed_at_exit_without_detach():
    info = _attach("--no-detach")
    group = Path(info["group"])
    deadline = time.monotonic() + 5
    while group.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not group.exists()


# ---------------------------------------------------------------------------------- error paths


def _fake_v1(root: Path) -> Path:
    root.mkdir()
    for name in ("cpu.cfs_quota_us", "cpu.cfs_period_us", "cgroup.procs", "tasks"):
        (root / name).write_text("")
    return root


def _fake_v2_without_cpu(root: Path) -> Path:
    root.mkdir()
    (root / "cgroup.controllers").write_text("memory pids\n")
    (root / "cgroup.subtree_control").write_text("")
    return root


def test_cgroup_error_lists_every_place_tried(tmp_path, monkeypatch):
    # Prepare: nothing usable - a missing path, a plain directory, v2 without the cpu controller
    roots = [tmp_path / "missing", tmp_path / "plain", _fake_v2_without_cpu(tmp_path / "v2")]
    (tmp_path / "plain").mkdir()
    monkeypatch.setattr(Throttle, "cgroup_roots", [str(r) for r in roots])
    t = Throttle(0.5, "cgroup")

    # Execute
    with pytest.raises(ThrottleError) as info:
        t.attach(worker=0, num_workers=2, job_id="x")

    # Assert
    msg = str(info.value)
    assert "needs a writable cgroup" in msg
    assert "v2" in msg and "v1 cpu controller" in msg
    for r in roots:
        assert str(r) in msg
    assert "missing" in msg and "not a cgroup" in msg
    assert "cpu controller is not available" in msg
    assert 'workers.throttle = "sleep" or "virtual"' in msg
    assert not t.attached
    t.detach()  # nothing to undo, no error


READ_ONLY = """
import json, os, sys
from elfish_mpi.throttle import Throttle, ThrottleError
if os.geteuid() == 0:  # root ignores permissions: become an ordinary user (modules already loaded)
    os.setgroups([])
    os.setresgid(65534, 65534, 65534)
    os.setresuid(65534, 65534, 65534)
if sys.argv[1] != "-":
    Throttle.cgroup_roots = [sys.argv[1]]
try:
    Throttle(0.5, "cgroup").attach(worker=2, num_workers=4, job_id="ro")
    print(json.dumps({"error": None}))
except ThrottleError as exc:
    print(json.dumps({"error": str(exc)}))
"""


@pytest.fixture
def open_tmp():
    """A temporary directory an ordinary user can look into (pytest's tmp_path is private to root)."""
    path = Path(tempfile.mkdtemp(prefix="elfish-throttle-"))
    path.chmod(0o755)
    yield path
    for p in path.rglob("*"):
        p.chmod(0o755)
    shutil.rmtree(path, ignore_errors=True)


def test_cgroup_error_when_the_cgroup_root_is_read_only(open_tmp):
    # Prepare: a v1-looking hierarchy nobody may write to
    root = _fake_v1(open_tmp / "cpu")
    for p in [*root.iterdir(), root]:
        p.chmod(0o555 if p.is_dir() else 0o444)

    # Execute
    proc = subprocess.run([sys.executable, "-c", READ_ONLY, str(root)], capture_output=True, text=True, timeout=60)

    # Assert
    assert proc.returncode == 0, proc.stderr
    msg = json.loads(proc.stdout.strip().splitlines()[-1])["error"]
    assert msg is not None
    assert "needs a writable cgroup" in msg
    assert f"{root} (cgroup v1:" in msg
    assert "not writable" in msg or "Permission denied" in msg
    assert not (root / "elfish-ro-w2").exists()


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to drop to an ordinary user")
def test_cgroup_error_for_an_ordinary_user_on_this_machine():
    # The real hierarchies, as an ordinary (SLURM-like) user sees them.
    proc = subprocess.run([sys.executable, "-c", READ_ONLY, "-"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    msg = json.loads(proc.stdout.strip().splitlines()[-1])["error"]
    if msg is None:
        pytest.skip("this machine delegates a writable cgroup to ordinary users")
    assert "needs a writable cgroup" in msg and "Tried:" in msg


# ---------------------------------------------------------------------------------- affinity


@pytest.mark.parametrize(
    "caps, cores, threads, expect",
    [
        ([1, 1], 2, 1, [[0], [1]]),
        ([1, 1, 1, 1], 2, 1, [[0], [1], [0], [1]]),  # equal shares of the cores
        ([1, 0.5, 0.5], 2, 1, [[0], [1], [1]]),  # the two halves share a core
        ([1, 0.5], 8, None, [[0, 1, 2, 3], [4, 5]]),  # exact 2:1 beats using all 8 cores
        ([1, 0.5, 0.25], 7, None, [[0, 1, 2, 3], [4, 5], [6]]),
        ([1, 1, 0.5, 0.25], 16, None, [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9], [10]]),
        ([0.5, 0.5], 4, None, [[0, 1], [2, 3]]),  # relative speeds: both equal
        ([1, 0.9], 2, 1, [[0], [1]]),  # 0.9 -> 1.0 is 11 % off: accepted
        ([1, 1], [4, 6], 1, [[4], [6]]),  # the cores we may use, not 0..n-1
    ],
)
def test_affinity_plan(caps, cores, threads, expect):
    assert affinity_plan(caps, cores, threads) == expect


@pytest.mark.parametrize(
    "caps, cores, threads, worker",
    [
        ([1, 1, 0.5, 0.25], 2, 1, "worker 3"),  # this machine's quickstart fleet
        ([1, 0.5], 8, 1, "worker 1"),  # single-threaded workers run at one core's speed, however many
        ([1, 0.2, 0.533], 2, 1, "worker 1"),
        ([1, 0.7], 2, None, "worker 1"),
    ],
)
def test_affinity_plan_refuses_what_whole_cores_cannot_express(caps, cores, threads, worker):
    with pytest.raises(ThrottleError) as info:
        affinity_plan(caps, cores, threads)
    msg = str(info.value)
    assert "cannot express capacity" in msg and worker in msg
    assert f"{cores} core(s) for {len(caps)} worker(s)" in msg
    assert '"cgroup", "sleep" or "virtual"' in msg


@pytest.mark.skipif(CORES < 2, reason="needs 2 cores to pin workers apart")
def test_affinity_attach_pins_and_detach_restores():
    home = os.sched_getaffinity(0)
    t = Throttle(1.0, "affinity")
    t.attach(worker=1, num_workers=2, job_id="aff", local_workers=[0, 1], threads=1)
    try:
        assert os.sched_getaffinity(0) == {sorted(home)[1]}
        assert t.cores == [sorted(home)[1]]
    finally:
        t.detach()
    t.detach()
    assert os.sched_getaffinity(0) == home


def test_affinity_attach_refuses_quickstart_fleet_on_small_node():
    t = Throttle(0.25, "affinity")
    with pytest.raises(ThrottleError, match="cannot express capacity"):
        t.attach(worker=3, num_workers=4, job_id="aff", capacities=[1, 1, 0.5, 0.25], threads=1)
    assert not t.attached


# ---------------------------------------------------------------------------------- sleep, attached


def _busy(seconds: float) -> float:
    c0 = time.process_time()
    x = 0
    while time.process_time() - c0 < seconds:
        for i in range(1000):
            x += i
    return time.process_time() - c0


def test_attached_sleep_holds_full_speed_worker_to_its_fair_share():
    # Twice as many workers as cores: each full-speed worker gets half a core.
    t = Throttle(1.0, "sleep")
    t.attach(worker=0, num_workers=2 * CORES, job_id="s", threads=1)
    try:
        cpu, step = t.run(_busy, 0.02)
    finally:
        t.detach()
    assert t.share is None  # detached
    assert step.wall >= 1.8 * cpu  # CPU time / 0.5 (slept for it, or the machine was that busy)


def test_set_capacity_without_attach_and_validation():
    t = Throttle(1.0, "sleep")
    t.set_capacity(0.5)
    assert t.capacity == 0.5
    t.capacity = 0.25  # plain assignment still works
    assert t.capacity == 0.25
    with pytest.raises(ValueError, match="capacity"):
        t.set_capacity(0.0)
