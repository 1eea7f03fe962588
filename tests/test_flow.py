"""The rectified-flow objective against hand computations (fact sheet §3.1)."""

from __future__ import annotations

import math

import pytest
import torch
from scipy import stats

from models.flow import FlowArgs, RectifiedFlow
from models.lightningdit import LightningDiT, lightningdit_args


def test_loss_on_hand_computed_inputs() -> None:
    """Two samples, 2 channels, one pixel. x_t = t·x1 + (1 − t)·x0, u = x1 − x0.

    Sample 0: x1 = (1, 0), x0 = (0, 1), t = 0.5 → x_t = (0.5, 0.5), u = (1, −1); v = (1, 1):
      mse = (0² + 2²)/2 = 2, cos(v, u) = 0 → 1.
    Sample 1: x1 = (3, 1), x0 = (1, 3), t = 0.25 → x_t = (1.5, 2.5), u = (2, −2); v = (4, −4):
      mse = (2² + 2²)/2 = 4, cos = 1 → 0.
    Batch means: mse 3, cos 0.5; total with weights (1, 1) = 3.5, with (2, 0.5) = 6.25.
    """
    x1 = torch.tensor([[1.0, 0.0], [3.0, 1.0]]).view(2, 2, 1, 1)
    x0 = torch.tensor([[0.0, 1.0], [1.0, 3.0]]).view(2, 2, 1, 1)
    t = torch.tensor([0.5, 0.25])
    y = torch.tensor([7, 9])
    calls = []

    def net(x_t: torch.Tensor, t_in: torch.Tensor, y_in: torch.Tensor) -> torch.Tensor:
        calls.append((x_t.clone(), t_in.clone(), y_in.clone()))
        return torch.tensor([[1.0, 1.0], [4.0, -4.0]]).view(2, 2, 1, 1)

    out = RectifiedFlow().loss(net, x1, y, noise=x0, t=t)
    assert out.mse.item() == pytest.approx(3.0)
    assert out.cos.item() == pytest.approx(0.5)
    assert out.total.item() == pytest.approx(3.5)
    assert len(calls) == 1
    torch.testing.assert_close(calls[0][0], torch.tensor([[0.5, 0.5], [1.5, 2.5]]).view(2, 2, 1, 1))
    assert torch.equal(calls[0][1], t) and torch.equal(calls[0][2], y)
    weighted = RectifiedFlow(FlowArgs(mse_weight=2.0, cos_weight=0.5)).loss(net, x1, y, noise=x0, t=t)
    assert weighted.total.item() == pytest.approx(6.25)


def test_loss_matches_loop_computation_on_random_inputs() -> None:
    """Per-pixel cosine over channels (dim=1), averaged over H·W, then over the batch (§3.1)."""
    g = torch.Generator().manual_seed(0)
    b, c, h, w = 3, 5, 4, 2
    x1, x0, v = (torch.randn(b, c, h, w, generator=g, dtype=torch.float64) for _ in range(3))
    t = torch.rand(b, generator=g, dtype=torch.float64)
    out = RectifiedFlow().loss(lambda *_: v, x1.double(), torch.zeros(b), noise=x0, t=t)
    mse = cos = 0.0
    for i in range(b):
        u = x1[i] - x0[i]
        mse += ((v[i] - u) ** 2).sum().item() / (c * h * w) / b
        for r in range(h):
            for s in range(w):
                a, e = v[i, :, r, s], u[:, r, s]
                cos += (1 - (a @ e).item() / (a.norm() * e.norm()).item()) / (h * w) / b
    assert out.mse.item() == pytest.approx(mse, rel=1e-5)
    assert out.cos.item() == pytest.approx(cos, rel=1e-5)
    assert out.total.item() == pytest.approx(mse + cos, rel=1e-5)


