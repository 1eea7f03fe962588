"""A shard must be whole (issue #15): a tar cut short or a sample missing a member is refused, naming the
shard, the sample and the member, by read_shard, the verifier and the training reader alike."""

from __future__ import annotations

import io

import numpy as np
import pytest

from data_prep.manifest import ShardSetError, load_manifest
from data_prep.reader import StreamReader, latent_decoder
from data_prep.shards import encode_npy, read_shard, write_shard
from tests.data_fixtures import cut_set, latent_set

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
