"""The shard-set manifest: the contract between the jobs that write shards and those that read them.

A shard set is a folder of plain tar files (webdataset layout) plus `manifest.json` (DESIGN.md "Data
formats"): the format version, the kind (`images` or `latents`), every shard's name, sample count, byte
size and sha256, the total count, the class map, what produced it, for latents the shape, dtype and
per-channel statistics, and the inputs that were skipped with the reason.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

FORMAT = "ldit-shards"
VERSION = 1
MANIFEST = "manifest.json"

Kind = Literal["images", "latents"]


class ShardSetError(ValueError):
    """A shard set is missing, inconsistent with its manifest, or of the wrong kind; the message names it."""


@dataclass(frozen=True)
class ShardInfo:
    name: str
    """File name inside the shard-set folder."""
    count: int
    """Samples in the shard."""
    bytes: int
    """File size."""
    sha256: str
    """Hex digest of the whole file."""


@dataclass(frozen=True)
class ClassInfo:
    wnid: str
    """Folder name of the class (a WordNet id for ImageNet)."""
    index: int
    """Label: the position of `wnid` in sorted order, as torchvision's ImageFolder."""
    name: str
    """Human-readable name (from timm's ImageNet-1k table when the wnid is in it, else the wnid)."""


@dataclass(frozen=True)
class LatentInfo:
    shape: tuple[int, ...]
    """(C, H, W) of one latent."""
    dtype: str
    """numpy dtype of the stored latents: float16 or float32."""
    mean: tuple[float, ...]
    """Per-channel mean over a seeded subset of non-flipped latents (reference §5)."""
    std: tuple[float, ...]
    """Per-channel standard deviation (unbiased) over the same subset (reference §5)."""


@dataclass
class Manifest:
    kind: Kind
    shards: list[ShardInfo]
    classes: list[ClassInfo]
    producer: dict[str, Any] = field(default_factory=dict)
    """The job, its config, and for latents the VA-VAE checkpoint's sha256."""
    latent: LatentInfo | None = None
    skipped: list[dict[str, str]] = field(default_factory=list)
    """Inputs that were not written: {"path", "reason"}."""
    notes: dict[str, int] = field(default_factory=dict)
    """Counts of inputs that were written after a conversion (e.g. "cmyk", "greyscale", "png_named_jpeg")."""

    @property
    def total(self) -> int:
        return sum(s.count for s in self.shards)

    @property
    def counts(self) -> tuple[int, ...]:
        return tuple(s.count for s in self.shards)

    def to_json(self) -> str:
        data = {"format": FORMAT, "version": VERSION, "kind": self.kind, "total": self.total}
        data |= {k: v for k, v in asdict(self).items() if k != "kind"}
        return json.dumps(data, indent=1)

    def save(self, folder: str | Path) -> Path:
        """Write `manifest.json` atomically (a reader never sees half a manifest)."""
        path = Path(folder) / MANIFEST
        tmp = path.with_name(MANIFEST + ".tmp")
        tmp.write_text(self.to_json())
        os.replace(tmp, path)
        return path


def load_manifest(folder: str | Path, kind: Kind | None = None) -> Manifest:
    """Read and check `<folder>/manifest.json`; `kind` demands images or latents."""
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise ShardSetError(
            f"{folder}: no {MANIFEST}; is this a shard set written by `ldit prep-images` or `ldit extract-latents`?"
        )
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ShardSetError(f"{path}: not valid JSON ({exc})") from None
    if data.get("format") != FORMAT or data.get("version") != VERSION:
        raise ShardSetError(
            f"{path}: format {data.get('format')!r} version {data.get('version')!r}; expected {FORMAT!r} {VERSION}"
        )
    if kind is not None and data["kind"] != kind:
        raise ShardSetError(f"{folder} holds {data['kind']}, but this job reads {kind}")
    latent = data.get("latent")
    m = Manifest(
        kind=data["kind"],
        shards=[ShardInfo(**s) for s in data["shards"]],
        classes=[ClassInfo(**c) for c in data["classes"]],
        producer=data.get("producer", {}),
        latent=LatentInfo(
            **{
                **latent,
                "shape": tuple(latent["shape"]),
                "mean": tuple(latent["mean"]),
                "std": tuple(latent["std"]),
            }
        )
        if latent
        else None,
        skipped=data.get("skipped", []),
        notes=data.get("notes", {}),
    )
    if m.total != data.get("total"):
        raise ShardSetError(
            f"{path}: total {data.get('total')} is not the sum of the shard counts ({m.total})"
        )
    return m


def sha256_file(path: str | Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def check_shards(
    folder: str | Path, shards: Iterable[ShardInfo], hashes: bool, threads: int = 4
) -> list[str]:
    """Problems of the given shards against the manifest: missing file, wrong size, wrong sha256.

    Returns one message per bad shard, each naming the shard and the check that failed ([] when all
    are fine). Sample counts are checked as the shards are read.
    """

    def check(s: ShardInfo) -> str | None:
        path = Path(folder) / s.name
        if not path.is_file():
            return f"shard {path}: missing"
        size = path.stat().st_size
        if size != s.bytes:
            return f"shard {path}: size {size} bytes, manifest says {s.bytes} (truncated or replaced?)"
        if hashes and (digest := sha256_file(path)) != s.sha256:
            return f"shard {path}: sha256 {digest[:16]}…, manifest says {s.sha256[:16]}… (contents changed)"
        return None

    with ThreadPoolExecutor(threads) as pool:
        return [msg for msg in pool.map(check, shards) if msg]
