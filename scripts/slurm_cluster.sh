#!/usr/bin/env bash
# A one-node SLURM cluster on this machine, for the cluster tests (tests/cluster/) and for trying the SLURM paths of
# docs/cluster.md: Debian's slurm-wlm and munge, as root.
#
#   scripts/slurm_cluster.sh start     # install (apt) if missing, generate a munge key, start munged, slurmctld,
#                                      # slurmd; prints the line to source: . $DIR/env.sh (exports SLURM_CONF)
#   scripts/slurm_cluster.sh stop      # stop the daemons (by their pid files) and remove $DIR
#   scripts/slurm_cluster.sh status    # sinfo
#
# Everything lives in $DARTMAMBA_SLURM_DIR (default /tmp/dartmamba-slurm): slurm.conf, the munge key and socket,
# state and spool folders, the daemons' logs and pid files. The node is this host (`hostname -s`) with 2 CPUs
# (DARTMAMBA_SLURM_CPUS), one partition `debug` with a 10-minute time limit; ProctrackType=proctrack/linuxproc and
# TaskPlugin=task/none (no cgroups needed), SelectType=select/cons_tres. Ports: 16817/16818 (DARTMAMBA_SLURM_PORT).
set -euo pipefail

DIR="${DARTMAMBA_SLURM_DIR:-/tmp/dartmamba-slurm}"
CPUS="${DARTMAMBA_SLURM_CPUS:-2}"
PORT="${DARTMAMBA_SLURM_PORT:-16817}"
HOST="$(hostname -s)"

log() { echo "slurm_cluster: $*" >&2; }

install_packages() {
    if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v munged >/dev/null; then
        return
    fi
    if [ "$(id -u)" != 0 ]; then
        log "slurm-wlm and munge are missing and this is not root: apt-get install slurm-wlm munge"; exit 1
    fi
    log "installing slurm-wlm and munge (apt)"
    apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge >/dev/null
}

wait_for() {   # wait_for <seconds> <command...>
    local limit=$1; shift
    for _ in $(seq 1 $((limit * 5))); do
        if "$@" >/dev/null 2>&1; then return 0; fi
        sleep 0.2
    done
    return 1
}

start() {
    install_packages
    if [ -f "$DIR/slurmctld.pid" ] && kill -0 "$(cat "$DIR/slurmctld.pid")" 2>/dev/null; then
        log "already running (SLURM_CONF=$DIR/slurm.conf)"; echo ". $DIR/env.sh"; return
    fi
    rm -rf "$DIR"
    mkdir -p "$DIR/state" "$DIR/spool" "$DIR/munge"
    chmod 755 "$DIR"
    # munge: a generated key, munged as the munge user with its socket in $DIR
    dd if=/dev/urandom of="$DIR/munge/munge.key" bs=1024 count=1 status=none
    chown -R munge:munge "$DIR/munge"
    chmod 400 "$DIR/munge/munge.key"
    chmod 755 "$DIR/munge"
    runuser -u munge -- /usr/sbin/munged --force --key-file="$DIR/munge/munge.key" \
        --socket="$DIR/munge/munge.socket.2" --pid-file="$DIR/munge/munged.pid" \
        --log-file="$DIR/munge/munged.log" --seed-file="$DIR/munge/munged.seed"
    if ! wait_for 10 munge -n -S "$DIR/munge/munge.socket.2"; then
        log "munged did not start:"; cat "$DIR/munge/munged.log" >&2 || true; exit 1
    fi
    cat > "$DIR/slurm.conf" <<EOF
ClusterName=dartmamba
SlurmctldHost=$HOST(127.0.0.1)
SlurmUser=root
SlurmdUser=root
SlurmctldPort=$PORT
SlurmdPort=$((PORT + 1))
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$DIR/munge/munge.socket.2,cred_expire=10
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.pid
SlurmctldLogFile=$DIR/slurmctld.log
SlurmdLogFile=$DIR/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2,bf_interval=1
MpiDefault=none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
ReturnToService=2
JobRequeue=1
KillWait=10
MinJobAge=600
NodeName=$HOST NodeAddr=127.0.0.1 CPUs=$CPUS State=UNKNOWN
PartitionName=debug Nodes=$HOST Default=YES MaxTime=10 State=UP
EOF
    cat > "$DIR/env.sh" <<EOF
export SLURM_CONF=$DIR/slurm.conf
EOF
    export SLURM_CONF="$DIR/slurm.conf"
    /usr/sbin/slurmctld -f "$SLURM_CONF"
    /usr/sbin/slurmd -f "$SLURM_CONF"
    if ! wait_for 30 sh -c "sinfo -h -N -o %T | grep -qE '^(idle|mixed|allocated)'"; then
        log "the node did not come up:"; sinfo -N >&2 || true
        tail -n 20 "$DIR/slurmctld.log" "$DIR/slurmd.log" >&2 || true
        exit 1
    fi
    log "up: $(sinfo -V), node $HOST with $CPUS CPUs, partition debug; . $DIR/env.sh"
    echo ". $DIR/env.sh"
}

stop_pid() {   # stop_pid <pid file> <name>
    local file=$1 pid
    [ -f "$file" ] || return 0
    pid="$(cat "$file")"
    if kill -0 "$pid" 2>/dev/null; then
        kill "$pid" 2>/dev/null || true
        for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.1; done
        kill -9 "$pid" 2>/dev/null || true
    fi
}

stop() {
    if [ -f "$DIR/slurm.conf" ] && [ -f "$DIR/slurmctld.pid" ]; then
        SLURM_CONF="$DIR/slurm.conf" scancel --user="$(id -un)" >/dev/null 2>&1 || true
    fi
    stop_pid "$DIR/slurmd.pid"
    stop_pid "$DIR/slurmctld.pid"
    stop_pid "$DIR/munge/munged.pid"
    rm -rf "$DIR"
    log "stopped"
}

case "${1:-}" in
    start) start ;;
    stop) stop ;;
    status) SLURM_CONF="$DIR/slurm.conf" sinfo ;;
    *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
