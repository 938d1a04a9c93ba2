"""Image augmentation of a batch on its device, one parameter draw per sample from that sample's generator."""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F


def random_resized_crop(images: torch.Tensor, scale: tuple[float, float], hflip: bool,
                        rngs: np.random.Generator | list[np.random.Generator]) -> torch.Tensor:
    """Per-sample random crop (area fraction in `scale`, aspect in [3/4, 4/3]) resized back, and optional flip.

    Batched on the images' device with one grid_sample; the parameters of sample b come from rngs[b] (or, given
    one generator, from it for every sample in turn).
    """
    B = images.shape[0]
    if tuple(scale) == (1.0, 1.0) and not hflip:
        return images
    if isinstance(rngs, np.random.Generator):
        rngs = [rngs] * B
    draws = np.array([[rng.uniform(scale[0], scale[1]), rng.uniform(math.log(3 / 4), math.log(4 / 3)),
                       rng.uniform(-1, 1), rng.uniform(-1, 1), rng.random()] for rng in rngs]).reshape(B, 5)
    area, log_ratio, ux, uy, coin = draws.T
    w = np.minimum(np.sqrt(area * np.exp(log_ratio)), 1.0)  # fraction of the width kept
    h = np.minimum(np.sqrt(area / np.exp(log_ratio)), 1.0)
    cx = ux * (1 - w)
    cy = uy * (1 - h)
    flip = np.where(coin < 0.5, -1.0, 1.0) if hflip else np.ones(B)
    theta = np.zeros((B, 2, 3), dtype=np.float32)
    theta[:, 0, 0], theta[:, 0, 2] = w * flip, cx
    theta[:, 1, 1], theta[:, 1, 2] = h, cy
    theta = torch.from_numpy(theta).to(images.device, images.dtype)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)


def color_jitter(images: torch.Tensor, strength: float,
                 rngs: np.random.Generator | list[np.random.Generator]) -> torch.Tensor:
    """Per-sample brightness, contrast and saturation (in that order), each a factor in [1 - strength,
    1 + strength] drawn from rngs[b] (or one generator for every sample in turn); images (B, C, H, W) in [0, 1],
    on their device. Grayscale images get no saturation change."""
    B, C = images.shape[:2]
    if isinstance(rngs, np.random.Generator):
        rngs = [rngs] * B
    draws = np.array([rng.uniform(1 - strength, 1 + strength, 3) for rng in rngs]).T.reshape(3, B, 1, 1, 1)
    f = torch.from_numpy(draws).to(images.device, images.dtype)
    luma = torch.tensor([0.299, 0.587, 0.114], device=images.device, dtype=images.dtype).view(1, 3, 1, 1)
    gray = (lambda x: (x * luma).sum(1, keepdim=True)) if C == 3 else (lambda x: x)  # noqa: E731
    x = (images * f[0]).clamp(0, 1)
    mean = gray(x).mean(dim=(1, 2, 3), keepdim=True)
    x = ((x - mean) * f[1] + mean).clamp(0, 1)
    if C == 3:
        g = gray(x)
        x = ((x - g) * f[2] + g).clamp(0, 1)
    return x
