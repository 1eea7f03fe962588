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
if [[ -s "$pids/slurmctld.pid" ]] && [[ "$(cat "/proc/$(cat "$pids/slurmctld.pid")/comm" 2>/dev/null)" == slurmctld ]]; then
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

# Stop recorded daemons together: TERM, wait up to 10 s, then KILL. Only a PID that still belongs to
# its program is signalled: a daemon that died may leave a stale PID file, its PID reused since.
stop() {
    local name pid waiting=()
    for name in "$@"; do
        [[ -s "$pids/$name.pid" ]] || continue
        pid="$(cat "$pids/$name.pid")"
        if [[ "$(cat "/proc/$pid/comm" 2>/dev/null)" == "${name%-n[12]}" ]]; then
            kill -TERM "$pid" 2>/dev/null || true
            waiting+=("$name:$pid")
        fi
        rm -f "$pids/$name.pid"
    done
    for entry in "${waiting[@]}"; do
        name="${entry%%:*}" pid="${entry##*:}"
        for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
        if kill -0 "$pid" 2>/dev/null; then
            say "$name (pid $pid) ignored TERM; killing it"
            kill -KILL "$pid" 2>/dev/null || true
        fi
        say "stopped $name (pid $pid)"
    done
}
# slurmctld before slurmdbd (it sends its last job records there), slurmdbd before its database.
stop slurmd-n1 slurmd-n2
stop slurmctld
stop slurmdbd
stop mariadbd munged
say "done (logs kept in $(readlink -f "$base/current"))"
