"""VA-VAE autoencoder: the LDM "KL" AutoencoderKL (reference §1.1) with the reference state_dict keys (§8.2).

Written here rather than taken from diffusers because the released VA-VAE checkpoint uses LDM key names
(``encoder.down.{i}.block.{j}...``), which must load with ``strict=True`` (§8.2), and because we need
activation checkpointing per resolution level.

Shapes for the reference f16d32 config: image (B, 3, 256, 256) → moments (B, 64, 16, 16) → posterior
with latent (B, 32, 16, 16) → image (B, 3, 256, 256).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from models.weights import read_state_dict


@dataclass
class AutoencoderArgs:
    """Architecture of the AutoencoderKL. Defaults are the reference f16d32 ddconfig (§1.1)."""

    ch: int = 128
    """Base channel count; level i has ch * ch_mult[i] channels (§1.1: 128)."""
    ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
    """Channel multiplier per resolution level; len(ch_mult) - 1 downsamplings (§1.1: (1,1,2,2,4) = f16)."""
    num_res_blocks: int = 2
    """ResnetBlocks per encoder level; the decoder uses num_res_blocks + 1 (§1.1: 2)."""
    attn_resolutions: tuple[int, ...] = (16,)
    """Feature-map sizes (in pixels of the level) that get self-attention blocks (§1.1: 16)."""
    dropout: float = 0.0
    """Dropout inside ResnetBlocks (§1.1: 0.0)."""
    in_channels: int = 3
    """Image channels in."""
    out_ch: int = 3
    """Image channels out."""
    z_channels: int = 32
    """Latent channels produced by the encoder / consumed by the decoder (§1.1: 32)."""
    double_z: bool = True
    """Encoder outputs mean and logvar (2 * z_channels); must be True for the Gaussian posterior."""
    embed_dim: int = 32
    """Channels of the latent after quant_conv (§1.1: 32, equal to z_channels)."""
    resolution: int = 256
    """Image size the attention placement is computed for (§1.1: 256)."""
    grad_checkpointing: bool = False
    """Recompute each resolution level (and the middle block) in backward to save activation memory."""


AUTOENCODER_CONFIGS: dict[str, AutoencoderArgs] = {
    # The released VA-VAE (§1.1, tokenizer/configs/vavae_f16d32.yaml): 69,836,067 parameters.
    "f16d32": AutoencoderArgs(),
    # f8 with 32 latent channels for tests and CPU demos on 32-64 px images (64 px → (32, 8, 8)).
    "small": AutoencoderArgs(
        ch=32, ch_mult=(1, 2, 2, 4), num_res_blocks=1, attn_resolutions=(8,), resolution=64
    ),
    # f8 with 4 latent channels for the CPU demo on 32 px digits (32 px → (4, 4, 4)); 32 px is the least
    # the PatchGAN discriminator takes. Attention only in the middle block (4x4), one ResnetBlock per level.
    "digits": AutoencoderArgs(
        ch=32,
        ch_mult=(1, 1, 2, 2),
        num_res_blocks=1,
        attn_resolutions=(),
        z_channels=4,
        embed_dim=4,
        resolution=32,
    ),
}


def autoencoder_args(name: str, **overrides: object) -> AutoencoderArgs:
    """Named AutoencoderArgs from :data:`AUTOENCODER_CONFIGS`, with field overrides."""
    if name not in AUTOENCODER_CONFIGS:
        raise KeyError(f"unknown autoencoder config {name!r}; known: {sorted(AUTOENCODER_CONFIGS)}")
    return dataclasses.replace(AUTOENCODER_CONFIGS[name], **overrides)


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=32, num_channels=channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    """norm1, swish, conv1, norm2, swish, dropout, conv2, plus a 1×1 nin_shortcut if channels change (§1.1)."""

    def __init__(self, in_channels: int, out_channels: int, dropout: float) -> None:
        super().__init__()
        self.norm1 = _norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = _norm(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1)
        else:
            self.nin_shortcut = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        if self.nin_shortcut is not None:
            x = self.nin_shortcut(x)
        return x + h


class AttnBlock(nn.Module):
    """Single-head spatial self-attention with 1×1 q, k, v, proj_out and scale c^-0.5 (§1.1)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.norm = _norm(channels)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, hh, ww = x.shape
        h = self.norm(x)
        # (B, C, H, W) -> (B, 1, HW, C): one head over all spatial positions
        q, k, v = (t(h).reshape(b, 1, c, hh * ww).transpose(2, 3) for t in (self.q, self.k, self.v))
        h = F.scaled_dot_product_attention(q, k, v)  # (B, 1, HW, C), default scale c^-0.5
        h = h.transpose(2, 3).reshape(b, c, hh, ww)
        return x + self.proj_out(h)


