"""Checks that run before anything expensive: before any process starts, and before the first step.

- :func:`check_train_config` runs in the launcher (`ldit train`, for `--local N`, `--slurm` and one
  process alike), before any process group or process starts: the world size against the batch and
  stream settings, the shard set and its kind, the latent statistics, and the VA-VAE that decodes the
  sample grids against the latents' shape. Every problem found is listed in one PreflightError whose
  message says what to change (the CLI exits 2), so a mistake costs seconds, not a queue wait.
- :func:`open_training_shards` runs on every rank of the job, before the first step. The first start
  of a run with `data.verify=sha256` reads every shard once (the ranks split them) and records the pass
  in the run directory (data_prep/verify.py, keyed by the manifest's sha256); a requeue then compares
  sizes only, and so does a first start on a set whose own record (beside the manifest, written by
  `ldit inspect data --verify`) is of a good full pass over this manifest. The stream hashes each shard
  as it reads it (trainer/shard_guard.py stops every rank at the step that reads a changed shard). The
  results are all-gathered, so every rank takes the same decision. With `data.bad_shards=error` every
  rank stops with the list of bad shards and the check each failed; with `skip` they are left out and
  logged, and the reader plans over the remaining shards only (the stream plan is a pure function of
  their counts, so the elastic invariants hold for the reduced set).

A shard set that holds no sample is refused by both. A remote set (`data.shards` a `pipe:` template or a
URL, data_prep/manifest.py) has its manifest read through the same opener; its shards have no size to
`stat`, so a requeue checks nothing before the first step and relies on the stream's check.
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
    manifest_sha256,
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


def open_training_shards(data: StreamConfig, kind: Kind, run_dir: Path | None = None) -> Manifest:
    """The manifest of `data.shards`, its shard files checked on every rank before the first step.

    What a start reads depends on two records (data_prep/verify.py :class:`VerifyRecord`, keyed by the
    manifest's sha256): `run_dir`'s own, and the shard set's, beside its manifest
    (:func:`data_prep.verify.shard_set_record`: written by `ldit inspect data --verify`, of this folder,
    not of a copy). Rank 0 reads both and broadcasts them, so every rank takes the same decision:

    - `data.verify=sha256` and neither records a full pass over this manifest (a run's first start, unless
      the set was verified): every shard is read once (size, sha256, sample count, format;
      :func:`data_prep.verify.verify_shard`), the ranks splitting them (rank r checks the shards
      i ≡ r mod W); the pass is recorded in `run_dir`.
    - `data.verify=sha256` with either record (a requeue, or a start on a verified set), or
      `data.verify=size`: sizes only (`stat`; a remote shard has none, so nothing). Shards either record
      names bad (found by the pass or by the stream mid-run) are read again in full, so a restored shard
      is taken back. The run's record says only what this run found: a pass recorded beside the manifest
      is not copied into it, so the start's line names the record used, every time.

    Either way the reader hashes every shard as it streams it (data_prep/reader.py) and a shard that no
    longer matches stops the run at the step that reads it (trainer/shard_guard.py). The results are
    all-gathered, so every rank sees every bad shard. With `data.bad_shards=error` every rank raises
    ShardSetError naming each bad shard and the check it failed; with `skip`, rank 0 logs them and the
    returned manifest holds only the others. Without `run_dir` nothing is recorded (a full pass each time).
    """
    manifest = load_manifest(data.shards, kind)
    if problem := empty_problem(data.shards, manifest):
        raise ShardSetError(problem)
    import torch.distributed as dist

    from data_prep.reader import without_shards
    from data_prep.verify import (
        RECORD,
        VerifyRecord,
        read_record,
        shard_set_record,
        verify_shard,
        write_record,
    )

    rank, world = dist.get_rank(), dist.get_world_size()
    digest = manifest_sha256(data.shards)
    found_record = [None, (None, None, "")]
    if rank == 0:
        found_record = [read_record(run_dir / RECORD) if run_dir is not None else None,
                        shard_set_record(data.shards, digest)]  # fmt: skip
    dist.broadcast_object_list(found_record, src=0)
    record, (set_record, set_path, ignored) = found_record
    if record is None or not record.matches(str(data.shards), digest):
        record = VerifyRecord(str(data.shards), digest)
    full = data.verify == "sha256" and not record.full_pass and set_record is None
    recheck = {**(set_record.bad if set_record else {}), **record.bad}  # the run's own findings win
    mine = list(range(rank, len(manifest.shards), world))

    def check(i: int) -> str | None:
        info = manifest.shards[i]
        if full or info.name in recheck:
            return verify_shard(data.shards, info)  # the whole shard read once (streamed, when remote)
        if is_remote(data.shards):  # no size to stat: the reader checks each shard as it streams it
            return None
        return next(iter(check_shards(data.shards, [info], hashes=False, threads=1)), None)

    start = time.perf_counter()
    with ThreadPoolExecutor(4) as pool:
        found = {i: msg for i, msg in zip(mine, pool.map(check, mine)) if msg}
    parts: list[dict[int, str] | None] = [None] * world
    dist.all_gather_object(parts, found)
    bad = dict(sorted((i, msg) for part in parts for i, msg in (part or {}).items()))
    if full:
        how = "every shard read once (size, sha256, samples)" + (f"; {ignored}" if ignored else "")
    elif record.full_pass:
        how = "sizes only (a full pass is recorded for this manifest)"
    else:
        how = "sizes only" + (f": a full pass is recorded in {set_path}" if set_record else "")
    if not full and recheck:
        how += f"; {len(recheck)} shard(s) recorded bad read again"
    if rank == 0:
        print(
            f"verified {len(manifest.shards)} shards of {data.shards} (data.verify={data.verify}, {world} "
            f"rank(s)) in {time.perf_counter() - start:.1f} s: {len(bad)} bad; {how}",
            flush=True,
        )
        if run_dir is not None:
            record.full_pass |= full
            record.bad = {manifest.shards[i].name: msg for i, msg in bad.items()}
            write_record(run_dir / RECORD, record)
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
