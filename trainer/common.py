"""What the two training loops share: topology, stop signals, per-sample randomness, metrics, logging.

None of it changes training state; the loops in `trainer/dit.py` and `trainer/vavae.py` read top to
bottom (STYLE.md 3) and call these.
"""

from __future__ import annotations

import hashlib
import json
import math
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from models.device import compute_dtype, device
from trainer.config import TrainCommon, world_size_problems

EXIT_REQUEUE = 75
"""Exit status of a run that stopped on a signal after saving: "requeue me" (EX_TEMPFAIL)."""
EXIT_PEER_LOST = 76
"""Exit status of a rank that lost a peer (a collective error, or no step finished within heartbeat_s,
trainer/heartbeat.py): "the job failed through no fault of its input; requeue me"."""


class StopRequested(Exception):
    """Every rank agreed to stop (a signal arrived); the checkpoint of the current step is saved."""

    exit_code = EXIT_REQUEUE


class NonFiniteLoss(FloatingPointError):
    """The loss was not finite and the configured policy is to stop."""


@dataclass(frozen=True)
class Topology:
    """How the global batch is split over ranks and micro-batches (derived, logged, never written back)."""

    world_size: int
    rank: int
    global_batch: int
    micro_batch: int
    grad_accum: int
    device: torch.device
    dtype: torch.dtype

    @property
    def local_batch(self) -> int:
        return self.micro_batch * self.grad_accum

    def describe(self) -> dict[str, Any]:
        return {
            "world_size": self.world_size,
            "global_batch": self.global_batch,
            "micro_batch": self.micro_batch,
            "grad_accum": self.grad_accum,
            "dtype": str(self.dtype).removeprefix("torch."),
            "device_type": self.device.type,
        }


def topology(cfg: TrainCommon) -> Topology:
    """Check the world size against the batch settings and derive the per-rank split."""
    world, rank = dist.get_world_size(), dist.get_rank()
    b = cfg.data.global_batch
    if problems := world_size_problems(b, cfg.data.streams, cfg.micro_batch, world):
        raise ValueError("; ".join(problems))
    local = b // world
    micro = cfg.micro_batch or local
    dev = device()
    return Topology(world, rank, b, micro, local // micro, dev, compute_dtype(cfg.precision, dev))


class StopSignals:
    """SIGTERM, SIGUSR1 and SIGUSR2 set a flag; the loop agrees on it across ranks at the next step."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}

    def _handle(self, signum: int, frame: Any) -> None:
        self.received = signum

    def restore(self) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)


_HOST_GROUP: Any = None


def host_group() -> Any:
    """The process group for flags every rank knows on the host (a signal, a bad shard): the default group
    under gloo; under nccl, a gloo group over the same ranks, made on first use (every rank makes it in
    the same collective call), so agreeing on host flags never waits for the GPU."""
    global _HOST_GROUP
    if dist.get_backend() == "gloo":
        return None
    if _HOST_GROUP is None:
        _HOST_GROUP = dist.new_group(backend="gloo")
    return _HOST_GROUP


def agree(*flags: bool) -> list[bool]:
    """Each host flag OR-ed over all ranks: one small all-reduce of a CPU tensor over :func:`host_group`
    (gloo), which waits for the other ranks' hosts but not for any device."""
    t = torch.tensor([float(f) for f in flags])
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=host_group())
    return [bool(x) for x in t.tolist()]


class NonFiniteWatch:
    """The first step whose loss was not finite, kept on the device and read only at check steps.

    Reading a loss every step (`.item()`, `.tolist()`) makes the host wait for the device to finish the
    step, so on GPUs the CPU can no longer queue the next step while this one runs. Here each step folds
    `isfinite(loss)` into a device scalar (no sync); :meth:`check` all-reduces it (MIN over ranks) and
    reads it: one sync, at the steps the loop names (a save, a log) and every `every` steps, the same
    steps on every rank, so every rank stops at the same step. Off (`enabled=False`) for nonfinite=skip,
    where DeepSpeed's own per-step check decides.
    """

    NONE = float("inf")

    def __init__(self, dev: torch.device, every: int, enabled: bool = True) -> None:
        self.first = torch.full((), self.NONE, dtype=torch.float64, device=dev)
        self.every, self.enabled = every, enabled

    def add(self, step: int, loss: torch.Tensor) -> None:
        """Fold one micro-batch's loss of `step` in (device ops only)."""
        bad = ~torch.isfinite(loss.detach())
        self.first = torch.where(bad & (self.first == self.NONE), float(step), self.first)

    def agreed_first(self) -> int | None:
        """The earliest non-finite step on any rank, or None (a collective and one host sync)."""
        t = self.first.clone()
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
        first = t.item()
        return None if first == self.NONE else int(first)

    def check(self, step: int, due: bool, saving: bool, masters_finite: Callable[[], bool]) -> None:
        """After `step` steps: when a check is `due` or falls on this step, raise NonFiniteLoss if any
        rank saw a non-finite loss; before a save also if the fp32 master weights are not finite (a
        non-finite gradient under a finite loss), so no checkpoint holds non-finite weights."""
        if not self.enabled or not (due or saving or step % self.every == 0):
            return
        if (first := self.agreed_first()) is not None:
            raise NonFiniteLoss(
                f"non-finite loss at step {first} (nonfinite=stop, checked after step {step}); "
                "the last checkpoint is intact"
            )
        if saving and not masters_finite():
            raise NonFiniteLoss(
                f"non-finite weights after step {step} (nonfinite=stop); the last checkpoint is intact"
            )


