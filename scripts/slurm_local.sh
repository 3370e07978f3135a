#!/usr/bin/env bash
# Starts a one-machine SLURM cluster (munge, MariaDB + slurmdbd, slurmctld, slurmd from Debian's
# slurm-wlm) sized to this machine's CPUs and memory, no GPUs; for tests/test_slurm*.py and CI.
#   bash scripts/slurm_local.sh          install if needed, write the configs, start, wait idle
#   bash scripts/slurm_local.sh stop     stop the daemons this script started
# Idempotent: a second call with everything up only checks the node. Needs root.
#
# Why slurmdbd: snakemake-executor-plugin-slurm polls job states with `sacct`, and Slurm 22.05's
# sacct answers only from the accounting database ("accounting storage is disabled" otherwise).
set -euo pipefail

CONF_DIR=/etc/slurm
STATE=/var/spool/slurm-local
LOGS=/var/log/slurm-local
RUN=/run/slurm-local
HOST=$(hostname -s)
CLUSTER=local
WAIT_S=${SLURM_LOCAL_WAIT_S:-60}
PACKAGES=(slurm-wlm slurm-client slurmdbd munge mariadb-server)

log() { echo "slurm_local: $*"; }
die() {
    echo "slurm_local: $*" >&2
    exit 1
}
alive() { [[ -f "$1" ]] && kill -0 "$(cat "$1")" 2>/dev/null; }

stop_daemons() { # reverse start order; mariadb last so slurmdbd can flush
    for pidfile in "$RUN/slurmd.pid" "$RUN/slurmctld.pid" "$RUN/slurmdbd.pid" \
        /run/mysqld/mysqld.pid /run/munge/munged.pid; do
        if alive "$pidfile"; then
            kill "$(cat "$pidfile")" && log "stopped $(basename "$pidfile" .pid)"
            for _ in $(seq 20); do alive "$pidfile" || break; sleep 0.5; done
        fi
    done
}

if [[ "${1:-}" == stop ]]; then
    stop_daemons
    exit 0
fi
[[ $(id -u) -eq 0 ]] || die "needs root (installs slurm-wlm and starts its daemons)"

# 1. Packages (daemons are started by hand below: containers have no systemd).
if ! command -v slurmctld >/dev/null || ! command -v slurmdbd >/dev/null ||
    ! command -v munged >/dev/null || ! command -v mariadbd >/dev/null; then
    log "installing ${PACKAGES[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -q --no-install-recommends "${PACKAGES[@]}" >/dev/null 2>&1 ||
        { apt-get update -q >/dev/null && apt-get install -y -q --no-install-recommends \
            "${PACKAGES[@]}" >/dev/null; } ||
        die "apt-get could not install ${PACKAGES[*]}"
fi

