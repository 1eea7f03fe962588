"""`ldit extract-latents`: posterior samples of every image and its flip, independent of the world size,
resumable, with the manifest's per-channel statistics."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from data_prep.extract_latents import sample_noise_seed, stats_subset
from data_prep.images import center_crop_adm, decode_rgb, to_tensor
from data_prep.manifest import load_manifest
from data_prep.shards import decode_npy, read_shard
from models.export import save_export
from models.vavae import AutoencoderKL, autoencoder_args
from tests.conftest import ROOT, clean_env
from tests.data_fixtures import imagenet_folder


def ldit(*args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "slurm.cli", *args]
    proc = subprocess.run(cmd, cwd=ROOT, env=clean_env(), capture_output=True, text=True, timeout=300)
    return proc


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("extract")
    src = imagenet_folder(tmp / "src", per_class=4)
    proc = ldit("prep-images", f"src={src}", f"out={tmp / 'images'}", "shard_samples=3")
    assert proc.returncode == 0, proc.stderr
    torch.manual_seed(0)
    vae = AutoencoderKL(autoencoder_args("small"))
    save_export(tmp / "vavae", vae)
    return tmp, vae


def extract(tmp, out, *extra):
    args = [
        "extract-latents",
        f"images={tmp / 'images'}",
        f"vavae={tmp / 'vavae'}",
        f"out={out}",
        "image_size=32",
        "batch_size=2",
        "stats_samples=9",
        *extra,
    ]
    proc = ldit(*args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_world_size_does_not_change_the_latents(inputs):
    tmp, _ = inputs
    extract(tmp, tmp / "one")
    extract(tmp, tmp / "two", "--local", "2")
    one, two = load_manifest(tmp / "one", "latents"), load_manifest(tmp / "two", "latents")
    assert [s.sha256 for s in one.shards] == [s.sha256 for s in two.shards]
    assert one.latent == two.latent and one.latent.shape == (32, 4, 4) and one.latent.dtype == "float16"
    images = load_manifest(tmp / "images")
    assert one.counts == images.counts and one.classes == images.classes
    assert one.producer["vavae_sha256"] and one.producer["job"] == "extract-latents"


def test_fp32_option_stores_the_same_samples_unrounded(inputs):
    tmp, _ = inputs
    extract(tmp, tmp / "fp32", "dtype=fp32")
    m16, m32 = load_manifest(tmp / "one"), load_manifest(tmp / "fp32")
    assert (m32.latent.dtype, m32.latent.shape, m32.counts) == ("float32", (32, 4, 4), m16.counts)
    for sh in m32.shards[:2]:
        for a, b in zip(read_shard(str(tmp / "fp32" / sh.name)), read_shard(str(tmp / "one" / sh.name))):
            assert a["__key__"] == b["__key__"]
            for name in ("latent.npy", "latent_flip.npy"):
                x32, x16 = decode_npy(a[name]), decode_npy(b[name])
                assert x32.dtype == np.float32 and x16.dtype == np.float16
                assert np.array_equal(x32.astype(np.float16), x16)  # fp16 is the fp32 sample, rounded
                assert not np.array_equal(x32, x16.astype(np.float32))
    # statistics are of the stored values, so they differ in the last digits only
    np.testing.assert_allclose(m32.latent.mean, m16.latent.mean, rtol=1e-2, atol=1e-3)


def test_latents_are_posterior_samples_of_image_and_flip(inputs):
    tmp, vae = inputs
    m = load_manifest(tmp / "one")
    img_samples = read_shard(str(tmp / "images" / m.shards[1].name))
    lat_samples = read_shard(str(tmp / "one" / m.shards[1].name))
    assert [s["__key__"] for s in img_samples] == [s["__key__"] for s in lat_samples]
    s = img_samples[0]
    x = to_tensor(center_crop_adm(decode_rgb(s.get("jpg") or s["png"]), 32))[None]
    with torch.no_grad():
        for name, image, salt in (("latent.npy", x, ""), ("latent_flip.npy", x.flip(-1), "/flip")):
            post = vae.encode(image)
            eps = torch.randn(
                (32, 4, 4), generator=torch.Generator().manual_seed(sample_noise_seed(0, s["__key__"] + salt))
            )
            expected = (post.mean + post.std * eps)[0].numpy().astype(np.float16)
            stored = decode_npy(lat_samples[0][name])
            assert stored.dtype == np.float16
            np.testing.assert_allclose(
                stored.astype(np.float32), expected.astype(np.float32), rtol=1e-2, atol=2e-3
            )
    assert lat_samples[0]["cls"] == s["cls"]


def test_statistics_are_over_the_seeded_subset(inputs):
    tmp, _ = inputs
    m = load_manifest(tmp / "one")
    lat = np.concatenate(
        [
            np.stack([decode_npy(s["latent.npy"]) for s in read_shard(str(tmp / "one" / sh.name))])
            for sh in m.shards
        ]
    ).astype(np.float64)
    chosen = lat[stats_subset(m.total, 9, 0)]  # (9, 32, 4, 4)
    t = torch.from_numpy(chosen).permute(1, 0, 2, 3).reshape(32, -1)
    np.testing.assert_allclose(m.latent.mean, t.mean(1).numpy(), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(m.latent.std, t.std(1).numpy(), rtol=1e-9)  # unbiased, as the reference


def test_rerun_skips_finished_shards_and_redoes_damaged_ones(inputs):
    tmp, _ = inputs
    out = tmp / "resume"
    extract(tmp, out)
    first = load_manifest(out)
    (out / "manifest.json").unlink()  # as if the job died before writing the manifest …
    (out / first.shards[2].name).write_bytes(b"damaged")  # … with one shard damaged
    stdout = extract(tmp, out)
    assert f"skipped {len(first.shards) - 1} finished shard(s)" in stdout
    assert load_manifest(out).to_json() == first.to_json()
    records = sorted(p.name for p in (out / ".parts").iterdir())
    assert records == sorted(f"{s.name}.json" for s in first.shards)
    assert json.loads((out / ".parts" / records[0]).read_text())["info"]["name"] == first.shards[0].name


def test_refuses_to_overwrite_and_names_missing_inputs(inputs):
    tmp, _ = inputs
    proc = ldit("extract-latents", f"images={tmp / 'images'}", f"vavae={tmp / 'vavae'}", f"out={tmp / 'one'}")
    assert proc.returncode == 1 and "already holds a finished shard set" in proc.stderr
    proc = ldit("extract-latents", f"images={tmp / 'nope'}", f"vavae={tmp / 'vavae'}", f"out={tmp / 'x'}")
    assert proc.returncode == 1 and f"{tmp / 'nope'}: no manifest.json" in proc.stderr


def test_empty_source_is_named(inputs, tmp_path):
    """Issue #15: a 0-sample image set (as prep-images used to write) died in `records[0]` with IndexError."""
    from data_prep.manifest import ClassInfo, Manifest

    tmp, _ = inputs
    empty = tmp_path / "empty"
    empty.mkdir()
    Manifest("images", [], [ClassInfo("n0", 0, "n0")]).save(empty)
    proc = ldit("extract-latents", f"images={empty}", f"vavae={tmp / 'vavae'}", f"out={tmp_path / 'lat'}")
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert proc.stderr == (
        f"ldit extract-latents: error: {empty}: the shard set holds 0 samples (0 shards in its manifest): "
        "nothing can be read from it; write it again with `ldit prep-images` from a folder of readable images\n"
    )
    assert not (tmp_path / "lat").exists()


