"""The stream reader's invariants (DESIGN.md "The stream reader"), with real processes and workers."""

from __future__ import annotations

import shutil
import sys
from collections import Counter

import numpy as np
import pytest
import torch

from data_prep.manifest import ShardSetError, load_manifest
from data_prep.reader import StreamPlan, StreamReader, latent_decoder, normalize_latents, open_shard_set
from data_prep.shards import encode_npy, read_shard, write_shard
from slurm.cli import run_local
from tests.conftest import WORKERS, clean_env, read_ranks
from tests.data_fixtures import latent_set

B, V, SEED, STEPS = 12, 4, 5, 14  # 14 steps × 12 = 168 samples: past the first epoch (79 samples) twice


@pytest.fixture(scope="module")
def shard_set(tmp_path_factory):
    folder = tmp_path_factory.mktemp("latents")
    latent_set(folder)
    return folder


def baseline(folder, start=0, steps=STEPS):
    """World size 1, no workers, in this process: {step: sorted keys}."""
    m = load_manifest(folder)
    reader = StreamReader(
        folder, m, seed=SEED, global_batch=B, streams=V, rank=0, world_size=1, decode=latent_decoder()
    )
    out = {}
    for batch in reader.batches(start):
        out[batch.step] = sorted(batch.keys)
        if len(out) == steps:
            return out


