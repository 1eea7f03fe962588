"""VA-VAE training (trainer/vavae.py, reference §1.2-1.4): real 2-process `ldit train --local 2` runs on the
CPU with the tiny config, image shards from `ldit prep-images` and random pretrained weights in files.

Five runs in all (about 2 minutes on 2 cores): `a` (4 steps, the GAN switched on mid-run), `b` (2 steps,
then resumed to 4), and a stage chain from `a`: stage 2 with lr 0 (its export must equal its initial
weights) and stage 3 in bf16 with an EMA.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision

from models.export import load_vavae
from models.foundation import FoundationModel
from models.weights import read_state_dict
from slurm.config import ConfigError, load_config
from tests.conftest import ROOT, clean_env
from tests.data_fixtures import imagenet_folder
from trainer.config import TrainVAVAEConfig
from trainer.vavae import DISC_PREFIX, TRAINING_EXTRAS, gan_steps

TINY = ROOT / "configs" / "vavae" / "tiny_cpu.yaml"
AE_TERMS = ("total", "nll", "rec", "l1", "p", "kl", "logvar", "g", "d_weight", "disc_factor", "vf", "vf_mdms",
            "vf_mcos", "vf_weight")  # fmt: skip
D_TERMS = ("disc_loss", "logits_real", "logits_fake", "disc_factor")
OTHER_TAGS = (
    "perf/samples_per_s", "perf/samples_per_s_per_device", "perf/data_wait_s", "perf/step_time_s",
    "opt/autoencoder/lr", "opt/autoencoder/grad_norm", "opt/discriminator/lr", "opt/discriminator/grad_norm",
    "opt/skipped_steps", "sys/memory_gb", "sys/autoencoder/optimizer_state_mb_rank0",
    "sys/discriminator/optimizer_state_mb_rank0",
)  # fmt: skip


def vavae_inputs(root: Path) -> Path:
    """Image shards of 15 small JPEGs, and random DINOv2 ViT-S/14, VGG16 and LPIPS-head weight files, in `root`."""
    src = imagenet_folder(root / "src", per_class=4)
    cmd = [sys.executable, "-m", "slurm.cli", "prep-images", f"src={src}", f"out={root / 'images'}"]
    proc = subprocess.run(
        [*cmd, "shard_samples=3"], cwd=ROOT, env=clean_env(), capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    torch.manual_seed(0)
    dino = FoundationModel(timm_name="vit_small_patch14_dinov2", pretrained=False)
    torch.save(dino.model.state_dict(), root / "dino.pth")
    vgg = torchvision.models.vgg16(weights=None).features.state_dict()
    torch.save({f"features.{k}": v for k, v in vgg.items()}, root / "vgg16.pth")
    heads = {f"lin{i}.model.1.weight": torch.rand(1, c, 1, 1) for i, c in enumerate((64, 128, 256, 512, 512))}
    torch.save(heads, root / "heads.pth")
    return root


@pytest.fixture(scope="module")
def tmp(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return vavae_inputs(tmp_path_factory.mktemp("vavae"))


def train_proc(tmp: Path, name: str, *overrides: str, local: int = 2) -> subprocess.CompletedProcess:
    """`ldit train configs/vavae/tiny_cpu.yaml ... [--local N]` on the inputs in `tmp` (1: in this process's child)."""
    cmd = [
        sys.executable, "-m", "slurm.cli", "train", str(TINY), f"run.root={tmp / 'runs'}", f"run.name={name}",
        f"data.shards={tmp / 'images'}", f"loss.foundation_weights={tmp / 'dino.pth'}",
        f"loss.vgg16_weights={tmp / 'vgg16.pth'}", f"loss.lpips_weights={tmp / 'heads.pth'}", "log.every=1",
        *overrides, *(["--local", str(local)] if local > 1 else []),
    ]  # fmt: skip
    return subprocess.run(cmd, cwd=ROOT, env=clean_env(), capture_output=True, text=True, timeout=300)


def train(tmp: Path, name: str, *overrides: str, local: int = 2) -> str:
    """`ldit train configs/vavae/tiny_cpu.yaml ... --local 2`; returns its output (stdout + stderr)."""
    proc = train_proc(tmp, name, *overrides, local=local)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-5000:]
    return out


