"""The report of `ldit sweep`: measured throughput against `ldit plan`'s prediction and ideal scaling.

    ldit sweep --report runs/sweeps/tiny-dit [figures=[configs/cluster/local.yaml]]

For each scaling mode (strong, weak) and node count it reads the run's per-step log, drops the first 20% of
steps as warm-up, and takes medians: samples/s, samples/s per device, scaling efficiency (per-device
throughput relative to the smallest node count), the step's time and its parts as the trainer times them
(trainer/common.py `Meter`: data, forward + backward with ZeRO-2's gradient reduction, optimizer step with
the parameter all-gather), and MFU against the figures' peak (none without a peak figure: a CPU run is
not measured against a GPU's peak).

With the figures of a cluster file (`figures=`, else the sweep's `--cluster`) each run is also predicted as
`ldit plan` predicts it (slurm/plan.py, trainer/plan_model.py) and the error of the predicted step time is
printed per run. The report then fits the plan's peak × MFU and bus bandwidths to the measured step times
(least squares on the relative errors, the plan's own step-time function) and writes them to
`calibration.json`, which `ldit plan … --calibrate <sweep>` reads. Files: report.md, report.csv,
report.png, calibration.json.
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from slurm.sweep_plot import PARTS, plot

WARMUP = 0.2
"""Fraction of each run's first steps left out of the figures (start-up, allocator and cache warm-up)."""


@dataclass(frozen=True)
class Row:
    scaling: str
    nodes: int
    devices: int
    global_batch: int
    samples_per_s: float
    per_device: float
    efficiency: float
    ideal: float
    """samples/s of linear scaling from the smallest node count's per-device throughput."""
    mfu: float | None
    step_p50_ms: float
    step_p90_ms: float
    step_p99_ms: float
    parts_ms: dict[str, float]
    """Median ms of each part of a step the trainer timed (PARTS)."""
    predicted: dict[str, float] | None = None
    """The plan's compute, exposed gradient reduction, parameter gather and step, ms."""

    @property
    def error(self) -> float | None:
        """(predicted − measured) / measured step time."""
        return None if self.predicted is None else self.predicted["step"] / self.step_p50_ms - 1


def runs(root: Path) -> list[tuple[str, int, Path]]:
    """(scaling, nodes, run folder) of every finished run under `root`, strong first, fewest nodes first."""
    found = [
        (scaling, int(p.name.split("-")[1]), p)
        for scaling in ("strong", "weak")
        for p in (root / scaling).glob("nodes-*")
        if (p / "log.jsonl").is_file()
    ]
    if not found:
        raise FileNotFoundError(f"{root} holds no finished sweep runs (<strong|weak>/nodes-<n>/log.jsonl)")
    return sorted(found, key=lambda r: (r[0] != "strong", r[1]))


def _measure(path: Path) -> dict[str, Any]:
    entries = [json.loads(line) for line in (path / "log.jsonl").read_text().splitlines()]
    entries = [e for e in entries if "perf/step_time_s" in e]
    kept = entries[int(len(entries) * WARMUP) :] or entries
    step = np.array([e["perf/step_time_s"] for e in kept]) * 1e3
    parts = {
        p: float(np.median([e[f"perf/{p}_s"] for e in kept])) * 1e3 for p in PARTS if f"perf/{p}_s" in kept[0]
    }
    return {
        "rate": float(np.median([e["perf/samples_per_s"] for e in kept])),
        "pct": [float(v) for v in np.percentile(step, [50, 90, 99])],
        "parts": parts,
        "devices": json.loads((path / "topology.json").read_text())["world_size"],
    }


def _train_config(path: Path) -> Any:
    from slurm.jobs import JOBS

    return JOBS["train"].load([str(path / "config.yaml")], [])


def figures_cluster(files: list[str]) -> Any:
    """The cluster config whose plan figures predict the runs (None without files)."""
    if not files:
        return None
    from slurm.cluster import load_cluster

    return load_cluster(files, [])


def _figure_files(root: Path, figures: list[str]) -> list[str]:
    if figures:
        return figures
    record = root / "sweep.json"
    return json.loads(record.read_text()).get("figures", []) if record.is_file() else []


