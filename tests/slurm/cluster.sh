#!/usr/bin/env bash
# A real one-node SLURM cluster on loopback, for the SLURM tests (tests/slurm/test_slurm.py).
#
#   bash tests/slurm/cluster.sh up DIR     # boot munged, slurmctld and slurmd; state in DIR
#   source DIR/env                         # SLURM_CONF for sinfo/sbatch/srun/scontrol/...
#   bash tests/slurm/cluster.sh down DIR   # stop the daemons (DIR is kept, with the logs)
#
# Needs root and Debian's slurm-wlm and munge (installed with apt-get when missing and we
# are root, unless ELFISH_SLURM_NO_INSTALL=1). Everything is private to DIR: its own munge
# key and socket, its own ports, state and spool directories, so it neither needs nor
# disturbs a system munged/slurmd. The node is this host, declared with CPUs=8 (more than
# the machine may have: SlurmdParameters=config_overrides) so a job of 3-5 tasks fits.
#
# ELFISH_SLURM_CPUS overrides the CPU count; ELFISH_SLURM_BOOT_TIMEOUT (default 60 s) bounds
# the wait for the node to come up. The daemons run under `timeout` (ELFISH_SLURM_LIFETIME,
# default 3600 s). What this script shares with cluster2.sh (installing the packages,
# starting and stopping daemons, munge, the common slurm.conf lines, waiting for idle
# nodes) is in lib.sh, beside it.
set -euo pipefail

source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"  # die, start_daemon, start_munge, wait_idle, ...

[ $# -eq 2 ] || usage
cmd=$1
dir=$2

down() {
    [ -d "$dir" ] || return 0
    dir=$(cd "$dir" && pwd)
    [ -f "$dir/slurm.conf" ] && cancel_jobs
    stop_pidfile "$dir/slurmd.pid" slurmd
    stop_pidfile "$dir/slurmctld.pid" slurmctld
    stop_pidfile "$dir/munge/munged.pid" munged
}

up() {
    [ "$(id -u)" = 0 ] || die "the test cluster runs its daemons as root (SlurmUser=root); run as root"
    install_packages "slurmctld slurmd munged sbatch srun" "slurm-wlm munge"
    local slurmctld slurmd munged host cpus ctld_port d_port states state
    find_daemons
    mkdir -p "$dir"
    dir=$(cd "$dir" && pwd)
    down  # a previous cluster in the same directory
    mkdir -p "$dir/state" "$dir/spool"
    start_munge "$munged"

    # slurm.conf
    host=$(hostname -s)
    cpus=${ELFISH_SLURM_CPUS:-8}
    pick_ports
    {
        cat <<EOF
# One-node test cluster on loopback (tests/slurm/cluster.sh)
ClusterName=elfishtest
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$ctld_port
SlurmdPort=$d_port
SlurmdSpoolDir=$dir/spool
SlurmdPidFile=$dir/slurmd.pid
SlurmdLogFile=$dir/slurmd.log
EOF
        slurm_conf_common
        echo "NodeName=$host NodeAddr=127.0.0.1 NodeHostname=$host CPUs=$cpus State=UNKNOWN"
        echo "PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO"
    } >"$dir/slurm.conf"
    cat >"$dir/env" <<EOF
export SLURM_CONF=$dir/slurm.conf
EOF
    export SLURM_CONF="$dir/slurm.conf"

    start_daemon slurmctld "$dir/slurmctld.pid" "$slurmctld" -D -i -f "$dir/slurm.conf"
    start_daemon slurmd "$dir/slurmd.pid" "$slurmd" -D -f "$dir/slurm.conf" -N "$host"

    if ! wait_idle 1; then
        state=$(awk '{print $2}' <<<"$states")
        echo "$prog: node $host is '${state:-unknown}', not idle, after ${ELFISH_SLURM_BOOT_TIMEOUT:-60} s" >&2
        tail -n 20 "$dir/slurmctld.log" "$dir/slurmd.log" >&2 || true
        down
        exit 1
    fi
    echo "$prog: node $host idle ($cpus CPUs); source $dir/env"
}

case "$cmd" in
    up) up ;;
    down) down ;;
    status)
        SLURM_CONF="$(cd "$dir" && pwd)/slurm.conf" sinfo -N -l
        ;;
    *) usage ;;
esac
