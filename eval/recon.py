"""`ldit eval` of a VA-VAE export: rFID, PSNR, SSIM and LPIPS of reconstructions of a held-out image shard set.

Protocol of the reference's ``evaluate_tokenizer.py`` (lightningdit.md §1.5): encode, take a *posterior sample*,
decode, convert to uint8 as the saved PNGs would be (``models.vavae.images_to_uint8``); PSNR per image on uint8
values, then averaged; SSIM (data range [-1, 1]) and VGG LPIPS on the uint8 images mapped back to [-1, 1]
(``eval.recon_metrics``); rFID = FID between the Inception pool features of the originals and of the
reconstructions (``eval/inception.py``, ``eval/metrics.py``). Deviation: images are cut with the ADM center
crop of the shard-set pipeline (``data_prep.images.center_crop_adm``, as the latents are), where the
reference uses torchvision's Resize + CenterCrop.

Determinism as ``eval/job.py``: a shard is one item, encoded in fixed batches of its own samples; each
posterior sample's noise comes from (seed, sample key); rank 0 accumulates everything in shard order.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from data_prep.images import center_crop_adm, decode_rgb
from data_prep.manifest import file_url, set_name
from data_prep.reader import open_shard_set
from data_prep.shards import read_shard
from eval.config import EvalConfig
from eval.inception import FEATURE_DIMS, InceptionFeatures
from eval.job import (
    METRICS,
    TIMING,
    EvalInputError,
    Outputs,
    already_done,
    export_run_config,
    in_run,
    inception_doc,
    index_seed,
    json_text,
    log_tensorboard,
    run_rounds,
    write_atomic,
)
from eval.metrics import FeatureStats, frechet_distance
from eval.recon_metrics import lpips_distance, psnr_uint8, ssim, uint8_to_signed
from models.device import device
from models.export import load_vavae, weights_sha256
from models.lpips import LPIPS
from models.vavae import AutoencoderKL, images_to_uint8
from trainer.checkpoint import step_name
from trainer.config import TrainVAVAEConfig

PER_IMAGE = ("psnr", "ssim", "lpips")


def crop_uint8(sample: dict, size: int) -> np.ndarray:
    """A shard sample's image, ADM-center-cropped to (size, size, 3) uint8."""
    return np.asarray(center_crop_adm(decode_rgb(sample["jpg"] if "jpg" in sample else sample["png"]), size))


@torch.no_grad()
def reconstruct(vae: AutoencoderKL, real: torch.Tensor, keys: list[str], seed: int) -> torch.Tensor:
    """uint8 (B, 3, H, W) → uint8 (B, 3, H, W) through a posterior sample whose noise is seeded by (seed, key)."""
    dev = next(vae.parameters()).device
    posterior = vae.encode(uint8_to_signed(real).to(dev))
    eps = torch.stack(
        [
            torch.randn(
                posterior.mean.shape[1:],
                generator=torch.Generator().manual_seed(index_seed(seed, "posterior", k)),
            )
            for k in keys
        ]
    ).to(dev)
    z = posterior.mean + posterior.std * eps
    return images_to_uint8(vae.decode(z)).permute(0, 3, 1, 2).contiguous().cpu()


