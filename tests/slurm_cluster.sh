#!/usr/bin/env bash
# One-node SLURM "cluster" on this machine, for tests and CI.
#
#   bash tests/slurm_cluster.sh start   # install (apt) if needed, configure, start, wait for the node
#   bash tests/slurm_cluster.sh stop    # stop slurmd, slurmctld and munged
#   bash tests/slurm_cluster.sh status  # print sinfo / daemon state
#
# Needs root and Debian's slurm packages (22.05 on bookworm); installs them with
# apt-get when missing. Idempotent: running `start` twice is harmless, and a
# changed slurm.conf restarts the daemons. Exit status 0 only when `sinfo`
# shows the node idle; otherwise a message on stderr says why.
#
# Environment knobs (all optional):
#   SLURM_CLUSTER_TIMEOUT  seconds to wait for the node to become idle (60)
#   SLURM_CLUSTER_CPUS     CPUs of the node (nproc, not limited by OMP_NUM_THREADS)
set -euo pipefail

CONF_DIR=/etc/slurm
CONF=$CONF_DIR/slurm.conf
STATE_DIR=/var/lib/slurm/slurmctld
SPOOL_DIR=/var/lib/slurm/slurmd
LOG_DIR=/var/log/slurm
RUN_DIR=/run/slurm
MUNGE_KEY=/etc/munge/munge.key
MUNGE_PID=/run/munge/munged.pid
CTLD_PID=$RUN_DIR/slurmctld.pid
SLURMD_PID=$RUN_DIR/slurmd.pid
TIMEOUT=${SLURM_CLUSTER_TIMEOUT:-60}
NODE=$(hostname -s)

die() {
    echo "slurm_cluster.sh: ERROR: $*" >&2
    exit 1
}
log() { echo "slurm_cluster.sh: $*"; }

# pid from a pid file, if that process is alive
alive_pid() {
    local f=$1 pid
    [[ -s $f ]] || return 1
    pid=$(<"$f")
    [[ $pid =~ ^[0-9]+$ ]] && kill -0 "$pid" 2>/dev/null && echo "$pid"
}

show_logs() {
    local f
    for f in "$LOG_DIR/slurmctld.log" "$LOG_DIR/slurmd.log" /var/log/munge/munged.log; do
        [[ -f $f ]] && { echo "---- tail $f" >&2; tail -n 20 "$f" >&2; }
    done
    return 0
}

