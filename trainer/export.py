"""Exports: the EMA weights of a run under the reference's key names (DESIGN.md "Run directory").

`<run>/export/step-N/` holds `ema.safetensors`, `model.json` (what model it is) and `config.yaml` (the
run's resolved config); a VA-VAE export also holds `training_extras.safetensors`, the weights a next
stage needs besides the autoencoder (the VF projection and the PatchGAN, reference §1.4 "each
initialised from the previous stage"). `<run>/export/latest` links to the newest. Eval jobs, latent
extraction and `init_from` all take an export folder.

One function, :func:`export_weights`, writes every export folder: the trainer's own at the end of a run,
and `ldit export` (:func:`run`) from any complete checkpoint, which reads the training extras from the
DeepSpeed files of the checkpoint's two engines.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf
from torch import nn

from models.export import _ARGS, META, _args_from_json, save_export
from models.lightningdit import LightningDiT
from models.vavae import VF_PROJECTION_KEY, AutoencoderKL
from models.weights import read_state_dict
from trainer.checkpoint import EMA_FILE, Checkpointer, problems, step_name
from trainer.config import ExportConfig

TRAINING_EXTRAS = "training_extras.safetensors"
"""File of a VA-VAE export folder with the trained weights that are not the autoencoder (VF projection, D)."""
DISC_PREFIX = "loss.discriminator."
"""Key prefix of the discriminator in the reference's Lightning training checkpoint (§8.2)."""
EXTRA_PARTS = ("linear_proj", "discriminator")
"""The parts `training_extras.safetensors` may hold: `linear_proj.weight` and `loss.discriminator.*`."""
MODEL_STATES = "mp_rank_00_model_states.pt"
"""DeepSpeed's file of an engine's module weights (and BatchNorm statistics) in a checkpoint tag folder."""


class InitFromError(ValueError):
    """A VA-VAE stage's `init_from` lacks weights the stage uses (the VF projection or the discriminator).

    The message names the file looked in, the missing part, the setting that makes the stage use it,
    and which export to give instead.
    """


def training_extras(
    ae_module: dict[str, torch.Tensor], d_module: dict[str, torch.Tensor], parts: set[str] | tuple[str, ...]
) -> dict[str, torch.Tensor]:
    """The training extras under the reference's Lightning keys (§8.2), fp32, from the state_dicts of the
    two engines' modules (trainer/vavae_objectives.py's `AutoencoderObjective`: `linear_proj.weight`;
    `DiscriminatorObjective`: `discriminator.*`, weights and BatchNorm statistics).

    Only the `parts` that hold trained or loaded weights are written: a projection or a discriminator
    that never left its random initialisation is left out, so no later stage mistakes it for trained.
    """
    out = {}
    if "linear_proj" in parts and "linear_proj.weight" in ae_module:
        out[VF_PROJECTION_KEY] = ae_module["linear_proj.weight"]
    if "discriminator" in parts:
        out |= {
            DISC_PREFIX + k.removeprefix("discriminator."): v
            for k, v in d_module.items()
            if k.startswith("discriminator.")
        }
    return {k: v.detach().float().cpu().contiguous() for k, v in out.items()}


def export_weights(
    run_dir: Path,
    step: int,
    model: nn.Module,
    state_dict: dict[str, torch.Tensor],
    cfg: Any,
    extras: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write export/step-N (strict key check against `model`) and point export/latest at it.

    `extras` (a VA-VAE's training extras, possibly empty) go to `training_extras.safetensors`; None
    (a LightningDiT) writes no such file. The folder is written as `export/.step-N.partial` and renamed, so
    `export/step-N` exists only whole: an eval follower (slurm/follow.py) polling for it never reads a
    half-written export. `latest` moves only after that.
    """
    from safetensors.torch import save_file

    model.load_state_dict(state_dict, strict=True, assign=True)  # the tensors themselves: no second copy
    folder = Path(run_dir) / "export" / step_name(step)
    partial = folder.with_name(f".{folder.name}.partial")
    if partial.exists():  # left by a writer that died
        shutil.rmtree(partial)
    save_export(partial, model)
    (partial / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.structured(cfg)))
    if extras is not None:
        save_file(extras, str(partial / TRAINING_EXTRAS))
    if folder.exists():  # `ldit export` writing a step again
        shutil.rmtree(folder)
    os.rename(partial, folder)
    link = folder.parent / "latest"
    tmp = folder.parent / "latest.tmp"
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    tmp.symlink_to(folder.name)
    os.replace(tmp, link)
    return folder


def exported(run_dir: Path, step: int) -> bool:
    """Whether `export/step-N` is written (whole: :func:`export_weights` renames it into place)."""
    return (Path(run_dir) / "export" / step_name(step) / META).is_file()


def checkpoint_extras(path: Path, meta: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The training extras of the VA-VAE checkpoint folder `path`, read from its two engines' module
    weights; `meta["extras"]` names the parts that were trained or loaded (a checkpoint written before
    it was recorded: both)."""
    modules = {}
    for engine in ("autoencoder", "discriminator"):
        states = torch.load(path / engine / MODEL_STATES, map_location="cpu", weights_only=True)
        modules[engine] = states["module"]
    return training_extras(modules["autoencoder"], modules["discriminator"], meta.get("extras", EXTRA_PARTS))


def run(cfg: ExportConfig) -> None:
    """`ldit export`: the EMA of a checkpoint (the latest complete one, or `step`) as an export folder;
    for a VA-VAE also its VF projection and discriminator, as the trainer's own export writes them."""
    import torch.distributed as dist

    if dist.get_rank() == 0:
        ckpts = Checkpointer(cfg.run.dir)
        if cfg.step >= 0:
            path = ckpts.root / step_name(cfg.step)
            bad = problems(path)
            if bad:
                raise FileNotFoundError(f"checkpoint {path} is not usable: {'; '.join(bad)}")
            meta = json.loads((path / "meta.json").read_text())
        else:
            ck = ckpts.latest()
            if ck is None:
                raise FileNotFoundError(f"{cfg.run.dir} has no complete checkpoint to export")
            path, meta = ck.path, ck.meta
        kind = "lightningdit" if meta["kind"] == "dit" else "vavae"
        args = replace(_args_from_json(_ARGS[kind], meta["model_args"]), grad_checkpointing=False)
        model = LightningDiT(args) if kind == "lightningdit" else AutoencoderKL(args)
        extras = checkpoint_extras(path, meta) if kind == "vavae" else None
        folder = export_weights(
            cfg.run.dir, meta["step"], model, read_state_dict(path / EMA_FILE), meta["config"], extras
        )
        print(f"exported {path.name} of {cfg.run.name} to {folder}", flush=True)
    dist.barrier()
