#!/usr/bin/env bash
# Stop the test cluster that cluster_up.sh started: cancel every job first (slurmd does not kill running
# job steps when it exits), then stop the daemons by the PIDs recorded in $LDIT_SLURM_DIR/current/pids,
# in reverse start order. Idempotent: with nothing running it says so and succeeds. The state directory
# is kept for its logs; the next cluster_up.sh starts a fresh one.
set -euo pipefail

base="${LDIT_SLURM_DIR:-/tmp/ldit-slurm}"
pids="$base/current/pids"
say() { echo "cluster_down: $*"; }

if [[ ! -d "$pids" ]]; then
    say "no cluster recorded in $base; nothing to stop"
    exit 0
fi

# Cancel the jobs while slurmctld and the slurmd daemons are still there to kill their processes.
if [[ -s "$pids/slurmctld.pid" ]] && kill -0 "$(cat "$pids/slurmctld.pid")" 2>/dev/null; then
    if [[ -n "$(squeue -h -o %i 2>/dev/null)" ]]; then
        say "cancelling jobs: $(squeue -h -o %i | tr '\n' ' ')"
        scancel --full --signal=KILL --user=root --quiet 2>/dev/null || true
        scancel --user=root --quiet 2>/dev/null || true
        for _ in $(seq 1 40); do
            [[ -z "$(squeue -h -o %i 2>/dev/null)" ]] && break
            sleep 0.5
        done
    fi
fi

# Stop one recorded daemon: TERM, wait up to 10 s, then KILL.
stop() {
    local f="$pids/$1.pid" pid
    [[ -s "$f" ]] || return 0
    pid="$(cat "$f")"
    if kill -0 "$pid" 2>/dev/null; then
        kill -TERM "$pid" 2>/dev/null || true
        for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
        if kill -0 "$pid" 2>/dev/null; then
            say "$1 (pid $pid) ignored TERM; killing it"
            kill -KILL "$pid" 2>/dev/null || true
        fi
        say "stopped $1 (pid $pid)"
    fi
    rm -f "$f"
}
stop slurmd-n2
stop slurmd-n1
stop slurmctld
stop slurmdbd
stop mariadbd
stop munged
say "done (logs kept in $(readlink -f "$base/current"))"
