"""Waiting for other ranks' shards by polling files, bounded by progress rather than by total time.

A data job's ranks finish their shards at different times: a rerun after a partial run leaves some ranks
little to do, and over 1.28 M images a slower node can lag by more than any fixed bound. Such a wait is
legitimately long, so it is not a collective (which `collective_timeout_s` bounds): the waiting rank
polls for the per-shard files the others write when a shard is finished, logs its progress, and fails
only when *no* shard was finished for `stall_s` seconds (a rank that died or hangs), naming the shards
still missing and their ranks.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

log = logging.getLogger(__name__)

POLL_S = 0.5
REPORT_EVERY_S = 60.0


class StalledError(RuntimeError):
    """No awaited file appeared for the stall bound."""


def wait_for_files(files: dict[Path, str], stall_s: float, what: str, poll_s: float = POLL_S) -> float:
    """Poll until every path of `files` exists; returns the seconds waited.

    `files` maps each path to how the error names it (e.g. "shard-000003.tar (rank 1)"). Raises
    StalledError when none of the missing paths appeared for `stall_s` seconds.
    """
    start = time.monotonic()
    last_progress = reported = start
    missing = [p for p in files if not p.exists()]
    while missing:
        time.sleep(poll_s)
        now = time.monotonic()
        still = [p for p in missing if not p.exists()]
        if len(still) < len(missing):
            last_progress = now
        missing = still
        if missing and now - last_progress > stall_s:
            names = ", ".join(files[p] for p in missing[:5]) + (
                f" and {len(missing) - 5} more" if len(missing) > 5 else ""
            )
            raise StalledError(
                f"waited {now - start:.0f} s for {what}; none was finished in the last {stall_s:g} s "
                f"(collective_timeout_s): {len(missing)} of {len(files)} missing: {names}"
            )
        if missing and now - reported >= REPORT_EVERY_S:
            log.warning("waiting for %s: %d of %d finished", what, len(files) - len(missing), len(files))
            print(f"waiting for {what}: {len(files) - len(missing)} of {len(files)} finished", flush=True)
            reported = now
    return time.monotonic() - start
