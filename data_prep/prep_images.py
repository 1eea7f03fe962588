"""`ldit prep-images`: an ImageNet-style folder → an image shard set (DESIGN.md "Data formats").

Classes are the sub-folders, indexed in sorted order like torchvision's ImageFolder. Every image is
decoded once to check it: corrupt, truncated, empty and non-image files are skipped and listed in the
manifest with the reason; CMYK, greyscale, palette and alpha images, and PNGs named `.JPEG`, are kept
as their original bytes (under the extension of their real format) and converted to RGB when read.

Samples are dealt to shards in a seeded random order, so no shard holds one class. Shard i is written
by rank i mod W, each rank writing its own files; rank 0 merges the per-rank results into
`manifest.json` at the end, which is written last: a folder without a manifest is not a shard set.
Ranks finish at different times (uneven images, slower nodes): each marks a finished shard in `.parts/`
and every rank polls for all the markers (data_prep/wait.py), failing only when no shard was finished for
`collective_timeout_s`; the gather that follows is then short.

A source with no readable image is an error (issue #15), not an empty shard set: the job exits naming
the folder and why each file was skipped, writes no manifest, removes the empty shards it wrote, and
removes `out` if it created it.
"""

from __future__ import annotations

import logging
import shutil
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch.distributed as dist
from tqdm import tqdm

from data_prep.config import PrepImagesConfig
from data_prep.images import BadImage, inspect_image
from data_prep.manifest import MANIFEST, ClassInfo, Manifest, ShardSetError
from data_prep.shards import encode_json, write_shard
from data_prep.wait import wait_for_files

log = logging.getLogger(__name__)


def class_names(wnids: list[str]) -> list[str]:
    """Human-readable names from timm's ImageNet-1k table; a wnid it does not know keeps its own name."""
    from timm.data import ImageNetInfo

    info = ImageNetInfo()
    names = []
    for w in wnids:
        try:
            names.append(info.label_name_to_description(w))
        except (KeyError, ValueError, IndexError):
            names.append(w)
    return names


