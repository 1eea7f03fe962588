"""Count, per training step, the tensor reads that make the host wait for the device on a GPU.

    python tests/workers/sync_probe.py <train overrides…>

Runs `ldit train` (one rank, in this process) with `Tensor.item`, `.tolist`, `.numpy`, `bool()`,
`float()` and `int()` of a tensor counted by call site (the first frame outside torch), and the steps
told apart where the loop takes each step's batch (`ShardGuard.take(step, …)`). Prints one JSON line:
{step: {call site: count}}, with "setup" for what came before step 0. On the CPU nothing syncs, but
these are the calls that would on a GPU when their tensor is on the device.
"""

from __future__ import annotations

import collections
import json
import os
import sys
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

steps: dict[str, collections.Counter] = {"setup": collections.Counter()}
current = ["setup"]
TORCH = str(Path(torch.__file__).parent)


def site() -> str:
    for frame in reversed(traceback.extract_stack()[:-2]):
        if not frame.filename.startswith(TORCH):
            name = frame.filename.split("site-packages/")[-1].removeprefix(str(ROOT) + "/")
            return f"{name}:{frame.name}"
    return "?"


def counted(name: str):
    original = getattr(torch.Tensor, name)

    def wrapper(self, *args, **kwargs):
        steps[current[0]][site()] += 1
        return original(self, *args, **kwargs)

    setattr(torch.Tensor, name, wrapper)


def main() -> None:
    from slurm.config import load_config
    from slurm.env import init_distributed
    from trainer.config import TrainDiTConfig
    from trainer.shard_guard import ShardGuard
    from trainer.train import run

    take = ShardGuard.take

    def take_and_count(self, step, *args, **kwargs):
        current[0] = str(step)
        steps[current[0]] = collections.Counter()
        return take(self, step, *args, **kwargs)

    ShardGuard.take = take_and_count
    init_distributed()
    cfg = load_config(TrainDiTConfig, [str(ROOT / "configs/dit/tiny_cpu.yaml")], sys.argv[1:])
    for name in ("item", "tolist", "numpy", "__bool__", "__float__", "__int__"):
        counted(name)
    run(cfg)
    print(json.dumps({k: dict(c) for k, c in steps.items()}))


if __name__ == "__main__":
    os.chdir(ROOT)
    main()
