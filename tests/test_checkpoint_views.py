"""One checkpoint choice for all ranks, and meta.json sizes from the ranks that wrote the files (issue #17).

A shared file system whose views lag is reproduced with real separate folders: rank 0 reads and writes
`view0/checkpoints`, rank 1 `view1/checkpoints`, a tree of symlinks to rank 0's files in which a lagging
node's view lacks what it has not seen yet. Two real processes (gloo), real DeepSpeed engines.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from slurm.env import child_env, free_port
from tests.conftest import ROOT, clean_env
from tests.test_checkpoint import fake
from trainer.checkpoint import step_name

WORKER = """
import json, sys
from pathlib import Path
from slurm.env import init_distributed, shutdown
import torch.distributed as dist
from trainer.checkpoint import Checkpointer

what, views = sys.argv[1], sys.argv[2:]
init_distributed(timeout_s=60)
rank = dist.get_rank()
ckpts = Checkpointer(views[rank])
if what == "resume":
    try:
        ck = ckpts.agreed_latest()
        print("CHOSE", None if ck is None else ck.path.name, flush=True)
    except Exception as exc:
        print(f"ERROR {type(exc).__name__}: {exc}", flush=True)
else:  # save one step of a tiny real DeepSpeed engine
    import torch
    from trainer.engine import build_engine, deepspeed_config

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.Linear(64, 4))
    cfg = deepspeed_config(micro_batch=2, grad_accum=1, world_size=2, dtype=torch.float32, grad_clip=0.0,
                           zero_stage=2, load_universal=False)
    engine = build_engine(model, list(model.parameters()), lr=1e-3, betas=(0.9, 0.95), eps=1e-8,
                          weight_decay=0.0, warmup_steps=0, ds_config=cfg)
    engine.backward(engine(torch.randn(2, 16)).square().mean())
    engine.step()
    ckpts.save(1, {"model": engine}, {"w": torch.zeros(3)}, {"world_size": 2})
    print("SAVED", flush=True)
    del engine, model  # freed before the group is torn down (slurm.env.shutdown)
shutdown()
"""


def run_ranks(what: str, views: list[Path]) -> list[str]:
    """Run WORKER as 2 ranks, rank r on `views[r]`; each rank's output."""
    port = free_port()
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", WORKER, what, *map(str, views)],
            cwd=ROOT,
            env=child_env(r, 2, port, base=clean_env()),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )  # fmt: skip
        for r in range(2)
    ]
    outs = [p.communicate(timeout=180)[0] for p in procs]
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-3000:]
    return outs


def mirror(src: Path, dst: Path, hide: set[str] = frozenset()) -> None:
    """`dst` as another node's view of `src`: the same tree, each file a symlink, without the files `hide`
    (paths relative to `src`)."""
    for f in sorted(src.rglob("*")):
        rel = f.relative_to(src)
        if f.is_file() and str(rel) not in hide:
            (dst / rel).parent.mkdir(parents=True, exist_ok=True)
            (dst / rel).symlink_to(f)


@pytest.fixture
def two_checkpoints(tmp_path) -> Path:
    """view0: complete checkpoints of steps 2 and 4, `latest` naming step 4."""
    view0 = tmp_path / "view0"
    fake(view0, 2)
    fake(view0, 4)
    (view0 / "checkpoints" / "latest").write_text(step_name(4))
    return view0


def test_a_rank_that_cannot_see_the_newest_checkpoint_stops_every_rank(two_checkpoints, tmp_path):
    view1 = tmp_path / "view1"
    hidden = f"checkpoints/{step_name(4)}/model/mp_rank_00_model_states.pt"
    mirror(two_checkpoints, view1, hide={hidden})
    (view1 / "checkpoints" / "latest").unlink()
    (view1 / "checkpoints" / "latest").write_text(step_name(2))  # its pointer lags too
    outs = run_ranks("resume", [two_checkpoints, view1])
    for out in outs:
        line = next(x for x in out.splitlines() if x.startswith(("CHOSE", "ERROR")))
        assert line == (
            f"ERROR CheckpointViewError: rank 0 chose checkpoint {step_name(4)} to resume from, but 1 rank(s) "
            "cannot see it complete:"
        ), out[-2000:]
        assert f"  rank 1: {view1 / hidden}: missing\nevery rank stopped before loading anything." in out
        assert "start the job again once every node sees the files" in out


def test_ranks_whose_latest_pointers_differ_load_rank_0s_choice(two_checkpoints, tmp_path):
    """Rank 1's `latest` still names step 2, but it sees step 4 complete: both ranks resume from step 4."""
    view1 = tmp_path / "view1"
    mirror(two_checkpoints, view1, hide={"checkpoints/latest"})
    (view1 / "checkpoints" / "latest").write_text(step_name(2))
    outs = run_ranks("resume", [two_checkpoints, view1])
    assert [next(x for x in out.splitlines() if x.startswith(("CHOSE", "ERROR"))) for out in outs] == [
        f"CHOSE {step_name(4)}",
        f"CHOSE {step_name(4)}",
    ], outs


def test_meta_sizes_come_from_the_ranks_that_wrote_the_files(tmp_path):
    """Rank 1 writes into a view rank 0 cannot see yet: meta.json still lists rank 1's files, with the sizes
    rank 1 saw, and nothing else than what the ranks wrote."""
    views = [tmp_path / "view0", tmp_path / "view1"]
    run_ranks("save", views)
    path0, path1 = (v / "checkpoints" / step_name(1) for v in views)
    files = json.loads((path0 / "meta.json").read_text())["files"]
    written = {
        str(f.relative_to(p)): f.stat().st_size
        for p in (path0, path1)
        for f in p.rglob("*")
        if f.is_file() and f.name != "meta.json" and f.suffix != ".py"  # DeepSpeed's recovery scripts
    }
    assert files == written
    assert set(files) == {
        "ema.safetensors", "rng-rank0.pt", "rng-rank1.pt", "model/mp_rank_00_model_states.pt",
        "model/zero_pp_rank_0_mp_rank_00_optim_states.pt", "model/zero_pp_rank_1_mp_rank_00_optim_states.pt",
    }  # fmt: skip
    assert (path1 / "rng-rank1.pt").is_file() and not (path0 / "rng-rank1.pt").exists()
