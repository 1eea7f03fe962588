"""No host sync per training step (issue #19): on a GPU, reading a tensor the device computes
(`.item()`, `.tolist()`, `bool()`, `float()`) makes the CPU wait for the step to finish, so it cannot
queue the next one. tests/workers/sync_probe.py counts those reads per step, by call site, in a real
one-rank `ldit train` on the CPU."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import ROOT, clean_env
from tests.data_fixtures import gaussian_latent_set

HOST_SITES = {
    "trainer/common.py:agree",  # a tensor built from host bools, reduced over the gloo host group
    "trainer/common.py:per_sample_normal",  # the batch's sample positions: the reader's host tensor
}
"""Call sites whose tensor is on the host by construction: they read no device memory on a GPU."""


@pytest.fixture(scope="module")
def latents(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("latents")
    gaussian_latent_set(folder)
    return folder


def probe(latents: Path, root: Path, *overrides: str) -> dict[str, dict[str, int]]:
    proc = subprocess.run(
        [sys.executable, "tests/workers/sync_probe.py", f"data.shards={latents}", f"run.root={root}",
         "run.name=probe", "steps=12", "log.every=5", "ckpt.every=100", "nonfinite_check_every=10", *overrides],
        cwd=ROOT, env=clean_env(), capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.splitlines()[-1])


def device_reads(sites: dict[str, int]) -> dict[str, int]:
    return {k: v for k, v in sites.items() if k not in HOST_SITES}


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_steps_between_logs_read_nothing_from_the_device(latents, tmp_path, precision):
    """Steps 0-3, 5-8 and 10 (of 12; logs after steps 5, 10, 12, a check after 10, a save after 12) make no
    device read: the losses are summed on the device, the non-finite check is a device flag read at log,
    check and save steps, the host flags (signal, bad shard) are agreed over gloo, and DeepSpeed computes
    no gradient norm and no overflow check unless a log step asks (nonfinite=stop, no clipping). fp32 runs
    stage 0 at one rank (its norm is our optimizer pre-hook's), bf16 ZeRO-2.
    The loop before this change read the losses (`.tolist()`) and DeepSpeed's norm check every step."""
    steps = probe(latents, tmp_path, f"precision={precision}")
    quiet = {s: device_reads(steps[str(s)]) for s in (0, 1, 2, 3, 5, 6, 7, 8, 10)}
    assert quiet == dict.fromkeys(quiet, {}), quiet
    log_step = device_reads(steps["4"])  # the step logged as step 5
    expected = {
        "trainer/common.py:agreed_first": 1,  # the non-finite flag
        "trainer/dit.py:train": 1,  # the window's losses
        "trainer/common.py:mean_over_ranks": 1,
        # the grad norm: at stage 0 (one rank in fp32) our pre-hook's (float); under ZeRO-2 DeepSpeed's (bool, float)
        "trainer/engine.py:global_grad_norm": 1 if precision == "fp32" else 2,
    }
    assert log_step == expected, log_step
    entries = [json.loads(line) for line in (tmp_path / "probe" / "log.jsonl").read_text().splitlines()]
    assert [e["step"] for e in entries] == [5, 10, 12]
    assert all(e["opt/grad_norm"] > 0 for e in entries)  # computed for the logged steps only, but computed


def test_nonfinite_skip_pays_a_read_per_step(latents, tmp_path):
    """nonfinite=skip must know before each update whether the gradients are finite: DeepSpeed's check
    reads the device every step (the cost the config's docstring states)."""
    steps = probe(latents, tmp_path, "nonfinite=skip")
    for s in (0, 1, 2, 3):
        assert device_reads(steps[str(s)]) == {"deepspeed/runtime/utils.py:is_invalid_grad_norm": 1}


def test_nonfinite_stop_names_the_first_bad_step_at_the_next_check(latents, tmp_path):
    """A shard of NaN latents: with the flag read every 4 steps, the run stops at the first check after
    the first non-finite loss and names that step, the step a run checking every step stops at; neither
    writes a checkpoint after it."""
    import shutil

    from data_prep.manifest import load_manifest
    from data_prep.shards import encode_npy, write_shard

    poisoned = tmp_path / "poisoned"
    shutil.copytree(latents, poisoned)
    m = load_manifest(poisoned)
    bad = np.full((4, 4, 4), np.nan, np.float32)
    rows = [{"__key__": f"nan{i}", "latent.npy": encode_npy(bad), "latent_flip.npy": encode_npy(bad),
             "cls": b"0"} for i in range(8)]  # fmt: skip
    m.shards[5] = write_shard(poisoned / m.shards[5].name, rows)
    m.save(poisoned)

    def first_bad(every: int) -> tuple[int, int]:
        proc = subprocess.run(
            [sys.executable, "-m", "slurm.cli", "train", "configs/dit/tiny_cpu.yaml", f"data.shards={poisoned}",
             f"run.root={tmp_path}", f"run.name=every{every}", "steps=20", "log.every=100", "ckpt.every=100",
             f"nonfinite_check_every={every}"],
            cwd=ROOT, env=clean_env(), capture_output=True, text=True, timeout=600,
        )  # fmt: skip
        assert proc.returncode == 1, proc.stderr[-3000:]
        found = re.search(
            r"non-finite loss at step (\d+) \(nonfinite=stop, checked after step (\d+)\)", proc.stderr
        )
        assert found, proc.stderr[-3000:]
        assert not (tmp_path / f"every{every}" / "checkpoints" / "latest").exists()
        return int(found[1]), int(found[2])

    step, checked = first_bad(1)
    assert checked == step + 1  # steps count from 0; "after step N" counts finished steps
    assert first_bad(4) == (step, -(-checked // 4) * 4)
