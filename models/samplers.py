"""ODE samplers for rectified flow, and classifier-free guidance as a wrapper around the model.

A `model_fn(x, t)` maps a state (B, ...) and times (B,) to a velocity; time runs from t = 0 (noise) to
t = 1 (data), the reference's convention (fact sheet §2.3, §4.1). Fixed-grid Euler and Heun are written
here because they are a few lines each; the adaptive dopri5 comes from torchdiffeq (Chen et al. 2018),
the library the reference uses.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
from torch import Tensor
from torchdiffeq import odeint

__all__ = [
    "ModelFn",
    "cfg_model_fn",
    "sample_dopri5",
    "sample_euler",
    "sample_heun",
    "sample_ode",
    "shift_time",
    "timestep_grid",
]

ModelFn = Callable[[Tensor, Tensor], Tensor]
"""model_fn(x (B, ...), t (B,)) -> velocity (B, ...)."""


def _times(t: Tensor, x: Tensor) -> Tensor:
    """A grid time broadcast to the batch: (B,), float32 (float64 for float64 states), never bf16."""
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    return t.to(device=x.device, dtype=dtype).expand(x.shape[0])


def shift_time(t: Tensor, shift: float) -> Tensor:
    """Timestep shift t ↦ s·t / (1 + (s − 1)·t) of LightningDiT (§4.1; e.g. t = 0.5, s = 0.3 → 0.2308).

    With s < 1 the grid is dense near t = 0 (noise). It is SD3's shift (Esser et al. 2024, §5.3.2 eq. 23)
    with α = 1/s in the flipped time convention. s = 1 is the identity. Evaluated as s·t / (s·t + 1 − t),
    the same expression, so that the ends 0 and 1 are exact in floating point.
    """
    return shift * t / (shift * t + (1 - t))


def timestep_grid(num_points: int, shift: float = 1.0, device: torch.device | str | None = None) -> Tensor:
    """`num_points` times from 0 to 1 (uniform, then `shift_time`), float64 (§4.1: 250 points, shift 0.3).

    `num_points` points give num_points − 1 steps.
    """
    if num_points < 2:
        raise ValueError(f"num_points must be >= 2 (it includes both ends), got {num_points}")
    if shift <= 0:
        raise ValueError(f"shift must be > 0, got {shift}")
    return shift_time(torch.linspace(0.0, 1.0, num_points, dtype=torch.float64, device=device), shift)


@torch.no_grad()
def sample_euler(model_fn: ModelFn, x: Tensor, ts: Tensor) -> Tensor:
    """Explicit Euler: x_{n+1} = x_n + (t_{n+1} − t_n)·v(x_n, t_n) over the grid ts (len(ts) − 1 steps).

    Euler (1768); the reference's default sampler (§4.1, torchdiffeq `method='euler'`). Global error O(h).
    """
    for t_cur, t_next in zip(ts[:-1], ts[1:]):
        x = x + (t_next - t_cur).item() * model_fn(x, _times(t_cur, x))
    return x


@torch.no_grad()
def sample_heun(model_fn: ModelFn, x: Tensor, ts: Tensor) -> Tensor:
    """Heun's method (explicit trapezoidal rule), 2 evaluations per step, global error O(h²).

    Karras et al. 2022 ("EDM"), Algorithm 1, with the correction applied on every step: the velocity field
    of rectified flow stays finite at t = 1, so the last step needs no Euler fallback.
    """
    for t_cur, t_next in zip(ts[:-1], ts[1:]):
        h = (t_next - t_cur).item()
        v_cur = model_fn(x, _times(t_cur, x))
        x_pred = x + h * v_cur
        x = x + 0.5 * h * (v_cur + model_fn(x_pred, _times(t_next, x)))
    return x


@torch.no_grad()
def sample_dopri5(
    model_fn: ModelFn, x: Tensor, atol: float = 1e-6, rtol: float = 1e-3, t0: float = 0.0, t1: float = 1.0
) -> Tensor:
    """Adaptive Dormand–Prince 5(4) (Dormand & Prince 1980) from t0 to t1 via torchdiffeq (Chen et al.
    2018). Defaults atol 1e-6, rtol 1e-3 are the reference's (§4.1). A timestep shift has no effect here:
    the solver picks its own steps."""
    ts = torch.tensor([t0, t1], dtype=torch.float64 if x.dtype == torch.float64 else torch.float32)
    return odeint(
        lambda t, s: model_fn(s, _times(t, s)), x, ts.to(x.device), method="dopri5", atol=atol, rtol=rtol
    )[-1]


def sample_ode(
    model_fn: ModelFn,
    x: Tensor,
    method: Literal["euler", "heun", "dopri5"] = "euler",
    num_points: int = 250,
    shift: float = 1.0,
    atol: float = 1e-6,
    rtol: float = 1e-3,
) -> Tensor:
    """Integrate from noise x (t = 0) to data (t = 1) with a named method (reference: Euler, 250 points,
    shift 0.3, §4.1). `num_points` and `shift` apply to the fixed-grid methods; atol and rtol to dopri5."""
    if method == "dopri5":
        return sample_dopri5(model_fn, x, atol=atol, rtol=rtol)
    ts = timestep_grid(num_points, shift)  # on the CPU: the step sizes are read without a device sync
    if method == "euler":
        return sample_euler(model_fn, x, ts)
    if method == "heun":
        return sample_heun(model_fn, x, ts)
    raise ValueError(f"Unknown sampler {method!r}; choose 'euler', 'heun' or 'dopri5'")


def cfg_model_fn(
    model: Callable[[Tensor, Tensor, Tensor], Tensor],
    y: Tensor,
    scale: float,
    *,
    null_class: int,
    interval_start: float = 0.0,
    channels: Literal["first3", "all"] = "first3",
) -> ModelFn:
    """Classifier-free guidance (Ho & Salimans 2022, eq. 6) around `model(x, t, y)`, as a `model_fn`.

    The model runs on the batch [x; x] with labels [y; null_class]; guided = uncond + scale·(cond − uncond).
    - `channels="first3"` guides output channels 0..2 only and keeps the conditional velocity on the others.
      This is what the reference does (§4.1): a legacy of DiT/GLIDE, where the 4-channel SD-VAE latent made
      "3 channels" look like "the image"; on 32-channel VA-VAE latents it guides 3 of 32 channels. The
      published FIDs (2.11 at scale 10.0, 1.35 at 6.7) were measured this way, so reproduction needs it.
    - `channels="all"` guides every channel: the textbook CFG. It needs a much lower scale (users report
      about 4); the reference's FIDs are not expected at its scales.
    Guidance interval (Kynkäänniemi et al. 2024): where t < `interval_start` (the noisy end) guidance is off
    and the output is the pure conditional velocity; when it is off for the whole batch, or scale == 1,
    only the conditional half is computed (same result, half the work).
    """
    if channels not in ("first3", "all"):
        raise ValueError(f"channels must be 'first3' or 'all', got {channels!r}")

    def model_fn(x: Tensor, t: Tensor) -> Tensor:
        guide = t >= interval_start  # (B,)
        if scale == 1.0 or not bool(guide.any()):
            return model(x, t, y)
        out = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, torch.full_like(y, null_class)]))
        cond, uncond = out.chunk(2)  # (B, C, H, W) each
        guided = uncond + scale * (cond - uncond)
        if channels == "first3":
            guided = torch.cat([guided[:, :3], cond[:, 3:]], dim=1)
        return torch.where(guide.view(-1, *([1] * (x.ndim - 1))), guided, cond)

    return model_fn
