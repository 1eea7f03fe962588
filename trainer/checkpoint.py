"""Checkpoints: the whole training state, written by every rank, published last (STYLE.md 8).

Layout of `<run>/checkpoints/step-00000080/`:
- `<engine>/`: DeepSpeed's files for each engine (`model` for the DiT; `autoencoder` and
  `discriminator` for the VA-VAE): module weights, ZeRO optimizer partitions, LR scheduler, step;
- `ema.safetensors`: the fp32 EMA (rank 0);
- `rng-rank<r>.pt`: each rank's RNG states (torch, CUDA, numpy, python);
- `meta.json`: step, samples seen, topology (world size, micro batch, accumulation, ZeRO stage, dtype),
  the resolved config, and every file of the checkpoint with its size. It is written after every rank
  finished, so a checkpoint is *complete* when meta.json exists and every file it lists has its size.

`checkpoints/latest` names the newest complete checkpoint; it is replaced atomically after meta.json,
and old checkpoints are deleted only after that (keep the last K, plus milestones). On load, a
checkpoint saved at another world size is converted once to DeepSpeed's universal format
(`<engine>_universal/`, published atomically with a marker; see trainer/universal.py) and loaded from there;
one saved at another ZeRO stage (stage 0 runs at one rank in fp32) is loaded through whole tensors
(trainer/stage_change.py).

Faults (issue #11): a job killed while saving leaves a folder without meta.json, which resume reports
and ignores; a checkpoint damaged afterwards (a file truncated or deleted) makes resume fall back to the
newest complete one, naming what is wrong. A save that fails on any rank (a full or read-only disk) is
agreed by every rank after each phase, the partial folder is removed, `latest` and every older
checkpoint stay as they were, and every rank raises :class:`CheckpointWriteError` naming the checkpoint,
the rank and the errno.
"""

from __future__ import annotations

import errno as errno_names
import json
import logging
import os
import random
import resource
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from trainer.stage_change import load_whole, resume_route
from trainer.universal import ConvertSettings, ensure_universal, listed_file_problems

log = logging.getLogger(__name__)

LATEST = "latest"
META = "meta.json"
EMA_FILE = "ema.safetensors"
UNIVERSAL_INFO = {"universal_checkpoint_info": {"universal_checkpoint_version": 0.4}}
"""Saved in DeepSpeed's client state so that ds_to_universal can convert a non-Megatron checkpoint."""


def step_name(step: int) -> str:
    return f"step-{step:08d}"


class CheckpointWriteError(RuntimeError):
    """Writing a checkpoint failed on some rank (every rank raises it, with the same message).

    The partial checkpoint folder was removed; `latest` and every older checkpoint are untouched.
    """

    def __init__(self, message: str, errno: int | None) -> None:
        super().__init__(message)
        self.errno = errno


class CheckpointViewError(RuntimeError):
    """A rank cannot see, complete, the checkpoint rank 0 chose to resume from (every rank raises it)."""


@dataclass(frozen=True)
class Checkpoint:
    path: Path
    meta: dict[str, Any]

    @property
    def step(self) -> int:
        return int(self.meta["step"])


def problems(path: Path) -> list[str]:
    """What is wrong with the checkpoint folder `path` ([] when it is complete)."""
    meta_path = path / META
    if not meta_path.is_file():
        return [f"{path}: no {META} (the save did not finish)"]
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError as exc:
        return [f"{meta_path}: unreadable ({exc})"]
    return listed_file_problems(path, meta["files"], META, " (truncated?)")


