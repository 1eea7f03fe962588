"""VA-VAE training (trainer/vavae.py, reference §1.2-1.4): real 2-process `ldit train --local 2` runs on the
CPU with the tiny config, image shards from `ldit prep-images` and random pretrained weights in files.

Five runs in all (about 2 minutes on 2 cores): `a` (4 steps, the GAN switched on mid-run), `b` (2 steps,
then resumed to 4), and a stage chain from `a`: stage 2 with lr 0 (its export must equal its initial
weights) and stage 3 in bf16 with an EMA.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

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


@pytest.fixture(scope="module")
def tmp(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Image shards of 15 small JPEGs, and random DINOv2 ViT-S/14, VGG16 and LPIPS-head weight files."""
    root = tmp_path_factory.mktemp("vavae")
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


def train(tmp: Path, name: str, *overrides: str) -> str:
    """`ldit train configs/vavae/tiny_cpu.yaml ... --local 2`; returns its output (stdout + stderr)."""
    cmd = [
        sys.executable, "-m", "slurm.cli", "train", str(TINY), f"run.root={tmp / 'runs'}", f"run.name={name}",
        f"data.shards={tmp / 'images'}", f"loss.foundation_weights={tmp / 'dino.pth'}",
        f"loss.vgg16_weights={tmp / 'vgg16.pth'}", f"loss.lpips_weights={tmp / 'heads.pth'}", "log.every=1",
        *overrides, "--local", "2",
    ]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, env=clean_env(), capture_output=True, text=True, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-5000:]
    return out


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


def test_stage_chain_carries_the_weights_and_bf16_keeps_an_fp32_ema(tmp: Path, run_a: Path) -> None:
    stage = ("loss.disc_start=1", "loss.vf_weight=0.1", "log.sample_every=0")
    # Stage 2 (§1.4) with lr 0: Adam moves nothing, so its export is exactly the weights it started from.
    out = train(tmp, "s2", f"init_from={run_a / 'export' / 'latest'}", "optim.lr=0", "steps=1", *stage,
                "loss.cos_margin=0", "loss.distmat_margin=0")  # fmt: skip
    assert "initialised autoencoder, linear_proj, discriminator from" in out
    (ae1, extras1), (ae2, extras2) = exported(run_a), exported(tmp / "runs" / "s2")
    assert_same(ae1, ae2)
    params = [k for k in extras1 if "running_" not in k and "num_batches" not in k]  # BatchNorm stats move
    assert_same({k: extras1[k] for k in params}, {k: extras2[k] for k in params})
    # Stage 3 in bf16 with an EMA of decay 0.5: it trains from stage 2, and the average stays fp32.
    s2 = tmp / "runs" / "s2" / "export" / "latest"
    train(tmp, "s3", f"init_from={s2}", "precision=bf16", "ema_decay=0.5", "steps=2", *stage)
    run3 = tmp / "runs" / "s3"
    assert json.loads((run3 / "ds_config.json").read_text())["bf16"]["enabled"] is True
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