def test_logit_normal_t_is_sigmoid_of_standard_normal() -> None:
    t = RectifiedFlow().sample_t(20000, torch.Generator().manual_seed(0))
    assert t.dtype == torch.float32 and bool(((t > 0) & (t < 1)).all())
    logit = torch.logit(t.double())
    assert logit.mean().item() == pytest.approx(0.0, abs=0.03)
    assert logit.std().item() == pytest.approx(1.0, abs=0.02)
    ks = stats.kstest(logit.numpy(), "norm")
    assert ks.statistic < 0.012  # the 1 % critical value for n = 20000 is 1.63/sqrt(n) = 0.0115
    assert t.median().item() == pytest.approx(0.5, abs=0.01)


def test_uniform_t_option() -> None:
    t = RectifiedFlow(FlowArgs(t_sampling="uniform")).sample_t(20000, torch.Generator().manual_seed(1))
    assert stats.kstest(t.numpy(), "uniform").statistic < 0.012
    assert t.mean().item() == pytest.approx(0.5, abs=0.01)


def test_bad_args_fail_with_a_message() -> None:
    with pytest.raises(ValueError, match="t_sampling must be 'logit_normal' or 'uniform', got 'lognorm'"):
        FlowArgs(t_sampling="lognorm")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="loss weights must be >= 0"):
        FlowArgs(cos_weight=-1.0)


def _tiny_net(seed: int) -> LightningDiT:
    torch.manual_seed(seed)
    model = LightningDiT(lightningdit_args("T/1", input_size=8, in_channels=4, num_classes=10))
    with torch.no_grad():  # replace the zero init so outputs are non-trivial
        for name, p in model.named_parameters():
            if "adaLN" in name or "final_layer.linear" in name:
                p.normal_(0, 0.1)
    return model


def test_generator_makes_the_loss_reproducible() -> None:
    x1, y = torch.randn(4, 4, 8, 8), torch.tensor([0, 1, 2, 3])
    losses = []
    for seed in (5, 5, 6):
        net = _tiny_net(0).eval()
        out = RectifiedFlow().loss(net, x1, y, generator=torch.Generator().manual_seed(seed))
        losses.append((out.total.item(), out.mse.item(), out.cos.item()))
    assert losses[0] == losses[1]
    assert losses[0] != losses[2]


def test_generator_draws_noise_then_t() -> None:
    """The documented draw order, so a trainer can reproduce a step from its seed alone."""
    x1 = torch.zeros(2, 3, 2, 2)
    seen = {}

    def net(x_t: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        seen["x_t"], seen["t"] = x_t, t
        return torch.zeros_like(x_t)

    RectifiedFlow().loss(net, x1, torch.zeros(2), generator=torch.Generator().manual_seed(3))
    g = torch.Generator().manual_seed(3)
    noise = torch.randn(2, 3, 2, 2, generator=g)
    t = torch.sigmoid(torch.randn(2, generator=g))
    assert torch.equal(seen["t"], t)
    torch.testing.assert_close(seen["x_t"], (1 - t).view(2, 1, 1, 1) * noise)


def test_loss_backpropagates_into_the_backbone_and_output_is_fp32() -> None:
    net = _tiny_net(1).train()
    x1 = torch.randn(2, 4, 8, 8)
    out = RectifiedFlow().loss(net, x1, torch.tensor([1, 2]), generator=torch.Generator().manual_seed(0))
    out.total.backward()
    assert out.total.dtype == torch.float32
    assert net.final_layer.linear.weight.grad.abs().sum() > 0
    assert net.blocks[0].attn.qkv.weight.grad.abs().sum() > 0
    assert math.isfinite(out.total.item())


def test_bf16_net_output_is_upcast() -> None:
    x1 = torch.randn(2, 4, 2, 2)
    net = lambda x, t, y: (x * 0.5).to(torch.bfloat16)
    out = RectifiedFlow().loss(net, x1, torch.zeros(2), generator=torch.Generator().manual_seed(0))
    assert out.mse.dtype == torch.float32
