"""elfish-mpi over two SLURM nodes on one machine (tests/slurm/cluster2.sh).

The cluster's two nodes are network + UTS namespaces (hostnames node1 and node2, their own
addresses on a private bridge); the file system is shared. Checks that

* `srun --mpi=pmi2 -N 2 -n 3` gives one MPI world across both hosts, whose
  `Split_type(COMM_TYPE_SHARED)` communicators are the ranks of each node (as many as SLURM
  put there), and whose traffic crosses the bridge;
* a training job completes over two nodes, launched by srun from outside the allocation, by
  `launch/slurm/elfish.sbatch` with `--nodes=2`, and by MPICH's own `mpiexec` (hydra, with
  SLURM as its launcher) inside an `sbatch --nodes=2` allocation: a checkpoint of the last
  round whose provenance names both hosts.

MPICH runs with the settings cluster2.sh writes to DIR/env (libfabric tcp on the nodes'
interface elfish0; hydra's control address on it): see tests/slurm/README.

Runs as root with slurm-wlm, munge, iproute2 and util-linux; skipped under the same
conditions as test_slurm.py (not root, SLURM not installed, ELFISH_SLURM_TESTS=0), where
network namespaces cannot be made, and with ELFISH_SLURM_2NODE=0. 1-1.5 minutes on 2 cores.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import slurm_tools
from slurm_tools import ROOT, SAMPLE, SBATCH, SLURM_TOOLS, booted, skip_reason, tail

CLUSTER2 = ROOT / "tests" / "slurm" / "cluster2.sh"
CONFIG = ROOT / "launch" / "configs" / "quickstart.toml"
NODES = 2
RANKS = 3  # rank 0 aggregates, two workers: 2 tasks on node1 and 1 on node2
ROUNDS = 2
TOOLS = SLURM_TOOLS + ("ip", "nsenter", "unshare")
TRAIN_ARGS = (
    "--config", str(CONFIG),
    "--set", f"run.rounds={ROUNDS}", "--set", "train.local_steps=3", "--set", "workers.throttle=virtual",
    "--set", "workers.capacity=[1.0,0.5]", "--set", f"data.path={SAMPLE}",
    "--set", "data.test_samples=200", "--set", "data.max_samples=300", "--set", "checkpoint.every=1",
)


def _skip_reason() -> str | None:
    reason = skip_reason(TOOLS, "not installed: {missing} (apt-get install slurm-wlm munge iproute2 util-linux, "
                                "or set ELFISH_SLURM_TESTS=1 to let tests/slurm/cluster2.sh install them)",
                         switch="ELFISH_SLURM_2NODE")
    if reason is None and os.geteuid() == 0 and shutil.which("unshare"):
        p = subprocess.run(["unshare", "--net", "--uts", "true"], capture_output=True, text=True, timeout=30)
        if p.returncode != 0:
            return f"cannot create network/UTS namespaces here: {p.stderr.strip()}"
    return reason


_REASON = _skip_reason()
pytestmark = [pytest.mark.skipif(_REASON is not None, reason=_REASON or ""), pytest.mark.timeout(900)]


# ----------------------------------------------------------------------------- helpers
class Cluster(slurm_tools.Cluster):
    """The several-node cluster: its env also drops the MPI settings this process may have
    (cluster2.sh's DIR/env gives the cluster's) and puts this checkout first on PYTHONPATH;
    ``nodes`` maps each node's name to its address and the root end of its veth."""

    DROP = slurm_tools.Cluster.DROP + ("MPIR_CVAR_", "FI_", "UCX_")
    RUN_TIMEOUT = 60.0

    def __init__(self, path: Path):
        super().__init__(path)
        self.env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), self.env.get("PYTHONPATH", "")) if p)
        # bridge NAME ADDR / nodeN ADDR HOST-VETH
        rows = [line.split() for line in (path / "network").read_text().splitlines() if line.strip()]
        self.nodes = {r[0]: (r[1], r[2]) for r in rows if r[0] != "bridge"}

    def log_files(self) -> list[Path]:
        return [self.path / "slurmctld.log"] + sorted(self.path.glob("nodes/*/slurmd.log"))

    def traffic(self) -> dict[str, int]:
        """Bytes received + sent so far by each node's veth (its root end, on the bridge)."""
        out = {}
        for name, (_, veth) in self.nodes.items():
            stats = Path("/sys/class/net") / veth / "statistics"
            out[name] = int((stats / "rx_bytes").read_text()) + int((stats / "tx_bytes").read_text())
        return out

    def wait_job(self, jobid: str, output: Path, timeout: float) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            info = self.job(jobid)
            if info.get("JobState") not in (None, "PENDING", "CONFIGURING", "RUNNING", "COMPLETING"):
                return info
            if time.monotonic() > deadline:
                raise AssertionError(f"job {jobid} did not end within {timeout:.0f} s: {info}\n"
                                     f"--- {output.name}\n{tail(output, 60)}\n{self.logs()}")
            time.sleep(0.5)


