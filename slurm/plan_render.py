"""The text of `ldit plan` (slurm/plan.py builds the report; this writes it as two tables and notes)."""

from __future__ import annotations

from typing import Any

from trainer.plan_model import CONTEXT_BYTES, FRAGMENTATION, GiB

MEMORY_COLUMNS = (
    "params",
    "grads",
    "optimizer",
    "master",
    "ema",
    "buckets",
    "act_ckpt",
    "act_no_ckpt",
    "allowance",
    "total",
)
MEMORY_HEADER = ("nodes", "GPUs", "micro×acc", "params", "grads", "optim", "master", "EMA", "buckets", "act ckpt",
                 "act full", "allow", "total", "fits")  # fmt: skip
TIME_HEADER = ("nodes", "GPUs", "run as", "compute", "comm", "gather", "step s", "img/s", "img/s/GPU", "eff")


def duration(seconds: float) -> str:
    """45 s, 37 min, 5.3 h, 12.4 d."""
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 2 * 3600:
        return f"{seconds / 60:.0f} min"
    if seconds < 48 * 3600:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} d"


def _table(header: tuple[str, ...], rows: list[list[str]]) -> list[str]:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]
    return ["  ".join(c.rjust(w) for c, w in zip(line, widths)) for line in [list(header), *rows]]


def tflop(n: float) -> str:
    """FLOPs as TFLOP, or GFLOP below one TFLOP/100."""
    return f"{n / 1e12:.3f} TFLOP" if n >= 1e10 else f"{n / 1e9:.3f} GFLOP"


def nodes_text(n: int) -> str:
    return f"{n} node" if n == 1 else f"{n} nodes"


def _label(s: dict[str, Any]) -> str:
    return f"{s['micro']}×{s['accum']}{' ckpt' if s['checkpointing'] else ''}"


def render(r: dict[str, Any]) -> str:
    a, links, f = r["args"], r["links"], r["flops"]
    unit = "GPUs" if r["gpus"] else "tasks"  # a CPU cluster's ranks
    tokens = (a["input_size"] // a["patch_size"]) ** 2
    steps_h, epochs_h = f"{r['steps']:,} steps", f"{r['epochs']:g} epochs"
    stage0 = [row["world"] for row in r["rows"] if row.get("zero_stage") == 0]
    zero = "ZeRO-2" + (" (stage 0, no ZeRO, at one rank in fp32)" if stage0 else "")
    lines = [
        f"ldit plan: {' + '.join(r['config'])} on {' + '.join(r['cluster'])}",
        f"model     {r['size']}: {r['trainable']:,} trained + {r['frozen']:,} frozen parameters, {tokens} tokens "
        f"(latents {a['in_channels']}×{a['input_size']}×{a['input_size']}, {a['num_classes']:,} classes: {r['model_source']})",
        f"training  {r['dtype']}, {zero}, gradients reduced in {r['comm_dtype']}, global batch {r['global_batch']:,}, "
        f"activation checkpointing {'on' if r['checkpointing'] else 'off'}, {r['steps']:,} steps",
        f"FLOPs     {tflop(f['forward'] + f['backward'])} a sample (forward {tflop(f['forward'])} + backward "
        f"{tflop(f['backward'])}), + {tflop(f['recompute'])} recomputed with checkpointing",
        f"cluster   {r['gpus_per_node']} {unit} of {r['gpu_memory_bytes'] / GiB:.1f} GiB a node; {links['peak_tflops']:g} "
        f"TFLOP/s peak × MFU {links['mfu']:g} ({r['mfu_source']}); {links['intra_node_gbs']:g} GB/s within a node, "
        f"{links['inter_node_gbs']:g} GB/s across nodes, {links['latency_us']:g} µs a ring step",
        f"data      {r['dataset']:,} samples an epoch ({r['dataset_source']})",
        "",
        f"Memory per {unit[:-1]}, GiB (fullest rank):",
    ]  # fmt: skip
    runnable = [row for row in r["rows"] if "problem" not in row]
    memory_header, time_header = (
        tuple(unit if h == "GPUs" else h for h in hs) for hs in (MEMORY_HEADER, TIME_HEADER)
    )
    mem_rows = [
        [str(row["nodes"]), str(row["world"]), _label(row["setting"]),
         *(f"{row['memory'][k] / GiB:.2f}" for k in MEMORY_COLUMNS), "yes" if row["fits"] else "NO"]
        for row in runnable
    ]  # fmt: skip
    lines += _table(memory_header, mem_rows)
    lines += ["", "Time (the setting that runs: the config's if it fits, else the fastest that fits):"]
    time_rows = []
    for row in runnable:
        t = row["time"]
        time_rows.append([
            str(row["nodes"]), str(row["world"]), _label(row["run"]) + ("" if row["fits"] or "instead" in row else " (OOM)"),
            f"{t['compute_s']:.3f}", f"{t['exposed_s']:.3f}", f"{t['gather_s']:.3f}", f"{t['step_s']:.3f}",
            f"{t['img_s']:,.0f}", f"{t['img_s_gpu']:.1f}", f"{t['efficiency']:.2f}",
            duration(t["steps_wall_s"]), duration(t["epochs_wall_s"]),
        ])  # fmt: skip
    lines += _table((*time_header, steps_h, epochs_h), time_rows)
    lines += ["", *_notes(r)]
    return "\n".join(lines)


def _notes(r: dict[str, Any]) -> list[str]:
    have = r["gpu_memory_bytes"] / GiB
    out = []
    for row in r["rows"]:
        at = nodes_text(row["nodes"])
        if "problem" in row:
            out.append(f"{at}: cannot run: {row['problem']}")
        elif "instead" in row:
            i = row["instead"]
            out.append(f"{at}: does not fit ({row['memory']['total'] / GiB:.1f} > {have:.1f} GiB); fits with "
                       f"{i['overrides']} ({i['total'] / GiB:.1f} GiB, step {i['step_s']:.3f} s)")  # fmt: skip
        elif not row["fits"]:
            out.append(f"{at}: does not fit ({row['memory']['total'] / GiB:.1f} > {have:.1f} GiB) at any micro batch: "
                       f"micro batch 1 with checkpointing needs {row['least_total'] / GiB:.1f} GiB")  # fmt: skip
        elif "faster" in row:
            fa = row["faster"]
            out.append(f"{at}: {fa['overrides']} also fits ({fa['total'] / GiB:.1f} GiB) and is "
                       f"{fa['speedup']:.2f}× faster")  # fmt: skip
    if "to_fit" in r:
        out += ["Fits at no planned node count. What would make it fit:", *(f"  - {w}" for w in r["to_fit"])]
    out += [
        f"act: activations of one micro batch (saved for the backward + one block recomputed + the backward's "
        f"working set); allow: {CONTEXT_BYTES / GiB:.0f} GiB for the CUDA context and NCCL + {FRAGMENTATION:.0%} of "
        "activations and buckets (trainer/plan_model.py).",
        "comm: gradient all-reduce time not hidden behind the backward; gather: the parameter all-gather after the "
        "step; eff: img/s/GPU over one node's at the config's setting.",
    ]
    return out