class Checkpointer:
    """Saves and finds checkpoints of one run directory."""

    def __init__(
        self,
        run_dir: str | Path,
        keep_last: int = 3,
        milestone_every: int = 0,
        convert: ConvertSettings | None = None,
    ) -> None:
        self.root = Path(run_dir) / "checkpoints"
        self.keep_last, self.milestone_every = keep_last, milestone_every
        self.convert = convert or ConvertSettings()

    # ------------------------------------------------------------------------------------ finding

    def complete(self) -> list[Checkpoint]:
        """Complete checkpoints, oldest first."""
        out = []
        for path in sorted(self.root.glob("step-*")):
            if path.is_dir() and not problems(path):
                out.append(Checkpoint(path, json.loads((path / META).read_text())))
        return out

    def latest(self) -> Checkpoint | None:
        """The checkpoint to resume from: the one `latest` names if complete, else the newest complete one.

        Every skipped candidate is logged with what was wrong with it, and so is every checkpoint folder
        newer than the one returned (a save that a killed job did not finish, or never published).
        """
        pointer = self.root / LATEST
        chosen, reported = None, set()
        if pointer.is_file():
            path = self.root / pointer.read_text().strip()
            bad = problems(path)
            if not bad:
                chosen = Checkpoint(path, json.loads((path / META).read_text()))
            else:
                log.warning("checkpoint %s named by %s is not usable: %s", path.name, pointer, "; ".join(bad))
                reported.add(path.name)
        if chosen is None:
            for path in sorted(self.root.glob("step-*"), reverse=True):
                bad = problems(path)
                if not bad:
                    log.warning("resuming from %s, the newest complete checkpoint", path.name)
                    chosen = Checkpoint(path, json.loads((path / META).read_text()))
                    break
                if path.name not in reported:
                    log.warning("skipping checkpoint %s: %s", path.name, "; ".join(bad))
                reported.add(path.name)
        newer = [
            p
            for p in sorted(self.root.glob("step-*"))
            if p.is_dir() and p.name not in reported and (chosen is None or p.name > chosen.path.name)
        ]
        for path in newer:
            why = problems(path) or [f"complete, but never published as {LATEST} (the job stopped first)"]
            log.warning("ignoring checkpoint %s: %s", path.name, "; ".join(why))
        return chosen

    def agreed_latest(self) -> Checkpoint | None:
        """The checkpoint every rank resumes from (every rank calls this): rank 0's :meth:`latest`, seen
        complete by every rank, or CheckpointViewError on every rank.

        Rank 0 chooses and broadcasts the folder's name; each rank checks that its own view of that folder
        holds meta.json and every file it lists at its size (loading reads rank 0's model states, and an
        elastic load every partition), and the ranks all-gather what they could not see. A shared file
        system whose views lag on some node thus stops the job, naming the rank and the file, instead of
        letting ranks load different steps. None (a fresh start) when rank 0 finds no checkpoint.
        """
        choice = [None]
        if dist.get_rank() == 0:
            chosen = self.latest()
            choice = [chosen.path.name if chosen is not None else None]
        dist.broadcast_object_list(choice, src=0)
        name = choice[0]
        unseen = problems(self.root / name) if name is not None else []
        views: list[list[str] | None] = [None] * dist.get_world_size()
        dist.all_gather_object(views, unseen)
        failed = [(r, v) for r, v in enumerate(views) if v]
        if failed:
            what = "\n  ".join(f"rank {r}: {line}" for r, v in failed for line in v)
            raise CheckpointViewError(
                f"rank 0 chose checkpoint {name} to resume from, but {len(failed)} rank(s) cannot see it "
                f"complete:\n  {what}\nevery rank stopped before loading anything. The ranks see different "
                f"files under {self.root} (a shared file system whose nodes have not caught up?): start the "
                "job again once every node sees the files"
            )
        return (
            None
            if name is None
            else Checkpoint(self.root / name, json.loads((self.root / name / META).read_text()))
        )

    # ------------------------------------------------------------------------------------- saving

    def save(
        self,
        step: int,
        engines: dict[str, Any],
        ema_state: dict[str, torch.Tensor] | Callable[[], dict[str, torch.Tensor] | None] | None,
        meta: dict[str, Any],
    ) -> Path:
        """Write checkpoint `step` (every rank calls this), publish it as `latest`, then prune old ones.

        Four phases, each ending with an agreement over the ranks: make the folder; each engine's
        DeepSpeed files; the RNG states and the EMA; meta.json, then `latest`. When a phase fails on any
        rank (a full or read-only disk, a file-size limit, non-finite EMA weights), the partial folder
        is removed and every rank raises (CheckpointWriteError, or FloatingPointError for the EMA);
        nothing older is touched. Old checkpoints are deleted only after the new one is published.
        `ema_state` may be a callable (:meth:`ShardedEMA.state_dict`, a gather every rank joins), called
        first, so the time rank 0 prints covers it.
        """
        from safetensors.torch import save_file

        rank, start = dist.get_rank(), time.perf_counter()
        if callable(ema_state):  # e.g. ShardedEMA.state_dict: a gather, timed as part of the save
            ema_state = ema_state()
        path = self.root / step_name(step)
        written: dict[str, int] = {}  # the files this rank wrote, with the sizes it saw: meta.json's sizes

        def wrote(*files: Path | str) -> None:
            for f in map(Path, files):
                written[str(f.relative_to(path))] = f.stat().st_size

        def make_folder() -> None:
            if rank == 0:
                if path.exists():  # a partial save of this step from an earlier attempt
                    shutil.rmtree(path)
                path.mkdir(parents=True)

        def save_engine(name: str, engine: Any) -> None:
            files: list[str] = []
            store = engine.checkpoint_engine  # every file DeepSpeed writes goes through its save()
            store.save = _recording(store.save, files)
            try:
                engine.save_checkpoint(
                    str(path), tag=name, client_state=dict(UNIVERSAL_INFO), save_latest=False
                )
                wrote(*files)
            except Exception:
                # DeepSpeed (0.19.8) writes between its tag-validation all-reduces and one closing
                # barrier; a rank whose write failed skipped that barrier, so it joins it here.
                dist.barrier()
                raise
            finally:
                del store.save  # the instance attribute; the class's save() is back

        def save_own_files() -> None:
            torch.save(rng_state(), path / f"rng-rank{rank}.pt")
            wrote(path / f"rng-rank{rank}.pt")
            if rank == 0 and ema_state is not None:
                tensors = {k: v.detach().float().cpu().contiguous() for k, v in ema_state.items()}
                if not all(torch.isfinite(t).all() for t in tensors.values()):
                    raise FloatingPointError(
                        f"refusing to write checkpoint {path.name}: the EMA weights are not finite"
                    )
                save_file(tensors, str(path / EMA_FILE))
                wrote(path / EMA_FILE)

        reports: list[dict[str, int] | None] = [None] * dist.get_world_size()

        def publish() -> None:
            if rank == 0:  # each file with the size its writer saw, not rank 0's view of another node's file
                files = dict(sorted(f for report in reports for f in (report or {}).items()))
                _write_atomic(path / META, json.dumps({**meta, "step": step, "files": files}, indent=1))
                _write_atomic(self.root / LATEST, path.name)

        self._agreed(path, make_folder)
        for name, engine in engines.items():
            self._agreed(path, lambda: save_engine(name, engine))  # noqa: B023 (called at once)
        self._agreed(path, save_own_files)
        dist.all_gather_object(reports, written)
        self._agreed(path, publish)
        if rank == 0:
            size = sum(n for report in reports for n in (report or {}).values())
            amount = f"{size / 2**30:.2f} GiB" if size >= 2**30 else f"{size / 2**20:.1f} MiB"
            print(
                f"saved checkpoint {path.name} ({amount}) in {time.perf_counter() - start:.1f} s", flush=True
            )
            try:
                self.prune()
            except OSError as exc:  # the new checkpoint is published; an old one left behind is harmless
                log.warning("could not delete old checkpoints under %s: %s", self.root, exc)
        dist.barrier()
        return path

    def _agreed(self, path: Path, phase: Callable[[], None]) -> None:
        """Run one phase of a save on this rank, then agree with every rank on whether it failed anywhere.

        On a failure, every rank learns which rank failed and why; rank 0 removes the partial folder
        `path`; every rank raises the same error.
        """
        failure = None
        try:
            phase()
        except Exception as exc:  # whatever failed, no rank may be left waiting in a collective
            code, text = getattr(exc, "errno", None), str(exc)
            if code not in errno_names.errorcode and not isinstance(exc, FloatingPointError):
                text += f" ({_storage_notes(path)})"
            failure = (dist.get_rank(), type(exc).__name__, code, text)
        failures: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(failures, failure)
        failed = [f for f in failures if f is not None]
        if not failed:
            return
        if dist.get_rank() == 0:
            shutil.rmtree(path, ignore_errors=True)
        dist.barrier()
        pointer = self.root / LATEST
        previous = pointer.read_text().strip() if pointer.is_file() else None
        kept = f"{LATEST} still names {previous}" if previous else "there is no earlier checkpoint"
        what = "; ".join(
            f"rank {r}: {kind}: {msg}"
            + (f" ({errno_names.errorcode[e]})" if e in errno_names.errorcode else "")
            for r, kind, e, msg in failed
        )
        message = f"writing checkpoint {path} failed on {what}. Removed the partial checkpoint; {kept}"
        if any(kind == "FloatingPointError" for _, kind, _, _ in failed):
            raise FloatingPointError(message)
        raise CheckpointWriteError(message, failed[0][2])

    def prune(self) -> None:
        """Delete complete checkpoints beyond the last `keep_last`, except milestones and `latest`."""
        done = self.complete()
        latest = (self.root / LATEST).read_text().strip() if (self.root / LATEST).is_file() else None
        for ck in done[: max(len(done) - self.keep_last, 0)]:
            milestone = self.milestone_every > 0 and ck.step % self.milestone_every == 0
            if not milestone and ck.path.name != latest:
                shutil.rmtree(ck.path)

    # ------------------------------------------------------------------------------------ loading

    def load(self, ck: Checkpoint, engines: dict[str, Any]) -> bool:
        """Load every engine's state from `ck` (every rank calls this); restore RNG at the same world size.

        Returns True when the world size changed (the engines were loaded from universal checkpoints,
        and RNG states were not restored: randomness that matters is derived from the step).
        """
        world, rank, start = dist.get_world_size(), dist.get_rank(), time.perf_counter()
        elastic = ck.meta["world_size"] != world
        for name, engine in engines.items():
            tag, route = name, resume_route(ck.meta, world, engine.zero_optimization_stage())
            if route == "whole":  # saved at stage 0, or loaded into stage 0 (trainer/stage_change.py)
                load_whole(ck.path, name, engine, self.convert)
                continue
            if route == "universal":  # converted once, outside any collective's time-out (universal.py)
                tag = f"{name}_universal"
                ensure_universal(ck.path / name, ck.path / tag, self.convert)
            load_path, _ = engine.load_checkpoint(
                str(ck.path), tag=tag, load_optimizer_states=True, load_lr_scheduler_states=True
            )
            if load_path is None:
                raise FileNotFoundError(f"DeepSpeed found no checkpoint under {ck.path / tag}")
        if not elastic:
            set_rng_state(torch.load(ck.path / f"rng-rank{rank}.pt", weights_only=True))
        if rank == 0:
            took = f"{time.perf_counter() - start:.1f} s" + (" (its conversion included)" if elastic else "")
            print(f"loaded checkpoint {ck.path.name} in {took}", flush=True)
        return elastic


def _storage_notes(path: Path) -> str:
    """What may have stopped a write under `path` when the error carries no errno (torch.save's writer raises
    a bare RuntimeError): the free space of its filesystem, and this process's file-size limit if any."""
    folder = next((p for p in (path, *path.parents) if p.exists()), Path("/"))
    notes = [f"{shutil.disk_usage(folder).free / 2**20:.1f} MiB free on the filesystem of {folder}"]
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    if limit != resource.RLIM_INFINITY:
        notes.append(f"this process may write files of at most {limit} bytes (ulimit -f)")
    return "; ".join(notes)


def _recording(save: Callable[..., Any], into: list[str]) -> Callable[..., Any]:
    """DeepSpeed's checkpoint_engine.save(state_dict, path), also noting each path it wrote in `into`."""

    def recorded(state_dict: Any, path: str) -> Any:
        out = save(state_dict, path)
        into.append(path)
        return out

    return recorded


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def rng_state() -> dict[str, Any]:
    """This process's RNG states, as plain tensors and ints (loadable with weights_only=True)."""
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": (np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]),
        "python": random.getstate(),
    }


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"]:
        torch.cuda.set_rng_state_all(state["cuda"])
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), *rest))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
