"""Writing and reading one tar shard.

A shard is written with webdataset's TarWriter to `<name>.tmp` and renamed when complete, so a crash
never leaves a file that looks finished. Reading opens the shard with webdataset's `gopen` (local paths
and `pipe:` URLs alike), reads it front to back into memory, and splits it into members with the small
parser below rather than Python's `tarfile`: streaming `tarfile` costs about 75 µs per member here
(250 µs per latent sample, measured with benchmarks/bench_reader.py), which alone capped the reader
far below the disk; this parser handles the ustar, pax and GNU long-name headers that tar writers
emit and groups members into samples exactly as webdataset does (key = path up to the first dot of
the file name, extension = the rest, lower-cased).

Only the extensions below are accepted: the reader never unpickles a sample field, and a shard with
any other member is refused. `.npy` members are read with a header parser that refuses object arrays.
"""

from __future__ import annotations

import ast
import io
import json
import mmap
import os
from collections.abc import Iterable, Iterator
from functools import lru_cache
from pathlib import Path

import numpy as np
import webdataset as wds

from data_prep.manifest import ShardInfo, ShardSetError, sha256_file

MEMBER_EXTENSIONS = {"jpg", "png", "cls", "json", "latent.npy", "latent_flip.npy"}
"""Every member extension a shard may hold (images: jpg/png + cls + json; latents: two .npy + cls)."""


def encode_npy(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array(buf, np.ascontiguousarray(arr), allow_pickle=False)
    return buf.getvalue()


@lru_cache(maxsize=64)
def _npy_header(header: bytes) -> tuple[np.dtype, tuple[int, ...], int]:
    meta = ast.literal_eval(header.decode("latin1"))
    dtype = np.dtype(meta["descr"])
    if dtype.hasobject or meta["fortran_order"]:
        raise ValueError(
            f"refusing .npy with dtype {dtype} (fortran order {meta['fortran_order']}): not a plain array"
        )
    shape = tuple(meta["shape"])
    return dtype, shape, int(np.prod(shape, dtype=np.int64))


def decode_npy(data: bytes | memoryview) -> np.ndarray:
    """A read-only array viewing `data` (a .npy file's bytes); object arrays are refused, never unpickled."""
    buf = memoryview(data)
    if bytes(buf[:6]) != b"\x93NUMPY":
        raise ValueError("not a .npy member (bad magic)")
    if buf[6] == 1:
        start, hlen = 10, int.from_bytes(buf[8:10], "little")
    else:
        start, hlen = 12, int.from_bytes(buf[8:12], "little")
    dtype, shape, count = _npy_header(bytes(buf[start : start + hlen]))
    return np.frombuffer(buf, dtype=dtype, count=count, offset=start + hlen).reshape(shape)


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


def _octal(field: memoryview) -> int:
    text = bytes(field).rstrip(b"\0 ").lstrip(b" ")
    return int(text, 8) if text else 0


def _pax(data: memoryview) -> dict[str, str]:
    """Records "<len> <key>=<value>\\n" of a pax extended header."""
    out, pos, raw = {}, 0, bytes(data)
    while pos < len(raw):
        space = raw.index(b" ", pos)
        length = int(raw[pos:space])
        key, _, value = raw[space + 1 : pos + length - 1].decode("utf-8").partition("=")
        out[key] = value
        pos += length
    return out


def tar_members(data: bytes | mmap.mmap, where: str) -> Iterator[tuple[str, memoryview]]:
    """(path, contents) of every regular file in an uncompressed tar held in memory."""
    buf, pos, long_name, pax = memoryview(data), 0, None, {}
    while pos + 512 <= len(buf):
        header = buf[pos : pos + 512]
        if not any(header):
            break
        if bytes(header[257:262]) not in (b"ustar", b"") and bytes(header[257:263]) != b"ustar ":
            raise ShardSetError(f"shard {where}: not a tar file (bad header at byte {pos})")
        size, kind = _octal(header[124:136]), bytes(header[156:157])
        body = buf[pos + 512 : pos + 512 + size]
        if len(body) < size:
            raise ShardSetError(f"shard {where}: truncated inside a member at byte {pos}")
        pos += 512 + (size + 511) // 512 * 512
        if kind == b"L":  # GNU long name of the next member
            long_name = bytes(body).rstrip(b"\0").decode("utf-8")
            continue
        if kind == b"x":  # pax header of the next member
            pax = _pax(body)
            continue
        if kind not in (b"0", b"\0", b"7"):  # directories, links, global pax headers …
            long_name, pax = None, {}
            continue
        name = pax.get("path") or long_name
        if name is None:
            name = bytes(header[0:100]).rstrip(b"\0").decode("utf-8")
            prefix = bytes(header[345:500]).rstrip(b"\0").decode("utf-8")
            if prefix:
                name = f"{prefix}/{name}"
        long_name, pax = None, {}
        yield name, body


def member_key(path: str) -> tuple[str, str] | None:
    """(sample key, extension) of a tar member, as webdataset groups them: the key is the path up to the
    first dot of the file name, the extension the rest, lower-cased. None when the name has no dot."""
    slash = path.rfind("/") + 1
    dot = path.find(".", slash)
    return None if dot < 0 else (path[:dot], path[dot + 1 :].lower())


def read_shard(url: str, expected_count: int | None = None) -> list[dict[str, bytes]]:
    """All samples of a shard, in file order, as {"__key__": key, ext: contents}.

    Raises ShardSetError naming the shard if it is not a tar, holds a member of an unknown extension
    (e.g. a pickle), or a different number of samples than `expected_count`.
    """
    data: bytes | mmap.mmap
    if os.path.isfile(url):  # a local file: map it, and copy only the members that are decoded
        with open(url, "rb") as f:
            data = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if os.fstat(f.fileno()).st_size else b""
    else:
        with wds.gopen(url, "rb") as stream:
            data = stream.read()
    samples: list[dict] = []
    current: dict | None = None
    for path, body in tar_members(data, url):
        split = member_key(path)
        if split is None:
            raise ShardSetError(f"shard {url}: member {path} has no extension")
        key, ext = split
        if ext not in MEMBER_EXTENSIONS:
            raise ShardSetError(
                f"shard {url}: sample {key} has member(s) {[ext]}; the reader only decodes "
                f"{sorted(MEMBER_EXTENSIONS)} and never unpickles"
            )
        if current is None or current["__key__"] != key:
            current = {"__key__": key}
            samples.append(current)
        current[ext] = body
    if expected_count is not None and len(samples) != expected_count:
        raise ShardSetError(f"shard {url}: holds {len(samples)} samples, manifest says {expected_count}")
    return samples
