"""LightningDiT training: rectified flow on VA-VAE latents with DeepSpeed ZeRO-2 (reference §3).

The loop in :func:`train` reads top to bottom: data → loss → backward → step → EMA → log → checkpoint
→ samples. Every random draw of a step (noise, t, label dropout) is keyed on (seed, step, the sample's
place in the global batch), so a step computes the same loss at any world size, and a resumed run
continues bit for bit at the same world size.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch
import torch.distributed as dist

from data_prep.manifest import Manifest, ShardSetError
from data_prep.reader import StreamReader, latent_decoder, normalize_latents
from models.export import load_lightningdit, load_vavae
from models.flow import FlowArgs, RectifiedFlow
from models.lightningdit import LightningDiT, LightningDiTArgs
from models.samplers import sample_euler, timestep_grid
from trainer.checkpoint import EMA_FILE, Checkpointer
from trainer.common import (
    Logger,
    Meter,
    NonFiniteWatch,
    StopRequested,
    StopSignals,
    agree,
    mean_over_ranks,
    memory_bytes,
    optimizer_state_bytes,
    peak_tflops,
    per_sample_normal,
    print0,
    topology,
)
from trainer.config import TrainDiTConfig, dit_model_args, milestone_steps
from trainer.engine import build_engine, deepspeed_config, engine_stage, global_grad_norm, grad_norm_next_step
from trainer.export import export_weights, exported
from trainer.heartbeat import Heartbeat
from trainer.preflight import open_training_shards
from trainer.shard_guard import ShardGuard
from trainer.sharded_ema import ShardedEMA, fp32_snapshot, seed_fp32_master
from trainer.stage_change import describe, resume_route
from trainer.universal import ConvertSettings


def model_args(cfg: TrainDiTConfig, manifest: Manifest) -> LightningDiTArgs:
    """The registry size of the config, shaped by the latents of the shard set."""
    try:
        return dit_model_args(cfg, manifest.latent.shape, len(manifest.classes))
    except ValueError as exc:
        raise ShardSetError(f"{cfg.data.shards}: {exc}") from None


def step_draws(cfg: TrainDiTConfig, step: int, positions: torch.Tensor, shape: tuple[int, ...]):
    """Noise (n, C, H, W), t (n,) and the label-dropout mask (n,) of one step's samples."""
    n = per_sample_normal(cfg.seed, step, positions, (2 + shape[0] * shape[1] * shape[2],))
    noise = n[:, 2:].reshape(-1, *shape)
    if cfg.t_sampling == "lognorm":
        t = torch.sigmoid(n[:, 0])  # reference §3.1: t = sigmoid(N(0, 1))
    else:
        t = torch.special.ndtr(n[:, 0])  # a uniform from the same normal
    drop = torch.special.ndtr(n[:, 1]) < cfg.label_dropout
    return noise, t, drop


