"""LightningDiT: the diffusion transformer of arXiv 2501.01423, numerically faithful to the reference.

Written from the fact sheet `shared/reference/lightningdit.md` (§2 architecture, §8.1 state_dict keys);
section numbers below refer to it. The LightningDiT configuration (SwiGLU, RMSNorm, RoPE, no q/k-norm) is
the default; the DiT switches (`use_swiglu`, `use_rmsnorm`, `use_rope` false) give the tanh-GELU MLP,
affine-free LayerNorm and no rotary embedding of DiT.

Parameter and buffer names are exactly the reference's, so released checkpoints load with `strict=True`
and ours load into theirs. Pure PyTorch: no distributed code, no config objects. The arguments, the size
registry, the parameter list and the FLOP count live in `models/lightningdit_spec.py` (no torch) and are
re-exported here.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from models.lightningdit_spec import (
    LIGHTNINGDIT_SIZES,
    FlopCount,
    LightningDiTArgs,
    lightningdit_args,
    lightningdit_flops,
)

__all__ = [
    "LIGHTNINGDIT_SIZES",
    "FlopCount",
    "LightningDiT",
    "LightningDiTArgs",
    "apply_rope",
    "lightningdit_args",
    "lightningdit_flops",
    "rope_2d_angles",
    "sincos_pos_embed_2d",
]


# ----------------------------------------------------------------------------------------------------------
# Position encodings


def _sincos_1d(dim: int, pos: Tensor) -> Tensor:
    """[sin(p w_k), cos(p w_k)] with w_k = 10000^(-k/(dim/2)), k < dim/2 (MAE/DiT 1-D embedding)."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2))
    angles = pos.to(torch.float64)[:, None] * omega[None]  # (P, dim/2)
    return torch.cat([angles.sin(), angles.cos()], dim=1)  # (P, dim)


