"""The trainer's step time next to a plain PyTorch loop, eager and compiled, interleaved (issue #19).

    python benchmarks/bench_trainer.py [--sizes 12x384 [T/1]] [--rounds 3] [--steps 10] [--warmup 2]
                                       [--contenders plain trainer plain+compile trainer+compile]

Same model, batch 8, fp32, one rank, torch's fused AdamW on both sides. Four contenders, each a fresh
process per round (benchmarks/_interleave.py: rounds interleaved, order rotated, medians):

- `plain`: forward + flow loss + backward + AdamW step on one in-memory batch.
- `trainer`: `ldit train` itself at world size 1 (`slurm.cli.main(["train", …])` in the contender's
  process, as the `ldit` command runs it without --local): the stream reader on a latent shard set,
  per-sample noise, the DeepSpeed engine (stage 0 at one rank in fp32: trainer.engine.engine_stage), the
  EMA, the step's agreement over ranks.
- `plain+compile`: the plain loop after `models.compile.compile_regions(model)` (each block compiled in
  place).
- `trainer+compile`: the trainer with `model.compile=true`.

How the trainer's steps are timed. Its own `perf/step_time_s` in log.jsonl with `log.every=1` would
make every step a log step, and a log step does work the others do not: the engine computes the
global gradient norm only for the steps it logs (`trainer.engine.grad_norm_next_step`: a pass over the
gradients and a host read), and the log itself takes the means over ranks (a host sync and an
all-reduce) and writes TensorBoard and JSON. That would inflate the figure for a run at the default
`log.every=100`. Timing whole runs of N and N+k steps and taking the difference would need no hook,
but adds two start-ups' noise (DeepSpeed's set-up alone varies by seconds here) to k steps. Instead
the run logs only at its end (`log.every` past the last step; the last step is a log step all the
same, so it is run and left out), and the contender stamps the moment each step ends:
`trainer.dit.Meter`, the loop's own step timer, is replaced by a subclass whose `add` (called once a
step, after the EMA update) also records `time.perf_counter()`. A step's time is the gap between two
stamps: the whole loop body, the read-ahead of the next batch and the periodic non-finite check
(`nonfinite_check_every`) included. Step 1 has no gap and counts as warm-up; the end-of-run log,
checkpoint and export come after the last stamp. If the stamps do not number the steps, the contender
fails saying so. A CPU benchmark: on GPUs the host clock would time how fast steps are queued.

Sizes: 12x384 (a 12-block, 384-wide LightningDiT on 32×16×16 latents = 256 tokens, where compute
dominates) and, optionally, T/1 (2 blocks × 64, where bookkeeping dominates).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from _interleave import (
    ROOT,
    Contender,
    errors,
    median_after,
    python,
    ratio,
    report,
    run_rounds,
    table,
    threads_line,
    values,
)

SIZES = {"T/1": {}, "12x384": {"depth": 12, "hidden_size": 384, "num_heads": 6}}
"""Our name → overrides of the registry size (`registry_size`)."""
CONTENDERS = ("plain", "trainer", "plain+compile", "trainer+compile")
RATIOS = (
    ("trainer/plain, eager", "trainer", "plain"),
    ("trainer/plain, compiled", "trainer+compile", "plain+compile"),
    ("compiled/eager, plain loop", "plain+compile", "plain"),
    ("compiled/eager, trainer", "trainer+compile", "trainer"),
)


def registry_size(size: str) -> str:
    return "T/1" if size == "T/1" else "S/1"


def dit(size: str, num_classes: int = 10):
    """The LightningDiT of `size` on 32×16×16 latents (fp32, on the CPU)."""
    from models.lightningdit import LightningDiT, lightningdit_args

    args = lightningdit_args(registry_size(size), in_channels=32, input_size=16, num_classes=num_classes, **SIZES[size])  # fmt: skip
    return LightningDiT(args)


def latent_set(folder: Path, shape=(32, 16, 16), shards=8, per=32) -> None:
    from data_prep.manifest import ClassInfo, LatentInfo, Manifest
    from data_prep.shards import encode_npy, write_shard

    rng = np.random.default_rng(0)
    infos = []
    for i in range(shards):
        rows = []
        for j in range(per):
            a = rng.standard_normal(shape).astype(np.float16)
            rows.append({"__key__": f"k{i}_{j}", "latent.npy": encode_npy(a), "latent_flip.npy": encode_npy(a),
                         "cls": str(j % 10).encode()})  # fmt: skip
        infos.append(write_shard(folder / f"shard-{i:06d}.tar", rows))
    Manifest("latents", infos, [ClassInfo(f"c{i}", i, f"c{i}") for i in range(10)],
             latent=LatentInfo(shape, "float16", (0.0,) * shape[0], (1.0,) * shape[0])).save(folder)  # fmt: skip


# ------------------------------------------------------------------------- the contender processes


def plain_loop(a: argparse.Namespace, compile_: bool) -> list[float]:
    """Step times of forward + flow loss + backward + AdamW on in-memory data (torch's fused AdamW, the
    kernel the trainer uses since issue #17)."""
    import torch

    from models.flow import FlowArgs, RectifiedFlow

    torch.manual_seed(0)
    model = dit(a.size)
    if compile_:
        try:
            from models.compile import compile_regions
        except ImportError as exc:
            sys.exit(f"plain+compile: models.compile.compile_regions is not there yet ({exc})")
        compile_regions(model)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-4, betas=(0.9, 0.95), fused=True)  # the trainer's
    flow = RectifiedFlow(FlowArgs())
    x, y = torch.randn(a.batch, 32, 16, 16), torch.randint(0, 10, (a.batch,))
    times = []
    for _ in range(a.warmup + a.steps):
        t0 = time.perf_counter()
        loss = flow.loss(model, x, y).total
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - t0)
    return times


