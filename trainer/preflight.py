"""Checks that run before anything expensive: before any process starts, and before the first step.

- :func:`check_train_config` runs in the launcher (`ldit train`, for `--local N`, `--slurm` and one
  process alike), before any process group or process starts: the world size against the batch and
  stream settings, the shard set and its kind, the latent statistics, and the VA-VAE that decodes the
  sample grids against the latents' shape. Every problem found is listed in one PreflightError whose
  message says what to change (the CLI exits 2), so a mistake costs seconds, not a queue wait.
- :func:`open_training_shards` runs on every rank of the job, before the first step: the shard files
  are verified against the manifest, the ranks splitting the work (rank r verifies shards i ≡ r mod W)
  and all-gathering the results, so every rank takes the same decision. With `data.bad_shards=error`
  every rank stops with the list of bad shards and the check each failed; with `skip` they are left
  out and logged, and the reader plans over the remaining shards only (the stream plan is a pure
  function of their counts, so the elastic invariants hold for the reduced set).

A shard set that holds no sample is refused by both. A remote set (`data.shards` a `pipe:` template or a
URL, data_prep/manifest.py) has its manifest read through the same opener. Its shards have no size to
`stat`, so `data.verify=sha256` streams each shard once before the first step (the ranks split them) and
checks size, sha256, sample count and format on the bytes read; `data.verify=size` skips that pass.
Either way the reader checks each remote shard's size, sha256 and count again as it streams it for
training (hashing the bytes in memory, no second read), so a shard changed since is named when read.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from data_prep.manifest import (
    MANIFEST,
    Kind,
    Manifest,
    ShardSetError,
    check_shards,
    empty_problem,
    file_url,
    is_remote,
    load_manifest,
)
from trainer.config import StreamConfig, TrainCommon, world_size_problems


class PreflightError(ValueError):
    """The run's config cannot work at this world size or with these inputs; the message says what to change."""


def check_train_config(cfg: TrainCommon, world_size: int) -> None:
    """Raise PreflightError listing every problem of the training config `cfg` at `world_size` ranks.

    Reads only the shard set's manifest.json (and, for a DiT whose `vavae` is set, the VA-VAE export's
    model.json): no shard, weight file or process group is touched.
    """
    found = world_size_problems(cfg.data.global_batch, cfg.data.streams, cfg.micro_batch, world_size)
    kind: Kind = "latents" if cfg.kind == "dit" else "images"
    shards = cfg.data.shards
    manifest = None
    if not is_remote(shards) and not Path(shards).is_dir():
        found.append(f"data.shards={cfg.data.shards}: no such folder (a shard set written by `ldit prep-images` "
                     "or `ldit extract-latents`)")  # fmt: skip
    else:
        try:
            manifest = load_manifest(shards, kind)
        except ShardSetError as exc:
            found.append(f"data.shards: {exc}")
    if manifest is not None and (empty := empty_problem(shards, manifest)):
        found.append(f"data.shards: {empty}")
    elif manifest is not None:
        if len(manifest.shards) < cfg.data.streams:
            found.append(
                f"data.shards={cfg.data.shards} has {len(manifest.shards)} shards, fewer than data.streams="
                f"{cfg.data.streams}: use fewer streams (a divisor of the global batch) or write smaller shards"
            )
        if cfg.kind == "dit":
            found += _latent_problems(cfg, manifest)
    if found:
        raise PreflightError("\n  ".join([f"{len(found)} problem(s) found before starting:", *found]))


def _latent_problems(cfg: TrainCommon, manifest: Manifest) -> list[str]:
    """The latents must carry their statistics, be square, and match the VA-VAE that decodes the grids."""
    where = file_url(cfg.data.shards, MANIFEST)
    lat = manifest.latent
    if lat is None:
        return [f"{where} has no latent section (shape, dtype, mean, std); rerun `ldit extract-latents`"]
    found = []
    if not lat.mean or not lat.std or len(lat.mean) != lat.shape[0] or len(lat.std) != lat.shape[0]:
        found.append(
            f"{where} has no latent statistics (latent.mean and latent.std, one per channel of {list(lat.shape)}): "
            "the DiT normalises latents with them; rerun `ldit extract-latents`, which computes them"
        )
    elif min(lat.std) <= 0:
        found.append(f"{where}: latent.std {list(lat.std)} must be positive in every channel")
    if len(lat.shape) != 3 or lat.shape[1] != lat.shape[2]:
        found.append(
            f"{where}: latents of shape {list(lat.shape)}; LightningDiT takes square (C, H, H) latents"
        )
    vavae = getattr(cfg, "vavae", "")
    if vavae and len(lat.shape) == 3:
        found += _vavae_problems(vavae, lat.shape, manifest, where, cfg.data.shards)
    return found