class Predictor:
    """`ldit plan`'s step time of each run of the sweep, under given figures (slurm/plan.py `Planner`)."""

    def __init__(self, cluster: Any, where: str) -> None:
        from slurm.plan import _links

        self.cluster, self.links = cluster, _links(cluster, None, where)  # a missing figure: PlanError
        self._planners: dict[tuple[int, int], Any] = {}

    def planner(self, cfg: Any, tasks: int) -> Any:
        """The run's planner, built once (a fit asks it for every trial of the figures: the manifest is
        read and the parameter list built once per run, not once per trial)."""
        from slurm.plan import planner_for

        key = (id(cfg), tasks)
        if key not in self._planners:
            gpus = self.cluster.gpus_per_node > 0  # the run's tasks per node (a local sweep's may differ)
            cluster = replace(
                self.cluster, gpus_per_node=tasks if gpus else 0, tasks_per_node=None if gpus else tasks
            )
            self._planners[key] = (
                cfg,
                planner_for(cfg, cluster, self.links),
            )  # cfg kept: its id stays its own
        return self._planners[key][1]

    def step_ms(self, cfg: Any, nodes: int, devices: int, links: Any = None) -> dict[str, float]:
        planner = self.planner(cfg, devices // nodes)
        planner.links = links or self.links  # only the step time reads them; the state bytes do not
        t = planner.time(nodes, planner.configured(devices))
        return {
            "compute": t["compute_s"] * 1e3,
            "comm": t["exposed_s"] * 1e3,
            "gather": t["gather_s"] * 1e3,
            "step": t["step_s"] * 1e3,
        }


def rows(root: Path, figures: list[str] | None = None) -> tuple[list[Row], list[str]]:
    """The report's rows, and notes (why nothing is predicted, if so)."""
    from slurm.plan import PlanError

    notes: list[str] = []
    files = _figure_files(root, list(figures or []))
    predictor = None
    cluster = figures_cluster(files)
    if cluster is None:
        notes.append("no prediction: the sweep names no cluster file with the plan's figures (figures=FILE)")
    else:
        try:
            predictor = Predictor(cluster, " + ".join(files))
        except PlanError as exc:
            notes.append(f"no prediction: {exc}")
    peak = cluster.peak_tflops if cluster is not None else None
    if not peak:
        notes.append("no MFU: no peak_tflops figure (a CPU's or GPU's measured peak; slurm/cluster.py)")
    out: list[Row] = []
    base: dict[str, float] = {}
    for scaling, nodes, path in runs(root):
        m = _measure(path)
        cfg = _train_config(path)
        devices, rate = m["devices"], m["rate"]
        base.setdefault(scaling, rate / devices)  # the smallest node count's per-device throughput
        mfu = None
        predicted = None
        if cfg.kind == "dit":
            from models.lightningdit_spec import lightningdit_flops
            from slurm.plan import dit_args, model_inputs

            shape, classes, _, _ = model_inputs(cfg)
            flops = lightningdit_flops(dit_args(cfg, shape, classes), cfg.grad_checkpointing)
            mfu = rate / devices * (flops.forward + flops.backward) / (peak * 1e12) if peak else None
            if predictor is not None:
                predicted = predictor.step_ms(cfg, nodes, devices)
        elif predictor is not None and not any("kind=" in n for n in notes):
            notes.append(
                f"no prediction: the plan models LightningDiT runs; this sweep trains kind={cfg.kind}"
            )
        out.append(
            Row(
                scaling,
                nodes,
                devices,
                cfg.data.global_batch,
                rate,
                rate / devices,
                rate / devices / base[scaling],
                base[scaling] * devices,
                mfu,
                *m["pct"],
                m["parts"],
                predicted,
            )  # fmt: skip
        )
    return out, notes


# ----------------------------------------------------------------------------------------------------------
# Calibration


def calibrate(root: Path, table: list[Row], files: list[str]) -> dict[str, Any] | None:
    """Fit the plan's peak × MFU and bus bandwidths to the measured step times (p50) of the sweep's runs.

        The unknowns are the compute rate (peak × MFU), and the all-reduce bus bandwidth within a node (runs on
        one node with more than one rank) and across nodes (runs on several nodes); each is fitted only where a
        run depends on it, and the two bandwidths are one unknown when there are fewer distinct runs (node count,
    ranks, global batch) than unknowns. The
        latency stays the cluster file's. The fit minimises the sum of squared relative errors of the plan's
        own step time (trainer/plan_model.py `step_time`), in log space (every figure stays positive). With
        more distinct runs than unknowns, each run is also predicted by a fit to the others (`error_held_out`): the
        errors of the fitted runs alone flatter a model with nearly as many unknowns as runs.
    """
    predicted = [r for r in table if r.predicted is not None]
    if not predicted:
        return None
    predictor = Predictor(figures_cluster(files), " + ".join(files))
    configs = {(r.scaling, r.nodes): _train_config(root / r.scaling / f"nodes-{r.nodes}") for r in predicted}
    links0 = predictor.links

    def errors(links: Any, runs: list[Row]) -> np.ndarray:
        return np.array(
            [
                predictor.step_ms(configs[r.scaling, r.nodes], r.nodes, r.devices, links)["step"]
                / r.step_p50_ms
                - 1
                for r in runs
            ]  # fmt: skip
        )

    names, best = _fit(predicted, links0, errors)
    held_out = []
    if _distinct(predicted) > len(names):
        for i, r in enumerate(predicted):
            _, links = _fit(predicted[:i] + predicted[i + 1 :], links0, errors)
            held_out.append(float(errors(links, [r])[0]))
    keys = ("peak_tflops", "mfu", "intra_node_gbs", "inter_node_gbs")
    return {
        "figures": files,
        "unknowns": names,
        "runs": [f"{r.scaling}/nodes-{r.nodes}" for r in predicted],
        "given": {k: getattr(links0, k) for k in keys},
        "fitted": {k: getattr(best, k) for k in keys},
        "error_given": [r.error for r in predicted],
        "error_fitted": [float(e) for e in errors(best, predicted)],
        "error_held_out": held_out,
    }


def _distinct(runs: list[Row]) -> int:
    """How many of the runs are different problems (strong and weak share the smallest node count's)."""
    return len({(r.nodes, r.devices, r.global_batch) for r in runs})


def _fit(runs: list[Row], links0: Any, errors: Any) -> tuple[list[str], Any]:
    """The unknowns the runs determine and the links that fit them best (:func:`calibrate`)."""
    from scipy.optimize import least_squares

    intra = any(r.nodes == 1 and r.devices > 1 for r in runs)
    inter = any(r.nodes > 1 for r in runs)
    names = ["compute"] + (["intra"] if intra else []) + (["inter"] if inter else [])
    if intra and inter and _distinct(runs) < len(names):
        names = ["compute", "busbw"]

    def links_of(x: np.ndarray) -> Any:
        v = dict(zip(names, np.exp(x)))
        return replace(
            links0,
            mfu=v["compute"] / links0.peak_tflops,
            intra_node_gbs=v.get("intra", v.get("busbw", links0.intra_node_gbs)),
            inter_node_gbs=v.get("inter", v.get("busbw", links0.inter_node_gbs)),
        )

    start = {"compute": links0.peak_tflops * links0.mfu, "intra": links0.intra_node_gbs,
             "inter": links0.inter_node_gbs, "busbw": links0.inter_node_gbs}  # fmt: skip
    fit = least_squares(
        lambda x: errors(links_of(x), runs),
        np.log([start[n] for n in names]),
        method="trf",
        xtol=1e-12,
        ftol=1e-12,
        gtol=1e-12,
    )
    return names, links_of(fit.x)


# ----------------------------------------------------------------------------------------------------------
# Files


HEADER = (
    "scaling", "nodes", "devices", "global batch", "samples/s", "samples/s/device", "scaling eff.",
    "ideal samples/s", "MFU", "step p50 ms", "step p90 ms", "data ms", "fwd+bwd ms", "optim ms",
    "predicted ms", "error",
)  # fmt: skip


def _pct(x: float | None) -> str:
    return "—" if x is None else f"{x * 100:+.1f}%"


def _num(x: float | None, fmt: str) -> str:
    return "—" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, fmt)


