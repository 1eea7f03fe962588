"""The typed configuration system: typos, wrong types and missing keys fail at start-up, naming the key."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest
from omegaconf import MISSING

from slurm.config import ConfigError, describe, field_docs, help_text, load_config, to_yaml
from trainer.config import TrainDiTConfig


@dataclass
class Optim:
    lr: float = 2e-4
    """Learning rate."""
    betas: tuple[float, float] = (0.9, 0.95)


@dataclass
class Cfg:
    name: str = MISSING
    """Run name."""
    steps: int = 10
    mode: Literal["a", "b"] = "a"
    optim: Optim = field(default_factory=Optim)


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_yaml_and_overrides_merge_in_order(tmp_path):
    f = write(tmp_path, "a.yaml", "name: x\nsteps: 5\noptim:\n  lr: 1.0e-3\n")
    cfg = load_config(Cfg, [f], ["steps=7", "optim.betas=[0.5,0.9]"])
    assert isinstance(cfg, Cfg) and isinstance(cfg.optim, Optim)
    assert (cfg.name, cfg.steps, cfg.optim.lr, cfg.optim.betas) == ("x", 7, 1e-3, (0.5, 0.9))


def test_misspelt_key_in_yaml_names_key_and_file(tmp_path):
    f = write(tmp_path, "bad.yaml", "name: x\noptim:\n  lrr: 1.0\n")
    with pytest.raises(ConfigError) as err:
        load_config(Cfg, [f])
    assert str(err.value) == f"{f}: Key 'lrr' not in 'Optim'. Did you mean: 'lr'? (key: optim.lrr)"


def test_misspelt_key_on_command_line_names_key():
    with pytest.raises(ConfigError) as err:
        load_config(Cfg, [], ["name=x", "stepz=3"])
    assert str(err.value) == "command line: Key 'stepz' not in 'Cfg'. Did you mean: 'steps'? (key: stepz)"


def test_wrong_type_names_key_and_value(tmp_path):
    with pytest.raises(
        ConfigError,
        match=r"command line: Value 'many' of type 'str' could not be converted to Integer \(key: steps\)",
    ):
        load_config(Cfg, [], ["name=x", "steps=many"])
    f = write(tmp_path, "t.yaml", "name: x\nmode: c\n")
    with pytest.raises(
        ConfigError, match=r"t.yaml: Invalid value 'c', expected one of \['a', 'b'\] \(key: mode\)"
    ):
        load_config(Cfg, [f])


def test_missing_required_key_says_how_to_set_it():
    with pytest.raises(ConfigError) as err:
        load_config(Cfg)
    assert (
        str(err.value)
        == "missing required key 'name': set it in a config file or as name=... on the command line"
    )


def test_bad_override_syntax_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="command line: 'steps' is not of the form key=value"):
        load_config(Cfg, [], ["steps"])
    with pytest.raises(ConfigError, match=r"config file .*nope.yaml does not exist"):
        load_config(Cfg, [tmp_path / "nope.yaml"])
    f = write(tmp_path, "list.yaml", "- 1\n- 2\n")
    with pytest.raises(ConfigError, match="the top level must be a mapping of keys, not list"):
        load_config(Cfg, [f])
    f = write(tmp_path, "broken.yaml", "name: [x\n")
    with pytest.raises(ConfigError, match="broken.yaml: not valid YAML"):
        load_config(Cfg, [f])


def test_base_files_merge_first_and_cycles_are_refused(tmp_path):
    write(tmp_path, "base.yaml", "name: base\nsteps: 1\noptim:\n  lr: 0.5\n")
    child = write(tmp_path, "child.yaml", "_base_: base.yaml\nsteps: 2\n")
    cfg = load_config(Cfg, [child])
    assert (cfg.name, cfg.steps, cfg.optim.lr) == ("base", 2, 0.5)
    write(tmp_path, "x.yaml", "_base_: y.yaml\n")
    y = write(tmp_path, "y.yaml", "_base_: x.yaml\n")
    with pytest.raises(ConfigError, match="form a cycle"):
        load_config(Cfg, [y])


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(
        TrainDiTConfig, [], ["run.name=rt", "data.shards=/s", "optim.betas=[0.5,0.9]", "steps=3"]
    )
    path = write(tmp_path, "resolved.yaml", to_yaml(cfg))
    again = load_config(TrainDiTConfig, [path])
    assert again == cfg
    assert again.optim.betas == (0.5, 0.9) and again.steps == 3


def test_cross_field_rule_is_a_config_error():
    with pytest.raises(ConfigError, match=r"data.streams=48 must divide data.global_batch=1024"):
        load_config(TrainDiTConfig, [], ["run.name=r", "data.shards=/s", "data.streams=48"])


def test_every_config_file_in_the_repo_loads():
    from slurm.jobs import JOBS

    root = Path(__file__).resolve().parent.parent / "configs"
    files = sorted(root.rglob("*.yaml"))
    by_folder = {"dit": "train", "vavae": "train", "data": "prep-images", "eval": "eval", "demo": "demo"}
    checked = []
    for f in files:
        if f.parent.name not in by_folder:
            continue
        try:
            JOBS[by_folder[f.parent.name]].load([str(f)], [])
        except ConfigError as exc:  # keys such as src= and out= are meant for the command line
            assert str(exc).startswith("missing required key"), f"{f}: {exc}"
        checked.append(f.name)
    assert "lightningdit_xl1.yaml" in checked and "f16d32_stage3.yaml" in checked and len(checked) >= 9


def test_field_docs_and_describe():
    assert field_docs(Cfg) == {"name": "Run name."}
    assert field_docs(Optim) == {"lr": "Learning rate."}
    rows = list(describe(Cfg))
    assert [r[0] for r in rows] == ["name", "steps", "mode", "optim.lr", "optim.betas"]
    assert rows[2][1] == "{'a', 'b'}" and rows[3][2] == 2e-4 and rows[3][3] == "Learning rate."
    text = help_text(Cfg)
    assert "  name (str) = ??? (required)\n      Run name." in text


def test_every_key_of_every_job_is_documented():
    from slurm.jobs import JOBS

    undocumented = [
        f"{name}: {key}"
        for name, job in JOBS.items()
        for schema in job.schemas.values()
        for key, _, _, doc in describe(schema)
        if not doc
    ]
    assert undocumented == []


def test_reference_recipes_hold_the_papers_numbers():
    """The shipped recipes, loaded as `ldit train` loads them, hold lightningdit.md §3.2 (DiT) and §1.4 (VA-VAE)."""
    import math

    from slurm.jobs import JOBS
    from trainer.config import TrainVAVAEConfig

    configs = Path(__file__).resolve().parent.parent / "configs"

    def load(rel: str):
        return JOBS["train"].load([str(configs / rel)], [])

    for rel, size in (("dit/lightningdit_xl1.yaml", "XL/1"), ("dit/lightningdit_b1.yaml", "B/1"),
                      ("dit/lightningdit_l2.yaml", "L/2")):  # fmt: skip
        cfg = load(rel)  # B and L use the XL hyperparameters (§3.2, issues #20, #96)
        assert isinstance(cfg, TrainDiTConfig) and cfg.model.size == size, rel
        got = (cfg.data.global_batch, cfg.optim.lr, cfg.optim.betas, cfg.optim.weight_decay, cfg.optim.eps,
               cfg.optim.grad_clip, cfg.optim.warmup_steps, cfg.steps, cfg.ema_decay, cfg.t_sampling,
               cfg.cos_loss_weight, cfg.label_dropout, cfg.model.use_qknorm)  # fmt: skip
        assert got == (
            1024,
            2e-4,
            (0.9, 0.95),
            0.0,
            1e-8,
            0.0,
            0,
            80000,
            0.9999,
            "lognorm",
            1.0,
            0.1,
            False,
        ), rel
        assert cfg.precision == "auto" and cfg.kind == "dit", rel  # bf16 on GPUs (§3.2)

    steps_per_epoch = math.ceil(1_281_167 / 256)  # 5005 at the global batch 256 of §1.4
    # (epochs, vf_weight, cos_margin, distmat_margin, disc_start, init_from) of the three released stages
    stages = {
        1: (100, 0.5, 0.0, 0.0, 5001, ""),
        2: (15, 0.1, 0.0, 0.0, 1, "runs/vavae-f16d32-stage1/export/latest"),
        3: (15, 0.1, 0.5, 0.25, 1, "runs/vavae-f16d32-stage2/export/latest"),
    }
    for k, (epochs, vf, m1, m2, disc_start, init_from) in stages.items():
        cfg = load(f"vavae/f16d32_stage{k}.yaml")
        assert isinstance(cfg, TrainVAVAEConfig) and cfg.model == "f16d32"
        loss = cfg.loss
        assert (cfg.steps, loss.vf_weight, loss.cos_margin, loss.distmat_margin, loss.disc_start) == (
            epochs * steps_per_epoch,
            vf,
            m1,
            m2,
            disc_start,
        ), f"stage {k}"
        assert cfg.init_from == init_from and cfg.run.name == f"vavae-f16d32-stage{k}"
        # every stage: Adam 1e-4, betas (0.5, 0.9), no decay, no warmup, no clip, no EMA, fp32, batch 256, 256 px
        assert (cfg.optim.lr, cfg.optim.betas, cfg.optim.weight_decay, cfg.optim.warmup_steps,
                cfg.optim.grad_clip) == (1e-4, (0.5, 0.9), 0.0, 0, 0.0)  # fmt: skip
        assert (cfg.ema_decay, cfg.precision, cfg.data.global_batch, cfg.image_size) == (
            0.0,
            "fp32",
            256,
            256,
        )
        # the loss of §1.3: L1 + 1.0 LPIPS, KL 1e-6, adaptive GAN weight x 0.5, VF against DINOv2
        assert (loss.perceptual_weight, loss.kl_weight, loss.disc_weight, loss.use_vf, loss.foundation) == (
            1.0,
            1e-6,
            0.5,
            True,
            "dinov2",
        )
        assert (loss.proj_fix, loss.disc_start_clock) == (False, "lightning")
