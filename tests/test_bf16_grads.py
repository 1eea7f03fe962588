"""bf16 gradients under DeepSpeed ZeRO-2 as the trainer configures it (trainer/engine.py): accumulated over
micro-batches in fp32 (issue 17 item 2), on real engines at 2 ranks (gloo, CPU)."""

from __future__ import annotations

import json
import sys

from slurm.cli import run_local
from tests.conftest import WORKERS, clean_env


def test_bf16_gradients_accumulate_in_fp32_at_zero_2(tmp_path, monkeypatch):
    """DeepSpeed 0.19.8 at ZeRO-2 keeps an fp32 gradient partition when `data_types.grad_accum_dtype` is fp32
    (its "compact" partition buffer, deepspeed/runtime/zero/stage_1_and_2.py), so 16 bf16 micro-batches of
    which 15 are 1000× smaller than the first sum like fp32; without the key (the trainer before issue 17)
    they sum in bf16 and the small ones are lost in the rounding of the first (2, DeepSpeed issues #2352,
    #2768)."""
    out = tmp_path / "acc"
    out.mkdir()
    for k, v in clean_env().items():
        monkeypatch.setenv(k, v)
    assert run_local([sys.executable, str(WORKERS / "grad_accum_probe.py"), str(out)], 2) == 0
    r = json.loads((out / "result.json").read_text())
    print({k: {m: f"{x:.3g}" for m, x in v.items()} for k, v in r.items()})
    assert r["trainer"]["relative_error"] <= 1e-6  # fp32 rounding of the sum
    assert r["trainer"]["error_in_small_units"] <= 0.2  # the small micro-batches all count
    assert r["no grad_accum_dtype"]["relative_error"] >= 1e-4  # bf16 rounding
    assert r["no grad_accum_dtype"]["error_in_small_units"] >= 10  # they are lost in it
