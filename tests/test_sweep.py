"""`ldit sweep`: one training run per node count and the report (table, CSV, plot)."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import subprocess
import sys

import pytest

from slurm.sweep_report import rows, write_report
from tests.conftest import ROOT, clean_env
from tests.data_fixtures import latent_set

LOCAL = ROOT / "configs" / "cluster" / "local.yaml"


def fake_run(root, scaling: str, nodes: int, devices: int, step_ms: float, batch: int = 16, steps: int = 10,
             parts: tuple[float, float, float] | None = None) -> None:  # fmt: skip
    """A finished run of `tiny_cpu.yaml` (global batch `batch`) whose steps took `step_ms` (the first 5×)."""
    run = root / scaling / f"nodes-{nodes}"
    run.mkdir(parents=True)
    (run / "topology.json").write_text(json.dumps({"world_size": devices}))
    (run / "config.yaml").write_text(
        f"_base_: {ROOT / 'configs/dit/tiny_cpu.yaml'}\ndata:\n  global_batch: {batch}\n  streams: {batch // 4}\n"
    )
    lines = []
    for s in range(1, steps + 1):
        slow = 5.0 if s == 1 else 1.0  # a warm-up step, left out
        entry = {
            "step": s,
            "perf/samples_per_s": batch / (step_ms * slow) * 1e3,
            "perf/step_time_s": step_ms * slow / 1e3,
        }
        if parts:
            entry |= {f"perf/{k}_s": v * slow / 1e3 for k, v in zip(("data", "fwd_bwd", "optim"), parts)}
        lines.append(json.dumps(entry))
    (run / "log.jsonl").write_text("\n".join(lines) + "\n")


def test_report_numbers_and_files(tmp_path):
    fake_run(tmp_path, "strong", 1, 8, 20.0, parts=(2.0, 15.0, 3.0))
    fake_run(tmp_path, "strong", 2, 16, 16 / 1400 * 1e3)
    fake_run(tmp_path, "strong", 4, 32, 16 / 2400 * 1e3)
    table, notes = rows(tmp_path)
    assert [(r.scaling, r.nodes, r.devices) for r in table] == [
        ("strong", 1, 8),
        ("strong", 2, 16),
        ("strong", 4, 32),
    ]
    assert [round(r.samples_per_s, 6) for r in table] == [
        800.0,
        1400.0,
        2400.0,
    ]  # the warm-up step is dropped
    assert [round(r.efficiency, 4) for r in table] == [1.0, 0.875, 0.75]
    assert [r.ideal for r in table] == [800.0, 1600.0, 3200.0]
    assert table[0].step_p50_ms == pytest.approx(20.0) and table[0].parts_ms == pytest.approx(
        {"data": 2.0, "fwd_bwd": 15.0, "optim": 3.0})  # fmt: skip
    assert table[1].parts_ms == {} and all(r.predicted is None and r.mfu is None for r in table)
    assert notes[0].startswith("no prediction: the sweep names no cluster file") and notes[1].startswith(
        "no MFU"
    )
    md = write_report(tmp_path)
    assert (
        md.splitlines()[2]
        == "| strong | 1 | 8 | 16 | 800.0 | 100.0 | 1.000 | 800.0 | — | 20.0 | 20.0 | 2.0 | 15.0 | 3.0 | — | — |"
    )
    with open(tmp_path / "report.csv") as f:
        assert [row["scaling_efficiency"] for row in csv.DictReader(f)] == ["1.0000", "0.8750", "0.7500"]
    assert (tmp_path / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (tmp_path / "calibration.json").exists()


def _plan_step_ms(cfg_path, nodes: int, *cluster: str) -> float:
    """The step time `ldit plan` prints for the config at `nodes` nodes of the test cluster (2 tasks each)."""
    from slurm.plan import main as plan

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert plan([str(cfg_path), "--cluster", str(LOCAL), "--nodes", str(nodes), "--json", *cluster]) == 0
    return json.loads(buf.getvalue())["rows"][0]["time"]["step_s"] * 1e3


def test_report_predicts_each_run_and_calibrates_the_plan(tmp_path):
    """Runs whose measured step times are what the plan predicts under other figures (MFU 0.08, 0.6 GB/s):
    the report's prediction is `ldit plan`'s, its error is printed per run, and the calibration finds the
    figures back, which `ldit plan --calibrate` then uses."""
    from slurm.jobs import JOBS
    from slurm.sweep_report import Predictor, figures_cluster

    truth = ["cluster.mfu=0.08", "cluster.intra_node_gbs=0.6", "cluster.inter_node_gbs=0.6"]
    cfgs = {}
    for scaling, batch in (("strong", 16), ("weak", None)):
        for nodes in (1, 2):
            b = (
                batch or 32 * nodes
            )  # four different problems: 3 unknowns, each run predictable from the others
            probe = tmp_path / "probe" / f"{scaling}{nodes}.yaml"
            probe.parent.mkdir(exist_ok=True)
            probe.write_text(
                f"_base_: {ROOT / 'configs/dit/tiny_cpu.yaml'}\ndata:\n  global_batch: {b}\n  streams: {b // 4}\n"
            )
            cfgs[scaling, nodes] = (probe, b)
            fake_run(
                tmp_path / "sweep", scaling, nodes, 2 * nodes, _plan_step_ms(probe, nodes, *truth), batch=b
            )
    table, notes = rows(tmp_path / "sweep", [str(LOCAL)])
    assert notes == []
    for r in table:
        probe, b = cfgs[r.scaling, r.nodes]
        assert r.global_batch == b
        assert r.predicted["step"] == pytest.approx(
            _plan_step_ms(probe, r.nodes), rel=1e-12
        )  # the plan's, exactly
        assert r.error == pytest.approx(r.predicted["step"] / r.step_p50_ms - 1, rel=1e-12) and r.error < -0.5
        assert r.predicted["compute"] + r.predicted["comm"] + r.predicted["gather"] == pytest.approx(
            r.predicted["step"]
        )
        cfg = JOBS["train"].load([str(probe)], [])
        from models.lightningdit_spec import lightningdit_flops
        from slurm.plan import dit_args, model_inputs

        shape, classes, _, _ = model_inputs(cfg)
        f = lightningdit_flops(dit_args(cfg, shape, classes), False)
        assert r.mfu == pytest.approx(
            r.per_device * (f.forward + f.backward) / (figures_cluster([str(LOCAL)]).peak_tflops * 1e12),
            rel=1e-12,
        )  # local.yaml's peak (0.111)
    md = write_report(tmp_path / "sweep", [str(LOCAL)])
    assert "plan error per node count (predicted / measured step time − 1): strong 1 node(s) " in md
    cal = json.loads((tmp_path / "sweep" / "calibration.json").read_text())
    assert cal["unknowns"] == ["compute", "intra", "inter"]
    assert cal["fitted"]["mfu"] == pytest.approx(0.08, rel=1e-4)
    assert cal["fitted"]["intra_node_gbs"] == pytest.approx(0.6, rel=1e-4)
    assert cal["fitted"]["inter_node_gbs"] == pytest.approx(0.6, rel=1e-4)
    assert max(abs(e) for e in cal["error_fitted"]) < 1e-6 and min(cal["error_given"]) < -0.5
    assert "calibrated (compute, intra, inter fitted)" in md
    assert len(cal["error_held_out"]) == 4 and max(abs(e) for e in cal["error_held_out"]) < 1e-4
    assert "each run predicted by a fit to the others: strong/nodes-1 " in md
    probe = cfgs["strong", 2][0]
    calibrated = _plan_step_ms(probe, 2, "--calibrate", str(tmp_path / "sweep"))
    assert calibrated == pytest.approx(_plan_step_ms(probe, 2, *truth), rel=1e-4)
    predictor = Predictor(figures_cluster([str(LOCAL)]), "local")
    assert predictor.links.mfu == 0.3  # the cluster file's figures are the report's default


def test_plan_calibrate_without_a_calibration_says_what_to_run(tmp_path, capsys):
    from slurm.plan import main as plan

    code = plan(
        [str(ROOT / "configs/dit/tiny_cpu.yaml"), "--cluster", str(LOCAL), "--calibrate", str(tmp_path)]
    )
    assert code == 2
    err = capsys.readouterr().err
    assert "calibration.json does not exist: `ldit sweep --report" in err


def test_report_of_an_empty_folder_says_so(tmp_path):
    with pytest.raises(FileNotFoundError, match="holds no finished sweep runs"):
        rows(tmp_path)


def test_local_sweep_strong_and_weak_over_one_and_two_nodes(tmp_path):
    """Four real runs (strong and weak scaling × 1 and 2 local ranks), overrides passed through, the report
    with the plan's prediction from the test cluster's figures, and `--report` that rewrites it."""
    latent_set(tmp_path / "latents", sizes=(6,) * 8, shape=(4, 4, 4), classes=3)
    cfg = str(
        ROOT / "configs/dit/tiny_cpu.yaml"
    )  # its data.shards and optim.betas come from the command line
    cmd = [
        sys.executable, "-m", "slurm.cli", "sweep", cfg, f"data.shards={tmp_path / 'latents'}", "optim.betas=[0.8,0.9]",
        "--nodes", "1,2", "--scaling", "strong,weak", "--steps", "5", f"out={tmp_path / 'sweeps'}",
        f"figures=[{LOCAL}]",
    ]  # fmt: skip
    env = clean_env()
    bad = subprocess.run(
        [*cmd, "optim.lrr=1"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    assert bad.returncode == 1 and "optim.lrr" in bad.stderr and not (tmp_path / "sweeps").exists()
    odd = subprocess.run([*cmd, "--nodes", "1,3", "--scaling", "strong"], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=120)  # fmt: skip
    assert (
        odd.returncode == 1
        and "strong scaling on 3 node(s) × 1 task(s): world size 3 must divide data.streams=4" in odd.stderr
    )
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    root = tmp_path / "sweeps" / "tiny-dit"
    for scaling, n, batch, streams in (
        ("strong", 1, 16, 4),
        ("strong", 2, 16, 4),
        ("weak", 1, 16, 4),
        ("weak", 2, 32, 8),
    ):
        saved = (root / scaling / f"nodes-{n}" / "config.yaml").read_text()
        assert f"shards: {tmp_path / 'latents'}" in saved and "- 0.8\n  - 0.9" in saved, (
            saved
        )  # the overrides
        assert (
            f"global_batch: {batch}\n" in saved
            and f"streams: {streams}\n" in saved
            and "peak_tflops: 0.111" in saved
        )
        assert f"{scaling} scaling, nodes {n}: {n} local process(es)" in proc.stdout
    table, notes = rows(root)  # sweep.json names the figures
    assert [(r.scaling, r.nodes, r.devices, r.global_batch) for r in table] == [
        ("strong", 1, 1, 16), ("strong", 2, 2, 16), ("weak", 1, 1, 16), ("weak", 2, 2, 32)]  # fmt: skip
    assert notes == [] and all(
        r.predicted and r.mfu and set(r.parts_ms) == {"data", "fwd_bwd", "optim"} for r in table
    )
    assert [r.efficiency for r in table][::2] == [1.0, 1.0]
    for (
        r
    ) in table:  # `ldit plan`'s step time of the run's own config.yaml, on 1-rank "nodes" of the test cluster
        saved = root / r.scaling / f"nodes-{r.nodes}" / "config.yaml"
        assert r.predicted["step"] == pytest.approx(
            _plan_step_ms(saved, r.nodes, "cluster.tasks_per_node=1"), rel=1e-12
        )
    md = (root / "report.md").read_text()
    assert md in proc.stdout and "plan error per node count" in md and "calibrated (" in md
    assert json.loads((root / "sweep.json").read_text())["scaling"] == ["strong", "weak"]
    again = subprocess.run([sys.executable, "-m", "slurm.cli", "sweep", "--report", str(root)], cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=120)  # fmt: skip
    assert again.returncode == 0 and again.stdout.strip() == (root / "report.md").read_text().strip()


def test_sweep_needs_a_config_or_a_report(capsys):
    from slurm.cli import main

    assert main(["sweep", "--nodes", "1,2"]) == 2
    assert "ldit sweep needs a training config" in capsys.readouterr().err
