"""`ldit demo`: the whole pipeline on an embedded dataset, end to end, as a user runs it (issue #10).

The data are scikit-learn's handwritten digits (`sklearn.datasets.load_digits`: 1,797 8×8 images of 10
classes, shipped inside the package, so nothing is downloaded). They are written as an ImageNet-style
folder (one sub-folder per class, RGB PNGs upscaled to `vavae.image_size`), with a seeded, stratified held-out
split that no training stage sees. Then every stage runs as the real job, `python -m slurm.cli <job> ...`
on `processes` local ranks (the `--local N` path: torchrun-style variables, gloo, DeepSpeed ZeRO-2):

    prep-images → train (VA-VAE) → extract-latents → train (DiT) → samples + quality check [→ eval]

Quality without downloaded weights: an MLP classifier (scikit-learn) is trained on the training digits and
their mirror images, and scores (a) its accuracy on class-conditional samples of the DiT (EMA weights,
CFG, decoded by the VA-VAE), per class and overall, and (b) the Fréchet distance between samples and
held-out digits in its hidden-layer feature space (`eval.metrics.frechet_distance`). Mirror images
because the DiT trains, as the reference does (§5), on each latent or its horizontal flip with
probability 1/2: its samples face either way, and the classifier should judge which digit, not which way
it faces. For the same reason the held-out set of the Fréchet distance holds each digit and its mirror.
FID needs the Inception weights (`inception_weights=<file>`); without them the summary says how to get
them.

Re-running: the folder `out` is the demo's identity. Each stage is skipped when its output is complete
(a shard set's manifest, a run's export at the requested step), and a training run that stopped midway
resumes from its checkpoint (the trainer's default), so a rerun after an interruption finishes the job,
and a rerun with a larger `dit.steps` continues the DiT run to it. A rerun with other settings that
shape the earlier stages stops with an error naming them: use another `out=` (or remove the folder).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from slurm.config import ConfigError, to_yaml
from slurm.jobs import DemoConfig
from trainer.checkpoint import step_name

STAMP = "demo.json"
"""File in `out` recording the settings the finished stages were made with."""
SUMMARY = "summary.json"
"""File in `out` holding the summary's fields (paths, times, figures)."""
IDENTITY_KEYS = ("heldout_fraction", "seed", "limit", "shard_samples", "vavae", "dit")
"""DemoConfig fields that shape the stages' outputs; `dit.steps` may grow (the DiT run resumes)."""


@dataclass(frozen=True)
class Layout:
    """Where every stage of the demo writes, under `out`."""

    out: Path

    @property
    def digits(self) -> Path:
        return self.out / "digits"

    @property
    def images(self) -> Path:
        return self.out / "shards" / "images"

    @property
    def heldout_images(self) -> Path:
        return self.out / "shards" / "heldout-images"

    @property
    def latents(self) -> Path:
        return self.out / "shards" / "latents"

    @property
    def runs(self) -> Path:
        return self.out / "runs"

    @property
    def vavae(self) -> Path:
        return self.runs / "vavae"

    @property
    def dit(self) -> Path:
        return self.runs / "dit"

    @property
    def sample_grid(self) -> Path:
        return self.out / "samples.png"

    @property
    def reconstruction_grid(self) -> Path:
        return self.out / "reconstructions.png"


# ----------------------------------------------------------------------------------------------------------
# The dataset


def write_digits(root: Path, size: int, heldout_fraction: float, seed: int, limit: int = 0) -> dict[str, int]:
    """scikit-learn's digits as `root/{train,heldout}/<digit>/<index>.png`: white on black, RGB, `size` px.

    The 8×8 images (values 0..16) are scaled to 0..255 and resized with bicubic interpolation. The held-out
    split is stratified by class and seeded; `limit` > 0 first keeps a stratified subset of that many
    digits. `split.json` is written last: a folder without it is unfinished.
    """
    from PIL import Image
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    index = np.arange(len(digits.target))
    if limit:
        index = train_test_split(index, train_size=limit, random_state=seed, stratify=digits.target)[0]
    train, heldout = train_test_split(
        index, test_size=heldout_fraction, random_state=seed, stratify=digits.target[index]
    )
    if root.exists():
        shutil.rmtree(root)  # an unfinished folder from an interrupted run
    for split, ids in (("train", train), ("heldout", heldout)):
        for i in ids:
            folder = root / split / str(digits.target[i])
            folder.mkdir(parents=True, exist_ok=True)
            pixels = np.round(digits.images[i] * (255 / 16)).astype(np.uint8)  # (8, 8)
            image = Image.fromarray(pixels, "L").resize((size, size), Image.BICUBIC).convert("RGB")
            image.save(folder / f"{i:04d}.png")
    counts = {"train": len(train), "heldout": len(heldout), "classes": 10, "size": size}
    (root / "split.json").write_text(json.dumps(counts, indent=1))
    return counts


