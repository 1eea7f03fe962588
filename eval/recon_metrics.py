"""VA-VAE reconstruction metrics: PSNR, SSIM and an LPIPS hook, as pure per-image functions (reference §1.5).

The reference's ``evaluate_tokenizer.py`` protocol (§1.5): PSNR on the saved uint8 PNGs,
20·log10(255/√MSE) per image, then averaged over images; SSIM with torchmetrics'
``StructuralSimilarityIndexMeasure(data_range=(-1, 1))`` on [-1, 1] tensors; LPIPS with the VGG LPIPS of the
reference (our ``models.lpips.LPIPS``, [-1, 1] inputs). rFID uses the same Inception features and FID as
generation (``eval/inception.py``, ``eval/metrics.py``).

SSIM is written here (torchmetrics is not a dependency of the project, and pulling it in for one
40-line function is not worth it). It is torchmetrics' default SSIM (Wang et al. 2004, eq. 13): an 11×11
Gaussian window with σ = 1.5 (size int(3.5σ + 0.5)·2 + 1), K1 = 0.01, K2 = 0.03, inputs clamped to
``data_range``, population (not sample) variances, the map averaged over channels and pixels per image.
torchmetrics changed how it treats the image border in 1.4.0 (read from the 1.3.0 and 1.4.2 wheels):
1.4 and later (1.9.0 included) reflect-pad the images by 5 (``F.pad(mode="reflect")``) and average the
whole H×W map; 1.3 and earlier, like scikit-image, keep the map only where the window lies inside the
image. ``border="reflect"``, the default, is the former: the reference's requirements leave torchmetrics
unpinned and its code dates from late 2024, after 1.4.0. ``border="valid"`` is the latter, and equals
``skimage.metrics.structural_similarity(gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
data_range=2)`` (tests/test_metrics.py). On 256² photographs the two differ by about 0.01.
Every function returns one value per image, (B,) float64; the caller averages across images and ranks.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn


def _check_pair(x: torch.Tensor, y: torch.Tensor) -> None:
    if x.shape != y.shape or x.ndim != 4:
        raise ValueError(
            f"expected two (B, C, H, W) images of equal shape, got {tuple(x.shape)} and {tuple(y.shape)}"
        )


def uint8_to_signed(images: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] → float32 [-1, 1] (x/127.5 − 1), the range of the reference's SSIM and LPIPS inputs."""
    return images.float() / 127.5 - 1.0


def psnr_uint8(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR of uint8 (B, C, H, W) images: 20·log10(255/√MSE) in dB, (B,) float64 (reference §1.5).

    MSE is over all channels and pixels of an image; identical images give +inf (so does their mean).
    """
    _check_pair(x, y)
    if x.dtype != torch.uint8 or y.dtype != torch.uint8:
        raise ValueError(f"PSNR follows the reference on uint8 PNG values; got {x.dtype} and {y.dtype}")
    mse = (x.double() - y.double()).pow(2).flatten(1).mean(dim=1)
    return 20.0 * torch.log10(255.0 / mse.sqrt())


def _gaussian_window(sigma: float, dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, int]:
    size = int(3.5 * sigma + 0.5) * 2 + 1  # torchmetrics' Gaussian kernel size: 11 for σ = 1.5
    d = torch.arange((1 - size) / 2, (1 + size) / 2, 1.0, dtype=dtype, device=device)
    g = torch.exp(-((d / sigma) ** 2) / 2)
    g = g / g.sum()
    return torch.outer(g, g), size  # (size, size)


def ssim(
    x: torch.Tensor,
    y: torch.Tensor,
    data_range: tuple[float, float] = (-1.0, 1.0),
    sigma: float = 1.5,
    k1: float = 0.01,
    k2: float = 0.03,
    border: Literal["reflect", "valid"] = "reflect",
) -> torch.Tensor:
    """Per-image SSIM (Wang et al. 2004) of float (B, C, H, W) images in ``data_range``, (B,) float64.

    Defaults reproduce the reference's torchmetrics call (``data_range=(-1, 1)`` on [-1, 1] tensors): the
    inputs are clamped to the range and L = hi − lo gives C1 = (K1·L)², C2 = (K2·L)². Computed in float64.
    ``border``: "reflect" averages the whole H×W map of the images reflect-padded by the window radius
    (torchmetrics ≥ 1.4); "valid" only the (H − 10)×(W − 10) positions where the window fits inside the
    image (torchmetrics ≤ 1.3, scikit-image). See the module docstring.
    """
    _check_pair(x, y)
    if border not in ("reflect", "valid"):
        raise ValueError(
            f"border must be 'reflect' (torchmetrics >= 1.4) or 'valid' (scikit-image), got {border!r}"
        )
    lo, hi = data_range
    x = x.double().clamp(lo, hi)
    y = y.double().clamp(lo, hi)
    window, size = _gaussian_window(sigma, torch.float64, x.device)
    if x.shape[-1] < size or x.shape[-2] < size:
        raise ValueError(
            f"images must be at least {size}×{size} for a σ={sigma} window, got {tuple(x.shape[-2:])}"
        )
    if border == "reflect":
        pad = (size - 1) // 2
        x, y = (F.pad(t, (pad, pad, pad, pad), mode="reflect") for t in (x, y))  # (B, C, H+10, W+10)
    c = x.shape[1]
    kernel = window.expand(c, 1, size, size)
    stats = F.conv2d(torch.cat([x, y, x * x, y * y, x * y]), kernel, groups=c)  # (5B, C, H', W')
    mu_x, mu_y, xx, yy, xy = stats.split(x.shape[0])
    var_x = (xx - mu_x**2).clamp_min(0.0)
    var_y = (yy - mu_y**2).clamp_min(0.0)
    cov = xy - mu_x * mu_y
    c1, c2 = (k1 * (hi - lo)) ** 2, (k2 * (hi - lo)) ** 2
    ssim_map = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return ssim_map.flatten(1).mean(dim=1)


@torch.no_grad()
def lpips_distance(lpips: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-image LPIPS with a given LPIPS module (``models.lpips.LPIPS``: [-1, 1] inputs → (B, 1, 1, 1)), (B,) float64.

    Images are moved to the module's device; the module is not built here so the caller chooses its weights
    (``vavae.vgg16_weights``, ``vavae.lpips_weights``) and device.
    """
    _check_pair(x, y)
    dev = next(lpips.parameters()).device
    return lpips(x.to(dev), y.to(dev)).flatten().double().cpu()
