"""`ldit inspect`: read-only looks inside a shard set, the sample order of a step, a checkpoint and a run.

    ldit inspect data SHARDS [--verify] [--threads N]
    ldit inspect order [SHARDS] [--config TRAIN.yaml] [--seed S --global-batch B --streams V]
                       (--step K | --steps K1:K2) [--world-size W [--rank R]]
    ldit inspect checkpoint RUN_OR_CHECKPOINT [--world-size W ...] [--against CONFIG.yaml [key=value ...]]
    ldit inspect run RUN

Plain text by default, `--json` for machines. Nothing here starts a process group, and the one file
written is the record of a good `data --verify` pass beside the manifest (data_prep/verify.py
`record_pass`; a line on stderr says whether it was written), so later starts check shard sizes only.
Each sub-command builds a JSON-ready dict (`data_report`, `order_report`, `checkpoint_report`,
`slurm.status.run_status`) and renders it as text.

- `order` runs the trainer's own reader, `data_prep.reader.StreamReader(...).batches(start)`, at the
  given rank and world size, with a decoder that reads keys and labels and takes the flip decision
  from `data_prep.reader.flip_mask` (the latent decoder's rule) without decoding any array.
- `checkpoint` judges completeness with `trainer.checkpoint.problems` and which checkpoint a resume
  would pick with `trainer.checkpoint.Checkpointer.latest`; the world-size rule is the trainer's own,
  `trainer.config.world_size_problems`.
- `run` is `ldit status`'s text (shared code in `slurm/status.py`).

Exit status: 0 fine; 1 something is wrong (a shard fails verification, the inspected checkpoint is
incomplete or cannot resume at a requested world size, a missing manifest or checkpoint); 2 a usage
or configuration error. Errors are one line, `ldit inspect: error: …`, never a traceback.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import re
import sys
from collections.abc import Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NoReturn

SUMMARY = "a shard set (--verify, recorded beside it), the samples of a step, a checkpoint, a run"
EXIT_OK, EXIT_PROBLEM, EXIT_USAGE = 0, 1, 2
ENGINES = {"dit": ("model",), "vavae": ("autoencoder", "discriminator")}
"""DeepSpeed engine folders of a checkpoint per run kind (the `engines` dicts of trainer/dit.py and trainer/vavae.py)."""
TOPOLOGY_KEYS = (
    "world_size",
    "global_batch",
    "micro_batch",
    "grad_accum",
    "zero_stage",
    "dtype",
    "device_type",
)
"""What meta.json records of the topology a checkpoint was saved at (trainer.common.Topology.describe + ZeRO stage)."""
NAMES_SHOWN = 5
"""Class names the text of `inspect data` shows."""
SKIPPED_SHOWN = 10
"""Skipped inputs the text of `inspect data` lists (--json lists all)."""


class InspectError(Exception):
    """What was asked for is not there (no checkpoint, not a run directory); the message says what."""


class _Parser(argparse.ArgumentParser):
    """Usage errors as one line, `ldit inspect: error: …`, exit status 2."""

    def error(self, message: str) -> NoReturn:
        print(f"ldit inspect: error: {message}", file=sys.stderr)
        sys.exit(EXIT_USAGE)


# ----------------------------------------------------------------------------------------- helpers


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} → {"a.b": 1}; tuples become lists (as in JSON)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out |= _flatten(v, f"{prefix}{k}.")
        else:
            out[f"{prefix}{k}"] = list(v) if isinstance(v, tuple) else v
    return out


def _dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _shard_set(location: str) -> str | Path:
    """A shard set named on the command line: a local folder, or a URL / `pipe:` template kept as written."""
    from data_prep.manifest import is_remote

    return location if is_remote(location) else Path(location)


def _config_dict(files: Sequence[str], overrides: Sequence[str]) -> Any:
    """A `ldit train` config loaded with the project's loader (the schema chosen by its `kind`)."""
    from slurm.jobs import JOBS

    return JOBS["train"].load(files, overrides)


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
        f"  {r['kind']}: {r['count']} samples in {r['shards']} shards ({each} samples each), {_size(r['bytes'])}"
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
            flat = _flatten(p["config"])
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


def _cmd_data(ns: argparse.Namespace) -> int:
    r = data_report(_shard_set(ns.shards), ns.verify, ns.threads, progress=ns.verify and not ns.no_progress)
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


