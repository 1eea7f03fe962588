"""Rectified flow: the linear path, the timestep distribution and the training loss in one object.

Follows the reference's SiT `Transport` with the LightningDiT settings (fact sheet §3.1): linear path
x_t = t·x1 + (1 − t)·x0 with x1 the data and x0 ~ N(0, I) (Liu et al. 2022, "Flow Straight and Fast",
eq. 1; Lipman et al. 2022, "Flow Matching", §4.1 with σ_min = 0), velocity target u = x1 − x0, t drawn
logit-normal (Esser et al. 2024, SD3, §3.1 eq. 19) or uniform, and the loss MSE + velocity-direction
(cosine) loss of FasterDiT (Yao et al. 2024).

The backbone is only `net(x_t, t, y)`. All randomness (noise, t) comes from an explicit
`torch.Generator` or is passed in, so a trainer can make every step reproducible. The reference draws t
from numpy's global RNG and the noise from torch's global RNG (§3.3); the distributions are the same.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["FlowArgs", "FlowLoss", "RectifiedFlow", "mean_flat"]


@dataclass
class FlowArgs:
    """The rectified-flow objective. Defaults are the reference's LightningDiT training (§3.1)."""

    t_sampling: Literal["logit_normal", "uniform"] = "logit_normal"
    """How t is drawn: "logit_normal" = sigmoid(N(0, 1)) (§3.1 `use_lognorm: true`), "uniform" = U[0, 1]
    (`use_lognorm: false`; the 800-epoch run switched to it after 600k steps)."""
    mse_weight: float = 1.0
    """Weight of mean_flat((v − u)²) in the total (§3.1: 1)."""
    cos_weight: float = 1.0
    """Weight of the velocity-direction loss mean_flat(1 − cos(v, u)) over channels (§3.1: 1; 0 disables)."""

    def __post_init__(self) -> None:
        if self.t_sampling not in ("logit_normal", "uniform"):
            raise ValueError(f"t_sampling must be 'logit_normal' or 'uniform', got {self.t_sampling!r}")
        if self.mse_weight < 0 or self.cos_weight < 0:
            raise ValueError(f"loss weights must be >= 0, got mse {self.mse_weight}, cos {self.cos_weight}")


@dataclass
class FlowLoss:
    """The result of `RectifiedFlow.loss`. All are fp32 scalars averaged over the batch."""

    total: Tensor
    """mse_weight·mse + cos_weight·cos: what to backpropagate."""
    mse: Tensor
    """mean_B mean_flat((v − u)²): the reference's logged "Train Loss" (§3.2)."""
    cos: Tensor
    """mean_B mean_flat(1 − cos(v, u, dim=1))."""


def mean_flat(x: Tensor) -> Tensor:
    """Mean over all dimensions but the first: (B, ...) -> (B,)."""
    return x.mean(dim=tuple(range(1, x.ndim)))


class RectifiedFlow:
    """The rectified-flow objective of §3.1. t = 0 is noise and t = 1 is data."""

    def __init__(self, args: FlowArgs | None = None) -> None:
        self.args = args if args is not None else FlowArgs()

    def sample_t(
        self, batch: int, generator: torch.Generator | None = None, device: torch.device | None = None
    ) -> Tensor:
        """Draw (batch,) fp32 times from the configured distribution, on `generator`'s device, then move."""
        gen_device = generator.device if generator is not None else device
        if self.args.t_sampling == "logit_normal":
            t = torch.sigmoid(torch.randn(batch, generator=generator, device=gen_device))
        else:
            t = torch.rand(batch, generator=generator, device=gen_device)
        return t.to(device) if device is not None else t

    @staticmethod
    def interpolate(x0: Tensor, x1: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """x_t = t·x1 + (1 − t)·x0 and the target velocity u = x1 − x0 (§3.1), t of shape (B,)."""
        tb = t.view(-1, *([1] * (x1.ndim - 1)))  # (B, 1, 1, 1)
        return tb * x1 + (1 - tb) * x0, x1 - x0

    def loss(
        self,
        net: Callable[[Tensor, Tensor, Tensor], Tensor],
        x1: Tensor,
        y: Tensor,
        *,
        generator: torch.Generator | None = None,
        noise: Tensor | None = None,
        t: Tensor | None = None,
    ) -> FlowLoss:
        """The loss of `net` on the data batch x1 (B, C, H, W) with labels y (B,).

        Noise and t are taken from the arguments when given, else drawn from `generator` (on its device;
        a CPU generator makes the draw independent of the training device), noise first, then t; without
        a generator, from torch's global RNG.
        The net is called once as `net(x_t, t, y)`; its output is cast to fp32 before the loss, as the
        reference's Accelerate does (§3.1).
        """
        x1 = x1.float()
        if noise is None:
            gen_device = generator.device if generator is not None else x1.device
            noise = torch.randn(x1.shape, generator=generator, device=gen_device).to(x1.device)
        if t is None:
            t = self.sample_t(x1.shape[0], generator, x1.device)
        x_t, u = self.interpolate(noise.float(), x1, t.float())  # (B, C, H, W) each
        v = net(x_t, t, y).float()  # (B, C, H, W)
        mse = mean_flat((v - u) ** 2)  # (B,)
        cos = mean_flat(1 - F.cosine_similarity(v, u, dim=1))  # (B,) per-pixel cosine over channels
        mse, cos = mse.mean(), cos.mean()
        return FlowLoss(total=self.args.mse_weight * mse + self.args.cos_weight * cos, mse=mse, cos=cos)
