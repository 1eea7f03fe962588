"""The demo's eval follower: the classifier measures (and FID) of every milestone export of its DiT (issue #16).

    python -m slurm.demo_follow OUT/configs/demo.yaml      (the demo starts it beside `ldit train` of the DiT)

The demo's DiT run exports its EMA at the milestones of its `export` config (the quick demo: steps 250,
500, 750). This process follows the run with :func:`slurm.follow.follow`, the loop of `ldit eval --follow`,
in its own process group beside training (`slurm.companions.run_with_follower`, as `ldit train --follow-eval`
runs it): training never waits for it. Its `evaluate(step)` is the demo's quality measure of that export
(:class:`slurm.demo_digits.Judge`: the classifier's sample accuracy and the Fréchet distance in its
features, from the samples the quality stage draws), written as `<run>/eval/step-N_<settings>/metrics.json`
in the shape of `ldit eval`'s (eval/job.py; the curve reads `metrics` and `export.step`), and the loop keeps
`<run>/eval/<settings>/curve.csv|png` up to date.

With `inception_weights` the same evaluate also runs `ldit eval`'s FID evaluation of the export (eval.job.run
with the config :func:`fid_config`; its points are what `ldit eval … step=N` writes) and rewrites that
evaluation's own curve. One follower rather than a second `ldit eval --follow` process: the two evaluations
take turns instead of both competing with the two training ranks for the cores, and one loop decides when
the last export is done.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch.distributed as dist

from eval.config import EvalConfig, SamplerConfig
from eval.job import METRICS, TIMING, already_done, json_text, log_tensorboard, num, write_atomic
from slurm.demo_digits import KIND, Judge, Layout, one_thread, sample_digits
from slurm.follow import CURVE_CSV, CURVE_PNG, FollowError, follow, settings_of, training_plan, write_curve
from slurm.jobs import DemoConfig
from trainer.checkpoint import step_name
from trainer.config import RunConfig
from trainer.export import exported

POLL_S = 1.0
"""Seconds between the follower's looks for a new export (the demo's exports come seconds apart)."""
RUN = "dit"
"""Name of the demo's DiT run under `out`/runs."""


def settings(cfg: DemoConfig) -> str:
    """`<settings>` of the classifier measures, named as `ldit eval` names its evaluations (eval_name)."""
    guidance = f"cfg{num(cfg.cfg_scale)}-all-from0" if cfg.cfg_scale > 1 else "nocfg"
    return (
        f"euler{cfg.sample_points}-shift{num(cfg.sample_shift)}_{guidance}_balanced_seed{cfg.seed}"
        f"_n{10 * cfg.samples_per_class}_digits-classifier"
    )


def fid_config(cfg: DemoConfig, paths: Layout) -> EvalConfig:
    """`ldit eval` of the DiT against the held-out digits' reference, sampled as the demo samples."""
    return EvalConfig(
        run=RunConfig(name=RUN, root=str(paths.runs)),
        num_samples=cfg.fid_samples,
        labels="balanced",
        sampler=SamplerConfig(
            points=cfg.sample_points,
            shift=cfg.sample_shift,
            cfg_scale=cfg.cfg_scale,
            cfg_interval_start=0.0,
            cfg_channels="all",
        ),  # fmt: skip
        reference=str(paths.reference),
        inception_weights=cfg.inception_weights,
        follow_poll_s=POLL_S,
    )


def fid_settings(cfg: DemoConfig, paths: Layout) -> str:
    from eval.sample_fid import eval_name

    return settings_of(Path(eval_name(fid_config(cfg, paths), 0, paths.reference)))


def curve_settings(cfg: DemoConfig, paths: Layout) -> list[str]:
    """The curves the follower keeps: the classifier measures', then FID's with `inception_weights`."""
    return [settings(cfg)] + ([fid_settings(cfg, paths)] if cfg.inception_weights else [])


