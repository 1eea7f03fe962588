"""`ldit ref-stats`: an image shard set → FID reference statistics in the ADM reference-batch `.npz` layout.

What guided-diffusion's ``VIRTUAL_imagenet256_labeled.npz`` holds (ecosystem §4.2, ``eval/metrics.py``):
``mu``/``sigma`` of the Inception pool features and ``mu_s``/``sigma_s`` of the sFID spatial features over
every image of the set, plus, for precision/recall, a subset of images: here the ``pool`` features of a
seeded subset of ``pool_samples`` images (our key, which ``ldit eval`` uses directly) and with
``save_images=true`` those images as ``arr_0`` (uint8 NHWC), so the ADM evaluator can read the file too.
Images are ADM-center-cropped (``data_prep.images.center_crop_adm``, reference §5) to uint8, exactly what the
sampled images are compared as.

Distributed and world-size independent as ``eval/job.py``: a shard is one item (fixed batches of its own
samples), shards are dealt round-robin to ranks, and rank 0 accumulates the statistics in shard order, so
the file's arrays are identical on any number of ranks.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from data_prep.manifest import file_url
from data_prep.reader import open_shard_set
from data_prep.shards import read_shard
from eval.config import RefStatsConfig
from eval.inception import FEATURE_DIMS, InceptionFeatures
from eval.job import EvalInputError, Outputs, run_rounds
from eval.metrics import FeatureStats, ReferenceStats, save_reference
from eval.recon import crop_uint8
from models.device import device


def pool_subset(total: int, n: int, seed: int) -> np.ndarray:
    """Sorted global indices (shard order, then file order) of the images kept for precision/recall."""
    return np.sort(np.random.default_rng([seed, 9]).choice(total, size=min(n, total), replace=False))


def run(cfg: RefStatsConfig) -> None:
    """Write `cfg.out` (see the module doc); an existing file is kept and not recomputed."""
    rank = dist.get_rank()
    out = Path(cfg.out)
    if out.exists():
        if rank == 0:
            print(f"ref-stats: {out} exists; not redoing it (remove it to recompute)", flush=True)
        return
    manifest = open_shard_set(cfg.images, "images")
    if manifest.total < 2:
        raise EvalInputError(f"{cfg.images} holds {manifest.total} image(s); statistics need at least 2")
    if not out.parent.is_dir():
        raise EvalInputError(f"out={cfg.out}: folder {out.parent} does not exist")
    dev = device()
    net = InceptionFeatures(cfg.inception_weights or None, device=dev)
    offsets = np.cumsum([0, *manifest.counts])
    subset = pool_subset(manifest.total, cfg.pool_samples, cfg.seed)
    kept = [
        subset[(subset >= offsets[j]) & (subset < offsets[j + 1])] - offsets[j]
        for j in range(len(offsets) - 1)
    ]
    rows = [
        {"pool": c, "spatial": c, "images": len(kept[j]) if cfg.save_images else 0}
        for j, c in enumerate(manifest.counts)
    ]
    s = cfg.image_size
    spec = {
        "pool": ((FEATURE_DIMS["pool"],), torch.float32),
        "spatial": ((FEATURE_DIMS["spatial"],), torch.float32),
        "images": ((s, s, 3), torch.uint8),
    }

    def compute(j: int) -> Outputs:
        shard = manifest.shards[j]
        images = np.stack(
            [crop_uint8(x, s) for x in read_shard(file_url(cfg.images, shard.name), info=shard)]
        )
        feats: dict[str, list[torch.Tensor]] = {"pool": [], "spatial": []}
        for lo in range(0, len(images), cfg.batch_size):
            f = net(torch.from_numpy(images[lo : lo + cfg.batch_size]).permute(0, 3, 1, 2))
            for k in feats:
                feats[k].append(f[k])
        return {
            **{k: torch.cat(v) for k, v in feats.items()},
            "images": torch.from_numpy(images[kept[j]])[: rows[j]["images"]],
        }

    stats = {k: FeatureStats.zeros(FEATURE_DIMS[k]) for k in ("pool", "spatial")}
    pools: list[torch.Tensor] = []
    kept_images: list[np.ndarray] = []

    def consume(j: int, o: Outputs) -> None:
        for k, st in stats.items():
            st.update(o[k])
        pools.append(o["pool"][torch.from_numpy(kept[j])])
        kept_images.append(o["images"].numpy())

    start = time.perf_counter()
    with tqdm(total=manifest.total, unit="img", desc="ref-stats", disable=rank != 0) as bar:
        run_rounds(rows, spec, compute, consume, bar)
    if rank != 0:
        return
    mu, sigma = stats["pool"].mean_cov()
    mu_s, sigma_s = stats["spatial"].mean_cov()
    pool = torch.cat(pools).numpy() if len(subset) else None
    images = np.concatenate(kept_images) if cfg.save_images and len(subset) else None
    tmp = out.with_name(out.name + ".tmp")
    save_reference(tmp, ReferenceStats(mu, sigma, mu_s, sigma_s, pool), images)
    tmp.replace(out)
    elapsed = time.perf_counter() - start
    print(
        f"ref-stats: {manifest.total} images of {cfg.images} ({s}px ADM crop) → {out}: mu/sigma, mu_s/sigma_s, "
        f"pool features of {len(subset)}"
        + (" and their images (arr_0)" if images is not None else "")
        + f" ({manifest.total / max(elapsed, 1e-9):.1f} images/s)",
        flush=True,
    )