def sample_seed(seed: int, step: int, position: int) -> int:
    """Seed of one sample's randomness in one step: a function of (seed, step, place in the global batch)."""
    digest = hashlib.sha256(f"{seed}/{step}/{position}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def per_sample_normal(seed: int, step: int, positions: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """(n, *shape) standard normals, row i drawn from sample_seed(seed, step, positions[i]) on the CPU."""
    rows = [
        torch.randn(shape, generator=torch.Generator().manual_seed(sample_seed(seed, step, p)))
        for p in positions.tolist()  # the reader's host tensor
    ]
    return torch.stack(rows)


def mean_over_ranks(values: dict[str, float]) -> dict[str, float]:
    """Average logged scalars over ranks (one all-reduce, only at log steps)."""
    dev = device() if dist.get_backend() == "nccl" else torch.device("cpu")
    t = torch.tensor(list(values.values()), dtype=torch.float64, device=dev)
    dist.all_reduce(t)
    return dict(zip(values, (t / dist.get_world_size()).tolist()))


def optimizer_state_bytes(engine: Any) -> int:
    """Bytes of optimizer state this rank holds (ZeRO-2: its partition of the Adam moments)."""
    inner = getattr(engine.optimizer, "optimizer", engine.optimizer)
    return sum(
        t.numel() * t.element_size()
        for s in inner.state.values()
        for t in s.values()
        if torch.is_tensor(t) and t.dim() > 0
    )


def memory_bytes(dev: torch.device) -> int:
    """Peak memory so far: of the device on GPUs; this process's peak resident set on the CPU (both peaks,
    so `sys/memory_gb` means one thing; the current RSS at a log step missed a step's transients: 3.99
    GiB logged where the peak was 7.80, benchmarks/bench_full_size.py)."""
    if dev.type == "cuda":
        return torch.cuda.max_memory_allocated(dev)
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


H100_SXM_PEAK_TFLOPS = 989.0
"""Dense bf16 TFLOP/s of an H100 SXM (NVIDIA's datasheet gives 1,979 with 2:4 sparsity; dense is half):
the MFU denominator on GPUs when `log.peak_tflops` is not set."""


def peak_tflops(configured: float | None, dev: torch.device) -> float | None:
    """The MFU denominator: the configured peak on any device; unset, the H100 SXM's on GPUs and none on
    the CPU, where a GPU's datasheet figure would make MFU a meaningless 1e-6 (no `perf/mfu` is logged)."""
    if configured is not None:
        return configured
    return H100_SXM_PEAK_TFLOPS if dev.type == "cuda" else None


class Meter:
    """Step timing over the steps since the last log: step time, samples/s, and each step in parts.

    A step runs from :meth:`begin` to :meth:`add`. :meth:`lap` in between gives the time since the previous
    mark (the step's begin, or the previous lap) to a named part; the time from the last lap to :meth:`add`
    counts as `data`. Laps of the same name add up, so a step's parts sum to its time (same clock, same
    marks). The DiT loop (trainer/dit.py) laps every step into three parts; under DeepSpeed ZeRO-2
    (deepspeed 0.19.8) they hold:

    - `data`: taking the batch read a step ahead, its host-to-device copies and the per-sample draws; then,
      after the step, reading the next step's batch ahead (`ShardGuard.fetch`) and agreeing on the host
      flags (`agree`).
    - `fwd_bwd`: every micro-batch's forward, loss and `engine.backward`, gradient communication included:
      ZeRO-2 reduces gradients inside the backward of every micro-batch, not only at the accumulation
      boundary. The hook each parameter gets (`DeepSpeedZeroOptimizer.create_gradient_handling_hooks` →
      `process_gradients` → `reduce_ready_partitions_and_remove_grads` →
      `reduce_independent_p_g_buckets_and_remove_grads`) reduces a bucket as soon as it is full
      (`reduce_ipg_grads` → `average_tensor`), and `DeepSpeedEngine.backward` ends with
      `_backward_epilogue` → `allreduce_gradients` → `overlapping_partition_gradients_reduce_epilogue` →
      `independent_gradient_partition_epilogue`, which reduces the last, partly filled bucket (and, with
      `overlap_comm` on CUDA, synchronizes the device, so backward returns after every reduction).
    - `optim`: every micro-batch's `engine.step()` and the EMA update. At the accumulation boundary
      `DeepSpeedEngine.step` → `_take_model_step` → `DeepSpeedZeroOptimizer.step`: the gradient norm (on
      log steps or when clipping), AdamW on this rank's fp32 partition, its copy into the bf16/fp32
      module partition, and `all_gather_dp_groups`, the all-gather of the updated parameters, then the
      learning-rate scheduler. On the other micro-steps `step()` does only bookkeeping (nearly nothing).

    On GPUs the host queues work ahead of the device, so a host clock around a step measures how fast the
    step was queued, not run: there each mark is a CUDA event on the current stream, read at the log step
    (the log's own read of the losses has waited for the device by then); no lap synchronizes. The parts
    are then device time between marks: the work queued in that part, plus any time the device sat idle
    waiting for the host to queue it (a slow read-ahead shows in `data` only when the device ran dry).
    On the CPU, `time.perf_counter`. `perf/data_wait_s` stays the host time of the read-ahead alone.
    """

    def __init__(self, dev: torch.device | None = None) -> None:
        self.cuda = dev is not None and dev.type == "cuda"
        self._laps: list[tuple[str, Any]] = []  # (name, mark) of the step in progress
        self.reset()

    def reset(self) -> None:
        self.steps, self.samples, self.data_wait, self.start = 0, 0, 0.0, time.perf_counter()
        self.step_marks: list[tuple[list[str], list[Any]]] = []  # per step: part names, marks (begin … end)

    def _mark(self) -> Any:
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def begin(self) -> Any:
        """Mark a step's start; hand the result to :meth:`add` when the step is queued."""
        self._laps = []
        return self._mark()

    def lap(self, name: str) -> None:
        """Give the time since the previous mark to part `name` (`perf/<name>_s`)."""
        self._laps.append((name, self._mark()))

    def add(self, samples: int, data_wait: float, began: Any) -> None:
        """End the step begun at `began`; the time since its last lap counts as `data`."""
        self.steps += 1
        self.samples += samples
        self.data_wait += data_wait
        names = [name for name, _ in self._laps] + ["data"] if self._laps else []
        self.step_marks.append((names, [began, *(mark for _, mark in self._laps), self._mark()]))
        self._laps = []

    def _offsets(self) -> list[list[float]]:
        """Each step's marks in seconds since its begin (on GPUs this waits for the last step's end event)."""
        if not self.cuda:
            return [[m - marks[0] for m in marks] for _, marks in self.step_marks]
        if self.step_marks:
            self.step_marks[-1][1][-1].synchronize()
        return [[0.0] + [marks[0].elapsed_time(m) / 1e3 for m in marks[1:]] for _, marks in self.step_marks]

    def seconds(self) -> list[float]:
        """Each step's time since the last log."""
        return [offsets[-1] for offsets in self._offsets()]

    def summary(self, world_size: int, flops_per_sample: float, peak: float | None) -> dict[str, float]:
        """Means per step since the last log; `perf/mfu` only with a `peak` (TFLOP/s), `perf/<part>_s` only
        for the parts the steps lapped (a loop that never laps gets none)."""
        offsets = self._offsets()
        steps = max(len(offsets), 1)
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        rate = self.samples / elapsed
        per_device = rate / world_size
        out = {"perf/samples_per_s": rate, "perf/samples_per_s_per_device": per_device}
        if peak is not None:
            out["perf/mfu"] = per_device * flops_per_sample / (peak * 1e12)
        out["perf/data_wait_s"] = self.data_wait / max(self.steps, 1)
        out["perf/step_time_s"] = sum(o[-1] for o in offsets) / steps
        parts: dict[str, float] = {}
        for (names, _), o in zip(self.step_marks, offsets):
            for name, a, b in zip(names, o, o[1:]):
                parts[name] = parts.get(name, 0.0) + (b - a)
        return out | {f"perf/{name}_s": total / steps for name, total in parts.items()}


class Logger:
    """TensorBoard and a JSON-lines log on rank 0; silent on other ranks."""

    def __init__(self, run_dir: Path, start_step: int) -> None:
        self.enabled = dist.get_rank() == 0
        if not self.enabled:
            return
        from torch.utils.tensorboard import SummaryWriter

        # purge_step hides events after the resumed step, so no step appears twice; the JSON log is cut likewise.
        self.tb = SummaryWriter(str(run_dir / "tb"), purge_step=start_step + 1 if start_step > 0 else None)
        path = run_dir / "log.jsonl"
        if path.exists():
            kept = [line for line in path.read_text().splitlines() if json.loads(line)["step"] <= start_step]
            path.write_text("".join(line + "\n" for line in kept))
        self.jsonl = open(path, "a")  # noqa: SIM115 (closed in close())

    def scalars(self, step: int, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        for k, v in values.items():
            self.tb.add_scalar(k, v, step)
        self.jsonl.write(
            json.dumps({"step": step, **{k: v for k, v in values.items() if math.isfinite(v)}}) + "\n"
        )
        self.jsonl.flush()

    def images(self, step: int, tag: str, grid: torch.Tensor) -> None:
        """A (3, H, W) uint8 image."""
        if self.enabled:
            self.tb.add_image(tag, grid, step)

    def text(self, tag: str, text: str) -> None:
        if self.enabled:
            self.tb.add_text(tag, text, 0)

    def close(self) -> None:
        if self.enabled:
            self.tb.close()
            self.jsonl.close()


def print0(*args: Any) -> None:
    if dist.get_rank() == 0:
        print(*args, flush=True)
