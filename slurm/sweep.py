"""`ldit sweep`: a scaling study — one training job per node count, strong and weak — and its report.

    ldit sweep configs/dit/lightningdit_b1.yaml --nodes 1,2,4,8 --scaling strong,weak --steps 200 \
        --slurm --cluster configs/cluster/mine.yaml
    ldit sweep --report runs/sweeps/lightningdit-b1 [figures=[configs/cluster/mine.yaml]]

Strong scaling trains the config's global batch at every node count (same data order: the reader's order
does not depend on the world size). Weak scaling keeps the per-device batch of the smallest node count:
at n nodes the global batch and the stream count are those of the config × n / the smallest count (the
streams a rank reads stay the same; the data order differs between node counts, which a throughput study
does not mind). Every job runs `steps` steps, logs every step, and is the run `<scaling>/nodes-<n>` under
`<out>/<run.name>/`. With `--slurm` each node count is its own SLURM job (a job array cannot vary the
node count), each waiting for the one before (`one_at_a_time`, so that no two share links or cores);
without `--slurm` they run one after another on this machine with `--local n·tasks_per_node`.

The report (slurm/sweep_report.py) sets measured against `ldit plan`'s prediction and ideal scaling.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch.distributed as dist

from slurm.config import ConfigError, load_yaml_chain
from slurm.sweep_report import figures_cluster, write_report


def sweep_dir(cfg) -> Path:  # noqa: ANN001 (SweepConfig, defined in slurm.jobs)
    name = None
    for _, part in load_yaml_chain(Path(cfg.train)):
        name = part.get("run", {}).get("name", name)
    for item in cfg.train_overrides:
        key, _, value = item.partition("=")
        name = value if key == "run.name" else name
    return Path(cfg.out) / (name or Path(cfg.train).stem)


def batch_overrides(train: Any, scaling: str, nodes: int, smallest: int, tasks: int) -> list[str]:
    """The data keys of the job for `nodes` nodes: none under strong scaling; under weak scaling the global
    batch and stream count that keep the smallest node count's per-device batch and streams per rank."""
    if scaling == "strong":
        return []
    world = smallest * tasks
    d = train.data
    if d.global_batch % world or d.streams % world:
        raise ConfigError(
            f"weak scaling keeps the per-device batch of {smallest} node(s) × {tasks} task(s) = {world} ranks, "
            f"which must divide data.global_batch={d.global_batch} and data.streams={d.streams}"
        )
    n = nodes * tasks
    return [f"data.global_batch={d.global_batch // world * n}", f"data.streams={d.streams // world * n}"]


def train_args(cfg, root: Path, scaling: str, nodes: int, extra: list[str]) -> list[str]:  # noqa: ANN001
    """`ldit train` arguments of the job for `nodes` nodes (`extra`: the batch keys and the log's peak)."""
    return [
        "train",
        str(Path(cfg.train).resolve()),
        *cfg.train_overrides,  # the user's, then the sweep's own (which win)
        *extra,
        f"run.root={(root / scaling).resolve()}",
        f"run.name=nodes-{nodes}",
        f"steps={cfg.steps}",
        "log.every=1",
        "log.sample_every=0",
        f"ckpt.every={cfg.steps}",
        "export.every=0",
        "export.at=[]",
    ]


def plan_jobs(cfg, root: Path, tasks: int) -> dict[tuple[str, int], list[str]]:  # noqa: ANN001
    """Every job's `ldit train` arguments, checked (config, world-size rule) before any job starts."""
    from slurm.jobs import JOBS
    from trainer.config import world_size_problems

    base = JOBS["train"].load([cfg.train], list(cfg.train_overrides))  # a bad override fails here
    figures = figures_cluster(list(cfg.figures or cfg.cluster))
    peak = [f"log.peak_tflops={figures.peak_tflops}"] if figures is not None and figures.peak_tflops else []
    jobs = {}
    for scaling in cfg.scaling:
        for n in cfg.nodes:
            extra = batch_overrides(base, scaling, n, min(cfg.nodes), tasks) + peak
            args = train_args(cfg, root, scaling, n, extra)
            job = JOBS["train"].load([args[1]], args[2:])
            d = job.data
            if problems := world_size_problems(d.global_batch, d.streams, job.micro_batch, n * tasks):
                raise ConfigError(
                    f"{scaling} scaling on {n} node(s) × {tasks} task(s): {'; '.join(problems)}"
                )
            jobs[scaling, n] = args
    return jobs


def run(cfg) -> None:  # noqa: ANN001
    """Start the sweep's jobs (rank 0 only; the sweep itself is one process), or only write its report."""
    if dist.get_rank() != 0:
        return
    if cfg.report:
        print(write_report(Path(cfg.report), list(cfg.figures)), flush=True)
        return
    from slurm.jobs import JOBS

    root = sweep_dir(cfg)
    clusters = {}
    if cfg.cluster:
        from slurm.cluster import load_cluster

        clusters = {n: load_cluster(list(cfg.cluster), [f"nodes={n}"]) for n in cfg.nodes}
    tasks = clusters[cfg.nodes[0]].tasks if clusters else cfg.local_tasks_per_node
    jobs = plan_jobs(cfg, root, tasks)
    root.mkdir(parents=True, exist_ok=True)
    record: dict[str, Any] = {
        "train": str(Path(cfg.train).resolve()),
        "train_overrides": list(cfg.train_overrides),
        "steps": cfg.steps,
        "nodes": list(cfg.nodes),
        "scaling": list(cfg.scaling),
        "tasks_per_node": tasks,
        "cluster": [str(Path(c).resolve()) for c in cfg.cluster],
        "figures": [str(Path(c).resolve()) for c in cfg.figures or cfg.cluster],
        "jobs": {},
    }
    if clusters:
        from slurm.cluster import describe
        from slurm.status import record_submission
        from slurm.submit import submit

        handles = []
        for (scaling, n), args in jobs.items():
            after = handles[-1].job_id if handles and cfg.one_at_a_time else None
            handle = submit(JOBS["train"], [args[1]], args[2:], clusters[n], after=after)
            handles.append(handle)
            record["jobs"].setdefault(scaling, {})[str(n)] = handle.job_id
            record_submission(
                root / scaling / f"nodes-{n}", handle.job_id, "train", describe(clusters[n]), after
            )
            print(f"{scaling} scaling, nodes {n}: SLURM job {handle.job_id}" + (f" (after {after})" if after else ""),
                  flush=True)  # fmt: skip
        (root / "sweep.json").write_text(json.dumps(record, indent=1))
        if not cfg.wait:
            print(f"when the jobs are done: ldit sweep --report {root}", flush=True)
            return
        for i, handle in enumerate(handles):
            try:
                handle.results()  # every task's result; raises if the job failed
            except Exception:
                for later in handles[i + 1 :]:  # they wait on a job that failed: they would never start
                    later.cancel(check=False)
                raise
    else:
        (root / "sweep.json").write_text(json.dumps(record, indent=1))
        for (scaling, n), args in jobs.items():
            cmd = [sys.executable, "-m", "slurm.cli", *args, "--local", str(n * tasks)]
            print(f"{scaling} scaling, nodes {n}: {n * tasks} local process(es)", flush=True)
            subprocess.run(cmd, check=True)
    print(write_report(root), flush=True)
