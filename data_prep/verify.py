"""Verify a shard set against its manifest: every shard's size, sha256 and sample count.

Used by `ldit inspect data --verify` and by the trainer's check before it reads a shard set (issue #11).

- :func:`verify_shard` checks one shard and returns a message naming the shard file and the check that
  failed (None when it is fine). Existence and size come first, from `stat` alone (the messages of
  :func:`data_prep.manifest.check_shards`); then the file is mapped once and that one pass gives both
  its sha256 and its sample count (tar headers parsed with :func:`data_prep.shards.tar_members`,
  members grouped into samples by the rule of :func:`data_prep.shards.read_shard`).
- :func:`verify_shards` checks many shards on threads (hashlib and file reads release the GIL, so
  threads use every core) with an optional tqdm progress bar on stderr, and returns the messages of
  the bad shards in manifest order.

Message formats (one line per bad shard; several failed checks of one shard are joined by "; "):

    shard /x/shard-000003.tar: missing
    shard /x/shard-000003.tar: size 1000 bytes, manifest says 2048 (truncated or replaced?)
    shard /x/shard-000003.tar: sha256 1234abcd5678ef90…, manifest says 9f8e7d6c5b4a3921… (contents changed)
    shard /x/shard-000003.tar: holds 7 samples, manifest says 8
    shard /x/shard-000003.tar: not a tar file (bad header at byte 0)
"""

from __future__ import annotations

import hashlib
import mmap
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

from data_prep.manifest import ShardInfo, ShardSetError, check_shards
from data_prep.shards import MEMBER_EXTENSIONS, member_key, tar_members


def _count_samples(data: bytes | mmap.mmap, where: str) -> tuple[int, list[str]]:
    """(samples, format problems) of a tar in memory: tar headers only, grouped as read_shard groups them."""
    count, bad, key = 0, [], None
    try:
        for member, _ in tar_members(data, where):
            split = member_key(member)
            if split is None:
                bad.append(f"member {member} has no extension")
                continue
            if split[1] not in MEMBER_EXTENSIONS:
                bad.append(f"member {member} is not part of the shard format (the reader refuses it)")
            if split[0] != key:  # a new sample starts where the key changes (read_shard's rule)
                key, count = split[0], count + 1
    except ShardSetError as exc:
        bad.append(str(exc).removeprefix(f"shard {where}: "))
    return count, bad


def _read_once(path: Path) -> tuple[str, int, list[str]]:
    """(sha256, sample count, format problems) of the tar at `path`, from one mapping of the file."""
    with open(path, "rb") as f:
        if not path.stat().st_size:
            return hashlib.sha256(b"").hexdigest(), *_count_samples(b"", str(path))
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
            digest = hashlib.sha256(data).hexdigest()  # reads every page once, without the GIL
            count, bad = _count_samples(data, str(path))  # touches only the headers: pages just read
        return digest, count, bad


def verify_shard(folder: str | Path, info: ShardInfo) -> str | None:
    """Check one shard file against its manifest entry: exists, size, sha256 and sample count.

    Returns None when the shard is intact, else one line naming the shard file and every check that
    failed, e.g. "shard /x/shard-000003.tar: holds 7 samples, manifest says 8". `folder` is a local
    folder (a `pipe:` URL cannot be verified).
    """
    if problem := check_shards(folder, [info], hashes=False, threads=1):  # missing / wrong size: no read
        return problem[0]
    path = Path(folder) / info.name
    digest, count, bad = _read_once(path)
    failed = []
    if count != info.count:
        failed.append(f"holds {count} samples, manifest says {info.count}")
    if digest != info.sha256:
        failed.append(f"sha256 {digest[:16]}…, manifest says {info.sha256[:16]}… (contents changed)")
    failed += bad
    return f"shard {path}: " + "; ".join(failed) if failed else None


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
