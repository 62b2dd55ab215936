"""Emulated heterogeneity: make a worker of capacity c behave as if it were 1/c times slower.

- ``sleep``: after each step the worker sleeps so that its wall time is T / c, where T is
  the time a full-speed worker would take: the step's wall time, and once the throttle is
  attached at least the step's CPU time over the worker's fair share of the node
  (cores / workers on the node). Like the cgroup quota this holds capacity-1 workers to
  their share too, so the ratios hold on a node with more workers than cores: otherwise
  the fast workers finish early and the slow ones then compute uncontended.
- ``virtual``: no sleeping; every time the worker reports is its virtual clock,
  the CPU time it used divided by c (robust on an oversubscribed machine).
- ``cgroup``: a CPU quota per worker process (cgroup v2 ``cpu.max`` or v1
  ``cpu.cfs_quota_us``): the worker's fair share of the node's cores times c. Every
  worker is capped, capacity-1 ones included, so that on a node with more workers than
  cores the full-speed workers cannot take the slack and the speed ratios hold. Every
  worker runs in bursts of the same length; a slower one waits longer between them
  (:func:`cgroup_quota`). A slowed worker can still need more CPU for the same step than a
  full-speed one (6-13% at 0.25 with 4 workers on 2 cores), and cores can differ in speed,
  so the job scales each quota by the CPU per step it measured on every worker at once
  (:meth:`Throttle.correct`, :func:`quota_corrections`, ``worker.match_quotas``).
- ``affinity``: each worker pinned to a set of cores (``sched_setaffinity``) sized from
  all workers' capacities; only whole cores (or an equal share of one core) can be given,
  so capacities it cannot express within 20 % are refused.
- ``none``: wall time as it is (the cluster's real heterogeneity).

``cgroup`` and ``affinity`` slow the process down for real, so they report wall time.

A :class:`Throttle` runs a unit of work and returns the time it reports for it, in the
clock that planning uses; it also keeps the virtual clock for every mode. The modes that
act on the process (cgroup, affinity) take effect at :meth:`Throttle.attach`, which the
worker calls once before training, and are undone by :meth:`Throttle.detach`.

This module does not use MPI: what a worker knows about the job comes in as arguments.
"""
from __future__ import annotations

import atexit
import math
import os
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Sequence

import numpy as np

MODES = ("sleep", "virtual", "none", "cgroup", "affinity")
TOLERANCE = 0.2  # relative speed error the affinity throttle accepts


class ThrottleError(RuntimeError):
    """The requested throttle cannot be applied on this machine."""


@dataclass
class StepTime:
    reported: float  # what planning sees (wall for sleep/none/cgroup/affinity, virtual for virtual)
    wall: float  # wall seconds including any throttle sleep
    virtual: float  # CPU seconds / capacity


# ---------------------------------------------------------------------------------- helpers


def _check_capacity(c) -> float:
    ok = isinstance(c, (int, float)) and not isinstance(c, bool) and 0.0 < c <= 1.0
    if not ok:
        raise ValueError(f"capacity {c} must be in (0, 1]")
    return float(c)


def _compute_threads() -> int | None:
    """Threads the worker computes with (torch's intra-op pool), None when unknown."""
    torch = sys.modules.get("torch")
    if torch is None:
        return None
    try:
        return max(1, int(torch.get_num_threads()))
    except Exception:  # pragma: no cover - a broken torch
        return None


def _write(path: Path, text: str) -> None:
    """Write a cgroup interface file. Never creates it: these files exist in a real hierarchy."""
    fd = os.open(path, os.O_WRONLY)
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)


def _err(exc: OSError) -> str:
    return exc.strerror or type(exc).__name__


def _set_affinity_all_threads(cores) -> None:
    """sched_setaffinity for every thread of the process (pid 0 would be the calling thread
    only, and torch's thread pool may already exist)."""
    cores = set(cores)
    try:
        tids = [int(t) for t in os.listdir("/proc/self/task")]
    except OSError:  # pragma: no cover - no /proc
        tids = [0]
    for tid in tids:
        try:
            os.sched_setaffinity(tid, cores)
        except ProcessLookupError:  # the thread ended meanwhile
            pass


