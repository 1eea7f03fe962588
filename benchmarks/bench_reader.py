"""Reader throughput next to the disk: samples/s of the stream reader on latent shards, and the bytes/s
of reading the same files front to back with plain file reads, in one run on one machine.

    python benchmarks/bench_reader.py [--samples 6000] [--shards 12] [--workers 2] [--steps 40]

Latents have the reference's shape (32, 16, 16) in fp16, with their flipped copy (§5): 33 KB a sample.
The ratio printed is (reader bytes/s) / (plain read bytes/s); the reader should reach at least 0.5.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from data_prep.manifest import ClassInfo, LatentInfo, Manifest
from data_prep.reader import StreamReader, latent_decoder
from data_prep.shards import encode_npy, write_shard


def make_set(folder: Path, samples: int, shards: int) -> Manifest:
    rng = np.random.default_rng(0)
    per = samples // shards
    infos = []
    for i in range(shards):
        rows = []
        for j in range(per):
            a = rng.standard_normal((32, 16, 16)).astype(np.float16)
            rows.append(
                {
                    "__key__": f"k{i:04d}_{j:05d}",
                    "latent.npy": encode_npy(a),
                    "latent_flip.npy": encode_npy(a[..., ::-1]),
                    "cls": str(j % 1000).encode(),
                }
            )
        infos.append(write_shard(folder / f"shard-{i:06d}.tar", rows))
    m = Manifest(
        "latents",
        infos,
        [ClassInfo(f"c{i}", i, f"c{i}") for i in range(1000)],
        latent=LatentInfo((32, 16, 16), "float16", (0.0,) * 32, (1.0,) * 32),
    )
    m.save(folder)
    return m


def plain_read(folder: Path, m: Manifest) -> float:
    """Bytes/s of reading every shard file front to back in 4 MiB blocks."""
    start, total = time.perf_counter(), 0
    for s in m.shards:
        with open(folder / s.name, "rb") as f:
            while block := f.read(1 << 22):
                total += len(block)
    return total / (time.perf_counter() - start)


def reader_rate(
    folder: Path, m: Manifest, workers: int, steps: int, global_batch: int, streams: int
) -> float:
    reader = StreamReader(
        folder,
        m,
        seed=0,
        global_batch=global_batch,
        streams=streams,
        rank=0,
        world_size=1,
        decode=latent_decoder(),
        workers=workers,
    )
    it = reader.batches(0)
    next(it)  # start-up (workers, first shards) is not steady-state throughput
    start = time.perf_counter()
    for _ in range(steps):
        next(it)
    return steps * global_batch / (time.perf_counter() - start)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--samples", type=int, default=6000)
    p.add_argument("--shards", type=int, default=12)
    p.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--global-batch", type=int, default=128)
    p.add_argument("--streams", type=int, default=4)
    a = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        m = make_set(folder, a.samples, a.shards)
        sample_bytes = sum(s.bytes for s in m.shards) / m.total
        plain_read(folder, m)  # warm the page cache for both measurements alike
        plain = plain_read(folder, m)
        print(
            f"latent shards: {m.total} samples in {len(m.shards)} shards, {sample_bytes / 1024:.1f} KiB per sample"
        )
        print(f"plain sequential read: {plain / 2**20:8.1f} MiB/s")
        for workers in a.workers:
            rate = reader_rate(folder, m, workers, a.steps, a.global_batch, a.streams)
            print(
                f"stream reader, {workers} workers: {rate:8.0f} samples/s = {rate * sample_bytes / 2**20:8.1f} MiB/s"
                f"  ratio to plain read {rate * sample_bytes / plain:.3f}"
            )


if __name__ == "__main__":
    main()
