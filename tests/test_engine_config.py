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


def test_the_step_pays_only_for_checks_it_uses():
    """nonfinite=stop without clipping: no gradient norm and no overflow scan per step (the loop turns the
    norm on for log steps); clipping needs the norm; nonfinite=skip needs DeepSpeed's own checks; no
    overlap_comm on the CPU (no side streams there)."""

    def zero_and_bf16(**kw):
        cfg = deepspeed_config(micro_batch=4, grad_accum=1, world_size=2, dtype=torch.bfloat16, zero_stage=2,
                               trainable_params=1000, **kw)  # fmt: skip
        return cfg["zero_optimization"]["compute_grad_norm"], cfg["bf16"]["check_grad_overflow"]

    assert zero_and_bf16(grad_clip=0.0, nonfinite="stop") == (False, False)
    assert zero_and_bf16(grad_clip=1.0, nonfinite="stop") == (True, False)
    assert zero_and_bf16(grad_clip=0.0, nonfinite="skip") == (True, True)
    stage0 = deepspeed_config(micro_batch=4, grad_accum=1, world_size=1, dtype=torch.float32, grad_clip=0.0,
                              zero_stage=0)  # fmt: skip
    assert "compute_grad_norm" not in stage0["zero_optimization"]  # DeepSpeed refuses the key below stage 1
    stage1 = deepspeed_config(micro_batch=4, grad_accum=1, world_size=1, dtype=torch.bfloat16, grad_clip=0.0,
                              zero_stage=1)  # fmt: skip
    assert "compute_grad_norm" not in stage1["zero_optimization"]  # its BF16 optimizer refuses it off
    assert stage0["zero_optimization"]["overlap_comm"] is False  # CPU here
