"""What a job does when its ranks fail (issue #20): the setup and teardown lines of every `ldit … --slurm` job.

The batch script submitit writes runs the ranks in one `srun` step with `--kill-on-bad-exit=1`, so the first
rank that fails ends the step everywhere, in an allocation made with `--no-kill`, so a node that dies is
dropped from the allocation and the script goes on (without it slurmctld ends the job and requeues it at its
old node count, which a cluster missing that node never gives back). Around the step, on the first node:

    python -m slurm.heal mark  <folder>         setup: the length of each log, where this attempt's begins
    python -m slurm.heal after <folder> <rc>    teardown: srun's exit status

`after` does nothing when the step succeeded, or when the job is no longer RUNNING (a `scancel`, or submitit
requeued it on a time limit). Otherwise it writes the failure to `failures.jsonl` (`<run>/slurm/` for a
training run, so that `ldit status` shows it; else the job's folder), with its reason read from this
attempt's logs, and then:

- an input error (`ldit <job>: error: …`, e.g. a non-finite loss, a bad shard): not retried, it would fail
  the same way; the job ends FAILED.
- more than `max_failures` failures in a row without a new checkpoint between them (a bug at step 5): the job
  ends FAILED, and says so.
- no node lost (a rank killed, a crash, a peer hung past `heartbeat_s`): `scontrol requeue`, the same job id;
  it resumes from `latest`.
- a node lost: the job is submitted again without it (`--exclude`), as a new job (SLURM cannot change the
  node count or the exclusions of a requeued job from inside it: "Job is no longer pending execution", and
  the requeue ends this script before it could update the pending job). It waits up to `regrow_wait_s` for
  the partition to have `nodes` healthy nodes besides the lost ones; if not, it goes on with the largest node
  count the world size rule allows (the universal checkpoint makes the change exact), and says so. Jobs
  that waited for this one (`--then-eval`) wait for the new one instead.
"""

from __future__ import annotations

import datetime
import json
import os
import pickle
import re
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from slurm.status import FAILURES_FILE, JOBS_FILE, read_jsonl, scontrol_job

OFFSETS = "heal-offsets.json"
POLL_S = 5.0
HEALTHY = {"idle", "mix", "mixed", "alloc", "allocated", "comp", "completing", "planned"}
"""sinfo node states (flags stripped) in which a node can run a job; `*` (not responding) never."""


def mark(folder: Path) -> None:
    """Record where this attempt's logs begin (the logs are appended to across attempts)."""
    sizes = {p.name: p.stat().st_size for p in folder.glob("*_log.*")}
    (folder / OFFSETS).write_text(json.dumps(sizes))


def attempt_logs(folder: Path) -> dict[str, str]:
    """Each task's stderr written since :func:`mark` (task number → text)."""
    offsets = json.loads((folder / OFFSETS).read_text()) if (folder / OFFSETS).is_file() else {}
    logs = {}
    for p in sorted(folder.glob("*_log.err")):
        task = p.name.rsplit("_", 2)[-2]
        with open(p, "rb") as f:
            f.seek(offsets.get(p.name, 0))
            logs[task] = f.read().decode(errors="replace")
    return logs


EXCEPTION = re.compile(
    r"^(?:[A-Za-z_][\w.]*(?:Error|Exception|Interrupt|Exit)|rank \d+: no training step|ldit [\w-]+: a peer was lost)"
    r"\b.*"
)
RANK_PREFIX = re.compile(r"^\[rank\d+\]:")  # torch prefixes a failed rank's traceback lines with it
SRUN_TASK = re.compile(r"^srun: error: (\S+): tasks? ([\d,-]+): (.+)$")


