"""The launcher's environment module: two processes started by torchrun, by SLURM-style variables, and
by `ldit --local`-style spawning all agree on rank and world size and can all-reduce (gloo, CPU)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from slurm.cli import run_local
from slurm.env import DistEnv, child_env, detect, free_port
from tests.conftest import WORKERS, clean_env, read_ranks, run_procs


def check_two_ranks(folder, launcher: str) -> None:
    ranks = read_ranks(folder, 2)
    assert [r["rank"] for r in ranks] == [0, 1]
    assert [r["world_size"] for r in ranks] == [2, 2]
    assert [r["local_rank"] for r in ranks] == [0, 1]
    assert [r["launcher"] for r in ranks] == [launcher, launcher]
    assert [r["backend"] for r in ranks] == ["gloo", "gloo"]
    assert [r["all_reduce"] for r in ranks] == [3.0, 3.0]  # 1 + 2
    assert [(r["device"], r["job_device"]) for r in ranks] == [("cpu", "cpu")] * 2  # no GPU here


def test_torchrun(tmp_path):
    torchrun = shutil.which("torchrun", path=str(sys.executable.rsplit("/", 1)[0]))
    assert torchrun, "torchrun is installed with torch"
    cmd = [
        torchrun,
        "--nproc_per_node=2",
        f"--master_port={free_port()}",
        str(WORKERS / "dist_check.py"),
        str(tmp_path),
    ]
    run_procs([(cmd, clean_env())])
    check_two_ranks(tmp_path, "torchrun")


def test_slurm_variables(tmp_path):
    port = str(free_port())
    cmds = []
    for r in range(2):
        env = clean_env(
            SLURM_JOB_ID="4242",
            SLURM_PROCID=str(r),
            SLURM_LOCALID=str(r),
            SLURM_NTASKS="2",
            SLURM_JOB_NUM_NODES="1",
            SLURM_NODEID="0",
            SLURM_JOB_NODELIST="localhost",
            MASTER_PORT=port,
        )
        cmds.append(([sys.executable, str(WORKERS / "dist_check.py"), str(tmp_path)], env))
    run_procs(cmds)
    check_two_ranks(tmp_path, "slurm")


def test_local_spawning_and_single_process(tmp_path, monkeypatch):
    for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "SLURM_JOB_ID", "SLURM_PROCID"):
        monkeypatch.delenv(k, raising=False)
    assert run_local([sys.executable, str(WORKERS / "dist_check.py"), str(tmp_path)], 2) == 0
    check_two_ranks(tmp_path, "torchrun")
    single = tmp_path / "single"
    single.mkdir()
    run_procs([([sys.executable, str(WORKERS / "dist_check.py"), str(single)], clean_env())])
    (r,) = read_ranks(single, 1)
    assert (r["rank"], r["world_size"], r["launcher"], r["all_reduce"]) == (0, 1, "single", 1.0)


def test_local_stops_the_others_when_one_fails():
    code = "import os, sys, time; r = int(os.environ['RANK']); time.sleep(0.2 if r else 60); sys.exit(3)"
    assert run_local([sys.executable, "-c", code], 2) == 3


def test_detect_reads_slurm_nodelists(monkeypatch):
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(k, raising=False)
    env = dict(
        SLURM_JOB_ID="77",
        SLURM_PROCID="5",
        SLURM_LOCALID="1",
        SLURM_NTASKS="8",
        SLURM_JOB_NUM_NODES="4",
        SLURM_NODEID="2",
        SLURM_JOB_NODELIST="gpu[003-004,010],cpu7",
    )
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    d = detect()
    assert (d.rank, d.local_rank, d.world_size, d.local_world_size) == (5, 1, 8, 2)
    assert d.master_addr == "gpu003" and d.launcher == "slurm"
    assert d.master_port == 20000 + 77
    assert detect().master_port == d.master_port  # every task derives the same port from the job id


def test_torchrun_variables_take_precedence_and_are_checked(monkeypatch):
    for k in ("LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("SLURM_JOB_ID", "1")
    monkeypatch.setenv("SLURM_PROCID", "0")
    monkeypatch.setenv("SLURM_NTASKS", "1")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    monkeypatch.delenv("MASTER_PORT", raising=False)
    with pytest.raises(RuntimeError, match="RANK and WORLD_SIZE are set but MASTER_ADDR, MASTER_PORT is not"):
        detect()
    monkeypatch.setenv("MASTER_ADDR", "10.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "1234")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert detect() == DistEnv(1, 1, 2, 2, "10.0.0.1", 1234, "torchrun")
    monkeypatch.setattr("slurm.env.use_gpus", lambda: True)  # one task per GPU: GPU = local rank
    assert detect().device == torch.device("cuda", 1)
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(RuntimeError, match="environment variable WORLD_SIZE='two' is not an integer"):
        detect()


THP = Path("/sys/kernel/mm/transparent_hugepage/enabled")
FAULTS = """
import resource, torch
torch.empty(16).fill_(1)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(4):
    t = torch.empty(16 * 2**20)  # 64 MiB: mapped fresh by glibc each time, 16,384 pages of 4 KiB
    t.fill_(1.0)
    del t
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) // 4)
"""


@pytest.mark.skipif(
    not THP.exists() or "[never]" in THP.read_text(), reason="the kernel has no transparent huge pages"
)
def test_ranks_allocate_large_tensors_on_huge_pages():
    """A rank's environment (slurm.env.child_env, as `--local` and the benchmarks start ranks) turns on torch's
    huge-page allocation: a fresh 64 MiB tensor costs a few hundred page faults instead of one per 4 KiB page
    (DeepSpeed's stage 2 allocates three such buffers a step). `THP_MEM_ALLOC_ENABLE=0` in the launching
    environment keeps the 4 KiB pages."""

    def faults(base: dict[str, str]) -> int:
        env = child_env(0, 1, free_port(), base=base)
        return int(subprocess.run([sys.executable, "-c", FAULTS], env=env, capture_output=True, text=True,
                                  check=True).stdout)  # fmt: skip

    default = faults({k: v for k, v in clean_env().items() if k != "THP_MEM_ALLOC_ENABLE"})
    opted_out = faults(clean_env(THP_MEM_ALLOC_ENABLE="0"))
    assert opted_out >= 16_384, opted_out
    assert default <= 16_384 // 8, default  # measured: ~550, 2 MiB pages plus the 4 KiB ones around them
