"""Metric math on features with known answers: FID closed forms and sqrtm robustness, IS, precision/recall,
reference .npz I/O, and the reconstruction metrics (PSNR, SSIM, LPIPS hook). No Inception here."""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch
from torch_fidelity.metric_fid import fid_statistics_to_metric
from torch_fidelity.metric_isc import isc_features_to_metric
from torch_fidelity.metric_prc import calculate_precision_recall_full

from eval.metrics import (
    FeatureStats,
    ReferenceStats,
    frechet_distance,
    inception_score,
    iter_reference_images,
    load_reference,
    mean_cov,
    precision_recall,
    reference_num_images,
    save_reference,
    trace_sqrt_product,
)
from eval.recon_metrics import lpips_distance, psnr_uint8, ssim, uint8_to_signed
from models.lpips import LPIPS


def _orthogonal(d: int, seed: int) -> np.ndarray:
    q, _ = np.linalg.qr(np.random.default_rng(seed).standard_normal((d, d)))
    return q


def _spd(d: int, seed: int) -> np.ndarray:
    """A well-conditioned SPD matrix (eigenvalues in [0.5, 2])."""
    q = _orthogonal(d, seed)
    return (q * np.random.default_rng(seed + 1).uniform(0.5, 2.0, d)) @ q.T


def _scipy_trace_sqrt(s1: np.ndarray, s2: np.ndarray) -> complex:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # singular-matrix and deprecation warnings are the point here
        out = scipy.linalg.sqrtm(s1 @ s2)
    return complex(np.trace(out[0] if isinstance(out, tuple) else out))


# ---------------------------------------------------------------- FID


def test_fid_of_commuting_gaussians_is_closed_form() -> None:
    """Σ1 = Q diag(a) Qᵀ, Σ2 = Q diag(b) Qᵀ: FD = ‖Δμ‖² + Σ_i (√a_i − √b_i)² (Dowson & Landau 1982)."""
    d = 64
    q = _orthogonal(d, 0)
    rng = np.random.default_rng(1)
    a, b = rng.uniform(0.1, 5.0, d), rng.uniform(0.1, 5.0, d)
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    expected = float(((mu1 - mu2) ** 2).sum() + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum())
    got = frechet_distance(mu1, (q * a) @ q.T, mu2, (q * b) @ q.T)
    assert got == pytest.approx(expected, rel=1e-11)


def test_fid_of_two_1d_and_isotropic_gaussians() -> None:
    """1-D: (m1 − m2)² + (s1 − s2)²; isotropic: ‖Δμ‖² + D (σ1 − σ2)²."""
    assert frechet_distance([1.0], [[4.0]], [3.0], [[9.0]]) == pytest.approx(4.0 + 1.0, rel=1e-14)
    d = 32
    got = frechet_distance(np.zeros(d), 4.0 * np.eye(d), np.ones(d), 0.25 * np.eye(d))
    assert got == pytest.approx(d + d * (2.0 - 0.5) ** 2, rel=1e-13)


def test_fid_matches_scipy_and_torch_fidelity_on_well_conditioned_covariances() -> None:
    d = 96
    s1, s2 = _spd(d, 2), _spd(d, 5)
    mu1, mu2 = np.random.default_rng(3).standard_normal((2, d))
    ours = trace_sqrt_product(s1, s2)
    assert ours == pytest.approx(_scipy_trace_sqrt(s1, s2).real, rel=1e-11)
    tf = fid_statistics_to_metric({"mu": mu1, "sigma": s1}, {"mu": mu2, "sigma": s2}, verbose=False)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(tf["frechet_inception_distance"], rel=1e-10)


