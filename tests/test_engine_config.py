"""The DeepSpeed config the trainer generates (trainer/engine.py): bucket sizes from the model's size."""

from __future__ import annotations

import torch

from trainer.engine import BUCKET_CAP, bucket_elements, deepspeed_config


def test_buckets_hold_the_model_up_to_the_cap():
    """DeepSpeed allocates a whole reduce bucket every micro-step whatever the model: 5e8 elements by default
    (1 GiB in bf16, 1.86 GiB in fp32). Ours holds the model when it is smaller, else 5e7 elements (XL/1's
    675 M parameters: 14 buckets a step); always even (DeepSpeed's all-gather alignment)."""
    assert BUCKET_CAP == 50_000_000
    assert [bucket_elements(n) for n in (1, 2, 1001, 1_234_567, 674_960_000)] == [
        2,
        2,
        1002,
        1_234_568,
        BUCKET_CAP,
    ]
    assert bucket_elements(None) == BUCKET_CAP
    cfg = deepspeed_config(micro_batch=4, grad_accum=2, world_size=2, dtype=torch.bfloat16, grad_clip=0.0,
                           zero_stage=2, trainable_params=12_345)  # fmt: skip
    zero = cfg["zero_optimization"]
    assert (zero["reduce_bucket_size"], zero["allgather_bucket_size"]) == (12_346, 12_346)
    assert cfg["train_batch_size"] == 16 and cfg["data_types"] == {"grad_accum_dtype": "fp32"}
