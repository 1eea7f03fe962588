"""Cluster files → sbatch parameters, and the errors bad cluster files give (no SLURM needed)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from submitit.slurm.slurm import _make_sbatch_string

from slurm.cli import main
from slurm.cluster import ClusterConfig, load_cluster, sbatch_parameters
from slurm.config import ConfigError
from slurm.submit import check_job_id
from tests.conftest import ROOT

LOCAL = ROOT / "configs" / "cluster" / "local.yaml"
EXAMPLE = ROOT / "configs" / "cluster" / "example.yaml"


def write(tmp_path, text: str, name: str = "c.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


THP = 'export THP_MEM_ALLOC_ENABLE="${THP_MEM_ALLOC_ENABLE:-1}"'
"""The first setup line of every job: torch's huge-page allocation (slurm.env.ALLOCATOR_ENV), unless the job's
environment or the cluster file's setup sets it."""


def heal_lines(folder: str) -> dict:
    """What every job gets for slurm/heal.py: the step ends at the first failed rank, a lost node leaves the
    job running, and the teardown handles srun's exit status."""
    heal = f"{sys.executable} -m slurm.heal"
    return {
        "setup": [THP, f"{heal} mark {folder}"],
        "srun_args": ["--kill-on-bad-exit=1"],
        "teardown": ["ldit_rc=$?", f"{heal} after {folder} $ldit_rc", "exit $?"],
        "additional_parameters": {"no-kill": True, "requeue": True},
    }


def test_local_cluster_file():
    params = sbatch_parameters(load_cluster([LOCAL]), job_name="ldit-train")
    assert params == {
        "job_name": "ldit-train",
        "partition": "debug",
        "nodes": 2,
        "ntasks_per_node": 2,
        "cpus_per_task": 1,
        "time": 10,
        "signal_delay_s": 60,
        **heal_lines(str(ROOT / "runs" / "slurm" / "%j")),
    }


def test_example_gpu_cluster_file_one_task_per_gpu():
    cluster = load_cluster([EXAMPLE])
    params = sbatch_parameters(cluster, after="1234")
    assert params == {
        "job_name": "ldit",
        "partition": "gpu",
        "account": "my-project",
        "nodes": 4,
        "ntasks_per_node": 8,
        "gpus_per_node": 8,
        "cpus_per_task": 12,
        "mem": "480GB",
        "time": 1440,
        "signal_delay_s": 120,
        "dependency": "afterok:1234",
        **heal_lines(str(ROOT / "runs" / "slurm" / "%j")),
        "setup": [
            THP,
            "module load cuda/12.4",
            'source "$HOME/ldit/.venv/bin/activate"',
            "export NCCL_DEBUG=WARN",
            f"{sys.executable} -m slurm.heal mark {ROOT / 'runs' / 'slurm' / '%j'}",
        ],
        "additional_parameters": {"no-kill": True, "requeue": True, "exclusive": True},
    }
    both = sbatch_parameters(cluster, after="1234", started_with="99")["dependency"]
    assert (both, sbatch_parameters(cluster, started_with="99")["dependency"]) == (
        "afterok:1234,after:99",
        "after:99",
    )
    assert "dependency" not in sbatch_parameters(cluster)
    assert cluster.max_requeues == 30
    # What sbatch receives, as submitit writes it.
    script = _make_sbatch_string(command="python -m x", folder="/shared/logs/%j", **params)
    for line in [
        "#SBATCH --partition=gpu",
        "#SBATCH --account=my-project",
        "#SBATCH --nodes=4",
        "#SBATCH --ntasks-per-node=8",
        "#SBATCH --gpus-per-node=8",
        "#SBATCH --cpus-per-task=12",
        "#SBATCH --mem=480GB",
        "#SBATCH --time=1440",
        "#SBATCH --signal=USR2@120",
        "#SBATCH --dependency=afterok:1234",
        "#SBATCH --exclusive",
        "#SBATCH --no-kill",
        "#SBATCH --requeue",
        "module load cuda/12.4",
    ]:
        assert line in script.splitlines(), line
    lines = script.splitlines()
    assert (
        lines.index(THP)
        < lines.index("module load cuda/12.4")
        < lines.index(next(x for x in lines if "srun " in x))
    )
    # srun's status reaches the teardown: nothing runs between them (blank lines and comments keep $?)
    tail = script[script.index("srun ") :].splitlines()
    assert tail[0].endswith("--kill-on-bad-exit=1 python -m x")
    assert [x for x in tail[1:] if x.strip() and not x.startswith("#")][0] == "ldit_rc=$?"


def test_defaults_gres_and_overrides(tmp_path):
    path = write(tmp_path, "partition: p\ngpus_per_node: 4\ngpu_request: gres\n")
    params = sbatch_parameters(load_cluster([path], ["nodes=3", "qos=high", "constraint=a100"]))
    assert params["gres"] == "gpu:4" and "gpus_per_node" not in params
    assert (params["nodes"], params["ntasks_per_node"], params["qos"], params["constraint"]) == (
        3,
        4,
        "high",
        "a100",
    )
    # Unset keys are not sent: the partition's defaults apply.
    assert not {"account", "mem", "cpus_per_task", "dependency"} & set(params)
    # A CPU cluster without tasks_per_node runs one task per node.
    cpu = load_cluster([write(tmp_path, "partition: p\n", "cpu.yaml")])
    assert (cpu.tasks, sbatch_parameters(cpu)["ntasks_per_node"]) == (1, 1)


