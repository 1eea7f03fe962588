"""Samplers on a flow whose solution is known in closed form; the timestep shift and CFG of §4.1.

The flow: x0 ~ N(0, 1) and x1 ~ N(m, s²) independent, per dimension, joined by the linear path
x_t = t·x1 + (1 − t)·x0. Then x_t ~ N(t·m, σ_t²) with σ_t² = t²s² + (1 − t)², and the marginal velocity
is E[x1 − x0 | x_t = x] = m + Cov(x1 − x0, x_t)/Var(x_t)·(x − t·m) = m + (σ_t'/σ_t)·(x − t·m), since
Cov = t·s² − (1 − t) = σ_t·σ_t'. The ODE from x(0) = x0 has the solution x(t) = t·m + σ_t·x0, so the
exact sample is x(1) = m + s·x0.
"""

from __future__ import annotations

import pytest
import torch

from models.samplers import (
    cfg_model_fn,
    sample_dopri5,
    sample_euler,
    sample_heun,
    sample_ode,
    shift_time,
    timestep_grid,
)

M = torch.tensor([[1.5, -2.0, 0.5, 3.0]], dtype=torch.float64)  # (1, 4)
S = torch.tensor([[0.5, 2.0, 1.0, 0.2]], dtype=torch.float64)  # (1, 4)