class Downsample(nn.Module):
    """Pad (0,1,0,1) then a stride-2 3×3 conv with no padding (§1.1)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1), mode="constant", value=0.0))


class Upsample(nn.Module):
    """Nearest ×2 then a 3×3 conv (§1.1)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class _Level(nn.Module):
    """One resolution level: blocks, attention after block j when present, then a resampler (or none).

    The attribute names (block, attn, downsample/upsample) give the reference keys
    ``encoder.down.{i}.block.{j}`` and ``decoder.up.{i}.attn.{j}`` (§8.2).
    """

    def __init__(self, blocks: list[nn.Module], attns: list[nn.Module]) -> None:
        super().__init__()
        self.block = nn.ModuleList(blocks)
        self.attn = nn.ModuleList(attns)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        for j, block in enumerate(self.block):
            h = block(h)
            if len(self.attn) > 0:
                h = self.attn[j](h)
        if hasattr(self, "downsample"):
            h = self.downsample(h)
        if hasattr(self, "upsample"):
            h = self.upsample(h)
        return h


class _Mid(nn.Module):
    def __init__(self, channels: int, dropout: float) -> None:
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, dropout)
        self.attn_1 = AttnBlock(channels)
        self.block_2 = ResnetBlock(channels, channels, dropout)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(h)))


def _run(module: nn.Module, h: torch.Tensor, use_checkpoint: bool) -> torch.Tensor:
    if use_checkpoint and torch.is_grad_enabled():
        return checkpoint(module, h, use_reentrant=False)
    return module(h)


class Encoder(nn.Module):
    """LDM encoder: conv_in, levels with downsampling, mid, norm_out, swish, conv_out (§1.1)."""

    def __init__(self, a: AutoencoderArgs) -> None:
        super().__init__()
        self.grad_checkpointing = a.grad_checkpointing
        self.conv_in = nn.Conv2d(a.in_channels, a.ch, 3, padding=1)
        in_mult = (1, *a.ch_mult)
        res = a.resolution
        self.down = nn.ModuleList()
        block_in = a.ch
        for i, mult in enumerate(a.ch_mult):
            block_in, block_out = a.ch * in_mult[i], a.ch * mult
            blocks, attns = [], []
            for _ in range(a.num_res_blocks):
                blocks.append(ResnetBlock(block_in, block_out, a.dropout))
                block_in = block_out
                if res in a.attn_resolutions:
                    attns.append(AttnBlock(block_in))
            level = _Level(blocks, attns)
            if i != len(a.ch_mult) - 1:
                level.downsample = Downsample(block_in)
                res //= 2
            self.down.append(level)
        self.mid = _Mid(block_in, a.dropout)
        self.norm_out = _norm(block_in)
        self.conv_out = nn.Conv2d(block_in, 2 * a.z_channels if a.double_z else a.z_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)  # (B, ch, H, W)
        for level in self.down:
            h = _run(level, h, self.grad_checkpointing)
        h = _run(self.mid, h, self.grad_checkpointing)  # (B, ch*ch_mult[-1], H/f, W/f)
        return self.conv_out(F.silu(self.norm_out(h)))  # (B, 2*z_channels, H/f, W/f)


