"""`ldit eval` of a LightningDiT export: sample N images on every rank, then FID, sFID, IS, precision, recall.

Sampling follows the reference's `inference.py` (lightningdit.md §4.1): z ~ N(0, I) of the latent shape, labels
uniform over the classes (or balanced), an ODE from t = 0 (noise) to t = 1 with the configured solver, points
and timestep shift, CFG with its scale, interval and channels (``models.samplers.cfg_model_fn``; scale ≤ 1 is
the plain conditional model, the shift still applies), in fp32 with the EMA weights the export holds. The latent
is de-normalised with the training shard set's statistics, z·σ_c + μ_c (multiplier 1, as
``data_prep.reader.normalize_latents``), decoded by the VA-VAE and cast to uint8 as the reference
(``models.vavae.images_to_uint8``). Deviation: matmuls run in full fp32 (the reference enables TF32 on GPUs).

What differs from the reference on purpose (DESIGN.md "Evaluation"): sample i's noise and label come from
(seed, i) rather than from per-rank generator streams, so the images do not depend on the world size; and the
metrics are computed in-process with torch-fidelity's port of the ADM suite's Inception (``eval/inception.py``)
against an ADM reference batch, instead of writing PNGs for the TensorFlow evaluator (``save_npz=true`` writes
the ADM-format sample batch for it as well). Metrics (``eval/metrics.py``): FID on pool features against the
reference's ``mu``/``sigma``, sFID on the spatial features against ``mu_s``/``sigma_s``, the Inception Score
over ``is_splits`` splits (in sample order by default, as the ADM suite), k = 3 precision/recall against the
reference's ``pool`` features (or those of its ``arr_0`` images, computed here, as the ADM evaluator does).
"""

from __future__ import annotations

import re
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from data_prep.manifest import MANIFEST, ShardSetError, load_manifest
from eval.config import EvalConfig
from eval.inception import FEATURE_DIMS, InceptionFeatures
from eval.job import (
    GRID,
    METRICS,
    SAMPLES,
    TIMING,
    EvalInputError,
    NpzWriter,
    Outputs,
    already_done,
    check_file,
    export_run_config,
    in_run,
    inception_doc,
    index_seed,
    json_text,
    log_tensorboard,
    num,
    run_rounds,
    sha256_file,
    write_atomic,
    write_grid,
)
from eval.metrics import (
    FeatureStats,
    ReferenceStats,
    frechet_distance,
    inception_score,
    iter_reference_images,
    load_reference,
    precision_recall,
    reference_num_images,
)
from models.device import device
from models.export import load_lightningdit, load_vavae, weights_sha256
from models.samplers import ModelFn, cfg_model_fn, sample_ode
from models.vavae import images_to_uint8
from trainer.checkpoint import step_name
from trainer.config import TrainDiTConfig

PR_K = 3
"""Neighbourhood size of precision/recall (Kynkäänniemi et al. 2019; both reference suites)."""


def eval_name(cfg: EvalConfig, step: int, reference: Path) -> str:
    """`step-N_<sampler>_<cfg>_<labels>_seed<s>_n<N>_<reference stem>`, e.g.
    ``step-00080000_euler250-shift0.3_cfg10-first3-from0.1_uniform_seed0_n50000_VIRTUAL_imagenet256_labeled``."""
    s = cfg.sampler
    solver = "dopri5" if s.method == "dopri5" else f"{s.method}{s.points}-shift{num(s.shift)}"
    guidance = (
        f"cfg{num(s.cfg_scale)}-{s.cfg_channels}-from{num(s.cfg_interval_start)}"
        if s.cfg_scale > 1
        else "nocfg"
    )
    ref = re.sub(r"[^A-Za-z0-9._-]", "-", reference.stem)
    return "_".join(
        [step_name(step), solver, guidance, cfg.labels, f"seed{cfg.seed}", f"n{cfg.num_samples}", ref]
    )


