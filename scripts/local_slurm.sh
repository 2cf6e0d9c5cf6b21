#!/usr/bin/env bash
# A real two-node Slurm cluster on this one machine, to try launchers/slurm.py without a cluster
# and to run the `slurm`-marked tests (docs/launching.md).
#
#   scripts/local_slurm.sh start    install what is missing (apt, root), configure, start, wait until idle
#   scripts/local_slurm.sh status   the daemons this script started and `sinfo`
#   scripts/local_slurm.sh stop     cancel the cluster's jobs, stop exactly the daemons `start` started
#
# Both start and stop are idempotent. Nodes n1 and n2 are two `slurmd -N` on this host
# (NodeAddr=127.0.0.1, their own ports), each with this machine's CPUs; `n1 n2` go into /etc/hosts so
# that MASTER_ADDR resolves. Accounting is real (slurmdbd + a private MariaDB), because submitit
# reads job states from `sacct`: without it a job that dies without a result looks pending forever.
# No systemd needed: every daemon runs in the foreground, detached, and its PID is recorded.
#
# Everything generated (config, state, logs, PIDs, the database) lives in $EDLM_SLURM_HOME
# (default /var/lib/edlm-local-slurm), never in the repository. Client commands find the config
# through /etc/slurm/slurm.conf, a symlink this script creates when that path is free (and removes
# on stop); otherwise `export SLURM_CONF=$EDLM_SLURM_HOME/etc/slurm.conf`.
set -euo pipefail

HOME_DIR=${EDLM_SLURM_HOME:-/var/lib/edlm-local-slurm}
CLUSTER=edlm-local
NODES=(n1 n2)
CTLD_PORT=${EDLM_SLURM_PORT_BASE:-16800}   # slurmctld; slurmdbd +1; MariaDB +2; slurmd n1 +11, n2 +12
DBD_PORT=$((CTLD_PORT + 1))
DB_PORT=$((CTLD_PORT + 2))
PACKAGES=(slurmctld slurmd slurm-client munge slurmdbd mariadb-server)
HOSTS_MARK="# edlm local_slurm.sh"
SYSTEM_CONF=/etc/slurm/slurm.conf
export SLURM_CONF=$HOME_DIR/etc/slurm.conf

say() { echo "[local_slurm] $*"; }
die() { echo "error: $*" >&2; exit 2; }

pid_alive() {  # pid_alive NAME: the recorded daemon NAME still runs (same PID, same program)
  local file=$HOME_DIR/run/$1.pid pid
  [ -f "$file" ] || return 1
  pid=$(cat "$file")
  [ -d "/proc/$pid" ] && [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$(cat "$HOME_DIR/run/$1.comm")" ]
}

launch() {  # launch NAME COMM CMD...: start CMD detached (its own session), record its PID
  local name=$1 comm=$2
  shift 2
  pid_alive "$name" && return 0
  setsid "$@" >>"$HOME_DIR/log/$name.out" 2>&1 < /dev/null &
  echo $! > "$HOME_DIR/run/$name.pid"
  echo "$comm" > "$HOME_DIR/run/$name.comm"
  for _ in $(seq 25); do pid_alive "$name" && break; sleep 0.2; done  # setsid/setpriv exec the daemon
  say "started $name (pid $!)"
}

wait_for() {  # wait_for SECONDS DAEMON CMD...: poll CMD until it succeeds; give up early if DAEMON died
  local seconds=$1 daemon=$2
  shift 2
  for _ in $(seq $((seconds * 5))); do
    if declare -F "$1" >/dev/null; then "$@"; else timeout 10 "$@"; fi >/dev/null 2>&1 && return 0
    pid_alive "$daemon" || die "$daemon exited; see $HOME_DIR/log/$daemon.out"
    sleep 0.2
  done
  die "$daemon did not answer within ${seconds}s; logs: $HOME_DIR/log/"
}

install_packages() {
  local missing=()
  for bin in slurmctld slurmd sbatch munged slurmdbd mariadbd; do
    command -v "$bin" >/dev/null || missing+=("$bin")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  [ "$(id -u)" -eq 0 ] || die "Slurm is not installed (${missing[*]} missing) and installing needs root: run as root, or use a real cluster"
  command -v apt-get >/dev/null || die "Slurm is not installed (${missing[*]} missing) and there is no apt-get; install ${PACKAGES[*]} by hand"
  say "installing ${PACKAGES[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y -q --no-install-recommends "${PACKAGES[@]}" >/dev/null 2>&1 \
    || { apt-get update -q >/dev/null && apt-get install -y -q --no-install-recommends "${PACKAGES[@]}" >/dev/null; } \
    || die "apt-get install ${PACKAGES[*]} failed"
}

write_config() {
  local host cpus mem
  host=$(hostname)
  cpus=$(nproc)
  mem=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 / 2 ))  # MB per node: half the machine each
  mkdir -p "$HOME_DIR"/{etc,run,log,ctld,munge,db,db-run} "${NODES[@]/#/$HOME_DIR/spool-}"
  chown munge:munge "$HOME_DIR/munge"
  chmod 0755 "$HOME_DIR" "$HOME_DIR/munge"
  cat > "$HOME_DIR/etc/slurm.conf" <<EOF
