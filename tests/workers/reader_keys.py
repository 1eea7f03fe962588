"""One rank of the reader tests: the keys of this rank's batches for steps [start, start + n).

usage: reader_keys.py <shard set> <out dir> <start> <n> <workers> <global batch> <streams>
"""

import json
import sys
from pathlib import Path

import torch.distributed as dist

from data_prep.reader import StreamReader, latent_decoder, open_shard_set
from slurm.env import init_distributed, shutdown

folder, out = Path(sys.argv[1]), Path(sys.argv[2])
start, n, workers, global_batch, streams = (int(a) for a in sys.argv[3:8])
init_distributed(timeout_s=60)
manifest = open_shard_set(folder, "latents")
reader = StreamReader(
    folder,
    manifest,
    seed=5,
    global_batch=global_batch,
    streams=streams,
    rank=dist.get_rank(),
    world_size=dist.get_world_size(),
    decode=latent_decoder(),
    workers=workers,
)
steps = {}
for batch in reader.batches(start):
    steps[batch.step] = {"keys": batch.keys, "x0": batch.x[:, 0, 1, 1].tolist(), "size": len(batch.keys)}
    if len(steps) == n:
        break
(out / f"rank{dist.get_rank()}.json").write_text(json.dumps(steps))
shutdown()
