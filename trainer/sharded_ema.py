"""An fp32 EMA of DeepSpeed's fp32 master weights, sharded like the ZeRO optimizer state.

The reference (fact sheet §3.2) trains in fp32 and averages its fp32 parameters: ema ← d·ema + (1 − d)·p
every step from step 0. Under bf16 the DeepSpeed module holds bf16 copies that move in steps of 2⁻⁸
relative, so an EMA read from the module would settle on rounded values; this one reads the fp32 master
partition each rank's ZeRO optimizer updates (`single_partition_of_fp32_groups` of
deepspeed/runtime/zero/stage_1_and_2.py at stages 1-2, `fp32_groups_flat_partition` of
runtime/bf16_optimizer.py when DeepSpeed picks its BF16 optimizer), after `engine.step()` wrote it.

Layout (DeepSpeed 0.19.8): each optimizer group's trainable parameters are views into one flat,
zero-padded buffer (`bit16_groups_flat[g]`, per-parameter alignment padding and an optional round-robin
order included); rank r owns the contiguous slice [r·P, (r + 1)·P) of it, P = len(flat) / W, and its
fp32 master partition is that slice in fp32. A parameter may straddle two ranks' slices. We read each
parameter's offset in the flat buffer from its storage (so any order or padding DeepSpeed chose is
followed), keep one fp32 EMA tensor per group of the master partition's size, and update all groups with
two multi-tensor ops (`torch._foreach_mul_`, `torch._foreach_add_`: today's mul-then-add formula, so an
fp32 run keeps the same rounding). At W = 1 the partition is the whole group; with no ZeRO optimizer
(stage 0 in fp32) the module's parameters are the master weights and each is its own whole "group".

Parameters the optimizer does not train (the DiT's frozen `pos_embed`) are averaged whole on every rank
from their fp32 value before DeepSpeed cast the module, as the reference averages its fp32 copy; buffers
(the RoPE tables) are kept as built in fp32, never read back from a bf16 module.

The whole EMA exists only when asked for (:meth:`ShardedEMA.state_dict`, a collective gather to rank 0,
which alone writes it): for a checkpoint, an export or a sample grid. It is keyed like the model's own state_dict (the
reference's keys), so the checkpoint's `ema.safetensors` is the format the unsharded EMA wrote; every rank
loads its own slice from that whole (:meth:`ShardedEMA.load_state_dict`), so an EMA saved at one world size
resumes at any other.

Written here, not taken from a library: DeepSpeed keeps no EMA, and torch's `AveragedModel` and timm's
`ModelEmaV3` average a whole module per rank.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

__all__ = ["ShardedEMA", "fill_partitions", "fp32_snapshot", "seed_fp32_master", "zero_masters"]


def fp32_snapshot(model: nn.Module) -> dict[str, Tensor]:
    """The model's persistent state before DeepSpeed casts it: parameters as fp32 copies, buffers as they are."""
    params = {n for n, _ in model.named_parameters()}
    with torch.no_grad():
        return {
            k: v.detach().to(torch.float32, copy=True) if k in params else v.detach().clone()
            for k, v in model.state_dict().items()
        }


@dataclass(frozen=True)
class _Slot:
    """One averaged parameter: its key, its group, where it lies in the group's flat buffer, its shape."""

    name: str
    group: int
    offset: int
    numel: int
    shape: torch.Size