def sample_label(cfg: EvalConfig, index: int, num_classes: int) -> int:
    """Label of sample `index`: uniform from (seed, index) (reference: uniform `randint`), or index mod classes."""
    if cfg.labels == "balanced":
        return index % num_classes
    return index_seed(cfg.seed, "label", index) % num_classes


def sample_noise(seed: int, index: int, shape: tuple[int, ...]) -> torch.Tensor:
    """z ~ N(0, I) of sample `index`, drawn on the CPU from a generator seeded by (seed, index)."""
    return torch.randn(shape, generator=torch.Generator().manual_seed(index_seed(seed, "noise", index)))


def _inputs(cfg: EvalConfig, folder: Path) -> tuple[str, str, tuple[np.ndarray, np.ndarray], str]:
    """(latent shard set, VA-VAE, (mean, std), where the VA-VAE came from), each checked to exist."""
    run_cfg = export_run_config(folder)
    latents = cfg.latents or (run_cfg.data.shards if run_cfg is not None else "")
    if not latents:
        raise EvalInputError(
            f"{folder} has no config.yaml: set latents= to the latent shard set the DiT trained on"
        )
    manifest = load_manifest(latents, "latents")
    if manifest.latent is None or not manifest.latent.std:
        raise ShardSetError(f"{latents}/manifest.json has no latent statistics to de-normalise samples with")
    run_vavae = run_cfg.vavae if isinstance(run_cfg, TrainDiTConfig) else ""
    producer_vavae = manifest.producer.get("config", {}).get("vavae", "")
    vavae, source = next(
        ((v, src) for v, src in ((cfg.vavae, "vavae"), (run_vavae, "the run's vavae"),
                                 (producer_vavae, f"{latents}/manifest.json")) if v),
        ("", ""),
    )  # fmt: skip
    if not vavae:
        raise EvalInputError(
            "vavae= is required: neither the run's config nor the latent manifest names the VA-VAE to decode with"
        )
    if not Path(vavae).exists():
        raise EvalInputError(
            f"VA-VAE {vavae} (from {source}) does not exist; set vavae= to its export folder"
        )
    stats = (np.asarray(manifest.latent.mean, np.float32), np.asarray(manifest.latent.std, np.float32))
    return latents, vavae, stats, source


def reference_pool(
    cfg: EvalConfig, ref: ReferenceStats, path: Path, net: InceptionFeatures | None
) -> tuple[torch.Tensor | None, str | None]:
    """Pool features of the reference for precision/recall: its `pool`, else computed from `arr_0` (rank 0
    gets them; fixed batches dealt round-robin), else None. Returns (features or None, how)."""
    if ref.pool is not None:
        return torch.from_numpy(ref.pool), f"pool ({ref.pool.shape[0]} stored features)"
    assert net is not None, "computing the reference's pool features needs the Inception"
    try:
        n = reference_num_images(path)
    except KeyError:
        return None, None
    b = cfg.batch_size
    rows = [{"pool": min(b, n - lo)} for lo in range(0, n, b)]
    feats: list[torch.Tensor] = []

    def compute(k: int) -> Outputs:
        batch = next(iter_reference_images(path, b, k * b, min((k + 1) * b, n)))
        return {"pool": net(torch.from_numpy(batch).permute(0, 3, 1, 2))["pool"]}

    with tqdm(total=n, unit="img", desc="eval: reference pool features", disable=dist.get_rank() != 0) as bar:
        run_rounds(rows, {"pool": ((FEATURE_DIMS["pool"],), torch.float32)}, compute,
                   lambda k, out: feats.append(out["pool"]), bar)  # fmt: skip
    return (torch.cat(feats) if dist.get_rank() == 0 else None), f"arr_0 ({n} images, pool features computed)"


