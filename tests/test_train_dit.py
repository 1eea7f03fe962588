"""DiT training through DeepSpeed ZeRO-2 with real processes (gloo, CPU): exact and elastic resume,
stop signals, bf16, TensorBoard, ZeRO-2 optimizer-state partitioning."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch
from safetensors.torch import load_file

from data_prep.shards import encode_npy, write_shard
from models.lightningdit import LightningDiT, LightningDiTArgs
from tests.conftest import ROOT, clean_env, run_procs
from tests.data_fixtures import gaussian_latent_set

CONFIG = str(ROOT / "configs/dit/tiny_cpu.yaml")


@pytest.fixture(scope="module")
def latents(tmp_path_factory) -> Path:
    """12 shards of 8 latents (4, 4, 4): 3 classes, each a Gaussian around its own mean."""
    folder = tmp_path_factory.mktemp("latents")
    gaussian_latent_set(folder)
    return folder


def train(latents: Path, root: Path, name: str, *overrides: str, local: int = 2, check: bool = True):
    cmd = [
        sys.executable,
        "-m",
        "slurm.cli",
        "train",
        CONFIG,
        f"data.shards={latents}",
        f"run.root={root}",
        f"run.name={name}",
        "log.every=1",
        *overrides,
    ]
    if local > 1:
        cmd += ["--local", str(local)]
    proc = subprocess.run(cmd, cwd=ROOT, env=clean_env(), capture_output=True, text=True, timeout=600)
    if check:
        assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def log(root: Path, name: str) -> list[dict]:
    return [json.loads(line) for line in (root / name / "log.jsonl").read_text().splitlines()]


def losses(root: Path, name: str) -> list[float]:
    entries = log(root, name)
    assert [e["step"] for e in entries] == list(range(1, len(entries) + 1)), "every step logged once"
    return [e["loss/total"] for e in entries]


def final_weights(root: Path, name: str) -> dict[str, torch.Tensor]:
    return load_file(str(root / name / "export" / "latest" / "ema.safetensors"))


def module_weights(root: Path, name: str, step: int) -> dict[str, torch.Tensor]:
    path = root / name / "checkpoints" / f"step-{step:08d}" / "model" / "mp_rank_00_model_states.pt"
    return torch.load(path, map_location="cpu", weights_only=False)["module"]


@pytest.fixture(scope="module")
def straight(latents, tmp_path_factory):
    """The uninterrupted reference: 2 ranks, 6 steps."""
    root = tmp_path_factory.mktemp("runs")
    train(latents, root, "straight", "steps=6", "ckpt.every=3")
    return root


def test_resume_is_bit_identical(latents, straight, tmp_path):
    train(latents, tmp_path, "resumed", "steps=3", "ckpt.every=3")
    train(
        latents, tmp_path, "resumed", "steps=6", "ckpt.every=3"
    )  # the run directory has a checkpoint: resume
    ref = losses(straight, "straight")
    assert len(ref) == 6 and losses(tmp_path, "resumed") == ref
    a, b = final_weights(straight, "straight"), final_weights(tmp_path, "resumed")
    assert all(torch.equal(a[k], b[k]) for k in a)
    ma, mb = module_weights(straight, "straight", 6), module_weights(tmp_path, "resumed", 6)
    assert all(torch.equal(ma[k], mb[k]) for k in ma)
    assert (tmp_path / "resumed" / "config.1.yaml").is_file()  # the first attempt's config (steps=3) kept


ROUTES = {
    (2, 1): "(from ZeRO stage 2 at world size 2 to stage 0 at world size 1: whole tensors)",
    (1, 2): "(from ZeRO stage 0 at world size 1 to stage 2 at world size 2: whole tensors)",
    (2, 4): "(elastic: universal checkpoint)",
}
"""What each resume says: one rank in fp32 runs stage 0 (trainer.engine.engine_stage), so a change to or
from one rank goes through whole tensors (trainer/stage_change.py)."""


@pytest.mark.parametrize("first,second", list(ROUTES))
def test_elastic_resume_continues_the_same_run(latents, straight, tmp_path, first, second):
    name = f"elastic-{first}-{second}"
    train(latents, tmp_path, name, "steps=3", "ckpt.every=3", local=first)
    proc = train(latents, tmp_path, name, "steps=6", "ckpt.every=3", local=second)
    assert f"resumed {name} at step 3 {ROUTES[first, second]}" in proc.stdout
    universal = (tmp_path / name / "checkpoints" / "step-00000003" / "model_universal").is_dir()
    assert universal == (first > 1)  # DeepSpeed's conversion of a ZeRO checkpoint, for either route
    ref = losses(straight, "straight")
    got = losses(tmp_path, name)
    # Same data, noise, t and dropout by construction; only the order of float reductions differs
    # (one rank averages 16 samples, two ranks average two means of 8): a few ulps per step.
    np.testing.assert_allclose(got, ref, rtol=1e-5)
    assert got[:3] == ref[:3] or first == 1  # before the switch, a 2-rank run is the reference itself
    a, b = final_weights(straight, "straight"), final_weights(tmp_path, name)
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-6)


def test_zero2_partitions_the_optimizer_state(latents, straight, tmp_path):
    train(latents, tmp_path, "one-rank", "steps=1", local=1)
    one = log(tmp_path, "one-rank")[0]["sys/optimizer_state_mb_rank0"]
    two = log(straight, "straight")[0]["sys/optimizer_state_mb_rank0"]
    print(f"optimizer state on rank 0: 1 rank {one * 2**20:.0f} B, 2 ranks {two * 2**20:.0f} B")
    assert two == pytest.approx(one / 2, rel=1e-3)
    ema_one = log(tmp_path, "one-rank")[0]["sys/ema_mb_rank0"]
    ema_two = log(straight, "straight")[0]["sys/ema_mb_rank0"]
    print(f"EMA on rank 0: 1 rank {ema_one * 2**20:.0f} B, 2 ranks {ema_two * 2**20:.0f} B")
    assert ema_two / ema_one <= 0.52  # its ZeRO partition, plus the small frozen pos_embed and RoPE buffers


def test_tensorboard_has_every_scalar_and_no_step_twice(latents, tmp_path):
    """A resume that replays logged steps: run 1 logs steps 1-5 and saves at 3 and 5; its step-5 checkpoint
    is lost, so run 2 resumes at 3 and logs 4, 5 and 6. TensorBoard (purge_step=4 writes a SessionLog START
    at step 4, which hides run 1's later events) and log.jsonl (cut after step 3) hold steps 1-6 once each,
    with run 2's values at 4 and 5. Without purge_step every tag reads [1, 2, 3, 4, 5, 4, 5, 6]."""
    import shutil

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "tb"
    train(latents, tmp_path, "tb", "steps=5", "ckpt.every=3", "log.sample_every=3")
    first = {e["step"]: e for e in log(tmp_path, "tb")}
    assert sorted(first) == [1, 2, 3, 4, 5]
    assert (run / "checkpoints" / "latest").read_text() == "step-00000005"
    shutil.rmtree(run / "checkpoints" / "step-00000005")  # `latest` names it: resume falls back to step 3
    proc = train(latents, tmp_path, "tb", "steps=6", "ckpt.every=3", "log.sample_every=3")
    assert "resumed tb at step 3\n" in proc.stdout
    assert "checkpoint step-00000005 named by" in proc.stderr and "is not usable" in proc.stderr
    second = log(tmp_path, "tb")
    assert [e["step"] for e in second] == [1, 2, 3, 4, 5, 6]
    assert second[:3] == [first[s] for s in (1, 2, 3)]  # the kept lines, untouched
    # Steps 4 and 5 replay bit for bit (same world size); their timings are run 2's own.
    assert [second[s - 1]["loss/total"] for s in (4, 5)] == [first[s]["loss/total"] for s in (4, 5)]
    assert all(second[s - 1]["perf/samples_per_s"] != first[s]["perf/samples_per_s"] for s in (4, 5))

    acc = EventAccumulator(str(run / "tb"), size_guidance={"scalars": 0, "images": 0}).Reload()
    expected = {"loss/total", "loss/mse", "loss/cos", "opt/lr", "opt/grad_norm", "perf/samples_per_s",
                "perf/samples_per_s_per_device", "perf/data_wait_s", "perf/step_time_s", "perf/data_s",
                "perf/fwd_bwd_s", "perf/optim_s", "sys/memory_gb"}  # fmt: skip
    assert expected <= set(acc.Tags()["scalars"])
    assert "perf/mfu" not in acc.Tags()["scalars"]  # no peak on the CPU unless log.peak_tflops sets one
    for tag in expected:
        assert [e.step for e in acc.Scalars(tag)] == [1, 2, 3, 4, 5, 6], tag
    for tag in ("loss/total", "perf/samples_per_s", "sys/memory_gb"):
        tb = [e.value for e in acc.Scalars(tag)]  # float32 in the event file
        np.testing.assert_allclose(tb, [e[tag] for e in second], rtol=1e-6, err_msg=tag)
    assert [e.step for e in acc.Images("samples/ema")] == [3, 6]  # run 1's step-5 grid is hidden too
    assert (run / "samples" / "step-00000006.png").is_file()


def test_bf16_trains_with_fp32_ema(latents, tmp_path):
    train(latents, tmp_path, "bf16", "steps=3", "precision=bf16")
    ds = json.loads((tmp_path / "bf16" / "ds_config.json").read_text())
    assert ds["bf16"]["enabled"] is True
    assert ds["data_types"] == {"grad_accum_dtype": "fp32"} and ds["communication_data_type"] == "fp32"
    zero = ds["zero_optimization"]  # one bucket of the model's size, not DeepSpeed's 5e8 elements
    meta = json.loads((tmp_path / "bf16" / "checkpoints" / "step-00000003" / "meta.json").read_text())
    model = LightningDiT(LightningDiTArgs(**meta["model_args"]))
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert zero["reduce_bucket_size"] == zero["allgather_bucket_size"] == trained + trained % 2
    ls = losses(tmp_path, "bf16")
    assert all(np.isfinite(ls))
    ema = load_file(str(tmp_path / "bf16" / "checkpoints" / "step-00000003" / "ema.safetensors"))
    assert {t.dtype for t in ema.values()} == {torch.float32}
    # The checkpoint casts the EMA with .float(), so the dtype alone proves nothing: an average kept in bf16
    # would hold only bf16 values. An fp32 average of (fp32 initial weights, bf16 live weights) does not.
    for key in ("blocks.0.attn.qkv.weight", "blocks.1.mlp.w12.weight", "y_embedder.embedding_table.weight"):
        w = ema[key]
        assert (w != w.bfloat16().float()).float().mean() > 0.9, key
    module = module_weights(tmp_path, "bf16", 3)
    assert module["blocks.0.attn.qkv.weight"].dtype == torch.bfloat16


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1], ids=["SIGTERM", "SIGUSR1"])
def test_sigterm_to_one_rank_saves_and_asks_for_requeue(latents, tmp_path, sig):
    cmd = [sys.executable, "-m", "slurm.cli", "train", CONFIG, f"data.shards={latents}", f"run.root={tmp_path}",
           "run.name=sig", "log.every=1", "steps=100000", "ckpt.every=100000", "--local", "2"]  # fmt: skip
    parent = subprocess.Popen(
        cmd, cwd=ROOT, env=clean_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    jsonl = tmp_path / "sig" / "log.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (jsonl.exists() and len(jsonl.read_text().splitlines()) >= 3):
        time.sleep(0.2)
    ranks = psutil.Process(parent.pid).children()
    assert len(ranks) == 2
    os.kill(ranks[1].pid, sig)
    out, err = parent.communicate(timeout=120)
    assert parent.returncode == 75, err[-3000:]
    assert "asks to be requeued" in err
    latest = (tmp_path / "sig" / "checkpoints" / "latest").read_text()
    step = json.loads((tmp_path / "sig" / "checkpoints" / latest / "meta.json").read_text())["step"]
    assert step >= 3 and latest == f"step-{step:08d}"
    logged = [e["step"] for e in log(tmp_path, "sig")]
    assert logged[-1] == step  # the checkpoint is of the step the signal arrived at
    train(latents, tmp_path, "sig", f"steps={step + 2}")
    assert [e["step"] for e in log(tmp_path, "sig")] == list(range(1, step + 3))


def test_world_size_must_divide_the_streams(latents, tmp_path):
    proc = train(latents, tmp_path, "bad", "data.streams=4", local=3, check=False)
    assert proc.returncode != 0
    assert "world size 3 must divide data.streams=4" in proc.stderr


COUNT_CHECKPOINTS = """
import os, sys
import models.lightningdit as m
calls, inner = 0, m.checkpoint
def counting(*args, **kwargs):
    global calls
    calls += 1
    return inner(*args, **kwargs)
m.checkpoint = counting  # what LightningDiT.forward calls for each block when checkpointing is on
from slurm.cli import main
code = main(sys.argv[1:])
with open(os.environ["CALLS_FILE"] + os.environ["RANK"], "w") as f:
    f.write(str(calls))
sys.stdout.flush(); sys.stderr.flush()
os._exit(code)
"""


def test_activation_checkpointing_gives_the_same_losses(latents, straight, tmp_path):
    """grad_checkpointing=true: the same losses and weights as without, and the trainer really checkpoints.

    The two ranks are started as `ldit train --local 2` starts them, each wrapping torch.utils.checkpoint
    as models.lightningdit calls it: every block of every training forward goes through it (6 steps x 2
    blocks on each rank). A trainer that ignored the flag would make 0 calls (and the same losses).
    """
    from slurm.env import child_env, free_port

    args = [CONFIG, f"data.shards={latents}", f"run.root={tmp_path}", "run.name=ckpt-on", "log.every=1",
            "steps=6", "ckpt.every=6", "grad_checkpointing=true"]  # fmt: skip
    cmd = [sys.executable, "-c", COUNT_CHECKPOINTS, "train", *args]
    port, calls = free_port(), tmp_path / "calls-rank"
    run_procs([(cmd, child_env(r, 2, port, clean_env(CALLS_FILE=str(calls)))) for r in (0, 1)], timeout=300)
    assert [int(Path(f"{calls}{r}").read_text()) for r in (0, 1)] == [6 * 2, 6 * 2]
    assert losses(tmp_path, "ckpt-on") == losses(straight, "straight")
    a, b = final_weights(straight, "straight"), final_weights(tmp_path, "ckpt-on")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_gradient_accumulation_gives_the_same_losses(latents, straight, tmp_path):
    """micro_batch=4 of the per-rank 8: two accumulated micro-batches per step give the straight run's losses.

    Same samples, noise, t and dropout; only the order of fp32 reductions differs (each rank's loss is the
    mean of two means of 4 instead of one mean of 8, and DeepSpeed sums two half-scaled gradients), a few
    ulps a step that Adam carries on: at most 8e-8 relative over 6 steps here. 1e-5, as for the elastic resume
    (whose reductions differ the same way), leaves room for other CPUs' kernels.
    """
    train(latents, tmp_path, "accum", "steps=6", "ckpt.every=3", "micro_batch=4")
    topo = json.loads((tmp_path / "accum" / "topology.json").read_text())
    assert (topo["micro_batch"], topo["grad_accum"], topo["global_batch"]) == (4, 2, 16)
    ds = json.loads((tmp_path / "accum" / "ds_config.json").read_text())
    assert (ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]) == (4, 2)
    got, ref = log(tmp_path, "accum"), log(straight, "straight")
    assert [e["step"] for e in got] == [e["step"] for e in ref] == [1, 2, 3, 4, 5, 6]
    for key in ("loss/total", "loss/mse", "loss/cos", "opt/grad_norm"):
        np.testing.assert_allclose([e[key] for e in got], [e[key] for e in ref], rtol=1e-5, err_msg=key)
    a, b = final_weights(straight, "straight"), final_weights(tmp_path, "accum")
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("ranks", [2, 1])  # ZeRO-2; stage 0 at one rank, clipped by ldit's step pre-hook
def test_warmup_and_clipping_shape_the_updates(latents, straight, tmp_path, ranks):
    """optim.warmup_steps=4 and optim.grad_clip=1e-7, read back from the logs and from the first update.

    The fresh LightningDiT outputs exactly 0 (zero-initialised final layer and adaLN), so at step 1 only
    `final_layer.linear` gets a gradient ĝ, and Adam's first update of each of its elements (starting at
    0) is exactly w = -lr_1 · ĝ / (|ĝ| + eps), eps = 1e-8. So |w| / lr_1 = r gives |ĝ| = eps · r / (1 - r):
    with lr_1 = lr / 4 (warmup) the gradients so recovered must have DeepSpeed's clipped norm
    clip · g / (g + 1e-6), where g is the pre-clip norm the run logs. Without warmup r would be 4x smaller,
    without clipping r would be 1 (|w| = lr_1) and the recovered norm absurd. At one rank (stage 0) the
    loss and norm equal the 2-rank run's to float-summation order (1e-5), the same formulas otherwise.
    """
    from models.lightningdit import LightningDiT, LightningDiTArgs

    lr, warmup, clip, eps = 1e-3, 4, 1e-7, 1e-8
    train(latents, tmp_path, "warm", "steps=6", "ckpt.every=1", "ckpt.keep_last=6",
          f"optim.warmup_steps={warmup}", f"optim.grad_clip={clip}", local=ranks)  # fmt: skip
    entries = log(tmp_path, "warm")
    assert json.loads((tmp_path / "warm" / "ds_config.json").read_text())["zero_optimization"]["stage"] == (
        2 if ranks == 2 else 0
    )
    # opt/lr is the rate each step applied: linear from lr/warmup at step 1 to lr at step `warmup`
    assert [e["opt/lr"] for e in entries] == pytest.approx([lr * min(1.0, k / warmup) for k in range(1, 7)])
    ref = log(straight, "straight")[0]  # the same weights and batch at step 1: the same loss and raw norm
    same = {"rel": 0.0 if ranks == 2 else 1e-5, "abs": 0.0}  # 2 ranks: the straight run itself
    assert entries[0]["loss/total"] == pytest.approx(ref["loss/total"], **same)
    assert entries[0]["opt/grad_norm"] == pytest.approx(ref["opt/grad_norm"], **same)
    g = entries[0]["opt/grad_norm"]
    assert g > 1e4 * clip  # logged before clipping

    meta = json.loads((tmp_path / "warm" / "checkpoints" / "step-00000001" / "meta.json").read_text())
    torch.manual_seed(meta["config"]["seed"])  # the trainer's initial weights
    w0 = LightningDiT(LightningDiTArgs(**meta["model_args"])).state_dict()
    w1 = module_weights(tmp_path, "warm", 1)
    moved = {k for k in w0 if not torch.equal(w0[k], w1[k])}
    assert moved == {"final_layer.linear.weight", "final_layer.linear.bias"}
    update = torch.cat([(w1[k] - w0[k]).flatten() for k in sorted(moved)]).double()
    r = update.abs() / (lr / warmup)
    assert r.min() > 0 and r.max() < 0.95  # every element took a step smaller than lr_1: clipped
    recovered = (eps * r / (1 - r)).norm().item()
    assert recovered == pytest.approx(clip * g / (g + 1e-6), rel=1e-3)


