"""Real SLURM jobs through `slurm.submit` on the test cluster (slurm/scripts/cluster_up.sh; marker `slurm`).

The launcher's own mechanics (placement, `afterok`, the time-limit signal) are tested with
tests/workers/slurm_task.py, a job registered for these tests only that runs on every task exactly as an
`ldit` job would (same submit path, same `slurm.env.init_distributed`); the real jobs follow: `ldit train`
of the tiny DiT on 2 nodes, chained to `ldit eval` with `--then-eval` and `--after`, and `ldit sweep`.
Jobs stopped and requeued are in tests/test_slurm_requeue.py; the shared helpers in tests/slurm_fixtures.py. Each test uses a fresh submitit folder (job ids
restart at 1 on a fresh cluster, and an old folder could hand back a stale result).
"""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest
import submitit

from slurm.cli import main
from slurm.jobs import JOBS
from slurm.submit import submit
from tests.conftest import ROOT, read_ranks
from tests.data_fixtures import latent_set
from tests.slurm_fixtures import (  # noqa: F401 (fixtures: pytest finds them in this module)
    LOCAL,
    TEST_JOB,
    _cluster,
    _in_repo,
    cluster,
    logs,
    sacct_times,
    squeue,
    wait,
)

pytestmark = pytest.mark.slurm


def test_two_nodes_two_tasks_all_reduce(tmp_path, monkeypatch):
    """A 2-node × 2-task job: ranks 0..3 over n1 and n2, gloo rendezvous at n1, all-reduce correct.

    The submitting process looks like a task of another job (SLURM and rendezvous variables set);
    the submission must not pass them on (`clean_env`): with them, srun refuses to start
    (SLURM_MEM_PER_CPU next to --mem) and the ranks would take RANK=7 of WORLD_SIZE=9.
    """
    for key, value in dict(
        SLURM_JOB_ID="999", SLURM_MEM_PER_CPU="1", RANK="7", WORLD_SIZE="9", MASTER_PORT="1"
    ).items():
        monkeypatch.setenv(key, value)
    out = tmp_path / "out"
    out.mkdir()
    job = submit(TEST_JOB, [], [f"out={out}"], cluster(tmp_path, "mem_gb=1"))
    start = time.monotonic()
    assert wait(job, 120) == "COMPLETED", logs(job)
    print(f"2x2 job {job.job_id} finished in {time.monotonic() - start:.1f} s")
    assert job.results() == [None] * 4
    ranks = read_ranks(out, 4)
    assert [r["rank"] for r in ranks] == [0, 1, 2, 3]
    assert [r["world_size"] for r in ranks] == [4] * 4
    assert [r["local_rank"] for r in ranks] == [0, 1, 0, 1]
    assert [r["node"] for r in ranks] == ["n1", "n1", "n2", "n2"]
    assert [r["master_addr"] for r in ranks] == ["n1"] * 4
    assert [r["backend"] for r in ranks] == ["gloo"] * 4
    assert [r["all_reduce"] for r in ranks] == [10.0] * 4  # 1 + 2 + 3 + 4


