"""One rank of the EMA probe: the trainer's engine and sharded EMA, with two reference EMAs kept alongside.

Usage: ema_probe.py OUT KIND PRECISION STEPS DECAY LR [LOAD | unseeded]   (KIND: dit | vavae; PRECISION: fp32 | bf16)

The engine is built by the trainer's own functions (`deepspeed_config`, `build_engine`) and averaged by
the trainer's `ShardedEMA`, as trainer/dit.py and trainer/vavae.py do. Alongside, every applied step:
- `master`: an EMA of the whole fp32 master weights, read parameter by parameter with DeepSpeed's own
  `safe_get_full_fp32_param` (independent of the sharded EMA's partition arithmetic);
- `module`: today's `models.ema.EMA` updated from the engine's module (bf16 under bf16).
Unless `unseeded`, the fp32 master partitions of every trainable parameter are first seeded with the exact
fp32 weights, as the trainer does on a fresh start (`master_vs_init` in the result: DeepSpeed's whole fp32
master against them, the VA-VAE's projection included).
Rank 0 writes OUT/result.json: the largest differences of the sharded EMA to each reference, and the
EMA bytes per rank; and OUT/ema.safetensors, the gathered EMA. With LOAD (an ema.safetensors written at any
world size) the sharded EMA first takes its partition from that file. The model is the tiny DiT (T/1) or the "digits" autoencoder inside a module that also
holds a projection (as the VA-VAE's AE engine does), so the prefix selection is exercised.
"""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from torch import nn

from models.ema import EMA
from models.lightningdit import LightningDiT, lightningdit_args
from models.vavae import AutoencoderKL, autoencoder_args
from slurm.env import init_distributed, shutdown
from trainer.engine import build_engine, deepspeed_config, import_deepspeed
from trainer.sharded_ema import ShardedEMA, fp32_snapshot, seed_fp32_master

out, kind, precision = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
steps, decay, lr = int(sys.argv[4]), float(sys.argv[5]), float(sys.argv[6])
env = init_distributed(timeout_s=300)
deepspeed = import_deepspeed()
dtype = torch.bfloat16 if precision == "bf16" else torch.float32
micro = 2


class AEWithProjection(nn.Module):
    """The autoencoder plus a trained projection of z, as in the VA-VAE's AE engine (only the AE is averaged)."""

    def __init__(self) -> None:
        super().__init__()
        self.autoencoder = AutoencoderKL(autoencoder_args("digits"))
        self.linear_proj = nn.Conv2d(self.autoencoder.args.embed_dim, 8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ae = self.autoencoder
        moments = ae.quant_conv(ae.encoder(x.to(ae.encoder.conv_in.weight.dtype)))  # (B, 2C, h, w)
        z = moments[:, : ae.args.embed_dim]
        xrec = ae.decode(z).float()
        return (xrec - x).abs().mean() + 0.01 * self.linear_proj(z).float().pow(2).mean()


torch.manual_seed(0)
if kind == "dit":
    module: nn.Module = LightningDiT(lightningdit_args("T/1", input_size=4, in_channels=4, num_classes=3))
    averaged, prefix = module, ""
else:
    module = AEWithProjection()
    averaged, prefix = module.autoencoder, "autoencoder."
whole = fp32_snapshot(module)  # every trainable parameter of the engine, as the trainer snapshots it
init = {k.removeprefix(prefix): v for k, v in whole.items() if k.startswith(prefix)}
today = EMA(averaged, decay)  # what the trainer did before: fp32 average of the module's parameters
ds_config = deepspeed_config(
    micro_batch=micro, grad_accum=1, world_size=env.world_size, dtype=dtype, grad_clip=0.0, zero_stage=2
)
params = [p for p in module.parameters() if p.requires_grad]
engine = build_engine(
    module, params, lr=lr, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0, warmup_steps=0, ds_config=ds_config
)
ema = ShardedEMA(engine, init, decay, prefix)
seeded = "unseeded" not in sys.argv[7:]
if seeded:
    seed_fp32_master(engine, whole)  # as the trainer does on a fresh start
trained = {n.removeprefix(prefix): p for n, p in engine.module.named_parameters() if n.startswith(prefix)}
trained = {n: p for n, p in trained.items() if p.requires_grad}
master_vs_init = max(  # DeepSpeed's own read of the whole fp32 master, before any step: every trainable
    (deepspeed.utils.safe_get_full_fp32_param(p).view(p.shape) - whole[n]).abs().max().item()  # parameter
    for n, p in engine.module.named_parameters()  # (the VA-VAE's projection too, outside the EMA's prefix)
    if p.requires_grad
)
if len(sys.argv) > 7 and sys.argv[7] != "unseeded":
    ema.load_state_dict(load_file(sys.argv[7]))
master = {n: init[n].clone() for n in trained}

for step in range(steps):
    g = torch.Generator().manual_seed(1000 * step + env.rank)
    if kind == "dit":
        x = torch.randn(micro, 4, 4, 4, generator=g)
        t = torch.rand(micro, generator=g)
        y = torch.randint(0, 3, (micro,), generator=g)
        loss = (engine(x.to(dtype), t, y).float() - x.flip(1)).pow(2).mean()
    else:
        loss = engine(torch.rand(micro, 3, 32, 32, generator=g) * 2 - 1)
    engine.backward(loss)
    engine.step()
    if engine.was_step_applied():
        ema.update()
        today.update(averaged)
        for n, p in trained.items():
            full = deepspeed.utils.safe_get_full_fp32_param(p)  # a collective over the ZeRO partitions
            master[n].mul_(decay).add_(full.view(p.shape), alpha=1.0 - decay)

got = ema.state_dict(dst=None)  # on every rank (all_gather_into_tensor)
on_rank0 = ema.state_dict()  # the trainer's: gathered to rank 0 only
if env.rank == 0:
    assert list(on_rank0) == list(got) and all(torch.equal(on_rank0[k], got[k]) for k in got)
else:
    assert on_rank0 is None
moved = max((master[n] - init[n]).abs().max().item() for n in trained) if steps else 0.0
vs_master = max((got[n] - master[n]).abs().max().item() for n in trained)
scale = max(master[n].abs().max().item() for n in trained)
vs_module = max((got[n] - today.params[n]).abs().max().item() for n in trained)
frozen_vs_module = max(
    [(got[n] - today.params[n]).abs().max().item() for n in today.params if n not in trained] or [0.0]
)
if env.rank == 0:
    result = {
        "world_size": env.world_size, "ema_bytes": ema.nbytes(), "moved": moved, "scale": scale,
        "vs_master": vs_master, "vs_module": vs_module, "frozen_vs_module": frozen_vs_module,
        "master_vs_init": master_vs_init,
        "bitwise_vs_module": all(torch.equal(got[n], today.params[n]) for n in today.params),
        "keys": list(got), "reference_keys": list(today.state_dict()),
    }  # fmt: skip
    (out / "result.json").write_text(json.dumps(result))
    save_file({k: v.contiguous() for k, v in got.items()}, str(out / "ema.safetensors"))
dist.barrier()
del engine, ema  # freed before the group is torn down (slurm.env.shutdown)
shutdown()
