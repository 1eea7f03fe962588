"""Exported weights: a folder that says what it holds, so other jobs can load it without the run's config.

An export folder (DESIGN.md "Run directory": `export/step-N/`) holds
- `ema.safetensors`: the weights under the reference's state_dict keys (§8.1, §8.2), so the released
  checkpoints and ours load into each other's models with `strict=True`;
- `model.json`: {"kind": "lightningdit" | "vavae", "args": the model's constructor arguments}.

The reference's own checkpoint files (`.pt`, `.ckpt`, `.safetensors`) load too: the VA-VAE as f16d32
(§1.1), the LightningDiT from its `ema` entry with the architecture read off the tensor shapes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import typing
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from models.lightningdit import LightningDiT, LightningDiTArgs
from models.vavae import AutoencoderArgs, AutoencoderKL, autoencoder_args, load_reference_checkpoint
from models.weights import read_state_dict

WEIGHTS = "ema.safetensors"
META = "model.json"
Kind = Literal["lightningdit", "vavae"]
_ARGS: dict[str, type] = {"lightningdit": LightningDiTArgs, "vavae": AutoencoderArgs}


def _kind(model: nn.Module) -> Kind:
    if isinstance(model, LightningDiT):
        return "lightningdit"
    if isinstance(model, AutoencoderKL):
        return "vavae"
    raise TypeError(f"cannot export a {type(model).__name__}")


def save_export(
    folder: str | Path, model: nn.Module, state_dict: dict[str, torch.Tensor] | None = None
) -> Path:
    """Write `state_dict` (default: the model's) and the model's arguments to `folder`."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    sd = model.state_dict() if state_dict is None else state_dict
    save_file({k: v.detach().to("cpu").contiguous() for k, v in sd.items()}, str(folder / WEIGHTS))
    meta = {"kind": _kind(model), "args": dataclasses.asdict(model.args)}
    (folder / META).write_text(json.dumps(meta, indent=1))
    return folder


def _args_from_json(cls: type, data: dict[str, Any]) -> Any:
    hints = typing.get_type_hints(cls)
    fixed = {k: tuple(v) if typing.get_origin(hints[k]) is tuple else v for k, v in data.items()}
    return cls(**fixed)


def read_meta(folder: str | Path) -> tuple[Kind, Any]:
    """(kind, model arguments) of an export folder."""
    path = Path(folder) / META
    if not path.is_file():
        raise FileNotFoundError(f"{folder} is not an export folder: it has no {META}")
    meta = json.loads(path.read_text())
    return meta["kind"], _args_from_json(_ARGS[meta["kind"]], meta["args"])


def load_vavae(path: str | Path) -> AutoencoderKL:
    """A VA-VAE from an export folder, or from a reference checkpoint file (f16d32, §1.1)."""
    path = Path(path)
    if path.is_dir():
        kind, args = read_meta(path)
        if kind != "vavae":
            raise ValueError(f"{path} holds a {kind}, not a VA-VAE")
        model = AutoencoderKL(args)
        model.load_state_dict(read_state_dict(path / WEIGHTS), strict=True)
        return model
    if not path.is_file():
        raise FileNotFoundError(
            f"VA-VAE weights {path} do not exist (an export folder or a .pt/.safetensors file)"
        )
    model = AutoencoderKL(autoencoder_args("f16d32"))
    load_reference_checkpoint(path, model)
    return model


def load_lightningdit(path: str | Path) -> LightningDiT:
    """A LightningDiT from an export folder (strict key match)."""
    kind, args = read_meta(path)
    if kind != "lightningdit":
        raise ValueError(f"{path} holds a {kind}, not a LightningDiT")
    model = LightningDiT(args)
    model.load_state_dict(read_state_dict(Path(path) / WEIGHTS), strict=True)
    return model


def weights_sha256(path: str | Path) -> str:
    """sha256 of the weights file of an export folder, or of a checkpoint file (recorded by consumers)."""
    path = Path(path)
    f = path / WEIGHTS if path.is_dir() else path
    h = hashlib.sha256()
    with open(f, "rb") as fh:
        while block := fh.read(1 << 22):
            h.update(block)
    return h.hexdigest()
