"""Real SLURM jobs that are stopped and requeued (marker `slurm`): a time limit's signal, to the launcher's
test job (tests/workers/slurm_task.py) and to the tiny DiT's `ldit train`, and a preemption's SIGTERM; and a
 The shared helpers are in
tests/slurm_fixtures.py.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
import submitit

from slurm.cli import main
from slurm.submit import submit
from tests.conftest import ROOT
from tests.slurm_fixtures import (  # noqa: F401 (fixtures: pytest finds them in this module)
    LOCAL,
    TEST_JOB,
    _cluster,
    _in_repo,
    cluster,
    logs,
    squeue,
    step_hook,
    wait,
)

pytestmark = pytest.mark.slurm


def test_time_limit_requeues_and_the_second_run_completes(tmp_path):
    """A 1-minute limit with the signal 15 s before it: the first run (which would go on for 300 s)
    gets USR2 and the job is requeued; the second run completes. With slow_first_run submitit's
    handler takes the signal; with stop_first_run the job takes it on every rank as the trainer does
    (StopSignals, agree, exit 75) and `slurm.submit` hands it back to submitit to requeue. Both jobs
    run at once (most of the time is spent waiting for the signal).

    slurmctld checks time limits every 30 s and signals a job once it is within signal delay + 30 s of
    its limit: here 15 to 45 s after the start. A larger delay would signal the job at once, before
    submitit has installed its handler (the task then dies of USR2 and the job fails).
    """
    c = cluster(tmp_path, "nodes=2", "tasks_per_node=1", "time_min=1", "signal_delay_s=15")
    jobs = {}
    for mode in ("slow_first_run", "stop_first_run"):
        (tmp_path / mode).mkdir()
        jobs[mode] = submit(TEST_JOB, [], [f"out={tmp_path / mode}", f"mode={mode}", "sleep_s=300"], c)
    start = time.monotonic()
    for mode, job in jobs.items():
        out = tmp_path / mode
        assert wait(job, 240) == "COMPLETED", logs(job)
        print(f"{mode}: requeued job {job.job_id} finished after {time.monotonic() - start:.1f} s")
        runs = (out / "runs.txt").read_text().splitlines()
        assert [r.split()[:2] for r in runs] == [["run", "0"], ["run", "1"]], runs  # SLURM_RESTART_COUNT
        assert job.results() == [None, None]
        rank0_log = Path(job.paths.stdout).read_text() + Path(job.paths.stderr).read_text()
        assert "Caught signal SIGUSR2" in rank0_log
        assert f"Requeued job {job.job_id} (2 remaining timeouts)" in rank0_log
        if mode == "stop_first_run":  # every rank saw the signal and stopped at the same step
            saved = [(out / f"saved{r}.txt").read_text() for r in (0, 1)]
            assert saved[0] == saved[1] and saved[0].endswith(f"signal {int(signal.SIGUSR2)}"), saved
            assert "exit 75 asks to be requeued" in rank0_log
        history = subprocess.run(
            ["sacct", "-X", "-n", "--duplicates", "-j", job.job_id, "-o", "State"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.split()
        assert history == ["REQUEUED", "COMPLETED"], history


SLOW_STEPS = step_hook("time.sleep(0.08)")


def test_time_limit_requeues_training_and_it_ends_like_an_uninterrupted_run(tmp_path, capsys, monkeypatch):
    """A 2-minute limit stops the tiny DiT mid-run: every rank saves, submitit requeues the job, it resumes
    from that checkpoint, and it ends with the same steps and losses as the same run with no limit."""
    import json
    import sys

    import torch
    from safetensors.torch import load_file

    from tests.conftest import clean_env
    from tests.data_fixtures import gaussian_latent_set

    # SLURM signals 45-75 s after the start (below), so the run must outlast 75 s on any machine: its steps
    # take 0.024-0.075 s here (a fresh-clone CI run did 1000 in 44 s and was never signalled), so a
    # `sitecustomize` the job inherits through PYTHONPATH adds 0.08 s to each step (ShardGuard.take, once a
    # step on every rank): 800 steps take at least 83 s, and the run needs at least one requeue.
    steps = 800
    slow = tmp_path / "slow"
    slow.mkdir()
    (slow / "sitecustomize.py").write_text(SLOW_STEPS)
    straight_env = clean_env()  # the reference run, unslowed
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(slow), os.environ.get("PYTHONPATH")])))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the job inherits it: the reference's thread count
    gaussian_latent_set(tmp_path / "latents")
    common = ["configs/dit/tiny_cpu.yaml", f"data.shards={tmp_path / 'latents'}", f"run.root={tmp_path / 'runs'}",
              f"steps={steps}", "ckpt.every=100000", "log.every=1"]  # fmt: skip
    argv = [
        "train",
        *common,
        "run.name=limited",
        "--slurm",
        "--cluster",
        str(LOCAL),
        f"cluster.folder={tmp_path}/logs/%j",
    ]
    # SLURM signals 45-75 s before the 2-minute limit (slurmctld looks every 30 s): 20-60 s of training a segment
    argv += ["cluster.time_min=2", "cluster.signal_delay_s=45", "cluster.max_requeues=8"]
    assert main(argv) == 0
    job_id = re.search(r"submitted SLURM job (\d+) ", capsys.readouterr().out).group(1)
    job = submitit.SlurmJob(folder=f"{tmp_path}/logs/%j", job_id=job_id, tasks=range(4))
    assert wait(job, 1500) == "COMPLETED", logs(job)
    ref = subprocess.run([sys.executable, "-m", "slurm.cli", "train", *common, "run.name=straight", "--local", "4"],
                         cwd=ROOT, env=straight_env, capture_output=True, text=True, timeout=900)  # fmt: skip
    assert ref.returncode == 0, ref.stderr[-3000:]
    history = subprocess.run(
        ["sacct", "-n", "-X", "-D", "-o", "State", "-j", job_id], capture_output=True, text=True
    ).stdout.split()
    assert "REQUEUED" in history and history[-1] == "COMPLETED", history
    runs = tmp_path / "runs"
    limited = [json.loads(line) for line in (runs / "limited" / "log.jsonl").read_text().splitlines()]
    straight = [json.loads(line) for line in (runs / "straight" / "log.jsonl").read_text().splitlines()]
    assert [e["step"] for e in limited] == list(range(1, steps + 1))  # every step once (log.every=1: a
    assert [e["loss/total"] for e in limited] == [
        e["loss/total"] for e in straight
    ]  # window never spans a resume)
    a = load_file(str(runs / "limited" / "export" / "latest" / "ema.safetensors"))
    b = load_file(str(runs / "straight" / "export" / "latest" / "ema.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    saved = sorted(p.name for p in (runs / "limited" / "checkpoints").glob("step-*"))
    assert saved[-1] == f"step-{steps:08d}" and len(saved) >= 2  # a checkpoint at the signal, and the last


def test_preemption_signal_requeues_training_and_it_ends_like_an_uninterrupted_run(
    tmp_path, capsys, monkeypatch
):
    """A running tiny DiT gets SIGTERM on every task, as SLURM's preemption delivers it; it saves, is requeued,
    resumes, and ends with every step's loss and the EMA equal to an uninterrupted run's.

    A true preemption is not possible on the test cluster: its slurm.conf (slurm/scripts/slurm.conf.in) has
    the default PreemptType=preempt/none and one partition, and slurmctld reads PreemptType only at start.
    With PreemptMode=REQUEUE SLURM would send SIGCONT + SIGTERM to the job's tasks (and, with
    `preempt_send_user_signal`, the --signal USR2), wait GraceTime and requeue the job. The nearest real
    mechanism is used instead: `scancel --signal=TERM` makes slurmd deliver SIGTERM to every task of the job
    (not to the batch shell). submitit's own handler ignores SIGTERM; the trainer catches it on every rank,
    agrees, saves and exits 75, and `slurm.submit` hands the signal to submitit, which finds the job well
    inside its time limit, calls it pre-empted (no time-out counted: 3 remaining of max_requeues=3) and
    requeues it with `scontrol requeue`. (`scontrol requeue <job>` alone would kill the tasks after
    KillWait=5 s and start the job again without letting it save.)

    The limit is 30 minutes, not local.yaml's 10: submitit calls a signalled job timed out once its walltime
    reaches min(0.8 * limit, limit - 10 min), which is 0 s for limits of 10 minutes or less, so there every
    pre-emption would count against max_requeues.
    """
    import json
    import sys

    import torch
    from safetensors.torch import load_file

    from tests.conftest import clean_env
    from tests.data_fixtures import gaussian_latent_set

    steps = 200
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the job inherits it: the reference's thread count
    gaussian_latent_set(tmp_path / "latents")
    runs = tmp_path / "runs"
    common = ["configs/dit/tiny_cpu.yaml", f"data.shards={tmp_path / 'latents'}", f"run.root={runs}",
              f"steps={steps}", "ckpt.every=100000", "log.every=1"]  # fmt: skip
    argv = ["train", *common, "run.name=preempted", "--slurm", "--cluster", str(LOCAL),
            f"cluster.folder={tmp_path}/logs/%j", "cluster.nodes=1", "cluster.time_min=30"]  # fmt: skip
    assert main(argv) == 0
    job_id = re.search(r"submitted SLURM job (\d+) ", capsys.readouterr().out).group(1)
    job = submitit.SlurmJob(folder=f"{tmp_path}/logs/%j", job_id=job_id, tasks=range(2))
    jsonl = runs / "preempted" / "log.jsonl"
    deadline = time.monotonic() + 180
    while not (jsonl.is_file() and len(jsonl.read_text().splitlines()) >= 30):  # inside the training loop
        assert time.monotonic() < deadline and squeue(job_id).split()[0] in {"PENDING", "RUNNING"}, logs(job)
        time.sleep(0.5)
    subprocess.run(["scancel", "--signal=TERM", job_id], check=True)
    start = time.monotonic()
    # the uninterrupted reference runs meanwhile (2 ranks, the same thread count)
    ref = subprocess.Popen([sys.executable, "-m", "slurm.cli", "train", *common, "run.name=straight", "--local", "2"],
                           cwd=ROOT, env=clean_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert wait(job, 400) == "COMPLETED", logs(job)
        print(f"pre-empted job {job_id} completed {time.monotonic() - start:.1f} s after the signal")
        _, err = ref.communicate(timeout=600)
    finally:
        ref.kill()
    assert ref.returncode == 0, err[-3000:]
    history = subprocess.run(
        ["sacct", "-n", "-X", "-D", "-o", "State", "-j", job_id], capture_output=True, text=True, check=True
    ).stdout.split()
    assert history == ["REQUEUED", "COMPLETED"], history
    rank0 = Path(job.paths.stdout).read_text() + Path(job.paths.stderr).read_text()
    stopped = re.search(
        r"stopped by signal \w+ at step (\d+), checkpoint saved; exit 75 asks to be requeued", rank0
    )
    assert stopped, rank0[-3000:]
    at = int(stopped.group(1))
    assert 30 <= at < steps and f"resumed preempted at step {at}\n" in rank0
    assert "this job is preempted" in rank0 and f"Requeued job {job_id} (3 remaining timeouts)" in rank0
    limited = [json.loads(line) for line in jsonl.read_text().splitlines()]
    straight = [json.loads(line) for line in (runs / "straight" / "log.jsonl").read_text().splitlines()]
    assert [e["step"] for e in limited] == list(range(1, steps + 1))
    assert [e["loss/total"] for e in limited] == [e["loss/total"] for e in straight]
    a = load_file(str(runs / "preempted" / "export" / "latest" / "ema.safetensors"))
    b = load_file(str(runs / "straight" / "export" / "latest" / "ema.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    saved = sorted(p.name for p in (runs / "preempted" / "checkpoints").glob("step-*"))
    assert saved == [f"step-{at:08d}", f"step-{steps:08d}"]
