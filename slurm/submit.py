"""Submit an `ldit` job to SLURM through submitit (DESIGN.md "Launch").

    ldit <job> CONFIG.yaml key=value --slurm --cluster configs/cluster/<name>.yaml [cluster.nodes=4]
         [--after JOBID]

What runs where:

- here (the login node, or a job that submits another): the job's config is checked by the CLI, the
  cluster file is turned into a `SlurmExecutor` (:mod:`slurm.cluster`), and :func:`submit` pickles a
  :class:`JobTask` with the job, its config files (as absolute paths) and overrides. The submission
  happens inside `submitit.helpers.clean_env()`, so a job submitted from inside a SLURM job does not
  inherit that job's `SLURM_*` (gres, memory) or rendezvous variables.
- on every task: :class:`JobTask` loads the config again and runs the job exactly as `ldit` does
  locally (:func:`slurm.cli.run_here`): :func:`slurm.env.init_distributed` reads the SLURM variables,
  exports the torchrun ones DeepSpeed needs and starts the process group; the job's function runs;
  the process group is shut down. We do not use submitit's `TorchDistributedEnvironment().export()`:
  its default `CUDA_VISIBLE_DEVICES=<local rank>` breaks DeepSpeed's `set_device(local_rank)`
  (ecosystem §2.3), and the launcher module is the one place that reads the environment (STYLE.md 9).

Time limits and pre-emption: SLURM sends USR2 `signal_delay_s` before the limit; submitit's handler on
rank 0 calls :meth:`JobTask.checkpoint`, which resubmits the same call, and requeues the job (same job
id). The job's own checkpoints and resume-by-default (STYLE.md 7) make the requeued run continue.
Rank 0's handler cannot save (a collective), so a job that saves on the signal catches it itself on
every rank, saves, and returns exit code 75; :func:`requeue_through_submitit` then hands the signal
back to submitit, which requeues as above, unless SLURM is already ending the job (:func:`job_state`:
`scancel` also sends SIGTERM, and a cancelled job must stay cancelled).
"""

from __future__ import annotations

import re
import signal
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import submitit

from slurm.cluster import ClusterConfig, describe, make_executor
from slurm.config import ConfigError
from slurm.jobs import Job


class JobTask(submitit.helpers.Checkpointable):
    """The callable submitit runs on every task of a job: one rank of `ldit <job> <files> <overrides>`.

    Being Checkpointable, it is requeued after a time limit or pre-emption; the inherited
    `checkpoint()` resubmits the same call (same job, files and overrides). It holds the cluster config, which
    the job's teardown (slurm/heal.py) reads from the submitted pickle when the ranks fail.
    """

    def __init__(self, cluster: ClusterConfig | None = None) -> None:
        self.cluster = cluster

    def __call__(self, job: Job, files: Sequence[str], overrides: Sequence[str]) -> None:
        from slurm.cli import EXIT_OK, run_here  # the same path as a local run; imported here: a cycle
        from trainer.common import EXIT_PEER_LOST, EXIT_REQUEUE

        code = run_here(job, job.load(files, overrides))
        if code == EXIT_REQUEUE:
            if (state := job_state()) not in (None, "RUNNING"):  # `scancel`: SIGTERM, then the job ends
                print(f"ldit {job.name}: stopped with a checkpoint saved; not requeued: SLURM is ending the "
                      f"job (state {state}: a scancel, or a pre-emption that SLURM requeues itself)", flush=True)  # fmt: skip
                return
            requeue_through_submitit()
        elif code == EXIT_PEER_LOST:  # not this rank's fault: the teardown requeues (slurm/heal.py)
            raise SystemExit(code)
        elif code != EXIT_OK:  # run_here printed why (bad input); SLURM must record the job as failed
            raise RuntimeError(f"ldit {job.name} exited with code {code}; the reason is in this task's log")


def job_state() -> str | None:
    """This job's state as slurmctld has it now (`scontrol show job`), or None when it cannot say.

    A stop on SIGTERM is requeued only while the job is RUNNING: `scancel` sends SIGTERM too, and the job
    is then COMPLETING; requeuing it made a cancelled job start again (seen on the test cluster: a
    scancelled tiny DiT came back RUNNING twice).
    """
    from slurm.status import scontrol_job

    try:
        job_id = submitit.JobEnvironment().job_id
    except RuntimeError:  # not in a SLURM job
        return None
    return scontrol_job(job_id).get("JobState")


def requeue_through_submitit() -> None:
    """Requeue the job after it stopped itself on a signal, with a checkpoint saved (exit code 75).

    A training job catches SIGUSR2/SIGTERM itself (trainer.common.StopSignals, which replaces
    submitit's handler while the loop runs), agrees with the other ranks to stop, saves, and gives
    the handlers back. submitit never saw the signal, so it is raised again here: submitit's handler
    then does on rank 0 what it does on a signal (count a time-out against max_requeues, resubmit this
    call through :meth:`JobTask.checkpoint`, `scontrol requeue`, exit); on other ranks it only logs,
    and rank 0's requeue ends them.
    """
    sig = getattr(signal, "SIG" + submitit.JobEnvironment.USR_SIG)
    handler = signal.getsignal(sig)
    if type(getattr(handler, "__self__", None)).__name__ != "SignalHandler":
        raise RuntimeError(
            f"the job stopped to be requeued, but submitit's {sig.name} handler is not installed "
            f"(found {handler!r}): the job must restore the signal handlers it replaced"
        )
    signal.raise_signal(sig)


def check_job_id(after: str) -> str:
    """`after` if it is a SLURM job id (`123`, or `123_4` for an array task); else ConfigError."""
    if not re.fullmatch(r"\d+(_\d+)?", after):
        raise ConfigError(f"--after {after!r}: not a SLURM job id (e.g. 12345)")
    return after


def submit(
    job: Job,
    files: Sequence[str | Path],
    overrides: Sequence[str],
    cluster: ClusterConfig,
    after: str | None = None,
    started_with: str | None = None,
) -> submitit.Job:
    """Submit `ldit <job> <files> <overrides>` to the cluster; returns submitit's job handle.

    With `after`, the job starts only once job `after` has completed successfully (`afterok`); if
    that job fails, this one stays pending with reason DependencyNeverSatisfied and never runs. With
    `started_with`, it starts once that job has started (an eval follower beside its training job).
    The job's name is `ldit-<job>`.
    """
    if after is not None:
        check_job_id(after)
    paths = [str(Path(f).resolve()) for f in files]  # the job may start in another working directory
    executor = make_executor(cluster, job_name=f"ldit-{job.name}", after=after, started_with=started_with)
    with submitit.helpers.clean_env():
        return executor.submit(JobTask(cluster), job, paths, list(overrides))


def submission_message(sjob: Any, cluster: ClusterConfig, after: str | None = None) -> str:
    """What `ldit ... --slurm` prints: the job id, what it asked for and where its logs are."""
    wait = f", after job {after} succeeds" if after else ""
    stdout = sjob.paths.stdout
    return (
        f"submitted SLURM job {sjob.job_id} ({sjob.paths.folder}): {describe(cluster)}{wait}\n"
        f"  logs: {stdout} (rank 0; other ranks: {stdout.name.replace('_0_', '_<rank>_')}, and .err)\n"
        f"  state: squeue -j {sjob.job_id}   cancel: scancel {sjob.job_id}"
    )