def test_activation_checkpointing_cuts_saved_activations():
    """Bytes autograd keeps for backward in one training forward of a 6-block model, off vs on."""
    from models.lightningdit import LightningDiT, lightningdit_args

    def saved_bytes(checkpointing: bool) -> int:
        torch.manual_seed(0)
        model = LightningDiT(lightningdit_args("S/1", in_channels=4, input_size=8, num_classes=3))
        model.set_grad_checkpointing(checkpointing)
        total = 0

        def pack(t):
            nonlocal total
            total += t.numel() * t.element_size()
            return t

        x, t, y = torch.randn(8, 4, 8, 8), torch.rand(8), torch.randint(0, 3, (8,))
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = model(x, t, y)
        out.square().mean().backward()
        return total

    off, on = saved_bytes(False), saved_bytes(True)
    print(
        f"activations saved for backward: {off / 2**20:.2f} MiB without checkpointing, {on / 2**20:.2f} MiB with"
    )
    assert on < off / 3


@pytest.fixture(scope="module")
def poisoned(tmp_path_factory, latents) -> Path:
    """The latent set with one shard's samples replaced by NaN."""
    import shutil

    from data_prep.manifest import load_manifest

    folder = tmp_path_factory.mktemp("poisoned")
    shutil.copytree(latents, folder, dirs_exist_ok=True)
    m = load_manifest(folder)
    bad = np.full((4, 4, 4), np.nan, np.float32)
    rows = [
        {"__key__": f"nan{i}", "latent.npy": encode_npy(bad), "latent_flip.npy": encode_npy(bad), "cls": b"0"}
        for i in range(8)
    ]
    m.shards[5] = write_shard(folder / m.shards[5].name, rows)
    m.save(folder)
    return folder


