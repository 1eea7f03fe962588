"""`ldit inspect data` (a shard set, `--verify` recorded beside it) and `ldit inspect order` (the samples of a
step, read by the trainer's own reader); the parser and the dispatch are in slurm/inspect.py."""

from __future__ import annotations

import argparse
import itertools
import json
import re
import sys
from pathlib import Path
from typing import Any

from slurm.inspect_common import (
    EXIT_OK,
    EXIT_PROBLEM,
    flatten,
    shard_set_location,
    size_text,
    train_config,
)

NAMES_SHOWN = 5
"""Class names the text of `inspect data` shows."""
SKIPPED_SHOWN = 10
"""Skipped inputs the text of `inspect data` lists (--json lists all)."""

# -------------------------------------------------------------------------------------------- data


def data_report(
    folder: str | Path, verify: bool = False, threads: int = 4, progress: bool = False
) -> dict[str, Any]:
    """The manifest's summary; with `verify`, every shard's size, sha256 and sample count checked (a
    remote set's shards streamed and hashed), a set of no sample is a problem, and the pass is recorded
    beside the manifest when every shard is good and the folder is writable (`verify.record`)."""
    from dataclasses import asdict

    from data_prep.manifest import empty_problem, is_remote, load_manifest, manifest_sha256

    m = load_manifest(folder)
    before = None if is_remote(folder) or not verify else manifest_sha256(folder)  # what the pass checks
    counts = m.counts
    producer = dict(m.producer)
    report: dict[str, Any] = {
        "shard_set": str(folder),
        "kind": m.kind,
        "count": m.total,
        "shards": len(m.shards),
        "bytes": sum(s.bytes for s in m.shards),
        "samples_per_shard": {"min": min(counts, default=0), "max": max(counts, default=0)},
        "classes": {"count": len(m.classes), "classes": [asdict(c) for c in m.classes]},
        "latent": asdict(m.latent) if m.latent else None,
        "producer": producer,
        "skipped": m.skipped,
        "notes": m.notes,
    }
    if verify:
        from data_prep.verify import record_pass, verify_shards

        problems = verify_shards(folder, m.shards, threads, progress)
        if empty := empty_problem(folder, m):
            problems.insert(0, empty)
        record = record_pass(folder, before, problems)
        report["verify"] = {"checked": len(m.shards), "problems": problems, "record": record}
    return report


def render_data(r: dict[str, Any]) -> str:
    lines = [f"shard set {r['shard_set']}"]
    per = r["samples_per_shard"]
    each = f"{per['min']}" if per["min"] == per["max"] else f"{per['min']} to {per['max']}"
    lines.append(
        f"  {r['kind']}: {r['count']} samples in {r['shards']} shards ({each} samples each), {size_text(r['bytes'])}"
    )
    classes = r["classes"]["classes"]
    shown = ", ".join(
        f"{c['index']} {c['wnid']}" + (f" ({c['name']})" if c["name"] != c["wnid"] else "")
        for c in classes[:NAMES_SHOWN]
    )
    more = f", … {len(classes) - NAMES_SHOWN} more" if len(classes) > NAMES_SHOWN else ""
    lines.append(f"  classes: {r['classes']['count']}" + (f": {shown}{more}" if classes else ""))
    if (lat := r["latent"]) is not None:
        lines.append(f"  latents: {lat['dtype']} {tuple(lat['shape'])} (C, H, W)")
        lines.append("    per-channel mean: " + " ".join(f"{v:.4g}" for v in lat["mean"]))
        lines.append("    per-channel std:  " + " ".join(f"{v:.4g}" for v in lat["std"]))
    p = r["producer"]
    if p:
        facts = [f"job {p['job']}"] if "job" in p else []
        facts += [f"{k.replace('_', ' ')} {v}" for k, v in p.items() if k not in ("job", "config")]
        lines.append("  producer: " + ("; ".join(facts) or "(not recorded)"))
        if isinstance(p.get("config"), dict):
            flat = flatten(p["config"])
            lines.append("    config: " + ", ".join(f"{k}={v}" for k, v in flat.items()))
    else:
        lines.append("  producer: (not recorded)")
    skipped = r["skipped"]
    lines.append(f"  skipped inputs: {len(skipped)}")
    for s in skipped[:SKIPPED_SHOWN]:
        lines.append(f"    {s['path']}: {s['reason']}")
    if len(skipped) > SKIPPED_SHOWN:
        lines.append(f"    … {len(skipped) - SKIPPED_SHOWN} more (--json lists all)")
    if r["notes"]:
        lines.append("  converted when read: " + ", ".join(f"{k} {v}" for k, v in r["notes"].items()))
    if (v := r.get("verify")) is not None:
        if r["count"] == 0:  # the one problem of a set of no sample (data_prep.manifest.empty_problem)
            lines += [f"verify: {p}" for p in v["problems"]]
        elif v["problems"]:
            lines.append(f"verify: {len(v['problems'])} of {v['checked']} shards do not match the manifest:")
            lines += [f"  {p}" for p in v["problems"]]
        else:
            lines.append(f"verify: all {v['checked']} shards verified (size, sha256, sample count)")
    return "\n".join(lines)


