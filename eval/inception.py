"""Inception features for FID, sFID, IS and precision/recall, from torch-fidelity's ``inception-v3-compat``.

The network is torch-fidelity's own ``FeatureExtractorInceptionV3`` (STYLE 14: the TF 2015-12-05 graph the
ADM suite uses, ported with a TF1-exact bilinear resize to 299 and (x − 128)/128 input scaling; ecosystem §4.1).
One forward gives three features per uint8 image (B, 3, H, W):

- ``pool``: the 2048-d ``pool_3`` features (torch-fidelity ``"2048"``), for FID and precision/recall.
- ``logits_unbiased``: the 1008-way logits without the fc bias (torch-fidelity ``"logits_unbiased"``, its
  default for IS; the ADM suite's softmax graph likewise multiplies pool_3 by the weights only).
- ``spatial``: the sFID features of the ADM suite, which takes TF tensor ``mixed_6/conv:0``, keeps its first 7
  channels and flattens (17·17·7 = 2023). torch-fidelity exposes no spatial feature (its ``"768"`` is the
  *pooled* Mixed_6e output), but its weight converter (``util_convert_inception_weights.py``) maps the TF
  scope ``mixed_6/conv`` to ``Mixed_6d.branch1x1`` (TF ``mixed``…``mixed_10`` = torch ``Mixed_5b``…``Mixed_7c``),
  so a forward hook on that module gives the same layer exactly: its output is conv → batch-norm → ReLU,
  which is the op the TF graph names ``mixed_6/conv`` (its ``conv2d_params`` and ``batchnorm`` are children).
  We flatten in TF's NHWC order, (h, w, c), so our ``mu_s``/``sigma_s`` index like those of
  ``VIRTUAL_imagenet256_labeled.npz``.

Weights (DESIGN.md "Weights the project cannot ship"): the ``inception_weights`` config key takes a local file
(a plain torch state_dict, as torch-fidelity publishes it, or ``.safetensors``); otherwise torch-fidelity's file is
downloaded to, or found in, ``$TORCH_HOME/hub/checkpoints/``; offline with neither,
:class:`models.weights.PretrainedWeightsError` names the network, the file, the key and how to fetch it
(``python -m eval.inception OUT`` on an online machine). Nothing is fetched at import time.

Untrusted files: torch-fidelity's constructor reads ``feature_extractor_weights_path`` with
``torch.load(weights_only=False)``, and its download with torch.hub's ``load_state_dict_from_url``, which also
unpickles fully; either runs any code a pickle holds. So we never give torch-fidelity a file: we read it with
:func:`models.weights.read_state_dict` (``weights_only=True`` or safetensors; a file that needs more is refused
with a :class:`~models.weights.PretrainedWeightsError`), check that it holds only tensors, and hand
torch-fidelity an in-memory ``torch.save`` of those tensors, which its constructor loads with ``strict=True``.
The only pickle torch-fidelity unpickles is the one we have just written from plain tensors.
"""

from __future__ import annotations

import argparse
import io
from collections.abc import Iterable, Mapping
from dataclasses import replace
from pathlib import Path
from unittest import mock

import torch
from torch import nn
from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3, FeatureExtractorInceptionV3

from models.device import device as current_device
from models.weights import (
    PretrainedWeightsError,
    WeightsSpec,
    hub_state_dict,
    load_pretrained,
    read_state_dict,
    save_state_dict,
)

INCEPTION_NAME = "inception-v3-compat"
"""torch-fidelity's registry name of the FID Inception."""
WEIGHTS_FILE = URL_INCEPTION_V3.rsplit("/", 1)[-1]
"""``weights-inception-2015-12-05-6726825d.pth``: torch-fidelity's converted TF Inception state_dict."""
SPATIAL_CHANNELS = 7
"""Channels of ``mixed_6/conv`` kept for sFID (ADM ``evaluator.py``: ``spatial[..., :7]``)."""
FEATURE_DIMS = {"pool": 2048, "logits_unbiased": 1008, "spatial": 17 * 17 * SPATIAL_CHANNELS}
"""Width of each feature :class:`InceptionFeatures` returns."""

INCEPTION_SPEC = WeightsSpec(
    network=f"FID Inception-v3 (torch-fidelity {INCEPTION_NAME}, TF inception-2015-12-05)",
    config_key="inception_weights",
    expected_file=(
        f"{WEIGHTS_FILE} (about 95 MB, from {URL_INCEPTION_V3}; without this key it is also found in "
        "$TORCH_HOME/hub/checkpoints/, torch-fidelity's download cache)"
    ),
    export_command=f"python -m eval.inception {WEIGHTS_FILE}",
)