def _cmd_order(ns: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from slurm.config import ConfigError

    steps = _parse_steps(ns, parser)
    shards, seed, batch, streams = ns.shards, ns.seed, ns.global_batch, ns.streams
    if ns.config:
        try:
            data = _config_dict([ns.config], []).data
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
        _shard_set(shards), seed=seed, global_batch=batch, streams=streams, steps=steps,
        world_size=ns.world_size, rank=ns.rank,
    )  # fmt: skip
    print(json.dumps(r, indent=1) if ns.json else render_order(r))
    return EXIT_OK


# -------------------------------------------------------------------------------------- checkpoint


@contextmanager
def _quiet(name: str):
    """Silence a logger (Checkpointer.latest warns about every checkpoint it skips; we report them)."""
    logger = logging.getLogger(name)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _locate(path: Path) -> tuple[Path, Path | None]:
    """(checkpoint folder, run directory or None) of a run directory or a checkpoint folder."""
    from trainer.checkpoint import LATEST, META

    if not path.exists():
        raise InspectError(f"{path} does not exist")
    if (path / "checkpoints").is_dir():
        root = path / "checkpoints"
        pointer = root / LATEST
        if pointer.is_file() and (root / pointer.read_text().strip()).is_dir():
            return root / pointer.read_text().strip(), path
        folders = sorted(p for p in root.glob("step-*") if p.is_dir())
        if not folders:
            raise InspectError(f"{path}: no checkpoint (checkpoints/ holds no step-* folder)")
        return folders[-1], path
    if path.is_dir() and ((path / META).is_file() or path.name.startswith("step-")):
        return path, path.parent.parent if path.parent.name == "checkpoints" else None
    raise InspectError(
        f"{path}: neither a run directory (with checkpoints/) nor a checkpoint folder (step-*/ with meta.json)"
    )


def _parts(folder: Path) -> dict[str, int]:
    """Bytes on disk of each engine folder, then of each file of a checkpoint (per-rank RNG files summed)."""
    entries = sorted(folder.iterdir(), key=lambda p: (not p.is_dir(), p.name))
    rng = [p for p in entries if p.is_file() and re.fullmatch(r"rng-rank\d+\.pt", p.name)]
    parts: dict[str, int] = {}
    for p in entries:
        if p.is_dir():
            parts[f"{p.name}/"] = _dir_bytes(p)
        elif p not in rng:
            parts[p.name] = p.stat().st_size
        elif p == rng[0]:
            parts[f"rng-rank*.pt ({len(rng)} files)"] = sum(f.stat().st_size for f in rng)
    return parts


def _run_kind_and_world(run_dir: Path | None) -> tuple[str | None, int | None]:
    """The kind from `<run>/config.yaml` and the world size from `<run>/topology.json` (None if unknown)."""
    import yaml

    kind = world = None
    if run_dir is not None and (run_dir / "config.yaml").is_file():
        kind = (yaml.safe_load((run_dir / "config.yaml").read_text()) or {}).get("kind")
    if run_dir is not None and (run_dir / "topology.json").is_file():
        world = json.loads((run_dir / "topology.json").read_text()).get("world_size")
    return kind, world


def _still_needed(folder: Path, kind: str | None, world: int | None) -> list[str]:
    """What a complete checkpoint of this kind at this world size holds and `folder` does not (yet)."""
    from trainer.checkpoint import EMA_FILE, META

    need = [META]
    ranks = range(world) if world else []
    need += [f"rng-rank{r}.pt" for r in ranks] if world else ["rng-rank<r>.pt for every rank"]
    need.append(EMA_FILE)
    for engine in ENGINES.get(kind or "", ("<engine>",)):
        if not (folder / engine).is_dir():
            need.append(f"{engine}/")
            continue
        need.append(f"{engine}/mp_rank_00_model_states.pt")
        for r in ranks:  # DeepSpeed's ZeRO partition of rank r (a bf16_ prefix in some versions)
            if not list((folder / engine).glob(f"*zero_pp_rank_{r}_mp_rank_00_optim_states.pt")):
                need.append(f"{engine}/zero_pp_rank_{r}_mp_rank_00_optim_states.pt")
    return [n for n in need if "<" in n or not (folder / n.rstrip("/")).exists()]


