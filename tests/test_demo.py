"""`ldit demo` end to end, shortened (configs/demo/quick.yaml: all digits, 100 VA-VAE and 750 DiT steps).

Every stage runs as the real job on 2 local processes; the test checks the summary's fields, the files it
names, the curve of the eval follower beside the DiT's training (milestones 250, 500, 750), that a rerun
skips every finished stage, and that a rerun with other settings is refused. It holds the quick run's
figures to quality thresholds, and shows that those thresholds reject a broken pipeline: the same run with
the latents' labels shuffled (the DiT retrained on them), and untrained models.
"""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from slurm.config import ConfigError, load_config
from slurm.demo import check_quality
from slurm.demo_digits import DigitClassifier, Layout, accuracy, mirrored, write_digits
from slurm.jobs import DemoConfig
from tests.conftest import ROOT, clean_env

QUICK = ROOT / "configs" / "demo" / "quick.yaml"

# Quality thresholds of the quick run, with the figures they were set from: OMP_NUM_THREADS=1 (as CI
# runs), 2 local processes; seeds s = (seed, vavae.seed, dit.seed) = 0 (what the test runs), 1, 2. The
# figures move slightly with the thread count (README), far less than the margins.
SAMPLE_ACCURACY_MIN = 0.8
"""Fraction of the DiT's 500 class-conditional samples that the classifier calls their class (chance 0.1).
Healthy: 0.946, 0.908, 0.976. Labels shuffled (the DiT trained on them): 0.084, 0.100 (s=0, 1). An
untrained DiT: 0.098, 0.112, 0.126 with the trained VA-VAE; 0.100 with an untrained one. Not a test: CFG
off (cfg_scale=1) gives 0.716, 0.654, 0.782, below the threshold but by too little to rely on."""
FRECHET_MAX_X_FLOOR = 30.0
"""Fréchet distance of the samples vs held-out digits in the classifier's features, as a multiple of its
floor (real training digits vs held-out: 0.68, 0.63, 0.58). Healthy: 8.27, 11.88, 6.67 (12.2x, 18.9x,
11.5x). Untrained VA-VAE and DiT: 116.2, 135.0, 125.2 (170x or more). The distance does not see labels
and is weak on the DiT alone: shuffled labels give 5.28, 12.34 (s=0, 1), an untrained DiT decoded by
the trained VA-VAE 9.66, 12.86, 7.76; the sample accuracy is what rejects those."""
PSNR_MIN_DB = 13.0
"""The VA-VAE's held-out reconstruction PSNR. Healthy: 18.98, 16.05, 18.86 dB; untrained: 7.19, 7.18,
7.21 dB."""


def quality_misses(s: dict) -> dict[str, str]:
    """The thresholds a demo summary (or :func:`slurm.demo.check_quality`'s figures) misses, each with its
    figure; {} when it clears them all. NaN misses every threshold."""
    acc = s["dit"]["sample_accuracy"]
    frechet = s["dit"]["frechet_distance_samples_vs_heldout"]
    psnr = s["vavae"]["heldout_psnr_db"]
    bound = FRECHET_MAX_X_FLOOR * s["dit"]["frechet_distance_train_vs_heldout"]
    misses = {
        "sample_accuracy": (acc >= SAMPLE_ACCURACY_MIN, f"sample accuracy {acc:.3f} < {SAMPLE_ACCURACY_MIN}"),
        "frechet": (
            frechet <= bound,
            f"Fréchet distance {frechet:.2f} > {bound:.2f} ({FRECHET_MAX_X_FLOOR:g} x floor)",
        ),
        "psnr": (psnr >= PSNR_MIN_DB, f"VA-VAE PSNR {psnr:.2f} dB < {PSNR_MIN_DB} dB"),
    }
    return {name: message for name, (ok, message) in misses.items() if not ok}


def figures(s: dict) -> str:
    d = s["dit"]
    return (
        f"sample accuracy {d['sample_accuracy']:.3f} (per class {d['sample_accuracy_per_class']}), "
        f"Fréchet {d['frechet_distance_samples_vs_heldout']:.2f} (floor {d['frechet_distance_train_vs_heldout']:.2f}), "
        f"PSNR {s['vavae']['heldout_psnr_db']:.2f} dB"
    )


