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

from omegaconf import MISSING

from data_prep.config import ExtractLatentsConfig, PrepImagesConfig
from eval.config import EvalConfig, RefStatsConfig
from slurm.config import ConfigError, load_config, load_yaml_chain
from trainer.config import TRAIN_KINDS, ExportConfig


@dataclass
class SweepConfig:
    """A scaling study: one SLURM job per node count, same global batch and data order."""

    train: str = MISSING
    """Training config (YAML) every job of the sweep runs."""
    nodes: tuple[int, ...] = (1, 2, 4, 8)
    """Node counts, one job each."""
    steps: int = 200
    """Steps each job runs; the first 20% are excluded from the throughput figures as warm-up."""
    out: str = "runs/sweeps"
    """Folder of the sweep's runs and report."""


@dataclass
class DemoConfig:
    """The whole pipeline on the embedded digits dataset, with 2 local processes."""

    out: str = "runs/demo"
    """Folder for the demo's shard sets and runs."""
    processes: int = 2
    """Local processes each training job runs on (DeepSpeed ZeRO-2, gloo)."""
    vavae_steps: int = 600
    """VA-VAE training steps."""
    dit_steps: int = 1500
    """DiT training steps."""


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
            "eval.job:run",
        ),
        Job(
            "export",
            "EMA weights of a checkpoint, with the reference's key names",
            {"": ExportConfig},
            "trainer.export:run",
        ),
        Job(
            "sweep", "scaling study: one SLURM job per node count, and its report", {"": SweepConfig}, issue=8
        ),
        Job(
            "demo",
            "the whole pipeline on the embedded digits dataset, 2 local processes",
            {"": DemoConfig},
            issue=10,
        ),
    ]
}
