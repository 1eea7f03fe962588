"""`ldit plan` (slurm/plan.py) and its model (trainer/plan_model.py), against measurement.

- The state a rank holds (parameters, gradients, optimizer state, fp32 master, sharded EMA, the gradient
  buckets' staging buffers) equals, byte for byte, what real DeepSpeed ZeRO-2 engines built as
  trainer/dit.py builds them hold, at W = 1 and 2, for the tiny and a 12×384 model, in bf16 and fp32.
- The activations the forward saves for the backward (saved-tensor hooks, unique storages) are within 10%
  of the model's, at 3 sizes × 2 micro batches, checkpointing on and off.
- The plan reads the model from the same description the module is built from, and the config as the
  trainer does.
- `ldit plan` on XL/1 and the example cluster prints its tables in under 5 s without torch, and its 2-node
  row agrees with a hand computation; a cluster file without a figure, and a config that fits nowhere,
  are told what to do.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import time

import pytest
import torch

from models.lightningdit import LightningDiT, lightningdit_args
from models.lightningdit_spec import lightningdit_flops, lightningdit_parameters
from slurm.cli import run_local
from tests.conftest import ROOT, WORKERS, clean_env
from trainer.plan_model import activation_bytes, bucket_staging_bytes, stage0_state, zero2_state

XL1, EXAMPLE = "configs/dit/lightningdit_xl1.yaml", "configs/cluster/example.yaml"
PROBED = {  # the models of tests/workers/plan_probe.py
    "tiny": lightningdit_args("T/1", input_size=4, in_channels=3, num_classes=3),
    "12x384": lightningdit_args("S/1", depth=12, hidden_size=384, num_heads=6, input_size=4, in_channels=3,
                                num_classes=10),
}  # fmt: skip


@pytest.mark.parametrize(
    "size,overrides",
    [("T/1", {}), ("XL/2", {}), ("S/1", {"use_qknorm": True}),
     ("T/2", {"use_rmsnorm": False, "use_swiglu": False, "use_qknorm": True, "use_rope": False, "class_dropout_prob": 0.0})],
)  # fmt: skip
def test_the_parameter_list_is_the_modules(size, overrides):
    """The planner counts bytes from `lightningdit_parameters`, never from a built model: it must list the
    module's parameters (names, shapes, trainability, order) and buffers exactly."""
    args = lightningdit_args(size, **overrides)
    with torch.device("meta"):
        model = LightningDiT(args)
    params, buffers = lightningdit_parameters(args)
    assert [(p.name, p.shape, p.trainable) for p in params] == [
        (n, tuple(p.shape), p.requires_grad) for n, p in model.named_parameters()
    ]
    assert [(b.name, b.shape) for b in buffers] == [(n, tuple(b.shape)) for n, b in model.named_buffers()]


@pytest.mark.parametrize("world", [1, 2])
def test_state_bytes_equal_deepspeeds(world, tmp_path, monkeypatch):
    """Every rank's parameters, gradients, optimizer state, fp32 master, EMA and staging buckets, measured on
    real engines (tests/workers/plan_probe.py), equal the plan's prediction exactly: ZeRO-2, and at one rank
    also stage 0 in fp32, which the trainer runs there."""
    for k, v in clean_env().items():
        monkeypatch.setenv(k, v)
    assert run_local([sys.executable, str(WORKERS / "plan_probe.py"), str(tmp_path)], world) == 0
    for rank in range(world):
        measured = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert sum(key.endswith("-stage0") for key in measured) == (2 if world == 1 else 0)
        for key, got in measured.items():
            name, dtype, *stage0 = key.split("-")
            params, buffers = lightningdit_parameters(PROBED[name])
            want = (
                stage0_state(params, buffers) if stage0 else zero2_state(params, buffers, world, rank, dtype)
            )
            predicted = {
                "params": want.params, "grads": want.grads, "optimizer": want.optimizer, "master": want.master,
                "ema": want.ema, "ema_total": want.ema + want.ema_host,
                "buckets": 0 if stage0 else bucket_staging_bytes(got["trainable"], world, dtype, gpus=False),
                "trainable": sum(p.numel for p in params if p.trainable),
            }  # fmt: skip
            print(f"W={world} rank {rank} {key}: {got}")
            assert got == predicted, (world, rank, key)
    if world == 2:  # fp32's gradients differ between ranks by the parameters that straddle the partitions
        r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text())["12x384-fp32"] for r in range(2))
        assert r0["grads"] != r1["grads"]


