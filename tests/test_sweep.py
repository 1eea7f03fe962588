"""`ldit sweep`: one training run per node count and the report (table, CSV, plot)."""

from __future__ import annotations

import csv
import json
import subprocess
import sys

import pytest

from slurm.sweep import rows, write_report
from tests.conftest import ROOT, clean_env
from tests.data_fixtures import latent_set


def fake_run(root, nodes: int, devices: int, rate: float, steps: int = 10) -> None:
    run = root / f"nodes-{nodes}"
    run.mkdir(parents=True)
    (run / "topology.json").write_text(json.dumps({"world_size": devices}))
    lines = []
    for s in range(1, steps + 1):
        slow = 5.0 if s == 1 else 1.0  # a warm-up step, left out
        lines.append(
            json.dumps(
                {
                    "step": s,
                    "perf/samples_per_s": rate / slow,
                    "perf/step_time_s": 0.1 * slow * s / s,
                    "perf/mfu": 0.4,
                }
            )
        )
    (run / "log.jsonl").write_text("\n".join(lines) + "\n")


def test_report_numbers_and_files(tmp_path):
    fake_run(tmp_path, 1, 8, 800.0)
    fake_run(tmp_path, 2, 16, 1400.0)
    fake_run(tmp_path, 4, 32, 2400.0)
    table = rows(tmp_path)
    assert [(r.nodes, r.devices) for r in table] == [(1, 8), (2, 16), (4, 32)]
    assert [r.samples_per_s for r in table] == [800.0, 1400.0, 2400.0]  # the warm-up step is dropped
    assert [round(r.efficiency, 4) for r in table] == [1.0, 0.875, 0.75]
    assert table[0].step_p50_ms == pytest.approx(100.0)
    md = write_report(tmp_path)
    assert md.splitlines()[2] == "| 1 | 8 | 800.0 | 100.0 | 1.000 | 4.00e-01 | 100.0 | 100.0 | 100.0 |"
    with open(tmp_path / "report.csv") as f:
        assert [row["scaling_efficiency"] for row in csv.DictReader(f)] == ["1.0000", "0.8750", "0.7500"]
    assert (tmp_path / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_report_of_an_empty_folder_says_so(tmp_path):
    with pytest.raises(FileNotFoundError, match="holds no finished sweep runs"):
        rows(tmp_path)


def test_local_sweep_over_one_and_two_nodes(tmp_path):
    latent_set(tmp_path / "latents", sizes=(6,) * 8, shape=(4, 4, 4), classes=3)
    cfg = str(
        ROOT / "configs/dit/tiny_cpu.yaml"
    )  # its data.shards and optim.betas come from the command line
    cmd = [
        sys.executable,
        "-m",
        "slurm.cli",
        "sweep",
        cfg,
        f"data.shards={tmp_path / 'latents'}",
        "optim.betas=[0.8,0.9]",
        "--nodes",
        "1,2",
        "--steps",
        "5",
        f"out={tmp_path / 'sweeps'}",
    ]
    env = clean_env()
    bad = subprocess.run(
        [*cmd, "optim.lrr=1"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    assert bad.returncode == 1 and "optim.lrr" in bad.stderr and not (tmp_path / "sweeps").exists()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    root = tmp_path / "sweeps" / "tiny-dit"
    for n in (1, 2):  # the overrides reached every job (issue #18: "Key 'data' not in 'SweepConfig'" before)
        saved = (root / f"nodes-{n}" / "config.yaml").read_text()
        assert f"shards: {tmp_path / 'latents'}" in saved and "- 0.8\n  - 0.9" in saved, saved
    assert "nodes 1: 1 local process(es)" in proc.stdout and "nodes 2: 2 local process(es)" in proc.stdout
    table = rows(root)
    assert [(r.nodes, r.devices) for r in table] == [(1, 1), (2, 2)] and table[0].efficiency == 1.0
    assert (root / "report.md").read_text() in proc.stdout
    assert json.loads((root / "sweep.json").read_text())["nodes"] == [1, 2]
    again = subprocess.run([sys.executable, "-m", "slurm.cli", "sweep", "--report", str(root)], cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=120)  # fmt: skip
    assert again.returncode == 0 and again.stdout.strip() == (root / "report.md").read_text().strip()


def test_sweep_needs_a_config_or_a_report(capsys):
    from slurm.cli import main

    assert main(["sweep", "--nodes", "1,2"]) == 2
    assert "ldit sweep needs a training config" in capsys.readouterr().err