# written by scripts/local_slurm.sh: two emulated nodes on $host
ClusterName=$CLUSTER
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$CTLD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire=5: a requeued job may start again 5 s after it ended (the default waits ~2 min)
AuthInfo=socket=$HOME_DIR/munge/munge.socket,cred_expire=5
StateSaveLocation=$HOME_DIR/ctld
SlurmdSpoolDir=$HOME_DIR/spool-%n
SlurmctldPidFile=$HOME_DIR/run/slurmctld.pidfile
SlurmdPidFile=$HOME_DIR/run/slurmd-%n.pidfile
SlurmctldLogFile=$HOME_DIR/log/slurmctld.log
SlurmdLogFile=$HOME_DIR/log/slurmd-%n.log
# no cgroups in containers: processes tracked by their parent, tasks pinned with sched_setaffinity
ProctrackType=proctrack/linuxproc
TaskPlugin=task/affinity
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
AccountingStoragePort=$DBD_PORT
# with slurmdbd this is the munge socket for talking to it (ours, not the default /run/munge one)
AccountingStoragePass=$HOME_DIR/munge/munge.socket
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
MpiDefault=none
ReturnToService=2
# schedule every second (requeued jobs restart within seconds); SIGKILL 10 s after SIGTERM, time for a checkpoint
SchedulerParameters=bf_interval=1,sched_interval=1
KillWait=10
InactiveLimit=0
MinJobAge=600
NodeName=n1 NodeHostname=$host NodeAddr=127.0.0.1 Port=$((CTLD_PORT + 11)) CPUs=$cpus RealMemory=$mem State=UNKNOWN
NodeName=n2 NodeHostname=$host NodeAddr=127.0.0.1 Port=$((CTLD_PORT + 12)) CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=n1,n2 Default=YES MaxTime=INFINITE State=UP
EOF
  [ -f "$HOME_DIR/etc/db.password" ] || (umask 077; head -c 18 /dev/urandom | base64 | tr -d '/+=' > "$HOME_DIR/etc/db.password")
  (umask 077; cat > "$HOME_DIR/etc/slurmdbd.conf" <<EOF
# written by scripts/local_slurm.sh
AuthType=auth/munge
AuthInfo=socket=$HOME_DIR/munge/munge.socket
DbdHost=localhost
DbdAddr=127.0.0.1
DbdPort=$DBD_PORT
SlurmUser=root
LogFile=$HOME_DIR/log/slurmdbd.log
PidFile=$HOME_DIR/run/slurmdbd.pidfile
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$DB_PORT
StorageUser=slurm
StoragePass=$(cat "$HOME_DIR/etc/db.password")
StorageLoc=slurm_acct_db
EOF
  )
}

start_database() {
  chown mysql:mysql "$HOME_DIR/db" "$HOME_DIR/db-run"  # the server runs as mysql: its files in its folders
  if [ ! -d "$HOME_DIR/db/mysql" ]; then
    mariadb-install-db --no-defaults --user=mysql --datadir="$HOME_DIR/db" --auth-root-authentication-method=socket \
      --skip-test-db >>"$HOME_DIR/log/mariadb-install.out" 2>&1 || die "mariadb-install-db failed; see $HOME_DIR/log/"
  fi
  launch mariadb mariadbd mariadbd --no-defaults --user=mysql --datadir="$HOME_DIR/db" \
    --socket="$HOME_DIR/db-run/mysqld.sock" --pid-file="$HOME_DIR/db-run/mysqld.pid" --bind-address=127.0.0.1 \
    --port="$DB_PORT" --skip-log-bin --innodb-buffer-pool-size=16M
  local sql=(mariadb --no-defaults --socket="$HOME_DIR/db-run/mysqld.sock" -u root)
  wait_for 60 mariadb "${sql[@]}" -e "SELECT 1"
  "${sql[@]}" -e "CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY '$(cat "$HOME_DIR/etc/db.password")';
    GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';"
}

