"""Configuration schemas of `ldit eval` and `ldit ref-stats` (DESIGN.md "Evaluation")."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from omegaconf import MISSING

from trainer.config import RunConfig


@dataclass
class SamplerConfig:
    """ODE sampling (reference §4.1); defaults reproduce the 64-epoch FID 2.11 setting."""

    method: Literal["euler", "heun", "dopri5"] = "euler"
    """ODE solver (reference §4.1: Euler for the published FIDs; dopri5 for its ablations)."""
    points: int = 250
    """Time points of the grid (250 points = 249 Euler steps, reference §4.1); unused by dopri5."""
    shift: float = 0.3
    """Timestep shift s: t ↦ s·t/(1+(s−1)·t) (reference §4.1: 0.3); unused by dopri5."""
    cfg_scale: float = 10.0
    """Classifier-free guidance scale (reference: 10.0 at 64 epochs, 6.7 at 800); ≤ 1 turns CFG off."""
    cfg_interval_start: float = 0.10
    """No guidance for t below this (reference: 0.10 at 64 epochs, 0.125 at 800); 0 guides everywhere."""
    cfg_channels: Literal["first3", "all"] = "first3"
    """Guide the first 3 latent channels (the reference's behaviour, needed to reproduce its FID) or all."""


@dataclass
class EvalConfig:
    """Sample from a DiT run and measure FID, sFID, IS, precision and recall; or reconstruction metrics of a VA-VAE run.

    The export (`<run>/export/step-N`, or `latest`) says which: a LightningDiT export is sampled, a VA-VAE export
    reconstructs `images`. Results go to `<run>/eval/<name>/metrics.json`, `<name>` spelling out what was measured;
    a finished evaluation is not redone.
    """

    run: RunConfig = field(default_factory=RunConfig)
    step: int = -1
    """Export step to evaluate; -1 means the latest (`export/latest`)."""
    num_samples: int = 50000
    """Samples to generate (reference: 50k). VA-VAE runs: images of `images` to reconstruct, in stored order (0: all)."""
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    labels: Literal["uniform", "balanced"] = "uniform"
    """Class labels: uniform random as the reference (§4.1), or balanced (sample i gets class i mod classes)."""
    seed: int = 0
    """Seed; each sample's noise and label derive from (seed, global index), so results don't depend on the world size."""
    batch_size: int = 32
    """Samples per batch. Batches have a fixed composition (samples [k·B, (k+1)·B)) and are dealt round-robin to
    ranks, so every image and feature is the same at any world size. VA-VAE runs: images per batch within a shard."""
    reference: str = ""
    """FID reference (DiT runs): an ADM reference batch .npz (VIRTUAL_imagenet256_labeled.npz) or one written by
    ref-stats. Precision/recall use its `pool` features, else the pool features of its images `arr_0`."""
    vavae: str = ""
    """VA-VAE to decode with (DiT runs): an export folder or checkpoint file. Empty: the run's `vavae`, else the
    VA-VAE recorded in the latent shard set's manifest (the one that encoded the training latents)."""
    latents: str = ""
    """Latent shard set whose manifest holds the mean/std the DiT was trained with (empty: the run's `data.shards`)."""
    inception_weights: str = ""
    """Local file of torch-fidelity's inception-v3-compat weights, for offline machines (empty: torch-fidelity's
    download or its torch-hub cache)."""
    is_splits: int = 10
    """Inception Score splits (reference suites: 10)."""
    is_shuffle: bool = False
    """Shuffle before splitting the Inception Score (torch-fidelity, seed 2020); False keeps the sample order, as
    the ADM suite the papers report with."""
    save_npz: bool = False
    """Also write the samples as an ADM-format `samples.npz` (arr_0, uint8 NHWC) for the ADM evaluator."""
    grid: int = 64
    """Write the first this many samples as `grid.png`, 8 per row (0: no grid)."""
    tensorboard: bool = True
    """Also log the metrics as `eval/<settings>/<metric>` scalars at the export's step in `<run>/tb`."""
    images: str = ""
    """VA-VAE runs: the held-out image shard set to reconstruct (ADM center crop of `image_size`)."""
    image_size: int = 256
    """VA-VAE runs: side of the ADM center crop (reference: 256)."""
    vgg16_weights: str = ""
    """VA-VAE runs: local LPIPS VGG16 trunk file (empty: the run's `loss.vgg16_weights`, else torchvision's download)."""
    lpips_weights: str = ""
    """VA-VAE runs: local LPIPS v0.1 heads file (empty: the run's `loss.lpips_weights`, else the `lpips` package's)."""
    collective_timeout_s: float = 1800.0
    """Seconds a collective may wait for another rank (rank 0 computes the metrics while the others wait)."""
    follow: bool = False
    """Follow the run (`ldit eval … --follow`): wait for each milestone export its training config names
    (`export.every`, `export.at` and the last step), evaluate each one not yet evaluated (`step` is ignored),
    keep `eval/<settings>/curve.csv|png` up to date, and end after the last step's export (slurm/follow.py)."""
    follow_poll_s: float = 30.0
    """Follow: seconds between looks for new exports."""
    follow_until: int = 0
    """Follow: end only once the export of at least this step is evaluated. `ldit train --follow-eval` sets the
    training's `steps`: a follower that starts before a run extended to more steps has rewritten its config.yaml
    must not end at the old last step. 0: the run's config.yaml alone says."""
    follow_settle_s: float = 60.0
    """Follow: how long SLURM must report the run's training jobs ended, with the next export still missing,
    before the follower fails (a shared filesystem may show the last export some seconds after the job ends)."""
    follow_timeout_s: float = 0.0
    """Follow: give up after this many seconds without a new export while it cannot tell that training is still
    running (no SLURM job of the run is pending or running); 0: wait as long as training may still export."""

    def validate(self) -> None:
        """Rules that need neither the export nor the world size (those are checked when the job starts)."""
        if (
            self.follow_poll_s <= 0
            or self.follow_timeout_s < 0
            or self.follow_settle_s < 0
            or self.follow_until < 0
        ):
            raise ValueError(
                f"follow_poll_s={self.follow_poll_s} must be positive; follow_timeout_s={self.follow_timeout_s}, "
                f"follow_settle_s={self.follow_settle_s} and follow_until={self.follow_until} >= 0"
            )
        if self.batch_size <= 0:
            raise ValueError(f"batch_size={self.batch_size} must be positive")
        if self.num_samples < 0:
            raise ValueError(
                f"num_samples={self.num_samples} must be >= 0 (0: every image, VA-VAE runs only)"
            )
        if self.is_splits <= 0 or self.grid < 0:
            raise ValueError(f"is_splits={self.is_splits} must be positive and grid={self.grid} >= 0")
        if self.sampler.points < 2 or self.sampler.shift <= 0:
            raise ValueError(
                f"sampler.points={self.sampler.points} must be >= 2 and sampler.shift={self.sampler.shift} > 0"
            )


@dataclass
class RefStatsConfig:
    """FID reference statistics of an image shard set (ADM center crop), in the ADM .npz format."""

    images: str = MISSING
    """Image shard set."""
    out: str = MISSING
    """Output .npz: mu, sigma, mu_s, sigma_s over all images, and `pool` features of a subset for precision/recall."""
    image_size: int = 256
    """Side of the ADM center crop."""
    batch_size: int = 64
    """Images per batch; batches are fixed slices of a shard and shards are dealt round-robin to ranks."""
    pool_samples: int = 10000
    """Images (a seeded subset) whose pool features are kept for precision/recall (ADM reference batch: 10,000)."""
    save_images: bool = False
    """Also store that subset's images as `arr_0` (uint8 NHWC), as in an ADM reference batch."""
    seed: int = 0
    """Seed of the subset."""
    inception_weights: str = ""
    """Local file of torch-fidelity's inception-v3-compat weights, for offline machines."""
    collective_timeout_s: float = 1800.0
    """Seconds a collective may wait for another rank."""

    def validate(self) -> None:
        if self.batch_size <= 0 or self.image_size <= 0 or self.pool_samples < 0:
            raise ValueError(
                f"batch_size={self.batch_size} and image_size={self.image_size} must be positive, "
                f"pool_samples={self.pool_samples} >= 0"
            )
