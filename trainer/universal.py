"""DeepSpeed universal checkpoints: converted once per checkpoint, atomically, with its own time bound.

A checkpoint saved at world size W and resumed at another one is loaded from DeepSpeed's universal format
(per-parameter fp32 + Adam moments), which DeepSpeed's own `ds_to_universal` writes (STYLE.md 14). At full
size that conversion reads and writes every optimizer byte of the checkpoint, so it runs where no
collective waits on it:

- Rank 0 converts; it runs `ds_to_universal` in a child process (`python -m trainer.universal`), with
  `workers` processes extracting ZeRO partitions and merging parameters, and kills it after
  `timeout_s`. A child process keeps DeepSpeed's process pool away from the trainer's threads (gloo,
  DataLoader); it dies with rank 0 (PR_SET_PDEATHSIG), and so do its workers.
- The other ranks poll the file system for the result (the marker, or rank 0's failure note), bounded
  by the same `timeout_s` and logging their wait, instead of sitting in a barrier bounded by
  `collective_timeout_s`. The only collective is a barrier before the conversion starts (rank 0 has
  cleaned up), which is short.
- The output is written to `.<engine>_universal/` and published by one rename to `<engine>_universal/`
  after `converted.json` (source, seconds, workers, every file with its size) was written into it. A
  folder without a valid marker (a half-written or damaged one) is never loaded: it is removed and the
  conversion done again. A temp folder left by a killed conversion is removed and the conversion
  restarted (DeepSpeed's conversion cannot resume inside one engine; each engine of the VA-VAE is
  published on its own, so a conversion killed in the second keeps the first).

Splitting one conversion across ranks is not done: `ds_to_universal.main` is one function whose phases
(extract per ZeRO partition, merge per parameter, copy the model files) share state; doing it across ranks
would mean re-implementing its orchestration on DeepSpeed's private helpers.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import torch.distributed as dist

log = logging.getLogger(__name__)

MARKER = "converted.json"
FAILED_SUFFIX = ".failed"
POLL_S = 0.2
"""How often a waiting rank looks for the marker."""
REPORT_EVERY_S = 60.0
"""How often a waiting rank logs that it is still waiting."""


@dataclass(frozen=True)
class ConvertSettings:
    """How a checkpoint is converted (from `ckpt.convert_workers` and `ckpt.convert_timeout_s`)."""

    workers: int = 4
    timeout_s: float = 3600.0


def temp_folder(dst: Path) -> Path:
    """Where the conversion into `dst` writes before it is published (`.<name>`, beside `dst`)."""
    return dst.with_name("." + dst.name)


def failure_note(dst: Path) -> Path:
    """Where rank 0 writes why the conversion into `dst` failed, for the ranks waiting on it."""
    return dst.with_name(dst.name + FAILED_SUFFIX)


def universal_problems(dst: Path) -> list[str]:
    """What is wrong with the universal folder `dst` ([] when it is complete: marker and every file's size)."""
    marker = dst / MARKER
    if not dst.is_dir():
        return [f"{dst}: missing"]
    if not marker.is_file():
        return [f"{dst}: no {MARKER} (a conversion that did not finish)"]
    try:
        files = json.loads(marker.read_text())["files"]
    except (json.JSONDecodeError, KeyError) as exc:
        return [f"{marker}: unreadable ({exc})"]
    return listed_file_problems(dst, files, MARKER)


def listed_file_problems(root: Path, files: dict[str, int], listing: str, hint: str = "") -> list[str]:
    """Each file of `files` ({path relative to `root`: size}, from the file `listing`) that is missing or
    of another size; `hint` follows a size mismatch. Serves universal folders and checkpoints alike."""
    out = []
    for rel, size in files.items():
        f = root / rel
        if not f.is_file():
            out.append(f"{f}: missing")
        elif f.stat().st_size != size:
            out.append(f"{f}: {f.stat().st_size} bytes, {listing} says {size}{hint}")
    return out


def ensure_universal(src: Path, dst: Path, settings: ConvertSettings) -> None:
    """Make `dst` the universal form of the DeepSpeed checkpoint folder `src` (every rank calls this).

    Rank 0 removes a stale temp folder, failure note or incomplete `dst`; after one short barrier it
    converts (unless `dst` is complete) while the other ranks poll for the marker, each bounded by
    `settings.timeout_s`. Raises RuntimeError on every rank when the conversion fails or times out.
    """
    rank = dist.get_rank()
    todo = False
    if rank == 0:
        todo = _prepare(dst)
    dist.barrier()
    if rank == 0:
        if todo:
            convert(src, dst, settings)
    else:
        _wait_for(dst, settings.timeout_s)


def _prepare(dst: Path) -> bool:
    """Rank 0, before the others wait: clear what an earlier attempt left; True when `dst` must be written."""
    failure_note(dst).unlink(missing_ok=True)
    stale = [temp_folder(dst), *dst.parent.glob(dst.name + ".tmp*")]  # ours, and the old `<dst>.tmp`
    for folder in stale:
        if folder.exists():
            _say(f"removing {folder}, left by a conversion that did not finish; converting again")
            shutil.rmtree(folder)
    if not dst.exists():
        return True
    bad = universal_problems(dst)
    if bad:
        _say(f"not loading {dst}: {'; '.join(bad)}; converting again")
        shutil.rmtree(dst)
    return bool(bad)


def convert(src: Path, dst: Path, settings: ConvertSettings) -> float:
    """Convert `src` into `dst` in a child process, publish it atomically, and return the seconds it took.

    On a failure or after `settings.timeout_s`, the child is killed, the failure note is written for the
    waiting ranks, and RuntimeError is raised.
    """
    tmp = temp_folder(dst)
    start = time.perf_counter()
    cmd = [sys.executable, "-m", "trainer.universal", str(src), str(tmp)]
    cmd += ["--workers", str(settings.workers), "--parent", str(os.getpid())]
    message = None
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=settings.timeout_s)
        if proc.returncode != 0:
            tail = (proc.stdout + proc.stderr)[-3000:]
            message = (
                f"converting {src} to DeepSpeed's universal format failed (exit {proc.returncode}):\n{tail}"
            )
    except subprocess.TimeoutExpired:
        message = (
            f"converting {src} to DeepSpeed's universal format took longer than ckpt.convert_timeout_s="
            f"{settings.timeout_s:g} s; raise it (or ckpt.convert_workers={settings.workers})"
        )
    if message is not None:
        shutil.rmtree(tmp, ignore_errors=True)
        _write_atomic(failure_note(dst), message)
        raise RuntimeError(message)
    seconds = time.perf_counter() - start
    files = {str(f.relative_to(tmp)): f.stat().st_size for f in sorted(tmp.rglob("*")) if f.is_file()}
    marker = {"source": src.name, "seconds": round(seconds, 3), "workers": settings.workers, "files": files}
    _write_atomic(tmp / MARKER, json.dumps(marker, indent=1))
    os.replace(tmp, dst)
    # ds_to_universal points `latest_universal` at the folder it wrote (our temp name): point it at dst
    _write_atomic(dst.parent / "latest_universal", dst.name)
    size = sum(files.values()) / 2**20
    text = (
        f"converted {src.parent.name}/{src.name} to DeepSpeed's universal format in {seconds:.2f} s "
        f"({settings.workers} workers, {len(files)} files, {size:.1f} MiB)"
    )
    _say(text)
    return seconds


