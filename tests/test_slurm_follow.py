"""The eval follower beside real SLURM training (issue #16, marker `slurm`): `ldit train … --slurm --follow-eval`
submits training and the follower (its own job of one node) with no dependency; the follower evaluates each
milestone export while training runs and ends after the last one, or fails, naming the step it waited for,
when training ends without writing it.

The offline world (Gaussian latents, a random `digits` VA-VAE, random Inception weights, a synthetic
reference) is tests/test_follow.py's. A training step is instant next to an evaluation, so the first test
holds training before step 9 until the follower says it waits for step 12 (a `sitecustomize` the jobs inherit
through PYTHONPATH, tests/slurm_fixtures.py `step_hook`): a follower that did not run beside training could
not release it, and training would write step 12 before the follower evaluated step 8.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import pytest
import submitit

from slurm.cli import main
from tests.slurm_fixtures import (  # noqa: F401 (fixtures: pytest finds them in this module)
    LOCAL,
    _cluster,
    _in_repo,
    logs,
    sacct_times,
    step_hook,
    wait,
)
from tests.test_follow import SETTINGS, curve_rows, ldit, point, world  # noqa: F401 (world: a fixture)

pytestmark = pytest.mark.slurm
HOLD_S = 240
"""How long training waits before step 9 for the follower to wait for step 12 (then it goes on)."""


def submit_followed(w: dict[str, Path], tmp_path: Path, name: str, nodes: int, tasks: int, capsys):
    """`ldit train … --slurm --follow-eval` of 12 steps, milestones 4, 8, 12: (training job, follower job)."""
    follow_yaml = tmp_path / "follow.yaml"
    follow_yaml.write_text(
        f"_base_: {w['eval']}\nfollow_poll_s: 1\nfollow_settle_s: 3\n"
    )  # a poll asks sacct, squeue
    argv = ["train", "configs/dit/tiny_cpu.yaml", f"data.shards={w['latents']}", f"run.root={tmp_path / 'runs'}",
            f"run.name={name}", "steps=12", "export.every=4", "ckpt.every=12", "log.every=1", "--slurm",
            "--cluster", str(LOCAL), f"cluster.folder={tmp_path}/logs/%j", f"cluster.nodes={nodes}",
            f"cluster.tasks_per_node={tasks}", "--follow-eval", str(follow_yaml)]  # fmt: skip
    assert main(argv) == 0
    printed = capsys.readouterr().out
    train_id = re.search(r"submitted SLURM job (\d+) ", printed).group(1)
    eval_id = re.search(r"submitted the eval follower: SLURM job (\d+) ", printed).group(1)
    train = submitit.SlurmJob(folder=f"{tmp_path}/logs/%j", job_id=train_id, tasks=range(nodes * tasks))
    return train, submitit.SlurmJob(folder=f"{tmp_path}/logs/%j", job_id=eval_id, tasks=range(tasks))


def inherit_hook(tmp_path: Path, monkeypatch, before: str) -> None:
    """Both jobs inherit a `step_hook(before)` (only training runs it) and one thread per rank."""
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(step_hook(before))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(hook), os.environ.get("PYTHONPATH")])))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # 6 ranks on the test machine's cores


def status_lines(run: Path, capsys) -> list[str]:
    assert main(["status", str(run)]) == 0
    return capsys.readouterr().out.splitlines()


def job_line(run: Path, job_id: str, state: str, resources: str) -> str:
    """The line `ldit status` prints for a job of the run (its submission time from slurm/jobs.jsonl)."""
    (rec,) = [r for r in map(json.loads, (run / "slurm" / "jobs.jsonl").read_text().splitlines())
              if r["job_id"] == job_id]  # fmt: skip
    return f"    {job_id:>8}  ldit {rec['job']:<8} {state:<32} submitted {rec['submitted']}  {resources}"


def test_follower_job_evaluates_each_export_while_training_runs(world, tmp_path, capsys, monkeypatch):  # noqa: F811
    """Training on 2 nodes × 2 tasks and the follower on 1 node × 2 tasks run at the same time: the follower
    evaluates steps 4 and 8 while training waits before step 9, is told by SLURM that training is running while
    it waits for step 12, and ends after evaluating it; `ldit status` shows both jobs COMPLETED."""
    run = tmp_path / "runs" / "followed"
    curve = run / "eval" / SETTINGS / "curve.csv"
    inherit_hook(tmp_path, monkeypatch, (
        f"logs, deadline = {str(tmp_path / 'logs')!r}, time.monotonic() + {HOLD_S}\n"
        "                while step == 8 and time.monotonic() < deadline and not any(\n"
        "                    'follow: waiting for export step-00000012' in open(f).read()\n"
        "                    for f in __import__('glob').glob(logs + '/*/*_0_log.out')):\n"
        "                    time.sleep(0.2)"
    ))  # fmt: skip
    train, follower = submit_followed(world, tmp_path, "followed", 2, 2, capsys)
    try:
        assert wait(train, HOLD_S + 180) == "COMPLETED", logs(train)
        assert wait(follower, 180) == "COMPLETED", logs(follower)
    finally:
        train.cancel(check=False)
        follower.cancel(check=False)
    said = Path(follower.paths.stdout).read_text()
    assert f"follow: done: the last export (step 12) is evaluated; curve {curve.parent}" in said, said
    waited = "follow: waiting for export step-00000012 of followed (training is pending or running; "
    assert waited in said, said  # training_alive asked SLURM
    assert [r["step"] for r in curve_rows(run)] == ["4", "8", "12"]
    assert [float(r["samples_seen"]) for r in curve_rows(run)] == [64, 128, 192]
    assert (run / "eval" / SETTINGS / "curve.png").is_file()
    # At the same time: the follower evaluated step 8 before training wrote step 12, and the jobs overlap.
    evaluated_8 = (point(run, 8) / "metrics.json").stat().st_mtime
    assert evaluated_8 < (run / "export" / "step-00000012").stat().st_mtime
    times = sacct_times(train.job_id, follower.job_id)
    (t0, t1), (f0, f1) = times[train.job_id], times[follower.job_id]
    assert f0 < t1 and t0 < f1, f"training {t0} - {t1}, follower {f0} - {f1}"
    # The follower job's point (2 ranks under SLURM) is what `ldit eval … step=12` (1 local rank) writes.
    copy = tmp_path / "runs" / "copy"
    shutil.copytree(run / "export", copy / "export", symlinks=True)
    ldit("eval", str(world["eval"]), f"run.root={copy.parent}", "run.name=copy", "step=12")
    assert (point(copy, 12) / "metrics.json").read_bytes() == (point(run, 12) / "metrics.json").read_bytes()
    lines = status_lines(run, capsys)
    assert job_line(run, train.job_id, "COMPLETED", "2 node(s) × 2 task(s), partition debug, 10 min") in lines
    assert (
        job_line(
            run, follower.job_id, "COMPLETED", "1 node(s) × 2 task(s), partition debug, 10 min, --follow"
        )
        in lines
    ), lines


def test_follower_job_fails_when_training_fails_before_the_next_export(world, tmp_path, capsys, monkeypatch):  # noqa: F811
    """Training (1 node × 1 task: the quickest to start) fails at step 6 with an input error, after the export
    of step 4 and before step 8's: not retried, it ends FAILED; the follower evaluates step 4, is told by SLURM
    that training is over, and ends FAILED too, naming the export it waited for."""
    inherit_hook(
        tmp_path, monkeypatch, "if step == 6:\n                    raise FileNotFoundError('no step 6')"
    )
    train, follower = submit_followed(world, tmp_path, "broken", 1, 1, capsys)
    try:
        assert wait(train, 180) == "FAILED", logs(train)
        assert wait(follower, 180) == "FAILED", logs(follower)
    finally:
        train.cancel(check=False)
        follower.cancel(check=False)
    run = tmp_path / "runs" / "broken"
    assert "ldit train: error: no step 6" in Path(train.paths.stderr).read_text()
    assert (
        f"ldit eval: error: training of {run} is no longer pending or running (its SLURM jobs: slurm/jobs.jsonl) "
        "and export step-00000008 was not written; evaluated steps: 4. Resubmit the training"
    ) in Path(follower.paths.stderr).read_text()
    assert [r["step"] for r in curve_rows(run)] == ["4"]
    # slurm/heal.py retried neither: both failed on their input (the follower's FollowError is one)
    failures = [json.loads(x) for x in (run / "slurm" / "failures.jsonl").read_text().splitlines()]
    assert [(f["job_id"], f["action"]) for f in failures] == [
        (train.job_id, "not retried: the job's input is wrong (it would fail the same way again)"),
        (follower.job_id, "not retried: the job's input is wrong (it would fail the same way again)"),
    ], failures
    lines = status_lines(run, capsys)
    assert job_line(run, train.job_id, "FAILED", "1 node(s) × 1 task(s), partition debug, 10 min") in lines
    assert (
        job_line(run, follower.job_id, "FAILED", "1 node(s) × 1 task(s), partition debug, 10 min, --follow")
        in lines
    ), lines
