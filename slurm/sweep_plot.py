"""report.png of `ldit sweep` (slurm/sweep_report.py): throughput measured, predicted and ideal; each
step's parts measured beside the plan's; MFU against the figures' peak, or none without one."""

from __future__ import annotations

from pathlib import Path
from typing import Any

PARTS = ("data", "fwd_bwd", "optim")
"""The trainer's parts of a step (log keys perf/<part>_s, trainer/common.py `Meter`)."""


def plot(
    table: list[Any], path: Path, title: str, calibrated: dict[tuple[str, int], float] | None = None
) -> None:
    """Three panels of the sweep report's rows (slurm/sweep_report.py `Row`) in one PNG; `calibrated`: the
    step ms the plan predicts with the figures fitted to the sweep, by (scaling, nodes)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = list(dict.fromkeys(r.scaling for r in table))
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    ax1, ax2, ax3 = axes
    for mode, color in zip(modes, ("C0", "C1")):
        rs = [r for r in table if r.scaling == mode]
        nodes = [r.nodes for r in rs]
        ax1.plot(nodes, [r.samples_per_s for r in rs], "o-", color=color, label=f"{mode}: measured")
        if all(r.predicted for r in rs):
            ax1.plot(nodes, [r.global_batch / r.predicted["step"] * 1e3 for r in rs], "x:", color=color,
                     label=f"{mode}: plan")  # fmt: skip
        if calibrated and all((r.scaling, r.nodes) in calibrated for r in rs):
            ax1.plot(nodes, [r.global_batch / calibrated[r.scaling, r.nodes] * 1e3 for r in rs], "+-.",
                     color=color, alpha=0.7, label=f"{mode}: plan, calibrated")  # fmt: skip
        ax1.plot(nodes, [r.ideal for r in rs], "--", color="grey", alpha=0.6, label=f"{mode}: ideal")
    ax1.set(
        xlabel="nodes",
        ylabel="samples/s",
        title=f"{title}: throughput",
        xticks=sorted({r.nodes for r in table}),
    )
    ax1.legend(fontsize=7)
    labels, x = [], 0.0  # the step's parts: measured bars beside predicted ones
    for r in table:
        bottom = 0.0
        for part, color in zip(PARTS, ("C2", "C0", "C3")):
            value = r.parts_ms.get(part, 0.0)
            ax2.bar(x, value, 0.4, bottom=bottom, color=color, label=part if x == 0 else None)
            bottom += value
        if r.predicted:
            bottom = 0.0
            for part, color in zip(("compute", "comm", "gather"), ("C0", "C4", "C3")):
                ax2.bar(x + 0.4, r.predicted[part], 0.4, bottom=bottom, color=color, alpha=0.5, hatch="//",
                        label=f"plan: {part}" if x == 0 else None)  # fmt: skip
                bottom += r.predicted[part]
        labels.append(f"{r.scaling[0]}{r.nodes}")
        x += 1
    ax2.set_xticks([i + 0.2 for i in range(len(table))], labels)
    ax2.set(ylabel="ms per step (p50 parts)", title="step: measured | plan (s = strong, w = weak; nodes)")
    ax2.legend(fontsize=7)
    if any(r.mfu is not None for r in table):
        for mode, color in zip(modes, ("C0", "C1")):
            rs = [r for r in table if r.scaling == mode and r.mfu is not None]
            ax3.plot([r.nodes for r in rs], [r.mfu for r in rs], "o-", color=color, label=mode)
        top = max(r.mfu for r in table if r.mfu is not None)
        ax3.set(xlabel="nodes", ylabel="MFU (model FLOPs / figures' peak)", title="MFU",
                xticks=sorted({r.nodes for r in table}), ylim=(0, top * 1.25))  # fmt: skip
        ax3.legend(fontsize=7)
    else:
        ax3.text(0.5, 0.5, "no peak_tflops figure:\nMFU not shown", ha="center", va="center")
        ax3.set_axis_off()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