def markdown(table: list[Row], notes: list[str], cal: dict[str, Any] | None) -> str:
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    for r in table:
        cells = [
            r.scaling, str(r.nodes), str(r.devices), str(r.global_batch), f"{r.samples_per_s:.1f}",
            f"{r.per_device:.1f}", f"{r.efficiency:.3f}", f"{r.ideal:.1f}", _num(r.mfu, ".2e"),
            f"{r.step_p50_ms:.1f}", f"{r.step_p90_ms:.1f}",
            *(_num(r.parts_ms.get(p), ".1f") for p in PARTS),
            _num(r.predicted and r.predicted["step"], ".1f"), _pct(r.error),
        ]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    out = lines + [""]
    predicted = [r for r in table if r.error is not None]
    if predicted:
        out.append("plan error per node count (predicted / measured step time − 1): " + ", ".join(
            f"{r.scaling} {r.nodes} node(s) {_pct(r.error)}" for r in predicted))  # fmt: skip
    if cal is not None:
        f, g = cal["fitted"], cal["given"]
        out.append(
            f"calibrated ({', '.join(cal['unknowns'])} fitted): peak × MFU {f['peak_tflops']:g} × {f['mfu']:.4g} "
            f"(given {g['mfu']:g}), {f['intra_node_gbs']:.4g} GB/s within a node (given {g['intra_node_gbs']:g}), "
            f"{f['inter_node_gbs']:.4g} GB/s across nodes (given {g['inter_node_gbs']:g}); errors with them: "
            + ", ".join(f"{run} {_pct(e)}" for run, e in zip(cal["runs"], cal["error_fitted"]))
            + " (`ldit plan … --calibrate <this sweep>` uses them)"
        )
        if cal["error_held_out"]:
            out.append("each run predicted by a fit to the others: " + ", ".join(
                f"{run} {_pct(e)}" for run, e in zip(cal["runs"], cal["error_held_out"])))  # fmt: skip
    out += notes
    return "\n".join(out).rstrip() + "\n"


