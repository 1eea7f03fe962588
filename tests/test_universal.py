"""The universal conversion at a new world size (issue #17, item 5): real jobs, real DeepSpeed, real kills.

A conversion killed midway, a half-written universal folder, a conversion longer than the collective
time-out, and one longer than its own bound. Every resumed run is compared with an uninterrupted one.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch

from tests.conftest import ROOT, clean_env
from tests.data_fixtures import gaussian_latent_set
from tests.test_train_dit import CONFIG, final_weights, losses, train

STEP3 = Path("checkpoints") / "step-00000003"
CONVERTED = re.compile(
    r"converted step-(\d+)/model to DeepSpeed's universal format in ([\d.]+) s \((\d+) workers"
)


@pytest.fixture(scope="module")
def latents(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("latents")
    gaussian_latent_set(folder)
    return folder


@pytest.fixture(scope="module")
def straight(latents, tmp_path_factory) -> Path:
    """The uninterrupted reference: 2 ranks, 6 steps."""
    root = tmp_path_factory.mktemp("straight")
    train(latents, root, "straight", "steps=6", "ckpt.every=3")
    return root


@pytest.fixture(scope="module")
def saved_at_2(latents, tmp_path_factory) -> Path:
    """A run directory that 2 ranks left at step 3 (to be resumed at world size 1)."""
    root = tmp_path_factory.mktemp("saved")
    train(latents, root, "run", "steps=3", "ckpt.every=3")
    return root / "run"


def copy_run(saved: Path, root: Path) -> Path:
    shutil.copytree(saved, root / "run", symlinks=True)
    return root / "run"


def resume_at_1(latents: Path, run: Path, *overrides: str, check: bool = True) -> subprocess.CompletedProcess:
    return train(latents, run.parent, run.name, "steps=6", "ckpt.every=3", *overrides, local=1, check=check)


def assert_continues_like_straight(straight: Path, run: Path) -> None:
    """The elastic resume's check (tests/test_train_dit.py): the same run, up to float reduction order."""
    ref, got = losses(straight, "straight"), losses(run.parent, run.name)
    assert len(got) == 6 and got[:3] == ref[:3]
    np.testing.assert_allclose(got, ref, rtol=1e-5)
    a, b = final_weights(straight, "straight"), final_weights(run.parent, run.name)
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-6)


def converted(stdout: str) -> float:
    """The conversion time the job printed (seconds)."""
    found = CONVERTED.findall(stdout)
    assert len(found) == 1, stdout[-3000:]
    return float(found[0][1])