def train(cfg: TrainDiTConfig) -> None:
    topo = topology(cfg)
    run_dir = cfg.run.dir
    run_dir.mkdir(parents=True, exist_ok=True)
    manifest = open_training_shards(cfg.data, "latents", run_dir)  # checked on every rank before step 0
    if manifest.latent is None or not manifest.latent.std:
        raise ShardSetError(
            f"{cfg.data.shards}/manifest.json has no latent statistics; rerun extract-latents"
        )
    args = model_args(cfg, manifest)
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank and every attempt
    model = LightningDiT(args)
    ckpts = Checkpointer(
        run_dir, cfg.ckpt.keep_last, cfg.ckpt.milestone_every,
        ConvertSettings(cfg.ckpt.convert_workers, cfg.ckpt.convert_timeout_s),
    )  # fmt: skip
    resume = ckpts.agreed_latest()  # rank 0 chooses; every rank must see it complete
    if resume is None and cfg.init_from:
        model.load_state_dict(load_lightningdit(cfg.init_from).state_dict())
    model.set_grad_checkpointing(cfg.grad_checkpointing)
    if cfg.model.compile:
        from models.compile import compile_regions

        compile_regions(model)  # in place: the module keeps its own state_dict keys
    init = fp32_snapshot(model)  # the EMA starts from the fp32 weights, before DeepSpeed casts the module
    zero_stage = engine_stage(
        cfg.zero_stage, world_size=topo.world_size, dtype=topo.dtype, nonfinite=cfg.nonfinite
    )
    route = resume_route(resume.meta, topo.world_size, zero_stage) if resume is not None else "exact"
    trained = [p for p in model.parameters() if p.requires_grad]
    ds_config = deepspeed_config(
        micro_batch=topo.micro_batch, grad_accum=topo.grad_accum, world_size=topo.world_size,
        dtype=topo.dtype, grad_clip=cfg.optim.grad_clip, zero_stage=zero_stage, comm_dtype=cfg.comm_dtype,
        load_universal=route == "universal", trainable_params=sum(p.numel() for p in trained), nonfinite=cfg.nonfinite,
    )  # fmt: skip
    engine = build_engine(
        model, trained, lr=cfg.optim.lr, betas=cfg.optim.betas,
        eps=cfg.optim.eps, weight_decay=cfg.optim.weight_decay, warmup_steps=cfg.optim.warmup_steps, ds_config=ds_config, grad_clip=cfg.optim.grad_clip,
    )  # fmt: skip
    ema = ShardedEMA(engine, init, cfg.ema_decay)  # this rank's partition of the fp32 master weights
    if resume is None:
        seed_fp32_master(engine, init)  # start from the fp32 weights, not DeepSpeed's bf16-rounded copy
    del init
    step = 0
    if resume is not None:
        ckpts.load(resume, {"model": engine})
        from models.weights import read_state_dict

        ema.load_state_dict(read_state_dict(resume.path / EMA_FILE))
        step = resume.step
        print0(
            f"resumed {cfg.run.name} at step {step}"
            + describe(route, resume.meta, topo.world_size, zero_stage)
        )
    if topo.rank == 0:
        (run_dir / "ds_config.json").write_text(json.dumps(ds_config, indent=1))
        (run_dir / "topology.json").write_text(json.dumps(topo.describe(), indent=1))
    flops = model.flops_per_sample(grad_checkpointing=False)
    flow = RectifiedFlow(FlowArgs(t_sampling="logit_normal", cos_weight=cfg.cos_loss_weight))
    reader = StreamReader(
        cfg.data.shards, manifest, seed=cfg.data.seed, global_batch=cfg.data.global_batch,
        streams=cfg.data.streams, rank=topo.rank, world_size=topo.world_size, decode=latent_decoder(),
        workers=cfg.data.workers, pin_memory=topo.device.type == "cuda",
    )  # fmt: skip
    mean, std = manifest.latent.mean, manifest.latent.std
    signals, logger, meter = StopSignals(), Logger(run_dir, step), Meter(topo.device)
    peak = peak_tflops(cfg.log.peak_tflops, topo.device)  # None: no perf/mfu (the CPU, unless set)
    sums = torch.zeros(3, dtype=torch.float64, device=topo.device)  # loss/total, mse, cos since the last log
    watch = NonFiniteWatch(topo.device, cfg.nonfinite_check_every, cfg.nonfinite == "stop")
    skipped = 0
    shards = ShardGuard(cfg.data, manifest, run_dir, reader.batches(step))  # reads a step ahead
    (bad_next,) = agree(shards.fetch()) if step < cfg.steps else (False,)  # the first step's batch
    heartbeat = Heartbeat(cfg.heartbeat_s, topo.rank)  # a lost or hung peer ends this rank (exit 76)
    milestones = set(milestone_steps(cfg.export, cfg.steps))  # exports an eval follower evaluates (issue #16)

    def export(at: int, again: bool = True) -> None:  # a collective: the EMA is gathered to rank 0
        weights = ema.state_dict()
        if topo.rank == 0 and (again or not exported(run_dir, at)):
            export_weights(run_dir, at, LightningDiT(replace(args, grad_checkpointing=False)), weights, cfg)

    try:
        while step < cfg.steps:
            began = meter.begin()
            batch = shards.take(step, bad_next)  # data, read a step ahead (a bad shard stops all here)
            x1 = normalize_latents(batch.x.to(topo.device, non_blocking=True), mean, std)
            y = batch.y.to(topo.device, non_blocking=True)
            noise, t, drop = (
                v.to(topo.device, non_blocking=True)
                for v in step_draws(cfg, step, batch.positions, x1.shape[1:])
            )
            meter.lap("data")
            lr = engine.get_lr()[0]  # the rate this step applies (the scheduler advances in engine.step())
            logging = (step + 1) % cfg.log.every == 0 or step + 1 == cfg.steps
            grad_norm_next_step(engine, logging)  # the norm costs a pass and a host read: only when logged
            for i in range(topo.grad_accum):
                sl = slice(i * topo.micro_batch, (i + 1) * topo.micro_batch)

                def net(x_t, t_, y_, mask=drop[sl]):
                    return engine(x_t.to(topo.dtype), t_, y_, drop_mask=mask)

                loss = flow.loss(net, x1[sl], y[sl], noise=noise[sl], t=t[sl])  # loss
                engine.backward(loss.total)  # backward (ZeRO-2 reduces the gradients in it)
                sums += (
                    torch.stack([loss.total, loss.mse, loss.cos]).detach() / topo.grad_accum
                )  # on the device
                watch.add(step, loss.total)
                meter.lap("fwd_bwd")
                engine.step()  # step (applied at the accumulation boundary)
                meter.lap("optim")
            if engine.was_step_applied():
                ema.update()  # EMA of the fp32 master weights the step just wrote
            else:
                skipped += 1
            meter.lap("optim")  # the EMA update counts with the optimizer step
            t1 = time.perf_counter()
            bad = shards.fetch() if step + 1 < cfg.steps else False  # the next step's batch, read ahead
            data_s = time.perf_counter() - t1
            stopping, bad_next = agree(signals.received is not None, bad)  # host flags: no device sync
            heartbeat.beat()  # every rank got here: this step finished
            step += 1
            meter.add(topo.global_batch, data_s, began)  # the read-ahead and the agreement count as data
            saving = step % cfg.ckpt.every == 0 or step == cfg.steps or stopping
            watch.check(step, logging, saving, ema.masters_finite)  # nonfinite=stop: read the flag
            if logging:  # log
                means = sums / meter.steps
                values = mean_over_ranks(dict(zip(("loss/total", "loss/mse", "loss/cos"), means.tolist())))
                values |= meter.summary(topo.world_size, flops.forward + flops.backward, peak)
                values |= {
                    "opt/lr": lr,
                    "opt/grad_norm": global_grad_norm(engine),
                    "opt/skipped_steps": float(skipped),
                    "sys/memory_gb": memory_bytes(topo.device) / 2**30,
                    "sys/optimizer_state_mb_rank0": optimizer_state_bytes(engine) / 2**20,
                    "sys/ema_mb_rank0": ema.nbytes() / 2**20,
                }
                logger.scalars(step, values)
                print0(f"step {step}/{cfg.steps} loss {values['loss/total']:.4f} mse {values['loss/mse']:.4f} "
                       f"{values['perf/samples_per_s']:.1f} samples/s")  # fmt: skip
                sums.zero_()
                meter.reset()
            sampling = bool(cfg.log.sample_every) and (step % cfg.log.sample_every == 0 or step == cfg.steps)
            exporting = step in milestones and step < cfg.steps  # the last step's export follows the loop
            with heartbeat.paused():  # not steps: collective_timeout_s bounds saves, grids and exports
                if saving:  # checkpoint
                    meta = {"samples_seen": step * topo.global_batch, "config": asdict(cfg), **topo.describe(),
                            "zero_stage": zero_stage, "kind": "dit", "model_args": asdict(args)}  # fmt: skip
                    ckpts.save(step, {"model": engine}, ema.state_dict, meta)
                if sampling:  # samples
                    sample_grid(cfg, args, ema.state_dict(), manifest, step, run_dir, logger, topo.device)
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


