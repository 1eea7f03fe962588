"""Faults and bad input (issue #11): nothing lost, nothing hangs.

Real processes (gloo on CPU, the tiny DiT of configs/dit/tiny_cpu.yaml, 2 ranks): ranks and whole jobs
killed with SIGKILL mid-step and mid-save, damaged checkpoints, damaged shards, a checkpoint write that
fails on one rank, configs that cannot work; plus in-process units (a gloo world of 1) for a disk that
is full. Every resumed run is compared with one uninterrupted reference run.
"""

from __future__ import annotations

import ast
import errno
import json
import os
import random
import re
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from data_prep.manifest import load_manifest
from slurm.env import child_env, free_port
from tests.conftest import ROOT, clean_env
from tests.data_fixtures import gaussian_latent_set
from tests.test_train_dit import CONFIG, final_weights, log, losses, module_weights, train

REF_STEPS = 16


@pytest.fixture(scope="module")
def latents(tmp_path_factory) -> Path:
    """12 shards of 8 latents (4, 4, 4), 3 classes (the DiT tests' set)."""
    folder = tmp_path_factory.mktemp("latents")
    gaussian_latent_set(folder)
    return folder


@pytest.fixture(scope="module")
def reference(latents, tmp_path_factory) -> Path:
    """The uninterrupted run every faulty run is compared with: 2 ranks, 16 steps, a checkpoint every 2, all kept."""
    root = tmp_path_factory.mktemp("reference")
    train(latents, root, "ref", f"steps={REF_STEPS}", "ckpt.every=2", "ckpt.keep_last=100")
    assert len(losses(root, "ref")) == REF_STEPS
    return root / "ref"


def ref_losses(reference: Path) -> list[float]:
    return losses(reference.parent, reference.name)


def resumable_copy(reference: Path, run_dir: Path, step: int) -> None:
    """The reference run as it was when it had saved checkpoint `step` (later checkpoints and the export dropped)."""
    shutil.copytree(reference, run_dir, symlinks=True)
    shutil.rmtree(run_dir / "export")
    for ck in (run_dir / "checkpoints").glob("step-*"):
        if int(ck.name.removeprefix("step-")) > step:
            shutil.rmtree(ck)
    (run_dir / "checkpoints" / "latest").write_text(f"step-{step:08d}")


def ckpt_dir(root: Path, name: str, step: int) -> Path:
    return root / name / "checkpoints" / f"step-{step:08d}"


def published(root: Path, name: str) -> str | None:
    pointer = root / name / "checkpoints" / "latest"
    return pointer.read_text().strip() if pointer.is_file() else None


def cmd(latents: Path, root: Path, name: str, *overrides: str) -> list[str]:
    return [sys.executable, "-m", "slurm.cli", "train", CONFIG, f"data.shards={latents}", f"run.root={root}",
            f"run.name={name}", "log.every=1", *overrides]  # fmt: skip


