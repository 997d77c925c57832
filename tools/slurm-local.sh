#!/usr/bin/env bash
# A real SLURM cluster (munge + slurmctld + slurmd) on this machine, so that `mtl submit`, sweeps,
# preemption/requeue and the sbatch template can be tried and tested without a cluster.
#
#   tools/slurm-local.sh up [--nodes N]  install (Debian/Ubuntu, needs root) if missing, configure, start, wait
#                                         until every node is idle
#   tools/slurm-local.sh down             cancel the jobs, stop the daemons, remove the nodes' namespaces
#   tools/slurm-local.sh status           the daemons' pids and sinfo (one line per node)
#
# One node (the default): one slurmd on this host, as `hostname -s`. With --nodes N (N >= 2): N nodes named
# node1..nodeN, each a slurmd in its own network namespace (mtl-node<i>) with its own hostname (UTS namespace) and
# address (10.213.0.1<i> on a bridge, mtl-slurm0, whose host end 10.213.0.1 is the controller's address); the file
# system is shared. Inside each namespace /etc/hosts is /etc/netns/mtl-node<i>/hosts (written here, removed by
# `down`), so node names resolve to those addresses there and gloo binds to the node's own interface. Only these
# addresses and loopback are used; /etc/hosts itself is not touched.
#
# `up` is idempotent: daemons already running with the same configuration are left alone; another node count
# (or other settings) restarts them. The configuration is the one DESIGN.md records as working here
# (proctrack/linuxproc, select/cons_tres, SlurmUser=root, no accounting storage), with task/affinity on one node,
# so that each task is bound to the CPUs it asked for as on a real cluster; task/none with several nodes, whose
# slurmds all advertise the same cores (binding would put the first task of every node on CPU 0).
# Environment:
#   SLURM_LOCAL_DIR        state, spool and logs             (default /var/lib/mtl-slurm-local)
#   SLURM_LOCAL_PARTITION  name of the one partition         (default debug)
#   SLURM_LOCAL_CPUS       CPUs each node advertises         (default $(nproc))
#   SLURM_LOCAL_NET        first three octets of the nodes' /24 (default 10.213.0)
#   SLURM_LOCAL_FORCE=1    overwrite an /etc/slurm/slurm.conf that this script did not write
set -euo pipefail

ACTION=${1:-}
shift || true
NODES=1
while [[ $# -gt 0 ]]; do
    case $1 in
        --nodes) NODES=${2:-}; shift 2 || shift ;;
        --nodes=*) NODES=${1#--nodes=}; shift ;;
        *) echo "slurm-local: error: unknown argument '$1' (usage: $0 up [--nodes N] | down | status)" >&2; exit 2 ;;
    esac
done
[[ $NODES =~ ^[1-9][0-9]?$ ]] || { echo "slurm-local: error: --nodes wants a number from 1 to 99, got '$NODES'" >&2; exit 2; }
STATE=${SLURM_LOCAL_DIR:-/var/lib/mtl-slurm-local}
PARTITION=${SLURM_LOCAL_PARTITION:-debug}
# (nproc alone would count OMP_NUM_THREADS, which the tests set to 1)
CPUS=${SLURM_LOCAL_CPUS:-$(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc)}
NET=${SLURM_LOCAL_NET:-10.213.0}
HOST=$(hostname -s)
CONF=/etc/slurm/slurm.conf
MARKER="# written by mtl tools/slurm-local.sh"
MUNGE_KEY=/etc/munge/munge.key
BRIDGE=mtl-slurm0
NS_PREFIX=mtl-node # namespace mtl-node<i>, host end of its veth mtl-node<i>, node name node<i>
CTL_ADDR=$NET.1

log() { echo "slurm-local: $*" >&2; }
die() {
    echo "slurm-local: error: $*" >&2
    exit 1
}

pid_alive() { [[ -f "$1" ]] && kill -0 "$(cat "$1")" 2>/dev/null; }

node_name() { echo "node$1"; }
node_addr() { echo "$NET.$((10 + $1))"; }

install_packages() {
    if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v sbatch >/dev/null \
        && command -v munged >/dev/null; then
        return
    fi
    [[ $(id -u) -eq 0 ]] || die "slurm-wlm and munge are not installed and installing them needs root"
    command -v apt-get >/dev/null || die "slurm-wlm and munge are not installed and there is no apt-get here"
    log "installing slurm-wlm and munge (apt-get)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q >/dev/null
    apt-get install -y -q --no-install-recommends slurm-wlm munge >/dev/null
}

