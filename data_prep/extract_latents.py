"""`ldit extract-latents`: image shards + a VA-VAE → latent shards (reference §5, DESIGN.md "Data formats").

Each image is ADM-center-cropped and encoded twice, as is and horizontally flipped; each stores the
posterior *sample* (`latent.npy`, `latent_flip.npy`) as the reference does. Latent shard i holds the
samples of image shard i in the same order, and is written by rank i mod W. The posterior noise of a
sample is seeded by (seed, key), and a shard is encoded in fixed batches of its own samples, so the
output does not depend on the world size.

Resumable: a finished shard is renamed into place and described by a small record in `.parts/`
(its manifest entry and its share of the statistics); a rerun skips shards whose record exists and
whose file still has the recorded size and sha256. The per-channel mean and std are computed over a
seeded subset of `stats_samples` non-flipped latents (reference §5: 10,000; std unbiased, over N, H, W),
accumulated in float64 per shard. The manifest is written last.

Ranks with less to do (a rerun after a partial run) finish first: no collective waits on the work. Each
rank other than 0 returns when its shards are written; rank 0 then polls `.parts/` for every shard's
record (data_prep/wait.py), failing only when no shard was finished for `collective_timeout_s`.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from data_prep.config import ExtractLatentsConfig
from data_prep.images import center_crop_adm, decode_rgb, to_tensor
from data_prep.manifest import (
    MANIFEST,
    LatentInfo,
    Manifest,
    ShardInfo,
    ShardSetError,
    file_url,
    is_remote,
    read_remote,
    sha256_file,
)
from data_prep.reader import open_shard_set
from data_prep.shards import encode_npy, read_shard, write_shard
from data_prep.wait import wait_for_files
from models.device import device
from models.export import load_vavae, weights_sha256

PARTS = ".parts"
DTYPES = {"fp16": np.float16, "fp32": np.float32}


def sample_noise_seed(seed: int, key: str) -> int:
    """The posterior-noise seed of one sample: a function of (seed, key) only."""
    return int.from_bytes(hashlib.sha256(f"{seed}/{key}".encode()).digest()[:8], "little") & ((1 << 63) - 1)


@torch.no_grad()
def encode_shard(
    vae: torch.nn.Module, samples: list[dict[str, bytes]], cfg: ExtractLatentsConfig, dev: torch.device
) -> tuple[np.ndarray, np.ndarray]:
    """(latents, flipped latents) of a shard's samples, each (N, C, h, w) float32."""
    out, out_flip = [], []
    for start in range(0, len(samples), cfg.batch_size):
        chunk = samples[start : start + cfg.batch_size]
        x = torch.stack(
            [to_tensor(center_crop_adm(decode_rgb(s.get("jpg") or s["png"]), cfg.image_size)) for s in chunk]
        ).to(dev)  # (b, 3, S, S)
        for images, dest, salt in ((x, out, ""), (x.flip(-1), out_flip, "/flip")):
            posterior = vae.encode(images)
            eps = torch.stack(
                [
                    torch.randn(
                        posterior.mean.shape[1:],
                        generator=torch.Generator().manual_seed(
                            sample_noise_seed(cfg.seed, s["__key__"] + salt)
                        ),
                    )
                    for s in chunk
                ]
            ).to(dev)
            dest.append((posterior.mean + posterior.std * eps).float().cpu().numpy())  # posterior sample, §5
    return np.concatenate(out), np.concatenate(out_flip)


def stats_subset(total: int, n: int, seed: int) -> np.ndarray:
    """Global sample positions (shard order, then file order) whose latents enter the statistics."""
    return np.sort(np.random.default_rng([seed, 10]).choice(total, size=min(n, total), replace=False))


def _record_path(out: Path, name: str) -> Path:
    return out / PARTS / f"{name}.json"


def _finished(out: Path, name: str) -> dict | None:
    """The record of a finished shard whose file still matches it, else None."""
    rec_path = _record_path(out, name)
    if not rec_path.is_file() or not (out / name).is_file():
        return None
    rec = json.loads(rec_path.read_text())
    info = ShardInfo(**rec["info"])
    if (out / name).stat().st_size != info.bytes or sha256_file(out / name) != info.sha256:
        return None
    return rec


def _manifest_sha256(images: str) -> str:
    """sha256 of the image set's manifest.json, read through the set's opener when it is remote."""
    if is_remote(images):
        return hashlib.sha256(read_remote(file_url(images, MANIFEST))).hexdigest()
    return sha256_file(Path(images) / MANIFEST)


