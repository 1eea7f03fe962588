"""`ldit status <run dir>`: a run's checkpoints, last logged step, export, and its SLURM jobs with their
states (from accounting, `sacct`; a pending job also shows squeue's reason, e.g. a dependency that can
never be satisfied because the job it waits for failed).

Jobs are known from `<run>/slurm/jobs.jsonl`, which `ldit … --slurm` appends to on every submission.
"""

from __future__ import annotations

import datetime
import json
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import MISSING

JOBS_FILE = Path("slurm") / "jobs.jsonl"


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


def describe_run(run_dir: Path) -> str:
    """The status text of one run directory."""
    from trainer.checkpoint import Checkpointer, problems

    if not run_dir.is_dir():
        raise FileNotFoundError(f"run directory {run_dir} does not exist")
    lines = [f"run {run_dir}"]
    ckpts = Checkpointer(run_dir)
    folders = sorted(ckpts.root.glob("step-*"))
    latest = (ckpts.root / "latest").read_text().strip() if (ckpts.root / "latest").is_file() else None
    if folders:
        parts = []
        for f in reversed(folders):
            bad = problems(f)
            tags = (["latest"] if f.name == latest else []) + (["complete"] if not bad else ["incomplete"])
            parts.append(f"{f.name} ({', '.join(tags)})")
        lines.append("  checkpoints: " + ", ".join(parts))
    else:
        lines.append("  checkpoints: none")
    log = run_dir / "log.jsonl"
    if log.is_file() and (entries := log.read_text().splitlines()):
        last: dict[str, Any] = json.loads(entries[-1])
        losses = ", ".join(f"{k} {v:.4f}" for k, v in last.items() if k.startswith("loss/"))
        lines.append(f"  last logged step {last['step']}" + (f": {losses}" if losses else ""))
    link = run_dir / "export" / "latest"
    if link.is_symlink():
        lines.append(f"  export: export/latest -> {os.readlink(link)}")
    evals = sorted((run_dir / "eval").glob("*/metrics.json"))
    for m in evals:
        metrics = json.loads(m.read_text())
        shown = ", ".join(f"{k} {v:.4g}" for k, v in metrics.items() if isinstance(v, float))
        lines.append(f"  eval {m.parent.name}: {shown}")
    jobs_path = run_dir / JOBS_FILE
    if jobs_path.is_file():
        jobs = [json.loads(line) for line in jobs_path.read_text().splitlines()]
        states = slurm_states([j["job_id"] for j in jobs])
        lines.append("  SLURM jobs:")
        for j in jobs:
            after = f", after {j['after']}" if j.get("after") else ""
            lines.append(
                f"    {j['job_id']:>8}  ldit {j['job']:<8} {states[j['job_id']]:<32} submitted {j['submitted']}"
                f"  {j['resources']}{after}"
            )
    else:
        lines.append("  SLURM jobs: none submitted with --slurm")
    return "\n".join(lines)


def run(cfg: StatusConfig) -> None:
    import torch.distributed as dist

    if dist.get_rank() == 0:
        print(describe_run(Path(cfg.run_dir)), flush=True)
