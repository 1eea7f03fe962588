"""`ldit eval` and `ldit ref-stats` with real processes (gloo, CPU): the same bytes at 1 and 2 ranks, reruns
that skip, values checked against direct computations, and bad input named in one error line.

Everything is tiny and offline: a random-weight Inception file (``eval.inception.random_weights``), random
LPIPS weights, a T/1 LightningDiT on (32, 2, 2) latents and the `small` VA-VAE (f8, so 16-px samples), and a
21-image shard set written by ``ldit prep-images``. torch-fidelity resizes every image to 299 px, so the
Inception cost per image does not depend on the image size.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from data_prep.manifest import ClassInfo, LatentInfo, Manifest, load_manifest
from data_prep.shards import read_shard
from eval.config import EvalConfig, SamplerConfig
from eval.inception import WEIGHTS_FILE, InceptionFeatures, extract_features, random_weights
from eval.job import EvalInputError, NpzWriter, index_seed, json_text, run
from eval.metrics import FeatureStats, frechet_distance, load_reference, mean_cov
from eval.recon import crop_uint8, recon_metrics, reconstruct
from eval.ref_stats import pool_subset
from eval.sample_fid import eval_name, reference_pool, sample_label, sample_noise
from models.export import load_lightningdit, load_vavae, weights_sha256
from models.lightningdit import LightningDiT, lightningdit_args
from models.lpips import LPIPS, VGG16Slices
from models.samplers import cfg_model_fn, sample_ode
from models.vavae import AutoencoderKL, autoencoder_args, images_to_uint8
from slurm.config import load_config
from tests.conftest import ROOT, clean_env
from tests.data_fixtures import imagenet_folder
from trainer.config import RunConfig, StreamConfig, TrainDiTConfig, TrainVAVAEConfig, VAVAELossConfig
from trainer.export import export_weights

N = 16  # samples; 3 batches of 6, 6, 4: at 2 ranks the last round has one idle rank
DIT_ARGS = ["num_samples=16", "batch_size=6", "sampler.points=8", "sampler.cfg_scale=4.0",
            "sampler.cfg_interval_start=0.3", "is_splits=4", "grid=10"]  # fmt: skip


def ldit(*args: str, local: int = 0, check: bool = True) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "slurm.cli", *args] + (["--local", str(local)] if local else [])
    proc = subprocess.run(cmd, cwd=ROOT, env=clean_env(), capture_output=True, text=True, timeout=600)
    if check:
        assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Weights files, a VA-VAE run and a DiT run with exports, a latent manifest, an image shard set."""
    root = tmp_path_factory.mktemp("eval")
    w: dict[str, Path] = {"root": root, "inception": random_weights(root / WEIGHTS_FILE, seed=0)}
    torch.manual_seed(0)
    vgg = VGG16Slices().state_dict()  # slice{s}.{i}.{p} → torchvision's features.{i}.{p}
    torch.save({"features." + k.split(".", 1)[1]: v for k, v in vgg.items()}, root / "vgg16.pth")
    heads = {f"lin{i}.model.1.weight": torch.rand(1, c, 1, 1) for i, c in enumerate((64, 128, 256, 512, 512))}
    torch.save(heads, root / "heads.pth")
    w["vgg"], w["heads"] = root / "vgg16.pth", root / "heads.pth"

    src = imagenet_folder(root / "src")
    ldit("prep-images", f"src={src}", f"out={root / 'images'}", "shard_samples=4")
    w["images"] = root / "images"

    vae = AutoencoderKL(autoencoder_args("small")).eval()
    vcfg = TrainVAVAEConfig(run=RunConfig(name="vae", root=str(root / "runs")), model="small",
                            data=StreamConfig(shards=str(w["images"])),
                            loss=VAVAELossConfig(vgg16_weights=str(w["vgg"]), lpips_weights=str(w["heads"])))  # fmt: skip
    w["vavae"] = export_weights(root / "runs" / "vae", 5, vae, vae.state_dict(), vcfg)

    latents = root / "latents"
    latents.mkdir()
    Manifest("latents", [], [ClassInfo(f"c{i}", i, f"c{i}") for i in range(3)],
             producer={"job": "extract-latents", "config": {"vavae": str(w["vavae"])}},
             latent=LatentInfo((32, 2, 2), "float32", tuple(0.1 * i for i in range(32)),
                               tuple(1.0 + 0.01 * i for i in range(32)))).save(latents)  # fmt: skip
    dit = LightningDiT(lightningdit_args("T/1", in_channels=32, input_size=2, num_classes=3))
    with torch.no_grad():
        for p in dit.parameters():  # the zero-initialised output layer would make every velocity 0
            p.add_(0.05 * torch.randn_like(p))
    dcfg = TrainDiTConfig(
        run=RunConfig(name="dit", root=str(root / "runs")), data=StreamConfig(shards=str(latents))
    )
    w["dit"] = export_weights(root / "runs" / "dit", 7, dit, dit.state_dict(), dcfg)
    return w