def failure_reason(logs: dict[str, str]) -> tuple[str, bool]:
    """(Why the step failed, whether it was the job's input) from this attempt's task logs.

    An input error is the line `run_here` prints for it (`ldit <job>: error: …`). Otherwise the first task srun
    saw fail (`srun: error: n2: task 3: Killed`), with the last exception its log shows.
    """
    for task in sorted(logs, key=int):
        if found := re.search(r"^ldit [\w-]+: error: .*$", logs[task], re.M):
            return f"task {task}: {found.group(0)}", True
    srun = (SRUN_TASK.match(line) for text in logs.values() for line in text.splitlines())
    first = next(filter(None, srun), None)  # the first task srun saw fail (it killed the others after)
    last_exception = {}
    for task, text in logs.items():
        bare = (RANK_PREFIX.sub("", line).strip() for line in text.splitlines())
        if lines := [line for line in bare if EXCEPTION.match(line)]:
            last_exception[task] = lines[-1]
    if first is not None:
        task = first.group(2).split(",")[0].split("-")[0]
        why = f"task {task} on {first.group(1)}: {first.group(3)}"
        return why + (f" ({last_exception[task]})" if task in last_exception else ""), False
    if last_exception:
        task = min(last_exception, key=int)
        return f"task {task}: {last_exception[task]}", False
    nodes = re.findall(r"srun: error: Node failure on (\S+)", "\n".join(logs.values()))
    return (f"node failure on {', '.join(nodes)}" if nodes else "the step failed; see the tasks' logs"), False


def in_a_row(records: list[dict[str, Any]], latest: str | None) -> int:
    """Failures at the end of `records` with the same latest checkpoint as now (no progress between them)."""
    count = 0
    for r in reversed(records):
        if r.get("latest") != latest:
            break
        count += 1
    return count


def node_counts(cluster: Any, cfg: Any) -> list[int]:
    """Node counts this job may run on, largest first: for a training run each count whose world size the
    batch settings allow (trainer.config.world_size_problems); other jobs only their own count."""
    from trainer.config import world_size_problems

    if not hasattr(cfg, "data") or not hasattr(cfg, "micro_batch"):
        return [cluster.nodes]
    d = cfg.data
    return [n for n in range(cluster.nodes, 0, -1)
            if not world_size_problems(d.global_batch, d.streams, cfg.micro_batch, n * cluster.tasks)]  # fmt: skip


def _run(*cmd: str) -> str:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60).stdout


def hostnames(nodelist: str) -> list[str]:
    """A SLURM hostlist (`n[1-2]`) as names."""
    return _run("scontrol", "show", "hostnames", nodelist).split() if nodelist else []


def healthy_nodes(partition: str, excluded: set[str]) -> list[str]:
    """Nodes of the partition that can run a job now or soon (not down, drained or silent), less `excluded`."""
    healthy = []
    for line in _run("sinfo", "-h", "-N", "-p", partition, "-o", "%N %t").splitlines():
        name, state = line.split()
        if "*" not in state and state.rstrip("~#!%$@^-+") in HEALTHY and name not in excluded:
            healthy.append(name)
    return sorted(set(healthy))