@pytest.mark.slow
def test_rerun_after_a_partial_run_with_uneven_work_finishes_like_a_clean_run(inputs, tmp_path):
    """2 ranks; the first run is killed after some shards; the rerun leaves rank 0 nothing to do and rank 1
    most shards. Rank 0 waits for rank 1's records by polling (no collective: see
    test_waiting_for_other_ranks_is_bounded_by_progress_not_by_total_time), and the output is the clean
    run's, byte for byte."""
    import os
    import signal
    import time

    tmp, _ = inputs
    src = imagenet_folder(tmp_path / "src", per_class=16)
    assert ldit("prep-images", f"src={src}", f"out={tmp_path / 'images'}", "shard_samples=2").returncode == 0
    args = [f"images={tmp_path / 'images'}", f"vavae={tmp / 'vavae'}", "image_size=128", "batch_size=2",
            "stats_samples=9", "collective_timeout_s=60"]  # fmt: skip
    clean = ldit("extract-latents", *args, f"out={tmp_path / 'clean'}", "--local", "2")
    assert clean.returncode == 0, clean.stderr[-3000:]
    out = tmp_path / "partial"
    cmd = [sys.executable, "-m", "slurm.cli", "extract-latents", *args, f"out={out}", "--local", "2"]
    job = subprocess.Popen(cmd, cwd=ROOT, env=clean_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                           start_new_session=True)  # fmt: skip
    deadline = time.monotonic() + 240
    while len(list((out / ".parts").glob("*.json"))) < 3:
        assert job.poll() is None and time.monotonic() < deadline
        time.sleep(0.005)
    os.killpg(job.pid, signal.SIGKILL)
    job.wait(timeout=30)
    assert not (out / "manifest.json").exists()
    shards = load_manifest(tmp_path / "images").shards
    for i, s in enumerate(shards):  # uneven: rank 0's shards all finished, rank 1's nearly all to do
        if i % 2 == 0 and not (out / ".parts" / f"{s.name}.json").exists():
            (out / s.name).write_bytes((tmp_path / "clean" / s.name).read_bytes())
            rec = json.loads((tmp_path / "clean" / ".parts" / f"{s.name}.json").read_text())
            (out / ".parts" / f"{s.name}.json").write_text(json.dumps(rec))
        if i % 2 == 1 and i > 1:
            (out / ".parts" / f"{s.name}.json").unlink(missing_ok=True)
    start = time.monotonic()
    rerun = ldit("extract-latents", *args, f"out={out}", "--local", "2")
    took = time.monotonic() - start
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    waited = float(rerun.stdout.split("waited ")[1].split(" s")[0])
    print(f"rerun {took:.1f} s; rank 0 waited {waited:.1f} s for rank 1")
    assert f"skipped {(len(shards) + 1) // 2} finished shard(s)" in rerun.stdout
    names = sorted(p.name for p in (tmp_path / "clean").iterdir() if p.name.startswith("shard-"))
    assert len(names) == len(shards)
    for f in names:
        assert (out / f).read_bytes() == (tmp_path / "clean" / f).read_bytes(), f
    a, b = (json.loads((d / "manifest.json").read_text()) for d in (tmp_path / "clean", out))
    assert b["producer"]["config"].pop("out") == str(out)
    a["producer"]["config"].pop("out")
    assert a == b  # shards, sizes, sha256, statistics


