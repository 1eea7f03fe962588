"""Exponential moving average of a model's weights, kept in fp32.

Matches the reference's `update_ema` (fact sheet §3.2): ema ← d·ema + (1 − d)·param every step from step
0, starting from a copy of the model, decay 0.9999, over all named parameters including the frozen
`pos_embed`. Buffers (the RoPE tables) are copied, not averaged. The live parameters may be bf16 (a
DeepSpeed bf16 module); the average is accumulated in fp32 so small updates are not rounded away.

The trainer does not use this class: under DeepSpeed it averages the fp32 master weights, sharded like
the optimizer state (trainer/sharded_ema.py), with the same formula and the same keys. This is the EMA of
a plain module (no DeepSpeed), and the reference the trainer's EMA is tested against.

Written here rather than taken from a library: timm's `ModelEmaV3` and torch's `AveragedModel` keep a
whole second module in the live dtype; we want only fp32 tensors under the model's own key names, so the
EMA exports with the reference's state_dict keys (§8.1) and loads into the model with `strict=True`.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["EMA"]


class EMA:
    """fp32 EMA of `model`'s parameters (and a copy of its buffers), keyed like `model.state_dict()`."""

    def __init__(self, model: nn.Module, decay: float = 0.9999) -> None:
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"EMA decay must be in [0, 1], got {decay}")
        self.decay = decay
        with torch.no_grad():
            self.params: dict[str, Tensor] = {
                name: p.detach().to(torch.float32, copy=True) for name, p in model.named_parameters()
            }
            self.buffers: dict[str, Tensor] = {
                name: b.detach().clone() for name, b in model.named_buffers() if _persistent(model, name)
            }
        self._order = [k for k in model.state_dict() if k in self.params or k in self.buffers]

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """ema ← decay·ema + (1 − decay)·param for every named parameter; buffers are copied."""
        for name, p in model.named_parameters():
            self.params[name].mul_(self.decay).add_(p.detach().to(torch.float32), alpha=1.0 - self.decay)
        for name, b in model.named_buffers():
            if name in self.buffers:
                self.buffers[name].copy_(b)

    def state_dict(self) -> dict[str, Tensor]:
        """The averaged weights under the model's own keys, in its order (parameters fp32, buffers as is)."""
        return {k: self.params[k] if k in self.params else self.buffers[k] for k in self._order}

    def load_state_dict(self, state_dict: dict[str, Tensor]) -> None:
        """Load what `state_dict` returned; the key sets must match exactly."""
        expected = set(self.params) | set(self.buffers)
        missing, unexpected = expected - set(state_dict), set(state_dict) - expected
        if missing or unexpected:
            raise KeyError(
                f"EMA state_dict mismatch: missing {sorted(missing)}, unexpected {sorted(unexpected)}"
            )
        with torch.no_grad():
            for name, value in state_dict.items():
                target = self.params[name] if name in self.params else self.buffers[name]
                if target.shape != value.shape:
                    raise ValueError(f"EMA {name}: shape {tuple(value.shape)} != {tuple(target.shape)}")
                target.copy_(value)

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Write the averaged weights into `model` (cast to its dtype), e.g. a separate model for sampling."""
        model.load_state_dict(self.state_dict(), strict=True)

    def to(self, device: torch.device | str) -> EMA:
        """Move the stored tensors (they stay fp32)."""
        self.params = {k: v.to(device) for k, v in self.params.items()}
        self.buffers = {k: v.to(device) for k, v in self.buffers.items()}
        return self


def _persistent(model: nn.Module, name: str) -> bool:
    """Whether buffer `name` is in the state_dict (non-persistent buffers are rebuilt by the model)."""
    module_name, _, buffer_name = name.rpartition(".")
    module = model.get_submodule(module_name) if module_name else model
    return buffer_name not in module._non_persistent_buffers_set