nodes_idle() {
  local states
  states=$(timeout 10 sinfo -h -N -o '%N %t' 2>/dev/null | sort -u)
  [ "$(echo "$states" | grep -c -E ' (idle|mix|alloc)$')" -eq ${#NODES[@]} ]
}

start() {
  install_packages
  write_config
  grep -q "$HOSTS_MARK" /etc/hosts || echo "127.0.0.1 ${NODES[*]} $HOSTS_MARK" >> /etc/hosts
  if [ ! -e "$SYSTEM_CONF" ]; then
    mkdir -p "$(dirname "$SYSTEM_CONF")"
    ln -s "$HOME_DIR/etc/slurm.conf" "$SYSTEM_CONF"
  fi
  [ -f /etc/munge/munge.key ] || { mungekey --create >/dev/null 2>&1 && chown munge:munge /etc/munge/munge.key; }
  launch munged munged setpriv --reuid=munge --regid=munge --init-groups munged -F --force \
    --socket="$HOME_DIR/munge/munge.socket" --pid-file="$HOME_DIR/munge/munged.pid" \
    --seed-file="$HOME_DIR/munge/munged.seed" --log-file="$HOME_DIR/munge/munged.log"
  wait_for 20 munged sh -c "munge -S '$HOME_DIR/munge/munge.socket' -n | unmunge -S '$HOME_DIR/munge/munge.socket'"
  start_database
  launch slurmdbd slurmdbd slurmdbd -D
  wait_for 60 slurmdbd sacctmgr -n list cluster
  sacctmgr -n list cluster format=cluster | grep -qw "$CLUSTER" || sacctmgr -i add cluster "$CLUSTER" >/dev/null
  local cold=1
  if pid_alive slurmctld; then
    scontrol reconfigure  # already running: pick up the configuration written above
    cold=0
  fi
  launch slurmctld slurmctld slurmctld -D
  wait_for 30 slurmctld scontrol ping
  if [ "$cold" -eq 1 ]; then  # jobs saved by a cluster that died without `stop`: their processes are gone
    local leftover
    leftover=$(squeue -h -o %i 2>/dev/null || true)
    if [ -n "$leftover" ]; then
      say "cancelling jobs left by a cluster that was not stopped: $(echo $leftover)"
      scancel $leftover 2>/dev/null || true
    fi
  fi
  for node in "${NODES[@]}"; do
    launch "slurmd-$node" slurmd slurmd -D -N "$node"
  done
  wait_for 60 slurmd-n2 nodes_idle
  sinfo -N -o '%N %c %t'
  say "ready (config: $SLURM_CONF)"
}

stop_daemons() {  # stop_daemons NAME...: SIGTERM them all, wait up to 15 s, then SIGKILL
  local name pids=()
  for name in "$@"; do
    pid_alive "$name" && pids+=("$(cat "$HOME_DIR/run/$name.pid")") && kill -TERM "${pids[-1]}"
  done
  for _ in $(seq 75); do
    local left=0
    for pid in "${pids[@]}"; do [ -d "/proc/$pid" ] && left=1; done
    [ "$left" -eq 0 ] && break
    sleep 0.2
  done
  for name in "$@"; do
    if pid_alive "$name"; then
      kill -KILL "$(cat "$HOME_DIR/run/$name.pid")"
    fi
    [ -f "$HOME_DIR/run/$name.pid" ] && say "stopped $name (pid $(cat "$HOME_DIR/run/$name.pid"))"
    rm -f "$HOME_DIR/run/$name.pid" "$HOME_DIR/run/$name.comm"
  done
}

stop() {
  if pid_alive slurmctld; then  # the jobs were started through this cluster: end them first
    local jobs
    jobs=$(squeue -h -o %i 2>/dev/null || true)
    if [ -n "$jobs" ]; then
      say "cancelling jobs: $(echo $jobs)"
      scancel $jobs 2>/dev/null || true
      for _ in $(seq 50); do [ -z "$(squeue -h -o %i 2>/dev/null)" ] && break; sleep 0.2; done
    fi
  fi
  # reverse order of start, each group at once; only what this script started (recorded PID, same program)
  stop_daemons slurmd-n2 slurmd-n1 slurmctld
  stop_daemons slurmdbd  # flushes to the database on the way out
  stop_daemons mariadb munged
  [ "$(readlink "$SYSTEM_CONF" 2>/dev/null)" = "$HOME_DIR/etc/slurm.conf" ] && rm -f "$SYSTEM_CONF"
  if grep -q "$HOSTS_MARK" /etc/hosts 2>/dev/null; then
    # /etc/hosts may be a bind mount: rewrite it in place instead of replacing the file
    grep -v "$HOSTS_MARK" /etc/hosts > "$HOME_DIR/run/hosts.tmp" || true
    cat "$HOME_DIR/run/hosts.tmp" > /etc/hosts
    rm -f "$HOME_DIR/run/hosts.tmp"
  fi
  say "stopped"
}

status() {
  local running=0
  for name in munged mariadb slurmdbd slurmctld slurmd-n1 slurmd-n2; do
    if pid_alive "$name"; then
      echo "$name: running (pid $(cat "$HOME_DIR/run/$name.pid"))"
      running=$((running + 1))
    else
      echo "$name: not running"
    fi
  done
  [ "$running" -gt 0 ] && sinfo -N -o '%N %c %t' 2>/dev/null
  echo "SLURM_CONF=$SLURM_CONF"
  [ "$running" -eq 6 ]
}

case "${1:-}" in
  start) [ "$(id -u)" -eq 0 ] || die "the local cluster runs its daemons as root; run as root (or use a real cluster)"
         start ;;
  stop) stop ;;
  status) status ;;
  *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
