"""Regional `torch.compile` of a LightningDiT: each transformer block, compiled in place.

The reference decorates the forwards of `modulate`, TimestepEmbedder, LabelEmbedder, the block, FinalLayer
and the SwiGLU FFN with `@torch.compile` (lightningdit.md §2.2, the item after "Activation
checkpointing"; weights and numerics are unaffected). We compile module *instances* in place with
`nn.Module.compile`, so that:

- the state_dict keys stay the module's own (no `_orig_mod.` prefix; STYLE.md 8): the compiled callable
  is kept in the module's `_compiled_call_impl` attribute, not stored as a submodule;
- one graph serves every block: torch inlines nn modules (`inline_inbuilt_nn_modules`), so parameters
  are graph inputs and the dynamo cache lives on the code of `LightningDiTBlock.forward`, shared by all
  instances (tests/test_compile.py counts the graphs);
- activation checkpointing and DeepSpeed stay outside the compiled code: `LightningDiT.forward` is eager
  and wraps each compiled block in `torch.utils.checkpoint` itself.

Regions. `modulate` and the SwiGLU FFN run inside the block, so they are compiled with it. The three
small modules stay eager. Measured on this 2-core CPU (fp32, forward + backward, 12 blocks x 384 wide,
6 heads, 16x16 tokens, batch 8; eager and the compiled variants in interleaved rounds, medians of 8
rounds, two runs, 1 thread): compiled / eager = 0.85 and 0.85 with the blocks compiled, 0.85 and 0.84
with the timestep embedder and final layer too, 0.90 and 0.85 with the label embedder as well. With 2
threads the medians were 0.58 and 0.50 (blocks) against 0.57 and 0.50 (blocks, t, final), but other jobs
loaded the machine and eager steps took 1.3 to 13 s; the fastest rounds give 0.80 and 0.86. So the small
modules gain nothing measurable, and they cost compile time (about 6 s cold on top of the blocks' 16 s at
1 thread). On a GPU their eager cost is a few dozen kernel launches on (B, D) tensors and one (B, T, D)
norm, well under 1% of a step. The label embedder also draws `torch.rand` for label dropout when no
`drop_mask` is given, and inductor draws it from its own generator, not eager mode's.

Batch size. `dynamic=None` (torch's automatic dynamic shapes): the first batch size is compiled static;
a second one (a smaller last micro batch, a sampler's batch) recompiles once with the batch dimension
symbolic, and later sizes reuse that graph. Torch specialises batch size 1, which costs one more graph.
Training and `no_grad` calls have separate graphs. `recompile_limit` (8) caps the graphs per code
object, so there is room for these.

bf16. Inductor keeps fused intermediates in fp32 (`emulate_precision_casts` is off) where eager rounds
each op's output to bf16, so under bf16 compiled and eager steps differ by bf16 rounding. The tests
compare them in fp32.
"""

from __future__ import annotations

from models.lightningdit import LightningDiT

__all__ = ["compile_regions", "is_compiled"]


def compile_regions(model: LightningDiT, *, mode: str | None = None) -> LightningDiT:
    """Compile every transformer block of `model` in place; return `model`.

    `mode` is `torch.compile`'s (None: inductor's default). Idempotent: a block that is already compiled is
    left as it is, with the mode it was compiled with. Call it before handing the model to DeepSpeed.
    Activation checkpointing may be switched on or off before or after. A `copy.deepcopy` of the model is
    eager, because torch drops the compiled callable when it pickles a module.
    """
    for block in model.blocks:
        if block._compiled_call_impl is None:
            block.compile(mode=mode, dynamic=None)
    return model


def is_compiled(model: LightningDiT) -> bool:
    """Whether every block of `model` is compiled (by :func:`compile_regions`)."""
    return all(block._compiled_call_impl is not None for block in model.blocks)