@pytest.fixture(scope="module")
def reference(world: dict[str, Path]) -> Path:
    """ref-stats of the image shard set at 2 ranks and at 1; the two files' arrays must be identical."""
    outs = []
    for local, name in ((2, "ref2.npz"), (1, "ref1.npz")):
        out = world["root"] / name
        ldit("ref-stats", f"images={world['images']}", f"out={out}", "image_size=16", "batch_size=3",
             "pool_samples=10", "save_images=true", f"inception_weights={world['inception']}", local=local)  # fmt: skip
        outs.append(out)
    with np.load(outs[0]) as a, np.load(outs[1]) as b:
        assert sorted(a.files) == sorted(b.files) == ["arr_0", "mu", "mu_s", "pool", "sigma", "sigma_s"]
        for k in a.files:
            assert a[k].dtype == b[k].dtype and np.array_equal(a[k], b[k]), k
    return outs[0]


def _config(world: dict[str, Path], name: str, *args: str) -> EvalConfig:
    base = [
        f"run.root={world['root'] / 'runs'}",
        f"run.name={name}",
        f"inception_weights={world['inception']}",
    ]
    return load_config(EvalConfig, [], [*base, *args])


def _eval(world: dict[str, Path], run: str, *args: str, local: int = 0, check: bool = True):
    return ldit("eval", f"run.root={world['root'] / 'runs'}", f"run.name={run}",
                f"inception_weights={world['inception']}", *args, local=local, check=check)  # fmt: skip


def test_ref_stats_match_a_direct_computation(world, reference):
    m = load_manifest(world["images"], "images")
    crops = np.stack(
        [crop_uint8(s, 16) for sh in m.shards for s in read_shard(str(world["images"] / sh.name))]
    )
    net = InceptionFeatures(world["inception"], allow_download=False, device=torch.device("cpu"))
    feats = extract_features(net, torch.from_numpy(crops).permute(0, 3, 1, 2), batch_size=7)
    ref = load_reference(reference)
    mu, sigma = mean_cov(feats["pool"])
    np.testing.assert_allclose(ref.mu, mu, atol=1e-4)
    np.testing.assert_allclose(ref.sigma, sigma, atol=1e-4)
    np.testing.assert_allclose(ref.mu_s, mean_cov(feats["spatial"])[0], atol=1e-4)
    subset = pool_subset(m.total, 10, 0)
    np.testing.assert_allclose(ref.pool, feats["pool"][subset].numpy(), atol=1e-4)
    with np.load(reference) as z:
        assert np.array_equal(z["arr_0"], crops[subset])  # the kept images, in shard order


@pytest.fixture(scope="module")
def adm_reference(world: dict[str, Path], reference: Path) -> Path:
    """The ref-stats file as an ADM reference batch: statistics and the images arr_0, no pool features."""
    with np.load(reference) as z:
        adm = {k: z[k] for k in ("mu", "sigma", "mu_s", "sigma_s", "arr_0")}
    path = world["root"] / "VIRTUAL_tiny.npz"
    np.savez(path, **adm)
    return path