def test_waiting_for_other_ranks_is_bounded_by_progress_not_by_total_time(tmp_path):
    """A rank waiting for others' shards fails only when none was finished for `stall_s`: files appearing
    every 0.2 s for 2 s pass a 1 s bound; files that stop appearing fail it, naming what is missing."""
    import threading
    import time

    from data_prep.wait import StalledError, wait_for_files

    files = {tmp_path / f"s{i}.json": f"shard {i} (rank 1)" for i in range(10)}

    def writer(n: int) -> None:
        for path in list(files)[:n]:
            time.sleep(0.2)
            path.touch()

    t = threading.Thread(target=writer, args=(10,))
    t.start()
    waited = wait_for_files(files, stall_s=1.0, what="rank 1's shards", poll_s=0.05)
    t.join()
    assert waited >= 1.9  # longer than the bound in all, never a second without progress
    for path in files:
        path.unlink()
    t = threading.Thread(target=writer, args=(3,))
    t.start()
    with pytest.raises(StalledError) as err:
        wait_for_files(files, stall_s=1.0, what="rank 1's shards", poll_s=0.05)
    t.join()
    assert (
        "none was finished in the last 1 s (collective_timeout_s): 7 of 10 missing: shard 3 (rank 1)"
        in str(err.value)
    )
