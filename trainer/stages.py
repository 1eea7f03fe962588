"""The VA-VAE stage chain (reference §1.4: three stages, "each initialised from the previous stage").

A stage starts from the previous stage's export (`init_from`): the autoencoder, and the training extras
its losses use, the VF projection and the PatchGAN (:func:`stage_uses`). The reference's `init_weight`
loads non-strictly inside a bare try/except, so a missing part silently stays random (§1.4 "Quirk");
here a source lacking a part the stage uses is refused (:class:`~trainer.export.InitFromError`), and an
export leaves out a part that never left its random initialisation (:func:`trained_extras`, recorded in
each checkpoint's meta as `extras`), so no later stage takes it for trained.
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from models.export import load_vavae
from models.vavae import VF_PROJECTION_KEY, AutoencoderKL, load_reference_checkpoint
from models.weights import read_state_dict
from trainer.config import TrainVAVAEConfig
from trainer.export import DISC_PREFIX, EXTRA_PARTS, TRAINING_EXTRAS, InitFromError


def gan_steps(clock: str, step: int) -> tuple[int, int]:
    """The global_step the AE loss and the D loss compare with disc_start at iteration `step` (0-based).

    The reference optimises manually with two optimizers in Lightning, whose global_step counts every
    optimizer step: 2·step at the AE loss, 2·step + 1 at the D loss (`lightning`). `step` counts iterations.
    """
    return (2 * step, 2 * step + 1) if clock == "lightning" else (step, step)


def gan_on_from(clock: str, disc_start: int) -> int:
    """The first iteration whose discriminator loss is on (its clock, :func:`gan_steps`, reaches disc_start)."""
    return max(0, disc_start // 2 if clock == "lightning" else disc_start)


def stage_uses(cfg: TrainVAVAEConfig, steps: int | None = None) -> dict[str, str]:
    """The training extras this stage's losses use in its first `steps` iterations (default: all of them),
    each with the settings that make it so (§1.2-1.4).

    - `linear_proj`: the VF loss is on, `loss.use_vf` with `loss.vf_weight` > 0 (the projection is trained,
      or used as it is under `loss.proj_fix`). With `vf_weight` 0 the VF term is multiplied by 0 and the
      projection gets no gradient.
    - `discriminator`: the GAN turns on before the stage ends: the D loss's clock reaches `loss.disc_start`
      at an iteration < `steps` (on the Lightning clock one iteration before the generator term). A stage
      that ends before that never trains the discriminator, nor lets it reach the autoencoder.
    """
    c, steps = cfg.loss, cfg.steps if steps is None else steps
    uses = {}
    if c.use_vf and c.vf_weight > 0 and steps > 0:
        uses["linear_proj"] = f"the VF loss is on (loss.use_vf=true, loss.vf_weight={c.vf_weight})"
    first = gan_on_from(c.disc_start_clock, c.disc_start)
    if first < steps:
        uses["discriminator"] = (
            f"the GAN is on from iteration {first} of steps={steps} "
            f"(loss.disc_start={c.disc_start} on the {c.disc_start_clock} clock)"
        )
    return uses


def load_init(
    path: str, autoencoder: AutoencoderKL, proj: nn.Module | None, disc: nn.Module, uses: dict[str, str]
) -> tuple[str, set[str]]:
    """Start from a previous stage (§1.4): an export folder (autoencoder + training extras) or a reference
    checkpoint file (its `linear_proj.weight` and `loss.discriminator.*` too, when present).

    Raises :class:`InitFromError` when the source lacks a part in `uses` (:func:`stage_uses`). A part the
    stage does not use that the source lacks starts from random weights, and the message says so.
    Returns (the message, the training extras loaded).
    """
    p = Path(path)
    if p.is_dir():
        autoencoder.load_state_dict(load_vavae(p).state_dict(), strict=True)
        source = p / TRAINING_EXTRAS
        extras = read_state_dict(source) if source.is_file() else None
    else:
        source, extras = p, read_state_dict(p)
        load_reference_checkpoint(extras, autoencoder, proj)
    held = extras or {}
    d_state = {k.removeprefix(DISC_PREFIX): v for k, v in held.items() if k.startswith(DISC_PREFIX)}
    found = {"linear_proj": VF_PROJECTION_KEY in held, "discriminator": bool(d_state)}
    missing = [part for part in uses if not found[part]]
    if missing:
        keys = {"linear_proj": VF_PROJECTION_KEY, "discriminator": f"{DISC_PREFIX}*"}
        what = "; ".join(f"the {part} ({keys[part]}), as {uses[part]}" for part in missing)
        lacks = " and no ".join(keys[part] for part in missing)
        there = "the file does not exist" if extras is None else f"it holds no {lacks}"
        raise InitFromError(
            f"init_from={path} lacks what this stage uses, which would start from random weights: {what}. "
            f"Looked in {source}: {there}. Point init_from at an export of the previous stage written by "
            f"`ldit export run.name=<previous run>` or by the end of its training (both write {TRAINING_EXTRAS} "
            "with every part that run trained), or at a reference training checkpoint with these keys"
        )
    loaded = set()
    if proj is not None and found["linear_proj"]:
        proj.load_state_dict({"weight": held[VF_PROJECTION_KEY]}, strict=True)
        loaded.add("linear_proj")
    if d_state:
        disc.load_state_dict(d_state, strict=True)
        loaded.add("discriminator")
    carried = ["autoencoder"] + [part for part in EXTRA_PARTS if part in loaded]
    notes = [
        f"; the {part} is not in {source} and starts from random weights (this stage does not use it yet)"
        for part in EXTRA_PARTS
        if not found[part] and (part == "discriminator" or proj is not None)
    ]
    return f"initialised {', '.join(carried)} from {path}" + "".join(notes), loaded


def trained_extras(cfg: TrainVAVAEConfig, step: int, loaded: set[str]) -> list[str]:
    """The training extras that hold real weights after `step` iterations: loaded from init_from (or held
    by the checkpoint resumed from), or used by the losses of an iteration so far (:func:`stage_uses`)."""
    return sorted(loaded | set(stage_uses(cfg, step)))
