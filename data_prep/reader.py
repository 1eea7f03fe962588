"""The exact, elastic stream reader (DESIGN.md "The stream reader").

Why our own: webdataset has no iterator state and splits shards by rank, so what a rank sees depends
on the world size (ecosystem §1.3); MosaicML Streaming needs its own shard format and Energon a constant
global worker count. Here the order of samples is a pure function of (shard counts, seed, global
batch B, stream count V), and the only state is the step counter:

- V virtual streams. In epoch e (of a stream) the shards are permuted by (seed, e) and dealt
  round-robin: stream v reads shards perm[v], perm[v+V], …; each shard's samples are permuted by
  (seed, e, shard). A stream runs through its epochs one after another, forever.
- Step k takes the next b = B/V samples of every stream, so the global batch of step k is the same
  multiset whatever the world size W and the number of DataLoader workers.
- Rank r reads the streams v ≡ r (mod W), and its workers split those streams between them; every
  rank always has the same number of batches (streams never end), so no rank runs dry.
- Resuming at step k seeks each stream to sample k·b of its sequence, which follows from the
  manifest's counts: the right epoch, shard and offset, without reading what comes before.

Each shard is read front to back and held in memory while its stream reads it: a rank holds V/W shards
at a time. A shard set may be remote (a `pipe:` command template or a URL, named as data_prep/manifest.py
says). Every shard, local or remote, is checked against its manifest entry (size, sha256, sample count)
as it is read, from the bytes in memory or mapped (data_prep/shards.py), so a shard changed since the
start's check raises ShardSetError naming it on the rank that reads it (trainer/shard_guard.py stops
every rank at that step).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, replace
from functools import lru_cache
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from data_prep.manifest import (
    Kind,
    Manifest,
    ShardInfo,
    ShardSetError,
    check_shards,
    empty_problem,
    file_url,
    is_remote,
    load_manifest,
)
from data_prep.shards import read_shard


class SampleRef(NamedTuple):
    shard: int
    """Shard index in the manifest."""
    index: int
    """Sample position inside the shard (file order)."""
    epoch: int
    """Epoch of the stream this read belongs to."""


@dataclass(frozen=True)
class StreamPlan:
    """Which sample every stream reads at every step: a pure function of its fields."""

    counts: tuple[int, ...]
    """Samples per shard, in manifest order."""
    seed: int
    global_batch: int
    streams: int

    def __post_init__(self) -> None:
        if not self.counts:
            raise ShardSetError(
                "the shard set holds 0 samples (0 shards in its manifest): nothing can be read from it"
            )
        if self.streams <= 0 or self.global_batch % self.streams:
            raise ShardSetError(f"streams={self.streams} must divide the global batch {self.global_batch}")
        if len(self.counts) < self.streams:
            raise ShardSetError(
                f"the shard set has {len(self.counts)} shards, fewer than the {self.streams} streams; "
                "write smaller shards or use fewer streams"
            )
        if min(self.counts) <= 0:
            raise ShardSetError("every shard of the manifest must hold at least one sample")

    @property
    def per_stream(self) -> int:
        """b = B / V samples each stream gives to every step."""
        return self.global_batch // self.streams

    @lru_cache(maxsize=64)  # noqa: B019 (the plan is small, frozen and lives as long as the run)
    def shard_order(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.counts))

    def stream_shards(self, stream: int, epoch: int) -> np.ndarray:
        """Shards of `stream` in its epoch `epoch`, in reading order."""
        return self.shard_order(epoch)[stream :: self.streams]

    def sample_order(self, shard: int, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch, shard]).permutation(self.counts[shard])

    def epoch_length(self, stream: int, epoch: int) -> int:
        return int(sum(self.counts[s] for s in self.stream_shards(stream, epoch)))

    def locate(self, stream: int, position: int) -> tuple[int, int, int]:
        """(epoch, shard slot in that epoch, offset in the shard) of the stream's `position`-th sample."""
        epoch = 0
        while position >= (n := self.epoch_length(stream, epoch)):
            position -= n
            epoch += 1
        for slot, shard in enumerate(self.stream_shards(stream, epoch)):
            if position < self.counts[shard]:
                return epoch, slot, position
            position -= self.counts[shard]
        raise AssertionError("unreachable: position is inside the epoch")

    def stream(self, stream: int, start_step: int = 0) -> Iterator[SampleRef]:
        """The samples `stream` reads from step `start_step` on, forever."""
        epoch, slot, offset = self.locate(stream, start_step * self.per_stream)
        while True:
            for shard in self.stream_shards(stream, epoch)[slot:]:
                for i in self.sample_order(int(shard), epoch)[offset:]:
                    yield SampleRef(int(shard), int(i), epoch)
                offset = 0
            slot, epoch = 0, epoch + 1

    def rank_streams(self, rank: int, world_size: int) -> list[int]:
        if self.streams % world_size:
            raise ShardSetError(f"world size {world_size} must divide the stream count {self.streams}")
        return list(range(rank, self.streams, world_size))

    def batch_refs(self, step: int, streams: list[int] | None = None) -> list[tuple[int, SampleRef]]:
        """(stream, sample) pairs of step `step` for the given streams (all by default), in stream order."""
        out = []
        for v in range(self.streams) if streams is None else streams:
            it = self.stream(v, step)
            out += [(v, next(it)) for _ in range(self.per_stream)]
        return out