start_munge() {
    if munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
        return
    fi
    mkdir -p /etc/munge /run/munge /var/lib/munge /var/log/munge
    if [[ ! -s $MUNGE_KEY ]]; then
        log "creating $MUNGE_KEY"
        if command -v mungekey >/dev/null; then
            mungekey --create --keyfile="$MUNGE_KEY" --force
        else
            dd if=/dev/urandom of="$MUNGE_KEY" bs=1024 count=1 status=none
        fi
    fi
    chown -R munge:munge /etc/munge /run/munge /var/lib/munge /var/log/munge
    chmod 0700 /etc/munge /var/lib/munge /var/log/munge
    chmod 0755 /run/munge
    chmod 0400 "$MUNGE_KEY"
    rm -f /run/munge/munged.pid /run/munge/munge.socket.2.lock
    log "starting munged"
    runuser -u munge -- /usr/sbin/munged
    for _ in $(seq 50); do
        munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && return
        sleep 0.2
    done
    die "munged does not answer (see /var/log/munge/munged.log)"
}

# ---------------------------------------------------------------------- several nodes: network namespaces

our_namespaces() { ip netns list 2>/dev/null | awk '{print $1}' | grep -E "^${NS_PREFIX}[0-9]+$" || true; }

make_network() {
    if ! command -v ip >/dev/null && command -v apt-get >/dev/null; then
        log "installing iproute2 (apt-get)"
        apt-get update -q >/dev/null && apt-get install -y -q --no-install-recommends iproute2 >/dev/null
    fi
    command -v ip >/dev/null || die "--nodes $NODES needs the 'ip' tool (iproute2) for network namespaces"
    command -v unshare >/dev/null && command -v nsenter >/dev/null \
        || die "--nodes $NODES needs 'unshare' and 'nsenter' (util-linux) for the nodes' namespaces"
    ip link show "$BRIDGE" >/dev/null 2>&1 || ip link add "$BRIDGE" type bridge
    ip addr replace "$CTL_ADDR/24" dev "$BRIDGE"
    ip link set "$BRIDGE" up
    local i ns hosts
    hosts=$(printf '127.0.0.1 localhost\n%s %s' "$CTL_ADDR" "$HOST")
    for i in $(seq "$NODES"); do hosts+=$'\n'"$(node_addr "$i") $(node_name "$i")"; done
    for i in $(seq "$NODES"); do
        ns=$NS_PREFIX$i
        our_namespaces | grep -qx "$ns" || ip netns add "$ns"
        ip link show "$ns" >/dev/null 2>&1 || ip link add "$ns" type veth peer name eth0 netns "$ns"
        ip link set "$ns" master "$BRIDGE"
        ip link set "$ns" up
        ip -n "$ns" link set lo up
        ip -n "$ns" addr replace "$(node_addr "$i")/24" dev eth0
        ip -n "$ns" link set eth0 up
        # the node's /etc/hosts (where `ip netns exec` also looks): node names resolve to their addresses
        mkdir -p "/etc/netns/$ns"
        printf '%s\n%s\n' "$MARKER" "$hosts" >"/etc/netns/$ns/hosts"
    done
    for ns in $(our_namespaces); do # left from a cluster with more nodes
        i=${ns#"$NS_PREFIX"}
        if ((i > NODES)); then remove_namespace "$ns"; fi
    done
}

remove_namespace() { # ns: end what still runs in it (only processes inside our own namespace), then remove it
    local ns=$1 pids
    pids=$(ip netns pids "$ns" 2>/dev/null | tr '\n' ' ')
    if [[ -n ${pids// /} ]]; then
        log "ending processes left in $ns: $pids"
        # shellcheck disable=SC2086
        kill $pids 2>/dev/null || true
        sleep 1
        pids=$(ip netns pids "$ns" 2>/dev/null | tr '\n' ' ')
        # shellcheck disable=SC2086
        [[ -z ${pids// /} ]] || kill -9 $pids 2>/dev/null || true
    fi
    ip link del "$ns" 2>/dev/null || true
    ip netns del "$ns" 2>/dev/null || true
    if [[ -f /etc/netns/$ns/hosts ]] && grep -qF "$MARKER" "/etc/netns/$ns/hosts"; then
        rm -f "/etc/netns/$ns/hosts"
        rmdir "/etc/netns/$ns" 2>/dev/null || true
    fi
}

remove_network() {
    local ns
    for ns in $(our_namespaces); do remove_namespace "$ns"; done
    if ip link show "$BRIDGE" >/dev/null 2>&1; then ip link del "$BRIDGE"; fi
    rmdir /etc/netns 2>/dev/null || true
}

# ---------------------------------------------------------------------- configuration

write_conf() {
    if [[ -f $CONF ]] && ! grep -qF "$MARKER" "$CONF" && [[ ${SLURM_LOCAL_FORCE:-0} != 1 ]]; then
        die "$CONF exists and was not written by this script; set SLURM_LOCAL_FORCE=1 to replace it"
    fi
    local mem_mb ctld nodes_conf part_nodes i task_plugin=task/none
    mem_mb=$(awk -v n="$NODES" '/MemTotal/ {print int($2 / 1024 * 0.9 / n)}' /proc/meminfo)
    mkdir -p /etc/slurm "$STATE/ctld" "$STATE/d" "$STATE/log"
    if ((NODES == 1)); then
        ctld="SlurmctldHost=$HOST"
        task_plugin=task/affinity # a task runs on the CPUs it was given (sched_getaffinity shows them)
        nodes_conf="SlurmdPidFile=$STATE/slurmd.pid
SlurmdSpoolDir=$STATE/d
SlurmdLogFile=$STATE/log/slurmd.log
NodeName=$HOST CPUs=$CPUS RealMemory=$mem_mb State=UNKNOWN"
        part_nodes=$HOST
    else
        # slurmctld listens on every address of this host; the nodes reach it on the bridge's
        ctld="SlurmctldHost=$HOST($CTL_ADDR)"
        nodes_conf="SlurmdPidFile=$STATE/slurmd-%n.pid
SlurmdSpoolDir=$STATE/d/%n
SlurmdLogFile=$STATE/log/slurmd-%n.log"
        for i in $(seq "$NODES"); do
            nodes_conf+=$'\n'"NodeName=$(node_name "$i") NodeHostname=$(node_name "$i") NodeAddr=$(node_addr "$i")"
            nodes_conf+=" CPUs=$CPUS RealMemory=$mem_mb State=UNKNOWN"
        done
        part_nodes="node[1-$NODES]"
    fi
    local tmp
    tmp=$(mktemp /etc/slurm/.slurm.conf.XXXXXX)
    cat >"$tmp" <<EOF
$MARKER
ClusterName=mtl-local
$ctld
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire also sets how long a requeued job waits before it may start again (default 120 s)
AuthInfo=cred_expire=10
StateSaveLocation=$STATE/ctld
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
ProctrackType=proctrack/linuxproc
TaskPlugin=$task_plugin
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
# look at pending jobs every 2 s (default 60 s), so a requeued job restarts promptly
SchedulerParameters=sched_interval=2,bf_interval=2
MpiDefault=none
# requeue: batch jobs may be requeued (scontrol requeue, submitit, the sbatch template); logs are appended
JobRequeue=1
JobFileAppend=1
# a preempted/cancelled job gets SIGTERM, then KillWait seconds to write its checkpoint before SIGKILL
KillWait=60
ReturnToService=2
MinJobAge=600
InactiveLimit=0
SlurmctldTimeout=60
SlurmdTimeout=120
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
$nodes_conf
PartitionName=$PARTITION Nodes=$part_nodes Default=YES MaxTime=INFINITE State=UP
EOF
    if [[ -f $CONF ]] && cmp -s "$tmp" "$CONF"; then
        rm -f "$tmp"
        return 0
    fi
    if any_slurm_alive; then
        # while the old configuration is in place: the client commands must still reach the running controller
        log "configuration changed: stopping the running cluster first"
        cancel_jobs
        stop_slurm
    fi
    chmod 0644 "$tmp"
    mv "$tmp" "$CONF"
    log "wrote $CONF ($NODES node(s): $part_nodes, $CPUS CPUs each, partition $PARTITION)"
}

# ---------------------------------------------------------------------- daemons

slurmd_pidfiles() { compgen -G "$STATE/slurmd*.pid" || true; }

any_slurm_alive() {
    local f
    pid_alive "$STATE/slurmctld.pid" && return 0
    for f in $(slurmd_pidfiles); do pid_alive "$f" && return 0; done
    return 1
}

start_slurmd() { # index (0: the one-node cluster's slurmd, on this host)
    local i=$1 name ns
    if ((i == 0)); then
        pid_alive "$STATE/slurmd.pid" && return 0
        log "starting slurmd"
        slurmd
        return 0
    fi
    name=$(node_name "$i")
    ns=$NS_PREFIX$i
    pid_alive "$STATE/slurmd-$name.pid" && return 0
    mkdir -p "$STATE/d/$name"
    log "starting slurmd $name ($(node_addr "$i"), namespace $ns)"
    # its own network namespace, hostname (UTS namespace) and /etc/hosts (a private bind mount); the jobs it starts
    # inherit all three. Not `ip netns exec`: that remounts /sys, without the cgroup file system slurmd needs.
    nsenter --net="/run/netns/$ns" unshare --mount --uts \
        sh -c "mount --bind /etc/netns/$ns/hosts /etc/hosts && hostname $name && exec slurmd -N $name"
}

node_states() { sinfo -h -N -p "$PARTITION" -o '%N %t' 2>/dev/null | tr -d '*~#!%$@^-' | sort -u; }

wait_idle() {
    local states names bad i n
    if ((NODES == 1)); then names=$HOST; else names=$(for i in $(seq "$NODES"); do node_name "$i"; done); fi
    for i in $(seq 150); do
        states=$(node_states)
        bad=""
        for n in $names; do
            case $(awk -v n="$n" '$1 == n {print $2}' <<<"$states") in
                idle | mix | alloc) ;;
                down | drain | drng | fail)
                    bad+=" $n"
                    if ((i % 10 == 1)); then scontrol update NodeName="$n" State=RESUME 2>/dev/null || true; fi
                    ;;
                *) bad+=" $n" ;;
            esac
        done
        [[ -z $bad ]] && return 0
        sleep 0.2
    done
    die "node(s)$bad not idle ($(tr '\n' ' ' <<<"$states")); see $STATE/log/slurmd*.log and $STATE/log/slurmctld.log"
}

up() {
    install_packages
    start_munge
    write_conf
    if pid_alive "$STATE/slurmctld.pid" && [[ $CONF -nt $STATE/slurmctld.pid ]]; then
        log "the daemons run an older configuration (an interrupted switch?): restarting them"
        cancel_jobs
        stop_slurm
    fi
    if ((NODES == 1)); then remove_network; else make_network; fi
    if ! pid_alive "$STATE/slurmctld.pid"; then
        log "starting slurmctld"
        slurmctld
    fi
    for _ in $(seq 100); do
        scontrol ping 2>/dev/null | grep -q UP && break
        sleep 0.2
    done
    scontrol ping 2>/dev/null | grep -q UP || die "slurmctld does not answer (see $STATE/log/slurmctld.log)"
    if ((NODES == 1)); then
        start_slurmd 0
    else
        for i in $(seq "$NODES"); do start_slurmd "$i"; done
    fi
    wait_idle
    log "up: partition $PARTITION: $(node_states | tr '\n' ' ')"
}

stop_daemon() { # name pidfile
    local pidfile=$2 pid
    pid_alive "$pidfile" || return 0
    pid=$(cat "$pidfile")
    kill "$pid"
    for _ in $(seq 100); do
        kill -0 "$pid" 2>/dev/null || return 0
        sleep 0.1
    done
    log "$1 (pid $pid) did not stop on SIGTERM; sending SIGKILL"
    kill -9 "$pid" 2>/dev/null || true
}

stop_slurm() {
    local f
    for f in $(slurmd_pidfiles); do stop_daemon "$(basename "$f" .pid)" "$f"; done
    stop_daemon slurmctld "$STATE/slurmctld.pid"
}

cancel_jobs() {
    # Jobs left running when slurmd stops would come back as "running" with the next `up` and hold the CPUs
    # until their time limit: cancel them and let them end first.
    pid_alive "$STATE/slurmctld.pid" || return 0
    local ids
    ids=$(squeue --noheader --format=%A 2>/dev/null | tr '\n' ' ') || true
    [[ -n ${ids// /} ]] || return 0
    log "cancelling jobs: $ids"
    # shellcheck disable=SC2086
    scancel $ids 2>/dev/null || true
    for _ in $(seq 120); do
        [[ -z $(squeue --noheader --format=%A 2>/dev/null) ]] && return 0
        sleep 0.5
    done
    log "some jobs did not end within 60 s; stopping anyway"
}

down() {
    cancel_jobs
    stop_slurm
    remove_network
    stop_daemon munged /run/munge/munged.pid
    log "down"
}

status() {
    local rc=0 f files ns
    if pid_alive "$STATE/slurmctld.pid"; then
        echo "slurmctld: running (pid $(cat "$STATE/slurmctld.pid"))"
    else
        echo "slurmctld: stopped"
        rc=1
    fi
    files=$(slurmd_pidfiles)
    if [[ -z $files ]]; then
        echo "slurmd: stopped"
        rc=1
    fi
    for f in $files; do
        if pid_alive "$f"; then
            echo "$(basename "$f" .pid): running (pid $(cat "$f"))"
        else
            echo "$(basename "$f" .pid): stopped"
            rc=1
        fi
    done
    for ns in $(our_namespaces); do
        echo "namespace $ns: eth0 $(ip -n "$ns" -br -4 addr show dev eth0 2>/dev/null | awk '{print $3}')"
    done
    if pid_alive /run/munge/munged.pid; then
        echo "munged: running (pid $(cat /run/munge/munged.pid))"
    else
        echo "munged: stopped"
        rc=1
    fi
    if [[ $rc == 0 ]]; then sinfo -N -o '%N %P %t %c %m %G' || rc=1; fi
    return $rc
}

case $ACTION in
    up) up ;;
    down) down ;;
    status) status ;;
    *)
        echo "usage: $0 up [--nodes N] | down | status" >&2
        exit 2
        ;;
esac
