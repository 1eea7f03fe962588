"""Which checkpoint a run resumes from, and which ones it keeps (no process group needed)."""

from __future__ import annotations

import json
import logging

from trainer.checkpoint import Checkpointer, problems, step_name


def fake(root, step: int, complete: bool = True, files: dict[str, bytes] | None = None) -> None:
    path = root / "checkpoints" / step_name(step)
    path.mkdir(parents=True)
    files = files or {"model/mp_rank_00_model_states.pt": b"x" * 10, "ema.safetensors": b"y" * 4}
    for rel, data in files.items():
        (path / rel).parent.mkdir(parents=True, exist_ok=True)
        (path / rel).write_bytes(data)
    if complete:
        (path / "meta.json").write_text(
            json.dumps({"step": step, "files": {k: len(v) for k, v in files.items()}})
        )


def test_keeps_last_k_and_milestones(tmp_path):
    for s in (10, 20, 30, 40, 50):
        fake(tmp_path, s)
    (tmp_path / "checkpoints" / "latest").write_text(step_name(50))
    Checkpointer(tmp_path, keep_last=2, milestone_every=20).prune()
    assert sorted(p.name for p in (tmp_path / "checkpoints").glob("step-*")) == [
        step_name(s) for s in (20, 40, 50)
    ]


def test_pruning_never_touches_incomplete_or_latest(tmp_path):
    fake(tmp_path, 10)
    fake(tmp_path, 20)
    fake(tmp_path, 30, complete=False)  # being written
    (tmp_path / "checkpoints" / "latest").write_text(step_name(10))
    Checkpointer(tmp_path, keep_last=1).prune()
    assert sorted(p.name for p in (tmp_path / "checkpoints").glob("step-*")) == [
        step_name(s) for s in (10, 20, 30)
    ]


def test_latest_falls_back_to_the_newest_complete_checkpoint(tmp_path, caplog):
    fake(tmp_path, 10)
    fake(tmp_path, 20)
    fake(tmp_path, 30, complete=False)
    (tmp_path / "checkpoints" / "latest").write_text(step_name(20))
    ck = Checkpointer(tmp_path)
    assert ck.latest().step == 20
    # a file of step 20 truncated after the fact: resume from step 10, saying why
    victim = tmp_path / "checkpoints" / step_name(20) / "ema.safetensors"
    victim.write_bytes(b"y")
    with caplog.at_level(logging.WARNING):
        assert ck.latest().step == 10
    assert f"{victim}: 1 bytes, meta.json says 4 (truncated?)" in caplog.text
    assert f"skipping checkpoint {step_name(30)}" in caplog.text
    assert problems(tmp_path / "checkpoints" / step_name(30)) == [
        f"{tmp_path / 'checkpoints' / step_name(30)}: no meta.json (the save did not finish)"
    ]


def test_no_checkpoint_means_a_fresh_run(tmp_path):
    assert Checkpointer(tmp_path).latest() is None