def _wait_for(dst: Path, timeout_s: float) -> None:
    """A rank other than 0: poll until `dst` is published or rank 0's failure note appears, at most `timeout_s`."""
    start = time.monotonic()
    reported = start
    marker, note = dst / MARKER, failure_note(dst)
    while not marker.is_file():
        if note.is_file():
            raise RuntimeError(f"rank 0: {note.read_text()}")
        now = time.monotonic()
        if now - start > timeout_s:
            raise RuntimeError(
                f"waited {timeout_s:g} s (ckpt.convert_timeout_s) for rank 0 to convert {dst.parent.name}/"
                f"{dst.name} to DeepSpeed's universal format; {marker} never appeared"
            )
        if now - reported >= REPORT_EVERY_S:
            log.info("waiting %.0f s for rank 0 to write %s", now - start, dst)
            reported = now
        time.sleep(POLL_S)


def _say(text: str) -> None:
    """Print `text` on the job's output (rank 0's stdout, where benchmarks read the time); printed, not
    also logged, which showed it twice."""
    print(text, flush=True)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _die_with_parent() -> None:
    """Ask Linux to SIGKILL this process when the thread that started it ends (PR_SET_PDEATHSIG)."""
    with contextlib.suppress(OSError, AttributeError):  # not Linux: the job's cleanup (cgroup) remains
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG


def main(argv: list[str] | None = None) -> None:
    """The child process of :func:`convert`: DeepSpeed's ds_to_universal with `--workers` processes."""
    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("src")
    parser.add_argument("out")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument(
        "--parent", type=int, default=0, help="pid of the rank that waits (exit if it is gone)"
    )
    args = parser.parse_args(argv)
    _die_with_parent()
    os.register_at_fork(after_in_child=_die_with_parent)  # DeepSpeed's pool workers die with us
    if args.parent and os.getppid() != args.parent:
        sys.exit(f"rank process {args.parent} is gone; not converting")
    from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

    ds_to_universal(
        SimpleNamespace(
            input_folder=args.src,
            output_folder=args.out,
            num_extract_workers=args.workers,
            num_merge_workers=args.workers,
            keep_temp_folder=False,
            strict=True,
            inject_missing_state=False,
        )
    )


if __name__ == "__main__":
    main()
