"""VA-VAE autoencoder: reference parameter count and state_dict keys (§1.1, §8.2), shapes, posterior,
activation checkpointing, uint8 conversion and the reference-checkpoint loader."""

from __future__ import annotations

import pytest
import torch

import models.vavae as vavae
from models.vavae import (
    AutoencoderArgs,
    AutoencoderKL,
    DiagonalGaussianDistribution,
    autoencoder_args,
    images_to_uint8,
    load_reference_checkpoint,
    uint8_to_images,
)


@pytest.fixture(scope="module")
def f16d32() -> AutoencoderKL:
    with torch.device("meta"):
        return AutoencoderKL(autoencoder_args("f16d32"))


def small(**kw: object) -> AutoencoderKL:
    torch.manual_seed(0)
    return AutoencoderKL(autoencoder_args("small", **kw))


def test_f16d32_parameter_count(f16d32: AutoencoderKL) -> None:
    assert sum(p.numel() for p in f16d32.parameters()) == 69_836_067
    assert sum(p.numel() for p in f16d32.encoder.parameters()) == 28_413_248
    assert sum(p.numel() for p in f16d32.decoder.parameters()) == 41_417_603


def test_f16d32_state_dict_keys(f16d32: AutoencoderKL) -> None:
    sd = f16d32.state_dict()
    assert len(sd) == 342
    shapes = {k: tuple(v.shape) for k, v in sd.items()}
    expected = {
        "encoder.conv_in.weight": (128, 3, 3, 3),
        "encoder.down.0.block.1.conv2.weight": (128, 128, 3, 3),
        "encoder.down.2.block.0.nin_shortcut.weight": (256, 128, 1, 1),
        "encoder.down.4.block.0.nin_shortcut.weight": (512, 256, 1, 1),
        "encoder.down.3.downsample.conv.weight": (256, 256, 3, 3),
        "encoder.down.4.attn.1.proj_out.weight": (512, 512, 1, 1),
        "encoder.mid.attn_1.q.weight": (512, 512, 1, 1),
        "encoder.mid.block_2.norm2.weight": (512,),
        "encoder.norm_out.bias": (512,),
        "encoder.conv_out.weight": (64, 512, 3, 3),
        "decoder.conv_in.weight": (512, 32, 3, 3),
        "decoder.mid.block_1.conv1.weight": (512, 512, 3, 3),
        "decoder.up.4.block.2.conv2.weight": (512, 512, 3, 3),
        "decoder.up.4.attn.2.v.weight": (512, 512, 1, 1),
        "decoder.up.3.block.0.nin_shortcut.weight": (256, 512, 1, 1),
        "decoder.up.1.block.0.nin_shortcut.weight": (128, 256, 1, 1),
        "decoder.up.1.upsample.conv.weight": (128, 128, 3, 3),
        "decoder.conv_out.weight": (3, 128, 3, 3),
        "quant_conv.weight": (64, 64, 1, 1),
        "quant_conv.bias": (64,),
        "post_quant_conv.weight": (32, 32, 1, 1),
        "post_quant_conv.bias": (32,),
    }
    for k, shape in expected.items():
        assert shapes[k] == shape, k
    prefix = lambda k, n: ".".join(k.split(".")[:n])  # noqa: E731
    assert {prefix(k, 6) for k in sd if "nin_shortcut" in k} == {
        "encoder.down.2.block.0.nin_shortcut",
        "encoder.down.4.block.0.nin_shortcut",
        "decoder.up.1.block.0.nin_shortcut",
        "decoder.up.3.block.0.nin_shortcut",
    }
    assert {prefix(k, 6) for k in sd if ".attn." in k} == {
        *(f"encoder.down.4.attn.{j}.norm" for j in range(2)),
        *(f"encoder.down.4.attn.{j}.{m}" for j in range(2) for m in ("q", "k", "v", "proj_out")),
        *(f"decoder.up.4.attn.{j}.norm" for j in range(3)),
        *(f"decoder.up.4.attn.{j}.{m}" for j in range(3) for m in ("q", "k", "v", "proj_out")),
    }
    assert {prefix(k, 3) for k in sd if "downsample" in k} == {f"encoder.down.{i}" for i in range(4)}
    assert {prefix(k, 3) for k in sd if "upsample" in k} == {f"decoder.up.{i}" for i in range(1, 5)}
    assert {k.split(".")[0] for k in sd} == {"encoder", "decoder", "quant_conv", "post_quant_conv"}


