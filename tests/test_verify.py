"""data_prep/verify.py: each way a shard can disagree with its manifest is found and named."""

from __future__ import annotations

import dataclasses

import numpy as np

from data_prep.manifest import load_manifest, sha256_file
from data_prep.shards import encode_npy, write_shard
from data_prep.verify import verify_shard, verify_shards
from tests.data_fixtures import latent_set


def test_intact_set_verifies(tmp_path):
    m = latent_set(tmp_path)
    assert verify_shards(tmp_path, m.shards, threads=2, progress=True) == []
    assert verify_shard(tmp_path, m.shards[0]) is None


def test_each_failed_check_is_named(tmp_path):
    m = latent_set(tmp_path)  # shard 1 holds 5 samples, shard 2 holds 9
    s = [tmp_path / info.name for info in m.shards]
    s[0].unlink()
    s[1].write_bytes(s[1].read_bytes()[:1000])  # truncated
    data = bytearray(s[2].read_bytes())
    data[700] ^= 0xFF  # inside the first member's body: same size, still a tar
    s[2].write_bytes(bytes(data))
    # shard 3 rewritten with one sample fewer, and the manifest's size and sha256 updated (count kept)
    a = encode_npy(np.zeros((4, 2, 2), np.float32))
    rows = [
        {"__key__": f"x{i}", "latent.npy": a, "latent_flip.npy": a, "cls": b"0"}
        for i in range(m.shards[3].count - 1)
    ]
    m.shards[3] = dataclasses.replace(write_shard(s[3], rows), count=m.shards[3].count)
    s[4].write_bytes(b"junk" * (m.shards[4].bytes // 4))  # same size, not a tar
    probs = verify_shards(tmp_path, m.shards, threads=2)
    assert len(probs) == 5
    assert probs[0] == f"shard {s[0]}: missing"
    n1, n3 = m.shards[1].bytes, m.shards[3].count
    assert probs[1] == f"shard {s[1]}: size 1000 bytes, manifest says {n1} (truncated or replaced?)"
    sha, want = sha256_file(s[2])[:16], m.shards[2].sha256[:16]
    assert probs[2] == f"shard {s[2]}: sha256 {sha}…, manifest says {want}… (contents changed)"
    assert probs[3] == f"shard {s[3]}: holds {n3 - 1} samples, manifest says {n3}"
    assert probs[4].startswith(f"shard {s[4]}: holds 0 samples, manifest says {m.shards[4].count}; sha256 ")
    assert probs[4].endswith("; not a tar file (bad header at byte 0)")
    # the manifest on disk is untouched by verification
    assert load_manifest(tmp_path).shards[5:] == m.shards[5:]
