"""The heartbeat (issue #20): a rank that finishes no training step for `heartbeat_s` ends itself with exit
code 76, so that a lost or hung peer costs heartbeat_s instead of collective_timeout_s.

Real processes throughout: a Heartbeat in a subprocess, two gloo ranks whose peer dies or stops, and
`ldit train --local 2` with one rank frozen by SIGSTOP.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest

from slurm.env import child_env, free_port
from tests.conftest import ROOT, clean_env
from tests.data_fixtures import gaussian_latent_set
from tests.test_train_dit import CONFIG
from trainer.common import EXIT_PEER_LOST
from trainer.heartbeat import Heartbeat, is_peer_loss

BEATING = """
import sys, time
from trainer.heartbeat import Heartbeat

pause = sys.argv[1] == "pause"
heartbeat = Heartbeat(2.0, rank=3)
time.sleep(3)  # longer than the bound, before the first beat: not armed yet
start = time.monotonic()
while time.monotonic() - start < 3:
    heartbeat.beat()
    time.sleep(0.1)
print(time.monotonic(), flush=True)  # the last beat
if pause:
    with heartbeat.paused():
        time.sleep(4)
    time.sleep(1)  # leaving paused() counted as a beat
    heartbeat.stop()
    print("alive", flush=True)
else:
    time.sleep(30)
"""


def test_a_silent_heartbeat_exits_76_after_its_bound():
    proc = subprocess.Popen(
        [sys.executable, "-c", BEATING, "silent"], cwd=ROOT, env=clean_env(), stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    last_beat = float(proc.stdout.readline())
    proc.wait(timeout=20)
    silent = time.monotonic() - last_beat  # CLOCK_MONOTONIC: one clock for every process of the host
    print(f"exited {proc.returncode} {silent:.2f} s after the last beat (bound 2 s)")
    assert proc.returncode == EXIT_PEER_LOST == 76
    assert 1.5 < silent < 5
    line = proc.stderr.read().strip()
    assert line.startswith("rank 3: no training step finished for 2 s (heartbeat_s=2): ")
    assert line.endswith("a peer is lost or hung; exiting with code 76 so that the job is requeued")


def test_a_paused_heartbeat_does_not_exit():
    proc = subprocess.run(
        [sys.executable, "-c", BEATING, "pause"], cwd=ROOT, env=clean_env(), capture_output=True, text=True,
        timeout=60,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.splitlines()[-1] == "alive"


def test_a_heartbeat_of_zero_starts_no_thread():
    before = threading.active_count()
    heartbeat = Heartbeat(0.0, rank=0)
    heartbeat.beat()
    with heartbeat.paused():
        pass
    assert threading.active_count() == before
    assert "heartbeat" not in [t.name for t in threading.enumerate()]
    heartbeat.stop()


PEER = """
import json, os, signal, sys
from datetime import timedelta

import torch
import torch.distributed as dist

from trainer.heartbeat import is_peer_loss

dist.init_process_group("gloo", timeout=timedelta(seconds=5))
t = torch.ones(4)
dist.all_reduce(t)
if dist.get_rank() == 1:
    os.kill(os.getpid(), signal.SIGKILL if sys.argv[1] == "kill" else signal.SIGSTOP)
try:
    while True:
        dist.all_reduce(t)
except Exception as exc:
    print(json.dumps({"type": type(exc).__name__, "message": str(exc), "peer_loss": is_peer_loss(exc)}), flush=True)