install_packages() {
    local missing=() p
    for p in munge slurmctld slurmd slurm-client; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
    done
    ((${#missing[@]} == 0)) && return 0
    command -v apt-get >/dev/null || die "packages missing (${missing[*]}) and apt-get is not available"
    log "installing ${missing[*]} with apt-get"
    export DEBIAN_FRONTEND=noninteractive
    # the package lists may be missing or stale on a fresh machine
    apt-get update -q >/dev/null || die "apt-get update failed"
    apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null \
        || die "apt-get install ${missing[*]} failed"
}

write_munge_key() {
    if [[ ! -s $MUNGE_KEY ]]; then
        log "writing a random $MUNGE_KEY"
        mkdir -p "$(dirname "$MUNGE_KEY")"
        (umask 077 && dd if=/dev/urandom of="$MUNGE_KEY" bs=1024 count=1 status=none)
    fi
    if id munge >/dev/null 2>&1; then
        chown munge:munge "$MUNGE_KEY"
    fi
    chmod 400 "$MUNGE_KEY"
}

# prints the wanted slurm.conf on stdout
render_conf() {
    local cpus mem
    # nproc honours OMP_NUM_THREADS: at 1 the node got 1 CPU and every 2-CPU job pended forever
    # (PartitionConfig); at 4, more CPUs than slurmd finds, and the node was invalid
    cpus=${SLURM_CLUSTER_CPUS:-$(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc)}
    # RealMemory must not exceed what slurmd finds, or the node drains: use 90%
    mem=$(awk '/^MemTotal:/ {printf "%d", $2 / 1024 * 0.9}' /proc/meminfo)
    cat <<EOF
# Written by tests/slurm_cluster.sh: a one-node cluster on localhost (rewritten by 'start').
ClusterName=svdecode-ci
SlurmctldHost=$NODE(127.0.0.1)
AuthType=auth/munge
CryptoType=crypto/munge
SlurmUser=root
SlurmdUser=root
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SwitchType=switch/none
ReturnToService=2
StateSaveLocation=$STATE_DIR
SlurmdSpoolDir=$SPOOL_DIR
SlurmctldPidFile=$CTLD_PID
SlurmdPidFile=$SLURMD_PID
SlurmctldLogFile=$LOG_DIR/slurmctld.log
SlurmdLogFile=$LOG_DIR/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
# no slurmdbd: sacct is unavailable, finished jobs are in the jobcomp log and
# stay visible to 'scontrol show job' for MinJobAge seconds
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/filetxt
JobCompLoc=$LOG_DIR/jobcomp.log
MinJobAge=3600
KillWait=30
InactiveLimit=0
Waittime=0
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem State=UNKNOWN
# OverSubscribe=FORCE lets up to 4 jobs share a CPU, so two jobs can run/queue side by side
PartitionName=debug Nodes=$NODE Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:4
EOF
}

start_munge() {
    if alive_pid "$MUNGE_PID" >/dev/null; then
        return 0
    fi
    mkdir -p /run/munge /var/log/munge /var/lib/munge
    if id munge >/dev/null 2>&1; then
        chown munge:munge /run/munge /var/log/munge /var/lib/munge
        chmod 0755 /run/munge
        runuser -u munge -- /usr/sbin/munged || { show_logs; die "munged did not start"; }
    else
        /usr/sbin/munged --force || { show_logs; die "munged did not start"; }
    fi
    local i
    for ((i = 0; i < 20; i++)); do
        munge -n </dev/null | unmunge >/dev/null 2>&1 && return 0
        sleep 0.5
    done
    show_logs
    die "munged started but munge/unmunge does not work"
}

stop_daemon() {
    local name=$1 pidfile=$2 pid i
    pid=$(alive_pid "$pidfile") || return 0
    log "stopping $name (pid $pid)"
    kill "$pid" 2>/dev/null || true
    for ((i = 0; i < 40; i++)); do
        kill -0 "$pid" 2>/dev/null || return 0
        sleep 0.25
    done
    kill -9 "$pid" 2>/dev/null || true
}

node_state() {
    sinfo -h -N -n "$NODE" -o '%T' 2>/dev/null | head -n 1
}

cmd_start() {
    [[ $(id -u) -eq 0 ]] || die "must run as root (slurmd/slurmctld are started as root)"
    [[ $(uname -s) == Linux ]] || die "Linux only"
    install_packages
    for b in /usr/sbin/slurmctld /usr/sbin/slurmd /usr/sbin/munged /usr/bin/sinfo; do
        [[ -x $b ]] || die "$b not found after install"
    done
    write_munge_key

    mkdir -p "$CONF_DIR" "$STATE_DIR" "$SPOOL_DIR" "$LOG_DIR" "$RUN_DIR"
    local new b restart=0
    new=$(mktemp)
    render_conf >"$new"
    if ! cmp -s "$new" "$CONF"; then
        log "writing $CONF"
        install -m 0644 "$new" "$CONF"
        restart=1
    fi
    rm -f "$new"

    start_munge
    if ((restart)); then
        stop_daemon slurmd "$SLURMD_PID"
        stop_daemon slurmctld "$CTLD_PID"
    fi
    if ! alive_pid "$CTLD_PID" >/dev/null; then
        log "starting slurmctld"
        /usr/sbin/slurmctld || { show_logs; die "slurmctld did not start"; }
    fi
    if ! alive_pid "$SLURMD_PID" >/dev/null; then
        log "starting slurmd"
        /usr/sbin/slurmd || { show_logs; die "slurmd did not start"; }
    fi

    local state="" i
    for ((i = 0; i < TIMEOUT * 2; i++)); do
        state=$(node_state || true)
        case $state in
            idle | mixed | allocated) break ;;
            down* | drain* | fail*)
                # e.g. state saved from an earlier run: bring it back
                scontrol update NodeName="$NODE" State=RESUME >/dev/null 2>&1 || true ;;
        esac
        alive_pid "$CTLD_PID" >/dev/null || { show_logs; die "slurmctld exited"; }
        alive_pid "$SLURMD_PID" >/dev/null || { show_logs; die "slurmd exited"; }
        sleep 0.5
    done
    case $state in
        idle | mixed | allocated) ;;
        *)
            show_logs
            die "node $NODE not idle after ${TIMEOUT}s (state: '${state:-unknown}')"
            ;;
    esac
    log "cluster up: node $NODE is $state"
    sinfo
}

cmd_stop() {
    if alive_pid "$CTLD_PID" >/dev/null && command -v scontrol >/dev/null; then
        # cancel our jobs so that nothing is left running, then stop the daemons
        scancel --full --quiet --user=root 2>/dev/null || true
    fi
    stop_daemon slurmd "$SLURMD_PID"
    stop_daemon slurmctld "$CTLD_PID"
    stop_daemon munged "$MUNGE_PID"
    log "stopped"
}

cmd_status() {
    local d f pid
    for d in "munged:$MUNGE_PID" "slurmctld:$CTLD_PID" "slurmd:$SLURMD_PID"; do
        f=${d#*:}
        if pid=$(alive_pid "$f"); then echo "${d%%:*}: running (pid $pid)"; else echo "${d%%:*}: stopped"; fi
    done
    if alive_pid "$CTLD_PID" >/dev/null; then sinfo; fi
}

case ${1:-} in
    start) cmd_start ;;
    stop) cmd_stop ;;
    status) cmd_status ;;
    conf) render_conf ;;
    *)
        echo "usage: $0 start|stop|status|conf" >&2
        exit 2
        ;;
esac
