"""Configuration schemas of `ldit train` (DiT and VA-VAE runs) and `ldit export`.

The hyperparameter defaults are the reference's (lightningdit.md §3.2 for the DiT, §1.4 for the
VA-VAE); the files under `configs/dit/` and `configs/vavae/` still name every value that matters.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from omegaconf import MISSING

from models.device import Precision
from models.lightningdit_spec import LightningDiTArgs, lightningdit_args


@dataclass
class RunConfig:
    """Run identity (STYLE.md 7): the run directory is `<root>/<name>`, with no timestamp or counter."""

    name: str = MISSING
    """Run name. Starting a run whose directory holds a complete checkpoint resumes it."""
    root: str = "runs"
    """Folder that holds the run directories."""

    @property
    def dir(self) -> Path:
        return Path(self.root) / self.name


@dataclass
class StreamConfig:
    """The training data stream (DESIGN.md "The stream reader")."""

    shards: str = MISSING
    """Shard set folder (with manifest.json): images for VA-VAE runs, latents for DiT runs."""
    global_batch: int = 1024
    """Samples per optimizer step over all ranks (reference §3.2: 1024 for the DiT, §1.4: 256 for VA-VAE)."""
    streams: int = 64
    """Virtual streams V: fixed for the life of a run; must divide global_batch and be divisible by every world size used."""
    workers: int = 2
    """DataLoader worker processes per rank."""
    seed: int = 0
    """Seed of the shard and sample permutations (and of flips and crops)."""
    verify: Literal["sha256", "size"] = "sha256"
    """The check of the shard files before the first step (trainer/preflight.py): `sha256` reads every shard once
    (size, sha256, sample count; the ranks split them) at the run's first start and records it in the run
    directory (`shards-verified.json`, keyed by the manifest's sha256), so a requeue compares sizes only;
    `size` compares sizes only at every start. Either way every shard is hashed as training streams it, and a
    shard that no longer matches stops every rank at the step that reads it."""
    bad_shards: Literal["error", "skip"] = "error"
    """What a bad shard does. Found at a start: `error` stops every rank before training, naming each bad shard
    and the check it failed; `skip` leaves it out (logged) and reads the others, whose order is then the same
    at any world size as for a shard set written without it. Found mid-run: both stop every rank at that step
    (the last checkpoint intact) and record the shard; the next start reads it again in full, and `skip`
    leaves it out then."""


@dataclass
class OptimConfig:
    """AdamW (DeepSpeed engine with the torch optimizer)."""

    lr: float = 2e-4
    """Learning rate (reference §3.2: 2e-4 for the DiT; §1.4: 1e-4 for VA-VAE)."""
    betas: tuple[float, float] = (0.9, 0.95)
    """Adam betas (reference §3.2: (0.9, 0.95) for the DiT; §1.4: (0.5, 0.9) for VA-VAE)."""
    weight_decay: float = 0.0
    """Decoupled weight decay (reference: 0)."""
    eps: float = 1e-8
    """Adam epsilon (torch default, as the reference)."""
    grad_clip: float = 0.0
    """Global gradient-norm clip; 0 turns it off (the reference's default). Written to DeepSpeed explicitly: its own default became 1.0 in 0.19.3."""
    warmup_steps: int = 0
    """Linear learning-rate warmup from 0 (the reference uses none)."""


@dataclass
class CheckpointConfig:
    every: int = 5000
    """Save a checkpoint every this many steps (and at the end, and on a stop signal)."""
    keep_last: int = 3
    """Keep this many most recent checkpoints; older ones are deleted after a newer one is complete."""
    milestone_every: int = 0
    """Also keep every checkpoint whose step is a multiple of this (0: none)."""
    convert_workers: int = 4
    """Processes rank 0 converts a checkpoint to DeepSpeed's universal format with, at a new world size."""
    convert_timeout_s: float = 3600.0
    """Bound of that conversion, on rank 0 and on the ranks waiting for it (no collective waits on it,
    so collective_timeout_s does not bound it)."""


@dataclass
class LogConfig:
    every: int = 100
    """Log scalars to TensorBoard every this many steps."""
    sample_every: int = 5000
    """Write a sample grid every this many steps (0: never)."""
    peak_tflops: float | None = None
    """Peak TFLOP/s of one device, the denominator of `perf/mfu`; a value given is used on any device (set it
    for your GPU, e.g. its measured bf16 matmul peak, benchmarks/bench_gpu.py). Unset: 989 on GPUs (an H100
    SXM's dense bf16, NVIDIA's datasheet), and no `perf/mfu` on the CPU, where that figure means nothing."""


@dataclass
class MilestoneExportConfig:
    """Milestone exports of the EMA during training, and the evaluation that follows them (issue #16).

    The trainer only writes `export/step-N` at these steps (a gather of the EMA and one file write, like a
    checkpoint's); a follower job (`ldit eval EVAL.yaml run.name=… --follow`, or `ldit train … --follow-eval`)
    evaluates each export in its own processes, so training never waits for an evaluation.
    """

    every: int = 0
    """Export the EMA every this many steps (0: only at `at` and at the last step)."""
    at: tuple[int, ...] = ()
    """Further steps to export at (e.g. [1000, 5000] for an early look)."""
    eval: str = ""
    """Eval config (YAML) the follower evaluates the milestones with when `--follow-eval` names none. A cheap
    proxy is the point: e.g. configs/eval/fid10k_euler50.yaml (FID-10K without CFG, Euler on 50 points)."""


def milestone_steps(export: MilestoneExportConfig, steps: int) -> list[int]:
    """The steps whose EMA a run exports: every `export.every`, the listed `export.at`, and the last step."""
    every = set(range(export.every, steps + 1, export.every)) if export.every > 0 else set()
    return sorted(every | {s for s in export.at if 0 < s <= steps} | {steps})


@dataclass
class TrainCommon:
    """Keys shared by DiT and VA-VAE runs."""

    kind: str = MISSING
    """Which model the run trains: `dit` or `vavae`."""
    run: RunConfig = field(default_factory=RunConfig)
    data: StreamConfig = field(default_factory=StreamConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    ckpt: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)
    export: MilestoneExportConfig = field(default_factory=MilestoneExportConfig)
    steps: int = 80000
    """Optimizer steps to train (reference §3.2: 80k steps = 64 epochs at batch 1024)."""
    seed: int = 0
    """Seed of the weight initialisation and of every per-sample draw (noise, t, label dropout, posterior samples)."""
    micro_batch: int = 0
    """Samples per rank per forward; 0 means global_batch / world size (no accumulation)."""
    precision: Precision = "auto"
    """Compute dtype: `auto` is bf16 on GPUs and fp32 on CPU."""
    zero_stage: int = 2
    """DeepSpeed ZeRO stage (the design uses 2). At one rank in fp32 the engine runs stage 0, which shards
    nothing as ZeRO at one rank does, without its copies (trainer.engine.engine_stage; meta.json records
    the stage run, and a resume at another stage goes through whole tensors, trainer/stage_change.py)."""
    comm_dtype: Literal["fp32", "bf16"] = "fp32"
    """Dtype of the gradient reduce-scatter / all-reduce (DeepSpeed `communication_data_type`). fp32 keeps the
    reference's numerics (its DDP reduces fp32 gradients); bf16 halves the bytes on the wire under bf16 training
    at the cost of bf16 rounding of every summed gradient (DeepSpeed issues #2352, #2768 report divergence)."""
    grad_checkpointing: bool = False
    """Activation checkpointing per transformer block / per VA-VAE resolution level."""
    init_from: str = ""
    """Weights to start from (an export folder or file); ignored when the run directory already has a checkpoint."""
    nonfinite: Literal["skip", "stop"] = "stop"
    """What a non-finite loss does: skip the step, or stop the run (never writes non-finite weights). `skip` makes
    DeepSpeed check every step's gradients before the update (a device scan and a host read per step); `stop`
    keeps the check on the device and reads it every `nonfinite_check_every` steps and at every log and save
    (a save also checks the fp32 master weights), so the run stops within that many steps of the first
    non-finite loss, names that step, and the host never waits for the device in between."""
    nonfinite_check_every: int = 10
    """Under nonfinite=stop, read the device's non-finite flag every this many steps (one host sync each)."""
    collective_timeout_s: float = 600.0
    """Seconds a collective may wait for a missing rank before the job fails instead of hanging."""
    heartbeat_s: float = 120.0
    """A rank that finishes no training step for this long ends itself with exit code 76 (trainer/heartbeat.py)
    so that the SLURM job is requeued (slurm/heal.py): a lost or hung peer costs this long instead of
    collective_timeout_s. Not armed before the first step; checkpoint saves and sample grids are excepted
    (collective_timeout_s and the conversion's own bound cover them). Must exceed the longest step (XL/1 on
    2 CPU ranks: ~15 s a step; on GPUs ~1 s). 0: off."""

    def validate(self) -> None:
        """Cross-field rules that need no world size (those that do are checked at launch)."""
        d = self.data
        if d.global_batch <= 0 or d.streams <= 0 or d.global_batch % d.streams:
            raise ValueError(
                f"data.streams={d.streams} must divide data.global_batch={d.global_batch}: every step takes "
                "global_batch / streams samples from each stream"
            )
        if self.steps <= 0:
            raise ValueError(f"steps={self.steps} must be positive")
        if self.log.peak_tflops is not None and self.log.peak_tflops <= 0:
            raise ValueError(f"log.peak_tflops={self.log.peak_tflops} must be positive (or unset: null)")
        if self.micro_batch < 0:
            raise ValueError(f"micro_batch={self.micro_batch} must be 0 (no accumulation) or positive")
        if self.nonfinite_check_every <= 0:
            raise ValueError(f"nonfinite_check_every={self.nonfinite_check_every} must be positive")
        if self.export.every < 0 or any(s <= 0 or s > self.steps for s in self.export.at):
            raise ValueError(
                f"export.every={self.export.every} must be >= 0 and every step of export.at={list(self.export.at)} "
                f"in 1..steps={self.steps}"
            )
        if self.heartbeat_s < 0:
            raise ValueError(f"heartbeat_s={self.heartbeat_s} must be 0 (off) or positive")


def world_size_problems(global_batch: int, streams: int, micro_batch: int, world_size: int) -> list[str]:
    """Why `world_size` ranks cannot train with these batch settings ([] when they can).

    Rank r reads the streams r, r+W, … (DESIGN.md "The stream reader"), so W must divide the stream
    count; the streams divide the global batch (TrainCommon.validate), so W then divides it too; and the
    micro batch must divide the per-rank batch (whole accumulation steps). The launcher's preflight, the
    trainer's topology and `ldit inspect checkpoint` all ask this one function.
    """
    if world_size < 1:
        return [f"world size {world_size} must be positive"]
    if streams % world_size or global_batch % world_size:
        return [
            f"world size {world_size} must divide data.streams={streams} (each rank reads streams r, r+W, …): "
            f"run on a divisor of {streams} ranks, or start a new run with another data.streams"
        ]
    local = global_batch // world_size
    if micro_batch and local % micro_batch:
        return [
            f"micro_batch={micro_batch} must divide the per-rank batch {local} "
            f"(data.global_batch={global_batch} / world size {world_size})"
        ]
    return []


@dataclass
class DiTModelConfig:
    size: str = "XL/1"
    """LightningDiT size from the registry (reference §2.1): B/1, B/2, L/2, XL/1, XL/2, 1p0B/1, 1p6B/1, or a small test size."""
    use_qknorm: bool = False
    """RMSNorm on q and k before RoPE (off in the reference; suggested against NaN losses, §6)."""
    depth: int = 0
    """Override of the size's block count (0: the size's own), for scaling studies and benchmarks."""
    hidden_size: int = 0
    """Override of the size's width (0: the size's own)."""
    num_heads: int = 0
    """Override of the size's head count (0: the size's own)."""
    compile: bool = False
    """Compile each transformer block with torch.compile, in place, one graph shared by all blocks
    (models/compile.py; the reference compiles its blocks too, §2.2). A second batch size recompiles once.
    Measured on a 2-core CPU at 12 blocks x 384 wide, batch 8: the first step compiles for about 30 s (16 s at
    1 thread), or 2.5 s with inductor's disk cache warm; then forward + backward takes 0.85x eager's time (1
    thread; with 2 threads on a loaded machine, 0.80 to 0.86 of eager's fastest rounds). Checkpoints keep the
    module's own keys (no `_orig_mod.`), so compiled and eager runs load each other's checkpoints."""


@dataclass
class TrainDiTConfig(TrainCommon):
    """A LightningDiT run: rectified flow on VA-VAE latents (reference §3)."""

    kind: str = "dit"
    model: DiTModelConfig = field(default_factory=DiTModelConfig)
    ema_decay: float = 0.9999
    """EMA decay, updated every step from step 0 (reference §3.2)."""
    t_sampling: Literal["lognorm", "uniform"] = "lognorm"
    """Training time distribution: sigmoid of N(0,1), or uniform (reference §3.1)."""
    cos_loss_weight: float = 1.0
    """Weight of the velocity-direction (cosine) loss (reference §3.1: 1)."""
    label_dropout: float = 0.1
    """Probability a label is replaced by the null class (reference §2.2: 0.1)."""
    vavae: str = ""
    """VA-VAE export used to decode sample grids (empty: grids show the first 3 latent channels)."""


def dit_model_args(cfg: TrainDiTConfig, latent_shape: tuple[int, ...], num_classes: int) -> LightningDiTArgs:
    """The model a `kind: dit` config trains on latents of `latent_shape` (C, H, W) of `num_classes` classes: its
    registry size with the config's overrides. Torch-free: the trainer (trainer/dit.py) and `ldit plan` both
    read the model through it. Raises ValueError for non-square latents."""
    c, h, w = latent_shape
    if h != w:
        raise ValueError(f"latents are {h}x{w}; LightningDiT takes square latents")
    m = cfg.model
    overrides = {
        k: v for k, v in (("depth", m.depth), ("hidden_size", m.hidden_size), ("num_heads", m.num_heads)) if v
    }
    return lightningdit_args(
        m.size, **overrides, in_channels=c, input_size=h, num_classes=num_classes,
        class_dropout_prob=cfg.label_dropout, use_qknorm=m.use_qknorm,
    )  # fmt: skip


@dataclass
class VAVAELossConfig:
    """VA-VAE loss weights (reference §1.2-1.3)."""

    kl_weight: float = 1e-6
    """Weight of the KL term, calibrated against the sum-over-pixels reconstruction (reference §1.3: 1e-6)."""
    perceptual_weight: float = 1.0
    """Weight of LPIPS inside the reconstruction term (reference §1.3: 1.0)."""
    disc_weight: float = 0.5
    """Multiplier of the adaptive GAN weight (reference §1.3: 0.5)."""
    disc_start: int = 5001
    """Step from which the GAN loss is on (reference §1.4: 5001 in stage 1, 1 afterwards)."""
    vf_weight: float = 0.1
    """Hyper-weight of the adaptive VF loss (reference §1.4: 0.5 in stage 1, 0.1 afterwards)."""
    cos_margin: float = 0.5
    """Margin m1 of the marginal cosine similarity (reference §1.2)."""
    distmat_margin: float = 0.25
    """Margin m2 of the marginal distance-matrix similarity (reference §1.2)."""
    foundation: Literal["dinov2", "mae"] = "dinov2"
    """Frozen vision foundation model the latents are aligned to (reference §1.2)."""
    foundation_weights: str = ""
    """Local file of the foundation model's weights, for offline machines (empty: timm downloads them)."""
    lpips_weights: str = ""
    """Local file of LPIPS's linear heads (v0.1 vgg.pth), for offline machines (empty: the `lpips` package's copy)."""
    vgg16_weights: str = ""
    """Local file of LPIPS's VGG16 trunk (torchvision `features.*` state_dict), for offline machines (empty: downloaded)."""
    foundation_timm_name: str = ""
    """timm name of the foundation model (empty: the kind's reference model, §1.2); tests use vit_small_patch14_dinov2."""
    foundation_resize: int = -1
    """Bilinear resize before the foundation model so its token grid equals the latent grid; -1: the kind's default (224 for DINOv2, none for MAE, §1.2)."""
    use_vf: bool = True
    """Add the VF loss (False: the plain LDM autoencoder loss, the "no VF" row of Table 2)."""
    proj_fix: bool = False
    """Freeze the VF projection linear_proj (reference proj_fix, §1.2); by default the AE optimizer trains it."""
    disc_start_clock: Literal["lightning", "step"] = "lightning"
    """How disc_start is counted. `lightning` (reference): Lightning's global_step advances once per optimizer step,
    so with manual AE + D steps it is 2·k at iteration k's AE loss and 2·k + 1 at its D loss; disc_start 5001 then
    turns the GAN term on at iteration 2501 (D loss at 2500). `step`: both see the iteration k itself."""


@dataclass
class TrainVAVAEConfig(TrainCommon):
    """A VA-VAE run: autoencoder and PatchGAN discriminator as two engines (reference §1)."""

    kind: str = "vavae"
    model: str = "f16d32"
    """Autoencoder size: f16d32 (reference §1.1) or a small CPU size."""
    loss: VAVAELossConfig = field(default_factory=VAVAELossConfig)
    image_size: int = 256
    """Side of the random crop (reference §1.4: 256)."""
    ema_decay: float = 0.0
    """Decay of the fp32 EMA of the autoencoder, which checkpoints hold and exports write. The reference keeps no
    EMA (§1.4); the default 0 makes the "EMA" the weights of the last step, so the export is the raw weights."""

    def validate(self) -> None:
        super().validate()
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"ema_decay={self.ema_decay} must be in [0, 1) (0: export the raw weights)")


TRAIN_KINDS: dict[str, type[TrainCommon]] = {"dit": TrainDiTConfig, "vavae": TrainVAVAEConfig}


@dataclass
class ExportConfig:
    """Write the EMA weights of a checkpoint with the reference's key names (DESIGN.md "Run directory")."""

    run: RunConfig = field(default_factory=RunConfig)
    step: int = -1
    """Checkpoint step to export; -1 means the latest complete one."""