def test_dit_eval_is_the_same_at_1_and_2_ranks_and_reruns_skip(world, adm_reference, tmp_path, capsys):
    args = (*DIT_ARGS, f"reference={adm_reference}", "save_npz=true")
    _eval(world, "dit", *args, local=2)
    cfg = EvalConfig(num_samples=N, sampler=SamplerConfig(points=8, cfg_scale=4.0, cfg_interval_start=0.3))
    name = eval_name(cfg, 7, adm_reference)
    assert name == "step-00000007_euler8-shift0.3_cfg4-first3-from0.3_uniform_seed0_n16_VIRTUAL_tiny"
    out = world["root"] / "runs" / "dit" / "eval" / name
    assert sorted(p.name for p in out.iterdir()) == ["grid.png", "metrics.json", "samples.npz", "timing.json"]
    first = {p.name: p.read_bytes() for p in out.iterdir()}
    shutil.move(out, tmp_path / "two-ranks")
    _eval(world, "dit", *args)
    assert (out / "metrics.json").read_bytes() == first["metrics.json"]
    assert (out / "samples.npz").read_bytes() == first["samples.npz"]
    assert (out / "grid.png").read_bytes() == first["grid.png"]

    doc = json.loads(first["metrics.json"])
    m = doc["metrics"]
    assert set(m) == {"fid", "sfid", "inception_score", "inception_score_std", "precision", "recall"}
    assert m["fid"] > 0 and m["sfid"] > 0 and m["inception_score"] >= 1.0
    assert 0 <= m["precision"] <= 1 and 0 <= m["recall"] <= 1
    assert doc["vavae"]["path"] == str(world["vavae"]) and doc["vavae"]["from"].endswith(
        "latents/manifest.json"
    )
    assert doc["reference"]["precision_recall_from"] == "arr_0 (10 images, pool features computed)"
    assert doc["sampling"]["batch_size"] == 6 and doc["export"] == {
        "path": "export/step-00000007", "step": 7, "weights_sha256": weights_sha256(world["dit"])
    }  # fmt: skip
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(world["root"] / "runs" / "dit" / "tb"), size_guidance={"scalars": 0}).Reload()
    tag = "eval/" + name.split("_", 1)[1]
    assert {f"{tag}/{k}" for k in m} <= set(acc.Tags()["scalars"])
    for k in m:  # both runs (2 ranks, then 1) logged at the export's step, in float32
        events = acc.Scalars(f"{tag}/{k}")
        assert [e.step for e in events] == [7, 7]
        assert all(e.value == pytest.approx(m[k], rel=1e-6, abs=1e-7) for e in events)

    # Sample 3 (batch 0, rank 0) and sample 14 (batch 2, rank 0 in the second round) recomputed here.
    with np.load(out / "samples.npz") as z:
        samples = z["arr_0"]
    assert samples.shape == (N, 16, 16, 3) and samples.dtype == np.uint8
    dit, vae = load_lightningdit(world["dit"]).eval(), load_vavae(world["vavae"]).eval()
    mean = torch.tensor([0.1 * i for i in range(32)]).view(1, -1, 1, 1)
    std = torch.tensor([1.0 + 0.01 * i for i in range(32)]).view(1, -1, 1, 1)
    for i in (3, 14):
        y = torch.tensor([sample_label(cfg, i, 3)])
        fn = cfg_model_fn(dit, y, 4.0, null_class=3, interval_start=0.3, channels="first3")
        z = sample_ode(fn, sample_noise(0, i, (32, 2, 2))[None], "euler", 8, 0.3) * std + mean
        with torch.no_grad():
            img = images_to_uint8(vae.decode(z))[0].numpy()
        assert np.abs(img.astype(int) - samples[i].astype(int)).max() <= 1

    run(_config(world, "dit", *args))  # in-process: a finished evaluation needs no process group
    printed = capsys.readouterr().out
    assert "exists; not redoing it" in printed and json.dumps(m["fid"]) in printed


