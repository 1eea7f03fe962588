"""Evaluation during VA-VAE training (issue #16): the reconstruction curve of milestone exports.

Real processes, offline: the tiny VA-VAE (configs/vavae/tiny_cpu.yaml, the VF loss off: no DINOv2) trains
6 steps at 2 gloo ranks on an image shard set while the follower (`ldit train … --follow-eval`, its own
process) reconstructs a held-out image shard set with each milestone export (steps 2, 4, 6) and measures
rFID (random-weight Inception), PSNR, SSIM and LPIPS (random VGG16 and head weights).
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from eval.inception import WEIGHTS_FILE, random_weights
from models.lpips import VGG16Slices
from slurm.cli import main
from tests.conftest import ROOT, clean_env, run_procs
from tests.data_fixtures import imagenet_folder

TINY = str(ROOT / "configs/vavae/tiny_cpu.yaml")
SETTINGS = "recon_held_crop32_seed0_n4"
"""The eval's settings (the folder name without the step): the first 4 images of the held-out set `held`."""
STEPS = (2, 4, 6)


def ldit(*args: str) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "slurm.cli", *args], cwd=ROOT, env=clean_env(),
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-4000:]
    return proc


def point(run: Path, step: int) -> Path:
    return run / "eval" / f"step-{step:08d}_{SETTINGS}"


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, Path]:
    """Training and held-out image shard sets (different images), random LPIPS and Inception weights, the eval config."""
    root = tmp_path_factory.mktemp("follow_vavae")
    prep = [sys.executable, "-m", "slurm.cli", "prep-images", "shard_samples=3"]
    train_src = imagenet_folder(root / "src", per_class=3)
    held_src = imagenet_folder(root / "held_src", classes=("n01440764", "n01443537"), per_class=1, seed=1)
    run_procs([([*prep, f"src={train_src}", f"out={root / 'images'}"], clean_env()),
               ([*prep, f"src={held_src}", f"out={root / 'held'}"], clean_env())])  # fmt: skip
    torch.manual_seed(0)
    vgg = VGG16Slices().state_dict()  # slice{s}.{i}.{p} → torchvision's features.{i}.{p}
    torch.save({"features." + k.split(".", 1)[1]: v for k, v in vgg.items()}, root / "vgg16.pth")
    heads = {f"lin{i}.model.1.weight": torch.rand(1, c, 1, 1) for i, c in enumerate((64, 128, 256, 512, 512))}
    torch.save(heads, root / "heads.pth")
    w = {"root": root, "inception": random_weights(root / WEIGHTS_FILE, seed=0), "eval": root / "eval.yaml"}
    w["eval"].write_text(
        f"images: {root / 'held'}\nimage_size: 32\nnum_samples: 4\nbatch_size: 2\n"
        f"inception_weights: {w['inception']}\nvgg16_weights: {root / 'vgg16.pth'}\n"
        f"lpips_weights: {root / 'heads.pth'}\nfollow_poll_s: 0.2\n"
    )
    return w


@pytest.fixture(scope="module")
def followed(world) -> Path:
    """6 steps at 2 ranks, milestones 2, 4, 6 (the discriminator trains from step 3), the follower beside."""
    root = world["root"]
    proc = ldit("train", TINY, f"run.root={root / 'runs'}", "run.name=vae", f"data.shards={root / 'images'}",
                "loss.use_vf=false", f"loss.vgg16_weights={root / 'vgg16.pth'}",
                f"loss.lpips_weights={root / 'heads.pth'}", "loss.disc_start=5", "steps=6", "export.every=2",
                "ckpt.every=2", "ckpt.keep_last=3", "log.every=2", "log.sample_every=0", "--local", "2",
                "--follow-eval", str(world["eval"]))  # fmt: skip
    assert "follow: done: the last export (step 6) is evaluated" in proc.stdout, proc.stdout[-3000:]
    return root / "runs" / "vae"


