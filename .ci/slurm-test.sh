#!/usr/bin/env bash
# CI: the demo workflow on a real SLURM, through profiles/slurm.
#
#   bash .ci/slurm-test.sh          (as root: .ci/run runs it after `make test`)
#
# Installs Debian's slurm-wlm and munge when missing, starts a private single-node cluster on this
# machine (munged, slurmctld, slurmd; free ports; state, logs and the munge key in a temporary
# directory; the node has this machine's CPUs and memory and two fake GPUs, so the train rule's
# `--gpus` request is scheduled), runs tests/test_slurm.py against it, and stops the daemons it
# started and cancels their jobs on the way out, also after a failure or an interruption.
#
# One global file is touched while it runs: /etc/slurm/slurm.conf is a symlink to the private
# configuration (srun inside a job ignores SLURM_CONF: the slurm-jobstep executor drops SLURM_*
# variables). It refuses to replace a slurm.conf that is not its own and removes the link at exit.
#
# Environment: PYTHON (python3), LTBENCH_SLURM_TIMEOUT (seconds for the tests, 600).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PYTHON=${PYTHON:-python3}
LIMIT=${LTBENCH_SLURM_TIMEOUT:-600}
ETC_CONF=/etc/slurm/slurm.conf
T0=$(date +%s)

log() { echo "slurm-test: $*" >&2; }
die() { echo "slurm-test: error: $*" >&2; exit 1; }

[ "$(id -u)" = 0 ] || die "needs root (apt-get install slurm-wlm munge, and the SLURM daemons run as root)"

# ---- packages --------------------------------------------------------------------------------
missing=()
for cmd in munged slurmctld slurmd sbatch squeue scancel scontrol sinfo; do
  command -v "$cmd" >/dev/null 2>&1 || missing+=("$cmd")
done
if [ ${#missing[@]} -gt 0 ]; then
  log "installing slurm-wlm and munge with apt-get (missing: ${missing[*]})"
  export DEBIAN_FRONTEND=noninteractive
  { timeout -k 10 300 apt-get update -qq &&
    timeout -k 10 600 apt-get install -y -qq --no-install-recommends slurm-wlm munge; } >"/tmp/ltbench-slurm-apt.log" 2>&1 ||
    { tail -n 20 /tmp/ltbench-slurm-apt.log >&2; die "apt-get could not install slurm-wlm and munge (log above)"; }
  for cmd in munged slurmctld slurmd sbatch; do
    command -v "$cmd" >/dev/null 2>&1 || die "slurm-wlm/munge installed, but $cmd is not on PATH"
  done
fi
"$PYTHON" -c "import snakemake_executor_plugin_slurm" 2>/dev/null ||
  die "snakemake-executor-plugin-slurm is not installed: $PYTHON -m pip install -e '.[slurm]' (make install does it)"

if [ -e "$ETC_CONF" ] || [ -L "$ETC_CONF" ]; then
  # a link left by a run of this script that was killed outright is replaced; anything else is not ours
  target=$(readlink "$ETC_CONF" || true)
  case "$target" in
    /tmp/ltbench-slurm.*/slurm.conf) rm -f "$ETC_CONF" ;;
    *) die "$ETC_CONF exists (a real SLURM configuration?); this test starts its own cluster and will not replace it" ;;
  esac
fi

# ---- a private cluster -----------------------------------------------------------------------
WORK=$(mktemp -d /tmp/ltbench-slurm.XXXXXX)
chmod 755 "$WORK"
mkdir -p "$WORK/munge" "$WORK/state" "$WORK/spool" "$WORK/log"
chmod 755 "$WORK/munge"
export SLURM_CONF=$WORK/slurm.conf

stop_pid() {  # stop_pid NAME PIDFILE: a daemon this script started, by its recorded pid
  local pid
  [ -s "$2" ] || return 0
  pid=$(cat "$2")
  kill -0 "$pid" 2>/dev/null || return 0
  kill "$pid" 2>/dev/null || true
  for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.2; done
  log "$1 ($pid) did not stop on SIGTERM; SIGKILL"
  kill -9 "$pid" 2>/dev/null || true
}

