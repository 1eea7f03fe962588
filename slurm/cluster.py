"""Cluster files (`configs/cluster/*.yaml`) and the submitit executors built from them (STYLE.md 10).

Everything that differs between clusters (partition, account, QOS, GPUs and CPUs per node, time
limit, the shell lines that prepare a node) is written in a cluster file; this module holds no
cluster's name, partition or path. A cluster file is loaded like any other config, with
:func:`slurm.config.load_config`, so an unknown or misspelt key fails with its name.

One SLURM task runs per GPU (`tasks_per_node = gpus_per_node`); on a CPU cluster the file says how
many tasks a node runs. :func:`sbatch_parameters` turns a cluster file into the parameters of
submitit's `SlurmExecutor` (no cluster needed, so it is unit-tested); :func:`make_executor` builds
the executor from them.

The partition is required. SLURM has a default partition, but which one it is depends on the site
(and sometimes on the account); a job that lands in the wrong one silently waits or is pre-empted.
A cluster file therefore names it, even when it is the default (`sinfo -s` lists them).
"""

from __future__ import annotations

import shlex
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from omegaconf import MISSING

from slurm.config import ConfigError, load_config
from slurm.env import allocator_exports

# sbatch options that the cluster file's own keys (or the submission) set; `sbatch:` may not repeat them.
MANAGED_SBATCH = {
    "partition": "partition",
    "account": "account",
    "qos": "qos",
    "nodes": "nodes",
    "ntasks-per-node": "tasks_per_node",
    "cpus-per-task": "cpus_per_task",
    "gpus-per-node": "gpus_per_node",
    "gres": "gpus_per_node with gpu_request: gres",
    "mem": "mem_gb",
    "time": "time_min",
    "signal": "signal_delay_s",
    "constraint": "constraint",
    "dependency": "`ldit ... --slurm --after JOBID`",
    "job-name": "(set from the job's name)",
    "no-kill": "(always set: slurm/heal.py handles a lost node)",
    "requeue": "(always set: slurm/heal.py requeues a failed job within max_failures)",
    "output": "folder",
    "error": "folder",
}

# slurmctld checks time limits every 30 s (PERIODIC_TIMEOUT) and signals a job once it is within
# signal delay + 30 s of its limit: measured on the test cluster (tests/test_slurm.py).
SIGNAL_SLACK_S = 30


