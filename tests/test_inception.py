"""The FID Inception: our features and metrics equal torch-fidelity's own ``calculate_metrics`` on the same
image folders and the same (random-weight) Inception file; the sFID layer's shape and order; named errors
when the weights are neither given nor downloadable.

Every test runs with the network cut (sockets refuse, the torch hub cache is an empty temporary folder).
"""

from __future__ import annotations

import socket
from pathlib import Path

import numpy as np
import pytest
import torch
import torch_fidelity
import torch_fidelity.metrics
from PIL import Image

from eval.inception import FEATURE_DIMS, WEIGHTS_FILE, InceptionFeatures, extract_features, random_weights
from eval.metrics import FeatureStats, frechet_distance, inception_score, mean_cov, precision_recall
from models.weights import PretrainedWeightsError

N_IMAGES = 30  # per folder; ~9 images/s on 2 idle CPU cores
BATCH = 15


def _refuse(*args: object, **kwargs: object) -> None:
    raise OSError("network disabled in tests")


@pytest.fixture(autouse=True)
def no_network(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(socket.socket, "connect", _refuse)
    monkeypatch.setattr(socket, "create_connection", _refuse)
    monkeypatch.setattr(socket, "getaddrinfo", _refuse)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))


@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return random_weights(tmp_path_factory.mktemp("w") / WEIGHTS_FILE, seed=0)


@pytest.fixture(scope="module")
def net(weights: Path) -> InceptionFeatures:
    return InceptionFeatures(weights, allow_download=False, device=torch.device("cpu"))


