#!/usr/bin/env bash
# A one-node Slurm on this machine, for the tests of `--executor slurm` (tests/test_slurm.py).
#
#   scripts/slurm-test-cluster.sh start    install slurm-wlm + munge if missing (apt-get), write a minimal
#                                         slurm.conf, start munged, slurmctld and slurmd (as root), wait for
#                                         `scontrol ping` and an idle node; prints the SLURM_CONF to export
#   scripts/slurm-test-cluster.sh stop     stop the three daemons this script started
#   scripts/slurm-test-cluster.sh status   `scontrol ping` and `sinfo`
#
# Needs root (the daemons run as root: proctrack/linuxproc and task/none, no cgroups, no systemd) and Debian's
# packages. Everything lives in $EBSLAB_SLURM_DIR (default /tmp/ebslab-slurm): slurm.conf, state, spool, logs.
# The system's /etc/slurm is not touched: clients find this cluster through SLURM_CONF.
set -euo pipefail

DIR="${EBSLAB_SLURM_DIR:-/tmp/ebslab-slurm}"
CONF="$DIR/slurm.conf"
PARTITION="${EBSLAB_SLURM_PARTITION:-debug}"

die() { echo "slurm-test-cluster: $*" >&2; exit 2; }

install_packages() {
  if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v sbatch >/dev/null \
      && command -v munged >/dev/null; then
    return
  fi
  [ "$(id -u)" = 0 ] || die "slurm-wlm and munge are missing and installing them needs root (apt-get)"
  command -v apt-get >/dev/null || die "slurm-wlm and munge are missing and this is not a Debian/Ubuntu system"
  echo "installing slurm-wlm and munge (apt-get)"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge >/dev/null
}

write_conf() {
  local host cpus mem
  host="$(hostname -s)"
  cpus="$(nproc)"
  mem="$(awk '/MemTotal/ {printf "%d", $2 / 1024 * 0.9}' /proc/meminfo)"
  mkdir -p "$DIR/state" "$DIR/spool" "$DIR/log"
  cat >"$CONF" <<EOF
# written by scripts/slurm-test-cluster.sh: a one-node test cluster
ClusterName=ebslab-test
SlurmctldHost=$host
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
# the node is what this file says, whatever slurmd measures (no drain for a small container)
SlurmdParameters=config_overrides
ReturnToService=2
# finished jobs stay visible to squeue/scontrol for an hour (no accounting database here)
MinJobAge=3600
KillWait=30
SchedulerParameters=sched_interval=2
MessageTimeout=20
NodeName=$host CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=$PARTITION Nodes=$host Default=YES MaxTime=INFINITE State=UP
EOF
}

start_munge() {
  if munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then return; fi  # a working munged: keep it
  [ -s /etc/munge/munge.key ] || { mungekey --create 2>/dev/null || /usr/sbin/create-munge-key -f; }
  mkdir -p /run/munge /var/log/munge /var/lib/munge
  chown -R munge:munge /run/munge /var/log/munge /var/lib/munge /etc/munge 2>/dev/null || true
  if id munge >/dev/null 2>&1; then
    su -s /bin/sh munge -c /usr/sbin/munged 2>/dev/null || /usr/sbin/munged --force
  else
    /usr/sbin/munged --force
  fi
  echo started >"$DIR/munged.started-here"
}

running() { [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

start() {
  local t0 ready=0
  t0=$(date +%s.%N)
  install_packages
  [ "$(id -u)" = 0 ] || die "the test cluster's daemons run as root (slurmd as root, no cgroups); run as root"
  mkdir -p "$DIR"
  write_conf
  start_munge
  export SLURM_CONF="$CONF"
  running "$DIR/slurmctld.pid" || slurmctld -f "$CONF" -i  # -i: ignore state from an earlier start
  running "$DIR/slurmd.pid" || slurmd -f "$CONF"
  local deadline=$(( $(date +%s) + 60 ))
  while [ "$(date +%s)" -lt "$deadline" ]; do
    if timeout 5 scontrol ping 2>/dev/null | grep -q UP \
        && timeout 5 sinfo -h -o %t 2>/dev/null | grep -Eq '^(idle|mix|alloc)'; then
      ready=1; break
    fi
    sleep 0.5
  done
  if [ "$ready" != 1 ]; then
    tail -n 5 "$DIR/log/slurmctld.log" >&2 || true
    tail -n 5 "$DIR/log/slurmd.log" >&2 || true
    die "Slurm did not come up in 60 s (logs in $DIR/log)"
  fi
  scontrol update nodename="$(hostname -s)" state=resume 2>/dev/null || true
  echo "test Slurm up in $(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN {printf "%.1f", b - a}') s: partition $PARTITION, $(nproc) CPUs"
  echo "export SLURM_CONF=$CONF"
}

stop() {
  local pidfile pid
  for pidfile in "$DIR/slurmd.pid" "$DIR/slurmctld.pid"; do
    if running "$pidfile"; then
      pid="$(cat "$pidfile")"
      kill "$pid"
      for _ in $(seq 1 40); do kill -0 "$pid" 2>/dev/null || break; sleep 0.25; done
    fi
  done
  if [ -f "$DIR/munged.started-here" ]; then
    pid="$(cat /run/munge/munged.pid 2>/dev/null || true)"
    [ -n "$pid" ] && kill "$pid" 2>/dev/null || true
    rm -f "$DIR/munged.started-here"
  fi
  echo "test Slurm stopped"
}

status() {
  export SLURM_CONF="$CONF"
  scontrol ping && sinfo
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  status) status ;;
  *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
