#!/usr/bin/env bash
# A real single-node SLURM cluster on localhost for tests and CI (Debian's slurm packages).
#
#   bash slurm/cluster.sh start    # install if needed, start munged + slurmctld + slurmd, wait for the node
#   bash slurm/cluster.sh stop     # stop exactly the daemons this script started (recorded PIDs)
#   bash slurm/cluster.sh status
#   source "$SPIKELLM_SLURM_DIR/env.sh"   # then sbatch/squeue/submitit see the cluster (SLURM_CONF)
#
# Env: SPIKELLM_SLURM_DIR (state, wiped on start) [/tmp/spikellm-slurm], SPIKELLM_SLURM_CPUS [nproc],
#      SPIKELLM_SLURM_MEM_MB [detected-1024], SPIKELLM_SLURM_PARTITION [debug].
# No accounting daemon: job states come from squeue/scontrol and the jobcomp file
# ($DIR/log/jobcomp.txt), which records start/end time and state of every finished job.
set -euo pipefail
DIR="${SPIKELLM_SLURM_DIR:-/tmp/spikellm-slurm}"
PART="${SPIKELLM_SLURM_PARTITION:-debug}"
NODE="$(hostname -s)"
CONF="$DIR/etc/slurm.conf"
case "$DIR" in ""|/|/tmp|/var|/etc|/root|/home) echo "refusing SPIKELLM_SLURM_DIR=$DIR" >&2; exit 2 ;; esac
log() { echo "[slurm] $*" >&2; }

install() {
  local need=()
  command -v munged >/dev/null || need+=(munge)
  command -v slurmctld >/dev/null || need+=(slurmctld)
  command -v slurmd >/dev/null || need+=(slurmd)
  command -v sbatch >/dev/null || need+=(slurm-client)
  if ((${#need[@]})); then
    log "installing ${need[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
  fi
}

alive() { [[ -n "${1:-}" ]] && kill -0 "$1" 2>/dev/null; }

stop_one() {
  local f="$DIR/pids/$1" pid
  [[ -f "$f" ]] || return 0
  pid="$(cat "$f")"
  if alive "$pid"; then
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 1 50); do alive "$pid" || break; sleep 0.2; done
    alive "$pid" && kill -KILL "$pid" 2>/dev/null || true
  fi
  rm -f "$f"
}

stop() { stop_one slurmd; stop_one slurmctld; stop_one munged; log "stopped"; }

wait_for() {  # wait_for SECONDS CMD...
  local end=$((SECONDS + $1)); shift
  until "$@" >/dev/null 2>&1; do ((SECONDS < end)) || return 1; sleep 0.3; done
}

write_conf() {
  local cpus="${SPIKELLM_SLURM_CPUS:-$(nproc)}" mem
  mem="$(slurmd -C 2>/dev/null | sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p' | head -1)"
  [[ -n "$mem" ]] || mem=$(( $(awk '/MemTotal/{print $2}' /proc/meminfo) / 1024 ))
  mem="${SPIKELLM_SLURM_MEM_MB:-$((mem - 1024))}"
  cat >"$CONF" <<CONF
ClusterName=spikellm
SlurmctldHost=${NODE}(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$DIR/munge/munge.socket.2
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/run/slurmctld.pid
SlurmdPidFile=$DIR/run/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
MailProg=/bin/true
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/filetxt
JobCompLoc=$DIR/log/jobcomp.txt
SchedulerType=sched/backfill
DependencyParameters=kill_invalid_depend
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=1024
SlurmdParameters=config_overrides
ReturnToService=2
InactiveLimit=0
KillWait=5
MinJobAge=600
FirstJobId=$(( ($(date +%s) % 600000) * 100 + 1 ))
NodeName=${NODE} NodeAddr=127.0.0.1 CPUs=${cpus} RealMemory=${mem} State=UNKNOWN
PartitionName=${PART} Nodes=ALL Default=YES MaxTime=INFINITE State=UP
CONF
}

start() {
  install
  [[ -d "$DIR/pids" ]] && stop
  rm -rf "$DIR"
  mkdir -p "$DIR"/{etc,state,log,run,pids,spool,munge}
  chmod 0700 "$DIR/munge"
  echo "export SLURM_CONF=$CONF" >"$DIR/env.sh"
  export SLURM_CONF="$CONF"
  dd if=/dev/urandom of="$DIR/munge/munge.key" bs=1 count=1024 status=none
  chmod 0400 "$DIR/munge/munge.key"
  /usr/sbin/munged --foreground --force --key-file="$DIR/munge/munge.key" \
    --socket="$DIR/munge/munge.socket.2" --pid-file="$DIR/munge/munged.pid" \
    --seed-file="$DIR/munge/munged.seed" --log-file="$DIR/log/munged.log" >>"$DIR/log/munged.out" 2>&1 &
  echo $! >"$DIR/pids/munged"
  wait_for 20 munge --socket="$DIR/munge/munge.socket.2" -n
  write_conf
  slurmctld -D -i -f "$CONF" >>"$DIR/log/slurmctld.out" 2>&1 &
  echo $! >"$DIR/pids/slurmctld"
  wait_for 60 scontrol ping
  slurmd -D -f "$CONF" -N "$NODE" >>"$DIR/log/slurmd.out" 2>&1 &
  echo $! >"$DIR/pids/slurmd"
  local end=$((SECONDS + 90)) st=""
  while ((SECONDS < end)); do
    st="$(sinfo -h -N -n "$NODE" -o '%T' 2>/dev/null | head -1 || true)"
    case "$st" in
      idle|mixed|allocated) log "up: node $NODE $st; source $DIR/env.sh"; return 0 ;;
      down*|drain*|fail*) scontrol update NodeName="$NODE" State=RESUME >/dev/null 2>&1 || true ;;
    esac
    sleep 0.5
  done
  log "node state '$st' after 90 s; logs in $DIR/log"
  return 1
}

case "${1:-}" in
  start) trap 'rc=$?; ((rc)) && { log "start failed"; stop; }' EXIT; start ;;
  stop) stop ;;
  status) export SLURM_CONF="$CONF"; sinfo; squeue ;;
  *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
