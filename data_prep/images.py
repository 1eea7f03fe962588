"""Image bytes: checking what an input file really is, and the crops of the reference.

Image shards keep each source image's original encoded bytes; crops happen when reading (DESIGN.md
"Data formats"). `inspect_image` decodes a file fully once at preparation time, so corrupt and
truncated files are skipped there with a reason instead of failing a training job later.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError

# Formats stored as they are, with the member extension the reader decodes.
STORED_FORMATS = {"JPEG": "jpg", "PNG": "png"}
GREYSCALE_MODES = {"1", "L", "LA", "I", "I;16", "F"}


class BadImage(ValueError):
    """An input file that cannot be used; the message is the reason recorded in the manifest."""


@dataclass(frozen=True)
class ImageCheck:
    ext: str
    """Member extension to store the bytes under (`jpg` or `png`, from the content, not the file name)."""
    size: tuple[int, int]
    """(width, height)."""
    note: str | None
    """Why the image needed a conversion when read, if it did: cmyk, greyscale, palette, alpha, png_named_jpeg."""


def inspect_image(data: bytes, filename: str) -> ImageCheck:
    """Decode `data` fully and say how to store it; raise BadImage with the reason if it is unusable."""
    if not data:
        raise BadImage("empty file")
    try:
        with Image.open(io.BytesIO(data)) as im:
            fmt, mode, size = im.format, im.mode, im.size
            im.load()
    except UnidentifiedImageError:
        raise BadImage("not an image (unrecognised format)") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise BadImage(f"corrupt or truncated {fmt if 'fmt' in locals() else 'image'}: {exc}") from None
    if fmt not in STORED_FORMATS:
        raise BadImage(f"format {fmt} is neither JPEG nor PNG")
    note = None
    if mode == "CMYK":
        note = "cmyk"
    elif mode in GREYSCALE_MODES:
        note = "greyscale"
    elif mode == "P":
        note = "palette"
    elif mode in ("RGBA", "PA"):
        note = "alpha"
    if fmt == "PNG" and filename.lower().endswith((".jpeg", ".jpg")):
        note = "png_named_jpeg"
    return ImageCheck(STORED_FORMATS[fmt], size, note)


def decode_rgb(data: bytes | memoryview) -> Image.Image:
    """The image as 8-bit RGB (CMYK, greyscale, palette and alpha images converted)."""
    with Image.open(io.BytesIO(data)) as im:
        return im.convert("RGB")


def center_crop_adm(pil: Image.Image, size: int) -> Image.Image:
    """ADM's center crop (reference §5, `center_crop_arr`): halve with BOX while the short side is at
    least 2·size, BICUBIC-resize the short side to size, then crop the center size×size."""
    while min(pil.size) >= 2 * size:
        pil = pil.resize(tuple(x // 2 for x in pil.size), resample=Image.BOX)
    scale = size / min(pil.size)
    pil = pil.resize(tuple(round(x * scale) for x in pil.size), resample=Image.BICUBIC)
    left, top = (pil.size[0] - size) // 2, (pil.size[1] - size) // 2
    return pil.crop((left, top, left + size, top + size))


def smallest_max_size(pil: Image.Image, size: int) -> Image.Image:
    """albumentations' `SmallestMaxSize(size)` with its default `cv2.INTER_LINEAR` (reference §1.4).

    The new sides are `max(1, round(side · size / short side))` (albumentations 2.0.8,
    `MaxSizeTransform.apply`; an image whose sides do not change is returned as it is). INTER_LINEAR is
    bilinear with half-pixel centres and, unlike PIL's resize, no antialiasing when shrinking: each output
    pixel mixes the 2×2 source pixels around its centre. It is computed here with torch's bilinear
    `interpolate` (align_corners=False, antialias=False) in fp32, rounded to uint8; OpenCV's 11-bit
    fixed-point weights make it differ by at most 1 in a few pixels (tests/test_vavae.py measures it).
    """
    w, h = pil.size
    scale = size / min(w, h)
    new_hw = (max(1, round(h * scale)), max(1, round(w * scale)))
    if new_hw == (h, w):
        return pil
    x = torch.from_numpy(np.asarray(pil, dtype=np.uint8).copy()).permute(2, 0, 1)[None].float()  # (1,3,H,W)
    y = F.interpolate(x, size=new_hw, mode="bilinear", align_corners=False, antialias=False)[0]
    return Image.fromarray(y.round_().clamp_(0, 255).to(torch.uint8).permute(1, 2, 0).numpy())


def random_crop(pil: Image.Image, size: int, u: tuple[float, float]) -> Image.Image:
    """VA-VAE training crop (reference §1.4: albumentations `SmallestMaxSize(size)` then `RandomCrop(size)`).

    The short side is resized to `size` as :func:`smallest_max_size`. The crop's top-left corner is
    `int(u · (free room + 1))` per axis, albumentations' `get_crop_coords` rule, for a pair u of uniforms
    in [0, 1) drawn by the caller from a generator keyed on the sample (data_prep/reader.py), so crops do
    not depend on the world size or the worker count.
    """
    pil = smallest_max_size(pil, size)
    left = int(u[0] * (pil.size[0] - size + 1))
    top = int(u[1] * (pil.size[1] - size + 1))
    return pil.crop((left, top, left + size, top + size))


def to_tensor(pil: Image.Image) -> torch.Tensor:
    """uint8 RGB → float32 (3, H, W) in [-1, 1] (reference: x/127.5 − 1)."""
    arr = np.asarray(pil, dtype=np.uint8)  # (H, W, 3)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div_(127.5).sub_(1.0)
