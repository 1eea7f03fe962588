"""`ldit plan`: what a DiT training config needs per GPU, and how long it takes, at each node count.

    ldit plan TRAIN.yaml [key=value ...] --cluster CLUSTER.yaml [cluster.key=value ...] [--nodes 1,2,4,8]
              [--mfu X] [--epochs N] [--dataset-size N] [--json]

No job starts: no process group, no GPU, no torch. For each node count: per-GPU memory (parameters,
gradients, optimizer state, fp32 master, sharded EMA, communication buckets, activations with and without
checkpointing, an allowance), whether it fits the cluster's GPUs and, if not, the micro batch /
checkpointing that would; the step time (compute at peak × MFU, ZeRO-2's gradient and parameter
collectives over the cluster's links), img/s, per-GPU efficiency against one node, and the wall time to
the config's steps and to `--epochs` epochs. The numbers come from trainer/plan_model.py (documented and
tested there) and the cluster file's figures (slurm/cluster.py says how to measure each); `--mfu` and
`cluster.<key>=value` replace figures, e.g. by ones a sweep measured.

The model is read as the trainer reads it (trainer.config.dit_model_args): the latent
shape, class count and sample count come from the config's shard manifest when it is a local folder that
holds one, else the reference's (32×16×16, 1,000 classes, ImageNet-1k's 1,281,167 training images).

Exit status: 0 a plan, where some node count fits (as configured or with the change it prints); 1 nothing
fits at any node count (the message says what would); 2 a usage or configuration error, e.g. a cluster
file without a figure the plan needs (the message names the key).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, NoReturn

from models.lightningdit_spec import (
    LightningDiTArgs,
    lightningdit_flops,
    lightningdit_parameters,
)
from slurm.config import ConfigError
from slurm.plan_render import nodes_text, render
from trainer.config import dit_model_args
from trainer.engine import engine_stage
from trainer.plan_model import (
    CONTEXT_BYTES,
    FRAGMENTATION,
    GiB,
    Links,
    StateBytes,
    activation_bytes,
    bucket_bytes,
    fullest_rank,
    stage0_state,
    step_time,
    zero2_state,
)

SUMMARY = "predicted per-GPU memory, step time and wall time of a DiT training config per node count (no job)"
EXIT_OK, EXIT_NO_FIT, EXIT_USAGE = 0, 1, 2
FIGURES = ("gpu_memory_gib", "peak_tflops", "mfu", "intra_node_gbs", "inter_node_gbs", "latency_us")
"""The cluster file's keys the plan needs (slurm/cluster.py documents how to measure each)."""
IMAGENET_TRAIN = 1_281_167
"""Images of ImageNet-1k's training split: the sample count when the config's shard manifest is not here."""
MEANINGFUL_SPEEDUP = 1.03
"""A configuration that fits is told of a faster one that fits only when it is at least this much faster."""
REFERENCE_LATENTS, REFERENCE_CLASSES = (32, 16, 16), 1000
"""VA-VAE f16d32 latents of 256² images and ImageNet's classes (reference §2.1), when no manifest is here."""


class PlanError(ValueError):
    """The input cannot be planned (a missing cluster figure, a run kind the plan does not model)."""


class _Parser(argparse.ArgumentParser):
    """Usage errors as one line, `ldit plan: error: …`, exit status 2."""

    def error(self, message: str) -> NoReturn:
        print(f"ldit plan: error: {message}", file=sys.stderr)
        sys.exit(EXIT_USAGE)


def dit_args(cfg: Any, latent_shape: Sequence[int], num_classes: int) -> LightningDiTArgs:
    """The model a `kind: dit` config trains (trainer.config.dit_model_args, as the trainer reads it)."""
    try:
        return dit_model_args(cfg, tuple(latent_shape), num_classes)
    except ValueError as exc:
        raise PlanError(str(exc)) from None


@dataclass(frozen=True)
class Setting:
    """How a rank runs its share of the global batch."""

    micro: int
    accum: int
    checkpointing: bool

    def overrides(self) -> str:
        return f"micro_batch={self.micro} grad_checkpointing={str(self.checkpointing).lower()}"