@dataclass
class ClusterConfig:
    """A SLURM cluster and the resources a job asks it for (one `configs/cluster/*.yaml` file)."""

    partition: str = MISSING
    """SLURM partition to submit to (required: `sinfo -s` lists them)."""
    account: str | None = None
    """Account charged for the job (`--account`), when the cluster wants one."""
    qos: str | None = None
    """Quality of service (`--qos`), when the cluster uses them."""
    nodes: int = 1
    """Nodes per job."""
    gpus_per_node: int = 0
    """GPUs per node; one task runs per GPU. 0 for a CPU-only cluster."""
    tasks_per_node: int | None = None
    """Tasks (ranks) per node. Leave unset: it is gpus_per_node on a GPU cluster, 1 on a CPU cluster
    unless given here."""
    gpu_request: Literal["gpus-per-node", "gres"] = "gpus-per-node"
    """How GPUs are asked for: `--gpus-per-node=N`, or `--gres=gpu:N` for old SLURM versions that reject
    the former (facebookresearch/mae#119)."""
    cpus_per_task: int | None = None
    """CPU cores per task (data-loading workers + 1 is a good start); unset: the partition's default."""
    mem_gb: int | None = None
    """Memory per node in GB (`--mem`); unset: the partition's default."""
    time_min: int = 60
    """Time limit of one job segment, in minutes. A job that hits it is requeued and resumes from its
    last checkpoint (at most max_requeues times)."""
    signal_delay_s: int = 120
    """Seconds before the time limit at which SLURM signals the job (USR2) so that it can requeue
    itself; it must cover a step and the write of a periodic checkpoint. slurmctld checks time limits
    every 30 s and may send the signal up to that much earlier."""
    constraint: str | None = None
    """Node features the job needs (`--constraint`, e.g. "a100|h100")."""
    setup: list[str] = field(default_factory=list)
    """Shell lines run on the first node before the tasks start (module load ..., source venv ...)."""
    max_requeues: int = 3
    """How many times a job that reaches its time limit is requeued (pre-emptions do not count)."""
    max_failures: int = 3
    """How many failures in a row (a rank killed or crashed, a node lost, a peer silent past heartbeat_s) a
    job is requeued after, with no new checkpoint between them; one more ends it FAILED, with the reason in
    `ldit status` (slurm/heal.py). A failure after a new checkpoint starts the count again. An input error
    (`ldit <job>: error: …`) is never retried."""
    regrow_wait_s: float = 600.0
    """After a node is lost, how long the job waits for the partition to have `nodes` healthy nodes besides
    it before it goes on with fewer (the largest count the world size rule allows), as a new job."""
    folder: str = "runs/slurm/%j"
    """Folder of submitit's scripts, pickles and logs (`%j` is the job id). Must be on a file system
    that every node sees."""
    sbatch: dict[str, Any] = field(default_factory=dict)
    """Any other sbatch options, as {option: value} (e.g. {exclude: "node7", exclusive: true}); written
    as `#SBATCH --option=value`."""

    # The figures `ldit plan` predicts memory and time from (slurm/plan.py, trainer/plan_model.py). Unset: a
    # plan names the missing key. Measure them on the cluster: datasheet numbers overestimate.
    gpu_memory_gib: float | None = None
    """Memory of one GPU, GiB: `nvidia-smi --query-gpu=memory.total --format=csv` (MiB / 1024; an 80 GB H100
    shows 81,559 MiB = 79.6 GiB). On a CPU cluster, the memory one task may use."""
    peak_tflops: float | None = None
    """Peak dense bf16 TFLOP/s of one GPU as measured, not the datasheet's: the "measured bf16 matmul peak" line of
    `python benchmarks/bench_gpu.py` (back-to-back 8192² bf16 matmuls; an H100 SXM measures about 800 of the
    989 on paper). On a CPU cluster, the fp32 TFLOP/s of one task's cores (a large `torch.mm`)."""
    mfu: float | None = None
    """Model FLOP utilisation of a step's compute, 0-1 (`ldit plan --mfu` overrides it): a micro-batch's
    forward + backward (+ recompute) takes its FLOPs / (peak_tflops · mfu). Measure it on one GPU, where
    nothing is communicated: the MFU column of `python benchmarks/bench_gpu.py` at your micro batch (that MFU
    counts forward + backward only; with checkpointing multiply it by (fwd + bwd + recompute) / (fwd + bwd),
    about 4/3)."""
    intra_node_gbs: float | None = None
    """All-reduce bus bandwidth within one node, GB/s: `busbw` of nccl-tests' `all_reduce_perf -b 1G -e 1G
    -g <gpus_per_node>` on one node (on 8 NVLink-4 H100s about 360-480)."""
    inter_node_gbs: float | None = None
    """All-reduce bus bandwidth across nodes, GB/s: `busbw` of the same test over 2 nodes (`srun -N 2
    --ntasks-per-node=<gpus_per_node> all_reduce_perf -b 1G -e 1G -g 1`). The NICs bound it: a 400 Gb/s NIC
    per GPU is 50 GB/s of line rate, one such NIC for a node of 8 GPUs 6.25."""
    latency_us: float | None = None
    """Latency of one step of a ring collective, µs: the time of `all_reduce_perf -b 8 -e 8` over 2 nodes
    divided by 2·(ranks − 1)."""

    @property
    def tasks(self) -> int:
        """Tasks per node: one per GPU, else the file's tasks_per_node, else 1."""
        if self.gpus_per_node > 0:
            return self.gpus_per_node
        return self.tasks_per_node or 1

    def validate(self) -> None:
        """Cross-field rules; raises ValueError with what to change."""
        for name in ("nodes", "time_min", "signal_delay_s"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("tasks_per_node", "cpus_per_task", "mem_gb"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be at least 1 (or unset), got {value}")
        if self.gpus_per_node < 0:
            raise ValueError(f"gpus_per_node must be 0 (CPU cluster) or more, got {self.gpus_per_node}")
        for name in ("gpu_memory_gib", "peak_tflops", "intra_node_gbs", "inter_node_gbs", "latency_us"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ValueError(f"{name} must be positive (or unset), got {value}")
        if self.mfu is not None and not 0 < self.mfu <= 1:
            raise ValueError(f"mfu must be in (0, 1] (or unset), got {self.mfu}")
        for name in ("max_requeues", "max_failures", "regrow_wait_s"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be 0 or more, got {getattr(self, name)}")
        if not self.partition.strip():
            raise ValueError("partition is empty: name the SLURM partition to submit to (`sinfo -s`)")
        if self.gpus_per_node > 0 and self.tasks_per_node not in (None, self.gpus_per_node):
            raise ValueError(
                f"tasks_per_node={self.tasks_per_node} but gpus_per_node={self.gpus_per_node}: one task "
                "runs per GPU; remove tasks_per_node"
            )
        if self.signal_delay_s + SIGNAL_SLACK_S >= self.time_min * 60:
            raise ValueError(
                f"signal_delay_s={self.signal_delay_s} (+ up to {SIGNAL_SLACK_S} s early) reaches back to the "
                f"start of a {self.time_min} min job, which SLURM would signal before it can handle "
                "it: lower signal_delay_s or raise time_min"
            )
        for key in self.sbatch:
            option = str(key).replace("_", "-")
            if (how := MANAGED_SBATCH.get(option)) and how.startswith("("):
                raise ValueError(f"sbatch.{key}: ldit sets this option itself {how}; remove it")
            if how:
                raise ValueError(
                    f"sbatch.{key}: set this with the cluster file's own key ({how}), not under sbatch"
                )


def load_cluster(files: Sequence[str | Path], overrides: Sequence[str] = ()) -> ClusterConfig:
    """The cluster config merged from `files` (in order) and `key=value` overrides, checked.

    Raises ConfigError that names the file and the key (unknown key, missing partition, nodes < 1 ...).
    """
    if not files:
        raise ConfigError("no cluster file: pass one with --cluster configs/cluster/<name>.yaml")
    try:
        return load_config(ClusterConfig, files, overrides)
    except ConfigError as exc:
        raise ConfigError(f"cluster config: {exc}") from None


def sbatch_parameters(
    cluster: ClusterConfig, job_name: str = "ldit", after: str | None = None, started_with: str | None = None
) -> dict[str, Any]:
    """The parameters of submitit's `SlurmExecutor.update_parameters` for a job on `cluster`.

    `after` is a job id this job waits for and needs to succeed (`--dependency=afterok:<after>`);
    `started_with` one it waits to have started (`after:<id>`: an eval follower does not hold a node while
    its training job is still queued).
    Only what the cluster file sets is passed, so the partition's defaults apply to the rest.
    """
    params: dict[str, Any] = {
        "job_name": job_name,
        "partition": cluster.partition,
        "nodes": cluster.nodes,
        "ntasks_per_node": cluster.tasks,
        "time": cluster.time_min,
        "signal_delay_s": cluster.signal_delay_s,
    }
    optional = {
        "account": cluster.account,
        "qos": cluster.qos,
        "cpus_per_task": cluster.cpus_per_task,
        "constraint": cluster.constraint,
        "mem": None if cluster.mem_gb is None else f"{cluster.mem_gb}GB",
        "dependency": ",".join(
            ([f"afterok:{after}"] if after else []) + ([f"after:{started_with}"] if started_with else [])
        )
        or None,
    }
    params.update({k: v for k, v in optional.items() if v is not None})
    if cluster.gpus_per_node > 0:
        if cluster.gpu_request == "gres":
            params["gres"] = f"gpu:{cluster.gpus_per_node}"
        else:
            params["gpus_per_node"] = cluster.gpus_per_node
    # Self-healing (slurm/heal.py): the first failed rank ends the step everywhere; a lost node leaves the job
    # running on the others, for the teardown to requeue it or submit it again without that node.
    heal = f"{shlex.quote(sys.executable)} -m slurm.heal"
    folder = shlex.quote(str(Path(cluster.folder).expanduser().absolute()))
    # The allocator's variables first, so that the cluster file's own setup lines may override them.
    params["setup"] = [*allocator_exports(), *cluster.setup, f"{heal} mark {folder}"]
    params["srun_args"] = ["--kill-on-bad-exit=1"]
    params["teardown"] = ["ldit_rc=$?", f"{heal} after {folder} $ldit_rc", "exit $?"]
    params["additional_parameters"] = {"no-kill": True, "requeue": True, **cluster.sbatch}
    return params


def make_executor(
    cluster: ClusterConfig, job_name: str = "ldit", after: str | None = None, started_with: str | None = None
) -> Any:
    """A `submitit.SlurmExecutor` for one job on `cluster` (needs `srun`, i.e. a SLURM client).

    Jobs that reach their time limit are requeued at most `cluster.max_requeues` times.
    """
    import submitit

    executor = submitit.SlurmExecutor(folder=cluster.folder, max_num_timeout=cluster.max_requeues)
    executor.update_parameters(**sbatch_parameters(cluster, job_name, after, started_with))
    return executor


def describe(cluster: ClusterConfig) -> str:
    """One line saying what a job on `cluster` asks for, for the submission message."""
    gpus = f", {cluster.gpus_per_node} GPUs" if cluster.gpus_per_node else ""
    return (
        f"{cluster.nodes} node(s) × {cluster.tasks} task(s){gpus}, partition {cluster.partition}, "
        f"{cluster.time_min} min"
    )
