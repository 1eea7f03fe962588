"""The shard-set manifest: the contract between the jobs that write shards and those that read them.

A shard set is a folder of plain tar files (webdataset layout) plus `manifest.json` (DESIGN.md "Data
formats"): the format version, the kind (`images` or `latents`), every shard's name, sample count, byte
size and sha256, the total count, the class map, what produced it, for latents the shape, dtype and
per-channel statistics, and the inputs that were skipped with the reason.

Where a shard set lives (:func:`file_url`). A shard set is named by one string, its *location*:

- a local folder (no URL scheme): its files are `<folder>/<name>`;
- a `pipe:` command template holding `{}` (the only placeholder): each file is read from the output of
  the command with `{}` replaced by the file name, e.g. `pipe:aws s3 cp s3://bucket/set/{} -` reads
  `manifest.json` with `aws s3 cp s3://bucket/set/manifest.json -` and each shard likewise;
- any other URL webdataset's `gopen` opens (`file:`, `http(s):`, `gs:`, …): `{}` is replaced by the
  file name when present, else the file name is appended after a `/` (`https://host/set` →
  `https://host/set/manifest.json`).

The manifest is read through the same opener as the shards. Every shard name of a manifest must be a
plain file name (:func:`check_shard_name`: letters, digits, `.`, `_`, `-`; no path separator, no `..`),
checked when the manifest is loaded, before any name reaches a shell (`pipe:` runs its command with
`shell=True`) or leaves the folder.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

FORMAT = "ldit-shards"
VERSION = 1
MANIFEST = "manifest.json"
PLAIN_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]*")
"""What a shard name may be: a file name with no path separator, no shell character, no leading dot."""

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


def is_remote(location: str | Path) -> bool:
    """Whether a shard set's location is a URL (`pipe:`, `file:`, `http(s):` …) rather than a local folder."""
    if isinstance(location, Path):
        return False
    import webdataset as wds

    scheme = re.match(r"([a-zA-Z][a-zA-Z0-9+.-]+):", location)
    return scheme is not None and (scheme[1] in wds.gopen_schemes or scheme[1] == "file")


def check_shard_name(name: str, where: str | Path) -> None:
    """Raise ShardSetError unless `name` is a plain file name (see :data:`PLAIN_NAME`); `where` is the manifest."""
    if not isinstance(name, str) or not PLAIN_NAME.fullmatch(name) or ".." in name:
        raise ShardSetError(
            f"{where}: shard name {name!r} is not a plain file name (only letters, digits, '.', '_' and '-'; "
            "no path separator, no '..', no shell character): refusing to open it"
        )


def file_url(location: str | Path, name: str) -> str:
    """Where the file `name` (a shard or manifest.json) of the shard set at `location` is read from (module
    docstring: a folder joins, a `pipe:` template or a URL with `{}` substitutes, another URL appends `/name`).
    """
    check_shard_name(name, location)
    text = str(location)
    if not is_remote(location):
        return str(Path(location) / name)
    if "{}" in text:
        return text.replace("{}", name)
    if text.startswith("pipe:"):
        raise ShardSetError(
            f"{text}: a pipe: shard set names its files with {{}}, which is replaced by {MANIFEST} and by each "
            "shard's name (e.g. pipe:aws s3 cp s3://bucket/set/{} -)"
        )
    return text.rstrip("/") + "/" + name


def set_name(location: str | Path) -> str:
    """A short name of the shard set at `location`, for output names: a folder's name, or a URL's last path
    component before its `{}` (`pipe:aws s3 cp s3://bucket/val/{} -` → `val`), in file-name characters."""
    if not is_remote(location):
        return Path(location).resolve().name
    stem = str(location).split("{}")[0].rstrip("/")
    name = re.sub(r"[^A-Za-z0-9._-]", "-", re.split(r"[/\s:]", stem)[-1]).strip("-.")
    return name or "remote"


def read_remote(url: str) -> bytes:
    """The bytes of a remote file, read front to back with webdataset's gopen; OSError when it cannot be
    read (for a command: "the command exited with status N")."""
    import webdataset as wds

    stream = wds.gopen(url, "rb")
    try:
        with stream:
            return stream.read()
    except OSError:
        if getattr(stream, "status", None) is None:
            raise
        raise OSError(f"the command exited with status {stream.status}") from None


def _manifest_text(location: str | Path) -> tuple[str, str]:
    """(where the manifest was read, its text)."""
    if is_remote(location):
        url = file_url(location, MANIFEST)
        try:
            return url, read_remote(url).decode()
        except (OSError, ValueError) as exc:
            raise ShardSetError(f"{location}: cannot read {MANIFEST} through {url} ({exc})") from None
    path = Path(location) / MANIFEST
    if not path.is_file():
        raise ShardSetError(
            f"{location}: no {MANIFEST}; is this a shard set written by `ldit prep-images` or `ldit extract-latents`?"
        )
    return str(path), path.read_text()


def manifest_sha256(location: str | Path) -> str:
    """sha256 of the manifest.json bytes of the shard set at `location` (local or remote): the identity under
    which a full verification pass is recorded (data_prep/verify.py)."""
    return hashlib.sha256(_manifest_text(location)[1].encode()).hexdigest()


def load_manifest(folder: str | Path, kind: Kind | None = None) -> Manifest:
    """Read and check the manifest of the shard set at `folder` (a local folder or a URL, module docstring);
    `kind` demands images or latents. Every shard name is checked to be a plain file name."""
    path, text = _manifest_text(folder)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ShardSetError(f"{path}: not valid JSON ({exc})") from None
    if data.get("format") != FORMAT or data.get("version") != VERSION:
        raise ShardSetError(
            f"{path}: format {data.get('format')!r} version {data.get('version')!r}; expected {FORMAT!r} {VERSION}"
        )
    if kind is not None and data["kind"] != kind:
        raise ShardSetError(f"{folder} holds {data['kind']}, but this job reads {kind}")
    for shard in data["shards"]:  # before any name reaches a shell (pipe:) or a path outside the set
        check_shard_name(shard.get("name"), path)
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


def empty_problem(location: str | Path, m: Manifest) -> str | None:
    """The message for a shard set that holds no sample (None when it holds some): nothing can read it."""
    if m.total > 0:
        return None
    again = (
        "`ldit prep-images` from a folder of readable images"
        if m.kind == "images"
        else "`ldit extract-latents` from an image shard set that holds samples"
    )
    return (
        f"{location}: the shard set holds 0 samples ({len(m.shards)} shards in its manifest): nothing can be "
        f"read from it; write it again with {again}"
    )


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