def read_folder(folder: Path) -> tuple[np.ndarray, np.ndarray]:
    """Images (N, H, W, 3) uint8 and labels (N,) of an ImageNet-style folder of digits, in sorted order."""
    from PIL import Image

    images, labels = [], []
    for cls in sorted((d for d in folder.iterdir() if d.is_dir()), key=lambda d: d.name):
        for path in sorted(cls.glob("*.png")):
            images.append(np.asarray(Image.open(path).convert("RGB")))
            labels.append(int(cls.name))
    return np.stack(images), np.asarray(labels)


# ----------------------------------------------------------------------------------------------------------
# The quality check: a classifier of the real digits


def to_features(images: np.ndarray) -> np.ndarray:
    """(N, H, W, 3) uint8 → (N, 64) float32: grey levels in [0, 1] averaged to the digits' own 8×8 grid."""
    grey = images.astype(np.float32).mean(axis=-1) / 255.0  # (N, H, W)
    n, h, w = grey.shape
    return grey.reshape(n, 8, h // 8, 8, w // 8).mean(axis=(2, 4)).reshape(n, 64)


def mirrored(images: np.ndarray) -> np.ndarray:
    """Horizontal mirror images of (N, H, W, 3)."""
    return images[:, :, ::-1]


@dataclass
class DigitClassifier:
    """An MLP (128 ReLU units) on 8×8 grey levels; its hidden layer is the feature space of the distance."""

    model: object

    @classmethod
    def fit(cls, images: np.ndarray, labels: np.ndarray, seed: int) -> DigitClassifier:
        """Train on the images and their mirror images (see the module docstring for why)."""
        from sklearn.neural_network import MLPClassifier

        x = to_features(np.concatenate([images, mirrored(images)]))
        y = np.concatenate([labels, labels])
        mlp = MLPClassifier(hidden_layer_sizes=(128,), alpha=1e-3, max_iter=400, random_state=seed)
        return cls(mlp.fit(x, y))

    def predict(self, images: np.ndarray) -> np.ndarray:
        return self.model.predict(to_features(images))

    def features(self, images: np.ndarray) -> np.ndarray:
        """(N, 128) hidden-layer activations, float64."""
        x = to_features(images).astype(np.float64)
        return np.maximum(x @ self.model.coefs_[0] + self.model.intercepts_[0], 0.0)


def accuracy(pred: np.ndarray, labels: np.ndarray) -> tuple[float, list[float]]:
    """Overall accuracy and the accuracy of each class 0..9 (nan for a class absent from `labels`)."""
    per_class = [
        float((pred[labels == c] == c).mean()) if (labels == c).any() else math.nan for c in range(10)
    ]
    return float((pred == labels).mean()), per_class


def frechet(a: np.ndarray, b: np.ndarray) -> float:
    """Fréchet distance between two feature sets (N, D) (FID's formula, Heusel et al. 2017)."""
    from eval.metrics import frechet_distance, mean_cov

    return frechet_distance(*mean_cov(a), *mean_cov(b))


# ----------------------------------------------------------------------------------------------------------
# Sampling and reconstruction with the trained models


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(N, 3, H, W) in [-1, 1] → (N, H, W, 3) uint8, rounded as a PNG would store it."""
    x = ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


@torch.no_grad()
def sample_digits(
    dit_export: Path,
    vavae_export: Path,
    latents: Path,
    per_class: int,
    cfg_scale: float,
    points: int,
    shift: float,
    seed: int,
    batch: int = 250,
) -> tuple[np.ndarray, np.ndarray]:
    """`per_class` samples of each class: EMA DiT, Euler with CFG on all channels, decoded by the VA-VAE.

    Returns images (N, H, W, 3) uint8 and labels (N,), class-major. Noise of sample i comes from
    (seed, i), so the images do not depend on the batch size.
    """
    from data_prep.manifest import load_manifest
    from models.export import load_lightningdit, load_vavae
    from models.samplers import cfg_model_fn, sample_euler, timestep_grid

    dit, vae = load_lightningdit(dit_export).eval(), load_vavae(vavae_export).eval()
    info = load_manifest(latents, "latents").latent
    mean = torch.tensor(info.mean).view(1, -1, 1, 1)
    std = torch.tensor(info.std).view(1, -1, 1, 1)
    labels = torch.arange(10).repeat_interleave(per_class)
    noise = torch.stack(
        [
            torch.randn(info.shape, generator=torch.Generator().manual_seed(seed * 100003 + i))
            for i in range(len(labels))
        ]
    )  # (N, C, h, w)
    ts = timestep_grid(points, shift)
    images = []
    for start in range(0, len(labels), batch):
        y = labels[start : start + batch]
        fn = cfg_model_fn(dit, y, cfg_scale, null_class=dit.args.num_classes, channels="all")
        z = sample_euler(fn, noise[start : start + batch], ts) * std + mean  # (b, C, h, w) VA-VAE latents
        images.append(to_uint8(vae.decode(z)))
    return np.concatenate(images), labels.numpy()


@torch.no_grad()
def reconstruct(vavae_export: Path, images: np.ndarray) -> np.ndarray:
    """VA-VAE reconstructions (posterior mean → decoder) of (N, H, W, 3) uint8 images, as uint8."""
    from models.export import load_vavae

    vae = load_vavae(vavae_export).eval()
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1
    return np.concatenate(
        [to_uint8(vae.decode(vae.encode(x[i : i + 256]).mean)) for i in range(0, len(x), 256)]
    )


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """Mean over images of the PSNR (dB) of uint8 images."""
    mse = ((a.astype(np.float64) - b.astype(np.float64)) ** 2).reshape(len(a), -1).mean(axis=1)
    return float(np.mean(10 * np.log10(255.0**2 / np.maximum(mse, 1e-10))))


def save_grid(rows: Sequence[np.ndarray], path: Path, scale: int = 2) -> None:
    """A PNG of equal-length rows of (n, H, W, 3) uint8 images, 1 px apart, enlarged `scale`× (nearest)."""
    from PIL import Image

    h, w = rows[0].shape[1:3]
    n = len(rows[0])
    grid = np.full((len(rows) * (h + 1) + 1, n * (w + 1) + 1, 3), 64, np.uint8)
    for r, row in enumerate(rows):
        for c, image in enumerate(row):
            grid[1 + r * (h + 1) : 1 + r * (h + 1) + h, 1 + c * (w + 1) : 1 + c * (w + 1) + w] = image
    big = Image.fromarray(grid).resize((grid.shape[1] * scale, grid.shape[0] * scale), Image.NEAREST)
    big.save(path)


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
    """The two runs' configs with the demo's folders filled in, written as YAML for `ldit train`."""
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
    folder = paths.out / "configs"
    folder.mkdir(parents=True, exist_ok=True)
    files = []
    for name, run_cfg in (("vavae", vavae), ("dit", dit)):
        path = folder / f"{name}.yaml"
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

    def job(self, name: str, title: str, args: Sequence[str], done: bool) -> None:
        """Stage `name`: `ldit <args> --local <processes>` (as `run_local` starts it), unless `done`."""

        def launch() -> None:
            from slurm.cli import run_local

            _say("   $ ldit " + " ".join(args) + f" --local {self.processes}")
            code = run_local([sys.executable, "-m", "slurm.cli", *args], self.processes)
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
    dit_export = paths.dit / "export" / step_name(cfg.dit.steps)
    stages.job(
        "train-dit", f"train the LightningDiT ({cfg.dit.steps} steps, DeepSpeed ZeRO-2)", ["train", dit_yaml],
        dit_export.is_dir(),
    )  # fmt: skip
    quality = stages.call(
        "quality", "samples, reconstructions and the classifier check",
        lambda: check_quality(cfg, paths, vavae_export, dit_export),
    )  # fmt: skip
    fid = run_fid(cfg, paths, stages)
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
        "losses_off": LOSSES_OFF,
        **quality,
        "fid": fid,
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
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=1, user_api="blas"):  # threaded OpenBLAS crawls when the cores are busy
        return _check_quality(cfg, paths, vavae_export, dit_export)


def _check_quality(cfg: DemoConfig, paths: Layout, vavae_export: Path, dit_export: Path) -> dict:
    train_x, train_y = read_folder(paths.digits / "train")
    held_x, held_y = read_folder(paths.digits / "heldout")
    clf = DigitClassifier.fit(train_x, train_y, cfg.seed)
    held_acc, _ = accuracy(clf.predict(held_x), held_y)
    held_mirror_acc, _ = accuracy(clf.predict(mirrored(held_x)), held_y)
    _say(f"   classifier: held-out accuracy {held_acc:.3f} ({held_mirror_acc:.3f} on their mirror images)")

    recon = reconstruct(vavae_export, held_x)
    recon_acc, _ = accuracy(clf.predict(recon), held_y)
    first = np.concatenate([np.flatnonzero(held_y == c)[:2] for c in range(10)])  # 2 per class
    save_grid([held_x[first], recon[first]], paths.reconstruction_grid, scale=2)

    samples, labels = sample_digits(
        dit_export, vavae_export, paths.latents, cfg.samples_per_class, cfg.cfg_scale, cfg.sample_points,
        cfg.sample_shift, cfg.seed,
    )  # fmt: skip
    sample_acc, per_class = accuracy(clf.predict(samples), labels)
    columns = min(cfg.samples_per_class, 10)
    save_grid([samples[labels == c][:columns] for c in range(10)], paths.sample_grid, scale=2)

    # Fréchet distances in the classifier's hidden features, against held-out digits and their mirrors
    # (the samples face either way, see the module docstring). The real-vs-real figure is its floor at the
    # samples' count: training digits, each mirrored with probability 1/2.
    held_feats = clf.features(np.concatenate([held_x, mirrored(held_x)]))
    rng = np.random.default_rng(cfg.seed)
    pick = rng.choice(len(train_x), size=min(len(samples), len(train_x)), replace=False)
    flip = rng.random(len(pick)) < 0.5
    real = np.where(flip[:, None, None, None], mirrored(train_x[pick]), train_x[pick])
    return {
        "classifier": {
            "kind": "MLP (scikit-learn, 128 ReLU units) on 8x8 grey levels, trained on the training digits + mirrors",
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
            "sample_accuracy": round(sample_acc, 4),
            "sample_accuracy_per_class": [round(a, 4) for a in per_class],
            "frechet_distance_samples_vs_heldout": round(frechet(clf.features(samples), held_feats), 3),
            "frechet_distance_train_vs_heldout": round(frechet(clf.features(real), held_feats), 3),
        },
    }


def run_fid(cfg: DemoConfig, paths: Layout, stages: Stages) -> dict:
    """`ldit ref-stats` of the held-out digits and `ldit eval` of the DiT, when the Inception weights exist."""
    how = (
        "FID skipped: it needs torch-fidelity's Inception weights; on an online machine run "
        "`python -m eval.inception inception.pth`, then `ldit demo inception_weights=inception.pth`"
    )
    if not cfg.inception_weights:
        return {"status": "skipped", "how": how}
    if not Path(cfg.inception_weights).is_file():
        raise ConfigError(f"inception_weights={cfg.inception_weights} does not exist. {how}")
    reference = paths.out / "heldout-reference.npz"
    stages.job(
        "prep-heldout", "prep-images: held-out digits → image shards",
        ["prep-images", f"src={paths.digits / 'heldout'}", f"out={paths.heldout_images}",
         f"shard_samples={cfg.shard_samples}"],
        (paths.heldout_images / "manifest.json").is_file(),
    )  # fmt: skip
    stages.job(
        "ref-stats", "ref-stats: FID statistics of the held-out digits",
        ["ref-stats", f"images={paths.heldout_images}", f"out={reference}", f"image_size={cfg.vavae.image_size}",
         f"inception_weights={cfg.inception_weights}"],
        reference.is_file(),
    )  # fmt: skip
    before = set((paths.dit / "eval").glob("*/metrics.json"))
    stages.job(
        "eval", "eval: DiT samples → FID against the held-out digits",
        ["eval", f"run.root={paths.runs}", "run.name=dit", f"step={cfg.dit.steps}", f"reference={reference}",
         f"inception_weights={cfg.inception_weights}", f"num_samples={cfg.fid_samples}", "labels=balanced",
         f"sampler.points={cfg.sample_points}", f"sampler.shift={cfg.sample_shift}",
         f"sampler.cfg_scale={cfg.cfg_scale}", "sampler.cfg_channels=all", "sampler.cfg_interval_start=0"],
        False,
    )  # fmt: skip
    found = sorted(set((paths.dit / "eval").glob("*/metrics.json")) - before) or sorted(
        (paths.dit / "eval").glob(f"{step_name(cfg.dit.steps)}*/metrics.json")
    )
    if not found:
        raise RuntimeError(f"ldit eval wrote no metrics.json under {paths.dit / 'eval'}")
    metrics = json.loads(found[-1].read_text())["metrics"]
    return {"status": "done", "file": str(found[-1]), "fid": metrics["fid"], "metrics": metrics}


def format_summary(s: dict) -> str:
    """The lines `ldit demo` ends with."""
    minutes, seconds = divmod(round(s["wall_time_s"]), 60)
    c, v, d = s["classifier"], s["vavae"], s["dit"]
    per_class = "  ".join(f"{k}: {a:.2f}" for k, a in enumerate(d["sample_accuracy_per_class"]))
    fid = s["fid"]
    if fid["status"] == "skipped":
        fid_line = fid["how"]
    else:
        m = fid["metrics"]
        fid_line = (
            f"FID:                 {m['fid']:.2f} vs held-out digits (sFID {m['sfid']:.2f}, IS {m['inception_score']:.2f}, "
            f"precision {m['precision']:.2f}, recall {m['recall']:.2f}): {fid['file']}"
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