def ldit_export(root: Path, name: str, step: int) -> str:
    """`ldit export run.root=ROOT run.name=NAME step=STEP` (the real CLI, one process); returns its stdout."""
    cmd = [
        sys.executable,
        "-m",
        "slurm.cli",
        "export",
        f"run.root={root}",
        f"run.name={name}",
        f"step={step}",
    ]
    proc = subprocess.run(cmd, cwd=ROOT, env=clean_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-5000:]
    return proc.stdout


def engine_module(run: Path, step: int, engine: str) -> dict[str, torch.Tensor]:
    """The module weights DeepSpeed saved for `engine` ("autoencoder" | "discriminator") at checkpoint `step`."""
    path = run / "checkpoints" / f"step-{step:08d}" / engine / "mp_rank_00_model_states.pt"
    return torch.load(path, map_location="cpu", weights_only=True)["module"]


def logged(run: Path) -> list[dict[str, float]]:
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


def exported(run: Path) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    folder = run / "export" / "latest"
    return read_state_dict(folder / "ema.safetensors"), read_state_dict(folder / TRAINING_EXTRAS)


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.fixture(scope="module")
def run_a(tmp: Path) -> Path:
    """4 steps, GAN from global_step 3 on the Lightning clock: AE at iterations 2-3, D at 1-3."""
    train(tmp, "a", "steps=4", "loss.disc_start=3", "ckpt.every=2", "log.sample_every=2")
    return tmp / "runs" / "a"


def test_every_term_is_finite_in_tensorboard_with_the_reconstruction_grid(run_a: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_a / "tb"), size_guidance={"images": 0, "scalars": 0})
    acc.Reload()
    tags = {f"loss/ae/{k}" for k in AE_TERMS} | {f"loss/disc/{k}" for k in D_TERMS} | set(OTHER_TAGS)
    assert tags <= set(acc.Tags()["scalars"]), tags - set(acc.Tags()["scalars"])
    assert "perf/mfu" not in acc.Tags()["scalars"]  # no analytic FLOP count for the VA-VAE step
    for tag in tags:
        events = acc.Scalars(tag)
        assert [e.step for e in events] == [1, 2, 3, 4], tag
        assert all(math.isfinite(e.value) for e in events), tag
    assert all(e.value > 0 for e in acc.Scalars("loss/ae/vf_weight"))  # adaptive VF weight (§1.2)
    assert all(e.value > 0 for e in acc.Scalars("opt/autoencoder/grad_norm"))
    images = acc.Images("samples/reconstructions")
    assert [i.step for i in images] == [2, 4]
    # rank 0's 4 inputs above their 4 reconstructions, 32 px each with 1 px padding
    assert (images[0].height, images[0].width) == (2 * 33 + 1, 4 * 33 + 1)
    assert (run_a / "samples" / "step-00000004.png").is_file()


def test_disc_start_gating_on_the_lightning_clock(run_a: Path) -> None:
    assert gan_steps("lightning", 2) == (4, 5) and gan_steps("step", 2) == (2, 2)
    rows = logged(run_a)  # logged at step k = after iteration k - 1
    assert [r["loss/ae/disc_factor"] for r in rows] == [0.0, 0.0, 1.0, 1.0]  # AE clock 0, 2, 4, 6 vs 3
    assert [r["loss/disc/disc_factor"] for r in rows] == [0.0, 1.0, 1.0, 1.0]  # D clock 1, 3, 5, 7 vs 3
    assert [r["loss/ae/d_weight"] > 0 for r in rows] == [False, False, True, True]
    assert rows[0]["loss/disc/disc_loss"] == 0.0 and all(r["loss/disc/disc_loss"] > 0 for r in rows[1:])
    assert all(r["loss/ae/g"] != 0 for r in rows)  # g is computed (and logged) before disc_start too
    assert rows[0]["opt/discriminator/grad_norm"] == 0.0 and rows[1]["opt/discriminator/grad_norm"] > 0


