"""Jobs that heal themselves (issue #20, marker `slurm`): on the test cluster, a rank SIGKILLed, a node killed
whole (its slurmd, step daemon and ranks), and a bug at the same step of every attempt. No human command
between the fault and the end; slurm/heal.py, the teardown of every job's batch script, does what a person did.

The tiny DiT runs 400 steps, checkpointed every 100, on 2 nodes x 2 tasks; the fault comes after step 150.
The uninterrupted run it is compared with runs once per module, on 4 local processes, at the thread count
the jobs inherit (OMP_NUM_THREADS=1), so equal means bitwise equal.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import submitit
import torch
from safetensors.torch import load_file

from slurm.cli import main
from tests.conftest import ROOT, clean_env
from tests.data_fixtures import gaussian_latent_set
from tests.slurm_fixtures import (  # noqa: F401 (fixtures: pytest finds them in this module)
    LOCAL,
    _cluster,
    _in_repo,
    logs,
    squeue,
    step_hook,
    wait,
)

pytestmark = pytest.mark.slurm
STEPS, EVERY, FAULT_AFTER = 400, 100, 150
STATE = Path(os.environ.get("LDIT_SLURM_DIR", "/tmp/ldit-slurm")) / "current"


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """The latents, and the uninterrupted run `runs/straight` (4 local ranks)."""
    base = tmp_path_factory.mktemp("heal")
    gaussian_latent_set(base / "latents")
    ref = subprocess.run([sys.executable, "-m", "slurm.cli", "train", *common(base), "run.name=straight", "--local", "4"],
                         cwd=ROOT, env=clean_env(), capture_output=True, text=True, timeout=900)  # fmt: skip
    assert ref.returncode == 0, ref.stderr[-3000:]
    return base


def common(base: Path) -> list[str]:
    return ["configs/dit/tiny_cpu.yaml", f"data.shards={base / 'latents'}", f"run.root={base / 'runs'}",
            f"steps={STEPS}", f"ckpt.every={EVERY}", "ckpt.keep_last=10", "log.every=1"]  # fmt: skip


def submit_run(base: Path, name: str, capsys, *extra: str) -> submitit.SlurmJob:
    argv = ["train", *common(base), f"run.name={name}", "--slurm", "--cluster", str(LOCAL),
            f"cluster.folder={base}/logs/%j", *extra]  # fmt: skip
    assert main(argv) == 0
    job_id = re.search(r"submitted SLURM job (\d+) ", capsys.readouterr().out).group(1)
    return submitit.SlurmJob(folder=f"{base}/logs/%j", job_id=job_id, tasks=range(4))


def log_of(run: Path) -> list[dict]:
    path = run / "log.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def wait_for_steps(job: submitit.SlurmJob, run: Path, n: int) -> None:
    deadline = time.monotonic() + 180
    while len(log_of(run)) < n:
        assert time.monotonic() < deadline and squeue(job.job_id).split()[0] in {"PENDING", "RUNNING"}, logs(
            job
        )
        time.sleep(0.1)


def ranks(job_id: str, node: str | None = None, rank: int | None = None) -> list[psutil.Process]:
    """The job's rank processes (on `node`, or of `rank`)."""
    found = []
    for p in psutil.process_iter(["name"]):
        try:
            env = p.environ()
        except (psutil.AccessDenied, psutil.NoSuchProcess):
            continue
        if env.get("SLURM_JOB_ID") != job_id or "python" not in p.name() or "SLURM_PROCID" not in env:
            continue
        if (node is None or env.get("SLURMD_NODENAME") == node) and (
            rank is None or env["SLURM_PROCID"] == str(rank)
        ):
            found.append(p)
    return found


def history(job_id: str) -> list[str]:
    """The state of each attempt of the job, from accounting ("CANCELLED by 0" shows as CANCELLED+)."""
    out = subprocess.run(["sacct", "-n", "-X", "-D", "-o", "State", "-j", job_id],
                         capture_output=True, text=True, check=True).stdout  # fmt: skip
    return [s.rstrip("+") for s in out.split()]


def resumed_after(run: Path, at: float, deadline_s: float = 300) -> float:
    """Seconds from `at` (a fault after step FAULT_AFTER) until the run logs its first step after resuming from
    the checkpoint at step EVERY: the resumed run cuts log.jsonl back to that step, then appends."""
    cut = False
    while True:
        entries = log_of(run)
        cut = cut or bool(entries and entries[-1]["step"] < FAULT_AFTER)
        if cut and entries[-1]["step"] > EVERY:
            return time.time() - at
        assert time.time() - at < deadline_s, f"no resumed step logged {deadline_s} s after the fault"
        time.sleep(0.05)


