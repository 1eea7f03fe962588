"""LightningDiT training throughput on one GPU: our DeepSpeed engine step next to a plain PyTorch loop (issue #19).

    python benchmarks/bench_gpu.py [--size XL/1] [--micro-batches 32 64] [--checkpointing off on]
        [--compile off on] [--warmup 3] [--compile-warmup 5] [--steps 10] [--budget-s 420]
    python benchmarks/bench_gpu.py --device cpu --size T/1 --micro-batches 2 --steps 2 --warmup 1 --compile off
    bash benchmarks/gpu.sh WHEELS_DIR        # on a GPU machine without network: installs, then runs this

LightningDiT `--size` (XL/1 by default) on VA-VAE f16d32 latents at 256² (32×16×16, patch 1: 256 tokens),
1,000 classes, bf16, for every micro batch × activation checkpointing × compile. Each contender of each
configuration runs in a fresh process (its own allocator and compile caches in memory), on one in-memory
random batch, with the flow loss of training (`models.flow.RectifiedFlow`, logit-normal t, MSE + cosine):

- ours: `trainer.engine.build_engine` over `deepspeed_config(...)` as trainer/dit.py builds it (ZeRO stage
  2, world size 1 in a one-rank process group, bf16, torch's fused AdamW with the DiT recipe of
  `trainer.config.OptimConfig`), stepped with `engine(...)`, `engine.backward`, `engine.step`. DeepSpeed's
  bf16 keeps the module in bf16 and the fp32 master weights and Adam moments in the optimizer partition.
- plain (`--plain master`, the default): the same arithmetic without the framework: the module cast to
  bf16, an fp32 master copy of its trainable parameters, `loss.backward()`, the bf16 gradients copied
  into fp32 master gradients, torch's fused AdamW on the masters, the masters copied back into the bf16
  weights. The ratio ours/plain is then the framework's cost alone (ZeRO's gradient buckets and copies,
  its overflow check, hooks), not a precision choice. `--plain autocast` is the usual PyTorch AMP
  recipe instead (fp32 weights, `torch.autocast(bf16)`, fused AdamW on fp32), the reference's
  `accelerate --mixed_precision bf16`.

Compile: `models.compile.compile_regions(model)` (each block compiled in place) before the engine or
the plain optimizer is built. Without that module the compile rows read "n/a (models.compile missing)".

How each figure is taken:
- img/s/GPU: micro batch × timed steps / the seconds between two `torch.cuda.synchronize()` around the
  timed steps (none inside), after `--warmup` steps (`--compile-warmup` with compile).
- MFU: img/s × model FLOPs per sample / the measured bf16 peak. Model FLOPs are
  `flops_per_sample(grad_checkpointing=False).train`, forward + backward, the usual MFU convention (PaLM
  appendix B): the recompute of activation checkpointing is not counted, so checkpointing shows as a lower
  MFU. The header also gives the FLOPs with recompute (hardware FLOPs) to derive HFU.
- bf16 peak: the best of `--peak-reps` timings of `--peak-inner` back-to-back (n×n)·(n×n) bf16 products
  (n = `--peak-n`, 8192 on a GPU), timed with CUDA events, in its own process before the
  configurations.
- peak GiB: `torch.cuda.max_memory_allocated()` of the whole process (weights, optimizer state, the
  steps), which starts fresh for each configuration; on the CPU the process's peak RSS instead.
- OOM: a configuration that runs out of memory prints "OOM" and the next one starts.
  `--memory-limit-gib` caps the memory (on a GPU `torch.cuda.set_per_process_memory_fraction`, e.g. to
  see what fits a 40 GiB card; on the CPU an address-space limit), which also tests that path.
- `--budget-s`: once the time left is less than the previous run of the same kind took, the remaining
  configurations are skipped and listed; a run still going at the deadline is stopped ("timeout").

Rows print as they finish (a partial table survives an outer time-out).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Config:
    """One row of the table."""

    micro_batch: int
    grad_checkpointing: bool
    compile: bool

    @property
    def label(self) -> str:
        onoff = lambda b: "on" if b else "off"
        return f"mb {self.micro_batch}, ckpt {onoff(self.grad_checkpointing)}, compile {onoff(self.compile)}"


def configs(micro_batches: list[int], checkpointing: list[str], compile_: list[str]) -> list[Config]:
    """The table's rows, uncompiled ones first (they are quick; a short budget then skips compile rows)."""
    return [
        Config(mb, ckpt == "on", comp == "on")
        for comp in compile_
        for mb in micro_batches
        for ckpt in checkpointing
    ]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(spec: dict, timeout_s: float, tmp: Path, role: str) -> tuple[dict, float]:
    """Run `spec` in a fresh process; its result and the seconds the process took."""
    name = role
    if "micro_batch" in spec:
        name += (
            f"-mb{spec['micro_batch']}-ckpt{int(spec['grad_checkpointing'])}-compile{int(spec['compile'])}"
        )
    spec_path, result_path, log_path = (tmp / f"{name}.{ext}" for ext in ("spec.json", "result.json", "log"))
    spec_path.write_text(json.dumps(spec))
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
    # A one-rank world of its own, whatever launcher started us (slurm/env.py reads these first).
    env |= {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1"}
    env |= {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port())}
    if spec["device"] == "cpu":
        env |= {"CUDA_VISIBLE_DEVICES": "", "DS_ACCELERATOR": "cpu"}
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", str(spec_path), str(result_path)]
    t0 = time.monotonic()
    with open(log_path, "w") as log:
        # Its own session, so that a time-out ends the compile workers it started as well.
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc = proc.wait(timeout=max(timeout_s, 1))
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return {"status": "timeout (budget)"}, time.monotonic() - t0
        except BaseException:  # SIGTERM (see main) or Ctrl-C: the child's session goes too
            os.killpg(proc.pid, signal.SIGKILL)
            raise
    took = time.monotonic() - t0
    if result_path.exists():
        result = json.loads(result_path.read_text())
    else:
        result = {"status": f"error: exit code {rc}"}
    if result["status"].startswith("error"):
        tail = log_path.read_text(errors="replace").splitlines()[-15:]
        print(f"[{name}] {result['status']}; the end of its log:", *tail, sep="\n  ", file=sys.stderr)
    return result, took


