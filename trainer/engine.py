"""DeepSpeed, imported and configured in one place.

On a CPU-only machine DeepSpeed's first process-group init compiles its `deepspeed_shm_comm` op
(about 50 s), which training does not use; we mark it incompatible before anything initialises
(ecosystem §8). The optimizer is always the torch AdamW handed to DeepSpeed as a client optimizer,
so no fused or CPU-Adam op is compiled either.
"""

from __future__ import annotations

from types import ModuleType

from models.device import use_gpus


def import_deepspeed() -> ModuleType:
    """`import deepspeed`, with the CPU-only shm op disabled when there are no GPUs."""
    import deepspeed

    if not use_gpus():
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    return deepspeed