cleanup() {
  local rc=$? jobs
  set +e
  trap - EXIT INT TERM HUP
  if [ -s "$WORK/slurmctld.pid" ] && kill -0 "$(cat "$WORK/slurmctld.pid")" 2>/dev/null; then
    jobs=$(squeue -h -o %i 2>/dev/null)
    if [ -n "$jobs" ]; then
      log "cancelling the jobs still in the cluster: $(echo $jobs)"
      scancel --full $jobs 2>/dev/null
      for _ in $(seq 60); do [ -z "$(squeue -h -o %i 2>/dev/null)" ] && break; sleep 0.5; done
    fi
  fi
  [ "$(readlink "$ETC_CONF" 2>/dev/null)" = "$WORK/slurm.conf" ] && rm -f "$ETC_CONF"
  stop_pid slurmd "$WORK/slurmd.pid"
  stop_pid slurmctld "$WORK/slurmctld.pid"
  stop_pid munged "$WORK/munged.pid"
  if [ $rc -ne 0 ]; then
    for f in "$WORK"/log/*.log; do
      [ -s "$f" ] && { echo "---- last lines of $(basename "$f")" >&2; tail -n 25 "$f" >&2; }
    done
  fi
  rm -rf "$WORK"
  log "stopped the daemons; exit $rc after $(( $(date +%s) - T0 )) s"
  exit $rc
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
trap 'exit 129' HUP

NODE=$(hostname -s)
# CPUs, sockets, cores, threads and memory as slurmd sees them (RealMemory must not exceed it)
HW=$(slurmd -C | head -n 1)
case "$HW" in NodeName=*) ;; *) die "unexpected output of slurmd -C: $HW" ;; esac
read -r CTLD_PORT SLURMD_PORT < <("$PYTHON" - <<'EOF'
import socket
socks = [socket.socket() for _ in range(2)]
for s in socks:
    s.bind(("127.0.0.1", 0))
print(*(s.getsockname()[1] for s in socks))
EOF
)

# munge: its own key and socket, nothing under /etc/munge or /run/munge
dd if=/dev/urandom of="$WORK/munge/munge.key" bs=1024 count=1 status=none
chmod 600 "$WORK/munge/munge.key"
munged --force --socket="$WORK/munge/munge.socket" --key-file="$WORK/munge/munge.key" \
  --pid-file="$WORK/munged.pid" --log-file="$WORK/log/munged.log" --seed-file="$WORK/munge/munged.seed" ||
  die "munged did not start"

# two fake GPUs: character devices like /dev/null, listed in gres.conf
mknod -m 666 "$WORK/fakegpu0" c 1 3 && mknod -m 666 "$WORK/fakegpu1" c 1 3 ||
  die "mknod of the fake GPU devices failed (needs CAP_MKNOD)"

cat >"$WORK/slurm.conf" <<EOF
# A single-node cluster for ltbench's CI (.ci/slurm-test.sh); everything under $WORK.
ClusterName=ltbenchci
SlurmctldHost=$NODE(127.0.0.1)
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$WORK/munge/munge.socket
StateSaveLocation=$WORK/state
SlurmdSpoolDir=$WORK/spool
SlurmctldPidFile=$WORK/slurmctld.pid
SlurmdPidFile=$WORK/slurmd.pid
SlurmctldLogFile=$WORK/log/slurmctld.log
SlurmdLogFile=$WORK/log/slurmd.log
PlugStackConfig=$WORK/plugstack.conf
# no cgroups or systemd here
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=1000
GresTypes=gpu
# no accounting storage: sacct cannot answer, so the profile overlay checks job states with squeue,
# which shows finished jobs for MinJobAge seconds
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
MinJobAge=300
KillWait=10
MpiDefault=none
ReturnToService=2
MailProg=/bin/true
$HW Gres=gpu:fake:2 NodeAddr=127.0.0.1 State=UNKNOWN
PartitionName=ci Nodes=$NODE Default=YES MaxTime=60 State=UP
EOF
echo "NodeName=$NODE Name=gpu Type=fake File=$WORK/fakegpu[0-1]" >"$WORK/gres.conf"
: >"$WORK/plugstack.conf"
ln -s "$WORK/slurm.conf" "$ETC_CONF"

slurmctld -f "$SLURM_CONF" || die "slurmctld did not start"
slurmd -f "$SLURM_CONF" || die "slurmd did not start"
state=""
for _ in $(seq 60); do
  state=$(sinfo -h -n "$NODE" -o %t 2>/dev/null || true)
  [ "$state" = idle ] && break
  sleep 0.5
done
[ "$state" = idle ] || { scontrol show node "$NODE" >&2 || true; die "node $NODE is '$state', not idle"; }
log "cluster up in $(( $(date +%s) - T0 )) s: node $NODE ($(scontrol show node "$NODE" | grep -o 'CfgTRES=[^ ]*'))"

# ---- the tests -------------------------------------------------------------------------------
export LTBENCH_SLURM=1 PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
timeout -k 15 "$LIMIT" "$PYTHON" -m pytest -q -p no:cacheprovider --durations=5 tests/test_slurm.py
