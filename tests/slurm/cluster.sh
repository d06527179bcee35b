#!/usr/bin/env bash
# Start, stop or check a single-node SLURM cluster with job accounting on this
# machine, for the tests marked `slurm`.
#
#   cluster.sh up       install packages if absent, start munged, MariaDB,
#                       slurmdbd, slurmctld and slurmd, wait for an idle node
#   cluster.sh down     stop the daemons that `up` started
#   cluster.sh status   exit 0 if the node takes jobs and accounting responds
#
# `up` prints one line when the node is ready. On failure it exits 1 and
# prints the tail of the failing daemon's log. `up` and `down` need root on
# Debian or Ubuntu (exit code 3 otherwise).
# Configs go to /etc/slurm, where the Debian packages look for them. State,
# spool, pid and log files go under BASE_DIR. Every address used is loopback.
set -Eeuo pipefail
# errexit alone would end the script without a word on an unexpected failure.
trap 'echo "cluster.sh: error: \"$BASH_COMMAND\" failed (exit code $?) at line $LINENO" >&2' ERR

readonly BASE_DIR=/var/lib/qat-slurm-test
readonly LOG_DIR=$BASE_DIR/log
readonly RUN_DIR=$BASE_DIR/run
readonly STATE_DIR=$BASE_DIR/state/slurmctld
readonly SPOOL_DIR=$BASE_DIR/spool/slurmd
readonly LOCK_FILE=$BASE_DIR/cluster.lock
readonly CONF_DIR=/etc/slurm
readonly SLURM_CONF=$CONF_DIR/slurm.conf
readonly SLURMDBD_CONF=$CONF_DIR/slurmdbd.conf

readonly CLUSTER_NAME=qat-test
readonly ACCOUNT_NAME=qat
readonly PARTITION_NAME=debug
readonly DB_NAME=slurm_acct_db
readonly DB_USER=slurm
# Slurm's own default, written out so that tests can lower it and restore it.
readonly DEFAULT_MAX_ARRAY_SIZE=1001
# First line of every config this script writes. A config without it belongs
# to someone else and is never overwritten.
readonly CONF_HEADER="# Written by tests/slurm/cluster.sh up; a later up overwrites it."

readonly READY_TIMEOUT_S=90
readonly PACKAGES=(slurm-wlm slurmdbd munge mariadb-server)

readonly MUNGED_PID=$RUN_DIR/munge/munged.pid
readonly MYSQLD_PID=$RUN_DIR/mysqld/mysqld.pid
readonly SLURMDBD_PID=$RUN_DIR/slurmdbd.pid
readonly SLURMCTLD_PID=$RUN_DIR/slurmctld.pid
readonly SLURMD_PID=$RUN_DIR/slurmd.pid

log() {
    echo "cluster.sh: $*" >&2
}

# Print an error, then the tail of each log file given that explains it, and
# exit 1.
die() {
    local message=$1 log_file
    shift
    echo "cluster.sh: error: $message" >&2
    for log_file in "$@"; do
        if [[ -s $log_file ]]; then
            echo "---- last 30 lines of $log_file ----" >&2
            tail -n 30 "$log_file" >&2
            echo "---- end of $log_file ----" >&2
        fi
    done
    exit 1
}

require_root_debian() {
    if [[ $(id -u) -ne 0 ]]; then
        echo "cluster.sh: must run as root (uid is $(id -u)) because it installs packages and starts system daemons; rerun with sudo" >&2
        exit 3
    fi
    if [[ ! -f /etc/debian_version ]] || ! command -v apt-get >/dev/null; then
        echo "cluster.sh: needs Debian or Ubuntu (apt-get and the Debian slurm-wlm packages), but /etc/debian_version or apt-get is missing" >&2
        exit 3
    fi
}

# Run a command with a time limit, so that a client talking to a dead daemon
# cannot hang the script.
run_limited() {
    timeout 20 "$@"
}

# Retry a command once a second until it succeeds or the timeout runs out.
wait_until() {
    local timeout_s=$1
    shift
    local deadline=$((SECONDS + timeout_s))
    until "$@" >/dev/null 2>&1; do
        if ((SECONDS >= deadline)); then
            return 1
        fi
        sleep 1
    done
}

