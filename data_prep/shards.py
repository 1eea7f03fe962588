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

A shard must be whole (issue #15), checked in the same pass that splits it, at no extra read:

- the archive ends with its end-of-archive blocks (two 512-byte zero blocks, as every tar writer
  emits): a tar cut at a member boundary otherwise parses as valid, its last sample without its last
  members;
- every sample holds all the members of its layout: an image sample `cls`, `json` and `jpg` or `png`;
  a latent sample `cls`, `latent.npy` and `latent_flip.npy` (the layout is latents when any sample of
  the shard holds a `.npy` member).

A shard read with its manifest entry is also checked for its byte size and sha256 as it is read. A
remote shard's bytes are in memory already; a local shard is mapped, and hashing it is one sequential
pass over its pages, which the reader then finds in the page cache: no byte is read from storage twice
(sha256 costs about 1.3 s of one core per GB here, 0.79 GB/s; tests/test_requeue_io.py counts the bytes read).
"""

from __future__ import annotations

import ast
import hashlib
import io
import json
import mmap
import os
from collections.abc import Iterable, Iterator
from functools import lru_cache
from pathlib import Path

import numpy as np
import webdataset as wds

from data_prep.manifest import ShardInfo, ShardSetError, read_remote, sha256_file

MEMBER_EXTENSIONS = {"jpg", "png", "cls", "json", "latent.npy", "latent_flip.npy"}
"""Every member extension a shard may hold (images: jpg/png + cls + json; latents: two .npy + cls)."""
LAYOUTS = {
    "images": "an image sample holds cls, json and jpg or png",
    "latents": "a latent sample holds cls, latent.npy and latent_flip.npy",
}
"""The members every sample of a shard must hold, by layout (see :func:`lacking`)."""
_ZERO_BLOCK = bytes(512)


class TarCut(ShardSetError):
    """A tar that ends without its end-of-archive blocks: cut short (or still being written)."""


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
    """(path, contents) of every regular file in an uncompressed tar held in memory.

    Raises TarCut if the archive does not end with two zero blocks (the end-of-archive marker), and
    ShardSetError if a header is not a tar header or a member is cut inside its data.
    """
    buf, pos, long_name, pax = memoryview(data), 0, None, {}
    while True:
        header = buf[pos : pos + 512]
        if header == _ZERO_BLOCK and buf[pos + 512 : pos + 1024] == _ZERO_BLOCK:
            return  # the end-of-archive blocks; what follows is the writer's padding
        if len(header) < 512 or (header == _ZERO_BLOCK and len(buf) - pos < 1024):
            raise TarCut(
                f"shard {where}: cut short at byte {len(buf)}: it ends without the end-of-archive blocks "
                "(two 512-byte zero blocks)"
            )
        if header == _ZERO_BLOCK:
            raise ShardSetError(f"shard {where}: not a tar file (a lone zero block at byte {pos})")
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


def lacking(sample: dict[str, object], layout: str) -> list[str]:
    """The members `sample` lacks for `layout` ("images" or "latents"); [] when it is whole."""
    if layout == "latents":
        return [m for m in ("cls", "latent.npy", "latent_flip.npy") if m not in sample]
    missing = [m for m in ("cls", "json") if m not in sample]
    return missing + ([] if "jpg" in sample or "png" in sample else ["jpg or png"])


def _layout(samples: list[dict]) -> str:
    return "latents" if any("latent.npy" in s or "latent_flip.npy" in s for s in samples) else "images"


def split_samples(
    data: bytes | mmap.mmap, where: str, into: list[dict] | None = None
) -> list[dict[str, memoryview | str]]:
    """The samples of a tar held in memory, in file order, as {"__key__": key, ext: contents}.

    Raises ShardSetError naming the shard (`where`) if it is not a tar, holds a member of an unknown
    extension (e.g. a pickle), is cut short (no end-of-archive blocks; the message also names the last
    sample's missing members), or holds a sample that lacks a member of its layout. Samples are appended
    to `into` (when given) as they are split, so a caller that catches the error knows how far it got.
    """
    samples = [] if into is None else into
    current: dict | None = None
    try:
        for path, body in tar_members(data, where):
            split = member_key(path)
            if split is None:
                raise ShardSetError(f"shard {where}: member {path} has no extension")
            key, ext = split
            if ext not in MEMBER_EXTENSIONS:
                raise ShardSetError(
                    f"shard {where}: sample {key} has member(s) {[ext]}; the reader only decodes "
                    f"{sorted(MEMBER_EXTENSIONS)} and never unpickles"
                )
            if current is None or current["__key__"] != key:
                current = {"__key__": key}
                samples.append(current)
            current[ext] = body
    except TarCut as cut:
        message = str(cut)
        if samples and (missing := lacking(samples[-1], _layout(samples))):
            message += f", and its last sample {samples[-1]['__key__']} lacks member(s) {', '.join(missing)}"
        raise ShardSetError(message + "; copy or write the shard again") from None
    layout = _layout(samples)
    for sample in samples:
        if missing := lacking(sample, layout):
            raise ShardSetError(
                f"shard {where}: sample {sample['__key__']} lacks member(s) {', '.join(missing)} "
                f"({LAYOUTS[layout]}); write the shard again"
            )
    return samples


def stream_problem(url: str, data: bytes | mmap.mmap, info: ShardInfo) -> str | None:
    """The first of size and sha256 in which the bytes read from `url` differ from the manifest entry."""
    if len(data) != info.bytes:
        return f"shard {url}: size {len(data)} bytes, manifest says {info.bytes} (truncated or replaced?)"
    if (digest := hashlib.sha256(data).hexdigest()) != info.sha256:
        return f"shard {url}: sha256 {digest[:16]}…, manifest says {info.sha256[:16]}… (contents changed)"
    return None


def read_shard(
    url: str, expected_count: int | None = None, info: ShardInfo | None = None
) -> list[dict[str, bytes]]:
    """All samples of a shard, in file order, as {"__key__": key, ext: contents}.

    `url` is a local file (mapped, and only the members that are decoded are copied) or a URL read
    front to back with webdataset's gopen. Raises ShardSetError naming the shard as :func:`split_samples`
    does, if it cannot be read, or if it holds a different number of samples than `expected_count`
    (or `info.count`). With `info` (its manifest entry), the shard is also checked for its byte size
    and sha256, hashed from the bytes just read (or mapped), before any sample is split.
    """
    data: bytes | mmap.mmap
    if os.path.isfile(url):  # a local file: map it, and copy only the members that are decoded
        with open(url, "rb") as f:
            data = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if os.fstat(f.fileno()).st_size else b""
    else:
        try:
            data = read_remote(url)
        except (OSError, ValueError) as exc:
            raise ShardSetError(f"shard {url}: cannot be read ({exc})") from None
    if info is not None and (problem := stream_problem(url, data, info)):
        raise ShardSetError(problem)
    samples = split_samples(data, url)
    expected = info.count if info is not None else expected_count
    if expected is not None and len(samples) != expected:
        raise ShardSetError(f"shard {url}: holds {len(samples)} samples, manifest says {expected}")
    return samples