def _vavae_problems(
    vavae: str, shape: tuple[int, ...], manifest: Manifest, where: str, shards: str
) -> list[str]:
    from models.export import read_meta
    from models.vavae import autoencoder_args

    path = Path(vavae)
    if path.is_dir():
        try:
            kind, args = read_meta(path)
        except FileNotFoundError as exc:
            return [f"vavae={vavae}: {exc}"]
        if kind != "vavae":
            return [f"vavae={vavae} holds a {kind}, not a VA-VAE"]
    elif path.is_file():
        args = autoencoder_args("f16d32")  # a reference checkpoint file is the released f16d32 (§1.1)
    else:
        return [f"vavae={vavae}: no such export folder or checkpoint file"]
    factor = 2 ** (len(args.ch_mult) - 1)
    manifest_folder = shards if is_remote(shards) else Path(shards)  # the shard set
    found = []
    if args.embed_dim != shape[0]:
        found.append(
            f"vavae={vavae} makes latents of {args.embed_dim} channels (f{factor}), but the latents of "
            f"{manifest_folder} have shape {list(shape)}: set vavae to the VA-VAE that produced them "
            f"(its sha256 is in {where}: producer.vavae_sha256) or leave it empty"
        )
    image_size = manifest.producer.get("config", {}).get("image_size")
    if isinstance(image_size, int) and image_size // factor != shape[1]:
        found.append(
            f"vavae={vavae} downsamples by {factor}: {image_size}px images give {image_size // factor}x"
            f"{image_size // factor} latents, but those of {manifest_folder} are {shape[1]}x{shape[2]}"
        )
    return found


def open_training_shards(data: StreamConfig, kind: Kind) -> Manifest:
    """The manifest of `data.shards`, its shard files verified on every rank before the first step.

    `data.verify=sha256` reads each shard once (size, sha256 and sample count, by
    :func:`data_prep.verify.verify_shard`); `size` compares file sizes only. Rank r verifies the shards
    i ≡ r (mod W); the results are all-gathered, so every rank sees every bad shard. With
    `data.bad_shards=error` every rank raises ShardSetError naming each bad shard and the check it
    failed; with `skip`, rank 0 logs them and the returned manifest holds only the others.
    """
    manifest = load_manifest(data.shards, kind)
    if problem := empty_problem(data.shards, manifest):
        raise ShardSetError(problem)
    import torch.distributed as dist

    from data_prep.reader import without_shards
    from data_prep.verify import verify_shard

    rank, world = dist.get_rank(), dist.get_world_size()
    mine = list(range(rank, len(manifest.shards), world))

    def check(i: int) -> str | None:
        info = manifest.shards[i]
        if data.verify == "sha256":
            return verify_shard(data.shards, info)  # a remote shard: streamed once and hashed
        if is_remote(data.shards):  # no size to stat: the reader checks each shard as it streams it
            return None
        return next(iter(check_shards(data.shards, [info], hashes=False, threads=1)), None)

    start = time.perf_counter()
    with ThreadPoolExecutor(4) as pool:
        found = {i: msg for i, msg in zip(mine, pool.map(check, mine)) if msg}
    parts: list[dict[int, str] | None] = [None] * world
    dist.all_gather_object(parts, found)
    bad = dict(sorted((i, msg) for part in parts for i, msg in (part or {}).items()))
    if rank == 0:
        print(
            f"verified {len(manifest.shards)} shards of {data.shards} (data.verify={data.verify}, "
            f"{world} rank(s)) in {time.perf_counter() - start:.1f} s: {len(bad)} bad",
            flush=True,
        )
    if not bad:
        return manifest
    listing = "\n  ".join(bad.values())
    if data.bad_shards == "error":
        raise ShardSetError(
            f"{len(bad)} of {len(manifest.shards)} shards of {data.shards} do not match the manifest "
            f"(data.verify={data.verify}); nothing was trained:\n  {listing}\n"
            "restore them from the source (or rewrite the shard set), or set data.bad_shards=skip to train "
            "on the others"
        )
    reduced = without_shards(manifest, [manifest.shards[i].name for i in bad])
    if rank == 0:
        print(
            f"skipping {len(bad)} bad shard(s) of {data.shards} (data.bad_shards=skip); training on the other "
            f"{len(reduced.shards)} shards ({reduced.total} of {manifest.total} samples):\n  {listing}",
            flush=True,
        )
    return reduced
