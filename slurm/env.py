"""The one module that knows the environment: ranks, rendezvous, process group, device (STYLE.md 9).

Three launchers are recognised, in this order:

- torchrun (and `ldit ... --local N`): `RANK`, `WORLD_SIZE`, `LOCAL_RANK`, `MASTER_ADDR`, `MASTER_PORT`;
- SLURM (srun, and submitit's jobs): `SLURM_PROCID`, `SLURM_NTASKS`, `SLURM_LOCALID`, the node list,
  read through submitit's `SlurmJobEnvironment` (the master is the job's first host; the port comes
  from `MASTER_PORT` or is derived from the job id, identically on every task);
- nothing: a single process, rank 0 of 1.

:func:`init_distributed` always starts a process group, even for one process (on a free loopback
port), so that jobs and DeepSpeed see the same world in every case. Jobs below the launcher never read
the environment: they ask `torch.distributed` for rank and world size and :func:`models.device.device`
for the device.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Literal

from models.device import use_gpus

if TYPE_CHECKING:
    import torch

Launcher = Literal["single", "torchrun", "slurm"]

TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class DistEnv:
    """Where this process stands in its job."""

    rank: int
    local_rank: int
    world_size: int
    local_world_size: int
    master_addr: str
    master_port: int
    launcher: Launcher

    @property
    def device(self) -> torch.device:
        """This process's device: GPU `local_rank` when the machine has GPUs (one task per GPU), else the CPU.

        After :func:`init_distributed` it equals :func:`models.device.device`, which jobs use.
        """
        import torch

        return torch.device("cuda", self.local_rank) if use_gpus() else torch.device("cpu")


def free_port() -> int:
    """A TCP port on loopback that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _int(name: str) -> int:
    try:
        return int(os.environ[name])
    except ValueError:
        raise RuntimeError(f"environment variable {name}={os.environ[name]!r} is not an integer") from None


def detect() -> DistEnv:
    """Read the launcher's variables (see the module docstring) without starting anything."""
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        missing = [v for v in ("MASTER_ADDR", "MASTER_PORT") if v not in env]
        world = _int("WORLD_SIZE")
        if missing and world > 1:
            raise RuntimeError(f"RANK and WORLD_SIZE are set but {', '.join(missing)} is not")
        local_world = _int("LOCAL_WORLD_SIZE") if "LOCAL_WORLD_SIZE" in env else world
        return DistEnv(
            rank=_int("RANK"),
            local_rank=_int("LOCAL_RANK") if "LOCAL_RANK" in env else 0,
            world_size=world,
            local_world_size=local_world,
            master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
            master_port=_int("MASTER_PORT") if "MASTER_PORT" in env else free_port(),
            launcher="torchrun",
        )
    if "SLURM_JOB_ID" in env and "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        return _from_slurm()
    return DistEnv(0, 0, 1, 1, "127.0.0.1", free_port(), "single")


def _from_slurm() -> DistEnv:
    """Rank and rendezvous of a SLURM task, from submitit's reading of the SLURM variables.

    The master is the job's first host; the port is `MASTER_PORT` when set, else derived from the job
    id, so that every task of the job picks the same one.
    """
    from submitit.slurm.slurm import SlurmJobEnvironment

    job = SlurmJobEnvironment()
    port = _int("MASTER_PORT") if "MASTER_PORT" in os.environ else 20000 + int(job.raw_job_id) % 40000
    return DistEnv(
        rank=job.global_rank,
        local_rank=job.local_rank,
        world_size=job.num_tasks,
        local_world_size=job.num_tasks // job.num_nodes,
        master_addr=job.hostnames[0],
        master_port=port,
        launcher="slurm",
    )


