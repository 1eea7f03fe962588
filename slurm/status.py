"""`ldit status <run dir>`: a run's checkpoints, last logged step (and how long ago), export, evaluations
and their curves (issue #16: one line per point of each `eval/<settings>/curve.csv` the eval follower
writes; an evaluation that is a point of a curve is shown there only), and its SLURM jobs with their
states (from accounting, `sacct`; a pending job also shows squeue's reason, e.g. a dependency that can
never be satisfied because the job it waits for failed).

A run whose job SLURM reports RUNNING but which has logged nothing for longer than :func:`stall_bound_s`
(10 × its usual time between log lines, at least 45 s) is flagged as stalled (issue #20): a hung rank
holds the others in a collective until `collective_timeout_s`, and SLURM alone shows only "RUNNING".

It also shows how many times each job was requeued (`sacct --duplicates`) and the last failures that the
jobs' teardown (slurm/heal.py) recorded in `<run>/slurm/failures.jsonl`, with their reasons and actions.

:func:`run_status` gathers it as a dict and :func:`render_status` writes the text; `ldit inspect run`
prints the same text, or the dict with `--json`.

Jobs are known from `<run>/slurm/jobs.jsonl`, which `ldit … --slurm` appends to on every submission.
"""

from __future__ import annotations

import csv
import datetime
import json
import os
import re
import shutil
import statistics
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import MISSING

JOBS_FILE = Path("slurm") / "jobs.jsonl"
FAILURES_FILE = Path("slurm") / "failures.jsonl"
"""Each failed attempt of the run's jobs, its reason and what the job did (written by slurm/heal.py)."""


@dataclass
class StatusConfig:
    """Show a run's state."""

    run_dir: str = MISSING
    """Run directory (`runs/<run.name>`; the positional argument of `ldit status`)."""


def record_submission(run_dir: Path, job_id: str, job: str, description: str, after: str | None) -> None:
    """Append a submitted job to `<run>/slurm/jobs.jsonl`."""
    path = Path(run_dir) / JOBS_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    entry = {
        "job_id": str(job_id),
        "job": job,
        "submitted": datetime.datetime.now().isoformat(timespec="seconds"),
        "resources": description,
        "after": after,
    }
    with open(path, "a") as f:
        f.write(json.dumps(entry) + "\n")


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The records of a JSON-lines file (`jobs.jsonl`, `failures.jsonl`), oldest first; [] when it is absent."""
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def scontrol_job(job_id: str) -> dict[str, str]:
    """A job as slurmctld has it now (`scontrol show job -o`: JobState, NodeList, …); {} when it cannot say."""
    if not shutil.which("scontrol"):
        return {}
    try:
        out = subprocess.run(
            ["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True, timeout=30
        )
    except (OSError, subprocess.TimeoutExpired):
        return {}
    return dict(re.findall(r"\b(\w+)=(\S*)", out.stdout))


def requeues(job_ids: list[str]) -> dict[str, int]:
    """How many times each job was requeued, from accounting (`sacct --duplicates` lists every attempt)."""
    if not job_ids or not shutil.which("sacct"):
        return {}
    out = subprocess.run(
        ["sacct", "-n", "-P", "-X", "-D", "-o", "JobIDRaw,State", "-j", ",".join(job_ids)],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    counts: dict[str, int] = {}
    for line in out.stdout.splitlines():
        jid, _, state = line.partition("|")
        counts[jid] = counts.get(jid, 0) + state.startswith(("REQUEUED", "PREEMPTED", "NODE_FAIL"))
    return counts


def slurm_states(job_ids: list[str]) -> dict[str, str]:
    """Final or current state of each job: accounting first, then squeue's state and reason."""
    states: dict[str, str] = {}
    if not job_ids:
        return states
    if shutil.which("sacct"):
        out = subprocess.run(
            ["sacct", "-n", "-P", "-X", "-o", "JobIDRaw,State", "-j", ",".join(job_ids)],
            capture_output=True, text=True, timeout=30,
        )  # fmt: skip
        for line in out.stdout.splitlines():
            jid, _, state = line.partition("|")
            states[jid] = state.split()[0] if state else "UNKNOWN"
    if shutil.which("squeue"):
        out = subprocess.run(
            ["squeue", "-h", "-o", "%i|%T|%r", "-j", ",".join(job_ids)],
            capture_output=True,
            text=True,
            timeout=30,
        )
        for line in out.stdout.splitlines():
            jid, state, reason = (line.split("|") + ["", ""])[:3]
            states[jid] = f"{state} ({reason})" if reason and reason != "None" else state
    return {j: states.get(j, "unknown (no SLURM tools or record here)") for j in job_ids}


