#!/usr/bin/env bash
# A one-node Slurm cluster on this machine, for the tests marked `slurm` and for trying
# hydra/launcher=slurm before a real cluster (make slurm-up / make slurm-down). Debian or Ubuntu, as root.
#   .ci/slurm.sh start    install slurmctld, slurmd, slurm-client, munge where missing; write the
#                         config for this machine; start munged, slurmctld, slurmd; wait until
#                         `srun hostname` answers. Running already: says so and changes nothing.
#   .ci/slurm.sh stop     stop what start started; remove the config, state and logs it wrote
#                         (the packages and munge's key stay, so the next start takes seconds)
#   .ci/slurm.sh status   whether it runs, and sinfo
# No accounting database (slurmdbd), as on many small clusters: sacct answers "accounting storage
# is disabled" and the launcher asks squeue instead (coco_multilabel/sweeps/slurm.py).
set -euo pipefail

PARTITION=debug
CONF=/etc/slurm/slurm.conf
MARK="# written by coco-multilabel .ci/slurm.sh; removed by .ci/slurm.sh stop"
STATE=/var/lib/coco-slurm   # slurmctld's state, slurmd's spool
LOGS=/var/log/coco-slurm
RUN=/run/coco-slurm         # pid files; started-munged: munged was started here, stop ends it
NODE=$(hostname -s)

say() { echo "slurm.sh: $*" >&2; }
die() { say "error: $*"; exit 1; }

ours() { [[ -f $CONF ]] && [[ $(head -n1 "$CONF") == "$MARK" ]]; }

running() {  # a pid file of ours whose process is alive
    [[ -f $RUN/$1.pid ]] && kill -0 "$(cat "$RUN/$1.pid")" 2>/dev/null
}

