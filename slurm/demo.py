"""`ldit demo`: the whole pipeline on an embedded dataset, end to end, as a user runs it (issue #10).

The data are scikit-learn's handwritten digits, written as an ImageNet-style folder with a seeded,
stratified held-out split that no training stage sees (slurm/demo_digits.py). Then every stage runs as the
real job, `python -m slurm.cli <job> ...` on `processes` local ranks (the `--local N` path: torchrun-style
variables, gloo, DeepSpeed ZeRO-2):

    prep-images → train (VA-VAE) → extract-latents [→ prep-images, ref-stats of the held-out digits]
    → train (DiT), with the eval follower beside it → samples + quality check

Quality without downloaded weights (slurm/demo_digits.py): a classifier of the digits scores the DiT's
class-conditional samples and gives the Fréchet distance between samples and held-out digits in its
features. The DiT run exports its EMA at the milestones of `dit.export` (issue #16), and the demo's eval
follower (slurm/demo_follow.py) measures each export that way as it appears, in its own process beside
training, and keeps the curve (`curve.png` beside the sample grid; its points in the summary). The last
milestone is the final export, so the curve ends at the summary's figures. FID needs the Inception weights
(`inception_weights=<file>`): given them, the follower also runs `ldit eval`'s FID of each milestone
(`curve-fid.png`); without them the summary says how to get them.

Re-running: the folder `out` is the demo's identity. Each stage is skipped when its output is complete
(a shard set's manifest, a run's export at the requested step and every milestone evaluated), and a
training run that stopped midway resumes from its checkpoint (the trainer's default), so a rerun after an
interruption finishes the job, and a rerun with a larger `dit.steps` continues the DiT run to it. A rerun
with other settings that shape the earlier stages stops with an error naming them: use another `out=` (or
remove the folder).
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import torch.distributed as dist

from slurm import demo_follow
from slurm.config import ConfigError, to_yaml
from slurm.demo_digits import (
    KIND,
    Judge,
    Layout,
    accuracy,
    frechet,
    mirrored,
    one_thread,
    psnr,
    reconstruct,
    sample_digits,
    save_grid,
    write_digits,
)
from slurm.follow import training_plan
from slurm.jobs import DemoConfig
from trainer.checkpoint import step_name
from trainer.config import milestone_steps

STAMP = "demo.json"
"""File in `out` recording the settings the finished stages were made with."""
SUMMARY = "summary.json"
"""File in `out` holding the summary's fields (paths, times, figures)."""
IDENTITY_KEYS = ("heldout_fraction", "seed", "limit", "shard_samples", "vavae", "dit")
"""DemoConfig fields that shape the stages' outputs; `dit.steps` may grow (the DiT run resumes)."""


# ----------------------------------------------------------------------------------------------------------
# Orchestration


def _say(text: str) -> None:
    print(f"[demo] {text}", flush=True)


def check_stamp(cfg: DemoConfig, out: Path) -> None:
    """Refuse to reuse `out` for settings that shaped its finished stages differently; record them otherwise."""
    now = json.loads(json.dumps({k: asdict(cfg)[k] for k in IDENTITY_KEYS}))  # tuples as lists, as stored
    now["dit"].pop("steps")
    path = out / STAMP
    if path.is_file():
        before = json.loads(path.read_text())
        changed = sorted(k for k in IDENTITY_KEYS if before.get(k) != now[k])
        if changed:
            diff = ", ".join(f"{k}: {before.get(k)!r} → {now[k]!r}" for k in changed)
            raise ConfigError(
                f"{out} holds a demo made with other settings ({diff}); use another out= or remove {out}"
            )
    out.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(now, indent=1))


def training_configs(cfg: DemoConfig, paths: Layout) -> tuple[str, str]:
    """The two runs' configs with the demo's folders filled in, written as YAML for `ldit train`; and the
    demo's own config, which its eval follower reads (`configs/demo.yaml`)."""
    vavae = replace(
        cfg.vavae,
        run=replace(cfg.vavae.run, root=str(paths.runs)),
        data=replace(cfg.vavae.data, shards=str(paths.images)),
    )
    dit = replace(
        cfg.dit,
        run=replace(cfg.dit.run, root=str(paths.runs)),
        data=replace(cfg.dit.data, shards=str(paths.latents)),
        vavae=str(paths.vavae / "export" / step_name(cfg.vavae.steps)),
    )
    paths.configs.mkdir(parents=True, exist_ok=True)
    (paths.configs / "demo.yaml").write_text(to_yaml(cfg))
    files = []
    for name, run_cfg in (("vavae", vavae), ("dit", dit)):
        path = paths.configs / f"{name}.yaml"
        path.write_text(to_yaml(run_cfg))
        files.append(str(path))
    return files[0], files[1]