def test_afterok_child_of_a_failed_job_never_runs(tmp_path, monkeypatch, capsys):
    """The parent fails; the child, submitted with `ldit ... --slurm --after`, stays pending with
    reason DependencyNeverSatisfied and never runs."""
    out = tmp_path / "out"
    out.mkdir()
    one_task = ("nodes=1", "tasks_per_node=1")
    parent = submit(TEST_JOB, [], [f"out={out}", "mode=fail"], cluster(tmp_path, *one_task))
    monkeypatch.setitem(JOBS, TEST_JOB.name, TEST_JOB)
    argv = [TEST_JOB.name, f"out={out}", "--slurm", "--cluster", str(LOCAL), "--after", parent.job_id]
    argv += [f"cluster.folder={tmp_path}/logs/%j", *(f"cluster.{o}" for o in one_task)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    child_id = re.search(r"submitted SLURM job (\d+) ", printed).group(1)
    assert f"after job {parent.job_id} succeeds" in printed and f"{child_id}_0_log.out" in printed
    child = submitit.SlurmJob(folder=f"{tmp_path}/logs/%j", job_id=child_id)
    try:
        assert wait(parent, 120) == "FAILED", logs(parent)
        with pytest.raises(submitit.core.utils.FailedJobError, match="ldit slurm-test exited with code 1"):
            parent.results()
        assert "ldit slurm-test: error: this job fails on purpose" in Path(parent.paths.stderr).read_text()
        deadline = time.monotonic() + 60
        while (state := squeue(child_id)) != "PENDING DependencyNeverSatisfied":
            assert state.startswith("PENDING"), f"the child left the queue or ran: {state!r}"
            assert time.monotonic() < deadline, f"child {child_id} still {state!r} after 60 s"
            time.sleep(1)
        time.sleep(3)  # a few more scheduling passes: it must still not start
        assert squeue(child_id) == "PENDING DependencyNeverSatisfied"
        assert not list(out.iterdir()) and not list(Path(child.paths.folder).glob("*_log.*"))
    finally:
        child.cancel(check=False)


def test_ldit_train_on_two_nodes(tmp_path, capsys):
    """`ldit train configs/dit/tiny_cpu.yaml --slurm`: DeepSpeed ZeRO-2 on 2 fake nodes × 2 ranks (gloo)
    through the CLI, to the last step's checkpoint (the trainer's own tests check its numbers)."""
    latent_set(tmp_path / "latents", sizes=(16,) * 8, shape=(32, 16, 16), classes=10)
    argv = ["train", "configs/dit/tiny_cpu.yaml", f"data.shards={tmp_path / 'latents'}"]
    argv += [f"run.root={tmp_path / 'runs'}", "run.name=slurm", "steps=10", "ckpt.every=10"]
    argv += ["--slurm", "--cluster", str(LOCAL), f"cluster.folder={tmp_path}/logs/%j"]
    assert main(argv) == 0
    job_id = re.search(r"submitted SLURM job (\d+) ", capsys.readouterr().out).group(1)
    job = submitit.SlurmJob(folder=f"{tmp_path}/logs/%j", job_id=job_id, tasks=range(4))
    assert wait(job, 240) == "COMPLETED", logs(job)
    assert job.results() == [None] * 4
    run = tmp_path / "runs" / "slurm"
    assert (run / "checkpoints" / "latest").read_text().strip() == "step-00000010"
    # the same run continues in a second job on 1 node x 2 tasks: 4 → 2 ranks, through a universal checkpoint
    argv2 = [a if a != "steps=10" else "steps=14" for a in argv] + ["cluster.nodes=1"]
    assert main(argv2) == 0
    job_id2 = re.search(r"submitted SLURM job (\d+) ", capsys.readouterr().out).group(1)
    job2 = submitit.SlurmJob(folder=f"{tmp_path}/logs/%j", job_id=job_id2, tasks=range(2))
    assert wait(job2, 240) == "COMPLETED", logs(job2)
    assert (run / "checkpoints" / "latest").read_text().strip() == "step-00000014"
    assert (run / "checkpoints" / "step-00000010" / "model_universal").is_dir()
    assert "resumed slurm at step 10 (elastic: universal checkpoint)" in logs(job2)
    assert main(["status", str(run)]) == 0
    status = capsys.readouterr().out
    assert (
        f"{job_id:>8}  ldit train    COMPLETED" in status
        and f"{job_id2:>8}  ldit train    COMPLETED" in status
    )
    assert "2 node(s) × 2 task(s)" in status and "1 node(s) × 2 task(s)" in status


def test_sweep_strong_and_weak_over_one_and_two_nodes_writes_the_report(tmp_path):
    """`ldit sweep … --scaling strong,weak --slurm`: one real job per node count and mode (2 and 4 gloo
    ranks), then the report with the plan's predicted step time and its error per node count."""
    import json

    from slurm.sweep_report import rows

    latent_set(tmp_path / "latents", sizes=(6,) * 8, shape=(4, 4, 4), classes=3)
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(f"_base_: {ROOT / 'configs/dit/tiny_cpu.yaml'}\ndata:\n  shards: {tmp_path / 'latents'}\n")
    clusters = tmp_path / "cluster.yaml"
    clusters.write_text(f"_base_: {LOCAL}\nfolder: {tmp_path}/logs/%j\n")
    args = ["sweep", str(cfg), "--nodes", "1,2", "--scaling", "strong,weak", "--steps", "10",
            f"out={tmp_path / 'sweeps'}", "--slurm", "--cluster", str(clusters)]  # fmt: skip
    assert main(args) == 0
    root = tmp_path / "sweeps" / "tiny-dit"
    table, notes = rows(root)
    assert [(r.scaling, r.nodes, r.devices, r.global_batch) for r in table] == [
        ("strong", 1, 2, 16), ("strong", 2, 4, 16), ("weak", 1, 2, 16), ("weak", 2, 4, 32)]  # fmt: skip
    assert notes == [] and all(r.predicted is not None and r.error is not None for r in table)
    md = (root / "report.md").read_text()
    errors = md.split("plan error per node count (predicted / measured step time − 1): ")[1].splitlines()[0]
    assert errors == ", ".join(f"{r.scaling} {r.nodes} node(s) {r.error * 100:+.1f}%" for r in table)
    print(md)  # the figures the README quotes (pytest -s)
    assert (
        (root / "report.csv").is_file()
        and (root / "report.png").is_file()
        and (root / "calibration.json").is_file()
    )
    jobs = json.loads((root / "sweep.json").read_text())["jobs"]
    assert {k: set(v) for k, v in jobs.items()} == {"strong": {"1", "2"}, "weak": {"1", "2"}}
    order = [jobs[s][n] for s in ("strong", "weak") for n in ("1", "2")]
    times = sacct_times(*order)
    for before, after in zip(order, order[1:]):  # one at a time: no two jobs shared the host's cores
        assert times[after][0] >= times[before][1], (before, after, times)


def tiny_eval_inputs(tmp_path: Path) -> tuple[Path, Path]:
    """A random `digits` VA-VAE export (decodes (4, 4, 4) latents to 32 px) and a tiny eval config: 8 samples
    from 4 Euler points, random Inception weights, a synthetic FID reference (no download anywhere)."""
    import numpy as np
    import torch

    from eval.inception import WEIGHTS_FILE, random_weights
    from eval.metrics import ReferenceStats, save_reference
    from models.vavae import AutoencoderKL, autoencoder_args
    from trainer.config import RunConfig, StreamConfig, TrainVAVAEConfig
    from trainer.export import export_weights

    torch.manual_seed(0)
    vae = AutoencoderKL(autoencoder_args("digits")).eval()
    vcfg = TrainVAVAEConfig(run=RunConfig(name="vae", root=str(tmp_path / "runs")), model="digits",
                            data=StreamConfig(shards=str(tmp_path / "images")))  # fmt: skip
    vavae = export_weights(tmp_path / "runs" / "vae", 1, vae, vae.state_dict(), vcfg)
    inception = random_weights(tmp_path / WEIGHTS_FILE, seed=0)
    rng = np.random.default_rng(0)
    reference = tmp_path / "reference.npz"
    save_reference(
        reference, ReferenceStats(np.zeros(2048), np.eye(2048), pool=rng.standard_normal((10, 2048)))
    )
    eval_yaml = tmp_path / "eval_tiny.yaml"
    eval_yaml.write_text(
        "num_samples: 8\nbatch_size: 4\nsampler:\n  points: 4\n  cfg_scale: 1.0\nis_splits: 2\ngrid: 8\n"
        f"reference: {reference}\ninception_weights: {inception}\n"
    )
    return vavae, eval_yaml


def test_train_then_eval_runs_the_eval_after_training_succeeds(tmp_path, capsys):
    """`ldit train … --slurm --then-eval EVAL.yaml`: two jobs, the eval `afterok` the training. The eval waits
    (reason Dependency) while training runs, starts only after it completed, and writes metrics.json for the
    run's last export; `ldit status` lists both jobs."""
    import json
    import math

    from tests.data_fixtures import gaussian_latent_set

    gaussian_latent_set(tmp_path / "latents")
    vavae, eval_yaml = tiny_eval_inputs(tmp_path)
    run = tmp_path / "runs" / "chain"
    argv = ["train", "configs/dit/tiny_cpu.yaml", f"data.shards={tmp_path / 'latents'}", f"run.root={run.parent}",
            "run.name=chain", "steps=10", "ckpt.every=10", f"vavae={vavae}", "--slurm", "--cluster", str(LOCAL),
            f"cluster.folder={tmp_path}/logs/%j", "cluster.nodes=1", "--then-eval", str(eval_yaml)]  # fmt: skip
    assert main(argv) == 0
    printed = capsys.readouterr().out
    train_id, eval_id = re.findall(r"submitted SLURM job (\d+) ", printed)
    assert f"after job {train_id} succeeds" in printed
    train_job = submitit.SlurmJob(folder=f"{tmp_path}/logs/%j", job_id=train_id, tasks=range(2))
    eval_job = submitit.SlurmJob(folder=f"{tmp_path}/logs/%j", job_id=eval_id, tasks=range(2))
    try:
        deadline = time.monotonic() + 15
        while (state := squeue(eval_id)) != "PENDING Dependency":
            assert state.startswith("PENDING") and time.monotonic() < deadline, state
            time.sleep(0.5)
        assert wait(train_job, 240) == "COMPLETED", logs(train_job)
        assert wait(eval_job, 300) == "COMPLETED", logs(eval_job)
    finally:
        eval_job.cancel(check=False)
    times = sacct_times(train_id, eval_id)
    print(
        f"training {times[train_id][0]} - {times[train_id][1]}, eval {times[eval_id][0]} - {times[eval_id][1]}"
    )
    assert times[eval_id][0] >= times[train_id][1]
    (metrics,) = (run / "eval").glob("*/metrics.json")
    assert metrics.parent.name.startswith("step-00000010_euler4-") and metrics.parent.name.endswith(
        "_n8_reference"
    )
    doc = json.loads(metrics.read_text())
    assert doc["export"]["step"] == 10
    assert (doc["vavae"]["path"], doc["vavae"]["from"]) == (str(vavae), "the run's vavae")
    assert math.isfinite(doc["metrics"]["fid"]) and doc["metrics"]["inception_score"] >= 1.0
    assert main(["status", str(run)]) == 0
    status = capsys.readouterr().out
    assert re.search(rf"{train_id}\s+ldit train\s+COMPLETED", status), status
    assert re.search(rf"{eval_id}\s+ldit eval\s+COMPLETED.*after {train_id}", status), status


def test_status_says_why_an_eval_after_a_failed_training_never_runs(tmp_path, capsys):
    """A training job that fails (lr 1e30: the loss overflows at step 2 and nonfinite=stop ends the run) and
    `ldit eval --slurm --after` it: the eval never runs, and `ldit status <run>` shows the reason."""
    from tests.data_fixtures import gaussian_latent_set

    gaussian_latent_set(tmp_path / "latents")
    run = tmp_path / "runs" / "doomed"
    where = ["--slurm", "--cluster", str(LOCAL), f"cluster.folder={tmp_path}/logs/%j", "cluster.nodes=1",
             "cluster.tasks_per_node=1"]  # fmt: skip
    argv = ["train", "configs/dit/tiny_cpu.yaml", f"data.shards={tmp_path / 'latents'}", f"run.root={run.parent}",
            "run.name=doomed", "optim.lr=1.0e30", *where]  # fmt: skip
    assert main(argv) == 0
    train_id = re.search(r"submitted SLURM job (\d+) ", capsys.readouterr().out).group(1)
    assert (
        main(
            [
                "eval",
                f"run.root={run.parent}",
                "run.name=doomed",
                "num_samples=8",
                *where,
                "--after",
                train_id,
            ]
        )
        == 0
    )
    eval_id = re.search(r"submitted SLURM job (\d+) ", capsys.readouterr().out).group(1)
    train_job = submitit.SlurmJob(folder=f"{tmp_path}/logs/%j", job_id=train_id)
    eval_job = submitit.SlurmJob(folder=f"{tmp_path}/logs/%j", job_id=eval_id)
    try:
        assert wait(train_job, 180) == "FAILED", logs(train_job)
        assert "ldit train: error: non-finite loss at step" in Path(train_job.paths.stderr).read_text()
        deadline = time.monotonic() + 60
        while True:
            assert main(["status", str(run)]) == 0
            status = capsys.readouterr().out
            if re.search(rf"{eval_id}\s+ldit eval\s+PENDING \(DependencyNeverSatisfied\)", status):
                break
            assert time.monotonic() < deadline, status
            time.sleep(1)
        assert re.search(rf"{train_id}\s+ldit train\s+FAILED", status), status
        # slurm/heal.py did not requeue it: a non-finite loss is the run's input, it fails the same way again
        assert "not retried: the job's input is wrong (it would fail the same way again)" in status, status
        assert re.search(
            rf"{eval_id}\s+ldit eval\s+PENDING \(DependencyNeverSatisfied\).*after {train_id}", status
        )
        time.sleep(3)  # more scheduling passes: it still does not start
        assert squeue(eval_id) == "PENDING DependencyNeverSatisfied"
        assert not (run / "eval").exists() and not list(Path(eval_job.paths.folder).glob("*_log.*"))
    finally:
        eval_job.cancel(check=False)
