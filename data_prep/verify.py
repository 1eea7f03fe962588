"""Verify a shard set against its manifest: every shard's size, sha256 and sample count.

Used by `ldit inspect data --verify` and by the trainer's check before it reads a shard set (issue #11).

- :func:`verify_shard` checks one shard and returns a message naming the shard file and the check that
  failed (None when it is fine). Existence and size come first, from `stat` alone (the messages of
  :func:`data_prep.manifest.check_shards`); then the file is mapped once and that one pass gives both
  its sha256 and its sample count (tar headers parsed with :func:`data_prep.shards.tar_members`,
  members grouped into samples by the rule of :func:`data_prep.shards.read_shard`).
- A remote shard set (a `pipe:` template or a URL, data_prep/manifest.py) has no size to `stat`: each
  shard is streamed once through webdataset's gopen and its size, sha256, sample count and format are
  checked on the bytes read (a sizes-only check is impossible without reading the shard).
- The format checks are :func:`data_prep.shards.split_samples`'s, the reader's own: a tar cut short
  (no end-of-archive blocks), a sample that lacks a member, a member the reader refuses.
- :func:`verify_shards` checks many shards on threads (hashlib and file reads release the GIL, so
  threads use every core) with an optional tqdm progress bar on stderr, and returns the messages of
  the bad shards in manifest order.

Message formats (one line per bad shard; several failed checks of one shard are joined by "; "):

    shard /x/shard-000003.tar: missing
    shard /x/shard-000003.tar: size 1000 bytes, manifest says 2048 (truncated or replaced?)
    shard /x/shard-000003.tar: sha256 1234abcd5678ef90…, manifest says 9f8e7d6c5b4a3921… (contents changed)
    shard /x/shard-000003.tar: holds 7 samples, manifest says 8
    shard /x/shard-000003.tar: not a tar file (bad header at byte 0)
    shard /x/shard-000003.tar: cut short at byte 23552: it ends without the end-of-archive blocks (two
        512-byte zero blocks), and its last sample s0034 lacks member(s) latent_flip.npy; copy or write
        the shard again
    shard pipe:cat /x/shard-000003.tar: cannot be read (the command exited with status 1)

A full pass is needed once per shard set, not at every start (DESIGN.md "Data formats"). Its outcome is
kept in a :class:`VerifyRecord` (`shards-verified.json`), keyed by the shard set's location and the
sha256 of the manifest's bytes: a start that finds a record of a full pass over the same manifest checks
sizes only (trainer/preflight.py). There are two places for it:

- the run directory: a run's first start records its own pass there (and the stream records a shard it
  finds bad), so a requeue checks sizes only;
- beside the manifest (`SHARDS/shards-verified.json`): `ldit inspect data SHARDS --verify` records a pass
  that found every shard good there (:func:`record_pass`), so every later run on the set checks sizes
  only, its first start included (:func:`shard_set_record`). Shard sets often live on read-only shared
  storage or are remote: then nothing is recorded and each run's first start reads every shard once. A
  pass that finds a bad shard removes a record of an earlier good pass over the same manifest. A copy
  of the folder does not inherit the record (it names the folder it was written for).
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import secrets
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from data_prep.manifest import (
    ShardInfo,
    ShardSetError,
    check_shards,
    file_url,
    is_remote,
    manifest_sha256,
    read_remote,
)
from data_prep.shards import split_samples, stream_problem


def _count_samples(data: bytes | mmap.mmap, where: str) -> tuple[int, list[str]]:
    """(samples, format problems) of a tar in memory, split by the reader's own rule (split_samples)."""
    samples: list[dict] = []
    try:
        split_samples(data, where, into=samples)
    except ShardSetError as exc:
        return len(samples), [str(exc).removeprefix(f"shard {where}: ")]
    return len(samples), []