def torch_fidelity_extractor(
    state_dict: Mapping[str, torch.Tensor], source: str
) -> FeatureExtractorInceptionV3:
    """torch-fidelity's extractor (pool and unbiased logits) holding ``state_dict``, loaded strictly.

    ``state_dict`` comes from :func:`models.weights.read_state_dict`; ``source`` (its file) names it in errors.
    torch-fidelity always loads weights in its constructor, from a path or file object with
    ``torch.load(weights_only=False)``: we give it a buffer holding ``torch.save`` of these tensors.
    """
    not_tensors = sorted(k for k, v in state_dict.items() if not isinstance(v, torch.Tensor))
    if not_tensors:
        raise PretrainedWeightsError(
            f"{INCEPTION_SPEC.network}: {source} holds non-tensor entries {not_tensors[:5]}; expected "
            f"{INCEPTION_SPEC.expected_file}"
        )
    buffer = io.BytesIO()
    torch.save(dict(state_dict), buffer)
    buffer.seek(0)
    try:
        return FeatureExtractorInceptionV3(
            INCEPTION_NAME,
            ["2048", "logits_unbiased"],
            feature_extractor_weights_path=buffer,  # torch.load takes a file object; only our tensors are in it
            verbose=False,
        )
    except RuntimeError as err:
        if "Error(s) in loading state_dict" not in str(err):  # strict: missing, unexpected, mis-shaped keys
            raise
        raise PretrainedWeightsError(
            f"{INCEPTION_SPEC.network}: {source} is not torch-fidelity's {INCEPTION_NAME} state_dict ({err}). "
            f"Expected {INCEPTION_SPEC.expected_file}; `{INCEPTION_SPEC.export_command}` writes it."
        ) from err


def _load_file(path: Path) -> FeatureExtractorInceptionV3:
    return torch_fidelity_extractor(read_state_dict(path), str(path))


def _download() -> FeatureExtractorInceptionV3:
    """torch-fidelity's file, downloaded to (or found in) its torch-hub cache, $TORCH_HOME/hub/checkpoints/."""
    state_dict = hub_state_dict(URL_INCEPTION_V3)
    return torch_fidelity_extractor(state_dict, str(Path(torch.hub.get_dir()) / "checkpoints" / WEIGHTS_FILE))


class InceptionFeatures(nn.Module):
    """Frozen FID Inception returning ``{"pool", "logits_unbiased", "spatial"}`` float32 features per image.

    Args:
        weights: local weights file (config key ``inception_weights``), a plain state_dict ``.pth`` or
            ``.safetensors``; empty/None downloads torch-fidelity's file (or uses the torch-hub cache).
        allow_download: False makes a missing file an error without trying the network.
        device: where to run; the current device (``models.device.device()``) by default.
        config_key: the key named in error messages (e.g. ``eval.inception_weights``).
    """

    def __init__(
        self,
        weights: str | Path | None = None,
        allow_download: bool = True,
        device: torch.device | None = None,
        config_key: str = INCEPTION_SPEC.config_key,
    ) -> None:
        super().__init__()
        self.net = load_pretrained(
            replace(INCEPTION_SPEC, config_key=config_key),
            weights,
            _load_file,
            _download,
            allow_download,
        )
        self._spatial: torch.Tensor | None = None
        self.net.Mixed_6d.branch1x1.register_forward_hook(self._keep_spatial)
        self.to(current_device() if device is None else device)
        self.requires_grad_(False)
        self.eval()

    def _keep_spatial(self, module: nn.Module, args: object, out: torch.Tensor) -> None:
        self._spatial = out[:, :SPATIAL_CHANNELS]  # (B, 7, 17, 17)

    def train(self, mode: bool = True) -> InceptionFeatures:
        """Stay in eval mode: the metric network's batch-norm statistics are fixed."""
        return super().train(False)

    @property
    def device(self) -> torch.device:
        return self.net.fc.weight.device

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """uint8 (B, 3, H, W) images, any H, W → pool (B, 2048), logits_unbiased (B, 1008), spatial (B, 2023)."""
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected uint8 (B, 3, H, W) images, got {images.dtype} {tuple(images.shape)}")
        pool, logits = self.net(images.to(self.device))
        spatial, self._spatial = self._spatial, None
        assert spatial is not None, "the Mixed_6d.branch1x1 hook did not run"
        spatial = spatial.permute(0, 2, 3, 1).reshape(images.shape[0], -1).float()  # TF NHWC order, (B, 2023)
        return {"pool": pool, "logits_unbiased": logits, "spatial": spatial}


