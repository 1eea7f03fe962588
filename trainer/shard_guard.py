"""A shard found bad while training stops every rank at the step that reads it (issue #17).

The reader hashes each shard as it streams it (data_prep/reader.py), so a shard changed after the start's
check (a start checks sizes only once the shard set is verified, trainer/preflight.py) raises
ShardSetError on the one rank that reads it. That rank must not go on to the step's collectives alone,
and the others must not wait for it until the collective time-out. So the loop reads each step's batch
one step ahead (:meth:`ShardGuard.fetch`, at the end of the step before) and puts "my read failed" into
the flags that step already agrees on (`trainer.common.agree`: one small all-reduce a step, not two);
:meth:`ShardGuard.take` then hands out the batch or, when any rank failed, raises the same ShardSetError
on every rank before the step is trained, naming the rank, the step and the shard (an all-gather only
on that path); the last checkpoint is untouched. The first batch is fetched and agreed on before the
first step. Rank 0 records the shard as bad in the run's verification
record, so the next start reads that shard again in full (and no other).

`data.bad_shards` mid-run: `error` stops and says to restore the shard; `skip` stops too, because leaving
a shard out changes the plan of every step (the order is a function of the remaining shards' counts):
the message says to start the run again, whose start re-checks the recorded shard and leaves it out.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch.distributed as dist

from data_prep.manifest import Manifest, ShardSetError, file_url
from data_prep.reader import Batch
from data_prep.verify import RECORD, VerifyRecord, read_record, write_record
from trainer.config import StreamConfig


class ShardGuard:
    """Reads each step's batch one step ahead; a bad shard on any rank stops every rank at that step."""

    def __init__(
        self, data: StreamConfig, manifest: Manifest, run_dir: Path, batches: Iterator[Batch]
    ) -> None:
        self.data, self.manifest, self.record_path = data, manifest, Path(run_dir) / RECORD
        self._batches = batches
        self._batch: Batch | None = None
        self._problem: tuple[str, str] | None = None

    def fetch(self) -> bool:
        """Read the next step's batch now; True when this rank's read failed (agree on it with the step's
        other flags, then call :meth:`take`)."""
        self._batch, self._problem = None, None
        try:
            self._batch = next(self._batches)
        except ShardSetError as exc:
            self._problem = self._shard_line(str(exc))
        return self._problem is not None

    def take(self, step: int, failed: bool) -> Batch:
        """The batch :meth:`fetch` read for `step`; `failed` is its flag agreed over the ranks, and when it
        is set every rank raises the same ShardSetError (a collective: every rank must call this)."""
        if not failed:
            assert self._batch is not None, "take() without a successful fetch()"
            return self._batch
        problems: list[tuple[str, str] | None] = [None] * dist.get_world_size()
        dist.all_gather_object(problems, self._problem)
        failed_ranks = [(r, p) for r, p in enumerate(problems) if p is not None]
        if dist.get_rank() == 0:
            self._record({name: line for _, (name, line) in failed_ranks if name})
        what = "\n  ".join(f"rank {r}: {line}" for r, (_, line) in failed_ranks)
        head = f"a bad shard stopped every rank at step {step}, before training it:\n  {what}\n"
        if self.data.bad_shards == "error":
            raise ShardSetError(
                head + "the last checkpoint is intact (data.bad_shards=error); restore the shard from its "
                "source (or rewrite the shard set) and start the run again, or set data.bad_shards=skip"
            )
        raise ShardSetError(
            head
            + "data.bad_shards=skip cannot leave a shard out mid-run (the order of every step depends on "
            f"the shards read); it is recorded in {self.record_path}: start the run again, and its start "
            "checks that shard again and leaves it out (the last checkpoint is intact)"
        )

    def _shard_line(self, message: str) -> tuple[str, str]:
        """(shard name, the reader's one-line message) from a ShardSetError, also one re-raised by a
        DataLoader worker (whose message holds the worker's traceback)."""
        for info in self.manifest.shards:
            url = file_url(self.data.shards, info.name)
            for line in message.splitlines():
                if f"shard {url}:" in line:
                    return info.name, line[line.index(f"shard {url}:") :]
        return "", message.strip().splitlines()[-1]

    def _record(self, bad: dict[str, str]) -> None:
        if not bad:
            return
        from data_prep.manifest import manifest_sha256

        digest = manifest_sha256(self.data.shards)
        record = read_record(self.record_path)
        if record is None or not record.matches(str(self.data.shards), digest):
            record = VerifyRecord(str(self.data.shards), digest)
        record.bad.update(bad)
        write_record(self.record_path, record)
