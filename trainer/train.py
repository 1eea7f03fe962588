"""`ldit train`: the entry point, dispatching on the config's kind."""

from __future__ import annotations

from trainer.config import TrainCommon, TrainDiTConfig, TrainVAVAEConfig


def run(cfg: TrainCommon) -> None:
    if isinstance(cfg, TrainDiTConfig):
        from trainer.dit import train

        train(cfg)
    elif isinstance(cfg, TrainVAVAEConfig):
        from trainer.vavae import train

        train(cfg)
    else:
        raise TypeError(f"no training loop for {type(cfg).__name__}")