def test_files_merge_in_order(tmp_path):
    write(tmp_path, "partition: p\nnodes: 2\ntime_min: 30\n", "base.yaml")
    big = write(tmp_path, "_base_: base.yaml\nnodes: 8\n", "big.yaml")
    cluster = load_cluster([big])
    assert (cluster.partition, cluster.nodes, cluster.time_min) == ("p", 8, 30)


@pytest.mark.parametrize(
    "text, overrides, message",
    [
        (
            "partition: p\nnode: 2\n",
            [],
            "c.yaml: Key 'node' not in 'ClusterConfig'",
        ),
        (
            "nodes: 2\n",
            [],
            "cluster config: missing required key 'partition': set it in a config file or as partition=...",
        ),
        ("partition: p\n", ["nodes=0"], "cluster config: nodes must be at least 1, got 0"),
        ("partition: '  '\n", [], "partition is empty: name the SLURM partition to submit to (`sinfo -s`)"),
        (
            "partition: p\ngpus_per_node: 8\ntasks_per_node: 2\n",
            [],
            "tasks_per_node=2 but gpus_per_node=8: one task runs per GPU; remove tasks_per_node",
        ),
        (
            "partition: p\ntime_min: 2\nsignal_delay_s: 90\n",
            [],
            "signal_delay_s=90 (+ up to 30 s early) reaches back to the start of a 2 min job, which SLURM "
            "would signal before it can handle it: lower signal_delay_s or raise time_min",
        ),
        (
            "partition: p\nsbatch: {partition: q}\n",
            [],
            "sbatch.partition: set this with the cluster file's own key (partition), not under sbatch",
        ),
        (
            "partition: p\nsbatch: {ntasks_per_node: 3}\n",
            [],
            "sbatch.ntasks_per_node: set this with the cluster file's own key (tasks_per_node)",
        ),
        ("partition: p\n", ["mem_gb=-1"], "mem_gb must be at least 1 (or unset), got -1"),
        ("partition: p\n", ["gpu_request=gpus"], "gpu_request"),
        ("partition: p\n", ["max_failures=-1"], "max_failures must be 0 or more, got -1"),
        (
            "partition: p\nsbatch: {no_kill: false}\n",
            [],
            "sbatch.no_kill: ldit sets this option itself (always set: slurm/heal.py handles a lost node); remove it",
        ),
    ],
)
def test_bad_cluster_files(tmp_path, text, overrides, message):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as err:
        load_cluster([path], overrides)
    assert message in str(err.value)
    assert str(err.value).startswith("cluster config: ")


def test_no_cluster_file():
    with pytest.raises(
        ConfigError, match="no cluster file: pass one with --cluster configs/cluster/<name>.yaml"
    ):
        load_cluster([])


def test_job_ids():
    assert check_job_id("123") == "123" and check_job_id("45_6") == "45_6"
    with pytest.raises(ConfigError, match="--after 'abc': not a SLURM job id"):
        check_job_id("abc")


def test_schema_documents_every_field():
    import dataclasses

    from slurm.config import field_docs

    assert set(field_docs(ClusterConfig)) == {f.name for f in dataclasses.fields(ClusterConfig)}


# ----------------------------------------------------------------------------- the CLI's --slurm options


@pytest.fixture
def _in_repo(monkeypatch):
    monkeypatch.chdir(ROOT)


@pytest.mark.usefixtures("_in_repo")
@pytest.mark.parametrize(
    "args, message",
    [
        (["--cluster", str(LOCAL)], "--cluster, --after, --then-eval and cluster.<key>=... need --slurm"),
        (["--after", "12"], "--cluster, --after, --then-eval and cluster.<key>=... need --slurm"),
        (["cluster.nodes=2"], "--cluster, --after, --then-eval and cluster.<key>=... need --slurm"),
        (["--slurm"], "config error: no cluster file: pass one with --cluster configs/cluster/<name>.yaml"),
        (
            ["--slurm", "--cluster", str(LOCAL), "cluster.nodes=0"],
            "config error: cluster config: nodes must be at least 1, got 0",
        ),
        (
            ["--slurm", "--cluster", str(LOCAL), "cluster.nodse=2"],
            "config error: cluster config: command line: Key 'nodse' not in 'ClusterConfig'",
        ),
        (["--slurm", "--cluster", str(LOCAL), "--after", "x1"], "--after 'x1': not a SLURM job id"),
    ],
)
def test_cli_slurm_option_errors(capsys, args, message):
    assert main(["train", "configs/dit/lightningdit_b1.yaml", *args]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.usefixtures("_in_repo")
def test_cli_checks_the_cluster_before_saying_not_built(capsys, monkeypatch):
    from dataclasses import replace

    from slurm.jobs import JOBS

    # a job with no entry yet: a valid cluster file gets as far as the "not built yet" message
    monkeypatch.setitem(JOBS, "export", replace(JOBS["export"], entry=None, issue=7))
    assert main(["export", "run.name=x", "--slurm", "--cluster", str(LOCAL)]) == 2
    assert "not built yet (issue #7)" in capsys.readouterr().err


@pytest.mark.parametrize(("job_env", "rank_sees"), [({}, "1"), ({"THP_MEM_ALLOC_ENABLE": "0"}, "0")])
def test_the_allocator_line_keeps_a_value_the_job_sets(job_env, rank_sees):
    """The batch script's export gives the ranks huge pages unless the submitting environment opted out."""
    env = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"} | job_env
    out = subprocess.run(["bash", "-c", f'{THP}; echo "$THP_MEM_ALLOC_ENABLE"'], env=env, capture_output=True,
                         text=True, check=True).stdout  # fmt: skip
    assert out.strip() == rank_sees