def test_trace_sqrt_on_rank_deficient_covariances_is_exact_where_sqrtm_is_not() -> None:
    """Sample covariances from N < D points (rank N − 1 at most): the near-singular case of issue #97.

    Exact answer by another route: with Σ1 = AAᵀ, Σ2 = BBᵀ, tr (Σ1Σ2)^{1/2} = ‖BᵀA‖_* (sum of singular
    values of an N×N matrix). scipy's ``sqrtm`` of the singular, non-symmetric product returns a complex
    matrix whose trace is off by ~1e-7 relative here (worse with other BLAS builds, issue #97); ours is
    exact to round-off.
    """
    rng = np.random.default_rng(0)
    d, n = 256, 16
    a = rng.standard_normal((d, n)) * rng.uniform(0.1, 10.0, (d, 1))
    b = rng.standard_normal((d, n)) * rng.uniform(0.1, 10.0, (d, 1)) + 0.5 * a
    s1, s2 = a @ a.T, b @ b.T
    exact = float(np.linalg.svd(b.T @ a, compute_uv=False).sum())
    ours = trace_sqrt_product(s1, s2)
    assert ours == pytest.approx(exact, rel=1e-12)
    sp = _scipy_trace_sqrt(s1, s2)
    scipy_err = abs(sp - exact) / exact if np.isfinite(sp) else math.inf
    assert scipy_err > 1e-10, "scipy's sqrtm became exact on singular products; revisit this test's premise"


def test_fid_of_a_set_against_itself_is_zero_even_with_fewer_samples_than_dims() -> None:
    rng = np.random.default_rng(4)
    feats = rng.standard_normal((40, 128)) * rng.uniform(0.1, 3.0, 128) + 1.0  # rank-39 covariance
    mu, sigma = mean_cov(feats)
    assert frechet_distance(mu, sigma, mu, sigma) < 1e-10 * np.trace(sigma)
    full_mu, full_sigma = mean_cov(rng.standard_normal((4000, 16)))
    assert frechet_distance(full_mu, full_sigma, full_mu, full_sigma) < 1e-12


def test_fid_of_sampled_gaussians_approaches_the_population_value() -> None:
    """Samples of N(0, I) and N(m·1, 4I) in 8-D: FD → 8 m² + 8 (2 − 1)² as N grows."""
    rng = np.random.default_rng(5)
    x = rng.standard_normal((200_000, 8))
    y = 0.5 + 2.0 * rng.standard_normal((200_000, 8))
    got = frechet_distance(*mean_cov(x), *mean_cov(y))
    assert got == pytest.approx(8 * 0.25 + 8 * 1.0, rel=5e-3)


