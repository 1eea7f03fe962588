"""Resuming a checkpoint saved at another ZeRO stage: whole tensors, through the stage-free layouts.

ldit runs stage 0 at one rank in fp32 and ZeRO-2 otherwise (trainer.engine.engine_stage), and a run
resumes at any world size, so a checkpoint is loaded by one of three routes (:func:`resume_route`):

- `exact`: same world size and stage (or stages 1 and 2 alike): DeepSpeed loads its own files.
- `universal`: another world size, ZeRO on both sides: DeepSpeed's universal checkpoint
  (trainer/universal.py converts it once).
- `whole`: stage 0 on one side (a W=1 fp32 run resumed at W=2, a W=2 run resumed at W=1, or a W=1
  checkpoint saved before ldit ran stage 0 there). DeepSpeed loads neither way between its stage-0 files
  (the torch optimizer's state per parameter, in `mp_rank_00_model_states.pt`) and ZeRO's (flat
  partitions), so the trainer does it with whole per-parameter tensors:

  1. DeepSpeed loads what does not depend on the stage (`load_optimizer_states=False`): the module's
     weights, the LR scheduler and its step counters. The optimizer's groups get the scheduler's current
     rate, which DeepSpeed restores only with the optimizer state (without it, the first resumed step
     during warmup took the first step's rate).
  2. The whole fp32 weights and Adam moments of every trained parameter are read: from a stage-0
     checkpoint, its module and the torch optimizer's state dict (in the optimizer's parameter order,
     which is the trainer's `trained` list, the same at every stage); from a ZeRO checkpoint, its
     universal conversion (`zero/<name>/{fp32,exp_avg,exp_avg_sq,step}.pt`), made once as for `universal`.
  3. They are written into the engine: at stage 0 into the module's parameters and the torch optimizer's
     state (`load_state_dict`, which puts `step` where fused AdamW wants it); under ZeRO each rank writes
     its slice into its fp32 master partition and the partition's Adam moments
     (trainer.sharded_ema.fill_partitions), then DeepSpeed copies the masters into the module
     (`update_lp_params`).

Tested bit for bit in fp32 against an uninterrupted run, both ways (tests/test_stage_change.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import torch

from trainer.sharded_ema import fill_partitions, zero_masters
from trainer.universal import ConvertSettings, ensure_universal

Route = Literal["exact", "universal", "whole"]
MODEL_STATES = "mp_rank_00_model_states.pt"
MOMENTS = ("exp_avg", "exp_avg_sq")


def resume_route(meta: dict[str, Any], world_size: int, stage: int) -> Route:
    """How a checkpoint with `meta` (its meta.json) loads into engines of `stage` at `world_size`.
    Checkpoints written before meta.json recorded the stage actually run were all ZeRO-2."""
    saved_stage, saved_world = int(meta.get("zero_stage", 2)), int(meta["world_size"])
    if (saved_stage == 0) != (stage == 0) or (stage == 0 and saved_world != world_size):
        return "whole"
    return "exact" if saved_world == world_size else "universal"


def describe(route: Route, meta: dict[str, Any], world_size: int, stage: int) -> str:
    """The words the resume message adds for `route` ("" for an exact resume)."""
    if route == "universal":
        return " (elastic: universal checkpoint)"
    if route == "whole":
        return (
            f" (from ZeRO stage {meta.get('zero_stage', 2)} at world size {meta['world_size']} to stage {stage} "
            f"at world size {world_size}: whole tensors)"
        )
    return ""


def trained_names(engine: Any) -> list[str]:
    """The module's names of the engine's trained parameters, in the client optimizer's order."""
    names = {id(p): n for n, p in engine.module.named_parameters()}
    opt = engine.optimizer
    groups = opt.bit16_groups if hasattr(opt, "bit16_groups") else [g["params"] for g in opt.param_groups]
    return [names[id(p)] for group in groups for p in group]


