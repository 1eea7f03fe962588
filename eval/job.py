"""`ldit eval`: the shared machinery of the evaluation jobs, and the entry point that picks the evaluation.

Determinism (STYLE.md 11). Work is cut into *items* whose composition never depends on the world size: a
batch of samples [k·B, (k+1)·B) for generation, a shard (cut into fixed batches of its own samples) for
image shard sets. Items are dealt round-robin to ranks and processed in rounds of W; after each round the
ranks' per-row outputs (Inception features, images, per-image metrics) are gathered to rank 0, which
consumes them in global item order. Two reasons, both measured by the author of ``eval/metrics.py``: CPU
Inception features change by ~1e-4 with batch composition, and float64 sums merged across ranks change
their last bits with the world size. So every feature is computed in the same batch at any world size, and
every sum and mean is taken on rank 0 in the same order: ``metrics.json`` is the same, byte for byte, on 1
or 64 ranks (given the same device type and thread count, which also change the last bits of a forward).

A gather per round keeps rank 0's memory bounded (FID statistics are accumulated as they arrive) and lets
it stream the samples into an ADM ``.npz``. The metric math is ``eval/metrics.py`` and
``eval/recon_metrics.py``; the Inception is ``eval/inception.py`` (torch-fidelity's network).

Outputs of an evaluation, in ``<run>/eval/<name>/``: ``metrics.json`` (written last: sorted keys, floats as
Python's shortest round-trip repr, non-finite values as strings, no timestamps), ``timing.json`` (wall
time, images/s, world size: not deterministic, so kept apart), and optionally ``samples.npz`` and
``grid.png``. A rerun that finds ``metrics.json`` prints it and exits.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import zipfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from omegaconf import OmegaConf
from tqdm import tqdm

from eval.config import EvalConfig
from eval.inception import WEIGHTS_FILE
from models.device import device
from models.export import META, read_meta
from trainer.checkpoint import step_name
from trainer.config import TRAIN_KINDS, TrainCommon

METRICS = "metrics.json"
TIMING = "timing.json"
SAMPLES = "samples.npz"
GRID = "grid.png"

Outputs = dict[str, torch.Tensor]
"""Per-row outputs of one item, e.g. {"pool": (n, 2048) float32, "images": (n, H, W, 3) uint8}."""
Spec = dict[str, tuple[tuple[int, ...], torch.dtype]]
"""Shape of one row (without the row dimension) and dtype of each output key."""


class EvalInputError(ValueError):
    """A bad input of an eval job (missing export, reference or file); the message says which and what to do.

    Defined here, not taken from slurm.config, because eval sits below the launcher (DESIGN.md imports)."""


def index_seed(*parts: object) -> int:
    """A 63-bit seed that is a function of its parts only (e.g. (seed, "noise", global index))."""
    digest = hashlib.sha256("/".join(str(p) for p in ("ldit-eval", *parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def comm_device() -> torch.device:
    """Where gathered tensors live: the GPU under nccl, the CPU under gloo."""
    return device() if dist.get_backend() == "nccl" else torch.device("cpu")


def run_rounds(
    rows: Sequence[dict[str, int]],
    spec: Spec,
    compute: Callable[[int], Outputs],
    consume: Callable[[int, Outputs], None],
    bar: tqdm | None = None,
    images: Callable[[int], int] | None = None,
) -> None:
    """Compute items round-robin over ranks and hand their outputs to rank 0 in global item order.

    ``rows[i][key]`` is how many rows item i yields for ``key`` (known on every rank beforehand, so a rank
    with no item in the last round can still take part in the gather); ``compute(i)`` runs on the rank that
    owns item i (i mod W) and returns those rows; ``consume(i, outputs)`` runs on rank 0, for i = 0, 1, 2, ...
    Each round is one padded ``dist.gather`` per key. ``images(i)`` (default: the rows of the first key)
    advances the progress bar.
    """
    rank, world = dist.get_rank(), dist.get_world_size()
    dev = comm_device()
    for start in range(0, len(rows), world):
        items = list(range(start, min(start + world, len(rows))))
        mine = start + rank
        out = compute(mine) if mine < len(rows) else None
        gathered: dict[str, list[torch.Tensor] | None] = {}
        for key, (tail, dtype) in spec.items():
            n = max(rows[i][key] for i in items)
            if n == 0:  # every rank knows it: no collective needed
                gathered[key] = [torch.zeros((0, *tail), dtype=dtype)] * world if rank == 0 else None
                continue
            buf = torch.zeros((n, *tail), dtype=dtype, device=dev)
            if out is not None:
                got = out[key]
                if tuple(got.shape) != (rows[mine][key], *tail):
                    raise RuntimeError(
                        f"item {mine} gave {key} of shape {tuple(got.shape)}, expected {(rows[mine][key], *tail)}"
                    )
                buf[: got.shape[0]] = got.to(dev)
            parts = [torch.empty_like(buf) for _ in range(world)] if rank == 0 else None
            dist.gather(buf, parts, dst=0)
            gathered[key] = parts
        if rank == 0:
            for j, i in enumerate(items):
                consume(i, {k: v[j][: rows[i][k]].cpu() for k, v in gathered.items() if v is not None})
                if bar is not None:
                    bar.update(images(i) if images else rows[i][next(iter(spec))])


class NpzWriter:
    """Streams ``arr_0`` (N, H, W, 3) uint8 into an ADM-format ``.npz`` without holding all of it in memory.

    ``np.savez`` would need the whole array (50k 256² images are 9.8 GB) and stamps the zip members with
    the current time; this writes one stored (uncompressed, zip64) member with a fixed 1980-01-01 time, so
    the same samples give the same file bytes. ``np.load(path)["arr_0"]`` reads it as usual.
    """

    def __init__(self, path: str | Path, shape: tuple[int, ...]) -> None:
        self.path, self.shape, self.written = Path(path), shape, 0
        self.tmp = self.path.with_name(self.path.name + ".tmp")
        self.zf = zipfile.ZipFile(self.tmp, "w", compression=zipfile.ZIP_STORED, allowZip64=True)
        info = zipfile.ZipInfo("arr_0.npy", date_time=(1980, 1, 1, 0, 0, 0))
        self.fh = self.zf.open(info, "w", force_zip64=True)
        header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)), "fortran_order": False}
        np.lib.format.write_array_header_1_0(self.fh, {**header, "shape": shape})

    def write(self, rows: np.ndarray) -> None:
        if rows.dtype != np.uint8 or rows.shape[1:] != self.shape[1:]:
            raise ValueError(f"rows {rows.shape} {rows.dtype} do not fit arr_0 {self.shape} uint8")
        self.fh.write(np.ascontiguousarray(rows).tobytes())
        self.written += rows.shape[0]

    def close(self) -> Path:
        self.fh.close()
        self.zf.close()
        if self.written != self.shape[0]:
            raise RuntimeError(f"{self.path}: wrote {self.written} of {self.shape[0]} rows")
        os.replace(self.tmp, self.path)
        return self.path


def jsonable(obj: Any) -> Any:
    """Floats stay floats (shortest repr); inf/nan become the strings "inf"/"-inf"/"nan" (strict JSON)."""
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [jsonable(v) for v in obj]
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    return obj


def json_text(obj: Any) -> str:
    """Deterministic JSON: sorted keys, indent 1, trailing newline."""
    return json.dumps(jsonable(obj), sort_keys=True, indent=1, allow_nan=False) + "\n"


def write_atomic(path: Path, data: str | bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data.encode() if isinstance(data, str) else data)
    os.replace(tmp, path)


def num(x: float) -> str:
    """A number as it appears in an evaluation name: the shortest form that reads back the same (10, 0.125)."""
    return f"{x:g}" if float(f"{x:g}") == x else repr(float(x))


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(1 << 22):
            h.update(block)
    return h.hexdigest()


def inception_doc(weights: str) -> dict[str, str]:
    """How the Inception weights were given, for metrics.json (the file's sha256 when it is a local file)."""
    if weights:
        return {"weights": weights, "sha256": sha256_file(weights)}
    return {"weights": f"torch-fidelity download ({WEIGHTS_FILE})", "sha256": ""}


def resolve_export(cfg: EvalConfig) -> tuple[Path, int]:
    """The export folder `<run>/export/step-N` (or the one `latest` points to) and its step."""
    root = cfg.run.dir / "export"
    folder = root / ("latest" if cfg.step < 0 else step_name(cfg.step))
    if not (folder / META).is_file():
        have = sorted(p.name for p in root.glob("step-*")) if root.is_dir() else []
        raise EvalInputError(
            f"run.name={cfg.run.name}: no export {folder} (exports: {', '.join(have) or 'none'}); "
            "write one with `ldit export` or pick another step="
        )
    folder = folder.resolve()
    try:
        step = int(folder.name.removeprefix("step-"))
    except ValueError:
        raise EvalInputError(f"export folder {folder} is not named step-N") from None
    return folder, step


def in_run(folder: Path, cfg: EvalConfig) -> str:
    """The export folder relative to the run directory (`export/step-N`), so a moved run reads the same."""
    run_dir = cfg.run.dir.resolve()
    return str(folder.relative_to(run_dir)) if folder.is_relative_to(run_dir) else str(folder)


def export_run_config(folder: Path) -> TrainCommon | None:
    """The training config saved with an export (`config.yaml`), typed by its kind; None if absent."""
    path = folder / "config.yaml"
    if not path.is_file():
        return None
    data = OmegaConf.load(path)
    kind = data.get("kind")
    if kind not in TRAIN_KINDS:
        raise EvalInputError(f"{path}: kind {kind!r} is not one of {', '.join(TRAIN_KINDS)}")
    merged = OmegaConf.merge(OmegaConf.structured(TRAIN_KINDS[kind]), data)
    return OmegaConf.to_object(merged)  # type: ignore[return-value]


def check_file(value: str, key: str, what: str) -> Path:
    """A config value that must name an existing file; a EvalInputError naming the key otherwise."""
    if not value:
        raise EvalInputError(f"{key} is required: {what}")
    p = Path(value).expanduser()
    if not p.is_file():
        raise EvalInputError(f"{key}={value} does not exist ({what})")
    return p


def already_done(out_dir: Path) -> bool:
    """True (after printing it on rank 0) when `metrics.json` exists: the evaluation is not redone."""
    path = out_dir / METRICS
    if not path.is_file():
        return False
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(f"eval: {path} exists; not redoing it\n{path.read_text()}", end="", flush=True)
    return True


def log_tensorboard(run_dir: Path, tag: str, step: int, metrics: dict[str, float | None]) -> None:
    """Scalars `eval/<tag>/<metric>` at the export's step (rank 0)."""
    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(str(run_dir / "tb")) as tb:
        for k, v in metrics.items():
            if v is not None and math.isfinite(v):
                tb.add_scalar(f"eval/{tag}/{k}", v, step)


def write_grid(path: Path, images: np.ndarray) -> None:
    """uint8 (N, H, W, 3) images as a PNG grid, 8 per row, 1-px padding."""
    import torchvision

    grid = torchvision.utils.make_grid(torch.from_numpy(images).permute(0, 3, 1, 2), nrow=8, padding=1)
    torchvision.io.write_png(grid, str(path))


def run(cfg: EvalConfig) -> Path:
    """`ldit eval`: sample + FID of a LightningDiT export, or reconstruction metrics of a VA-VAE export.

    Returns the output folder `<run>/eval/<name>` (on every rank; rank 0 wrote it)."""
    folder, step = resolve_export(cfg)
    kind, _ = read_meta(folder)
    if kind == "lightningdit":
        from eval.sample_fid import evaluate_dit

        return evaluate_dit(cfg, folder, step)
    from eval.recon import evaluate_vavae

    return evaluate_vavae(cfg, folder, step)