Decode = Callable[[list[dict[str, Any]], np.ndarray], tuple[torch.Tensor, torch.Tensor]]
"""(samples' raw members, their uniforms (n, 2)) → (x (n, …), labels (n,)). A decoder's randomness (flip,
crop offset) must come from the uniforms, which depend only on (seed, epoch, shard, sample)."""


class _Cursor:
    """One stream's reading position: the shard it holds in memory and its sample iterator."""

    def __init__(
        self, plan: StreamPlan, urls: list[str], infos: list[ShardInfo | None], stream: int, start_step: int
    ) -> None:
        self.plan, self.urls, self.infos = plan, urls, infos
        self.refs = plan.stream(stream, start_step)
        self.shard, self.samples = -1, []
        self.drawn, self.uniforms = (-1, -1), np.empty((0, 2))

    def take(self, n: int) -> tuple[list[dict[str, Any]], np.ndarray]:
        samples, rows = [], []
        for _ in range(n):
            ref = next(self.refs)
            if ref.shard != self.shard:
                self.samples = read_shard(
                    self.urls[ref.shard], self.plan.counts[ref.shard], self.infos[ref.shard]
                )
                self.shard = ref.shard
            if (ref.shard, ref.epoch) != self.drawn:
                self.uniforms = sample_uniforms(
                    self.plan.seed, ref.epoch, ref.shard, self.plan.counts[ref.shard]
                )
                self.drawn = (ref.shard, ref.epoch)
            samples.append(self.samples[ref.index])
            rows.append(self.uniforms[ref.index])
        return samples, np.stack(rows)


def sample_uniforms(seed: int, epoch: int, shard: int, count: int) -> np.ndarray:
    """(count, 2) uniforms in [0, 1): the own randomness of each sample of a shard in an epoch."""
    return np.random.default_rng([seed, epoch, shard, 1]).random((count, 2))


@dataclass
class Batch:
    """One rank's part of the global batch of `step`: its streams' samples in stream order."""

    step: int
    x: torch.Tensor
    y: torch.Tensor
    keys: list[str]
    positions: torch.Tensor
    """Each sample's place in the global batch of the step (stream·b + j): the same at any world size,
    so per-sample randomness keyed on it (noise, t, label dropout) does not depend on the world size."""

    def pin_memory(self) -> Batch:
        return Batch(self.step, self.x.pin_memory(), self.y.pin_memory(), self.keys, self.positions)