def converters(folder: Path) -> list[psutil.Process]:
    """Live `python -m trainer.universal` processes writing under `folder`."""
    out = []
    for p in psutil.process_iter(["cmdline"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if "trainer.universal" in cmd and str(folder) in cmd:
            out.append(p)
    return out


@pytest.mark.slow
def test_conversion_killed_midway_restarts_and_the_run_resumes_exactly(
    latents, straight, saved_at_2, tmp_path
):
    run = copy_run(saved_at_2, tmp_path)
    ck = run / STEP3
    args = [sys.executable, "-m", "slurm.cli", "train", CONFIG, f"data.shards={latents}", f"run.root={run.parent}",
            f"run.name={run.name}", "log.every=1", "steps=6", "ckpt.every=3"]  # fmt: skip
    with open(tmp_path / "killed.log", "w") as out:
        job = subprocess.Popen(args, cwd=ROOT, env=clean_env(), stdout=out, stderr=subprocess.STDOUT,
                               start_new_session=True)  # fmt: skip
        fragments = ck / ".model_universal" / "tmp"
        deadline = time.monotonic() + 300
        while not (fragments.is_dir() and any(fragments.rglob("*.00"))):  # DeepSpeed is writing fragments
            assert job.poll() is None, (tmp_path / "killed.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "the conversion never started"
            time.sleep(0.002)
        os.killpg(job.pid, signal.SIGKILL)  # the whole job: the rank and its converter
        job.wait(timeout=30)
    time.sleep(0.5)
    assert not converters(ck), "the converter outlived the job"
    assert (ck / ".model_universal").is_dir() and not (ck / "model_universal").exists()
    assert len((run / "log.jsonl").read_text().splitlines()) == 3  # killed before step 4

    proc = resume_at_1(latents, run)
    assert (
        f"removing {ck}/.model_universal, left by a conversion that did not finish; converting again"
        in proc.stdout
    )
    # one rank in fp32 runs stage 0: it reads the whole tensors of the universal conversion (trainer/stage_change.py)
    assert (
        "resumed run at step 3 (from ZeRO stage 2 at world size 2 to stage 0 at world size 1: whole tensors)"
        in proc.stdout
    )
    seconds = converted(proc.stdout)
    print(f"tiny DiT: universal conversion {seconds:.2f} s")
    marker = json.loads((ck / "model_universal" / "converted.json").read_text())
    assert marker["source"] == "model" and marker["workers"] == 4 and len(marker["files"]) > 100
    assert not (ck / ".model_universal").exists()
    assert (ck / "latest_universal").read_text() == "model_universal"
    assert_continues_like_straight(straight, run)


@pytest.mark.slow
def test_half_written_universal_folder_is_never_loaded(latents, straight, saved_at_2, tmp_path):
    """A `model_universal/` without its marker (written by a conversion that was cut, or copied in part)."""
    run = copy_run(saved_at_2, tmp_path)
    ck = run / STEP3
    half = ck / "model_universal"
    (half / "zero").mkdir(parents=True)
    shutil.copy(ck / "model" / "mp_rank_00_model_states.pt", half)
    proc = resume_at_1(latents, run, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (
        f"not loading {half}: {half}: no converted.json (a conversion that did not finish); converting again"
        in proc.stdout
    )
    converted(proc.stdout)
    assert_continues_like_straight(straight, run)


@pytest.mark.slow
def test_conversion_longer_than_the_collective_timeout(latents, tmp_path, monkeypatch):
    """1 → 2 ranks with collective_timeout_s=3 while the conversion takes over 6 s: rank 1 waits for the
    marker, not in a collective, and the run goes on. The converter is slowed like a slow file system
    would: a `sitecustomize` on PYTHONPATH sleeps 6 s in the process whose arguments are the converter's
    (`--parent`), so the test does not depend on how fast this machine converts."""
    slow = tmp_path / "slow"
    slow.mkdir()
    (slow / "sitecustomize.py").write_text(
        "import sys, time\n\nif '--parent' in sys.argv:\n    time.sleep(6)\n"
    )
    # nonfinite=skip keeps ZeRO-2 at one rank (trainer.engine.engine_stage): a ZeRO checkpoint to convert
    train(
        latents,
        tmp_path,
        "slow",
        "steps=2",
        "ckpt.every=2",
        "collective_timeout_s=3",
        "nonfinite=skip",
        local=1,
    )
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(slow), os.environ.get("PYTHONPATH")])))
    proc = train(latents, tmp_path, "slow", "steps=4", "ckpt.every=2", "collective_timeout_s=3", check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    seconds = converted(proc.stdout)
    print(f"universal conversion {seconds:.2f} s (6 s of it a sleep) at collective_timeout_s=3")
    assert seconds > 6
    assert "resumed slow at step 2 (elastic: universal checkpoint)" in proc.stdout
    assert len(losses(tmp_path, "slow")) == 4


@pytest.mark.slow
def test_conversion_past_its_own_bound_stops_the_job_cleanly(latents, saved_at_2, tmp_path):
    run = copy_run(saved_at_2, tmp_path)
    ck = run / STEP3
    proc = resume_at_1(latents, run, "ckpt.convert_timeout_s=0.5", check=False)
    assert proc.returncode != 0
    assert (
        f"converting {ck}/model to DeepSpeed's universal format took longer than ckpt.convert_timeout_s=0.5 s; "
        "raise it (or ckpt.convert_workers=4)" in proc.stderr
    )
    assert not (ck / "model_universal").exists() and not (ck / ".model_universal").exists()
    assert (ck / "model_universal.failed").is_file()
    assert not converters(ck)
    proc = resume_at_1(latents, run)  # the next attempt, with the default bound, converts and clears the note
    converted(proc.stdout)
    assert not (ck / "model_universal.failed").exists()
