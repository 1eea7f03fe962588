"""Stage 0 at one rank in fp32 (trainer.engine.engine_stage), and checkpoints that change stage on resume
(trainer/stage_change.py): real `ldit train` runs, one rank, gloo, CPU."""

from __future__ import annotations

import json

import pytest
import torch

from tests.test_train_dit import final_weights, latents, log, losses, module_weights, train  # noqa: F401
from trainer.stage_change import describe, resume_route

SKIP = "nonfinite=skip"
"""At one rank in fp32 this keeps ZeRO-2 (skipping needs ZeRO's overflow check): the other stage."""
WARM = "optim.warmup_steps=10"
"""Warmup through the resume: the learning rate of the first resumed step must be the scheduler's."""


def stage_of(root, name: str, step: int) -> int:
    return json.loads((root / name / "checkpoints" / f"step-{step:08d}" / "meta.json").read_text())[
        "zero_stage"
    ]


@pytest.fixture(scope="module")
def one_rank(latents, tmp_path_factory):  # noqa: F811
    """Uninterrupted one-rank runs of 6 steps: `straight` at stage 0, `zero2` at ZeRO-2 (nonfinite=skip)."""
    root = tmp_path_factory.mktemp("one")
    train(latents, root, "straight", "steps=6", "ckpt.every=3", WARM, local=1)
    train(latents, root, "zero2", "steps=6", "ckpt.every=3", WARM, SKIP, local=1)
    return root


def test_routes():
    assert resume_route({"world_size": 1, "zero_stage": 0}, 1, 0) == "exact"
    assert resume_route({"world_size": 2, "zero_stage": 2}, 2, 2) == "exact"
    assert resume_route({"world_size": 2, "zero_stage": 2}, 4, 2) == "universal"
    assert resume_route({"world_size": 2}, 4, 2) == "universal"  # before meta.json recorded the stage run
    assert resume_route({"world_size": 1}, 1, 0) == "whole"  # a one-rank ZeRO-2 checkpoint of before
    assert resume_route({"world_size": 1, "zero_stage": 0}, 2, 2) == "whole"
    assert resume_route({"world_size": 2, "zero_stage": 2}, 1, 0) == "whole"
    assert resume_route({"world_size": 2, "zero_stage": 0}, 1, 0) == "whole"  # stage 0 at W=2, asked for
    assert describe("whole", {"world_size": 2, "zero_stage": 2}, 1, 0) == (
        " (from ZeRO stage 2 at world size 2 to stage 0 at world size 1: whole tensors)"
    )


def test_one_rank_in_fp32_runs_stage_0_and_says_so(latents, one_rank, tmp_path):  # noqa: F811
    """Stage 0 at one rank in fp32: no ZeRO partition files, the stage in meta.json and ds_config.json;
    bf16 and nonfinite=skip keep ZeRO-2 (fp32 accumulation, the overflow check)."""
    ck = one_rank / "straight" / "checkpoints" / "step-00000003"
    assert stage_of(one_rank, "straight", 3) == 0
    assert (
        json.loads((one_rank / "straight" / "ds_config.json").read_text())["zero_optimization"]["stage"] == 0
    )
    assert sorted(p.name for p in (ck / "model").iterdir()) == ["mp_rank_00_model_states.pt"]
    assert all(
        e["opt/grad_norm"] > 0 for e in log(one_rank, "straight")
    )  # our pre-hook's norm, every log step
    for name, setting in (("bf16", "precision=bf16"), ("skip", SKIP)):
        train(latents, tmp_path, name, "steps=1", setting, local=1)
        assert stage_of(tmp_path, name, 1) == 2, name


@pytest.mark.parametrize("first,second", [("", SKIP), (SKIP, "")])
def test_changing_stage_at_one_rank_resumes_bit_for_bit(latents, one_rank, tmp_path, first, second):  # noqa: F811
    """Steps 1-3 at one stage, 4-6 at the other, one rank, fp32: the losses, the module's weights and the
    EMA equal bit for bit those of the uninterrupted run at the second stage. (The two stages' own runs
    differ by rounding from step 4 on, 2.3e-10 in one bias at step 6: fused AdamW over ZeRO's flat buffer
    rounds some elements otherwise than over each tensor. That difference is what this test sees when the
    resume takes the wrong weights or moments.) From a ZeRO-2 checkpoint the whole tensors come from its
    universal conversion; from a stage-0 one, from the torch optimizer's state."""
    train(latents, tmp_path, "changed", "steps=3", "ckpt.every=3", WARM, *[s for s in (first,) if s], local=1)
    proc = train(
        latents, tmp_path, "changed", "steps=6", "ckpt.every=3", WARM, *[s for s in (second,) if s], local=1
    )
    a, b = (0, 2) if first == "" else (2, 0)
    assert stage_of(tmp_path, "changed", 3) == a and stage_of(tmp_path, "changed", 6) == b
    assert (
        f"at step 3 (from ZeRO stage {a} at world size 1 to stage {b} at world size 1: whole tensors)"
        in proc.stdout
    )
    ref = "straight" if b == 0 else "zero2"
    assert losses(tmp_path, "changed") == losses(one_rank, ref) == losses(one_rank, "straight")
    ma, mb = module_weights(one_rank, ref, 6), module_weights(tmp_path, "changed", 6)
    assert all(torch.equal(ma[k], mb[k]) for k in ma)
    ea, eb = final_weights(one_rank, ref), final_weights(tmp_path, "changed")
    assert all(torch.equal(ea[k], eb[k]) for k in ea)
    assert (tmp_path / "changed" / "checkpoints" / "step-00000003" / "model_universal").is_dir() == (a == 2)


def test_inspect_knows_a_stage_0_checkpoint(one_rank, tmp_path, capsys):
    """`ldit inspect checkpoint` on a one-rank fp32 run: stage 0 in the topology, resumable at 2 ranks
    through whole tensors with nothing to convert; an unfinished save asks for no ZeRO partition file."""
    import shutil

    from slurm.inspect import main

    run = tmp_path / "straight"
    shutil.copytree(one_rank / "straight", run)
    assert main(["checkpoint", str(run), "--world-size", "2", "--world-size", "1"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert "accumulation 1, ZeRO stage 0, dtype float32 (cpu)" in out[2]
    assert (
        "  resumable at world size 2: yes, via whole tensors (ZeRO stage 0 → 2; 8 samples per rank = micro batch 8 × 1)"
        in out
    )
    assert (
        "  resumable at world size 1: yes, exact (same world size; 16 samples per rank = micro batch 16 × 1)"
        in out
    )
    ck = run / "checkpoints" / "step-00000006"
    (run / "checkpoints" / "latest").write_text("step-00000003")
    for name in ("meta.json", "ema.safetensors"):
        (ck / name).unlink()
    assert main(["checkpoint", str(ck)]) == 1
    needed = [line for line in capsys.readouterr().out.splitlines() if "also needs" in line]
    assert needed == ["  a complete dit checkpoint at world size 1 also needs: meta.json, ema.safetensors"]