def init_distributed(timeout_s: float = 600.0) -> DistEnv:
    """Start the process group for this process and pin its device. Returns where it stands.

    nccl on GPUs (device `cuda:<local rank>`), gloo on CPU. The torchrun variables are exported as
    well, because DeepSpeed reads them; on CPU `DS_ACCELERATOR=cpu` tells DeepSpeed not to look for
    GPUs. `timeout_s` bounds every collective, also on groups created later (DeepSpeed's): a rank that
    dies or hangs makes the others fail, not wait.
    """
    import torch  # here, not at the top: the launcher (`--local`, `--slurm`) starts its ranks without torch
    import torch.distributed as dist
    import torch.distributed.distributed_c10d as c10d

    env = detect()
    os.environ.update(
        RANK=str(env.rank),
        WORLD_SIZE=str(env.world_size),
        LOCAL_RANK=str(env.local_rank),
        LOCAL_WORLD_SIZE=str(env.local_world_size),
        MASTER_ADDR=env.master_addr,
        MASTER_PORT=str(env.master_port),
    )
    if use_gpus():
        torch.cuda.set_device(env.local_rank)
        backend = "nccl"
    else:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        backend = "gloo"
    timeout = timedelta(seconds=timeout_s)
    # Groups made later by new_group() do not inherit the default group's timeout: they take torch's module
    # default (30 min for gloo). DeepSpeed runs ZeRO's gradient all-reduces on such a group (its clone of
    # the world), so a hung rank would stall the others for 30 min; make the module default ours too.
    if backend == "nccl":
        c10d.default_pg_nccl_timeout = timeout
    else:
        c10d.default_pg_timeout = timeout
    if not dist.is_initialized():
        dist.init_process_group(
            backend=backend,
            init_method=f"tcp://{env.master_addr}:{env.master_port}",
            rank=env.rank,
            world_size=env.world_size,
            timeout=timeout,
        )
    return env


def shutdown() -> None:
    """Leave the process group (every rank calls it at the end of a job).

    Unreachable objects are collected first: a DeepSpeed engine sits in reference cycles, and a gloo work
    object it still holds, destroyed during interpreter finalisation, aborts the process ("terminate
    called without an active exception"; pytorch/pytorch PR #179291 describes the mechanism).
    """
    import gc

    import torch.distributed as dist

    gc.collect()
    if dist.is_initialized():
        dist.destroy_process_group()


ALLOCATOR_ENV = {"THP_MEM_ALLOC_ENABLE": "1"}
"""What every rank's environment holds unless it sets the variable itself (`THP_MEM_ALLOC_ENABLE=0` opts out):
torch's CPU allocator puts each tensor of 2 MiB or more on transparent huge pages (`madvise`; the kernel's
`/sys/kernel/mm/transparent_hugepage/enabled` must not be `never`).

Why: glibc maps every block over 32 MiB fresh from the kernel and unmaps it when it is freed, so such a
tensor costs one page fault per 4 KiB each time it is allocated. DeepSpeed 0.19.8's stage 2 allocates three
a step and frees them again: the gradient bucket (`setup_buckets`, released at the end of backward), the
partition's gradient buffer and their concatenation for the step. Measured on this repository's 2-core
machine, 12x384 model, ZeRO-2 at two gloo ranks, rank 0: 78-105 k minor page faults a step without it, 6.6-9.0 k
with it (torch DDP: 4-9 k); a fresh 128 MiB buffer filled by `copy_` took 38 ms against 12 ms for one
reused (0.85 us a fault). With 2 MiB pages the kernel faults 512 times less often. On GPUs the caching
allocator already reuses device memory, and the setting touches only host tensors of 2 MiB or more
(batches, checkpoint copies). torch reads the variable at its first allocation, so the launchers set it
before a rank starts: :func:`child_env` (`--local`), `ldit` itself (:func:`use_allocator_env`) and the
batch script of a SLURM job (:func:`allocator_exports`).
"""


def use_allocator_env() -> None:
    """Put :data:`ALLOCATOR_ENV` into this process's environment where it is not set (before torch allocates)."""
    for key, value in ALLOCATOR_ENV.items():
        os.environ.setdefault(key, value)


def allocator_exports() -> list[str]:
    """Shell lines exporting :data:`ALLOCATOR_ENV` where the job's environment does not set it (sbatch setup)."""
    return [f'export {key}="${{{key}:-{value}}}"' for key, value in ALLOCATOR_ENV.items()]


def child_env(rank: int, world_size: int, master_port: int, base: dict[str, str] | None = None) -> dict:
    """The environment of local process `rank` of `world_size` (`ldit ... --local N`), torchrun-style.

    SLURM's task variables are removed so that a child started inside a SLURM job does not take
    SLURM's rank for its own. :data:`ALLOCATOR_ENV` is added where `base` (default: this process's
    environment) does not set it.
    """
    base = {**ALLOCATOR_ENV, **(os.environ if base is None else base)}
    env = {k: v for k, v in base.items() if not k.startswith("SLURM_")}
    env.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_WORLD_SIZE=str(world_size),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(master_port),
    )
    return env
