"""VA-VAE losses on inputs whose values are known by hand (§1.2, §1.3)."""

from __future__ import annotations

import math

import pytest
import torch

from models.discriminator import NLayerDiscriminator
from models.foundation import FoundationModel
from models.lpips import LPIPS
from models.vavae import AutoencoderKL, DiagonalGaussianDistribution, autoencoder_args
from models.vavae_losses import (
    VAVAELoss,
    VAVAELossArgs,
    adaptive_weight,
    adopt_weight,
    generator_loss,
    hinge_d_loss,
    kl_loss,
    reconstruction_nll,
    vf_loss_terms,
)

S = 1 / math.sqrt(2)


def hand_features() -> tuple[torch.Tensor, torch.Tensor]:
    """Two tokens (grid 1×2), two channels: z = (e1, e2), f = (e1, (e1 + e2)/√2), up to positive scales."""
    z = torch.tensor([[1.0, 0.0], [0.0, 3.0]]).T.reshape(1, 2, 1, 2)  # (B, C, h, w)
    f = torch.tensor([[2.0, 0.0], [1.0, 1.0]]).T.reshape(1, 2, 1, 2)
    return z, f


def test_vf_loss_by_hand() -> None:
    z, f = hand_features()
    # Sz = I, Sf = [[1, 1/√2], [1/√2, 1]]: |diff| is 1/√2 off the diagonal, 0 on it.
    mdms, mcos = vf_loss_terms(z, f, distmat_margin=0.25, cos_margin=0.5)
    assert mdms.item() == pytest.approx(2 * (S - 0.25) / 4, abs=1e-6)
    # cos(f_i, z_i) = 1 and 1/√2: ReLU(1 - 0.5 - cos) = 0 for both
    assert mcos.item() == 0.0
    mdms, mcos = vf_loss_terms(z, f, distmat_margin=0.0, cos_margin=0.0)
    assert mdms.item() == pytest.approx(2 * S / 4, abs=1e-6)
    assert mcos.item() == pytest.approx((0.0 + (1 - S)) / 2, abs=1e-6)
    # within the margins: both zero
    mdms, mcos = vf_loss_terms(z, f, distmat_margin=0.75, cos_margin=0.3)
    assert mdms.item() == 0.0 and mcos.item() == 0.0
    with pytest.raises(ValueError, match="set the foundation resize"):
        vf_loss_terms(z, torch.zeros(1, 2, 2, 2), 0.0, 0.0)


def test_vf_loss_weights_in_module() -> None:
    class FixedFoundation(torch.nn.Module):
        dim = 2

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return hand_features()[1]

    args = VAVAELossArgs(
        perceptual_weight=0.0, distmat_margin=0.0, cos_margin=0.0, distmat_weight=2.0, cos_weight=3.0
    )
    loss = VAVAELoss(args, None, FixedFoundation(), latent_channels=2)
    with torch.no_grad():
        loss.linear_proj.weight.copy_(torch.eye(2).reshape(2, 2, 1, 1))
    vf, mdms, mcos = loss.vf_loss(hand_features()[0], torch.zeros(1, 3, 8, 16))
    assert vf.item() == pytest.approx(2.0 * 2 * S / 4 + 3.0 * (1 - S) / 2, abs=1e-6)
    assert loss.linear_proj.bias is None and loss.linear_proj.weight.requires_grad


def test_adaptive_weight_is_gradient_norm_ratio() -> None:
    torch.manual_seed(0)
    layer = torch.nn.Conv2d(3, 4, 3)
    x = torch.randn(2, 3, 6, 6)
    out = layer(x)
    a, b = out.square().sum(), 0.01 * out.sin().mean()
    ga = torch.autograd.grad(a, layer.weight, retain_graph=True)[0]
    gb = torch.autograd.grad(b, layer.weight, retain_graph=True)[0]
    expected = ga.norm() / (gb.norm() + 1e-4)
    w = adaptive_weight(a, b, layer.weight, max_weight=1e8)
    assert not w.requires_grad
    torch.testing.assert_close(w, expected)
    assert expected.item() > 10.0
    assert adaptive_weight(a, b, layer.weight, max_weight=10.0).item() == 10.0
    assert layer.weight.grad is None


