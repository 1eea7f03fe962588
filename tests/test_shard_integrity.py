"""A shard must be whole (issue #15): a tar cut short or a sample missing a member is refused, naming the
shard, the sample and the member, by read_shard, the verifier and the training reader alike."""

from __future__ import annotations

import io

import numpy as np
import pytest

from data_prep.manifest import ShardSetError, load_manifest
from data_prep.reader import StreamReader, latent_decoder
from data_prep.shards import encode_npy, read_shard, write_shard
from tests.data_fixtures import cut_set, gaussian_latent_set, latent_set
from tests.test_requeue_io import corrupt, measured

B, V, SEED = 12, 4, 5


@pytest.fixture(scope="module")
def shard_set(tmp_path_factory):
    folder = tmp_path_factory.mktemp("latents")
    latent_set(folder)
    return folder


def image_shard(path, n=3):
    """A real image shard of n PNG samples n0/k0 … (members cls, json, png, in webdataset's order)."""
    from data_prep.shards import encode_json
    from tests.data_fixtures import png_bytes

    rng = np.random.default_rng(0)
    rows = [
        {"__key__": f"n0/k{i}", "png": png_bytes(rng, (8, 8)), "cls": b"0", "json": encode_json({"i": i})}
        for i in range(n)
    ]
    return write_shard(path, rows)


def cut_before_last_member(path) -> int:
    """Cut the tar at `path` where its last member's header starts (a member boundary); the new size."""
    import tarfile

    with tarfile.open(path) as tf:
        last = tf.getmembers()[-1]
    assert last.name.endswith(".png")
    path.write_bytes(path.read_bytes()[: last.offset])
    return last.offset


def test_tar_cut_at_a_member_boundary_is_refused(tmp_path):
    """Issue #15: the cut shard read as 3 samples, the last without its png (KeyError: 'png' when decoded)."""
    path = tmp_path / "s.tar"
    image_shard(path)
    end = cut_before_last_member(path)
    with pytest.raises(ShardSetError) as err:
        read_shard(str(path), 3)
    assert str(err.value) == (
        f"shard {path}: cut short at byte {end}: it ends without the end-of-archive blocks (two 512-byte "
        "zero blocks), and its last sample n0/k2 lacks member(s) jpg or png; copy or write the shard again"
    )


def test_tar_cut_at_a_sample_boundary_or_in_its_end_blocks_is_refused(tmp_path):
    import tarfile

    path = tmp_path / "s.tar"
    image_shard(path)
    full = path.read_bytes()
    with tarfile.open(path) as tf:
        members = tf.getmembers()
    data_end = members[-1].offset_data + (members[-1].size + 511) // 512 * 512
    for end in (members[3].offset, data_end, data_end + 512):  # after sample 0; no end block; only one
        path.write_bytes(full[:end])
        with pytest.raises(ShardSetError) as err:
            read_shard(str(path))
        assert str(err.value) == (
            f"shard {path}: cut short at byte {end}: it ends without the end-of-archive blocks (two 512-byte "
            "zero blocks); copy or write the shard again"
        )
    path.write_bytes(full[: data_end + 1024])  # both end blocks (without tarfile's padding): complete
    assert [s["__key__"] for s in read_shard(str(path), 3)] == ["n0/k0", "n0/k1", "n0/k2"]


def test_sample_without_a_member_is_refused_in_a_well_ended_tar(tmp_path):
    """A tar re-terminated after losing a member (or written without it): the sample is named."""
    import tarfile

    def write(name, members):
        with tarfile.open(tmp_path / name, "w", format=tarfile.GNU_FORMAT) as tf:
            for member, data in members:
                info = tarfile.TarInfo(member)
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
        return tmp_path / name

    a = encode_npy(np.zeros((1, 1, 1), np.float32))
    lat = write("lat.tar", [("k0.cls", b"0"), ("k0.latent.npy", a), ("k0.latent_flip.npy", a),
                            ("k1.cls", b"1"), ("k1.latent.npy", a)])  # fmt: skip
    img = write("img.tar", [("n0/a.cls", b"0"), ("n0/a.json", b"{}"), ("n0/b.cls", b"0")])
    for path, key, missing, layout in [
        (lat, "k1", "latent_flip.npy", "a latent sample holds cls, latent.npy and latent_flip.npy"),
        (img, "n0/a", "jpg or png", "an image sample holds cls, json and jpg or png"),
    ]:
        with pytest.raises(ShardSetError) as err:
            read_shard(str(path))
        assert str(err.value) == (
            f"shard {path}: sample {key} lacks member(s) {missing} ({layout}); write the shard again"
        )