def evaluate_dit(cfg: EvalConfig, folder: Path, step: int) -> Path:
    """Sample `num_samples` images over all ranks and write `<run>/eval/<name>/metrics.json` (see module doc)."""
    ref_path = check_file(
        cfg.reference, "reference", "an ADM reference batch .npz or one written by ldit ref-stats"
    )
    name = eval_name(cfg, step, ref_path)
    out_dir = cfg.run.dir / "eval" / name
    if already_done(out_dir):
        return out_dir
    try:
        ref = load_reference(ref_path)
    except ValueError as exc:
        raise EvalInputError(f"reference={cfg.reference}: {exc}") from None
    latents, vavae_path, (mean, std), vavae_source = _inputs(cfg, folder)
    rank = dist.get_rank()
    s, n, b = cfg.sampler, cfg.num_samples, cfg.batch_size
    if n < max(cfg.is_splits, PR_K + 1, 2):
        raise EvalInputError(f"num_samples={n} must be at least is_splits={cfg.is_splits} and {PR_K + 1}")
    dev = device()
    model = load_lightningdit(folder).to(dev).eval()
    args = model.args
    shape = (args.in_channels, args.input_size, args.input_size)
    if len(mean) != args.in_channels:
        raise EvalInputError(
            f"the latents of {latents} have {len(mean)} channels; the DiT takes {args.in_channels}"
        )
    if s.cfg_scale > 1 and args.class_dropout_prob <= 0:
        raise EvalInputError(
            f"sampler.cfg_scale={num(s.cfg_scale)} needs a null label, but the DiT was built without label dropout"
        )
    vae = load_vavae(vavae_path).to(dev).eval()
    side = args.input_size * 2 ** (len(vae.args.ch_mult) - 1)
    net = InceptionFeatures(cfg.inception_weights or None, device=dev)
    mean_t = torch.from_numpy(mean).to(dev).view(1, -1, 1, 1)
    std_t = torch.from_numpy(std).to(dev).view(1, -1, 1, 1)
    ref_pool, ref_pool_how = reference_pool(cfg, ref, ref_path, net)
    if ref_pool_how is None and rank == 0:
        print(
            f"eval: {ref_path} has neither `pool` features nor images `arr_0`: no precision/recall",
            flush=True,
        )

    keep_images = n if cfg.save_npz else min(cfg.grid, n)
    starts = range(0, n, b)
    rows = [
        {"pool": min(b, n - lo), "logits": min(b, n - lo), "spatial": min(b, n - lo),
         "images": max(0, min(b, n - lo, keep_images - lo))}
        for lo in starts
    ]  # fmt: skip
    spec = {
        "pool": ((FEATURE_DIMS["pool"],), torch.float32),
        "logits": ((FEATURE_DIMS["logits_unbiased"],), torch.float32),
        "spatial": ((FEATURE_DIMS["spatial"],), torch.float32),
        "images": ((side, side, 3), torch.uint8),
    }

    @torch.no_grad()
    def compute(k: int) -> Outputs:
        idx = range(k * b, min((k + 1) * b, n))
        x = torch.stack([sample_noise(cfg.seed, i, shape) for i in idx]).to(dev)  # (b, C, h, w)
        y = torch.tensor([sample_label(cfg, i, args.num_classes) for i in idx], device=dev)
        fn: ModelFn
        if s.cfg_scale > 1:
            fn = cfg_model_fn(model, y, s.cfg_scale, null_class=args.num_classes,
                              interval_start=s.cfg_interval_start, channels=s.cfg_channels)  # fmt: skip
        else:
            fn = lambda x_, t_: model(x_, t_, y)  # noqa: E731
        z = sample_ode(fn, x, s.method, s.points, s.shift) * std_t + mean_t
        images = images_to_uint8(vae.decode(z))  # (b, H, W, 3) uint8
        f = net(images.permute(0, 3, 1, 2))
        return {"pool": f["pool"], "logits": f["logits_unbiased"], "spatial": f["spatial"],
                "images": images[: rows[k]["images"]]}  # fmt: skip

    pool_stats = FeatureStats.zeros(FEATURE_DIMS["pool"])
    spatial_stats = FeatureStats.zeros(FEATURE_DIMS["spatial"])
    pools: list[torch.Tensor] = []
    logits: list[torch.Tensor] = []
    grid: list[np.ndarray] = []
    npz = None
    if rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        if cfg.save_npz:
            npz = NpzWriter(out_dir / SAMPLES, (n, side, side, 3))

    def consume(k: int, out: Outputs) -> None:
        pool_stats.update(out["pool"])
        spatial_stats.update(out["spatial"])
        pools.append(out["pool"])
        logits.append(out["logits"])
        images = out["images"].numpy()
        if npz is not None:
            npz.write(images)
        if sum(len(g) for g in grid) < cfg.grid:
            grid.append(images)

    if rank == 0:
        print(
            f"eval {name}: {n} samples in {len(rows)} batches of {b} over {dist.get_world_size()} rank(s); "
            f"VA-VAE {vavae_path} (from {vavae_source}); {side}px images",
            flush=True,
        )
    start = time.perf_counter()
    with tqdm(total=n, unit="img", desc=f"eval {cfg.run.name} step {step}", disable=rank != 0) as bar:
        run_rounds(rows, spec, compute, consume, bar, images=lambda k: rows[k]["pool"])
    elapsed = time.perf_counter() - start
    if rank != 0:
        return out_dir

    mu, sigma = pool_stats.mean_cov()
    pool_all = torch.cat(pools)
    metrics: dict[str, float | None] = {"fid": frechet_distance(mu, sigma, ref.mu, ref.sigma), "sfid": None}
    if ref.mu_s is not None:
        metrics["sfid"] = frechet_distance(*spatial_stats.mean_cov(), ref.mu_s, ref.sigma_s)
    metrics["inception_score"], metrics["inception_score_std"] = inception_score(
        torch.cat(logits), cfg.is_splits, shuffle=cfg.is_shuffle
    )
    metrics["precision"] = metrics["recall"] = None
    if ref_pool is not None:
        metrics["precision"], metrics["recall"] = precision_recall(ref_pool, pool_all, k=PR_K, device=dev)
    doc = {
        "format": 1,
        "job": "ldit eval (LightningDiT samples)",
        "name": name,
        "metrics": metrics,
        "export": {"path": in_run(folder, cfg), "step": step, "weights_sha256": weights_sha256(folder)},
        "vavae": {
            "path": str(vavae_path),
            "from": vavae_source,
            "weights_sha256": weights_sha256(vavae_path),
        },
        "latent_stats": {"shards": str(latents), "manifest_sha256": sha256_file(Path(latents) / MANIFEST)},
        "reference": {
            "path": str(ref_path),
            "sha256": sha256_file(ref_path),
            "sfid": ref.mu_s is not None,
            "precision_recall_from": ref_pool_how,
        },  # fmt: skip
        "inception": inception_doc(cfg.inception_weights),
        "sampling": {
            **asdict(s),
            "labels": cfg.labels,
            "seed": cfg.seed,
            "num_samples": n,
            "batch_size": b,
            "dtype": "float32",
            "image_size": side,
        },  # fmt: skip
        "protocol": {
            "is_splits": cfg.is_splits,
            "is_shuffle": cfg.is_shuffle,
            "pr_k": PR_K,
            "pr_distance_dtype": "float32",
        },  # fmt: skip
    }
    if npz is not None:
        npz.close()
    if grid:
        write_grid(out_dir / GRID, np.concatenate(grid)[: cfg.grid])
    write_atomic(out_dir / TIMING, json_text({"seconds": elapsed, "images_per_s": n / max(elapsed, 1e-9),
                                              "world_size": dist.get_world_size()}))  # fmt: skip
    write_atomic(out_dir / METRICS, json_text(doc))  # last: its presence means the evaluation is complete
    if cfg.tensorboard:
        log_tensorboard(cfg.run.dir, name.split("_", 1)[1], step, metrics)
    shown = ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if v is not None)
    print(
        f"eval {name}: {shown} ({n / max(elapsed, 1e-9):.1f} images/s)\n  → {out_dir / METRICS}", flush=True
    )
    return out_dir