STALL_FACTOR = 10
"""A RUNNING job's run is stalled when it logged nothing for this many times its usual log interval..."""
STALL_FLOOR_S = 45.0
"""...and for at least this long (a start, a checkpoint save or a universal conversion logs nothing
for a while; XL/1 on 2 CPU ranks: 11 s a save, 31 s a conversion, benchmarks/bench_full_size.py)."""


def log_interval_s(entries: list[dict[str, Any]]) -> float | None:
    """The usual seconds between two lines of log.jsonl: the median number of steps between the last
    20 lines times the median `perf/step_time_s` they logged; None when the log cannot say."""
    recent = entries[-21:]
    gaps = [b["step"] - a["step"] for a, b in zip(recent, recent[1:]) if b["step"] > a["step"]]
    times = [e["perf/step_time_s"] for e in recent if "perf/step_time_s" in e]
    if not times:
        return None
    return statistics.median(gaps or [1]) * statistics.median(times)


def stall_bound_s(interval_s: float | None) -> float:
    """Seconds without a log line after which a RUNNING job's run counts as stalled."""
    return max(STALL_FACTOR * (interval_s or 0.0), STALL_FLOOR_S)


def _ago(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.0f} min" if seconds < 7200 else f"{seconds / 3600:.1f} h"


def started(job_ids: list[str]) -> dict[str, float]:
    """When each job's current attempt started (epoch seconds, from accounting; absent when unknown)."""
    if not job_ids or not shutil.which("sacct"):
        return {}
    out = subprocess.run(
        ["sacct", "-n", "-P", "-X", "-o", "JobIDRaw,Start", "-j", ",".join(job_ids)],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    starts = {}
    for line in out.stdout.splitlines():
        jid, _, start = line.partition("|")
        try:
            starts[jid] = datetime.datetime.fromisoformat(start).timestamp()
        except ValueError:  # "Unknown" or "None"
            continue
    return starts


CURVE_AXES = ("step", "epochs", "samples_seen")
"""The columns of a curve.csv before its metrics (slurm/follow.py `write_curve`)."""


def read_curve(path: Path) -> dict[str, Any]:
    """An eval follower's `eval/<settings>/curve.csv` (slurm/follow.py): its settings, columns and rows,
    each value a number (`step` and `samples_seen` ints) or None where the cell is empty."""
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        rows = [
            {
                k: None if v == "" else int(v) if k in ("step", "samples_seen") else float(v)
                for k, v in r.items()
            }
            for r in reader
        ]
    return {"settings": path.parent.name, "columns": list(reader.fieldnames or []), "rows": rows}


def _number(v: Any) -> str:
    """A metric value as status shows it: 4 significant digits; a non-finite value or a note as it is."""
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def run_status(run_dir: Path) -> dict[str, Any]:
    """What `ldit status` and `ldit inspect run` show of one run directory, as a JSON-ready dict.

    Keys: `run`; `checkpoints` (newest first: name, latest, complete, problems); `last_log` (step and
    the `loss/*` scalars of the last line of log.jsonl, `age_s` since the file was last written and
    `interval_s`, the usual time between its lines; or None); `export` (where export/latest points,
    or None); `evals` (name and the `metrics` of every eval/*/metrics.json); `curves` (each
    eval/<settings>/curve.csv the eval follower writes: `settings`, `columns` and `rows`, each a dict of
    the columns, numbers or None, by step; :func:`read_curve`); `jobs` (the SLURM jobs recorded
    in slurm/jobs.jsonl with their states, or None when none were submitted with --slurm); `stall`
    (None, or `silent_s` and `bound_s` when a job is RUNNING and the log has been silent past the bound);
    `failures` (slurm/failures.jsonl: each failed attempt with its reason and action, oldest first).
    """
    from trainer.checkpoint import Checkpointer, problems

    if not run_dir.is_dir():
        raise FileNotFoundError(f"run directory {run_dir} does not exist")
    ckpts = Checkpointer(run_dir)
    latest = (ckpts.root / "latest").read_text().strip() if (ckpts.root / "latest").is_file() else None
    checkpoints = []
    for f in sorted(ckpts.root.glob("step-*"), reverse=True):
        bad = problems(f)
        checkpoints.append({"name": f.name, "latest": f.name == latest, "complete": not bad, "problems": bad})
    last_log = None
    log = run_dir / "log.jsonl"
    if log.is_file() and (lines := log.read_text().splitlines()):
        entries = [json.loads(line) for line in lines[-21:]]
        last: dict[str, Any] = entries[-1]
        last_log = {
            "step": last["step"],
            "losses": {k: v for k, v in last.items() if k.startswith("loss/")},
            "age_s": max(0.0, time.time() - log.stat().st_mtime),
            "interval_s": log_interval_s(entries),
        }
    link = run_dir / "export" / "latest"
    evals = [
        {"name": m.parent.name, "metrics": json.loads(m.read_text())["metrics"]}
        for m in sorted((run_dir / "eval").glob("*/metrics.json"))
    ]
    curves = [read_curve(c) for c in sorted((run_dir / "eval").glob("*/curve.csv"))]
    jobs = read_jsonl(run_dir / JOBS_FILE) or None
    if jobs:
        states = slurm_states([j["job_id"] for j in jobs])
        counts = requeues([j["job_id"] for j in jobs])
        jobs = [{**j, "state": states[j["job_id"]], "requeues": counts.get(j["job_id"], 0)} for j in jobs]
    failures = read_jsonl(run_dir / FAILURES_FILE)
    stall = None
    running = [j["job_id"] for j in jobs or [] if j["state"].startswith("RUNNING")]
    if last_log is not None and running:
        bound = stall_bound_s(last_log["interval_s"])
        silent = min(last_log["age_s"], time.time() - max(started(running).values(), default=0.0))
        if silent > bound:  # counted from this attempt's start when the log is older (a requeue)
            stall = {"silent_s": silent, "bound_s": bound}
    return {
        "run": str(run_dir),
        "checkpoints": checkpoints,
        "last_log": last_log,
        "export": os.readlink(link) if link.is_symlink() else None,
        "evals": evals,
        "curves": curves,
        "jobs": jobs,
        "stall": stall,
        "failures": failures,
    }


def render_status(status: dict[str, Any]) -> str:
    """The text of :func:`run_status`'s dict, as `ldit status` prints it."""
    from trainer.checkpoint import step_name

    lines = [f"run {status['run']}"]
    if status["checkpoints"]:
        parts = []
        for c in status["checkpoints"]:
            tags = (["latest"] if c["latest"] else []) + (["complete"] if c["complete"] else ["incomplete"])
            parts.append(f"{c['name']} ({', '.join(tags)})")
        lines.append("  checkpoints: " + ", ".join(parts))
    else:
        lines.append("  checkpoints: none")
    if (last := status["last_log"]) is not None:
        losses = ", ".join(f"{k} {v:.4f}" for k, v in last["losses"].items())
        when = f" ({_ago(last['age_s'])} ago)" if last.get("age_s") is not None else ""
        lines.append(f"  last logged step {last['step']}{when}" + (f": {losses}" if losses else ""))
    if (stall := status.get("stall")) is not None:
        lines.append(
            f"  STALLED: a job is RUNNING but nothing was logged for {_ago(stall['silent_s'])} (bound "
            f"{_ago(stall['bound_s'])}: {STALL_FACTOR} × the usual time between log lines, at least "
            f"{STALL_FLOOR_S:.0f} s); a rank may be hung: see the job's logs"
        )
    if status["export"] is not None:
        lines.append(f"  export: export/latest -> {status['export']}")
    curves = status.get("curves") or []
    in_curve = {f"{step_name(r['step'])}_{c['settings']}" for c in curves for r in c["rows"]}
    for e in status["evals"]:  # a point of a curve is shown with its curve, below
        if e["name"] not in in_curve:
            lines.append(
                f"  eval {e['name']}: " + ", ".join(f"{k} {_number(v)}" for k, v in e["metrics"].items())
            )
    for c in curves:
        lines.append(f"  curve {c['settings']} ({len(c['rows'])} points, eval/{c['settings']}/curve.csv):")
        for r in c["rows"]:
            epochs = f" ({r['epochs']:.3g} epochs)" if r.get("epochs") is not None else ""
            shown = ", ".join(
                f"{k} {_number(r[k])}" for k in c["columns"] if k not in CURVE_AXES and r[k] is not None
            )
            lines.append(f"    step {r['step']}{epochs}: {shown}")
    if status["jobs"] is not None:
        lines.append("  SLURM jobs:")
        for j in status["jobs"]:
            after = f", after {j['after']}" if j.get("after") else ""
            again = f", requeued {j['requeues']}x" if j.get("requeues") else ""
            lines.append(
                f"    {j['job_id']:>8}  ldit {j['job']:<8} {j['state']:<32} submitted {j['submitted']}"
                f"  {j['resources']}{after}{again}"
            )
    else:
        lines.append("  SLURM jobs: none submitted with --slurm")
    if failures := status.get("failures"):
        lines.append(f"  failures: {len(failures)} (slurm/heal.py; the last {min(len(failures), 5)}):")
        for f in failures[-5:]:
            lines.append(
                f"    {f['time']} job {f['job_id']} attempt {f['attempt']}: {f['reason']}; {f['action']}"
            )
    return "\n".join(lines)


def describe_run(run_dir: Path) -> str:
    """The status text of one run directory (`ldit status`; `ldit inspect run` prints the same)."""
    return render_status(run_status(run_dir))


def run(cfg: StatusConfig) -> None:
    import torch.distributed as dist

    if dist.get_rank() == 0:
        print(describe_run(Path(cfg.run_dir)), flush=True)