def test_nonfinite_loss_stop_keeps_the_last_checkpoint(poisoned, tmp_path):
    proc = train(poisoned, tmp_path, "stop", "steps=12", "ckpt.every=1", "nonfinite=stop", check=False)
    assert proc.returncode == 1
    assert "non-finite loss at step" in proc.stderr and "nonfinite=stop" in proc.stderr
    latest = (tmp_path / "stop" / "checkpoints" / "latest").read_text()
    ema = load_file(str(tmp_path / "stop" / "checkpoints" / latest / "ema.safetensors"))
    assert all(torch.isfinite(v).all() for v in ema.values())


def test_nonfinite_loss_skip_skips_the_update(poisoned, tmp_path):
    train(poisoned, tmp_path, "skip", "steps=12", "ckpt.every=12", "nonfinite=skip")
    entries = log(tmp_path, "skip")
    assert entries[-1]["opt/skipped_steps"] >= 1
    nan_steps = [e["step"] for e in entries if "loss/total" not in e]  # non-finite values are not logged
    assert nan_steps and entries[-1]["opt/skipped_steps"] == len(nan_steps)
    for path in ("export/latest/ema.safetensors",):
        weights = load_file(str(tmp_path / "skip" / path))
        assert all(torch.isfinite(v).all() for v in weights.values())
    module = module_weights(tmp_path, "skip", 12)
    assert all(torch.isfinite(v).all() for v in module.values())