def test_hinge_generator_and_gating() -> None:
    real = torch.tensor([2.0, 0.5, -1.0])  # ReLU(1 - x) = 0, 0.5, 2
    fake = torch.tensor([-2.0, 0.0, 1.0])  # ReLU(1 + x) = 0, 1, 2
    assert hinge_d_loss(real, fake).item() == pytest.approx(0.5 * (2.5 / 3 + 1.0))
    assert generator_loss(fake).item() == pytest.approx(1 / 3)
    assert adopt_weight(1.0, global_step=5000, threshold=5001) == 0.0
    assert adopt_weight(1.0, global_step=5001, threshold=5001) == 1.0
    assert adopt_weight(0.7, global_step=0, threshold=0) == 0.7


def test_reconstruction_reduction() -> None:
    x = torch.zeros(2, 3, 4, 4)
    y = torch.full((2, 3, 4, 4), 0.5)
    p = torch.tensor([0.1, 0.3]).reshape(2, 1, 1, 1)
    nll, rec = reconstruction_nll(x, y, p, torch.tensor(0.0), perceptual_weight=1.0)
    # per image: 48 pixels·(0.5 + p_b), summed, then / B
    assert nll.item() == pytest.approx((48 * 0.6 + 48 * 0.8) / 2)
    assert rec.shape == (2, 3, 4, 4) and rec[1, 2, 3, 3].item() == pytest.approx(0.8)
    nll, _ = reconstruction_nll(x, y, p, torch.tensor(math.log(2.0)), perceptual_weight=2.0)
    assert nll.item() == pytest.approx((48 * (0.7 / 2 + math.log(2)) + 48 * (1.1 / 2 + math.log(2))) / 2)
    nll, _ = reconstruction_nll(x, y, None, torch.tensor(0.0))
    assert nll.item() == pytest.approx(2 * 48 * 0.5 / 2)


def test_kl_term_closed_form() -> None:
    mean = torch.tensor([0.5, -1.0]).reshape(2, 1, 1, 1).expand(2, 2, 1, 1)
    logvar = torch.tensor([0.0, math.log(4.0)]).reshape(2, 1, 1, 1).expand(2, 2, 1, 1)
    post = DiagonalGaussianDistribution(torch.cat([mean, logvar], dim=1))
    # 0.5(μ² + σ² − 1 − log σ²) per element, 2 elements per image, mean over the 2 images
    per = [0.5 * (0.25 + 1 - 1 - 0), 0.5 * (1 + 4 - 1 - math.log(4.0))]
    assert kl_loss(post).item() == pytest.approx((2 * per[0] + 2 * per[1]) / 2)


def test_discriminator_layout() -> None:
    torch.manual_seed(0)
    d = NLayerDiscriminator()
    assert sum(p.numel() for p in d.parameters()) == 2_765_633
    assert d(torch.randn(1, 3, 64, 64)).shape == (1, 1, 6, 6)  # 256² gives 30×30
    convs = [m for m in d.main if isinstance(m, torch.nn.Conv2d)]
    assert [c.stride[0] for c in convs] == [2, 2, 2, 1, 1]
    assert [c.bias is not None for c in convs] == [True, False, False, False, True]
    bns = [m for m in d.main if isinstance(m, torch.nn.BatchNorm2d)]
    assert all(torch.equal(b.bias, torch.zeros_like(b.bias)) for b in bns)
    w = torch.cat([b.weight.detach() for b in bns])
    assert abs(w.mean().item() - 1.0) < 0.01 and abs(w.std().item() - 0.02) < 0.005
    assert abs(convs[2].weight.std().item() - 0.02) < 0.001


@pytest.fixture(scope="module")
def setup() -> dict:
    torch.manual_seed(0)
    ae = AutoencoderKL(autoencoder_args("small"))
    foundation = FoundationModel(timm_name="vit_small_patch14_dinov2", pretrained=False, resize=56)
    return {
        "ae": ae,
        "lpips": LPIPS(pretrained=False),
        "foundation": foundation,
        "disc": NLayerDiscriminator(),
    }


