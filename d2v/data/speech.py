"""The speech pipeline: files grouped by length, random crops, zero-padded, with wav2vec 2.0 span masks (data2vec 1.0)
or 1-D block masked clones (2.0) over the valid frames."""
from __future__ import annotations

import numpy as np

from d2v.core.batch import Batch
from d2v.core.config import PretrainConfig
from d2v.core.errors import ConfigError
from d2v.data.audio import pad_batch
from d2v.data.batches import make_batch
from d2v.data.budget import BudgetedUpdates
from d2v.data.recordings import load_audio
from d2v.data.mixture import mixture_sources, sample_order
from d2v.data.sampling import STREAM_AUDIO_CROPS, STREAM_BUCKETS, rng_for, sample_rngs
from d2v.data.sources import MANIFEST_NAME
from d2v.masking import Site, clone_masks
from d2v.models.speech import conv_output_lengths, receptive_field

BUCKET_WINDOW = 32  # micro-batches whose samples are regrouped by length


def bucketed(order_indices: np.ndarray, lengths: np.ndarray, batch: int, rng: np.random.Generator) -> np.ndarray:
    """(W, batch) dataset indices: a window of W * batch samples in sample order, sorted by length and cut into W
    batches of similar lengths, in a random batch order. Every sample of the window is used exactly once."""
    windows = order_indices.reshape(-1, batch)
    by_length = order_indices[np.argsort(lengths[order_indices], kind="stable")].reshape(windows.shape)
    return by_length[rng.permutation(len(by_length))]


class SpeechPipeline:
    """A micro-batch: files of similar length, random crops of at most data.crop_seconds, zero-padded to the
    longest, with a sample padding mask and wav2vec 2.0 span masks (or data2vec 2.0 block masks) over the valid
    frames. Files are decoded in micro_batch, i.e. in DataLoader workers.

    An update holds run.batch_size utterances (windows of BUCKET_WINDOW global batches in the seeded order,
    regrouped by length so padding stays small) or, with run.batch_tokens > 0, as many utterances as fit in that
    many audio samples (d2v.data.budget: `budget` says which positions each update holds)."""

    reads_files = True
    model_fields: dict = {}  # speech takes nothing from the data into the model config

    def __init__(self, cfg: PretrainConfig, run_dir=None):
        self.cfg = cfg
        m = cfg.model
        if cfg.data.crop_seconds <= 0:
            raise ConfigError(f"data.crop_seconds must be positive, got {cfg.data.crop_seconds}")
        self.receptive_field = receptive_field(m.conv_kernel, m.conv_stride)
        self.max_samples = int(round(cfg.data.crop_seconds * m.sample_rate))
        if self.max_samples < self.receptive_field:
            raise ConfigError(f"data.crop_seconds {cfg.data.crop_seconds} is shorter than the encoder's receptive "
                              f"field ({self.receptive_field} samples)")
        min_samples = max(self.receptive_field, int(round(cfg.data.min_seconds * m.sample_rate)))  # recipe: 32k
        sources = mixture_sources(cfg.data)
        self.dataset = load_audio(sources if len(sources) > 1 else cfg.data.source, cfg.data.skip_bad_files,
                                  m.sample_rate, min_samples, run_dir=run_dir)
        self.order = sample_order(self.dataset.part_sizes, cfg.data.weights, cfg.run.seed, sources)
        self.budget = None
        if cfg.run.batch_tokens > 0:  # the lengths a crop sees: long files cost one crop
            costs = np.minimum(self.dataset.lengths, self.max_samples)
            self.budget = BudgetedUpdates(costs, self.order, cfg.run.batch_tokens)

    @property
    def skipped(self) -> int:
        return self.dataset.skipped

    def skipped_files(self) -> list[tuple[str, str]]:
        return self.dataset.skipped_files()

    @property
    def bad_files(self) -> dict[int, str]:
        return self.dataset.bad

    def run_files(self) -> dict[str, bytes]:
        """The list of audio files with their lengths, kept so a resumed run reads the same files and no headers."""
        return {MANIFEST_NAME: self.dataset.samples.to_manifest()}

    def indices(self, first: int, count: int) -> np.ndarray:
        """Dataset indices at global sample positions first .. first + count - 1, grouped by length.

        Positions come in windows of BUCKET_WINDOW global batches (run.batch_size samples each, the batch of one
        update); a window's samples are sorted by length and cut into batches of similar lengths, in a random
        order. A position's sample depends only on the seed and the global batch size, never on how an update is
        split over processes or micro-batches, and each process's share of an update is a contiguous run of
        positions, so it is of similar lengths too. With a budget of samples per update (run.batch_tokens),
        d2v.data.budget places each update's files shortest first over its positions instead."""
        if self.budget is not None:
            return self.budget.indices(first, count)
        B = self.cfg.run.batch_size
        span = BUCKET_WINDOW * B
        lengths = np.minimum(self.dataset.lengths, self.max_samples)  # crops make long files equal
        out = np.empty(count, dtype=np.int64)
        for window in range(first // span, (first + count - 1) // span + 1):
            order = self.order.indices(window * span, span).numpy()
            grouped = bucketed(order, lengths, B, rng_for(self.cfg.run.seed, STREAM_BUCKETS, window)).reshape(-1)
            lo, hi = max(first, window * span), min(first + count, (window + 1) * span)
            out[lo - first: hi - first] = grouped[lo - window * span: hi - window * span]
        return out

    def micro_batch(self, first: int, count: int) -> Batch:
        """The files at global sample positions first .. first + count - 1; the crop and the masks of each come from
        its own position's generators, so they do not depend on the rest of the micro-batch."""
        m, mc = self.cfg.model, self.cfg.mask
        idx = self.indices(first, count)
        self.dataset.prefetch(idx)  # shards on a server: the batch's files fetched at once
        rngs = sample_rngs(self.cfg.run.seed, STREAM_AUDIO_CROPS, first, count)
        wave, pad = pad_batch([self.dataset.crop(int(i), self.max_samples, rng) for i, rng in zip(idx, rngs)])
        lengths = (~pad).sum(dim=1).numpy()
        frames = conv_output_lengths(lengths, m.conv_kernel, m.conv_stride)
        num_frames = conv_output_lengths(wave.shape[1], m.conv_kernel, m.conv_stride)
        valid = np.arange(num_frames)[None, :] < frames[:, None]
        clones = mc.clones if self.cfg.recipe == "v2" else 1
        # data2vec 2.0's block_1d: exactly int(ratio x valid frames) per clone, on the cropped audio; the masks draw
        # from the crop's generator after the crop
        mask = clone_masks("speech", mc, rngs, [Site(num_frames, valid=row) for row in valid], clones)
        return make_batch(self.cfg, first, inputs=wave, mask=mask, valid=np.repeat(valid, clones, axis=0),
                          padding_mask=pad if pad.any() else None)

    def on_device(self, batch: Batch, first: int) -> Batch:
        return batch