def row(cfg: Config, ours: dict, plain: dict, flops: float, peak: float) -> str:
    def cells(r: dict) -> list[str]:
        if r["status"] != "ok":
            return [r["status"], "-", "-"]
        return [f"{r['img_s']:.1f}", f"{100 * r['img_s'] * flops / peak:.2f}%", f"{r['peak_gib']:.2f}"]

    ok = ours["status"] == "ok" and plain["status"] == "ok"
    ratio = f"{ours['img_s'] / plain['img_s']:.3f}" if ok else "-"
    return "| " + " | ".join([cfg.label, *cells(ours), *cells(plain), ratio]) + " |"


TABLE_HEADER = (
    "| config | img/s/GPU | MFU | peak GiB | plain img/s | plain MFU | plain peak GiB | ratio ours/plain |\n"
    "|---|---:|---:|---:|---:|---:|---:|---:|"
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    p.add_argument("--size", default="XL/1", help="LightningDiT registry size (T/1 for a CPU check)")
    p.add_argument("--micro-batches", type=int, nargs="+", default=[32, 64])
    p.add_argument("--checkpointing", nargs="+", choices=["off", "on"], default=["off", "on"])
    p.add_argument("--compile", nargs="+", choices=["off", "on"], default=["off", "on"])
    p.add_argument("--warmup", type=int, default=3, help="untimed steps before the timed ones")
    p.add_argument("--compile-warmup", type=int, default=5, help="untimed steps with compile")
    p.add_argument("--steps", type=int, default=10, help="timed steps")
    p.add_argument("--plain", choices=["master", "autocast"], default="master", help="plain loop's precision")
    p.add_argument("--budget-s", type=float, default=420.0, help="wall-clock budget of all configurations")
    p.add_argument("--memory-limit-gib", type=float, default=None, help="cap each run's memory (tests OOM)")
    p.add_argument("--peak-n", type=int, default=None, help="matmul size of the peak (8192 GPU, 512 CPU)")
    p.add_argument("--peak-reps", type=int, default=10)
    p.add_argument("--peak-inner", type=int, default=None, help="products per timing (10 GPU, 2 CPU)")
    p.add_argument("--worker", nargs=2, metavar=("SPEC", "RESULT"), help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.peak_n is None:
        a.peak_n = 8192 if a.device == "cuda" else 512
    if a.peak_inner is None:
        a.peak_inner = 10 if a.device == "cuda" else 2
    if min(a.micro_batches) < 1 or a.steps < 1 or a.warmup < 0 or a.compile_warmup < 0:
        p.error("micro batches and --steps must be >= 1, warm-ups >= 0")
    return a


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    # Here, not at the top: `python benchmarks/bench_gpu.py` puts benchmarks/ on sys.path, and the tests
    # import this file as `benchmarks.bench_gpu` for its table helpers, which need no contender.
    from gpu_contenders import MISSING_COMPILE, worker_main

    if a.worker:
        worker_main(*a.worker)
    # An outer `timeout` sends SIGTERM: end the running child's session (spawn) on the way out.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(124))
    import torch

    from models.lightningdit import lightningdit_args, lightningdit_flops

    start = time.monotonic()
    args = lightningdit_args(a.size, in_channels=32, input_size=16, num_classes=1000)
    model_flops = lightningdit_flops(args, grad_checkpointing=False).train
    hw_flops = lightningdit_flops(args, grad_checkpointing=True).train
    has_compile = importlib.util.find_spec("models.compile") is not None
    base = {"device": a.device, "size": a.size, "plain": a.plain, "memory_limit_gib": a.memory_limit_gib}
    base |= {"warmup": a.warmup, "compile_warmup": a.compile_warmup, "steps": a.steps}
    with tempfile.TemporaryDirectory(prefix="bench_gpu-") as tmp_:
        tmp = Path(tmp_)
        probe_spec = base | {"role": "probe", "peak_n": a.peak_n, "peak_reps": a.peak_reps}
        probe, _ = spawn(probe_spec | {"peak_inner": a.peak_inner}, a.budget_s, tmp, "probe")
        if probe["status"] != "ok":
            print(f"cannot measure the bf16 peak: {probe['status']}")
            return 1
        peak = probe["peak_flops"]
        dev = probe["device_name"] + (
            f", {probe['memory_gib']:.1f} GiB, CUDA {probe['cuda']}" if probe["cuda"] else ""
        )
        print(f"# LightningDiT {a.size} training throughput, 1 device (benchmarks/bench_gpu.py)\n")
        print(
            f"- device: {dev}; torch {torch.__version__}, deepspeed {importlib.metadata.version('deepspeed')}"
        )
        print(
            f"- measured bf16 matmul peak: {peak / 1e12:.1f} TFLOP/s ({a.peak_n}³, best of {a.peak_reps} "
            f"timings of {a.peak_inner} products{', CUDA events' if a.device == 'cuda' else ''})"
        )
        print(
            f"- model: {a.size}, latents 32×16×16, patch {args.patch_size}: "
            f"{args.num_tokens} tokens, bf16; one in-memory random batch, flow loss (logit-normal t, MSE + cos)"
        )
        print(
            f"- FLOPs per sample for MFU: {model_flops / 1e9:.2f} GFLOP = forward + backward "
            f"(`flops_per_sample(grad_checkpointing=False).train`), recompute not counted; with the "
            f"recompute of checkpointing {hw_flops / 1e9:.2f} GFLOP (HFU = MFU × {hw_flops / model_flops:.3f})"
        )
        plain_desc = {
            "master": "bf16 weights + fp32 master copy, fused AdamW on the masters (DeepSpeed bf16's arithmetic)",
            "autocast": "fp32 weights under torch.autocast(bf16), fused AdamW (PyTorch AMP)",
        }[a.plain]
        print(
            "- ours: DeepSpeed ZeRO-2 engine (trainer.engine.build_engine), world size 1, bf16 module, fp32 master"
        )
        print(f"- plain loop: {plain_desc}")
        print(
            f"- steps: {a.warmup} warm-up ({a.compile_warmup} with compile) + {a.steps} timed, "
            "each contender of each row in a fresh process"
        )
        peak_note = (
            "torch.cuda.max_memory_allocated" if a.device == "cuda" else "peak RSS of the process (CPU)"
        )
        print(f"- peak GiB: {peak_note}\n")
        print(TABLE_HEADER, flush=True)
        took: dict[tuple[str, bool], float] = {}  # seconds of the last run of each (contender, compile)
        skipped: list[str] = []
        timings: list[str] = []
        for cfg in configs(a.micro_batches, a.checkpointing, a.compile):
            if cfg.compile and not has_compile:
                print(row(cfg, {"status": MISSING_COMPILE}, {"status": MISSING_COMPILE}, 0, 1), flush=True)
                continue
            results = {}
            for role in ("ours", "plain"):
                left = a.budget_s - (time.monotonic() - start)
                if skipped or left < took.get((role, cfg.compile), 0.0):
                    results[role] = {"status": "skipped (budget)"}
                    skipped.append(f"{cfg.label} ({role})")
                    continue
                r, took[role, cfg.compile] = spawn(base | asdict(cfg) | {"role": role}, left, tmp, role)
                results[role] = r
                if r["status"].startswith("timeout"):
                    skipped.append(f"{cfg.label} ({role}, stopped)")
                parts = [f"{k} {v:.1f}" for k, v in r.get("seconds", {}).items()]
                parts += [f"last loss {r['loss']:.4f}"] if "loss" in r else []
                timings.append(
                    f"{cfg.label}, {role}: {took[role, cfg.compile]:.1f} s ({', '.join(parts) or r['status']})"
                )
            print(row(cfg, results["ours"], results["plain"], model_flops, peak), flush=True)
        print(f"\n{time.monotonic() - start:.0f} s of a {a.budget_s:.0f} s budget", end="")
        if skipped:
            print(f"; the budget ran out, not run: {'; '.join(skipped)}")
        else:
            print("; every configuration ran")
        print("seconds per process (in all; of which setup = model and engine, warm-up, timed steps):")
        print("\n".join(f"- {t}" for t in timings))
    return 0


if __name__ == "__main__":
    sys.exit(main())