class Decoder(nn.Module):
    """LDM decoder: conv_in, mid, levels (num_res_blocks + 1 blocks) with upsampling, norm_out, conv_out (§1.1).

    ``up[i]`` is indexed by resolution level (up[-1] is the lowest resolution) and runs from last to first.
    """

    def __init__(self, a: AutoencoderArgs) -> None:
        super().__init__()
        self.grad_checkpointing = a.grad_checkpointing
        block_in = a.ch * a.ch_mult[-1]
        res = a.resolution // 2 ** (len(a.ch_mult) - 1)
        self.conv_in = nn.Conv2d(a.z_channels, block_in, 3, padding=1)
        self.mid = _Mid(block_in, a.dropout)
        levels: list[_Level] = []
        for i in reversed(range(len(a.ch_mult))):
            block_out = a.ch * a.ch_mult[i]
            blocks, attns = [], []
            for _ in range(a.num_res_blocks + 1):
                blocks.append(ResnetBlock(block_in, block_out, a.dropout))
                block_in = block_out
                if res in a.attn_resolutions:
                    attns.append(AttnBlock(block_in))
            level = _Level(blocks, attns)
            if i != 0:
                level.upsample = Upsample(block_in)
                res *= 2
            levels.insert(0, level)
        self.up = nn.ModuleList(levels)
        self.norm_out = _norm(block_in)
        self.conv_out = nn.Conv2d(block_in, a.out_ch, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(z)  # (B, ch*ch_mult[-1], h, w)
        h = _run(self.mid, h, self.grad_checkpointing)
        for level in reversed(self.up):
            h = _run(level, h, self.grad_checkpointing)
        return self.conv_out(F.silu(self.norm_out(h)))  # (B, out_ch, H, W)


class DiagonalGaussianDistribution:
    """Posterior N(mean, exp(logvar)) from moments (B, 2C, h, w); logvar clamped to [-30, 20] (§1.1)."""

    def __init__(self, moments: torch.Tensor) -> None:
        self.mean, logvar = torch.chunk(moments, 2, dim=1)  # (B, C, h, w) each
        self.logvar = torch.clamp(logvar, -30.0, 20.0)
        self.std = torch.exp(0.5 * self.logvar)
        self.var = torch.exp(self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """mean + std·ε, ε ~ N(0, I) drawn from ``generator`` (the reference encodes with a sample, §1.1)."""
        eps = torch.randn(
            self.mean.shape, generator=generator, device=self.mean.device, dtype=self.mean.dtype
        )
        return self.mean + self.std * eps

    def mode(self) -> torch.Tensor:
        return self.mean

    def kl(self) -> torch.Tensor:
        """KL to N(0, I) per sample: 0.5·Σ_{C,h,w}(μ² + σ² − 1 − log σ²), shape (B,) (§1.3)."""
        return 0.5 * torch.sum(self.mean.pow(2) + self.var - 1.0 - self.logvar, dim=(1, 2, 3))


class AutoencoderKL(nn.Module):
    """encoder → quant_conv → Gaussian posterior → post_quant_conv → decoder (§1.1).

    State_dict keys are exactly the reference inference model's (§8.2): 342 tensors for f16d32.
    """

    def __init__(self, args: AutoencoderArgs | None = None) -> None:
        super().__init__()
        a = args if args is not None else AutoencoderArgs()
        if not a.double_z:
            raise ValueError("AutoencoderArgs.double_z must be True: the encoder outputs mean and logvar")
        self.args = a
        self.encoder = Encoder(a)
        self.decoder = Decoder(a)
        self.quant_conv = nn.Conv2d(2 * a.z_channels, 2 * a.embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(a.embed_dim, a.z_channels, 1)

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.args.ch_mult) - 1)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Switch activation checkpointing of every resolution level (encoder and decoder)."""
        self.encoder.grad_checkpointing = enable
        self.decoder.grad_checkpointing = enable

    def encode(self, x: torch.Tensor) -> DiagonalGaussianDistribution:
        """Images (B, 3, H, W) in [-1, 1] → posterior over latents (B, embed_dim, H/f, W/f)."""
        return DiagonalGaussianDistribution(self.quant_conv(self.encoder(x)))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Latents (B, embed_dim, h, w) → images (B, 3, h·f, w·f), roughly in [-1, 1]."""
        return self.decoder(self.post_quant_conv(z))

    def forward(
        self, x: torch.Tensor, sample_posterior: bool = True, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, DiagonalGaussianDistribution, torch.Tensor]:
        """Returns (reconstruction, posterior, z) with z the sampled (or mode) latent fed to the decoder."""
        posterior = self.encode(x)
        z = posterior.sample(generator) if sample_posterior else posterior.mode()
        return self.decode(z), posterior, z


def images_to_uint8(x: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) in [-1, 1] → (B, H, W, 3) uint8 as the reference: clamp(127.5·x + 128, 0, 255) (§1.1).

    The +128 (not +127.5) and the truncating cast are the reference's and are kept for parity.
    """
    return torch.clamp(127.5 * x + 128.0, 0, 255).permute(0, 2, 3, 1).to(torch.uint8)


def uint8_to_images(x: torch.Tensor) -> torch.Tensor:
    """(B, H, W, 3) uint8 → (B, 3, H, W) float32 in [-1, 1] by /127.5 − 1 (§1.4 data scaling)."""
    return x.permute(0, 3, 1, 2).to(torch.float32) / 127.5 - 1.0


AUTOENCODER_PREFIXES = ("encoder.", "decoder.", "quant_conv.", "post_quant_conv.")
"""Key prefixes of the inference autoencoder in reference checkpoints (§8.2)."""
DROPPED_PREFIXES = ("loss.", "foundation_model.")
"""Training-checkpoint prefixes that are not part of the autoencoder (LPIPS, discriminator, logvar, DINOv2)."""
VF_PROJECTION_KEY = "linear_proj.weight"
"""The VF projection Conv2d(32, 1024, 1, bias=False) of the training checkpoint (§1.2, §8.2)."""


def load_reference_checkpoint(
    source: str | Path | Mapping[str, object],
    autoencoder: AutoencoderKL,
    vf_projection: nn.Module | None = None,
    map_fn: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]] | None = None,
) -> dict[str, list[str]]:
    """Load a reference VA-VAE checkpoint (inference file or Lightning training file) strictly.

    Accepts a path or an already loaded dict, raw or under ``state_dict`` (§8.2). Keys are selected by
    explicit prefixes: ``encoder.``/``decoder.``/``quant_conv.``/``post_quant_conv.`` go to the autoencoder
    (``strict=True``); ``linear_proj.weight`` goes to ``vf_projection.weight`` when given; ``loss.*`` and
    ``foundation_model.*`` are dropped. Any other key is an error. ``map_fn`` may transform the raw dict first.
    Returns the key lists per destination (``autoencoder``, ``vf_projection``, ``dropped``).

    A path is read with ``torch.load(weights_only=True)``; a Lightning file whose extra entries need full
    unpickling must be loaded by the caller (from a trusted source) and passed as a dict.
    """
    if isinstance(source, (str, Path)):
        sd = read_state_dict(source)
    else:
        sd = dict(source)
        if "state_dict" in sd and isinstance(sd["state_dict"], Mapping):
            sd = dict(sd["state_dict"])
    if map_fn is not None:
        sd = map_fn(sd)
    ae_sd = {k: v for k, v in sd.items() if k.startswith(AUTOENCODER_PREFIXES)}
    dropped = [k for k in sd if k.startswith(DROPPED_PREFIXES)]
    proj = [k for k in sd if k == VF_PROJECTION_KEY]
    unknown = sorted(set(sd) - set(ae_sd) - set(dropped) - set(proj))
    if unknown:
        raise KeyError(f"unexpected keys in VA-VAE checkpoint (first 10 of {len(unknown)}): {unknown[:10]}")
    autoencoder.load_state_dict(ae_sd, strict=True)
    if proj and vf_projection is not None:
        vf_projection.load_state_dict({"weight": sd[VF_PROJECTION_KEY]}, strict=True)
    else:
        dropped += proj
        proj = []
    return {"autoencoder": sorted(ae_sd), "vf_projection": proj, "dropped": sorted(dropped)}
