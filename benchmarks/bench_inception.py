"""Inception feature extraction: images/s of ours (pool + logits + sFID spatial in one forward) next to
torch-fidelity's own extraction loop (pool + logits) on the same images, the same weights and the same
device, interleaved (issue #19).

    python benchmarks/bench_inception.py [--images 16] [--batch 8] [--size 256] [--weights FILE] [--repeats|--steps 1]
                                         [--rounds 3]

Without ``--weights`` the network gets random weights (speed does not depend on them, and no download is
needed). Both sides run torch-fidelity's module with the same weights; ours adds a forward hook and the NHWC
copy of the spatial features and calls the network directly instead of through a DataLoader, so the ratio
printed (ours / torch-fidelity) should be close to 1. Each side runs in a fresh process per round
(benchmarks/_interleave.py: rounds interleaved, order rotated, medians): one warm-up batch, then
``--repeats`` timed runs over all the images (the median run counts).
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from _interleave import (
    ROOT,
    Contender,
    errors,
    python,
    ratio,
    report,
    run_rounds,
    table,
    threads_line,
    values,
)
from torch.utils.data import Dataset

CONTENDERS = ("ours", "torch-fidelity")


class _Images(Dataset):
    """The uint8 (N, 3, H, W) tensor as the Dataset of uint8 3×H×W tensors torch-fidelity takes."""

    def __init__(self, images: torch.Tensor) -> None:
        self.images = images

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.images[i]


def _median_rate(fn: Callable[[], object], n: int, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return n / statistics.median(times)


def contender(a: argparse.Namespace) -> None:
    """One side, in its own process: images/s over all the images."""
    from torch_fidelity.utils import get_featuresdict_from_dataset

    from eval.inception import InceptionFeatures, extract_features, torch_fidelity_extractor
    from models.device import device as current_device
    from models.weights import read_state_dict

    dev = current_device()
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (a.images, 3, a.size, a.size), dtype=torch.uint8, generator=g)
    warm = images[: a.batch]
    if a.contender == "ours":
        ours = InceptionFeatures(Path(a.weights), allow_download=False, device=dev)
        ours(warm)
        rate = _median_rate(lambda: extract_features(ours, images, a.batch), a.images, a.repeats)
    else:  # torch-fidelity's own module, without our hook, holding the same tensors (read without unpickling)
        theirs = torch_fidelity_extractor(read_state_dict(a.weights), a.weights).to(dev)
        theirs(warm.to(dev))
        cuda = dev.type == "cuda"
        data = _Images(images)
        rate = _median_rate(
            lambda: get_featuresdict_from_dataset(
                data, theirs, a.batch, cuda, save_cpu_ram=True, verbose=False
            ),
            a.images,
            a.repeats,
        )
    report({"images_per_s": rate, "device": str(dev)})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=16, help="images per timed run")
    parser.add_argument("--batch", type=int, default=8, help="images per forward")
    parser.add_argument(
        "--size", type=int, default=256, help="image side (resized to 299 inside the network)"
    )
    parser.add_argument("--weights", default="", help="Inception weights file (default: random weights)")
    parser.add_argument(
        "--repeats", "--steps", type=int, default=1, help="timed runs over the images per process (median)"
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--contender", choices=CONTENDERS, help=argparse.SUPPRESS)  # in a contender process
    args = parser.parse_args()
    if args.contender:
        return contender(args)
    from eval.inception import random_weights

    os.chdir(ROOT)
    with tempfile.TemporaryDirectory() as tmp:
        weights = (
            Path(args.weights).resolve() if args.weights else random_weights(Path(tmp) / "inception.pth")
        )
        common = ["--weights", str(weights), "--images", str(args.images), "--batch", str(args.batch),
                  "--size", str(args.size), "--repeats", str(args.repeats)]  # fmt: skip
        cs = [Contender(c, python("bench_inception.py", "--contender", c, *common)) for c in CONTENDERS]
        results = run_rounds(cs, args.rounds)
    device = next((r["device"] for rs in results.values() for r in rs if "device" in r), "?")
    print(f"\ndevice {device}, {args.images} images {args.size}x{args.size}, batch {args.batch}; "
          f"{args.rounds} rounds, order rotated")  # fmt: skip
    rows = {c: values(results, c, "images_per_s") for c in CONTENDERS}
    print(table(rows, baseline="torch-fidelity", unit="images/s"))
    print(threads_line(results))
    print(ratio("ours / torch-fidelity", rows["ours"], rows["torch-fidelity"]))
    for line in errors(results):
        print(line)


if __name__ == "__main__":
    main()
