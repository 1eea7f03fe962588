"""LPIPS (VGG16, v0.1 linear heads) as the reference's perceptual loss (taming ``LPIPS``, §1.3).

Written here rather than calling the ``lpips`` package's model because (a) its VGG16 trunk is fetched
through torchvision with no way to pass a local file, (b) we need the taming key layout
(``scaling_layer.*``, ``net.slice{1..5}.*``, ``lin{0..4}.model.1.weight``) so the reference training
checkpoint's ``loss.perceptual_loss.*`` loads, and (c) we want a named offline error. The ``lpips``
package is used only as a file source for the heads: its ``weights/v0.1/vgg.pth`` is byte-identical to
taming's ``vgg.pth``. Every weights file, given or found in torchvision's torch-hub cache, is read by
:func:`models.weights.read_state_dict` (a file that needs full unpickling is refused).

LPIPS(x, y) = Σ_l mean_{h,w} w_l · (n(φ_l(x)) − n(φ_l(y)))², with φ_l the VGG16 relu1_2, relu2_2,
relu3_3, relu4_3, relu5_3 features of the scaled input, n(·) the unit-normalisation over channels and
w_l the learned non-negative 1×1 heads. Inputs are images in [-1, 1]; the output is (B, 1, 1, 1).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch
from torch import nn

from models.weights import (
    WeightsSpec,
    hub_state_dict,
    load_pretrained,
    lpips_package_heads_file,
    read_state_dict,
)

VGG_SPEC = WeightsSpec(
    network="LPIPS VGG16 trunk (torchvision vgg16 IMAGENET1K_V1)",
    config_key="vavae.vgg16_weights",
    expected_file=(
        "a torchvision VGG16 state_dict with `features.*` keys (e.g. vgg16-397923af.pth, which torchvision "
        "also finds without this key in $TORCH_HOME/hub/checkpoints/)"
    ),
    export_command="python -m models.weights vgg16 vgg16_features.pth",
)
HEADS_SPEC = WeightsSpec(
    network="LPIPS linear heads (v0.1 vgg)",
    config_key="vavae.lpips_weights",
    expected_file="lpips/weights/v0.1/vgg.pth from the `lpips` PyPI package (= taming-transformers vgg.pth)",
    export_command="pip install lpips && python -m models.weights lpips_heads lpips_vgg_v0.1.pth",
)

# torchvision vgg16 `features` layout (configuration "D"): conv widths per stage, max-pool between stages.
_VGG16_STAGES = ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512))
# Slices end after relu1_2, relu2_2, relu3_3, relu4_3, relu5_3 (indices into `features`).
_SLICE_ENDS = (4, 9, 16, 23, 30)
LPIPS_CHANNELS = (64, 128, 256, 512, 512)


class ScalingLayer(nn.Module):
    """Maps [-1, 1] inputs to LPIPS's VGG input statistics: (x − shift) / scale."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188])[None, :, None, None])
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450])[None, :, None, None])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.shift) / self.scale


class VGG16Slices(nn.Module):
    """torchvision VGG16 ``features[:30]`` split into 5 slices; keys ``slice{s}.{features index}.*``."""

    def __init__(self) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        in_ch = 3
        for stage, widths in enumerate(_VGG16_STAGES):
            if stage > 0:
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
            for width in widths:
                layers += [nn.Conv2d(in_ch, width, 3, padding=1), nn.ReLU(inplace=True)]
                in_ch = width
        start = 0
        for s, end in enumerate(_SLICE_ENDS, start=1):
            sl = nn.Sequential()
            for idx in range(start, end):
                sl.add_module(str(idx), layers[idx])
            setattr(self, f"slice{s}", sl)
            start = end

    def load_torchvision(self, state_dict: dict[str, torch.Tensor]) -> None:
        """Load torchvision's ``features.{i}.*`` keys (other keys, e.g. ``classifier.*``, are ignored)."""
        mapped = {}
        for s, end in enumerate(_SLICE_ENDS, start=1):
            lo = 0 if s == 1 else _SLICE_ENDS[s - 2]
            for idx in range(lo, end):
                for p in ("weight", "bias"):
                    key = f"features.{idx}.{p}"
                    if key in state_dict:
                        mapped[f"slice{s}.{idx}.{p}"] = state_dict[key]
        self.load_state_dict(mapped, strict=True)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        feats = []
        for s in range(1, 6):
            x = getattr(self, f"slice{s}")(x)
            feats.append(x)
        return feats  # (B, 64, H, W), (B, 128, H/2, W/2), ..., (B, 512, H/16, W/16)