def resume_answer(meta: dict[str, Any], world_size: int, folder: Path) -> tuple[bool, str]:
    """Whether and how a complete checkpoint resumes at `world_size`: (ok, text).

    Same world size: exact (engines, optimizer partitions and per-rank RNG load as saved). Another
    one must divide data.streams and the global batch, and the micro batch must divide the per-rank
    batch (trainer.config.world_size_problems); the engines are then loaded from DeepSpeed's
    universal format, converted once into `<engine>_universal/`.
    """
    from trainer.config import world_size_problems

    cfg = meta["config"]
    b, v, micro = cfg["data"]["global_batch"], cfg["data"]["streams"], cfg["micro_batch"]
    if why := world_size_problems(b, v, micro, world_size):
        return False, "no: " + "; ".join(why)
    local = b // world_size
    split = f"{local} samples per rank = micro batch {micro or local} × {local // (micro or local)}"
    if world_size == meta["world_size"]:
        return True, f"yes, exact (same world size; {split})"
    engines = ENGINES.get(meta.get("kind", ""), ()) or [
        p.name for p in folder.iterdir() if p.is_dir() and not p.name.endswith("_universal")
    ]
    folders = ", ".join(f"{e}_universal/" for e in engines)
    if all((folder / f"{e}_universal").is_dir() for e in engines):
        return True, f"yes, via universal conversion ({folders} already written; {split})"
    return True, f"yes, via universal conversion (the first resume writes {folders}; {split})"


def _instead(r: dict[str, Any]) -> str:
    """What a resume of the run would use instead of an incomplete checkpoint ("" without a run)."""
    if r["run"] is None:
        return ""
    return (
        f"; a resume would use {r['resume_from']}"
        if r["resume_from"]
        else "; the run has no complete checkpoint"
    )


def checkpoint_report(
    path: Path, world_sizes: Sequence[int] = (), against: Sequence[str] = ()
) -> dict[str, Any]:
    """Step, samples seen, topology, sizes, completeness and resumability of a checkpoint (the `latest`
    of a run directory), and with `against` (config files, then key=value) the config keys that differ."""
    from dataclasses import asdict

    from trainer.checkpoint import META, Checkpointer, problems

    folder, run_dir = _locate(path)
    bad = problems(folder)
    has_meta = (folder / META).is_file() and not any(p.startswith(f"{folder / META}:") for p in bad)
    meta = json.loads((folder / META).read_text()) if has_meta else None
    match = re.fullmatch(r"step-(\d+)", folder.name)
    parts = _parts(folder)
    r: dict[str, Any] = {
        "checkpoint": str(folder),
        "run": str(run_dir) if run_dir else None,
        "step": meta["step"] if meta else int(match[1]) if match else None,
        "complete": not bad,
        "problems": bad,
        "sizes": {"total": sum(parts.values()), "parts": parts},
    }
    if meta:
        r["samples_seen"] = meta.get("samples_seen")
        r["kind"] = meta.get("kind") or meta["config"].get("kind")
        r["topology"] = {k: meta.get(k) for k in TOPOLOGY_KEYS}
        r["files"] = len(meta["files"])
    else:
        kind, world = _run_kind_and_world(run_dir)
        r["kind"] = kind
        r["topology"] = {"world_size": world}
        r["present"] = [
            f"{p.name}/ ({sum(f.is_file() for f in p.rglob('*'))} files)" if p.is_dir() else p.name
            for p in sorted(folder.iterdir())
        ]
        r["still_needed"] = _still_needed(folder, kind, world)
    if run_dir is not None:
        ckpts = Checkpointer(run_dir)
        with _quiet("trainer.checkpoint"):
            chosen = ckpts.latest()
        r["resume_from"] = chosen.path.name if chosen else None
        r["others"] = [
            {"name": p.name, "complete": not problems(p)}
            for p in sorted(ckpts.root.glob("step-*"), reverse=True)
            if p.is_dir() and p != folder
        ]
    asked = list(world_sizes) or ([meta["world_size"]] if meta else [])
    r["resume"] = []
    for w in asked:
        if bad:
            text = "no: the checkpoint is incomplete" + _instead(r)
            r["resume"].append({"world_size": w, "ok": False, "text": text})
        else:
            ok, text = resume_answer(meta, w, folder)
            r["resume"].append({"world_size": w, "ok": ok, "text": text})
    if against:
        if meta is None:
            raise InspectError(f"{folder}: no readable {META}, so no config to compare --against")
        from slurm.cli import split_args

        files, overrides = split_args(against)
        new = _flatten(json.loads(json.dumps(asdict(_config_dict(files, overrides)))))
        old = _flatten(meta["config"])
        absent = "(absent)"
        r["against"] = {
            "files": list(against),
            "differences": [
                {"key": k, "checkpoint": old.get(k, absent), "config": new.get(k, absent)}
                for k in sorted(old.keys() | new.keys())
                if old.get(k, absent) != new.get(k, absent)
            ],
        }
    return r