def same_as_straight(base: Path, name: str, upto: int = STEPS) -> None:
    run, straight = log_of(base / "runs" / name), log_of(base / "runs" / "straight")
    assert [e["step"] for e in run] == list(range(1, STEPS + 1))  # every step once
    assert [e["loss/total"] for e in run[:upto]] == [e["loss/total"] for e in straight[:upto]]


def test_a_killed_rank_requeues_the_job_which_ends_like_an_uninterrupted_run(base, capsys, monkeypatch):
    """Rank 3 SIGKILLed after step 150: srun's --kill-on-bad-exit ends the other ranks at once, the teardown
    requeues the job (same id), it resumes from step 100 and ends with every loss and the EMA of the
    uninterrupted run; `ldit status` shows the failure and the requeue."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    run = base / "runs" / "killed"
    job = submit_run(base, "killed", capsys)
    try:
        wait_for_steps(job, run, FAULT_AFTER)
        (victim,) = ranks(job.job_id, rank=3)
        victim.send_signal(signal.SIGKILL)
        killed = time.time()
        back = resumed_after(run, killed)
        assert wait(job, 300) == "COMPLETED", logs(job)
    finally:
        subprocess.run(["scancel", job.job_id], check=False)
    failures = [json.loads(x) for x in (run / "slurm" / "failures.jsonl").read_text().splitlines()]
    assert len(failures) == 1, failures
    (f,) = failures
    # srun's first line names the killed rank; had a survivor's exit reached srun first, it names the lost peer
    assert f["reason"] == "task 3 on n2: Killed" or re.fullmatch(
        r"task [0-2] on n[12]: Exited with exit code 76 \(ldit train: a peer was lost .*\)", f["reason"]
    ), f
    assert f["action"] == "requeued (failure 1 of max_failures=3 in a row)" and f["lost_nodes"] == [], f
    assert f["latest"] == f"step-{EVERY:08d}"
    assert history(job.job_id) == ["REQUEUED", "COMPLETED"]
    same_as_straight(base, "killed")
    a = load_file(str(run / "export" / "latest" / "ema.safetensors"))
    b = load_file(str(base / "runs" / "straight" / "export" / "latest" / "ema.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert main(["status", str(run)]) == 0
    status = capsys.readouterr().out
    assert re.search(rf"{job.job_id}\s+ldit train\s+COMPLETED.*requeued 1x", status), status
    assert (
        f"job {job.job_id} attempt 0: {f['reason']}; requeued (failure 1 of max_failures=3 in a row)"
        in status
    )
    print(f"rank 3 killed: requeued at {f['time']}, first resumed step logged {back:.1f} s after the kill")


def test_a_bug_at_the_same_step_stops_after_max_failures(base, capsys, monkeypatch):
    """Every attempt fails at step 5 (a RuntimeError injected through an inherited sitecustomize): the job is
    requeued once (max_failures=1), then ends FAILED, and `ldit status` says why."""
    hook = base / "bug"
    hook.mkdir(exist_ok=True)
    (hook / "sitecustomize.py").write_text(
        step_hook("if step == 5:\n                    raise RuntimeError('injected bug at step 5')")
    )
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(hook), os.environ.get("PYTHONPATH")])))
    run = base / "runs" / "buggy"
    job = submit_run(base, "buggy", capsys, "cluster.max_failures=1")
    try:
        assert wait(job, 300) == "FAILED", logs(job)
    finally:
        subprocess.run(["scancel", job.job_id], check=False)
    failures = [json.loads(x) for x in (run / "slurm" / "failures.jsonl").read_text().splitlines()]
    assert [f["attempt"] for f in failures] == [0, 1], failures
    assert all("RuntimeError: injected bug at step 5" in f["reason"] for f in failures), failures
    assert [f["action"] for f in failures] == [
        "requeued (failure 1 of max_failures=1 in a row)",
        "gave up: 2 failures in a row without a new checkpoint (max_failures=1)",
    ]
    assert history(job.job_id) == ["REQUEUED", "FAILED"]
    assert main(["status", str(run)]) == 0
    status = capsys.readouterr().out
    assert re.search(rf"{job.job_id}\s+ldit train\s+FAILED.*requeued 1x", status), status
    assert "gave up: 2 failures in a row without a new checkpoint (max_failures=1)" in status


def restart_n2() -> None:
    """Start n2's slurmd again (if it is not running) and wait until the node is idle."""
    pid_file = STATE / "pids" / "slurmd-n2.pid"
    alive = pid_file.is_file() and psutil.pid_exists(int(pid_file.read_text() or 0))
    if not alive:
        subprocess.run(["/usr/sbin/slurmd", "-N", "n2"], check=True)
    deadline = time.monotonic() + 60
    while (
        "n2 idle"
        not in subprocess.run(["sinfo", "-h", "-N", "-o", "%N %t"], capture_output=True, text=True).stdout
    ):
        assert time.monotonic() < deadline, "n2 did not come back"
        time.sleep(1)


