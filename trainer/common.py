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


class Meter:
    """Step timing: data wait, step time, samples/s, over the steps since the last log.

    On GPUs the host queues work ahead of the device, so a host clock around a step measures how fast the
    step was queued, not run: there each step is bracketed by CUDA events, read at the log step (the
    log's own read of the losses has waited for the device by then). On the CPU, `time.perf_counter`.
    """

    def __init__(self, dev: torch.device | None = None) -> None:
        self.cuda = dev is not None and dev.type == "cuda"
        self.reset()

    def reset(self) -> None:
        self.steps, self.samples, self.data_wait, self.start = 0, 0, 0.0, time.perf_counter()
        self.step_times: list[Any] = []  # seconds, or (start, end) CUDA event pairs

    def begin(self) -> Any:
        """Mark a step's start; hand the result to :meth:`add` when the step is queued."""
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def add(self, samples: int, data_wait: float, began: Any) -> None:
        self.steps += 1
        self.samples += samples
        self.data_wait += data_wait
        if self.cuda:
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            self.step_times.append((began, end))
        else:
            self.step_times.append(time.perf_counter() - began)

    def seconds(self) -> list[float]:
        """Each step's time since the last log (on GPUs this waits for the last step's end event)."""
        if not self.cuda:
            return list(self.step_times)
        if self.step_times:
            self.step_times[-1][1].synchronize()
        return [a.elapsed_time(b) / 1e3 for a, b in self.step_times]

    def summary(self, world_size: int, flops_per_sample: float, peak_tflops: float) -> dict[str, float]:
        times = self.seconds()
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        rate = self.samples / elapsed
        per_device = rate / world_size
        return {
            "perf/samples_per_s": rate,
            "perf/samples_per_s_per_device": per_device,
            "perf/mfu": per_device * flops_per_sample / (peak_tflops * 1e12),
            "perf/data_wait_s": self.data_wait / max(self.steps, 1),
            "perf/step_time_s": sum(times) / max(len(times), 1),
        }


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