def checkpoint_attrs(path: Path) -> dict:
    import h5py

    with h5py.File(path, "r") as f:
        return {k: (v.decode() if isinstance(v, bytes) else v) for k, v in f.attrs.items()}


def check_trained_over_both_nodes(cluster: Cluster, run: Path, jobid: str, diagnose: str):
    ckpt = run / "checkpoint.h5"
    assert ckpt.is_file(), f"no {ckpt}\n{diagnose}"
    attrs = checkpoint_attrs(ckpt)
    assert int(attrs["round"]) == ROUNDS, diagnose
    assert attrs["provenance_hostnames"].split(",") == sorted(cluster.nodes), (attrs["provenance_hostnames"], diagnose)
    assert attrs["provenance_world_size"] == str(RANKS), diagnose
    assert attrs["provenance_job_id"] == f"SLURM_JOB_ID={jobid}", diagnose


# ---------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    path = tmp_path_factory.mktemp("slurm2")
    with booted(CLUSTER2, path, f"{NODES}-node SLURM test cluster", down_timeout=180,
                env=dict(os.environ, ELFISH_SLURM_NODES=str(NODES))):
        yield Cluster(path)


# ------------------------------------------------------------------------------- tests
PROBE = """\
import json, os, socket
import numpy as np
from mpi4py import MPI
world = MPI.COMM_WORLD
node = world.Split_type(MPI.COMM_TYPE_SHARED)
payload = np.full(PAYLOAD // 8, float(world.rank))
total = np.empty_like(payload)
world.Allreduce(payload, total)
print(json.dumps(dict(
    rank=world.rank, size=world.size, host=socket.gethostname(),
    node_ranks=node.allgather(world.rank), node_size=node.size,
    slurm_node=int(os.environ["SLURM_NODEID"]), tasks_per_node=os.environ["SLURM_STEP_TASKS_PER_NODE"],
    sum=float(total[0]) if np.all(total == total[0]) else None,
)), flush=True)
"""
PAYLOAD = 4 << 20  # bytes allreduced: at least this much must cross each node's veth


def expand_tasks_per_node(spec: str) -> list[int]:
    """SLURM's "2(x3),1" -> [2, 2, 2, 1]."""
    out = []
    for part in spec.split(","):
        m = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part)
        assert m, spec
        out += [int(m.group(1))] * int(m.group(2) or 1)
    return out


def test_srun_pmi2_world_spans_two_hosts_grouped_by_node(cluster):
    """srun --mpi=pmi2 -N 2 -n 3: one world of 3 over node1 and node2; COMM_TYPE_SHARED
    groups exactly the ranks of each node (sizes = SLURM's tasks per node); the allreduce's
    bytes went over the bridge."""
    before = cluster.traffic()
    p = cluster.run("srun", "--mpi=pmi2", "--kill-on-bad-exit=1", f"--nodes={NODES}", f"--ntasks={RANKS}",
                    sys.executable, "-c", PROBE.replace("PAYLOAD", str(PAYLOAD)), timeout=120)
    after = cluster.traffic()
    rows = sorted((json.loads(line) for line in p.stdout.splitlines() if line.startswith("{")), key=lambda r: r["rank"])
    diagnose = f"{p.stdout}\n{p.stderr}\n{cluster.logs()}"
    assert [r["rank"] for r in rows] == list(range(RANKS)), diagnose
    assert all(r["size"] == RANKS for r in rows), diagnose
    assert all(r["sum"] == RANKS * (RANKS - 1) / 2 for r in rows), diagnose
    hosts = {r["host"] for r in rows}
    assert hosts == set(cluster.nodes), diagnose  # both nodes, by their own hostnames
    per_node = expand_tasks_per_node(rows[0]["tasks_per_node"])
    assert len(per_node) == NODES and sum(per_node) == RANKS, diagnose
    for r in rows:
        same_host = sorted(q["rank"] for q in rows if q["host"] == r["host"])
        assert sorted(r["node_ranks"]) == same_host, diagnose
        assert r["node_size"] == per_node[r["slurm_node"]] == len(same_host), diagnose
    moved = {name: after[name] - before[name] for name in after}
    assert all(b >= PAYLOAD for b in moved.values()), f"bytes over each node's veth: {moved}\n{diagnose}"
    print(f"\nranks per node {per_node}; bytes over the veths {moved}", file=sys.stderr)


