"""`ldit eval EVAL.yaml run.name=… --follow`: evaluate a run's milestone exports while it trains (issue #16).

The trainer writes `export/step-N` at the steps its config names (`export.every`, `export.at` and the last
step; trainer/config.py :func:`milestone_steps`) and never evaluates: the follower does, in its own
processes or SLURM allocation, at its own world size (an evaluation's `metrics.json` is the same at any
world size, eval/job.py). It polls the run directory every `follow_poll_s`, evaluates each export not yet
evaluated in step order with the eval config (exactly what `ldit eval … step=N` writes; a `metrics.json`
already there is reused, so a requeued or restarted follower goes on where it stopped), rewrites the curve
after each point, and ends once the last step's export is evaluated.

The curve of an evaluation is `<run>/eval/<settings>/curve.csv` and `curve.png`, where `<settings>` is the
name of its per-step folders `eval/step-N_<settings>` without the step: one row per step with the step,
the epochs and samples seen at it (from the run's config.yaml and its shard set's manifest), and every
metric. The eval job itself logs each point to the run's TensorBoard as `eval/<settings>/<metric>` at the
training step, beside the loss.

When does it stop waiting? Training that ran as SLURM jobs is followed through the run's job records
(`slurm/jobs.jsonl`, so a job healed into a new one counts): once none is pending or running and the next
export is missing, the follower fails and says which step it waited for. Without SLURM records it cannot
tell, and waits (`follow_timeout_s` bounds it; `ldit train --follow-eval` stops it when training fails).
"""

from __future__ import annotations

import csv
import json
import math
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch.distributed as dist
from omegaconf import OmegaConf

from eval.config import EvalConfig
from slurm.status import JOBS_FILE, read_jsonl, slurm_states
from trainer.checkpoint import step_name
from trainer.config import TRAIN_KINDS, milestone_steps
from trainer.export import exported

CURVE_CSV, CURVE_PNG = "curve.csv", "curve.png"
ACTIVE = ("PENDING", "RUNNING", "REQUEUED", "REQUEUE_", "CONFIGURING", "COMPLETING", "SUSPENDED", "RESIZING")
"""SLURM job states (squeue's or sacct's first word) of a training job that may still write an export."""


class FollowError(RuntimeError):
    """The follower cannot go on: training ended without the export it waits for (the message says which)."""


@dataclass(frozen=True)
class TrainingPlan:
    """What the follower reads from the run's `config.yaml` (re-read at every poll: a resumed run may extend)."""

    milestones: tuple[int, ...]
    global_batch: int
    dataset_size: int | None
    """Samples in the training shard set (its manifest's total), for epochs; None when the manifest is not here."""

    @property
    def last(self) -> int:
        return self.milestones[-1]


def training_plan(run_dir: Path) -> TrainingPlan | None:
    """The milestones of the run at `run_dir`, or None before its training has written `config.yaml`."""
    path = run_dir / "config.yaml"
    if not path.is_file():
        return None
    data = OmegaConf.load(path)
    schema = TRAIN_KINDS.get(str(data.get("kind")))
    if schema is None:
        raise FollowError(f"{path} is not a training config (kind {data.get('kind')!r})")
    cfg: Any = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(schema), data))
    manifest = Path(cfg.data.shards) / "manifest.json"
    total = json.loads(manifest.read_text()).get("total") if manifest.is_file() else None
    return TrainingPlan(tuple(milestone_steps(cfg.export, cfg.steps)), cfg.data.global_batch, total)


def training_alive(run_dir: Path) -> bool | None:
    """Whether a training job of the run may still export: True or False from SLURM, None when it cannot tell."""
    ids = [j["job_id"] for j in read_jsonl(run_dir / JOBS_FILE) if j["job"] == "train"]
    if not ids:
        return None
    try:
        states = slurm_states(ids)
    except (OSError, subprocess.SubprocessError):  # a slow or restarting controller: ask again next poll
        return None
    if all(s.startswith("unknown") for s in states.values()):
        return None
    return any(s.split()[0].startswith(ACTIVE) for s in states.values())


def settings_of(out_dir: Path) -> str:
    """`<settings>` of an evaluation folder `eval/step-N_<settings>`: the name of its curve."""
    return out_dir.name.split("_", 1)[1]


def curve_points(run_dir: Path, settings: str) -> list[tuple[int, dict[str, float | None]]]:
    """(step, metrics) of every finished evaluation `eval/step-N_<settings>`, by step."""
    points = []
    for path in (run_dir / "eval").glob(f"step-*_{settings}/metrics.json"):
        doc = json.loads(path.read_text())
        metrics = {k: (float(v) if v is not None else None) for k, v in doc["metrics"].items()}
        points.append((int(doc["export"]["step"]), metrics))
    return sorted(points, key=lambda p: p[0])


def write_curve(run_dir: Path, settings: str, plan: TrainingPlan | None) -> Path:
    """Write `eval/<settings>/curve.csv` and `curve.png` from the evaluations there are; returns the folder."""
    points = curve_points(run_dir, settings)
    names = sorted({k for _, m in points for k, v in m.items() if v is not None and math.isfinite(v)})
    folder = run_dir / "eval" / settings
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for step, metrics in points:
        seen = step * plan.global_batch if plan else None
        epochs = seen / plan.dataset_size if plan and plan.dataset_size and seen is not None else None
        rows.append(
            {"step": step, "epochs": epochs, "samples_seen": seen, **{k: metrics.get(k) for k in names}}
        )
    tmp = folder / (CURVE_CSV + ".tmp")
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, ["step", "epochs", "samples_seen", *names])
        writer.writeheader()
        writer.writerows([{k: ("" if v is None else repr(v) if isinstance(v, float) else v)
                           for k, v in r.items()} for r in rows])  # fmt: skip
    tmp.replace(folder / CURVE_CSV)
    plot_curve(folder / CURVE_PNG, f"{run_dir.name}: {settings}", rows, names, plan)
    return folder