def evaluated(cfg: DemoConfig, paths: Layout) -> bool:
    """Whether the DiT run is trained to `dit.steps` with every milestone export evaluated for every curve."""
    plan = training_plan(paths.dit)
    if plan is None or plan.last != cfg.dit.steps:
        return False
    return all(
        (paths.dit / "eval" / f"{step_name(s)}_{name}" / METRICS).is_file()
        for s in plan.milestones
        for name in curve_settings(cfg, paths)
    )


def unexported(cfg: DemoConfig, paths: Layout) -> list[int]:
    """Milestones of a DiT run trained to `dit.steps` whose export is missing (the follower would wait)."""
    plan = training_plan(paths.dit)
    return [s for s in plan.milestones if not exported(paths.dit, s)] if plan else [cfg.dit.steps]


def command(paths: Layout) -> list[str]:
    """The follower's command line; the demo writes the config it reads (`configs/demo.yaml`)."""
    return [sys.executable, "-m", "slurm.demo_follow", str(paths.configs / "demo.yaml")]


class ClassifierPoints:
    """`evaluate(step)` of the follower: the classifier measures of one export (rank 0 computes, all return)."""

    def __init__(self, cfg: DemoConfig, paths: Layout) -> None:
        self.cfg, self.paths = cfg, paths
        self.judge: Judge | None = None  # fitted at the first export to measure, not for reused points

    def __call__(self, step: int) -> Path:
        out = self.paths.dit / "eval" / f"{step_name(step)}_{settings(self.cfg)}"
        if dist.get_rank() == 0 and not already_done(out):
            self.measure(step, out)
        dist.barrier()
        return out

    def measure(self, step: int, out: Path) -> None:
        from models.export import weights_sha256

        cfg, paths = self.cfg, self.paths
        export = paths.dit / "export" / step_name(step)
        vavae = paths.vavae / "export" / step_name(cfg.vavae.steps)
        start = time.perf_counter()
        with one_thread():
            if self.judge is None:
                self.judge = Judge.of(paths.digits, cfg.seed)
            images, labels = sample_digits(export, vavae, paths.latents, cfg.samples_per_class, cfg.cfg_scale,
                                           cfg.sample_points, cfg.sample_shift, cfg.seed)  # fmt: skip
            figures = self.judge.samples(images, labels)
        elapsed = time.perf_counter() - start
        metrics = {k: figures[k] for k in ("sample_accuracy", "frechet_distance")}
        doc = {
            "format": 1,
            "job": "ldit demo (the classifier's measures of LightningDiT samples)",
            "name": out.name,
            "metrics": metrics,
            "sample_accuracy_per_class": figures["sample_accuracy_per_class"],
            "export": {"path": f"export/{step_name(step)}", "step": step, "weights_sha256": weights_sha256(export)},
            "vavae": {"path": str(vavae), "weights_sha256": weights_sha256(vavae)},
            "classifier": {"kind": KIND, "digits": str(paths.digits), "seed": cfg.seed},
            "frechet_against": "held-out digits and their mirror images, in the classifier's hidden features",
            "sampling": {"method": "euler", "points": cfg.sample_points, "shift": cfg.sample_shift,
                         "cfg_scale": cfg.cfg_scale, "cfg_channels": "all", "cfg_interval_start": 0.0,
                         "labels": "class-major", "per_class": cfg.samples_per_class, "seed": cfg.seed},
        }  # fmt: skip
        out.mkdir(parents=True, exist_ok=True)
        # Seconds apart from metrics.json, as `ldit eval` keeps them; the first point's include the classifier's fit.
        write_atomic(out / TIMING, json_text({"seconds": elapsed, "samples": len(images)}))
        write_atomic(out / METRICS, json_text(doc))  # last: its presence means the point is complete
        log_tensorboard(paths.dit, settings(cfg), step, metrics)
        print(f"demo follower: step {step}: sample accuracy {metrics['sample_accuracy']:.3f}, Fréchet distance "
              f"{metrics['frechet_distance']:.2f} ({elapsed:.1f} s) → {out / METRICS}", flush=True)  # fmt: skip


