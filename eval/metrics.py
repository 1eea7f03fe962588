"""Generation metrics as pure math on features: FID, sFID, Inception Score, precision/recall, reference I/O.

Definitions follow the two suites the papers report with (reference §4.2, ecosystem §4):

- **FID** (Heusel et al. 2017): ‖μ1−μ2‖² + tr Σ1 + tr Σ2 − 2 tr (Σ1 Σ2)^{1/2} on the 2048-d pool features.
  The ADM suite takes ``scipy.linalg.sqrtm`` of the non-symmetric product Σ1Σ2, which returned NaN or
  imaginary parts with OpenBLAS ILP64 (LightningDiT issue #97); torch-fidelity takes ``eigvals`` of the
  same non-symmetric product. We only need the trace, and Σ1Σ2 is similar to the symmetric positive
  semi-definite M = Σ1^{1/2} Σ2 Σ1^{1/2}, so tr (Σ1Σ2)^{1/2} = Σ_i √λ_i(M): two symmetric eigendecompositions
  (``numpy.linalg.eigh``, backward stable), no non-symmetric solver, no complex numbers, tiny negative
  eigenvalues from round-off clipped to 0. See :func:`trace_sqrt_product`.
- **sFID** (Nash et al. 2021, ADM suite): the same distance on the 2023-d spatial features (see
  ``eval/inception.py``).
- **Inception Score** (Salimans et al. 2016): exp E_x KL(p(y|x) ‖ p(y)) averaged over 10 splits, on the
  bias-free 1008-way logits, as torch-fidelity's ``isc_features_to_metric`` (shuffled with seed 2020).
- **Precision / recall** (Kynkäänniemi et al. 2019, k = 3), as the ADM suite's ``ManifoldEstimator`` and
  torch-fidelity's ``metric_prc``: a point is on a set's manifold when it lies within the k-th nearest
  neighbour distance (self excluded) of some point of that set. Precision = fraction of generated samples on
  the real manifold; recall = fraction of real samples on the generated manifold.

Distributed use. FID/sFID statistics are mergeable sums (:class:`FeatureStats`: n, Σx, Σxxᵀ in float64), so
each rank accumulates its own images and the job all-reduces the three tensors (constant memory, any
number of images, e.g. a whole training set for reference statistics). Inception Score and precision/recall
need every sample's logits / pool features, so the job gathers those to rank 0 (50k × (2048 + 1008) float32
≈ 610 MB). Plain sums rather than a shifted/Welford update because they all-reduce with one call; float64
keeps the cancellation in Σxxᵀ − nμμᵀ far below FID's reporting precision for Inception features (O(1)).

Reference statistics use the ADM reference-batch ``.npz`` layout (guided-diffusion ``evaluations/evaluator.py``,
``VIRTUAL_imagenet256_labeled.npz``): ``mu``, ``sigma`` (pool), ``mu_s``, ``sigma_s`` (spatial) in float64, and
``arr_0`` = the reference **images** (N×H×W×3 uint8, NHWC), which the ADM evaluator runs through Inception
for precision/recall; ``arr_0`` holds images, not activations. We may add ``pool`` (N×2048 float32, the
pool features of ``arr_0``) as a cache; the ADM evaluator ignores unknown keys, so our files stay readable
by it.
"""

from __future__ import annotations

import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

ArrayLike = np.ndarray | torch.Tensor


def _np64(x: ArrayLike) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().double().numpy()
    return np.asarray(x, dtype=np.float64)


