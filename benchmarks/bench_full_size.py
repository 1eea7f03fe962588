"""LightningDiT at full size (XL/1, bf16, ZeRO-2) rehearsed on this CPU machine (issue #17, "Full size").

    python benchmarks/bench_full_size.py [--model XL/1] [--steps 4] [--ckpt-at 2] [--workdir DIR] [--keep]
    python benchmarks/bench_full_size.py --quick          # S/1: a fast check of this script itself

Everything runs through the real `ldit train` path, as a user starts it: subprocesses of
`python -m slurm.cli train configs/dit/lightningdit_xl1.yaml ... --local W` (gloo on the CPU), with
precision=bf16, ZeRO stage 2, micro batch 1, activation checkpointing on, on a synthetic latent shard set
of the real shape (32×16×16 fp16 latents and their flips, 1,000 classes, a few hundred samples). Global
batch 2 and 2 streams, so the run continues at world size 1 (1 rank, 2 accumulation steps).

1. `w2`: W=2, `--steps` steps, a checkpoint at step `--ckpt-at` (ckpt.every) and one at the end; the
   trainer writes `export/step-N` at the end. This is the uninterrupted reference.
2. `w2-resumed`: a second run directory holding only w2's checkpoint at `--ckpt-at` (hard links, no copy),
   trained at W=2 to `--steps`: it must print "resumed w2-resumed at step K" and log the same losses as
   `w2` at steps K+1.. (bit for bit: same world size).
3. `w1-elastic`: the same at W=1: rank 0 converts the checkpoint to DeepSpeed's universal format
   (trainer/universal.py prints "converted ... in X s") and prints "(elastic: universal checkpoint)"; its
   losses are compared with `w2`'s (equal up to float reduction order and bf16 accumulation).
4. `ldit export` of w2's checkpoint at `--ckpt-at`, beside the trainer's own export.

How each figure is taken:
- step time: the median of the `perf/step_time_s` that rank 0 logs in runs/<name>/log.jsonl each step
  (log.every=1), leaving out a run's first step (warm-up) when it logged more than one. The steps end in
  collectives, so the ranks' step times are the same.
- peak RSS per process: benchmarks/full_size_watch.py samples VmHWM/VmRSS of every process of the job
  (the launcher, each rank, the universal converter and its workers) every 0.1 s, and the lowest
  MemAvailable of the machine; os.wait4 on the launcher gives the largest process (ru_maxrss) as a check.
  The job is killed when MemAvailable falls under `--min-available-gib`, keeping the peaks reached.
- bytes per rank: parameters and gradients are computed from the parameter count P (built on the meta
  device): the bf16 module is whole on every rank (2·P bytes); ZeRO-2 keeps this rank's bf16 gradient
  partition (2·⌈P_train/W⌉) and, during the step, its fp32 copy (4·⌈P_train/W⌉); the fp32 master partition
  is 4·⌈P_train/W⌉. The Adam moments and the EMA are the trainer's own figures (sys/optimizer_state_mb_rank0
  and sys/ema_mb_rank0 in log.jsonl); their W=2 / W=1 ratio is printed. sys/memory_gb is rank 0's peak
  RSS (ru_maxrss) up to that step.
- checkpoint size: the bytes of the files under checkpoints/step-K (and of model_universal/), next to the
  size rank 0 prints when it saves.
- save time: as rank 0 prints it, "saved checkpoint step-K (S GiB) in T s": DeepSpeed's files, the RNG
  and EMA files, meta.json and `latest` (the EMA gather before it is not counted).
- load time: as rank 0 prints it, "loaded checkpoint step-K in T s": DeepSpeed's files and the RNG
  states (the EMA file is read after it). At W=1 it ends in "(its conversion included)": the conversion
  to the universal format is part of it, and is also shown alone.
- conversion time: trainer/universal.py's "converted ... in X s", set against collective_timeout_s
  (trainer/config.py; no collective waits on the conversion, ckpt.convert_timeout_s bounds it).
- threads: torch.get_num_threads() in a child started with the ranks' environment (OMP_NUM_THREADS =
  cores / W, set here).

Big checkpoints are deleted at the end unless `--keep`. The output is markdown, for the README.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from full_size_watch import GIB, ROOT, Job, gib, run_job, secs, torch_threads, wait_for_machine

CONFIG = "configs/dit/lightningdit_xl1.yaml"
CONVERTED = re.compile(r"converted step-\d+/model to DeepSpeed's universal format in ([\d.]+) s \((.*)\)")
SAVED = re.compile(r"saved checkpoint (step-\d+) \(([\d.]+ [MG]iB)\) in ([\d.]+) s")
LOADED = re.compile(r"loaded checkpoint (step-\d+) in ([\d.]+) s( \(its conversion included\))?")


# ------------------------------------------------------------------------------------------ data


def latent_shards(
    folder: Path, samples: int, shards: int = 8, shape=(32, 16, 16), classes: int = 1000
) -> None:
    """A latent shard set of the real shape: fp16 standard normals, class n % classes, mean 0 / std 1."""
    from data_prep.manifest import ClassInfo, LatentInfo, Manifest
    from data_prep.shards import encode_npy, write_shard

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    infos, n, per = [], 0, -(-samples // shards)
    for i in range(shards):
        rows = []
        for _ in range(min(per, samples - n)):
            a = rng.standard_normal(shape).astype(np.float16)
            rows.append({"__key__": f"s{n:06d}", "latent.npy": encode_npy(a),
                         "latent_flip.npy": encode_npy(a[..., ::-1].copy()), "cls": str(n % classes).encode()})  # fmt: skip
            n += 1
        infos.append(write_shard(folder / f"shard-{i:06d}.tar", rows))
    classes_ = [ClassInfo(f"n{i:08d}", i, f"class {i}") for i in range(classes)]
    latent = LatentInfo(shape, "float16", (0.0,) * shape[0], (1.0,) * shape[0])
    Manifest("latents", infos, classes_, latent=latent).save(folder)


def param_counts(size: str, depth: int) -> tuple[int, int]:
    """(all parameters, trainable parameters) of the DiT the runs train, built on the meta device."""
    import torch

    from models.lightningdit import LightningDiT, lightningdit_args

    overrides = {"depth": depth} if depth else {}
    args = lightningdit_args(size, **overrides, in_channels=32, input_size=16, num_classes=1000)
    with torch.device("meta"):
        model = LightningDiT(args)
    params = list(model.parameters())
    return sum(p.numel() for p in params), sum(p.numel() for p in params if p.requires_grad)


# ------------------------------------------------------------------------------- the benchmark


@dataclass
class Bench:
    args: argparse.Namespace
    work: Path
    shards: Path

    @property
    def runs(self) -> Path:
        return self.work / "runs"

    def train(self, name: str, world: int) -> Job:
        a = self.args
        overrides = [
            f"data.shards={self.shards}", f"run.root={self.runs}", f"run.name={name}", f"model.size={a.model}",
            "precision=bf16", "zero_stage=2", "micro_batch=1", "grad_checkpointing=true", "data.global_batch=2",
            "data.streams=2", "data.workers=0", f"steps={a.steps}", f"ckpt.every={a.ckpt_at}", "ckpt.keep_last=10",
            "ckpt.milestone_every=0", "log.every=1", "log.sample_every=0",
        ]  # fmt: skip
        if a.depth:
            overrides.append(f"model.depth={a.depth}")
        if a.convert_workers:
            overrides.append(f"ckpt.convert_workers={a.convert_workers}")
        cmd = [sys.executable, "-m", "slurm.cli", "train", CONFIG, *overrides, "--local", str(world)]
        return run_job(Job(name, world), cmd, self.work / f"{name}.log", int(a.min_available_gib * GIB))

    def export(self, name: str, step: int) -> Job:
        cmd = [
            sys.executable,
            "-m",
            "slurm.cli",
            "export",
            f"run.root={self.runs}",
            f"run.name={name}",
            f"step={step}",
        ]
        return run_job(Job(f"{name}-export", 1), cmd, self.work / f"{name}-export.log",
                       int(self.args.min_available_gib * GIB))  # fmt: skip

    def fork_run(self, src: str, dst: str, step: int) -> None:
        """Run directory `dst` holding only `src`'s checkpoint `step`, its files hard-linked (no copy)."""
        name = f"step-{step:08d}"
        target = self.runs / dst / "checkpoints"
        shutil.rmtree(self.runs / dst, ignore_errors=True)
        shutil.copytree(self.runs / src / "checkpoints" / name, target / name, copy_function=os.link)
        (target / "latest").write_text(name)

    def log(self, name: str) -> dict[int, dict[str, float]]:
        path = self.runs / name / "log.jsonl"
        if not path.is_file():
            return {}
        return {(e := json.loads(line))["step"]: e for line in path.read_text().splitlines()}


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir() else 0