@dataclass
class Planner:
    """Everything that stays fixed across node counts; :meth:`row` plans one node count."""

    args: LightningDiTArgs
    cfg: Any
    links: Links
    gpu_bytes: int
    tasks: int
    gpus: bool
    dtype: str
    dataset: int
    epochs: float
    source: str = field(default="", init=False)
    """Where the latent shape, class count and dataset size came from (:func:`model_inputs`)."""

    def __post_init__(self) -> None:
        self.params, self.buffers = lightningdit_parameters(self.args)
        self.trainable = sum(p.numel for p in self.params if p.trainable)
        self._states: dict[int, StateBytes] = {}

    def state(self, world: int) -> StateBytes:
        """The model and optimizer state of the fullest rank of `world` (computed once per world size)."""
        if world not in self._states:
            if self.stage(world) == 0:
                self._states[world] = stage0_state(self.params, self.buffers)
            else:
                rank = fullest_rank(self.params, world, self.dtype)
                self._states[world] = zero2_state(self.params, self.buffers, world, rank, self.dtype)
        return self._states[world]

    def stage(self, world: int) -> int:
        """The ZeRO stage the trainer runs at `world` ranks (trainer.engine.engine_stage: 0 at one rank in fp32)."""
        return engine_stage(
            self.cfg.zero_stage, world_size=world, dtype=self.dtype, nonfinite=self.cfg.nonfinite
        )

    def memory(self, world: int, s: Setting) -> dict[str, int]:
        """Bytes on the fullest rank, by kind (trainer/plan_model.py), and their total with the allowance."""
        state = self.state(world)
        buckets = (
            0
            if self.stage(world) == 0
            else bucket_bytes(self.trainable, world, self.dtype, self.cfg.comm_dtype, self.gpus)
        )
        act = {ck: activation_bytes(self.args, s.micro, self.dtype, ck).peak for ck in (True, False)}
        allowance = CONTEXT_BYTES + round(FRAGMENTATION * (act[s.checkpointing] + buckets))
        out = {k: v for k, v in asdict(state).items() if k != "ema_host"}
        out |= {"buckets": buckets, "act_ckpt": act[True], "act_no_ckpt": act[False], "allowance": allowance}
        out["total"] = state.device + buckets + act[s.checkpointing] + allowance
        return out

    def time(self, nodes: int, s: Setting) -> dict[str, float]:
        world = nodes * self.tasks
        t = step_time(
            lightningdit_flops(self.args, s.checkpointing), local_batch=s.micro * s.accum, micro=s.micro,
            trainable=self.trainable, world=world, nodes=nodes, dtype=self.dtype, comm_dtype=self.cfg.comm_dtype,
            gpus=self.gpus, links=self.links,
        )  # fmt: skip
        img_s = self.cfg.data.global_batch / t.total
        steps_per_epoch = self.dataset / self.cfg.data.global_batch
        return {
            "compute_s": t.compute, "reduce_s": t.reduce, "exposed_s": t.exposed, "gather_s": t.gather,
            "step_s": t.total, "img_s": img_s, "img_s_gpu": img_s / world,
            "steps_wall_s": self.cfg.steps * t.total, "epochs_wall_s": self.epochs * steps_per_epoch * t.total,
        }  # fmt: skip

    def baseline(self) -> float:
        """img/s/GPU of one node at the config's micro batch and checkpointing (as near as the per-rank
        batch allows, even where the world-size rule forbids one node): what efficiency is measured against."""
        local = max(self.cfg.data.global_batch // self.tasks, 1)
        micro = self.cfg.micro_batch if self.cfg.micro_batch and local % self.cfg.micro_batch == 0 else local
        return self.time(1, Setting(micro, local // micro, self.cfg.grad_checkpointing))["img_s_gpu"]

    def configured(self, world: int) -> Setting:
        local = self.cfg.data.global_batch // world
        micro = self.cfg.micro_batch or local
        return Setting(micro, local // micro, self.cfg.grad_checkpointing)

    def fitting(self, nodes: int) -> list[tuple[Setting, dict[str, int], dict[str, float]]]:
        """Every micro batch (a divisor of the per-rank batch) × checkpointing that fits, fastest first."""
        world = nodes * self.tasks
        local = self.cfg.data.global_batch // world
        out = []
        for micro in (m for m in range(local, 0, -1) if local % m == 0):
            for ck in (False, True):
                s = Setting(micro, local // micro, ck)
                if (mem := self.memory(world, s))["total"] <= self.gpu_bytes:
                    out.append((s, mem, self.time(nodes, s)))
        return sorted(out, key=lambda x: (x[2]["step_s"], -x[0].micro))

    def row(self, nodes: int, baseline: float) -> dict[str, Any]:
        from trainer.config import world_size_problems

        world = nodes * self.tasks
        cfg = self.cfg
        row: dict[str, Any] = {"nodes": nodes, "world": world, "zero_stage": self.stage(world)}
        if problems := world_size_problems(cfg.data.global_batch, cfg.data.streams, cfg.micro_batch, world):
            return row | {"problem": "; ".join(problems)}
        s = self.configured(world)
        mem = self.memory(world, s)
        fits = mem["total"] <= self.gpu_bytes
        options = self.fitting(nodes)
        run = s if fits or not options else options[0][0]
        row |= {
            "setting": asdict(s),
            "memory": mem,
            "fits": fits,
            "run": asdict(run),
            "time": self.time(nodes, run),
        }
        row["time"]["efficiency"] = row["time"]["img_s_gpu"] / baseline
        if options and options[0][0] != s:  # what fits if this does not; what is faster if it does
            best, best_mem, best_time = options[0]
            speedup = row["time"]["step_s"] / best_time["step_s"]
            if not fits or speedup >= MEANINGFUL_SPEEDUP:
                row["faster" if fits else "instead"] = {
                    "setting": asdict(best), "total": best_mem["total"], "step_s": best_time["step_s"],
                    "speedup": speedup, "overrides": best.overrides(),
                }  # fmt: skip
        if not options:
            least = self.memory(world, Setting(1, self.cfg.data.global_batch // world, True))
            row["least_total"] = least["total"]
        return row

    def nodes_to_fit(self) -> tuple[int, Setting] | None:
        """The fewest nodes that can run the config (the world-size rule) with a setting that fits, and the
        fastest such setting; None when no node count up to one sample a rank does."""
        from trainer.config import world_size_problems

        d = self.cfg.data
        for nodes in range(1, d.global_batch // self.tasks + 1):
            if not world_size_problems(d.global_batch, d.streams, 0, nodes * self.tasks) and (
                options := self.fitting(nodes)
            ):
                return nodes, options[0][0]
        return None


def _links(cluster: Any, mfu: float | None, where: str) -> Links:
    missing = [k for k in FIGURES if getattr(cluster, k) is None and not (k == "mfu" and mfu is not None)]
    if missing:
        raise PlanError(
            f"{where} has no {', '.join(missing)}: the plan needs "
            + ("it" if len(missing) == 1 else "them")
            + " (slurm/cluster.py says how to measure each; `--mfu` can give the MFU)"
        )
    return Links(
        peak_tflops=cluster.peak_tflops, mfu=mfu if mfu is not None else cluster.mfu,
        intra_node_gbs=cluster.intra_node_gbs, inter_node_gbs=cluster.inter_node_gbs, latency_us=cluster.latency_us,
    )  # fmt: skip


def model_inputs(cfg: Any) -> tuple[tuple[int, ...], int, int, str]:
    """Latent shape, class count, samples in an epoch and where they come from: the config's shard
    manifest when it is a local folder that holds one, else the reference's."""
    if (Path(cfg.data.shards) / "manifest.json").is_file():
        from data_prep.manifest import load_manifest

        m = load_manifest(cfg.data.shards, "latents")
        return tuple(m.latent.shape), len(m.classes), m.total, f"{cfg.data.shards}/manifest.json"
    return REFERENCE_LATENTS, REFERENCE_CLASSES, IMAGENET_TRAIN, "reference defaults"


def planner_for(
    cfg: Any, cluster: Any, links: Links, dataset_size: int | None = None, epochs: float = 800
) -> Planner:
    """The planner of a `kind: dit`, ZeRO-2 training config on a cluster (its tasks, GPUs and memory)."""
    if cfg.kind != "dit":
        raise PlanError(f"the plan models LightningDiT runs (kind=dit); the config is kind={cfg.kind}")
    if cfg.zero_stage != 2:
        raise PlanError(f"the plan models ZeRO stage 2; the config has zero_stage={cfg.zero_stage}")
    shape, classes, dataset, source = model_inputs(cfg)
    gpus = cluster.gpus_per_node > 0
    dtype = cfg.precision if cfg.precision != "auto" else ("bf16" if gpus else "fp32")
    memory = int((cluster.gpu_memory_gib or 0) * GiB)
    planner = Planner(
        dit_args(cfg, shape, classes),
        cfg,
        links,
        memory,
        cluster.tasks,
        gpus,
        dtype,
        dataset_size or dataset,
        epochs,
    )
    planner.source = source
    return planner


def calibrated(links: Links, sweep: Path, keep_mfu: bool = False) -> tuple[Links, str]:
    """`links` with the peak × MFU and bandwidths a sweep's report fitted (`<sweep>/calibration.json`,
    slurm/sweep_report.py); `--mfu`, when given, keeps its MFU."""
    path = sweep / "calibration.json"
    if not path.is_file():
        raise PlanError(
            f"{path} does not exist: `ldit sweep --report {sweep}` writes it when the sweep's runs can be "
            "predicted (a cluster file with the plan's figures: figures=FILE)"
        )
    cal = json.loads(path.read_text())["fitted"]
    fitted = {k: v for k, v in cal.items() if k in ("peak_tflops", "mfu", "intra_node_gbs", "inter_node_gbs")}
    if keep_mfu:
        fitted = {k: v for k, v in fitted.items() if k not in ("peak_tflops", "mfu")}
    return replace(links, **fitted), f"calibrated by the sweep {sweep}"


def make_report(ns: argparse.Namespace) -> dict[str, Any]:
    """The plan as a JSON-ready dict (what `--json` prints; :func:`render` writes it as text)."""
    from slurm.cluster import load_cluster
    from slurm.jobs import JOBS

    files = [a for a in ns.args if a.endswith((".yaml", ".yml")) and "=" not in a]
    overrides = [a for a in ns.args if a not in files and not a.startswith("cluster.")]
    cluster_overrides = [a.removeprefix("cluster.") for a in ns.args if a.startswith("cluster.")]
    cfg = JOBS["train"].load(files, overrides)
    cluster = load_cluster(ns.cluster, cluster_overrides)
    links = _links(cluster, ns.mfu, " + ".join(ns.cluster))
    mfu_source = "--mfu" if ns.mfu is not None else "cluster file"
    if ns.calibrate:
        links, mfu_source = calibrated(links, Path(ns.calibrate), keep_mfu=ns.mfu is not None)
    planner = planner_for(cfg, cluster, links, ns.dataset_size, ns.epochs)
    args, dtype, dataset, source = planner.args, planner.dtype, planner.dataset, planner.source
    rows = [planner.row(n, planner.baseline()) for n in ns.nodes]
    flops = lightningdit_flops(args, cfg.grad_checkpointing)
    report: dict[str, Any] = {
        "config": files, "cluster": list(ns.cluster), "size": cfg.model.size, "args": asdict(args),
        "trainable": planner.trainable, "frozen": sum(p.numel for p in planner.params if not p.trainable),
        "model_source": source, "dtype": dtype, "comm_dtype": cfg.comm_dtype, "global_batch": cfg.data.global_batch,
        "steps": cfg.steps, "epochs": ns.epochs, "dataset": dataset,
        "dataset_source": "--dataset-size" if ns.dataset_size else source, "checkpointing": cfg.grad_checkpointing,
        "flops": asdict(flops), "links": asdict(links), "mfu_source": mfu_source,
        "gpu_memory_bytes": planner.gpu_bytes, "gpus_per_node": planner.tasks, "gpus": planner.gpus, "rows": rows,
    }  # fmt: skip
    if not any(r.get("fits") or r.get("instead") for r in rows):
        report["to_fit"] = _what_would_fit(planner, rows)
    return report


def _what_would_fit(planner: Planner, rows: list[dict[str, Any]]) -> list[str]:
    """What would make a config that fits at no planned node count fit."""
    have = planner.gpu_bytes / GiB
    out = []
    if (found := planner.nodes_to_fit()) is not None:
        n, setting = found
        out.append(f"more nodes: {nodes_text(n)} ({n * planner.tasks} GPUs) fit with {setting.overrides()}")
    least = [r["least_total"] for r in rows if "least_total" in r]
    if least:
        out.append(f"GPUs with at least {min(least) / GiB:.1f} GiB (these have {have:.1f}), at micro_batch=1 with "
                   "grad_checkpointing=true on the largest node count planned")  # fmt: skip
    if found is None:
        world = planner.cfg.data.global_batch  # one sample a rank: the most ranks the global batch allows
        floor = planner.memory(world, Setting(1, 1, True))
        whole = planner.state(world).params
        out.append(
            f"no node count does on {have:.1f} GiB GPUs: even at {world} GPUs (one sample each) a rank needs "
            f"{floor['total'] / GiB:.1f} GiB, of which the whole {planner.dtype} weights (every rank holds them "
            f"under ZeRO-2) are {whole / GiB:.1f}, the gradient buckets {floor['buckets'] / GiB:.1f} and the "
            f"allowance {floor['allowance'] / GiB:.1f}: a smaller model (model.size) or GPUs with more memory"
        )
    return out


def configure(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The flags of `ldit plan` on `parser` (the `plan` parser of `ldit`, or a standalone one)."""
    parser.add_argument("args", nargs="*", metavar="TRAIN.yaml | key=value | cluster.key=value",
                        help="a `ldit train` config (kind: dit), then overrides of it and of the cluster file")  # fmt: skip
    parser.add_argument("--cluster", action="append", default=[], metavar="FILE", required=True,
                        help="cluster file (configs/cluster/*.yaml) with the figures the plan needs")  # fmt: skip
    parser.add_argument("--nodes", type=_node_list, default=[1, 2, 4, 8], metavar="N,N,…",
                        help="node counts to plan (default 1,2,4,8)")  # fmt: skip
    parser.add_argument(
        "--mfu", type=float, metavar="X", help="model FLOP utilisation, 0-1 (default: the cluster file's)"
    )
    parser.add_argument("--epochs", type=float, default=800, metavar="N",
                        help="the wall time to N epochs is shown too (default 800, the reference's longest run)")  # fmt: skip
    parser.add_argument("--dataset-size", type=int, metavar="N",
                        help="samples in an epoch (default: the config's shard manifest, else 1,281,167)")  # fmt: skip
    parser.add_argument("--calibrate", metavar="SWEEP_DIR",
                        help="take the peak × MFU and the bandwidths a sweep measured (its calibration.json)")  # fmt: skip
    parser.add_argument("--json", action="store_true", help="print JSON instead of text")
    return parser


def _node_list(text: str) -> list[int]:
    try:
        nodes = [int(n) for n in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of node counts") from None
    if not nodes or min(nodes) < 1:
        raise argparse.ArgumentTypeError(f"node counts must be positive, got {text!r}")
    return nodes


def main(argv: Sequence[str]) -> int:
    """`ldit plan …` (argv without the leading "plan"); returns the exit status."""
    from data_prep.manifest import ShardSetError

    parser = configure(_Parser(prog="ldit plan", description=f"ldit plan: {SUMMARY}."))
    try:
        ns = parser.parse_intermixed_args(list(argv))  # overrides may follow the flags
        if ns.mfu is not None and not 0 < ns.mfu <= 1:
            parser.error(f"--mfu {ns.mfu} must be in (0, 1]")
        report = make_report(ns)
    except SystemExit as exc:  # a usage error (already printed as one line) or --help
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    except (ConfigError, PlanError, ShardSetError) as exc:
        print(f"ldit plan: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    print(json.dumps(report, indent=1) if ns.json else render(report))
    return EXIT_NO_FIT if "to_fit" in report else EXIT_OK