def cmd_data(ns: argparse.Namespace) -> int:
    r = data_report(
        shard_set_location(ns.shards), ns.verify, ns.threads, progress=ns.verify and not ns.no_progress
    )
    print(json.dumps(r, indent=1) if ns.json else render_data(r))
    if message := r.get("verify", {}).get("record", {}).get("message"):
        print(message, file=sys.stderr)  # what was written beside the shards, and what a start will cost
    return EXIT_PROBLEM if r.get("verify", {}).get("problems") else EXIT_OK


# ------------------------------------------------------------------------------------------- order


def key_decoder(kind: str) -> Any:
    """A reader `Decode` that skips the arrays and pixels: x = (n,) flip flags, y = (n,) labels.

    The flags come from `flip_mask`, the rule `latent_decoder` applies; image sets are never flipped.
    """
    import numpy as np
    import torch

    from data_prep.reader import flip_mask

    def decode(samples: list[dict[str, Any]], uniforms: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        flips = flip_mask(uniforms) if kind == "latents" else np.zeros(len(samples), dtype=bool)
        labels = torch.tensor([int(bytes(s["cls"])) for s in samples], dtype=torch.long)
        return torch.from_numpy(np.asarray(flips, dtype=bool)), labels

    return decode


def order_report(
    folder: str | Path,
    *,
    seed: int,
    global_batch: int,
    streams: int,
    steps: range,
    world_size: int = 1,
    rank: int | None = None,
) -> dict[str, Any]:
    """The samples of each step in `steps` as the trainer's reader delivers them to `rank` (every rank
    in turn when None), in the rank's stream order, with each sample's place in the global batch."""
    from data_prep.manifest import load_manifest
    from data_prep.reader import StreamReader

    m = load_manifest(folder)
    names = {c.index: c.name for c in m.classes}
    ranks = [rank] if rank is not None else list(range(world_size))
    per_rank = {}
    for r in ranks:
        reader = StreamReader(
            folder, m, seed=seed, global_batch=global_batch, streams=streams, rank=r,
            world_size=world_size, decode=key_decoder(m.kind), workers=0,
        )  # fmt: skip
        per_rank[r] = (reader.streams, list(itertools.islice(reader.batches(steps.start), len(steps))))
    b = global_batch // streams
    batches = []
    for i, step in enumerate(steps):
        for r in ranks:
            streams_of_rank, got = per_rank[r]
            batch = got[i]
            assert batch.step == step
            samples = [
                {
                    "key": key,
                    "class": int(y),
                    "name": names.get(int(y), ""),
                    "position": int(pos),
                    "stream": int(pos) // b,
                    **({"flipped": bool(f)} if m.kind == "latents" else {}),
                }
                for key, y, pos, f in zip(batch.keys, batch.y, batch.positions, batch.x)
            ]
            batches.append({"step": step, "rank": r, "streams": streams_of_rank, "samples": samples})
    return {
        "shard_set": str(folder),
        "kind": m.kind,
        "seed": seed,
        "global_batch": global_batch,
        "streams": streams,
        "per_stream": b,
        "world_size": world_size,
        "rank": rank,
        "batches": batches,
    }


def render_order(r: dict[str, Any]) -> str:
    lines = [
        f"order of {r['shard_set']} ({r['kind']}): seed {r['seed']}, global batch {r['global_batch']} = "
        f"{r['streams']} streams × {r['per_stream']}, world size {r['world_size']}"
    ]
    latents = r["kind"] == "latents"
    for batch in r["batches"]:
        streams = batch["streams"]
        shown = ", ".join(map(str, streams[:8])) + (", …" if len(streams) > 8 else "")
        lines.append(
            f"step {batch['step']}, rank {batch['rank']} of {r['world_size']} (streams {shown}): "
            f"{len(batch['samples'])} samples"
        )
        classes = [f"{s['class']} {s['name']}".strip() for s in batch["samples"]]
        kw = max([len("key"), *(len(s["key"]) for s in batch["samples"])])
        cw = max([len("class"), *map(len, classes)])
        flip = "  flipped" if latents else ""
        lines.append(f"  {'position':>8}  {'stream':>6}  {'key':<{kw}}  {'class':<{cw}}{flip}".rstrip())
        for s, cls in zip(batch["samples"], classes):
            flip = f"  {'yes' if s['flipped'] else 'no'}" if latents else ""
            lines.append(
                f"  {s['position']:>8}  {s['stream']:>6}  {s['key']:<{kw}}  {cls:<{cw}}{flip}".rstrip()
            )
    return "\n".join(lines)


def _parse_steps(ns: argparse.Namespace, parser: argparse.ArgumentParser) -> range:
    if ns.steps is None:
        if ns.step < 0:
            parser.error(f"--step {ns.step} must be 0 or more")
        return range(ns.step, ns.step + 1)
    match = re.fullmatch(r"(\d+):(\d+)", ns.steps)
    if not match or int(match[2]) <= int(match[1]):
        parser.error(f"--steps {ns.steps} must be K1:K2 with 0 <= K1 < K2 (steps K1, …, K2 - 1)")
    return range(int(match[1]), int(match[2]))


def cmd_order(ns: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from slurm.config import ConfigError

    steps = _parse_steps(ns, parser)
    shards, seed, batch, streams = ns.shards, ns.seed, ns.global_batch, ns.streams
    if ns.config:
        try:
            data = train_config([ns.config], []).data
        except ConfigError as exc:
            parser.error(f"--config {ns.config}: {exc}")
        shards = shards or data.shards
        seed = data.seed if seed is None else seed
        batch = data.global_batch if batch is None else batch
        streams = data.streams if streams is None else streams
    missing = [
        flag
        for flag, v in [
            ("SHARDS", shards),
            ("--seed", seed),
            ("--global-batch", batch),
            ("--streams", streams),
        ]
        if v is None
    ]
    if missing:
        parser.error(f"{', '.join(missing)} needed (or --config TRAIN.yaml, whose data.* keys give them)")
    if ns.world_size < 1:
        parser.error(f"--world-size {ns.world_size} must be at least 1")
    if ns.rank is not None and not 0 <= ns.rank < ns.world_size:
        parser.error(f"--rank {ns.rank} must be in 0 … {ns.world_size - 1} (--world-size {ns.world_size})")
    r = order_report(
        shard_set_location(shards), seed=seed, global_batch=batch, streams=streams, steps=steps,
        world_size=ns.world_size, rank=ns.rank,
    )  # fmt: skip
    print(json.dumps(r, indent=1) if ns.json else render_order(r))
    return EXIT_OK