def sincos_pos_embed_2d(dim: int, grid_size: int) -> Tensor:
    """Fixed 2-D sin-cos embedding, (grid_size², dim) float32, token index h * grid_size + w.

    Layout per §2.2 (checked by running the reference): concat[1-D(dim/2, w), 1-D(dim/2, h)], column first.
    Computed in float64 and rounded once, like the reference's numpy code.
    """
    pos = torch.arange(grid_size, dtype=torch.float64)
    h = pos.repeat_interleave(grid_size)  # (T,) row of each token
    w = pos.repeat(grid_size)  # (T,) column of each token
    return torch.cat([_sincos_1d(dim // 2, w), _sincos_1d(dim // 2, h)], dim=1).float()


def rope_2d_angles(head_dim: int, rows: Tensor, cols: Tensor, theta: float = 10000.0) -> Tensor:
    """Angles (P, head_dim) of EVA-02's 2-D RoPE (`VisionRotaryEmbeddingFast(dim=head_dim/2)`, §2.2).

    Frequencies θ_j = theta^(-2j/(head_dim/2)), j < head_dim/4, each repeated twice in place (f0, f0, f1,
    f1, ...) so that adjacent dims (2i, 2i+1) form a rotated pair. Dims [0, head_dim/2) rotate with the row
    position, dims [head_dim/2, head_dim) with the column position. Positions may be any real numbers; the
    model uses the integer grid 0..G-1.
    """
    half = head_dim // 2
    freqs = 1.0 / theta ** (torch.arange(0, half, 2, dtype=torch.float64) / half)  # (head_dim/4,)
    freqs = freqs.repeat_interleave(2)  # (half,) interleaved pairs
    row = rows.to(torch.float64)[:, None] * freqs[None]  # (P, half)
    col = cols.to(torch.float64)[:, None] * freqs[None]  # (P, half)
    return torch.cat([row, col], dim=1)  # (P, head_dim)


def _rotate_pairs(x: Tensor) -> Tensor:
    """(x_{2i}, x_{2i+1}) -> (-x_{2i+1}, x_{2i}): GPT-J style pairing of adjacent dims (§2.2)."""
    x = x.unflatten(-1, (-1, 2))  # (..., hd/2, 2)
    x1, x2 = x.unbind(-1)
    return torch.stack([-x2, x1], dim=-1).flatten(-2)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate q or k (B, heads, T, hd) by tables (T, hd): x·cos + rotate_pairs(x)·sin, in x's dtype."""
    return (x * cos + _rotate_pairs(x) * sin).to(x.dtype)


class VisionRoPE2D(nn.Module):
    """Holds the RoPE tables as persistent buffers `freqs_cos`, `freqs_sin` of shape (T, head_dim) (§8.1)."""

    def __init__(self, head_dim: int, grid_size: int) -> None:
        super().__init__()
        pos = torch.arange(grid_size)
        angles = rope_2d_angles(head_dim, pos.repeat_interleave(grid_size), pos.repeat(grid_size))  # (T, hd)
        self.register_buffer("freqs_cos", angles.cos().float())
        self.register_buffer("freqs_sin", angles.sin().float())


# ----------------------------------------------------------------------------------------------------------
# Layers


class RMSNorm(nn.Module):
    """x / sqrt(mean(x²) + eps) computed in fp32, cast back to x's dtype, times a learnable weight (§2.2)."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        xf = x.float()
        normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return normed.type_as(x) * self.weight


def _norm(dim: int, use_rmsnorm: bool) -> nn.Module:
    """Block and final norms: RMSNorm, or DiT's LayerNorm without affine, both eps 1e-6 (§2.2)."""
    return RMSNorm(dim) if use_rmsnorm else nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)


class SwiGLUFFN(nn.Module):
    """w3(SiLU(x1) * x2) with [x1 | x2] = w12(x): rows [0, H) of w12 are the gated branch (§2.2, §8.1)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.w12 = nn.Linear(dim, 2 * hidden)
        self.w3 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        x1, x2 = self.w12(x).chunk(2, dim=-1)  # (B, T, H) each
        return self.w3(F.silu(x1) * x2)


class Mlp(nn.Module):
    """DiT's FFN (timm `Mlp` with tanh-GELU), used when `use_swiglu` is false. Keys `fc1`, `fc2` as timm."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class Attention(nn.Module):
    """Multi-head self-attention: fused qkv (rows q|k|v), optional q/k-norm, then RoPE, SDPA, proj (§2.2)."""

    def __init__(self, dim: int, num_heads: int, use_qknorm: bool, use_rmsnorm: bool) -> None:
        super().__init__()
        self.num_heads = num_heads
        head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        if use_qknorm:
            # As the reference: the block's norm class over head_dim (LayerNorm with default affine, eps).
            self.q_norm = RMSNorm(head_dim) if use_rmsnorm else nn.LayerNorm(head_dim)
            self.k_norm = RMSNorm(head_dim) if use_rmsnorm else nn.LayerNorm(head_dim)
        else:
            self.q_norm = nn.Identity()
            self.k_norm = nn.Identity()
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor] | None) -> Tensor:
        b, t, d = x.shape
        qkv = self.qkv(x).reshape(b, t, 3, self.num_heads, d // self.num_heads)  # (B, T, 3, heads, hd)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # (B, heads, T, hd) each
        q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        x = F.scaled_dot_product_attention(q, k, v)  # (B, heads, T, hd), scale 1/sqrt(hd)
        return self.proj(x.transpose(1, 2).reshape(b, t, d))  # (B, T, D)


def _modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class LightningDiTBlock(nn.Module):
    """Pre-norm transformer block with adaLN-Zero conditioning (§2.2)."""

    def __init__(self, args: LightningDiTArgs) -> None:
        super().__init__()
        d = args.hidden_size
        self.norm1 = _norm(d, args.use_rmsnorm)
        self.attn = Attention(d, args.num_heads, args.use_qknorm, args.use_rmsnorm)
        self.norm2 = _norm(d, args.use_rmsnorm)
        self.mlp = SwiGLUFFN(d, args.ffn_hidden) if args.use_swiglu else Mlp(d, args.ffn_hidden)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(d, 6 * d))

    def forward(self, x: Tensor, c: Tensor, rope: tuple[Tensor, Tensor] | None) -> Tensor:
        # Chunk order of §8.1: shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp; each (B, D).
        mod = self.adaLN_modulation(c).chunk(6, dim=1)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mod
        x = x + gate_msa.unsqueeze(1) * self.attn(_modulate(self.norm1(x), shift_msa, scale_msa), rope)
        return x + gate_mlp.unsqueeze(1) * self.mlp(_modulate(self.norm2(x), shift_mlp, scale_mlp))


class PatchEmbed(nn.Module):
    """Conv2d with kernel = stride = patch, then flatten to row-major tokens (timm `PatchEmbed`, §2.2)."""

    def __init__(self, patch_size: int, in_channels: int, dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_channels, dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)  # (B, T, D)


class TimestepEmbedder(nn.Module):
    """Sinusoidal features [cos, sin] of t (256 dims, max period 10000), then Linear-SiLU-Linear (§2.2).

    t is the flow time in [0, 1], fed directly (not scaled by 1000).
    """

    def __init__(self, dim: int, freq_dim: int = 256) -> None:
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, t: Tensor) -> Tensor:
        half = self.freq_dim // 2
        freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
        args = t[:, None].float() * freqs[None]  # (B, 128)
        emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # (B, 256)
        return self.mlp(emb.to(self.mlp[0].weight.dtype))


class LabelEmbedder(nn.Module):
    """Class embedding table; row `num_classes` is the null label when dropout > 0 (§2.2)."""

    def __init__(self, num_classes: int, dim: int, dropout_prob: float) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob
        self.embedding_table = nn.Embedding(num_classes + int(dropout_prob > 0), dim)

    def forward(self, y: Tensor, drop_mask: Tensor | None = None) -> Tensor:
        """Labels are replaced by the null label where `drop_mask` (B,) is true, if it is given (the
        reference's `force_drop_ids`); else, in training mode only, where `torch.rand < p` (global RNG)."""
        if drop_mask is None and self.training and self.dropout_prob > 0:
            drop_mask = torch.rand(y.shape[0], device=y.device) < self.dropout_prob
        if drop_mask is not None:
            if self.dropout_prob == 0:
                raise ValueError("drop_mask needs a null label, but class_dropout_prob is 0 (no null row)")
            y = torch.where(drop_mask, torch.full_like(y, self.num_classes), y)
        return self.embedding_table(y)


