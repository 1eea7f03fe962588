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
    """Time points of the grid (250 points = 249 Euler steps, reference §4.1)."""
    shift: float = 0.3
    """Timestep shift s: t ↦ s·t/(1+(s−1)·t) (reference §4.1: 0.3)."""
    cfg_scale: float = 10.0
    """Classifier-free guidance scale (reference: 10.0 at 64 epochs, 6.7 at 800); ≤ 1 turns CFG off."""
    cfg_interval_start: float = 0.10
    """No guidance for t below this (reference: 0.10 at 64 epochs, 0.125 at 800)."""
    cfg_channels: Literal["first3", "all"] = "first3"
    """Guide the first 3 latent channels (the reference's behaviour, needed to reproduce its FID) or all."""


@dataclass
class EvalConfig:
    """Sample from a DiT run and measure FID, sFID, IS, precision and recall; or reconstruction metrics of a VA-VAE run."""

    run: RunConfig = field(default_factory=RunConfig)
    step: int = -1
    """Export step to evaluate; -1 means the latest."""
    num_samples: int = 50000
    """Samples to generate (reference: 50k)."""
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    labels: Literal["uniform", "balanced"] = "uniform"
    """Class labels: uniform random as the reference, or exactly balanced."""
    seed: int = 0
    """Seed; each sample's noise and label derive from (seed, global index), so results don't depend on the world size."""
    batch_size: int = 32
    """Samples per rank per batch."""
    reference: str = MISSING
    """FID reference: an ADM reference batch .npz (VIRTUAL_imagenet256_labeled.npz) or one written by ref-stats."""
    vavae: str = ""
    """VA-VAE export to decode with (empty: the one recorded in the latent manifest)."""
    inception_weights: str = ""
    """Local file of torch-fidelity's inception-v3-compat weights, for offline machines."""
    save_npz: bool = False
    """Also write the samples as an ADM-format .npz (arr_0, uint8) for the ADM evaluator."""


@dataclass
class RefStatsConfig:
    """FID reference statistics of an image shard set (ADM center crop), in the ADM .npz format."""

    images: str = MISSING
    """Image shard set."""
    out: str = MISSING
    """Output .npz (mu, sigma, and activations for precision/recall)."""
    image_size: int = 256
    """Side of the ADM center crop."""
    batch_size: int = 64
    """Images per rank per batch."""
    inception_weights: str = ""
    """Local file of torch-fidelity's inception-v3-compat weights, for offline machines."""