class _RankStreams(IterableDataset):
    def __init__(
        self,
        plan: StreamPlan,
        urls: list[str],
        infos: list[ShardInfo | None],
        streams: list[int],
        start_step: int,
        decode: Decode,
    ):
        self.plan, self.urls, self.infos = plan, urls, infos
        self.streams, self.start_step, self.decode = streams, start_step, decode

    def __iter__(self) -> Iterator[Batch]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        mine = self.streams[worker::workers]
        cursors = [_Cursor(self.plan, self.urls, self.infos, v, self.start_step) for v in mine]
        step = self.start_step
        b = self.plan.per_stream
        positions = torch.cat([torch.arange(v * b, (v + 1) * b) for v in mine])
        while True:
            samples, uniforms = [], []
            for cursor in cursors:
                s, u = cursor.take(b)
                samples += s
                uniforms.append(u)
            x, y = self.decode(samples, np.concatenate(uniforms))
            yield Batch(step, x, y, [sample["__key__"] for sample in samples], positions)
            step += 1


class StreamReader:
    """Per-rank batches of a shard set, exactly as DESIGN.md's invariants say, through a DataLoader."""

    def __init__(
        self,
        folder: str | Path,
        manifest: Manifest,
        *,
        seed: int,
        global_batch: int,
        streams: int,
        rank: int,
        world_size: int,
        decode: Decode,
        workers: int = 0,
        pin_memory: bool = False,
        prefetch: int = 4,
    ) -> None:
        self.plan = StreamPlan(manifest.counts, seed, global_batch, streams)
        self.urls = [file_url(folder, s.name) for s in manifest.shards]
        # every shard is checked (size, sha256) as it is read: a start checks only sizes once verified
        self.infos: list[ShardInfo | None] = list(manifest.shards)
        self.streams = self.plan.rank_streams(rank, world_size)
        self.decode = decode
        self.workers = min(workers, len(self.streams))
        self.pin_memory, self.prefetch = pin_memory, prefetch

    @property
    def local_batch(self) -> int:
        return len(self.streams) * self.plan.per_stream

    def batches(self, start_step: int = 0) -> Iterator[Batch]:
        """This rank's batches of steps start_step, start_step + 1, … (forever)."""
        dataset = _RankStreams(self.plan, self.urls, self.infos, self.streams, start_step, self.decode)
        loader = DataLoader(
            dataset,
            batch_size=None,
            num_workers=self.workers,
            pin_memory=self.pin_memory,
            prefetch_factor=self.prefetch if self.workers else None,
        )
        if self.workers <= 1:
            yield from loader
            return
        # Worker w reads streams[w::workers]; the DataLoader returns worker outputs round-robin, so
        # every `workers` consecutive parts are the same step. Put them back in stream order.
        owner = [self.streams[w :: self.workers] for w in range(self.workers)]
        b = self.plan.per_stream
        position = {v: i for i, v in enumerate(self.streams)}
        parts: list[Batch] = []
        for part in loader:
            parts.append(part)
            if len(parts) < self.workers:
                continue
            assert all(p.step == parts[0].step for p in parts), "DataLoader returned workers out of order"
            rows = [None] * len(self.streams)
            for w, p in enumerate(parts):
                for j, v in enumerate(owner[w]):
                    sl = slice(j * b, (j + 1) * b)
                    rows[position[v]] = (p.x[sl], p.y[sl], p.keys[sl], p.positions[sl])
            yield Batch(
                parts[0].step,
                torch.cat([r[0] for r in rows]),
                torch.cat([r[1] for r in rows]),
                [k for r in rows for k in r[2]],
                torch.cat([r[3] for r in rows]),
            )
            parts = []