def test_fid_rejects_mismatched_shapes() -> None:
    with pytest.raises(ValueError, match="shapes do not match"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


def test_feature_stats_merged_across_ranks_equal_numpy_cov() -> None:
    rng = np.random.default_rng(6)
    feats = torch.from_numpy(rng.standard_normal((300, 24)).astype(np.float32) * 3 + 5)
    ranks = [FeatureStats.zeros(24) for _ in range(3)]
    for i, chunk in enumerate(feats.split(37)):  # uneven batches, round-robin over 3 "ranks"
        ranks[i % 3].update(chunk)
    total = FeatureStats.zeros(24)
    for r in ranks:
        total.merge(r)
    mu, sigma = total.mean_cov()
    ref_mu, ref_sigma = mean_cov(feats)
    assert total.n.item() == 300
    np.testing.assert_allclose(mu, ref_mu, rtol=1e-12)
    np.testing.assert_allclose(sigma, ref_sigma, rtol=1e-9, atol=1e-12)
    with pytest.raises(ValueError, match=r"expected \(B, 24\)"):
        total.update(feats[:, :5])


# ---------------------------------------------------------------- Inception Score


def test_inception_score_equals_torch_fidelity() -> None:
    logits = torch.randn(250, 1008, generator=torch.Generator().manual_seed(0)) * 3
    ref = isc_features_to_metric(logits, splits=10, shuffle=True, rng_seed=2020)
    mean, std = inception_score(logits)
    assert mean == pytest.approx(ref["inception_score_mean"], rel=1e-12)
    assert std == pytest.approx(ref["inception_score_std"], rel=1e-9)


def test_inception_score_closed_forms() -> None:
    """Uniform predictions: IS = 1. Each of the m samples of a split confidently in its own class: IS = m."""
    assert inception_score(torch.zeros(100, 1008)) == pytest.approx((1.0, 0.0), abs=1e-12)
    m = 20
    logits = torch.full((10 * m, 1008), -60.0)  # p(other classes) ≈ 1e-26: q never exactly 0
    logits[torch.arange(10 * m), torch.arange(10 * m) % 1008] = 0.0  # a distinct class per sample
    mean, std = inception_score(logits, splits=10, shuffle=False)
    assert mean == pytest.approx(m, rel=1e-9)
    assert std == pytest.approx(0.0, abs=1e-9)


# ---------------------------------------------------------------- precision / recall


def test_precision_recall_identical_and_disjoint_clouds() -> None:
    rng = np.random.default_rng(7)
    cloud = rng.standard_normal((200, 16)).astype(np.float32)
    assert precision_recall(cloud, cloud.copy()) == (1.0, 1.0)
    far = cloud + 100.0
    assert precision_recall(cloud, far) == (0.0, 0.0)


def test_precision_when_half_the_samples_are_off_manifold() -> None:
    """Fake = 100 copies of real points + 100 far away: precision exactly 1/2."""
    rng = np.random.default_rng(8)
    real = rng.standard_normal((200, 16)).astype(np.float32)
    fake = np.concatenate([real[:100], real[100:] + 100.0])
    precision, _ = precision_recall(real, fake)
    assert precision == 0.5


def test_precision_recall_equal_torch_fidelity_with_small_blocks() -> None:
    rng = np.random.default_rng(9)
    real = torch.from_numpy(rng.standard_normal((300, 32)).astype(np.float32))
    fake = torch.from_numpy((1.3 * rng.standard_normal((260, 32)) + 0.4).astype(np.float32))
    ref_p, ref_r = calculate_precision_recall_full(fake, real, neighborhood=3)
    ours = precision_recall(real, fake, batch_size=64)
    assert ours == pytest.approx((ref_p, ref_r), rel=1e-6)  # torch-fidelity averages in float32
    assert 0.05 < ours[0] < 0.95 and 0.05 < ours[1] < 0.99


# ---------------------------------------------------------------- reference .npz


def test_reference_npz_roundtrip_and_streamed_images(tmp_path: Path) -> None:
    rng = np.random.default_rng(10)
    images = rng.integers(0, 256, (23, 8, 8, 3), dtype=np.uint8)
    stats = ReferenceStats(
        mu=rng.standard_normal(5),
        sigma=_spd(5, 11),
        mu_s=rng.standard_normal(4),
        sigma_s=_spd(4, 12),
        pool=rng.standard_normal((23, 5)).astype(np.float32),
    )
    path = tmp_path / "ref.npz"
    save_reference(path, stats, images)
    with np.load(path) as npz:  # the ADM evaluator's keys
        assert {"mu", "sigma", "mu_s", "sigma_s", "arr_0"} <= set(npz.files)
        assert npz["arr_0"].dtype == np.uint8 and npz["mu"].dtype == np.float64
    back = load_reference(path)
    for key in ("mu", "sigma", "mu_s", "sigma_s", "pool"):
        np.testing.assert_array_equal(getattr(back, key), getattr(stats, key))
    assert reference_num_images(path) == 23
    np.testing.assert_array_equal(np.concatenate(list(iter_reference_images(path, 5))), images)
    sliced = list(iter_reference_images(path, 4, start=6, stop=15))
    assert [len(b) for b in sliced] == [4, 4, 1]
    np.testing.assert_array_equal(np.concatenate(sliced), images[6:15])


def test_reference_reads_compressed_adm_style_files_and_names_missing_keys(tmp_path: Path) -> None:
    rng = np.random.default_rng(13)
    images = rng.integers(0, 256, (7, 4, 4, 3), dtype=np.uint8)
    path = tmp_path / "samples.npz"
    np.savez_compressed(path, arr_0=images)  # an ADM *sample* batch: images only
    np.testing.assert_array_equal(np.concatenate(list(iter_reference_images(path, 3, start=2))), images[2:])
    with pytest.raises(ValueError, match=r"no FID statistics \(keys: \['arr_0'\]\).*ldit ref-stats"):
        load_reference(path)
    only_stats = tmp_path / "stats.npz"
    save_reference(only_stats, ReferenceStats(np.zeros(3), np.eye(3)))
    assert load_reference(only_stats).mu_s is None
    with pytest.raises(KeyError, match="no 'arr_0'"):
        reference_num_images(only_stats)


# ---------------------------------------------------------------- reconstruction metrics


def test_psnr_identical_and_constant_offset() -> None:
    x = torch.randint(10, 200, (3, 3, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    assert torch.isinf(psnr_uint8(x, x)).all()
    offsets = torch.tensor([1, 5, 40], dtype=torch.uint8)
    y = x + offsets[:, None, None, None]
    expected = [20 * math.log10(255 / d) for d in (1, 5, 40)]  # MSE = d² per image
    np.testing.assert_allclose(psnr_uint8(x, y).numpy(), expected, rtol=1e-13)
    with pytest.raises(ValueError, match="uint8"):
        psnr_uint8(x.float(), y.float())


def test_ssim_identical_constant_and_range() -> None:
    g = torch.Generator().manual_seed(1)
    x = torch.rand(2, 3, 24, 24, generator=g) * 2 - 1
    np.testing.assert_allclose(ssim(x, x).numpy(), 1.0, rtol=0, atol=1e-12)
    # Constant images a, b: variances and covariance vanish, SSIM = (2ab + C1)/(a² + b² + C1), C1 = (0.01·2)².
    a, b, c1 = 0.3, -0.2, (0.01 * 2) ** 2
    got = ssim(torch.full((1, 3, 16, 16), a), torch.full((1, 3, 16, 16), b))
    assert got.item() == pytest.approx((2 * a * b + c1) / (a * a + b * b + c1), rel=1e-6)  # float32 inputs
    noisy = (x + 0.3 * torch.randn(x.shape, generator=g)).clamp(-1, 1)
    s = ssim(x, noisy)
    assert s.shape == (2,) and (s < 0.9).all() and (s > 0.0).all()
    u8 = torch.randint(0, 256, (1, 3, 16, 16), dtype=torch.uint8, generator=g)
    assert uint8_to_signed(u8).min() >= -1 and uint8_to_signed(u8).max() <= 1
    with pytest.raises(ValueError, match="at least 11"):
        ssim(x[..., :8, :8], x[..., :8, :8])


def _photo_pairs() -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Nine (clean, degraded) pairs of real photographs as uint8 (9, 3, 256, 256): scikit-image's bundled
    astronaut, coffee and chelsea (center square, bicubic to 256²), each with Gaussian noise (σ = 12 levels),
    a Gaussian blur (PIL radius 2) and JPEG at quality 20."""
    import io

    import skimage.data
    from PIL import Image, ImageFilter

    rng = np.random.default_rng(0)

    def square256(a: np.ndarray) -> np.ndarray:
        side = min(a.shape[:2])
        top, left = (a.shape[0] - side) // 2, (a.shape[1] - side) // 2
        crop = Image.fromarray(a[top : top + side, left : left + side])
        return np.asarray(crop.resize((256, 256), Image.Resampling.BICUBIC))

    def jpeg(a: np.ndarray) -> np.ndarray:
        buf = io.BytesIO()
        Image.fromarray(a).save(buf, "JPEG", quality=20)
        return np.asarray(Image.open(buf).convert("RGB"))

    degrade = {
        "noise": lambda a: np.clip(np.round(a + rng.normal(0, 12, a.shape)), 0, 255).astype(np.uint8),
        "blur": lambda a: np.asarray(Image.fromarray(a).filter(ImageFilter.GaussianBlur(2))),
        "jpeg": jpeg,
    }
    clean, bad, names = [], [], []
    for photo in ("astronaut", "coffee", "chelsea"):
        img = square256(getattr(skimage.data, photo)())
        for kind, fn in degrade.items():
            clean.append(img)
            bad.append(fn(img))
            names.append(f"{photo}/{kind}")
    to_tensor = lambda a: torch.from_numpy(np.stack(a)).permute(0, 3, 1, 2).contiguous()  # noqa: E731
    return to_tensor(clean), to_tensor(bad), names


def test_ssim_equals_torchmetrics_and_scikit_image_on_photographs() -> None:
    """Our SSIM on the reconstruction job's inputs (uint8 → float32 [-1, 1]) against the libraries, per image:

    - default ``border="reflect"`` = torchmetrics 1.9.0 ``structural_similarity_index_measure(data_range=(-1, 1))``
      (the reference's call), given the same values in float64: measured equal to the last bit (0.0);
    - ``border="valid"`` = scikit-image ``structural_similarity(gaussian_weights=True, sigma=1.5,
      use_sample_covariance=False, data_range=2, channel_axis=-1)``: measured 4.4e-16.
    The two borders differ by 0.001–0.011 here, and scikit-image's own default (7×7 uniform window, sample
    covariance) by up to 0.035, so each agreement pins down the settings, not just the formula.
    """
    from skimage.metrics import structural_similarity
    from torchmetrics.functional.image import structural_similarity_index_measure

    clean, bad, names = _photo_pairs()
    x, y = uint8_to_signed(clean), uint8_to_signed(bad)  # float32, as eval/recon.py passes them
    ours, ours_valid = ssim(x, y), ssim(x, y, border="valid")
    assert ours.dtype == torch.float64 and ours.shape == (9,)
    assert ours.min() > 0.5 and ours.max() < 0.9, dict(zip(names, ours.tolist()))  # real degradations

    tm = structural_similarity_index_measure(x.double(), y.double(), data_range=(-1.0, 1.0), reduction="none")
    np.testing.assert_allclose(ours.numpy(), tm.numpy(), rtol=0, atol=1e-12)
    tm32 = structural_similarity_index_measure(x, y, data_range=(-1.0, 1.0), reduction="none")
    np.testing.assert_allclose(
        ours.numpy(), tm32.double().numpy(), rtol=0, atol=2e-5
    )  # its float32 round-off

    xs, ys = (t.permute(0, 2, 3, 1).double().numpy() for t in (x, y))
    sk = [
        structural_similarity(
            a,
            b,
            data_range=2.0,
            channel_axis=-1,
            gaussian_weights=True,
            sigma=1.5,
            use_sample_covariance=False,
        )
        for a, b in zip(xs, ys)
    ]
    np.testing.assert_allclose(ours_valid.numpy(), sk, rtol=0, atol=1e-12)

    border_gap = (ours - ours_valid).abs()
    assert border_gap.max() > 5e-3 and border_gap.min() > 5e-4
    sk_default = [structural_similarity(a, b, data_range=2.0, channel_axis=-1) for a, b in zip(xs, ys)]
    assert np.abs(np.array(sk_default) - sk).max() > 0.01
    with pytest.raises(ValueError, match="border must be 'reflect'"):
        ssim(x, y, border="same")  # type: ignore[arg-type]


def test_lpips_hook_returns_one_value_per_image() -> None:
    torch.manual_seed(0)
    net = LPIPS(pretrained=False)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    d = lpips_distance(net, x, x.flip(-1))
    assert d.shape == (2,) and d.dtype == torch.float64 and (d.abs() > 0).all()  # random heads: any sign
    assert torch.equal(lpips_distance(net, x, x), torch.zeros(2, dtype=torch.float64))