def run_world(folder, out, world, workers, start=0, steps=STEPS, monkeypatch=None):
    out.mkdir()
    cmd = [
        sys.executable,
        str(WORKERS / "reader_keys.py"),
        str(folder),
        str(out),
        str(start),
        str(steps),
        str(workers),
        str(B),
        str(V),
    ]
    for k, v in clean_env().items():
        monkeypatch.setenv(k, v)
    assert run_local(cmd, world) == 0
    ranks = read_ranks(out, world)
    assert len({len(r) for r in ranks}) == 1, "every rank got the same number of batches"
    assert {r[str(start)]["size"] for r in ranks} == {B // world}
    return {int(k): sorted(key for r in ranks for key in r[k]["keys"]) for k in ranks[0]}


def test_global_batches_do_not_depend_on_world_size_or_workers(shard_set, tmp_path, monkeypatch):
    ref = baseline(shard_set)
    assert all(len(keys) == B for keys in ref.values())
    for world, workers in [(2, 2), (4, 1), (1, 2)]:
        got = run_world(shard_set, tmp_path / f"w{world}-{workers}", world, workers, monkeypatch=monkeypatch)
        assert got == ref, f"world {world}, workers {workers}"


def test_resume_at_another_world_size_continues_exactly(shard_set, tmp_path, monkeypatch):
    ref = baseline(shard_set)
    got = run_world(shard_set, tmp_path / "resume", 2, 0, start=9, steps=5, monkeypatch=monkeypatch)
    assert got == {k: ref[k] for k in range(9, 14)}


def test_each_sample_once_per_epoch_of_its_stream(shard_set):
    m = load_manifest(shard_set)
    plan = StreamPlan(m.counts, SEED, B, V)
    for v in range(V):
        for epoch in range(3):
            length = plan.epoch_length(v, epoch)
            start = sum(plan.epoch_length(v, e) for e in range(epoch))
            it = plan.stream(v, 0)
            refs = [next(it) for _ in range(start + length)][start:]
            assert {r.epoch for r in refs} == {epoch}
            expected = {(int(s), i) for s in plan.stream_shards(v, epoch) for i in range(m.counts[s])}
            assert [(r.shard, r.index) for r in refs] != sorted(expected)  # shuffled inside shards …
            assert Counter((r.shard, r.index) for r in refs) == Counter(expected)  # … each exactly once
    # every shard belongs to exactly one stream in each epoch
    for epoch in range(3):
        dealt = sorted(int(s) for v in range(V) for s in plan.stream_shards(v, epoch))
        assert dealt == list(range(len(m.counts)))


def test_reader_output_holds_each_sample_once_per_stream_epoch(shard_set):
    """What the reader actually returns (not only the plan): stream v's part of each batch, read through the
    first epoch of every stream, holds exactly the samples of the shards dealt to v, each once."""
    m = load_manifest(shard_set)
    plan = StreamPlan(m.counts, SEED, B, V)
    b = plan.per_stream
    lengths = [plan.epoch_length(v, 0) for v in range(V)]
    reader = StreamReader(
        shard_set, m, seed=SEED, global_batch=B, streams=V, rank=0, world_size=1, decode=latent_decoder()
    )
    per_stream: list[list[str]] = [[] for _ in range(V)]
    for batch in reader.batches(0):
        for v in range(V):
            per_stream[v] += batch.keys[v * b : (v + 1) * b]
        if min(len(k) for k in per_stream) >= max(lengths):
            break
    keys_of_shard = {
        i: [s["__key__"] for s in read_shard(str(shard_set / sh.name))] for i, sh in enumerate(m.shards)
    }
    first_epoch = []
    for v in range(V):
        expected = [k for s in plan.stream_shards(v, 0) for k in keys_of_shard[int(s)]]
        got = per_stream[v][: lengths[v]]
        assert sorted(got) == sorted(expected) and len(set(got)) == len(got) == lengths[v]
        first_epoch += got
    assert sorted(first_epoch) == sorted(k for keys in keys_of_shard.values() for k in keys)  # all, once


def test_seek_equals_reading_from_the_start(shard_set):
    m = load_manifest(shard_set)
    plan = StreamPlan(m.counts, SEED, B, V)
    for v in range(V):
        it = plan.stream(v, 0)
        full = [next(it) for _ in range(40 * plan.per_stream)]
        for k in (1, 7, 13, 26, 39):
            it = plan.stream(v, k)
            assert [next(it) for _ in range(plan.per_stream)] == full[
                k * plan.per_stream : (k + 1) * plan.per_stream
            ]


def test_flip_choice_and_normalisation(shard_set):
    m = load_manifest(shard_set)
    mean, std = (1.0, 2.0, 3.0, 4.0), (2.0, 2.0, 2.0, 2.0)

    def first_steps(workers):
        reader = StreamReader(
            shard_set,
            m,
            seed=SEED,
            global_batch=B,
            streams=V,
            rank=0,
            world_size=1,
            decode=latent_decoder(),
            workers=workers,
        )
        it = reader.batches(0)
        return [next(it) for _ in range(STEPS)]

    flips = 0
    batches = first_steps(0)
    for batch in batches:
        assert batch.x.dtype == torch.float32  # the stored dtype
        normed = normalize_latents(batch.x, mean, std)
        raw = normed * torch.tensor(std).view(1, -1, 1, 1) + torch.tensor(mean).view(1, -1, 1, 1)
        assert torch.equal(normed[:, 1], (batch.x[:, 1] - 2.0) / 2.0)
        for key, x, y in zip(batch.keys, raw, batch.y):
            n = int(key[1:])
            assert y == n % 3 and x[1, 0, 0] == n and x.dtype == torch.float32
            flipped = x[0, 0, 1].item() == -n  # the marked corner moved
            assert flipped or x[0, 0, 0].item() == -n
            flips += flipped
    assert 0.3 < flips / (B * STEPS) < 0.7
    # the choice is a function of (seed, epoch, shard, sample): workers do not change it
    assert all(torch.equal(a.x, b.x) for a, b in zip(batches, first_steps(2)))


def test_bad_shard_sets_fail_before_reading(shard_set, tmp_path):
    folder = tmp_path / "copy"
    shutil.copytree(shard_set, folder)
    m = load_manifest(folder)
    assert open_shard_set(folder, "latents", hashes=True).total == m.total
    with pytest.raises(ShardSetError, match=f"{folder} holds latents, but this job reads images"):
        open_shard_set(folder, "images")
    # same size, other bytes: only the sha256 check sees it
    victim = folder / m.shards[3].name
    data = bytearray(victim.read_bytes())
    data[1000] ^= 0xFF
    victim.write_bytes(bytes(data))
    open_shard_set(folder, "latents")  # sizes agree
    with pytest.raises(
        ShardSetError, match=rf"shard {victim}: sha256 .*manifest says .*\(contents changed\)"
    ):
        open_shard_set(folder, "latents", hashes=True)
    (folder / m.shards[5].name).write_bytes(b"short")
    (folder / m.shards[7].name).unlink()
    with pytest.raises(ShardSetError) as err:
        open_shard_set(folder, "latents")
    msg = str(err.value)
    assert msg.startswith(f"2 shard(s) of {folder} do not match the manifest:")
    assert f"shard {folder / m.shards[5].name}: size 5 bytes, manifest says {m.shards[5].bytes}" in msg
    assert f"shard {folder / m.shards[7].name}: missing" in msg
    with pytest.raises(ShardSetError, match=f"{tmp_path}: no manifest.json"):
        open_shard_set(tmp_path, "latents")


def test_count_mismatch_and_pickles_are_refused(tmp_path):
    a = encode_npy(np.zeros((1, 1, 1), np.float32))
    info = write_shard(
        tmp_path / "s.tar",
        [{"__key__": f"k{i}", "latent.npy": a, "latent_flip.npy": a, "cls": b"0"} for i in range(3)],
    )
    with pytest.raises(ShardSetError, match=f"shard {tmp_path / 's.tar'}: holds 3 samples, manifest says 4"):
        read_shard(str(tmp_path / "s.tar"), 4)
    import io
    import tarfile

    with tarfile.open(tmp_path / "evil.tar", "w") as tf:
        payload = b"\x80\x04K\x01."
        ti = tarfile.TarInfo("k0.pickle")
        ti.size = len(payload)
        tf.addfile(ti, io.BytesIO(payload))
    with pytest.raises(
        ShardSetError,
        match=r"sample k0 has member\(s\) \['pickle'\]; the reader only decodes .* and never unpickles",
    ):
        read_shard(str(tmp_path / "evil.tar"))
    assert info.count == 3


def test_plan_rejects_impossible_settings():
    with pytest.raises(ShardSetError, match="streams=5 must divide the global batch 12"):
        StreamPlan((3,) * 8, 0, 12, 5)
    with pytest.raises(ShardSetError, match="the shard set has 3 shards, fewer than the 4 streams"):
        StreamPlan((3,) * 3, 0, 12, 4)
    with pytest.raises(ShardSetError, match="world size 3 must divide the stream count 4"):
        StreamPlan((3,) * 8, 0, 12, 4).rank_streams(0, 3)
    with pytest.raises(ShardSetError) as err:  # issue #15: it blamed the streams
        StreamPlan((), 0, 12, 4)
    assert (
        str(err.value)
        == "the shard set holds 0 samples (0 shards in its manifest): nothing can be read from it"
    )


# --------------------------------------------------------------------------------------- remote shard sets


def test_pipe_and_file_url_shard_sets_read_like_the_folder(shard_set):
    """A shard set given as `pipe:cat FOLDER/{}` or `file://FOLDER`: the same manifest, the same batches."""
    from data_prep.manifest import file_url

    pipe, url = f"pipe:cat {shard_set}/{{}}", f"file://{shard_set}"
    assert file_url(pipe, "shard-000003.tar") == f"pipe:cat {shard_set}/shard-000003.tar"
    assert file_url(url, "manifest.json") == f"file://{shard_set}/manifest.json"
    assert file_url("https://host/set/", "shard-000003.tar") == "https://host/set/shard-000003.tar"
    local = load_manifest(shard_set)
    assert load_manifest(pipe, "latents") == load_manifest(url, "latents") == local
    want = baseline(shard_set, steps=6)
    assert baseline(pipe, steps=6) == baseline(url, steps=6) == want

    def first_x(where):
        reader = StreamReader(where, local, seed=SEED, global_batch=B, streams=V, rank=0, world_size=1,
                              decode=latent_decoder())  # fmt: skip
        return next(iter(reader.batches(3))).x

    assert torch.equal(first_x(pipe), first_x(shard_set))


@pytest.mark.parametrize(
    "name", ["x.tar;touch $LDIT_MARKER", "$(touch $LDIT_MARKER).tar", "../x.tar", "sub/x.tar", ".."]
)
def test_shard_name_that_is_not_a_plain_file_name_is_refused_before_any_shell(
    shard_set, tmp_path, monkeypatch, name
):
    import contextlib
    import json

    import webdataset as wds

    marker = tmp_path / "MARKER"
    monkeypatch.setenv("LDIT_MARKER", str(marker))
    folder = tmp_path / "set"
    shutil.copytree(shard_set, folder)
    raw = json.loads((folder / "manifest.json").read_text())
    raw["shards"][3]["name"] = name
    (folder / "manifest.json").write_text(json.dumps(raw))
    for where, manifest in [
        (f"pipe:cat {folder}/{{}}", f"pipe:cat {folder}/manifest.json"),
        (str(folder), str(folder / "manifest.json")),
    ]:
        with pytest.raises(ShardSetError) as err:
            load_manifest(where)
        assert str(err.value) == (
            f"{manifest}: shard name {name!r} is not a plain file name (only letters, digits, '.', '_' and "
            "'-'; no path separator, no '..', no shell character): refusing to open it"
        )
    assert not marker.exists()
    if "touch" in name:  # what the check prevents: the same name in the pipe runs the shell's command
        with contextlib.suppress(OSError), wds.gopen(f"pipe:cat {folder}/{name}") as stream:
            stream.read()  # (cat itself may fail: the shell has run the command all the same)
        assert marker.exists()


def test_remote_set_errors_name_the_url(shard_set, tmp_path):
    with pytest.raises(ShardSetError) as err:
        load_manifest(f"pipe:cat {shard_set}")
    assert str(err.value) == (
        f"pipe:cat {shard_set}: a pipe: shard set names its files with {{}}, which is replaced by manifest.json "
        "and by each shard's name (e.g. pipe:aws s3 cp s3://bucket/set/{} -)"
    )
    with pytest.raises(ShardSetError) as err:
        load_manifest(f"pipe:cat {tmp_path}/{{}}")
    assert str(err.value).startswith(
        f"pipe:cat {tmp_path}/{{}}: cannot read manifest.json through pipe:cat {tmp_path}/manifest.json ("
    )


def test_remote_shards_are_verified_while_streamed(shard_set, tmp_path):
    """`verify_shards` and the reader hash a remote shard as they read it: a same-size change is named."""
    from data_prep.manifest import sha256_file
    from data_prep.verify import verify_shards

    folder = tmp_path / "set"
    shutil.copytree(shard_set, folder)
    m = load_manifest(folder)
    s2 = folder / m.shards[2].name
    data = bytearray(s2.read_bytes())
    data[data.index(b"\x93NUMPY") + 130] ^= 0x01  # one latent value: same size, still a tar
    s2.write_bytes(bytes(data))
    (folder / m.shards[7].name).unlink()
    pipe = f"pipe:cat {folder}/{{}}"
    url2, url7 = f"pipe:cat {s2}", f"pipe:cat {folder / m.shards[7].name}"
    sha = f"sha256 {sha256_file(s2)[:16]}…, manifest says {m.shards[2].sha256[:16]}… (contents changed)"
    problems = verify_shards(pipe, m.shards)
    assert len(problems) == 2
    assert problems[0] == f"shard {url2}: {sha}"
    assert problems[1].startswith(f"shard {url7}: cannot be read (")
    reader = StreamReader(pipe, load_manifest(pipe), seed=SEED, global_batch=B, streams=V, rank=0,
                          world_size=1, decode=latent_decoder())  # fmt: skip
    with pytest.raises(ShardSetError) as err:
        for _ in reader.batches(0):
            pass
    msg = str(err.value)  # whichever of the two bad shards the stream reaches first
    assert msg == f"shard {url2}: {sha}" or msg.startswith(f"shard {url7}: cannot be read ("), msg