def _psd_eigh(a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Eigendecomposition of the symmetric part of ``a`` with round-off-level eigenvalues set to 0.

    Eigenvalues below ``n · eps · λ_max`` are not resolvable by a backward-stable symmetric solver (its
    absolute error is of that order), so they are treated as 0; negative ones are round-off by definition
    for a PSD matrix.
    """
    a = 0.5 * (a + a.T)
    w, v = np.linalg.eigh(a)
    tol = (
        a.shape[0]
        * np.finfo(np.float64).eps
        * max(float(np.abs(w).max(initial=0.0)), np.finfo(np.float64).tiny)
    )
    return np.where(w > tol, w, 0.0), v


def trace_sqrt_product(sigma1: ArrayLike, sigma2: ArrayLike) -> float:
    """tr (Σ1 Σ2)^{1/2} for symmetric PSD Σ1, Σ2, via eigendecompositions only (no ``sqrtm``).

    Σ1 Σ2 = Σ1^{1/2} (Σ1^{1/2} Σ2 Σ1^{1/2}) Σ1^{-1/2} on the range of Σ1, so its eigenvalues are those of the
    symmetric PSD M = Σ1^{1/2} Σ2 Σ1^{1/2} (also when Σ1 is singular: AB and BA share non-zero eigenvalues),
    and the principal square root has trace Σ_i √λ_i(M). Σ1^{1/2} = V diag(√w) Vᵀ from ``eigh(Σ1)``;
    λ(M) from ``eigh(M)``; both with round-off eigenvalues clipped to 0 (:func:`_psd_eigh`).
    """
    s1, s2 = _np64(sigma1), _np64(sigma2)
    w1, v1 = _psd_eigh(s1)
    root1 = (v1 * np.sqrt(w1)) @ v1.T  # Σ1^{1/2}, (D, D)
    wm, _ = _psd_eigh(root1 @ s2 @ root1)
    return float(np.sqrt(wm).sum())


def frechet_distance(mu1: ArrayLike, sigma1: ArrayLike, mu2: ArrayLike, sigma2: ArrayLike) -> float:
    """Fréchet distance of two Gaussians: ‖μ1−μ2‖² + tr Σ1 + tr Σ2 − 2 tr (Σ1Σ2)^{1/2} (Heusel et al. 2017).

    FID on pool features, sFID on spatial features. Computed in float64; the matrix square root's trace is
    :func:`trace_sqrt_product` (symmetric eigendecompositions), immune to the ``sqrtm`` failure of
    LightningDiT issue #97. The result is clipped at 0 (a distance; tiny negatives are round-off).
    """
    m1, m2, s1, s2 = _np64(mu1), _np64(mu2), _np64(sigma1), _np64(sigma2)
    if m1.ndim != 1 or m1.shape != m2.shape or s1.shape != (m1.size, m1.size) or s1.shape != s2.shape:
        raise ValueError(
            f"mean/covariance shapes do not match: mu {m1.shape} vs {m2.shape}, sigma {s1.shape} vs {s2.shape}"
        )
    diff = m1 - m2
    fd = float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * trace_sqrt_product(s1, s2))
    return max(fd, 0.0)


def mean_cov(features: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """Mean and unbiased covariance of (N, D) features in float64 (``np.mean``, ``np.cov(rowvar=False)``)."""
    f = _np64(features)
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"need (N >= 2, D) features, got shape {f.shape}")
    return f.mean(axis=0), np.cov(f, rowvar=False)


@dataclass
class FeatureStats:
    """Mergeable first and second moments of features: n, Σx and Σxxᵀ in float64 (FID / sFID statistics).

    Each rank calls :meth:`update` on its batches; the job then sums ``n``, ``sum`` and ``sum_outer`` over
    ranks (``dist.all_reduce`` on each tensor, in place) or calls :meth:`merge`. :meth:`mean_cov` gives
    μ and the unbiased Σ, equal to ``np.mean`` / ``np.cov`` of the concatenated features.
    """

    n: torch.Tensor
    """Number of feature vectors, a float64 scalar tensor (so it all-reduces like the sums)."""
    sum: torch.Tensor
    """Σx, (D,) float64."""
    sum_outer: torch.Tensor
    """Σxxᵀ, (D, D) float64."""

    @classmethod
    def zeros(cls, dim: int, device: torch.device | str = "cpu") -> FeatureStats:
        """Empty statistics of D-dimensional features on ``device``."""
        kw = {"dtype": torch.float64, "device": device}
        return cls(torch.zeros((), **kw), torch.zeros(dim, **kw), torch.zeros(dim, dim, **kw))

    def update(self, features: torch.Tensor) -> None:
        """Add a (B, D) batch of features."""
        if features.ndim != 2 or features.shape[1] != self.sum.shape[0]:
            raise ValueError(f"expected (B, {self.sum.shape[0]}) features, got {tuple(features.shape)}")
        f = features.to(device=self.sum.device, dtype=torch.float64)
        self.n += f.shape[0]
        self.sum += f.sum(dim=0)
        self.sum_outer += f.T @ f

    def merge(self, other: FeatureStats) -> None:
        """Add another accumulator's moments (e.g. another rank's)."""
        self.n += other.n.to(self.n.device)
        self.sum += other.sum.to(self.sum.device)
        self.sum_outer += other.sum_outer.to(self.sum_outer.device)

    def mean_cov(self) -> tuple[np.ndarray, np.ndarray]:
        """μ = Σx/n and Σ = (Σxxᵀ − n μμᵀ)/(n − 1), as float64 numpy arrays."""
        n = float(self.n.item())
        if n < 2:
            raise ValueError(f"need at least 2 feature vectors for a covariance, have {n:g}")
        s, ss = self.sum.cpu().numpy(), self.sum_outer.cpu().numpy()
        mu = s / n
        sigma = (ss - n * np.outer(mu, mu)) / (n - 1)
        return mu, 0.5 * (sigma + sigma.T)


def inception_score(
    logits: ArrayLike, splits: int = 10, shuffle: bool = True, seed: int = 2020
) -> tuple[float, float]:
    """Inception Score mean and std over ``splits`` splits (Salimans et al. 2016), as torch-fidelity.

    ``logits`` are the bias-free 1008-way logits (torch-fidelity ``logits_unbiased``; the ADM suite's
    softmax graph also multiplies pool_3 by the weights only). Split i is rows [i·N/splits, (i+1)·N/splits)
    after a ``np.random.RandomState(seed).permutation`` when ``shuffle`` (torch-fidelity's defaults:
    10 splits, shuffle, seed 2020). The ADM suite uses fixed splits of 5000 without shuffling, which for
    N = 50k is ``splits=10, shuffle=False``.
    """
    x = torch.as_tensor(logits).detach().cpu().double()
    if x.ndim != 2 or x.shape[0] < splits:
        raise ValueError(f"need (N >= splits={splits}, C) logits, got shape {tuple(x.shape)}")
    n = x.shape[0]
    if shuffle:
        x = x[torch.from_numpy(np.random.RandomState(seed).permutation(n))]
    p, log_p = x.softmax(dim=1), x.log_softmax(dim=1)
    scores = []
    for i in range(splits):
        lo, hi = i * n // splits, (i + 1) * n // splits
        p_c, log_p_c = p[lo:hi], log_p[lo:hi]
        log_q = p_c.mean(dim=0, keepdim=True).log()
        scores.append((p_c * (log_p_c - log_q)).sum(dim=1).mean().exp().item())
    return float(np.mean(scores)), float(np.std(scores))


def _kth_nn_dist(x: torch.Tensor, k: int, batch_size: int) -> torch.Tensor:
    """Distance of each row of x to its k-th nearest other row (self, at distance 0, excluded)."""
    return torch.cat(
        [torch.cdist(rows, x).kthvalue(k + 1, dim=1).values for rows in x.split(batch_size)]
    )  # (N,)


def _on_manifold(
    points: torch.Tensor, ref: torch.Tensor, radii: torch.Tensor, batch_size: int
) -> torch.Tensor:
    """Whether each point lies within radii[j] of some ref[j] (inclusive, as both reference suites)."""
    out = []
    for rows in points.split(batch_size):
        inside = torch.zeros(rows.shape[0], dtype=torch.bool, device=rows.device)
        for cols, r in zip(ref.split(batch_size), radii.split(batch_size)):
            inside |= (torch.cdist(rows, cols) <= r[None, :]).any(dim=1)
        out.append(inside)
    return torch.cat(out)


def precision_recall(
    real: ArrayLike,
    fake: ArrayLike,
    k: int = 3,
    batch_size: int = 10000,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019) with k = 3, as the ADM suite and torch-fidelity.

    Precision = mean over fake x of [∃ real r: ‖x − r‖ ≤ NN_k(r, real)]; recall = the same with the roles
    swapped. NN_k is the k-th nearest neighbour distance within the set, the point itself excluded (ADM's
    ``np.partition(...)[:, k]`` and torch-fidelity's ``kthvalue(k + 1)``). Distances are computed in
    ``dtype`` in blocks of ``batch_size`` rows, on ``device`` (default: that of ``real`` if it is a tensor,
    else the CPU). float32 by default, as torch-fidelity's ``torch.cdist``; the ADM suite even computes them
    in float16 (float32 only if that overflows), and float64 would make the 50k × 50k × 2048 distances of a
    full evaluation ~30× slower on most GPUs.
    """
    if device is None:
        device = real.device if isinstance(real, torch.Tensor) else "cpu"
    dev = torch.device(device)
    r = torch.as_tensor(real).to(device=dev, dtype=dtype)
    f = torch.as_tensor(fake).to(device=dev, dtype=dtype)
    if r.ndim != 2 or f.ndim != 2 or r.shape[1] != f.shape[1]:
        raise ValueError(f"need (N, D) features of equal D, got {tuple(r.shape)} and {tuple(f.shape)}")
    if min(r.shape[0], f.shape[0]) <= k:
        raise ValueError(f"need more than k={k} samples per set, got {r.shape[0]} real and {f.shape[0]} fake")
    radii_real, radii_fake = _kth_nn_dist(r, k, batch_size), _kth_nn_dist(f, k, batch_size)
    precision = _on_manifold(f, r, radii_real, batch_size).double().mean().item()
    recall = _on_manifold(r, f, radii_fake, batch_size).double().mean().item()
    return precision, recall