def scan(
    src: Path, extensions: tuple[str, ...]
) -> tuple[list[str], list[tuple[Path, int, str]], list[dict[str, str]]]:
    """Classes (sorted sub-folder names), images as (path, class index, sample key), and ignored files."""
    if not src.is_dir():
        raise ShardSetError(f"source folder {src} does not exist")
    wnids = sorted(d.name for d in src.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not wnids:
        raise ShardSetError(
            f"{src} has no class sub-folders (expected one folder per class, as ImageNet's train/)"
        )
    exts = tuple(e.lower() for e in extensions)
    images, ignored, keys = [], [], set()
    for index, wnid in enumerate(wnids):
        for path in sorted((src / wnid).rglob("*")):
            if not path.is_file():
                continue
            rel = path.relative_to(src).as_posix()
            if not path.name.lower().endswith(exts):
                ignored.append({"path": rel, "reason": f"extension not in {list(exts)}"})
                continue
            stem = path.relative_to(src / wnid).with_suffix("").as_posix().replace(".", "_")
            key = f"{wnid}/{stem}"
            if key in keys:  # a.jpg beside a.png
                key = f"{key}_{path.suffix[1:].lower()}"
            keys.add(key)
            images.append((path, index, key))
    return wnids, images, ignored


def _samples(
    items: list[tuple[Path, int, str]], wnids: list[str], src: Path, skipped: list, notes: Counter, bar: tqdm
) -> Iterator[dict[str, bytes]]:
    for path, index, key in items:
        rel = path.relative_to(src).as_posix()
        data = path.read_bytes()
        bar.update(1)
        try:
            check = inspect_image(data, path.name)
        except BadImage as exc:
            skipped.append({"path": rel, "reason": str(exc)})
            continue
        if check.note:
            notes[check.note] += 1
        meta = {"wnid": wnids[index], "source": rel, "size": list(check.size)}
        yield {"__key__": key, check.ext: data, "cls": str(index).encode(), "json": encode_json(meta)}


SKIPS_LISTED = 5
"""Skipped files the error of a source with no readable image lists one by one; more are counted by reason."""


def nothing_readable(src: Path, out: Path, classes: int, skipped: list[dict[str, str]]) -> str:
    """The one-line error of a source in which no file is a readable image: the folder and the reasons."""
    skipped = sorted(skipped, key=lambda s: s["path"])
    if not skipped:
        found = f"its {classes} class folder(s) hold no file"
    else:
        if len(skipped) <= SKIPS_LISTED:
            listing = "; ".join(f"{s['path']}: {s['reason']}" for s in skipped)
        else:
            reasons = Counter(s["reason"].split(":")[0] for s in skipped)
            listing = ", ".join(f"{k}: {v}" for k, v in sorted(reasons.items()))
            listing += f"; e.g. {skipped[0]['path']}: {skipped[0]['reason']}"
        found = f"all {len(skipped)} files of its {classes} class folder(s) were skipped ({listing})"
    message = (
        f"no readable image in {src}: {found}; nothing was written to {out}. "
        "Put JPEG or PNG images in the class folders of src="
    )
    return " ".join(message.splitlines())


PARTS = ".parts"
"""Folder of the per-shard "finished" markers the ranks wait on; removed before the manifest is written."""


def _done_marker(out: Path, i: int) -> Path:
    return out / PARTS / f"shard-{i:06d}.tar.done"


def run(cfg: PrepImagesConfig) -> Manifest | None:
    """Write the shard set; returns the manifest on rank 0 (None on other ranks)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    src, out = Path(cfg.src), Path(cfg.out)
    if (out / MANIFEST).exists():
        raise ShardSetError(
            f"{out} already holds a shard set ({MANIFEST} exists); choose another out= or remove it"
        )
    if cfg.shard_samples <= 0:
        raise ShardSetError(f"shard_samples={cfg.shard_samples} must be positive")
    wnids, images, ignored = scan(src, cfg.extensions)
    if not images:  # every rank scanned the same folder: all stop here, before anything is written
        raise ShardSetError(nothing_readable(src, out, len(wnids), ignored))
    order = np.random.default_rng(cfg.seed).permutation(len(images))
    n_shards = -(-len(images) // cfg.shard_samples)
    mine = list(range(rank, n_shards, world))
    existed = out.exists()
    if rank == 0 and (out / PARTS).exists():  # markers of an attempt that did not finish
        shutil.rmtree(out / PARTS)
    dist.barrier()  # every rank has looked (and rank 0 cleared old markers) before one creates it
    (out / PARTS).mkdir(parents=True, exist_ok=True)

    start = time.perf_counter()
    shards, skipped, notes = [], [], Counter()
    total_mine = sum(min(cfg.shard_samples, len(images) - i * cfg.shard_samples) for i in mine)
    with tqdm(total=total_mine, unit="img", desc=f"prep-images rank {rank}", disable=rank != 0) as bar:
        for i in mine:
            items = [images[j] for j in order[i * cfg.shard_samples : (i + 1) * cfg.shard_samples]]
            info = write_shard(out / f"shard-{i:06d}.tar", _samples(items, wnids, src, skipped, notes, bar))
            shards.append((i, info))
            _done_marker(out, i).touch()

    done = {_done_marker(out, i): f"shard-{i:06d}.tar (rank {i % world})" for i in range(n_shards)}
    wait_for_files(done, cfg.collective_timeout_s, "the shards of every rank")  # uneven: not a collective
    gathered: list = [None] * world
    dist.all_gather_object(gathered, (shards, skipped, dict(notes)))
    manifest = None
    all_shards = sorted((s for part in gathered for s in part[0]), key=lambda s: s[0])
    all_skipped = ignored + sorted((s for part in gathered for s in part[1]), key=lambda s: s["path"])
    if rank == 0:
        shutil.rmtree(out / PARTS)
        for _, info in all_shards:
            if info.count == 0:  # every image of the shard was skipped
                (out / info.name).unlink()
    if sum(info.count for _, info in all_shards) == 0:  # no readable image: no shard set (every rank)
        if rank == 0 and not existed:
            out.rmdir()  # it was created above and is empty again
        dist.barrier()  # the cleanup is done before any rank exits
        raise ShardSetError(nothing_readable(src, out, len(wnids), all_skipped))
    if rank == 0:
        all_notes: Counter = Counter()
        for part in gathered:
            all_notes.update(part[2])
        manifest = Manifest(
            kind="images",
            shards=[info for _, info in all_shards if info.count > 0],
            classes=[ClassInfo(w, i, n) for i, (w, n) in enumerate(zip(wnids, class_names(wnids)))],
            producer={"job": "prep-images", "config": asdict(cfg), "source": str(src.resolve())},
            skipped=all_skipped,
            notes=dict(sorted(all_notes.items())),
        )
        manifest.save(out)
        elapsed = time.perf_counter() - start
        print(summary(manifest, elapsed), flush=True)
    dist.barrier()
    return manifest


def summary(m: Manifest, elapsed: float) -> str:
    """The job's closing lines: counts written, converted and skipped (by reason)."""
    reasons = Counter(s["reason"].split(":")[0] for s in m.skipped)
    lines = [
        f"prep-images: {m.total} images of {len(m.classes)} classes in {len(m.shards)} shards "
        f"({m.total / max(elapsed, 1e-9):.0f} images/s)",
        "  converted when read: " + (", ".join(f"{k} {v}" for k, v in m.notes.items()) or "none"),
        f"  skipped: {len(m.skipped)}"
        + (" (" + ", ".join(f"{k}: {v}" for k, v in sorted(reasons.items())) + ")" if reasons else ""),
    ]
    return "\n".join(lines)