def export_steps(run_dir: Path) -> list[int]:
    """Steps of a run's export folders (`export/step-N`), ascending."""
    return sorted(
        int(p.name.removeprefix("step-")) for p in (run_dir / "export").glob("step-*") if p.is_dir()
    )


class Stages:
    """Runs the stages in order, each one the real `ldit` job on `processes` local ranks, and times them."""

    def __init__(self, processes: int) -> None:
        self.processes = processes
        self.times: dict[str, float] = {}
        self.skipped: list[str] = []

    def job(
        self, name: str, title: str, args: Sequence[str], done: bool, follower: Sequence[str] = ()
    ) -> None:
        """Stage `name`: `ldit <args> --local <processes>` (as `run_local` starts it), unless `done`; with
        `follower`, that command runs beside it as its own process, as `ldit train --follow-eval` runs one."""

        def launch() -> None:
            from slurm.cli import run_local
            from slurm.companions import run_with_follower

            cmd = [sys.executable, "-m", "slurm.cli", *args]
            _say("   $ ldit " + " ".join(args) + f" --local {self.processes}")
            if follower:
                _say("   beside it, the eval follower: $ " + " ".join(["python", *follower[1:]]))
                code = run_with_follower(lambda: run_local(cmd, self.processes), follower)
            else:
                code = run_local(cmd, self.processes)
            if code != 0:
                raise RuntimeError(f"demo stage {name} failed (exit code {code}): ldit {' '.join(args)}")

        self.call(name, title, launch, done)

    def call(self, name: str, title: str, fn: Callable[[], object], done: bool = False) -> object:
        """Stage `name`: fn() in this process, unless `done`; returns what fn returns (None if skipped)."""
        number = len(self.times) + 1
        if done:
            _say(f"{number}. {title}: finished before, skipped")
            self.skipped.append(name)
            self.times[name] = 0.0
            return None
        _say(f"{number}. {title}")
        start = time.perf_counter()
        result = fn()
        self.times[name] = time.perf_counter() - start
        _say(f"   {name}: {self.times[name]:.0f} s")
        return result


def run(cfg: DemoConfig) -> dict:
    """The demo, from the digits to the summary; returns the summary's fields (also in `out`/summary.json)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        raise ConfigError(
            f"ldit demo starts {cfg.processes} processes for each stage itself; run it without --local or --slurm"
        )
    start = time.perf_counter()
    # As torchrun does: the cores are shared out between the local processes instead of oversubscribed.
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // cfg.processes)))
    paths = Layout(Path(cfg.out))
    check_stamp(cfg, paths.out)
    stages = Stages(cfg.processes)
    vavae_yaml, dit_yaml = training_configs(cfg, paths)
    size = cfg.vavae.image_size
    _say(
        f"the whole pipeline on scikit-learn's digits in {paths.out}, {cfg.processes} local processes per job"
    )

    stages.call(
        "digits", "write the digits as an ImageNet-style folder (train / held-out)",
        lambda: write_digits(paths.digits, size, cfg.heldout_fraction, cfg.seed, cfg.limit),
        (paths.digits / "split.json").is_file(),
    )  # fmt: skip
    stages.job(
        "prep-images", "prep-images: training digits → image shards",
        ["prep-images", f"src={paths.digits / 'train'}", f"out={paths.images}", f"shard_samples={cfg.shard_samples}"],
        (paths.images / "manifest.json").is_file(),
    )  # fmt: skip
    vavae_export = paths.vavae / "export" / step_name(cfg.vavae.steps)
    stages.job(
        "train-vavae", f"train the VA-VAE ({cfg.vavae.steps} steps, DeepSpeed ZeRO-2)", ["train", vavae_yaml],
        vavae_export.is_dir(),
    )  # fmt: skip
    stages.job(
        "extract-latents", "extract-latents: training digits → VA-VAE latents",
        ["extract-latents", f"images={paths.images}", f"vavae={vavae_export}", f"out={paths.latents}",
         f"image_size={size}", f"batch_size={cfg.shard_samples}"],
        (paths.latents / "manifest.json").is_file(),
    )  # fmt: skip
    trained = export_steps(paths.dit)
    if trained and trained[-1] > cfg.dit.steps:
        raise ConfigError(
            f"{paths.dit} is trained to step {trained[-1]} > dit.steps={cfg.dit.steps}; "
            f"use dit.steps={trained[-1]} or more, or another out="
        )
    if cfg.inception_weights:  # before the DiT: its follower measures FID against the held-out digits
        prepare_fid(cfg, paths, stages)
    dit_export = paths.dit / "export" / step_name(cfg.dit.steps)
    plan = training_plan(paths.dit)
    trained_before = dit_export.is_dir() and plan is not None and plan.last == cfg.dit.steps
    milestones = ", ".join(map(str, milestone_steps(cfg.dit.export, cfg.dit.steps)))
    if not trained_before:
        stages.job(
            "train-dit", f"train the LightningDiT ({cfg.dit.steps} steps, DeepSpeed ZeRO-2); its milestone "
            f"exports (steps {milestones}) evaluated beside it", ["train", dit_yaml], False,
            follower=demo_follow.command(paths),
        )  # fmt: skip
    else:  # trained before: evaluate the milestones a stopped follower or a new curve (FID) still lacks
        stages.call(
            "train-dit", f"train the LightningDiT ({cfg.dit.steps} steps): trained before; the milestone "
            f"exports (steps {milestones}) not yet evaluated", lambda: demo_follow.run_alone(cfg, paths),
            demo_follow.evaluated(cfg, paths),
        )  # fmt: skip
    curves = demo_follow.curve_summary(cfg, paths)
    quality = stages.call(
        "quality", "samples, reconstructions and the classifier check",
        lambda: check_quality(cfg, paths, vavae_export, dit_export),
    )  # fmt: skip
    summary = {
        "out": str(paths.out),
        "wall_time_s": round(time.perf_counter() - start, 1),
        "stage_times_s": {k: round(v, 1) for k, v in stages.times.items()},
        "skipped_stages": stages.skipped,
        "processes": cfg.processes,
        "runs": {"vavae": str(paths.vavae), "dit": str(paths.dit)},
        "tensorboard": str(paths.runs),
        "exports": {"vavae": str(vavae_export), "dit": str(dit_export)},
        "shards": {"images": str(paths.images), "latents": str(paths.latents)},
        "sample_grid": str(paths.sample_grid),
        "reconstruction_grid": str(paths.reconstruction_grid),
        "curve": curves["classifier"],
        "losses_off": LOSSES_OFF,
        **quality,
        "fid": demo_follow.fid_summary(cfg, curves),
        "config": json.loads(json.dumps(asdict(cfg))),
    }
    (paths.out / SUMMARY).write_text(json.dumps(summary, indent=1))
    print(format_summary(summary), flush=True)
    return summary


LOSSES_OFF = (
    "the VA-VAE trained without LPIPS and the VF loss (their VGG16 and DINOv2 weights cannot be downloaded "
    "offline): turn them on with vavae.loss.perceptual_weight=1.0 vavae.loss.vgg16_weights=<file> and "
    'vavae.loss.use_vf=true vavae.loss.foundation_weights=<file> (README: "Weights the project cannot ship")'
)
"""The summary's line about the pretrained-weight losses the demo leaves off."""