def measure_saved(args, micro: int, dtype: torch.dtype, checkpointing: bool) -> int:
    """Bytes of the unique storages the training forward saves for the backward, the module's own
    parameters and buffers left out. The parameters are cast and the buffers kept, as DeepSpeed casts a
    module under bf16 (`_cast_module_mixed_precision`); the inputs are the trainer's (trainer/dit.py)."""
    torch.manual_seed(0)
    model = LightningDiT(args).train()
    model.set_grad_checkpointing(checkpointing)
    for p in model.parameters():
        p.data = p.data.to(dtype)
    own = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        s = t.untyped_storage()
        if s.data_ptr() not in own:
            saved[s.data_ptr()] = s.nbytes()
        return t

    x = torch.randn(micro, args.in_channels, args.input_size, args.input_size).to(dtype)
    t, y = torch.rand(micro), torch.randint(0, args.num_classes, (micro,))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x, t, y, drop_mask=torch.zeros(micro, dtype=torch.bool))
    return sum(saved.values())


SIZES = {
    "T/1": lightningdit_args("T/1"),
    "S/1": lightningdit_args("S/1"),
    "12x384": lightningdit_args("S/1", depth=12, hidden_size=384, num_heads=6),
    "S/1 qknorm": lightningdit_args("S/1", use_qknorm=True),
}  # 256 tokens of 32 channels, 1,000 classes, as XL/1 trains on


@pytest.mark.parametrize("checkpointing", [False, True])
@pytest.mark.parametrize("micro", [1, 3])
@pytest.mark.parametrize(
    "size,dtype",
    [("T/1", torch.bfloat16), ("S/1", torch.bfloat16), ("12x384", torch.bfloat16), ("T/1", torch.float32),
     ("S/1 qknorm", torch.bfloat16), ("S/1 qknorm", torch.float32)],
)  # fmt: skip
def test_activation_bytes_match_saved_tensors(size, dtype, micro, checkpointing):
    args = SIZES[size]
    got = measure_saved(args, micro, dtype, checkpointing)
    label = "bf16" if dtype == torch.bfloat16 else "fp32"
    want = activation_bytes(args, micro, label, checkpointing).saved
    print(f"{size} {label} micro {micro} checkpointing {checkpointing}: measured {got:,} B, model {want:,} B")
    assert abs(want / got - 1) <= 0.10  # what issue #18 asks
    assert abs(want / got - 1) <= 0.01  # measured exact (torch 2.14, CPU): a term left out (each ≥ 3%) fails


def test_model_args_are_the_trainers():
    """`ldit plan` reads the model from a config as the trainer does (slurm.plan.dit_args mirrors
    trainer.dit.model_args, which needs a manifest)."""
    from data_prep.manifest import ClassInfo, LatentInfo, Manifest
    from slurm.jobs import JOBS
    from slurm.plan import dit_args
    from trainer.dit import model_args

    cfg = JOBS["train"].load([XL1], ["model.depth=7", "model.hidden_size=256", "model.num_heads=4",
                                     "model.use_qknorm=true", "label_dropout=0.2"])  # fmt: skip
    latent = LatentInfo(shape=(16, 8, 8), dtype="float16", mean=(0.0,) * 16, std=(1.0,) * 16)
    classes = [ClassInfo(wnid=f"n{i}", index=i, name=f"c{i}") for i in range(7)]
    manifest = Manifest(kind="latents", shards=[], classes=classes, producer={}, latent=latent)
    assert dit_args(cfg, (16, 8, 8), 7) == model_args(cfg, manifest)


def ldit(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "slurm.cli", *args], cwd=ROOT, env=clean_env(),
                          capture_output=True, text=True, timeout=timeout)  # fmt: skip