def run_ae_loss(s: dict, step: int, reference: bool = True, **kw: object) -> tuple[torch.Tensor, dict, dict]:
    args = VAVAELossArgs(disc_start=10, **kw)
    torch.manual_seed(1)
    loss = VAVAELoss(args, s["lpips"], s["foundation"], latent_channels=32)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    rec, post, z = s["ae"](x, generator=torch.Generator().manual_seed(0))
    ae = s["ae"]
    total, logs = loss.autoencoder_loss(
        x, rec, post, z, step, s["disc"], ae.encoder.conv_out.weight, ae.decoder.conv_out.weight
    )
    if not reference:
        return total, logs, {}
    # independent recomputation of the adaptive weights
    p = s["lpips"](x, rec)
    nll = (torch.abs(x - rec) + p).sum() / 2
    g = -s["disc"](rec).mean()
    vf, _, _ = loss.vf_loss(z, x)
    grad = lambda t, w: torch.autograd.grad(t, w, retain_graph=True)[0].norm()  # noqa: E731
    ref = {
        "nll": nll,
        "g": g,
        "vf": vf,
        "vf_weight": grad(nll, ae.encoder.conv_out.weight)
        / (grad(vf, ae.encoder.conv_out.weight) + 1e-4)
        * 0.1,
        "d_weight": grad(nll, ae.decoder.conv_out.weight)
        / (grad(g, ae.decoder.conv_out.weight) + 1e-4)
        * 0.5,
    }
    return total, logs, ref


def test_autoencoder_loss_terms_before_and_after_disc_start(setup: dict) -> None:
    total, logs, ref = run_ae_loss(setup, step=9)
    for k in ("nll", "g", "vf", "vf_weight"):
        torch.testing.assert_close(logs[k], ref[k].detach(), rtol=1e-4, atol=1e-6)
    assert logs["disc_factor"].item() == 0.0 and logs["d_weight"].item() == 0.0
    expected = logs["nll"] + 1e-6 * logs["kl"] + logs["vf_weight"] * logs["vf"]
    torch.testing.assert_close(total.detach(), expected)
    assert total.requires_grad

    total, logs, ref = run_ae_loss(setup, step=10)
    assert logs["disc_factor"].item() == 1.0
    torch.testing.assert_close(logs["d_weight"], ref["d_weight"].detach(), rtol=1e-4, atol=1e-6)
    expected = logs["nll"] + 1e-6 * logs["kl"] + logs["d_weight"] * logs["g"] + logs["vf_weight"] * logs["vf"]
    torch.testing.assert_close(total.detach(), expected)
    assert set(logs) >= {"total", "nll", "rec", "kl", "g", "d_weight", "disc_factor", "vf", "vf_weight", "p"}

    _, logs, _ = run_ae_loss(setup, step=10, adaptive_vf=False, vf_weight=0.3)
    assert logs["vf_weight"].item() == pytest.approx(0.3)
    with torch.no_grad():
        _, logs, _ = run_ae_loss(setup, step=10, reference=False)
    assert logs["vf_weight"].item() == 0.0 and logs["d_weight"].item() == 0.0


def test_discriminator_step(setup: dict) -> None:
    loss = VAVAELoss(VAVAELossArgs(disc_start=10, use_vf=False), setup["lpips"])
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    rec = (torch.rand(2, 3, 32, 32) * 2 - 1).requires_grad_()
    d = setup["disc"]
    d_loss, logs = loss.discriminator_loss(x, rec, 9, d)
    assert d_loss.item() == 0.0 and logs["disc_factor"].item() == 0.0
    d_loss, logs = loss.discriminator_loss(x, rec, 10, d)
    assert logs["disc_factor"].item() == 1.0 and d_loss.item() > 0
    # real and fake go through D in separate calls (separate train-mode BatchNorm batches)
    torch.testing.assert_close(d_loss, hinge_d_loss(d(x), d(rec.detach())))
    d_loss.backward()
    assert rec.grad is None


def test_loss_construction_errors(setup: dict) -> None:
    with pytest.raises(ValueError, match="needs an LPIPS module"):
        VAVAELoss(VAVAELossArgs(), None, setup["foundation"])
    with pytest.raises(ValueError, match="use_vf=True needs a foundation model"):
        VAVAELoss(VAVAELossArgs(), setup["lpips"], None)
    assert not VAVAELoss(
        VAVAELossArgs(proj_fix=True), setup["lpips"], setup["foundation"]
    ).linear_proj.weight.requires_grad