# 2. Configs sized to this machine. RealMemory leaves 10% to the OS so slurmd does not
# drain the node for having less memory than configured.
cpus=$(nproc)
mem_mb=$(awk '/MemTotal/ {printf "%d", $2 / 1024 * 0.9}' /proc/meminfo)
mkdir -p "$CONF_DIR" "$STATE/ctld" "$STATE/d" "$LOGS" "$RUN"
slurm_conf=$(
    cat <<EOF
# Written by scripts/slurm_local.sh: a one-machine test cluster ($cpus CPUs, $mem_mb MB, no GPUs).
ClusterName=$CLUSTER
SlurmctldHost=$HOST(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/d
SlurmctldPidFile=$RUN/slurmctld.pid
SlurmdPidFile=$RUN/slurmd.pid
SlurmctldLogFile=$LOGS/slurmctld.log
SlurmdLogFile=$LOGS/slurmd.log
# No cgroups in containers: track job processes by process group, bind no tasks.
ProctrackType=proctrack/pgid
TaskPlugin=task/none
# CPUs and memory are consumable, so --mem and --cpus-per-task are enforced at scheduling.
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU_Memory
SchedulerType=sched/backfill
# Accounting through slurmdbd, so sacct (the executor plugin's status query) works.
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
JobAcctGatherType=jobacct_gather/linux
JobCompType=jobcomp/none
# Store the plugin's --comment (rule_<name>_wildcards_<...>) so sacct shows which rule a job ran.
AccountingStoreFlags=job_comment
MinJobAge=300
ReturnToService=2
SlurmdTimeout=300
MpiDefault=none
NodeName=$HOST NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN
PartitionName=debug Nodes=$HOST Default=YES MaxTime=INFINITE State=UP
EOF
)
dbd_conf=$(
    cat <<EOF
# Written by scripts/slurm_local.sh: accounting for the one-machine test cluster.
AuthType=auth/munge
DbdHost=localhost
DbdAddr=127.0.0.1
SlurmUser=root
PidFile=$RUN/slurmdbd.pid
LogFile=$LOGS/slurmdbd.log
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageUser=slurm
StoragePass=slurm
StorageLoc=slurm_acct_db
EOF
)
changed=0
write_if_changed() { # $1 path, $2 content
    if [[ ! -f "$1" ]] || [[ "$(cat "$1")" != "$2" ]]; then
        echo "$2" >"$1"
        changed=1
    fi
}
write_if_changed "$CONF_DIR/slurm.conf" "$slurm_conf"
write_if_changed "$CONF_DIR/slurmdbd.conf" "$dbd_conf"
chmod 600 "$CONF_DIR/slurmdbd.conf" # slurmdbd refuses a world-readable config
if [[ $changed -eq 1 ]]; then
    log "wrote $CONF_DIR/slurm.conf, slurmdbd.conf ($cpus CPUs, $mem_mb MB)"
    stop_daemons # a changed config needs fresh daemons
fi

# 3. Daemons, in dependency order: munge (auth) -> MariaDB -> slurmdbd -> slurmctld -> slurmd.
if ! alive /run/munge/munged.pid; then
    [[ -s /etc/munge/munge.key ]] || mungekey --create --keyfile /etc/munge/munge.key
    chown munge:munge /etc/munge/munge.key && chmod 400 /etc/munge/munge.key
    mkdir -p /run/munge && chown munge:munge /run/munge
    runuser -u munge -- munged --force 2>>"$LOGS/munged.err" ||
        die "munged did not start (see $LOGS/munged.err)"
    log "started munged"
fi
if ! mariadb-admin ping >/dev/null 2>&1; then
    mkdir -p /run/mysqld && chown mysql:mysql /run/mysqld
    [[ -d /var/lib/mysql/mysql ]] || mariadb-install-db --user=mysql >>"$LOGS/mariadb.log" 2>&1
    nohup mariadbd --user=mysql >>"$LOGS/mariadb.log" 2>&1 &
    for _ in $(seq 60); do mariadb-admin ping >/dev/null 2>&1 && break; sleep 0.5; done
    mariadb-admin ping >/dev/null 2>&1 || die "MariaDB did not start (see $LOGS/mariadb.log)"
    log "started mariadbd"
fi
mariadb -e "CREATE DATABASE IF NOT EXISTS slurm_acct_db;
    CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY 'slurm';
    GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';"
if ! alive "$RUN/slurmdbd.pid"; then
    slurmdbd || die "slurmdbd did not start (see $LOGS/slurmdbd.log)"
    for _ in $(seq 60); do sacctmgr -n list cluster >/dev/null 2>&1 && break; sleep 0.5; done
    log "started slurmdbd"
fi
# slurmctld registers the cluster itself, but only after its first contact; adding it here
# makes `sacct` and the plugin's account check answer from the first job on.
if ! sacctmgr -n -P list cluster format=cluster 2>/dev/null | grep -qx "$CLUSTER"; then
    sacctmgr -i add cluster "$CLUSTER" >/dev/null
fi
if ! alive "$RUN/slurmctld.pid"; then
    slurmctld || die "slurmctld did not start (see $LOGS/slurmctld.log)"
    log "started slurmctld"
fi
if ! alive "$RUN/slurmd.pid"; then
    slurmd || die "slurmd did not start (see $LOGS/slurmd.log)"
    log "started slurmd"
fi

# 4. Wait until the node accepts jobs.
state=""
for ((i = 0; i < WAIT_S; i++)); do
    state=$(sinfo -h -N -n "$HOST" -o %T 2>/dev/null || true)
    case "$state" in
        idle* | mixed* | allocated*)
            log "node $HOST is $state ($cpus CPUs, $mem_mb MB); cluster ready"
            exit 0
            ;;
        down* | drain*)
            scontrol update nodename="$HOST" state=resume 2>/dev/null || true
            ;;
    esac
    sleep 1
done
die "node $HOST not idle after ${WAIT_S}s (state: ${state:-none}; see $LOGS/)"