def test_plan_of_xl1_on_the_example_cluster():
    """The acceptance command: its tables in under 5 s with no torch (so no process group and no GPU), and
    the 2-node row against a hand computation from the reference's numbers."""
    cmd = ["plan", XL1, "--cluster", EXAMPLE, "--nodes", "1,2,4,8"]
    began = time.perf_counter()
    done = ldit(*cmd)
    took = time.perf_counter() - began
    print(done.stdout)
    print(f"ldit plan took {took:.2f} s")
    assert done.returncode == 0, done.stderr
    assert took < 5.0
    lines = done.stdout.splitlines()
    memory = lines.index("Memory per GPU, GiB (fullest rank):")
    assert lines[memory + 1].split() == ["nodes", "GPUs", "micro×acc", "params", "grads", "optim", "master", "EMA",
                                         "buckets", "act", "ckpt", "act", "full", "allow", "total", "fits"]  # fmt: skip
    timing = next(i for i, line in enumerate(lines) if line.startswith("Time"))
    assert lines[timing + 1].split() == ["nodes", "GPUs", "run", "as", "compute", "comm", "gather", "step", "s",
                                         "img/s", "img/s/GPU", "eff", "80,000", "steps", "800", "epochs"]  # fmt: skip
    mem_rows = {int(r.split()[0]): r.split() for r in lines[memory + 2 : memory + 6]}
    time_rows = {int(r.split()[0]): r.split() for r in lines[timing + 2 : timing + 6]}
    assert sorted(mem_rows) == sorted(time_rows) == [1, 2, 4, 8]

    # By hand, 2 nodes of 8 GPUs: W = 16, 64 samples a rank, checkpointing on (the config), bf16.
    psi = 675_256_736 - 256 * 1152  # XL/1's parameters (reference §2.1: 675.26 M) less the fixed pos_embed
    padded = math.ceil(psi / 32) * 32  # a multiple of 2·W
    part, gib = padded // 16, 2**30
    weights = 2 * (padded + 256 * 1152) + 4 * 2 * 256 * 72  # bf16 weights and pos_embed, fp32 RoPE tables
    bucket = 50_000_000 * (
        2 + 2 + 2 + 4
    )  # 2 bf16 staging buckets (overlap), the flattened bucket, its fp32 copy
    act = activation_bytes(lightningdit_args("XL/1"), 64, "bf16", True).peak
    total = weights + (4 + 8 + 4 + 4) * part + bucket + act + 2 * gib + round(0.10 * (act + bucket))
    row = mem_rows[2]
    assert row[1:3] == ["16", "64×1"] and row[-1] == "yes"
    assert [float(v) for v in row[4:9]] == [
        round(b / gib, 2) for b in (weights, 4 * part, 8 * part, 4 * part, 4 * part)
    ]
    assert float(row[9]) == round(bucket / gib, 2) and float(row[-2]) == round(total / gib, 2)

    flops = lightningdit_flops(lightningdit_args("XL/1"), grad_checkpointing=True)
    compute = 64 * flops.train / (800e12 * 0.35)
    reduce = (
        2 * 15 / 16 * psi * 4 / 50e9 + 14 * 2 * 15 * 10e-6
    )  # fp32 all-reduce across nodes, 14 buckets of 5e7
    backward = compute * (flops.backward + flops.recompute) / flops.train
    exposed = max(reduce - backward, reduce / 14)
    gather = 15 / 16 * padded * 2 / 50e9 + 15 * 10e-6
    step = compute + exposed + gather
    t = time_rows[2]
    assert t[2:4] == ["64×1", "ckpt"]
    assert [float(v) for v in t[4:8]] == [round(v, 3) for v in (compute, exposed, gather, step)]
    assert float(t[8].replace(",", "")) == round(1024 / step) and float(t[9]) == round(1024 / step / 16, 1)
    assert t[11:] == [f"{80_000 * step / 3600:.1f}", "h", f"{800 * 1_281_167 / 1024 * step / 86400:.1f}", "d"]

    probe = "import sys; from slurm.cli import main; rc = main(sys.argv[1:]); assert 'torch' not in sys.modules, 'torch'"
    no_torch = subprocess.run([sys.executable, "-c", probe, *cmd], cwd=ROOT, env=clean_env(), capture_output=True,
                              text=True)  # fmt: skip
    assert no_torch.returncode == 0, no_torch.stderr[-2000:]


def test_a_cluster_file_without_a_figure_names_the_key(tmp_path):
    text = "\n".join(
        line for line in (ROOT / EXAMPLE).read_text().splitlines() if not line.startswith("inter_node_gbs")
    )
    (tmp_path / "c.yaml").write_text(text)
    done = ldit("plan", XL1, "--cluster", str(tmp_path / "c.yaml"))
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.startswith(
        f"ldit plan: error: {tmp_path / 'c.yaml'} has no inter_node_gbs: the plan needs it"
    )
    done = ldit("plan", XL1, "--cluster", "configs/cluster/local.yaml", "cluster.mfu=1.5")
    assert done.returncode == 2 and "mfu must be in (0, 1]" in done.stderr


