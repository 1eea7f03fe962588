"""Device and dtype choices, in one place for the whole project.

GPUs are used when torch sees any (the launcher has pinned this process's GPU with
`torch.cuda.set_device`); otherwise the CPU. Training precision `auto` means bf16 on GPUs, as in the
reference's `accelerate --mixed_precision bf16` (reference §3.2), and fp32 on the CPU, where bf16 matmuls
are slow and the tests compare runs bit for bit.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    import torch

Precision = Literal["auto", "bf16", "fp32"]


def use_gpus() -> bool:
    """Whether this machine trains on GPUs (else on the CPU, with gloo)."""
    import torch  # here, not at the top: config schemas name Precision, and `ldit` starts without torch

    return torch.cuda.is_available()


def device() -> torch.device:
    """This process's device: its pinned GPU, or the CPU."""
    import torch

    if use_gpus():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def compute_dtype(precision: Precision, dev: torch.device | None = None) -> torch.dtype:
    """The dtype training computes in: `auto` is bf16 on GPUs and fp32 on the CPU."""
    import torch

    if precision == "bf16":
        return torch.bfloat16
    if precision == "fp32":
        return torch.float32
    dev = device() if dev is None else dev
    return torch.bfloat16 if dev.type == "cuda" else torch.float32
