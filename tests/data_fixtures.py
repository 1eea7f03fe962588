"""Small shard sets and ImageNet-style folders made on the fly for the data tests."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

from data_prep.manifest import ClassInfo, LatentInfo, Manifest
from data_prep.shards import encode_npy, write_shard


def jpeg_bytes(rng: np.random.Generator, size=(40, 30), mode="RGB") -> bytes:
    arr = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    im = Image.fromarray(arr).convert(mode)
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def png_bytes(rng: np.random.Generator, size=(40, 30)) -> bytes:
    arr = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def imagenet_folder(root: Path, classes=("n01440764", "n01443537", "n99999999"), per_class=6, seed=0) -> Path:
    """Good RGB JPEGs, plus one of each oddity ImageNet has (and some it should not)."""
    rng = np.random.default_rng(seed)
    for c in classes:
        (root / c).mkdir(parents=True)
        for i in range(per_class):
            (root / c / f"{c}_{i}.JPEG").write_bytes(jpeg_bytes(rng, size=(40 + 4 * i, 30 + 2 * i)))
    a, b = root / classes[0], root / classes[1]
    (a / "cmyk.JPEG").write_bytes(jpeg_bytes(rng, mode="CMYK"))
    (a / "grey.JPEG").write_bytes(jpeg_bytes(rng, mode="L"))
    (b / "png_in_disguise.JPEG").write_bytes(png_bytes(rng))
    good = jpeg_bytes(rng, size=(64, 64))
    (b / "truncated.JPEG").write_bytes(good[: len(good) // 2])
    (b / "garbage.JPEG").write_bytes(rng.integers(0, 256, 500, dtype=np.uint8).tobytes())
    (b / "empty.JPEG").write_bytes(b"")
    (b / "notes.txt").write_text("not an image")
    return root


def latent_set(
    folder: Path, sizes=(7, 5, 9, 6, 8, 4, 7, 10, 3, 5, 6, 8), shape=(4, 2, 2), classes=3, seed=0
) -> Manifest:
    """A latent shard set whose sample n has key s{n:04d}, class n % classes, latent filled with n."""
    folder.mkdir(parents=True, exist_ok=True)
    shards, n = [], 0
    for i, count in enumerate(sizes):
        samples = []
        for _ in range(count):
            a = np.full(shape, n, dtype=np.float32)
            a[0, 0, 0] = -n  # makes the flip visible
            samples.append(
                {
                    "__key__": f"s{n:04d}",
                    "latent.npy": encode_npy(a),
                    "latent_flip.npy": encode_npy(a[..., ::-1]),
                    "cls": str(n % classes).encode(),
                }
            )
            n += 1
        shards.append(write_shard(folder / f"shard-{i:06d}.tar", samples))
    m = Manifest(
        "latents",
        shards,
        [ClassInfo(f"c{i}", i, f"c{i}") for i in range(classes)],
        latent=LatentInfo(shape, "float32", (0.0,) * shape[0], (1.0,) * shape[0]),
    )
    m.save(folder)
    return m


def gaussian_latent_set(
    folder: Path, shards: int = 12, per_shard: int = 8, shape=(4, 4, 4), classes: int = 3
) -> Manifest:
    """Latents of `classes` Gaussians around their own means, with the set's true per-channel statistics:
    a well-conditioned training problem (small, smooth losses), unlike :func:`latent_set`."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    infos, n, all_x = [], 0, []
    for i in range(shards):
        rows = []
        for _ in range(per_shard):
            y = n % classes
            x = (rng.standard_normal(shape) * 0.5 + 2.0 * y - 2.0).astype(np.float32)
            all_x.append(x)
            rows.append(
                {
                    "__key__": f"s{n:04d}",
                    "latent.npy": encode_npy(x),
                    "latent_flip.npy": encode_npy(x[..., ::-1]),
                    "cls": str(y).encode(),
                }
            )
            n += 1
        infos.append(write_shard(folder / f"shard-{i:06d}.tar", rows))
    a = np.stack(all_x)
    mean, std = a.mean(axis=(0, 2, 3)), a.std(axis=(0, 2, 3), ddof=1)
    m = Manifest(
        "latents",
        infos,
        [ClassInfo(f"c{i}", i, f"c{i}") for i in range(classes)],
        latent=LatentInfo(shape, "float32", tuple(mean.tolist()), tuple(std.tolist())),
    )
    m.save(folder)
    return m


def cut_set(src: Path, folder: Path) -> tuple[str, str]:
    """A copy of latent set `src` whose shard 4 is cut before its last member, with the manifest's size
    and sha256 of it updated (as a copy tool that re-hashed would): only the tar's contents show it."""
    import dataclasses
    import shutil
    import tarfile

    from data_prep.manifest import load_manifest, sha256_file

    shutil.copytree(src, folder)
    m = load_manifest(folder)
    path = folder / m.shards[4].name
    with tarfile.open(path) as tf:
        last = tf.getmembers()[-1]
    path.write_bytes(path.read_bytes()[: last.offset])
    m.shards[4] = dataclasses.replace(m.shards[4], bytes=last.offset, sha256=sha256_file(path))
    m.save(folder)
    key = last.name.split(".")[0]
    return str(path), (
        f"shard {path}: cut short at byte {last.offset}: it ends without the end-of-archive blocks (two "
        f"512-byte zero blocks), and its last sample {key} lacks member(s) latent_flip.npy; copy or write "
        "the shard again"
    )
