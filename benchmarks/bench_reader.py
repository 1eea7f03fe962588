"""Reader throughput next to the disk: samples/s of the stream reader on latent shards, and the bytes/s
of reading the same files front to back with plain file reads, interleaved (issue #19).

    python benchmarks/bench_reader.py [--samples 6000] [--shards 12] [--workers 0 1 2] [--steps 40] [--rounds 3]

Latents have the reference's shape (32, 16, 16) in fp16, with their flipped copy (§5): 33 KB a sample.
The shard set is written once and read once to warm the page cache; then each contender runs in a fresh
process per round (benchmarks/_interleave.py: rounds interleaved, order rotated, medians): `plain`
reads every shard file in 4 MiB blocks `--repeats` times (the median pass counts), `reader-wN` takes
`--steps` batches from the stream reader with N DataLoader workers after one batch of start-up.
The ratio printed is (reader bytes/s) / (plain read bytes/s); the reader should reach at least 0.5.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from _interleave import (
    ROOT,
    Contender,
    errors,
    python,
    ratio,
    report,
    run_rounds,
    table,
    threads_line,
    values,
)

from data_prep.manifest import ClassInfo, LatentInfo, Manifest, load_manifest
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


def contender(a: argparse.Namespace) -> None:
    m = load_manifest(a.folder)
    sample_bytes = sum(s.bytes for s in m.shards) / m.total
    if a.contender == "plain":
        rate = statistics.median(plain_read(a.folder, m) for _ in range(a.repeats))
        report({"bytes_per_s": rate})
    else:
        samples = reader_rate(a.folder, m, int(a.contender.removeprefix("reader-w")), a.steps, a.global_batch, a.streams)  # fmt: skip
        report({"bytes_per_s": samples * sample_bytes, "samples_per_s": samples})


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--samples", type=int, default=6000)
    p.add_argument("--shards", type=int, default=12)
    p.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--global-batch", type=int, default=128)
    p.add_argument("--streams", type=int, default=4)
    p.add_argument("--repeats", type=int, default=3, help="passes of the plain read per process (median)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--contender", help=argparse.SUPPRESS)  # in a contender process
    p.add_argument("--folder", type=Path, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.contender:
        return contender(a)
    os.chdir(ROOT)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        m = make_set(folder, a.samples, a.shards)
        sample_bytes = sum(s.bytes for s in m.shards) / m.total
        plain_read(folder, m)  # warm the page cache for every contender alike
        print(f"latent shards: {m.total} samples in {len(m.shards)} shards, {sample_bytes / 1024:.1f} KiB per "
              f"sample; {a.rounds} rounds, order rotated", flush=True)  # fmt: skip
        common = ["--folder", str(folder), "--steps", str(a.steps), "--global-batch", str(a.global_batch),
                  "--streams", str(a.streams), "--repeats", str(a.repeats)]  # fmt: skip
        names = ["plain"] + [f"reader-w{w}" for w in a.workers]
        results = run_rounds([Contender(c, python("bench_reader.py", "--contender", c, *common)) for c in names], a.rounds)  # fmt: skip
    mib = {c: [None if v is None else v / 2**20 for v in values(results, c, "bytes_per_s")] for c in names}
    print("\nread rate\n" + table(mib, baseline="plain", unit="MiB/s"))
    print("\n" + table({c: values(results, c, "samples_per_s") for c in names[1:]}, unit="samples/s"))
    print(threads_line(results))
    for w in a.workers:
        print(ratio(f"stream reader, {w} workers / plain read", mib[f"reader-w{w}"], mib["plain"]))
    for line in errors(results):
        print(line)


if __name__ == "__main__":
    main()
