"""LightningDiT against the numbers of shared/reference/lightningdit.md (§2.1, §2.2, §8.1)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from models.lightningdit import (
    LIGHTNINGDIT_SIZES,
    LightningDiT,
    LightningDiTArgs,
    apply_rope,
    lightningdit_args,
    lightningdit_flops,
    rope_2d_angles,
)


def _meta_model(size: str, **overrides: object) -> LightningDiT:
    with torch.device("meta"):
        return LightningDiT(lightningdit_args(size, **overrides))


def _small_args(**overrides: object) -> LightningDiTArgs:
    """T/1 on an 8x8x4 latent: 64 tokens, fast on CPU."""
    return lightningdit_args("T/1", **{"input_size": 8, "in_channels": 4, "num_classes": 10, **overrides})


def _randomise(model: LightningDiT, seed: int) -> LightningDiT:
    """Give every trainable weight (the zero-initialised ones too) a random value, so outputs are not 0."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2 + (1.0 if "norm" in name else 0.0))
    return model


# ---------------------------------------------------------------------------------------------- sizes


def _param_count(depth: int, d: int, heads: int, patch: int, c: int = 32, grid: int = 16) -> tuple[int, int]:
    """Parameters by hand for the LightningDiT switches: (total, trainable); pos_embed is the frozen part."""
    t = (grid // patch) ** 2
    h = int(2 / 3 * (4 * d))
    block = (
        2 * d + (3 * d * d + 3 * d) + (d * d + d) + (d * 2 * h + 2 * h) + (h * d + d) + (d * 6 * d + 6 * d)
    )
    rest = (c * patch * patch * d + d) + (256 * d + d + d * d + d) + 1001 * d
    final = d + (d * patch * patch * c + patch * patch * c) + (d * 2 * d + 2 * d)
    trainable = depth * block + rest + final
    return trainable + t * d, trainable


# Table of §2.1, in millions, to its printed precision.
REFERENCE_MILLIONS = {"B/1": 130.56, "L/2": 458.15, "XL/1": 675.26, "1p0B/1": 1029.4, "1p6B/1": 1631.77}


@pytest.mark.parametrize("size", list(LIGHTNINGDIT_SIZES))
def test_parameter_counts_of_registry(size: str) -> None:
    model = _meta_model(size)
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    spec = LIGHTNINGDIT_SIZES[size]
    assert (total, trainable) == _param_count(
        spec["depth"], spec["hidden_size"], spec["num_heads"], spec["patch_size"]
    )
    if size in REFERENCE_MILLIONS:
        digits = len(str(REFERENCE_MILLIONS[size]).split(".")[1])
        assert round(total / 1e6, digits) == REFERENCE_MILLIONS[size]
    if size.endswith("/2") and size.replace("/2", "/1") in REFERENCE_MILLIONS:
        # The /2 twin shares its row of §2.1: pos_embed loses 192·D, the patch embed gains 96·D and the
        # final linear 96·(D + 1), so it has exactly 96 more parameters and rounds to the same number.
        assert total - sum(p.numel() for p in _meta_model(size.replace("/2", "/1")).parameters()) == 96
        twin = REFERENCE_MILLIONS[size.replace("/2", "/1")]
        assert round(total / 1e6, len(str(twin).split(".")[1])) == twin


def test_xl1_exact_parameter_count() -> None:
    model = _meta_model("XL/1")
    assert sum(p.numel() for p in model.parameters()) == 675_256_736
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 674_961_824
    assert not model.pos_embed.requires_grad


def _xl1_expected_shapes() -> dict[str, tuple[int, ...]]:
    """The key list of §8.1, written out."""
    d, hd = 1152, 72
    shapes: dict[str, tuple[int, ...]] = {
        "pos_embed": (1, 256, d),
        "x_embedder.proj.weight": (d, 32, 1, 1),
        "x_embedder.proj.bias": (d,),
        "t_embedder.mlp.0.weight": (d, 256),
        "t_embedder.mlp.0.bias": (d,),
        "t_embedder.mlp.2.weight": (d, d),
        "t_embedder.mlp.2.bias": (d,),
        "y_embedder.embedding_table.weight": (1001, d),
        "feat_rope.freqs_cos": (256, hd),
        "feat_rope.freqs_sin": (256, hd),
        "final_layer.norm_final.weight": (d,),
        "final_layer.linear.weight": (32, d),
        "final_layer.linear.bias": (32,),
        "final_layer.adaLN_modulation.1.weight": (2 * d, d),
        "final_layer.adaLN_modulation.1.bias": (2 * d,),
    }
    for i in range(28):
        b = f"blocks.{i}."
        shapes |= {
            b + "norm1.weight": (d,),
            b + "norm2.weight": (d,),
            b + "attn.qkv.weight": (3456, d),
            b + "attn.qkv.bias": (3456,),
            b + "attn.proj.weight": (d, d),
            b + "attn.proj.bias": (d,),
            b + "mlp.w12.weight": (6144, d),
            b + "mlp.w12.bias": (6144,),
            b + "mlp.w3.weight": (d, 3072),
            b + "mlp.w3.bias": (d,),
            b + "adaLN_modulation.1.weight": (6912, d),
            b + "adaLN_modulation.1.bias": (6912,),
        }
    return shapes


def test_xl1_state_dict_keys_and_shapes() -> None:
    sd = _meta_model("XL/1").state_dict()
    assert len(sd) == 351
    assert {k: tuple(v.shape) for k, v in sd.items()} == _xl1_expected_shapes()
    assert all(v.dtype == torch.float32 for v in sd.values())


def test_qknorm_adds_head_dim_weights() -> None:
    sd = _meta_model("XL/1", use_qknorm=True).state_dict()
    assert len(sd) == 351 + 2 * 28
    assert tuple(sd["blocks.3.attn.q_norm.weight"].shape) == (72,)
    assert tuple(sd["blocks.3.attn.k_norm.weight"].shape) == (72,)


def test_dit_switches_give_dit_layers() -> None:
    sd = _meta_model("B/2", use_swiglu=False, use_rmsnorm=False, use_rope=False).state_dict()
    assert tuple(sd["blocks.0.mlp.fc1.weight"].shape) == (3072, 768)
    assert tuple(sd["blocks.0.mlp.fc2.weight"].shape) == (768, 3072)
    assert not any("norm" in k or "feat_rope" in k for k in sd)  # affine-free LayerNorm, no RoPE tables


def test_size_errors_name_the_known_sizes() -> None:
    with pytest.raises(ValueError, match=r"Unknown LightningDiT size 'XL/3'; known sizes: B/1, B/2, L/2"):
        lightningdit_args("XL/3")
    with pytest.raises(ValueError, match=r"Unknown LightningDiTArgs field\(s\) \['dept'\]"):
        lightningdit_args("XL/1", dept=3)
    with pytest.raises(ValueError, match="head_dim 18 must be a multiple of 4"):
        lightningdit_args("XL/1", num_heads=64)
    with pytest.raises(ValueError, match="not divisible by patch_size 2"):
        lightningdit_args("XL/2", input_size=15)


def test_ffn_hidden_widths_of_section_2_1() -> None:
    widths = {s: lightningdit_args(s).ffn_hidden for s in ("B/1", "L/2", "XL/1", "1p0B/1", "1p6B/1")}
    assert widths == {"B/1": 2048, "L/2": 2730, "XL/1": 3072, "1p0B/1": 4096, "1p6B/1": 4778}


# ---------------------------------------------------------------------------------------------- init


def test_fresh_model_outputs_exactly_zero() -> None:
    torch.manual_seed(0)
    model = LightningDiT(_small_args()).train()
    out = model(torch.randn(3, 4, 8, 8), torch.rand(3), torch.tensor([0, 5, 10]))
    assert out.shape == (3, 4, 8, 8)
    assert torch.count_nonzero(out) == 0
    # and the inits that are not zero are: xavier / N(0, 0.02) / ones
    assert model.y_embedder.embedding_table.weight.std().item() == pytest.approx(0.02, rel=0.15)
    assert torch.equal(model.blocks[0].norm1.weight, torch.ones(64))
    assert model.blocks[0].attn.qkv.weight.abs().max() <= math.sqrt(6 / (64 + 192))


def test_output_shapes_patch2_and_learn_sigma() -> None:
    model = _randomise(LightningDiT(_small_args(patch_size=2, learn_sigma=True)), 0).eval()
    assert model.final_layer.linear.out_features == 2 * 2 * 8
    out = model(torch.randn(2, 4, 8, 8), torch.rand(2), torch.tensor([1, 2]))
    assert out.shape == (2, 4, 8, 8)


def test_label_dropout_only_in_training_and_null_is_num_classes() -> None:
    args = _small_args(class_dropout_prob=0.5)
    model = LightningDiT(args)
    emb = model.y_embedder
    assert emb.embedding_table.num_embeddings == 11
    y = torch.zeros(4000, dtype=torch.long)
    table = emb.embedding_table.weight
    emb.eval()
    assert torch.equal(emb(y), table[y])
    emb.train()
    torch.manual_seed(0)
    out = emb(y)
    is_null = (out == table[10]).all(dim=1)
    assert torch.equal(is_null | (out == table[0]).all(dim=1), torch.ones(4000, dtype=torch.bool))
    assert is_null.float().mean().item() == pytest.approx(0.5, abs=0.03)
    mask = torch.tensor([True, False, True, False])
    for mode in (True, False):  # an explicit mask applies in both modes, like the reference's force_drop_ids
        emb.train(mode)
        assert torch.equal(emb(torch.tensor([3, 4, 5, 6]), mask), table[torch.tensor([10, 4, 10, 6])])
    no_null = LightningDiT(_small_args(class_dropout_prob=0.0)).y_embedder
    assert no_null.embedding_table.num_embeddings == 10
    with pytest.raises(ValueError, match="drop_mask needs a null label, but class_dropout_prob is 0"):
        no_null(torch.tensor([1]), torch.tensor([True]))


# ---------------------------------------------------------------------------------------------- positions


def test_pos_embed_layout_w_first() -> None:
    """§2.2: token h·G + w; concat[1-D(D/2, w), 1-D(D/2, h)], each [sin, cos], ω_k = 1e4^(-k/(D/4))."""
    model = LightningDiT(_small_args())
    pe = model.pos_embed[0]  # (64, 64)
    d, g = 64, 8
    for h, w in [(0, 0), (2, 5), (7, 1)]:
        row = pe[h * g + w]
        for k in range(d // 4):
            om = 10000 ** (-k / (d / 4))
            assert row[k].item() == pytest.approx(math.sin(w * om), abs=1e-6)
            assert row[d // 4 + k].item() == pytest.approx(math.cos(w * om), abs=1e-6)
            assert row[d // 2 + k].item() == pytest.approx(math.sin(h * om), abs=1e-6)
            assert row[3 * d // 4 + k].item() == pytest.approx(math.cos(h * om), abs=1e-6)


def test_rope_table_layout() -> None:
    """§2.2: θ_j = 1e4^(-2j/(hd/2)), repeated interleaved; dims [0, hd/2) use row h, [hd/2, hd) column w."""
    model = LightningDiT(_small_args())
    hd, g = 32, 8
    cos, sin = model.feat_rope.freqs_cos, model.feat_rope.freqs_sin
    assert cos.shape == sin.shape == (64, hd)
    for h, w in [(0, 0), (3, 6), (7, 7)]:
        for dim in range(hd):
            j = (dim % (hd // 2)) // 2
            pos = h if dim < hd // 2 else w
            angle = pos * 10000 ** (-2 * j / (hd / 2))
            assert cos[h * g + w, dim].item() == pytest.approx(math.cos(angle), abs=1e-6)
            assert sin[h * g + w, dim].item() == pytest.approx(math.sin(angle), abs=1e-6)
    state = model.state_dict()
    assert "feat_rope.freqs_cos" in state and "feat_rope.freqs_sin" in state


def test_rope_scores_depend_only_on_relative_position() -> None:
    g = torch.Generator().manual_seed(0)
    hd, n = 32, 20
    q, k = torch.randn(1, 1, n, hd, generator=g), torch.randn(1, 1, n, hd, generator=g)
    rows = torch.randint(0, 16, (n,), generator=g).float()
    cols = torch.randint(0, 16, (n,), generator=g).float()

    def scores(dr: float, dc: float) -> torch.Tensor:
        ang = rope_2d_angles(hd, rows + dr, cols + dc)
        cos, sin = ang.cos().float(), ang.sin().float()
        return apply_rope(q, cos, sin) @ apply_rope(k, cos, sin).transpose(-1, -2)  # (1, 1, n, n)

    base = scores(0, 0)
    for dr, dc in [(3, 0), (0, 5), (-2.5, 7.25), (11, 11)]:
        torch.testing.assert_close(scores(dr, dc), base, atol=1e-4, rtol=1e-5)
    assert not torch.allclose(base, q @ k.transpose(-1, -2), atol=1e-2)  # the rotation does act
    # The rotation is norm-preserving pairwise, and zero shift is the identity.
    ang = rope_2d_angles(hd, torch.zeros(n), torch.zeros(n))
    torch.testing.assert_close(apply_rope(q, ang.cos().float(), ang.sin().float()), q)


# ---------------------------------------------------------------------------------------------- forward


def _reference_forward(sd: dict[str, torch.Tensor], args: LightningDiTArgs, x, t, y) -> torch.Tensor:
    """Forward written from the equations of §2.2 and the row layouts of §8.1, with explicit loops."""
    d, p, g, c_in = args.hidden_size, args.patch_size, args.grid_size, args.in_channels
    heads, hd = args.num_heads, args.head_dim
    h_ffn = args.ffn_hidden
    lin = lambda v, name: v @ sd[name + ".weight"].T + sd[name + ".bias"]
    rms = lambda v, name: v * torch.rsqrt(v.pow(2).mean(-1, keepdim=True) + 1e-6) * sd[name + ".weight"]
    tok = F.conv2d(x, sd["x_embedder.proj.weight"], sd["x_embedder.proj.bias"], stride=p)
    tok = tok.flatten(2).transpose(1, 2) + sd["pos_embed"]  # (B, T, D)
    k = torch.arange(128)
    a = t[:, None] * torch.exp(-math.log(10000) * k / 128)[None]
    temb = lin(F.silu(lin(torch.cat([a.cos(), a.sin()], 1), "t_embedder.mlp.0")), "t_embedder.mlp.2")
    cond = temb + sd["y_embedder.embedding_table.weight"][y]
    pos_h = torch.arange(g).repeat_interleave(g).double()
    pos_w = torch.arange(g).repeat(g).double()

    def rope(v: torch.Tensor) -> torch.Tensor:  # (B, heads, T, hd)
        out = v.clone()
        for i in range(hd // 2):  # pair (2i, 2i+1)
            j = i % (hd // 4)
            pos = pos_h if i < hd // 4 else pos_w
            phi = (pos * 10000 ** (-2 * j / (hd / 2))).float()
            a0, a1 = v[..., 2 * i], v[..., 2 * i + 1]
            out[..., 2 * i] = a0 * phi.cos() - a1 * phi.sin()
            out[..., 2 * i + 1] = a1 * phi.cos() + a0 * phi.sin()
        return out

    for i in range(args.depth):
        b = f"blocks.{i}."
        mod = lin(F.silu(cond), b + "adaLN_modulation.1")
        sh1, sc1, g1, sh2, sc2, g2 = (mod[:, j * d : (j + 1) * d, None].transpose(1, 2) for j in range(6))
        hmod = rms(tok, b + "norm1") * (1 + sc1) + sh1
        qkv = lin(hmod, b + "attn.qkv")  # rows q | k | v, each split into heads
        q, kk, v = (
            qkv[..., j * d : (j + 1) * d].unflatten(-1, (heads, hd)).transpose(1, 2) for j in range(3)
        )
        q, kk = rope(q), rope(kk)
        att = torch.softmax(q @ kk.transpose(-1, -2) / math.sqrt(hd), dim=-1) @ v
        tok = tok + g1 * lin(att.transpose(1, 2).flatten(2), b + "attn.proj")
        hmod = rms(tok, b + "norm2") * (1 + sc2) + sh2
        w12 = lin(hmod, b + "mlp.w12")
        tok = tok + g2 * lin(F.silu(w12[..., :h_ffn]) * w12[..., h_ffn:], b + "mlp.w3")
    mod = lin(F.silu(cond), "final_layer.adaLN_modulation.1")
    shift, scale = mod[:, None, :d], mod[:, None, d:]
    out = lin(rms(tok, "final_layer.norm_final") * (1 + scale) + shift, "final_layer.linear")  # (B, T, p·p·C)
    img = torch.zeros(x.shape[0], c_in, g * p, g * p)
    for hh in range(g):
        for ww in range(g):
            patch = out[:, hh * g + ww].reshape(-1, p, p, c_in)  # (B, p, q, C)
            img[:, :, hh * p : (hh + 1) * p, ww * p : (ww + 1) * p] = patch.permute(0, 3, 1, 2)
    return img


@pytest.mark.parametrize("patch", [1, 2])
def test_forward_matches_equations_of_section_2_2(patch: int) -> None:
    args = _small_args(patch_size=patch)
    model = _randomise(LightningDiT(args), 1).eval()
    g = torch.Generator().manual_seed(2)
    x, t, y = torch.randn(2, 4, 8, 8, generator=g), torch.rand(2, generator=g), torch.tensor([3, 10])
    with torch.no_grad():
        ours = model(x, t, y)
        ref = _reference_forward(model.state_dict(), args, x, t, y)
    assert ours.abs().mean() > 0.1
    torch.testing.assert_close(ours, ref, atol=2e-5, rtol=1e-4)


def test_determinism_same_seed_same_weights_same_outputs() -> None:
    inits = []
    for seed in (123, 123, 124):
        torch.manual_seed(seed)
        inits.append(LightningDiT(_small_args()).state_dict())
    assert all(torch.equal(inits[0][k], inits[1][k]) for k in inits[0])  # the initialisation is seeded
    random_init = [k for k in inits[0] if not torch.equal(inits[0][k], inits[2][k])]
    assert "x_embedder.proj.weight" in random_init and "blocks.1.attn.qkv.weight" in random_init
    outs = []
    for _ in range(2):
        torch.manual_seed(123)
        model = _randomise(LightningDiT(_small_args()), 7).train()
        torch.manual_seed(5)  # label dropout draws from the global RNG
        outs.append(
            (model.state_dict(), model(torch.ones(4, 4, 8, 8), torch.full((4,), 0.3), torch.arange(4)))
        )
    assert all(torch.equal(outs[0][0][k], outs[1][0][k]) for k in outs[0][0])
    assert torch.equal(outs[0][1], outs[1][1])


def test_grad_checkpointing_gives_identical_loss_and_grads() -> None:
    results = []
    for ckpt in (False, True):
        model = _randomise(LightningDiT(_small_args(grad_checkpointing=ckpt)), 3).train()
        g = torch.Generator().manual_seed(4)
        x, t = torch.randn(3, 4, 8, 8, generator=g), torch.rand(3, generator=g)
        out = model(x, t, torch.tensor([1, 2, 3]), drop_mask=torch.tensor([False, True, False]))
        loss = out.square().mean()
        loss.backward()
        results.append(
            (loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
        )
    assert torch.equal(results[0][0], results[1][0])
    assert results[0][1].keys() == results[1][1].keys()
    for name in results[0][1]:
        assert torch.equal(results[0][1][name], results[1][1][name]), name


def test_grad_checkpointing_switch_is_runtime_and_training_only() -> None:
    model = LightningDiT(_small_args())
    assert model.grad_checkpointing is False
    model.set_grad_checkpointing(True)
    assert model.grad_checkpointing is True
    x, t, y = torch.randn(1, 4, 8, 8), torch.rand(1), torch.tensor([0])
    fwd = model.flops_per_sample(grad_checkpointing=False).forward
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as fc:
        model.eval()(x, t, y).sum().backward()  # eval mode: no recompute
    assert fc.get_total_flops() == fwd + model.flops_per_sample(grad_checkpointing=False).backward


# ---------------------------------------------------------------------------------------------- FLOPs


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"patch_size": 2, "learn_sigma": True, "use_qknorm": True},
        {"use_swiglu": False, "use_rmsnorm": False, "use_rope": False},
    ],
)
@pytest.mark.parametrize("ckpt", [False, True])
def test_flops_match_torch_flop_counter_exactly(overrides: dict, ckpt: bool) -> None:
    """Forward, backward and checkpoint recompute FLOPs equal FlopCounterMode's count (the math SDPA
    backend exposes the two attention matmuls to the counter; the CPU flash kernel is not counted)."""
    model = LightningDiT(_small_args(grad_checkpointing=ckpt, **overrides)).train()
    batch = 3
    x, t, y = torch.randn(batch, 4, 8, 8), torch.rand(batch), torch.tensor([0, 1, 2])
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as fc:
        out = model(x, t, y)
    fwd = fc.get_total_flops()
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as fc:
        out.square().sum().backward()
    bwd = fc.get_total_flops()
    flops = model.flops_per_sample()
    assert fwd == batch * flops.forward
    assert bwd == batch * (flops.backward + flops.recompute)
    assert (flops.recompute > 0) == ckpt
    assert flops.train == flops.forward + flops.backward + flops.recompute


def test_xl1_flops_are_the_usual_magnitude() -> None:
    """XL/1 forward ≈ 2·T·depth·D·(4D + 3H) + 4·T²·D·depth = 228.3 G + 8.5 G. Not 2·N·T: the adaLN layers
    (a third of the parameters) run once per sample, not once per token."""
    flops = lightningdit_flops(lightningdit_args("XL/1"))
    tokenwise = 2 * 256 * 28 * 1152 * (4 * 1152 + 3 * 3072)
    attention = 4 * 256**2 * 1152 * 28
    assert flops.forward == pytest.approx(tokenwise + attention, rel=0.005)
    assert flops.forward == 237_252_280_320
    assert flops.train / flops.forward == pytest.approx(3.0, abs=0.001)
    with_ckpt = lightningdit_flops(lightningdit_args("XL/1"), grad_checkpointing=True)
    assert with_ckpt.train / with_ckpt.forward == pytest.approx(4.0, abs=0.01)


def test_bf16_autocast_and_bf16_weights_run_close_to_fp32() -> None:
    """The reference trains under bf16 autocast (§3.2); DeepSpeed's bf16 mode runs bf16 weights."""
    model = _randomise(LightningDiT(_small_args()), 0).eval()
    x, t, y = torch.randn(2, 4, 8, 8), torch.rand(2), torch.tensor([1, 2])
    with torch.no_grad():
        ref = model(x, t, y)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            autocast = model(x, t, y)
        bf16 = model.to(torch.bfloat16)(x.bfloat16(), t, y)
    for out in (autocast, bf16):
        assert out.dtype == torch.bfloat16
        assert ((out.float() - ref).norm() / ref.norm()).item() < 0.1


@pytest.mark.parametrize(
    "overrides",
    [{}, {"use_qknorm": True, "patch_size": 2}, {"use_rope": False, "use_qknorm": True, "mlp_ratio": 2.0}],
)
def test_reference_checkpoint_file_loads_strictly(tmp_path, overrides) -> None:
    """A reference train.py file ({'model' with DDP's prefix, 'ema', 'opt', 'config'}, §8.1): its `ema`
    loads with strict=True into the architecture read off the shapes, and computes the same outputs."""
    from models.export import lightningdit_args_from_state_dict, load_lightningdit

    args = _small_args(**overrides)
    ema = _randomise(LightningDiT(args), 3).eval()
    sd = ema.state_dict()
    path = tmp_path / "0080000.pt"
    torch.save(
        {"model": {f"module.{k}": v + 1 for k, v in sd.items()}, "ema": sd,
         "opt": {"state": {0: {"exp_avg": torch.zeros(3)}}, "param_groups": [{"lr": 2e-4}]}, "config": {"a": 1}},
        path,
    )  # fmt: skip
    loaded = load_lightningdit(path).eval()
    assert loaded.args == lightningdit_args_from_state_dict(sd)
    assert (loaded.args.hidden_size, loaded.args.num_heads, loaded.args.depth) == (64, 2, 2)
    assert (loaded.args.patch_size, loaded.args.use_qknorm, loaded.args.use_rope, loaded.args.mlp_ratio) == (
        args.patch_size, args.use_qknorm, args.use_rope, args.mlp_ratio,
    )  # fmt: skip
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([0.2, 0.9]), torch.tensor([1, 10])
    with torch.no_grad():
        assert torch.equal(loaded(x, t, y), ema(x, t, y))


@pytest.mark.parametrize("size", ["B/1", "L/2", "XL/1", "1p6B/1"])
def test_architecture_read_off_registry_shapes(size: str) -> None:
    from models.export import lightningdit_args_from_state_dict

    assert lightningdit_args_from_state_dict(_meta_model(size).state_dict()) == lightningdit_args(size)


def test_reference_file_without_dit_weights_is_named(tmp_path) -> None:
    from models.export import load_lightningdit

    torch.save({"opt": {}, "config": {}}, tmp_path / "x.pt")
    with pytest.raises(
        ValueError,
        match=r"x.pt holds no LightningDiT weights: expected an 'ema' entry .* found \['config', 'opt'\]",
    ):
        load_lightningdit(tmp_path / "x.pt")
    with pytest.raises(FileNotFoundError, match="LightningDiT weights .*missing.pt do not exist"):
        load_lightningdit(tmp_path / "missing.pt")