def test_f16d32_shapes(f16d32: AutoencoderKL) -> None:
    x = torch.empty(2, 3, 256, 256, device="meta")
    assert f16d32.encoder(x).shape == (2, 64, 16, 16)  # moments: 2·z_channels
    post = f16d32.encode(x)
    assert post.sample().shape == (2, 32, 16, 16)
    assert f16d32.decode(post.mode()).shape == (2, 3, 256, 256)


def test_small_shapes_and_posterior() -> None:
    m = small().eval()
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    assert m.encoder(x).shape == (2, 64, 4, 4)
    post = m.encode(x)
    z1 = post.sample(torch.Generator().manual_seed(3))
    z2 = post.sample(torch.Generator().manual_seed(3))
    assert z1.shape == (2, 32, 4, 4) and torch.equal(z1, z2)
    assert torch.equal(post.mode(), post.mean)
    rec, post2, z = m(x, sample_posterior=False)
    assert rec.shape == (2, 3, 32, 32) and torch.equal(z, post2.mean)
    assert m.downsample_factor == 8


def test_posterior_logvar_clamp_and_kl() -> None:
    moments = torch.zeros(1, 4, 1, 2)
    moments[0, 2:, 0, 0] = 100.0
    moments[0, 2:, 0, 1] = -100.0
    post = DiagonalGaussianDistribution(moments)
    assert post.logvar[0, :, 0, 0].tolist() == [20.0, 20.0]
    assert post.logvar[0, :, 0, 1].tolist() == [-30.0, -30.0]
    torch.manual_seed(0)
    moments = torch.randn(3, 8, 2, 2)
    post = DiagonalGaussianDistribution(moments)
    ref = torch.distributions.kl_divergence(
        torch.distributions.Normal(post.mean, post.std), torch.distributions.Normal(0.0, 1.0)
    ).sum(dim=(1, 2, 3))
    torch.testing.assert_close(post.kl(), ref)