def start_job(args: list[str], out: Path) -> subprocess.Popen:
    """`ldit train ... --local 2` in its own session, so that the whole job (launcher and ranks) can be killed."""
    f = open(out, "w")  # noqa: SIM115 (the child holds it; closed with the test's tmp dir)
    return subprocess.Popen(
        [*args, "--local", "2"],
        cwd=ROOT,
        env=clean_env(),
        stdout=f,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def start_ranks(args: list[str], out: Path, limits: dict[int, int] | None = None) -> list[subprocess.Popen]:
    """The 2 ranks of a job started directly (torchrun-style variables), with no launcher to stop the survivor.

    `limits` caps the file size a rank may write (RLIMIT_FSIZE, bytes): its larger writes fail with EFBIG.
    """
    port = free_port()
    procs = []
    for r in range(2):
        cap = (limits or {}).get(r)

        def preexec(cap=cap) -> None:
            if cap is not None:
                resource.setrlimit(resource.RLIMIT_FSIZE, (cap, cap))

        f = open(out.with_name(f"{out.name}.rank{r}"), "w")  # noqa: SIM115
        procs.append(
            subprocess.Popen(
                args,
                cwd=ROOT,
                env=child_env(r, 2, port, base=clean_env()),
                stdout=f,
                stderr=subprocess.STDOUT,
                preexec_fn=preexec,
            )  # fmt: skip
        )
    return procs


def rank_output(out: Path, r: int) -> str:
    return out.with_name(f"{out.name}.rank{r}").read_text()


def wait_until(predicate, procs: list[subprocess.Popen], timeout: float = 180, what: str = "") -> None:
    """Poll `predicate` until it holds; fail at once if one of `procs` ended first."""
    deadline = time.monotonic() + timeout
    while not predicate():
        ended = [p.args for p in procs if p.poll() is not None]
        assert not ended, f"{ended} ended before {what}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.005)


def logged_steps(root: Path, name: str) -> int:
    path = root / name / "log.jsonl"
    return len(path.read_text().splitlines()) if path.exists() else 0


def kill_job(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)


# ----------------------------------------------------------------------------------- dead and hung ranks


@pytest.mark.slow
def test_sigkilled_rank_fails_the_other_and_the_run_resumes(latents, reference, tmp_path):
    """Rank 1 dies mid-run (SIGKILL): rank 0 exits non-zero on its own, well before the collective time-out."""
    timeout = 60
    out = tmp_path / "out"
    ranks = start_ranks(cmd(latents, tmp_path, "dead", "steps=100000", "ckpt.every=2", f"collective_timeout_s={timeout}"), out)  # fmt: skip
    wait_until(lambda: logged_steps(tmp_path, "dead") >= 5, ranks, what="5 steps")
    ranks[1].send_signal(signal.SIGKILL)
    t0 = time.monotonic()
    ranks[0].wait(timeout=timeout + 60)
    elapsed = time.monotonic() - t0
    ranks[1].wait()
    print(
        f"rank 0 exited {ranks[0].returncode} {elapsed:.1f} s after rank 1 was killed (time-out {timeout} s)"
    )
    assert ranks[0].returncode != 0 and ranks[1].returncode == -signal.SIGKILL
    assert elapsed < 20  # a third of the time-out: the peer's death is seen, not waited out
    assert "by peer" in rank_output(out, 0)  # gloo: "Connection reset by peer" (or "closed by peer")
    step = int(published(tmp_path, "dead").removeprefix("step-"))
    assert step >= 4
    proc = train(latents, tmp_path, "dead", f"steps={step + 2}", "ckpt.every=2")
    assert f"resumed dead at step {step}" in proc.stdout
    n = min(step + 2, REF_STEPS)
    assert losses(tmp_path, "dead")[:n] == ref_losses(reference)[:n]


@pytest.mark.slow
def test_stopped_rank_fails_the_other_after_the_collective_timeout(latents, tmp_path):
    """Rank 1 hangs (SIGSTOP): rank 0 leaves after `collective_timeout_s` (passed to gloo), not never."""
    timeout = 5
    out = tmp_path / "out"
    ranks = start_ranks(cmd(latents, tmp_path, "hung", "steps=100000", "ckpt.every=1000", f"collective_timeout_s={timeout}"), out)  # fmt: skip
    try:
        wait_until(lambda: logged_steps(tmp_path, "hung") >= 3, ranks, what="3 steps")
        ranks[1].send_signal(signal.SIGSTOP)
        t0 = time.monotonic()
        ranks[0].wait(timeout=timeout + 60)
        elapsed = time.monotonic() - t0
    finally:
        ranks[1].kill()
        ranks[1].wait()
        ranks[0].kill()
    print(f"rank 0 exited {ranks[0].returncode} {elapsed:.1f} s after rank 1 stopped (time-out {timeout} s)")
    assert ranks[0].returncode != 0
    assert timeout - 1 <= elapsed < timeout + 15
    assert f"Timed out waiting {timeout * 1000}ms for recv operation to complete" in rank_output(out, 0)


# ------------------------------------------------------------------------------------ killed while saving


@pytest.mark.slow
def test_job_killed_while_writing_a_checkpoint_resumes_from_the_last_complete_one(
    latents, reference, tmp_path
):
    ckpts = tmp_path / "mid" / "checkpoints"
    job = start_job(
        cmd(latents, tmp_path, "mid", "steps=100000", "ckpt.every=1", "ckpt.keep_last=2"), tmp_path / "out"
    )

    def partial() -> Path | None:
        latest = published(tmp_path, "mid")
        if latest is None or int(latest.removeprefix("step-")) < 2:
            return None
        found = [p for p in ckpts.glob("step-*") if p.name > latest and not (p / "meta.json").exists()]
        return found[0] if found else None

    try:
        wait_until(lambda: partial() is not None, [job], what="a checkpoint being written")
        victim = partial()
        kill_job(job)  # the launcher and both ranks, at once
    finally:
        if job.poll() is None:
            kill_job(job)
    latest = published(tmp_path, "mid")
    step = int(latest.removeprefix("step-"))
    assert victim.is_dir() and not (victim / "meta.json").exists(), "killed while the checkpoint was written"
    assert victim.name > latest and (ckpts / latest / "meta.json").is_file()
    proc = train(latents, tmp_path, "mid", f"steps={step + 2}", "ckpt.every=1")
    assert (
        f"ignoring checkpoint {victim.name}: {victim}: no meta.json (the save did not finish)" in proc.stderr
    )
    assert f"resumed mid at step {step}" in proc.stdout
    n = min(step + 2, REF_STEPS)
    assert losses(tmp_path, "mid")[:n] == ref_losses(reference)[:n]
    assert (ckpt_dir(tmp_path, "mid", step + 2) / "meta.json").is_file()
    assert (victim / "meta.json").is_file(), "the step whose save was killed is written again (keep_last=2)"


@pytest.mark.slow
def test_damaged_checkpoint_falls_back_to_the_previous_one(reference, latents, tmp_path):
    """The reference run stopped at step 6; then step 6's EMA is truncated and a rank's RNG file deleted."""
    resumable_copy(reference, tmp_path / "dmg", 6)
    bad = ckpt_dir(tmp_path, "dmg", 6)
    ema = bad / "ema.safetensors"
    size = ema.stat().st_size
    os.truncate(ema, size // 2)
    (bad / "rng-rank1.pt").unlink()
    proc = train(latents, tmp_path, "dmg", "steps=8", "ckpt.every=2")
    assert (
        f"checkpoint step-00000006 named by {tmp_path / 'dmg' / 'checkpoints' / 'latest'} is not usable: "
        f"{ema}: {size // 2} bytes, meta.json says {size} (truncated?); {bad / 'rng-rank1.pt'}: missing"
    ) in proc.stderr
    assert "resuming from step-00000004, the newest complete checkpoint" in proc.stderr
    assert "resumed dmg at step 4" in proc.stdout
    assert losses(tmp_path, "dmg") == ref_losses(reference)[:8]
    got, want = module_weights(tmp_path, "dmg", 8), module_weights(reference.parent, "ref", 8)
    assert all(torch.equal(got[k], want[k]) for k in want)


# -------------------------------------------------------------------------------------------- chaos


@pytest.mark.slow
def test_chaos_three_sigkills_then_identical_to_the_uninterrupted_run(latents, reference, tmp_path):
    """The whole job is SIGKILLed at 3 seeded random moments and restarted each time at the same world size;
    the final run equals the uninterrupted one bit for bit.

    A moment is a seeded step of the run plus a seeded delay of up to one step (~50 ms here), so a kill
    lands in a step, between steps or in a checkpoint write (ckpt.every=2). The steps are 3 or more apart:
    a tiny step is so short that a time after the start alone could let an attempt finish the run."""
    rng = random.Random(11)
    targets = [rng.randint(2, 4), rng.randint(7, 9), rng.randint(12, REF_STEPS - 3)]
    args = cmd(latents, tmp_path, "chaos", f"steps={REF_STEPS}", "ckpt.every=2")
    kills = []
    for attempt, target in enumerate(targets):
        out = tmp_path / f"attempt{attempt}.out"
        job = start_job(args, out)
        try:
            wait_until(lambda: logged_steps(tmp_path, "chaos") >= target, [job], what=f"step {target}")  # noqa: B023
            time.sleep(rng.uniform(0.0, 0.05))
            assert job.poll() is None, f"attempt {attempt} finished before its kill"
            kill_job(job)
        finally:
            if job.poll() is None:
                kill_job(job)
        kills.append((logged_steps(tmp_path, "chaos"), published(tmp_path, "chaos")))
    print("killed after logged step / with latest:", kills)
    final = train(latents, tmp_path, "chaos", f"steps={REF_STEPS}", "ckpt.every=2")
    assert "resumed chaos at step" in final.stdout
    assert losses(tmp_path, "chaos") == ref_losses(reference)
    a, b = final_weights(reference.parent, "ref"), final_weights(tmp_path, "chaos")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ma, mb = module_weights(reference.parent, "ref", REF_STEPS), module_weights(tmp_path, "chaos", REF_STEPS)
    assert all(torch.equal(ma[k], mb[k]) for k in ma)


# ------------------------------------------------------------------------------------------ bad shards


def damage(latents: Path, folder: Path) -> dict[str, str]:
    """A copy of the set with shard 2's bytes changed (same size), shard 7 truncated, and shard 5's
    manifest count off by one. Returns {shard name: the check it fails}."""
    shutil.copytree(latents, folder)
    m = load_manifest(folder)
    s2 = folder / m.shards[2].name
    data = bytearray(s2.read_bytes())
    data[700] ^= 0xFF  # inside the first member's data: the tar still parses, only the hash changes
    s2.write_bytes(bytes(data))
    s7 = folder / m.shards[7].name
    os.truncate(s7, 1024)
    raw = json.loads((folder / "manifest.json").read_text())
    raw["shards"][5]["count"] += 1
    raw["total"] += 1
    (folder / "manifest.json").write_text(json.dumps(raw))
    return {
        m.shards[2].name: f"shard {s2}: sha256 ",
        m.shards[5].name: f"shard {folder / m.shards[5].name}: holds 8 samples, manifest says 9",
        m.shards[
            7
        ].name: f"shard {s7}: size 1024 bytes, manifest says {m.shards[7].bytes} (truncated or replaced?)",
    }


@pytest.mark.slow
def test_bad_shards_stop_every_rank_before_training(latents, tmp_path):
    """Shard 2 is verified by rank 0, shards 5 and 7 by rank 1; each rank names all three (all-gathered)."""
    bad = damage(latents, tmp_path / "set")
    out = tmp_path / "out"
    ranks = start_ranks(cmd(tmp_path / "set", tmp_path, "badset", "steps=3"), out)
    for p in ranks:
        p.wait(timeout=120)
    for r, p in enumerate(ranks):
        text = rank_output(out, r)
        assert p.returncode == 1, text[-3000:]
        assert f"ldit train: error: 3 of 12 shards of {tmp_path / 'set'} do not match the manifest (data.verify=sha256); nothing was trained" in text  # fmt: skip
        for msg in bad.values():
            assert msg in text
        assert "data.bad_shards=skip" in text
    assert (
        not (tmp_path / "badset" / "log.jsonl").exists()
        and not (tmp_path / "badset" / "checkpoints").exists()
    )


@pytest.mark.slow
def test_bad_shards_skipped_with_the_skip_policy(latents, tmp_path):
    bad = damage(latents, tmp_path / "set")
    proc = train(tmp_path / "set", tmp_path, "skip", "steps=3", "data.bad_shards=skip")
    assert f"skipping 3 bad shard(s) of {tmp_path / 'set'} (data.bad_shards=skip); training on the other 9 shards (72 of 97 samples)" in proc.stdout  # fmt: skip
    for msg in bad.values():
        assert msg in proc.stdout
    assert len(losses(tmp_path, "skip")) == 3


def test_skipped_shards_leave_an_elastic_stream(latents, tmp_path):
    """The reduced set's global batches are the same at world sizes 1 and 2 and never hold a bad shard's sample."""
    from data_prep.reader import StreamReader, latent_decoder, without_shards
    from data_prep.shards import read_shard

    bad = damage(latents, tmp_path / "set")
    reduced = without_shards(load_manifest(tmp_path / "set"), bad)
    assert [s.name for s in reduced.shards] == [
        s.name for s in load_manifest(latents).shards if s.name not in bad
    ]
    banned = {s["__key__"] for name in bad for s in read_shard(str(latents / name))}

    def global_batches(world: int) -> list[list[str]]:
        per_rank = []
        for rank in range(world):
            reader = StreamReader(tmp_path / "set", reduced, seed=0, global_batch=16, streams=4, rank=rank,
                                  world_size=world, decode=latent_decoder())  # fmt: skip
            it = reader.batches(0)
            per_rank.append([next(it).keys for _ in range(12)])
        return [sorted(k for r in range(world) for k in per_rank[r][step]) for step in range(12)]

    one, two = global_batches(1), global_batches(2)
    assert one == two and len(one[0]) == 16
    assert not banned & {k for batch in one for k in batch}
    with pytest.raises(ValueError, match="no shard named nope.tar in the manifest"):
        without_shards(reduced, ["nope.tar"])


def test_size_only_verification_misses_what_sha256_catches(latents, tmp_path, world_of_one):
    from data_prep.manifest import ShardSetError
    from trainer.config import StreamConfig
    from trainer.preflight import open_training_shards

    bad = damage(latents, tmp_path / "set")
    names = sorted(bad)
    with pytest.raises(ShardSetError) as err:
        open_training_shards(StreamConfig(shards=str(tmp_path / "set"), verify="size"), "latents")
    msg = str(err.value)
    assert msg.startswith(
        f"1 of 12 shards of {tmp_path / 'set'} do not match the manifest (data.verify=size)"
    )
    assert bad[names[2]] in msg and names[0] not in msg and names[1] not in msg  # only the truncated one
    m = open_training_shards(StreamConfig(shards=str(tmp_path / "set"), bad_shards="skip"), "latents")
    assert len(m.shards) == 9 and not {s.name for s in m.shards} & set(bad)


# ------------------------------------------------------------------------------- failed checkpoint writes


class FakeCheckpointEngine:
    """DeepSpeed's checkpoint_engine: every file of a save goes through its `save(state_dict, path)`."""

    def save(self, state_dict: dict, path: str) -> None:
        Path(path).write_bytes(b"x" * 10)


class FakeEngine:
    """Stands in for a DeepSpeed engine: writes one file per save, or fails like a full disk."""

    def __init__(self, root: Path, fail: bool = False) -> None:
        self.root, self.fail = root, fail
        self.seen: list[list[str]] = []
        self.checkpoint_engine = FakeCheckpointEngine()

    def save_checkpoint(self, save_dir: str, tag: str, client_state: dict, save_latest: bool) -> None:
        self.seen.append(sorted(p.name for p in (self.root / "checkpoints").glob("step-*")))
        (Path(save_dir) / tag).mkdir(parents=True, exist_ok=True)
        if self.fail:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(Path(save_dir) / tag / "states.pt"))
        self.checkpoint_engine.save({}, str(Path(save_dir) / tag / "states.pt"))


def test_full_disk_keeps_the_previous_checkpoint(tmp_path, world_of_one):
    from trainer.checkpoint import Checkpointer, CheckpointWriteError, problems

    ck = Checkpointer(tmp_path, keep_last=1)
    ok = FakeEngine(tmp_path)
    ema = {"w": torch.ones(3)}
    ck.save(2, {"model": ok}, ema, {"world_size": 1})
    ck.save(4, {"model": ok}, ema, {"world_size": 1})
    assert ok.seen == [["step-00000002"], ["step-00000002", "step-00000004"]]  # step 2 lived until 4 was done
    assert sorted(p.name for p in (tmp_path / "checkpoints").glob("step-*")) == ["step-00000004"]
    with pytest.raises(CheckpointWriteError) as err:
        ck.save(6, {"model": FakeEngine(tmp_path, fail=True)}, ema, {"world_size": 1})
    path = tmp_path / "checkpoints" / "step-00000006"
    assert str(err.value) == (
        f"writing checkpoint {path} failed on rank 0: OSError: [Errno 28] No space left on device: "
        f"'{path / 'model' / 'states.pt'}' (ENOSPC). Removed the partial checkpoint; latest still names step-00000004"
    )
    assert err.value.errno == errno.ENOSPC
    assert not path.exists() and published(tmp_path.parent, tmp_path.name) == "step-00000004"
    assert problems(tmp_path / "checkpoints" / "step-00000004") == [] and ck.latest().step == 4
    with pytest.raises(FloatingPointError, match="refusing to write checkpoint step-00000008: the EMA weights are not finite"):  # fmt: skip
        ck.save(8, {"model": ok}, {"w": torch.tensor([float("nan")])}, {"world_size": 1})
    assert not (tmp_path / "checkpoints" / "step-00000008").exists() and ck.latest().step == 4


@pytest.mark.slow
def test_write_failure_on_one_rank_is_agreed_and_keeps_the_previous_checkpoint(latents, reference, tmp_path):
    """Rank 1 may write no file over 64 KiB (RLIMIT_FSIZE): torch.save of its ZeRO partition fails (a bare
    RuntimeError) while rank 0's writes succeed. Both ranks report it (no hang), naming the rank and the
    limit; the partial step 4 is removed and `latest` stays at step 2."""
    resumable_copy(reference, tmp_path / "full", 2)
    out = tmp_path / "out"
    ranks = start_ranks(cmd(latents, tmp_path, "full", "steps=4", "ckpt.every=2", "collective_timeout_s=60"), out,
                        limits={1: 64 * 1024})  # fmt: skip
    for p in ranks:
        p.wait(timeout=120)
    path = ckpt_dir(tmp_path, "full", 4)
    for r, p in enumerate(ranks):
        text = rank_output(out, r)
        assert p.returncode == 1, text[-3000:]  # a reported error (one line, no traceback), not a crash
        assert f"ldit train: error: writing checkpoint {path} failed on rank 1: RuntimeError: " in text
        assert "Traceback" not in text
        assert "this process may write files of at most 65536 bytes (ulimit -f)). " in text
        assert " MiB free on the filesystem of " in text
        assert "Removed the partial checkpoint; latest still names step-00000002" in text
    assert not path.exists() and published(tmp_path, "full") == "step-00000002"
    proc = train(latents, tmp_path, "full", "steps=4", "ckpt.every=2")
    assert "resumed full at step 2" in proc.stdout
    assert losses(tmp_path, "full") == ref_losses(reference)[:4]


# ------------------------------------------------------------------------------- config errors at launch


@pytest.fixture(scope="module")
def bad_inputs(latents, tmp_path_factory) -> dict[str, Path]:
    """A latent set whose manifest lost its statistics, and the model.json of a VA-VAE that does not fit the latents."""
    from dataclasses import asdict

    from models.vavae import autoencoder_args

    tmp = tmp_path_factory.mktemp("preflight")
    nostats = tmp / "nostats"
    shutil.copytree(latents, nostats)
    raw = json.loads((nostats / "manifest.json").read_text())
    raw["latent"]["mean"], raw["latent"]["std"] = [], []
    (nostats / "manifest.json").write_text(json.dumps(raw))
    vavae = (
        tmp / "vavae-export"
    )  # an f8 VA-VAE with 32 latent channels (the `small` size); the latents have 4
    vavae.mkdir()
    (vavae / "model.json").write_text(
        json.dumps({"kind": "vavae", "args": asdict(autoencoder_args("small"))})
    )
    return {"latents": latents, "nostats": nostats, "vavae": vavae, "nowhere": tmp / "nowhere"}


PREFLIGHT = {
    "world": (
        ["data.shards={latents}", "--local", "3"],
        "world size 3 must divide data.streams=4 (each rank reads streams r, r+W, …)",
    ),
    "slurm": (
        ["data.shards={latents}", "--slurm", "--cluster", str(ROOT / "configs/cluster/local.yaml"), "cluster.nodes=3"],
        "world size 6 must divide data.streams=4",  # 3 nodes x 2 tasks per node (the cluster file)
    ),
    "micro": (
        ["data.shards={latents}", "micro_batch=3", "--local", "2"],
        "micro_batch=3 must divide the per-rank batch 8 (data.global_batch=16 / world size 2)",
    ),
    "missing": (["data.shards={nowhere}", "--local", "2"], "data.shards={nowhere}: no such folder"),
    "shards": (
        ["data.shards={latents}", "data.streams=16", "--local", "1"],
        "data.shards={latents} has 12 shards, fewer than data.streams=16",
    ),
    "stats": (
        ["data.shards={nostats}", "--local", "2"],
        "{nostats}/manifest.json has no latent statistics (latent.mean and latent.std, one per channel of [4, 4, 4])",
    ),
    "vavae": (
        ["data.shards={latents}", "vavae={vavae}", "--local", "2"],
        "vavae={vavae} makes latents of 32 channels (f8), but the latents of {latents} have shape [4, 4, 4]",
    ),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(PREFLIGHT))
def test_config_errors_are_caught_before_any_process_starts(bad_inputs, case, tmp_path, capsys, monkeypatch):
    """`ldit train ...` (slurm.cli.main, in this process) exits 2 with the message; no rank, local or SLURM, starts."""
    import slurm.cli
    import slurm.submit

    def started(*args, **kwargs):
        raise AssertionError("a process was started")

    for target, name in ((slurm.cli, "run_local"), (slurm.cli, "run_here"), (slurm.submit, "submit")):
        monkeypatch.setattr(target, name, started)
    args, message = PREFLIGHT[case]
    argv = ["train", CONFIG, f"run.root={tmp_path}", "run.name=x", *(a.format(**bad_inputs) for a in args)]
    assert slurm.cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("ldit train: config error: 1 problem(s) found before starting:\n  ")
    assert message.format(**bad_inputs) in err
    assert not (tmp_path / "x").exists()


def test_every_problem_is_listed_at_once(bad_inputs, tmp_path, capsys):
    """Two problems at once (a world size, a manifest without statistics) are both listed in one error."""
    import slurm.cli

    argv = ["train", CONFIG, f"run.root={tmp_path}", "run.name=x", f"data.shards={bad_inputs['nostats']}",
            "--local", "3"]  # fmt: skip
    assert slurm.cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("ldit train: config error: 2 problem(s) found before starting:\n  ")
    for message in (PREFLIGHT["world"][1], "has no latent statistics"):
        assert message in err, message
    assert not (tmp_path / "x").exists()


def test_config_error_through_the_ldit_command(latents, tmp_path):
    """The same check from the shell: `ldit train ... --local 3` exits 2 before starting any process."""
    proc = subprocess.run(
        cmd(latents, tmp_path, "x", "--local", "3"), cwd=ROOT, env=clean_env(), capture_output=True, text=True, timeout=120
    )  # fmt: skip
    assert proc.returncode == 2
    assert "ldit train: config error: 1 problem(s) found before starting:\n  world size 3 must divide data.streams=4" in proc.stderr  # fmt: skip
    assert not (tmp_path / "x").exists()


# --------------------------------------------------------------------------------------- untrusted files


def test_every_torch_load_in_the_source_uses_weights_only():
    calls, unsafe = 0, []
    skip = {"tests", "runs", "build"}  # the tests load DeepSpeed's own files; runs/ holds outputs
    packages = [d for d in ROOT.iterdir() if d.is_dir() and not d.name.startswith(".") and d.name not in skip]
    assert {"models", "data_prep", "trainer", "eval", "slurm"} <= {d.name for d in packages}
    for path in sorted(p for d in packages for p in d.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Call) and ast.unparse(node.func) == "torch.load":
                calls += 1
                kw = {k.arg: k.value for k in node.keywords}
                if not (
                    isinstance(kw.get("weights_only"), ast.Constant) and kw["weights_only"].value is True
                ):
                    unsafe.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert calls >= 3 and unsafe == []


@pytest.mark.slow
def test_exports_and_ema_are_safetensors(reference):
    export = reference / "export" / "latest"
    assert sorted(p.name for p in export.iterdir()) == ["config.yaml", "ema.safetensors", "model.json"]
    assert load_file(str(export / "ema.safetensors"))["pos_embed"].dtype == torch.float32
    ck = reference / "checkpoints" / f"step-{REF_STEPS:08d}"
    pickled = sorted(str(p.relative_to(ck)) for p in ck.rglob("*.pt"))
    assert pickled == ["model/mp_rank_00_model_states.pt", "model/zero_pp_rank_0_mp_rank_00_optim_states.pt",
                       "model/zero_pp_rank_1_mp_rank_00_optim_states.pt", "rng-rank0.pt", "rng-rank1.pt"]  # fmt: skip
    assert json.loads((ck / "meta.json").read_text())["step"] == REF_STEPS
    assert [e["step"] for e in log(reference.parent, "ref")] == list(range(1, REF_STEPS + 1))


# ------------------------------------------------------------------------------- export chain (issue #15)


@pytest.mark.slow
def test_export_chain_carries_the_discriminator_and_projection_or_refuses(tmp_path):
    """A VA-VAE stage started from `ldit export` of the previous stage's checkpoint starts with its
    discriminator and VF projection; the same export copied without training_extras.safetensors is
    refused in one line, before any engine or checkpoint exists (reference §1.4: stages chain)."""
    from models.weights import read_state_dict
    from tests.test_train_vavae import (
        DISC_PREFIX,
        TRAINING_EXTRAS,
        engine_module,
        ldit_export,
        train,
        train_proc,
        vavae_inputs,
    )  # fmt: skip

    inputs = vavae_inputs(tmp_path)
    train(inputs, "prev", "steps=2", "loss.disc_start=1", "ckpt.every=2", "log.sample_every=0")
    shutil.rmtree(inputs / "runs" / "prev" / "export")  # only `ldit export` writes what the next stage reads
    ldit_export(inputs / "runs", "prev", 2)
    src = inputs / "runs" / "prev" / "export" / "latest"
    extras = read_state_dict(src / TRAINING_EXTRAS)
    out = train(
        inputs, "next", f"init_from={src}", "optim.lr=0", "steps=1", "loss.disc_start=1", "log.sample_every=0"
    )
    assert f"initialised autoencoder, linear_proj, discriminator from {src}\n" in out
    # lr 0: after its one step each engine still holds the weights it started from
    ae, disc = (engine_module(inputs / "runs" / "next", 1, e) for e in ("autoencoder", "discriminator"))
    assert torch.equal(ae["linear_proj.weight"], extras["linear_proj.weight"])
    d_params = [
        k for k in extras if k.startswith(DISC_PREFIX) and "running_" not in k and "num_batches" not in k
    ]
    assert len(d_params) == 13
    assert all(torch.equal(disc["discriminator." + k.removeprefix(DISC_PREFIX)], extras[k]) for k in d_params)
    bare = tmp_path / "copied-without-extras"
    shutil.copytree(src, bare)
    (bare / TRAINING_EXTRAS).unlink()
    proc = train_proc(inputs, "refused", f"init_from={bare}", "loss.disc_start=1", "steps=2", local=1)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert (
        f"ldit train: error: init_from={bare} lacks what this stage uses, which would start from random weights: "
        "the linear_proj (linear_proj.weight), as the VF loss is on (loss.use_vf=true, loss.vf_weight=0.1); the "
        "discriminator (loss.discriminator.*), as the GAN is on from iteration 0 of steps=2 (loss.disc_start=1 on "
        f"the lightning clock). Looked in {bare / TRAINING_EXTRAS}: the file does not exist."
    ) in proc.stderr
    assert not (inputs / "runs" / "refused" / "checkpoints").exists()


# ------------------------------------------- issue #15: empty input, cut tar, remote shard set (Reliability rows)


def test_empty_input_is_refused_by_every_step(latents, tmp_path):
    """Empty input: prep-images over a class folder of three unreadable files exits 1 with one line naming
    the folder and the three reasons, and writes nothing; a 0-sample shard set (as it used to write) fails
    `inspect data --verify` and stops `ldit train` before any process starts."""
    import numpy as np

    from data_prep.manifest import ClassInfo, LatentInfo, Manifest
    from tests.data_fixtures import png_bytes

    src = tmp_path / "src"
    (src / "n01440764").mkdir(parents=True)
    (src / "n01440764" / "a.JPEG").write_bytes(b"")
    (src / "n01440764" / "b.JPEG").write_bytes(np.random.default_rng(0).bytes(500))
    png = png_bytes(np.random.default_rng(1), (64, 64))
    (src / "n01440764" / "c.JPEG").write_bytes(png[: len(png) // 2])
    out = tmp_path / "out"

    def ldit(*args: str) -> subprocess.CompletedProcess:
        cmd = [sys.executable, "-m", "slurm.cli", *map(str, args)]
        return subprocess.run(cmd, cwd=ROOT, env=clean_env(), capture_output=True, text=True, timeout=300)

    proc = ldit("prep-images", f"src={src}", f"out={out}")
    assert proc.returncode == 1, proc.stdout
    (line,) = [line for line in proc.stderr.splitlines() if line.startswith("ldit")]  # (beside tqdm's bar)
    assert line.startswith(
        f"ldit prep-images: error: no readable image in {src}: all 3 files of its 1 class folder(s) were skipped "
        "(n01440764/a.JPEG: empty file; n01440764/b.JPEG: not an image (unrecognised format); "
        "n01440764/c.JPEG: corrupt or truncated PNG: "
    )
    assert line.endswith(
        f"); nothing was written to {out}. Put JPEG or PNG images in the class folders of src="
    )
    assert "Traceback" not in proc.stderr and not out.exists()

    empty = tmp_path / "empty"
    empty.mkdir()
    latent = LatentInfo((4, 4, 4), "float32", (0.0,) * 4, (1.0,) * 4)
    Manifest("latents", [], [ClassInfo("c0", 0, "c0")], latent=latent).save(empty)
    message = (
        f"{empty}: the shard set holds 0 samples (0 shards in its manifest): nothing can be read from it; "
        "write it again with `ldit extract-latents` from an image shard set that holds samples"
    )
    proc = ldit("inspect", "data", empty, "--verify", "--no-progress")
    assert proc.returncode == 1 and proc.stdout.splitlines()[-1] == f"verify: {message}"
    proc = train(empty, tmp_path, "on-empty", "steps=2", check=False)
    assert proc.returncode == 2
    assert (
        proc.stderr
        == f"ldit train: config error: 1 problem(s) found before starting:\n  data.shards: {message}\n"
    )
    assert not (tmp_path / "on-empty").exists()


@pytest.mark.slow
def test_cut_tar_is_named_by_the_verify_and_by_the_reader(latents, tmp_path):
    """Cut tar: shard 4 cut before its last member, the manifest's size and sha256 updated to the cut file
    (as a copy tool that re-hashed would). `data.verify=sha256` stops every rank before training, naming the
    shard, its last sample and the missing member; with `size` the reader names it when it reaches it."""
    from tests.data_fixtures import cut_set

    folder = tmp_path / "set"
    _, message = cut_set(latents, folder)
    proc = train(folder, tmp_path, "sha", "steps=6", check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert f"1 of 12 shards of {folder} do not match the manifest (data.verify=sha256); nothing was trained:\n  {message}\n" in proc.stderr  # fmt: skip
    assert not (tmp_path / "sha" / "log.jsonl").exists()
    proc = train(
        folder, tmp_path, "size", "steps=6", "data.verify=size", check=False
    )  # 6 steps read every shard
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "ldit train: error: a bad shard stopped every rank at step " in proc.stderr
    assert re.search(r", before training it:\n  rank [01]: " + re.escape(message) + "\n", proc.stderr)


@pytest.mark.slow
def test_remote_shard_set_trains_like_the_local_folder(latents, tmp_path, monkeypatch):
    """Remote shard set: `data.shards=pipe:cat FOLDER/{}` trains to exactly the losses of the folder itself,
    `inspect data --verify` streams and hashes every shard of it, and a manifest whose shard name holds shell
    characters is refused, naming it, before any shell sees it."""
    import json

    pipe = f"pipe:cat {latents}/{{}}"
    train(latents, tmp_path, "local", "steps=4")
    proc = train(pipe, tmp_path, "pipe", "steps=4")
    assert f"verified 12 shards of {pipe} (data.verify=sha256, 2 rank(s))" in proc.stdout  # streamed, hashed
    assert len(losses(tmp_path, "local")) == 4
    assert losses(tmp_path, "pipe") == losses(tmp_path, "local")
    cmd = [sys.executable, "-m", "slurm.cli", "inspect", "data", pipe, "--verify", "--no-progress"]
    proc = subprocess.run(cmd, cwd=ROOT, env=clean_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[-1] == "verify: all 12 shards verified (size, sha256, sample count)"

    evil = tmp_path / "evil"
    shutil.copytree(latents, evil)
    raw = json.loads((evil / "manifest.json").read_text())
    raw["shards"][0]["name"] = "x.tar;touch $LDIT_MARKER"
    (evil / "manifest.json").write_text(json.dumps(raw))
    monkeypatch.setenv("LDIT_MARKER", str(tmp_path / "MARKER"))
    proc = train(f"pipe:cat {evil}/{{}}", tmp_path, "evil", "steps=1", check=False)
    assert proc.returncode == 2
    assert proc.stderr == (
        f"ldit train: config error: 1 problem(s) found before starting:\n  data.shards: pipe:cat {evil}/manifest.json: "
        "shard name 'x.tar;touch $LDIT_MARKER' is not a plain file name (only letters, digits, '.', '_' and '-'; "
        "no path separator, no '..', no shell character): refusing to open it\n"
    )
    assert not (tmp_path / "MARKER").exists()


def test_groups_made_later_take_the_collective_timeout(world_of_one):
    """DeepSpeed makes its own groups with new_group(), which take torch's module default (30 min for gloo)
    unless init_distributed made `collective_timeout_s` that default: the fix behind the hung-rank row."""
    from datetime import timedelta

    import torch.distributed.distributed_c10d as c10d

    assert c10d.default_pg_timeout == timedelta(seconds=60)
