"""Evaluation during training (issue #16): milestone exports, the eval follower and its curve.

Real processes, offline: a T/1 LightningDiT trains on Gaussian latents (4, 4, 4) at 2 gloo ranks while the
follower (`ldit train … --follow-eval`, its own process) samples each milestone export, decodes it with a
random-weight `digits` VA-VAE (f8: 32 px images) and measures FID and IS with a random-weight Inception
against a synthetic reference.
"""

from __future__ import annotations

import csv
import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from eval.config import EvalConfig
from eval.inception import WEIGHTS_FILE, random_weights
from models.vavae import AutoencoderKL, autoencoder_args
from slurm.config import load_config
from tests.conftest import ROOT, clean_env
from tests.data_fixtures import gaussian_latent_set
from trainer.config import (
    MilestoneExportConfig,
    RunConfig,
    StreamConfig,
    TrainDiTConfig,
    TrainVAVAEConfig,
    milestone_steps,
)
from trainer.export import export_weights

CONFIG = str(ROOT / "configs/dit/tiny_cpu.yaml")
SETTINGS = "euler4-shift0.3_nocfg_balanced_seed0_n8_reference"
"""The eval's settings (the folder name without the step) for EVAL below."""


def ldit(*args: str, check: bool = True, timeout: float = 600) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "slurm.cli", *args], cwd=ROOT, env=clean_env(),
                          capture_output=True, text=True, timeout=timeout)  # fmt: skip
    if check:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-4000:]
    return proc


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("follow")
    gaussian_latent_set(root / "latents")  # 96 latents, 3 classes
    torch.manual_seed(0)
    vae = AutoencoderKL(autoencoder_args("digits")).eval()
    vcfg = TrainVAVAEConfig(run=RunConfig(name="vae", root=str(root)), model="digits",
                            data=StreamConfig(shards=str(root / "latents")))  # fmt: skip
    w = {
        "root": root,
        "latents": root / "latents",
        "vavae": export_weights(root / "vae", 1, vae, vae.state_dict(), vcfg),
    }
    w["inception"] = random_weights(root / WEIGHTS_FILE, seed=0)
    rng = np.random.default_rng(0)
    a = rng.standard_normal((2048, 64))
    np.savez(root / "reference.npz", mu=rng.standard_normal(2048) * 0.1, sigma=a @ a.T / 64)
    w["eval"] = root / "eval.yaml"
    w["eval"].write_text(
        f"num_samples: 8\nbatch_size: 8\nsampler:\n  points: 4\n  cfg_scale: 1.0\nlabels: balanced\n"
        f"is_splits: 2\ngrid: 0\nreference: {root / 'reference.npz'}\nvavae: {w['vavae']}\n"
        f"inception_weights: {w['inception']}\nfollow_poll_s: 0.2\n"
    )
    return w


def train_args(w: dict[str, Path], name: str, *extra: str) -> list[str]:
    return ["train", CONFIG, f"data.shards={w['latents']}", f"run.root={w['root'] / 'runs'}", f"run.name={name}",
            "steps=12", "export.every=4", "ckpt.every=4", "log.every=1", *extra]  # fmt: skip


def curve_rows(run: Path) -> list[dict[str, str]]:
    with open(run / "eval" / SETTINGS / "curve.csv") as f:
        return list(csv.DictReader(f))


def point(run: Path, step: int) -> Path:
    return run / "eval" / f"step-{step:08d}_{SETTINGS}"


@pytest.fixture(scope="module")
def followed(world) -> Path:
    """A 2-rank training run of 12 steps with milestones 4, 8, 12 and the follower beside it."""
    proc = ldit(*train_args(world, "dit"), "--local", "2", "--follow-eval", str(world["eval"]))
    assert "follow: done: the last export (step 12) is evaluated" in proc.stdout
    return world["root"] / "runs" / "dit"


