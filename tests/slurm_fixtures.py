"""What the SLURM tests share (tests/test_slurm*.py): the test cluster's config, a job registered for these
tests only, the cluster check, waiting for a job's final state, and its start and end from accounting."""

from __future__ import annotations

import datetime
import subprocess
import time
from pathlib import Path

import pytest
import submitit

from slurm.cluster import ClusterConfig, load_cluster
from slurm.jobs import Job
from tests.conftest import ROOT
from tests.workers.slurm_task import SlurmTaskConfig

LOCAL = ROOT / "configs" / "cluster" / "local.yaml"
TEST_JOB = Job(
    "slurm-test", "SLURM test job", {"": SlurmTaskConfig}, entry="tests.workers.slurm_task:main", issue=8
)


@pytest.fixture(scope="module", autouse=True)
def _cluster() -> None:
    """Fail early, and say what to do, when the test cluster is not running."""
    try:
        out = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %t"], capture_output=True, text=True, timeout=20)
    except FileNotFoundError:
        pytest.fail("no SLURM client (sinfo): start the test cluster with slurm/scripts/cluster_up.sh")
    nodes = dict(line.split() for line in out.stdout.splitlines())
    if out.returncode != 0 or not {"n1", "n2"} <= set(nodes):
        pytest.fail(f"test cluster not up ({out.stderr.strip() or nodes}): run slurm/scripts/cluster_up.sh")


@pytest.fixture(autouse=True)
def _in_repo(monkeypatch):
    monkeypatch.chdir(ROOT)  # jobs import tests.workers from the submission directory


def cluster(tmp_path: Path, *overrides: str) -> ClusterConfig:
    return load_cluster([LOCAL], [f"folder={tmp_path}/logs/%j", *overrides])


def logs(job: submitit.Job) -> str:
    folder = Path(job.paths.folder)
    return "\n".join(f"===== {p.name}\n{p.read_text()[-3000:]}" for p in sorted(folder.glob("*_log.*")))


FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "BOOT_FAIL"}


def wait(job: submitit.Job, timeout_s: float) -> str:
    """Wait until accounting gives the job a final state, and return it. Cancels it after `timeout_s`.

    (`job.done()` is not enough: it is true as soon as the result files exist.)
    """
    deadline = time.monotonic() + timeout_s
    while (state := job.get_info(mode="force").get("State", "UNKNOWN").split()[0]) not in FINAL_STATES:
        if time.monotonic() > deadline:
            job.cancel(check=False)
            pytest.fail(f"job {job.job_id} not done after {timeout_s} s (state {state})\n{logs(job)}")
        time.sleep(1)
    return state


def sacct_times(
    *job_ids: str, timeout_s: float = 30.0
) -> dict[str, tuple[datetime.datetime, datetime.datetime]]:
    """(Start, End) of each job from accounting (one-second resolution). Accounting may still say `Unknown`
    for a moment after a job ends (slurmdbd records it after the job's epilogue): asked again until then."""
    deadline = time.monotonic() + timeout_s
    while True:
        out = subprocess.run(
            ["sacct", "-X", "-n", "-P", "-o", "JobIDRaw,Start,End", "-j", ",".join(job_ids)],
            capture_output=True, text=True, check=True,
        ).stdout  # fmt: skip
        rows = [line.split("|") for line in out.splitlines() if line]
        if len(rows) == len(job_ids) and "Unknown" not in {v for row in rows for v in row[1:]}:
            break
        if time.monotonic() > deadline:
            raise AssertionError(
                f"sacct has no start and end of jobs {job_ids} after {timeout_s:g} s: {out!r}"
            )
        time.sleep(1)
    return {j: (datetime.datetime.fromisoformat(s), datetime.datetime.fromisoformat(e)) for j, s, e in rows}


def squeue(job_id: str) -> str:
    """`<state> <reason>` of a job still known to the controller."""
    return subprocess.run(
        ["squeue", "-h", "-j", job_id, "-o", "%T %r"], capture_output=True, text=True, check=True
    ).stdout.strip()


def step_hook(before: str) -> str:
    """A `sitecustomize.py` that runs the statement `before` at each `ShardGuard.take(step, failed)` (once a
    step, on every rank; `step` is in scope) once trainer.shard_guard is imported. A job inherits it through
    PYTHONPATH: it slows the steps, or fails one, without a line of test code in the trainer."""
    return f"""\
import importlib.abc, importlib.util, sys, time


class StepHook(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name != "trainer.shard_guard":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        load = spec.loader.exec_module

        def exec_module(module):
            load(module)
            take = module.ShardGuard.take

            def hooked(self, step, *a):
                {before}
                return take(self, step, *a)

            module.ShardGuard.take = hooked

        spec.loader.exec_module = exec_module
        return spec


sys.meta_path.insert(0, StepHook())
"""