os._exit(0)  # no process-group teardown with a dead peer
"""


@pytest.mark.parametrize(
    ("how", "fragments"),
    [
        ("kill", ("Connection reset by peer", "Connection closed by peer")),
        ("stop", ("Timed out waiting 5000ms for recv operation to complete",)),
    ],
)
def test_what_gloo_raises_when_a_peer_is_lost_is_a_peer_loss(how, fragments):
    """Rank 1 SIGKILLs or SIGSTOPs itself after an all_reduce; rank 0's next all_reduce fails (at once, or
    after the 5 s process-group time-out), with an error is_peer_loss recognises."""
    port = free_port()
    ranks = [
        subprocess.Popen(
            [sys.executable, "-c", PEER, how],
            cwd=ROOT,
            env=child_env(r, 2, port, base=clean_env()),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for r in (0, 1)
    ]
    try:
        out, err = ranks[0].communicate(timeout=45)
    finally:
        for p in ranks:
            p.kill()
            p.wait()
    assert ranks[0].returncode == 0, err[-2000:]
    seen = json.loads(out)
    print(seen)
    assert seen["type"] == "RuntimeError"
    assert any(f in seen["message"] for f in fragments), seen["message"]
    assert seen["peer_loss"] is True


def test_other_errors_are_not_a_peer_loss():
    import torch.distributed as dist

    assert is_peer_loss(dist.DistNetworkError("connect() timed out"))
    assert not is_peer_loss(ValueError("Connection reset by peer"))
    assert not is_peer_loss(RuntimeError("CUDA out of memory"))


@pytest.fixture(scope="module")
def latents(tmp_path_factory) -> Path:
    """12 shards of 8 latents (4, 4, 4), 3 classes (the DiT tests' set)."""
    folder = tmp_path_factory.mktemp("latents")
    gaussian_latent_set(folder)
    return folder


def test_a_stopped_rank_ends_the_job_with_76_after_heartbeat_s(latents, tmp_path):
    """Rank 1 freezes (SIGSTOP) mid-run: rank 0 leaves with 76 after heartbeat_s=10, not after the 300 s
    collective time-out, and `--local 2` reports 76 (the first rank that failed), having SIGKILLed the frozen
    rank (which never acts on SIGTERM) KILL_WAIT_S after."""
    cmd = [sys.executable, "-m", "slurm.cli", "train", CONFIG, f"data.shards={latents}", f"run.root={tmp_path}",
           "run.name=hb", "steps=100000", "log.every=1", "ckpt.every=100000", "heartbeat_s=10",
           "collective_timeout_s=300", "--local", "2"]  # fmt: skip
    out = tmp_path / "out"
    with open(out, "w") as f:
        launcher = subprocess.Popen(
            cmd, cwd=ROOT, env=clean_env(), stdout=f, stderr=subprocess.STDOUT, start_new_session=True
        )
    log = tmp_path / "hb" / "log.jsonl"
    try:
        deadline = time.monotonic() + 40
        while not (log.exists() and len(log.read_text().splitlines()) >= 10):
            assert launcher.poll() is None, out.read_text()[-3000:]
            assert time.monotonic() < deadline, "10 steps not logged in 40 s"
            time.sleep(0.05)
        ranks = {int(p.environ()["RANK"]): p for p in psutil.Process(launcher.pid).children()}
        ranks[1].suspend()  # SIGSTOP
        stopped = time.monotonic()
        gone, _ = psutil.wait_procs([ranks[0]], timeout=25)
        elapsed = time.monotonic() - stopped
        assert gone, "rank 0 still runs 25 s after rank 1 stopped (heartbeat_s=10)"
        code = launcher.wait(timeout=30)  # the frozen rank ignores SIGTERM: SIGKILLed after KILL_WAIT_S
    finally:
        if launcher.poll() is None:
            os.killpg(launcher.pid, signal.SIGCONT)
            os.killpg(launcher.pid, signal.SIGKILL)
            launcher.wait()
    text = out.read_text()
    print(f"rank 0 left {elapsed:.1f} s after rank 1 stopped (heartbeat_s=10); the job exited {code}")
    assert code == EXIT_PEER_LOST, text[-3000:]
    assert 9 < elapsed < 25
    assert "rank 0: no training step finished for 1" in text  # 10 or 11 s
    assert (
        "(heartbeat_s=10): a peer is lost or hung; exiting with code 76 so that the job is requeued" in text
    )


def test_a_negative_heartbeat_is_refused_at_start(capsys):
    from slurm.cli import main

    assert main(["train", CONFIG, "heartbeat_s=-1"]) == 2
    assert "config error: heartbeat_s=-1.0 must be 0 (off) or positive" in capsys.readouterr().err