def batches(images: torch.Tensor, batch_size: int) -> Iterable[torch.Tensor]:
    """Split an (N, 3, H, W) uint8 tensor into batches of at most ``batch_size``."""
    return images.split(batch_size)


def extract_features(
    model: InceptionFeatures, images: Iterable[torch.Tensor] | torch.Tensor, batch_size: int = 64
) -> dict[str, torch.Tensor]:
    """Features of all images, batch by batch, concatenated on the CPU: {"pool", "logits_unbiased", "spatial"}.

    ``images`` is an (N, 3, H, W) uint8 tensor (split into ``batch_size`` batches) or an iterable of such
    batches (e.g. a DataLoader); batches are moved to the model's device.
    """
    it = batches(images, batch_size) if isinstance(images, torch.Tensor) else images
    out: dict[str, list[torch.Tensor]] = {k: [] for k in FEATURE_DIMS}
    for batch in it:
        for k, v in model(batch).items():
            out[k].append(v.cpu())
    if not out["pool"]:
        raise ValueError("no images to extract features from")
    return {k: torch.cat(v) for k, v in out.items()}


def random_weights(path: str | Path, seed: int = 0) -> Path:
    """Write an ``inception-v3-compat`` state_dict with random weights (tests and benchmarks; no download).

    The file is ``.safetensors`` when ``path`` ends so, else a plain ``torch.save`` of the tensors; both are
    what ``inception_weights`` accepts (and torch-fidelity's own ``feature_extractor_weights_path``, the .pth).

    Convolutions get He-normal weights and batch-norms random affine parameters and running statistics,
    so activations keep an O(1) scale through the 90-odd layers and the features are not degenerate.
    """
    gen = torch.Generator().manual_seed(seed)
    # torch-fidelity's constructor always loads weights (a file or the download); build it without either.
    with (
        mock.patch(f"{FeatureExtractorInceptionV3.__module__}.load_state_dict_from_url", return_value={}),
        mock.patch.object(FeatureExtractorInceptionV3, "load_state_dict", lambda self, sd: None),
    ):
        net = FeatureExtractorInceptionV3(INCEPTION_NAME, ["2048"])
    for m in net.modules():
        if isinstance(m, nn.Conv2d):
            fan_in = m.in_channels * m.kernel_size[0] * m.kernel_size[1]
            m.weight.copy_(torch.randn(m.weight.shape, generator=gen) * (2.0 / fan_in) ** 0.5)
        elif isinstance(m, nn.BatchNorm2d):
            m.weight.copy_(1.0 + 0.1 * torch.randn(m.weight.shape, generator=gen))
            m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=gen))
            m.running_mean.copy_(0.1 * torch.randn(m.running_mean.shape, generator=gen))
            m.running_var.copy_(1.0 + 0.1 * torch.rand(m.running_var.shape, generator=gen))
    # A large fc scale: random pool features differ little between images, and a flat softmax gives IS ≈ 1.
    net.fc.weight.copy_(2.0 * torch.randn(net.fc.weight.shape, generator=gen))
    net.fc.bias.copy_(0.1 * torch.randn(net.fc.bias.shape, generator=gen))
    return save_state_dict(net.state_dict(), path)  # .safetensors by suffix, else a plain tensor dict


def download_weights(out: str | Path) -> Path:
    """Download torch-fidelity's Inception weights to ``out`` (needs internet access) and check them.

    The check is what ``inception_weights`` will do: read without full unpickling and load strictly into the
    network; a file that fails it is deleted. ``out`` ending in ``.safetensors`` gets the tensors as
    safetensors; any other name gets the released file byte for byte.
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    part = out.with_name(out.name + ".part")
    torch.hub.download_url_to_file(URL_INCEPTION_V3, str(part), progress=True)
    try:
        state_dict = read_state_dict(part)  # not .safetensors: torch.load(weights_only=True)
        torch_fidelity_extractor(state_dict, URL_INCEPTION_V3)
        if out.suffix == ".safetensors":
            return save_state_dict(state_dict, out)
        return part.replace(out)
    finally:
        part.unlink(missing_ok=True)


def main(argv: list[str] | None = None) -> None:
    """CLI: ``python -m eval.inception OUT`` writes the weights file ``inception_weights`` expects."""
    parser = argparse.ArgumentParser(description="Download the FID Inception weights for offline machines.")
    parser.add_argument("out", help=f"output file, e.g. {WEIGHTS_FILE} (or a .safetensors name)")
    print(download_weights(parser.parse_args(argv).out))


if __name__ == "__main__":
    main()
