"""What a start and a requeue read (issue #17): shard verification recorded once, shards hashed as streamed,
a shard changed after verification named at the step that reads it, on every rank.

Bytes read are measured, not assumed: the shard files are evicted from the page cache
(posix_fadvise DONTNEED after fsync) and the kernel's count of bytes this process fetched from storage
(`read_bytes` of /proc/self/io, which counts mapped pages faulted in as well as read() calls) is taken
before and after.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pytest

from data_prep.manifest import ShardSetError, load_manifest
from data_prep.reader import StreamPlan, StreamReader, latent_decoder
from data_prep.verify import RECORD, read_record
from tests.data_fixtures import gaussian_latent_set
from tests.test_faults import cmd, rank_output, start_ranks
from tests.test_train_dit import log, train
from trainer.config import StreamConfig
from trainer.preflight import open_training_shards


def read_bytes() -> int:
    """Bytes this process has fetched from storage so far (page-cache hits do not count)."""
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("read_bytes:"):
            return int(line.split()[1])
    raise AssertionError("no read_bytes in /proc/self/io")


def evict(folder: Path) -> None:
    """Drop the shard files of `folder` from the page cache, so the next read of them reaches storage."""
    for f in folder.glob("*.tar"):
        fd = os.open(f, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def measured(folder: Path, fn):
    """(result of fn(), bytes read from storage, seconds), with `folder`'s shards evicted first."""
    evict(folder)
    before, t0 = read_bytes(), time.perf_counter()
    out = fn()
    return out, read_bytes() - before, time.perf_counter() - t0


def corrupt(path: Path, at: int = 700) -> None:
    """Flip one byte inside the first member's data: same size, the tar still parses, the sha256 changes."""
    data = bytearray(path.read_bytes())
    data[at] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.fixture(scope="module")
def big_latents(tmp_path_factory) -> Path:
    """12 shards of 8 latents (4, 32, 32) fp32 + flips: about 265 KB a shard, 3.2 MB in all."""
    folder = tmp_path_factory.mktemp("big_latents")
    gaussian_latent_set(folder, shape=(4, 32, 32))
    return folder


def test_requeue_on_a_verified_set_reads_no_shard(big_latents, tmp_path, world_of_one, capsys):
    m = load_manifest(big_latents)
    total, smallest = sum(s.bytes for s in m.shards), min(s.bytes for s in m.shards)
    run = tmp_path / "run"
    data = StreamConfig(shards=str(big_latents), verify="sha256")

    _, first, t_first = measured(big_latents, lambda: open_training_shards(data, "latents", run))
    record = read_record(run / RECORD)
    assert record is not None and record.full_pass and record.bad == {}
    _, again, t_again = measured(big_latents, lambda: open_training_shards(data, "latents", run))
    out = capsys.readouterr().out
    print(f"first start: {first} bytes read in {t_first:.3f} s; requeue: {again} bytes in {t_again:.3f} s; set {total} bytes")  # fmt: skip
    assert first >= total  # every shard read once at the first start
    assert again < smallest // 4  # no shard read (not even a quarter of the smallest one)
    assert (
        "(data.verify=sha256, 1 rank(s)) in 0.0 s: 0 bad; every shard read once (size, sha256, samples)"
        in out
    )
    assert (
        "(data.verify=sha256, 1 rank(s)) in 0.0 s: 0 bad; sizes only (a full pass is recorded for this manifest)"
        in out
    )

    # the stream then reads each shard once: hashing a mapped shard costs no second read from storage
    reader = StreamReader(big_latents, m, seed=0, global_batch=16, streams=4, rank=0, world_size=1,
                          decode=latent_decoder())  # fmt: skip
    batches = reader.batches(0)
    _, streamed, t_stream = measured(
        big_latents, lambda: [next(batches) for _ in range(6)]
    )  # 6 steps: 12 shards
    print(f"stream over all 12 shards, hashing each: {streamed} bytes read in {t_stream:.3f} s")
    assert total <= streamed < 1.25 * total

    # data.verify=size never reads a shard at a start, and records no full pass
    other = tmp_path / "size-run"
    size = StreamConfig(shards=str(big_latents), verify="size")
    _, sized, _ = measured(big_latents, lambda: open_training_shards(size, "latents", other))
    assert sized < smallest // 4 and not read_record(other / RECORD).full_pass


def test_a_changed_manifest_is_verified_again(big_latents, tmp_path, world_of_one):
    """The record is keyed by the manifest's sha256: a rewritten shard set gets a full pass again."""
    folder = tmp_path / "set"
    shutil.copytree(big_latents, folder)
    run, data = tmp_path / "run", StreamConfig(shards=str(folder))
    open_training_shards(data, "latents", run)
    raw = json.loads((folder / "manifest.json").read_text())
    raw["producer"] = {"job": "rewritten"}
    (folder / "manifest.json").write_text(json.dumps(raw))
    _, again, _ = measured(folder, lambda: open_training_shards(data, "latents", run))
    assert again >= sum(s.bytes for s in load_manifest(folder).shards)