def median_step_time(log: dict[int, dict[str, float]]) -> float | None:
    times = [e["perf/step_time_s"] for _, e in sorted(log.items())]
    if not times:
        return None
    return statistics.median(times[1:] if len(times) > 1 else times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="registry size (models/lightningdit.py); default XL/1")
    p.add_argument("--depth", type=int, default=0, help="override the size's block count (0: its own)")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--ckpt-at", type=int, default=2, help="the step of the checkpoint the resumes start from")
    p.add_argument("--samples", type=int, default=256, help="samples in the synthetic latent shard set")
    p.add_argument("--workdir", type=Path, default=None, help="default /tmp/ldit-bench-full-size")
    p.add_argument("--keep", action="store_true", help="keep the checkpoints and run directories")
    p.add_argument("--quick", action="store_true", help="S/1 (unless --model): a fast check of this script")
    p.add_argument("--convert-workers", type=int, default=0, help="ckpt.convert_workers (0: the config's)")
    p.add_argument("--min-available-gib", type=float, default=0.3, help="stop a job below this MemAvailable")
    p.add_argument("--no-wait", action="store_true", help="do not wait for pytest to finish / memory to free")
    p.add_argument("--wait-minutes", type=float, default=20.0, help="longest wait for pytest / memory")
    a = p.parse_args()
    a.model = a.model or ("S/1" if a.quick else "XL/1")
    if not 0 < a.ckpt_at < a.steps:
        p.error("--ckpt-at must lie between 0 and --steps")
    os.chdir(ROOT)
    sys.path.insert(0, str(ROOT))
    Path("/proc/self/oom_score_adj").write_text("1000")  # inherited: the kernel's OOM killer picks us first
    work = a.workdir or Path("/tmp/ldit-bench-full-size")
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    bench = Bench(a, work, work / "latents")
    label = a.model + (f" (depth {a.depth})" if a.depth else "")
    total, trainable = param_counts(a.model, a.depth)
    print(f"{label}: {total:,} parameters ({trainable:,} trained), bf16, ZeRO-2, micro batch 1, activation "
          f"checkpointing; {a.steps} steps, checkpoint at {a.ckpt_at}; work folder {work}", flush=True)  # fmt: skip
    latent_shards(bench.shards, a.samples)
    threads = {w: torch_threads(w) for w in (2, 1)}
    print(
        f"torch threads per rank: W=2 {threads[2]}, W=1 {threads[1]} (OMP_NUM_THREADS = {os.cpu_count()} cores / W)"
    )
    if not (a.quick or a.no_wait):
        wait_for_machine(19.0, 60.0 * a.wait_minutes)

    k, n = a.ckpt_at, a.steps
    ck = f"step-{k:08d}"
    jobs: dict[str, Job] = {}
    jobs["w2"] = bench.train("w2", 2)
    ck_bytes = folder_bytes(bench.runs / "w2" / "checkpoints" / ck)
    ck_files = {
        f.name: f.stat().st_size for f in (bench.runs / "w2" / "checkpoints" / ck).rglob("*") if f.is_file()
    }
    export_bytes = folder_bytes(bench.runs / "w2" / "export" / f"step-{n:08d}")
    ok = jobs["w2"].rc == 0 and (bench.runs / "w2" / "checkpoints" / ck / "meta.json").is_file()
    if ok:
        jobs["export"] = bench.export("w2", k)
        if not a.keep:  # the end-of-run checkpoint is not needed: free its disk before the next runs
            shutil.rmtree(bench.runs / "w2" / "checkpoints" / f"step-{n:08d}", ignore_errors=True)
        bench.fork_run("w2", "w2-resumed", k)
        jobs["w2-resumed"] = bench.train("w2-resumed", 2)
        if not a.keep:
            shutil.rmtree(bench.runs / "w2-resumed" / "checkpoints" / f"step-{n:08d}", ignore_errors=True)
        bench.fork_run("w2", "w1-elastic", k)
        jobs["w1-elastic"] = bench.train("w1-elastic", 1)
    universal_bytes = folder_bytes(bench.runs / "w1-elastic" / "checkpoints" / ck / "model_universal")
    w1_ck_bytes = folder_bytes(bench.runs / "w1-elastic" / "checkpoints" / f"step-{n:08d}")
    report(
        bench,
        jobs,
        label,
        total,
        trainable,
        threads,
        ck_bytes,
        ck_files,
        export_bytes,
        universal_bytes,
        w1_ck_bytes,
    )
    if not a.keep:
        shutil.rmtree(bench.runs, ignore_errors=True)
        print(f"\ndeleted {bench.runs} (--keep keeps it); logs are in {work}")