def load_whole(folder: Path, tag: str, engine: Any, convert: ConvertSettings) -> None:
    """Load engine checkpoint `folder/tag`, saved at another stage, into `engine` (every rank calls it)."""
    load_path, _ = engine.load_checkpoint(
        str(folder), tag=tag, load_optimizer_states=False, load_lr_scheduler_states=True
    )
    if load_path is None:
        raise FileNotFoundError(f"DeepSpeed found no checkpoint under {folder / tag}")
    names = trained_names(engine)
    if list((folder / tag).glob("*optim_states.pt")):  # saved under ZeRO
        universal = folder / f"{tag}_universal"
        ensure_universal(folder / tag, universal, convert)
        weights, moments, step = read_universal(universal, names)
    else:
        weights, moments, step = read_stage0(folder / tag / MODEL_STATES, names)
    write_whole(engine, names, weights, moments, step)
    scheduler = engine.lr_scheduler
    if scheduler is not None:  # DeepSpeed restored the scheduler, not the rate in the optimizer's groups
        for group, lr in zip(scheduler.optimizer.param_groups, scheduler.get_last_lr(), strict=True):
            group["lr"] = lr  # the next step's rate, as the scheduler set it after the last saved step


def read_stage0(
    path: Path, names: list[str]
) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, torch.Tensor]], float]:
    """Whole fp32 weights, Adam moments and step of a stage-0 engine checkpoint (DeepSpeed's model-states
    file: the module and the torch optimizer's state dict, its parameters numbered in `names`' order)."""
    saved = torch.load(path, map_location="cpu", weights_only=True, mmap=True)  # pages read on use
    optimizer = saved["optimizer"]
    order = [i for group in optimizer["param_groups"] for i in group["params"]]
    if len(order) != len(names):
        raise ValueError(f"{path}: its optimizer trains {len(order)} parameters, this model {len(names)}")
    weights = {n: saved["module"][n].float() for n in names}
    moments, steps = {}, set()
    for index, name in zip(order, names):
        state = optimizer["state"].get(index, {})
        moments[name] = {m: state[m] if m in state else torch.zeros_like(weights[name]) for m in MOMENTS}
        steps.add(float(state.get("step", 0.0)))
    if len(steps) > 1:
        raise ValueError(f"{path}: Adam's step differs between parameters ({sorted(steps)})")
    return weights, moments, steps.pop() if steps else 0.0


def read_universal(
    folder: Path, names: list[str]
) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, torch.Tensor]], float]:
    """Whole fp32 weights, Adam moments and step from DeepSpeed's universal checkpoint `folder`."""

    def tensor(name: str, state: str) -> torch.Tensor:
        path = folder / "zero" / name / f"{state}.pt"
        if not path.is_file():
            raise FileNotFoundError(f"{path}: missing from the universal checkpoint (parameter {name})")
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)["param"]

    weights = {n: tensor(n, "fp32").float() for n in names}
    moments = {n: {m: tensor(n, m).float() for m in MOMENTS} for n in names}
    step_file = folder / "zero" / names[0] / "step.pt"
    step = torch.load(step_file, map_location="cpu", weights_only=True) if step_file.is_file() else 0.0
    return weights, moments, float(step)


@torch.no_grad()
def write_whole(
    engine: Any,
    names: list[str],
    weights: dict[str, torch.Tensor],
    moments: dict[str, dict[str, torch.Tensor]],
    step: float,
) -> None:
    """Put whole fp32 weights, Adam moments and Adam's step into `engine` (stage 0 or ZeRO); every rank."""
    params = dict(engine.module.named_parameters())
    for n in names:
        if tuple(weights[n].shape) != tuple(params[n].shape):
            raise ValueError(
                f"{n}: the checkpoint's shape {tuple(weights[n].shape)} is not the model's {tuple(params[n].shape)}"
            )
    masters = zero_masters(engine)
    if not masters:  # stage 0: the module's parameters are the masters; Adam's state is per parameter
        optimizer = engine.optimizer
        for n in names:
            params[n].copy_(weights[n])
        state = optimizer.state_dict()
        state["state"] = {
            i: {"step": torch.tensor(step), **{m: moments[n][m] for m in MOMENTS}}
            for i, n in enumerate(names)
        }
        optimizer.load_state_dict(state)
        return
    fill_partitions(engine, weights, masters)
    inner = engine.optimizer.optimizer  # the torch AdamW over this rank's flat fp32 partitions
    for m in MOMENTS:
        for master in masters:
            state = inner.state[master]
            state[m] = torch.zeros_like(master) if m not in state else state[m].zero_()  # padding included
        fill_partitions(engine, {n: moments[n][m] for n in names}, [inner.state[p][m] for p in masters])
    for master in masters:  # where torch's AdamW keeps `step`: on the device when fused or capturable
        on_device = inner.defaults.get("fused") or inner.defaults.get("capturable")
        inner.state[master]["step"] = torch.tensor(
            step, dtype=torch.float32, device=master.device if on_device else "cpu"
        )
    engine.optimizer.update_lp_params()  # the masters into the module (a collective)