def test_export_loads_as_a_vavae_with_the_training_extras(run_a: Path) -> None:
    vae = load_vavae(run_a / "export" / "latest")
    with torch.no_grad():
        assert vae.encode(torch.zeros(1, 3, 32, 32)).sample().shape == (1, 32, 4, 4)
    _, extras = exported(run_a)
    assert extras["linear_proj.weight"].shape == (384, 32, 1, 1)  # ViT-S features ← 32 latent channels
    assert f"{DISC_PREFIX}main.0.weight" in extras and f"{DISC_PREFIX}main.3.running_mean" in extras
    meta = json.loads((run_a / "checkpoints" / "step-00000004" / "meta.json").read_text())
    assert meta["kind"] == "vavae" and {"autoencoder", "discriminator"} <= {
        f.split("/")[0] for f in meta["files"]
    }


def test_resume_at_the_same_world_size_is_bit_identical(tmp: Path, run_a: Path) -> None:
    args = ("loss.disc_start=3", "ckpt.every=2", "log.sample_every=2")
    train(tmp, "b", "steps=2", *args)
    out = train(tmp, "b", "steps=4", *args)
    assert "resumed b at step 2" in out
    run_b = tmp / "runs" / "b"
    losses = [{k: v for k, v in r.items() if k.startswith("loss/")} for r in logged(run_b)]
    assert [r["step"] for r in logged(run_b)] == [1, 2, 3, 4]
    assert losses == [{k: v for k, v in r.items() if k.startswith("loss/")} for r in logged(run_a)]
    for a, b in zip(exported(run_a), exported(run_b)):
        assert_same(a, b)


@pytest.fixture(scope="module")
def run_ax(tmp: Path, run_a: Path) -> Path:
    """A copy of run `a` exported by `ldit export` at step 4 (its last), then at step 2 (export/latest)."""
    shutil.copytree(run_a, tmp / "runs" / "ax", symlinks=True)
    shutil.rmtree(tmp / "runs" / "ax" / "export")
    for step in (4, 2):
        out = ldit_export(tmp / "runs", "ax", step)
        assert (
            f"exported step-{step:08d} of ax to {tmp / 'runs' / 'ax' / 'export' / f'step-{step:08d}'}" in out
        )
    return tmp / "runs" / "ax"


def test_ldit_export_writes_what_the_trainer_exports_and_the_next_stage_needs(
    run_a: Path, run_ax: Path
) -> None:
    """`ldit export` of a VA-VAE checkpoint writes the trainer's own export folder, training extras included."""
    folder = run_ax / "export" / "step-00000004"
    assert sorted(p.name for p in folder.iterdir()) == [
        "config.yaml", "ema.safetensors", "model.json", TRAINING_EXTRAS
    ]  # fmt: skip
    own = run_a / "export" / "step-00000004"  # written by the trainer at the end of run a
    for name in ("ema.safetensors", TRAINING_EXTRAS):
        assert_same(read_state_dict(folder / name), read_state_dict(own / name))
    assert (folder / "model.json").read_text() == (own / "model.json").read_text()
    # Step 2: the extras are the checkpoint's projection and discriminator (weights and BatchNorm statistics).
    assert os.readlink(run_ax / "export" / "latest") == "step-00000002"
    extras = read_state_dict(run_ax / "export" / "latest" / TRAINING_EXTRAS)
    ae, disc = engine_module(run_ax, 2, "autoencoder"), engine_module(run_ax, 2, "discriminator")
    want = {"linear_proj.weight": ae["linear_proj.weight"]}
    want |= {DISC_PREFIX + k.removeprefix("discriminator."): v for k, v in disc.items()}
    assert len(want) == 23 and f"{DISC_PREFIX}main.3.running_var" in want
    assert_same(extras, want)
    meta = json.loads((run_ax / "checkpoints" / "step-00000002" / "meta.json").read_text())
    assert meta["extras"] == ["discriminator", "linear_proj"]  # both trained (D from iteration 1)
    assert not torch.equal(extras["linear_proj.weight"], exported(run_a)[1]["linear_proj.weight"])


