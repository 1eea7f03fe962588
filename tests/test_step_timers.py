"""The trainer's step timers (issue #18): each step split into data, forward + backward (with ZeRO-2's
gradient reduction) and optimizer step (with its all-gather), parts that add up to the step time; and
`perf/mfu` only against a peak that means something on the device."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from models.lightningdit import LightningDiT, LightningDiTArgs
from tests.conftest import ROOT, clean_env
from tests.data_fixtures import gaussian_latent_set
from trainer.common import H100_SXM_PEAK_TFLOPS, Meter, peak_tflops

PARTS = ("perf/data_s", "perf/fwd_bwd_s", "perf/optim_s")


def test_laps_split_each_step_into_parts_that_sum_to_the_step_time():
    """Three steps of known sleeps: 10 ms before the `data` lap and 10 ms after the last lap (both data),
    two micro-batches of 20 ms forward + backward and 5 ms optimizer step. Each part is its slept time
    (sleep never returns early; 15 ms of slack for a busy machine), and the parts add up to the step time
    to float rounding (one clock, the same marks)."""
    meter = Meter(torch.device("cpu"))
    for _ in range(3):
        began = meter.begin()
        time.sleep(0.010)
        meter.lap("data")
        for _ in range(2):
            time.sleep(0.020)
            meter.lap("fwd_bwd")
            time.sleep(0.005)
            meter.lap("optim")
        time.sleep(0.010)
        meter.add(8, 0.0, began)
    s = meter.summary(world_size=1, flops_per_sample=0.0, peak=None)
    for key, slept in zip(PARTS, (0.020, 0.040, 0.010)):
        assert slept <= s[key] < slept + 0.015, (key, s[key])
    assert sum(s[k] for k in PARTS) == pytest.approx(s["perf/step_time_s"], rel=1e-9, abs=0)
    assert s["perf/step_time_s"] == pytest.approx(sum(meter.seconds()) / 3, rel=1e-12)
    assert "perf/mfu" not in s


def test_a_loop_that_never_laps_gets_no_parts_and_mfu_follows_the_peak():
    """The VA-VAE loop does not lap: no part keys, the keys it had. `perf/mfu` is per-device samples/s ×
    FLOPs per sample / peak, and absent without a peak."""
    meter = Meter(torch.device("cpu"))
    meter.add(4, 0.001, meter.begin())
    s = meter.summary(world_size=2, flops_per_sample=3e9, peak=0.5)
    assert set(s) == {"perf/samples_per_s", "perf/samples_per_s_per_device", "perf/mfu", "perf/data_wait_s",
                      "perf/step_time_s"}  # fmt: skip
    assert s["perf/mfu"] == pytest.approx(s["perf/samples_per_s_per_device"] * 3e9 / 0.5e12, rel=1e-12)
    assert s["perf/data_wait_s"] == 0.001


def test_peak_defaults_to_the_h100_datasheet_on_gpus_and_to_none_on_the_cpu():
    assert H100_SXM_PEAK_TFLOPS == 989.0
    assert peak_tflops(None, torch.device("cuda", 0)) == 989.0
    assert peak_tflops(None, torch.device("cpu")) is None
    assert peak_tflops(0.05, torch.device("cpu")) == peak_tflops(0.05, torch.device("cuda", 0)) == 0.05


@pytest.fixture(scope="module")
def latents(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("latents")
    gaussian_latent_set(folder)
    return folder


def train_log(latents: Path, root: Path, name: str, *overrides: str) -> list[dict]:
    """One rank, 3 steps of 4 micro-batches of 4 (global batch 16), every step logged."""
    proc = subprocess.run(
        [sys.executable, "-m", "slurm.cli", "train", "configs/dit/tiny_cpu.yaml", f"data.shards={latents}",
         f"run.root={root}", f"run.name={name}", "steps=3", "micro_batch=4", "log.every=1", *overrides],
        cwd=ROOT, env=clean_env(), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    return [json.loads(line) for line in (root / name / "log.jsonl").read_text().splitlines()]


def test_dit_training_logs_the_parts_of_every_step_and_mfu_only_with_a_peak(latents, tmp_path):
    """A real one-rank DiT run with gradient accumulation: every logged step has the three parts, none
    negative, forward + backward positive, adding up to the step time; no `perf/mfu` on the CPU by
    default; with `log.peak_tflops=0.05` it is samples/s per device × the model's forward + backward FLOPs
    per sample / 0.05e12."""
    entries = train_log(latents, tmp_path, "default")
    assert [e["step"] for e in entries] == [1, 2, 3]
    for e in entries:
        assert all(e[k] >= 0 for k in PARTS), e
        assert e["perf/fwd_bwd_s"] > 0, e
        assert sum(e[k] for k in PARTS) == pytest.approx(e["perf/step_time_s"], rel=1e-6), e
        assert "perf/data_wait_s" in e and "perf/mfu" not in e, e

    entries = train_log(latents, tmp_path, "peak", "log.peak_tflops=0.05")
    meta = json.loads((tmp_path / "peak" / "checkpoints" / "step-00000003" / "meta.json").read_text())
    flops = LightningDiT(LightningDiTArgs(**meta["model_args"])).flops_per_sample(grad_checkpointing=False)
    for e in entries:
        expected = e["perf/samples_per_s_per_device"] * (flops.forward + flops.backward) / 0.05e12
        assert e["perf/mfu"] == pytest.approx(expected, rel=1e-12), e
        assert sum(e[k] for k in PARTS) == pytest.approx(e["perf/step_time_s"], rel=1e-6), e