def recon_metrics(real: torch.Tensor, fake: torch.Tensor, lpips: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Per-image PSNR (uint8), SSIM and LPIPS (on [-1, 1]) of uint8 (B, 3, H, W) pairs, each (B,) float64."""
    a, b = uint8_to_signed(real), uint8_to_signed(fake)
    return {"psnr": psnr_uint8(real, fake), "ssim": ssim(a, b), "lpips": lpips_distance(lpips, a, b)}


def evaluate_vavae(cfg: EvalConfig, folder: Path, step: int) -> Path:
    """Reconstruct the first `num_samples` images of `images` over all ranks; write `<run>/eval/<name>/metrics.json`."""
    if not cfg.images:
        raise EvalInputError(
            f"{folder} holds a VA-VAE: set images= to a held-out image shard set to reconstruct"
        )
    manifest = open_shard_set(cfg.images, "images")
    n = cfg.num_samples or manifest.total
    if n > manifest.total:
        raise EvalInputError(
            f"num_samples={n} but {cfg.images} holds {manifest.total} images (0 takes them all)"
        )
    if n < 2:
        raise EvalInputError(f"num_samples={n}: rFID needs at least 2 images")
    name = f"{step_name(step)}_recon_{set_name(cfg.images)}_crop{cfg.image_size}_seed{cfg.seed}_n{n}"
    out_dir = cfg.run.dir / "eval" / name
    if already_done(out_dir):
        return out_dir
    rank = dist.get_rank()
    run_cfg = export_run_config(folder)
    loss = run_cfg.loss if isinstance(run_cfg, TrainVAVAEConfig) else None
    dev = device()
    lpips = LPIPS(
        vgg_weights=cfg.vgg16_weights or (loss.vgg16_weights if loss else "") or None,
        heads_weights=cfg.lpips_weights or (loss.lpips_weights if loss else "") or None,
        vgg_config_key="vgg16_weights",
        heads_config_key="lpips_weights",
    ).to(dev)
    net = InceptionFeatures(cfg.inception_weights or None, device=dev)
    vae = load_vavae(folder).to(dev).eval()

    offsets = np.cumsum([0, *manifest.counts])
    takes = [int(min(max(n - offsets[j], 0), c)) for j, c in enumerate(manifest.counts)]
    shards = [j for j, t in enumerate(takes) if t > 0]
    rows = [{k: takes[j] for k in ("real", "fake", *PER_IMAGE)} for j in shards]
    pool = ((FEATURE_DIMS["pool"],), torch.float32)
    spec = {"real": pool, "fake": pool, **{k: ((), torch.float64) for k in PER_IMAGE}}

    def compute(i: int) -> Outputs:
        j = shards[i]
        samples = read_shard(file_url(cfg.images, manifest.shards[j].name), info=manifest.shards[j])
        samples = samples[: takes[j]]
        out: dict[str, list[torch.Tensor]] = {k: [] for k in spec}
        for lo in range(0, len(samples), cfg.batch_size):
            chunk = samples[lo : lo + cfg.batch_size]
            real = torch.from_numpy(np.stack([crop_uint8(s, cfg.image_size) for s in chunk])).permute(
                0, 3, 1, 2
            )
            fake = reconstruct(vae, real, [str(s["__key__"]) for s in chunk], cfg.seed)
            for k, v in recon_metrics(real, fake, lpips).items():
                out[k].append(v)
            out["real"].append(net(real)["pool"])
            out["fake"].append(net(fake)["pool"])
        return {k: torch.cat(v) for k, v in out.items()}

    stats = {
        "real": FeatureStats.zeros(FEATURE_DIMS["pool"]),
        "fake": FeatureStats.zeros(FEATURE_DIMS["pool"]),
    }
    per_image: dict[str, list[np.ndarray]] = {k: [] for k in PER_IMAGE}

    def consume(i: int, out: Outputs) -> None:
        for k in stats:
            stats[k].update(out[k])
        for k in PER_IMAGE:
            per_image[k].append(out[k].numpy())

    if rank == 0:
        print(
            f"eval {name}: {n} images of {cfg.images} in {len(shards)} shard(s), batches of {cfg.batch_size}"
        )
    start = time.perf_counter()
    with tqdm(total=n, unit="img", desc=f"eval {cfg.run.name} step {step}", disable=rank != 0) as bar:
        run_rounds(rows, spec, compute, consume, bar)
    elapsed = time.perf_counter() - start
    if rank != 0:
        return out_dir
    values = {k: np.concatenate(v) for k, v in per_image.items()}  # (n,) float64 each, in shard order
    metrics = {
        "rfid": frechet_distance(*stats["real"].mean_cov(), *stats["fake"].mean_cov()),
        **{k: float(values[k].mean()) for k in PER_IMAGE},
    }
    doc = {
        "format": 1,
        "job": "ldit eval (VA-VAE reconstruction)",
        "name": name,
        "metrics": metrics,
        "export": {"path": in_run(folder, cfg), "step": step, "weights_sha256": weights_sha256(folder)},
        "images": {"path": str(cfg.images), "num_images": n, "crop": f"ADM center crop {cfg.image_size}"},
        "inception": inception_doc(cfg.inception_weights),
        "protocol": {
            "posterior": "sample, noise from (seed, key)",
            "seed": cfg.seed,
            "batch_size": cfg.batch_size,
            "psnr": "uint8, per image, mean",
            "ssim_lpips_inputs": "uint8 mapped to [-1, 1]",
            "ssim": "torchmetrics>=1.4 default: 11x11 Gaussian window, sigma 1.5, reflect-padded border",
            "psnr_infinite_images": int(np.isinf(values["psnr"]).sum()),
        },  # fmt: skip
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    write_atomic(out_dir / TIMING, json_text({"seconds": elapsed, "images_per_s": n / max(elapsed, 1e-9),
                                              "world_size": dist.get_world_size()}))  # fmt: skip
    write_atomic(out_dir / METRICS, json_text(doc))
    if cfg.tensorboard:
        log_tensorboard(cfg.run.dir, name.split("_", 1)[1], step, metrics)
    shown = ", ".join(f"{k} {v:.4f}" for k, v in metrics.items())
    print(
        f"eval {name}: {shown} ({n / max(elapsed, 1e-9):.1f} images/s)\n  → {out_dir / METRICS}", flush=True
    )
    return out_dir
