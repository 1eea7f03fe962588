"""One rank of the gradient-accumulation probe: what DeepSpeed ZeRO-2 sums over micro-batches under bf16.

Usage: grad_accum_probe.py OUT

For each of two engine configs — the trainer's own `deepspeed_config` (bf16, ZeRO-2, grad_accum=16), and the
same without its `data_types.grad_accum_dtype` (the trainer before issue 17) — one linear layer is trained
for one step of 16 micro-batches per rank: the first micro-batch's gradient is large (input × 10), the other
15 small (input × 0.01), so their sum is lost in bf16 next to the first (2⁻⁸ relative) and kept in fp32.
Before the step, every rank reads the accumulated gradient with DeepSpeed's own `safe_get_full_grad` and
compares it with the exact sum (fp64) of the same bf16 micro-batch gradients computed by a plain copy of
the layer, all-reduced over the ranks. Rank 0 writes OUT/result.json: per config, the largest error relative
to the largest exact gradient, and in units of the small micro-batches' largest contribution.
"""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from slurm.env import init_distributed, shutdown
from trainer.engine import build_engine, deepspeed_config, import_deepspeed

out = Path(sys.argv[1])
env = init_distributed(timeout_s=300)
deepspeed = import_deepspeed()
G, D = 16, 64
result = {}
for name in ("trainer", "no grad_accum_dtype"):
    torch.manual_seed(0)
    layer = torch.nn.Linear(D, D, bias=False)
    plain = torch.nn.Linear(D, D, bias=False).bfloat16()
    plain.load_state_dict(layer.state_dict())
    cfg = deepspeed_config(
        micro_batch=1,
        grad_accum=G,
        world_size=env.world_size,
        dtype=torch.bfloat16,
        grad_clip=0.0,
        zero_stage=2,
    )
    if name != "trainer":
        cfg["data_types"] = {}
    engine = build_engine(
        layer, list(layer.parameters()), lr=1e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0,
        warmup_steps=0, ds_config=cfg,
    )  # fmt: skip
    g = torch.Generator().manual_seed(100 + env.rank)
    big, small = torch.zeros(D, D, dtype=torch.float64), torch.zeros(D, D, dtype=torch.float64)
    for i in range(G):
        x = torch.randn(1, D, generator=g) * (10.0 if i == 0 else 0.01)
        plain.zero_grad()
        plain(x.bfloat16()).float().pow(2).sum().backward()
        (big if i == 0 else small).add_(plain.weight.grad.double())
        engine.backward(engine(x.bfloat16()).float().pow(2).sum())
        if i == G - 1:  # the boundary: the accumulated, reduced gradient before the optimizer step
            got = deepspeed.utils.safe_get_full_grad(engine.module.weight).double()
        engine.step()
    dist.all_reduce(big)
    dist.all_reduce(small)
    exact = (big + small) / (G * env.world_size)  # DeepSpeed averages over micro-batches and ranks
    scale = (small / (G * env.world_size)).abs().max().item()
    err = (got - exact).abs().max().item()
    result[name] = {"relative_error": err / exact.abs().max().item(), "error_in_small_units": err / scale}
    del engine
if env.rank == 0:
    (out / "result.json").write_text(json.dumps(result))
dist.barrier()
shutdown()
