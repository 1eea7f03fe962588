"""DeepSpeed, imported and configured in one place.

On a CPU-only machine DeepSpeed's first process-group init compiles its `deepspeed_shm_comm` op
(about 50 s), which training does not use; we mark it incompatible before anything initialises
(ecosystem §8). The optimizer is always the torch AdamW handed to DeepSpeed as a client optimizer,
so no fused or CPU-Adam op is compiled either.
"""

from __future__ import annotations

from types import ModuleType
from typing import TYPE_CHECKING, Any

from models.device import use_gpus

if TYPE_CHECKING:  # torch is imported where it is used: `ldit plan` reads the bucket rule without it
    import torch


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
    trainable_params: int | None = None,
    nonfinite: str = "stop",
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

    Buckets (`reduce_bucket_size`, `allgather_bucket_size`, in elements): :func:`bucket_elements` of the
    engine's trainable parameter count, not DeepSpeed's 5e8 default, which holds 5e8 elements whatever
    the model (1.86 GiB in fp32 per rank: XL/1 bf16 at W=2 went out of memory on this 23 GiB machine
    with it, benchmarks/bench_full_size.py). DeepSpeed allocates the bucket afresh every step (and the
    partition's gradients, and their concatenation for the step); on the CPU each would fault every page in
    again, which the ranks' huge-page allocation (`slurm.env.ALLOCATOR_ENV`) makes 512x rarer.

    What each step pays for only when it is used (issue #19):
    - `compute_grad_norm` (ZeRO-2): the global gradient norm is a norm per parameter, a sum and a
      host read (`is_invalid_grad_norm`) every step. It is on when clipping needs it, or when
      `nonfinite=skip` needs DeepSpeed to find a non-finite gradient (in fp32 the norm is its only check);
      else off, and the loop turns it on for the steps it logs (:func:`grad_norm_next_step`). Stage 1
      keeps DeepSpeed's default (on): its BF16 optimizer refuses it off under fp32 accumulation.
    - `bf16.check_grad_overflow`: a scan of every gradient, an all-reduce and a host read per step; on
      only for `nonfinite=skip`, which must decide before the update. `nonfinite=stop` checks the loss on
      the device instead and reads it at save, log and check steps (trainer.common.NonFiniteWatch), and
      a save also refuses non-finite master weights (ShardedEMA.masters_finite).
    - `reduce_scatter`: on GPUs (NCCL's reduce-scatter moves half an all-reduce's bytes). On the CPU
      DeepSpeed's "reduce-scatter" is one gloo `reduce` per owning rank, measured slower than one
      all-reduce of the bucket (benchmarks/bench_ddp.py, the 12x384 model at W=2, 125.5 MiB of fp32
      gradients: 392 ms against 82 ms), so there the bucket is all-reduced and each rank keeps its slice.
    - Stage 0 (:func:`engine_stage`: one rank, fp32): `gradient_clipping` is written 0 and the clipping
      is done by our step pre-hook, which computes the norm it logs (DeepSpeed's stage-0 clipping keeps
      none); no ZeRO keys apply.
    - `overlap_comm`: on GPUs with more than one rank, gradient buckets are reduced on a side stream
      while backward goes on (two bucket buffers instead of one). Off on the CPU, where DeepSpeed's
      streams are no-ops: no overlap to gain, a second buffer to pay.
    """
    import torch

    data_types = {"grad_accum_dtype": "fp32"} if zero_stage >= 1 else {}
    bucket = bucket_elements(trainable_params)
    skip = nonfinite == "skip"
    norm = {"compute_grad_norm": grad_clip > 0 or skip} if zero_stage == 2 else {}
    return {
        "train_batch_size": micro_batch * grad_accum * world_size,
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": grad_accum,
        "gradient_clipping": grad_clip if zero_stage > 0 else 0.0,  # stage 0: clipped by _Stage0Norm
        "zero_optimization": {
            "stage": zero_stage,
            "reduce_scatter": use_gpus(),
            "overlap_comm": use_gpus() and world_size > 1,
            "contiguous_gradients": True,
            "reduce_bucket_size": bucket,
            "allgather_bucket_size": bucket,
            **norm,
        },
        "bf16": {"enabled": dtype == torch.bfloat16, "check_grad_overflow": skip},
        "data_types": data_types,
        "communication_data_type": comm_dtype,
        "checkpoint": {"load_universal": load_universal},
        "steps_per_print": 2**62,
        "wall_clock_breakdown": False,
    }


def engine_stage(zero_stage: int, *, world_size: int, dtype: torch.dtype | str, nonfinite: str) -> int:
    """The ZeRO stage an engine runs: `zero_stage` (the config's, 2 by default), except 0 at one rank in fp32.

    ZeRO at one rank shards nothing, yet DeepSpeed 0.19.8's stage 2 does all of its partitioning work:
    each gradient is copied into a bucket, "reduced" over one rank, copied into the partition buffer and
    concatenated again for the step, and the fp32 master, a second copy of the fp32 weights, is copied back
    into the module after it (benchmarks/bench_trainer.py, 12x384 fp32: `ldit train` 1.099 of a plain
    loop with stage 2, 1.034 with stage 0 in the same run). Stage 0 is DeepSpeed's engine with torch's
    AdamW on the module's own parameters, which are the fp32 master weights.

    Kept at `zero_stage`: under bf16, where DeepSpeed's stage 0 would accumulate gradients in bf16 (the
    DDP_BFLOAT16 wrapper `_do_optimizer_sanity_check` picks; ldit accumulates in fp32, see
    :func:`deepspeed_config`), and for `nonfinite=skip`, which needs ZeRO's overflow check to
    skip a step. Checkpoints record the stage they were saved with; one saved at another stage resumes
    through whole tensors (trainer/stage_change.py), at any world size. `dtype` may be a name ("float32"
    as meta.json writes it, "fp32" as `ldit plan` does).
    """
    if world_size == 1 and str(dtype).removeprefix("torch.") in ("float32", "fp32") and nonfinite != "skip":
        return 0
    return zero_stage


class _Stage0Norm:
    """The global gradient norm at stage 0 (DeepSpeed computes none there), and the clipping with it.

    A step pre-hook of the torch optimizer: it runs inside `engine.step()` at the accumulation boundary,
    after DeepSpeed has accumulated (and, at W > 1, all-reduced) the gradients and before the update. It
    computes the norm when the step is logged (:func:`grad_norm_next_step`) or clipped, and clips as
    DeepSpeed's `clip_grad_norm_` does (coefficient clip / (norm + 1e-6) when below 1), so DeepSpeed's own
    stage-0 clipping, which keeps no norm, is turned off in the config at stage 0 (:func:`deepspeed_config`).
    """

    def __init__(self, params: list[torch.nn.Parameter], clip: float) -> None:
        self.params, self.clip = params, clip
        self.wanted = False
        self.norm: torch.Tensor | None = None

    def __call__(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        import torch

        self.norm = None
        if not (self.wanted or self.clip > 0):
            return
        grads = [p.grad for p in self.params if p.grad is not None]
        self.norm = torch.nn.utils.get_total_norm(grads)
        if self.clip > 0:
            torch.nn.utils.clip_grads_with_norm_(self.params, self.clip, self.norm)


def grad_norm_next_step(engine: Any, on: bool) -> None:
    """Whether the engine's next optimizer step computes the global gradient norm (for a log step), when
    its config computes it only when needed. Sets `compute_grad_norm` of DeepSpeed 0.19.8's ZeRO 1-2
    optimizer, which `step()` reads each time (deepspeed/runtime/zero/stage_1_and_2.py), or the flag of our
    stage-0 hook (:class:`_Stage0Norm`); a config that computes it always (clipping, nonfinite=skip) is
    left as it is."""
    optimizer = engine.optimizer
    if isinstance(norm := getattr(engine, "ldit_stage0_norm", None), _Stage0Norm):
        norm.wanted = on
    elif hasattr(optimizer, "compute_grad_norm"):
        optimizer.compute_grad_norm = on or engine.zero_compute_grad_norm()  # the config says: always


def global_grad_norm(engine: Any) -> float:
    """The global gradient norm of the engine's last step (0.0 when it computed none); a host read, for
    log steps."""
    if isinstance(norm := getattr(engine, "ldit_stage0_norm", None), _Stage0Norm):
        return float(norm.norm) if norm.norm is not None else 0.0
    return float(engine.get_global_grad_norm() or 0.0)


BUCKET_CAP = 50_000_000
"""Elements in one gradient reduce / parameter all-gather bucket at most: 200 MB in fp32, 100 MB in bf16,
past the message size where NCCL's ring reaches its bus bandwidth (tens of MB), a tenth of DeepSpeed's
default 5e8 (2 GB in fp32, allocated whatever the model's size)."""


def bucket_elements(trainable_params: int | None) -> int:
    """The bucket size for an engine training `trainable_params` parameters: the whole model when it is
    smaller than :data:`BUCKET_CAP` (one bucket, nothing allocated for elements that never come), else
    the cap; even, as DeepSpeed's all-gather alignment requires. None: the cap."""
    n = BUCKET_CAP if trainable_params is None else min(max(int(trainable_params), 2), BUCKET_CAP)
    return n + n % 2


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
    grad_clip: float = 0.0,
) -> Any:
    """A DeepSpeed engine over `module` with torch's AdamW on `params` (no op to compile) and an
    optional linear warmup, both saved and restored by DeepSpeed's checkpoints.

    AdamW is torch's fused kernel (CPU and CUDA): one pass over each ZeRO partition, where the default
    multi-tensor version allocates a temporary the size of the partition for its denominator. Measured
    here on a 337 M-element fp32 partition (XL/1's at W=2): +1.26 GiB peak and 0.92 s a step with
    `foreach`, +0 GiB and 0.24 s fused (2 threads). The two agree to rounding, not bit for bit.

    At stage 0 (:func:`engine_stage`) `grad_clip` is applied by our step pre-hook, which also computes the
    norm that is logged (:class:`_Stage0Norm`), and at one rank DeepSpeed's backward all-reduce is off.
    """
    import torch

    deepspeed = import_deepspeed()
    optimizer = torch.optim.AdamW(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, fused=True)
    warmup = max(warmup_steps, 0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) if warmup else 1.0
    )
    engine, *_ = deepspeed.initialize(
        model=module, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config
    )
    if ds_config["zero_optimization"]["stage"] == 0:
        engine.ldit_stage0_norm = _Stage0Norm(params, grad_clip)
        optimizer.register_step_pre_hook(engine.ldit_stage0_norm)
        if engine.dp_world_size == 1:  # nothing to reduce: DeepSpeed would flatten, all-reduce and copy back
            engine.enable_backward_allreduce = False
    return engine