def cgroup_mounts() -> list[str]:
    """Mount points of the cgroup v2 hierarchy and of v1 hierarchies that carry the cpu controller."""
    v2, v1 = [], []
    try:
        with open("/proc/self/mounts") as fh:
            for line in fh:
                parts = line.split()
                if len(parts) < 4:
                    continue
                point = parts[1].replace("\\040", " ")
                if parts[2] == "cgroup2":
                    v2.append(point)
                elif parts[2] == "cgroup" and "cpu" in parts[3].split(","):
                    v1.append(point)
    except OSError:
        pass
    return v2 + v1


def _own_cgroup(version: int) -> str:
    """This process's cgroup path (relative to the hierarchy's root) in v2 or in v1's cpu hierarchy."""
    try:
        with open("/proc/self/cgroup") as fh:
            for line in fh:
                hid, controllers, path = line.rstrip("\n").split(":", 2)
                if version == 2 and hid == "0" and controllers == "":
                    return path
                if version == 1 and "cpu" in controllers.split(","):
                    return path
    except (OSError, ValueError):
        pass
    return "/"


def fair_share(cores: int, workers_on_node: int, threads: int | None = None) -> float:
    """CPU cores one worker gets when all workers on the node are busy: cores / workers,
    but never more cores than the worker has threads to use them with."""
    share = cores / max(1, workers_on_node)
    if threads is not None:
        share = min(share, float(threads))
    return share


PERIOD_MIN_US, PERIOD_MAX_US, QUOTA_MIN_US = 1000, 1_000_000, 1000  # the kernel's limits


CORRECTION_RANGE = (0.75, 1.33)  # the most a measured quota correction may scale a quota


def quota_corrections(cpu_per_step: Sequence[float], capacities: Sequence[float]) -> list[float]:
    """Each worker's quota correction: its CPU seconds per step over the full-speed workers'
    median (the workers at the highest capacity), all having run the same step at the same
    time under their quotas. A worker that needs 13% more CPU for a step than a full-speed
    one gets 13% more quota, so that its wall time per step is the full-speed one's over its
    capacity. Clipped to :data:`CORRECTION_RANGE`; a worker with no measurement (<= 0) or no
    valid reference gets 1."""
    cpu = np.asarray(cpu_per_step, dtype=np.float64)
    caps = np.asarray(capacities, dtype=np.float64)
    if cpu.shape != caps.shape:
        raise ValueError(f"{cpu.size} CPU times for {caps.size} capacities")
    top = caps == caps.max()
    valid = top & (cpu > 0) & np.isfinite(cpu)
    if not valid.any():
        return [1.0] * cpu.size
    ref = float(np.median(cpu[valid]))
    lo, hi = CORRECTION_RANGE
    return [float(np.clip(c / ref, lo, hi)) if c > 0 and np.isfinite(c) else 1.0 for c in cpu]


def cgroup_quota(capacity: float, share: float, period_us: int = 10_000) -> tuple[int, int]:
    """(quota, period) in microseconds: ``capacity`` times ``share`` cores, in bursts of
    ``share x period_us`` whatever the capacity.

    ``share`` is what a full-speed worker gets (its fair share of the node), so its group
    runs ``share x period_us`` of every ``period_us``. A slower worker keeps that burst and
    waits longer between bursts: its period is ``period_us / capacity``. Each time a
    throttled process runs again it first refills its caches; with one period for all, a
    capacity-0.25 worker ran in bursts 4x shorter than a full-speed one, paid that refill
    4x as often per step (5-10% more CPU per step) and was 4.3-4.6x slower instead of 4x
    (FedAvg, 4 workers on 2 cores; docs/benchmarks.md section 9). Equal bursts make that
    cost per step alike for every worker: a capacity-c worker is a full-speed one stretched
    1/c in time, and every worker's round spans the same number of periods (the same
    rounding at its edges). A short ``period_us`` keeps a full-speed worker's round many
    periods long; 10 ms did better than 40 ms.

    Kernel limits: the quota is at least 1 ms (the burst grows when ``share x period_us``
    is less) and the period at most 1 s (beyond that the burst shrinks instead; below 0.001
    core, one 1 ms quota per second, a worker gets more than asked).
    """
    frac = capacity * share
    burst = max(float(QUOTA_MIN_US), share * period_us)
    period = min(PERIOD_MAX_US, max(PERIOD_MIN_US, int(round(burst / frac))))
    quota = max(QUOTA_MIN_US, int(round(frac * period)))
    return quota, period


# ---------------------------------------------------------------------------------- affinity


def _relative(speeds: Sequence[float]) -> list[float]:
    top = max(speeds)
    return [s / top for s in speeds]


