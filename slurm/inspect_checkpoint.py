"""`ldit inspect checkpoint`: is a checkpoint complete, which one would a resume pick, can it resume at a world
size or against a config; the parser and the dispatch are in slurm/inspect.py."""

from __future__ import annotations

import argparse
import json
import logging
import re
from collections.abc import Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from slurm.inspect_common import (
    EXIT_OK,
    EXIT_PROBLEM,
    InspectError,
    dir_bytes,
    flatten,
    size_text,
    train_config,
)

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
            parts[f"{p.name}/"] = dir_bytes(p)
        elif p not in rng:
            parts[p.name] = p.stat().st_size
        elif p == rng[0]:
            parts[f"rng-rank*.pt ({len(rng)} files)"] = sum(f.stat().st_size for f in rng)
    return parts


def _run_kind_world_stage(run_dir: Path | None) -> tuple[str | None, int | None, int | None]:
    """The kind from `<run>/config.yaml`, the world size from `<run>/topology.json` and the ZeRO stage run
    from `<run>/ds_config.json` (None if unknown)."""
    import yaml

    kind = world = stage = None
    if run_dir is not None and (run_dir / "config.yaml").is_file():
        kind = (yaml.safe_load((run_dir / "config.yaml").read_text()) or {}).get("kind")
    if run_dir is not None and (run_dir / "topology.json").is_file():
        world = json.loads((run_dir / "topology.json").read_text()).get("world_size")
    if run_dir is not None and (run_dir / "ds_config.json").is_file():
        stage = json.loads((run_dir / "ds_config.json").read_text()).get("zero_optimization", {}).get("stage")
    return kind, world, stage


def _still_needed(folder: Path, kind: str | None, world: int | None, stage: int | None = None) -> list[str]:
    """What a complete checkpoint of this kind at this world size and ZeRO stage holds and `folder` does
    not (yet). Stage 0 (one rank in fp32) writes no ZeRO partition files."""
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
        partitioned = ranks if stage != 0 else []  # stage 0 (one rank in fp32) writes no ZeRO partition
        for r in partitioned:  # DeepSpeed's ZeRO partition of rank r (a bf16_ prefix in some versions)
            if not list((folder / engine).glob(f"*zero_pp_rank_{r}_mp_rank_00_optim_states.pt")):
                need.append(f"{engine}/zero_pp_rank_{r}_mp_rank_00_optim_states.pt")
    return [n for n in need if "<" in n or not (folder / n.rstrip("/")).exists()]


def resume_answer(meta: dict[str, Any], world_size: int, folder: Path) -> tuple[bool, str]:
    """Whether and how a complete checkpoint resumes at `world_size`: (ok, text).

    Same world size: exact (engines, optimizer partitions and per-rank RNG load as saved). Another
    one must divide data.streams and the global batch, and the micro batch must divide the per-rank
    batch (trainer.config.world_size_problems); the engines are then loaded from DeepSpeed's
    universal format, converted once into `<engine>_universal/`. To or from stage 0 (one rank in fp32,
    as the saved dtype and settings say: trainer.engine.engine_stage) they are loaded through whole
    tensors (trainer/stage_change.py), read from that conversion when the checkpoint is ZeRO's.
    """
    from trainer.config import world_size_problems
    from trainer.engine import engine_stage
    from trainer.stage_change import resume_route

    cfg = meta["config"]
    b, v, micro = cfg["data"]["global_batch"], cfg["data"]["streams"], cfg["micro_batch"]
    if why := world_size_problems(b, v, micro, world_size):
        return False, "no: " + "; ".join(why)
    local = b // world_size
    split = f"{local} samples per rank = micro batch {micro or local} × {local // (micro or local)}"
    saved = int(meta.get("zero_stage", 2))
    to = engine_stage(cfg.get("zero_stage", 2), world_size=world_size, dtype=meta.get("dtype", ""),
                      nonfinite=cfg.get("nonfinite", "stop"))  # fmt: skip
    route = resume_route(meta, world_size, to)
    if route == "exact":
        return True, f"yes, exact (same world size; {split})"
    engines = ENGINES.get(meta.get("kind", ""), ()) or [
        p.name for p in folder.iterdir() if p.is_dir() and not p.name.endswith("_universal")
    ]
    folders = ", ".join(f"{e}_universal/" for e in engines)
    how = (
        "via universal conversion ("
        if route == "universal"
        else f"via whole tensors (ZeRO stage {saved} → {to}; "
    )
    if saved == 0:  # a stage-0 checkpoint is read as it is: nothing to convert
        return True, f"yes, {how}{split})"
    if all((folder / f"{e}_universal").is_dir() for e in engines):
        return True, f"yes, {how}{folders} already written; {split})"
    return True, f"yes, {how}the first resume writes {folders}; {split})"


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
        kind, world, stage = _run_kind_world_stage(run_dir)
        r["kind"] = kind
        r["topology"] = {"world_size": world}
        r["present"] = [
            f"{p.name}/ ({sum(f.is_file() for f in p.rglob('*'))} files)" if p.is_dir() else p.name
            for p in sorted(folder.iterdir())
        ]
        r["still_needed"] = _still_needed(folder, kind, world, stage)
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
        new = flatten(json.loads(json.dumps(asdict(train_config(files, overrides)))))
        old = flatten(meta["config"])
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
    shown = ", ".join(f"{k} {size_text(v)}" for k, v in sizes["parts"].items())
    lines.append(f"  size on disk: {size_text(sizes['total'])}" + (f" ({shown})" if shown else " (empty)"))
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


def cmd_checkpoint(ns: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from slurm.config import ConfigError

    if any(w < 1 for w in ns.world_size or []):
        parser.error(f"--world-size must be at least 1, got {ns.world_size}")
    try:
        r = checkpoint_report(Path(ns.path), ns.world_size or [], ns.against or [])
    except ConfigError as exc:
        parser.error(f"--against: {exc}")
    print(json.dumps(r, indent=1) if ns.json else render_checkpoint(r))
    return EXIT_OK if r["complete"] and all(a["ok"] for a in r["resume"]) else EXIT_PROBLEM
