"""`ldit sweep`: a scaling study — one training job per node count — and its report.

    ldit sweep configs/dit/lightningdit_b1.yaml --nodes 1,2,4,8 --steps 200 --slurm --cluster configs/cluster/mine.yaml
    ldit sweep --report runs/sweeps/lightningdit-b1

Every job trains the same config (same global batch, same data order: the reader's order does not
depend on the world size) for `steps` steps, logging every step, as run `nodes-<n>` under
`<out>/<run.name>/`. With `--slurm` each node count is its own SLURM job (a job array cannot vary the
node count); without it they run one after another on this machine with `--local n·tasks_per_node`.

The report reads each run's per-step log, drops the first 20% of steps as warm-up, and writes
`report.md`, `report.csv` and `report.png`: samples/s, samples/s per device, scaling efficiency
(per-device throughput relative to the smallest node count), MFU, and step-time percentiles.
"""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch.distributed as dist

from slurm.config import load_yaml_chain

WARMUP = 0.2
"""Fraction of each run's first steps left out of the figures (start-up, allocator and cache warm-up)."""


@dataclass(frozen=True)
class Row:
    nodes: int
    devices: int
    samples_per_s: float
    per_device: float
    efficiency: float
    mfu: float
    step_p50_ms: float
    step_p90_ms: float
    step_p99_ms: float


def sweep_dir(cfg) -> Path:  # noqa: ANN001 (SweepConfig, defined in slurm.jobs)
    name = None
    for _, part in load_yaml_chain(Path(cfg.train)):
        name = part.get("run", {}).get("name", name)
    for item in cfg.train_overrides:
        key, _, value = item.partition("=")
        name = value if key == "run.name" else name
    return Path(cfg.out) / (name or Path(cfg.train).stem)


def train_args(cfg, root: Path, nodes: int) -> list[str]:  # noqa: ANN001
    """`ldit train` arguments of the job for `nodes` nodes."""
    return [
        "train",
        str(Path(cfg.train).resolve()),
        *cfg.train_overrides,  # the user's, then the sweep's own (which win)
        f"run.root={root.resolve()}",
        f"run.name=nodes-{nodes}",
        f"steps={cfg.steps}",
        "log.every=1",
        "log.sample_every=0",
        f"ckpt.every={cfg.steps}",
    ]


def run(cfg) -> None:  # noqa: ANN001
    """Start the sweep's jobs (rank 0 only; the sweep itself is one process), or only write its report."""
    if dist.get_rank() != 0:
        return
    if cfg.report:
        print(write_report(Path(cfg.report)), flush=True)
        return
    from slurm.jobs import JOBS

    JOBS["train"].load([cfg.train], list(cfg.train_overrides))  # a bad override fails before any job starts
    root = sweep_dir(cfg)
    root.mkdir(parents=True, exist_ok=True)
    record = {
        "train": str(Path(cfg.train).resolve()),
        "train_overrides": list(cfg.train_overrides),
        "steps": cfg.steps,
        "nodes": list(cfg.nodes),
        "jobs": {},
    }
    if cfg.cluster:
        from slurm.cluster import describe, load_cluster
        from slurm.status import record_submission
        from slurm.submit import submit

        handles = {}
        for n in cfg.nodes:
            cluster = load_cluster(list(cfg.cluster), [f"nodes={n}"])
            args = train_args(cfg, root, n)
            handles[n] = submit(JOBS["train"], [args[1]], args[2:], cluster)
            record["jobs"][str(n)] = handles[n].job_id
            record_submission(root / f"nodes-{n}", handles[n].job_id, "train", describe(cluster), None)
            print(f"nodes {n}: SLURM job {handles[n].job_id}", flush=True)
        (root / "sweep.json").write_text(json.dumps(record, indent=1))
        if not cfg.wait:
            print(f"when the jobs are done: ldit sweep --report {root}", flush=True)
            return
        for handle in handles.values():
            handle.results()  # every task's result; raises if the job failed
    else:
        (root / "sweep.json").write_text(json.dumps(record, indent=1))
        for n in cfg.nodes:
            cmd = [
                sys.executable,
                "-m",
                "slurm.cli",
                *train_args(cfg, root, n),
                "--local",
                str(n * cfg.local_tasks_per_node),
            ]
            print(f"nodes {n}: {n * cfg.local_tasks_per_node} local process(es)", flush=True)
            subprocess.run(cmd, check=True)
    print(write_report(root), flush=True)