def check_quality(cfg: DemoConfig, paths: Layout, vavae_export: Path, dit_export: Path) -> dict:
    """Classifier, reconstructions, samples, the two grids and the figures of the summary."""
    with one_thread():  # the figures of the eval follower's process (slurm/demo_digits.py)
        return _check_quality(cfg, paths, vavae_export, dit_export)


def _check_quality(cfg: DemoConfig, paths: Layout, vavae_export: Path, dit_export: Path) -> dict:
    judge = Judge.of(paths.digits, cfg.seed)
    (train_x, _), (held_x, held_y) = judge.train, judge.heldout
    held_acc, _ = accuracy(judge.clf.predict(held_x), held_y)
    held_mirror_acc, _ = accuracy(judge.clf.predict(mirrored(held_x)), held_y)
    _say(f"   classifier: held-out accuracy {held_acc:.3f} ({held_mirror_acc:.3f} on their mirror images)")

    recon = reconstruct(vavae_export, held_x)
    recon_acc, _ = accuracy(judge.clf.predict(recon), held_y)
    first = np.concatenate([np.flatnonzero(held_y == c)[:2] for c in range(10)])  # 2 per class
    save_grid([held_x[first], recon[first]], paths.reconstruction_grid, scale=2)

    samples, labels = sample_digits(
        dit_export, vavae_export, paths.latents, cfg.samples_per_class, cfg.cfg_scale, cfg.sample_points,
        cfg.sample_shift, cfg.seed,
    )  # fmt: skip
    figures = judge.samples(samples, labels)  # what the follower measured at the last milestone
    columns = min(cfg.samples_per_class, 10)
    save_grid([samples[labels == c][:columns] for c in range(10)], paths.sample_grid, scale=2)

    # The Fréchet distance's floor at the samples' count: real training digits, each mirrored with
    # probability 1/2, against the same held-out digits and their mirrors (the samples face either way).
    rng = np.random.default_rng(cfg.seed)
    pick = rng.choice(len(train_x), size=min(len(samples), len(train_x)), replace=False)
    flip = rng.random(len(pick)) < 0.5
    real = np.where(flip[:, None, None, None], mirrored(train_x[pick]), train_x[pick])
    floor = frechet(judge.clf.features(real), judge.heldout_features)
    return {
        "classifier": {
            "kind": KIND,
            "heldout_accuracy": round(held_acc, 4),
            "heldout_mirrored_accuracy": round(held_mirror_acc, 4),
        },
        "vavae": {
            "heldout_psnr_db": round(psnr(held_x, recon), 2),
            "heldout_reconstruction_accuracy": round(recon_acc, 4),
        },
        "dit": {
            "samples": len(samples),
            "sampler": f"Euler, {cfg.sample_points} points, shift {cfg.sample_shift}, CFG {cfg.cfg_scale} (all channels)",
            "sample_accuracy": round(figures["sample_accuracy"], 4),
            "sample_accuracy_per_class": [round(a, 4) for a in figures["sample_accuracy_per_class"]],
            "frechet_distance_samples_vs_heldout": round(figures["frechet_distance"], 3),
            "frechet_distance_train_vs_heldout": round(floor, 3),
        },
    }