def plot_curve(
    path: Path, title: str, rows: list[dict[str, Any]], names: list[str], plan: TrainingPlan | None
) -> None:
    """One panel per metric against the training step, with epochs on the top axis when they are known."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = max(len(names), 1)
    cols = min(n, 3)
    fig, axes = plt.subplots((n + cols - 1) // cols, cols, figsize=(4.2 * cols, 3.2 * ((n + cols - 1) // cols)),
                             squeeze=False)  # fmt: skip
    per_epoch = plan.dataset_size / plan.global_batch if plan and plan.dataset_size else None
    for ax, name in zip(axes.flat, names or ["(no metric yet)"]):
        pts = [(r["step"], r.get(name)) for r in rows if r.get(name) is not None]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o")
        ax.ticklabel_format(axis="y", useOffset=False)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("training step")
        ax.grid(alpha=0.3)
        if per_epoch:
            top = ax.secondary_xaxis("top", functions=(lambda s: s / per_epoch, lambda e: e * per_epoch))
            top.set_xlabel("epochs", fontsize=8)
    for ax in list(axes.flat)[len(names or [0]) :]:
        ax.axis("off")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=90)
    plt.close(fig)
    tmp.replace(path)


def _print0(text: str) -> None:
    if dist.get_rank() == 0:
        print(text, flush=True)


def follow(cfg: EvalConfig, evaluate: Callable[[int], Path] | None = None) -> Path | None:
    """The follower loop (every rank; rank 0 looks at the run directory and tells the others what to do).

    `evaluate(step)` evaluates the export of `step` (a collective) and returns its folder
    `eval/step-N_<settings>` with `metrics.json` written (`metrics`: name → number or None; `export.step`);
    the default is `ldit eval` with `cfg` at that step. The demo passes its own weight-free measure.
    Returns the curve folder (on rank 0) after the last step's export is evaluated.
    """
    from eval import job as eval_job

    if evaluate is None:

        def evaluate(step: int) -> Path:
            return eval_job.run(replace(cfg, step=step, follow=False))

    run_dir = cfg.run.dir
    done: dict[int, Path] = {}
    curve: Path | None = None
    waiting_for, last_news, ended_at = None, time.monotonic(), None
    while True:
        news: list[Any] = [None]
        if dist.get_rank() == 0:  # whether training may go on, then what is there: an export renamed into
            alive = training_alive(run_dir)  # place before its job ended is seen on this same look
            plan = training_plan(run_dir)
            ready = [s for s in plan.milestones if s not in done and exported(run_dir, s)] if plan else []
            news = [(plan, ready, alive)]
        dist.broadcast_object_list(news, src=0)
        plan, ready, alive = news[0]
        for step in ready:
            out = evaluate(step)
            done[step] = out
            if dist.get_rank() == 0:
                curve = write_curve(run_dir, settings_of(out), plan)
                print(f"follow: {len(done)} of {len(plan.milestones)} milestones of {cfg.run.name} evaluated; "
                      f"curve {curve / CURVE_CSV}", flush=True)  # fmt: skip
            last_news = time.monotonic()
        if plan is not None and plan.last in done and plan.last >= cfg.follow_until:
            _print0(
                f"follow: done: the last export (step {plan.last}) is evaluated; curve {curve or '(rank 0)'}"
            )
            return curve
        if ready:
            continue
        target = next((s for s in plan.milestones if s not in done), None) if plan else None
        if target is not None:
            where = f"export {step_name(target)}"
        elif plan is None:
            where = "the run's config.yaml"
        else:  # an extended run whose training has not rewritten config.yaml yet
            where = f"the run's config.yaml to reach step {cfg.follow_until} (it ends at step {plan.last})"
        ended_at = (ended_at or time.monotonic()) if alive is False else None
        if ended_at is not None and time.monotonic() - ended_at >= cfg.follow_settle_s:
            evaluated = ", ".join(str(s) for s in sorted(done)) or "none"
            raise FollowError(
                f"training of {run_dir} is no longer pending or running (its SLURM jobs: {JOBS_FILE}) and "
                f"{where} was not written; evaluated steps: {evaluated}. Resubmit the training (the follower "
                "reuses the points it has) or evaluate single exports with `ldit eval … step=N`"
            )
        if cfg.follow_timeout_s and time.monotonic() - last_news > cfg.follow_timeout_s:
            raise FollowError(
                f"no new export of {run_dir} for follow_timeout_s={cfg.follow_timeout_s:g} s (waiting for {where})"
            )
        if where != waiting_for:
            state = {
                True: "training is pending or running",
                False: f"training has ended; giving it follow_settle_s={cfg.follow_settle_s:g} s",
                None: "training state unknown (no SLURM record)",
            }[alive]
            _print0(
                f"follow: waiting for {where} of {cfg.run.name} ({state}; polling every {cfg.follow_poll_s:g} s)"
            )
            waiting_for = where
        time.sleep(cfg.follow_poll_s)


def run(cfg: EvalConfig) -> None:
    """`ldit eval`: one export, or with `follow` every milestone export of the run as it appears."""
    if cfg.follow:
        follow(cfg)
    else:
        from eval import job as eval_job

        eval_job.run(cfg)