def after(folder: Path, rc: int) -> int:
    """The teardown: handle a failed step as the module docstring says; the batch script's exit status."""
    job_id = os.environ["SLURM_JOB_ID"]
    if rc == 0:
        return 0
    now = scontrol_job(job_id)
    state, nodes_now = now.get("JobState", "UNKNOWN"), hostnames(now.get("NodeList", ""))
    if state != "RUNNING":  # scancel, or submitit's requeue on a time limit: not a failure to handle
        print(f"ldit heal: step ended with {rc} while the job is {state}: nothing to do", flush=True)
        return rc
    submission = pickle.loads((folder / f"{job_id}_submitted.pkl").read_bytes())
    job, files, overrides = submission.args
    cluster, cfg = submission.function.cluster, job.load(files, overrides)
    run_dir = cfg.run.dir if hasattr(cfg, "run") else None
    records_path = run_dir / FAILURES_FILE if run_dir else folder / FAILURES_FILE.name
    records = read_jsonl(records_path)
    latest_file = run_dir / "checkpoints" / "latest" if run_dir else None
    latest = latest_file.read_text().strip() if latest_file and latest_file.is_file() else None
    reason, input_error = failure_reason(attempt_logs(folder))
    lost = sorted(set(hostnames(os.environ.get("SLURM_JOB_NODELIST", ""))) - set(nodes_now))
    if lost:  # slurmctld dropped them from the allocation (--no-kill): the cause, whatever the ranks saw
        reason = f"node {', '.join(lost)} lost; {reason}"
    record = {
        "job_id": job_id, "attempt": int(os.environ.get("SLURM_RESTART_COUNT", "0")),
        "time": datetime.datetime.now().isoformat(timespec="seconds"), "rc": rc, "reason": reason,
        "lost_nodes": lost, "latest": latest,
    }  # fmt: skip
    failures = in_a_row(records, latest) + 1
    if input_error:
        record["action"] = "not retried: the job's input is wrong (it would fail the same way again)"
    elif failures > cluster.max_failures:
        record["action"] = (
            f"gave up: {failures} failures in a row without a new checkpoint (max_failures={cluster.max_failures})"
        )
    elif not lost:
        record["action"] = f"requeued (failure {failures} of max_failures={cluster.max_failures} in a row)"
    else:
        record["action"] = resubmit(job, files, overrides, cluster, cfg, lost, run_dir, job_id)
    print(f"ldit heal: job {job_id} attempt {record['attempt']}: {reason}; {record['action']}", flush=True)
    records_path.parent.mkdir(parents=True, exist_ok=True)
    with open(records_path, "a") as f:
        f.write(json.dumps(record) + "\n")
    if record["action"].startswith("requeued"):
        subprocess.run(["scontrol", "requeue", job_id], check=True, timeout=60)  # ends this script
    return 0 if record["action"].startswith("continued") else rc


def resubmit(
    job: Any, files: list[str], overrides: list[str], cluster: Any, cfg: Any, lost: list[str],
    run_dir: Path | None, job_id: str,
) -> str:  # fmt: skip
    """Submit this job again without the `lost` nodes, on as many nodes as come back within regrow_wait_s."""
    from slurm.status import record_submission
    from slurm.submit import submit

    excluded = set(lost) | set(hostnames(str(cluster.sbatch.get("exclude", ""))))
    waited, start = 0.0, time.monotonic()
    while len(healthy := healthy_nodes(cluster.partition, excluded)) < cluster.nodes:
        if waited >= cluster.regrow_wait_s:
            break
        time.sleep(POLL_S)
        waited = time.monotonic() - start
    fits = [n for n in node_counts(cluster, cfg) if n <= len(healthy)]
    nodes = fits[0] if fits else cluster.nodes
    again = replace(cluster, nodes=nodes, sbatch={**cluster.sbatch, "exclude": ",".join(sorted(excluded))})
    new = submit(job, files, overrides, again)
    if run_dir is not None:
        record_submission(run_dir, new.job_id, job.name, f"{nodes} node(s), without {', '.join(lost)}", None)
        for entry in read_jsonl(run_dir / JOBS_FILE):
            if entry.get("after") == job_id:  # `--then-eval`: wait for the job that goes on instead
                subprocess.run(["scontrol", "update", f"JobId={entry['job_id']}", f"Dependency=afterok:{new.job_id}"],
                               capture_output=True, timeout=60)  # fmt: skip
    fewer = (
        f" on {nodes} of {cluster.nodes} nodes (waited {waited:.0f} s for the rest)"
        if nodes < cluster.nodes
        else ""
    )
    return f"continued as job {new.job_id}{fewer}, without {', '.join(lost)}"


def main(argv: list[str]) -> int:
    if len(argv) >= 2 and argv[0] == "mark":
        mark(Path(argv[1].replace("%j", os.environ.get("SLURM_JOB_ID", ""))))
        return 0
    if len(argv) == 3 and argv[0] == "after":
        return after(Path(argv[1].replace("%j", os.environ["SLURM_JOB_ID"])), int(argv[2]))
    print("usage: python -m slurm.heal {mark FOLDER | after FOLDER RC}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
