"""EMA against its closed form; fp32 storage, reference keys (fact sheet §3.2, §8.1)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from models.ema import EMA
from models.lightningdit import LightningDiT, lightningdit_args


def _tiny() -> LightningDiT:
    torch.manual_seed(0)
    return LightningDiT(lightningdit_args("T/1", input_size=4, in_channels=4, num_classes=10))


def test_closed_form_after_k_updates() -> None:
    """e_k = d^k·e_0 + (1 − d)·Σ_{j=1..k} d^(k−j)·p_j, evaluated in float64."""
    model, decay, k = nn.Linear(3, 2), 0.9, 7
    ema = EMA(model, decay=decay)
    e0 = model.weight.detach().double().clone()
    history = []
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _ in range(k):
            model.weight.copy_(torch.randn(2, 3, generator=g))
            history.append(model.weight.detach().double().clone())
            ema.update(model)
    expected = decay**k * e0 + (1 - decay) * sum(decay ** (k - j) * p for j, p in enumerate(history, start=1))
    torch.testing.assert_close(ema.params["weight"].double(), expected, atol=1e-6, rtol=1e-6)


def test_constant_target_converges_geometrically() -> None:
    """With a fixed parameter p: e_k − p = d^k·(e_0 − p)."""
    model = nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(0.0)
    ema = EMA(model, decay=0.99)
    with torch.no_grad():
        model.weight.fill_(1.0)
    for _ in range(100):
        ema.update(model)
    assert ema.params["weight"].item() == pytest.approx(1 - 0.99**100, rel=1e-5)


def test_default_decay_is_the_reference() -> None:
    assert EMA(nn.Linear(1, 1)).decay == 0.9999
    with pytest.raises(ValueError, match="decay must be in"):
        EMA(nn.Linear(1, 1), decay=1.5)


def test_stays_fp32_for_a_bf16_model_and_keeps_small_updates() -> None:
    model = nn.Linear(4, 4).to(torch.bfloat16)
    with torch.no_grad():
        model.weight.fill_(1.0)
    ema = EMA(model, decay=0.9999)
    assert all(v.dtype == torch.float32 for v in ema.state_dict().values())
    with torch.no_grad():
        model.weight.fill_(1.0078125)  # the next bf16 number after 1
    ema.update(model)
    assert ema.params["weight"].dtype == torch.float32
    # 1 + 1e-4 · 0.0078125 = 1.00000078: lost in bf16 (spacing 0.0078), kept in fp32 (spacing 1.2e-7).
    assert ema.params["weight"][0, 0].item() == pytest.approx(1 + 1e-4 * 0.0078125, abs=2e-7)
    assert ema.params["weight"][0, 0].item() != 1.0


def test_state_dict_has_the_model_keys_and_loads_strictly() -> None:
    model = _tiny()
    ema = EMA(model)
    sd = ema.state_dict()
    assert list(sd) == list(model.state_dict())
    assert {
        "pos_embed",
        "feat_rope.freqs_cos",
        "feat_rope.freqs_sin",
        "y_embedder.embedding_table.weight",
    } <= set(sd)
    fresh = LightningDiT(model.args)
    fresh.load_state_dict(sd, strict=True)
    other = EMA(fresh)
    other.load_state_dict(sd)
    with pytest.raises(KeyError, match=r"missing \['pos_embed'\]"):
        other.load_state_dict({k: v for k, v in sd.items() if k != "pos_embed"})


def test_covers_frozen_pos_embed_and_copies_buffers() -> None:
    model = _tiny()
    ema = EMA(model, decay=0.5)
    with torch.no_grad():
        model.pos_embed.add_(2.0)  # frozen (requires_grad=False) but averaged, as the reference
        model.feat_rope.freqs_cos.fill_(3.0)
    before = ema.params["pos_embed"].clone()
    ema.update(model)
    torch.testing.assert_close(ema.params["pos_embed"], before + 1.0)
    assert torch.equal(ema.buffers["feat_rope.freqs_cos"], torch.full_like(model.feat_rope.freqs_cos, 3.0))


def test_copy_to_writes_the_average_into_a_model() -> None:
    model = _tiny()
    ema = EMA(model, decay=0.5)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    ema.update(model)
    target = LightningDiT(model.args).to(torch.bfloat16)
    ema.copy_to(target)
    for name, p in target.named_parameters():
        assert p.dtype == torch.bfloat16
        torch.testing.assert_close(p.float(), ema.params[name].to(torch.bfloat16).float())
    target_fp32 = LightningDiT(model.args)
    ema.copy_to(target_fp32)
    for name, p in target_fp32.named_parameters():
        assert torch.equal(p, ema.params[name])