def curve_rows(path: str | Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def ldit_demo(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, "-m", "slurm.cli", "demo", str(QUICK), *args],
        env=clean_env(), cwd=ROOT, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    if check:
        assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return proc


def copy_demo(src: Path, dst: Path, parts: tuple[str, ...]) -> Path:
    """A new demo folder holding `parts` of a finished one (a later `ldit demo` there skips them)."""
    for part in parts:
        if (src / part).is_dir():
            shutil.copytree(src / part, dst / part)
        else:
            dst.mkdir(parents=True, exist_ok=True)
            shutil.copy(src / part, dst / part)
    return dst


def shuffle_labels(latents: Path, seed: int) -> float:
    """Give a latent shard set's samples a seeded permutation of its labels (each class keeps its count),
    rewritten with the project's shard writer and manifest; returns the fraction that kept its label."""
    from data_prep.manifest import load_manifest
    from data_prep.shards import read_shard, write_shard

    manifest = load_manifest(latents, "latents")
    shards = [read_shard(str(latents / s.name), s.count) for s in manifest.shards]
    labels = np.array([int(bytes(x["cls"])) for samples in shards for x in samples])
    shuffled = np.random.default_rng(seed).permutation(labels)
    new = iter(shuffled)
    manifest.shards = [
        write_shard(
            latents / info.name,
            [
                {k: v if k == "__key__" else bytes(v) for k, v in x.items()}
                | {"cls": str(next(new)).encode()}
                for x in samples
            ],
        )
        for info, samples in zip(manifest.shards, shards)
    ]
    manifest.save(latents)
    return float((shuffled == labels).mean())


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> tuple[Path, dict, str]:
    out = tmp_path_factory.mktemp("demo") / "quick"
    proc = ldit_demo(f"out={out}")
    return out, json.loads((out / "summary.json").read_text()), proc.stdout


def test_demo_runs_every_stage_and_names_its_outputs(demo):
    out, s, stdout = demo
    assert list(s["stage_times_s"]) == [
        "digits", "prep-images", "train-vavae", "extract-latents", "train-dit", "quality",
    ]  # fmt: skip
    assert s["skipped_stages"] == [] and s["processes"] == 2
    for key in ("vavae", "dit"):
        run = Path(s["runs"][key])
        assert (run / "checkpoints" / "latest").is_file() and (run / "config.yaml").is_file()
        assert json.loads((run / "topology.json").read_text())["world_size"] == 2  # 2 ranks, as asked
        assert json.loads((run / "ds_config.json").read_text())["zero_optimization"]["stage"] == 2
        assert (Path(s["exports"][key]) / "ema.safetensors").is_file()
    assert Path(s["exports"]["vavae"]).name == "step-00000100"
    assert Path(s["exports"]["dit"]).name == "step-00000750"
    assert list(Path(s["tensorboard"]).glob("*/tb/events.out.tfevents.*"))
    for key in ("images", "latents"):
        manifest = json.loads((Path(s["shards"][key]) / "manifest.json").read_text())
        assert manifest["total"] == 1437 and len(manifest["shards"]) == 15
    # 10 rows (one per class) of 10 samples, 32 px tiles 1 px apart, enlarged 2x; 2 rows of 20 digits.
    assert Image.open(s["sample_grid"]).size == (2 * (10 * 33 + 1), 2 * (10 * 33 + 1))
    assert Image.open(s["reconstruction_grid"]).size == (2 * (20 * 33 + 1), 2 * (2 * 33 + 1))
    assert s["classifier"]["heldout_accuracy"] >= 0.95  # 0.972 (README)
    assert s["dit"]["samples"] == 500 and len(s["dit"]["sample_accuracy_per_class"]) == 10
    assert s["fid"]["status"] == "skipped" and "python -m eval.inception" in s["fid"]["how"]
    assert (
        "vavae.loss.perceptual_weight=1.0" in s["losses_off"] and "vavae.loss.use_vf=true" in s["losses_off"]
    )
    for line in ("=== ldit demo finished in", "sample grid:", "reconstruction grid:", "milestone curve:", "TensorBoard:",
                 "losses off:", "classifier:", "DiT samples:", "per class:", "Fréchet distance:", "FID skipped"):  # fmt: skip
        assert line in stdout, line


def test_the_follower_measures_each_milestone_and_its_curve_ends_at_the_summary(demo):
    """The eval follower beside the DiT's training measured the exports of steps 250, 500 and 750; the
    last point is the final export's, so it holds the summary's figures (rounded as the summary rounds)."""
    out, s, stdout = demo
    dit = Path(s["runs"]["dit"])
    assert sorted(p.name for p in (dit / "export").glob("step-*")) == [
        "step-00000250", "step-00000500", "step-00000750",
    ]  # fmt: skip
    settings = "euler33-shift1_cfg3-all-from0_balanced_seed0_n500_digits-classifier"
    curve = s["curve"]
    assert curve["csv"] == str(dit / "eval" / settings / "curve.csv") and curve["settings"] == settings
    rows = curve_rows(curve["csv"])
    assert [int(r["step"]) for r in rows] == [250, 500, 750]
    assert list(rows[0]) == ["step", "epochs", "samples_seen", "frechet_distance", "sample_accuracy"]
    assert [float(r["samples_seen"]) for r in rows] == [250 * 128, 500 * 128, 750 * 128]  # global batch 128
    last = rows[-1]
    assert round(float(last["sample_accuracy"]), 4) == s["dit"]["sample_accuracy"], (rows, figures(s))
    assert round(float(last["frechet_distance"]), 3) == s["dit"]["frechet_distance_samples_vs_heldout"]
    assert [p["step"] for p in curve["points"]] == [250, 500, 750]
    assert curve["points"][-1]["sample_accuracy"] == float(last["sample_accuracy"])
    # The PNG beside the sample grid, a copy of the run's; the summary names it and the csv.
    assert curve["plot"] == str(out / "curve.png") and Path(s["sample_grid"]).parent == out
    assert (out / "curve.png").read_bytes() == (dit / "eval" / settings / "curve.png").read_bytes()
    assert Image.open(out / "curve.png").size[0] > 300
    assert f"milestone curve:     {out / 'curve.png'}" in stdout and curve["csv"] in stdout
    for row in rows:  # each point is an evaluation folder of the shape `ldit eval` writes
        doc = json.loads(
            (dit / "eval" / f"step-{int(row['step']):08d}_{settings}" / "metrics.json").read_text()
        )
        assert doc["export"]["step"] == int(row["step"]) and set(doc["metrics"]) == {
            "sample_accuracy", "frechet_distance",
        }  # fmt: skip
    assert stdout.count("demo follower: step ") == 3 and "follow: done: the last export (step 750)" in stdout


def test_quick_demo_clears_the_quality_thresholds(demo):
    _, s, _ = demo
    assert quality_misses(s) == {}, figures(s)
    # The floor that FRECHET_MAX_X_FLOOR multiplies: real training digits vs held-out, 0.58-0.68 (seeds 0-2).
    assert s["dit"]["frechet_distance_train_vs_heldout"] <= 1.0


def test_shuffled_labels_fail_the_sample_accuracy_threshold(demo, tmp_path):
    """The same quick run, its DiT trained on latents whose labels were shuffled: the samples fall to chance.

    The copy holds the finished digits, shards and VA-VAE, so only the DiT and the quality check run again.
    """
    out, healthy, _ = demo
    broken = copy_demo(out, tmp_path / "shuffled", ("demo.json", "digits", "shards", "runs/vavae"))
    assert 0.05 < shuffle_labels(broken / "shards" / "latents", seed=0) < 0.15  # ~1/10 keep their label
    ldit_demo(f"out={broken}")
    s = json.loads((broken / "summary.json").read_text())
    assert s["skipped_stages"] == ["digits", "prep-images", "train-vavae", "extract-latents"]
    assert s["vavae"] == healthy["vavae"]  # the same VA-VAE: only the labels differ
    assert list(quality_misses(s)) == ["sample_accuracy"], figures(s)
    assert s["dit"]["sample_accuracy"] <= 0.2, figures(s)  # chance is 0.1


def quality_of(out: Path, tmp: Path, vavae_export: Path, dit_export: Path) -> dict:
    """The demo's quality stage (slurm.demo.check_quality) of the given exports, on a copy of `out`'s digits."""
    copy = copy_demo(out, tmp, ("digits", "shards/latents"))
    cfg = load_config(DemoConfig, [str(QUICK)], [f"out={copy}"])
    return check_quality(cfg, Layout(copy), vavae_export, dit_export)


def test_untrained_models_fail_every_threshold(demo, tmp_path):
    """The quality check of a VA-VAE and a DiT as initialised, before any step (the DiT's zero-initialised
    output layer predicts no velocity, so its samples are the decoded noise)."""
    from models.export import read_meta, save_export
    from models.lightningdit import LightningDiT
    from models.vavae import AutoencoderKL

    out, healthy, _ = demo
    torch.manual_seed(0)
    vavae = save_export(tmp_path / "vavae", AutoencoderKL(read_meta(healthy["exports"]["vavae"])[1]))
    dit = save_export(tmp_path / "dit", LightningDiT(read_meta(healthy["exports"]["dit"])[1]))
    q = quality_of(out, tmp_path / "out", vavae, dit)
    assert list(quality_misses(q)) == ["sample_accuracy", "frechet", "psnr"], figures(q)


def test_rerun_skips_finished_stages_and_refuses_other_settings(demo):
    out, first, _ = demo
    again = ldit_demo(f"out={out}")
    s = json.loads((out / "summary.json").read_text())
    assert s["skipped_stages"] == ["digits", "prep-images", "train-vavae", "extract-latents", "train-dit"]
    assert "$ ldit" not in again.stdout and "finished before, skipped" in again.stdout
    assert s["dit"] == first["dit"] and s["vavae"] == first["vavae"]  # same models, same seeds: same figures
    assert s["curve"] == first["curve"] and "demo follower" not in again.stdout  # every point was there
    refused = ldit_demo(f"out={out}", "vavae.optim.lr=2e-3", check=False)
    assert refused.returncode == 1
    assert (
        "holds a demo made with other settings (vavae:" in refused.stderr and "another out=" in refused.stderr
    )


def test_with_inception_weights_the_demo_adds_fid(demo, tmp_path):
    """Random Inception weights stand in for torch-fidelity's (no download): ref-stats and eval run as jobs."""
    from eval.inception import random_weights

    out, first, _ = demo
    weights = random_weights(tmp_path / "inception.pth", seed=0)
    proc = ldit_demo(f"out={out}", f"inception_weights={weights}", "fid_samples=20")
    s = json.loads((out / "summary.json").read_text())
    assert list(s["stage_times_s"])[-4:] == ["prep-heldout", "ref-stats", "train-dit", "quality"]
    assert s["skipped_stages"] == ["digits", "prep-images", "train-vavae", "extract-latents"]
    assert s["fid"]["status"] == "done" and np.isfinite(s["fid"]["fid"])
    assert json.loads(Path(s["fid"]["file"]).read_text())["metrics"]["fid"] == s["fid"]["fid"]
    assert "step-00000750_" in s["fid"]["file"] and "_n20_heldout-reference" in s["fid"]["file"]
    assert (
        "FID:                 " in proc.stdout
        and f"FID curve:           {out / 'curve-fid.png'}" in proc.stdout
    )
    # The follower measured FID at every milestone (the run was trained before: the follower ran alone,
    # reusing the classifier's points); the FID curve's last point is the summary's FID.
    rows = curve_rows(s["fid"]["curve"]["csv"])
    assert [int(r["step"]) for r in rows] == [250, 500, 750] and float(rows[-1]["fid"]) == s["fid"]["fid"]
    assert (out / "curve-fid.png").is_file() and proc.stdout.count("not redoing it") == 3
    assert s["dit"] == first["dit"] and s["curve"] == first["curve"]


def test_a_larger_dit_steps_continues_the_dit_run(demo):
    """The last test on the module's demo folder: `dit.steps` raised by 10 trains 10 more DiT steps from the
    finished run's checkpoint (not 760 from scratch) and measures again; every other stage is skipped."""
    out, first, _ = demo
    proc = ldit_demo(f"out={out}", "dit.steps=760")
    s = json.loads((out / "summary.json").read_text())
    assert s["skipped_stages"] == ["digits", "prep-images", "train-vavae", "extract-latents"]
    assert "resumed dit at step 750" in proc.stdout
    steps = [
        json.loads(line)["step"] for line in (Path(s["runs"]["dit"]) / "log.jsonl").read_text().splitlines()
    ]
    assert steps[-1] == 760 and len(steps) == len(set(steps))  # each logged step once
    assert Path(s["exports"]["dit"]).name == "step-00000760"
    # The follower waited for the resumed run's new plan, reused the three points and measured step 760.
    rows = curve_rows(s["curve"]["csv"])
    assert [int(r["step"]) for r in rows] == [250, 500, 750, 760] and proc.stdout.count(
        "demo follower: step "
    ) == 1
    assert round(float(rows[-1]["sample_accuracy"]), 4) == s["dit"]["sample_accuracy"]


def test_default_config_file_is_the_schemas_default():
    """`make demo` runs configs/demo/default.yaml; it spells out the demo's choices, which must be exactly
    the DemoConfig defaults (so `ldit demo` with no file runs the same demo)."""
    from dataclasses import asdict

    from slurm.jobs import JOBS, DemoConfig

    assert asdict(JOBS["demo"].load([str(ROOT / "configs" / "demo" / "default.yaml")], [])) == asdict(
        DemoConfig()
    )


def test_config_rules_fail_at_start_up():
    with pytest.raises(ConfigError, match="dit.vavae is set by the demo"):
        load_config(DemoConfig, [], ["dit.vavae=x"])
    with pytest.raises(ConfigError, match=r"vavae.image_size=16 must be .* at least 32"):
        load_config(DemoConfig, [], ["vavae.image_size=16"])
    with pytest.raises(ConfigError, match="Key 'dit_step' not in 'DemoConfig'"):
        load_config(DemoConfig, [], ["dit_step=3"])
    cfg = load_config(DemoConfig, [], ["dit.steps=6000", "dit.model.size=S/1", "cfg_scale=2"])
    assert (cfg.dit.steps, cfg.dit.model.size, cfg.cfg_scale) == (6000, "S/1", 2.0)  # the README's example
    cfg = load_config(DemoConfig, [str(QUICK)], ["dit.steps=7"])
    assert cfg.dit.steps == 7 and cfg.vavae.steps == 100 and cfg.dit.model.size == DemoConfig().dit.model.size


def test_digits_split_is_stratified_seeded_and_held_out(tmp_path):
    counts = write_digits(tmp_path / "d", 32, 0.2, seed=0)
    assert counts == {"train": 1437, "heldout": 360, "classes": 10, "size": 32}
    train = {p.name for p in (tmp_path / "d" / "train").rglob("*.png")}
    held = {p.name for p in (tmp_path / "d" / "heldout").rglob("*.png")}
    assert not train & held and len(train | held) == 1797
    from sklearn.datasets import load_digits

    per_class = np.bincount(load_digits().target)
    held_per_class = [len(list((tmp_path / "d" / "heldout" / str(c)).glob("*.png"))) for c in range(10)]
    assert np.all(np.abs(np.array(held_per_class) - 0.2 * per_class) <= 1)  # stratified
    again = write_digits(tmp_path / "e", 32, 0.2, seed=0)
    assert again == counts and held == {p.name for p in (tmp_path / "e" / "heldout").rglob("*.png")}  # seeded
    image = Image.open(next((tmp_path / "d" / "train" / "0").glob("*.png")))
    assert image.mode == "RGB" and image.size == (32, 32)


def test_classifier_is_mirror_invariant_and_scores_per_class():
    from sklearn.datasets import load_digits

    d = load_digits()
    images = np.repeat(np.repeat(np.round(d.images * 255 / 16).astype(np.uint8), 4, 1), 4, 2)[..., None]
    images = np.repeat(images, 3, axis=-1)  # (N, 32, 32, 3)
    clf = DigitClassifier.fit(images[::2], d.target[::2], seed=0)
    acc, per_class = accuracy(clf.predict(images[1::2]), d.target[1::2])
    mirror_acc, _ = accuracy(clf.predict(mirrored(images[1::2])), d.target[1::2])
    assert acc >= 0.95 and mirror_acc >= 0.95 and len(per_class) == 10 and min(per_class) >= 0.85
    assert clf.features(images[:5]).shape == (5, 128)
    assert accuracy(np.array([0, 1, 1]), np.array([0, 1, 2]))[1][:3] == [1.0, 1.0, 0.0]
