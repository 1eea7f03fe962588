"""What runs inside one contender process of benchmarks/bench_gpu.py (issue #19): the bf16 peak probe, or
one measurement of one configuration (micro batch, activation checkpointing, compile) by one contender.

Each such process is `python benchmarks/bench_gpu.py --worker SPEC RESULT`, started by the parent: it reads
the spec JSON, runs :func:`worker` and writes the result JSON, a "status" ("ok", "OOM", "error: ...", which
becomes the table's cell) with the figures (img_s, peak_gib, loss, seconds; the probe's peak_flops and
device). The contenders (ours: our DeepSpeed engine; plain: the same arithmetic in a plain loop) and how
each figure is taken are described in bench_gpu.py's docstring.

Imported as `gpu_contenders`: `python benchmarks/bench_gpu.py` puts benchmarks/ on sys.path.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time
import traceback
from pathlib import Path

MISSING_COMPILE = "n/a (models.compile missing)"


def _sync(dev) -> None:
    import torch

    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _limit_memory(dev, gib: float | None) -> None:
    if gib is None:
        return
    import torch

    if dev.type == "cuda":
        total = torch.cuda.get_device_properties(dev).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, gib * 2**30 / total), dev)
    else:  # an address-space cap above what the process has mapped so far
        status = Path("/proc/self/status").read_text().splitlines()
        vm_kib = int(next(ln for ln in status if ln.startswith("VmSize:")).split()[1])
        limit = vm_kib * 1024 + int(gib * 2**30)
        resource.setrlimit(resource.RLIMIT_AS, (limit, resource.getrlimit(resource.RLIMIT_AS)[1]))


def _peak_gib(dev) -> float:
    import torch

    if dev.type == "cuda":
        return torch.cuda.max_memory_allocated(dev) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def measure_peak(dev, n: int, reps: int, inner: int) -> dict:
    """Best bf16 matmul throughput (FLOP/s) of `reps` timings of `inner` back-to-back (n×n)·(n×n) products."""
    import torch

    a, b = (torch.randn(n, n, device=dev, dtype=torch.bfloat16) for _ in range(2))
    c = torch.empty(n, n, device=dev, dtype=torch.bfloat16)
    for _ in range(max(3, inner)):  # cuBLAS heuristics, clocks up
        torch.mm(a, b, out=c)
    _sync(dev)
    best = float("inf")
    for _ in range(reps):
        if dev.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(inner):
                torch.mm(a, b, out=c)
            end.record()
            end.synchronize()
            seconds = start.elapsed_time(end) / 1e3
        else:
            t0 = time.perf_counter()
            for _ in range(inner):
                torch.mm(a, b, out=c)
            seconds = time.perf_counter() - t0
        best = min(best, seconds / inner)
    out = {"peak_flops": 2 * n**3 / best, "device_name": "CPU", "cuda": None}
    if dev.type == "cuda":
        props = torch.cuda.get_device_properties(dev)
        out |= {
            "device_name": props.name,
            "cuda": torch.version.cuda,
            "memory_gib": props.total_memory / 2**30,
        }
    return out


def _model(spec: dict, dev):
    import torch

    from models.lightningdit import LightningDiT, lightningdit_args

    torch.manual_seed(0)
    args = lightningdit_args(spec["size"], in_channels=32, input_size=16, num_classes=1000)
    with dev:  # built on the device: initialising 675 M parameters on the CPU takes seconds
        model = LightningDiT(args)
    model.set_grad_checkpointing(spec["grad_checkpointing"])
    if spec["compile"]:
        from models.compile import compile_regions

        compile_regions(model)
    return model


def _batch(spec: dict, dev):
    import torch

    g = torch.Generator(device=dev).manual_seed(1)
    mb = spec["micro_batch"]
    x1 = torch.randn(mb, 32, 16, 16, generator=g, device=dev)  # (B, C, H, W) normalised latents
    y = torch.randint(0, 1000, (mb,), generator=g, device=dev)
    return x1, y


def ours_step(spec: dict, dev):
    """The step of trainer/dit.py at one accumulation step: DeepSpeed ZeRO-2 engine, bf16, flow loss."""
    import torch

    from models.flow import FlowArgs, RectifiedFlow
    from slurm.env import init_distributed
    from trainer.config import OptimConfig
    from trainer.engine import build_engine, deepspeed_config

    init_distributed()  # one rank (RANK=0, WORLD_SIZE=1 set by the parent): nccl on a GPU, gloo on the CPU
    model = _model(spec, dev)
    trained = [p for p in model.parameters() if p.requires_grad]
    o = OptimConfig()
    ds_config = deepspeed_config(
        micro_batch=spec["micro_batch"], grad_accum=1, world_size=1, dtype=torch.bfloat16,
        grad_clip=o.grad_clip, zero_stage=2, trainable_params=sum(p.numel() for p in trained),
    )  # fmt: skip
    engine = build_engine(
        model, trained, lr=o.lr, betas=o.betas, eps=o.eps, weight_decay=o.weight_decay,
        warmup_steps=o.warmup_steps, ds_config=ds_config,
    )  # fmt: skip
    flow = RectifiedFlow(FlowArgs(t_sampling="logit_normal", cos_weight=1.0))
    x1, y = _batch(spec, dev)

    def net(x_t, t, y_):
        return engine(x_t.to(torch.bfloat16), t, y_)

    def step():
        loss = flow.loss(net, x1, y)
        engine.backward(loss.total)
        engine.step()
        return loss.total

    return step


def plain_step(spec: dict, dev):
    """The same model, loss and optimizer in a plain loop; precision per `spec["plain"]` (bench_gpu.py's docstring)."""
    import torch

    from models.flow import FlowArgs, RectifiedFlow
    from trainer.config import OptimConfig

    model = _model(spec, dev)
    o = OptimConfig()
    flow = RectifiedFlow(FlowArgs(t_sampling="logit_normal", cos_weight=1.0))
    x1, y = _batch(spec, dev)
    params = [p for p in model.parameters() if p.requires_grad]
    adamw = dict(lr=o.lr, betas=o.betas, eps=o.eps, weight_decay=o.weight_decay, fused=True)
    if o.grad_clip:
        raise NotImplementedError(
            "the plain loop does not clip; OptimConfig.grad_clip is 0 in the DiT recipe"
        )

    if spec["plain"] == "autocast":
        opt = torch.optim.AdamW(params, **adamw)

        def step():
            with torch.autocast(dev.type, dtype=torch.bfloat16):
                loss = flow.loss(model, x1, y)
            loss.total.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            return loss.total

        return step

    master = [p.detach().float().clone() for p in params]  # fp32 master weights, as DeepSpeed's bf16
    for m in master:
        m.grad = torch.zeros_like(m)
    model.to(torch.bfloat16)  # weights and buffers, as DeepSpeed's engine casts the module
    opt = torch.optim.AdamW(master, **adamw)
    master_grads = [m.grad for m in master]

    def net(x_t, t, y_):
        return model(x_t.to(torch.bfloat16), t, y_)

    def step():
        loss = flow.loss(net, x1, y)
        loss.total.backward()
        with torch.no_grad():
            torch._foreach_copy_(master_grads, [p.grad for p in params])  # bf16 -> fp32
            opt.step()
            torch._foreach_copy_(params, master)  # fp32 -> bf16 weights
        for p in params:
            p.grad = None
        return loss.total

    return step


def _is_oom(e: BaseException) -> bool:
    import torch

    text = str(e)
    return (
        isinstance(e, torch.OutOfMemoryError | MemoryError)
        or "out of memory" in text.lower()
        or "can't allocate memory" in text
    )


def worker(spec: dict) -> dict:
    """Run one measurement (`spec["role"]`: probe, ours or plain) and return its result."""
    import torch

    dev = torch.device(spec["device"], 0) if spec["device"] == "cuda" else torch.device("cpu")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            return {"status": "error: no CUDA device (use --device cpu)"}
        torch.cuda.set_device(dev)
    if spec["role"] == "probe":
        return {"status": "ok", **measure_peak(dev, spec["peak_n"], spec["peak_reps"], spec["peak_inner"])}
    try:
        _limit_memory(dev, spec["memory_limit_gib"])
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)
        t_setup = time.perf_counter()
        step = (ours_step if spec["role"] == "ours" else plain_step)(spec, dev)
        t_warmup = time.perf_counter()
        for _ in range(spec["compile_warmup"] if spec["compile"] else spec["warmup"]):
            step()
        _sync(dev)
        t0 = time.perf_counter()
        for _ in range(spec["steps"]):
            loss = step()
        _sync(dev)
        seconds = time.perf_counter() - t0
        return {
            "status": "ok",
            "img_s": spec["micro_batch"] * spec["steps"] / seconds,
            "peak_gib": _peak_gib(dev),
            "loss": float(loss.detach()),
            "seconds": {"setup": t_warmup - t_setup, "warmup": t0 - t_warmup, "timed": seconds},
        }
    except ImportError as e:
        if spec["compile"] and ("models.compile" in str(e) or "compile_regions" in str(e)):
            return {"status": MISSING_COMPILE}
        raise
    except Exception as e:
        if _is_oom(e):
            traceback.print_exc()
            return {"status": "OOM"}
        raise


def worker_main(spec_path: str, result_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    try:
        result = worker(spec)
    except BaseException as e:
        traceback.print_exc()
        result = {"status": f"error: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"}
    Path(result_path).write_text(json.dumps(result))
    sys.stdout.flush()
    sys.stderr.flush()
    # Not a normal exit: a DeepSpeed engine's gloo/nccl objects torn down at interpreter exit can abort the
    # process after the work is done (reference/ecosystem.md §8, "Process exit").
    os._exit(0)
