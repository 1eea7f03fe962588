"""The `ldit` command: every job is listed, each job's help lists its documented keys, errors exit 2."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time

import pytest

from slurm.cli import main, split_args, write_run_config
from slurm.config import load_config
from slurm.jobs import JOBS
from tests.conftest import ROOT
from trainer.config import TrainDiTConfig


@pytest.fixture(autouse=True)
def _in_repo(monkeypatch):
    monkeypatch.chdir(ROOT)  # the commands name configs/ relative to the repository, as a user would


ALL_JOBS = [
    "prep-images",
    "extract-latents",
    "ref-stats",
    "train",
    "eval",
    "export",
    "sweep",
    "status",
    "demo",
]


def test_help_lists_every_job():
    ldit = shutil.which("ldit", path=str(sys.executable.rsplit("/", 1)[0]))
    assert ldit, "the console script is installed"
    out = subprocess.run([ldit, "--help"], capture_output=True, text=True, check=True).stdout
    assert list(JOBS) == ALL_JOBS
    for name, job in JOBS.items():
        assert name in out and job.summary.split()[0] in out
    assert "inspect" in out  # not a job: read-only sub-commands (slurm/inspect.py)


def test_job_help_lists_keys_with_docs(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["train", "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert "config keys (kind=dit):" in out and "config keys (kind=vavae):" in out
    assert "  optim.lr (float) = 0.0002\n      Learning rate (reference §3.2: 2e-4 for the DiT" in out
    assert "  loss.disc_start (int) = 5001" in out
    with pytest.raises(SystemExit):
        main(["prep-images", "--help"])
    assert "  src (str) = ??? (required)" in capsys.readouterr().out
    with pytest.raises(SystemExit):  # a section's defaults are its field's default, not its class's
        main(["demo", "--help"])
    out = capsys.readouterr().out
    for line in ("  dit.steps (int) = 4000", "  dit.ema_decay (float) = 0.995", "  vavae.steps (int) = 300"):
        assert line + "\n" in out, line


def test_config_errors_exit_2_with_the_key(capsys):
    assert main(["train", "configs/dit/lightningdit_xl1.yaml", "optim.lr_=1"]) == 2
    err = capsys.readouterr().err
    assert err == (
        "ldit train: config error: command line: Key 'lr_' not in 'OptimConfig'. Did you mean: 'lr'? (key: optim.lr_)\n"
    )
    assert main(["train", "run.name=x"]) == 2
    assert "train needs `kind` (one of dit, vavae)" in capsys.readouterr().err
    assert main(["train", "kind=gan"]) == 2
    assert "kind 'gan' is not one of dit, vavae" in capsys.readouterr().err


def test_unbuilt_job_says_so_after_checking_the_config(capsys, monkeypatch):
    from dataclasses import replace

    monkeypatch.setitem(JOBS, "export", replace(JOBS["export"], entry=None, issue=7))
    assert main(["export", "run.name=x"]) == 2
    assert "ldit export: not built yet (issue #7); the config is valid." in capsys.readouterr().err
    assert main(["export", "run.nme=x"]) == 2  # the config is still checked first
    assert "Key 'nme' not in 'RunConfig'" in capsys.readouterr().err


def test_split_args_keeps_order():
    assert split_args(["a.yaml", "x=1", "b.yml", "y=c.yaml"]) == (["a.yaml", "b.yml"], ["x=1", "y=c.yaml"])


def test_resolved_config_is_written_to_the_run_directory(tmp_path):
    cfg = load_config(TrainDiTConfig, ["configs/dit/lightningdit_b1.yaml"], [f"run.root={tmp_path}"])
    path = write_run_config(cfg)
    assert path == tmp_path / "lightningdit-b1" / "config.yaml"
    assert load_config(TrainDiTConfig, [path]) == cfg
    write_run_config(cfg)  # the same config again: nothing archived
    assert sorted(p.name for p in path.parent.iterdir()) == ["config.yaml"]
    changed = load_config(TrainDiTConfig, [path], ["steps=100"])
    write_run_config(changed)
    assert sorted(p.name for p in path.parent.iterdir()) == ["config.1.yaml", "config.yaml"]
    assert load_config(TrainDiTConfig, [path.parent / "config.1.yaml"]) == cfg
    assert load_config(TrainDiTConfig, [path]).steps == 100


def test_status_of_a_run_without_slurm(tmp_path, capsys):
    import json

    run = tmp_path / "r"
    (run / "checkpoints" / "step-00000004").mkdir(parents=True)
    (run / "checkpoints" / "step-00000004" / "meta.json").write_text(json.dumps({"step": 4, "files": {}}))
    (run / "checkpoints" / "step-00000008").mkdir()
    (run / "checkpoints" / "latest").write_text("step-00000004")
    (run / "log.jsonl").write_text(json.dumps({"step": 6, "loss/total": 0.5, "loss/mse": 0.25}) + "\n")
    three_hours_ago = time.time() - 3 * 3600
    os.utime(run / "log.jsonl", (three_hours_ago, three_hours_ago))
    assert main(["status", str(run)]) == 0
    assert capsys.readouterr().out.splitlines() == [
        f"run {run}",
        "  checkpoints: step-00000008 (incomplete), step-00000004 (latest, complete)",
        "  last logged step 6 (3.0 h ago): loss/total 0.5000, loss/mse 0.2500",  # no job RUNNING: no stall
        "  SLURM jobs: none submitted with --slurm",
    ]
    assert main(["status", str(tmp_path / "missing")]) == 1
    assert f"run directory {tmp_path / 'missing'} does not exist" in capsys.readouterr().err


@pytest.mark.parametrize("how", ["head", "closed"])
def test_output_into_a_closed_pipe_ends_quietly(tmp_path, how):
    """Issue #15: `ldit inspect order … | head` ended in a BrokenPipeError traceback. Now: nothing on
    stderr and exit status 141 (128 + SIGPIPE, as a tool the signal stopped), for every sub-command."""
    from tests.conftest import clean_env
    from tests.data_fixtures import latent_set

    latent_set(tmp_path / "set")
    flags = [
        "--seed",
        "0",
        "--global-batch",
        "12",
        "--streams",
        "4",
        "--steps",
        "0:400",
    ]  # ~4,800 lines: more than a pipe holds
    cmd = [sys.executable, "-m", "slurm.cli", "inspect", "order", str(tmp_path / "set"), *flags]
    if how == "head":
        script = " ".join(f"'{a}'" for a in cmd) + ' | head -1; echo "status ${PIPESTATUS[0]}" >&2'
        proc = subprocess.run(
            ["bash", "-c", script], cwd=ROOT, env=clean_env(), capture_output=True, text=True
        )
        assert proc.stdout.startswith("order of ") and proc.stdout.count("\n") == 1
        assert proc.stderr == "status 141\n"
        return
    proc = subprocess.Popen(cmd, cwd=ROOT, env=clean_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout.readline().startswith(b"order of ")
    proc.stdout.close()  # the reader goes away while the command is still writing
    _, err = proc.communicate(timeout=120)
    assert (proc.returncode, err) == (141, b"")


def test_status_flags_a_running_job_whose_log_went_silent():
    """Issue #20: a RUNNING job whose run logged nothing for longer than 10 × its usual time between log
    lines (at least 45 s) is flagged as stalled; the usual time is read from the log itself."""
    from slurm.status import log_interval_s, render_status, stall_bound_s

    entries = [
        {"step": s, "perf/step_time_s": 0.4 if s < 20 else 0.6} for s in range(2, 44, 2)
    ]  # log.every=2
    assert log_interval_s(entries) == 2 * 0.6  # 2 steps a line × the median step time (12 of 21 at 0.6)
    assert log_interval_s([{"step": 1}]) is None
    assert (stall_bound_s(None), stall_bound_s(1.1), stall_bound_s(14.0)) == (45.0, 45.0, 140.0)
    status = {
        "run": "runs/x", "checkpoints": [], "export": None, "evals": [],
        "last_log": {"step": 42, "losses": {"loss/total": 0.25}, "age_s": 95.0, "interval_s": 1.1},
        "jobs": [{"job_id": "7", "job": "train", "state": "RUNNING", "submitted": "2026-12-06T05:00:00",
                  "resources": "2 node(s) × 2 task(s)", "after": None}],
        "stall": {"silent_s": 95.0, "bound_s": 45.0},
    }  # fmt: skip
    lines = render_status(status).splitlines()
    assert lines[2:4] == [
        "  last logged step 42 (95 s ago): loss/total 0.2500",
        "  STALLED: a job is RUNNING but nothing was logged for 95 s (bound 45 s: 10 × the usual time "
        "between log lines, at least 45 s); a rank may be hung: see the job's logs",
    ]
    assert "STALLED" not in render_status({**status, "stall": None})


def test_status_shows_each_point_of_a_curve_and_the_other_evals(tmp_path, capsys):
    """Issue #16: `ldit status` shows one line per point of each eval/<settings>/curve.csv (written here by
    the follower's own writer) and the metrics of every evaluation that is not a point of a curve."""
    import json

    from slurm.follow import TrainingPlan, write_curve
    from slurm.status import run_status

    run, settings = tmp_path / "r", "recon_held_crop32_seed0_n6"
    points = {
        4: {"rfid": 41.27, "psnr": 10.5, "ssim": 0.0123, "lpips": 0.5},
        # a non-finite value is a string in metrics.json ("nan", "inf"); a curve cell holds its repr
        8: {"rfid": 30.0, "psnr": 11.25, "ssim": 0.02, "lpips": "nan"},
        12: {"rfid": 22.125, "psnr": 12.0, "ssim": 0.03125, "lpips": 0.375},
    }
    for step, metrics in [*points.items(), (12, {"fid": 3.25, "precision": None, "sfid": "inf"})]:
        name = f"step-{step:08d}_{settings if 'rfid' in metrics else 'euler4_nocfg_n8_ref'}"
        (run / "eval" / name).mkdir(parents=True)
        doc = {"format": 1, "name": name, "metrics": metrics, "export": {"step": step}}
        (run / "eval" / name / "metrics.json").write_text(json.dumps(doc))
    write_curve(run, settings, TrainingPlan((4, 8, 12), 16, 96))
    assert main(["status", str(run)]) == 0
    assert capsys.readouterr().out.splitlines() == [
        f"run {run}",
        "  checkpoints: none",
        "  eval step-00000012_euler4_nocfg_n8_ref: fid 3.25, precision None, sfid inf",
        f"  curve {settings} (3 points, eval/{settings}/curve.csv):",
        "    step 4 (0.667 epochs): lpips 0.5, psnr 10.5, rfid 41.27, ssim 0.0123",
        "    step 8 (1.33 epochs): lpips nan, psnr 11.25, rfid 30, ssim 0.02",
        "    step 12 (2 epochs): lpips 0.375, psnr 12, rfid 22.12, ssim 0.03125",
        "  SLURM jobs: none submitted with --slurm",
    ]
    status = run_status(run)  # `ldit inspect run --json`
    assert [e["metrics"] for e in status["evals"]] == [*points.values()][:2] + [
        {"fid": 3.25, "precision": None, "sfid": "inf"}, points[12]
    ]  # fmt: skip
    (curve,) = status["curves"]
    assert curve["columns"] == ["step", "epochs", "samples_seen", "lpips", "psnr", "rfid", "ssim"]
    assert curve["rows"][0] == {"step": 4, "epochs": 4 * 16 / 96, "samples_seen": 64, **points[4]}
    assert [r["step"] for r in curve["rows"]] == [4, 8, 12] and json.loads(json.dumps(status))["curves"]


def test_follow_eval_under_a_launcher_starts_the_follower_on_rank_0_only(tmp_path, monkeypatch):
    """`srun ldit train … --follow-eval` (or torchrun) runs `ldit` on every rank: rank 0 alone starts the
    follower (on the test cluster, 4 ranks started 4 followers, which raced on curve.png and one failed)."""
    from slurm.companions import run_with_follower

    started = tmp_path / "started"
    follower = [sys.executable, "-c", f"open({str(started)!r}, 'w')"]
    for key, value in dict(RANK="1", WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT="1").items():
        monkeypatch.setenv(key, value)
    assert run_with_follower(lambda: 0, follower) == 0 and run_with_follower(lambda: 3, follower) == 3
    assert not started.exists()
    monkeypatch.setenv("RANK", "0")
    assert run_with_follower(lambda: 0, follower) == 0 and started.exists()