def test_a_config_that_fits_nowhere_is_told_what_would():
    """On 4.5 GiB GPUs, 1-2 nodes cannot hold XL/1 at any micro batch: 4 nodes can (the plan finds them, with
    the setting); on 3.5 GiB GPUs no node count can: the whole bf16 weights are on every rank."""
    done = ldit("plan", XL1, "--cluster", EXAMPLE, "--nodes", "1,2", "cluster.gpu_memory_gib=4.5")
    print(done.stdout)
    assert done.returncode == 1
    assert "1 node: does not fit (10.9 > 4.5 GiB) at any micro batch" in done.stdout
    assert "  - more nodes: 4 nodes (32 GPUs) fit with micro_batch=4 grad_checkpointing=true" in done.stdout
    done = ldit("plan", XL1, "--cluster", EXAMPLE, "--nodes", "1,2", "cluster.gpu_memory_gib=3.5")
    assert done.returncode == 1
    assert "more nodes" not in done.stdout
    assert (
        "  - no node count does on 3.5 GiB GPUs: even at 1024 GPUs (one sample each) a rank needs"
        in done.stdout
    )
    assert "the whole bf16 weights (every rank holds them under ZeRO-2) are 1.3" in done.stdout


def test_a_config_that_does_not_fit_as_written_gets_the_setting_that_does():
    """Without checkpointing, micro batch 128 needs 68.8 GiB: on 40 GiB GPUs the plan runs the fastest
    setting that fits instead (micro batch 64, accumulation 2) and prints the overrides."""
    done = ldit("plan", XL1, "--cluster", EXAMPLE, "--nodes", "1", "cluster.gpu_memory_gib=40",
                "grad_checkpointing=false", "--json")  # fmt: skip
    assert done.returncode == 0, done.stderr
    (row,) = json.loads(done.stdout)["rows"]
    assert not row["fits"] and row["memory"]["total"] > 40 * 2**30
    assert row["instead"]["overrides"] == "micro_batch=64 grad_checkpointing=false"
    assert row["run"] == {"micro": 64, "accum": 2, "checkpointing": False}
    assert row["instead"]["total"] <= 40 * 2**30


def test_the_shard_manifest_gives_the_latents_classes_and_epoch(tmp_path):
    """With the config's shard set here, the plan reads its latent shape, classes and sample count from the
    manifest (as the trainer does); `--dataset-size` overrides the count."""
    from data_prep.manifest import ClassInfo, LatentInfo, Manifest, ShardInfo

    classes = [ClassInfo(wnid=f"n{i}", index=i, name=f"c{i}") for i in range(7)]
    latent = LatentInfo(shape=(16, 8, 8), dtype="float16", mean=(0.0,) * 16, std=(1.0,) * 16)
    shards = [ShardInfo(name=f"shard-{i:06d}.tar", count=5000, bytes=1, sha256="0" * 64) for i in range(3)]
    Manifest(kind="latents", shards=shards, classes=classes, latent=latent).save(tmp_path)
    cmd = ["plan", XL1, f"data.shards={tmp_path}", "--cluster", EXAMPLE, "--nodes", "1", "--json"]
    report = json.loads(ldit(*cmd).stdout)
    assert (report["args"]["in_channels"], report["args"]["input_size"], report["args"]["num_classes"]) == (
        16,
        8,
        7,
    )
    assert report["dataset"] == 15_000 and report["model_source"] == f"{tmp_path}/manifest.json"
    (row,) = report["rows"]
    assert row["time"]["epochs_wall_s"] == pytest.approx(800 * 15_000 / 1024 * row["time"]["step_s"])
    assert json.loads(ldit(*cmd, "--dataset-size", "1000").stdout)["dataset"] == 1000


def test_one_rank_in_fp32_is_planned_at_stage_0():
    """One task a node in fp32 on the CPU: the 1-node row is the stage-0 state the trainer runs there (no
    master copy, no bucket: trainer.engine.engine_stage), the 2-node row ZeRO-2's, and the text says so."""
    from models.lightningdit_spec import LightningDiTArgs

    cmd = [
        "plan",
        "configs/dit/tiny_cpu.yaml",
        "--cluster",
        "configs/cluster/local_one_core.yaml",
        "--nodes",
        "1,2",
    ]
    report = json.loads(ldit(*cmd, "--json").stdout)
    one, two = report["rows"]
    assert (one["zero_stage"], two["zero_stage"]) == (0, 2)
    params, buffers = lightningdit_parameters(LightningDiTArgs(**report["args"]))
    want = stage0_state(params, buffers)
    assert {k: one["memory"][k] for k in ("params", "grads", "optimizer", "master", "ema", "buckets")} == {
        "params": want.params, "grads": want.grads, "optimizer": want.optimizer, "master": 0, "ema": want.ema,
        "buckets": 0,
    }  # fmt: skip
    assert two["memory"]["master"] > 0 and two["memory"]["buckets"] > 0
    assert "fp32, ZeRO-2 (stage 0, no ZeRO, at one rank in fp32), gradients" in ldit(*cmd).stdout
