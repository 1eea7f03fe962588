"""Exports: the EMA weights of a run under the reference's key names (DESIGN.md "Run directory").

`<run>/export/step-N/` holds `ema.safetensors`, `model.json` (what model it is) and `config.yaml` (the
run's resolved config); `<run>/export/latest` links to the newest. Eval jobs, latent extraction and
`init_from` all take an export folder.
"""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf
from torch import nn

from models.export import _ARGS, _args_from_json, save_export
from models.lightningdit import LightningDiT
from models.vavae import AutoencoderKL
from models.weights import read_state_dict
from trainer.checkpoint import EMA_FILE, Checkpointer, problems, step_name
from trainer.config import ExportConfig


def export_weights(
    run_dir: Path, step: int, model: nn.Module, state_dict: dict[str, torch.Tensor], cfg: Any
) -> Path:
    """Write export/step-N (strict key check against `model`) and point export/latest at it."""
    model.load_state_dict(state_dict, strict=True)
    folder = save_export(Path(run_dir) / "export" / step_name(step), model)
    (folder / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.structured(cfg)))
    link = folder.parent / "latest"
    tmp = folder.parent / "latest.tmp"
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    tmp.symlink_to(folder.name)
    os.replace(tmp, link)
    return folder


def run(cfg: ExportConfig) -> None:
    """`ldit export`: the EMA of a checkpoint (the latest complete one, or `step`) as an export folder."""
    import torch.distributed as dist

    if dist.get_rank() == 0:
        ckpts = Checkpointer(cfg.run.dir)
        if cfg.step >= 0:
            path = ckpts.root / step_name(cfg.step)
            bad = problems(path)
            if bad:
                raise FileNotFoundError(f"checkpoint {path} is not usable: {'; '.join(bad)}")
            import json

            meta = json.loads((path / "meta.json").read_text())
        else:
            ck = ckpts.latest()
            if ck is None:
                raise FileNotFoundError(f"{cfg.run.dir} has no complete checkpoint to export")
            path, meta = ck.path, ck.meta
        kind = "lightningdit" if meta["kind"] == "dit" else "vavae"
        args = replace(_args_from_json(_ARGS[kind], meta["model_args"]), grad_checkpointing=False)
        model = LightningDiT(args) if kind == "lightningdit" else AutoencoderKL(args)
        folder = export_weights(
            cfg.run.dir, meta["step"], model, read_state_dict(path / EMA_FILE), meta["config"]
        )
        print(f"exported {path.name} of {cfg.run.name} to {folder}", flush=True)
    dist.barrier()
