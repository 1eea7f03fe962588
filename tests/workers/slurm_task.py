"""A job for the SLURM tests, run through `slurm.submit` like any `ldit` job (one config, every rank).

`mode=allreduce`: all-reduce (rank + 1), write <out>/rank<r>.json with what the rank saw.
`mode=fail`: raise a ConfigError (the parent of an `afterok` chain that must never run its child).
`mode=slow_first_run`: append a line to <out>/runs.txt (rank 0), then on the first run sleep past the
time limit, so that SLURM's signal requeues the job; later runs finish at once.
`mode=stop_first_run`: like slow_first_run, but the first run catches the signal itself with the
trainer's protocol (trainer.common: StopSignals, agree, StopRequested = exit 75), as the DiT loop does.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.distributed as dist
from omegaconf import MISSING

from slurm.config import ConfigError
from trainer.common import StopRequested, StopSignals, agree


@dataclass
class SlurmTaskConfig:
    out: str = MISSING
    """Folder the ranks write to."""
    mode: Literal["allreduce", "fail", "slow_first_run", "stop_first_run"] = "allreduce"
    """What the job does (see the module docstring)."""
    sleep_s: float = 300.0
    """How long the first run of mode=slow_first_run sleeps (longer than the time limit)."""


def main(cfg: SlurmTaskConfig) -> None:
    out, rank = Path(cfg.out), dist.get_rank()
    if cfg.mode == "fail":
        raise ConfigError("this job fails on purpose")  # a user error: run_here reports it, returns 1
    if cfg.mode == "stop_first_run":
        return stop_first_run(out, rank)
    if cfg.mode == "slow_first_run":
        runs = out / "runs.txt"
        dist.barrier()
        first = not runs.exists()
        dist.barrier()
        if rank == 0:
            with runs.open("a") as f:
                f.write(f"run {os.environ.get('SLURM_RESTART_COUNT', '0')} at {time.time():.1f}\n")
        if first:  # in 1 s slices, as a training loop returns to Python between steps: the kernel may hand
            # SLURM's USR2 to another thread (gloo's, the TCPStore's), and Python runs the handler only when
            # the main thread next runs Python code; one 300 s sleep would hide it until SIGTERM at the limit
            end = time.monotonic() + cfg.sleep_s
            while time.monotonic() < end:
                time.sleep(1.0)
        return
    x = torch.tensor([float(rank + 1)])
    dist.all_reduce(x)
    (out / f"rank{rank}.json").write_text(
        json.dumps(
            {
                "rank": rank,
                "world_size": dist.get_world_size(),
                "backend": dist.get_backend(),
                "all_reduce": x.item(),
                "local_rank": int(os.environ["LOCAL_RANK"]),  # exported by slurm.env.init_distributed
                "master_addr": os.environ["MASTER_ADDR"],
                "node": os.environ["SLURMD_NODENAME"],  # n1 or n2: which fake node ran the rank
            }
        )
    )


def stop_first_run(out: Path, rank: int) -> None:
    """The trainer's stop protocol: signal caught on every rank, agreed on at a step, handlers restored."""
    runs = out / "runs.txt"
    dist.barrier()
    first = not runs.exists()
    dist.barrier()
    if rank == 0:
        with runs.open("a") as f:
            f.write(f"run {os.environ.get('SLURM_RESTART_COUNT', '0')} at {time.time():.1f}\n")
    if not first:
        return
    signals = StopSignals()
    try:
        for step in range(600):  # 0.5 s "steps"; the signal arrives well before the end
            (stop,) = agree(signals.received is not None)
            if stop:
                (out / f"saved{rank}.txt").write_text(f"step {step} signal {signals.received}")
                raise StopRequested(f"stopped by signal {signals.received} at step {step}")
            time.sleep(0.5)
    finally:
        signals.restore()
