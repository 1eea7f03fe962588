"""The trainer's step time next to a plain PyTorch loop, in one process on this machine.

    python benchmarks/bench_trainer.py [--steps 12] [--batch 8]

Same model, batch and optimizer. The plain loop holds the batch in memory and runs: flow loss →
backward → AdamW step. The trainer is `ldit train` itself (in this process, one rank): stream reader
on a latent shard set, per-sample noise, DeepSpeed ZeRO-2 engine, EMA, logging. The ratio of their
step times is the framework's overhead. Two sizes: T/1 (2 blocks × 64, where bookkeeping dominates) and
a 12-block, 384-wide LightningDiT on 32×16×16 latents = 256 tokens (where compute dominates).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from data_prep.manifest import ClassInfo, LatentInfo, Manifest
from data_prep.shards import encode_npy, write_shard
from models.flow import FlowArgs, RectifiedFlow
from models.lightningdit import LightningDiT, lightningdit_args

SIZES = {"T/1": {}, "12x384": {"depth": 12, "hidden_size": 384, "num_heads": 6}}


def latent_set(folder: Path, shape=(32, 16, 16), shards=8, per=32) -> None:
    rng = np.random.default_rng(0)
    infos = []
    for i in range(shards):
        rows = []
        for j in range(per):
            a = rng.standard_normal(shape).astype(np.float16)
            rows.append(
                {
                    "__key__": f"k{i}_{j}",
                    "latent.npy": encode_npy(a),
                    "latent_flip.npy": encode_npy(a),
                    "cls": str(j % 10).encode(),
                }
            )
        infos.append(write_shard(folder / f"shard-{i:06d}.tar", rows))
    Manifest("latents", infos, [ClassInfo(f"c{i}", i, f"c{i}") for i in range(10)],
             latent=LatentInfo(shape, "float16", (0.0,) * shape[0], (1.0,) * shape[0])).save(folder)  # fmt: skip


def plain_loop(size: str, batch: int, steps: int) -> float:
    """Median step time of forward + flow loss + backward + AdamW on in-memory data (torch's fused AdamW,
    the kernel the trainer uses since issue #17)."""
    torch.manual_seed(0)
    args = lightningdit_args(
        "T/1" if size == "T/1" else "S/1", in_channels=32, input_size=16, num_classes=10, **SIZES[size]
    )
    model = LightningDiT(args)
    opt = torch.optim.AdamW(
        model.parameters(), lr=2e-4, betas=(0.9, 0.95), fused=True
    )  # the trainer's kernel
    flow = RectifiedFlow(FlowArgs())
    x, y = torch.randn(batch, 32, 16, 16), torch.randint(0, 10, (batch,))
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        loss = flow.loss(model, x, y).total
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - t0)
    return statistics.median(times[2:])


def trainer_loop(size: str, batch: int, steps: int, shards: Path, root: Path) -> float:
    """Median step time of `ldit train` (one rank, in this process), from its own step timer."""
    from slurm.config import load_config
    from trainer.config import TrainDiTConfig
    from trainer.train import run

    model = SIZES[size]
    overrides = [f"model.{k}={v}" for k, v in model.items()]
    argv = [f"data.shards={shards}", f"run.root={root}", f"run.name={size.replace('/', '_')}",
            f"data.global_batch={batch}", "data.streams=4", f"steps={steps}", "log.every=1", f"ckpt.every={10**6}",
            f"model.size={'T/1' if size == 'T/1' else 'S/1'}", "optim.lr=2e-4", "ema_decay=0.9999", *overrides]  # fmt: skip
    run(load_config(TrainDiTConfig, ["configs/dit/tiny_cpu.yaml"], argv))
    entries = [
        json.loads(line) for line in (root / size.replace("/", "_") / "log.jsonl").read_text().splitlines()
    ]
    return statistics.median(e["perf/step_time_s"] for e in entries[2:])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--batch", type=int, default=8)
    a = p.parse_args()
    os.chdir(Path(__file__).resolve().parent.parent)
    from slurm.env import init_distributed

    init_distributed()  # one rank, as `ldit train` without --local
    with tempfile.TemporaryDirectory() as tmp:
        shards = Path(tmp) / "latents"
        shards.mkdir()
        latent_set(shards)
        print(
            f"batch {a.batch}, {a.steps} steps each (median of steps 3..), torch threads {torch.get_num_threads()}"
        )
        for size in SIZES:
            plain = plain_loop(size, a.batch, a.steps)
            ours = trainer_loop(size, a.batch, a.steps, shards, Path(tmp) / "runs")
            print(
                f"{size:>7}: plain PyTorch {plain * 1e3:8.1f} ms/step, ldit trainer {ours * 1e3:8.1f} ms/step, ratio {ours / plain:.3f}"
            )


if __name__ == "__main__":
    main()