# Print the pid in PIDFILE if that process is alive (not a zombie) and its
# command name is one of NAMES. A stale pid file, left by a reboot or a
# kill -9, or naming a pid that was reused, returns 1.
live_pid() {
    local pidfile=$1
    shift
    local pid comm state name
    [[ -r $pidfile ]] || return 1
    pid=$(tr -dc '0-9' <"$pidfile")
    [[ -n $pid ]] || return 1
    comm=$(cat "/proc/$pid/comm" 2>/dev/null) || return 1
    # Field 3 of /proc/PID/stat is the state. Splitting on spaces is safe
    # because the daemon names checked here contain none.
    state=$(cut -d ' ' -f 3 "/proc/$pid/stat" 2>/dev/null) || return 1
    [[ $state != Z ]] || return 1
    for name in "$@"; do
        if [[ $comm == "$name" ]]; then
            echo "$pid"
            return 0
        fi
    done
    return 1
}

not_live_pid() {
    ! live_pid "$@" >/dev/null
}

# Send SIGTERM to the daemon in PIDFILE and wait for it to exit (SIGKILL after
# 60 s). Returns 1 if no such daemon was running.
stop_daemon() {
    local label=$1 pidfile=$2
    shift 2
    local pid
    pid=$(live_pid "$pidfile" "$@") || return 1
    kill -TERM "$pid" 2>/dev/null || true
    if ! wait_until 60 not_live_pid "$pidfile" "$@"; then
        log "$label (pid $pid) did not exit 60 s after SIGTERM; sending SIGKILL"
        kill -KILL "$pid" 2>/dev/null || true
        wait_until 10 not_live_pid "$pidfile" "$@" || true
    fi
    rm -f "$pidfile"
}

# Start a daemon with no inherited terminal, pipes or lock descriptor (fd 9),
# so that a caller capturing our output, such as pytest, is not kept waiting
# for the daemon to close them.
spawn() {
    local out_file=$1
    shift
    # A dated line separates this start's output from earlier ones in the file.
    echo "---- $(date '+%F %T') cluster.sh starts: $*" >>"$out_file"
    "$@" </dev/null >>"$out_file" 2>&1 9>&-
}

package_installed() {
    dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q 'install ok installed'
}

