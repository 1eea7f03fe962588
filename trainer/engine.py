"""DeepSpeed, imported and configured in one place.

On a CPU-only machine DeepSpeed's first process-group init compiles its `deepspeed_shm_comm` op
(about 50 s), which training does not use; we mark it incompatible before anything initialises
(ecosystem §8). The optimizer is always the torch AdamW handed to DeepSpeed as a client optimizer,
so no fused or CPU-Adam op is compiled either.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

import torch

from models.device import use_gpus


def import_deepspeed() -> ModuleType:
    """`import deepspeed`, with the CPU-only shm op disabled when there are no GPUs."""
    import deepspeed

    if not use_gpus():
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    return deepspeed


def deepspeed_config(
    *,
    micro_batch: int,
    grad_accum: int,
    world_size: int,
    dtype: torch.dtype,
    grad_clip: float,
    zero_stage: int,
    comm_dtype: str = "fp32",
    load_universal: bool = False,
) -> dict[str, Any]:
    """The DeepSpeed JSON of one engine, generated from our config (saved as ds_config.json in the run).

    Clipping is written explicitly (DeepSpeed's default became 1.0 in 0.19.3; the reference does not
    clip). bf16 keeps fp32 master weights and optimizer state in the ZeRO partitions and skips a step
    whose gradients are not finite (`check_grad_overflow`).

    Gradients under bf16 (DeepSpeed issues #2352, #2768 report divergence from bf16 accumulation and
    all-reduce): `data_types.grad_accum_dtype` = fp32 makes DeepSpeed 0.19.8 accumulate over
    micro-batches in fp32: at stage 2 each reduced gradient slice is added into an fp32 partition buffer
    (`_use_compact_grad_partition_buffer` in deepspeed/runtime/zero/stage_1_and_2.py), at stage 1 its
    BF16 optimizer keeps an fp32 buffer per partition. Without the key the sum is bf16
    (tests/test_bf16_grads.py: 15 micro-batches 1000x smaller than the first are lost without it, kept
    with it). Stage 0 with bf16 refuses fp32 accumulation (`_do_optimizer_sanity_check`), so the key is
    written for stages >= 1 only.
    `communication_data_type` is the dtype of the gradient reduce-scatter / all-reduce: fp32 (our
    default, the reference's DDP reduces fp32 gradients) or bf16 (half the bytes on the wire, DeepSpeed's
    own default under bf16).
    """
    data_types = {"grad_accum_dtype": "fp32"} if zero_stage >= 1 else {}
    return {
        "train_batch_size": micro_batch * grad_accum * world_size,
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": grad_accum,
        "gradient_clipping": grad_clip,
        "zero_optimization": {"stage": zero_stage, "overlap_comm": False, "contiguous_gradients": True},
        "bf16": {"enabled": dtype == torch.bfloat16, "check_grad_overflow": True},
        "data_types": data_types,
        "communication_data_type": comm_dtype,
        "checkpoint": {"load_universal": load_universal},
        "steps_per_print": 2**62,
        "wall_clock_breakdown": False,
    }


def build_engine(
    module: torch.nn.Module,
    params: list[torch.nn.Parameter],
    *,
    lr: float,
    betas: tuple[float, float],
    eps: float,
    weight_decay: float,
    warmup_steps: int,
    ds_config: dict[str, Any],
) -> Any:
    """A DeepSpeed engine over `module` with torch's AdamW on `params` (no op to compile) and an
    optional linear warmup, both saved and restored by DeepSpeed's checkpoints."""
    deepspeed = import_deepspeed()
    optimizer = torch.optim.AdamW(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
    warmup = max(warmup_steps, 0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) if warmup else 1.0
    )
    engine, *_ = deepspeed.initialize(
        model=module, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config
    )
    return engine