def run(cfg: ExtractLatentsConfig) -> Manifest | None:
    """Write the latent shard set; returns the manifest on rank 0 (None on other ranks)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    out = Path(cfg.out)
    if (out / MANIFEST).exists():
        raise ShardSetError(
            f"{out} already holds a finished shard set ({MANIFEST} exists); choose another out= or remove it"
        )
    images = open_shard_set(cfg.images, "images", hashes=False)
    dev = device()
    vae = load_vavae(cfg.vavae).to(dev).eval()
    (out / PARTS).mkdir(parents=True, exist_ok=True)

    offsets = np.cumsum([0, *images.counts])
    subset = stats_subset(images.total, cfg.stats_samples, cfg.seed)
    mine = list(range(rank, len(images.shards), world))
    start, encoded, skipped = time.perf_counter(), 0, 0
    total_mine = sum(images.shards[i].count for i in mine)
    with tqdm(total=total_mine, unit="img", desc=f"extract-latents rank {rank}", disable=rank != 0) as bar:
        for i in mine:
            shard = images.shards[i]
            if _finished(out, shard.name) is not None:
                skipped += 1
                bar.update(shard.count)
                continue
            samples = read_shard(file_url(cfg.images, shard.name), shard.count, shard)
            lat, lat_flip = encode_shard(vae, samples, cfg, dev)
            dtype = DTYPES[cfg.dtype]
            info = write_shard(
                out / shard.name,
                (
                    {
                        "__key__": s["__key__"],
                        "latent.npy": encode_npy(lat[j].astype(dtype)),
                        "latent_flip.npy": encode_npy(lat_flip[j].astype(dtype)),
                        "cls": bytes(s["cls"]),
                    }
                    for j, s in enumerate(samples)
                ),
            )
            rows = subset[(subset >= offsets[i]) & (subset < offsets[i + 1])] - offsets[i]
            chosen = lat[rows].astype(dtype).astype(np.float64)  # statistics of the stored values
            record = {
                "info": asdict(info),
                "shape": list(lat.shape[1:]),
                "n": int(chosen.shape[0] * chosen.shape[2] * chosen.shape[3]),
                "sum": chosen.sum(axis=(0, 2, 3)).tolist(),
                "sumsq": (chosen**2).sum(axis=(0, 2, 3)).tolist(),
            }
            tmp = _record_path(out, shard.name).with_suffix(".tmp")
            tmp.write_text(json.dumps(record))
            tmp.replace(_record_path(out, shard.name))
            encoded += shard.count
            bar.update(shard.count)
    if rank != 0:  # this rank's shards and records are on disk; rank 0 waits for them by polling
        return None
    records_of = {
        _record_path(out, s.name): f"{s.name} (rank {i % world})" for i, s in enumerate(images.shards)
    }
    waited = wait_for_files(records_of, cfg.collective_timeout_s, "the other ranks' latent shards")
    manifest = None
    if rank == 0:
        records = [json.loads(_record_path(out, s.name).read_text()) for s in images.shards]
        n = sum(r["n"] for r in records)
        s1 = np.sum([r["sum"] for r in records], axis=0)
        s2 = np.sum([r["sumsq"] for r in records], axis=0)
        mean = s1 / n
        std = np.sqrt(np.maximum(s2 - n * mean**2, 0.0) / max(n - 1, 1))  # unbiased, as torch.std
        manifest = Manifest(
            kind="latents",
            shards=[ShardInfo(**r["info"]) for r in records],
            classes=images.classes,
            producer={
                "job": "extract-latents",
                "config": asdict(cfg),
                "vavae_sha256": weights_sha256(cfg.vavae),
                "images_manifest_sha256": _manifest_sha256(cfg.images),
            },
            latent=LatentInfo(
                tuple(records[0]["shape"]),
                np.dtype(DTYPES[cfg.dtype]).name,
                tuple(mean.tolist()),
                tuple(std.tolist()),
            ),
        )
        manifest.save(out)
        elapsed = time.perf_counter() - start
        print(
            f"extract-latents: {manifest.total} images → latents {manifest.latent.shape} {manifest.latent.dtype} "
            f"in {len(manifest.shards)} shards; rank 0 encoded {encoded} ({encoded / max(elapsed, 1e-9):.1f} images/s), "
            f"skipped {skipped} finished shard(s); statistics over {n} values per channel; "
            f"waited {waited:.1f} s for the other ranks",
            flush=True,
        )
    return manifest