def trainer_loop(a: argparse.Namespace, compile_: bool) -> list[float]:
    """Times of steps 2 … of `ldit train` (one rank, in this process), from stamps at the end of each step
    (see the module docstring)."""
    import trainer.dit
    from slurm.cli import main as ldit

    ends: list[float] = []

    class StampedMeter(trainer.dit.Meter):
        def add(self, *args, **kwargs) -> None:
            ends.append(time.perf_counter())
            super().add(*args, **kwargs)

    trainer.dit.Meter = StampedMeter
    steps = a.warmup + a.steps + 1  # the last step is a log step: left out
    overrides = [f"model.{k}={v}" for k, v in SIZES[a.size].items()] + (
        ["model.compile=true"] if compile_ else []
    )
    argv = ["train", "configs/dit/tiny_cpu.yaml", f"data.shards={a.shards}", f"run.root={a.work}",
            f"run.name=bench-{os.getpid()}", f"data.global_batch={a.batch}", "data.streams=4", f"steps={steps}",
            f"log.every={steps + 1}", f"ckpt.every={10**6}", f"model.size={registry_size(a.size)}", "optim.lr=2e-4",
            "ema_decay=0.9999", *overrides]  # fmt: skip
    rc = ldit(argv)
    shutil.rmtree(a.work / f"bench-{os.getpid()}", ignore_errors=True)  # its checkpoint and export
    if rc != 0:
        sys.exit(f"ldit train exited {rc}")
    if len(ends) != steps:
        sys.exit(f"stamped {len(ends)} steps of {steps}: trainer.dit no longer calls Meter.add once a step")
    return [b - e for e, b in zip(ends[:-2], ends[1:-1])]


def contender(a: argparse.Namespace) -> None:
    if a.contender.startswith("plain"):
        times, warmup = plain_loop(a, a.contender.endswith("+compile")), a.warmup
    else:  # its times start at step 2
        times, warmup = trainer_loop(a, a.contender.endswith("+compile")), a.warmup - 1
    assert len(times) == warmup + a.steps
    report({"step_s": median_after(times, warmup)})
    sys.stdout.flush()
    os._exit(0)  # as `ldit` leaves: a finished gloo group can abort at interpreter shutdown (slurm/cli.py)


# ------------------------------------------------------------------------------------ the parent


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", nargs="+", choices=list(SIZES), default=["12x384"])
    p.add_argument("--contenders", nargs="+", choices=CONTENDERS, default=list(CONTENDERS))
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=10, help="timed steps per contender process")
    p.add_argument("--warmup", type=int, default=2, help="steps before them, not timed (at least 1)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--threads", type=int, default=0, help="OMP_NUM_THREADS of each process (0: all cores)")
    p.add_argument("--contender", choices=CONTENDERS, help=argparse.SUPPRESS)  # in a contender process
    p.add_argument("--size", choices=list(SIZES), help=argparse.SUPPRESS)
    p.add_argument("--shards", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.warmup < 1 or a.steps < 1:
        p.error("--warmup and --steps must be at least 1")
    os.chdir(ROOT)
    if a.contender:
        return contender(a)
    with tempfile.TemporaryDirectory(prefix="bench-trainer-") as tmp:
        shards = Path(tmp) / "latents"
        shards.mkdir()
        latent_set(shards)
        print(f"batch {a.batch}, fp32, 1 rank; per process {a.warmup} warm-up + {a.steps} timed steps "
              f"(median); {a.rounds} rounds, order rotated", flush=True)  # fmt: skip
        for size in a.sizes:
            common = ["--size", size, "--steps", str(a.steps), "--warmup", str(a.warmup), "--batch", str(a.batch),
                      "--shards", str(shards), "--work", str(Path(tmp) / "runs")]  # fmt: skip
            cs = [Contender(c, python("bench_trainer.py", "--contender", c, *common)) for c in a.contenders]
            print(f"\n{size}", flush=True)
            results = run_rounds(cs, a.rounds, threads=a.threads or None)
            rows = {c: values(results, c, "step_s") for c in a.contenders}
            print(f"\n{size}: step time\n" + table(rows, baseline=a.contenders[0], scale=1e3, unit="ms/step"))
            print(threads_line(results))
            for label, num, den in RATIOS:
                if num in rows and den in rows:
                    print(ratio(label, rows[num], rows[den]))
            for line in errors(results):
                print(line)


if __name__ == "__main__":
    main()
