"""One rank of the DeepSpeed ZeRO-2 smoke test: a small MLP trains a few steps on a fixed global batch.

Every rank takes its slice of the same global batch, so a 1-rank and a 2-rank run compute the same
updates. Writes the losses, the flat parameters and the optimizer-state bytes of this rank.
"""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from slurm.env import init_distributed, shutdown
from trainer.engine import import_deepspeed

out, steps, global_batch = Path(sys.argv[1]), int(sys.argv[2]), 8
env = init_distributed(timeout_s=120)
deepspeed = import_deepspeed()
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.GELU(), torch.nn.Linear(64, 4))
optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.9, 0.95))
engine, *_ = deepspeed.initialize(
    model=model,
    optimizer=optimizer,
    config={
        "train_batch_size": global_batch,
        "train_micro_batch_size_per_gpu": global_batch // env.world_size,
        "gradient_clipping": 0.0,
        "zero_optimization": {"stage": 2},
        "steps_per_print": 10**9,
    },
)
g = torch.Generator().manual_seed(1)
losses = []
for _ in range(steps):
    x, y = torch.randn(global_batch, 16, generator=g), torch.randn(global_batch, 4, generator=g)
    per = global_batch // env.world_size
    xs, ys = x[env.rank * per : (env.rank + 1) * per], y[env.rank * per : (env.rank + 1) * per]
    loss = torch.nn.functional.mse_loss(engine(xs), ys)
    engine.backward(loss)
    engine.step()
    mean = loss.detach().clone()
    dist.all_reduce(mean)
    losses.append(mean.item() / env.world_size)
state_bytes = sum(
    t.numel() * t.element_size()
    for s in engine.optimizer.optimizer.state.values()
    for t in s.values()
    if torch.is_tensor(t) and t.dim() > 0
)
flat = torch.cat([p.detach().flatten() for p in engine.module.parameters()])
(out / f"rank{env.rank}.json").write_text(
    json.dumps({"losses": losses, "params": flat.tolist(), "optimizer_state_bytes": state_bytes})
)
del engine, optimizer  # freed before the group is torn down (slurm.env.shutdown)
shutdown()