def render_checkpoint(r: dict[str, Any]) -> str:
    where = f" (run {r['run']})" if r["run"] else ""
    lines = [f"checkpoint {r['checkpoint']}{where}"]
    if "samples_seen" in r:
        lines.append(f"  step {r['step']}, samples seen {r['samples_seen']}, kind {r['kind']}")
        t = r["topology"]
        lines.append(
            f"  topology: world size {t['world_size']}, global batch {t['global_batch']}, micro batch "
            f"{t['micro_batch']}, accumulation {t['grad_accum']}, ZeRO stage {t['zero_stage']}, "
            f"dtype {t['dtype']} ({t['device_type']})"
        )
    else:
        lines.append(f"  step {r['step']}, kind {r['kind'] or 'unknown (no config.yaml in the run)'}")
    sizes = r["sizes"]
    shown = ", ".join(f"{k} {_size(v)}" for k, v in sizes["parts"].items())
    lines.append(f"  size on disk: {_size(sizes['total'])}" + (f" ({shown})" if shown else " (empty)"))
    if r["complete"]:
        lines.append(f"  complete: yes (meta.json lists {r['files']} files, all present with their sizes)")
    elif "still_needed" in r:
        world, kind = r["topology"]["world_size"], f"{r['kind']} " if r["kind"] else ""
        lines.append(
            "  complete: no: " + "; ".join(p.removeprefix(f"{r['checkpoint']}: ") for p in r["problems"])
        )
        lines.append("  present: " + (", ".join(r["present"]) or "nothing"))
        at = f" at world size {world}" if world else ""
        lines.append(f"  a complete {kind}checkpoint{at} also needs: " + ", ".join(r["still_needed"]))
    else:
        lines.append(f"  complete: no, {len(r['problems'])} problem(s):")
        lines += [f"    {p}" for p in r["problems"]]
    for a in r["resume"]:
        lines.append(f"  resumable at world size {a['world_size']}: {a['text']}")
    if not r["resume"] and not r["complete"]:
        lines.append("  resumable: no" + _instead(r))
    if "others" in r:
        others = ", ".join(
            f"{o['name']} ({'complete' if o['complete'] else 'incomplete'})" for o in r["others"]
        )
        lines.append(f"  other checkpoints: {others or 'none'}")
    if "against" in r:
        diffs = r["against"]["differences"]
        head = f"config differences (checkpoint → {' '.join(r['against']['files'])})"
        lines.append(f"  {head}: " + (f"{len(diffs)} key(s)" if diffs else "none"))
        lines += [f"    {d['key']}: {d['checkpoint']} → {d['config']}" for d in diffs]
    return "\n".join(lines)