def test_skip_mid_run_stops_and_the_restart_leaves_the_shard_out(big_latents, tmp_path, world_of_one):
    """bad_shards=skip: a shard found bad by the stream stops the run (the order cannot change mid-run), is
    recorded, and the restart reads that one shard again in full and leaves it out."""
    from trainer.shard_guard import ShardGuard

    folder, run = tmp_path / "set", tmp_path / "run"
    shutil.copytree(big_latents, folder)
    data = StreamConfig(shards=str(folder), bad_shards="skip", global_batch=16, streams=4)
    m = open_training_shards(data, "latents", run)
    plan = StreamPlan(m.counts, 0, 16, 4)
    victim = int(plan.stream_shards(2, 0)[1])  # stream 2 reads it at steps 2 and 3
    assert {ref.shard for _, ref in plan.batch_refs(2, [2])} == {victim}
    corrupt(folder / m.shards[victim].name)
    reader = StreamReader(folder, m, seed=0, global_batch=16, streams=4, rank=0, world_size=1,
                          decode=latent_decoder())  # fmt: skip
    guard = ShardGuard(data, m, run, reader.batches(0))
    assert [guard.take(s, guard.fetch()).step for s in (0, 1)] == [
        0,
        1,
    ]  # one rank: its flag is the agreed one
    assert guard.fetch()  # step 2's read fails
    with pytest.raises(ShardSetError) as err:
        guard.take(2, True)
    msg = str(err.value)
    where = folder / m.shards[victim].name
    assert msg.startswith(
        f"a bad shard stopped every rank at step 2, before training it:\n  rank 0: shard {where}: sha256 "
    )
    assert "(contents changed)" in msg and f"it is recorded in {run / RECORD}: start the run again" in msg
    assert list(read_record(run / RECORD).bad) == [m.shards[victim].name]

    reduced, restart, _ = measured(folder, lambda: open_training_shards(data, "latents", run))
    assert [s.name for s in reduced.shards] == [s.name for i, s in enumerate(m.shards) if i != victim]
    assert m.shards[victim].bytes <= restart < m.shards[victim].bytes + min(s.bytes for s in m.shards) // 4


@pytest.mark.slow
def test_changed_shard_stops_every_rank_at_the_step_that_reads_it(tmp_path):
    """2 ranks: a verified set, a checkpoint at step 2; a shard that only rank 1 reads at step 4 changes
    (same size). The requeue starts (sizes only), trains steps 2 and 3, saves step 4, and both ranks stop
    at step 4 naming the shard; checkpoint step 4 is complete and `latest`."""
    from trainer.checkpoint import problems

    folder = tmp_path / "set"
    gaussian_latent_set(folder)
    train(folder, tmp_path, "run", "steps=2", "ckpt.every=2")
    assert read_record(tmp_path / "run" / RECORD).full_pass
    m = load_manifest(folder)
    plan = StreamPlan(m.counts, 0, 16, 4)
    victim = int(plan.stream_shards(1, 0)[2])  # stream 1 (rank 1 of 2) reads it at steps 4 and 5
    assert all(ref.shard == victim for _, ref in plan.batch_refs(4, [1]))
    assert all(ref.shard != victim for s in (2, 3) for _, ref in plan.batch_refs(s))
    corrupt(folder / m.shards[victim].name)

    out = tmp_path / "out"
    ranks = start_ranks(cmd(folder, tmp_path, "run", "steps=8", "ckpt.every=2"), out)
    for p in ranks:
        p.wait(timeout=300)
    where = folder / m.shards[victim].name
    for r, p in enumerate(ranks):
        text = rank_output(out, r)
        assert p.returncode == 1, text[-3000:]
        assert (
            "ldit train: error: a bad shard stopped every rank at step 4, before "
            f"training it:\n  rank 1: shard {where}: sha256 "
        ) in text, text[-3000:]
        assert "the last checkpoint is intact (data.bad_shards=error)" in text
    assert "0 bad; sizes only (a full pass is recorded for this manifest)" in rank_output(
        out, 0
    )  # no shard read
    ckpts = tmp_path / "run" / "checkpoints"
    assert (ckpts / "latest").read_text().strip() == "step-00000004"
    assert problems(ckpts / "step-00000004") == [] and not (ckpts / "step-00000006").exists()
    assert [e["step"] for e in log(tmp_path, "run")] == [1, 2, 3, 4]
    assert list(read_record(tmp_path / "run" / RECORD).bad) == [m.shards[victim].name]
