"""Configuration schemas of the data jobs: `ldit prep-images` and `ldit extract-latents`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from omegaconf import MISSING


@dataclass
class PrepImagesConfig:
    """An ImageNet-style folder → an image shard set (DESIGN.md "Data formats")."""

    src: str = MISSING
    """Folder with one sub-folder per class (WordNet id), as ILSVRC2012 train (or val after re-layout)."""
    out: str = MISSING
    """Folder the shard set (tar files + manifest.json) is written to."""
    shard_samples: int = 1250
    """Samples per shard. Keep shards ≥ 50 MB and several per DataLoader worker (ecosystem §1.4)."""
    seed: int = 0
    """Seed of the order samples are written in, across shards (no shard holds one class)."""
    extensions: tuple[str, ...] = (".jpeg", ".jpg", ".png")
    """File name endings taken as images (case-insensitive); other files are listed as skipped."""
    collective_timeout_s: float = 600.0
    """Seconds a collective may wait for a missing rank. Waits for other ranks' shards are not
    collectives: they fail only when no shard was finished for this long (data_prep/wait.py)."""


@dataclass
class ExtractLatentsConfig:
    """An image shard set + a VA-VAE export → a latent shard set (reference §5)."""

    images: str = MISSING
    """Image shard set to encode (a folder with manifest.json)."""
    vavae: str = MISSING
    """VA-VAE export folder (`<run>/export/step-N`, with ema.safetensors + config.yaml) or a .pt/.safetensors file."""
    out: str = MISSING
    """Folder the latent shard set is written to. A rerun skips shards that are complete and verified."""
    image_size: int = 256
    """Side of the ADM center crop fed to the encoder (reference §5: 256)."""
    dtype: Literal["fp16", "fp32"] = "fp16"
    """Stored dtype of `latent.npy` and `latent_flip.npy` (.npy cannot hold bf16)."""
    batch_size: int = 32
    """Images encoded at once per rank."""
    seed: int = 0
    """Seed of the posterior samples: each sample's noise comes from (seed, sample key), not the rank."""
    stats_samples: int = 10000
    """Latents (non-flipped, seeded subset) the per-channel mean and std are computed on (reference §5)."""
    collective_timeout_s: float = 600.0
    """Seconds a collective may wait for a missing rank. Waits for other ranks' shards are not
    collectives: they fail only when no shard was finished for this long (data_prep/wait.py)."""
