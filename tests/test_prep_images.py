"""`ldit prep-images`: ImageNet-style folder → image shards, with every odd input reported."""

from __future__ import annotations

import io
import subprocess
import sys
import tarfile

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from data_prep.images import BadImage, center_crop_adm, decode_rgb, inspect_image, random_crop
from data_prep.manifest import load_manifest
from tests.conftest import ROOT, clean_env
from tests.data_fixtures import imagenet_folder, jpeg_bytes


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """The fixture folder prepared by two local processes (real ranks, each writing its shards)."""
    tmp = tmp_path_factory.mktemp("prep")
    src = imagenet_folder(tmp / "src")
    out = tmp / "shards"
    proc = ldit(
        "prep-images",
        "configs/data/imagenet.yaml",
        f"src={src}",
        f"out={out}",
        "shard_samples=4",
        "--local",
        "2",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return src, out, proc.stdout


def test_manifest_counts_classes_and_reasons(prepared):
    src, out, stdout = prepared
    m = load_manifest(out, "images")
    assert m.kind == "images" and m.total == 18 + 3  # 3 classes × 6 good + cmyk, grey, png-as-jpeg
    assert [c.wnid for c in m.classes] == ["n01440764", "n01443537", "n99999999"]
    assert [c.index for c in m.classes] == [0, 1, 2]
    assert m.classes[0].name == "tench, Tinca tinca" and m.classes[2].name == "n99999999"
    assert m.notes == {"cmyk": 1, "greyscale": 1, "png_named_jpeg": 1}
    reasons = {s["path"]: s["reason"] for s in m.skipped}
    assert set(reasons) == {
        "n01443537/truncated.JPEG",
        "n01443537/garbage.JPEG",
        "n01443537/empty.JPEG",
        "n01443537/notes.txt",
    }
    assert reasons["n01443537/truncated.JPEG"].startswith("corrupt or truncated JPEG")
    assert reasons["n01443537/garbage.JPEG"] == "not an image (unrecognised format)"
    assert reasons["n01443537/empty.JPEG"] == "empty file"
    assert reasons["n01443537/notes.txt"].startswith("extension not in")
    assert sum(s.count for s in m.shards) == 21 and len(m.shards) == 6  # 24 candidate images / 4 per shard
    assert "prep-images: 21 images of 3 classes in 6 shards" in stdout
    assert "converted when read: cmyk 1, greyscale 1, png_named_jpeg 1" in stdout
    assert "skipped: 4 (corrupt or truncated JPEG: 1, empty file: 1, extension not in [" in stdout


def test_shards_are_plain_tar_and_webdataset_reads_them(prepared):
    _, out, _ = prepared
    m = load_manifest(out)
    first = out / m.shards[0].name
    listing = subprocess.run(
        ["tar", "tf", str(first)], capture_output=True, text=True, check=True
    ).stdout.split()
    assert len(listing) == 3 * m.shards[0].count and all(
        n.endswith((".jpg", ".png", ".cls", ".json")) for n in listing
    )
    with tarfile.open(first) as tf:
        assert len(tf.getnames()) == len(listing)
    keys, classes = [], []
    for s in m.shards:
        for sample in wds.WebDataset(str(out / s.name), shardshuffle=False).decode("pil"):
            img = sample.get("jpg", sample.get("png"))
            assert img.size[0] >= 30
            keys.append(sample["__key__"])
            classes.append(int(sample["cls"]))
    assert len(keys) == len(set(keys)) == 21
    assert "n01443537/png_in_disguise" in keys and "n01440764/cmyk" in keys
    # seeded order across shards: the first shard is not one class
    assert len(set(classes[: m.shards[0].count])) > 1


def test_odd_images_decode_to_rgb(prepared):
    src, _, _ = prepared
    for name in ("n01440764/cmyk.JPEG", "n01440764/grey.JPEG", "n01443537/png_in_disguise.JPEG"):
        data = (src / name).read_bytes()
        check = inspect_image(data, name)
        im = decode_rgb(data)
        assert im.mode == "RGB" and im.size == check.size
    assert inspect_image((src / "n01443537/png_in_disguise.JPEG").read_bytes(), "x.JPEG").ext == "png"


def test_odd_images_convert_to_the_right_pixels():
    """Not only RGB of the right size: a CMYK JPEG decodes to the colours it was made from, a greyscale one
    to R = G = B = its grey levels, a PNG named .JPEG to its exact pixels."""
    yy, xx = np.mgrid[0:48, 0:64]
    smooth = np.stack([xx * 4, yy * 5, (xx + yy) * 2], axis=-1).astype(np.uint8)  # JPEG keeps smooth images
    for mode in ("CMYK", "L"):
        buf = io.BytesIO()
        Image.fromarray(smooth).convert(mode).save(buf, format="JPEG", quality=95)
        got = np.asarray(decode_rgb(buf.getvalue()), dtype=np.int16)
        if mode == "CMYK":
            assert np.abs(got - smooth).mean() < 2.0 and np.abs(got - smooth).max() < 24
        else:
            grey = np.asarray(Image.open(io.BytesIO(buf.getvalue())), dtype=np.int16)
            assert all(np.array_equal(got[..., c], grey) for c in range(3))
    buf = io.BytesIO()
    Image.fromarray(smooth).save(buf, format="PNG")
    assert np.array_equal(np.asarray(decode_rgb(buf.getvalue())), smooth)


def ldit(*args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "slurm.cli", *args]
    return subprocess.run(cmd, cwd=ROOT, env=clean_env(), capture_output=True, text=True, timeout=120)


def test_existing_shard_set_is_never_overwritten(prepared):
    src, out, _ = prepared
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    proc = ldit("prep-images", f"src={src}", f"out={out}")
    assert proc.returncode == 1
    assert proc.stderr == (
        f"ldit prep-images: error: {out} already holds a shard set (manifest.json exists); "
        "choose another out= or remove it\n"
    )
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_missing_source_folder_is_a_clear_error(tmp_path):
    proc = ldit("prep-images", f"src={tmp_path / 'nope'}", f"out={tmp_path / 'o'}")
    assert proc.returncode == 1
    assert proc.stderr == f"ldit prep-images: error: source folder {tmp_path / 'nope'} does not exist\n"


def test_adm_center_crop_and_random_crop():
    from PIL import Image

    im = Image.fromarray(np.arange(600 * 1100 * 3, dtype=np.uint32).reshape(600, 1100, 3).astype(np.uint8))
    out = center_crop_adm(im, 256)
    assert out.size == (256, 256)
    # 600 ≥ 512: one BOX halving to 550×300, then BICUBIC to round(550·256/300)=469 × 256, center crop
    half = im.resize((550, 300), resample=Image.BOX)
    ref = half.resize((469, 256), resample=Image.BICUBIC).crop((106, 0, 362, 256))
    assert np.array_equal(np.asarray(out), np.asarray(ref))
    rc = random_crop(im, 64, (0.0, 0.999))
    assert rc.size == (64, 64)
    from data_prep.images import smallest_max_size

    small = smallest_max_size(im, 64)  # cv2.INTER_LINEAR, as albumentations (tests/test_vavae.py)
    assert small.size == (117, 64)
    assert np.array_equal(np.asarray(rc), np.asarray(small.crop((0, 0, 64, 64))))


# ------------------------------------------------------------------------------------ empty results


def unreadable_folder(root):
    """One class folder holding three files none of which is a readable image; their skip reasons."""
    rng = np.random.default_rng(1)
    (root / "n01440764").mkdir(parents=True)
    good = jpeg_bytes(rng, size=(64, 64))
    files = {
        "n01440764/a.JPEG": b"",
        "n01440764/b.JPEG": rng.integers(0, 256, 500, dtype=np.uint8).tobytes(),
        "n01440764/c.JPEG": good[: len(good) // 2],
    }
    reasons = {}
    for rel, data in files.items():
        (root / rel).write_bytes(data)
        try:
            inspect_image(data, rel)
        except BadImage as exc:
            reasons[rel] = str(exc)
    assert len(reasons) == 3
    return root, reasons


def test_folder_of_unreadable_files_exits_1_in_one_line_and_writes_nothing(tmp_path):
    """Issue #15: it used to exit 0 with a 0-shard manifest that every later step trusted."""
    src, reasons = unreadable_folder(tmp_path / "src")
    out = tmp_path / "out"
    proc = ldit("prep-images", f"src={src}", f"out={out}")
    listing = "; ".join(f"{p}: {r}" for p, r in sorted(reasons.items()))
    assert proc.returncode == 1, proc.stdout
    assert [line for line in proc.stderr.splitlines() if line.startswith("ldit")] == [  # (and tqdm's bar)
        f"ldit prep-images: error: no readable image in {src}: all 3 files of its 1 class folder(s) were "
        f"skipped ({listing}); nothing was written to {out}. Put JPEG or PNG images in the class folders of src="
    ]
    assert proc.stderr.endswith("src=\n") and "Traceback" not in proc.stderr
    assert reasons["n01440764/a.JPEG"] == "empty file"
    assert reasons["n01440764/b.JPEG"] == "not an image (unrecognised format)"
    assert reasons["n01440764/c.JPEG"].startswith("corrupt or truncated JPEG")
    assert not out.exists()  # no manifest, no empty shard, not even the folder


def test_every_file_skipped_on_two_ranks_writes_nothing(tmp_path):
    """Five bad images and a text file over three shards written by two ranks: exit 1 and no shard or
    manifest left behind; a folder that existed before is kept, and what it held is untouched."""
    src, reasons = unreadable_folder(tmp_path / "src")
    rng = np.random.default_rng(2)
    (src / "n01443537").mkdir()
    for i in range(2):
        (src / "n01443537" / f"g{i}.JPEG").write_bytes(rng.integers(0, 256, 300, dtype=np.uint8).tobytes())
    (src / "n01443537" / "notes.txt").write_text("not an image")
    out = tmp_path / "out"
    out.mkdir()
    (out / "README").write_text("mine")
    proc = ldit("prep-images", f"src={src}", f"out={out}", "shard_samples=2", "--local", "2")
    assert proc.returncode == 1, proc.stdout
    line = (
        f"ldit prep-images: error: no readable image in {src}: all 6 files of its 2 class folder(s) were "
        "skipped (corrupt or truncated JPEG: 1, empty file: 1, extension not in ['.jpeg', '.jpg', '.png']: 1, "
        f"not an image (unrecognised format): 3; e.g. n01440764/a.JPEG: empty file); nothing was written to "
        f"{out}. Put JPEG or PNG images in the class folders of src=\n"
    )
    assert line in proc.stderr and "Traceback" not in proc.stderr
    assert sorted(p.name for p in out.iterdir()) == ["README"] and (out / "README").read_text() == "mine"


def test_class_folders_without_files_are_an_error(tmp_path):
    (tmp_path / "src" / "n0").mkdir(parents=True)
    (tmp_path / "src" / "n1").mkdir()
    proc = ldit("prep-images", f"src={tmp_path / 'src'}", f"out={tmp_path / 'out'}")
    assert proc.returncode == 1
    assert proc.stderr == (
        f"ldit prep-images: error: no readable image in {tmp_path / 'src'}: its 2 class folder(s) hold no "
        f"file; nothing was written to {tmp_path / 'out'}. Put JPEG or PNG images in the class folders of src=\n"
    )
    assert not (tmp_path / "out").exists()
