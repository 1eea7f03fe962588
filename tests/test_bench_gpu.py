"""benchmarks/bench_gpu.py (issue #19) runs on the CPU with a tiny model: its table has a row per
configuration whose numbers parse and agree with each other, and a configuration that runs out of memory
prints OOM and lets the script finish. No timing is asserted."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from benchmarks.bench_gpu import TABLE_HEADER, Config, configs, row
from models.lightningdit import lightningdit_args, lightningdit_flops
from tests.conftest import ROOT, clean_env

SCRIPT = ROOT / "benchmarks" / "bench_gpu.py"


def run_bench(*args: str) -> str:
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--device", "cpu", "--micro-batches", "2", "--compile", "off", *args],
        env=clean_env(),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=150,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def table_rows(out: str) -> dict[str, list[str]]:
    lines = out.splitlines()
    start = lines.index(TABLE_HEADER.splitlines()[0])
    rows = {}
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows[cells[0]] = cells[1:]
    return rows


def test_configs_order_uncompiled_first():
    got = [c.label for c in configs([32, 64], ["off", "on"], ["off", "on"])]
    assert got == [
        "mb 32, ckpt off, compile off",
        "mb 32, ckpt on, compile off",
        "mb 64, ckpt off, compile off",
        "mb 64, ckpt on, compile off",
        "mb 32, ckpt off, compile on",
        "mb 32, ckpt on, compile on",
        "mb 64, ckpt off, compile on",
        "mb 64, ckpt on, compile on",
    ]


def test_row_mfu_and_ratio():
    ours = {"status": "ok", "img_s": 500.0, "peak_gib": 20.0}
    plain = {"status": "ok", "img_s": 400.0, "peak_gib": 18.5}
    # 500 img/s x 1e12 FLOP / 1e15 FLOP/s = 50 %; 400 -> 40 %; 500 / 400 = 1.25
    assert row(Config(64, True, False), ours, plain, 1e12, 1e15) == (
        "| mb 64, ckpt on, compile off | 500.0 | 50.00% | 20.00 | 400.0 | 40.00% | 18.50 | 1.250 |"
    )
    assert row(Config(64, False, True), {"status": "OOM"}, plain, 1e12, 1e15) == (
        "| mb 64, ckpt off, compile on | OOM | - | - | 400.0 | 40.00% | 18.50 | - |"
    )


def test_cpu_table():
    out = run_bench("--size", "T/1", "--checkpointing", "off", "on", "--steps", "2", "--warmup", "1")
    rows = table_rows(out)
    assert list(rows) == ["mb 2, ckpt off, compile off", "mb 2, ckpt on, compile off"]
    peak = float(re.search(r"measured bf16 matmul peak: ([\d.]+) TFLOP/s", out).group(1)) * 1e12
    assert peak > 0
    args = lightningdit_args("T/1", in_channels=32, input_size=16, num_classes=1000)
    flops = lightningdit_flops(args, grad_checkpointing=False).train
    assert f"FLOPs per sample for MFU: {flops / 1e9:.2f} GFLOP = forward + backward" in out
    for cells in rows.values():
        img_s, mfu, gib, plain_img_s, plain_mfu, plain_gib, ratio = cells
        assert float(img_s) > 0 and float(plain_img_s) > 0
        assert float(gib) > 0 and float(plain_gib) > 0
        for rate, pct in ((img_s, mfu), (plain_img_s, plain_mfu)):
            assert pct.endswith("%")
            # the printed MFU is the printed rate's, up to the rounding of both
            assert float(pct[:-1]) == pytest.approx(100 * float(rate) * flops / peak, rel=0.1, abs=0.01)
        assert float(ratio) == pytest.approx(float(img_s) / float(plain_img_s), rel=0.1)
    assert "every configuration ran" in out


def test_oom_is_reported_and_the_script_goes_on():
    # 1p0B/1 in fp32 is 4 GiB of weights: the first blocks exhaust a 0.5 GiB cap during construction.
    out = run_bench(
        "--size", "1p0B/1", "--checkpointing", "off", "--steps", "1", "--warmup", "0", "--memory-limit-gib", "0.5"
    )  # fmt: skip
    assert table_rows(out) == {"mb 2, ckpt off, compile off": ["OOM", "-", "-", "OOM", "-", "-", "-"]}
