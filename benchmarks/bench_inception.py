"""Inception feature extraction: images/s of ours (pool + logits + sFID spatial in one forward) next to
torch-fidelity's own extraction loop (pool + logits) on the same images, the same weights and the same device.

    python benchmarks/bench_inception.py [--images 16] [--batch 8] [--size 256] [--weights FILE] [--repeats 1]

Without ``--weights`` the network gets random weights (speed does not depend on them, and no download is
needed). Both sides run torch-fidelity's module with the same weights; ours adds a forward hook and the NHWC
copy of the spatial features and calls the network directly instead of through a DataLoader, so the ratio
printed (ours / torch-fidelity) should be close to 1.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch.utils.data import Dataset
from torch_fidelity.utils import get_featuresdict_from_dataset

from eval.inception import InceptionFeatures, extract_features, random_weights, torch_fidelity_extractor
from models.device import device as current_device


class _Images(Dataset):
    """The uint8 (N, 3, H, W) tensor as the Dataset of uint8 3×H×W tensors torch-fidelity takes."""

    def __init__(self, images: torch.Tensor) -> None:
        self.images = images

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.images[i]


def _best_rate(fn: Callable[[], object], n: int, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return n / best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=16, help="images per timed run")
    parser.add_argument("--batch", type=int, default=8, help="images per forward")
    parser.add_argument(
        "--size", type=int, default=256, help="image side (resized to 299 inside the network)"
    )
    parser.add_argument("--weights", default="", help="Inception weights file (default: random weights)")
    parser.add_argument("--repeats", type=int, default=1, help="timed runs per side; the best is reported")
    args = parser.parse_args()

    dev = current_device()
    images = torch.randint(
        0,
        256,
        (args.images, 3, args.size, args.size),
        dtype=torch.uint8,
        generator=torch.Generator().manual_seed(0),
    )
    with tempfile.TemporaryDirectory() as tmp:
        weights = Path(args.weights) if args.weights else random_weights(Path(tmp) / "inception.pth")
        ours = InceptionFeatures(weights, allow_download=False, device=dev)
        # torch-fidelity's own module, without our hook, holding the same tensors (read without unpickling)
        theirs = torch_fidelity_extractor(ours.net.state_dict(), str(weights)).to(dev)
        cuda = dev.type == "cuda"
        warm = images[: args.batch]
        ours(warm)
        theirs(warm.to(dev))

        rate_ours = _best_rate(lambda: extract_features(ours, images, args.batch), args.images, args.repeats)
        rate_tf = _best_rate(
            lambda: get_featuresdict_from_dataset(
                _Images(images), theirs, args.batch, cuda, save_cpu_ram=True, verbose=False
            ),
            args.images,
            args.repeats,
        )
    print(
        f"device {dev}, {args.images} images {args.size}x{args.size}, batch {args.batch}, "
        f"torch threads {torch.get_num_threads()}"
    )
    print(f"ours (pool+logits+spatial)        {rate_ours:8.2f} images/s")
    print(f"torch-fidelity (pool+logits)      {rate_tf:8.2f} images/s")
    print(f"ratio ours / torch-fidelity       {rate_ours / rate_tf:8.3f}")


if __name__ == "__main__":
    main()