class ShardedEMA:
    """fp32 EMA of this rank's partition of `engine`'s fp32 master weights; whole only on request.

    `init` is :func:`fp32_snapshot` of the averaged model taken before `deepspeed.initialize` (the EMA
    starts from the fp32 weights, as the reference's copy of the model does); `prefix` selects the
    averaged submodule inside `engine.module` ("autoencoder." for the VA-VAE's AE engine). Parameters of
    the engine outside the prefix are trained but not exported.
    """

    def __init__(self, engine: Any, init: dict[str, Tensor], decay: float, prefix: str = "") -> None:
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"EMA decay must be in [0, 1], got {decay}")
        self.decay = decay
        self._engine = engine
        self._order = list(init)
        names = {
            id(p): n.removeprefix(prefix)
            for n, p in engine.module.named_parameters()
            if n.startswith(prefix) and n.removeprefix(prefix) in init
        }
        layout = _Layout(engine, names)
        self._master_attr, self.world, self.rank = layout.master_attr, layout.world, layout.rank
        self.slots, self.partition_size = layout.slots, layout.partition_size
        with torch.no_grad():
            self.shards = [m.detach().to(torch.float32, copy=True).view(-1) for m in self._masters()]
            self._fill(init)
        averaged = {s.name for s in self.slots}
        frozen = {n.removeprefix(prefix) for n, p in engine.module.named_parameters() if n.startswith(prefix)}
        frozen = {n for n in frozen - averaged if n in init}
        self.frozen = {n: init[n].clone() for n in self._order if n in frozen}  # averaged whole, every rank
        self._frozen_source = {n: init[n] for n in self.frozen}  # their fp32 value: they never train
        self.buffers = {n: init[n] for n in self._order if n not in averaged and n not in frozen}

    def _masters(self) -> list[Tensor]:
        return _masters(self._engine, self._master_attr)

    def _window(self, s: _Slot) -> tuple[int, int, int] | None:
        return _window(s, self.rank, self.partition_size)

    def _fill(self, whole: dict[str, Tensor]) -> None:
        """Copy this rank's slices of every averaged parameter from a whole state_dict."""
        for s in self.slots:
            if (w := self._window(s)) is not None:
                src, dst, n = w
                part = whole[s.name].reshape(-1)[src : src + n]
                self.shards[s.group][dst : dst + n].copy_(part)

    @torch.no_grad()
    def update(self) -> None:
        """ema ← decay·ema + (1 − decay)·master over this rank's partition (call after a step was applied)."""
        masters = [m.view(-1) for m in self._masters()]
        torch._foreach_mul_(self.shards, self.decay)
        torch._foreach_add_(self.shards, masters, alpha=1.0 - self.decay)
        if self.frozen:
            frozen = list(self.frozen.values())
            torch._foreach_mul_(frozen, self.decay)
            torch._foreach_add_(frozen, list(self._frozen_source.values()), alpha=1.0 - self.decay)

    @torch.no_grad()
    def masters_finite(self) -> bool:
        """Whether every rank's fp32 master partition is finite (a collective; one host read). A save asks
        it when no per-step check ran (nonfinite=stop): a non-finite gradient makes Adam's moments and
        then the weights non-finite for good, so finite masters now mean finite masters and EMA so far."""
        masters = self._masters()
        bad = torch.stack([~torch.isfinite(m).all() for m in masters]).any().to(torch.float32)
        dist.all_reduce(bad, op=dist.ReduceOp.MAX)
        return not bool(bad.item())

    def nbytes(self) -> int:
        """Bytes of EMA state this rank holds (its partitions, the frozen parameters and the buffers)."""
        held = [*self.shards, *self.frozen.values(), *self.buffers.values()]
        return sum(t.numel() * t.element_size() for t in held)

    @torch.no_grad()
    def state_dict(self, dst: int | None = 0) -> dict[str, Tensor] | None:
        """The whole EMA under the model's keys, in its order, on rank `dst` (None: on every rank); the
        other ranks get None. A collective: every rank must call it.

        The partitions are gathered straight into one flat buffer per group (`dist.gather`, or
        `all_gather_into_tensor` for every rank) and the whole's tensors are views of it: 4 bytes per
        parameter on `dst` and nothing more on the others. Gathering on every rank into a list, then
        `cat`, then a clone per tensor held three copies on every rank: at XL/1 (2.7 GB each) a W=2
        checkpoint save went out of memory on this 23 GiB machine (benchmarks/bench_full_size.py).
        """
        if dst is not None and not 0 <= dst < max(self.world, 1):
            raise ValueError(f"no rank {dst} in a world of {self.world}")
        here = dst is None or self.rank == dst
        flats: list[Tensor | None] = []
        for shard in self.shards:
            if self.world == 1:
                flats.append(shard.clone())  # a copy: the EMA moves on
                continue
            whole = (
                torch.empty(shard.numel() * self.world, dtype=shard.dtype, device=shard.device)
                if here
                else None
            )
            if dst is None:
                dist.all_gather_into_tensor(whole, shard)
            else:
                dist.gather(shard, list(whole.chunk(self.world)) if here else None, dst=dst)
            flats.append(whole)
        if not here:
            return None
        out = {s.name: flats[s.group][s.offset : s.offset + s.numel].view(s.shape) for s in self.slots}
        out |= {n: v.clone() for n, v in self.frozen.items()} | {
            n: v.clone() for n, v in self.buffers.items()
        }
        return {k: out[k] for k in self._order}

    @torch.no_grad()
    def load_state_dict(self, state_dict: dict[str, Tensor]) -> None:
        """Take this rank's partition from a whole EMA (written at any world size); key sets must match."""
        expected = set(self._order)
        missing, unexpected = expected - set(state_dict), set(state_dict) - expected
        if missing or unexpected:
            raise KeyError(
                f"EMA state_dict mismatch: missing {sorted(missing)}, unexpected {sorted(unexpected)}"
            )
        shapes = {s.name: s.shape for s in self.slots} | {n: v.shape for n, v in self.frozen.items()}
        shapes |= {n: v.shape for n, v in self.buffers.items()}
        for name, value in state_dict.items():
            if tuple(value.shape) != tuple(shapes[name]):
                raise ValueError(f"EMA {name}: shape {tuple(value.shape)} != {tuple(shapes[name])}")
        self._fill({k: v.to(torch.float32) for k, v in state_dict.items()})
        for name, target in (*self.frozen.items(), *self.buffers.items()):
            target.copy_(state_dict[name])