def affinity_plan(
    capacities: Sequence[float],
    cores: int | Sequence[int],
    threads: int | None = None,
    tolerance: float = TOLERANCE,
) -> list[list[int]]:
    """Core sets, one per worker, whose relative speeds best match ``capacities``.

    Candidates (all deterministic):

    - disjoint whole cores: worker i gets max(1, round(c_i / c_max * m)) cores for every
      m = 1..len(cores) that fits; its speed is its core count (capped at ``threads``, the
      threads it computes with, when given);
    - shared single cores: worker i shares one core with others, in groups of about
      s * c_max / c_i workers (s = 1..workers); its speed is 1 / (workers on its core).

    The candidate with the smallest worst relative error (speed_i / max speed against
    c_i / c_max) wins; among equals, the one using more cores. Raises :class:`ThrottleError` when that error is above ``tolerance``.
    """
    caps = [_check_capacity(c) for c in capacities]
    if not caps:
        raise ValueError("affinity_plan needs at least one capacity")
    core_ids = list(range(cores)) if isinstance(cores, int) else sorted(int(c) for c in cores)
    n, w = len(core_ids), len(caps)
    if n < 1:
        raise ValueError("affinity_plan needs at least one core")
    asked = _relative(caps)
    candidates: list[tuple[list[float], list[list[int]]]] = []

    if w <= n:  # disjoint sets of whole cores
        for m in range(1, n + 1):
            counts = [max(1, math.floor(r * m + 0.5)) for r in asked]
            if sum(counts) > n:
                continue
            sets, pos = [], 0
            for k in counts:
                sets.append(core_ids[pos : pos + k])
                pos += k
            speeds = [float(min(k, threads) if threads else k) for k in counts]
            candidates.append((speeds, sets))

    if w > n:  # the plain packing: worker i on core i mod n, as a fallback
        load = [sum(1 for j in range(w) if j % n == k) for k in range(n)]
        candidates.append(([1.0 / load[i % n] for i in range(w)], [[core_ids[i % n]] for i in range(w)]))

    for s in range(1, w + 1):  # groups of workers sharing one core each
        size = [max(1, math.floor(s / r + 0.5)) for r in asked]
        groups: list[list[int]] = []
        for g in sorted(set(size)):
            members = [i for i in range(w) if size[i] == g]
            groups += [members[j : j + g] for j in range(0, len(members), g)]
        if len(groups) > n:
            continue
        sets = [[] for _ in range(w)]
        speeds = [0.0] * w
        for core, members in zip(core_ids, groups):
            for i in members:
                sets[i] = [core]
                speeds[i] = 1.0 / len(members)
        candidates.append((speeds, sets))

    def worst(speeds):
        got = _relative(speeds)
        errs = [abs(g - a) / a for g, a in zip(got, asked)]
        i = max(range(w), key=lambda k: errs[k])
        return errs[i], i, got[i]

    best = None
    for speeds, sets in candidates:
        err, i, got = worst(speeds)
        key = (round(err, 9), -len({c for cs in sets for c in cs}), -sum(speeds))
        if best is None or key < best[0]:
            best = (key, sets, err, i, got)
    _, sets, err, i, got = best
    if err > tolerance:
        tail = f" each computing with {threads} thread(s)" if threads else ""
        raise ThrottleError(
            f"the affinity throttle cannot express capacity {caps[i]:g} of worker {i} with {n} core(s) for "
            f"{w} worker(s){tail} on this node (capacities {', '.join(f'{c:g}' for c in caps)}): pinning to whole "
            f"cores gives it relative speed {got:.2f} instead of {asked[i]:.2f} ({err:.0%} off, more than "
            f"{tolerance:.0%}). Use workers.throttle = \"cgroup\", \"sleep\" or \"virtual\" instead."
        )
    return sets


# ---------------------------------------------------------------------------------- throttle