def test_milestone_steps():
    assert milestone_steps(MilestoneExportConfig(every=4), 12) == [4, 8, 12]
    assert milestone_steps(MilestoneExportConfig(every=5, at=(1, 3, 99)), 12) == [1, 3, 5, 10, 12]
    assert milestone_steps(MilestoneExportConfig(), 7) == [7]
    xl1 = load_config(TrainDiTConfig, [ROOT / "configs/dit/lightningdit_xl1.yaml"], [])
    assert milestone_steps(xl1.export, xl1.steps) == list(range(10000, 80001, 10000))
    proxy = load_config(EvalConfig, [ROOT / xl1.export.eval], [])
    assert (proxy.num_samples, proxy.sampler.points, proxy.sampler.cfg_scale) == (10000, 50, 1.0)


def test_follower_points_equal_standalone_evals_and_training_never_waits(world, followed, tmp_path):
    rows = curve_rows(followed)
    assert [r["step"] for r in rows] == ["4", "8", "12"]
    assert [float(r["samples_seen"]) for r in rows] == [64, 128, 192]  # global batch 16
    assert [float(r["epochs"]) for r in rows] == [64 / 96, 128 / 96, 2.0]  # 96 latents
    assert list(rows[0]) == [
        "step",
        "epochs",
        "samples_seen",
        "fid",
        "inception_score",
        "inception_score_std",
    ]
    assert (followed / "eval" / SETTINGS / "curve.png").stat().st_size > 1000
    # A standalone `ldit eval` of each export, in a copy of the run, writes the same bytes.
    copy = tmp_path / "runs" / "copy"
    copy.mkdir(parents=True)
    shutil.copytree(followed / "export", copy / "export", symlinks=True)
    times = []
    for step in (4, 8, 12):
        ldit("eval", str(world["eval"]), f"run.root={tmp_path / 'runs'}", "run.name=copy", f"step={step}")
        mine = point(followed, step) / "metrics.json"
        assert (point(copy, step) / "metrics.json").read_bytes() == mine.read_bytes()
        times.append(json.loads((point(followed, step) / "timing.json").read_text())["seconds"])
        assert json.loads(mine.read_text())["export"] == {
            "path": f"export/step-{step:08d}", "step": step,
            "weights_sha256": json.loads(mine.read_text())["export"]["weights_sha256"],
        }  # fmt: skip
    # The trainer never evaluates: no training step took as long as one evaluation point.
    steps = [json.loads(line) for line in (followed / "log.jsonl").read_text().splitlines()]
    assert [s["step"] for s in steps] == list(range(1, 13))
    assert max(s["perf/step_time_s"] for s in steps) < min(times), (steps, times)
    assert sorted(p.name for p in (followed / "export").iterdir()) == [
        "latest", "step-00000004", "step-00000008", "step-00000012"
    ]  # fmt: skip


def test_the_points_are_in_tensorboard_at_the_training_step(followed):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    seen: dict[str, list[int]] = {}
    for events in (followed / "tb").glob("events.out.tfevents.*"):
        acc = EventAccumulator(str(events))
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            if tag.startswith("eval/"):
                seen.setdefault(tag, []).extend(e.step for e in acc.Scalars(tag))
    assert sorted(seen[f"eval/{SETTINGS}/fid"]) == [4, 8, 12]