def _cmd_checkpoint(ns: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from slurm.config import ConfigError

    if any(w < 1 for w in ns.world_size or []):
        parser.error(f"--world-size must be at least 1, got {ns.world_size}")
    try:
        r = checkpoint_report(Path(ns.path), ns.world_size or [], ns.against or [])
    except ConfigError as exc:
        parser.error(f"--against: {exc}")
    print(json.dumps(r, indent=1) if ns.json else render_checkpoint(r))
    return EXIT_OK if r["complete"] and all(a["ok"] for a in r["resume"]) else EXIT_PROBLEM


# --------------------------------------------------------------------------------------------- run


def _cmd_run(ns: argparse.Namespace) -> int:
    from slurm.status import render_status, run_status

    r = run_status(Path(ns.run_dir))
    print(json.dumps(r, indent=1) if ns.json else render_status(r))
    return EXIT_OK


# ------------------------------------------------------------------------------------------ parser


def configure(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the four sub-commands to `parser` (the `inspect` parser of `ldit`, or a standalone one)."""
    sub = parser.add_subparsers(
        title="what", dest="what", metavar="<what>", required=True, parser_class=_Parser
    )
    common = _Parser(add_help=False)
    common.add_argument("--json", action="store_true", help="print JSON instead of text")

    p = sub.add_parser(
        "data", parents=[common], help="a shard set's manifest; --verify checks every shard",
        description="ldit inspect data: kind, count, shards, classes, latent statistics, producer, skipped "
        "inputs. --verify re-reads every shard (size, sha256, sample count); exit status 1 when one is bad. "
        "A pass that finds every shard good is recorded in SHARDS/shards-verified.json when the folder is "
        "writable, so a run's start on the set checks shard sizes only (a line on stderr says whether it "
        "was recorded).",
    )  # fmt: skip
    p.add_argument(
        "shards", metavar="SHARDS", help="shard set folder (with manifest.json), or a URL / pipe: template"
    )
    p.add_argument("--verify", action="store_true", help="check every shard's size, sha256 and sample "
                   "count; record a good pass in SHARDS/shards-verified.json")  # fmt: skip
    p.add_argument("--threads", type=int, default=4, metavar="N", help="threads of --verify (default 4)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")

    p = sub.add_parser(
        "order", parents=[common], help="the sample keys of a step, as the trainer's reader delivers them",
        description="ldit inspect order: the samples (key, class, place in the global batch, stream, and for "
        "latents whether the flipped latent is used) of global batch K, or of rank R's part of it, read by "
        "the trainer's StreamReader. Without --rank and with --world-size W, every rank's part in turn.",
    )  # fmt: skip
    p.add_argument(
        "shards", metavar="SHARDS", nargs="?", help="shard set folder (default: data.shards of --config)"
    )
    p.add_argument(
        "--config", metavar="TRAIN.yaml", help="a `ldit train` config: defaults for the data.* flags"
    )
    p.add_argument("--seed", type=int, help="data.seed")
    p.add_argument("--global-batch", type=int, metavar="B", help="data.global_batch")
    p.add_argument("--streams", type=int, metavar="V", help="data.streams")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--step", type=int, metavar="K", help="the step (0 is the first)")
    which.add_argument("--steps", metavar="K1:K2", help="steps K1, …, K2 - 1")
    p.add_argument("--world-size", type=int, default=1, metavar="W", help="world size (default 1)")
    p.add_argument("--rank", type=int, metavar="R", help="only rank R's part (default: every rank)")

    p = sub.add_parser(
        "checkpoint", parents=[common], help="step, topology, sizes, completeness, resumability, config diff",
        description="ldit inspect checkpoint: the latest checkpoint of a run directory (or the given "
        "checkpoint folder): step, samples seen, topology, sizes on disk, whether it is complete, whether "
        "it resumes at each --world-size and how, and with --against the config keys that differ. Exit "
        "status 1 when it is incomplete or cannot resume at a requested world size.",
    )  # fmt: skip
    p.add_argument("path", metavar="RUN_OR_CHECKPOINT", help="run directory or checkpoints/step-N folder")
    p.add_argument("--world-size", type=int, action="append", metavar="W",
                   help="world size to resume at (repeatable; default: the one it was saved at)")  # fmt: skip
    p.add_argument("--against", nargs="+", metavar="CONFIG.yaml|key=value",
                   help="a `ldit train` config (files, then overrides) to compare with the checkpoint's")  # fmt: skip

    p = sub.add_parser(
        "run", parents=[common], help="checkpoints, exports, last step and losses, SLURM jobs, evals",
        description="ldit inspect run: what `ldit status` shows; --json gives it as a dict.",
    )  # fmt: skip
    p.add_argument("run_dir", metavar="RUN", help="run directory (runs/<run.name>)")
    return parser


def main(argv: Sequence[str]) -> int:
    """`ldit inspect …` (argv without the leading "inspect"); returns the exit status."""
    from data_prep.manifest import ShardSetError

    parser = configure(_Parser(prog="ldit inspect", description=f"ldit inspect: {SUMMARY}."))
    try:
        ns = parser.parse_args(list(argv))
        if ns.what == "data":
            return _cmd_data(ns)
        if ns.what == "order":
            return _cmd_order(ns, parser)
        if ns.what == "checkpoint":
            return _cmd_checkpoint(ns, parser)
        return _cmd_run(ns)
    except (InspectError, ShardSetError, FileNotFoundError) as exc:
        print(f"ldit inspect: error: {exc}", file=sys.stderr)
        return EXIT_PROBLEM
    except SystemExit as exc:  # a usage error (already printed as one line) or --help
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
