#!/usr/bin/env bash
# A real multi-node SLURM cluster on one machine, for tests/slurm/test_two_nodes.py.
#
#   bash tests/slurm/cluster2.sh up DIR       # munged, slurmctld, and one slurmd per node
#   source DIR/env                            # SLURM_CONF (+ the MPI settings, see below)
#   bash tests/slurm/cluster2.sh status DIR
#   bash tests/slurm/cluster2.sh down DIR     # daemons, namespaces, veths and bridge go
#
# Each node (node1, node2, ...; ELFISH_SLURM_NODES, default 2) is a network + UTS namespace
# held open by a `sleep` process: its own hostname, its own loopback and one veth interface
# called elfish0 with the address SUBNET.(10+i)/24, whose peer is a port of a bridge in the
# root namespace that has SUBNET.1. slurmctld and munged run in the root namespace (slurmctld
# listens on SUBNET.1; munged's socket is a file in DIR, reachable from every namespace);
# each slurmd runs inside its node's namespaces (`nsenter --net --uts`), so every node has
# its own port space, its own hostname and its own address. There is no mount or PID
# namespace: every node sees this machine's file system, so the program, the data and the
# run directories are shared as on a cluster with a shared file system.
#
# SUBNET is ELFISH_SLURM_SUBNET (three octets, e.g. 10.77.0), by default the first 10.77.X
# no interface is in, starting from an X derived from DIR, so clusters in different
# directories do not collide. The bridge and the root-side veths are named after DIR too
# (elfb<tag>, elfv<tag>n<i>). A node's slurmd listens on its own address (same port on all).
#
# DIR/env also exports what MPICH (the wheel) needs between the nodes (tests/slurm/README):
#   MPIR_CVAR_CH4_NETMOD=ofi FI_PROVIDER=tcp  libfabric's tcp provider instead of UCX: UCX
#       finds its network devices in /sys/class/net, which without a mount namespace lists
#       the root namespace's interfaces, not elfish0; and it reaches the other "node" through
#       shared memory (same machine), so its traffic would never cross the bridge;
#   FI_TCP_IFACE=elfish0   the address libfabric publishes (not the node's loopback);
#   HYDRA_IFACE=elfish0    mpiexec's proxies connect back to mpiexec by that interface's
#       address: the node names are in no /etc/hosts or DNS.
# DIR/network lists the bridge and, per node, its address and the root end of its veth.
#
# Every daemon and namespace holder runs under `timeout` (ELFISH_SLURM_LIFETIME, default
# 3600 s) in its own session; `up` first takes down whatever a previous cluster in DIR left.
# Needs root, iproute2 and util-linux (nsenter/unshare), and Debian's slurm-wlm and munge
# (installed with apt-get when missing, unless ELFISH_SLURM_NO_INSTALL=1). What this script
# shares with cluster.sh (installing the packages, starting and stopping daemons, munge, the
# common slurm.conf lines, waiting for idle nodes) is in lib.sh, beside it.
set -euo pipefail

source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"  # die, start_daemon, start_munge, wait_idle, ...