def test_activation_checkpointing_identical(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    real = vavae.checkpoint

    def counting(fn, *args, **kw):  # noqa: ANN001, ANN002, ANN003, ANN202
        calls.append(type(fn).__name__)
        return real(fn, *args, **kw)

    monkeypatch.setattr(vavae, "checkpoint", counting)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    results = []
    for ckpt in (False, True):
        m = small(grad_checkpointing=ckpt, dropout=0.0)
        rec, post, _ = m(x, generator=torch.Generator().manual_seed(1))
        (rec.square().mean() + post.kl().mean()).backward()
        results.append((rec.detach(), {n: p.grad.clone() for n, p in m.named_parameters()}))
    # 4 levels + mid in the encoder, the same in the decoder
    assert sorted(calls) == sorted(["_Level"] * 8 + ["_Mid"] * 2)
    assert torch.equal(results[0][0], results[1][0])
    for n, g in results[0][1].items():
        assert torch.equal(g, results[1][1][n]), n
    m = small()
    m.set_grad_checkpointing(True)
    assert m.encoder.grad_checkpointing and m.decoder.grad_checkpointing


def test_uint8_conversion() -> None:
    x = torch.tensor([-1.0, -0.5, 0.0, 1.0, 2.0]).reshape(1, 1, 1, 5).expand(1, 3, 1, 5)
    u = images_to_uint8(x)
    assert u.shape == (1, 1, 5, 3) and u.dtype == torch.uint8
    # clamp(127.5·x + 128, 0, 255) truncated: 0.5→0, 64.25→64, 128, 255.5→255, 383→255 (§1.1)
    assert u[0, 0, :, 0].tolist() == [0, 64, 128, 255, 255]
    back = uint8_to_images(torch.tensor([0, 255], dtype=torch.uint8).reshape(1, 1, 2, 1).expand(1, 1, 2, 3))
    assert back.shape == (1, 3, 1, 2)
    assert back[0, 0, 0].tolist() == [-1.0, 1.0]


def test_config_errors() -> None:
    with pytest.raises(KeyError, match="unknown autoencoder config 'f8'"):
        autoencoder_args("f8")
    with pytest.raises(ValueError, match="double_z must be True"):
        AutoencoderKL(AutoencoderArgs(double_z=False))


def test_load_reference_checkpoint(tmp_path) -> None:  # noqa: ANN001
    src = small()
    proj = torch.nn.Conv2d(32, 16, 1, bias=False)
    training = {
        "state_dict": {
            **src.state_dict(),
            "loss.logvar": torch.zeros(()),
            "loss.discriminator.main.0.weight": torch.randn(64, 3, 4, 4),
            "loss.perceptual_loss.lin0.model.1.weight": torch.randn(1, 64, 1, 1),
            "foundation_model.model.cls_token": torch.randn(1, 1, 16),
            "linear_proj.weight": torch.randn(16, 32, 1, 1),
        },
        "epoch": 3,
    }
    dst = AutoencoderKL(autoencoder_args("small"))
    info = load_reference_checkpoint(training, dst, proj)
    assert len(info["autoencoder"]) == len(src.state_dict())
    assert info["vf_projection"] == ["linear_proj.weight"]
    assert len(info["dropped"]) == 4
    for k, v in src.state_dict().items():
        assert torch.equal(dst.state_dict()[k], v), k
    assert torch.equal(proj.weight, training["state_dict"]["linear_proj.weight"])

    # inference layout: a raw state_dict file, strict
    path = tmp_path / "vavae.pt"
    torch.save(src.state_dict(), path)
    info = load_reference_checkpoint(path, AutoencoderKL(autoencoder_args("small")))
    assert info["vf_projection"] == [] and info["dropped"] == []

    bad = {**src.state_dict(), "module.encoder.conv_in.weight": torch.zeros(1)}
    with pytest.raises(KeyError, match="unexpected keys in VA-VAE checkpoint.*module.encoder.conv_in.weight"):
        load_reference_checkpoint(bad, dst)
    missing = {k: v for k, v in src.state_dict().items() if k != "quant_conv.bias"}
    with pytest.raises(RuntimeError, match="Missing key.*quant_conv.bias"):
        load_reference_checkpoint(missing, dst)


# ------------------------------------------------------------------------- training crop (§1.4)


@pytest.mark.parametrize(
    "rows,cols,size",
    [(427, 640, 256), (427, 640, 97), (427, 640, 333), (200, 301, 256), (150, 210, 256)],
    ids=["shrink-0.60", "shrink-0.23", "shrink-0.78", "enlarge-1.28", "enlarge-1.71"],
)
def test_random_crop_resizes_like_albumentations_smallest_max_size(rows: int, cols: int, size: int) -> None:
    """Our resize against albumentations' own `SmallestMaxSize` (cv2.INTER_LINEAR) on a real photo
    (scikit-learn's bundled china.jpg, 427×640, or its top-left corner): the same shape, and at most 1
    apart on uint8 (OpenCV's fixed-point weights; about 10% of values differ by 1, measured). PIL's
    antialiased bilinear, used before, was up to 130 apart when shrinking."""
    import albumentations as A
    import numpy as np
    from albumentations.augmentations.crops.functional import get_crop_coords
    from PIL import Image
    from sklearn.datasets import load_sample_image

    from data_prep.images import random_crop, smallest_max_size

    photo = np.ascontiguousarray(load_sample_image("china.jpg")[:rows, :cols])
    want = A.SmallestMaxSize(max_size=size)(image=photo)["image"]
    got = np.asarray(smallest_max_size(Image.fromarray(photo), size))
    assert got.shape == want.shape and min(got.shape[:2]) == size
    diff = np.abs(got.astype(int) - want.astype(int))
    assert diff.max() <= 1 and diff.mean() < 0.15, (diff.max(), diff.mean())
    # The crop: albumentations' RandomCrop corner rule for the same uniforms.
    for u in [(0.0, 0.0), (0.5, 0.25), (0.999, 0.999), (0.3, 0.7)]:
        x0, y0, x1, y1 = get_crop_coords(want.shape[:2], (size, size), u[1], u[0])
        crop = np.asarray(random_crop(Image.fromarray(photo), size, u))
        assert np.array_equal(crop, got[y0:y1, x0:x1]) and crop.shape == (size, size, 3)
