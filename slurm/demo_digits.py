"""The demo's digits: where it writes, the dataset, and the quality measures that need no downloaded weights.

The data are scikit-learn's handwritten digits (`sklearn.datasets.load_digits`: 1,797 8×8 images of 10
classes, shipped inside the package, so nothing is downloaded), written as an ImageNet-style folder (one
sub-folder per class, RGB PNGs upscaled to `vavae.image_size`) with a seeded, stratified held-out split
that no training stage sees.

Quality without downloaded weights: an MLP classifier (scikit-learn) is trained on the training digits and
their mirror images, and scores (a) its accuracy on class-conditional samples of the DiT (EMA weights,
CFG, decoded by the VA-VAE), per class and overall, and (b) the Fréchet distance between samples and
held-out digits in its hidden-layer feature space (`eval.metrics.frechet_distance`). Mirror images
because the DiT trains, as the reference does (§5), on each latent or its horizontal flip with
probability 1/2: its samples face either way, and the classifier should judge which digit, not which way
it faces. For the same reason the held-out set of the Fréchet distance holds each digit and its mirror.
The demo's quality stage measures the final export with :class:`Judge`, and its eval follower
(slurm/demo_follow.py) every milestone export with the same code, so the curve's last point is the
summary's figure.
"""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch


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

    @property
    def curve(self) -> Path:
        """Copy of the DiT's milestone curve of the classifier measures, beside the sample grid."""
        return self.out / "curve.png"

    @property
    def fid_curve(self) -> Path:
        """Copy of the DiT's milestone FID curve (with `inception_weights`), beside the sample grid."""
        return self.out / "curve-fid.png"

    @property
    def configs(self) -> Path:
        """The YAML files the demo's jobs run with: vavae.yaml, dit.yaml, and demo.yaml for its follower."""
        return self.out / "configs"

    @property
    def reference(self) -> Path:
        """FID statistics of the held-out digits (with `inception_weights`)."""
        return self.out / "heldout-reference.npz"


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


KIND = "MLP (scikit-learn, 128 ReLU units) on 8x8 grey levels, trained on the training digits + mirrors"
"""The classifier, as the summary and each milestone's metrics.json name it."""


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
# The measures of one set of samples, shared by the quality stage and the eval follower


@contextmanager
def one_thread() -> Iterator[None]:
    """Torch and BLAS on one thread inside: the figures do not depend on the process's thread count (the
    follower and the quality stage run in different processes), and threaded OpenBLAS crawls when the
    cores are busy."""
    from threadpoolctl import threadpool_limits

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with threadpool_limits(limits=1, user_api="blas"):
            yield
    finally:
        torch.set_num_threads(before)


@dataclass
class Judge:
    """The classifier of the demo's digits and the held-out features the samples are measured against."""

    clf: DigitClassifier
    train: tuple[np.ndarray, np.ndarray]
    """Training digits (N, H, W, 3) uint8 and labels (N,)."""
    heldout: tuple[np.ndarray, np.ndarray]
    """Held-out digits and labels."""
    heldout_features: np.ndarray
    """(2M, 128) classifier features of the M held-out digits and their mirror images."""

    @classmethod
    def of(cls, digits: Path, seed: int) -> Judge:
        """Fit the classifier on `digits`/train (seeded: the same classifier in every process)."""
        train_x, train_y = read_folder(digits / "train")
        held_x, held_y = read_folder(digits / "heldout")
        clf = DigitClassifier.fit(train_x, train_y, seed)
        feats = clf.features(np.concatenate([held_x, mirrored(held_x)]))
        return cls(clf, (train_x, train_y), (held_x, held_y), feats)

    def samples(self, images: np.ndarray, labels: np.ndarray) -> dict[str, float | list[float]]:
        """Sample accuracy (overall and per class) and the Fréchet distance to the held-out digits, unrounded."""
        acc, per_class = accuracy(self.clf.predict(images), labels)
        return {
            "sample_accuracy": acc,
            "sample_accuracy_per_class": per_class,
            "frechet_distance": frechet(self.clf.features(images), self.heldout_features),
        }