@dataclass
class ReferenceStats:
    """FID reference statistics in the ADM reference-batch layout (keys named after the ``.npz`` keys)."""

    mu: np.ndarray
    """Pool-feature mean, (2048,) float64."""
    sigma: np.ndarray
    """Pool-feature covariance, (2048, 2048) float64."""
    mu_s: np.ndarray | None = None
    """Spatial-feature mean for sFID, (2023,) float64."""
    sigma_s: np.ndarray | None = None
    """Spatial-feature covariance for sFID, (2023, 2023) float64."""
    pool: np.ndarray | None = None
    """Pool features of the reference images (``arr_0``) for precision/recall, (N, 2048) float32 (our key)."""


_STAT_KEYS = ("mu", "sigma", "mu_s", "sigma_s")


def save_reference(path: str | Path, stats: ReferenceStats, images: np.ndarray | None = None) -> None:
    """Write an ADM-layout reference ``.npz``: mu, sigma[, mu_s, sigma_s][, pool][, arr_0 = NHWC uint8 images]."""
    arrays: dict[str, np.ndarray] = {
        "mu": np.asarray(stats.mu, np.float64),
        "sigma": np.asarray(stats.sigma, np.float64),
    }
    if (stats.mu_s is None) != (stats.sigma_s is None):
        raise ValueError("mu_s and sigma_s go together (sFID needs both)")
    if stats.mu_s is not None:
        arrays["mu_s"] = np.asarray(stats.mu_s, np.float64)
        arrays["sigma_s"] = np.asarray(stats.sigma_s, np.float64)
    if stats.pool is not None:
        arrays["pool"] = np.asarray(stats.pool, np.float32)
    if images is not None:
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(
                f"arr_0 must be (N, H, W, 3) uint8 images (ADM layout), got {images.shape} {images.dtype}"
            )
        arrays["arr_0"] = images
    with open(path, "wb") as fh:  # a file handle: np.savez would append ".npz" to a str path without it
        np.savez(fh, **arrays)