def test_reconstruction_curve_points_equal_standalone_evals(world, followed, tmp_path, capsys):
    with open(followed / "eval" / SETTINGS / "curve.csv") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["step", "epochs", "samples_seen", "lpips", "psnr", "rfid", "ssim"]
    assert [int(r["step"]) for r in rows] == list(STEPS)
    assert [int(r["samples_seen"]) for r in rows] == [16, 32, 48]  # global batch 8
    total = json.loads((world["root"] / "images" / "manifest.json").read_text())["total"]
    assert [float(r["epochs"]) for r in rows] == [s / total for s in (16, 32, 48)]
    assert (followed / "eval" / SETTINGS / "curve.png").stat().st_size > 1000
    # A standalone `ldit eval … step=N` of each export, in a copy of the run, writes the same bytes.
    copy = tmp_path / "runs" / "copy"
    copy.mkdir(parents=True)
    shutil.copytree(followed / "export", copy / "export", symlinks=True)
    run_procs([([sys.executable, "-m", "slurm.cli", "eval", str(world["eval"]), f"run.root={tmp_path / 'runs'}",
                 "run.name=copy", f"step={s}"], clean_env()) for s in STEPS], timeout=600)  # fmt: skip
    for step, row in zip(STEPS, rows):
        mine = (point(followed, step) / "metrics.json").read_bytes()
        assert (point(copy, step) / "metrics.json").read_bytes() == mine, step
        doc = json.loads(mine)
        assert doc["export"]["path"] == f"export/step-{step:08d}" and doc["images"]["num_images"] == 4
        assert {k: float(row[k]) for k in doc["metrics"]} == doc["metrics"]  # the curve holds the points
    docs = [json.loads((point(followed, s) / "metrics.json").read_text()) for s in STEPS]
    assert len({d["export"]["weights_sha256"] for d in docs}) == 3  # each milestone's EMA, not the last one's
    assert sorted(p.name for p in (followed / "export").iterdir()) == [
        "latest", "step-00000002", "step-00000004", "step-00000006"
    ]  # fmt: skip
    assert main(["status", str(followed)]) == 0  # `ldit status` shows the curve, one line per point
    lines = capsys.readouterr().out.splitlines()
    start = lines.index(f"  curve {SETTINGS} (3 points, eval/{SETTINGS}/curve.csv):")
    for line, step, row in zip(lines[start + 1 : start + 4], STEPS, rows):
        assert line.startswith(f"    step {step} (") and f"rfid {float(row['rfid']):.4g}, ssim " in line, line
    assert not [line for line in lines if line.startswith("  eval ")]  # the points are not listed twice


def test_milestone_exports_equal_ldit_export_of_their_checkpoints(followed, tmp_path):
    """Each milestone export (the trainer's, at steps 2 and 4, mid-run) is what `ldit export step=N` writes
    from the checkpoint of that step, file for file; the discriminator is in its training extras only once
    the GAN has been on (step 4; the D loss's clock reaches disc_start=5 at iteration 2 = step 3)."""
    from models.weights import read_state_dict
    from trainer.export import TRAINING_EXTRAS

    run = tmp_path / "vae"
    for step in STEPS[:2]:  # hard links: `ldit export` only reads the checkpoint
        name = f"step-{step:08d}"
        shutil.copytree(followed / "checkpoints" / name, run / "checkpoints" / name, copy_function=os.link)
        assert main(["export", f"run.root={tmp_path}", "run.name=vae", f"step={step}"]) == 0
        files = sorted(p.name for p in (followed / "export" / name).iterdir())
        assert files == ["config.yaml", "ema.safetensors", "model.json", TRAINING_EXTRAS]
        assert sorted(p.name for p in (run / "export" / name).iterdir()) == files
        for f in files:
            assert (run / "export" / name / f).read_bytes() == (
                followed / "export" / name / f
            ).read_bytes(), f
    extras = [read_state_dict(followed / "export" / f"step-{s:08d}" / TRAINING_EXTRAS) for s in STEPS]
    assert [any(k.startswith("loss.discriminator.") for k in e) for e in extras] == [False, True, True]
