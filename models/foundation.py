"""Frozen vision foundation model for the VF loss: DINOv2 ViT-L/14 or MAE ViT-L/16 through timm (§1.2).

The reference builds ``timm.create_model("hf-hub:timm/vit_large_patch14_dinov2.lvd142m", pretrained=True,
dynamic_img_size=True)``, resizes the 256² image bilinearly to 224² (MAE: uses the 256² input as is),
and takes ``forward_features(x)[:, 1:]`` reshaped to (B, 1024, 16, 16). It feeds the [-1, 1] images
without ImageNet normalisation (§1.2 "known bug"); that is the default here, and ``imagenet_norm=True``
applies the model's mean/std to (x + 1) / 2 instead.

Without a local file, timm downloads from the Hugging Face hub. On an offline node the hub client retries
for about a minute before failing unless ``HF_HUB_OFFLINE=1`` is set; giving the file avoids both.

A local file is read by :func:`models.weights.read_state_dict` (safetensors, or ``torch.load(weights_only=True)``;
a file that needs full unpickling is refused) and handed to timm as a state_dict
(``pretrained_cfg_overlay={"state_dict": ...}``), never as a path: how timm loads a file is its own choice
(1.0.31: ``weights_only=True``, with ``argparse.Namespace`` allowed; older versions unpickled fully), and its
refusal message advises ``weights_only=False``. timm still applies its ``checkpoint_filter_fn`` (Meta's raw
DINOv2 checkpoints are converted, the position embedding resampled). The hub download stays timm's
(safetensors when the repository has them, else ``weights_only=True``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import timm
import torch
import torch.nn.functional as F
from torch import nn

from models.weights import WeightsSpec, load_pretrained, read_state_dict

DEFAULT_TIMM_NAMES: dict[str, str] = {
    "dinov2": "vit_large_patch14_dinov2.lvd142m",
    "mae": "vit_large_patch16_224.mae",
}
"""timm model per foundation kind (§1.2)."""
DEFAULT_RESIZE: dict[str, int] = {"dinov2": 224, "mae": 0}
"""Bilinear resize target per kind; 0 = feed the input size as is (§1.2)."""


def foundation_weights_spec(kind: str, timm_name: str, config_key: str) -> WeightsSpec:
    return WeightsSpec(
        network=f"{kind} foundation model (timm {timm_name})",
        config_key=config_key,
        expected_file=f"a timm state_dict of {timm_name} (.pth or .safetensors)",
        export_command=f"python -m models.weights {kind} {kind}.pth --timm-name {timm_name}",
    )


class FoundationModel(nn.Module):
    """Frozen timm ViT returning patch-token features as a map (B, C, h, w), always under no_grad (§1.2).

    Args:
        kind: "dinov2" (default, reference) or "mae"; picks the default timm name and resize.
        timm_name: timm model name; None = the kind's default. Tests use e.g. "vit_small_patch14_dinov2".
        weights: local weights file (config key ``config_key``); None = timm's own (hub) download.
        pretrained: False builds random weights (tests, demos) and reads no file.
        resize: bilinear resize of the input to resize×resize before the ViT; None = the kind's default
            (224 for DINOv2 so a 256² image gives 16×16 tokens; 0 = no resize for MAE).
        imagenet_norm: apply ImageNet mean/std to (x + 1) / 2; the reference does not (§1.2).
        allow_download: False turns a missing local file into an error without trying the hub.
        config_key: named in the error message when the weights cannot be found.
    """

    def __init__(
        self,
        kind: Literal["dinov2", "mae"] = "dinov2",
        timm_name: str | None = None,
        weights: str | Path | None = None,
        pretrained: bool = True,
        resize: int | None = None,
        imagenet_norm: bool = False,
        allow_download: bool = True,
        config_key: str = "vavae.foundation_weights",
    ) -> None:
        super().__init__()
        if kind not in DEFAULT_TIMM_NAMES:
            raise ValueError(f"unknown foundation kind {kind!r}; choose one of {sorted(DEFAULT_TIMM_NAMES)}")
        name = timm_name or DEFAULT_TIMM_NAMES[kind]
        self.kind, self.timm_name = kind, name
        self.resize = DEFAULT_RESIZE[kind] if resize is None else resize
        self.imagenet_norm = imagenet_norm
        if pretrained:
            spec = foundation_weights_spec(kind, name, config_key)
            self.model = load_pretrained(
                spec,
                weights,
                lambda p: timm.create_model(
                    name,
                    pretrained=True,
                    pretrained_cfg_overlay={"state_dict": read_state_dict(p)},
                    dynamic_img_size=True,
                ),
                lambda: timm.create_model(name, pretrained=True, dynamic_img_size=True),
                allow_download,
            )
        else:
            self.model = timm.create_model(name, pretrained=False, dynamic_img_size=True)
        cfg = self.model.pretrained_cfg
        self.register_buffer("mean", torch.tensor(cfg["mean"])[None, :, None, None], persistent=False)
        self.register_buffer("std", torch.tensor(cfg["std"])[None, :, None, None], persistent=False)
        self.requires_grad_(False)
        self.eval()

    @property
    def dim(self) -> int:
        """Feature channels (1024 for ViT-L)."""
        return int(self.model.embed_dim)

    def train(self, mode: bool = True) -> FoundationModel:
        """Stay in eval mode: the foundation model is frozen."""
        return super().train(False)

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W) in [-1, 1] → features (B, C, h, w), h = resize / patch (16 for 256² input)."""
        if self.imagenet_norm:
            x = ((x + 1.0) / 2.0 - self.mean) / self.std
        if self.resize:
            x = F.interpolate(x, size=(self.resize, self.resize), mode="bilinear", align_corners=False)
        ph, pw = self.model.patch_embed.patch_size
        h, w = x.shape[-2] // ph, x.shape[-1] // pw
        tokens = self.model.forward_features(x)[:, self.model.num_prefix_tokens :]  # (B, h*w, C)
        if tokens.shape[1] != h * w:
            raise ValueError(
                f"expected {h}x{w} patch tokens for input {tuple(x.shape[-2:])}, got {tokens.shape[1]}"
            )
        return tokens.reshape(x.shape[0], h, w, -1).permute(0, 3, 1, 2).contiguous()  # (B, C, h, w)