def prepare_fid(cfg: DemoConfig, paths: Layout, stages: Stages) -> None:
    """`ldit prep-images` and `ldit ref-stats` of the held-out digits: the reference of the follower's FID."""
    if not Path(cfg.inception_weights).is_file():
        raise ConfigError(f"inception_weights={cfg.inception_weights} does not exist. {demo_follow.FID_HOW}")
    stages.job(
        "prep-heldout", "prep-images: held-out digits → image shards",
        ["prep-images", f"src={paths.digits / 'heldout'}", f"out={paths.heldout_images}",
         f"shard_samples={cfg.shard_samples}"],
        (paths.heldout_images / "manifest.json").is_file(),
    )  # fmt: skip
    stages.job(
        "ref-stats", "ref-stats: FID statistics of the held-out digits",
        ["ref-stats", f"images={paths.heldout_images}", f"out={paths.reference}",
         f"image_size={cfg.vavae.image_size}", f"inception_weights={cfg.inception_weights}"],
        paths.reference.is_file(),
    )  # fmt: skip


def format_summary(s: dict) -> str:
    """The lines `ldit demo` ends with."""
    minutes, seconds = divmod(round(s["wall_time_s"]), 60)
    c, v, d = s["classifier"], s["vavae"], s["dit"]
    per_class = "  ".join(f"{k}: {a:.2f}" for k, a in enumerate(d["sample_accuracy_per_class"]))
    steps = ", ".join(str(p["step"]) for p in s["curve"]["points"])
    fid = s["fid"]
    if fid["status"] == "skipped":
        fid_line = fid["how"]
    else:
        m = fid["metrics"]
        fid_line = (
            f"FID:                 {m['fid']:.2f} vs held-out digits (sFID {m['sfid']:.2f}, IS {m['inception_score']:.2f}, "
            f"precision {m['precision']:.2f}, recall {m['recall']:.2f}): {fid['file']}\n"
            f"FID curve:           {fid['curve']['plot']}  (the points: {fid['curve']['csv']})"
        )
    lines = [
        "",
        f"=== ldit demo finished in {minutes} min {seconds:02d} s "
        f"({s['processes']} local processes per job, DeepSpeed ZeRO-2) ===",
        "stages: "
        + ", ".join(f"{k} {t:.0f} s" for k, t in s["stage_times_s"].items())
        + (f" (skipped, finished before: {', '.join(s['skipped_stages'])})" if s["skipped_stages"] else ""),
        f"runs:                {s['runs']['vavae']}  {s['runs']['dit']}",
        f"TensorBoard:         tensorboard --logdir {s['tensorboard']}",
        f"sample grid:         {s['sample_grid']}  (one row per class 0-9; {d['sampler']})",
        f"reconstruction grid: {s['reconstruction_grid']}  (held-out digits above their VA-VAE reconstructions)",
        f"milestone curve:     {s['curve']['plot']}  (sample accuracy and Fréchet distance of the exports at "
        f"steps {steps}; the points: {s['curve']['csv']})",
        f"losses off:          {s['losses_off']}",
        f"classifier:          held-out accuracy {c['heldout_accuracy']:.3f}  ({c['kind']})",
        f"VA-VAE:              held-out PSNR {v['heldout_psnr_db']:.1f} dB; classifier accuracy on its "
        f"reconstructions {v['heldout_reconstruction_accuracy']:.3f}",
        f"DiT samples:         classifier accuracy {d['sample_accuracy']:.3f} on {d['samples']} samples "
        "(target >= 0.8)",
        f"  per class:         {per_class}",
        f"Fréchet distance:    {d['frechet_distance_samples_vs_heldout']:.2f} samples vs held-out, in the "
        f"classifier's features (real training digits vs held-out: {d['frechet_distance_train_vs_heldout']:.2f})",
        fid_line,
        f"summary:             {Path(s['out']) / SUMMARY}",
    ]
    return "\n".join(lines)
