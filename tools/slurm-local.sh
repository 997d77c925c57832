#!/usr/bin/env bash
# A real one-node SLURM cluster (munge + slurmctld + slurmd) on this machine, so that `mtl submit`, sweeps,
# preemption/requeue and the sbatch template can be tried and tested without a cluster.
#
#   tools/slurm-local.sh up       install (Debian/Ubuntu, needs root) if missing, configure, start, wait until idle
#   tools/slurm-local.sh down     stop slurmd, slurmctld and munged (the config and state stay)
#   tools/slurm-local.sh status   sinfo and the daemons' pids
#
# `up` is idempotent: daemons already running are left alone. The configuration is the one DESIGN.md records as
# working here (proctrack/linuxproc, task/none, select/cons_tres, SlurmUser=root, no accounting storage).
# Environment:
#   SLURM_LOCAL_DIR        state, spool and logs             (default /var/lib/mtl-slurm-local)
#   SLURM_LOCAL_PARTITION  name of the one partition         (default debug)
#   SLURM_LOCAL_CPUS       CPUs the node advertises          (default $(nproc))
#   SLURM_LOCAL_FORCE=1    overwrite an /etc/slurm/slurm.conf that this script did not write
set -euo pipefail

ACTION=${1:-}
STATE=${SLURM_LOCAL_DIR:-/var/lib/mtl-slurm-local}
PARTITION=${SLURM_LOCAL_PARTITION:-debug}
CPUS=${SLURM_LOCAL_CPUS:-$(nproc)}
HOST=$(hostname -s)
CONF=/etc/slurm/slurm.conf
MARKER="# written by mtl tools/slurm-local.sh"
MUNGE_KEY=/etc/munge/munge.key

log() { echo "slurm-local: $*" >&2; }
die() { echo "slurm-local: error: $*" >&2; exit 1; }

pid_alive() { [[ -f "$1" ]] && kill -0 "$(cat "$1")" 2>/dev/null; }

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

write_conf() {
    if [[ -f $CONF ]] && ! grep -qF "$MARKER" "$CONF" && [[ ${SLURM_LOCAL_FORCE:-0} != 1 ]]; then
        die "$CONF exists and was not written by this script; set SLURM_LOCAL_FORCE=1 to replace it"
    fi
    local mem_mb
    mem_mb=$(awk '/MemTotal/ {print int($2 / 1024 * 0.9)}' /proc/meminfo)
    mkdir -p /etc/slurm "$STATE/ctld" "$STATE/d" "$STATE/log"
    local tmp
    tmp=$(mktemp /etc/slurm/.slurm.conf.XXXXXX)
    cat >"$tmp" <<EOF
$MARKER
ClusterName=mtl-local
SlurmctldHost=$HOST
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire also sets how long a requeued job waits before it may start again (default 120 s)
AuthInfo=cred_expire=10
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/d
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
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
NodeName=$HOST CPUs=$CPUS RealMemory=$mem_mb State=UNKNOWN
PartitionName=$PARTITION Nodes=$HOST Default=YES MaxTime=INFINITE State=UP
EOF
    if [[ -f $CONF ]] && cmp -s "$tmp" "$CONF"; then
        rm -f "$tmp"
        return 0
    fi
    chmod 0644 "$tmp"
    mv "$tmp" "$CONF"
    CONF_CHANGED=1
    log "wrote $CONF (node $HOST, $CPUS CPUs, partition $PARTITION)"
}

node_state() { sinfo -h -N -n "$HOST" -o %t 2>/dev/null | head -n1 | tr -d '*~#!%$@^-'; }

up() {
    install_packages
    start_munge
    CONF_CHANGED=0
    write_conf
    if [[ $CONF_CHANGED == 1 ]] && { pid_alive "$STATE/slurmctld.pid" || pid_alive "$STATE/slurmd.pid"; }; then
        log "configuration changed: restarting the daemons"
        stop_slurm
    fi
    if ! pid_alive "$STATE/slurmctld.pid"; then
        log "starting slurmctld"
        slurmctld
    fi
    for _ in $(seq 100); do
        scontrol ping 2>/dev/null | grep -q UP && break
        sleep 0.2
    done
    scontrol ping 2>/dev/null | grep -q UP || die "slurmctld does not answer (see $STATE/log/slurmctld.log)"
    if ! pid_alive "$STATE/slurmd.pid"; then
        log "starting slurmd"
        slurmd
    fi
    local state=""
    for i in $(seq 150); do
        state=$(node_state)
        case $state in
            idle | mix | alloc) break ;;
            down | drain | drng | fail)
                if ((i % 10 == 1)); then scontrol update NodeName="$HOST" State=RESUME 2>/dev/null || true; fi ;;
        esac
        sleep 0.2
    done
    case $state in
        idle | mix | alloc) ;;
        *) die "node $HOST is '$state', not idle (see $STATE/log/slurmd.log and $STATE/log/slurmctld.log)" ;;
    esac
    log "up: partition $PARTITION, node $HOST $state"
}

stop_daemon() {  # name pidfile
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
    stop_daemon slurmd "$STATE/slurmd.pid"
    stop_daemon slurmctld "$STATE/slurmctld.pid"
}

cancel_jobs() {
    # Jobs left running when slurmd stops would come back as "running" with the next `up` and hold the CPUs
    # until their time limit: cancel them and let them end first.
    pid_alive "$STATE/slurmctld.pid" || return 0
    local ids
    ids=$(squeue --noheader --format=%A 2>/dev/null | tr '\n' ' ')
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
    stop_daemon munged /run/munge/munged.pid
    log "down"
}

status() {
    local rc=0
    for d in slurmctld slurmd; do
        if pid_alive "$STATE/$d.pid"; then echo "$d: running (pid $(cat "$STATE/$d.pid"))"; else echo "$d: stopped"; rc=1; fi
    done
    if pid_alive /run/munge/munged.pid; then echo "munged: running (pid $(cat /run/munge/munged.pid))"; else echo "munged: stopped"; rc=1; fi
    if [[ $rc == 0 ]]; then sinfo || rc=1; fi
    return $rc
}

case $ACTION in
    up) up ;;
    down) down ;;
    status) status ;;
    *) echo "usage: $0 up|down|status" >&2; exit 2 ;;
esac
