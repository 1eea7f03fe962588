"""One rank of the distributed-module test: init, all-reduce, write what it saw to <out>/rank<r>.json."""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from models.device import device
from slurm.env import init_distributed, shutdown

out = Path(sys.argv[1])
env = init_distributed(timeout_s=60)
x = torch.tensor([float(env.rank + 1)])
dist.all_reduce(x)
(out / f"rank{env.rank}.json").write_text(
    json.dumps(
        {
            "rank": dist.get_rank(),
            "world_size": dist.get_world_size(),
            "local_rank": env.local_rank,
            "launcher": env.launcher,
            "backend": dist.get_backend(),
            "all_reduce": x.item(),
            "device": str(env.device),
            "job_device": str(device()),
        }
    )
)
shutdown()
