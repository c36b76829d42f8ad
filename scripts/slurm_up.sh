#!/usr/bin/env bash
# Start a single-node SLURM cluster on this machine: `sudo scripts/slurm_up.sh` (idempotent).
#
# As root on Debian or Ubuntu: installs slurmctld, slurmd, slurm-client and munge from the
# distribution's packages (when missing), creates the munge key, starts munged as the munge
# user, writes /etc/slurm/slurm.conf (one node = this machine, one default partition `kat`,
# process tracking without cgroups), starts slurmctld and slurmd, and waits until the node is
# idle. A slurm.conf not written by this script is never touched; a running cluster with an
# out-of-date conf from this script is restarted with the new one. Used by CI (.ci/run) and
# tests/launch; see docs/slurm.md. Exit status 0 means `sbatch` works; otherwise stderr says why.
set -euo pipefail

MARKER="# written by kat_megatron scripts/slurm_up.sh"
CONF=/etc/slurm/slurm.conf
PARTITION=${KAT_SLURM_PARTITION:-kat}
NODE=$(hostname -s)
CONF_CHANGED=0

log() { echo "slurm_up: $*" >&2; }

node_ready() {
    local state
    state=$(sinfo -h -N -o '%T' 2>/dev/null | head -n 1) || return 1
    case "$state" in
        idle* | mixed* | allocated* | completing*) return 0 ;;
        *) return 1 ;;
    esac
}

ours() { [ -f "$CONF" ] && grep -qF "$MARKER" "$CONF"; }

install_packages() {
    command -v slurmctld >/dev/null && command -v slurmd >/dev/null \
        && command -v sbatch >/dev/null && command -v munged >/dev/null && return 0
    command -v apt-get >/dev/null || { log "no apt-get: install SLURM and munge by hand"; exit 3; }
    log "installing slurmctld slurmd slurm-client munge"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends slurmctld slurmd slurm-client munge >/dev/null
}

start_munge() {
    if [ ! -s /etc/munge/munge.key ]; then
        mkdir -p /etc/munge
        dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key status=none
    fi
    chown munge:munge /etc/munge/munge.key
    chmod 400 /etc/munge/munge.key
    mkdir -p /run/munge /var/log/munge /var/lib/munge
    chown munge:munge /run/munge /var/log/munge /var/lib/munge
    if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
        log "starting munged"
        runuser -u munge -- /usr/sbin/munged
        sleep 1
    fi
    munge -n | unmunge >/dev/null || { log "munge does not work"; exit 4; }
}

render_conf() {
    local cpus mem_mb
    cpus=$(nproc)
    mem_mb=$(awk '/MemTotal/ {print int($2 / 1024 * 0.9)}' /proc/meminfo)
    # AuthInfo cred_expire also delays a requeued job's restart (default 120 s).
    cat <<EOF
$MARKER
ClusterName=kat
SlurmctldHost=$NODE
SlurmUser=root
AuthType=auth/munge
AuthInfo=cred_expire=10
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/builtin
SchedulerParameters=sched_interval=2
ReturnToService=2
MinJobAge=3600
KillWait=30
JobRequeue=1
NodeName=$NODE CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN
PartitionName=$PARTITION Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
EOF
}

write_conf() {  # sets CONF_CHANGED=1 when it (re)writes slurm.conf
    if [ -f "$CONF" ] && ! ours; then
        log "keeping the existing $CONF (not written by this script)"
        return 0
    fi
    mkdir -p /etc/slurm /var/spool/slurmctld /var/spool/slurmd /var/log/slurm
    local tmp
    tmp=$(mktemp)
    render_conf >"$tmp"
    if [ -f "$CONF" ] && cmp -s "$tmp" "$CONF"; then
        rm -f "$tmp"
        return 0
    fi
    chmod 644 "$tmp"
    mv "$tmp" "$CONF"
    CONF_CHANGED=1
    log "wrote $CONF (partition $PARTITION, node $NODE)"
}

stop_daemon() {  # stop_daemon NAME PIDFILE: stop a daemon started from an older conf
    local pid
    pid=$(cat "$2" 2>/dev/null) || return 0
    if [ -n "$pid" ] && kill "$pid" 2>/dev/null; then
        log "stopping $1 to restart it with the new conf"
        while kill -0 "$pid" 2>/dev/null; do sleep 0.2; done
    fi
}

start_daemons() {
    if ! scontrol ping 2>/dev/null | grep -q UP; then
        log "starting slurmctld"
        slurmctld
    fi
    if ! pgrep -x slurmd >/dev/null; then
        log "starting slurmd"
        slurmd
    fi
    for _ in $(seq 1 60); do
        node_ready && return 0
        if sinfo -h -N -o '%T' 2>/dev/null | grep -qiE 'down|drain'; then
            scontrol update NodeName="$NODE" State=RESUME 2>/dev/null || true
        fi
        sleep 1
    done
    log "node $NODE did not become idle; see /var/log/slurm/*.log"
    sinfo -N >&2 || true
    exit 5
}

if [ "$(id -u)" -ne 0 ]; then
    node_ready && exit 0
    log "SLURM is not running and starting it needs root"
    exit 2
fi
if node_ready && ! ours; then
    exit 0  # someone else's cluster
fi
if ! getent hosts "$NODE" >/dev/null; then
    echo "127.0.1.1 $NODE" >>/etc/hosts  # slurmd and torchrun's rendezvous resolve the node
fi
install_packages
start_munge
write_conf
if [ "$CONF_CHANGED" -eq 1 ]; then
    stop_daemon slurmd /run/slurmd.pid
    stop_daemon slurmctld /run/slurmctld.pid
fi
node_ready && exit 0
start_daemons
log "single-node SLURM is up: partition $PARTITION on $NODE"