def test_export_job_writes_reference_keys(straight, tmp_path):
    import shutil

    from models.export import load_lightningdit

    shutil.copytree(straight / "straight", tmp_path / "straight", symlinks=True)
    straight = tmp_path  # the fixture's own export/latest stays as the other tests expect
    proc = subprocess.run(
        [sys.executable, "-m", "slurm.cli", "export", f"run.root={straight}", "run.name=straight", "step=3"],
        cwd=ROOT, env=clean_env(), capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    folder = straight / "straight" / "export" / "step-00000003"
    assert f"exported step-00000003 of straight to {folder}" in proc.stdout
    ema = load_file(str(straight / "straight" / "checkpoints" / "step-00000003" / "ema.safetensors"))
    exported = load_file(str(folder / "ema.safetensors"))
    assert exported.keys() == ema.keys() and all(torch.equal(exported[k], ema[k]) for k in ema)
    assert {"pos_embed", "x_embedder.proj.weight", "feat_rope.freqs_cos", "blocks.0.mlp.w12.weight"} <= set(
        exported
    )
    model = load_lightningdit(folder)  # strict key match
    assert model.args.depth == 2 and (folder / "config.yaml").is_file()
    assert os.readlink(straight / "straight" / "export" / "latest") == "step-00000003"
    bad = subprocess.run(
        [sys.executable, "-m", "slurm.cli", "export", f"run.root={straight}", "run.name=nope"],
        cwd=ROOT, env=clean_env(), capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert bad.returncode != 0 and f"{straight / 'nope'} has no complete checkpoint to export" in bad.stderr
