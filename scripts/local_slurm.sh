#!/usr/bin/env bash
# A one-node SLURM cluster on 127.0.0.1, to try the suite's SLURM paths (sbatch, scancel, preemption,
# requeue) on one machine. Needs root and Slurm's daemons (Debian/Ubuntu: apt install slurm-wlm munge).
#
#   scripts/local_slurm.sh start DIR   # config, state and logs in DIR; prints the SLURM_CONF to export
#   scripts/local_slurm.sh stop DIR
#
# The cluster uses its own config (DIR/slurm.conf) and ports (16817 and 16818, or LOCAL_SLURM_PORTS="CTLD D"),
# so it leaves a system's own SLURM and other local clusters alone; clients reach it through
# SLURM_CONF=DIR/slurm.conf. Partitions: `debug` (default), and
# `low` (GraceTime 10 s) that jobs in `high` preempt, with PreemptMode=CANCEL and KillOnBadExit=1 as on many
# shared clusters.
set -euo pipefail
cmd=${1:-} dir=${2:-}
if [[ -z $cmd || -z $dir ]]; then
  echo "usage: $0 start|stop DIR" >&2
  exit 2
fi
mkdir -p "$dir"
dir=$(cd "$dir" && pwd)
conf="$dir/slurm.conf"

if [[ $cmd == stop ]]; then
  for daemon in slurmd slurmctld; do
    pidfile="$dir/$daemon.pid"
    [[ -f $pidfile ]] && kill "$(cat "$pidfile")" 2>/dev/null || true
  done
  echo "local_slurm: stopped the cluster of $conf"
  exit 0
fi
[[ $cmd == start ]] || { echo "local_slurm: unknown command '$cmd' (start or stop)" >&2; exit 2; }
for tool in munged slurmctld slurmd scontrol; do
  command -v "$tool" > /dev/null || { echo "local_slurm: '$tool' not found (apt install slurm-wlm munge)" >&2; exit 2; }
done
[[ $(id -u) == 0 ]] || { echo "local_slurm: the daemons need root" >&2; exit 2; }

node=$(hostname -s)
read -r ctld_port slurmd_port <<< "${LOCAL_SLURM_PORTS:-16817 16818}"
mem_mb=$(($(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 - 1024))
mkdir -p "$dir/state" "$dir/spool"
cat > "$conf" << EOF
ClusterName=acon-local
SlurmctldHost=${node}(127.0.0.1)
SlurmctldPort=${ctld_port}
SlurmdPort=${slurmd_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/slurmctld.log
SlurmdLogFile=$dir/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
JobRequeue=1
KillWait=30
MinJobAge=600
KillOnBadExit=1
MpiDefault=none
PreemptType=preempt/partition_prio
PreemptMode=CANCEL
NodeName=${node} NodeAddr=127.0.0.1 CPUs=$(getconf _NPROCESSORS_ONLN) RealMemory=${mem_mb} State=UNKNOWN
PartitionName=debug Nodes=${node} Default=YES MaxTime=INFINITE State=UP
PartitionName=low Nodes=${node} PriorityTier=1 GraceTime=10 MaxTime=INFINITE State=UP
PartitionName=high Nodes=${node} PriorityTier=10 MaxTime=INFINITE State=UP
EOF

# munge: one key per machine, one daemon (started only if none answers)
if ! munge -n 2> /dev/null | unmunge > /dev/null 2>&1; then
  mkdir -p /etc/munge /run/munge /var/lib/munge /var/log/munge
  [[ -f /etc/munge/munge.key ]] || { dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key 2> /dev/null; }
  chown -R munge:munge /etc/munge /run/munge /var/lib/munge /var/log/munge 2> /dev/null || true
  chmod 400 /etc/munge/munge.key
  munged --force 2> /dev/null || munged
fi
export SLURM_CONF=$conf
slurmctld -f "$conf"
slurmd -f "$conf" -N "$node"
for _ in $(seq 60); do
  if sinfo -h -o %T 2> /dev/null | grep -q idle; then
    echo "local_slurm: cluster up (node $node, $(getconf _NPROCESSORS_ONLN) CPUs; logs in $dir); to use it:"
    echo "export SLURM_CONF=$conf"
    exit 0
  fi
  sleep 0.5
done
echo "local_slurm: the node did not come up within 30 s; see $dir/slurmctld.log and $dir/slurmd.log" >&2
exit 1
