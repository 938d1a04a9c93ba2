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
    """In-memory images are batched whole and cropped on the device (one grid_sample); image files are decoded and
    cropped from their original resolution in micro_batch, i.e. in DataLoader workers."""

    def __init__(self, cfg: PretrainConfig, run_dir=None):
        from d2v.data.vision import BUILTIN, FileImages, load_images, pixel_stats
        from d2v.models.vision import auto_patch_size

        self.cfg = cfg
        split = "train" if cfg.data.source in BUILTIN else "all"  # built-ins keep their test split for probes
        self.dataset = load_images(cfg.data.source, split, cfg.data.image_size, cfg.data.skip_bad_files,
                                   run_dir=run_dir)
        self.files = self.reads_files = isinstance(self.dataset, FileImages)
        if len(self.dataset) == 0:
            raise DataError(f"data {cfg.data.source!r} holds no images")
        c, h, _ = self.dataset.shape
        m = cfg.model
        if m.image_size and m.image_size != h:
            raise ConfigError(f"the model expects {m.image_size}px images but the data has {h}px; "
                              f"set --image-size {m.image_size}")
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
        """The samples at global positions first .. first + count - 1, each with its own block mask (and, for
        image files, its own crop of the original image, decoded here, i.e. in a DataLoader worker)."""
        idx = self.order.indices(first, count)
        if self.files:  # (B, C, H, W) uint8, cropped from the originals; one rng per sample position
            d = self.cfg.data
            images = self.dataset.train_batch(idx, d.crop_scale, d.hflip,
                                              sample_rngs(self.cfg.run.seed, 2, first, count))
        else:
            images = self.dataset.get_batch(idx)  # (B, C, H, W) in [0, 1]
        clones = self.cfg.mask.clones if self.cfg.recipe == "v2" else 1
        mask = _masks(self.cfg.mask, self.grid, sample_rngs(self.cfg.run.seed, 1, first, count), clones)
        return make_batch(self.cfg, first, inputs=images, mask=mask)

    def run_files(self) -> dict[str, bytes]:
        """The list of image files, kept in the run directory so a resumed run reads the same samples."""
        from d2v.data.sources import MANIFEST_NAME

        return {MANIFEST_NAME: self.dataset.samples.to_manifest()} if self.files else {}

    def on_device(self, batch: Batch, first: int) -> Batch:
        d, B = self.cfg.data, batch.inputs.shape[0]
        if self.files:  # already cropped in micro_batch
            batch.inputs = batch.inputs.float() / 255.0
        else:
            batch.inputs = random_resized_crop(batch.inputs, d.crop_scale, d.hflip,
                                               sample_rngs(self.cfg.run.seed, 2, first, B))
        if d.color_jitter > 0:
            batch.inputs = color_jitter(batch.inputs, d.color_jitter, sample_rngs(self.cfg.run.seed, 5, first, B))
        return batch


def _masks(mc, grid: tuple[int, int], rngs: list[np.random.Generator], clones: int = 1) -> np.ndarray:
    """(B * clones, h * w) masks, the `clones` of sample b drawn from rngs[b]: BEiT blocks ("block") or data2vec
    2.0's inverse blocks ("inverse_block")."""
    from d2v.masking import block_masks, inverse_block_masks

    if mc.kind == "block":
        return np.concatenate([block_masks(clones, grid, mc.ratio, rng, mc.min_block, mc.aspect_min) for rng in rngs])
    if mc.kind == "inverse_block":
        return np.concatenate([inverse_block_masks(clones, grid, mc.ratio, rng, mc.block_size, mc.adjust)
                               for rng in rngs])
    raise ConfigError(f"mask kind {mc.kind!r} is not available for images; use 'block' or 'inverse_block'")


def make_batch(cfg: PretrainConfig, first: int, inputs: torch.Tensor, mask: np.ndarray,
               valid: np.ndarray | None = None, **fields) -> Batch:
    """A CPU Batch; for data2vec 2.0 also the positions each clone's student encodes, computed here (in the
    DataLoader worker) so the device never waits on a data-dependent size. valid (B * clones, T): True at real
    positions (None: all)."""
    if cfg.recipe != "v2":
        return Batch(inputs=inputs, mask=torch.from_numpy(mask), **fields)
    from d2v.masking import kept_positions

    keep, filler = kept_positions(mask, valid)
    return Batch(inputs=inputs, mask=torch.from_numpy(mask), keep=torch.from_numpy(keep),
                 keep_padding=None if filler is None else torch.from_numpy(filler), clones=cfg.mask.clones,
                 first=first, **fields)


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


def build_pipeline(cfg: PretrainConfig, run_dir=None):
    """The modality's pipeline; run_dir (when resuming) holds the files the run saved, such as its data manifest."""
    if cfg.modality == "vision":
        return VisionPipeline(cfg, run_dir)
    if cfg.modality == "text":
        from d2v.data.text import TextPipeline

        return TextPipeline(cfg)
    if cfg.modality == "speech":
        from d2v.data.speech import SpeechPipeline

        return SpeechPipeline(cfg, run_dir)
    raise ConfigError(f"unknown modality {cfg.modality!r}")
