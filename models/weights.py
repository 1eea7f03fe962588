"""Pretrained weights the project cannot ship: a local file, else the library's download, else a named error.

Three frozen networks need pretrained weights (DESIGN.md, "Weights the project cannot ship"): the VA-VAE
foundation model (DINOv2 or MAE through timm, §1.2), LPIPS's VGG16 trunk (torchvision) and LPIPS's learned
linear heads (§1.3). Compute nodes are often offline, so each can be given as a local file. When no file is
given, the library's own download is tried; when that fails too, :class:`PretrainedWeightsError` says which
network, which file, which config key to set and how to produce the file on a machine that is online.

Nothing here touches the network at import time. On an online machine,
``python -m models.weights {dinov2,mae,vgg16,lpips_heads} OUT`` writes the file a config key expects.
"""

from __future__ import annotations

import argparse
import importlib.util
import pickle
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import torch

T = TypeVar("T")


class PretrainedWeightsError(RuntimeError):
    """Pretrained weights are neither in a local file nor downloadable; the message says how to fix it."""


@dataclass(frozen=True)
class WeightsSpec:
    """What a user needs to know to provide one network's weights offline."""

    network: str
    """Human name of the network, e.g. "DINOv2 ViT-L/14 (timm vit_large_patch14_dinov2.lvd142m)"."""
    config_key: str
    """The argument / config key that takes the local file, e.g. "vavae.lpips_weights"."""
    expected_file: str
    """What the file is: its usual name and format."""
    export_command: str
    """Shell command that writes the file on a machine with internet access."""


def _produce_hint(spec: WeightsSpec) -> str:
    return (
        f"Set `{spec.config_key}` to a local copy of {spec.expected_file}. To produce it on a machine with "
        f"internet access, run\n    {spec.export_command}\nand copy the file to this machine."
    )


def load_pretrained(
    spec: WeightsSpec,
    path: str | Path | None,
    load_file: Callable[[Path], T],
    download: Callable[[], T],
    allow_download: bool = True,
) -> T:
    """Return ``load_file(path)`` if a path is given, else ``download()``; raise a named error otherwise.

    A given path that does not exist is an error (it is never silently replaced by a download). Any
    exception from ``download`` (offline DNS failure, hub error, missing optional package) becomes a
    :class:`PretrainedWeightsError` that chains the original.
    """
    if path:
        p = Path(path).expanduser()
        if not p.is_file():
            raise PretrainedWeightsError(
                f"{spec.network}: weights file {str(p)!r} (set by `{spec.config_key}`) does not exist. "
                + _produce_hint(spec)
            )
        return load_file(p)
    if not allow_download:
        raise PretrainedWeightsError(
            f"{spec.network}: no local weights file was given and downloads are disabled. "
            + _produce_hint(spec)
        )
    try:
        return download()
    except Exception as err:  # offline failures come as many types (URLError, OSError, hub errors)
        raise PretrainedWeightsError(
            f"{spec.network}: no local weights file was given and the download failed "
            f"({type(err).__name__}: {err}). " + _produce_hint(spec)
        ) from err


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a state_dict from ``.safetensors`` or a torch pickle (``weights_only``), unwrapping ``state_dict``.

    Tensors are loaded on the CPU.
    """
    p = Path(path)
    if p.suffix == ".safetensors":
        from safetensors.torch import load_file

        return dict(load_file(str(p), device="cpu"))
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise ValueError(
            f"{p} is not a plain tensor file (torch.load weights_only=True refused it: {err}). "
            "Save a plain state_dict (torch.save(model.state_dict(), path)) or a .safetensors file."
        ) from err
    if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping):
        raise ValueError(f"{p} holds a {type(obj).__name__}, not a state_dict")
    return dict(obj)


def lpips_package_heads_file() -> Path:
    """Path of the LPIPS v0.1 VGG linear heads shipped inside the ``lpips`` PyPI package (no download).

    The file ``lpips/weights/v0.1/vgg.pth`` is byte-identical to taming-transformers' ``vgg.pth`` used by
    the reference (md5 d507d7349b931f0638a25a48a722f98a, §1.3). The package is located without importing it.
    """
    spec = importlib.util.find_spec("lpips")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("the `lpips` package is not installed (pip install lpips)")
    path = Path(next(iter(spec.submodule_search_locations))) / "weights" / "v0.1" / "vgg.pth"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the installed lpips package")
    return path


def _save(state_dict: Mapping[str, torch.Tensor], out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous().cpu() for k, v in state_dict.items()}
    if out.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(tensors, str(out))
    else:
        torch.save(tensors, out)


def export_weights(network: str, out: str | Path, timm_name: str | None = None) -> Path:
    """Download one network's weights through its library and write the file its config key expects.

    ``network`` is ``dinov2`` / ``mae`` (timm state_dict), ``vgg16`` (torchvision VGG16 ``features.*``) or
    ``lpips_heads`` (the LPIPS v0.1 VGG heads). Needs internet access except for ``lpips_heads``.
    """
    out = Path(out)
    if network in ("dinov2", "mae"):
        import timm

        from models.foundation import DEFAULT_TIMM_NAMES

        model = timm.create_model(timm_name or DEFAULT_TIMM_NAMES[network], pretrained=True)
        _save(model.state_dict(), out)
    elif network == "vgg16":
        from torchvision.models import VGG16_Weights

        sd = VGG16_Weights.IMAGENET1K_V1.get_state_dict(progress=True)
        _save({k: v for k, v in sd.items() if k.startswith("features.")}, out)
    elif network == "lpips_heads":
        _save(read_state_dict(lpips_package_heads_file()), out)
    else:
        raise ValueError(f"unknown network {network!r}; choose dinov2, mae, vgg16 or lpips_heads")
    return out


def main(argv: list[str] | None = None) -> None:
    """CLI: ``python -m models.weights NETWORK OUT [--timm-name NAME]``."""
    parser = argparse.ArgumentParser(description="Write a pretrained network's weights to a local file.")
    parser.add_argument("network", choices=["dinov2", "mae", "vgg16", "lpips_heads"])
    parser.add_argument("out", help="output file (.pth or .safetensors)")
    parser.add_argument("--timm-name", default=None, help="timm model name (dinov2/mae only)")
    args = parser.parse_args(argv)
    print(export_weights(args.network, args.out, args.timm_name))


if __name__ == "__main__":
    main()
