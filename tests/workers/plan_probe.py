"""One rank of the plan probe: real DeepSpeed ZeRO-2 engines, built as trainer/dit.py builds them, and the
bytes each kind of state holds on this rank, for tests/test_plan.py to compare with trainer/plan_model.py.

Usage: plan_probe.py OUT          (writes OUT/rank<r>.json: {"<model>-<dtype>": {kind: bytes, ...}, ...})

Models: the tiny T/1 and a 12-block × 384 model, on 3×4×4 latents (an odd channel count, so the flat
buffer needs padding); dtypes bf16 and fp32; at one rank also stage 0 in fp32 (`<model>-fp32-stage0`). Each engine runs two micro-batches (gradient accumulation 2)
and one optimizer step. What is measured, by unique storage:
- params: the module's parameters and buffers;
- grads: after each backward (before the step), DeepSpeed's gradient state for this rank's partition
  (`averaged_gradients`, `all_grad_tensors`) and any `.grad` left on the module; the larger of the two;
- buckets: the staging buffers of DeepSpeed's gradient buckets, read each time a gradient enters one;
- optimizer: `trainer.common.optimizer_state_bytes` after the step (what the trainer logs);
- master: DeepSpeed's fp32 partitions; ema / ema_total: the sharded EMA's partitions / `ShardedEMA.nbytes()`.
"""

import gc
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from models.lightningdit import LightningDiT, lightningdit_args
from slurm.env import init_distributed, shutdown
from trainer.common import optimizer_state_bytes
from trainer.engine import build_engine, deepspeed_config
from trainer.sharded_ema import ShardedEMA, fp32_snapshot, seed_fp32_master

MODELS = {
    "tiny": lightningdit_args("T/1", input_size=4, in_channels=3, num_classes=3),
    "12x384": lightningdit_args("S/1", depth=12, hidden_size=384, num_heads=6, input_size=4, in_channels=3,
                                num_classes=10),
}  # fmt: skip
MICRO, ACCUM = 2, 2


def storages(*objs: object) -> dict[int, int]:
    """{data_ptr: nbytes} of every tensor storage reachable through lists, tuples, dicts and DeepSpeed's
    gradient partition groups (`flat_partition`)."""
    out: dict[int, int] = {}

    def walk(v: object) -> None:
        if torch.is_tensor(v):
            out[v.untyped_storage().data_ptr()] = v.untyped_storage().nbytes()
        elif isinstance(v, (list, tuple)):
            for u in v:
                walk(u)
        elif isinstance(v, dict):
            for u in v.values():
                walk(u)
        elif getattr(v, "flat_partition", None) is not None:
            walk(v.flat_partition)

    for obj in objs:
        walk(obj)
    return out


def probe(args, dtype: torch.dtype, world: int, rank: int, stage: int = 2) -> dict[str, int]:
    torch.manual_seed(0)
    model = LightningDiT(args)
    init = fp32_snapshot(model)
    trained = [p for p in model.parameters() if p.requires_grad]
    ds_config = deepspeed_config(
        micro_batch=MICRO, grad_accum=ACCUM, world_size=world, dtype=dtype, grad_clip=0.0, zero_stage=stage,
        trainable_params=sum(p.numel() for p in trained),
    )  # fmt: skip
    engine = build_engine(model, trained, lr=1e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0, warmup_steps=0,
                          ds_config=ds_config)  # fmt: skip
    ema = ShardedEMA(engine, init, 0.999)
    seed_fp32_master(engine, init)
    opt = engine.optimizer
    staging = [0]
    if stage > 0:
        enter = opt.reduce_independent_p_g_buckets_and_remove_grads

        def watched(param, i):  # a gradient enters a bucket: the staging buffers exist now
            staging[0] = max(staging[0], sum(storages([b.buffer for b in opt.ipg_buckets.values()]).values()))
            return enter(param, i)

        opt.reduce_independent_p_g_buckets_and_remove_grads = watched
    grads = 0
    g = torch.Generator().manual_seed(rank)
    for _ in range(ACCUM):
        x = torch.randn(MICRO, args.in_channels, args.input_size, args.input_size, generator=g)
        t, y = torch.rand(MICRO, generator=g), torch.randint(0, args.num_classes, (MICRO,), generator=g)
        loss = (engine(x.to(dtype), t, y).float() - x).pow(2).mean()
        engine.backward(loss)
        held = storages(getattr(opt, "averaged_gradients", {}), getattr(opt, "all_grad_tensors", {}),
                        [p.grad for p in engine.module.parameters() if p.grad is not None])  # fmt: skip
        grads = max(grads, sum(held.values()))
        engine.step()
    ema.update()
    out = {
        "params": sum(storages(list(engine.module.parameters()), list(engine.module.buffers())).values()),
        "grads": grads,
        "buckets": staging[0],
        "optimizer": optimizer_state_bytes(engine),
        "master": sum(storages(getattr(opt, "single_partition_of_fp32_groups", [])).values()),
        "ema": sum(storages(ema.shards).values()),
        "ema_total": ema.nbytes(),
        "trainable": sum(p.numel() for p in trained),
    }
    del engine, ema, model, init
    gc.collect()
    return out


out = Path(sys.argv[1])
out.mkdir(parents=True, exist_ok=True)
env = init_distributed(timeout_s=300)
result = {}
for name, args in MODELS.items():
    for label, dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
        result[f"{name}-{label}"] = probe(args, dtype, env.world_size, env.rank)
    if env.world_size == 1:  # what the trainer runs at one rank in fp32 (trainer.engine.engine_stage)
        result[f"{name}-fp32-stage0"] = probe(args, torch.float32, 1, 0, stage=0)
(out / f"rank{env.rank}.json").write_text(json.dumps(result))
dist.barrier()
shutdown()