def follow_demo(cfg: DemoConfig) -> None:
    """The follower (every rank of its process group): each milestone export of the demo's DiT run, in order."""
    from eval import job as eval_job

    paths = Layout(Path(cfg.out))
    # A larger dit.steps resumes the run, whose training rewrites config.yaml when it starts: until then the
    # old last step would look like the end.
    while (plan := training_plan(paths.dit)) is None or plan.last < cfg.dit.steps:
        time.sleep(POLL_S)
    classifier = ClassifierPoints(cfg, paths)
    fid = fid_config(cfg, paths) if cfg.inception_weights else None

    def evaluate(step: int) -> Path:
        out = classifier(step)
        if fid is not None:
            fid_out = eval_job.run(replace(fid, step=step))
            if dist.get_rank() == 0:
                write_curve(paths.dit, settings_of(fid_out), training_plan(paths.dit))
        return out

    follow(fid or EvalConfig(run=RunConfig(name=RUN, root=str(paths.runs)), follow_poll_s=POLL_S), evaluate)


def read_curve(path: Path) -> list[dict[str, float | int | None]]:
    """The rows of a curve.csv: the step as an int, every other column a float or None (empty)."""
    with open(path, newline="") as f:
        return [
            {k: int(v) if k == "step" else float(v) if v else None for k, v in row.items()}
            for row in csv.DictReader(f)
        ]


def curve_summary(cfg: DemoConfig, paths: Layout) -> dict[str, dict]:
    """Copy each curve's PNG beside the sample grid; the summary's `curves`: name → plot, csv and points."""
    out = {}
    for (key, plot), name in zip(
        (("classifier", paths.curve), ("fid", paths.fid_curve)), curve_settings(cfg, paths)
    ):
        folder = paths.dit / "eval" / name
        shutil.copyfile(folder / CURVE_PNG, plot)
        out[key] = {"plot": str(plot), "csv": str(folder / CURVE_CSV), "settings": name,
                    "points": read_curve(folder / CURVE_CSV)}  # fmt: skip
    return out


def run_alone(cfg: DemoConfig, paths: Layout) -> None:
    """The follower alone, on a DiT run trained before: it ends once every milestone export is evaluated."""
    import subprocess

    from slurm.env import child_env, free_port

    missing = unexported(cfg, paths)
    if missing:  # the follower would wait for them
        raise FollowError(f"{paths.dit} is trained to step {cfg.dit.steps} but lacks the milestone exports of "
                          f"steps {missing}; use another out= (or remove {paths.dit})")  # fmt: skip
    cmd = command(paths)
    print("[demo]    $ " + " ".join(["python", *cmd[1:]]), flush=True)
    code = subprocess.run(cmd, env=child_env(0, 1, free_port())).returncode
    if code != 0:
        raise RuntimeError(f"the demo's eval follower failed (exit code {code}): {' '.join(cmd)}")


FID_HOW = (
    "FID skipped: it needs torch-fidelity's Inception weights; on an online machine run "
    "`python -m eval.inception inception.pth`, then `ldit demo inception_weights=inception.pth`"
)
"""The summary's line when `inception_weights` is not given."""


def fid_summary(cfg: DemoConfig, curves: dict[str, dict]) -> dict:
    """The summary's `fid`: the follower's `ldit eval` of the last milestone (the final export), and its curve."""
    if not cfg.inception_weights:
        return {"status": "skipped", "how": FID_HOW}
    curve = curves["fid"]
    last = Path(curve["csv"]).parent.parent / f"{step_name(cfg.dit.steps)}_{curve['settings']}" / METRICS
    metrics = json.loads(last.read_text())["metrics"]
    return {"status": "done", "file": str(last), "fid": metrics["fid"], "metrics": metrics, "curve": curve}


def main(argv: list[str] | None = None) -> int:
    """Run :func:`follow_demo` with the demo config file `argv[0]` (and key=value overrides) as a job."""
    from slurm.cli import run_here
    from slurm.jobs import Job

    args = sys.argv[1:] if argv is None else argv
    job = Job("demo follower", "the demo's eval follower", {"": DemoConfig}, "slurm.demo_follow:follow_demo")
    return run_here(job, job.load(args[:1], args[1:]))


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    os._exit(code)  # as slurm.cli.console: a finished gloo group can abort at interpreter shutdown
