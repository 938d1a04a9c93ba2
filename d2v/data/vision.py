"""The vision pipeline: images with block masks (data2vec 1.0) or inverse-block masked clones (2.0), random resized
crops and optional colour jitter."""
from __future__ import annotations

from d2v.core.batch import Batch
from d2v.core.config import PretrainConfig
from d2v.core.errors import ConfigError, DataError
from d2v.data.augment import color_jitter, random_resized_crop
from d2v.data.batches import make_batch
from d2v.data.images import BUILTIN, FileImages, channel_mismatch, load_image_mixture, load_images, pixel_stats
from d2v.data.mixture import mixture_sources, sample_order
from d2v.data.sampling import STREAM_CROPS, STREAM_JITTER, STREAM_MASKS, sample_rngs
from d2v.data.sources import MANIFEST_NAME
from d2v.masking import Site, clone_masks
from d2v.models.vision import auto_patch_size


class VisionPipeline:
    """In-memory images are batched whole and cropped on the device (one grid_sample); image files are decoded and
    cropped from their original resolution in micro_batch, i.e. in DataLoader workers."""

    budget = None  # every update holds run.batch_size images

    def __init__(self, cfg: PretrainConfig, run_dir=None):
        self.cfg = cfg
        sources = mixture_sources(cfg.data)
        if len(sources) > 1:
            self.dataset = load_image_mixture(sources, cfg.data.image_size, cfg.data.skip_bad_files, run_dir)
        else:
            split = "train" if cfg.data.source in BUILTIN else "all"  # built-ins keep their test split for probes
            self.dataset = load_images(cfg.data.source, split, cfg.data.image_size, cfg.data.skip_bad_files,
                                       run_dir=run_dir)
        self.files = self.reads_files = isinstance(self.dataset, FileImages)
        if len(self.dataset) == 0:
            raise DataError(f"data {' + '.join(sources)!r} holds no images")
        c, h, _ = self.dataset.shape
        m = cfg.model
        if m.image_size and m.image_size != h:
            raise ConfigError(f"the model expects {m.image_size}px images but the data has {h}px; "
                              f"set --image-size {m.image_size}")
        patch = m.patch_size if m.patch_size > 0 else auto_patch_size(h)
        if h % patch:
            raise ConfigError(f"patch size {patch} does not divide the image size {h}; resize with --image-size")
        if cfg.run.init_from and m.in_chans and m.in_chans != c:  # an encoder made for other pixels (without
            # --init-from the data decides in_chans: the presets' 3 is only a default)
            raise DataError(channel_mismatch(cfg.data.source, c, m.in_chans, f"the --init-from encoder "
                                                                              f"{cfg.run.init_from}"))
        if m.pixel_mean and len(m.pixel_mean) != c:
            raise ConfigError(f"model.pixel_mean needs one value per channel of the data ({c}), got {len(m.pixel_mean)}")
        self.model_fields = {"image_size": h, "in_chans": c, "patch_size": patch}
        if not m.pixel_mean:
            self.model_fields["pixel_mean"], self.model_fields["pixel_std"] = pixel_stats(self.dataset)
        self.grid = (h // patch, h // patch)
        self.order = sample_order(self.dataset.part_sizes, cfg.data.weights, cfg.run.seed, sources)

    @property
    def skipped(self) -> int:
        return self.dataset.skipped

    def skipped_files(self) -> list[tuple[str, str]]:
        return self.dataset.skipped_files()

    @property
    def bad_files(self) -> dict[int, str]:
        return getattr(self.dataset, "bad", {})

    def micro_batch(self, first: int, count: int) -> Batch:
        """The samples at global positions first .. first + count - 1, each with its own block mask (and, for
        image files, its own crop of the original image, decoded here, i.e. in a DataLoader worker)."""
        idx = self.order.indices(first, count)
        if self.files:  # (B, C, H, W) uint8, cropped from the originals; one rng per sample position
            d = self.cfg.data
            images = self.dataset.train_batch(idx, d.crop_scale, d.hflip,
                                              sample_rngs(self.cfg.run.seed, STREAM_CROPS, first, count))
        else:
            images = self.dataset.get_batch(idx)  # (B, C, H, W) in [0, 1]
        clones = self.cfg.mask.clones if self.cfg.recipe == "v2" else 1
        mask = clone_masks("vision", self.cfg.mask, sample_rngs(self.cfg.run.seed, STREAM_MASKS, first, count),
                           [Site(self.grid[0] * self.grid[1], grid=self.grid)] * count, clones)
        return make_batch(self.cfg, first, inputs=images, mask=mask)

    def run_files(self) -> dict[str, bytes]:
        """The list of image files, kept in the run directory so a resumed run reads the same samples."""
        return {MANIFEST_NAME: self.dataset.samples.to_manifest()} if self.files else {}

    def on_device(self, batch: Batch, first: int) -> Batch:
        d, B = self.cfg.data, batch.inputs.shape[0]
        if self.files:  # already cropped in micro_batch
            batch.inputs = batch.inputs.float() / 255.0
        else:
            batch.inputs = random_resized_crop(batch.inputs, d.crop_scale, d.hflip,
                                               sample_rngs(self.cfg.run.seed, STREAM_CROPS, first, B))
        if d.color_jitter > 0:
            batch.inputs = color_jitter(batch.inputs, d.color_jitter, sample_rngs(self.cfg.run.seed, STREAM_JITTER, first, B))
        return batch