def test_stage_chain_carries_the_weights_and_bf16_keeps_an_fp32_ema(tmp: Path, run_ax: Path) -> None:
    stage = ("loss.disc_start=1", "loss.vf_weight=0.1", "log.sample_every=0")
    # Stage 2 (§1.4) from `ldit export`'s step-2 folder, with lr 0: Adam moves nothing, so its export is
    # exactly the weights it started from, and those are the exported ones (step 2's, not the last step's).
    src = run_ax / "export" / "latest"
    out = train(tmp, "s2", f"init_from={src}", "optim.lr=0", "steps=1", *stage,
                "loss.cos_margin=0", "loss.distmat_margin=0")  # fmt: skip
    assert f"initialised autoencoder, linear_proj, discriminator from {src}\n" in out
    (ae1, extras1), (ae2, extras2) = exported(run_ax), exported(tmp / "runs" / "s2")
    assert_same(ae1, ae2)
    params = [k for k in extras1 if "running_" not in k and "num_batches" not in k]  # BatchNorm stats move
    assert_same({k: extras1[k] for k in params}, {k: extras2[k] for k in params})
    d2 = engine_module(tmp / "runs" / "s2", 1, "discriminator")  # what the D engine held after its step
    d_params = [k for k in params if k.startswith(DISC_PREFIX)]
    assert len(d_params) == 13 and len(params) == 14  # and linear_proj.weight
    assert all(torch.equal(d2["discriminator." + k.removeprefix(DISC_PREFIX)], extras1[k]) for k in d_params)
    # Stage 3 in bf16 with an EMA of decay 0.5: it trains from stage 2, and the average stays fp32.
    s2 = tmp / "runs" / "s2" / "export" / "latest"
    train(tmp, "s3", f"init_from={s2}", "precision=bf16", "ema_decay=0.5", "steps=2", *stage)
    run3 = tmp / "runs" / "s3"
    assert json.loads((run3 / "ds_config.json").read_text())["bf16"]["enabled"] is True
    d_zero = json.loads((run3 / "ds_config_discriminator.json").read_text())["zero_optimization"]
    assert d_zero["reduce_bucket_size"] == 2_765_634  # the PatchGAN's parameters: each engine its own bucket
    rows = logged(run3)
    assert all(math.isfinite(v) for r in rows for k, v in r.items() if k.startswith("loss/"))
    assert all(r["loss/ae/vf_weight"] > 0 for r in rows)  # adaptive weights in bf16
    assert rows[0]["loss/ae/d_weight"] == 0 < rows[1]["loss/ae/d_weight"]  # disc_start 1: AE clock 0, then 2
    ae3, _ = exported(run3)
    w = ae3["decoder.conv_out.weight"]
    assert w.dtype == torch.float32 and not torch.equal(w, ae2["decoder.conv_out.weight"])
    assert not torch.equal(w, w.bfloat16().float())  # not bf16 values: the EMA is accumulated in fp32


def test_config_checks() -> None:
    cfg = load_config(TrainVAVAEConfig, [TINY])
    assert (
        cfg.model == "small" and cfg.loss.foundation_resize == 56 and cfg.loss.disc_start_clock == "lightning"
    )
    with pytest.raises(ConfigError, match="ema_decay=1.0 must be in"):
        load_config(TrainVAVAEConfig, [TINY], ["ema_decay=1.0"])
    with pytest.raises(ConfigError, match="disc_start_clock"):
        load_config(TrainVAVAEConfig, [TINY], ["loss.disc_start_clock=epoch"])