def _read_once(path: Path) -> tuple[str, int, list[str]]:
    """(sha256, sample count, format problems) of the tar at `path`, from one mapping of the file."""
    with open(path, "rb") as f:
        if not path.stat().st_size:
            return hashlib.sha256(b"").hexdigest(), *_count_samples(b"", str(path))
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
            digest = hashlib.sha256(data).hexdigest()  # reads every page once, without the GIL
            count, bad = _count_samples(data, str(path))  # touches only the headers: pages just read
        return digest, count, bad


def _stream_once(url: str, info: ShardInfo) -> tuple[str, int, list[str]] | str:
    """(sha256, sample count, format problems) of a remote shard streamed once, or the message of a shard
    that cannot be read or has the wrong size."""
    try:
        data = read_remote(url)
    except (OSError, ValueError) as exc:
        return f"shard {url}: cannot be read ({exc})"
    if len(data) != info.bytes:
        return stream_problem(url, data, info) or ""
    return hashlib.sha256(data).hexdigest(), *_count_samples(data, url)


def verify_shard(folder: str | Path, info: ShardInfo) -> str | None:
    """Check one shard file against its manifest entry: exists, size, sha256, sample count and format.

    Returns None when the shard is intact, else one line naming the shard file and every check that
    failed, e.g. "shard /x/shard-000003.tar: holds 7 samples, manifest says 8". `folder` is a local
    folder or a remote shard set, whose shard is streamed once (module docstring).
    """
    if is_remote(folder):
        where = file_url(folder, info.name)
        read = _stream_once(where, info)
        if isinstance(read, str):
            return read
        digest, count, bad = read
    else:
        if problem := check_shards(folder, [info], hashes=False, threads=1):  # missing / wrong size: no read
            return problem[0]
        where = str(Path(folder) / info.name)
        digest, count, bad = _read_once(Path(where))
    failed = []
    if count != info.count:
        failed.append(f"holds {count} samples, manifest says {info.count}")
    if digest != info.sha256:
        failed.append(f"sha256 {digest[:16]}…, manifest says {info.sha256[:16]}… (contents changed)")
    failed += bad
    return f"shard {where}: " + "; ".join(failed) if failed else None


def verify_shards(
    folder: str | Path, shards: Sequence[ShardInfo], threads: int = 4, progress: bool = False
) -> list[str]:
    """Verify every shard with :func:`verify_shard` on `threads` threads; [] when all are intact.

    The messages of the bad shards come back in the order of `shards`. With `progress`, a tqdm bar on
    stderr counts the bytes verified.
    """
    from tqdm import tqdm

    results: list[str | None] = [None] * len(shards)
    total = sum(s.bytes for s in shards)
    with (
        ThreadPoolExecutor(max(1, threads)) as pool,
        tqdm(total=total, unit="B", unit_scale=True, desc="verify", disable=not progress) as bar,
    ):
        futures = {pool.submit(verify_shard, folder, s): i for i, s in enumerate(shards)}
        for fut in as_completed(futures):
            i = futures[fut]
            results[i] = fut.result()
            bar.update(shards[i].bytes)
    return [r for r in results if r]


RECORD = "shards-verified.json"
"""File name of a :class:`VerifyRecord`, in the run directory or beside the manifest (module docstring)."""


@dataclass
class VerifyRecord:
    """What is known about a shard set's integrity, so that a later start need not read it again."""

    shards: str
    """The shard set's location (`data.shards`; the resolved folder in a record beside the manifest)."""
    manifest_sha256: str
    """sha256 of its manifest.json bytes: a record of another manifest is ignored."""
    full_pass: bool = False
    """Every shard's size, sha256, sample count and format were checked once against this manifest."""
    bad: dict[str, str] = field(default_factory=dict)
    """Shard name → the message of its last failed check (a full pass, or the stream reading it)."""

    def matches(self, shards: str, manifest_sha256: str) -> bool:
        return self.shards == shards and self.manifest_sha256 == manifest_sha256


def read_record(path: str | Path) -> VerifyRecord | None:
    """The record at `path`; None when there is none or it cannot be parsed (then the next start verifies again)."""
    try:
        return VerifyRecord(**json.loads(Path(path).read_text()))
    except (OSError, ValueError, TypeError):
        return None