@torch.no_grad()
def sample_grid(
    cfg, args, weights: dict[str, torch.Tensor] | None, manifest, step, run_dir: Path, logger: Logger, dev
) -> None:
    """Rank 0: one row per class (up to 10), 8 EMA samples each, fixed noise, Euler on 32 shifted points.

    Decoded by the VA-VAE when `cfg.vavae` names one, else shown as the first 3 latent channels.
    """
    if dist.get_rank() != 0:
        return
    import torchvision

    model = LightningDiT(replace(args, grad_checkpointing=False)).to(dev).eval()
    model.load_state_dict(weights, strict=True)  # the gathered EMA
    classes = min(len(manifest.classes), 10)
    y = torch.arange(classes, device=dev).repeat_interleave(8)
    g = torch.Generator().manual_seed(cfg.seed + 12345)
    x = torch.randn((len(y), *manifest.latent.shape), generator=g).to(dev)
    z = sample_euler(lambda x_, t_: model(x_, t_.expand(len(x_)), y), x, timestep_grid(32, 0.3, device=dev))
    z = z * torch.tensor(manifest.latent.std, device=dev).view(1, -1, 1, 1) + torch.tensor(
        manifest.latent.mean, device=dev
    ).view(1, -1, 1, 1)
    if cfg.vavae:
        images = load_vavae(cfg.vavae).to(dev).eval().decode(z).clamp(-1, 1)
    else:
        images = z[:, :3]
        images = (images - images.amin()) / (images.amax() - images.amin() + 1e-8) * 2 - 1
    grid = torchvision.utils.make_grid((images + 1) / 2, nrow=8, padding=1).clamp(0, 1)
    grid8 = (grid * 255).round().to(torch.uint8).cpu()
    (run_dir / "samples").mkdir(exist_ok=True)
    torchvision.io.write_png(grid8, str(run_dir / "samples" / f"step-{step:08d}.png"))
    logger.images(step, "samples/ema", grid8)