@dataclass
class Throttle:
    capacity: float = 1.0
    mode: str = "none"
    slept: float = field(default=0.0, init=False)

    # Where to look for a writable cgroup hierarchy (cgroup v2 roots, then v1 cpu roots);
    # None: the mounts listed in /proc/self/mounts. Tests point it at fake trees.
    cgroup_roots: ClassVar[Sequence[str] | None] = None
    # A full-speed worker's CFS period; a capacity-c worker's is this / c (see cgroup_quota).
    cgroup_period_us: ClassVar[int] = 10_000
    # The worker group's cpu.shares (v1) / cpu.weight (v2) as a multiple of the kernel's
    # default (1024 / 100): ten, so that the worker reaches its quota when other processes
    # load the node (the quota bounds what it can take from them). None: the default.
    cgroup_weight: ClassVar[int | None] = 10

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"unknown throttle {self.mode!r}; choose one of: {', '.join(MODES)}")
        _check_capacity(self.capacity)
        self._attached = False
        self.worker = 0
        self.num_workers = 1
        self.local_workers: list[int] = [0]
        self.capacities: list[float] = [self.capacity]
        self.threads: int | None = None
        self.cgroup: Path | None = None  # our group (cgroup mode, attached)
        self._cgroup_home: Path | None = None  # the group we came from
        self._cgroup_version = 0
        self._affinity_home: set[int] | None = None
        self.cores: list[int] = []  # affinity mode: the cores we are pinned to
        self.quota: tuple[int, int] | None = None  # cgroup mode: (quota, period) us
        self.detail = ""  # one line saying what attach did
        self.share: float | None = None  # attached: cores a full-speed worker gets (fair share)
        self.correction = 1.0  # cgroup mode: the quota's measured scale (correct())

    def __setattr__(self, name, value):
        if name == "capacity" and getattr(self, "_attached", False):
            self.set_capacity(value)
            return
        object.__setattr__(self, name, value)

    # -- lifecycle ----------------------------------------------------------------
    def attach(
        self,
        *,
        worker: int,
        num_workers: int,
        job_id: str,
        capacities: Sequence[float] | None = None,
        local_workers: Sequence[int] | None = None,
        workers_on_node: int | None = None,
        threads: int | None = None,
    ) -> None:
        """Apply the throttle to this process; the worker calls it once before training.

        ``worker`` is this worker's 0-based index among ``num_workers``; ``job_id`` names
        the cgroup; ``capacities`` are all workers' capacities (default: all 1.0, with this
        worker's own); ``local_workers`` the indices of the workers on this node (default:
        all), which share its cores; ``workers_on_node`` how many ways the node's cores are
        shared for the fair share (default: len(local_workers)); ``threads`` the threads the worker computes with
        (default: torch's thread count when torch is loaded) - no worker gets more cores
        than it has threads. Raises :class:`ThrottleError` when the throttle cannot be applied.
        """
        if self._attached:
            raise RuntimeError("Throttle.attach called twice; call detach() first")
        if not 0 <= worker < num_workers:
            raise ValueError(f"worker {worker} out of range for {num_workers} workers")
        caps = [1.0] * num_workers if capacities is None else [_check_capacity(c) for c in capacities]
        if len(caps) != num_workers:
            raise ValueError(f"{len(caps)} capacities for {num_workers} workers")
        caps[worker] = self.capacity
        local = list(range(num_workers)) if local_workers is None else sorted(int(i) for i in local_workers)
        if worker not in local:
            raise ValueError(f"local_workers {local} do not include this worker ({worker})")
        self.worker, self.num_workers, self.job_id = worker, num_workers, str(job_id)
        self.capacities, self.local_workers = caps, local
        self.threads = threads if threads is not None else _compute_threads()
        if workers_on_node is not None and workers_on_node < 1:
            raise ValueError(f"workers_on_node = {workers_on_node} must be >= 1")
        share = fair_share(len(os.sched_getaffinity(0)), workers_on_node or len(local), self.threads)
        if self.mode == "cgroup":
            self.share = share
            try:
                self._cgroup_attach()
            except BaseException:
                self.share = None
                raise
        elif self.mode == "affinity":
            self._affinity_home = set(os.sched_getaffinity(0))
            try:
                self._affinity_apply()
            except BaseException:
                self._affinity_home = None
                raise
        elif self.mode == "sleep":
            self.share = share
            self.detail = (
                f"sleep: wall time = max(compute wall, CPU time / fair share {share:.3f} core(s)) "
                f"/ capacity {self.capacity:g}"
            )
        else:
            self.detail = f"{self.mode} throttle, capacity {self.capacity:g}"
        object.__setattr__(self, "_attached", True)
        atexit.register(self.detach)

    def detach(self) -> None:
        """Undo :meth:`attach`: leave and remove the cgroup, restore the affinity.
        Safe to call twice, without attach, and from atexit; problems become warnings."""
        if not getattr(self, "_attached", False):
            return
        object.__setattr__(self, "_attached", False)
        try:
            atexit.unregister(self.detach)
        except Exception:  # pragma: no cover
            pass
        if self.cgroup is not None:
            self._cgroup_leave()
        self.share = None
        if self._affinity_home is not None:
            try:
                _set_affinity_all_threads(self._affinity_home)
            except OSError as exc:  # pragma: no cover
                warnings.warn(f"could not restore the CPU affinity: {exc}", RuntimeWarning, stacklevel=2)
            self._affinity_home = None
            self.cores = []

    @property
    def attached(self) -> bool:
        return self._attached

    def set_capacity(self, capacity: float, *, capacities: Sequence[float] | None = None) -> None:
        """Change this worker's capacity mid-run (capacity traces), re-applying the quota or
        the core sets. ``capacities`` (all workers' new capacities) matters for affinity,
        where every worker's core set depends on everyone's capacity."""
        c = _check_capacity(capacity)
        object.__setattr__(self, "capacity", c)
        if capacities is not None:
            caps = [_check_capacity(x) for x in capacities]
            if len(caps) != self.num_workers:
                raise ValueError(f"{len(caps)} capacities for {self.num_workers} workers")
            self.capacities = caps
        if len(self.capacities) > self.worker:
            self.capacities[self.worker] = c
        if not self._attached:
            return
        if self.mode == "cgroup":
            self._cgroup_set_quota(self.cgroup, self._cgroup_version)
        elif self.mode == "affinity":
            self._affinity_apply()

    def correct(self, factor: float) -> None:
        """Scale the cgroup quota by ``factor`` (from :func:`quota_corrections`): the CPU a step
        takes this worker over what it takes a full-speed one; the scaled capacity stays at
        most 1. It holds for the rest of the job, through capacity changes (measured at the
        starting capacity, not again for a trace's). Other modes keep the factor and ignore it."""
        f = float(factor)
        if not (math.isfinite(f) and f > 0):
            raise ValueError(f"quota correction {factor!r} must be a positive number")
        self.correction = f
        if self._attached and self.mode == "cgroup":
            self._cgroup_set_quota(self.cgroup, self._cgroup_version)

    # -- cgroup -------------------------------------------------------------------
    def _cgroup_set_quota(self, group: Path, version: int) -> None:
        # (corrected, never more than a full-speed worker's fair share: the quotas of a node's
        # workers must not add up to more than its cores)
        quota, period = cgroup_quota(min(1.0, self.capacity * self.correction), self.share, self.cgroup_period_us)
        if version == 2:
            _write(group / "cpu.max", f"{quota} {period}")
        else:
            # Lower the quota before changing the period, so quota/period never exceeds a
            # parent's limit in between.
            _write(group / "cpu.cfs_quota_us", str(min(quota, 1000)))
            _write(group / "cpu.cfs_period_us", str(period))
            _write(group / "cpu.cfs_quota_us", str(quota))
        self.quota = (quota, period)
        self.detail = (
            f"cgroup v{version} {group}: quota {quota}/{period} us = {quota / period:.3f} core(s) "
            f"(capacity {self.capacity:g} x fair share {self.share:.3f}"
            + (f" x correction {self.correction:.3f})" if self.correction != 1.0 else ")")
        )

    def _cgroup_attach(self) -> None:
        roots = list(self.cgroup_roots) if self.cgroup_roots is not None else cgroup_mounts()
        name = f"elfish-{self.job_id}-w{self.worker}"
        tried = []
        for root in roots:
            r = Path(root)
            try:
                if (r / "cgroup.controllers").is_file():
                    version = 2
                elif (r / "cpu.cfs_quota_us").is_file():
                    version = 1
                else:
                    tried.append(f"{r} (not a cgroup v2 root or v1 cpu hierarchy)" if r.exists() else f"{r} (missing)")
                    continue
            except OSError as exc:
                tried.append(f"{r} (cannot look into it: {_err(exc)})")
                continue
            own = _own_cgroup(version).strip("/")
            parent = r / own if own and (r / own).is_dir() else r
            why = self._cgroup_try(parent, name, version)
            if why is None:
                return
            tried.append(f"{parent} (cgroup v{version}: {why})")
        lines = "\n  - ".join(tried) if tried else "(no cgroup hierarchy is mounted)"
        raise ThrottleError(
            "workers.throttle = \"cgroup\" needs a writable cgroup: a delegated cgroup v2 subtree with the cpu "
            "controller, or the cgroup v1 cpu controller (usually root on a machine of your own). Tried:\n  - "
            f"{lines}\nUse workers.throttle = \"sleep\" or \"virtual\" instead."
        )

    def _cgroup_try(self, parent: Path, name: str, version: int) -> str | None:
        """Create our group under ``parent`` and move into it; None on success, else why not."""
        if version == 2:
            try:
                available = (parent / "cgroup.controllers").read_text().split()
            except OSError as exc:
                return f"cannot read cgroup.controllers: {_err(exc)}"
            if "cpu" not in available:
                return f"the cpu controller is not available here (cgroup.controllers: {' '.join(available) or 'none'})"
            try:
                enabled = (parent / "cgroup.subtree_control").read_text().split()
            except OSError as exc:
                return f"cannot read cgroup.subtree_control: {_err(exc)}"
            if "cpu" not in enabled:
                try:
                    _write(parent / "cgroup.subtree_control", "+cpu")
                except OSError as exc:
                    return f"cannot enable the cpu controller for child groups: {_err(exc)}"
        if not os.access(parent, os.W_OK):
            return "not writable"
        group = parent / name
        created = False
        try:
            group.mkdir()
            created = True
        except FileExistsError:
            if not group.is_dir():
                return f"{group} exists and is not a directory"
        except OSError as exc:
            return f"cannot create {name}: {_err(exc)}"
        try:
            self._cgroup_set_quota(group, version)
            if self.cgroup_weight is not None:  # a multiple of the default weight
                if version == 2:
                    _write(group / "cpu.weight", str(min(10000, 100 * self.cgroup_weight)))
                else:
                    _write(group / "cpu.shares", str(1024 * self.cgroup_weight))
            _write(group / "cgroup.procs", str(os.getpid()))
        except OSError as exc:
            if created:
                try:
                    group.rmdir()
                except OSError:
                    pass
            self.quota = None
            return f"cannot set up {name}: {_err(exc)} ({exc.filename or group})"
        self.cgroup, self._cgroup_home, self._cgroup_version = group, parent, version
        return None

    def _cgroup_leave(self) -> None:
        group, home = self.cgroup, self._cgroup_home
        self.cgroup = None
        try:
            _write(home / "cgroup.procs", str(os.getpid()))
        except OSError as exc:
            warnings.warn(f"could not move the process back to {home}: {exc}", RuntimeWarning, stacklevel=3)
            return
        for _ in range(50):  # the move is immediate, but a thread may still be exiting
            try:
                group.rmdir()
                return
            except FileNotFoundError:
                return
            except OSError:
                time.sleep(0.01)
        warnings.warn(f"could not remove cgroup {group}", RuntimeWarning, stacklevel=3)

    # -- affinity -----------------------------------------------------------------
    def _affinity_apply(self) -> None:
        cores = sorted(self._affinity_home or os.sched_getaffinity(0))
        local_caps = [self.capacities[i] for i in self.local_workers]
        sets = affinity_plan(local_caps, cores, self.threads)
        mine = sets[self.local_workers.index(self.worker)]
        _set_affinity_all_threads(mine)
        self.cores = list(mine)
        self.detail = (
            f"affinity: cores {','.join(map(str, mine))} of {len(cores)} for {len(local_caps)} worker(s) on this node "
            f"(capacity {self.capacity:g})"
        )

    # -- running ------------------------------------------------------------------
    def run(self, fn, *args, **kwargs):
        """Run ``fn`` under the throttle; returns (fn's result, StepTime)."""
        w0, c0 = time.perf_counter(), time.process_time()
        result = fn(*args, **kwargs)
        compute_wall = time.perf_counter() - w0
        cpu = time.process_time() - c0
        if self.mode == "sleep":
            # The time a full-speed worker would take for this step: its wall time, and once
            # attached at least its CPU time over its fair share of the node's cores, so that
            # every worker - capacity 1 included - is held to its share and none takes the
            # slack the others leave (the same cap as the cgroup throttle's quota).
            full = compute_wall if self.share is None else max(compute_wall, cpu / self.share)
            pause = full / self.capacity - compute_wall
            if pause > 0.0:
                time.sleep(pause)
                self.slept += pause
        wall = time.perf_counter() - w0
        virtual = cpu / self.capacity
        reported = virtual if self.mode == "virtual" else wall
        return result, StepTime(reported, wall, virtual)
