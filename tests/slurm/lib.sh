# What the test clusters' scripts share (tests/slurm/cluster.sh, one node on loopback, and
# tests/slurm/cluster2.sh, several nodes in network namespaces). Sourced by them, after
# `set -euo pipefail`, from their own directory:
#
#   source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
#
# The functions work on the script's $dir (the cluster's directory, absolute once `up` or
# `down` has made it so) and speak in the script's name ($prog: cluster.sh, cluster2.sh).

prog=${0##*/}

die() { echo "$prog: $*" >&2; exit 1; }
usage() { die "usage: $prog up|down|status DIR"; }

find_sbin() {  # slurmctld/slurmd/munged live in /usr/sbin, which may not be on PATH
    command -v "$1" 2>/dev/null || { [ -x "/usr/sbin/$1" ] && echo "/usr/sbin/$1"; } || return 1
}

# install_packages "PROGRAMS" "PACKAGES": apt-get install PACKAGES (as root, unless
# ELFISH_SLURM_NO_INSTALL=1) when any of PROGRAMS is missing (on PATH or in /usr/sbin).
install_packages() {
    local programs=$1 packages=$2 missing=0 b what
    for b in $programs; do
        find_sbin "$b" >/dev/null || missing=1
    done
    [ $missing -eq 0 ] && return 0
    what=${packages// //}
    [ "$(id -u)" = 0 ] || die "$what are not installed and we are not root to install them"
    [ "${ELFISH_SLURM_NO_INSTALL:-0}" = 1 ] && die "$what are not installed (ELFISH_SLURM_NO_INSTALL=1)"
    command -v apt-get >/dev/null || die "$what are not installed and there is no apt-get"
    echo "$prog: installing $packages" >&2
    timeout 300 apt-get update -qq >/dev/null
    # shellcheck disable=SC2086  # a list of package names
    DEBIAN_FRONTEND=noninteractive timeout 600 apt-get install -y -qq $packages >/dev/null
}

# find_daemons: the paths of slurmctld, slurmd and munged, in the variables of those names
# (the caller's, where it declares them local).
find_daemons() {
    slurmctld=$(find_sbin slurmctld) || die "slurmctld not found"
    slurmd=$(find_sbin slurmd) || die "slurmd not found"
    munged=$(find_sbin munged) || die "munged not found"
}

free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# pick_ports: ctld_port and d_port, two different ports free on 127.0.0.1 (the caller's
# variables, where it declares them local).
pick_ports() {
    ctld_port=$(free_port)
    d_port=$(free_port)
    while [ "$d_port" = "$ctld_port" ]; do d_port=$(free_port); done
}

# start_daemon NAME PIDFILE CMD...: run a daemon in the foreground mode under `timeout`, in
# its own session, so that a test run killed before its teardown cannot leave it running
# for more than ELFISH_SLURM_LIFETIME seconds (default 3600). Its output goes to
# DIR/NAME.stdout. Waits (10 s) for its pid file.
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

stop_pid() {  # stop_pid PID NAME: TERM, then KILL after 10 s
    local pid=$1 name=$2
    [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null || return 0
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 100); do
        kill -0 "$pid" 2>/dev/null || return 0
        sleep 0.1
    done
    echo "$prog: $name ($pid) did not stop; killing it" >&2
    kill -KILL "$pid" 2>/dev/null || true
}

stop_pidfile() {  # stop_pidfile FILE NAME: stop_pid the pid in FILE, and remove FILE
    local f=$1
    [ -f "$f" ] || return 0
    stop_pid "$(cat "$f" 2>/dev/null || true)" "$2"
    rm -f "$f"
}

cancel_jobs() {  # cancel every job left (so slurmd does not leave job processes behind)
    SLURM_CONF="$dir/slurm.conf" timeout 10 scancel --full --signal=KILL --user=root >/dev/null 2>&1 || true
    SLURM_CONF="$dir/slurm.conf" timeout 10 scancel --user=root >/dev/null 2>&1 || true
}

# start_munge MUNGED: a munged private to DIR/munge (mode 700): its key (created if missing),
# socket, pid, log and seed file; checks that a credential goes through it. The socket is a
# file, which a process reaches by its path from any network namespace.
start_munge() {
    local munged=$1
    mkdir -p "$dir/munge"
    chmod 700 "$dir/munge"
    if [ ! -s "$dir/munge/munge.key" ]; then
        if find_sbin mungekey >/dev/null; then
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
}

# slurm_conf_common: the slurm.conf lines both clusters share: everything but the cluster's
# name, the controller's address, the ports, the slurmds' spool, pid and log files, and the
# nodes and partition.
slurm_conf_common() {
    cat <<EOF
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# A private munged; cred_expire bounds how long a requeued job waits before it may start
# again (slurmctld holds it back for cred_expire + 1 s; the default is 120 s).
AuthInfo=socket=$dir/munge/munge.socket,cred_expire=10
StateSaveLocation=$dir/state
SlurmctldPidFile=$dir/slurmctld.pid
SlurmctldLogFile=$dir/slurmctld.log
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
EOF
}

# wait_idle N: wait (ELFISH_SLURM_BOOT_TIMEOUT, default 60 s) for the N nodes of the cluster
# of SLURM_CONF to be idle, resuming any node that is down or drained. Returns 1 if they are
# not all idle by then. Leaves the last "NODE STATE" lines sinfo gave in $states.
wait_idle() {
    local want deadline n s
    want=$(printf 'idle\n%.0s' $(seq "$1"))
    deadline=$((SECONDS + ${ELFISH_SLURM_BOOT_TIMEOUT:-60}))
    states=""
    while [ $SECONDS -lt $deadline ]; do
        states=$(timeout 10 sinfo -h -N -o '%N %T' 2>/dev/null | sort -u || true)
        [ "$(awk '{print $2}' <<<"$states")" = "${want%$'\n'}" ] && return 0
        while read -r n s; do
            case "$s" in
                down*|drain*) timeout 10 scontrol update NodeName="$n" State=RESUME >/dev/null 2>&1 || true ;;
            esac
        done <<<"$states"
        sleep 0.5
    done
    return 1
}