def _images(n: int, seed: int, shift: float) -> np.ndarray:
    """Varied small uint8 images (N, 32, 32, 3): a colour, a ramp and noise each, so features differ."""
    rng = np.random.default_rng(seed)
    ramp = np.linspace(-1, 1, 32)[None, :, None, None]
    img = (
        rng.uniform(0, 255, (n, 1, 1, 3))
        + rng.uniform(0, 100, (n, 1, 1, 3)) * ramp.transpose(0, 2, 1, 3) * rng.choice([-1, 1], (n, 1, 1, 1))
        + rng.normal(0, 20, (n, 32, 32, 3))
        + shift
    )
    return np.clip(np.round(img), 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("img")
    out = []
    for name, seed, shift in (("fake", 1, 30.0), ("real", 2, 0.0)):
        folder = root / name
        folder.mkdir()
        for i, im in enumerate(_images(N_IMAGES, seed, shift)):
            Image.fromarray(im).save(folder / f"{i:03d}.png")
        out.append(folder)
    return out[0], out[1]


def _load_folder(folder: Path) -> torch.Tensor:
    """PNGs in sorted path order (torch-fidelity's order), as uint8 (N, 3, H, W)."""
    arrays = [np.asarray(Image.open(p).convert("RGB")) for p in sorted(folder.glob("*.png"))]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


def _centered(features: torch.Tensor) -> torch.Tensor:
    """(D, N) matrix A with AAᵀ = the unbiased covariance of (N, D) features."""
    x = features.double()
    return (x - x.mean(0)).T / (x.shape[0] - 1) ** 0.5


def test_features_and_metrics_equal_torch_fidelity(
    net: InceptionFeatures, weights: Path, folders: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    fake_dir, real_dir = folders
    captured: dict[int, dict[str, torch.Tensor]] = {}
    extract = torch_fidelity.metrics.extract_featuresdict_from_input_id_cached

    def spy(input_id: int, *args: object, **kwargs: object) -> dict[str, torch.Tensor]:
        captured[input_id] = extract(input_id, *args, **kwargs)
        return captured[input_id]

    monkeypatch.setattr(torch_fidelity.metrics, "extract_featuresdict_from_input_id_cached", spy)
    ref = torch_fidelity.calculate_metrics(
        input1=str(fake_dir),
        input2=str(real_dir),
        cuda=False,
        batch_size=BATCH,
        isc=True,
        fid=True,
        prc=True,
        feature_extractor="inception-v3-compat",  # else 0.4.0 computes precision/recall on VGG16 features
        feature_extractor_weights_path=str(weights),
        save_cpu_ram=True,
        cache=False,
        verbose=False,
    )
    fake = extract_features(net, _load_folder(fake_dir), batch_size=BATCH)
    real = extract_features(net, _load_folder(real_dir), batch_size=BATCH)

    assert {k: tuple(v.shape) for k, v in fake.items()} == {k: (N_IMAGES, d) for k, d in FEATURE_DIMS.items()}
    torch.testing.assert_close(fake["pool"], captured[1]["2048"], rtol=1e-6, atol=0)
    torch.testing.assert_close(real["pool"], captured[2]["2048"], rtol=1e-6, atol=0)
    torch.testing.assert_close(fake["logits_unbiased"], captured[1]["logits_unbiased"], rtol=1e-6, atol=0)

    fid = frechet_distance(*mean_cov(fake["pool"]), *mean_cov(real["pool"]))
    is_mean, is_std = inception_score(fake["logits_unbiased"])
    precision, recall = precision_recall(real["pool"], fake["pool"])
    print(
        f"FID ours {fid:.10g} torch-fidelity {ref['frechet_inception_distance']:.10g}; "
        f"IS ours {is_mean:.10g}±{is_std:.4g} torch-fidelity {ref['inception_score_mean']:.10g}; "
        f"P/R ours {precision}/{recall} torch-fidelity {ref['precision']}/{ref['recall']}"
    )
    assert fid > 1.0 and is_mean > 1.05  # non-degenerate features, so agreement means something

    # With N < D = 2048 the covariances have rank N − 1: torch-fidelity's eigvals of the non-symmetric
    # Σ1Σ2 picks up round-off from the ~2000-dim null space (measured with N = 40: 4.5e-6 in tr √(Σ1Σ2),
    # 8e-6 relative in FID). The exact value, by an independent route (tr √(Σ1Σ2) = ‖BᵀA‖_* with Σ1 = AAᵀ,
    # Σ2 = BBᵀ):
    a, b = (_centered(x) for x in (fake["pool"], real["pool"]))
    exact = float(
        ((fake["pool"].double().mean(0) - real["pool"].double().mean(0)) ** 2).sum()
        + (a**2).sum()
        + (b**2).sum()
        - 2 * torch.linalg.svdvals(b.T @ a).sum()
    )
    tf_fid = ref["frechet_inception_distance"]
    print(
        f"FID exact {exact:.12g}; error ours {abs(fid - exact):.2e}, torch-fidelity {abs(tf_fid - exact):.2e}"
    )
    assert fid == pytest.approx(exact, rel=1e-10)
    assert fid == pytest.approx(tf_fid, rel=2e-5)
    assert abs(fid - exact) < abs(tf_fid - exact)
    assert is_mean == pytest.approx(ref["inception_score_mean"], rel=1e-6)
    assert is_std == pytest.approx(ref["inception_score_std"], rel=1e-5)
    assert (precision, recall) == pytest.approx((ref["precision"], ref["recall"]), rel=1e-6)

    # The mergeable accumulator (per-rank sums) gives the same FID as the gathered features.
    stats = [FeatureStats.zeros(2048), FeatureStats.zeros(2048)]
    for s, feats in zip(stats, (fake["pool"], real["pool"])):
        for chunk in feats.split(7):
            s.update(chunk)
    assert frechet_distance(*stats[0].mean_cov(), *stats[1].mean_cov()) == pytest.approx(fid, rel=1e-9)


def test_spatial_features_are_mixed_6d_branch1x1_first_7_channels_in_nhwc_order(
    net: InceptionFeatures,
) -> None:
    images = torch.from_numpy(_images(3, 5, 0.0)).permute(0, 3, 1, 2).contiguous()
    grabbed: list[torch.Tensor] = []
    handle = net.net.Mixed_6d.branch1x1.register_forward_hook(lambda m, a, out: grabbed.append(out.clone()))
    try:
        spatial = net(images)["spatial"]
    finally:
        handle.remove()
    (fmap,) = grabbed
    assert fmap.shape == (3, 192, 17, 17)  # TF mixed_6/conv: 192 channels at 17×17
    assert (fmap >= 0).all()  # after the block's ReLU, as the TF op
    torch.testing.assert_close(spatial.view(3, 17, 17, 7), fmap[:, :7].permute(0, 2, 3, 1), rtol=0, atol=0)


def test_batching_changes_features_only_at_float32_round_off(net: InceptionFeatures) -> None:
    """CPU convolution kernels depend on the batch size, so features agree to ~1e-4, not bit for bit."""
    images = torch.from_numpy(_images(6, 6, 0.0)).permute(0, 3, 1, 2).contiguous()
    whole = extract_features(net, images, batch_size=6)
    parts = extract_features(net, [images[:2], images[2:]])
    for k in FEATURE_DIMS:
        torch.testing.assert_close(parts[k], whole[k], rtol=1e-4, atol=1e-4)


def test_rejects_non_uint8_images(net: InceptionFeatures) -> None:
    with pytest.raises(ValueError, match=r"expected uint8 \(B, 3, H, W\) images"):
        net(torch.rand(2, 3, 32, 32))


def test_missing_weights_offline_names_network_file_key_and_command() -> None:
    with pytest.raises(PretrainedWeightsError) as err:
        InceptionFeatures(device=torch.device("cpu"))  # no file, download attempted, network refused
    msg = str(err.value)
    for part in (
        "Inception",
        WEIGHTS_FILE,
        "`inception_weights`",
        "download failed",
        "python -m eval.inception",
    ):
        assert part in msg, f"{part!r} not in: {msg}"
    assert "$TORCH_HOME/hub/checkpoints/" in msg


def test_missing_weights_file_and_disabled_download_are_named_errors(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere" / WEIGHTS_FILE
    with pytest.raises(PretrainedWeightsError, match=r"nowhere.*`eval\.inception_weights`.*does not exist"):
        InceptionFeatures(missing, config_key="eval.inception_weights", device=torch.device("cpu"))
    with pytest.raises(PretrainedWeightsError, match=r"downloads are disabled.*`inception_weights`"):
        InceptionFeatures(None, allow_download=False, device=torch.device("cpu"))