def report(
    bench: Bench, jobs: dict[str, Job], label: str, total: int, trainable: int, threads: dict[int, int],
    ck_bytes: int, ck_files: dict[str, int], export_bytes: int, universal_bytes: int, w1_ck_bytes: int,
) -> None:  # fmt: skip
    """Print the markdown tables."""
    from trainer.config import TrainCommon

    a = bench.args
    k = a.ckpt_at
    runs = [r for r in ("w2", "w2-resumed", "w1-elastic") if r in jobs]
    logs = {r: bench.log(r) for r in runs}
    ref = {s: e["loss/total"] for s, e in logs.get("w2", {}).items()}
    head = {"w2": f"W=2, steps 1–{a.steps}", "w2-resumed": f"W=2 resumed at {k}", "w1-elastic": f"W=1 resumed at {k} (universal)"}  # fmt: skip
    rows: list[tuple[str, list[str]]] = []

    def row(what: str, f) -> None:
        rows.append((what, [f(r) for r in runs]))

    def last(r: str, key: str) -> float | None:
        e = logs[r].get(max(logs[r], default=-1), {})
        return e.get(key)

    def per_rank(r: str) -> int:
        return -(-trainable // jobs[r].world)

    row("exit status; wall time of the job", lambda r: f"{jobs[r].rc}; {jobs[r].wall_s:.0f} s" + (" (stopped: memory)" if jobs[r].killed_for_memory else ""))  # fmt: skip
    row("torch threads per rank", lambda r: str(threads[jobs[r].world]))
    row("steps logged", lambda r: ", ".join(map(str, sorted(logs[r]))) or "none")
    row("step time, median perf/step_time_s (s)", lambda r: secs(median_step_time(logs[r])))
    row("peak RSS rank 0", lambda r: gib(jobs[r].peak_rss.get("rank 0")))
    row("peak RSS rank 1", lambda r: gib(jobs[r].peak_rss.get("rank 1")))
    row("peak RSS converter (its workers)", lambda r: gib(jobs[r].peak_rss.get("converter")) + (f" ({gib(jobs[r].peak_rss['converter workers'])})" if "converter workers" in jobs[r].peak_rss else ""))  # fmt: skip

    def phase(r: str, role: str) -> str:
        """Peaks of `role` in: start → first logged step (load, step 1) / the steps / the checkpoint
        saves (from "step K/N", before the EMA gather, to "saved checkpoint step-K") / after the last."""
        j = jobs[r]
        first = next((t for t, line in j.lines if re.match(r"step \d+/", line)), None)
        saves = [(j.first(f"step {s}/{a.steps} "), j.first(f"saved checkpoint step-{s:08d}")) for s in range(1, a.steps + 1)]  # fmt: skip
        saves = [(t0, t1) for t0, t1 in saves if t0 is not None and t1 is not None]
        if first is None or not saves:
            return gib(j.peak_between(role, 0.0, j.wall_s)) + " (whole job)"
        in_save = lambda t: any(t0 <= t <= t1 for t0, t1 in saves)
        steps = [v[role] for t, v in j.rss if first < t < saves[-1][1] and not in_save(t) and role in v]
        return " / ".join(gib(v) for v in (j.peak_between(role, 0.0, first), max(steps, default=None),
                          max((j.peak_between(role, t0, t1) or 0 for t0, t1 in saves), default=None),
                          j.peak_between(role, saves[-1][1], j.wall_s)))  # fmt: skip

    what = "VmRSS peak: start → first logged step / steps / checkpoint saves (EMA gather included) / after the last save (export)"  # fmt: skip
    row(f"rank 0 {what}", lambda r: phase(r, "rank 0"))
    row(f"rank 1 {what}", lambda r: phase(r, "rank 1") if jobs[r].world > 1 else "—")
    row("largest process (ru_maxrss, os.wait4)", lambda r: gib(jobs[r].largest_process))
    row("peak sum of the job's RSS", lambda r: gib(jobs[r].peak_sum_rss))
    row("lowest MemAvailable of the machine", lambda r: gib(jobs[r].min_available))
    row("bf16 parameters per rank (2·P, whole module)", lambda r: gib(2 * total))
    row("bf16 gradient partition per rank (2·⌈P_train/W⌉)", lambda r: gib(2 * per_rank(r)))
    row("fp32 gradient partition in the step (4·⌈P_train/W⌉)", lambda r: gib(4 * per_rank(r)))
    row("fp32 master partition per rank (4·⌈P_train/W⌉)", lambda r: gib(4 * per_rank(r)))
    row("Adam moments per rank (logged optimizer_state_mb_rank0)", lambda r: "—" if (v := last(r, "sys/optimizer_state_mb_rank0")) is None else gib(v * 2**20))  # fmt: skip
    row("EMA per rank (logged ema_mb_rank0)", lambda r: "—" if (v := last(r, "sys/ema_mb_rank0")) is None else gib(v * 2**20))  # fmt: skip
    row("rank 0 peak RSS at the last log (sys/memory_gb, ru_maxrss)", lambda r: "—" if (v := last(r, "sys/memory_gb")) is None else f"{v:.2f} GiB")  # fmt: skip

    def saved(r: str, step: int) -> str:
        found = [m for m in SAVED.findall(jobs[r].text()) if m[0] == f"step-{step:08d}"]
        return f"{found[0][2]} s ({found[0][1]})" if found else "—"

    row(f"checkpoint save time, printed (size): step {k} / step {a.steps}", lambda r: " / ".join(saved(r, s) for s in (k, a.steps)))  # fmt: skip

    def loaded(r: str) -> str:
        found = LOADED.findall(jobs[r].text())
        return f"{found[0][1]} s{found[0][2]}" if found else "—"

    row("checkpoint load time, printed", loaded)

    def resumed(r: str) -> str:
        if r == "w2":
            return "—"
        text = jobs[r].text()
        tag = f"resumed {r} at step {k}" + (" (elastic: universal checkpoint)" if r == "w1-elastic" else "")
        return "yes" if tag in text else "**no**"

    row(f'printed "resumed <name> at step {k}" (elastic tag at W=1)', resumed)

    def compare(r: str) -> str:
        if r == "w2":
            return "reference"
        got = {s: e["loss/total"] for s, e in logs[r].items()}
        common = [s for s in got if s in ref and s > k]
        if not common:
            return "—"
        if all(got[s] == ref[s] for s in common):
            return f"equal at steps {common[0]}–{common[-1]}"
        rel = max(abs(got[s] - ref[s]) / max(abs(ref[s]), 1e-12) for s in common)
        return f"max relative difference {rel:.2e} (steps {common[0]}–{common[-1]})"

    row("losses vs the uninterrupted run", compare)

    def conversion(r: str) -> str:
        found = CONVERTED.findall(jobs[r].text())
        if not found:
            return "—"
        s, what = float(found[0][0]), found[0][1]
        timeout = TrainCommon.collective_timeout_s
        return f"{s:.2f} s ({what}) = {s / timeout:.3f} × collective_timeout_s ({timeout:g} s); universal folder on disk {gib(universal_bytes)}"

    row("universal conversion time", lambda r: conversion(r) if r == "w1-elastic" else "—")

    print(f"\n### {label}: {total / 1e6:.2f} M parameters ({trainable / 1e6:.2f} M trained), bf16, ZeRO-2, gloo, "
          f"micro batch 1, activation checkpointing, global batch 2\n")  # fmt: skip
    print("| | " + " | ".join(head[r] for r in runs) + " |")
    print("|---|" + "---|" * len(runs))
    for what, cells in rows:
        print(f"| {what} | " + " | ".join(cells) + " |")

    opt = {r: last(r, "sys/optimizer_state_mb_rank0") for r in ("w2", "w1-elastic") if r in logs}
    print()
    if opt.get("w2") and opt.get("w1-elastic"):
        print(f"Adam moments per rank W=2 / W=1: {opt['w2']:.1f} MiB / {opt['w1-elastic']:.1f} MiB = "
              f"**{opt['w2'] / opt['w1-elastic']:.4f}** (must be ≤ 0.52)")  # fmt: skip
    files = ", ".join(
        f"{name} {gib(size)}" for name, size in sorted(ck_files.items(), key=lambda x: -x[1])[:6]
    )
    print(f"checkpoint step-{k:08d} (W=2) on disk: {gib(ck_bytes)} ({files})")
    if w1_ck_bytes:
        print(f"checkpoint step-{a.steps:08d} written at W=1: {gib(w1_ck_bytes)}")
    print(f"trainer's export/step-{a.steps:08d}: {gib(export_bytes)}")
    if "export" in jobs:
        j = jobs["export"]
        print(f"`ldit export` of step {k}: exit {j.rc}, {j.wall_s:.1f} s wall, peak RSS {gib(max(j.peak_rss.values(), default=0))}")  # fmt: skip


if __name__ == "__main__":
    main()