class FinalLayer(nn.Module):
    """norm_final, adaLN (chunks shift, scale), then Linear(D, p·p·C_out) (§2.2)."""

    def __init__(self, args: LightningDiTArgs) -> None:
        super().__init__()
        d = args.hidden_size
        self.norm_final = _norm(d, args.use_rmsnorm)
        self.linear = nn.Linear(d, args.patch_size**2 * args.out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(d, 2 * d))

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)  # (B, D) each
        return self.linear(_modulate(self.norm_final(x), shift, scale))  # (B, T, p·p·C_out)


# ----------------------------------------------------------------------------------------------------------
# The model


class LightningDiT(nn.Module):
    """LightningDiT (§2). `forward(x, t, y)` returns the velocity dx_t/dt = x_data - x_noise (§2.3)."""

    def __init__(self, args: LightningDiTArgs) -> None:
        super().__init__()
        self.args = args
        self.grad_checkpointing = args.grad_checkpointing
        d, g = args.hidden_size, args.grid_size
        self.x_embedder = PatchEmbed(args.patch_size, args.in_channels, d)
        self.t_embedder = TimestepEmbedder(d)
        self.y_embedder = LabelEmbedder(args.num_classes, d, args.class_dropout_prob)
        self.pos_embed = nn.Parameter(torch.zeros(1, g * g, d), requires_grad=False)  # (1, T, D) fixed
        self.feat_rope = VisionRoPE2D(args.head_dim, g) if args.use_rope else None
        self.blocks = nn.ModuleList([LightningDiTBlock(args) for _ in range(args.depth)])
        self.final_layer = FinalLayer(args)
        self.initialize_weights()

    @property
    def num_classes(self) -> int:
        """Number of real classes; `num_classes` itself is the null label used for CFG."""
        return self.args.num_classes

    def initialize_weights(self) -> None:
        """The reference (= DiT) initialisation of §2.2; the fresh model outputs exactly zero."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        with torch.no_grad():
            self.pos_embed.copy_(sincos_pos_embed_2d(self.args.hidden_size, self.args.grid_size)[None])
        w = self.x_embedder.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        for block in self.blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        for layer in (self.final_layer.adaLN_modulation[-1], self.final_layer.linear):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def set_grad_checkpointing(self, enabled: bool = True) -> None:
        """Switch per-block activation checkpointing (it acts only in training mode with grad enabled)."""
        self.grad_checkpointing = enabled

    def unpatchify(self, x: Tensor) -> Tensor:
        """(B, T, p·p·C) -> (B, C, H, W), inverse of the row-major patch embedding (§2.2)."""
        p, g, c = self.args.patch_size, self.args.grid_size, self.args.out_channels
        x = x.reshape(x.shape[0], g, g, p, p, c)  # (B, h, w, p, q, C)
        x = torch.einsum("nhwpqc->nchpwq", x)
        return x.reshape(x.shape[0], c, g * p, g * p)

    def forward(self, x: Tensor, t: Tensor, y: Tensor, drop_mask: Tensor | None = None) -> Tensor:
        """Velocity at (x, t) for labels y (§2.3).

        x: (B, C, H, W) normalised latent; t: (B,) flow time in [0, 1], 0 = noise, 1 = data; y: (B,) int64
        labels in [0, num_classes], num_classes = null. `drop_mask` (B,) bool, if given, says which labels to
        replace by the null label; else training mode drops each with class_dropout_prob (global RNG, as
        the reference) and eval mode keeps them.
        Returns (B, C, H, W).
        """
        x = self.x_embedder(x) + self.pos_embed  # (B, T, D)
        c = self.t_embedder(t) + self.y_embedder(y, drop_mask)  # (B, D)
        rope = (self.feat_rope.freqs_cos, self.feat_rope.freqs_sin) if self.feat_rope is not None else None
        use_ckpt = self.grad_checkpointing and self.training and torch.is_grad_enabled()
        for block in self.blocks:
            if use_ckpt:
                x = checkpoint(block, x, c, rope, use_reentrant=False)
            else:
                x = block(x, c, rope)  # (B, T, D)
        x = self.unpatchify(self.final_layer(x, c))  # (B, C_out, H, W)
        if self.args.learn_sigma:
            x = x[:, : self.args.in_channels]
        return x

    def flops_per_sample(self, grad_checkpointing: bool | None = None) -> FlopCount:
        """Analytic FLOPs of one sample; see `lightningdit_flops`."""
        ckpt = self.grad_checkpointing if grad_checkpointing is None else grad_checkpointing
        return lightningdit_flops(self.args, ckpt)