def write_report(root: Path, figures: list[str] | None = None) -> str:
    """Write report.md, report.csv, report.png (and calibration.json) under `root`; return the Markdown."""
    table, notes = rows(root, figures)
    files = _figure_files(root, list(figures or []))
    cal = calibrate(root, table, files)
    if cal is not None:
        (root / "calibration.json").write_text(json.dumps(cal, indent=1))
    md = markdown(table, notes, cal)
    (root / "report.md").write_text(md)
    with open(root / "report.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(
            ["scaling", "nodes", "devices", "global_batch", "samples_per_s", "samples_per_s_per_device",
             "scaling_efficiency", "ideal_samples_per_s", "mfu", "step_p50_ms", "step_p90_ms", "step_p99_ms",
             *(f"{p}_ms" for p in PARTS), "predicted_compute_ms", "predicted_comm_ms", "predicted_gather_ms",
             "predicted_step_ms", "error"]
        )  # fmt: skip
        for r in table:
            p = r.predicted or {}
            writer.writerow(
                [r.scaling, r.nodes, r.devices, r.global_batch, f"{r.samples_per_s:.4f}", f"{r.per_device:.4f}",
                 f"{r.efficiency:.4f}", f"{r.ideal:.4f}", "" if r.mfu is None else f"{r.mfu:.6g}",
                 f"{r.step_p50_ms:.3f}", f"{r.step_p90_ms:.3f}", f"{r.step_p99_ms:.3f}",
                 *("" if q not in r.parts_ms else f"{r.parts_ms[q]:.3f}" for q in PARTS),
                 *("" if k not in p else f"{p[k]:.4f}" for k in ("compute", "comm", "gather", "step")),
                 "" if r.error is None else f"{r.error:.4f}"]
            )  # fmt: skip
    fitted = None
    if cal is not None:  # the calibrated plan's step times, from its relative errors
        by_run = {f"{r.scaling}/nodes-{r.nodes}": r for r in table}
        fitted = {(by_run[run].scaling, by_run[run].nodes): by_run[run].step_p50_ms * (1 + e)
                  for run, e in zip(cal["runs"], cal["error_fitted"])}  # fmt: skip
    plot(table, root / "report.png", root.name, fitted)
    return md
