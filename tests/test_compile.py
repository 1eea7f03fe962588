"""Regional torch.compile of the LightningDiT (models/compile.py, issue #19): same numbers as eager mode,
the module's own state_dict keys, one graph for all blocks, under checkpointing and a DeepSpeed engine.

Inductor builds C++ kernels with the system compiler, so these run on CPU. Every test uses the same tiny
architecture and batch, so the graphs compiled by the first test serve the others (dynamo's cache is per
code object, not per model; inductor's FX graph cache also survives `torch._dynamo.reset()`).

Tolerance. fp32 on CPU, error of a tensor = max|compiled - eager| / max|eager|. Measured on 4 seeds, with
and without checkpointing: at most 2.1e-7 on the output and 6.8e-7 on a parameter gradient (inductor fuses
the block and reorders its reductions: the norms, the bias gradients). TOL = 5e-6 is 7x that. A change of
the math is far larger: modulate with shift and scale swapped (a wrong chunk order) moves the output by
0.10, 2e4 x TOL. A modulate rounded through bf16 (~2e-3) would be a subtler slip, but inductor does not
show it: it keeps fused intermediates in fp32 (`emulate_precision_casts` is off) and drops the round trip.
"""

from __future__ import annotations

import copy
from dataclasses import replace

import pytest
import torch
from torch._dynamo.utils import counters

import models.lightningdit as ldit
from models.compile import compile_regions, is_compiled
from models.flow import FlowArgs, RectifiedFlow
from models.lightningdit import LightningDiT, lightningdit_args

TOL = 5e-6
ARGS = lightningdit_args("T/1", in_channels=4, input_size=8, num_classes=10)  # 2 blocks x 64, 64 tokens
B = 4


def make_model(seed: int = 0, **overrides: object) -> LightningDiT:
    """A tiny LightningDiT whose zero-initialised weights (adaLN, final layer, biases) are random: a fresh
    model outputs exactly 0 and only its last layer gets gradients, which would compare nothing."""
    torch.manual_seed(seed)
    model = LightningDiT(replace(ARGS, **overrides))
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad and not p.any():
                p.normal_(std=0.1)
    return model


def make_batch(seed: int = 100, batch: int = B) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 4, 8, 8, generator=g)  # (B, C, H, W)
    t = torch.rand(batch, generator=g)
    y = torch.randint(0, 10, (batch,), generator=g)
    drop = torch.arange(batch) % 3 == 1  # some labels null, no RNG draw
    return x, t, y, drop


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual - expected).abs().max() / expected.abs().max()).item()


