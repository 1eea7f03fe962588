"""DeepSpeed ZeRO-2 installs and trains on CPU: two ranks stay identical, match a one-rank run with the
same global batch, and each holds half the optimizer state (this proves the install, not the trainer)."""

from __future__ import annotations

import sys

import numpy as np

from slurm.cli import run_local
from tests.conftest import WORKERS, clean_env, read_ranks, run_procs


def test_zero2_two_ranks_match_one_rank(tmp_path, monkeypatch):
    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir()
    two.mkdir()
    cmd = lambda out: [sys.executable, str(WORKERS / "ds_smoke.py"), str(out), "5"]  # noqa: E731
    run_procs([(cmd(one), clean_env())])
    for k, v in clean_env().items():
        monkeypatch.setenv(k, v)
    assert run_local(cmd(two), 2) == 0
    (single,) = read_ranks(one, 1)
    r0, r1 = read_ranks(two, 2)
    print(
        f"optimizer state bytes: 1 rank {single['optimizer_state_bytes']}, 2 ranks {r0['optimizer_state_bytes']} each"
    )
    assert r0["params"] == r1["params"]  # ZeRO-2 keeps the replicas bit-identical
    np.testing.assert_allclose(r0["params"], single["params"], rtol=0, atol=1e-6)
    np.testing.assert_allclose(r0["losses"], single["losses"], rtol=1e-6)
    assert single["optimizer_state_bytes"] == 2 * 4 * len(single["params"])  # fp32 exp_avg + exp_avg_sq
    assert r0["optimizer_state_bytes"] == r1["optimizer_state_bytes"] == single["optimizer_state_bytes"] // 2
