"""Our ZeRO-2 engine against torch DDP at 2 ranks on gloo, with gloo's own floor measured beside them
(issue #19).

    python benchmarks/bench_ddp.py [--size 12x384|T/1] [--rounds 3] [--steps 10] [--warmup 2]

Global batch 16 (8 a rank), fp32, torch's fused AdamW (the optimizer config's defaults), forward + flow
loss + backward + step on one in-memory batch a rank. Three contenders, each a fresh pair of processes per
round (benchmarks/_interleave.py: `ldit … --local 2`'s environment, torch's huge-page allocation included,
1 thread a rank on 2 cores, rounds interleaved, order rotated, medians; `THP_MEM_ALLOC_ENABLE=0` before the
command runs all three without it):

- `zero2`: the DeepSpeed engine as trainer/dit.py builds it (`trainer.engine.deepspeed_config` +
  `build_engine`, stage 2, fp32 communication, the engine's bucket size).
- `ddp`: `torch.nn.parallel.DistributedDataParallel` with its defaults (25 MiB buckets).
- `gloo`: the collectives alone, on a flat fp32 tensor of the model's gradient elements P:
  `all-reduce` (one call); `DDP buckets` (all-reduce of a 1 MiB, then 25 MiB chunks, as DDP's buckets,
  one after another); `reduce-scatter` of the gradients and `all-gather` of the updated parameters, each
  per bucket of `trainer.engine.bucket_elements(P)` (ZeRO-2's traffic with gloo's own primitives);
  `DeepSpeed's pattern` (what DeepSpeed 0.19.8's stage 2 issues on gloo: per bucket, the slice each rank
  owns flattened and `dist.reduce`d to it, the sum copied back, then one in-place
  `all_gather_into_tensor` of the partitions); and the fused AdamW step over all P elements (DDP's) and
  over one rank's partition (ZeRO's).

Figures: the median step time of each engine (rank 0; the step ends in collectives, so the ranks agree),
the optimizer moment bytes a rank holds (Adam's exp_avg + exp_avg_sq: `trainer.common.optimizer_state_bytes`
for ZeRO, the same sum over `optimizer.state` for DDP), and the probe's median times. There are no log
steps: the engine computes the gradient norm only if `deepspeed_config` asks it to every step, as the
trainer's engine between its log steps.

The floor. The two engines run the same forward and backward; what differs is the collectives and the
optimizer step. ZeRO's `overlap_comm` is off on the CPU, so all its collectives add to its step; DDP
starts its bucket all-reduces during the backward and may hide part of them. So ZeRO/DDP on this
machine cannot fall much below
    1 + (ZeRO's collectives + AdamW on a partition − DDP's buckets − AdamW on all) / DDP's step,
computed per round from that round's probe and DDP step, for three ways of ZeRO-2's collectives:
reduce-scatter + all-gather, all-reduce + all-gather (DeepSpeed's `reduce_scatter: false`), and
DeepSpeed's pattern. The formula counts DDP's all-reduce in full: what DDP hides only raises it. The copies
each engine makes around its buckets are left out of it, so a measured ratio a little under it is noise
or those copies, not a contradiction. If the lowest floor exceeds 1.05, a ZeRO/DDP ratio of 1.05 is out
of reach on gloo whatever the engine does.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time

from _interleave import (
    ROOT,
    Contender,
    errors,
    median,
    median_after,
    python,
    ratio,
    report,
    run_rounds,
    table,
    threads_line,
    values,
)
from bench_trainer import SIZES, dit

DDP_FIRST_BUCKET, DDP_BUCKET = 2**20, 25 * 2**20
"""Bytes of DDP's first gradient bucket and of the others (torch's defaults: 1 MiB, `bucket_cap_mb=25`)."""
CONTENDERS = ("zero2", "ddp", "gloo")


# ------------------------------------------------------------------------- the contender processes


def engine_step(a: argparse.Namespace) -> dict[str, float]:
    """One rank of `zero2` or `ddp`: its step times and the Adam moment bytes it holds."""
    import torch
    import torch.distributed as dist

    from models.flow import FlowArgs, RectifiedFlow
    from slurm.env import init_distributed
    from trainer.config import OptimConfig

    env = init_distributed()
    torch.manual_seed(0)
    model = dit(a.size, num_classes=1000)
    trained = [p for p in model.parameters() if p.requires_grad]
    o = OptimConfig()
    if a.contender == "zero2":
        from trainer.common import optimizer_state_bytes
        from trainer.engine import build_engine, deepspeed_config

        ds = deepspeed_config(micro_batch=a.batch, grad_accum=1, world_size=env.world_size, dtype=torch.float32,
                              grad_clip=o.grad_clip, zero_stage=2, trainable_params=sum(p.numel() for p in trained))  # fmt: skip
        net = build_engine(model, trained, lr=o.lr, betas=o.betas, eps=o.eps, weight_decay=o.weight_decay,
                           warmup_steps=o.warmup_steps, ds_config=ds)  # fmt: skip

        def backward_step(loss: torch.Tensor) -> None:
            net.backward(loss)
            net.step()

        def moment_bytes() -> int:
            return optimizer_state_bytes(net)
    else:
        net = torch.nn.parallel.DistributedDataParallel(model)
        opt = torch.optim.AdamW(trained, lr=o.lr, betas=o.betas, eps=o.eps, weight_decay=o.weight_decay, fused=True)  # fmt: skip

        def backward_step(loss: torch.Tensor) -> None:
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        def moment_bytes() -> int:
            return sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values()
                       if torch.is_tensor(t) and t.dim() > 0)  # fmt: skip

    flow = RectifiedFlow(FlowArgs())
    g = torch.Generator().manual_seed(env.rank)
    x, y = torch.randn(a.batch, 32, 16, 16, generator=g), torch.randint(0, 1000, (a.batch,), generator=g)
    times = []
    for _ in range(a.warmup + a.steps):
        t0 = time.perf_counter()
        backward_step(flow.loss(net, x, y).total)
        times.append(time.perf_counter() - t0)
    dist.barrier()
    return {"step_s": median_after(times, a.warmup), "moment_bytes": moment_bytes()}


def collectives(a: argparse.Namespace) -> dict[str, float]:
    """One rank of `gloo`: the median time of each collective pattern over the model's gradient elements,
    and of the fused AdamW step over all of them (DDP's) and over one rank's partition (ZeRO's)."""
    import torch
    import torch.distributed as dist

    from slurm.env import init_distributed
    from trainer.engine import bucket_elements

    init_distributed()
    rank, world = dist.get_rank(), dist.get_world_size()
    with torch.device("meta"):
        n = sum(p.numel() for p in dit(a.size, num_classes=1000).parameters() if p.requires_grad)
    part = math.ceil(n / world)  # each rank's partition (the flat buffer padded to world × part)
    bucket = bucket_elements(n)
    step = bucket - bucket % world  # a bucket, split evenly over the ranks
    grads, params = torch.randn(part * world), torch.randn(part * world)
    out, gathered = torch.empty(step // world), torch.empty(step)
    rs = getattr(dist, "reduce_scatter_single", dist.reduce_scatter_tensor)  # torch 2.14 renames them
    ag = getattr(dist, "all_gather_single", dist.all_gather_into_tensor)

    def ddp_buckets() -> None:
        first, rest = grads[: min(DDP_FIRST_BUCKET // 4, n)], grads[DDP_FIRST_BUCKET // 4 : n]
        for chunk in [first, *(rest.split(DDP_BUCKET // 4) if rest.numel() else [])]:
            dist.all_reduce(chunk)

    def per_bucket(fn) -> None:
        for lo in range(0, part * world, step):
            fn(lo, min(step, part * world - lo) // world)  # (start, elements per rank)

    def deepspeed() -> None:
        for lo in range(0, n, bucket):
            hi = min(lo + bucket, n)
            for r in range(world):
                a_, b_ = max(lo, r * part), min(hi, (r + 1) * part)
                if a_ < b_:
                    flat = grads[a_:b_].clone()  # DeepSpeed flattens the owner's slices into one tensor
                    dist.reduce(flat, dst=r)
                    if r == rank:
                        grads[a_:b_].copy_(flat)  # and copies the sum back into the owner's partition
        ag(params, params[rank * part : (rank + 1) * part])  # in place, as DeepSpeed gathers its flat buffer

    def adam(elements: int):
        p = torch.nn.Parameter(torch.zeros(elements))
        p.grad = torch.randn(elements)
        opt = torch.optim.AdamW([p], lr=1e-4, betas=(0.9, 0.95), fused=True)
        return opt.step

    patterns = {
        "allreduce_s": lambda: dist.all_reduce(grads[:n]),
        "ddp_buckets_s": ddp_buckets,
        "reduce_scatter_s": lambda: per_bucket(lambda lo, k: rs(out[:k], grads[lo : lo + k * world])),
        "all_gather_s": lambda: per_bucket(lambda lo, k: ag(gathered[: k * world], params[lo : lo + k])),
        "deepspeed_s": deepspeed,
        "adam_all_s": adam(n),
        "adam_part_s": adam(part),
    }
    figures: dict[str, float] = {"elements": n, "bucket": bucket}
    for key, fn in patterns.items():
        times = []
        for _ in range(a.warmup + a.steps):
            dist.barrier()
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        figures[key] = median_after(times, a.warmup)
    dist.barrier()
    return figures


def contender(a: argparse.Namespace) -> None:
    import warnings

    warnings.simplefilter("ignore", FutureWarning)  # torch's renames of the collectives
    figures = collectives(a) if a.contender == "gloo" else engine_step(a)
    report(figures)
    sys.stdout.flush()
    os._exit(0)  # as `ldit` leaves: a finished gloo group can abort at interpreter shutdown (slurm/cli.py)


# ------------------------------------------------------------------------------------ the parent


def floors(zero_comm: list, comm: dict[str, list], ddp_step: list) -> list[float | None]:
    """Per round: 1 + (ZeRO's collectives + its AdamW − DDP's all-reduce − its AdamW) / DDP's step."""
    out = []
    for i, (z, d) in enumerate(zip(zero_comm, ddp_step)):
        c, full, half = comm["DDP buckets"][i], comm["AdamW, all"][i], comm["AdamW, partition"][i]
        out.append(None if None in (z, d, c, full, half) else 1 + (z + half - c - full) / d)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", choices=list(SIZES), default="12x384")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=10, help="timed steps (probe: repetitions) per process")
    p.add_argument("--warmup", type=int, default=2, help="steps before them, not timed")
    p.add_argument("--batch", type=int, default=8, help="samples per rank (global batch = 2 × this)")
    p.add_argument("--threads", type=int, default=0, help="OMP_NUM_THREADS of each rank (0: cores / 2)")
    p.add_argument("--contender", choices=CONTENDERS, help=argparse.SUPPRESS)  # in a contender process
    a = p.parse_args()
    os.chdir(ROOT)
    if a.contender:
        return contender(a)
    common = ["--size", a.size, "--steps", str(a.steps), "--warmup", str(a.warmup), "--batch", str(a.batch)]
    cs = [Contender(c, python("bench_ddp.py", "--contender", c, *common), ranks=2) for c in CONTENDERS]
    print(f"{a.size}, fp32, 2 ranks on gloo, global batch {2 * a.batch}; per process {a.warmup} warm-up + "
          f"{a.steps} timed steps (median); {a.rounds} rounds, order rotated", flush=True)  # fmt: skip
    results = run_rounds(cs, a.rounds, threads=a.threads or None)
    step = {"ZeRO-2": values(results, "zero2", "step_s"), "DDP": values(results, "ddp", "step_s")}
    moments = {
        "ZeRO-2": values(results, "zero2", "moment_bytes"),
        "DDP": values(results, "ddp", "moment_bytes"),
    }
    comm = {
        "all-reduce": values(results, "gloo", "allreduce_s"),
        "DDP buckets": values(results, "gloo", "ddp_buckets_s"),
        "reduce-scatter": values(results, "gloo", "reduce_scatter_s"),
        "all-gather": values(results, "gloo", "all_gather_s"),
        "DeepSpeed's pattern": values(results, "gloo", "deepspeed_s"),
        "AdamW, all": values(results, "gloo", "adam_all_s"),
        "AdamW, partition": values(results, "gloo", "adam_part_s"),
    }
    n, bucket = (median(values(results, "gloo", k)) for k in ("elements", "bucket"))
    print("\nstep time\n" + table(step, baseline="DDP", scale=1e3, unit="ms/step"))
    print("\nAdam moments per rank\n" + table(moments, baseline="DDP", scale=2**-20, unit="MiB"))
    size = f"{n:,.0f} fp32 gradient elements ({n * 4 / 2**20:.1f} MiB), bucket {bucket:,.0f}" if n else "?"
    print(f"\ngloo collectives over {size}, and the fused AdamW step\n"
          + table(comm, baseline="all-reduce", scale=1e3, unit="ms"))  # fmt: skip
    plus = lambda x, y: [None if None in (u, v) else u + v for u, v in zip(x, y)]  # noqa: E731
    zero = {
        "reduce-scatter + all-gather": plus(comm["reduce-scatter"], comm["all-gather"]),
        "all-reduce + all-gather": plus(comm["all-reduce"], comm["all-gather"]),
        "DeepSpeed's pattern": comm["DeepSpeed's pattern"],
    }
    floor = {k: floors(v, comm, step["DDP"]) for k, v in zero.items()}
    print("\nfloor of ZeRO/DDP on gloo: 1 + (ZeRO's collectives + AdamW on a partition − DDP buckets − AdamW on "
          "all) / DDP step\n" + table(floor))  # fmt: skip
    print(threads_line(results))
    print(ratio("ZeRO-2/DDP step time", step["ZeRO-2"], step["DDP"]))
    print(ratio("ZeRO-2/DDP moment bytes per rank", moments["ZeRO-2"], moments["DDP"]))
    print(
        ratio(
            "(reduce-scatter + all-gather)/all-reduce",
            zero["reduce-scatter + all-gather"],
            comm["all-reduce"],
        )
    )
    print(ratio("DeepSpeed's pattern/DDP buckets", comm["DeepSpeed's pattern"], comm["DDP buckets"]))
    lows = {k: m for k, v in floor.items() if (m := median(v)) is not None}
    if lows:
        best = min(lows, key=lows.get)
        verdict = "reachable" if lows[best] <= 1.05 else "out of reach"
        print(f"floor ZeRO/DDP on gloo: {lows[best]:.3f} (the lowest, with {best}): a ratio ≤ 1.05 is {verdict} on gloo")  # fmt: skip
    for line in errors(results):
        print(line)


if __name__ == "__main__":
    main()