install_packages() {
    local missing=()
    for command in slurmctld:slurmctld slurmd:slurmd sinfo:slurm-client munged:munge; do
        command -v "${command%%:*}" >/dev/null || missing+=("${command#*:}")
    done
    [[ ${#missing[@]} -eq 0 ]] && return
    command -v apt-get >/dev/null || die "no ${missing[*]} and no apt-get: install Slurm and munge yourself"
    say "installing ${missing[*]} (apt-get, once)"
    # the packages' init scripts must not start daemons with their own config
    DEBIAN_FRONTEND=noninteractive RUNLEVEL=1 apt-get install -y -q --no-install-recommends \
        slurmctld slurmd slurm-client munge >/dev/null \
        || { apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive RUNLEVEL=1 \
             apt-get install -y -q --no-install-recommends slurmctld slurmd slurm-client munge >/dev/null; }
}

write_config() {
    local cpus mem_mib
    cpus=$(nproc)
    # all but 2 GiB (at least half) of the memory: the OS and the submitting process keep theirs
    mem_mib=$(awk '/MemTotal/ {m = int($2 / 1024); r = m - 2048; print (r > m / 2 ? r : int(m / 2))}' /proc/meminfo)
    mkdir -p "$(dirname "$CONF")" "$STATE/ctld" "$STATE/d" "$LOGS" "$RUN"
    cat > "$CONF" <<EOF
$MARK
ClusterName=local
SlurmctldHost=$NODE
SlurmUser=root
AuthType=auth/munge
CredType=cred/munge
# a requeued job may start again after cred_expire seconds (Slurm's default: 120)
AuthInfo=cred_expire=10
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/d
SlurmctldPidFile=$RUN/slurmctld.pid
SlurmdPidFile=$RUN/slurmd.pid
SlurmctldLogFile=$LOGS/slurmctld.log
SlurmdLogFile=$LOGS/slurmd.log
# no cgroups needed: processes tracked by their parent, no binding to cores
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU_Memory
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
ReturnToService=2
# seconds between the SIGTERM and the SIGKILL of a job at its time limit
KillWait=10
# look at pending jobs every few seconds (a requeued job starts again soon), not every minute
SchedulerParameters=sched_interval=5,bf_interval=5
# a job that names no memory gets its CPUs' share, not the whole node
DefMemPerCPU=$((mem_mib / cpus))
NodeName=$NODE CPUs=$cpus RealMemory=$mem_mib State=UNKNOWN
PartitionName=$PARTITION Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
EOF
    say "wrote $CONF: node $NODE, $cpus CPUs, $mem_mib MiB, partition $PARTITION"
}

start_munge() {
    if munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
        return  # a munged answers already (this machine's own): leave it be
    fi
    [[ -f /etc/munge/munge.key ]] || runuser -u munge -- mungekey --create
    mkdir -p /run/munge && chown munge:munge /run/munge
    runuser -u munge -- munged
    touch "$RUN/started-munged"
    for _ in $(seq 50); do munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && return; sleep 0.1; done
    die "munged does not answer (see /var/log/munge/munged.log)"
}

wait_until_ready() {
    local state
    for _ in $(seq 60); do
        state=$(sinfo -h -n "$NODE" -o %t 2>/dev/null || true)
        [[ $state == idle* || $state == mix* || $state == alloc* ]] && break
        sleep 1
    done
    [[ $state == idle* || $state == mix* || $state == alloc* ]] \
        || die "node $NODE is '${state:-not answering}' after 60 s (see $LOGS/slurmctld.log, $LOGS/slurmd.log)"
    timeout 60 srun -p "$PARTITION" -N1 -n1 -t 1 hostname >/dev/null \
        || die "srun hostname failed (see $LOGS/slurmd.log)"
}

start() {
    [[ $(id -u) -eq 0 ]] || die "start needs root (it installs packages and starts daemons): sudo $0 start"
    if ours && running slurmctld && running slurmd; then
        say "running already (node $NODE, partition $PARTITION)"
        return
    fi
    if [[ -f $CONF ]] && ! ours; then
        die "$CONF exists and was not written here: this machine has its own Slurm; use it, or move that file away"
    fi
    install_packages
    write_config
    start_munge
    running slurmctld || slurmctld -c   # -c: no jobs left over from an earlier start
    running slurmd || slurmd -c
    wait_until_ready
    say "ready: node $NODE idle in partition $PARTITION (stop: $0 stop)"
}

stop_daemon() {
    local pid
    [[ -f $RUN/$1.pid ]] || return 0
    pid=$(cat "$RUN/$1.pid")
    if kill -0 "$pid" 2>/dev/null; then
        kill "$pid"
        for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -0 "$pid" 2>/dev/null && kill -9 "$pid"
    fi
    rm -f "$RUN/$1.pid"
}

stop() {
    if [[ -f $CONF ]] && ! ours; then
        die "$CONF was not written here: this machine's own Slurm is left alone"
    fi
    if ours; then
        scancel --full --quiet --user "$(id -un)" 2>/dev/null || true  # jobs first: none outlives its node
        for _ in $(seq 30); do [[ -z $(squeue -h 2>/dev/null) ]] && break; sleep 1; done
    fi
    stop_daemon slurmd
    stop_daemon slurmctld
    if [[ -f $RUN/started-munged ]]; then
        kill "$(cat /run/munge/munged.pid)" 2>/dev/null || true
        for _ in $(seq 50); do [[ -e /run/munge/munged.pid ]] || break; sleep 0.1; done
        rmdir /run/munge 2>/dev/null || true
        rm -f "$RUN/started-munged"
    fi
    rm -rf "$STATE" "$LOGS" "$RUN"
    ours && rm -f "$CONF"
    say "stopped; config, state and logs removed"
}

status() {
    if ours && running slurmctld && running slurmd; then
        say "running (node $NODE, partition $PARTITION)"
        sinfo
    else
        say "not running"
        return 1
    fi
}

case "${1:-}" in
    start) start ;;
    stop) stop ;;
    status) status ;;
    *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