def test_labels_and_reference_pool(world, reference):
    """Uniform labels from (seed, index), balanced ones cycling; a stored `pool` is used as it is."""
    uniform = [sample_label(EvalConfig(seed=3), i, 5) for i in range(2000)]
    assert np.bincount(uniform, minlength=5).min() > 340 and uniform == [
        sample_label(EvalConfig(seed=3), i, 5) for i in range(2000)
    ]
    assert uniform != [sample_label(EvalConfig(seed=4), i, 5) for i in range(2000)]
    assert [sample_label(EvalConfig(labels="balanced"), i, 3) for i in range(7)] == [0, 1, 2, 0, 1, 2, 0]
    ref = load_reference(reference)
    pool, how = reference_pool(EvalConfig(), ref, reference, None)
    assert how == "pool (10 stored features)" and np.array_equal(pool.numpy(), ref.pool)


def test_vavae_eval_matches_a_direct_computation(world):
    _eval(world, "vae", f"images={world['images']}", "image_size=32", "num_samples=10", "batch_size=3",
          "seed=5", local=2)  # fmt: skip
    out = world["root"] / "runs" / "vae" / "eval" / "step-00000005_recon_images_crop32_seed5_n10"
    doc = json.loads((out / "metrics.json").read_text())
    m = load_manifest(world["images"], "images")
    samples = [s for sh in m.shards[:3] for s in read_shard(str(world["images"] / sh.name))][:10]  # 4 + 4 + 2
    real = torch.from_numpy(np.stack([crop_uint8(s, 32) for s in samples])).permute(0, 3, 1, 2)
    vae = load_vavae(world["vavae"]).eval()
    fake = reconstruct(vae, real, [str(s["__key__"]) for s in samples], seed=5)
    per_image = recon_metrics(real, fake, LPIPS(world["vgg"], world["heads"]))
    net = InceptionFeatures(world["inception"], allow_download=False, device=torch.device("cpu"))
    fr, ff = extract_features(net, real)["pool"], extract_features(net, fake)["pool"]
    rfid = frechet_distance(*mean_cov(fr), *mean_cov(ff))
    got = doc["metrics"]
    assert got["psnr"] == pytest.approx(per_image["psnr"].mean().item(), rel=1e-3)
    assert got["ssim"] == pytest.approx(per_image["ssim"].mean().item(), rel=1e-3)
    assert got["lpips"] == pytest.approx(per_image["lpips"].mean().item(), rel=1e-3)
    assert got["rfid"] == pytest.approx(rfid, rel=1e-2)
    assert doc["protocol"]["psnr_infinite_images"] == 0 and doc["images"]["num_images"] == 10


def test_identity_reconstruction_metrics():
    """An identity autoencoder's per-image values: PSNR inf, SSIM 1, LPIPS 0; metrics.json keeps inf as a string."""
    x = torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8)
    v = recon_metrics(x, x.clone(), LPIPS(pretrained=False))
    assert torch.isinf(v["psnr"]).all() and torch.allclose(v["ssim"], torch.ones(3, dtype=torch.float64))
    assert torch.equal(v["lpips"], torch.zeros(3, dtype=torch.float64))
    assert json.loads(json_text({"psnr": v["psnr"].mean().item()})) == {"psnr": "inf"}
    stats = FeatureStats.zeros(4)
    stats.update(torch.randn(8, 4))
    assert frechet_distance(*stats.mean_cov(), *stats.mean_cov()) == pytest.approx(0.0, abs=1e-9)


def test_npz_writer_is_deterministic_and_readable(tmp_path):
    rows = np.random.default_rng(0).integers(0, 256, (5, 4, 4, 3), dtype=np.uint8)
    for name in ("a.npz", "b.npz"):
        w = NpzWriter(tmp_path / name, rows.shape)
        w.write(rows[:2])
        w.write(rows[2:])
        w.close()
    assert (tmp_path / "a.npz").read_bytes() == (tmp_path / "b.npz").read_bytes()
    with np.load(tmp_path / "a.npz") as z:
        assert z.files == ["arr_0"] and np.array_equal(z["arr_0"], rows)
    assert index_seed(0, "noise", 1) != index_seed(0, "noise", 2) == index_seed(0, "noise", 2)


