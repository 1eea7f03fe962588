"""`ldit demo` end to end, shortened (configs/demo/quick.yaml: 200 digits, 3 steps per training run).

Every stage runs as the real job on 2 local processes; the test checks the summary's fields, the files it
names, that a rerun skips every finished stage, and that a rerun with other settings is refused.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from slurm.config import ConfigError, load_config
from slurm.demo import DigitClassifier, accuracy, mirrored, write_digits
from slurm.jobs import DemoConfig
from tests.conftest import ROOT, clean_env

QUICK = ROOT / "configs" / "demo" / "quick.yaml"


def ldit_demo(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, "-m", "slurm.cli", "demo", str(QUICK), *args],
        env=clean_env(), cwd=ROOT, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    if check:
        assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return proc


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
    assert Path(s["exports"]["vavae"]).name == Path(s["exports"]["dit"]).name == "step-00000003"
    assert list(Path(s["tensorboard"]).glob("*/tb/events.out.tfevents.*"))
    for key in ("images", "latents"):
        manifest = json.loads((Path(s["shards"][key]) / "manifest.json").read_text())
        assert manifest["total"] == 160 and len(manifest["shards"]) == 16
    # 10 rows (one per class) of 3 samples, 32 px tiles 1 px apart, enlarged 2x; 2 rows of 20 digits.
    assert Image.open(s["sample_grid"]).size == (2 * (3 * 33 + 1), 2 * (10 * 33 + 1))
    assert Image.open(s["reconstruction_grid"]).size == (2 * (20 * 33 + 1), 2 * (2 * 33 + 1))
    assert s["classifier"]["heldout_accuracy"] >= 0.8  # 160 training digits only
    d = s["dit"]
    assert d["samples"] == 30 and len(d["sample_accuracy_per_class"]) == 10
    assert 0.0 <= d["sample_accuracy"] <= 1.0 and np.isfinite(d["frechet_distance_samples_vs_heldout"])
    assert d["frechet_distance_train_vs_heldout"] >= 0.0
    assert 0.0 < s["vavae"]["heldout_psnr_db"] < 100.0
    assert s["fid"]["status"] == "skipped" and "python -m eval.inception" in s["fid"]["how"]
    assert (
        "vavae.loss.perceptual_weight=1.0" in s["losses_off"] and "vavae.loss.use_vf=true" in s["losses_off"]
    )
    for line in ("=== ldit demo finished in", "sample grid:", "reconstruction grid:", "TensorBoard:",
                 "losses off:", "classifier:", "DiT samples:", "per class:", "Fréchet distance:", "FID skipped"):  # fmt: skip
        assert line in stdout, line


def test_rerun_skips_finished_stages_and_refuses_other_settings(demo):
    out, first, _ = demo
    again = ldit_demo(f"out={out}")
    s = json.loads((out / "summary.json").read_text())
    assert s["skipped_stages"] == ["digits", "prep-images", "train-vavae", "extract-latents", "train-dit"]
    assert "$ ldit" not in again.stdout and "finished before, skipped" in again.stdout
    assert s["dit"] == first["dit"] and s["vavae"] == first["vavae"]  # same models, same seeds: same figures
    refused = ldit_demo(f"out={out}", "vavae.optim.lr=1e-3", check=False)
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
    assert list(s["stage_times_s"])[-3:] == ["prep-heldout", "ref-stats", "eval"]
    assert s["fid"]["status"] == "done" and np.isfinite(s["fid"]["fid"])
    assert json.loads(Path(s["fid"]["file"]).read_text())["metrics"]["fid"] == s["fid"]["fid"]
    assert "_n20_heldout-reference" in s["fid"]["file"] and "FID:                 " in proc.stdout
    assert s["dit"] == first["dit"]


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
    cfg = load_config(DemoConfig, [str(QUICK)], ["dit.steps=7"])
    assert cfg.dit.steps == 7 and cfg.vavae.steps == 3 and cfg.dit.model.size == DemoConfig().dit.model.size


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
