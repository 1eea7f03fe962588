"""PatchGAN discriminator of pix2pix as used by taming-transformers / LDM (reference §1.3).

Keys ``main.{i}.*`` match the reference's ``loss.discriminator.main.*``. Written here because the layer
layout (no bias before BatchNorm, the pix2pix ``weights_init``) is what the reference trains with and no
maintained library ships this exact module.
"""

from __future__ import annotations

import torch
from torch import nn


def weights_init(m: nn.Module) -> None:
    """pix2pix init (§1.3): conv weights N(0, 0.02); BatchNorm weight N(1, 0.02), bias 0."""
    if isinstance(m, nn.Conv2d):
        nn.init.normal_(m.weight, 0.0, 0.02)
    elif isinstance(m, nn.BatchNorm2d):
        nn.init.normal_(m.weight, 1.0, 0.02)
        nn.init.zeros_(m.bias)


class NLayerDiscriminator(nn.Module):
    """PatchGAN: k4/p1 convs, strides 2 (×n_layers) then 1, 1; BatchNorm, LeakyReLU 0.2 (§1.3).

    Defaults input_nc 3, ndf 64, n_layers 3: a 256² input gives (B, 1, 30, 30) logits.
    """

    def __init__(self, input_nc: int = 3, ndf: int = 64, n_layers: int = 3) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(input_nc, ndf, 4, stride=2, padding=1), nn.LeakyReLU(0.2, True)]
        mult = 1
        for n in range(1, n_layers + 1):
            prev, mult = mult, min(2**n, 8)
            stride = 2 if n < n_layers else 1
            # no conv bias before BatchNorm (pix2pix use_bias = norm is not BatchNorm)
            layers += [
                nn.Conv2d(ndf * prev, ndf * mult, 4, stride=stride, padding=1, bias=False),
                nn.BatchNorm2d(ndf * mult),
                nn.LeakyReLU(0.2, True),
            ]
        layers.append(nn.Conv2d(ndf * mult, 1, 4, stride=1, padding=1))
        self.main = nn.Sequential(*layers)
        self.apply(weights_init)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.main(x)  # (B, 1, H', W') patch logits
