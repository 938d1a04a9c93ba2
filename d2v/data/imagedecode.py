"""Decoding one image file into a square uint8 crop, as a user expects the file to look.

- EXIF orientation is applied (a phone photo stored sideways comes out upright).
- 16-bit and 32-bit modes (I;16*, I) are scaled from 0..65535, float images (F) are taken as 0..1; nothing is
  clipped at 255.
- Transparency (LA, RGBA, palette with transparency) is composited over white; CMYK, YCbCr and palette images
  become RGB; 1-bit images become grayscale.
- The crop box is taken from the original image and resized once (bicubic, antialiased), so a small crop of a large
  image is sharp and a non-square image is never stretched. JPEGs are decoded at a reduced DCT scale (draft mode)
  when the box is at least twice the output size, which is exact enough for training and several times faster.
"""
from __future__ import annotations

import math
from typing import Callable

import numpy as np

GRAY_MODES = {"1", "L", "LA", "La", "I", "F", "I;16", "I;16L", "I;16B", "I;16N"}
_HIGH_BIT = {"I", "I;16", "I;16L", "I;16B", "I;16N"}
_ROTATED = {5, 6, 7, 8}  # EXIF orientations that swap width and height
Box = tuple[float, float, float, float]  # left, top, right, bottom in the oriented image's pixels


def header(src) -> tuple[tuple[int, int], str]:
    """(oriented (width, height), mode) read from the file's header, without decoding pixels."""
    from PIL import Image

    with Image.open(src) as im:
        w, h = im.size
        if _orientation(im) in _ROTATED:
            w, h = h, w
        return (w, h), im.mode


def _orientation(im) -> int:
    try:
        return int(im.getexif().get(0x0112, 1) or 1)
    except Exception:  # a broken EXIF block: show the image as stored
        return 1


def _flatten(im, channels: int):
    """The image in mode L (channels 1) or RGB (3), or F scaled to [0, 1] for high-bit and float sources."""
    from PIL import Image

    mode = im.mode
    if mode in _HIGH_BIT or mode == "F":
        arr = np.asarray(im.convert("I") if mode != "F" else im, dtype=np.float32)
        arr = arr / 65535.0 if mode != "F" else arr
        return Image.fromarray(np.clip(arr, 0.0, 1.0).astype(np.float32), mode="F")
    if mode in ("LA", "La", "PA", "RGBA", "RGBa") or (mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        im = Image.alpha_composite(white, rgba).convert("RGB")
    elif mode not in ("L", "RGB"):
        im = im.convert("RGB")  # CMYK, YCbCr, P, 1, ...
    return im.convert("L" if channels == 1 else "RGB")


def decode(src, channels: int, size: int, box_for: Callable[[int, int], Box], flip: bool = False) -> np.ndarray:
    """(channels, size, size) uint8: the box box_for(width, height) of the upright image, resized to size x size.

    `src` is a path or a binary file object; any decoding failure raises (the caller names the file)."""
    from PIL import Image, ImageOps

    with Image.open(src) as im:
        raw_w, raw_h = im.size
        rotated = _orientation(im) in _ROTATED
        w, h = (raw_h, raw_w) if rotated else (raw_w, raw_h)
        box = box_for(w, h)
        shrink = min(box[2] - box[0], box[3] - box[1]) / size
        if im.format == "JPEG" and shrink >= 2:
            want = (math.ceil(raw_w / shrink), math.ceil(raw_h / shrink))
            im.draft(None, want)  # decodes at 1/2, 1/4 or 1/8 scale, never below `want`
        im = ImageOps.exif_transpose(im)
        sx, sy = im.size[0] / w, im.size[1] / h
        box = (box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy)
        flat = _flatten(im, channels)
        out = flat.resize((size, size), Image.BICUBIC, box=box)
    if out.mode == "F":
        arr = np.asarray(out, dtype=np.float32)
        arr = np.rint(np.clip(arr, 0.0, 1.0) * 255.0).astype(np.uint8)
        arr = arr[..., None].repeat(channels, axis=-1) if channels == 3 else arr
    else:
        arr = np.asarray(out, dtype=np.uint8)
    arr = arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)  # (C, S, S)
    if flip:
        arr = arr[:, :, ::-1]
    return np.ascontiguousarray(arr)


def center_box(w: int, h: int) -> Box:
    """The largest centred square: resizing it is 'shorter side to size, then centre crop'."""
    s = min(w, h)
    left, top = (w - s) / 2, (h - s) / 2
    return (left, top, left + s, top + s)


def random_resized_box(w: int, h: int, scale: tuple[float, float], rng: np.random.Generator,
                       ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> Box:
    """A box covering a random fraction of the area in `scale` with a log-uniform aspect ratio in `ratio`
    (the Inception / torchvision RandomResizedCrop rule: 10 tries, then the centre crop at a clamped ratio)."""
    area = w * h
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(10):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_lo, log_hi))
        cw, ch = math.sqrt(target * aspect), math.sqrt(target / aspect)
        if 0 < cw <= w and 0 < ch <= h:
            left, top = rng.uniform(0, w - cw), rng.uniform(0, h - ch)
            return (left, top, left + cw, top + ch)
    aspect = w / h
    if aspect < ratio[0]:
        cw, ch = w, w / ratio[0]
    elif aspect > ratio[1]:
        cw, ch = h * ratio[1], h
    else:
        cw, ch = w, h
    left, top = (w - cw) / 2, (h - ch) / 2
    return (left, top, left + cw, top + ch)