def test_training_over_two_nodes_with_srun(cluster, tmp_path):
    """elfish-mpi train under srun --mpi=pmi2 -N 2 -n 3, from outside an allocation."""
    run = tmp_path / "run"
    t0 = time.monotonic()
    p = cluster.run("srun", "--mpi=pmi2", "--kill-on-bad-exit=1", f"--nodes={NODES}", f"--ntasks={RANKS}",
                    sys.executable, "-m", "elfish_mpi", "train", "--out", str(run), *TRAIN_ARGS,
                    timeout=300, check=False, cwd=tmp_path)
    diagnose = f"srun exited with {p.returncode}\n{p.stdout[-4000:]}\n{p.stderr[-4000:]}\n{cluster.logs()}"
    assert p.returncode == 0, diagnose
    assert f"round    {ROUNDS}/{ROUNDS}" in p.stdout, diagnose
    m = re.search(r"SLURM_JOB_ID=(\d+)", checkpoint_attrs(run / "checkpoint.h5").get("provenance_job_id", ""))
    check_trained_over_both_nodes(cluster, run, m.group(1) if m else "?", diagnose)
    print(f"\nsrun training job: {time.monotonic() - t0:.1f} s", file=sys.stderr)


def run_batch(cluster: Cluster, tmp_path: Path, script: Path, *options: str, env: dict | None = None):
    """sbatch --nodes=2 --ntasks=3 SCRIPT, waited for: (job id, job record, output text)."""
    t0 = time.monotonic()
    out = cluster.run("sbatch", "--parsable", f"--nodes={NODES}", f"--ntasks={RANKS}", "--output=job-%j.out",
                      *options, str(script), cwd=tmp_path, env=env).stdout
    jobid = out.strip().split(";")[0]
    output = tmp_path / f"job-{jobid}.out"
    info = cluster.wait_job(jobid, output, 300)
    text = output.read_text(errors="replace") if output.exists() else "(no output file)"
    print(f"\n{script.name} job {jobid}: {info.get('JobState')} after {time.monotonic() - t0:.1f} s",
          file=sys.stderr)
    return jobid, info, f"job {jobid}: {info}\n--- {output.name}\n{text[-6000:]}\n{cluster.logs()}"


def test_training_over_two_nodes_with_elfish_sbatch(cluster, tmp_path):
    """launch/slurm/elfish.sbatch with --nodes=2: its srun spans both nodes."""
    run = tmp_path / "run"
    env = dict(cluster.env, ELFISH_CONFIG=str(CONFIG), ELFISH_OUT=str(run),
               ELFISH_ARGS=" ".join(TRAIN_ARGS[2:]))  # (without --config: the template passes ELFISH_CONFIG)
    if (Path(sys.prefix) / "bin" / "activate").exists():  # the template's srun runs `python`: ours
        env["ELFISH_PYTHON_ENV"] = sys.prefix
    jobid, info, diagnose = run_batch(cluster, tmp_path, SBATCH, "--export=ALL", env=env)
    assert info.get("JobState") == "COMPLETED" and info.get("ExitCode") == "0:0", diagnose
    assert f"job {jobid} on node[1-2], {RANKS} tasks" in diagnose, diagnose
    check_trained_over_both_nodes(cluster, run, jobid, diagnose)


def test_training_over_two_nodes_with_mpiexec_in_sbatch(cluster, tmp_path):
    """MPICH's mpiexec (hydra, -launcher slurm) inside an sbatch --nodes=2 allocation: it starts
    its proxies with srun on both nodes, and they start the ranks."""
    run = tmp_path / "run"
    mpiexec = Path(sys.executable).with_name("mpiexec")
    if not mpiexec.exists():
        mpiexec = Path(shutil.which("mpiexec") or "mpiexec")
    script = tmp_path / "mpiexec.sbatch"
    script.write_text(f"""#!/bin/bash
echo "batch script on $(hostname), allocation $SLURM_JOB_NODELIST, $SLURM_NTASKS tasks"
exec timeout 240 {mpiexec} -launcher slurm -n "$SLURM_NTASKS" {sys.executable} -m elfish_mpi train --out {run} \\
    {' '.join(f"'{a}'" for a in TRAIN_ARGS)}
""")
    jobid, info, diagnose = run_batch(cluster, tmp_path, script)
    assert info.get("JobState") == "COMPLETED" and info.get("ExitCode") == "0:0", diagnose
    assert "batch script on node1, allocation node[1-2], 3 tasks" in diagnose, diagnose
    assert f"round    {ROUNDS}/{ROUNDS}" in diagnose, diagnose
    check_trained_over_both_nodes(cluster, run, jobid, diagnose)
