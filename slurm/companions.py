"""The jobs `ldit train` launches with a training run: the eval after it (`--then-eval`, issue #8) and the eval
follower beside it (`--follow-eval`, issue #16: slurm/follow.py), on SLURM or as local processes."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Sequence
from typing import Any

from slurm.config import ConfigError
from slurm.jobs import JOBS

FROM_CONFIG = "<export.eval>"
"""`--follow-eval` given without a file: the follower's eval config is the training config's `export.eval`."""


def submit_eval_after(train_cfg: Any, eval_yaml: str, cluster: Any, train_job: str) -> int:
    """Submit `ldit eval EVAL.yaml` for the training run, with an afterok dependency on its job."""
    from slurm.cluster import describe
    from slurm.status import record_submission
    from slurm.submit import submission_message, submit

    job = JOBS["eval"]
    overrides = [f"run.name={train_cfg.run.name}", f"run.root={train_cfg.run.root}"]
    try:
        job.load([eval_yaml], overrides)
    except ConfigError as exc:
        print(
            f"ldit eval (--then-eval): config error: {exc}; the training job {train_job} is submitted",
            file=sys.stderr,
        )
        return 2  # usage (slurm/cli.py EXIT_USAGE)
    sjob = submit(job, [eval_yaml], overrides, cluster, after=train_job)
    print(submission_message(sjob, cluster, train_job), flush=True)
    record_submission(train_cfg.run.dir, sjob.job_id, "eval", describe(cluster), train_job)
    return 0


def follower_args(train_cfg: Any, eval_yaml: str) -> tuple[list[str], list[str]]:
    """Files and overrides of the follower `ldit eval EVAL.yaml --follow` of a training run, checked now."""
    if eval_yaml == FROM_CONFIG:
        eval_yaml = train_cfg.export.eval
        if not eval_yaml:
            raise ConfigError(
                "--follow-eval names no eval config and the training config's export.eval is empty"
            )
    overrides = [f"run.name={train_cfg.run.name}", f"run.root={train_cfg.run.root}", "follow=true",
                 f"follow_until={train_cfg.steps}"]  # fmt: skip
    try:
        JOBS["eval"].load([eval_yaml], overrides)
    except ConfigError as exc:
        raise ConfigError(f"the follower's eval config {eval_yaml}: {exc}") from None
    return [eval_yaml], overrides


def run_with_follower(train: Any, follower_cmd: Sequence[str]) -> int:
    """Run the local training `train()` with the follower beside it (its own process group, one process).

    Training never waits for it; when training succeeds, this waits for the follower to evaluate the last
    export and returns its exit code; when training fails, the follower is stopped (SIGTERM to its group).
    Under a launcher that runs this on every rank (`srun ldit train …`, torchrun) only rank 0 starts the
    follower: one per rank evaluated every export that many times and raced on the curve's files."""
    import signal

    from slurm.env import child_env, detect, free_port

    if detect().rank != 0:
        return train()
    follower = subprocess.Popen(follower_cmd, env=child_env(0, 1, free_port()), start_new_session=True)
    try:
        code = train()
    finally:
        if follower.poll() is None and sys.exc_info()[0] is not None:
            os.killpg(follower.pid, signal.SIGTERM)
    if code != 0:
        if follower.poll() is None:
            os.killpg(follower.pid, signal.SIGTERM)
            print(
                f"ldit train: training failed (exit {code}); the eval follower was stopped", file=sys.stderr
            )
        follower.wait()
        return code
    rc = follower.wait()
    if rc != 0:
        print(f"ldit train: training finished; the eval follower failed (exit {rc})", file=sys.stderr)
    return rc


def submit_follower(
    train_cfg: Any, follower: tuple[list[str], list[str]], cluster: Any, nodes: int, train_job: str
) -> None:
    """Submit the eval follower of a training run as its own job of `nodes` nodes, to start once the training
    job `train_job` has started (`after:`): beside it, not after it, and never holding a node while
    training still waits in the queue."""
    from dataclasses import replace

    from slurm.cluster import describe
    from slurm.status import record_submission
    from slurm.submit import submission_message, submit

    own = replace(cluster, nodes=nodes)
    sjob = submit(JOBS["eval"], *follower, own, started_with=train_job)
    message = submission_message(sjob, own)
    print(message.replace("submitted", "submitted the eval follower:", 1).replace(
        "\n", f", once job {train_job} has started\n", 1), flush=True)  # fmt: skip
    record_submission(train_cfg.run.dir, sjob.job_id, "eval", describe(own) + ", --follow", None)