def test_a_lost_node_continues_the_run_on_the_other_node(base, capsys, monkeypatch):
    """Node n2 dies whole after step 150 (its slurmd, the step's daemon on it and its two ranks, SIGKILLed by
    pid) and stays down. slurmctld marks it DOWN (SlurmdTimeout 10 s), srun ends, and the teardown, after
    waiting regrow_wait_s=5 for a second healthy node, submits the run again on n1 alone (2 ranks), without
    n2. The losses equal the uninterrupted run's up to the checkpoint at step 100; after it the run equals,
    bitwise, a 2-rank run resumed from that same checkpoint (the universal conversion, the elastic reader).
    An eval submitted `--after` the first job is moved to wait on the second."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    run = base / "runs" / "lost"
    job = submit_run(base, "lost", capsys, "cluster.regrow_wait_s=5")
    where = ["--slurm", "--cluster", str(LOCAL), f"cluster.folder={base}/logs/%j", "cluster.nodes=1",
             "cluster.tasks_per_node=1"]  # fmt: skip
    assert (
        main(
            [
                "eval",
                f"run.root={base / 'runs'}",
                "run.name=lost",
                "num_samples=8",
                *where,
                "--after",
                job.job_id,
            ]
        )
        == 0
    )
    evaluation = re.search(r"submitted SLURM job (\d+) ", capsys.readouterr().out).group(
        1
    )  # waits on training
    then = None
    try:
        wait_for_steps(job, run, FAULT_AFTER)
        on_n2 = ranks(job.job_id, node="n2")
        assert len(on_n2) == 2
        stepd = {p.parent() for p in on_n2}
        slurmd = psutil.Process(int((STATE / "pids" / "slurmd-n2.pid").read_text()))
        for p in [slurmd, *stepd, *on_n2]:
            p.kill()
        killed = time.time()
        assert wait(job, 300) == "COMPLETED", logs(job)  # the teardown handed the run on
        jobs = [json.loads(x) for x in (run / "slurm" / "jobs.jsonl").read_text().splitlines()]
        assert [j["job"] for j in jobs] == ["train", "eval", "train"], jobs
        then = submitit.SlurmJob(folder=f"{base}/logs/%j", job_id=jobs[2]["job_id"], tasks=range(2))
        waits_on = subprocess.run(
            ["scontrol", "show", "job", "-o", evaluation], capture_output=True, text=True
        ).stdout
        assert f"Dependency=afterok:{then.job_id}" in waits_on, waits_on  # moved to the job that goes on
        subprocess.run(["scancel", evaluation], check=True)
        back = resumed_after(run, killed)
        assert wait(then, 300) == "COMPLETED", logs(then)
    finally:
        for j in filter(None, [job.job_id, evaluation, then and then.job_id]):
            subprocess.run(["scancel", j], check=False)
        restart_n2()
    (f,) = [json.loads(x) for x in (run / "slurm" / "failures.jsonl").read_text().splitlines()]
    print(f"node n2 killed: handed on at {f['time']}, first resumed step logged {back:.1f} s after the kill")
    assert f["lost_nodes"] == ["n2"] and f["latest"] == f"step-{EVERY:08d}", f
    assert f["reason"].startswith("node n2 lost; task "), f
    assert re.fullmatch(rf"continued as job {then.job_id} on 1 of 2 nodes \(waited \d+ s for the rest\), without n2",
                        f["action"]), f  # fmt: skip
    assert jobs[2]["resources"] == "1 node(s), without n2"
    topology = json.loads((run / "topology.json").read_text())
    assert topology["world_size"] == 2
    rank0 = Path(then.paths.stdout).read_text()
    assert f"resumed lost at step {EVERY} (elastic: universal checkpoint)" in rank0
    same_as_straight(base, "lost", upto=EVERY)
    # After the change: a 2-rank run resumed from a copy of the same checkpoint gives the same steps, bitwise.
    twin = base / "runs" / "twin"
    (twin / "checkpoints").mkdir(parents=True)
    shutil.copytree(
        run / "checkpoints" / f"step-{EVERY:08d}", twin / "checkpoints" / f"step-{EVERY:08d}", symlinks=True
    )
    (twin / "checkpoints" / "latest").write_text(f"step-{EVERY:08d}")
    ref = subprocess.run([sys.executable, "-m", "slurm.cli", "train", *common(base), "run.name=twin", "--local", "2"],
                         cwd=ROOT, env=clean_env(), capture_output=True, text=True, timeout=900)  # fmt: skip
    assert ref.returncode == 0, ref.stderr[-3000:]
    assert [e["step"] for e in log_of(twin)] == list(range(EVERY + 1, STEPS + 1))
    assert [e["loss/total"] for e in log_of(run)[EVERY:]] == [e["loss/total"] for e in log_of(twin)]
    a = load_file(str(run / "export" / "latest" / "ema.safetensors"))
    b = load_file(str(twin / "export" / "latest" / "ema.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_stalled_rank_is_flagged_within_a_minute_and_the_heartbeat_requeues_the_job(base, capsys):
    """Rank 3 frozen (SIGSTOP): SLURM still says RUNNING while the other ranks wait in a collective
    (collective_timeout_s=300). `ldit status` flags the run as stalled once its log has been silent past its
    bound (45 s for the tiny DiT), within a minute; at heartbeat_s=70 the other ranks end themselves (exit 76),
    srun ends the frozen one, and the teardown requeues the job, which trains again. Then `scancel` ends it for
    good: the ranks save on its SIGTERM and the job is not requeued again."""
    run = base / "runs" / "stall"
    job = submit_run(base, "stall", capsys, "steps=1000000", "ckpt.every=1000000", "collective_timeout_s=300",
                     "heartbeat_s=70")  # fmt: skip
    frozen: list[psutil.Process] = []
    try:
        wait_for_steps(job, run, 20)
        frozen = ranks(job.job_id, rank=3)
        assert frozen, "rank 3's process not found"
        for p in frozen:
            p.suspend()  # SIGSTOP
        stopped = time.monotonic()
        while True:
            assert main(["status", str(run)]) == 0
            status = capsys.readouterr().out
            if "STALLED" in status:
                break
            assert time.monotonic() - stopped < 60, status
            assert re.search(rf"{job.job_id}\s+ldit train\s+RUNNING", status), status
            time.sleep(2)
        flagged = time.monotonic() - stopped
        assert 40 <= flagged < 60  # the last line may have been written just before the SIGSTOP
        assert re.search(
            r"STALLED: a job is RUNNING but nothing was logged for \d+ s \(bound 45 s", status
        ), status
        failures = run / "slurm" / "failures.jsonl"
        while not failures.is_file():
            assert time.monotonic() - stopped < 70 + 30, logs(job)
            time.sleep(0.5)
        requeued = time.monotonic() - stopped
        seen = len(log_of(run))
        while not (0 < len(log_of(run)) < seen and len(log_of(run)) >= 5):  # trains again (from step 0)
            assert time.monotonic() - stopped < 300, logs(job)
            time.sleep(0.5)
        back = time.monotonic() - stopped
        print(
            f"rank 3 frozen: `ldit status` flagged the stall after {flagged:.1f} s; the job was requeued after "
            f"{requeued:.1f} s (heartbeat_s=70) and trained again after {back:.1f} s"
        )
        (f,) = [json.loads(x) for x in failures.read_text().splitlines()]
        assert "no training step finished for" in f["reason"] and f["action"].startswith("requeued"), f
        subprocess.run(["scancel", job.job_id], check=True)
        assert wait(job, 120) == "CANCELLED"
        time.sleep(5)  # a requeue would show by now
        assert history(job.job_id) == ["REQUEUED", "CANCELLED"]
    finally:
        for p in frozen:
            with contextlib.suppress(psutil.Error):  # gone already, when the test got that far
                p.resume()
        subprocess.run(
            ["scancel", "--signal=KILL", job.job_id], check=False, capture_output=True
        )  # no leftover
        subprocess.run(["scancel", job.job_id], check=False)
