"""What the sub-commands of `ldit inspect` share (slurm/inspect.py): exit codes, the error of a missing input,
byte sizes, flattened config dicts, a shard set named on the command line, a training config."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

EXIT_OK, EXIT_PROBLEM, EXIT_USAGE = 0, 1, 2


class InspectError(Exception):
    """What was asked for is not there (no checkpoint, not a run directory); the message says what."""


def size_text(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} → {"a.b": 1}; tuples become lists (as in JSON)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out |= flatten(v, f"{prefix}{k}.")
        else:
            out[f"{prefix}{k}"] = list(v) if isinstance(v, tuple) else v
    return out


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def shard_set_location(location: str) -> str | Path:
    """A shard set named on the command line: a local folder, or a URL / `pipe:` template kept as written."""
    from data_prep.manifest import is_remote

    return location if is_remote(location) else Path(location)


def train_config(files: Sequence[str], overrides: Sequence[str]) -> Any:
    """A `ldit train` config loaded with the project's loader (the schema chosen by its `kind`)."""
    from slurm.jobs import JOBS

    return JOBS["train"].load(files, overrides)