install_packages() {
    local missing=() package
    for package in "${PACKAGES[@]}"; do
        package_installed "$package" || missing+=("$package")
    done
    ((${#missing[@]} > 0)) || return 0

    local apt_log=$LOG_DIR/apt.log
    log "installing ${missing[*]} with apt-get (takes about a minute; output in $apt_log)"
    apt-get update >>"$apt_log" 2>&1 ||
        die "apt-get update failed; check the network and the apt sources" "$apt_log"
    DEBIAN_FRONTEND=noninteractive apt-get install -y "${missing[@]}" >>"$apt_log" 2>&1 ||
        die "apt-get install ${missing[*]} failed" "$apt_log"
}

make_directories() {
    install -d -m 0755 "$LOG_DIR" "$RUN_DIR" "$STATE_DIR" "$SPOOL_DIR" "$CONF_DIR"
    # munged and mysqld drop root, so their pid directories belong to them.
    install -d -o munge -g munge -m 0700 "$RUN_DIR/munge"
    install -d -o mysql -g mysql -m 0755 "$RUN_DIR/mysqld"
    install -d -o munge -g munge -m 0755 /run/munge
    install -d -o mysql -g mysql -m 0755 /run/mysqld
}

# ---------------------------------------------------------------- munge

munge_responds() {
    munge -n 2>/dev/null | unmunge >/dev/null 2>&1
}

start_munge() {
    # A munged that responds on the default socket serves Slurm even if
    # another tool started it, and a second munged could not bind that socket.
    munge_responds && return 0

    local log_file=$LOG_DIR/munged.log
    touch "$log_file"
    chown munge:munge "$log_file"
    chmod 0640 "$log_file"
    # --force replaces a stale socket left by a munged that was killed.
    spawn "$LOG_DIR/munged.out" runuser -u munge -- /usr/sbin/munged --force \
        --log-file="$log_file" --pid-file="$MUNGED_PID" ||
        die "munged failed to start" "$LOG_DIR/munged.out" "$log_file"
    wait_until 15 munge_responds ||
        die "munged started but 'munge -n | unmunge' still fails after 15 s" "$log_file"
}

# -------------------------------------------------------------- MariaDB

mariadb_responds() {
    mysqladmin --silent ping >/dev/null 2>&1
}

start_mariadb() {
    mariadb_responds && return 0

    local log_file=$LOG_DIR/mariadb.log
    if [[ ! -d /var/lib/mysql/mysql ]]; then
        mariadb-install-db --user=mysql >>"$LOG_DIR/mariadb-install.log" 2>&1 ||
            die "mariadb-install-db failed to create /var/lib/mysql" "$LOG_DIR/mariadb-install.log"
    fi
    touch "$log_file"
    chown mysql:mysql "$log_file"
    # mysqld_safe stays in the foreground to restart mysqld after a crash, so
    # it runs in its own session in the background. The redirections sit on
    # the background command itself (not on a function) so that no subshell
    # lingers holding our stdout. slurmdbd logs an error line when the lock
    # wait is under 900 s. It also logs one for innodb_buffer_pool_size below
    # its recommendation, which is left alone to save memory: a test
    # database is tiny.
    echo "---- $(date '+%F %T') cluster.sh starts: mysqld_safe" >>"$LOG_DIR/mysqld_safe.out"
    setsid mysqld_safe --skip-syslog --log-error="$log_file" --pid-file="$MYSQLD_PID" \
        --innodb-lock-wait-timeout=900 </dev/null >>"$LOG_DIR/mysqld_safe.out" 2>&1 9>&- &
    wait_until 60 mariadb_responds ||
        die "MariaDB did not respond to 'mysqladmin ping' within 60 s" "$LOG_DIR/mysqld_safe.out" "$log_file"
}

# Print the database password: the one in slurmdbd.conf if there is one, so
# that a rerun keeps it, else a new random one.
database_password() {
    local password=""
    if [[ -r $SLURMDBD_CONF ]]; then
        password=$(sed -n 's/^StoragePass=\([A-Za-z0-9]*\)$/\1/p' "$SLURMDBD_CONF")
    fi
    if [[ -z $password ]]; then
        # 128 random bits as hex. od reads exactly 16 bytes, so no reader
        # closes the pipe early, which pipefail would report as a failure.
        password=$(od -An -N16 -tx1 /dev/urandom | tr -d ' \n')
    fi
    echo "$password"
}

# Create the accounting database and its user. The password contains only
# letters and digits, so it needs no SQL quoting, and it goes through stdin,
# never the command line.
setup_database() {
    local password=$1 log_file=$LOG_DIR/mariadb-setup.log
    if ! mysql --user=root >>"$log_file" 2>&1 <<SQL; then
CREATE DATABASE IF NOT EXISTS $DB_NAME;
CREATE USER IF NOT EXISTS '$DB_USER'@'localhost';
ALTER USER '$DB_USER'@'localhost' IDENTIFIED BY '$password';
GRANT ALL PRIVILEGES ON $DB_NAME.* TO '$DB_USER'@'localhost';
SQL
        die "creating database $DB_NAME and user $DB_USER failed ('mysql --user=root' logs in over the unix socket as root)" "$log_file"
    fi
}

# -------------------------------------------------------------- configs

# Print the value of KEY from the node line of `slurmd -C`.
node_value() {
    local key=$1 line=$2 value
    value=$(tr ' ' '\n' <<<"$line" | sed -n "s/^$key=//p")
    echo "$value"
}

# Replace FILE with the output of the given writer function if it differs.
# Returns 0 if the file changed, 1 if it was already up to date.
replace_if_changed() {
    local file=$1 mode=$2
    shift 2
    local tmp
    if [[ -f $file ]] && [[ $(head -n 1 "$file") != "$CONF_HEADER" ]]; then
        die "$file exists and was not written by cluster.sh; move it away (it may belong to a real cluster) and rerun"
    fi
    tmp=$(mktemp "$file.XXXXXX")
    chmod "$mode" "$tmp"
    "$@" >"$tmp"
    if [[ -f $file ]] && cmp -s "$tmp" "$file"; then
        rm -f "$tmp"
        # slurmdbd refuses to start if its config is readable by others.
        chmod "$mode" "$file"
        return 1
    fi
    mv -f "$tmp" "$file"
    return 0
}

write_slurmdbd_conf() {
    local password=$1
    cat <<EOF
$CONF_HEADER
AuthType=auth/munge
DbdHost=localhost
DbdAddr=127.0.0.1
DbdPort=6819
SlurmUser=root
PidFile=$SLURMDBD_PID
LogFile=$LOG_DIR/slurmdbd.log
DebugLevel=info
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageLoc=$DB_NAME
StorageUser=$DB_USER
StoragePass=$password
EOF
}

write_slurm_conf() {
    local host=$1 node_line=$2
    local real_memory
    # Slurm drains a node that reports less memory than RealMemory, and the
    # free memory moves a little between boots, so claim 95 % of it.
    real_memory=$(($(node_value RealMemory "$node_line") * 95 / 100))
    cat <<EOF
$CONF_HEADER
ClusterName=$CLUSTER_NAME
SlurmctldHost=$host(127.0.0.1)
SlurmUser=root
SlurmctldPort=6817
SlurmdPort=6818
AuthType=auth/munge
CryptoType=crypto/munge
StateSaveLocation=$STATE_DIR
SlurmdSpoolDir=$SPOOL_DIR
SlurmctldPidFile=$SLURMCTLD_PID
SlurmdPidFile=$SLURMD_PID
SlurmctldLogFile=$LOG_DIR/slurmctld.log
SlurmdLogFile=$LOG_DIR/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
MpiDefault=none
# A test cluster sends no mail, and a missing MailProg logs an error.
MailProg=/bin/true
# Plugins that work without systemd or cgroups.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
# A node that was down comes back as soon as slurmd registers.
ReturnToService=2
MaxArraySize=$DEFAULT_MAX_ARRAY_SIZE
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStoragePort=6819
JobAcctGatherType=jobacct_gather/linux
JobCompType=jobcomp/none
NodeName=$host NodeHostname=$host NodeAddr=127.0.0.1 CPUs=$(node_value CPUs "$node_line") Boards=$(node_value Boards "$node_line") SocketsPerBoard=$(node_value SocketsPerBoard "$node_line") CoresPerSocket=$(node_value CoresPerSocket "$node_line") ThreadsPerCore=$(node_value ThreadsPerCore "$node_line") RealMemory=$real_memory State=UNKNOWN
PartitionName=$PARTITION_NAME Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
}

# ---------------------------------------------------------------- slurm

node_name() {
    # slurmd finds its node by the short host name.
    hostname -s
}

# Print the node state as sinfo shows it, for example "idle", "mixed" or
# "down*" (the star means slurmd does not respond).
node_state() {
    run_limited sinfo --noheader --Node --nodes="$(node_name)" --format=%T 2>/dev/null | head -n 1
}

node_takes_jobs() {
    [[ $(node_state) =~ ^(idle|mixed|allocated|completing)$ ]]
}

accounting_responds() {
    run_limited sacct --noheader --allocations --starttime=now --format=JobID >/dev/null 2>&1 &&
        run_limited sacctmgr --noheader --parsable2 show cluster "$CLUSTER_NAME" format=Cluster 2>/dev/null |
        grep -qx "$CLUSTER_NAME"
}

controller_responds() {
    run_limited scontrol ping 2>/dev/null | grep -q 'is UP'
}

# True if the Slurm daemons that `up` starts are alive, the node takes jobs
# and accounting responds. The pid check comes first because sinfo spends
# about 10 s retrying when slurmctld is down.
cluster_ready() {
    live_pid "$SLURMDBD_PID" slurmdbd >/dev/null &&
        live_pid "$SLURMCTLD_PID" slurmctld >/dev/null &&
        live_pid "$SLURMD_PID" slurmd >/dev/null &&
        node_takes_jobs &&
        accounting_responds
}

# Run `sacctmgr -i add ARGS...` unless QUERY (sacctmgr show arguments, split
# on spaces) prints a row, because adding an existing entity is an error.
add_to_accounting() {
    local query=$1
    shift
    local -a query_args
    read -r -a query_args <<<"$query"
    if [[ -z $(run_limited sacctmgr --noheader --parsable2 "${query_args[@]}" 2>>"$LOG_DIR/sacctmgr.log") ]]; then
        run_limited sacctmgr -i add "$@" >>"$LOG_DIR/sacctmgr.log" 2>&1 ||
            die "'sacctmgr -i add $*' failed" "$LOG_DIR/sacctmgr.log"
    fi
}

register_accounting() {
    add_to_accounting "show cluster $CLUSTER_NAME format=Cluster" cluster "$CLUSTER_NAME"
    add_to_accounting "show account $ACCOUNT_NAME format=Account" account "$ACCOUNT_NAME" \
        cluster="$CLUSTER_NAME" description="test jobs" organization=qat
    add_to_accounting "show association where cluster=$CLUSTER_NAME account=$ACCOUNT_NAME user=root format=User" \
        user root account="$ACCOUNT_NAME" cluster="$CLUSTER_NAME"
}

start_slurmdbd() {
    local restart=$1 log_file=$LOG_DIR/slurmdbd.log
    if [[ $restart == yes ]]; then
        stop_daemon slurmdbd "$SLURMDBD_PID" slurmdbd || true
    fi
    if ! live_pid "$SLURMDBD_PID" slurmdbd >/dev/null; then
        spawn "$LOG_DIR/slurmdbd.out" slurmdbd || die "slurmdbd failed to start" "$LOG_DIR/slurmdbd.out" "$log_file"
    fi
    # The first start creates the tables, which takes a few seconds.
    wait_until 60 run_limited sacctmgr --noheader show cluster ||
        die "slurmdbd did not respond to 'sacctmgr show cluster' within 60 s" "$log_file"
}

start_slurmctld() {
    local restart=$1 log_file=$LOG_DIR/slurmctld.log
    if [[ $restart == yes ]]; then
        stop_daemon slurmctld "$SLURMCTLD_PID" slurmctld || true
    fi
    if ! live_pid "$SLURMCTLD_PID" slurmctld >/dev/null; then
        spawn "$LOG_DIR/slurmctld.out" slurmctld || die "slurmctld failed to start" "$LOG_DIR/slurmctld.out" "$log_file"
    fi
    wait_until 30 controller_responds ||
        die "slurmctld did not respond to 'scontrol ping' within 30 s" "$log_file"
}

start_slurmd() {
    local restart=$1 log_file=$LOG_DIR/slurmd.log
    if [[ $restart == yes ]]; then
        stop_daemon slurmd "$SLURMD_PID" slurmd || true
    fi
    if ! live_pid "$SLURMD_PID" slurmd >/dev/null; then
        spawn "$LOG_DIR/slurmd.out" slurmd || die "slurmd failed to start" "$LOG_DIR/slurmd.out" "$log_file"
    fi
}

# Wait until the node takes jobs. A node left drained or down by an earlier
# run is resumed once, because ReturnToService only revives nodes that went
# down for not responding.
wait_for_node() {
    local deadline=$((SECONDS + READY_TIMEOUT_S)) state resumed=no
    while ((SECONDS < deadline)); do
        state=$(node_state)
        if [[ $state =~ ^(idle|mixed|allocated)$ ]]; then
            return 0
        fi
        if [[ $resumed == no && $state =~ ^(down|drain|drained|draining)$ ]]; then
            run_limited scontrol update NodeName="$(node_name)" State=RESUME >>"$LOG_DIR/scontrol.log" 2>&1 || true
            resumed=yes
        fi
        sleep 1
    done
    local reason
    reason=$(run_limited sinfo --noheader --Node --format='%T (reason: %E)' 2>&1 | head -n 1 || true)
    die "node $(node_name) did not become idle within ${READY_TIMEOUT_S} s; sinfo shows: ${reason:-nothing}" \
        "$LOG_DIR/slurmd.log"
}

print_ready() {
    echo "cluster.sh: ready: cluster $CLUSTER_NAME, node $(node_name) $(node_state), partition $PARTITION_NAME, account $ACCOUNT_NAME, logs in $LOG_DIR"
}

# ------------------------------------------------------------- commands

command_up() {
    require_root_debian
    # Fast path for a cluster that already runs.
    if cluster_ready; then
        print_ready
        return 0
    fi

    install -d -m 0755 "$BASE_DIR"
    exec 9>"$LOCK_FILE"
    flock --timeout 600 9 || die "another cluster.sh holds $LOCK_FILE for over 600 s"
    # A concurrent `up` may have finished while this one waited for the lock.
    if cluster_ready; then
        print_ready
        return 0
    fi

    install -d -m 0755 "$LOG_DIR"
    install_packages
    make_directories
    start_munge
    start_mariadb

    local password host node_line dbd_changed=no slurm_changed=no
    password=$(database_password)
    setup_database "$password"
    host=$(node_name)
    if ! node_line=$(slurmd -C 2>>"$LOG_DIR/slurmd.out"); then
        die "'slurmd -C' failed to describe this host" "$LOG_DIR/slurmd.out"
    fi
    node_line=$(head -n 1 <<<"$node_line")
    # The config writers run inside `if`, where errexit is off, so check the
    # fields they read here.
    if [[ ! $node_line =~ CPUs=[0-9]+.*ThreadsPerCore=[0-9]+.*RealMemory=[0-9]+ ]]; then
        die "'slurmd -C' printed no node line with CPUs, ThreadsPerCore and RealMemory: '$node_line'" "$LOG_DIR/slurmd.out"
    fi
    if replace_if_changed "$SLURMDBD_CONF" 600 write_slurmdbd_conf "$password"; then
        dbd_changed=yes
    fi
    if replace_if_changed "$SLURM_CONF" 644 write_slurm_conf "$host" "$node_line"; then
        slurm_changed=yes
    fi

    start_slurmdbd "$dbd_changed"
    register_accounting
    start_slurmctld "$slurm_changed"
    start_slurmd "$slurm_changed"
    wait_for_node
    wait_until 30 accounting_responds ||
        die "the node is up but sacct or sacctmgr do not respond" "$LOG_DIR/slurmdbd.log"
    print_ready
}

command_down() {
    require_root_debian
    if [[ ! -d $BASE_DIR ]]; then
        echo "cluster.sh: nothing to stop ($BASE_DIR does not exist)"
        return 0
    fi
    exec 9>"$LOCK_FILE"
    flock --timeout 600 9 || die "another cluster.sh holds $LOCK_FILE for over 600 s"

    local stopped=()
    # Stop the Slurm daemons before the services they depend on.
    if stop_daemon slurmd "$SLURMD_PID" slurmd; then stopped+=(slurmd); fi
    if stop_daemon slurmctld "$SLURMCTLD_PID" slurmctld; then stopped+=(slurmctld); fi
    if stop_daemon slurmdbd "$SLURMDBD_PID" slurmdbd; then stopped+=(slurmdbd); fi
    # SIGTERM is a clean shutdown for mysqld, after which mysqld_safe exits too.
    if stop_daemon mariadb "$MYSQLD_PID" mariadbd mysqld; then stopped+=(mariadb); fi
    if stop_daemon munged "$MUNGED_PID" munged; then stopped+=(munged); fi

    if ((${#stopped[@]} == 0)); then
        echo "cluster.sh: nothing to stop (no daemon started by cluster.sh up is running)"
    else
        echo "cluster.sh: stopped ${stopped[*]}"
    fi
}

command_status() {
    if ! command -v sinfo >/dev/null; then
        echo "cluster.sh: not running: the slurm-wlm package is not installed"
        return 1
    fi
    local state
    state=$(node_state || true)
    if [[ ! $state =~ ^(idle|mixed|allocated|completing)$ ]]; then
        echo "cluster.sh: not ready: node $(node_name) state is '${state:-unknown, slurmctld does not respond}'"
        return 1
    fi
    if ! accounting_responds; then
        echo "cluster.sh: not ready: node $(node_name) is $state but accounting (sacct, sacctmgr) does not respond"
        return 1
    fi
    echo "cluster.sh: ok: node $(node_name) is $state and accounting responds"
}

main() {
    case ${1:-} in
    up) command_up ;;
    down) command_down ;;
    status) command_status ;;
    *)
        echo "usage: $0 up|down|status (got '${1:-}')" >&2
        exit 2
        ;;
    esac
}

main "$@"
