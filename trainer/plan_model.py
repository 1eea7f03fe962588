"""The memory and time model behind `ldit plan`: what one rank of a LightningDiT run under DeepSpeed ZeRO-2
holds, and how long a step takes, from the model's own parameter list and FLOP count
(models/lightningdit_spec.py) and a cluster's measured figures. Nothing is built and torch is not imported,
so a plan takes milliseconds.

Memory per rank. The ZeRO paper (Rajbhandari et al., arXiv 1910.02054, §3.1 and §5.2; DeepSpeed's ZeRO
docs) counts, for Ψ parameters trained with mixed precision and Adam, 2Ψ bytes of 16-bit weights, 2Ψ of
16-bit gradients and KΨ = 12Ψ of optimizer state (an fp32 master copy and the two fp32 Adam moments); stage
2 partitions the gradients and the optimizer state over the W data-parallel ranks: 2Ψ + (2 + 12)Ψ/W. What
DeepSpeed 0.19.8 allocates under our config (trainer/engine.py: bf16 with `grad_accum_dtype` fp32, torch's
fused AdamW as a client optimizer, contiguous gradients), read in deepspeed/runtime/zero/stage_1_and_2.py
and checked byte for byte on real engines at W = 1 and 2 by tests/test_plan.py:

- parameters: the module's weights in the training dtype, flattened into one buffer per optimizer group
  padded to a multiple of 2·W elements (`nccl_start_alignment_factor` 2 × W), the whole on every rank;
  the frozen parameters (`pos_embed`) cast likewise; the buffers kept in their dtype (the fp32 RoPE tables:
  DeepSpeed casts parameters only, `_cast_module_mixed_precision`).
- gradients: under bf16 with fp32 accumulation, one fp32 buffer of this rank's partition of P = padded / W
  elements (`_build_compact_grad_partition_buffer`): 4P, where ZeRO's count has 2Ψ/W. In fp32, a copy
  of the whole gradient of every parameter that reaches into the partition (`all_grad_tensors`), and zeros
  for the padding in it (`get_flat_partition`).
- optimizer state: Adam's exp_avg and exp_avg_sq over the fp32 partition, 8P (the step counters, 0-d
  tensors, are left out as trainer.common.optimizer_state_bytes leaves them out).
- fp32 master: the partition in fp32, 4P (`single_partition_of_fp32_groups`).
- EMA (trainer/sharded_ema.py): each rank averages its own partition of the fp32 master, 4P on the
  device; the EMA of the frozen parameters and the buffers stay on the host (the trainer snapshots them
  before DeepSpeed moves the module), so they are counted apart.

bf16 thus holds 2Ψ + 20Ψ/W (+ padding): ZeRO's 2Ψ + 14Ψ/W with fp32 gradients (+2Ψ/W) and the EMA (+4Ψ/W).

Communication buffers (:func:`bucket_bytes`), activations (:func:`activation_bytes`) and the step time
(:func:`step_time`) are documented where they are computed. Not modelled: the optimizer's and the EMA's
passes over the partition (memory-bound, about 40 bytes a partition element: 8.5 ms at XL/1's 675 M
parameters and W = 1 on 3.35 TB/s, under 1% of a step), data loading (the reader reads a step ahead) and
host-side overheads; a sweep's measured MFU absorbs them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Literal

from models.lightningdit_spec import FlopCount, LightningDiTArgs, TensorSpec, lightningdit_parameters
from trainer.engine import bucket_elements

Dtype = Literal["bf16", "fp32"]
BYTES: dict[str, int] = {"bf16": 2, "fp32": 4}
GiB = 2**30

CONTEXT_BYTES = 2 * GiB
"""Allowance for what no tensor of ours holds: the CUDA context with cuBLAS and cuDNN workspaces (about
0.5-1 GiB with torch 2.x on an H100) and NCCL's channel buffers (NCCL_BUFFSIZE 4 MiB per channel and peer,
more with NVLS on NVSwitch nodes), rounded up."""
FRAGMENTATION = 0.10
"""Allowance for the caching allocator on the memory that comes and goes each step (activations and
communication buffers): it reserves whole segments (2 MiB for small blocks, 20 MiB for large ones) and
cannot always reuse a freed block for another size; training loops typically reserve 5-15% more than they
allocate (PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True lowers it)."""


@dataclass(frozen=True)
class StateBytes:
    """Bytes of model and optimizer state one rank holds (see the module docstring for each)."""

    params: int
    grads: int
    optimizer: int
    master: int
    ema: int
    """The EMA's device part: this rank's partition."""
    ema_host: int
    """The EMA of the frozen parameters and the buffers, held on the host (trainer/sharded_ema.py)."""

    @property
    def device(self) -> int:
        return self.params + self.grads + self.optimizer + self.master + self.ema


def partition_elements(trainable: int, world: int) -> tuple[int, int]:
    """(padded, P): the flat 16-bit buffer's length, `trainable` rounded up to a multiple of 2·W, and one
    rank's partition of it (`DeepSpeedZeroOptimizer.__init__`: alignment = nccl_start_alignment_factor · W,
    `get_data_parallel_partitions`)."""
    align = 2 * world
    padded = -(-trainable // align) * align
    return padded, padded // world


def fp32_grad_elements(numels: Sequence[int], world: int) -> list[int]:
    """For each rank, the fp32 gradient elements DeepSpeed holds for its partition in fp32 training: the
    whole gradients of the parameters that reach into it (`get_partition_info` puts a parameter in the
    partition its first element lies in, and in every partition whose first element lies strictly inside
    it), and zeros for the padding the partition holds (`get_flat_partition`)."""
    total = sum(numels)
    padded, part = partition_elements(total, world)
    out, at = [0] * world, 0
    for n in numels:
        first = at // part
        if first < world:
            out[first] += n
        for r in range(first + 1, min(world - 1, (at + n - 1) // part) + 1):  # partitions starting inside it
            out[r] += n
        at += n
    return [g + max(0, min(part * (r + 1), padded) - max(part * r, total)) for r, g in enumerate(out)]


def fullest_rank(params: Sequence[TensorSpec], world: int, dtype: Dtype) -> int:
    """The rank that holds the most (ranks differ only in fp32's gradients, by the straddling parameters)."""
    if dtype != "fp32":
        return 0
    per_rank = fp32_grad_elements([p.numel for p in params if p.trainable], world)
    return max(range(world), key=per_rank.__getitem__)


def zero2_state(
    params: Sequence[TensorSpec], buffers: Sequence[TensorSpec], world: int, rank: int, dtype: Dtype
) -> StateBytes:
    """The bytes rank `rank` of `world` holds under ZeRO-2 for a module with these parameters (in
    `named_parameters()` order, one optimizer group of the trainable ones) and buffers (fp32)."""
    s = BYTES[dtype]
    trained = [p.numel for p in params if p.trainable]
    frozen = sum(p.numel for p in params if not p.trainable)
    buffer_numel = sum(b.numel for b in buffers)
    padded, part = partition_elements(sum(trained), world)
    grads = 4 * part if dtype == "bf16" else 4 * fp32_grad_elements(trained, world)[rank]
    return StateBytes(
        params=s * (padded + frozen) + 4 * buffer_numel,
        grads=grads,
        optimizer=8 * part,
        master=4 * part,
        ema=4 * part,
        ema_host=4 * (frozen + buffer_numel),
    )


def stage0_state(params: Sequence[TensorSpec], buffers: Sequence[TensorSpec]) -> StateBytes:
    """The bytes one rank holds at stage 0, which ldit runs at one rank in fp32 (trainer.engine.engine_stage):
    the module's own fp32 parameters are the master weights (no flat buffer, no padding, no master copy),
    a `.grad` per trained parameter, Adam's two moments per trained parameter, and the EMA of each trained
    parameter (trainer/sharded_ema.py without ZeRO); no gradient bucket (the backward all-reduce is off).
    16Ψ + the EMA's 4Ψ, where ZeRO-2 at one rank holds 20Ψ + its bucket."""
    trained = sum(p.numel for p in params if p.trainable)
    frozen = sum(p.numel for p in params if not p.trainable)
    buffer_numel = sum(b.numel for b in buffers)
    return StateBytes(
        params=4 * (trained + frozen + buffer_numel),
        grads=4 * trained,
        optimizer=8 * trained,
        master=0,
        ema=4 * trained,
        ema_host=4 * (frozen + buffer_numel),
    )


def bucket_staging_bytes(trainable: int, world: int, dtype: Dtype, gpus: bool) -> int:
    """The staging buckets gradients are copied into as the backward produces them (`setup_buckets`):
    `bucket_elements(trainable)` elements (trainer/engine.py) in the training dtype
    (`_gradient_reduction_buffer_dtype` at stage 2), two of them when `overlap_comm` is on (GPUs and W > 1,
    trainer/engine.py `deepspeed_config`)."""
    return bucket_elements(trainable) * BYTES[dtype] * (2 if gpus and world > 1 else 1)


def bucket_bytes(trainable: int, world: int, dtype: Dtype, comm_dtype: Dtype, gpus: bool) -> int:
    """Gradient-reduction buffers at their peak: the staging buckets (:func:`bucket_staging_bytes`); while a
    bucket is reduced on GPUs (`reduce_scatter` on), its slices flattened into one tensor in the training
    dtype (`allreduce_bucket`); and when the communication dtype differs, a copy in it (`.to(comm dtype)`)."""
    n = bucket_elements(trainable)
    s, c = BYTES[dtype], BYTES[comm_dtype]
    staging = bucket_staging_bytes(trainable, world, dtype, gpus)
    return staging + (n * s if gpus else 0) + (n * c if c != s else 0)


# ----------------------------------------------------------------------------------------------------------
# Activations


@dataclass(frozen=True)
class ActivationBytes:
    """Activation memory of one micro-batch."""

    saved: int
    """What the forward pass saves for the backward (checked against saved-tensor hooks by tests/test_plan.py)."""
    recompute: int
    """With checkpointing, one block's saved tensors, rebuilt while its backward runs; else 0."""
    working: int
    """An estimate, not measured, of the backward's transient tensors: the residual stream's incoming and
    outgoing gradients, the FFN's largest gradients (of w12's output and of the gated product), and one
    block's parameter gradients before they are copied into a bucket."""

    @property
    def peak(self) -> int:
        return self.saved + self.recompute + self.working


def block_saved_bytes(args: LightningDiTArgs, micro: int, dtype: Dtype) -> int:
    """Bytes one LightningDiT block saves for its backward, by op (B micro batch, T tokens, D width, H the
    SwiGLU width, h heads, s bytes of the training dtype; norms compute in fp32, §2.2):

    - adaLN: SiLU(c) (s·B·D, the input of its Linear), and its output (s·6·B·D), kept whole by the gates
      (chunks are views of it); each modulate's `1 + scale` (2 × s·B·D).
    - RMSNorm ×2: x in fp32 (4·BTD), the fp32 rsqrt (4·BT), the normed x cast back (s·BTD).
    - modulate ×2: the product with (1 + scale) (s·BTD), which the next Linear saves as its input.
    - attention: qkv's input (s·BTD), qkv's output (s·3·BTD, kept whole by v, a view of it), q and k after
      RoPE (2 × s·BTD), SDPA's output (s·BTD, also proj's input) and log-sum-exp (4·B·h·T, fp32); RoPE
      saves only its fp32 tables (buffers); with q/k-norm, each of q and k adds an RMSNorm over head_dim
      (its fp32 copy of q or k only under bf16: in fp32 `x.float()` is the view of qkv's output itself).
    - the gated residual adds ×2: proj's and w3's outputs (2 × s·BTD).
    - SwiGLU: w12's input (s·BTD), its output (s·2·BTH, kept whole by x1 and x2), SiLU(x1) (s·BTH) and
      the product (s·BTH, w3's input).
    """
    if not (args.use_swiglu and args.use_rmsnorm):
        raise NotImplementedError("the activation model covers the LightningDiT block (SwiGLU, RMSNorm) only")
    b, t, d, h, heads, s = (
        micro,
        args.num_tokens,
        args.hidden_size,
        args.ffn_hidden,
        args.num_heads,
        BYTES[dtype],
    )
    btd, bt = b * t * d, b * t
    block = btd * (8 + 14 * s) + b * t * h * 4 * s + 8 * bt + 4 * b * heads * t + 9 * s * b * d
    if args.use_qknorm:
        block += 2 * ((4 * btd if s != 4 else 0) + 4 * b * heads * t + s * btd)  # fp32: x.float() is q itself
    return block


def _outside_blocks(args: LightningDiTArgs, micro: int, dtype: Dtype) -> int:
    """Saved bytes outside the blocks: the latents (patch-embed conv's input), the timestep MLP (its
    256-dim input, its hidden layer before and after SiLU), the labels (int64), c = t_emb + y_emb (the
    adaLN SiLUs' shared input), and the final layer (adaLN SiLU output, RMSNorm as in a block, modulate,
    the Linear's input)."""
    b, t, d, s = micro, args.num_tokens, args.hidden_size, BYTES[dtype]
    latents = b * args.in_channels * args.input_size**2 * s
    cond = b * 256 * s + 2 * b * d * s + 8 * b + b * d * s
    final = 4 * b * t * d + 4 * b * t + 3 * s * b * t * d + 2 * s * b * d
    return latents + cond + final


def activation_bytes(
    args: LightningDiTArgs, micro: int, dtype: Dtype, checkpointing: bool
) -> ActivationBytes:
    """Activation memory of one micro-batch of `micro` samples. Without checkpointing every block's saved
    tensors live until its backward; with it (non-reentrant `torch.utils.checkpoint` per block), each block
    keeps only its input (s·BTD; c and the RoPE tables are shared) and one block's tensors are rebuilt at a
    time in the backward."""
    s, b, t, d = BYTES[dtype], micro, args.num_tokens, args.hidden_size
    block = block_saved_bytes(args, micro, dtype)
    per_block = s * b * t * d if checkpointing else block
    block_params = sum(p.numel for p in _block_params(args))
    working = s * b * t * (2 * d + 3 * args.ffn_hidden) + s * block_params
    return ActivationBytes(
        saved=_outside_blocks(args, micro, dtype) + args.depth * per_block,
        recompute=block if checkpointing else 0,
        working=working,
    )


def _block_params(args: LightningDiTArgs) -> list[TensorSpec]:
    params, _ = lightningdit_parameters(replace(args, depth=1))
    return [p for p in params if p.name.startswith("blocks.0.")]


# ----------------------------------------------------------------------------------------------------------
# Step time


@dataclass(frozen=True)
class Links:
    """A cluster's measured figures (slurm/cluster.py documents how to measure each)."""

    peak_tflops: float
    mfu: float
    intra_node_gbs: float
    inter_node_gbs: float
    latency_us: float


@dataclass(frozen=True)
class StepTime:
    """Seconds of one optimizer step."""

    compute: float
    """Forward + backward (+ recompute) of the rank's local batch at peak × MFU."""
    reduce: float
    """The gradient all-reduces of all micro-batches."""
    gather: float
    """The all-gather of the updated 16-bit parameters after the step."""
    exposed: float
    """The part of `reduce` not hidden behind the backward."""

    @property
    def total(self) -> float:
        return self.compute + self.exposed + self.gather


def step_time(
    flops: FlopCount,
    *,
    local_batch: int,
    micro: int,
    trainable: int,
    world: int,
    nodes: int,
    dtype: Dtype,
    comm_dtype: Dtype,
    gpus: bool,
    links: Links,
) -> StepTime:
    """Predicted time of one step of `local_batch` samples per rank in micro-batches of `micro`.

    - compute: local_batch · FLOPs.train / (peak · MFU), FLOPs counted by the model
      (`lightningdit_flops`: forward, backward, and the blocks' forward again with checkpointing).
    - gradients: ZeRO-2 reduces every micro-batch's gradients (it keeps only its partition, so it cannot
      sum them whole: `reduce_ready_partitions_and_remove_grads` runs in each backward). The ZeRO paper's
      stage 2 reduce-scatters them (Ψ elements over the wire per rank); DeepSpeed 0.19.8 with its default
      `use_multi_rank_bucket_allreduce` all-reduces each bucket and keeps its slice
      (`allreduce_and_scatter`), so a ring moves 2·(W−1)/W · Ψ elements of the communication dtype per
      rank, over the bus bandwidth, plus 2·(W−1) latency steps per bucket.
    - parameters: after the step one all-gather of the 16-bit partitions into the flat buffer
      (`all_gather_into_tensor_dp_groups`): (W−1)/W · padded elements, plus W−1 latency steps.
    - overlap: with `overlap_comm` (GPUs, W > 1) a full bucket is reduced on a side stream while the
      backward goes on, which waits for it only when the next bucket is full (`average_tensor`: the compute
      stream waits on the reduction stream); exposed is the larger of (reduction − backward) and the last
      bucket's reduction, which nothing follows. Without it (CPUs) every reduction is exposed.
    - bus bandwidth: within a node if the job is one node; else across nodes (a ring through every rank
      runs at its slowest link: nccl-tests' busbw across nodes).
    """
    accum = local_batch // micro
    compute = local_batch * flops.train / (links.peak_tflops * 1e12 * links.mfu)
    if world == 1:
        return StepTime(compute=compute, reduce=0.0, gather=0.0, exposed=0.0)
    busbw = (links.intra_node_gbs if nodes == 1 else links.inter_node_gbs) * 1e9
    alpha = links.latency_us * 1e-6
    padded, _ = partition_elements(trainable, world)
    buckets = math.ceil(trainable / bucket_elements(trainable))
    frac = (world - 1) / world
    reduce = 2 * frac * trainable * BYTES[comm_dtype] / busbw + buckets * 2 * (world - 1) * alpha
    gather = frac * padded * BYTES[dtype] / busbw + (world - 1) * alpha
    if gpus:
        backward = compute / accum * (flops.backward + flops.recompute) / flops.train
        exposed = max(reduce - backward, reduce / buckets)
    else:
        exposed = reduce
    return StepTime(compute=compute, reduce=accum * reduce, gather=gather, exposed=accum * exposed)