def open_shard_set(folder: str | Path, kind: Kind, hashes: bool = False) -> Manifest:
    """Load a shard set's manifest and check every shard file against it before anything reads it.

    Raises ShardSetError if the set holds no sample. Checks that each shard exists and has its recorded
    size, and with `hashes` its sha256 too; raises ShardSetError listing every bad shard. (Sample counts
    are checked when a shard is read; a remote set's shards are checked as they are read.)
    """
    manifest = load_manifest(folder, kind)
    if problem := empty_problem(folder, manifest):
        raise ShardSetError(problem)
    if not is_remote(folder):
        problems = check_shards(folder, manifest.shards, hashes)
        if problems:
            raise ShardSetError(
                f"{len(problems)} shard(s) of {folder} do not match the manifest:\n  " + "\n  ".join(problems)
            )
    return manifest


def without_shards(manifest: Manifest, names: Iterable[str]) -> Manifest:
    """`manifest` without the shards named `names`: the set a run reads when it skips bad shards.

    The other shards keep their manifest order, and the StreamPlan is a pure function of their counts,
    so the reduced set has every invariant of the reader (same global batches at any world size, exact
    resume) as if it had been written without them.
    """
    drop = set(names)
    unknown = drop - {s.name for s in manifest.shards}
    if unknown:
        raise ShardSetError(f"no shard named {', '.join(sorted(unknown))} in the manifest")
    return replace(manifest, shards=[s for s in manifest.shards if s.name not in drop])


def flip_mask(uniforms: np.ndarray) -> np.ndarray:
    """(n,) bool: which samples a latent decoder reads flipped, from their uniforms (n, 2) (reference §5:
    probability 1/2). `ldit inspect order` reports flips with this same rule."""
    return uniforms[:, 0] < 0.5


def latent_decoder() -> Decode:
    """Decode latent samples: the flipped latent with probability 1/2 (reference §5), in the stored dtype.

    Normalisation is left to the consumer on its device (:func:`normalize_latents`): fp16 latents
    cross to the GPU at half the bytes, and the GPU does the arithmetic for free.
    """
    from data_prep.shards import decode_npy

    def decode(samples: list[dict[str, Any]], uniforms: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        flips = flip_mask(uniforms)
        arrays = [decode_npy(x["latent_flip.npy" if f else "latent.npy"]) for x, f in zip(samples, flips)]
        x = torch.from_numpy(np.stack(arrays))  # (n, C, H, W)
        return x, torch.tensor([int(bytes(x["cls"])) for x in samples], dtype=torch.long)

    return decode


def normalize_latents(x: torch.Tensor, mean: Any, std: Any) -> torch.Tensor:
    """(x − mean_c) / std_c per channel in fp32 (reference §5: the manifest's statistics, multiplier 1)."""
    m = torch.as_tensor(mean, dtype=torch.float32, device=x.device).view(1, -1, 1, 1)
    s = torch.as_tensor(std, dtype=torch.float32, device=x.device).view(1, -1, 1, 1)
    return (x.float() - m) / s


def image_decoder(size: int, crop: str) -> Decode:
    """Decode image samples to (n, 3, size, size) in [-1, 1]: `random` crop (VA-VAE training, §1.4) or
    `center` (ADM center crop, §5)."""
    from data_prep.images import center_crop_adm, decode_rgb, random_crop, to_tensor

    if crop not in ("random", "center"):
        raise ValueError(f"crop must be 'random' or 'center', got {crop!r}")

    def decode(samples: list[dict[str, Any]], uniforms: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        xs = []
        for sample, u in zip(samples, uniforms):
            pil = decode_rgb(sample["jpg"] if "jpg" in sample else sample["png"])
            pil = (
                center_crop_adm(pil, size)
                if crop == "center"
                else random_crop(pil, size, (float(u[0]), float(u[1])))
            )
            xs.append(to_tensor(pil))
        return torch.stack(xs), torch.tensor([int(bytes(x["cls"])) for x in samples], dtype=torch.long)

    return decode