def write_record(path: str | Path, record: VerifyRecord) -> None:
    """Write `record` to `path` atomically (a reader sees the old record or the new one, never a part).

    The bytes go to a temporary file of a unique name beside `path` (readable as the umask allows, like
    any file written here), flushed to storage, then renamed over `path`; on any failure (a read-only
    folder, `path` a directory) the temporary file is removed and OSError raised, nothing else touched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # fails before anything exists
    try:
        with open(fd, "w") as f:
            f.write(json.dumps(asdict(record), indent=1, sort_keys=True))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _set_record_path(shards: str | Path) -> Path | None:
    """Where the record of a shard set's own full pass lives: beside its manifest; None when remote."""
    return None if is_remote(shards) else Path(shards) / RECORD


def shard_set_record(shards: str | Path, digest: str) -> tuple[VerifyRecord | None, Path | None, str]:
    """(record, its path, why ignored) of the record beside the manifest of `shards`.

    The record is returned when it is of a full pass over the manifest of sha256 `digest` in this
    very folder; else None, and the last item says why a file found there is ignored ("" when there is
    none, or the set is remote).
    """
    path = _set_record_path(shards)
    if path is None or not path.exists():
        return None, path, ""
    record = read_record(path)
    if record is None:
        return None, path, f"{path} cannot be read: ignored"
    if record.manifest_sha256 != digest:
        return None, path, f"{path} records another manifest (the set was rewritten): ignored"
    if record.shards != str(Path(shards).resolve()):
        return None, path, f"{path} was written for {record.shards} (this is a copy?): ignored"
    if not record.full_pass:
        return None, path, f"{path} records no full pass: ignored"
    return record, path, ""


def record_pass(folder: str | Path, before: str | None, problems: Sequence[str]) -> dict[str, Any]:
    """Record a full pass of `ldit inspect data --verify` beside the manifest of `folder`.

    `before` is the manifest's sha256 taken before the pass (None for a remote set), `problems` the
    pass's messages. A pass that found every shard good is recorded when the folder is writable; one that
    found a bad shard records nothing and removes a record of an earlier good pass over this manifest.
    Only the record file (and its temporary file) is written: never the manifest or a shard.

    Returns {"path", "written", "message"}: the record's path (None when remote), whether it was written,
    and one line saying what was done and what a start will cost ("" when there is nothing to say).
    """
    path = _set_record_path(folder)
    if path is None:
        remote = (
            f"verify: not recorded: {folder} is remote, so there is no folder to record the pass in; each "
            "run's first start reads (streams) every shard in full again"
        )
        return {"path": None, "written": False, "message": remote}
    out: dict[str, Any] = {"path": str(path), "written": False, "message": ""}
    if problems:
        if before is not None and shard_set_record(folder, before)[0] is not None:  # one a start trusts
            try:
                path.unlink()
                out["message"] = f"verify: removed {path}: its record of a good full pass no longer holds"
            except OSError as exc:
                out["message"] = (
                    f"verify: could not remove {path} ({exc.strerror or exc}), which records a good full pass of "
                    "this manifest: delete it, or a start will check sizes only and stop at the first bad shard"
                )
        return out
    try:
        after = manifest_sha256(folder)
    except (OSError, ShardSetError):
        after = None
    if before is None or after != before:
        out["message"] = (
            f"verify: not recorded in {path}: the manifest changed during the pass; run --verify again"
        )
        return out
    try:
        write_record(path, VerifyRecord(str(Path(folder).resolve()), before, full_pass=True))
    except OSError as exc:
        out["message"] = (
            f"verify: could not record the pass in {path} ({exc.strerror or exc}): each run's first start "
            "reads every shard in full again (a requeue of a run checks sizes only)"
        )
        return out
    out["written"] = True
    out["message"] = f"verify: recorded in {path}: a run's start on this manifest checks shard sizes only"
    return out
