#!/usr/bin/env bash
# Start a real single-host SLURM cluster for the tests marked `slurm` (DESIGN.md "Launch", ecosystem §9):
# munge, MariaDB (socket only) + slurmdbd (accounting), slurmctld, and two slurmd daemons posing as
# nodes n1 and n2 (4 CPUs each, advertised on however many cores this machine has), partition `debug`.
#
#   slurm/scripts/cluster_up.sh          # idempotent: a healthy running cluster is left as it is
#   slurm/scripts/cluster_down.sh        # cancels jobs, stops the daemons by their recorded PIDs
#
# Needs root (daemons run as root, packages are installed with apt-get when missing) and a machine that
# is not already running SLURM. Each start uses a fresh state directory $LDIT_SLURM_DIR/run-<time>
# (default /tmp/ldit-slurm); $LDIT_SLURM_DIR/current points at it and holds pids/, log/, and the
# generated configuration, which is installed as /etc/slurm/slurm.conf (where sbatch, sinfo and
# submitit's calls find it without any environment variable).
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
base="${LDIT_SLURM_DIR:-/tmp/ldit-slurm}"
timeout_s="${LDIT_SLURM_TIMEOUT:-90}"
packages=(slurmctld slurmd slurm-client munge slurmdbd mariadb-server)
start_ns=$(date +%s%N)

elapsed() { local ms=$(( ($(date +%s%N) - start_ns) / 1000000 )); printf '%d.%d' $((ms / 1000)) $((ms % 1000 / 100)); }
say() { echo "cluster_up [$(elapsed) s]: $*"; }
die() { echo "cluster_up: ERROR: $*" >&2; exit 1; }
# PIDs of the processes named $1 (what pgrep -x does; procps is not in a minimal Debian image).
running() {
    local f
    for f in /proc/[0-9]*/comm; do [[ "$(cat "$f" 2>/dev/null)" != "$1" ]] || echo "${f//[^0-9]/}"; done
}

[[ $(id -u) -eq 0 ]] || die "must run as root (starts munged, mariadbd and the SLURM daemons)"

