"""`ldit`: run a job of the pipeline in this process, on N local processes, or on SLURM.

    ldit <job> [CONFIG.yaml ...] [key=value ...] [--local N]
    ldit <job> [CONFIG.yaml ...] [key=value ...] --slurm --cluster CLUSTER.yaml [cluster.key=value ...]
         [--after JOBID]
    ldit inspect {data,order,checkpoint,run} ...   (read-only but for `data --verify`'s record; slurm/inspect.py)

The config is loaded and checked before any process starts, so a typo costs a second, not a queue
wait. Exit codes: 0 done; 2 usage or configuration error (or a job not built yet); 1 the job failed;
141 the reader of stdout went away (`ldit … | head`), quietly.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from slurm import companions
from slurm import inspect as inspect_cmd
from slurm.config import ConfigError, help_text, to_yaml
from slurm.jobs import JOBS, Job

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
EXIT_BROKEN_PIPE = 141
"""128 + SIGPIPE: the reader of stdout went away (`ldit … | head`); see :func:`console`."""


def user_errors() -> tuple[type[BaseException], ...]:
    """Errors about the user's input or data, reported as one line instead of a traceback.

    Imported here, not at the top: `ldit --help`, `ldit inspect` and every rank's start-up would otherwise
    pay for torch-fidelity and torchvision (eval.job), which most jobs never use.
    """
    from data_prep.manifest import ShardSetError
    from eval.job import EvalInputError
    from models.weights import PretrainedWeightsError
    from slurm.follow import FollowError
    from trainer.checkpoint import CheckpointViewError, CheckpointWriteError
    from trainer.common import NonFiniteLoss
    from trainer.export import InitFromError

    return (
        ConfigError,
        FollowError,
        EvalInputError,
        ShardSetError,
        PretrainedWeightsError,
        NonFiniteLoss,
        CheckpointWriteError,
        CheckpointViewError,
        InitFromError,
        FileNotFoundError,
    )


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ldit",
        description="Distributed training of VA-VAE and LightningDiT (arXiv 2501.01423).",
        epilog="`ldit <job> --help` lists the job's config keys with their documentation.",
    )
    sub = parser.add_subparsers(title="jobs", dest="job", metavar="<job>", required=True)
    for name, job in JOBS.items():
        keys = "\n\n".join(
            (f"config keys (kind={kind}):\n" if kind else "config keys:\n") + help_text(schema)
            for kind, schema in job.schemas.items()
        )
        p = sub.add_parser(
            name,
            help=job.summary,
            description=f"ldit {name}: {job.summary}.",
            epilog=keys,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        p.add_argument(
            "args", nargs="*", metavar="CONFIG.yaml | key=value", help="config files, then overrides"
        )
        where = p.add_mutually_exclusive_group()
        where.add_argument(
            "--local", type=int, metavar="N", default=0, help="run on N processes on this machine"
        )
        where.add_argument(
            "--slurm",
            action="store_true",
            help="submit to SLURM (with --cluster; cluster.<key>=value args override the cluster file)",
        )
        p.add_argument(
            "--cluster",
            action="append",
            default=[],
            metavar="FILE",
            help="cluster file (configs/cluster/*.yaml) for --slurm; several are merged in order",
        )
        p.add_argument("--after", metavar="JOBID", help="with --slurm: start once job JOBID has succeeded")
        if name == "train":
            p.add_argument(
                "--then-eval",
                metavar="EVAL.yaml",
                help="with --slurm: also submit `ldit eval EVAL.yaml` for this run, to start once training succeeded",
            )
            p.add_argument(
                "--follow-eval",
                nargs="?",
                const=companions.FROM_CONFIG,
                metavar="EVAL.yaml",
                help="evaluate the run's milestone exports (export.every, export.at, the last step) while it "
                "trains: a follower `ldit eval EVAL.yaml --follow` beside training (--slurm: its own job of "
                "--follow-nodes nodes, submitted now; else its own local process). Without a file: the config's "
                "export.eval",
            )
            p.add_argument(
                "--follow-nodes",
                type=int,
                default=1,
                metavar="N",
                help="with --slurm --follow-eval: nodes of the follower's job (default 1)",
            )
        if name == "eval":
            p.add_argument(
                "--follow",
                action="store_true",
                help="evaluate every milestone export of the run as it appears and keep eval/<settings>/curve.csv|png; "
                "end after the last step's export (follow=true)",
            )
        if name == "sweep":
            p.add_argument("--nodes", metavar="N,N,…", help="node counts, one job each (nodes=[…])")
            p.add_argument("--steps", type=int, metavar="N", help="steps each job runs")
            p.add_argument("--report", metavar="DIR", help="only write the report of the sweep in DIR")
            p.add_argument(
                "--scaling", metavar="strong,weak", help="strong, weak or both (scaling=[…]; default strong)"
            )
    # Not a job: sub-commands with their own flags, no config schema, no process group (slurm/inspect.py).
    summary = inspect_cmd.SUMMARY
    inspect_cmd.configure(sub.add_parser("inspect", help=summary, description=f"ldit inspect: {summary}."))
    from slurm import plan as plan_cmd  # before spending: memory and time per node count (slurm/plan.py)

    summary = plan_cmd.SUMMARY
    plan_cmd.configure(sub.add_parser("plan", help=summary, description=f"ldit plan: {summary}."))
    return parser


def split_args(args: Sequence[str]) -> tuple[list[str], list[str]]:
    """Config files (ending .yaml/.yml) and key=value overrides, each in their given order."""
    files = [a for a in args if a.endswith((".yaml", ".yml")) and "=" not in a]
    overrides = [a for a in args if a not in files]
    return files, overrides


def write_run_config(cfg: Any) -> Path:
    """Write the resolved config to `<run dir>/config.yaml`; an earlier, different one is kept as config.<k>.yaml."""
    run_dir = cfg.run.dir
    run_dir.mkdir(parents=True, exist_ok=True)
    path, text = run_dir / "config.yaml", to_yaml(cfg)
    if path.exists() and path.read_text() != text:
        k = 1
        while (run_dir / f"config.{k}.yaml").exists():
            k += 1
        path.rename(run_dir / f"config.{k}.yaml")
    if not path.exists():
        tmp = path.with_suffix(".yaml.tmp")
        tmp.write_text(text)
        tmp.replace(path)
    return path


def run_here(job: Job, cfg: Any) -> int:
    """Run `job` in this process as one rank of the world its environment describes."""
    from slurm.env import init_distributed, shutdown
    from trainer.common import StopRequested

    timeout = getattr(cfg, "collective_timeout_s", 600.0)
    env = init_distributed(timeout_s=timeout)
    try:
        if env.rank == 0 and job.name == "train":
            write_run_config(cfg)
        job.function()(cfg)
    except user_errors() as exc:  # bad input: its message says what to do; a traceback would bury it
        print(f"ldit {job.name}: error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except StopRequested as exc:
        print(f"ldit {job.name}: {exc}; exit {exc.exit_code} asks to be requeued", file=sys.stderr)
        return exc.exit_code
    except Exception as exc:
        from trainer.common import EXIT_PEER_LOST
        from trainer.heartbeat import is_peer_loss

        if not is_peer_loss(exc):
            raise
        print(f"ldit {job.name}: a peer was lost ({type(exc).__name__}: {exc}); exit {EXIT_PEER_LOST} asks "
              "to be requeued", file=sys.stderr)  # fmt: skip
        return EXIT_PEER_LOST
    finally:
        shutdown()
    return EXIT_OK


KILL_WAIT_S = 10.0
"""After a local rank fails, how long the others have to leave on SIGTERM before SIGKILL (SLURM's KillWait)."""


def run_local(cmd: Sequence[str], n: int) -> int:
    """Run `cmd` as n local processes (torchrun-style variables); when one fails, stop the others, as srun's
    `--kill-on-bad-exit` does: SIGTERM, then SIGKILL after KILL_WAIT_S (a frozen rank never acts on SIGTERM).

    Returns 0, or the exit code of the first process that failed.
    """
    from slurm.env import child_env, free_port

    port = free_port()
    procs = [subprocess.Popen(cmd, env=child_env(r, n, port)) for r in range(n)]
    code, failed_at = EXIT_OK, None
    while procs:
        for p in list(procs):
            rc = p.poll()
            if rc is None:
                continue
            procs.remove(p)
            if rc != 0 and code == EXIT_OK:
                code, failed_at = rc, time.monotonic()
                for other in procs:
                    other.terminate()
        if failed_at is not None and time.monotonic() - failed_at > KILL_WAIT_S:
            for other in procs:
                other.kill()
        time.sleep(0.05)
    return code


def _without(argv: Sequence[str], flag: str, takes_value: bool) -> list[str]:
    """`argv` without `flag` (`--flag V`, `--flag=V`, or a bare `--flag` when it takes no value here)."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == flag:
            skip = takes_value
        elif not a.startswith(flag + "="):
            out.append(a)
    return out


def _sweep_overrides(ns: argparse.Namespace, files: list[str], overrides: list[str]) -> list[str]:
    """The sweep's own keys; every other `key=value` overrides the training config of each job."""
    import dataclasses
    import json

    from slurm.jobs import SweepConfig

    own = {f.name for f in dataclasses.fields(SweepConfig)}
    train = [o for o in overrides if o.partition("=")[0].split(".")[0] not in own]
    out = [f"train={f}" for f in files[:1]] + [o for o in overrides if o not in train]
    if train:  # a JSON list is valid YAML: each item stays one string, brackets and quotes included
        out.append("train_overrides=" + json.dumps(train))
    if ns.nodes:
        out.append(f"nodes=[{ns.nodes}]")
    if ns.steps is not None:
        out.append(f"steps={ns.steps}")
    if ns.report:
        out.append(f"report={ns.report}")
    if ns.scaling:
        out.append(f"scaling=[{ns.scaling}]")
    if ns.cluster:
        out.append("cluster=[" + ",".join(str(Path(c).resolve()) for c in ns.cluster) + "]")
    return out


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["inspect"]:
        return inspect_cmd.main(argv[1:])
    if argv[:1] == ["plan"]:
        from slurm import plan as plan_cmd

        return plan_cmd.main(argv[1:])
    parser = _parser()
    # Config files and overrides may also follow the options (`--slurm --cluster c.yaml cluster.nodes=4`).
    ns, extra = parser.parse_known_args(argv)
    if any(a.startswith("-") for a in extra):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    ns.args += extra
    job = JOBS[ns.job]
    if job.positional:  # bare arguments name the job's main input (`ldit status runs/x`)
        ns.args = [
            a if "=" in a or a.endswith((".yaml", ".yml")) else f"{job.positional}={a}" for a in ns.args
        ]
    files, overrides = split_args(ns.args)
    if job.name == "sweep":  # the sweep's YAML and --slurm/--cluster describe the jobs it starts
        files, overrides = [], _sweep_overrides(ns, files, overrides)
        ns.slurm, ns.cluster = False, None
    cluster_overrides = [o.removeprefix("cluster.") for o in overrides if o.startswith("cluster.")]
    overrides = [o for o in overrides if not o.startswith("cluster.")]
    if not ns.slurm and (ns.cluster or ns.after or cluster_overrides or getattr(ns, "then_eval", None)):
        print(
            f"ldit {job.name}: --cluster, --after, --then-eval and cluster.<key>=... need --slurm",
            file=sys.stderr,
        )
        return EXIT_USAGE
    if getattr(ns, "follow", False):
        overrides.append("follow=true")
    follow_eval = getattr(ns, "follow_eval", None)
    from trainer.preflight import PreflightError, check_train_config

    try:
        cfg = job.load(files, overrides)
        if ns.slurm:
            from slurm.cluster import load_cluster
            from slurm.submit import check_job_id

            cluster = load_cluster(ns.cluster, cluster_overrides)
            if ns.after is not None:
                check_job_id(ns.after)
        if job.name == "train":  # issue #11: the world size and the inputs, before any process starts
            if ns.slurm:
                world = cluster.nodes * cluster.tasks
            elif ns.local:
                world = ns.local
            else:
                from slurm.env import detect

                world = detect().world_size
            check_train_config(cfg, world)
            if follow_eval is not None:
                follower = companions.follower_args(cfg, follow_eval)
                if ns.follow_nodes < 1:
                    raise ConfigError(f"--follow-nodes {ns.follow_nodes} must be positive")
    except (ConfigError, PreflightError) as exc:
        print(f"ldit {job.name}: config error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if job.entry is None:
        print(f"ldit {job.name}: not built yet (issue #{job.issue}); the config is valid.", file=sys.stderr)
        return EXIT_USAGE
    if ns.slurm:
        from slurm.submit import submission_message, submit

        sjob = submit(job, files, overrides, cluster, after=ns.after)
        print(submission_message(sjob, cluster, ns.after), flush=True)
        if hasattr(cfg, "run"):  # `ldit status <run dir>` lists the run's jobs
            from slurm.cluster import describe
            from slurm.status import record_submission

            record_submission(cfg.run.dir, sjob.job_id, job.name, describe(cluster), ns.after)
        if follow_eval is not None:  # beside training, not after it: no dependency
            companions.submit_follower(cfg, follower, cluster, ns.follow_nodes, sjob.job_id)
        if getattr(ns, "then_eval", None):
            return companions.submit_eval_after(cfg, ns.then_eval, cluster, sjob.job_id)
        return EXIT_OK
    if follow_eval is not None:  # locally: training as below, the follower as its own process beside it
        follower_cmd = [sys.executable, "-m", "slurm.cli", "eval", *follower[0], *follower[1]]
        argv = _without(
            _without(argv, "--follow-eval", ns.follow_eval != companions.FROM_CONFIG), "--follow-nodes", True
        )
        if ns.local:
            cmd = [sys.executable, "-m", "slurm.cli", *_without(argv, "--local", True)]
            return companions.run_with_follower(lambda: run_local(cmd, ns.local), follower_cmd)
        return companions.run_with_follower(lambda: run_here(job, cfg), follower_cmd)
    if ns.local:
        if ns.local < 1:
            print(f"ldit {job.name}: --local needs a positive process count, got {ns.local}", file=sys.stderr)
            return EXIT_USAGE
        return run_local([sys.executable, "-m", "slurm.cli", *_without(argv, "--local", True)], ns.local)
    return run_here(job, cfg)


def console() -> None:
    """The `ldit` command: run main, flush, and leave without the interpreter's shutdown.

    A finished distributed run can abort in a gloo thread at interpreter shutdown (ecosystem §8,
    pytorch#190489); leaving with os._exit after flushing avoids it.

    Output into a pipe whose reader has gone (`ldit inspect order … | head`) ends quietly, for every
    sub-command: the BrokenPipeError is caught here, stdout is pointed at /dev/null (so no later flush
    fails again), and the exit status is 141 = 128 + SIGPIPE, what a command the signal stopped reports
    (Python ignores SIGPIPE, so it sees the error instead); a shell pipeline without `pipefail` reports
    the status of `head`.

    Torch's allocator settings for every rank (:data:`slurm.env.ALLOCATOR_ENV`) are put into the environment
    first, for a run in this process and for the ranks and jobs it starts.
    """
    from slurm.env import use_allocator_env

    use_allocator_env()
    try:
        code = main()
        sys.stdout.flush()
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        code = EXIT_BROKEN_PIPE
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    console()