def fwd_bwd(model: LightningDiT, batch: tuple, ckpt: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Output and every trainable parameter's gradient of one training-mode forward and backward."""
    model.train().set_grad_checkpointing(ckpt)
    model.zero_grad(set_to_none=True)
    x, t, y, drop = batch
    out = model(x, t, y, drop_mask=drop)
    out.square().mean().backward()
    return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.fixture(scope="module")
def pair() -> tuple[LightningDiT, LightningDiT]:
    """(eager, compiled), with the same weights."""
    eager = make_model()
    return eager, compile_regions(copy.deepcopy(eager))


@pytest.mark.parametrize("ckpt", [False, True], ids=["plain", "grad-checkpointing"])
def test_compiled_forward_and_backward_equal_eager(pair, ckpt):
    eager, compiled = pair
    batch = make_batch()
    out_e, grads_e = fwd_bwd(eager, batch, ckpt)
    out_c, grads_c = fwd_bwd(compiled, batch, ckpt)
    assert out_e.abs().max() > 0.5  # a real output, not the zero of a fresh model
    assert rel_err(out_c, out_e) < TOL
    assert grads_c.keys() == grads_e.keys() and len(grads_e) == len(list(eager.parameters())) - 1  # pos_embed
    errs = {n: rel_err(grads_c[n], grads_e[n]) for n in grads_e}
    assert min(g.abs().max().item() for g in grads_e.values()) > 1e-3  # every parameter gets a gradient
    assert max(errs.values()) < TOL, max(errs.items(), key=lambda kv: kv[1])
    graphs = counters["stats"]["unique_graphs"]
    fwd_bwd(compiled, batch, not ckpt)  # with checkpointing or without: the same graphs
    assert counters["stats"]["unique_graphs"] == graphs


def test_a_wrong_modulate_in_the_compiled_region_fails_the_comparison(pair, monkeypatch):
    """modulate with shift and scale swapped (a wrong chunk order): dynamo's guard on the global `_modulate`
    recompiles the blocks with it, and the comparison with the right math fails by far."""
    eager, compiled = pair
    x, t, y, drop = make_batch()
    expected = eager.train()(x, t, y, drop_mask=drop).detach()
    good = compiled.train()(x, t, y, drop_mask=drop).detach()  # training-mode graphs: compiled already

    def swapped_modulate(x, shift, scale):
        return x * (1 + shift.unsqueeze(1)) + scale.unsqueeze(1)

    monkeypatch.setattr(ldit, "_modulate", swapped_modulate)  # the eager final layer calls it too
    wrong = compiled(x, t, y, drop_mask=drop).detach()  # forward only: inductor compiles backward lazily
    wrong_eager = eager(x, t, y, drop_mask=drop).detach()
    assert rel_err(good, expected) < TOL
    assert rel_err(wrong, wrong_eager) < TOL  # the compiled blocks swapped as well, not only the final layer
    assert rel_err(wrong, expected) > 1000 * TOL


def test_state_dict_keys_are_the_modules_own_and_load_both_ways(pair, tmp_path):
    eager, compiled = pair
    assert is_compiled(compiled) and not is_compiled(eager)
    assert list(compiled.state_dict()) == list(eager.state_dict())
    assert not any("_orig_mod" in k for k in compiled.state_dict())
    calls = [m._compiled_call_impl for m in compiled.modules()]
    assert compile_regions(compiled) is compiled  # idempotent: nothing is compiled again
    assert [m._compiled_call_impl for m in compiled.modules()] == calls
    assert not is_compiled(copy.deepcopy(compiled))  # a copy (e.g. an EMA) is eager

    fresh_eager, fresh_compiled = LightningDiT(ARGS), compile_regions(LightningDiT(ARGS))
    torch.save(compiled.state_dict(), tmp_path / "compiled.pt")
    torch.save(eager.state_dict(), tmp_path / "eager.pt")
    fresh_eager.load_state_dict(torch.load(tmp_path / "compiled.pt"), strict=True)
    fresh_compiled.load_state_dict(torch.load(tmp_path / "eager.pt"), strict=True)
    x, t, y, drop = make_batch(seed=7)
    out = eager.train()(x, t, y, drop_mask=drop)  # training mode: the graphs the tests above compiled
    assert torch.equal(fresh_eager.train()(x, t, y, drop_mask=drop), out)
    assert rel_err(fresh_compiled.train()(x, t, y, drop_mask=drop), out) < TOL


def test_deepspeed_zero2_steps_match_eager_and_save_plain_keys(world_of_one, tmp_path):
    """The trainer's order: set_grad_checkpointing, compile_regions, then the DeepSpeed engine."""
    from trainer.engine import build_engine, deepspeed_config

    flow = RectifiedFlow(FlowArgs(t_sampling="logit_normal"))
    data = [make_batch(seed=s) for s in (1, 2)]
    noise = [torch.randn(B, 4, 8, 8, generator=torch.Generator().manual_seed(s)) for s in (3, 4)]
    losses, engines = {}, {}
    for kind in ("eager", "compiled"):
        model = make_model()
        model.set_grad_checkpointing(True)
        if kind == "compiled":
            compile_regions(model)
        cfg = deepspeed_config(micro_batch=B, grad_accum=1, world_size=1, dtype=torch.float32, grad_clip=0.0,
                               zero_stage=2)  # fmt: skip
        engine = build_engine(model, list(model.parameters()), lr=1e-3, betas=(0.9, 0.95), eps=1e-8,
                              weight_decay=0.0, warmup_steps=0, ds_config=cfg)  # fmt: skip
        losses[kind] = []
        for (x1, t, y, drop), n in zip(data, noise):
            loss = flow.loss(lambda x_, t_, y_: engine(x_, t_, y_, drop_mask=drop), x1, y, noise=n, t=t)  # noqa: B023
            engine.backward(loss.total)
            engine.step()
            losses[kind].append(loss.total.item())
        engines[kind] = engine
    eager_losses, compiled_losses = torch.tensor(losses["eager"]), torch.tensor(losses["compiled"])
    assert eager_losses[0] != eager_losses[1]  # the step changed the weights
    assert rel_err(compiled_losses, eager_losses) < TOL, (losses["compiled"], losses["eager"])

    engines["compiled"].save_checkpoint(str(tmp_path), tag="step2")
    saved = torch.load(tmp_path / "step2" / "mp_rank_00_model_states.pt", weights_only=False)["module"]
    assert list(saved) == list(LightningDiT(ARGS).state_dict())
    del engines


def test_one_graph_serves_all_blocks_and_a_new_batch_size_recompiles_once():
    """12 compiled blocks, 4 batch sizes in training mode: 2 graphs. The new size's graph (batch dimension
    symbolic, as for a smaller last micro batch) also gives the eager numbers."""
    torch._dynamo.reset()
    counters.clear()
    eager = make_model(depth=12)
    model = compile_regions(copy.deepcopy(eager))
    for batch, graphs in [(B, 1), (B + 2, 2), (B + 1, 2), (B, 2)]:
        out, grads = fwd_bwd(model, make_batch(batch=batch), ckpt=False)
        # one graph for the 12 blocks, not 12; the second batch size adds one with the batch dimension
        # symbolic, the third reuses it.
        assert counters["stats"]["unique_graphs"] == graphs, (batch, dict(counters["stats"]))
        if batch == B + 1:
            out_e, grads_e = fwd_bwd(eager, make_batch(batch=batch), ckpt=False)
            assert rel_err(out, out_e) < TOL
            assert max(rel_err(grads[n], grads_e[n]) for n in grads) < TOL
    assert not counters["graph_break"]
