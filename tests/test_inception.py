"""The FID Inception: our features and metrics equal torch-fidelity's own ``calculate_metrics`` on the same
image folders and the same (random-weight) Inception file; the sFID layer recomputed by hand; weights files
in both formats and from the torch-hub cache; named errors when the weights are wrong, neither given nor
downloadable.

Every test runs with the network cut (sockets refuse, the torch hub cache is an empty temporary folder).
"""

from __future__ import annotations

import socket
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torch_fidelity
import torch_fidelity.metrics
from PIL import Image
from torch_fidelity.interpolate_compat_tensorflow import interpolate_bilinear_2d_like_tensorflow1x

from eval.inception import FEATURE_DIMS, WEIGHTS_FILE, InceptionFeatures, extract_features, random_weights
from eval.metrics import FeatureStats, frechet_distance, inception_score, mean_cov, precision_recall
from models.weights import PretrainedWeightsError, read_state_dict, save_state_dict

TF_BATCHNORM_EPS = 1e-3
"""variance_epsilon of the TF Inception graph's batch-norms (torch-fidelity's BasicConv2d: eps=0.001)."""
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


def _conv_bn_relu(block: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A 1×1 BasicConv2d by hand: conv2d without bias, batch-norm with the running statistics and TF's
    ε = 0.001, ReLU (TF: ``mixed_6/conv`` = Conv2D → BatchNorm → Relu)."""
    y = F.conv2d(x, block.conv.weight)  # (B, 192, 17, 17); 1×1, stride 1, no padding
    bn = block.bn
    scale = bn.weight / torch.sqrt(bn.running_var + TF_BATCHNORM_EPS)
    return torch.relu((y - bn.running_mean[:, None, None]) * scale[:, None, None] + bn.bias[:, None, None])


def test_spatial_features_are_tf_mixed_6_conv_computed_by_hand(net: InceptionFeatures) -> None:
    """The sFID features, computed without the hook: torch-fidelity's TF1 bilinear resize to 299 and
    (x − 128)/128, its stem and blocks up to Mixed_6c (Mixed_6d's input), then TF ``mixed_6/conv`` by hand
    (:func:`_conv_bn_relu` with ``Mixed_6d.branch1x1``'s weights). The ADM suite keeps channels 0–6 of the
    NHWC tensor and flattens it, so for image b, row h, column w (each < 17) and channel c < 7:

        spatial[b, (h·17 + w)·7 + c] = mixed_6/conv[b, h, w, c] = fmap[b, c, h, w]  (fmap is NCHW).

    The neighbouring taps (Mixed_6c/Mixed_6e ``branch1x1``) and the NCHW flatten order are shown to differ,
    so the comparison would catch either mistake.
    """
    inc = net.net
    assert {m.eps for m in inc.modules() if isinstance(m, torch.nn.BatchNorm2d)} == {TF_BATCHNORM_EPS}
    images = torch.from_numpy(_images(2, 5, 0.0)).permute(0, 3, 1, 2).contiguous()  # (2, 3, 32, 32) uint8
    with torch.no_grad():
        x = interpolate_bilinear_2d_like_tensorflow1x(images.float(), size=(299, 299), align_corners=False)
        x = (x - 128) / 128
        block_in = {}
        for name in (
            *(
                "Conv2d_1a_3x3",
                "Conv2d_2a_3x3",
                "Conv2d_2b_3x3",
                "MaxPool_1",
                "Conv2d_3b_1x1",
                "Conv2d_4a_3x3",
            ),
            *(
                "MaxPool_2",
                "Mixed_5b",
                "Mixed_5c",
                "Mixed_5d",
                "Mixed_6a",
                "Mixed_6b",
                "Mixed_6c",
                "Mixed_6d",
            ),
        ):
            block_in[name] = x
            x = getattr(inc, name)(x)
        assert block_in["Mixed_6d"].shape == (2, 768, 17, 17)
        fmap = _conv_bn_relu(inc.Mixed_6d.branch1x1, block_in["Mixed_6d"])  # (2, 192, 17, 17)
        neighbours = [
            _conv_bn_relu(inc.Mixed_6c.branch1x1, block_in["Mixed_6c"]),
            _conv_bn_relu(inc.Mixed_6e.branch1x1, x),  # x: Mixed_6d's output = Mixed_6e's input
        ]
    expected = torch.empty(2, FEATURE_DIMS["spatial"])
    for b in range(2):
        for h in range(17):
            for w in range(17):
                for c in range(7):
                    expected[b, (h * 17 + w) * 7 + c] = fmap[b, c, h, w]

    spatial = net(images)["spatial"]
    assert spatial.shape == (2, 2023) and spatial.dtype == torch.float32
    assert fmap.std() > 0.1 and (fmap > 0).float().mean() > 0.2  # live, not a dead ReLU
    torch.testing.assert_close(spatial, expected, rtol=1e-5, atol=1e-5)
    nchw = fmap[:, :7].reshape(2, -1)
    for wrong in (nchw, *(n[:, :7].permute(0, 2, 3, 1).reshape(2, -1) for n in neighbours)):
        assert (wrong - expected).abs().max() > 0.1


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


def test_weights_as_safetensors_and_from_the_torch_hub_cache(net: InceptionFeatures, tmp_path: Path) -> None:
    """``random_weights`` writes .safetensors by suffix; that file, and the .pth placed in torch-fidelity's
    download cache ($TORCH_HOME/hub/checkpoints/) with no key set and the network cut, give the same weights."""
    expected = net.state_dict()
    safe = random_weights(tmp_path / "inception.safetensors", seed=0)
    assert safe.read_bytes()[8:9] == b"{"  # a safetensors header (8-byte length, then JSON), not a pickle
    from_safe = InceptionFeatures(safe, allow_download=False, device=torch.device("cpu")).state_dict()
    cached = random_weights(Path(torch.hub.get_dir()) / "checkpoints" / WEIGHTS_FILE, seed=0)
    assert str(cached).startswith(str(tmp_path / "torch"))  # the fixture's empty TORCH_HOME
    from_cache = InceptionFeatures(None, device=torch.device("cpu")).state_dict()
    for key, value in expected.items():
        assert torch.equal(from_safe[key], value) and torch.equal(from_cache[key], value), key


def test_weights_of_another_network_are_a_named_error(weights: Path, tmp_path: Path) -> None:
    """Strict load: a state_dict with a missing key is refused, naming the file, the key and the command."""
    state_dict = read_state_dict(weights)
    del state_dict["fc.bias"]
    wrong = save_state_dict(state_dict, tmp_path / "wrong.safetensors")
    with pytest.raises(PretrainedWeightsError) as err:
        InceptionFeatures(wrong, device=torch.device("cpu"))
    msg = str(err.value)
    assert f"{wrong} is not torch-fidelity's inception-v3-compat state_dict" in msg
    assert 'Missing key(s) in state_dict: "fc.bias"' in msg
    assert f"`python -m eval.inception {WEIGHTS_FILE}` writes it" in msg


def test_download_command_checks_the_file_before_keeping_it(
    weights: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """``python -m eval.inception OUT`` (the download stood in for by a copy of ``served``): a good file is kept
    byte for byte, or as safetensors; a file that needs unpickling is refused and nothing is left behind."""
    import shutil

    from eval.inception import main

    served = weights
    monkeypatch.setattr(torch.hub, "download_url_to_file", lambda url, dst, **kw: shutil.copy(served, dst))
    main([str(tmp_path / "a" / WEIGHTS_FILE)])
    assert capsys.readouterr().out.strip() == str(tmp_path / "a" / WEIGHTS_FILE)
    assert (tmp_path / "a" / WEIGHTS_FILE).read_bytes() == weights.read_bytes()
    main([str(tmp_path / "b" / "inception.safetensors")])
    safe = read_state_dict(tmp_path / "b" / "inception.safetensors")
    assert all(torch.equal(v, safe[k]) for k, v in read_state_dict(weights).items())

    class Payload:
        def __reduce__(self) -> tuple[object, tuple[str]]:
            return eval, (f"open({str(tmp_path / 'ran')!r}, 'w')",)

    served = tmp_path / "evil.pth"
    torch.save({**read_state_dict(weights), "fc.bias": Payload()}, served)
    with pytest.raises(
        ValueError, match=r"weights-inception-2015-12-05-6726825d\.pth\.part is not a plain tensor"
    ):
        main([str(tmp_path / "c" / WEIGHTS_FILE)])
    assert sorted(p.name for p in (tmp_path / "c").iterdir()) == [] and not (tmp_path / "ran").exists()