def test_cut_tar_is_refused_by_the_verifier_and_the_training_reader(shard_set, tmp_path):
    from data_prep.verify import verify_shards

    _, message = cut_set(shard_set, tmp_path / "set")
    m = load_manifest(tmp_path / "set")
    assert verify_shards(tmp_path / "set", m.shards) == [message]
    reader = StreamReader(tmp_path / "set", m, seed=SEED, global_batch=B, streams=V, rank=0, world_size=1,
                          decode=latent_decoder())  # fmt: skip
    with pytest.raises(ShardSetError) as err:
        for _ in reader.batches(0):
            pass
    assert str(err.value) == message


# ---------------------------------------------------- a full pass recorded beside the manifest (issue #17)


@pytest.fixture(scope="module")
def verified_source(tmp_path_factory):
    """12 shards of 8 latents (4, 32, 32) fp32 + flips, about 265 KB a shard (as tests/test_requeue_io.py)."""
    folder = tmp_path_factory.mktemp("big_latents")
    gaussian_latent_set(folder, shape=(4, 32, 32))
    return folder


def fresh_set(src, folder):
    """A copy of the shard set `src` (each test writes beside its own manifest); (folder, manifest, files)."""
    import shutil

    shutil.copytree(src, folder)
    m = load_manifest(folder)
    return folder, m, {p.name: p.read_bytes() for p in folder.iterdir()}


def inspect_verify(capsys, folder) -> tuple[int, str, str]:
    """`ldit inspect data FOLDER --verify --no-progress` in this process: (exit status, stdout, stderr)."""
    from slurm.inspect import main

    capsys.readouterr()
    code = main(["data", str(folder), "--verify", "--no-progress"])
    out, err = capsys.readouterr()
    return code, out, err


def start(folder, run, capsys, verify="sha256"):
    """A run's start on `folder` (open_training_shards, 1 rank): (bytes read from storage, its printed line)."""
    from trainer.config import StreamConfig
    from trainer.preflight import open_training_shards

    data = StreamConfig(shards=str(folder), verify=verify)
    capsys.readouterr()
    _, read, _ = measured(folder, lambda: open_training_shards(data, "latents", run))
    (line,) = [x for x in capsys.readouterr().out.splitlines() if x.startswith("verified ")]
    return read, line


def test_inspect_verify_records_the_set_and_a_new_run_reads_no_shard(verified_source, tmp_path, world_of_one,
                                                                     capsys):  # fmt: skip
    """`inspect data --verify` records its good pass beside the manifest; a new run's first start (and its
    requeue) then checks sizes only, naming that record, and reads no shard before step 0."""
    from data_prep.manifest import manifest_sha256
    from data_prep.verify import RECORD, VerifyRecord, read_record

    folder, m, files = fresh_set(verified_source, tmp_path / "set")
    path = folder / RECORD
    code, out, err = inspect_verify(capsys, folder)
    assert code == 0 and out.splitlines()[-1] == "verify: all 12 shards verified (size, sha256, sample count)"
    assert err == f"verify: recorded in {path}: a run's start on this manifest checks shard sizes only\n"
    assert read_record(path) == VerifyRecord(str(folder.resolve()), manifest_sha256(folder), full_pass=True)
    left = {p.name: p.read_bytes() for p in folder.iterdir() if p.name != RECORD}
    assert left == files  # the manifest and the shards as they were, and no temp file left

    smallest = min(s.bytes for s in m.shards)
    for run in ("new-run", "new-run", "other-run"):  # a first start, its requeue, another run's first start
        read, line = start(folder, tmp_path / run, capsys)
        print(f"{run}: {read} bytes read before step 0")
        assert read < smallest // 4  # no shard read (not even a quarter of the smallest one)
        assert line.startswith(f"verified 12 shards of {folder} (data.verify=sha256, 1 rank(s)) in ")
        assert line.endswith(f" s: 0 bad; sizes only: a full pass is recorded in {path}")
        assert not read_record(tmp_path / run / RECORD).full_pass  # the run's record: only what it found


