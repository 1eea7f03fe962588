"""What a LightningDiT is, without building one: its arguments, the size registry, its parameters and
buffers, and its FLOPs per sample.

Plain Python (no torch), so that a planner (`ldit plan`, trainer/plan_model.py) can count a model's bytes
and FLOPs in milliseconds without importing torch; `models/lightningdit.py` builds the module from the
same `LightningDiTArgs` and re-exports everything here. Section numbers refer to the fact sheet
`shared/reference/lightningdit.md`. tests/test_plan.py checks `lightningdit_parameters` against the
module's own `named_parameters()` and `named_buffers()`, and tests/test_lightningdit.py the FLOPs against
`torch.utils.flop_counter`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

__all__ = [
    "LIGHTNINGDIT_SIZES",
    "FlopCount",
    "LightningDiTArgs",
    "TensorSpec",
    "lightningdit_args",
    "lightningdit_flops",
    "lightningdit_parameters",
]


@dataclass
class LightningDiTArgs:
    """Architecture of one LightningDiT; the defaults are XL/1 on VA-VAE f16d32 latents (§2.1, §2.2)."""

    input_size: int = 16
    """Spatial size H = W of the input latent (§2.1: 256-px images through the f16 VA-VAE give 16)."""
    patch_size: int = 1
    """Side of the square patch embedded into one token (§2.1: 1 for the released XL/1, 256 tokens)."""
    in_channels: int = 32
    """Channels of the input latent (§2.2: `in_chans` 32 for VA-VAE f16d32)."""
    hidden_size: int = 1152
    """Token width D (§2.1: 1152 for XL)."""
    depth: int = 28
    """Number of transformer blocks (§2.1: 28 for XL)."""
    num_heads: int = 16
    """Attention heads; head_dim = hidden_size / num_heads (§2.1: 16 heads of 72 for XL)."""
    mlp_ratio: float = 4.0
    """FFN width ratio; the SwiGLU hidden width is int(2/3 * int(mlp_ratio * D)) (§2.2: 3072 for XL)."""
    num_classes: int = 1000
    """Number of class labels; index `num_classes` is the null (unconditional) label (§2.2)."""
    class_dropout_prob: float = 0.1
    """Probability of replacing a label by the null label in training mode (§2.2: 0.1). With 0 the label
    table has no null row and classifier-free guidance is impossible."""
    use_qknorm: bool = False
    """Normalise q and k over head_dim before RoPE (§2.2: off in the released model; the maintainer
    recommends it against NaN losses, at a small cost in convergence speed)."""
    use_swiglu: bool = True
    """SwiGLU FFN with fused `w12` (§2.2); false gives DiT's tanh-GELU MLP (`fc1`, `fc2`)."""
    use_rope: bool = True
    """2-D rotary position embedding on q and k, in addition to the additive sin-cos `pos_embed` (§2.2)."""
    use_rmsnorm: bool = True
    """RMSNorm (eps 1e-6, learnable weight, fp32 compute) for every norm (§2.2); false gives DiT's
    affine-free LayerNorm."""
    learn_sigma: bool = False
    """Output 2 * in_channels channels like DiT (§2.2: false); `forward` returns only the velocity half."""
    grad_checkpointing: bool = False
    """Recompute each block in the backward pass (activation checkpointing); only active in training mode
    with gradients enabled. Can be changed after construction with `LightningDiT.set_grad_checkpointing`."""

    def __post_init__(self) -> None:
        errors = []
        if self.hidden_size % self.num_heads:
            errors.append(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        elif self.use_rope and (self.hidden_size // self.num_heads) % 4:
            errors.append(
                f"head_dim {self.hidden_size // self.num_heads} must be a multiple of 4 for 2-D RoPE "
                "(half per axis, rotated in pairs); change hidden_size or num_heads"
            )
        if self.input_size % self.patch_size:
            errors.append(f"input_size {self.input_size} is not divisible by patch_size {self.patch_size}")
        if self.hidden_size % 4:
            errors.append(
                f"hidden_size {self.hidden_size} must be a multiple of 4 for the 2-D sin-cos embedding"
            )
        if not 0.0 <= self.class_dropout_prob < 1.0:
            errors.append(f"class_dropout_prob {self.class_dropout_prob} must be in [0, 1)")
        if errors:
            raise ValueError("Invalid LightningDiTArgs: " + "; ".join(errors))

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def grid_size(self) -> int:
        """Tokens per side: input_size / patch_size."""
        return self.input_size // self.patch_size

    @property
    def num_tokens(self) -> int:
        return self.grid_size**2

    @property
    def out_channels(self) -> int:
        return 2 * self.in_channels if self.learn_sigma else self.in_channels

    @property
    def ffn_hidden(self) -> int:
        """FFN hidden width: int(2/3 * int(D * mlp_ratio)) with SwiGLU (§2.2: plain `int`, no rounding)."""
        mlp_hidden = int(self.hidden_size * self.mlp_ratio)
        return int(2 / 3 * mlp_hidden) if self.use_swiglu else mlp_hidden


LIGHTNINGDIT_SIZES: dict[str, dict] = {
    # Reference registry (§2.1). Parameter counts at 16x16x32 input with the LightningDiT switches.
    "B/1": dict(depth=12, hidden_size=768, num_heads=12, patch_size=1),  # 130.56 M
    "B/2": dict(depth=12, hidden_size=768, num_heads=12, patch_size=2),
    "L/2": dict(depth=24, hidden_size=1024, num_heads=16, patch_size=2),  # 458.15 M (no L/1 in reference)
    "XL/1": dict(depth=28, hidden_size=1152, num_heads=16, patch_size=1),  # 675.26 M, the released model
    "XL/2": dict(depth=28, hidden_size=1152, num_heads=16, patch_size=2),
    "1p0B/1": dict(depth=24, hidden_size=1536, num_heads=24, patch_size=1),  # 1029.4 M
    "1p0B/2": dict(depth=24, hidden_size=1536, num_heads=24, patch_size=2),
    "1p6B/1": dict(depth=28, hidden_size=1792, num_heads=28, patch_size=1),  # 1631.77 M
    "1p6B/2": dict(depth=28, hidden_size=1792, num_heads=28, patch_size=2),
    # Ours, not in the reference. "T" (tiny, 2 x 64, 2 heads of 32): unit tests.
    "T/1": dict(depth=2, hidden_size=64, num_heads=2, patch_size=1),
    "T/2": dict(depth=2, hidden_size=64, num_heads=2, patch_size=2),
    # "S" (6 x 192, 3 heads of 64, 4.42 M params at /1): the CPU demo. Not DiT-S (12 x 384).
    "S/1": dict(depth=6, hidden_size=192, num_heads=3, patch_size=1),
    "S/2": dict(depth=6, hidden_size=192, num_heads=3, patch_size=2),
}


def lightningdit_args(size: str, **overrides: object) -> LightningDiTArgs:
    """The arguments of registry size `size` (e.g. "XL/1"), with any field overridden by keyword."""
    if size not in LIGHTNINGDIT_SIZES:
        raise ValueError(f"Unknown LightningDiT size {size!r}; known sizes: {', '.join(LIGHTNINGDIT_SIZES)}")
    fields = {f.name for f in dataclasses.fields(LightningDiTArgs)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ValueError(
            f"Unknown LightningDiTArgs field(s) {unknown}; fields are: {', '.join(sorted(fields))}"
        )
    return LightningDiTArgs(**{**LIGHTNINGDIT_SIZES[size], **overrides})


# ----------------------------------------------------------------------------------------------------------
# Parameters and buffers


@dataclass(frozen=True)
class TensorSpec:
    """One parameter or buffer of the module: its state_dict key, shape, and whether the optimizer trains it."""

    name: str
    shape: tuple[int, ...]
    trainable: bool = True

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n


def _norm_params(prefix: str, dim: int, use_rmsnorm: bool) -> list[TensorSpec]:
    """A block or final norm: RMSNorm's weight, or nothing for DiT's affine-free LayerNorm (§2.2)."""
    return [TensorSpec(f"{prefix}.weight", (dim,))] if use_rmsnorm else []


def _linear(prefix: str, out_features: int, in_features: int) -> list[TensorSpec]:
    return [
        TensorSpec(f"{prefix}.weight", (out_features, in_features)),
        TensorSpec(f"{prefix}.bias", (out_features,)),
    ]


def lightningdit_parameters(args: LightningDiTArgs) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """(parameters, buffers) of `LightningDiT(args)` in the order `module.named_parameters()` and
    `named_buffers()` give them: the root's own `pos_embed` (fixed sin-cos, not trained) first, then each
    submodule in registration order (§8.1 keys). Buffers are the fp32 RoPE tables (T, head_dim)."""
    d, p, hd = args.hidden_size, args.patch_size, args.head_dim
    out = [TensorSpec("pos_embed", (1, args.num_tokens, d), trainable=False)]
    out += [
        TensorSpec("x_embedder.proj.weight", (d, args.in_channels, p, p)),
        TensorSpec("x_embedder.proj.bias", (d,)),
    ]
    out += _linear("t_embedder.mlp.0", d, 256) + _linear("t_embedder.mlp.2", d, d)
    out += [
        TensorSpec(
            "y_embedder.embedding_table.weight", (args.num_classes + int(args.class_dropout_prob > 0), d)
        )
    ]
    for i in range(args.depth):
        b = f"blocks.{i}"
        out += _norm_params(f"{b}.norm1", d, args.use_rmsnorm) + _linear(f"{b}.attn.qkv", 3 * d, d)
        if args.use_qknorm:
            for qk in ("q_norm", "k_norm"):
                out += [TensorSpec(f"{b}.attn.{qk}.weight", (hd,))]
                out += [] if args.use_rmsnorm else [TensorSpec(f"{b}.attn.{qk}.bias", (hd,))]
        out += _linear(f"{b}.attn.proj", d, d) + _norm_params(f"{b}.norm2", d, args.use_rmsnorm)
        h = args.ffn_hidden
        if args.use_swiglu:
            out += _linear(f"{b}.mlp.w12", 2 * h, d) + _linear(f"{b}.mlp.w3", d, h)
        else:
            out += _linear(f"{b}.mlp.fc1", h, d) + _linear(f"{b}.mlp.fc2", d, h)
        out += _linear(f"{b}.adaLN_modulation.1", 6 * d, d)
    out += _norm_params("final_layer.norm_final", d, args.use_rmsnorm)
    out += _linear("final_layer.linear", p * p * args.out_channels, d)
    out += _linear("final_layer.adaLN_modulation.1", 2 * d, d)
    buffers = (
        [TensorSpec(f"feat_rope.freqs_{f}", (args.num_tokens, hd), trainable=False) for f in ("cos", "sin")]
        if args.use_rope
        else []
    )
    return out, buffers


# ----------------------------------------------------------------------------------------------------------
# FLOPs


@dataclass(frozen=True)
class FlopCount:
    """FLOPs of one sample (a multiply-add counts 2). Only matmuls, convolutions and the two attention
    products are counted; norms, activations, RoPE and softmax (O(T·D) each) are left out, as is usual for
    MFU (PaLM appendix B)."""

    forward: int
    """One forward pass."""
    backward: int
    """One backward pass: input and weight gradients of every matmul (2x its forward) except the input
    gradients nobody needs: the patch-embed conv's and the first timestep-MLP layer's (their inputs are
    data). Attention: 2x forward for dQ·K / dK·Q and 2x for dA·V / dV."""
    recompute: int
    """The forward of the blocks again in the backward pass, when activation checkpointing is on; else 0."""

    @property
    def train(self) -> int:
        """forward + backward + recompute: ≈ 3x forward, ≈ 4x with checkpointing."""
        return self.forward + self.backward + self.recompute


def lightningdit_flops(args: LightningDiTArgs, grad_checkpointing: bool = False) -> FlopCount:
    """Analytic FLOPs per sample of `LightningDiT(args)`; matches `torch.utils.flop_counter` exactly."""
    d, t, p = args.hidden_size, args.num_tokens, args.patch_size
    h = args.ffn_hidden
    patch = 2 * t * args.in_channels * p * p * d
    temb_first = 2 * 256 * d
    temb = temb_first + 2 * d * d
    ffn = 2 * t * d * (2 * h + h) if args.use_swiglu else 2 * t * d * 2 * h
    attn_core = 2 * 2 * t * t * d  # QK^T and A·V over all heads
    block = 2 * d * 6 * d + 2 * t * d * 3 * d + attn_core + 2 * t * d * d + ffn
    final = 2 * d * 2 * d + 2 * t * d * p * p * args.out_channels
    blocks = args.depth * block
    forward = patch + temb + blocks + final
    backward = 2 * forward - patch - temb_first
    return FlopCount(forward=forward, backward=backward, recompute=blocks if grad_checkpointing else 0)
