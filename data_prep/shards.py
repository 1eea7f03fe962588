"""Writing and reading one tar shard with webdataset's primitives.

A shard is written to `<name>.tmp` and renamed when complete, so a crash never leaves a file that
looks finished. Reading goes front to back through webdataset's tar iterator (local paths and `pipe:`
URLs alike) and returns the raw members of every sample. Only the extensions below are accepted:
the reader never unpickles a sample field, and a shard with any other member is refused.
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import webdataset as wds
from webdataset.tariterators import group_by_keys, tar_file_expander, url_opener

from data_prep.manifest import ShardInfo, ShardSetError, sha256_file

MEMBER_EXTENSIONS = {"jpg", "png", "cls", "json", "latent.npy", "latent_flip.npy"}
"""Every member extension a shard may hold (images: jpg/png + cls + json; latents: two .npy + cls)."""


def encode_npy(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array(buf, np.ascontiguousarray(arr), allow_pickle=False)
    return buf.getvalue()


def decode_npy(data: bytes) -> np.ndarray:
    return np.lib.format.read_array(io.BytesIO(data), allow_pickle=False)


def encode_json(obj: object) -> bytes:
    return json.dumps(obj, sort_keys=True).encode()


def write_shard(path: str | Path, samples: Iterable[dict[str, bytes | str]]) -> ShardInfo:
    """Write samples ({"__key__": key, ext: bytes, …}) to the tar at `path`; return its manifest entry."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    count = 0
    with open(tmp, "wb") as f, wds.TarWriter(f, encoder=False, mtime=0) as writer:
        for sample in samples:
            bad = set(sample) - MEMBER_EXTENSIONS - {"__key__"}
            if bad:
                raise ValueError(
                    f"sample {sample['__key__']}: extensions {sorted(bad)} are not part of the shard format"
                )
            writer.write(sample)
            count += 1
    os.replace(tmp, path)
    return ShardInfo(name=path.name, count=count, bytes=path.stat().st_size, sha256=sha256_file(path))


def read_shard(url: str, expected_count: int | None = None) -> list[dict[str, bytes]]:
    """All samples of a shard, in file order, as {"__key__": key, ext: bytes}.

    Raises ShardSetError naming the shard if it holds a member of an unknown extension (e.g. a
    pickle) or a different number of samples than `expected_count`.
    """
    samples = []
    stream = tar_file_expander(url_opener([{"url": url}]))
    for sample in group_by_keys(stream):
        key = sample["__key__"]
        fields = {k: v for k, v in sample.items() if not k.startswith("__")}
        unknown = set(fields) - MEMBER_EXTENSIONS
        if unknown:
            raise ShardSetError(
                f"shard {url}: sample {key} has member(s) {sorted(unknown)}; the reader only decodes "
                f"{sorted(MEMBER_EXTENSIONS)} and never unpickles"
            )
        samples.append({"__key__": key, **fields})
    if expected_count is not None and len(samples) != expected_count:
        raise ShardSetError(f"shard {url}: holds {len(samples)} samples, manifest says {expected_count}")
    return samples