def rows(root: Path) -> list[Row]:
    """One row per finished run `nodes-<n>` under `root`, smallest node count first."""
    runs = sorted((int(p.name.split("-")[1]), p) for p in root.glob("nodes-*") if (p / "log.jsonl").is_file())
    if not runs:
        raise FileNotFoundError(f"{root} holds no finished sweep runs (nodes-<n>/log.jsonl)")
    raw = []
    for nodes, path in runs:
        entries = [json.loads(line) for line in (path / "log.jsonl").read_text().splitlines()]
        entries = [e for e in entries if "perf/step_time_s" in e]
        kept = entries[int(len(entries) * WARMUP) :] or entries
        devices = json.loads((path / "topology.json").read_text())["world_size"]
        step = np.array([e["perf/step_time_s"] for e in kept]) * 1e3
        rate = float(np.median([e["perf/samples_per_s"] for e in kept]))
        mfu = float(np.median([e.get("perf/mfu", 0.0) for e in kept]))
        raw.append((nodes, devices, rate, mfu, np.percentile(step, [50, 90, 99])))
    base = raw[0][2] / raw[0][1]  # per-device throughput of the smallest run
    return [
        Row(n, d, rate, rate / d, (rate / d) / base, mfu, *map(float, pct)) for n, d, rate, mfu, pct in raw
    ]


def write_report(root: Path) -> str:
    """Write report.md, report.csv and report.png under `root`; return the Markdown table."""
    table = rows(root)
    header = [
        "nodes",
        "devices",
        "samples/s",
        "samples/s/device",
        "scaling eff.",
        "MFU",
        "step p50 ms",
        "step p90 ms",
        "step p99 ms",
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in table:
        lines.append(
            f"| {r.nodes} | {r.devices} | {r.samples_per_s:.1f} | {r.per_device:.1f} | {r.efficiency:.3f} | "
            f"{r.mfu:.2e} | {r.step_p50_ms:.1f} | {r.step_p90_ms:.1f} | {r.step_p99_ms:.1f} |"
        )
    md = "\n".join(lines) + "\n"
    (root / "report.md").write_text(md)
    with open(root / "report.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(
            [
                "nodes",
                "devices",
                "samples_per_s",
                "samples_per_s_per_device",
                "scaling_efficiency",
                "mfu",
                "step_p50_ms",
                "step_p90_ms",
                "step_p99_ms",
            ]
        )
        for r in table:
            writer.writerow(
                [
                    r.nodes,
                    r.devices,
                    f"{r.samples_per_s:.4f}",
                    f"{r.per_device:.4f}",
                    f"{r.efficiency:.4f}",
                    f"{r.mfu:.6g}",
                    f"{r.step_p50_ms:.3f}",
                    f"{r.step_p90_ms:.3f}",
                    f"{r.step_p99_ms:.3f}",
                ]
            )
    _plot(table, root / "report.png", root.name)
    return md


def _plot(table: list[Row], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    nodes = [r.nodes for r in table]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    ax1.plot(nodes, [r.samples_per_s for r in table], "o-", label="measured")
    ax1.plot(
        nodes, [table[0].per_device * r.devices for r in table], "--", color="grey", label="linear scaling"
    )
    ax1.set(xlabel="nodes", ylabel="samples/s", title=f"{title}: throughput", xticks=nodes)
    ax1.legend()
    ax2.plot(nodes, [r.efficiency for r in table], "o-")
    ax2.axhline(1.0, ls="--", color="grey")
    ax2.set(
        xlabel="nodes",
        ylabel="per-device throughput / smallest run",
        title="scaling efficiency",
        xticks=nodes,
        ylim=(0, 1.2),
    )
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
