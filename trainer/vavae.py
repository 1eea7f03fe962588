"""VA-VAE training: the autoencoder and the PatchGAN discriminator as two DeepSpeed ZeRO-2 engines
(reference §1.2-1.4).

The loop in :func:`train` reads top to bottom: data → autoencoder loss → AE backward → AE step →
discriminator loss on the same batch (reconstructions detached) → D backward → D step → EMA → log →
checkpoint → reconstruction grid. Choices, and where they differ from the reference:

- Two engines (ecosystem §2.1). The AE engine trains the autoencoder and the VF projection `linear_proj`
  (unless `loss.proj_fix`), as the reference's AE optimizer does (§1.2). The generator term runs the
  reconstructions through the discriminator with its parameters frozen, so the AE backward never reaches
  engine D (DeepSpeed #4923); the reference instead lets it run and zeroes D's gradients.
- Adaptive weights (§1.2, §1.3) are `torch.autograd.grad` at `encoder.conv_out.weight` and
  `decoder.conv_out.weight` of the engine's own module: no `.grad` is written, no ZeRO hook fires. The
  losses are computed in fp32: reconstructions and posterior moments leave the engine in fp32, and LPIPS
  and the foundation model stay fp32 outside every engine. In bf16 the gradients at the last layers are
  bf16 (the module's dtype), so the two weights carry bf16 precision (~3 significant digits).
- The posterior noise of each sample is keyed on (seed, step, its place in the global batch), as
  the DiT's draws: a resumed run, or one at another world size, reproduces it.
- A micro-batch is a unit of the computation (BatchNorm in D, the adaptive weights), so its samples are
  the same ones at any world size with the same micro_batch (:func:`micro_batch_order`): a run resumed
  elastically continues the same run when it keeps micro_batch; it warns when the micro-batch changes.
- `disc_start` is counted on Lightning's clock by default (`loss.disc_start_clock`): see :func:`gan_steps`.
- EMA: the reference keeps none (§1.4). An fp32 EMA of the autoencoder is saved with every checkpoint and
  exported; its default decay 0 makes it the last step's weights, i.e. the export is the raw weights.
- Exports hold the autoencoder under the reference's keys (`ldit extract-latents vavae=<run>/export/latest`
  loads them) plus `training_extras.safetensors`: `linear_proj.weight` and `loss.discriminator.*` under
  the reference's Lightning checkpoint keys, written by trainer/export.py's one writer (the end of a run
  and `ldit export` alike). `init_from` loads all three, as the reference's stage chain does with its
  whole Lightning state_dict (§1.4); optimizers start afresh, as there. A source that lacks a part the
  stage uses is refused, where the reference's `init_weight` silently keeps it random (trainer/stages.py).
- MFU is not logged: there is no analytic FLOP count for the autoencoder + LPIPS + foundation step.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch
import torch.distributed as dist

from data_prep.reader import StreamReader, image_decoder
from models.discriminator import NLayerDiscriminator
from models.vavae import (
    AutoencoderKL,
    autoencoder_args,
)
from models.weights import read_state_dict
from trainer.checkpoint import EMA_FILE, Checkpointer
from trainer.common import (
    Logger,
    Meter,
    NonFiniteWatch,
    StopRequested,
    StopSignals,
    Topology,
    agree,
    mean_over_ranks,
    memory_bytes,
    optimizer_state_bytes,
    per_sample_normal,
    print0,
    topology,
)
from trainer.config import TrainVAVAEConfig, milestone_steps
from trainer.engine import build_engine, deepspeed_config, engine_stage, global_grad_norm, grad_norm_next_step
from trainer.export import (
    DISC_PREFIX,
    EXTRA_PARTS,
    TRAINING_EXTRAS,
    export_weights,
    exported,
    training_extras,
)
from trainer.heartbeat import Heartbeat
from trainer.preflight import open_training_shards
from trainer.shard_guard import ShardGuard
from trainer.sharded_ema import ShardedEMA, fp32_snapshot, seed_fp32_master
from trainer.stage_change import describe, resume_route
from trainer.stages import gan_steps, load_init, stage_uses, trained_extras
from trainer.universal import ConvertSettings
from trainer.vavae_objectives import (
    AutoencoderObjective,
    DiscriminatorObjective,
    build_loss,
    fp32_out,
    frozen,
)

__all__ = ["DISC_PREFIX", "TRAINING_EXTRAS", "gan_steps", "train"]


def train(cfg: TrainVAVAEConfig) -> None:
    topo = topology(cfg)
    run_dir = cfg.run.dir
    manifest = open_training_shards(cfg.data, "images", run_dir)  # checked on every rank before step 0
    args = autoencoder_args(cfg.model)
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank and every attempt
    autoencoder, discriminator = AutoencoderKL(args), NLayerDiscriminator()
    loss_fn = build_loss(cfg, args).to(topo.device)
    ckpts = Checkpointer(
        run_dir, cfg.ckpt.keep_last, cfg.ckpt.milestone_every,
        ConvertSettings(cfg.ckpt.convert_workers, cfg.ckpt.convert_timeout_s),
    )  # fmt: skip
    resume = ckpts.agreed_latest()  # rank 0 chooses; every rank must see it complete
    loaded: set[str] = set()  # training extras with weights from outside this run (init_from)
    if resume is None and cfg.init_from:
        message, loaded = load_init(
            cfg.init_from, autoencoder, loss_fn.linear_proj, discriminator, stage_uses(cfg)
        )
        print0(message)
    autoencoder.set_grad_checkpointing(cfg.grad_checkpointing)
    zero_stage = engine_stage(
        cfg.zero_stage, world_size=topo.world_size, dtype=topo.dtype, nonfinite=cfg.nonfinite
    )
    route = resume_route(resume.meta, topo.world_size, zero_stage) if resume is not None else "exact"
    engines, fp32, ds_configs = {}, {}, {}
    for name, module in (
        ("autoencoder", AutoencoderObjective(autoencoder, loss_fn.linear_proj)),
        ("discriminator", DiscriminatorObjective(discriminator)),
    ):
        trained = [p for p in module.parameters() if p.requires_grad]
        ds_configs[name] = deepspeed_config(  # the two differ in their bucket sizes only
            micro_batch=topo.micro_batch, grad_accum=topo.grad_accum, world_size=topo.world_size,
            dtype=topo.dtype, grad_clip=cfg.optim.grad_clip, zero_stage=zero_stage,
            comm_dtype=cfg.comm_dtype, load_universal=route == "universal", trainable_params=sum(p.numel() for p in trained),
            nonfinite=cfg.nonfinite,
        )  # fmt: skip
        fp32[name] = fp32_snapshot(module)  # the weights before DeepSpeed casts them (EMA and master start)
        engines[name] = build_engine(
            module, trained, lr=cfg.optim.lr, betas=cfg.optim.betas,
            eps=cfg.optim.eps, weight_decay=cfg.optim.weight_decay, warmup_steps=cfg.optim.warmup_steps,
            ds_config=ds_configs[name], grad_clip=cfg.optim.grad_clip,
        )  # fmt: skip
    ae_engine, d_engine = engines["autoencoder"], engines["discriminator"]
    init = {
        k.removeprefix("autoencoder."): v
        for k, v in fp32["autoencoder"].items()
        if k.startswith("autoencoder.")
    }
    ema = ShardedEMA(ae_engine, init, cfg.ema_decay, prefix="autoencoder.")  # of the AE engine's fp32 master
    if resume is None:  # both engines start from the fp32 weights, not DeepSpeed's bf16-rounded copies
        for name, engine in engines.items():
            seed_fp32_master(engine, fp32[name])
    del init, fp32
    discriminator.to(topo.dtype)  # DeepSpeed casts parameters only; BatchNorm wants its statistics alike
    step = 0
    if resume is not None:
        ckpts.load(resume, engines)
        ema.load_state_dict(read_state_dict(resume.path / EMA_FILE))
        step = resume.step
        loaded = set(resume.meta.get("extras", EXTRA_PARTS))  # what the run held when it saved
        print0(
            f"resumed {cfg.run.name} at step {step}"
            + describe(route, resume.meta, topo.world_size, zero_stage)
        )
        if resume.meta["micro_batch"] != topo.micro_batch:
            print0(
                f"warning: the micro-batch changed from {resume.meta['micro_batch']} to {topo.micro_batch} "
                "samples: the discriminator's BatchNorm and the adaptive weights see another batch, so the run "
                f"does not continue exactly; set micro_batch={resume.meta['micro_batch']} to continue it exactly"
            )
    if topo.rank == 0:
        (run_dir / "ds_config.json").write_text(json.dumps(ds_configs["autoencoder"], indent=1))
        (run_dir / "ds_config_discriminator.json").write_text(
            json.dumps(ds_configs["discriminator"], indent=1)
        )
        (run_dir / "topology.json").write_text(json.dumps(topo.describe(), indent=1))
    reader = StreamReader(
        cfg.data.shards, manifest, seed=cfg.data.seed, global_batch=cfg.data.global_batch,
        streams=cfg.data.streams, rank=topo.rank, world_size=topo.world_size,
        decode=image_decoder(cfg.image_size, "random"), workers=cfg.data.workers,
        pin_memory=topo.device.type == "cuda",
    )  # fmt: skip
    side = cfg.image_size // autoencoder.downsample_factor
    per_stream = cfg.data.global_batch // cfg.data.streams  # samples each stream gives a step
    signals, logger, meter = StopSignals(), Logger(run_dir, step), Meter(topo.device)
    sums: dict[str, torch.Tensor] = {}  # each logged loss since the last log, summed on the device
    watch = NonFiniteWatch(topo.device, cfg.nonfinite_check_every, cfg.nonfinite == "stop")
    skipped = 0
    shards = ShardGuard(cfg.data, manifest, run_dir, reader.batches(step))  # reads a step ahead
    (bad_next,) = agree(shards.fetch()) if step < cfg.steps else (False,)  # the first step's batch
    heartbeat = Heartbeat(cfg.heartbeat_s, topo.rank)  # a lost or hung peer ends this rank (exit 76)
    milestones = set(milestone_steps(cfg.export, cfg.steps))  # exports an eval follower evaluates (issue #16)

    def export(at: int, again: bool = True) -> None:  # a collective: the EMA is gathered to rank 0
        weights = ema.state_dict()
        if topo.rank == 0 and (again or not exported(run_dir, at)):  # as `ldit export` writes it
            extras = training_extras(
                ae_engine.module.state_dict(), d_engine.module.state_dict(), trained_extras(cfg, at, loaded)
            )
            model = AutoencoderKL(replace(args, grad_checkpointing=False))
            export_weights(run_dir, at, model, weights, cfg, extras)

    try:
        while step < cfg.steps:
            began = meter.begin()
            batch = shards.take(step, bad_next)  # data, read a step ahead (a bad shard stops all here)
            order = micro_batch_order(batch.positions, per_stream, topo)
            x = batch.x[order].to(topo.device, non_blocking=True)  # (b, 3, H, W) in [-1, 1]
            eps = per_sample_normal(cfg.seed, step, batch.positions[order], (args.embed_dim, side, side))
            eps = eps.to(topo.device, non_blocking=True)
            ae_clock, d_clock = gan_steps(cfg.loss.disc_start_clock, step)
            lrs = {n: e.get_lr()[0] for n, e in engines.items()}  # this step's rates; step() advances them
            logging = (step + 1) % cfg.log.every == 0 or step + 1 == cfg.steps
            for engine in engines.values():
                grad_norm_next_step(
                    engine, logging
                )  # the norm costs a pass and a host read: only when logged
            for i in range(topo.grad_accum):
                sl = slice(i * topo.micro_batch, (i + 1) * topo.micro_batch)
                with frozen(discriminator):  # the AE backward must not enter engine D (DeepSpeed #4923)
                    ae_loss, ae_logs, xrec = ae_engine(  # loss (§1.3 total, adaptive weights included)
                        x[sl], eps[sl], loss_fn, ae_clock, fp32_out(discriminator, topo.dtype)
                    )
                ae_engine.backward(ae_loss)  # backward
                ae_engine.step()  # step (applied at the accumulation boundary)
                d_loss, d_logs = d_engine(x[sl], xrec, loss_fn, d_clock)  # D on the same batch, x̂ detached
                d_engine.backward(d_loss)
                d_engine.step()
                logs = {f"loss/ae/{k}": v for k, v in ae_logs.items()}
                logs |= {f"loss/disc/{k}": v for k, v in d_logs.items()}
                for k, v in zip(logs, torch.stack(list(logs.values())).detach().double().unbind()):
                    sums[k] = sums.get(k, 0.0) + v / topo.grad_accum  # on the device
                watch.add(step, logs["loss/ae/total"] + logs["loss/disc/disc_loss"])
            t1 = time.perf_counter()
            bad = shards.fetch() if step + 1 < cfg.steps else False  # the next step's batch, read ahead
            data_s = time.perf_counter() - t1
            stopping, bad_next = agree(signals.received is not None, bad)  # host flags: no device sync
            heartbeat.beat()  # every rank got here: this step finished
            step += 1
            if ae_engine.was_step_applied():
                ema.update()  # EMA of the fp32 master weights the step just wrote
            else:
                skipped += 1
            meter.add(topo.global_batch, data_s, began)
            saving = step % cfg.ckpt.every == 0 or step == cfg.steps or stopping
            watch.check(step, logging, saving, ema.masters_finite)  # nonfinite=stop: read the flag
            if logging:  # log
                means = torch.stack(list(sums.values())) / meter.steps
                values = mean_over_ranks(dict(zip(sums, means.tolist())))
                perf = meter.summary(topo.world_size, 0.0, 1.0)  # no analytic FLOPs: MFU left out
                values |= {k: v for k, v in perf.items() if k != "perf/mfu"}
                for name, engine in engines.items():
                    values[f"opt/{name}/lr"] = lrs[name]
                    values[f"opt/{name}/grad_norm"] = global_grad_norm(engine)
                    values[f"sys/{name}/optimizer_state_mb_rank0"] = optimizer_state_bytes(engine) / 2**20
                values |= {
                    "sys/ema_mb_rank0": ema.nbytes() / 2**20,
                    "opt/skipped_steps": float(skipped),
                    "sys/memory_gb": memory_bytes(topo.device) / 2**30,
                }
                logger.scalars(step, values)
                print0(f"step {step}/{cfg.steps} loss {values['loss/ae/total']:.4f} nll {values['loss/ae/nll']:.4f} "
                       f"disc {values['loss/disc/disc_loss']:.4f} {values['perf/samples_per_s']:.1f} samples/s")  # fmt: skip
                sums = {}
                meter.reset()
            sampling = bool(cfg.log.sample_every) and (step % cfg.log.sample_every == 0 or step == cfg.steps)
            exporting = step in milestones and step < cfg.steps  # the last step's export follows the loop
            with heartbeat.paused():  # not steps: collective_timeout_s bounds saves, grids and exports
                if saving:  # checkpoint
                    meta = {"samples_seen": step * topo.global_batch, "config": asdict(cfg), **topo.describe(),
                            "zero_stage": zero_stage, "kind": "vavae", "model_args": asdict(args),
                            "extras": trained_extras(cfg, step, loaded)}  # fmt: skip
                    ckpts.save(step, engines, ema.state_dict, meta)
                if sampling:  # samples
                    reconstruction_grid(x[sl], xrec, step, run_dir, logger)
                if exporting:  # a milestone (a requeued run that passes it again keeps the one written)
                    export(step, again=False)
                if saving or sampling or exporting:  # the others must not count rank 0 writing against a step
                    dist.barrier()
            if stopping:
                raise StopRequested(f"stopped by signal {signals.received} at step {step}, checkpoint saved")
    finally:
        heartbeat.stop()
        signals.restore()
        logger.close()
    export(step)
    dist.barrier()


def micro_batch_order(positions: torch.Tensor, per_stream: int, topo: Topology) -> torch.Tensor:
    """The order of this rank's samples that makes its micro-batch i the streams of micro-batch group
    v mod (world size · accumulation) = rank + i·world size, a split of the global batch that does not
    depend on the world size when the micro-batch is kept.

    The VA-VAE's micro-batch is a unit of the computation, not only of memory: the discriminator's
    BatchNorm normalises over it and the adaptive weights (§1.2, §1.3) are ratios of its gradient norms.
    Rank r reads streams r, r + W, … (DESIGN.md "The stream reader"): its micro-batch i gets its local
    streams j ≡ i (mod accumulation), so 2 ranks × 1 micro-batch and 1 rank × 2 micro-batches of the same
    size see the same samples together. A micro-batch that does not hold whole streams keeps the
    stream order (no such guarantee then). `positions` are the samples' places in the global batch.
    """
    if topo.grad_accum == 1 or topo.micro_batch % per_stream:
        return torch.arange(len(positions))
    local_stream = positions // per_stream // topo.world_size  # j of stream v = r + j·W
    return torch.sort(local_stream % topo.grad_accum, stable=True).indices


@torch.no_grad()
def reconstruction_grid(
    x: torch.Tensor, xrec: torch.Tensor, step: int, run_dir: Path, logger: Logger
) -> None:
    """Rank 0: up to 8 inputs of this step (top row) above their training reconstructions (bottom row)."""
    if dist.get_rank() != 0:
        return
    import torchvision

    n = min(len(x), 8)
    images = torch.cat([x[:n].float(), xrec[:n].float().clamp(-1, 1)])
    grid = torchvision.utils.make_grid((images + 1) / 2, nrow=n, padding=1).clamp(0, 1)
    grid8 = (grid * 255).round().to(torch.uint8).cpu()
    (run_dir / "samples").mkdir(exist_ok=True)
    torchvision.io.write_png(grid8, str(run_dir / "samples" / f"step-{step:08d}.png"))
    logger.images(step, "samples/reconstructions", grid8)
