"""The jobs `ldit` runs: name, configuration schema and entry point of each (DESIGN.md "The pipeline").

A job is a function run on every rank, given one typed config. Entry points are named as
"module:function" and imported only when the job runs, so `ldit --help` stays fast.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from data_prep.config import ExtractLatentsConfig, PrepImagesConfig
from eval.config import EvalConfig, RefStatsConfig
from slurm.config import ConfigError, load_config, load_yaml_chain
from slurm.status import StatusConfig
from trainer.config import (
    TRAIN_KINDS,
    CheckpointConfig,
    DiTModelConfig,
    ExportConfig,
    LogConfig,
    MilestoneExportConfig,
    OptimConfig,
    RunConfig,
    StreamConfig,
    TrainDiTConfig,
    TrainVAVAEConfig,
    VAVAELossConfig,
)


@dataclass
class SweepConfig:
    """A scaling study: one training job per node count and scaling mode (slurm/sweep.py): strong (the
    config's global batch at every node count) and weak (its per-device batch at every node count)."""

    train: str = ""
    """Training config (YAML) every job of the sweep runs (the positional argument of `ldit sweep`)."""
    nodes: tuple[int, ...] = (1, 2, 4, 8)
    """Node counts, one job each (`--nodes 1,2,4,8`)."""
    steps: int = 200
    """Steps each job runs (`--steps`); the first 20% are left out of the figures as warm-up."""
    out: str = "runs/sweeps"
    """Folder of the sweeps: the runs are <out>/<train run.name>/<strong|weak>/nodes-<n>."""
    cluster: tuple[str, ...] = ()
    """Cluster files (`--slurm --cluster FILE`): one SLURM job per node count. Empty: run on this machine."""
    local_tasks_per_node: int = 1
    """Without a cluster: processes per "node" (a node count n runs n times this many local processes)."""
    wait: bool = True
    """With a cluster: wait for the jobs and write the report; False: print the report command and return."""
    one_at_a_time: bool = True
    """With a cluster: each job waits for the one before it to succeed (afterok), so that no two share the
    network (or, on a test cluster whose nodes are one host, the cores) and distort each other's figures."""
    report: str = ""
    """Only write the report of this sweep folder (`--report DIR`)."""
    scaling: tuple[str, ...] = ("strong",)
    """`strong`: the config's global batch at every node count; `weak`: the per-device batch (and streams
    per rank) of the smallest node count at every node count (`--scaling strong,weak`)."""
    figures: tuple[str, ...] = ()
    """Cluster file(s) whose `ldit plan` figures predict each run in the report (default: the sweep's
    --cluster files; a local sweep predicts only with this, e.g. figures=[configs/cluster/local.yaml])."""
    train_overrides: tuple[str, ...] = ()
    """Overrides of the training config, applied to every job (`ldit sweep CFG.yaml data.shards=… optim.lr=…`:
    every `key=value` that is not a sweep key lands here)."""

    def validate(self) -> None:
        if not self.report and not self.train:
            raise ValueError(
                "ldit sweep needs a training config (ldit sweep CONFIG.yaml --nodes …) or --report DIR"
            )
        if not self.report and (not self.nodes or min(self.nodes) < 1):
            raise ValueError(f"nodes={list(self.nodes)} must be positive node counts")
        if not self.scaling or set(self.scaling) - {"strong", "weak"}:
            raise ValueError(
                f"scaling={list(self.scaling)} must name strong, weak or both (--scaling strong,weak)"
            )


def demo_vavae() -> TrainVAVAEConfig:
    """The demo's VA-VAE run: the `digits` autoencoder (f8, 4 latent channels) on 32 px digits, fp32.

    LPIPS and the VF loss are off: their VGG16 and DINOv2 weights cannot be downloaded offline (turn them on
    with vavae.loss.perceptual_weight=1.0 vavae.loss.vgg16_weights=FILE, vavae.loss.use_vf=true
    vavae.loss.foundation_weights=FILE). The GAN term starts after the run: in 300 steps it only adds noise.
    """
    return TrainVAVAEConfig(
        run=RunConfig(name="vavae", root=""),
        data=StreamConfig(shards="", global_batch=32, streams=8, workers=0),
        optim=OptimConfig(lr=5e-4, betas=(0.5, 0.9), warmup_steps=20),
        ckpt=CheckpointConfig(every=100, keep_last=1),
        log=LogConfig(every=25, sample_every=100),
        steps=300,
        precision="fp32",
        model="digits",
        image_size=32,
        loss=VAVAELossConfig(perceptual_weight=0.0, use_vf=False, disc_start=100000),
    )


def demo_dit() -> TrainDiTConfig:
    """The demo's LightningDiT run on the digits' 4x4x4 latents, fp32; EMA decay 0.995 so that a run of a few
    thousand steps forgets its start (0.9999 would still hold most of its initial weights). Its EMA is
    exported every 1,000 steps, and the demo's eval follower measures each export (slurm/demo_follow.py)."""
    return TrainDiTConfig(
        run=RunConfig(name="dit", root=""),
        data=StreamConfig(shards="", global_batch=128, streams=8, workers=0),
        optim=OptimConfig(lr=1e-3, betas=(0.9, 0.95), warmup_steps=50),
        ckpt=CheckpointConfig(every=500, keep_last=1),
        log=LogConfig(every=100, sample_every=500),
        export=MilestoneExportConfig(every=1000),
        steps=4000,
        precision="fp32",
        model=DiTModelConfig(size="T/1"),
        ema_decay=0.995,
        label_dropout=0.1,
    )


@dataclass
class DemoConfig:
    """The whole pipeline on the embedded digits dataset, each job on local processes (slurm/demo.py, issue #10).

    `vavae` and `dit` are the two training runs, typed as `ldit train` configs; the demo sets their
    run.root, data.shards and the DiT's `vavae` from `out`. A rerun skips finished stages and resumes
    unfinished runs; a larger `dit.steps` continues the DiT run.
    """

    out: str = "runs/demo"
    """Folder of everything the demo writes: digits, shard sets, runs, grids, summary.json."""
    processes: int = 2
    """Local processes each job runs on (DeepSpeed ZeRO-2 over gloo on CPU)."""
    heldout_fraction: float = 0.2
    """Fraction of the 1,797 digits held out of training (stratified by class), for the quality check."""
    seed: int = 0
    """Seed of the held-out split, the classifier and the sampling noise."""
    limit: int = 0
    """Use only this many of the digits (a seeded, class-stratified subset), for quick tests; 0: all 1,797."""
    shard_samples: int = 96
    """Images per shard (15 training shards: at least the runs' data.streams)."""
    vavae: TrainVAVAEConfig = field(default_factory=demo_vavae)
    """The VA-VAE run; its image_size is the side of the digits' PNGs (bicubic from 8x8, at least 32 for the PatchGAN)."""
    dit: TrainDiTConfig = field(default_factory=demo_dit)
    """The DiT run."""
    samples_per_class: int = 50
    """DiT samples per class the classifier scores (the grid shows the first 10 of each class)."""
    cfg_scale: float = 3.0
    """Classifier-free guidance scale of the samples, on all latent channels (1: no guidance)."""
    sample_points: int = 33
    """Time points of the Euler grid (33 points = 32 steps)."""
    sample_shift: float = 1.0
    """Timestep shift of the sampling grid (1: uniform; the reference uses 0.3 at 250 points)."""
    inception_weights: str = ""
    """torch-fidelity Inception weights file (`python -m eval.inception FILE`); given, the demo also runs
    ref-stats and `ldit eval` for FID. Empty: FID is skipped."""
    fid_samples: int = 1000
    """Samples of the FID evaluation (when inception_weights is given)."""

    def validate(self) -> None:
        """Rules that fail before anything runs."""
        if self.processes < 1:
            raise ValueError(f"processes={self.processes} must be at least 1")
        if not 0.0 < self.heldout_fraction < 1.0:
            raise ValueError(f"heldout_fraction={self.heldout_fraction} must be between 0 and 1")
        if self.limit and self.limit < 50:
            raise ValueError(
                f"limit={self.limit} leaves too few digits per class; use 0 (all) or at least 50"
            )
        size = self.vavae.image_size
        if size < 32 or size % 8:
            raise ValueError(
                f"vavae.image_size={size} must be a multiple of 8 and at least 32 (the PatchGAN's least)"
            )
        if min(self.samples_per_class, self.shard_samples, self.sample_points - 1) < 1:
            raise ValueError("samples_per_class and shard_samples must be positive, sample_points at least 2")
        for name, run in (("vavae", self.vavae), ("dit", self.dit)):
            if run.run.root or run.data.shards:
                raise ValueError(
                    f"{name}.run.root and {name}.data.shards are set by the demo from out=; leave them out"
                )
        if self.dit.vavae:
            raise ValueError("dit.vavae is set by the demo (the VA-VAE it trains); leave it out")
        self.vavae.validate()
        self.dit.validate()


@dataclass(frozen=True)
class Job:
    name: str
    summary: str
    schemas: dict[str, type] = field(default_factory=dict)
    """Config schema per `kind` (a single entry under "" for jobs with one schema)."""
    entry: str | None = None
    """"module:function" run on every rank with the config; None while the job is not built yet."""
    issue: int = 0
    """The issue that builds the job (named in the "not built yet" message)."""
    positional: str | None = None
    """Config key that a bare command-line argument sets (`ldit status runs/x` → run_dir=runs/x)."""

    def schema(self, files: Sequence[str], overrides: Sequence[str]) -> type:
        """The schema a config selects with its `kind` key (only `train` has several)."""
        if "" in self.schemas:
            return self.schemas[""]
        kind = _peek_kind(files, overrides)
        if kind is None:
            raise ConfigError(
                f"{self.name} needs `kind` (one of {', '.join(self.schemas)}) in its config file or as kind=..."
            )
        if kind not in self.schemas:
            raise ConfigError(f"kind '{kind}' is not one of {', '.join(self.schemas)}")
        return self.schemas[kind]

    def load(self, files: Sequence[str], overrides: Sequence[str]) -> Any:
        return load_config(self.schema(files, overrides), files, overrides)

    def function(self) -> Callable[[Any], Any]:
        assert self.entry is not None
        module, _, name = self.entry.partition(":")
        return getattr(importlib.import_module(module), name)


def _peek_kind(files: Sequence[str], overrides: Sequence[str]) -> str | None:
    """The last `kind` set by the files (with their bases) or the command line."""
    kind = None
    for f in files:
        for _, part in load_yaml_chain(Path(f)):
            kind = part.get("kind", kind)
    for item in overrides:
        key, _, value = item.partition("=")
        if key == "kind":
            kind = value
    return kind


JOBS: dict[str, Job] = {
    job.name: job
    for job in [
        Job(
            "prep-images",
            "ImageNet-style folder → image shard set",
            {"": PrepImagesConfig},
            "data_prep.prep_images:run",
        ),
        Job(
            "extract-latents",
            "image shard set + VA-VAE → latent shard set",
            {"": ExtractLatentsConfig},
            "data_prep.extract_latents:run",
        ),
        Job(
            "ref-stats",
            "image shard set → FID reference statistics (.npz)",
            {"": RefStatsConfig},
            "eval.ref_stats:run",
        ),
        Job(
            "train",
            "train a LightningDiT (kind=dit) or a VA-VAE (kind=vavae)",
            dict(TRAIN_KINDS),
            "trainer.train:run",
        ),
        Job(
            "eval",
            "sample + FID of a DiT run, or reconstruction metrics of a VA-VAE run",
            {"": EvalConfig},
            "slurm.follow:run",
        ),
        Job(
            "export",
            "EMA weights of a checkpoint, with the reference's key names",
            {"": ExportConfig},
            "trainer.export:run",
        ),
        Job(
            "sweep",
            "scaling study, strong and weak: one job per node count, and its report against `ldit plan`",
            {"": SweepConfig},
            "slurm.sweep:run",
        ),
        Job(
            "status",
            "a run's checkpoints, last step, exports, evals and SLURM jobs",
            {"": StatusConfig},
            "slurm.status:run",
            positional="run_dir",
        ),
        Job(
            "demo",
            "the whole pipeline on the embedded digits dataset, 2 local processes",
            {"": DemoConfig},
            "slurm.demo:run",
        ),
    ]
}
