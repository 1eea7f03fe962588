"""slurm/heal.py's decisions that need no cluster: a failure's reason read from a job's logs as SLURM and torch
write them, the failure budget, the node counts a shrunk run may use. The real jobs are in test_slurm_heal.py."""

from __future__ import annotations

import json

from slurm.cluster import load_cluster
from slurm.heal import attempt_logs, failure_reason, in_a_row, mark, node_counts
from slurm.jobs import JOBS
from tests.conftest import ROOT

LOCAL = ROOT / "configs" / "cluster" / "local.yaml"

# Task 0's stderr also holds srun's own lines (sbatch's --error is task 0's file); lines as seen on the test cluster.
CRASH = {
    "0": '[rank0]:   File "sitecustomize.py", line 18, in hooked\n[rank0]: RuntimeError: injected bug at step 5\n'
    "srun: error: n2: tasks 2-3: Exited with exit code 1\nsrun: error: n1: task 0: Terminated\n",
    "2": "[rank2]: RuntimeError: injected bug at step 5\n",
}
KILLED = {
    "0": "RuntimeError: [../gloo/transport/tcp/pair.cc:545] Read error [127.0.0.1]:5: Connection reset by peer.\n"
    "srun: error: n2: task 3: Killed\nsrun: error: n1: tasks 0-1: Killed\n",
    "3": "",
}
STALLED = {
    "0": "rank 0: no training step finished for 71 s (heartbeat_s=70): a peer is lost or hung; exiting with code 76 "
    "so that the job is requeued\nsrun: error: n1: task 0: Exited with exit code 76\n",
}
INPUT = {
    "0": "srun: error: n1: task 0: Exited with exit code 1\n",
    "1": "ldit train: error: non-finite loss at step 7 (nonfinite=stop); the last checkpoint is intact\n",
}


def test_reasons_name_the_first_failed_task_and_its_error():
    assert failure_reason(CRASH) == (
        "task 2 on n2: Exited with exit code 1 (RuntimeError: injected bug at step 5)",
        False,
    )
    assert failure_reason(KILLED) == ("task 3 on n2: Killed", False)  # the first line; srun killed the others
    reason, input_error = failure_reason(STALLED)
    assert reason.startswith(
        "task 0 on n1: Exited with exit code 76 (rank 0: no training step finished for 71 s"
    )
    assert not input_error
    assert failure_reason(INPUT) == (
        "task 1: ldit train: error: non-finite loss at step 7 (nonfinite=stop); the last checkpoint is intact",
        True,  # not retried: it fails the same way every time
    )
    assert failure_reason({"0": "srun: error: Node failure on n2\n"}) == ("node failure on n2", False)
    peer = "ldit train: a peer was lost (RuntimeError: Connection reset by peer); exit 76 asks to be requeued"
    assert failure_reason({"0": f"{peer}\nsrun: error: n1: task 0: Exited with exit code 76\n"}) == (
        f"task 0 on n1: Exited with exit code 76 ({peer})",
        False,
    )
    assert failure_reason({"0": ""}) == ("the step failed; see the tasks' logs", False)


def test_only_this_attempts_log_lines_count(tmp_path):
    """The logs are appended to across attempts: an earlier attempt's error is not this one's reason."""
    err = tmp_path / "7_0_log.err"
    err.write_text(INPUT["1"])  # attempt 0: an input error, since fixed
    mark(tmp_path)
    assert json.loads((tmp_path / "heal-offsets.json").read_text()) == {"7_0_log.err": len(INPUT["1"])}
    with open(err, "a") as f:
        f.write(KILLED["0"])
    assert attempt_logs(tmp_path) == {"0": KILLED["0"]}
    assert failure_reason(attempt_logs(tmp_path)) == ("task 3 on n2: Killed", False)


def test_the_budget_counts_failures_without_a_new_checkpoint_between_them():
    records = [{"latest": None}, {"latest": "step-00000100"}, {"latest": "step-00000100"}]
    assert in_a_row(records, "step-00000100") == 2
    assert in_a_row(records, "step-00000200") == 0  # progress since: the count starts again
    assert in_a_row([], None) == 0


def test_a_run_shrinks_only_to_node_counts_its_batch_settings_allow():
    """tiny_cpu.yaml: 4 streams, global batch 16. Two tasks a node: 4 nodes (8 ranks) cannot read 4 streams."""
    train = JOBS["train"].load([str(ROOT / "configs" / "dit" / "tiny_cpu.yaml")], [])
    assert node_counts(load_cluster([LOCAL], ["nodes=4"]), train) == [2, 1]
    assert node_counts(load_cluster([LOCAL], ["nodes=2"]), train) == [2, 1]
    assert node_counts(load_cluster([LOCAL], ["nodes=2", "tasks_per_node=3"]), train) == []
    status = JOBS["status"].load([], ["run_dir=x"])  # not a training run: only its own node count
    assert node_counts(load_cluster([LOCAL], ["nodes=3"]), status) == [3]


def test_status_shows_requeues_and_the_last_failures():
    from slurm.status import render_status

    failure = {"time": "2026-12-06T07:35:24", "job_id": "11", "attempt": 0, "reason": "task 3 on n2: Killed",
               "action": "requeued (failure 1 of max_failures=3 in a row)"}  # fmt: skip
    status = {
        "run": "runs/x", "checkpoints": [], "export": None, "evals": [], "last_log": None, "stall": None,
        "jobs": [{"job_id": "11", "job": "train", "state": "COMPLETED", "submitted": "2026-12-06T07:33:00",
                  "resources": "2 node(s) × 2 task(s)", "after": None, "requeues": 1}],
        "failures": [failure] * 7,
    }  # fmt: skip
    lines = render_status(status).splitlines()
    assert lines[-7].endswith("2 node(s) × 2 task(s), requeued 1x")
    assert (
        lines[-6:]
        == ["  failures: 7 (slurm/heal.py; the last 5):"]
        + [
            "    2026-12-06T07:35:24 job 11 attempt 0: task 3 on n2: Killed; requeued (failure 1 of max_failures=3 in a row)"
        ]
        * 5
    )
    assert "failures" not in render_status({**status, "failures": []})
