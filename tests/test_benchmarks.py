"""The interleaving helper of the benchmarks (benchmarks/_interleave.py) on contenders whose figures are
known, and the trainer and ZeRO-vs-DDP benchmarks run end to end at T/1 (their output, not their timings)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def interleave(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))  # as `python benchmarks/bench_x.py` has it
    import _interleave

    return _interleave


def trivial(log: Path, name: str, figures: list[float]) -> list[str]:
    """A contender that appends its name to `log` and reports figures[k] on its k-th run as step_s."""
    code = (
        "import sys; from pathlib import Path; sys.path.insert(0, 'benchmarks'); from _interleave import report; "
        f"log = Path({str(log)!r}); k = log.read_text().split().count({name!r}) if log.exists() else 0; "
        f"log.open('a').write({name!r} + '\\n'); report({{'step_s': {figures!r}[k]}}, threads=1)"
    )
    return [sys.executable, "-c", code]


def test_rounds_are_rotated_and_the_table_gives_medians_and_ratios(interleave, tmp_path):
    log = tmp_path / "order.txt"
    contenders = [
        interleave.Contender("A", trivial(log, "A", [1.0, 3.0, 2.0])),
        interleave.Contender("B", trivial(log, "B", [2.0, 9.0, 4.0])),
        interleave.Contender(
            "C", [sys.executable, "-c", f"open({str(log)!r}, 'a').write('C\\n'); raise SystemExit('boom')"]
        ),  # fmt: skip
    ]
    results = interleave.run_rounds(contenders, 3, log=lambda _: None)
    assert log.read_text().split() == ["A", "B", "C", "B", "A", "A", "B"]  # C failed once and ran no more
    assert interleave.values(results, "A", "step_s") == [1.0, 3.0, 2.0]
    assert [r["threads"] for r in results["B"]] == [[1], [1], [1]]
    rows = {k: interleave.values(results, k, "step_s") for k in "ABC"}
    lines = interleave.table(rows, baseline="A", unit="s").splitlines()
    assert lines[0].split() == ["s", "round", "1", "round", "2", "round", "3", "median", "/", "A"]
    assert lines[1].split() == ["A", "1.000", "3.000", "2.000", "2.000", "1.000"]
    assert lines[2].split() == ["B", "2.000", "9.000", "4.000", "4.000", "2.000"]
    assert lines[3].split() == ["C", "failed", "failed", "failed", "failed", "—"]
    assert interleave.ratio("B/A", rows["B"], rows["A"]) == (
        "ratio B/A: 2.000  (ratio of medians; per round 2.000 3.000 2.000)"
    )
    assert interleave.threads_line(results) == "torch threads: A 1, B 1, C ?"
    (error,) = interleave.errors(results)
    assert error.startswith("C failed: rank 0 exit 1: ") and error.endswith("boom")


def test_rotation_and_medians(interleave):
    assert [interleave.rotation("ABC", i) for i in range(4)] == [
        list("ABC"),
        list("BCA"),
        list("CAB"),
        list("ABC"),
    ]
    assert interleave.median([3.0, None, 1.0, 2.0]) == 2.0
    assert interleave.median([None]) is None
    assert interleave.median_after([9.0, 1.0, 2.0, 3.0], 1) == 2.0


def bench(script: str, *args: str) -> str:
    out = subprocess.run([sys.executable, f"benchmarks/{script}", *args], cwd=ROOT, capture_output=True,
                         text=True, timeout=600)  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr
    return out.stdout


NUMBER = r"\d+\.\d{3}"


def test_bench_trainer_prints_the_ratio_at_t1():
    out = bench("bench_trainer.py", "--sizes", "T/1", "--contenders", "plain", "trainer", "--rounds", "1",
                "--steps", "3", "--warmup", "1")  # fmt: skip
    assert re.search(
        rf"^ratio trainer/plain, eager: {NUMBER}  \(ratio of medians; per round {NUMBER}\)$", out, re.M
    )
    assert re.search(r"^torch threads: plain \d+, trainer \d+$", out, re.M)
    assert "failed" not in out


def test_bench_ddp_prints_the_ratios_and_the_floor_at_t1():
    out = bench("bench_ddp.py", "--size", "T/1", "--rounds", "1", "--steps", "3", "--warmup", "1")
    assert re.search(rf"^ratio ZeRO-2/DDP step time: {NUMBER} ", out, re.M)
    assert re.search(r"^ratio ZeRO-2/DDP moment bytes per rank: 0\.500 ", out, re.M)  # each rank holds half
    assert re.search(
        rf"^floor ZeRO/DDP on gloo: {NUMBER} \(the lowest, with [^)]+\): a ratio ≤ 1.05 is ", out, re.M
    )
    assert re.search(r"^torch threads: zero2 1/1, ddp 1/1, gloo 1/1$", out, re.M)
    assert "failed" not in out