def test_bad_input_is_named(world, reference, tmp_path):
    """Config mistakes found before any work (in-process: they come before the process group is used)."""
    with pytest.raises(
        EvalInputError, match=r"run.name=nothing: no export .*/runs/nothing/export/latest \(exports: none\)"
    ):
        run(_config(world, "nothing", f"reference={reference}"))
    with pytest.raises(
        EvalInputError, match=r"no export .*/dit/export/step-00000003 \(exports: step-00000007\)"
    ):
        run(_config(world, "dit", f"reference={reference}", "step=3"))
    with pytest.raises(EvalInputError, match=r"^reference is required: an ADM reference batch"):
        run(_config(world, "dit"))
    with pytest.raises(
        EvalInputError, match=r"^reference=/nonexistent/VIRTUAL_imagenet256_labeled.npz does not exist"
    ):
        run(_config(world, "dit", "reference=/nonexistent/VIRTUAL_imagenet256_labeled.npz"))
    samples_only = tmp_path / "samples.npz"
    np.savez(samples_only, arr_0=np.zeros((4, 8, 8, 3), np.uint8))
    with pytest.raises(EvalInputError, match=r"samples.npz has no FID statistics \(keys: \['arr_0'\]\)"):
        run(_config(world, "dit", f"reference={samples_only}"))
    with pytest.raises(EvalInputError, match=f"num_samples=99 but {world['images']} holds 21 images"):
        run(_config(world, "vae", f"images={world['images']}", "num_samples=99"))
    with pytest.raises(EvalInputError, match="holds a VA-VAE: set images= to a held-out image shard set"):
        run(_config(world, "vae"))


def test_cli_prints_bad_input_as_an_error_line(world, reference):
    proc = _eval(world, "nothing", f"reference={reference}", check=False)
    assert proc.returncode == 1 and proc.stdout == ""
    assert (
        proc.stderr.startswith("ldit eval: error: run.name=nothing: no export")
        and "Traceback" not in proc.stderr
    )
    proc = _eval(world, "dit", *DIT_ARGS, f"reference={reference}", "seed=1",
                 "inception_weights=/nonexistent/inception.pth", check=False)  # fmt: skip
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.startswith("ldit eval: error: FID Inception-v3")
    assert "'/nonexistent/inception.pth' (set by `inception_weights`) does not exist" in proc.stderr


def test_remote_image_set_gives_the_folders_statistics_and_metrics(world, reference):
    """ref-stats and the VA-VAE eval read a `pipe:` image set through the same opener as the manifest: the
    statistics file and the metrics equal the folder's; the output is named after the set (`images`)."""
    remote = f"pipe:cat {world['images']}/{{}}"
    out = world["root"] / "ref-remote.npz"
    ldit("ref-stats", f"images={remote}", f"out={out}", "image_size=16", "batch_size=3", "pool_samples=10",
         "save_images=true", f"inception_weights={world['inception']}")  # fmt: skip
    with np.load(out) as a, np.load(reference) as b:
        assert sorted(a.files) == sorted(b.files)
        for k in a.files:
            assert np.array_equal(a[k], b[k]), k
    args = ["image_size=32", "num_samples=10", "batch_size=3", "seed=5"]
    name = "step-00000005_recon_images_crop32_seed5_n10"
    folder = world["root"] / "runs" / "vae" / "eval" / name
    if not (folder / "metrics.json").is_file():
        _eval(world, "vae", f"images={world['images']}", *args)
    local = json.loads((folder / "metrics.json").read_text())
    shutil.rmtree(folder)
    _eval(world, "vae", f"images={remote}", *args)
    got = json.loads((folder / "metrics.json").read_text())
    assert got["metrics"] == local["metrics"] and got["images"]["path"] == remote