def test_a_restarted_follower_evaluates_only_the_missing_points(world, followed, tmp_path):
    run = tmp_path / "runs" / "again"
    (run / "export").mkdir(parents=True)
    shutil.copy(followed / "config.yaml", run / "config.yaml")
    shutil.copytree(followed / "export" / "step-00000004", run / "export" / "step-00000004")
    cmd = [sys.executable, "-m", "slurm.cli", "eval", str(world["eval"]), f"run.root={tmp_path / 'runs'}",
           "run.name=again", "--follow"]  # fmt: skip
    first = subprocess.Popen(cmd, cwd=ROOT, env=clean_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True, start_new_session=True)  # fmt: skip
    deadline = time.monotonic() + 300
    while not (point(run, 4) / "metrics.json").is_file():
        assert first.poll() is None and time.monotonic() < deadline, first.communicate()[0]
        time.sleep(0.2)
    time.sleep(1.0)  # it now waits for step 8, which training has not written
    first.send_signal(signal.SIGKILL)
    out = first.communicate()[0]
    assert "follow: waiting for export step-00000008 of again (training state unknown" in out, out
    before = (point(run, 4) / "timing.json").read_bytes()
    for step in (8, 12):  # training goes on
        shutil.copytree(followed / "export" / f"step-{step:08d}", run / "export" / f"step-{step:08d}")
    proc = ldit("eval", str(world["eval"]), f"run.root={tmp_path / 'runs'}", "run.name=again", "--follow")
    assert proc.stdout.count("not redoing it") == 1 and f"{point(run, 4)}/metrics.json exists" in proc.stdout
    assert proc.stdout.count("images/s)") == 2  # two evaluations ran: steps 8 and 12
    assert (point(run, 4) / "timing.json").read_bytes() == before
    assert [r["step"] for r in curve_rows(run)] == ["4", "8", "12"]
    for step in (4, 8, 12):
        assert (point(run, step) / "metrics.json").read_bytes() == (
            point(followed, step) / "metrics.json"
        ).read_bytes()


def test_follower_gives_up_when_no_export_comes(world, followed, tmp_path):
    run = tmp_path / "runs" / "stuck"
    run.mkdir(parents=True)
    shutil.copy(followed / "config.yaml", run / "config.yaml")
    proc = ldit("eval", str(world["eval"]), f"run.root={tmp_path / 'runs'}", "run.name=stuck", "--follow",
                "follow_timeout_s=1", check=False)  # fmt: skip
    assert proc.returncode == 1
    assert "ldit eval: error: no new export of" in proc.stderr
    assert "for follow_timeout_s=1 s (waiting for export step-00000004)" in proc.stderr


def test_a_follower_of_an_extended_run_waits_for_its_new_last_step(world, followed, tmp_path):
    """`ldit train --follow-eval` passes follow_until=steps: a follower that reads config.yaml before the
    extended run rewrites it must not end at the old last step (12), whose point it already has."""
    run = tmp_path / "runs" / "longer"
    run.mkdir(parents=True)
    for part in ("export", "eval"):
        shutil.copytree(followed / part, run / part, symlinks=True)
    shutil.copy(followed / "config.yaml", run / "config.yaml")
    args = ["eval", str(world["eval"]), f"run.root={tmp_path / 'runs'}", "run.name=longer", "--follow"]
    proc = ldit(*args, "follow_until=16", "follow_timeout_s=1", check=False)
    assert proc.returncode == 1 and proc.stdout.count("not redoing it") == 3, proc.stdout
    assert "(waiting for the run's config.yaml to reach step 16 (it ends at step 12))" in proc.stderr
    assert "follow: done" in ldit(*args, "follow_until=12").stdout


def test_follow_eval_needs_an_eval_config(world, tmp_path):
    proc = ldit(*train_args(world, "none"), "--follow-eval", check=False)
    assert proc.returncode == 2
    assert "--follow-eval names no eval config and the training config's export.eval is empty" in proc.stderr
    bad = tmp_path / "bad.yaml"
    bad.write_text("num_samples: -1\n")
    proc = ldit(*train_args(world, "none"), f"--follow-eval={bad}", check=False)
    assert proc.returncode == 2 and f"the follower's eval config {bad}" in proc.stderr
    proc = ldit(*train_args(world, "none", "export.at=[13]"), check=False)
    assert proc.returncode == 2 and "every step of export.at=[13] in 1..steps=12" in proc.stderr
    assert not (world["root"] / "runs" / "none").exists()
