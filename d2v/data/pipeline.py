"""From a dataset to training batches, deterministically. The run reads one stream of samples; the sample at
global position p (the p-th sample the run consumes, counting from 0 over all processes), its mask and its
augmentation are functions of (seed, p) alone. So a run is reproducible and resumable whatever the number of
processes, workers or micro-batches its updates are split into.

A pipeline per modality has: setup(cfg) (reads the data, fills data-dependent model fields),
micro_batch(first, count) (the CPU Batch of positions first .. first + count - 1; may run in DataLoader workers)
and on_device(batch, first) (device-side augmentation of that batch)."""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from d2v.config import PretrainConfig
from d2v.errors import ConfigError, DataError
from d2v.objective import Batch


class SampleOrder:
    """Sample order over epochs: a fresh permutation per epoch, seeded by (seed, epoch)."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed = n, seed
        self._epoch, self._perm = -1, None

    def _permutation(self, epoch: int) -> torch.Tensor:
        if epoch != self._epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._epoch, self._perm = epoch, torch.randperm(self.n, generator=g)
        return self._perm

    def indices(self, start: int, count: int) -> torch.Tensor:
        """Dataset indices of global sample positions start .. start + count - 1."""
        pos = torch.arange(start, start + count)
        out = torch.empty(count, dtype=torch.long)
        for epoch in torch.unique(pos // self.n).tolist():
            sel = (pos // self.n) == epoch
            out[sel] = self._permutation(epoch)[pos[sel] % self.n]
        return out


def rng_for(seed: int, *keys: int) -> np.random.Generator:
    return np.random.default_rng([seed, *keys])


def sample_rngs(seed: int, stream: int, first: int, count: int) -> list[np.random.Generator]:
    """One generator per sample position first .. first + count - 1 for random `stream` (masks, crops, ...)."""
    return [rng_for(seed, stream, p) for p in range(first, first + count)]


def torch_seed(seed: int, first: int) -> int:
    """The torch seed of the micro-batch starting at sample position `first` (dropout, drop-path)."""
    return int(np.random.SeedSequence([seed, 4, first]).generate_state(1, np.uint64)[0])


class VisionPipeline:
    def __init__(self, cfg: PretrainConfig):
        from d2v.data.vision import BUILTIN, load_images, pixel_stats
        from d2v.models.vision import auto_patch_size

        self.cfg = cfg
        split = "train" if cfg.data.source in BUILTIN else "all"  # built-ins keep their test split for probes
        self.dataset = load_images(cfg.data.source, split, cfg.data.image_size, cfg.data.skip_bad_files)
        if len(self.dataset) == 0:
            raise DataError(f"data {cfg.data.source!r} holds no images")
        c, h, _ = self.dataset.shape
        m = cfg.model
        if m.image_size and m.image_size != h:
            raise ConfigError(f"the model expects {m.image_size}px images but the data has {h}px; set --image-size {m.image_size}")
        m.image_size, m.in_chans = h, c
        if m.patch_size <= 0:
            m.patch_size = auto_patch_size(h)
        if h % m.patch_size:
            raise ConfigError(f"patch size {m.patch_size} does not divide the image size {h}; resize with --image-size")
        if m.pixel_mean and len(m.pixel_mean) != c:
            raise ConfigError(f"model.pixel_mean needs one value per channel of the data ({c}), got {len(m.pixel_mean)}")
        if not m.pixel_mean:
            m.pixel_mean, m.pixel_std = pixel_stats(self.dataset)
        self.grid = (h // m.patch_size, h // m.patch_size)
        self.order = SampleOrder(len(self.dataset), cfg.run.seed)

    @property
    def skipped(self) -> int:
        return self.dataset.skipped

    def micro_batch(self, first: int, count: int) -> Batch:
        """The samples at global positions first .. first + count - 1, each with its own block mask."""
        idx = self.order.indices(first, count)
        images = self.dataset.get_batch(idx)  # (B, C, H, W) in [0, 1]
        mask = _masks(self.cfg.mask, self.grid, sample_rngs(self.cfg.run.seed, 1, first, count))
        return Batch(inputs=images, mask=torch.from_numpy(mask))

    def on_device(self, batch: Batch, first: int) -> Batch:
        batch.inputs = random_resized_crop(batch.inputs, self.cfg.data.crop_scale, self.cfg.data.hflip,
                                           sample_rngs(self.cfg.run.seed, 2, first, batch.inputs.shape[0]))
        return batch


def _masks(mc, grid: tuple[int, int], rngs: list[np.random.Generator]) -> np.ndarray:
    """(B, h * w) block masks, the one of sample b drawn from rngs[b]."""
    from d2v.masking import block_masks

    if mc.kind != "block":
        raise ConfigError(f"mask kind {mc.kind!r} is not available for images; use 'block'")
    return np.concatenate([block_masks(1, grid, mc.ratio, rng, mc.min_block, mc.aspect_min) for rng in rngs])


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


def build_pipeline(cfg: PretrainConfig):
    if cfg.modality == "vision":
        return VisionPipeline(cfg)
    if cfg.modality == "text":
        from d2v.data.text import TextPipeline

        return TextPipeline(cfg)
    if cfg.modality == "speech":
        from d2v.data.speech import SpeechPipeline

        return SpeechPipeline(cfg)
    raise ConfigError(f"unknown modality {cfg.modality!r}")


class MicroBatches(torch.utils.data.Dataset):
    """This process's micro-batches of updates first_update, first_update + 1, ... (`updates` of them), in order,
    so a DataLoader can prepare them in worker processes. `plan` (d2v.distributed.BatchPlan) says which sample
    positions each holds. Item i is (first sample position, Batch)."""

    def __init__(self, pipeline, plan, first_update: int, updates: int):
        self.pipeline, self.plan, self.first_update, self.updates = pipeline, plan, first_update, updates

    def __len__(self) -> int:
        return self.updates * self.plan.accum

    def __getitem__(self, i: int) -> tuple[int, Batch]:
        first = self.plan.first(self.first_update + i // self.plan.accum, i % self.plan.accum)
        return first, self.pipeline.micro_batch(first, self.plan.micro)


def collate_one(batch: Batch) -> Batch:
    return batch