def gaussian_velocity(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    t = t.view(-1, 1)  # (B, 1)
    var = t**2 * S**2 + (1 - t) ** 2
    return M + (t * S**2 - (1 - t)) / var * (x - t * M)


def _start_and_exact() -> tuple[torch.Tensor, torch.Tensor]:
    x0 = torch.randn(64, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    return x0, M + S * x0


def test_closed_form_is_a_solution() -> None:
    """Sanity check of the derivation: d/dt (t·m + σ_t·x0) equals v at (x(t), t), by finite differences."""
    x0, _ = _start_and_exact()
    sigma = lambda u: (u**2 * S**2 + (1 - u) ** 2).sqrt()
    x_of = lambda u: u * M + sigma(u) * x0
    for t in (0.1, 0.5, 0.9):
        deriv = (x_of(t + 1e-6) - x_of(t - 1e-6)) / 2e-6
        torch.testing.assert_close(
            deriv, gaussian_velocity(x_of(t), torch.full((64,), t)), atol=1e-6, rtol=1e-6
        )


def _errors(sampler, shift: float) -> list[float]:
    x0, exact = _start_and_exact()
    return [
        (sampler(gaussian_velocity, x0, timestep_grid(n + 1, shift)) - exact).abs().max().item()
        for n in (16, 32, 64, 128)
    ]


@pytest.mark.parametrize("shift", [1.0, 0.3])
def test_euler_is_first_order(shift: float) -> None:
    errs = _errors(sample_euler, shift)
    ratios = [a / b for a, b in zip(errs, errs[1:])]
    assert all(r == pytest.approx(2.0, abs=0.1) for r in ratios), ratios
    assert errs[-1] < 0.07


@pytest.mark.parametrize("shift", [1.0, 0.3])
def test_heun_is_second_order(shift: float) -> None:
    errs = _errors(sample_heun, shift)
    ratios = [a / b for a, b in zip(errs, errs[1:])]
    assert all(r == pytest.approx(4.0, abs=0.35) for r in ratios), ratios
    assert errs[-1] < 6e-4


def test_euler_and_heun_steps_and_evaluations() -> None:
    """One Euler step is x + (t1 − t0)·v(x, t0); 250 points are 249 steps (§4.1); Heun evaluates twice."""
    calls = []

    def v(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        calls.append(t[0].item())
        return x * 0 + t.view(-1, 1) + 1

    x = torch.zeros(2, 1, dtype=torch.float64)
    ts = torch.tensor([0.0, 0.25, 1.0], dtype=torch.float64)
    torch.testing.assert_close(
        sample_euler(v, x, ts), torch.full((2, 1), 0.25 * 1 + 0.75 * 1.25, dtype=torch.float64)
    )
    assert calls == [0.0, 0.25]
    calls.clear()
    sample_euler(v, x, timestep_grid(250, 0.3))
    assert len(calls) == 249
    calls.clear()
    # Heun is exact for a velocity linear in t: ∫0^1 (t + 1) dt = 1.5.
    torch.testing.assert_close(sample_heun(v, x, ts), torch.full((2, 1), 1.5, dtype=torch.float64))
    assert calls == [0.0, 0.25, 0.25, 1.0]


def test_dopri5_is_accurate_to_its_tolerance() -> None:
    x0, exact = _start_and_exact()
    nfe = []
    counted = lambda x, t: nfe.append(1) or gaussian_velocity(x, t)
    loose = (sample_dopri5(counted, x0) - exact).abs().max().item()  # reference atol 1e-6, rtol 1e-3
    loose_nfe = len(nfe)
    tight = (sample_dopri5(gaussian_velocity, x0, atol=1e-8, rtol=1e-6) - exact).abs().max().item()
    tighter = (sample_dopri5(gaussian_velocity, x0, atol=1e-10, rtol=1e-8) - exact).abs().max().item()
    scale = exact.abs().max().item()
    # dopri5 bounds the local error per step; the global error is a small multiple of the tolerance.
    assert loose < 20 * (1e-3 * scale + 1e-6)
    assert tight < 10 * (1e-6 * scale + 1e-8)
    assert tighter < 10 * (1e-8 * scale + 1e-10)
    assert loose / tight > 100 and tight / tighter > 50
    assert loose_nfe < 40  # adaptive: few evaluations at the reference's tolerances


def test_dopri5_keeps_float32() -> None:
    x0, exact = _start_and_exact()
    v32 = lambda x, t: gaussian_velocity(x.double(), t.double()).float()
    out = sample_dopri5(v32, x0.float(), atol=1e-6, rtol=1e-5)
    assert out.dtype == torch.float32
    assert (out.double() - exact).abs().max().item() < 1e-3


def test_sample_ode_dispatches() -> None:
    x0, exact = _start_and_exact()
    for method, bound in (("euler", 0.05), ("heun", 3e-4), ("dopri5", 0.1)):
        out = sample_ode(gaussian_velocity, x0, method=method, num_points=250, shift=0.3)
        assert (out - exact).abs().max().item() < bound, method
    with pytest.raises(ValueError, match="Unknown sampler 'rk4'"):
        sample_ode(gaussian_velocity, x0, method="rk4")  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------- shift


def test_shifted_grid() -> None:
    """§4.1: t ↦ s·t / (1 + (s − 1)·t); t = 0.5, s = 0.3 → 0.3 · 0.5 / 0.65 = 3/13 ≈ 0.2308."""
    grid = timestep_grid(3, shift=0.3)
    assert grid.tolist() == pytest.approx([0.0, 3 / 13, 1.0], abs=1e-15)
    assert round(grid[1].item(), 4) == 0.2308
    full = timestep_grid(250, shift=0.3)
    assert full[0].item() == 0.0 and full[-1].item() == 1.0
    assert bool((full.diff() > 0).all())
    assert full.diff()[0] < full.diff()[-1]  # dense near t = 0 (noise)
    torch.testing.assert_close(timestep_grid(11), torch.linspace(0, 1, 11, dtype=torch.float64))
    torch.testing.assert_close(
        shift_time(full, 1 / 0.3), torch.linspace(0, 1, 250, dtype=torch.float64)
    )  # inverse
    with pytest.raises(ValueError, match="num_points must be >= 2"):
        timestep_grid(1)


@pytest.mark.parametrize(("start", "off_steps"), [(0.10, 68), (0.11, 73), (0.125, 81)])
def test_cfg_interval_step_counts_of_section_4_1(start: float, off_steps: int) -> None:
    """With shift 0.3 and 250 points, guidance is off for the first 68 / 73 / 81 of the 249 steps."""
    ts = timestep_grid(250, 0.3)
    batches = []
    model = lambda x, t, y: batches.append(x.shape[0]) or x * 0
    fn = cfg_model_fn(model, torch.tensor([1, 2]), scale=4.0, null_class=1000, interval_start=start)
    sample_euler(fn, torch.zeros(2, 4, 1, 1, dtype=torch.float64), ts)
    assert batches.count(2) == off_steps and batches.count(4) == 249 - off_steps


# ---------------------------------------------------------------------------------------------- CFG


def _label_model(x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Output channel c = (y + 1)·(c + 1) + x: a different value on every channel, label and sample."""
    c = torch.arange(x.shape[1], dtype=x.dtype).view(1, -1, 1, 1)
    return (y.to(x.dtype).view(-1, 1, 1, 1) + 1) * (c + 1) + x


def test_cfg_guides_only_first_three_channels_by_default() -> None:
    x, t, y = torch.zeros(2, 6, 2, 2), torch.full((2,), 0.5), torch.tensor([3, 7])
    fn = cfg_model_fn(_label_model, y, scale=2.5, null_class=9)
    out = fn(x, t)
    cond, uncond = _label_model(x, t, y), _label_model(x, t, torch.full_like(y, 9))
    guided = uncond + 2.5 * (cond - uncond)
    assert torch.equal(out[:, :3], guided[:, :3])
    assert torch.equal(out[:, 3:], cond[:, 3:])
    assert not torch.equal(guided[:, 3:], cond[:, 3:])


def test_cfg_all_channels_option() -> None:
    x, t, y = torch.randn(2, 6, 2, 2), torch.full((2,), 0.5), torch.tensor([3, 7])
    out = cfg_model_fn(_label_model, y, scale=2.5, null_class=9, channels="all")(x, t)
    cond, uncond = _label_model(x, t, y), _label_model(x, t, torch.full_like(y, 9))
    torch.testing.assert_close(out, uncond + 2.5 * (cond - uncond))
    with pytest.raises(ValueError, match="channels must be 'first3' or 'all'"):
        cfg_model_fn(_label_model, y, 2.0, null_class=9, channels="rgb")  # type: ignore[arg-type]


def test_cfg_off_below_interval_start_and_for_scale_one() -> None:
    x, y = torch.randn(2, 6, 2, 2), torch.tensor([3, 7])
    batches = []

    def model(x: torch.Tensor, t: torch.Tensor, y_in: torch.Tensor) -> torch.Tensor:
        batches.append(x.shape[0])
        return _label_model(x, t, y_in)

    fn = cfg_model_fn(model, y, scale=10.0, null_class=9, interval_start=0.1, channels="all")
    cond = _label_model(x, torch.zeros(2), y)
    assert torch.equal(fn(x, torch.full((2,), 0.099)), cond)
    assert batches == [2]  # the unconditional half is not computed
    assert not torch.equal(fn(x, torch.full((2,), 0.1)), cond)  # on at t = start
    mixed = fn(x, torch.tensor([0.05, 0.5]))
    assert torch.equal(mixed[0], cond[0]) and not torch.equal(mixed[1], cond[1])
    batches.clear()
    assert torch.equal(cfg_model_fn(model, y, scale=1.0, null_class=9)(x, torch.full((2,), 0.5)), cond)
    assert batches == [2]


def test_model_sees_float32_times_for_bf16_states() -> None:
    seen = []
    v = lambda x, t: seen.append(t.dtype) or torch.zeros_like(x)
    sample_euler(v, torch.zeros(2, 3, dtype=torch.bfloat16), timestep_grid(3, 0.3))
    sample_heun(v, torch.zeros(2, 3, dtype=torch.float64), timestep_grid(3))
    assert seen == [torch.float32] * 2 + [torch.float64] * 4