[ $# -eq 2 ] || usage
cmd=$1
dir=$2
IFACE=elfish0  # the node-side interface, the same name in every node

# Names and addresses, all derived from DIR (absolute) unless overridden.
derive_names() {
    local sum
    sum=$(printf '%s' "$dir" | cksum | cut -d' ' -f1)
    tag=$(printf '%05x' $((sum % 1048576)))
    bridge="elfb$tag"
    subnet_start=$((sum % 200 + 20))
    nodes=${ELFISH_SLURM_NODES:-2}
    [[ "$nodes" =~ ^[1-9][0-9]?$ ]] && [ "$nodes" -le 50 ] || die "ELFISH_SLURM_NODES=$nodes: 1 to 50"
}
host_veth() { echo "elfv${tag}n$1"; }     # root-namespace end of node $1's veth
node_name() { echo "node$1"; }
node_addr() { echo "$subnet.$((10 + $1))"; }

# The namespace holder of node $1: its pid, only if that process is still the holder we
# started (a sleep whose command line names DIR), so a recycled pid is never signalled.
holder_pid() {
    local f="$dir/nodes/$(node_name "$1")/ns.pid" pid
    [ -s "$f" ] || return 1
    pid=$(cat "$f")
    [[ "$pid" =~ ^[0-9]+$ ]] || return 1
    tr '\0' ' ' 2>/dev/null <"/proc/$pid/cmdline" | grep -qF "elfish-node-holder $dir/nodes/$(node_name "$1")" || return 1
    echo "$pid"
}

down() {
    [ -d "$dir" ] || return 0
    dir=$(cd "$dir" && pwd)
    derive_names
    if [ -f "$dir/slurm.conf" ] && [ -s "$dir/slurmctld.pid" ] && kill -0 "$(cat "$dir/slurmctld.pid")" 2>/dev/null; then
        cancel_jobs  # (a live slurmctld only)
    fi
    local i n pid f
    n=$nodes
    # Every node directory a previous cluster left, whatever ELFISH_SLURM_NODES is now.
    for f in "$dir"/nodes/node*/; do
        [ -d "$f" ] || continue
        i=${f%/}; i=${i##*/node}
        [[ "$i" =~ ^[0-9]+$ ]] && [ "$i" -gt "$n" ] && n=$i
    done
    for i in $(seq "$n"); do
        stop_pidfile "$dir/nodes/$(node_name "$i")/slurmd.pid" "slurmd on $(node_name "$i")"
    done
    stop_pidfile "$dir/slurmctld.pid" slurmctld
    stop_pidfile "$dir/munge/munged.pid" munged
    # The namespace holders: by their pid files, and any other this directory's cluster
    # left (its pid file lost): a process whose command line is "elfish-node-holder DIR/...".
    for f in /proc/[0-9]*/cmdline; do
        tr '\0' ' ' 2>/dev/null <"$f" | grep -qF "elfish-node-holder $dir/nodes/" || continue
        pid=${f#/proc/}; pid=${pid%/cmdline}
        stop_pid "$pid" "a namespace holder of $dir"
    done
    for i in $(seq "$n"); do
        rm -f "$dir/nodes/$(node_name "$i")/ns.pid"
        # A namespace goes with its last process, and the veth in it with the namespace;
        # the root end may linger a moment. Delete it if it is still there.
        ip link del "$(host_veth "$i")" >/dev/null 2>&1 || true
    done
    ip link del "$bridge" >/dev/null 2>&1 || true
}

subnet_in_use() { ip -4 -o addr show | grep -qF " inet $1."; }

# The subnet: ELFISH_SLURM_SUBNET, or the first of 10.77.X (X from DIR, then X+1, ...) that
# no interface of this machine is in (a cluster in another directory may have one).
pick_subnet() {
    local k x
    if [ -n "${ELFISH_SLURM_SUBNET:-}" ]; then
        subnet=$ELFISH_SLURM_SUBNET
        [[ "$subnet" =~ ^[0-9]+\.[0-9]+\.[0-9]+$ ]] || die "ELFISH_SLURM_SUBNET=$subnet is not three octets (e.g. 10.77.0)"
        subnet_in_use "$subnet" && die "the subnet $subnet.0/24 is in use on this machine: $(ip -4 -o addr show | grep -F " inet $subnet." | head -n 1)"
        return 0
    fi
    for k in $(seq 0 199); do
        x=$(( (subnet_start - 20 + k) % 200 + 20 ))
        subnet_in_use "10.77.$x" || { subnet="10.77.$x"; return 0; }
    done
    die "no free subnet 10.77.20-219.0/24; set ELFISH_SLURM_SUBNET"
}

# The namespaces, the bridge and the veths.
network_up() {
    local i pid name veth peer deadline
    ip link add "$bridge" type bridge
    ip addr add "$subnet.1/24" dev "$bridge"
    ip link set "$bridge" up
    for i in $(seq "$nodes"); do
        name=$(node_name "$i")
        mkdir -p "$dir/nodes/$name"
        rm -f "$dir/nodes/$name/ns.pid"
        # The holder: a new network and UTS namespace with the node's hostname, kept open
        # by sleep (its argv[0] marks it as ours: see holder_pid).
        setsid timeout --kill-after=10 "${ELFISH_SLURM_LIFETIME:-3600}" \
            unshare --net --uts bash -c 'hostname "$1"; ip link set lo up; echo $$ >"$2/ns.pid"; exec -a "elfish-node-holder $2" sleep infinity' \
            bash "$name" "$dir/nodes/$name" >>"$dir/nodes/$name/ns.stdout" 2>&1 </dev/null &
        deadline=$((SECONDS + 10))
        until pid=$(holder_pid "$i"); do
            [ $SECONDS -lt $deadline ] || { cat "$dir/nodes/$name/ns.stdout" >&2 || true; die "the namespace of $name did not come up"; }
            sleep 0.1
        done
        veth=$(host_veth "$i")
        peer="elfp${tag}n$i"
        ip link add "$veth" type veth peer name "$peer"
        ip link set "$peer" netns "$pid"
        ip link set "$veth" master "$bridge" up
        nsenter -t "$pid" --net ip link set "$peer" name "$IFACE"
        nsenter -t "$pid" --net ip addr add "$(node_addr "$i")/24" dev "$IFACE"
        nsenter -t "$pid" --net ip link set "$IFACE" up
    done
    # Each node must reach the controller's address before slurmd starts.
    for i in $(seq "$nodes"); do
        pid=$(holder_pid "$i")
        deadline=$((SECONDS + 15))
        until nsenter -t "$pid" --net timeout 2 bash -c "exec 3<>/dev/tcp/$subnet.1/$ctld_port" 2>/dev/null; do
            [ $SECONDS -lt $deadline ] || die "$(node_name "$i") cannot reach slurmctld at $subnet.1:$ctld_port over $bridge"
            sleep 0.3
        done
    done
}

up() {
    [ "$(id -u)" = 0 ] || die "the test cluster creates namespaces and runs its daemons as root; run as root"
    install_packages "slurmctld slurmd munged sbatch srun ip nsenter unshare" "slurm-wlm munge iproute2 util-linux"
    local slurmctld slurmd munged host cpus d_port deadline i pid name node_list
    find_daemons
    mkdir -p "$dir"
    dir=$(cd "$dir" && pwd)
    down  # whatever a previous cluster in the same directory left
    derive_names
    pick_subnet
    # From here on, a failure takes down whatever this call started.
    trap 'rc=$?; trap - EXIT; if [ $rc != 0 ]; then echo "$prog: up failed; taking down what it started" >&2; down || true; fi; exit $rc' EXIT
    mkdir -p "$dir/state" "$dir/nodes"
    # The slurmds in the node namespaces reach the same munged by its socket's path.
    start_munge "$munged"

    host=$(hostname -s)
    cpus=${ELFISH_SLURM_CPUS:-4}
    # Free on loopback; slurmctld binds ctld_port on the bridge address, and every slurmd,
    # each in its own port space, d_port on its node's.
    pick_ports
    node_list="node[1-$nodes]"
    [ "$nodes" = 1 ] && node_list=node1
    {
        cat <<EOF
# $nodes-node test cluster in network namespaces on one machine (tests/slurm/cluster2.sh)
ClusterName=elfishtest2
SlurmctldHost=$host($subnet.1)
SlurmctldPort=$ctld_port
SlurmdPort=$d_port
# Per node (%n: the node's name): its spool, pid and log file.
SlurmdSpoolDir=$dir/nodes/%n/spool
SlurmdPidFile=$dir/nodes/%n/slurmd.pid
SlurmdLogFile=$dir/nodes/%n/slurmd.log
EOF
        slurm_conf_common
        for i in $(seq "$nodes"); do
            echo "NodeName=$(node_name "$i") NodeAddr=$(node_addr "$i") NodeHostname=$(node_name "$i") CPUs=$cpus State=UNKNOWN"
        done
        echo "PartitionName=debug Nodes=$node_list Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO"
    } >"$dir/slurm.conf"
    cat >"$dir/env" <<EOF
export SLURM_CONF=$dir/slurm.conf
# MPICH between the node namespaces (tests/slurm/README): libfabric's tcp provider on the
# nodes' bridge interface, and mpiexec's (hydra's) control address on it too.
export MPIR_CVAR_CH4_NETMOD=ofi FI_PROVIDER=tcp FI_TCP_IFACE=$IFACE HYDRA_IFACE=$IFACE
EOF
    {
        echo "bridge $bridge $subnet.1"
        for i in $(seq "$nodes"); do
            echo "$(node_name "$i") $(node_addr "$i") $(host_veth "$i")"
        done
    } >"$dir/network"
    export SLURM_CONF="$dir/slurm.conf"
    for i in $(seq "$nodes"); do
        mkdir -p "$dir/nodes/$(node_name "$i")/spool"
    done

    start_daemon slurmctld "$dir/slurmctld.pid" "$slurmctld" -D -c -i -f "$dir/slurm.conf"
    network_up
    for i in $(seq "$nodes"); do
        name=$(node_name "$i")
        pid=$(holder_pid "$i") || die "the namespace holder of $name is gone"
        start_daemon "nodes/$name/slurmd" "$dir/nodes/$name/slurmd.pid" \
            nsenter -t "$pid" --net --uts "$slurmd" -D -f "$dir/slurm.conf" -N "$name"
    done

    if ! wait_idle "$nodes"; then
        echo "$prog: nodes not all idle after ${ELFISH_SLURM_BOOT_TIMEOUT:-60} s:" >&2
        echo "$states" >&2
        tail -n 20 "$dir/slurmctld.log" "$dir"/nodes/*/slurmd.log >&2 || true
        exit 1
    fi
    # Node to node (the job steps' and MPI's traffic; bridged, not routed: a host whose
    # br_netfilter sends bridged packets through a dropping iptables FORWARD chain fails here).
    if [ "$nodes" -gt 1 ]; then
        local j
        for i in $(seq "$nodes"); do
            j=$((i % nodes + 1))
            pid=$(holder_pid "$i") || die "the namespace holder of $(node_name "$i") is gone"
            deadline=$((SECONDS + 15))
            until nsenter -t "$pid" --net timeout 2 bash -c "exec 3<>/dev/tcp/$(node_addr "$j")/$d_port" 2>/dev/null; do
                [ $SECONDS -lt $deadline ] || die "$(node_name "$i") cannot reach $(node_name "$j")'s slurmd at $(node_addr "$j"):$d_port over $bridge (br_netfilter and iptables FORWARD?)"
                sleep 0.3
            done
        done
    fi
    trap - EXIT
    echo "$prog: $nodes nodes idle ($node_list, $cpus CPUs each, on $bridge $subnet.0/24); source $dir/env"
}

status() {
    [ -d "$dir" ] || die "$dir: no such directory"
    dir=$(cd "$dir" && pwd)
    derive_names
    SLURM_CONF="$dir/slurm.conf" timeout 10 sinfo -N -l || true
    ip -br addr show dev "$bridge" 2>/dev/null || echo "no bridge $bridge"
    local i pid
    for i in $(seq "$nodes"); do
        if pid=$(holder_pid "$i"); then
            echo "$(node_name "$i"): namespace holder $pid, $(nsenter -t "$pid" --uts hostname), $(nsenter -t "$pid" --net ip -br -4 addr show dev "$IFACE" 2>/dev/null)"
        else
            echo "$(node_name "$i"): no namespace"
        fi
    done
}

case "$cmd" in
    up) up ;;
    down) down ;;
    status) status ;;
    *) usage ;;
esac