class NetLinLayer(nn.Module):
    """1×1 conv C→1 without bias; ``model.0`` is the (always inactive) dropout of the original layout."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.model = nn.Sequential(nn.Dropout(), nn.Conv2d(channels, 1, 1, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


def _normalize(x: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    return x / (torch.sqrt(torch.sum(x**2, dim=1, keepdim=True)) + eps)


class LPIPS(nn.Module):
    """Frozen LPIPS-VGG16 perceptual distance, always in eval mode; returns (B, 1, 1, 1) (§1.3).

    Args:
        vgg_weights: local torchvision VGG16 state_dict (``vavae.vgg16_weights``); else torchvision downloads.
        heads_weights: local LPIPS v0.1 vgg heads (``vavae.lpips_weights``); else the ``lpips`` package file.
        pretrained: False builds random weights (tests, demos) and reads no file.
        allow_download: False forbids the torchvision download (a missing file is then an error).
        vgg_config_key, heads_config_key: the config keys named in error messages.
    """

    def __init__(
        self,
        vgg_weights: str | Path | None = None,
        heads_weights: str | Path | None = None,
        pretrained: bool = True,
        allow_download: bool = True,
        vgg_config_key: str = VGG_SPEC.config_key,
        heads_config_key: str = HEADS_SPEC.config_key,
    ) -> None:
        super().__init__()
        self.scaling_layer = ScalingLayer()
        self.net = VGG16Slices()
        for i, ch in enumerate(LPIPS_CHANNELS):
            setattr(self, f"lin{i}", NetLinLayer(ch))
        if pretrained:
            self.net.load_torchvision(
                load_pretrained(
                    replace(VGG_SPEC, config_key=vgg_config_key),
                    vgg_weights,
                    read_state_dict,
                    _download_vgg16,
                    allow_download,
                )
            )
            heads = load_pretrained(
                replace(HEADS_SPEC, config_key=heads_config_key),
                heads_weights,
                read_state_dict,
                lambda: read_state_dict(lpips_package_heads_file()),
                allow_download,
            )
            self.load_heads(heads)
        self.requires_grad_(False)
        self.eval()

    def load_heads(self, state_dict: dict[str, torch.Tensor]) -> None:
        """Load ``lin{i}.model.1.weight`` (lpips / taming key layout)."""
        keys = [f"lin{i}.model.1.weight" for i in range(len(LPIPS_CHANNELS))]
        missing = [k for k in keys if k not in state_dict]
        if missing:
            raise KeyError(f"LPIPS heads file lacks {missing}; found keys {sorted(state_dict)[:10]}")
        for i, k in enumerate(keys):
            getattr(self, f"lin{i}").model[1].weight.data.copy_(state_dict[k])

    def train(self, mode: bool = True) -> LPIPS:
        """Stay in eval mode: LPIPS is a fixed metric (its dropout never applies)."""
        return super().train(False)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """x, y: (B, 3, H, W) in [-1, 1] → (B, 1, 1, 1) LPIPS distance."""
        fx, fy = self.net(self.scaling_layer(x)), self.net(self.scaling_layer(y))
        val = 0.0
        for i, (a, b) in enumerate(zip(fx, fy)):
            diff = (_normalize(a) - _normalize(b)) ** 2  # (B, C_l, H_l, W_l)
            val = val + getattr(self, f"lin{i}")(diff).mean(dim=(2, 3), keepdim=True)
        return val


def _download_vgg16() -> dict[str, torch.Tensor]:
    """torchvision's VGG16 file, downloaded to (or found in) its torch-hub cache and read weights_only.

    Not ``VGG16_Weights.get_state_dict()``: that unpickles the cached file fully (``weights_only=False``).
    """
    from torchvision.models import VGG16_Weights

    return hub_state_dict(VGG16_Weights.IMAGENET1K_V1.url)
