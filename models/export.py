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
import math
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
    """A LightningDiT from an export folder, or from a reference checkpoint file (strict key match).

    A reference file (`.pt` of the reference's train.py, §8.1: `{'model', 'ema', 'opt', 'config'}`, or a
    bare state_dict, or `.safetensors`) is read with `weights_only=True`; its `ema` entry is used when
    present, as the reference's inference does, and the architecture is read off the tensor shapes.
    """
    path = Path(path)
    if path.is_dir():
        kind, args = read_meta(path)
        if kind != "lightningdit":
            raise ValueError(f"{path} holds a {kind}, not a LightningDiT")
        sd = read_state_dict(path / WEIGHTS)
    elif path.is_file():
        sd = reference_dit_state_dict(path)
        args = lightningdit_args_from_state_dict(sd)
    else:
        raise FileNotFoundError(
            f"LightningDiT weights {path} do not exist (an export folder or a reference .pt/.safetensors file)"
        )
    model = LightningDiT(args)
    model.load_state_dict(sd, strict=True)
    return model


def reference_dit_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The LightningDiT weights of a reference checkpoint file: its `ema` entry, else the file's own keys.

    The reference's `model` entry carries DDP's `module.` prefix under multi-GPU training (§8.1); we do
    not strip prefixes (STYLE.md 8), so a file without `ema` must hold the plain keys.
    """
    path = Path(path)
    obj = read_state_dict(
        path
    )  # safetensors, or a pickle of plain tensors (a file that runs code is refused)
    if isinstance(obj, dict) and isinstance(obj.get("ema"), dict):
        return dict(obj["ema"])
    if isinstance(obj, dict) and "x_embedder.proj.weight" in obj:
        return dict(obj)
    entries = sorted(obj) if isinstance(obj, dict) else type(obj).__name__
    raise ValueError(
        f"{path} holds no LightningDiT weights: expected an 'ema' entry (reference train.py) or the keys of "
        f"§8.1 (x_embedder.proj.weight, …), found {entries}"
    )


def lightningdit_args_from_state_dict(sd: dict[str, torch.Tensor]) -> LightningDiTArgs:
    """The architecture of a LightningDiT state_dict, read off its tensor shapes (§8.1).

    Width, channels and patch from `x_embedder.proj.weight` (D, C, p, p); depth from the block count;
    classes from the label table (its last row is the null class); tokens from `pos_embed`; head_dim from
    the RoPE table (T, head_dim) or the q-norm weight; the MLP ratio from the SwiGLU width int(2/3·int(r·D)).
    """
    d, c, p, _ = sd["x_embedder.proj.weight"].shape
    depth = len({k.split(".")[1] for k in sd if k.startswith("blocks.")})
    grid = math.isqrt(sd["pos_embed"].shape[1])
    use_rope = "feat_rope.freqs_cos" in sd
    use_qknorm = "blocks.0.attn.q_norm.weight" in sd
    if use_rope:
        head_dim = sd["feat_rope.freqs_cos"].shape[1]
    elif use_qknorm:
        head_dim = sd["blocks.0.attn.q_norm.weight"].shape[0]
    else:
        raise ValueError(
            "cannot read the head count off a state_dict without RoPE tables or q/k-norm weights"
        )
    use_swiglu = "blocks.0.mlp.w12.weight" in sd
    hidden = sd["blocks.0.mlp.w3.weight" if use_swiglu else "blocks.0.mlp.fc1.weight"].shape[
        1 if use_swiglu else 0
    ]
    ratios = [r / 4 for r in range(1, 33) if _ffn_width(d, r / 4, use_swiglu) == hidden]
    if not ratios:
        raise ValueError(f"no MLP ratio gives an FFN width of {hidden} at width {d}")
    table = sd["y_embedder.embedding_table.weight"].shape[0]
    out = sd["final_layer.linear.weight"].shape[0] // (p * p)
    return LightningDiTArgs(
        input_size=grid * p, patch_size=p, in_channels=c, hidden_size=d, depth=depth,
        num_heads=d // head_dim, mlp_ratio=ratios[0], num_classes=table - 1, class_dropout_prob=0.1,
        use_qknorm=use_qknorm, use_swiglu=use_swiglu, use_rope=use_rope,
        use_rmsnorm="blocks.0.norm1.weight" in sd, learn_sigma=out == 2 * c,
    )  # fmt: skip


def _ffn_width(d: int, ratio: float, swiglu: bool) -> int:
    hidden = int(d * ratio)
    return int(2 / 3 * hidden) if swiglu else hidden


def weights_sha256(path: str | Path) -> str:
    """sha256 of the weights file of an export folder, or of a checkpoint file (recorded by consumers)."""
    path = Path(path)
    f = path / WEIGHTS if path.is_dir() else path
    h = hashlib.sha256()
    with open(f, "rb") as fh:
        while block := fh.read(1 << 22):
            h.update(block)
    return h.hexdigest()