def test_a_shard_the_run_recorded_bad_is_read_again_on_a_verified_set(verified_source, tmp_path, world_of_one,
                                                                       capsys):  # fmt: skip
    """The run's own record of a bad shard wins over the set's record of a good pass: that shard, and no
    other, is read again in full."""
    from data_prep.manifest import manifest_sha256
    from data_prep.verify import RECORD, VerifyRecord, write_record

    folder, m, _ = fresh_set(verified_source, tmp_path / "set")
    assert inspect_verify(capsys, folder)[0] == 0
    name = m.shards[3].name
    bad = VerifyRecord(str(folder), manifest_sha256(folder), bad={name: f"shard {folder / name}: sha256 …"})
    write_record(tmp_path / "run" / RECORD, bad)  # as trainer/shard_guard.py records one the stream found
    read, line = start(folder, tmp_path / "run", capsys)
    assert m.shards[3].bytes <= read < m.shards[3].bytes + min(s.bytes for s in m.shards) // 4
    assert line.endswith(f"0 bad; sizes only: a full pass is recorded in {folder / RECORD}; 1 shard(s) "
                         "recorded bad read again")  # fmt: skip


@pytest.mark.parametrize("how", ["record path is a directory", "remote set"])
def test_inspect_verify_that_cannot_record_says_what_it_costs(verified_source, tmp_path, capsys, how):
    """Nothing is recorded where the folder cannot take the record, nothing else is touched, and the
    output says so and what it costs. A read-only folder takes the same path (an OSError from the write),
    but root ignores chmod and CI runs as root: a directory in the record's place makes the rename fail
    for root too."""
    import os

    from data_prep.verify import RECORD

    folder, m, files = fresh_set(verified_source, tmp_path / "set")
    path = folder / RECORD
    target = str(folder)
    if how == "record path is a directory":
        path.mkdir()
        why = "Is a directory"
    else:
        target = f"pipe:cat {folder}/{{}}"
    code, out, err = inspect_verify(capsys, target)
    assert code == 0 and out.splitlines()[-1] == "verify: all 12 shards verified (size, sha256, sample count)"
    if how == "remote set":
        assert err == (
            f"verify: not recorded: {target} is remote, so there is no folder to record the pass in; each "
            "run's first start reads (streams) every shard in full again\n"
        )
    else:
        assert err == (
            f"verify: could not record the pass in {path} ({why}): each run's first start reads every shard "
            "in full again (a requeue of a run checks sizes only)\n"
        )
    left = {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}
    assert left == files  # the manifest and the shards as they were, and no temp file
    assert not os.path.isfile(path)


def test_a_record_beside_another_manifest_or_a_copy_is_ignored(verified_source, tmp_path, world_of_one,
                                                               capsys):  # fmt: skip
    """A record beside the manifest is of that manifest (sha256) in that folder: after the set is rewritten,
    or in a copy of the folder, a start reads every shard once and says why the record was ignored."""
    import json
    import shutil

    from data_prep.verify import RECORD

    folder, m, _ = fresh_set(verified_source, tmp_path / "set")
    total = sum(s.bytes for s in m.shards)
    assert inspect_verify(capsys, folder)[0] == 0 and (folder / RECORD).is_file()
    copy = tmp_path / "copy"
    shutil.copytree(folder, copy)  # the record travels with the folder, but names the original

    raw = json.loads((folder / "manifest.json").read_text())
    raw["producer"] = {"job": "rewritten"}
    (folder / "manifest.json").write_text(json.dumps(raw))
    read, line = start(folder, tmp_path / "run", capsys)
    assert read >= total  # every shard read once
    assert line.endswith(f"0 bad; every shard read once (size, sha256, samples); {folder / RECORD} records "
                         "another manifest (the set was rewritten): ignored")  # fmt: skip

    read, line = start(copy, tmp_path / "run-on-copy", capsys)
    assert read >= total
    assert line.endswith(f"0 bad; every shard read once (size, sha256, samples); {copy / RECORD} was written "
                         f"for {folder.resolve()} (this is a copy?): ignored")  # fmt: skip


def test_a_pass_that_finds_a_bad_shard_removes_the_record_of_a_good_one(verified_source, tmp_path, capsys):
    """A record of a good pass that no longer holds is removed (a start then reads every shard once and
    finds the bad one), and a bad pass records nothing."""
    from data_prep.verify import RECORD

    folder, m, _ = fresh_set(verified_source, tmp_path / "set")
    assert inspect_verify(capsys, folder)[0] == 0 and (folder / RECORD).is_file()
    corrupt(folder / m.shards[5].name)  # same size: a sizes-only start would not see it
    code, out, err = inspect_verify(capsys, folder)
    assert code == 1 and "verify: 1 of 12 shards do not match the manifest:" in out
    assert err == f"verify: removed {folder / RECORD}: its record of a good full pass no longer holds\n"
    assert not (folder / RECORD).exists()
    code, _, err = inspect_verify(capsys, folder)
    assert code == 1 and err == "" and not (folder / RECORD).exists()
