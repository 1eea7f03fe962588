"""The modules and the loss the VA-VAE's two DeepSpeed engines train (reference §1.2-1.4; the loop is in
trainer/vavae.py): each engine's module has the whole loss as its forward, so the adaptive weights'
`torch.autograd.grad` calls run before DeepSpeed hooks the outputs.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import nn

from models.discriminator import NLayerDiscriminator
from models.foundation import FoundationModel
from models.lpips import LPIPS
from models.vavae import AutoencoderArgs, AutoencoderKL, DiagonalGaussianDistribution
from models.vavae_losses import VAVAELoss, VAVAELossArgs
from trainer.config import TrainVAVAEConfig


class AutoencoderObjective(nn.Module):
    """The AE engine's module: the autoencoder and the VF projection, trained by one optimizer (§1.2, §1.4).

    Its forward is the whole autoencoder loss, so the adaptive weights' `torch.autograd.grad` calls run
    before DeepSpeed hooks the outputs (a backward through hooked outputs starts the engine's reduction).
    """

    def __init__(self, autoencoder: AutoencoderKL, linear_proj: nn.Module | None) -> None:
        super().__init__()
        self.autoencoder = autoencoder
        self.linear_proj = linear_proj

    def forward(
        self,
        x: torch.Tensor,
        eps: torch.Tensor,
        loss_fn: VAVAELoss,
        global_step: int,
        discriminator: Callable,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
        """Images (B, 3, H, W) fp32 in [-1, 1], noise (B, C, h, w) → (total loss, its terms, reconstruction).

        z = mean + std·eps is the reference's `posterior.sample()` (§1.2) with the noise given. The loss is
        computed in fp32; z stays in the module's dtype because it feeds the decoder and the projection.
        """
        ae = self.autoencoder
        dtype = ae.encoder.conv_in.weight.dtype
        moments = ae.quant_conv(ae.encoder(x.to(dtype)))  # (B, 2C, h, w)
        posterior = DiagonalGaussianDistribution(moments.float())
        z = (posterior.mean + posterior.std * eps).to(dtype)  # (B, C, h, w)
        xrec = ae.decode(z).float()  # (B, 3, H, W)
        total, logs = loss_fn.autoencoder_loss(
            x,
            xrec,
            posterior,
            z,
            global_step,
            discriminator,
            ae.encoder.conv_out.weight,
            ae.decoder.conv_out.weight,
        )
        return total, logs, xrec.detach()


class DiscriminatorObjective(nn.Module):
    """The D engine's module: the PatchGAN; its forward is the hinge loss on (x, detached x̂) (§1.3)."""

    def __init__(self, discriminator: NLayerDiscriminator) -> None:
        super().__init__()
        self.discriminator = discriminator

    def forward(
        self, x: torch.Tensor, xrec: torch.Tensor, loss_fn: VAVAELoss, global_step: int
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        dtype = self.discriminator.main[0].weight.dtype
        return loss_fn.discriminator_loss(x, xrec, global_step, fp32_out(self.discriminator, dtype))


def build_loss(cfg: TrainVAVAEConfig, args: AutoencoderArgs) -> VAVAELoss:
    """The reference losses (§1.2, §1.3) with their frozen LPIPS and foundation model, from local files if given."""
    c = cfg.loss
    lpips = None
    if c.perceptual_weight > 0:
        lpips = LPIPS(
            vgg_weights=c.vgg16_weights or None, heads_weights=c.lpips_weights or None,
            vgg_config_key="loss.vgg16_weights", heads_config_key="loss.lpips_weights",
        )  # fmt: skip
    foundation = None
    if c.use_vf:
        foundation = FoundationModel(
            c.foundation, c.foundation_timm_name or None, weights=c.foundation_weights or None,
            resize=None if c.foundation_resize < 0 else c.foundation_resize, config_key="loss.foundation_weights",
        )  # fmt: skip
        patch = foundation.model.patch_embed.patch_size[0]
        tokens = (foundation.resize or cfg.image_size) // patch
        latent = cfg.image_size // 2 ** (len(args.ch_mult) - 1)
        if tokens != latent:
            raise ValueError(
                f"the foundation model sees {tokens}x{tokens} tokens but the latents are {latent}x{latent}: "
                f"set loss.foundation_resize={latent * patch}"
            )
    loss_args = VAVAELossArgs(
        perceptual_weight=c.perceptual_weight, kl_weight=c.kl_weight, disc_start=c.disc_start,
        disc_weight=c.disc_weight, use_vf=c.use_vf, vf_weight=c.vf_weight, distmat_margin=c.distmat_margin,
        cos_margin=c.cos_margin, proj_fix=c.proj_fix,
    )  # fmt: skip
    return VAVAELoss(loss_args, lpips, foundation, latent_channels=args.embed_dim)


@contextmanager
def frozen(module: nn.Module) -> Iterator[None]:
    """Parameters of `module` need no gradient inside the block (the graph built there never reaches them)."""
    params = [p for p in module.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)


def fp32_out(net: Callable[[torch.Tensor], torch.Tensor], dtype: torch.dtype) -> Callable:
    """`net` fed in the engine's dtype, answering in fp32 (the losses are computed in fp32)."""
    return lambda images: net(images.to(dtype)).float()