def test_what_a_stage_uses_follows_disc_start_and_vf_weight() -> None:
    from trainer.stages import stage_uses

    def uses(*overrides: str) -> dict[str, str]:
        return stage_uses(load_config(TrainVAVAEConfig, [TINY], ["steps=4", *overrides]))

    assert uses("loss.disc_start=1") == {
        "linear_proj": "the VF loss is on (loss.use_vf=true, loss.vf_weight=0.1)",
        "discriminator": "the GAN is on from iteration 0 of steps=4 (loss.disc_start=1 on the lightning clock)",
    }
    # Lightning clock: iteration k's D loss sees 2k + 1, so disc_start 7 turns it on at k = 3 < 4; 8 never.
    assert "iteration 3 of steps=4" in uses("loss.disc_start=7")["discriminator"]
    assert "discriminator" not in uses("loss.disc_start=8")
    assert "discriminator" in uses("loss.disc_start=3", "loss.disc_start_clock=step")
    assert "discriminator" not in uses("loss.disc_start=4", "loss.disc_start_clock=step")
    assert "linear_proj" not in uses("loss.vf_weight=0") and "linear_proj" not in uses("loss.use_vf=false")
    assert "linear_proj" in uses("loss.proj_fix=true")  # a fixed projection is still used as it is


def test_init_from_refuses_a_source_without_what_the_stage_uses(tmp: Path, run_a: Path) -> None:
    from safetensors.torch import save_file
    from torch import nn

    from models.discriminator import NLayerDiscriminator
    from models.vavae import AutoencoderKL, autoencoder_args
    from trainer.stages import InitFromError, load_init, stage_uses

    src = run_a / "export" / "latest"
    bare, no_disc = tmp / "bare", tmp / "no-disc"  # an export copied without its extras; one without D
    for folder in (bare, no_disc):
        shutil.copytree(src, folder)
    (bare / TRAINING_EXTRAS).unlink()
    save_file(
        {"linear_proj.weight": exported(run_a)[1]["linear_proj.weight"]}, str(no_disc / TRAINING_EXTRAS)
    )

    def init(folder: Path, *overrides: str) -> tuple[str, set[str], nn.Module, nn.Module]:
        cfg = load_config(TrainVAVAEConfig, [TINY], ["steps=4", *overrides])
        proj, disc = nn.Conv2d(32, 384, 1, bias=False), NLayerDiscriminator()
        ae = AutoencoderKL(autoencoder_args("small"))
        message, loaded = load_init(str(folder), ae, proj, disc, stage_uses(cfg))
        return message, loaded, proj, disc

    with pytest.raises(InitFromError) as err:
        init(bare, "loss.disc_start=1")
    assert str(err.value) == (
        f"init_from={bare} lacks what this stage uses, which would start from random weights: the linear_proj "
        "(linear_proj.weight), as the VF loss is on (loss.use_vf=true, loss.vf_weight=0.1); the discriminator "
        "(loss.discriminator.*), as the GAN is on from iteration 0 of steps=4 (loss.disc_start=1 on the "
        f"lightning clock). Looked in {bare / TRAINING_EXTRAS}: the file does not exist. Point init_from at an "
        "export of the previous stage written by `ldit export run.name=<previous run>` or by the end of its "
        f"training (both write {TRAINING_EXTRAS} with every part that run trained), or at a reference training "
        "checkpoint with these keys"
    )
    with pytest.raises(InitFromError, match=r"lacks what this stage uses, which would start from random weights: "
                       r"the discriminator \(loss.discriminator.\*\), as the GAN is on from iteration 2 of steps=4 "
                       r"\(loss.disc_start=5 on the lightning clock\)\. Looked in .*no-disc/training_extras.safetensors: "
                       r"it holds no loss.discriminator.\*\. "):  # fmt: skip
        init(no_disc, "loss.disc_start=5")
    # A stage that never turns its GAN on may start a fresh discriminator, and says so.
    message, loaded, proj, disc = init(no_disc, "loss.disc_start=8")
    assert message == (
        f"initialised autoencoder, linear_proj from {no_disc}; the discriminator is not in "
        f"{no_disc / TRAINING_EXTRAS} and starts from random weights (this stage does not use it yet)"
    )
    assert loaded == {"linear_proj"} and torch.equal(proj.weight, exported(run_a)[1]["linear_proj.weight"])
    message, loaded, _, _ = init(bare, "loss.disc_start=8", "loss.vf_weight=0")
    assert loaded == set() and message.startswith(
        f"initialised autoencoder from {bare}; the linear_proj is not"
    )


