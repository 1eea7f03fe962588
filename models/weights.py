"""Pretrained weights the project cannot ship: a local file, else the library's download, else a named error.

Three frozen networks need pretrained weights (DESIGN.md, "Weights the project cannot ship"): the VA-VAE
foundation model (DINOv2 or MAE through timm, §1.2), LPIPS's VGG16 trunk (torchvision) and LPIPS's learned
linear heads (§1.3). Compute nodes are often offline, so each can be given as a local file. When no file is
given, the library's own download is tried; when that fails too, :class:`PretrainedWeightsError` says which
network, which file, which config key to set and how to produce the file on a machine that is online.

Nothing here touches the network at import time. On an online machine,
``python -m models.weights {dinov2,mae,vgg16,lpips_heads} OUT`` writes the file a config key expects.

Every weights file, given or downloaded, is read by :func:`read_state_dict`: ``.safetensors``, or a torch
pickle through ``torch.load(weights_only=True)``, whose unpickler builds only tensors and plain containers.
A file that needs full unpickling is refused (:class:`UnsafeWeightsFileError`), because full unpickling
runs whatever code the file holds, and a ``.pth`` from a mirror or a shared folder can hold any. Libraries
that would unpickle fully on our behalf are handed tensors we read instead: torch-fidelity's Inception
(``eval/inception.py``), timm's file loader, and the torch-hub downloads of torch-fidelity and
torchvision (:func:`hub_state_dict`), whose ``load_state_dict_from_url`` defaults to ``weights_only=False``.
"""

from __future__ import annotations

import argparse
import importlib.util
import pickle
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import torch

T = TypeVar("T")


class PretrainedWeightsError(RuntimeError):
    """Pretrained weights are neither in a local file nor downloadable; the message says how to fix it."""


class UnsafeWeightsFileError(ValueError):
    """A weights file that only full unpickling could load (which would run any code it holds): not loaded."""


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
    :class:`PretrainedWeightsError` that chains the original. A file ``load_file`` or ``download`` refuses
    to unpickle (:class:`UnsafeWeightsFileError`) becomes one that names the file, the key and the export
    command; torch's message is not chained, because it suggests ``weights_only=False``.
    """
    if path:
        p = Path(path).expanduser()
        if not p.is_file():
            raise PretrainedWeightsError(
                f"{spec.network}: weights file {str(p)!r} (set by `{spec.config_key}`) does not exist. "
                + _produce_hint(spec)
            )
        try:
            return load_file(p)
        except UnsafeWeightsFileError as err:
            raise PretrainedWeightsError(
                f"{spec.network}: the weights file set by `{spec.config_key}` was refused. {err} "
                + _produce_hint(spec)
            ) from None
    if not allow_download:
        raise PretrainedWeightsError(
            f"{spec.network}: no local weights file was given and downloads are disabled. "
            + _produce_hint(spec)
        )
    try:
        return download()
    except PretrainedWeightsError:
        raise  # already names the network and the file (e.g. a downloaded file of the wrong network)
    except UnsafeWeightsFileError as err:
        raise PretrainedWeightsError(
            f"{spec.network}: no local weights file was given, and the library's cached download was refused. "
            f"{err} Delete that file to download it again. " + _produce_hint(spec)
        ) from None
    except Exception as err:  # offline failures come as many types (URLError, OSError, hub errors)
        raise PretrainedWeightsError(
            f"{spec.network}: no local weights file was given and the download failed "
            f"({type(err).__name__}: {err}). " + _produce_hint(spec)
        ) from err


def _refusal_reason(err: Exception) -> str:
    """The one useful line of torch's weights_only refusal (the rest advises ``weights_only=False``)."""
    text = str(err)
    found = re.search(r"Unsupported global: GLOBAL (\S+)", text)
    if found:
        return f"its pickle calls {found[1]}, which torch.load(weights_only=True) does not allow"
    found = re.search(r"WeightsUnpickler error: (.+)", text)
    return found[1].strip() if found else text.splitlines()[0] if text else type(err).__name__


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a state_dict from ``.safetensors`` or a torch pickle (``weights_only``), unwrapping ``state_dict``.

    Tensors are loaded on the CPU. A pickle that ``torch.load(weights_only=True)`` refuses (it names a
    function or class to call, which is how a pickle runs code) raises :class:`UnsafeWeightsFileError`;
    nothing in it has run.
    """
    p = Path(path)
    if p.suffix == ".safetensors":
        from safetensors.torch import load_file

        return dict(load_file(str(p), device="cpu"))
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        # `from None`: torch's own message suggests retrying with weights_only=False, which is the attack.
        raise UnsafeWeightsFileError(
            f"{p} is not a plain tensor file: {_refusal_reason(err)}. Loading it would need full unpickling, "
            "which runs any code the file holds, so ldit does not load it. Use a plain state_dict "
            "(torch.save(model.state_dict(), path)) or a .safetensors file, from a source you trust."
        ) from None
    if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping):
        raise ValueError(f"{p} holds a {type(obj).__name__}, not a state_dict")
    return dict(obj)


def hub_state_dict(url: str, progress: bool = False) -> dict[str, torch.Tensor]:
    """``torch.hub.load_state_dict_from_url(url)``, but read by :func:`read_state_dict`.

    torch-fidelity and torchvision fetch their weights with ``load_state_dict_from_url``, which unpickles
    fully (``weights_only=False``) whatever file sits in its cache, ``$TORCH_HOME/hub/checkpoints/`` — the
    folder where users put files for offline nodes. This uses the same cache file and the same download
    (``torch.hub.download_url_to_file``, written to a temporary file and renamed), so existing caches are
    reused, and reads the file without unpickling it fully. Like the libraries, it checks no hash.
    """
    path = Path(torch.hub.get_dir()) / "checkpoints" / url.rsplit("/", 1)[-1]
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.hub.download_url_to_file(url, str(path), progress=progress)
    return read_state_dict(path)


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


def save_state_dict(state_dict: Mapping[str, torch.Tensor], out: str | Path) -> Path:
    """Write tensors as ``.safetensors`` (by suffix) or a plain ``torch.save`` dict; both load weights_only."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous().cpu() for k, v in state_dict.items()}
    if out.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(tensors, str(out))
    else:
        torch.save(tensors, out)
    return out


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
        save_state_dict(model.state_dict(), out)
    elif network == "vgg16":
        from torchvision.models import VGG16_Weights

        sd = hub_state_dict(VGG16_Weights.IMAGENET1K_V1.url, progress=True)
        save_state_dict({k: v for k, v in sd.items() if k.startswith("features.")}, out)
    elif network == "lpips_heads":
        save_state_dict(read_state_dict(lpips_package_heads_file()), out)
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