def load_reference(path: str | Path) -> ReferenceStats:
    """Read mu, sigma (required) and mu_s, sigma_s, pool (optional) from a reference ``.npz``; never ``arr_0``.

    An ADM sample batch, or any file without ``mu``/``sigma``, is refused with the keys it has: compute its
    statistics with ``ldit ref-stats`` (the ADM evaluator would compute them from ``arr_0`` on the fly).
    """
    with np.load(path) as npz:
        keys = set(npz.files)
        if not {"mu", "sigma"} <= keys:
            raise ValueError(
                f"{path} has no FID statistics (keys: {sorted(keys)}); an ADM reference batch has 'mu' and "
                "'sigma'. Compute them with `ldit ref-stats`."
            )
        got = {k: np.asarray(npz[k], np.float64) for k in _STAT_KEYS if k in keys}
        pool = np.asarray(npz["pool"], np.float32) if "pool" in keys else None
    return ReferenceStats(got["mu"], got["sigma"], got.get("mu_s"), got.get("sigma_s"), pool)


def _npy_member(zf: zipfile.ZipFile, key: str) -> tuple[zipfile.ZipExtFile, tuple[int, ...], np.dtype]:
    name = f"{key}.npy"
    if name not in zf.namelist():
        raise KeyError(
            f"no {key!r} in {zf.filename} (keys: {sorted(n.removesuffix('.npy') for n in zf.namelist())})"
        )
    fh = zf.open(name)
    version = np.lib.format.read_magic(fh)
    if version == (1, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_1_0(fh)
    elif version == (2, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_2_0(fh)
    else:
        raise ValueError(f"{key} in {zf.filename} uses .npy format {version}; expected 1.0 or 2.0")
    if fortran or dtype.hasobject:
        raise ValueError(
            f"{key} in {zf.filename} is Fortran-ordered or of object dtype; expected C-ordered uint8"
        )
    return fh, shape, dtype


def reference_num_images(path: str | Path) -> int:
    """Number of images in a reference ``.npz``'s ``arr_0``, read from its header only."""
    with zipfile.ZipFile(path) as zf:
        fh, shape, _ = _npy_member(zf, "arr_0")
        fh.close()
        return int(shape[0])


def iter_reference_images(
    path: str | Path, batch_size: int, start: int = 0, stop: int | None = None
) -> Iterator[np.ndarray]:
    """Stream ``arr_0[start:stop]`` of an ADM ``.npz`` in (B, H, W, 3) uint8 batches without loading it whole.

    The ADM reference batch holds 10k 256² images (about 2 GB); ranks can each read a slice.
    """
    with zipfile.ZipFile(path) as zf:
        fh, shape, dtype = _npy_member(zf, "arr_0")
        with fh:
            n = shape[0]
            stop = n if stop is None else min(stop, n)
            row = int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize
            if start > 0:
                fh.seek(fh.tell() + start * row)
            for lo in range(start, stop, batch_size):
                b = min(batch_size, stop - lo)
                buf = fh.read(b * row)
                if len(buf) != b * row:
                    raise ValueError(f"{path}: arr_0 ends early (wanted {b} images at index {lo})")
                yield np.frombuffer(buf, dtype=dtype).reshape(b, *shape[1:])