# A cluster this script started is healthy when every daemon it records is alive (daemons delete their
# PID file when they exit) and both nodes answer. munged may be shared: it only has to be running.
daemons=(mariadbd slurmdbd slurmctld slurmd-n1 slurmd-n2)
alive() { [[ -s "$base/current/pids/$1.pid" ]] && [[ "$(cat "/proc/$(cat "$base/current/pids/$1.pid")/comm" 2>/dev/null)" == "${1%-n[12]}" ]]; }
recorded=("$base"/current/pids/*.pid)
if [[ -e "${recorded[0]}" ]]; then
    healthy=1
    for d in "${daemons[@]}"; do alive "$d" || healthy=0; done
    [[ -n "$(running munged)" ]] || healthy=0
    if [[ $healthy -eq 1 ]] && [[ "$(sinfo -h -N -o '%N %t' 2>/dev/null | sort -u | tr '\n' ' ')" =~ n1\ (idle|mix|alloc).*n2\ (idle|mix|alloc) ]]; then
        say "already running (state $(readlink -f "$base/current")); nothing to do"
        exit 0
    fi
    say "a previous cluster is unhealthy or half-started: stopping it first"
    "$here/cluster_down.sh"
fi

# Refuse to start next to daemons this script does not know about (their ports and state would clash).
for d in slurmctld slurmd slurmdbd; do
    if [[ -n "$(running "$d")" ]]; then
        die "a $d not started by this script is running (pid $(running "$d" | tr '\n' ' ')); stop it first"
    fi
done

# --- packages (CI starts from a fresh machine) -------------------------------------------------------
missing=()
for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [[ ${#missing[@]} -gt 0 ]]; then
    say "installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    # policy-rc.d 101: the packages' postinst must not try to start services (there is no init system).
    # (A policy file that is already there, as in Docker images, is left alone.)
    own_policy=0
    trap '[[ $own_policy -eq 0 ]] || rm -f /usr/sbin/policy-rc.d' EXIT
    if [[ ! -e /usr/sbin/policy-rc.d ]]; then
        printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d && own_policy=1
    fi
    mkdir -p "$base"
    apt-get install -y -qq --no-install-recommends "${packages[@]}" >"$base/apt.log" 2>&1 ||
        { tail -n 30 "$base/apt.log" >&2; die "apt-get install ${packages[*]} failed (log: $base/apt.log)"; }
    say "packages installed"
fi

# --- fresh state directory -----------------------------------------------------------------------------
host="$(hostname -s)"
# Keep the two latest earlier state directories (their logs); older ones go (~100 MB each, mostly MariaDB's).
find "$base" -maxdepth 1 -name 'run-*' -type d -printf '%T@ %p\n' 2>/dev/null | sort -rn | tail -n +3 |
    cut -d' ' -f2- | xargs -r rm -rf
state="$base/run-$(date +%Y%m%d-%H%M%S)-$$"
mkdir -p "$state"/{pids,log,ctld,spool,mysql}
ln -sfn "$state" "$base/current"
say "state in $state"

# Job host lists are the node names (n1, n2), and MASTER_ADDR = the first of them must resolve.
for n in n1 n2; do
    grep -qE "^[0-9.]+[[:space:]]+(.*[[:space:]])?$n([[:space:]]|$)" /etc/hosts || echo "127.0.0.1 $n" >>/etc/hosts
done

# --- configuration --------------------------------------------------------------------------------------
# The templates next to this script name the state directory @STATE@ and this host @HOST@.
render() { sed -e "s|@STATE@|$state|g" -e "s|@HOST@|$host|g" "$here/$1.in" >"$state/$1"; }
render slurm.conf
render slurmdbd.conf
chmod 600 "$state/slurmdbd.conf" # slurmdbd refuses a readable config (it may hold a password)
mkdir -p /etc/slurm
ln -sfn "$state/slurm.conf" /etc/slurm/slurm.conf
ln -sfn "$state/slurmdbd.conf" /etc/slurm/slurmdbd.conf

# --- munge: authentication between all SLURM commands and daemons ---------------------------------------
[[ -s /etc/munge/munge.key ]] || { mungekey --create --force >/dev/null 2>&1 || dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 2>/dev/null; }
chown munge:munge /etc/munge/munge.key && chmod 400 /etc/munge/munge.key
mkdir -p /run/munge /var/lib/munge /var/log/munge && chown munge:munge /run/munge /var/lib/munge /var/log/munge
chown munge:munge "$state/pids" "$state/log" 2>/dev/null || true
chmod 1777 "$state/pids" "$state/log" # munged (user munge) writes here too; sticky, as munged demands
if [[ -n "$(running munged)" ]]; then
    # munged is shared with anything else on the machine; reuse it, but do not record (or stop) it.
    say "munged already running (pid $(running munged | head -1)); reusing it"
else
    runuser -u munge -- /usr/sbin/munged --pid-file="$state/pids/munged.pid" --log-file="$state/log/munged.log" --force
fi

# --- MariaDB for slurmdbd: unix socket only, in the state directory ------------------------------------
mkdir -p /run/mysqld && chown mysql:mysql /run/mysqld
chown mysql:mysql "$state/mysql"
mariadb-install-db --user=mysql --datadir="$state/mysql" --skip-test-db --auth-root-authentication-method=socket \
    --innodb-log-file-size=8M \
    >"$state/log/mariadb-install.log" 2>&1 || { cat "$state/log/mariadb-install.log" >&2; die "mariadb-install-db failed"; }
# The default socket path (/run/mysqld/mysqld.sock) is where slurmdbd's client library looks.
setsid /usr/sbin/mariadbd --user=mysql --datadir="$state/mysql" --skip-networking \
    --socket=/run/mysqld/mysqld.sock --pid-file="$state/pids/mariadbd.pid" \
    --log-error="$state/log/mariadb.log" --innodb-buffer-pool-size=32M --innodb-log-file-size=8M </dev/null >/dev/null 2>&1 &
for _ in $(seq 1 $((timeout_s * 5))); do
    mariadb -u root -e 'select 1' >/dev/null 2>&1 && break
    sleep 0.2
done
mariadb -u root -e 'select 1' >/dev/null 2>&1 || { cat "$state/log/mariadb.log" >&2; die "MariaDB did not come up"; }
say "mariadb up"

# --- SLURM daemons (each daemonizes and writes its PID file into $state/pids) ---------------------------
/usr/sbin/slurmdbd
for _ in $(seq 1 $((timeout_s * 5))); do
    grep -q "slurmdbd version .* started" "$state/log/slurmdbd.log" 2>/dev/null && break
    sleep 0.2
done
/usr/sbin/slurmctld
/usr/sbin/slurmd -N n1
/usr/sbin/slurmd -N n2

# --- wait until both nodes are idle ---------------------------------------------------------------------
deadline=$(( $(date +%s) + timeout_s ))
until [[ "$(sinfo -h -N -o '%N %t' 2>/dev/null | sort -u | tr '\n' ' ')" == "n1 idle n2 idle " ]]; do
    if (( $(date +%s) > deadline )); then
        echo "cluster_up: ERROR: nodes not idle after ${timeout_s} s; sinfo says:" >&2
        sinfo -N -l >&2 || true
        for f in "$state"/log/*.log; do echo "===== $f (last 30 lines)" >&2; tail -n 30 "$f" >&2; done
        exit 1
    fi
    sleep 0.5
done
pids=""
for f in "$state"/pids/*.pid; do pids+=" $(basename "$f" .pid)=$(cat "$f")"; done
say "cluster up: nodes n1 n2 idle in partition debug; pids:$pids"