class _Layout:
    """Where each of `engine`'s trainable parameters lies in its optimizer group's flat buffer, and which
    slice of that buffer this rank's fp32 master partition holds (see the module docstring).

    `names` maps `id(parameter)` to the key it is known by; parameters not in it are left out.
    """

    def __init__(self, engine: Any, names: dict[int, str]) -> None:
        opt = engine.optimizer
        if hasattr(opt, "single_partition_of_fp32_groups"):  # ZeRO stages 1-2
            lp_groups, flats, self.master_attr = (
                opt.bit16_groups,
                opt.bit16_groups_flat,
                "single_partition_of_fp32_groups",
            )
        elif hasattr(opt, "fp32_groups_flat_partition"):  # DeepSpeed's BF16 optimizer
            lp_groups, flats, self.master_attr = (
                opt.bf16_groups,
                opt.bf16_groups_flat,
                "fp32_groups_flat_partition",
            )
        else:  # no ZeRO, fp32: the module's parameters are the master weights
            lp_groups = [[p] for p in engine.module.parameters() if p.requires_grad]
            flats, self.master_attr = [g[0] for g in lp_groups], ""
            if any(g[0].dtype != torch.float32 for g in lp_groups):
                raise NotImplementedError(
                    "the fp32 EMA needs DeepSpeed's fp32 master weights: use zero_stage >= 1 with bf16"
                )
        self.world = dist.get_world_size() if self.master_attr else 1
        self.rank = dist.get_rank() if self.master_attr else 0
        self.slots: list[_Slot] = []
        self.partition_size: list[int] = []
        for g, (params, flat) in enumerate(zip(lp_groups, flats)):
            self.partition_size.append(flat.numel() // self.world)
            for p in params:
                if id(p) in names:
                    offset = (p.data_ptr() - flat.data_ptr()) // flat.element_size()
                    self.slots.append(_Slot(names[id(p)], g, offset, p.numel(), p.shape))


def _masters(engine: Any, master_attr: str) -> list[Tensor]:
    """This rank's fp32 master partitions (fetched each time: a checkpoint load may replace them)."""
    if master_attr:
        return list(getattr(engine.optimizer, master_attr))
    return [p.detach() for p in engine.module.parameters() if p.requires_grad]


def _window(s: _Slot, rank: int, partition_size: list[int]) -> tuple[int, int, int] | None:
    """(start in the parameter, start in this rank's partition, length) of `s`'s part on this rank."""
    lo = rank * partition_size[s.group]
    hi = lo + partition_size[s.group]
    a, b = max(s.offset, lo), min(s.offset + s.numel, hi)
    return None if a >= b else (a - s.offset, a - lo, b - a)


@torch.no_grad()
def seed_fp32_master(engine: Any, weights: dict[str, Tensor]) -> None:
    """Write the exact fp32 `weights` (keyed like `engine.module`'s parameters, e.g. a
    :func:`fp32_snapshot` of the module taken before `deepspeed.initialize`) into this rank's fp32 master
    partitions: every trainable parameter of the engine, a fresh start's first step.

    DeepSpeed builds its fp32 master weights from the module it was given, which it has cast to bf16
    under bf16: without this, training would start from bf16-rounded weights, where the reference
    (fp32 with autocast, fact sheet §3.2) starts from the fp32 initialisation. The bf16 module keeps its
    rounded copy, which the first step overwrites from the master. A no-op in effect in fp32.
    """
    names = {id(p): n for n, p in engine.module.named_parameters() if p.requires_grad}
    missing = sorted(set(names.values()) - set(weights))
    if missing:
        raise KeyError(f"no fp32 weights for trainable parameter(s) {missing[:5]} of the engine")
    if not (layout := _Layout(engine, names)).master_attr:
        return
    fill_partitions(engine, weights, _masters(engine, layout.master_attr))


def zero_masters(engine: Any) -> list[Tensor]:
    """This rank's fp32 master partitions of a ZeRO engine, one flat tensor per optimizer group ([] without
    ZeRO, where the module's parameters are the masters)."""
    layout = _Layout(engine, {})
    return _masters(engine, layout.master_attr) if layout.master_attr else []


@torch.no_grad()
def fill_partitions(engine: Any, whole: dict[str, Tensor], flats: list[Tensor]) -> None:
    """Copy this rank's slice of each trainable parameter's whole tensor in `whole` (keyed like
    `engine.module`'s parameters) into `flats`, one tensor per optimizer group laid out like this rank's
    fp32 master partition (the masters themselves, or an Adam moment of them). ZeRO engines only."""
    names = {id(p): n for n, p in engine.module.named_parameters() if p.requires_grad}
    layout = _Layout(engine, names)
    flats = [f.view(-1) for f in flats]
    for s in layout.slots:
        if (w := _window(s, layout.rank, layout.partition_size)) is not None:
            src, dst, n = w
            flats[s.group][dst : dst + n].copy_(whole[s.name].reshape(-1)[src : src + n])
