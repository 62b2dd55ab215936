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
# the wait for the node to come up.
set -euo pipefail

die() { echo "cluster.sh: $*" >&2; exit 1; }
usage() { die "usage: cluster.sh up|down|status DIR"; }

[ $# -eq 2 ] || usage
cmd=$1
dir=$2

find_sbin() {  # slurmctld/slurmd/munged live in /usr/sbin, which may not be on PATH
    command -v "$1" 2>/dev/null || { [ -x "/usr/sbin/$1" ] && echo "/usr/sbin/$1"; } || return 1
}

install_packages() {
    local missing=0
    for b in slurmctld slurmd munged sbatch srun; do
        find_sbin "$b" >/dev/null || missing=1
    done
    [ $missing -eq 0 ] && return 0
    [ "$(id -u)" = 0 ] || die "slurm-wlm/munge are not installed and we are not root to install them"
    [ "${ELFISH_SLURM_NO_INSTALL:-0}" = 1 ] && die "slurm-wlm/munge are not installed (ELFISH_SLURM_NO_INSTALL=1)"
    command -v apt-get >/dev/null || die "slurm-wlm/munge are not installed and there is no apt-get"
    echo "cluster.sh: installing slurm-wlm munge" >&2
    apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge >/dev/null
}

free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# start_daemon NAME PIDFILE CMD...: run a daemon in the foreground mode under `timeout`, in
# its own session, so that a test run killed before its teardown cannot leave it running
# for more than ELFISH_SLURM_LIFETIME seconds (default 3600). Waits for its pid file.
start_daemon() {
    local name=$1 pidfile=$2
    shift 2
    rm -f "$pidfile"
    setsid timeout --kill-after=10 "${ELFISH_SLURM_LIFETIME:-3600}" "$@" \
        >>"$dir/$name.stdout" 2>&1 </dev/null &
    for _ in $(seq 100); do
        [ -s "$pidfile" ] && return 0
        kill -0 $! 2>/dev/null || break
        sleep 0.1
    done
    cat "$dir/$name.stdout" >&2 2>/dev/null || true
    die "$name did not start (see $dir/$name.stdout and its log in $dir)"
}

stop_pidfile() {  # stop_pidfile FILE NAME: TERM, then KILL after 10 s
    local f=$1 name=$2 pid
    [ -f "$f" ] || return 0
    pid=$(cat "$f" 2>/dev/null || true)
    if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
        kill -TERM "$pid" 2>/dev/null || true
        for _ in $(seq 100); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.1
        done
        if kill -0 "$pid" 2>/dev/null; then
            echo "cluster.sh: $name ($pid) did not stop; killing it" >&2
            kill -KILL "$pid" 2>/dev/null || true
        fi
    fi
    rm -f "$f"
}

down() {
    [ -d "$dir" ] || return 0
    dir=$(cd "$dir" && pwd)
    if [ -f "$dir/slurm.conf" ]; then
        # Cancel what is left so slurmd does not leave job processes behind.
        SLURM_CONF="$dir/slurm.conf" timeout 10 scancel --full --signal=KILL --user=root >/dev/null 2>&1 || true
        SLURM_CONF="$dir/slurm.conf" timeout 10 scancel --user=root >/dev/null 2>&1 || true
    fi
    stop_pidfile "$dir/slurmd.pid" slurmd
    stop_pidfile "$dir/slurmctld.pid" slurmctld
    stop_pidfile "$dir/munge/munged.pid" munged
}

up() {
    [ "$(id -u)" = 0 ] || die "the test cluster runs its daemons as root (SlurmUser=root); run as root"
    install_packages
    local slurmctld slurmd munged host cpus ctld_port d_port deadline
    slurmctld=$(find_sbin slurmctld) || die "slurmctld not found"
    slurmd=$(find_sbin slurmd) || die "slurmd not found"
    munged=$(find_sbin munged) || die "munged not found"
    mkdir -p "$dir"
    dir=$(cd "$dir" && pwd)
    down  # a previous cluster in the same directory
    mkdir -p "$dir/state" "$dir/spool" "$dir/munge"
    chmod 700 "$dir/munge"

    # munge: a private key (created if missing), socket, pid, log and seed file.
    if [ ! -s "$dir/munge/munge.key" ]; then
        if command -v mungekey >/dev/null 2>&1 || [ -x /usr/sbin/mungekey ]; then
            "$(find_sbin mungekey)" --create --keyfile="$dir/munge/munge.key" --force
        else
            dd if=/dev/urandom of="$dir/munge/munge.key" bs=1024 count=1 status=none
        fi
    fi
    chmod 400 "$dir/munge/munge.key"
    start_daemon munged "$dir/munge/munged.pid" "$munged" --foreground --force \
        --socket="$dir/munge/munge.socket" --key-file="$dir/munge/munge.key" \
        --pid-file="$dir/munge/munged.pid" --log-file="$dir/munge/munged.log" \
        --seed-file="$dir/munge/munged.seed"
    for _ in $(seq 50); do
        [ -S "$dir/munge/munge.socket" ] && break
        sleep 0.1
    done
    munge --socket="$dir/munge/munge.socket" -n </dev/null | unmunge --socket="$dir/munge/munge.socket" >/dev/null \
        || die "munge does not work (see $dir/munge/munged.log)"

    # slurm.conf
    host=$(hostname -s)
    cpus=${ELFISH_SLURM_CPUS:-8}
    ctld_port=$(free_port)
    d_port=$(free_port)
    while [ "$d_port" = "$ctld_port" ]; do d_port=$(free_port); done
    cat >"$dir/slurm.conf" <<EOF
# One-node test cluster on loopback (tests/slurm/cluster.sh)
ClusterName=elfishtest
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$ctld_port
SlurmdPort=$d_port
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# A private munged; cred_expire bounds how long a requeued job waits before it may start
# again (slurmctld holds it back for cred_expire + 1 s; the default is 120 s).
AuthInfo=socket=$dir/munge/munge.socket,cred_expire=10
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/slurmctld.log
SlurmdLogFile=$dir/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/builtin
# Test pending jobs every 2 s (default 60 s), so a requeued job starts soon after its begin time.
SchedulerParameters=sched_interval=2
MpiDefault=pmi2
# Job ids of their own per cluster: a job killed in an earlier cluster may have left MPICH
# shared-memory segments whose names derive from the job id, which a new job 1 would meet.
FirstJobId=$(( RANDOM * 1000 + 1000 ))
JobRequeue=1
KillWait=30
ReturnToService=2
SlurmdParameters=config_overrides
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
MinJobAge=600
InactiveLimit=0
NodeName=$host NodeAddr=127.0.0.1 NodeHostname=$host CPUs=$cpus State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
EOF
    cat >"$dir/env" <<EOF
export SLURM_CONF=$dir/slurm.conf
EOF
    export SLURM_CONF="$dir/slurm.conf"

    start_daemon slurmctld "$dir/slurmctld.pid" "$slurmctld" -D -i -f "$dir/slurm.conf"
    start_daemon slurmd "$dir/slurmd.pid" "$slurmd" -D -f "$dir/slurm.conf" -N "$host"

    deadline=$((SECONDS + ${ELFISH_SLURM_BOOT_TIMEOUT:-60}))
    local state=""
    while [ $SECONDS -lt $deadline ]; do
        state=$(timeout 10 sinfo -h -N -n "$host" -o '%T' 2>/dev/null || true)
        case "$state" in
            idle) break ;;
            down*|drain*) timeout 10 scontrol update NodeName="$host" State=RESUME >/dev/null 2>&1 || true ;;
        esac
        sleep 0.5
    done
    if [ "$state" != idle ]; then
        echo "cluster.sh: node $host is '${state:-unknown}', not idle, after ${ELFISH_SLURM_BOOT_TIMEOUT:-60} s" >&2
        tail -n 20 "$dir/slurmctld.log" "$dir/slurmd.log" >&2 || true
        down
        exit 1
    fi
    echo "cluster.sh: node $host idle ($cpus CPUs); source $dir/env"
}

case "$cmd" in
    up) up ;;
    down) down ;;
    status)
        SLURM_CONF="$(cd "$dir" && pwd)/slurm.conf" sinfo -N -l
        ;;
    *) usage ;;
esac
