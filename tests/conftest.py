"""Shared test helpers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
WORKERS = ROOT / "tests" / "workers"


def clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without any launcher variables, plus `extra`."""
    launcher = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    env = {k: v for k, v in os.environ.items() if k not in launcher and not k.startswith("SLURM_")}
    env.update(OMP_NUM_THREADS="1", **extra)
    return env


def run_procs(cmds_envs: list[tuple[list[str], dict[str, str]]], timeout: float = 180) -> list[str]:
    """Start every (command, environment) at once; wait for all; fail with their output if one failed."""
    procs = [
        subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT)
        for cmd, env in cmds_envs
    ]
    outs = []
    for p in procs:
        out, _ = p.communicate(timeout=timeout)
        outs.append(out)
    for p, out in zip(procs, outs):
        assert p.returncode == 0, f"{p.args} exited {p.returncode}:\n{out[-4000:]}"
    return outs


def read_ranks(folder: Path, n: int) -> list[dict]:
    return [json.loads((folder / f"rank{r}.json").read_text()) for r in range(n)]


@pytest.fixture
def python() -> str:
    return sys.executable


@pytest.fixture(autouse=True)
def _restore_environment():
    """Jobs run in-process export the launcher variables (slurm.env.init_distributed does, for DeepSpeed);
    put the environment back so that no test sees another test's rank."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


@pytest.fixture
def world_of_one(monkeypatch):
    """A gloo process group of one rank in this process (slurm.env.init_distributed, no launcher variables)."""
    from slurm.env import init_distributed, shutdown

    for k, v in clean_env().items():
        monkeypatch.setenv(k, v)
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(k, raising=False)
    init_distributed(timeout_s=60)
    yield
    shutdown()