def test_init_from_without_the_discriminator_stops_the_ldit_command(tmp: Path, run_a: Path) -> None:
    """The same refusal from the shell: one line, exit 1, before any engine or checkpoint exists."""
    folder = tmp / "weights-only"
    shutil.copytree(run_a / "export" / "latest", folder)
    (folder / TRAINING_EXTRAS).unlink()
    proc = train_proc(tmp, "refused", f"init_from={folder}", "loss.disc_start=1", "steps=2", local=1)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert f"ldit train: error: init_from={folder} lacks what this stage uses" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp / "runs" / "refused" / "checkpoints").exists()


def test_elastic_resume_from_2_ranks_to_1_continues_the_same_run(tmp: Path, run_a: Path) -> None:
    """Run `a` as it was at its step-2 checkpoint (2 ranks), resumed on 1 rank with 2 micro-batches of 4:
    DeepSpeed's universal conversion of both engines, read whole into the stage-0 engines one rank runs in
    fp32 (trainer/stage_change.py), and the same samples in each micro-batch."""
    run = tmp / "runs" / "elastic"
    shutil.copytree(run_a, run, symlinks=True)
    shutil.rmtree(run / "export")
    shutil.rmtree(run / "checkpoints" / "step-00000004")
    (run / "checkpoints" / "latest").write_text("step-00000002")
    out = train(tmp, "elastic", "steps=4", "loss.disc_start=3", "ckpt.every=2", "log.sample_every=2",
                "micro_batch=4", local=1)  # fmt: skip
    whole = (
        "(from ZeRO stage 2 at world size 2 to stage 0 at world size 1: whole tensors)"  # fp32 at one rank
    )
    assert f"resumed elastic at step 2 {whole}" in out and "warning" not in out
    for engine in ("autoencoder", "discriminator"):
        assert (run / "checkpoints" / "step-00000002" / f"{engine}_universal").is_dir()
    ref, got = logged(run_a), logged(run)
    assert [r["step"] for r in got] == [1, 2, 3, 4] and got[:2] == ref[:2]
    keys = sorted(k for k in ref[0] if k.startswith("loss/"))
    assert len(keys) == len(AE_TERMS) + len(D_TERMS)
    # Same data, noise and micro-batches by construction; only the order of float reductions differs
    # (a mean over ranks vs over micro-batches, gradients summed in another order): as the DiT's, 1e-5.
    for k in keys:
        np.testing.assert_allclose([r[k] for r in got[2:]], [r[k] for r in ref[2:]], rtol=1e-5, err_msg=k)
    assert (
        got[2]["loss/ae/d_weight"] > 0 and got[3]["loss/disc/disc_loss"] > 0
    )  # the GAN is on after the switch
    (ae_ref, extras_ref), (ae_got, extras_got) = exported(run_a), exported(run)
    for k in ae_ref:
        torch.testing.assert_close(ae_got[k], ae_ref[k], rtol=1e-4, atol=1e-6)
    params = [k for k in extras_ref if "running_" not in k and "num_batches" not in k]  # per-rank statistics
    for k in params:
        torch.testing.assert_close(extras_got[k], extras_ref[k], rtol=1e-4, atol=1e-6)
