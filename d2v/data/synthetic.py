"""Random data at a config's nominal shapes, for measurements that need no data set: the step benchmark (`d2v bench
step`), the FLOP count's check against torch's counter, the memory of activation checkpointing. Every sample has the
full nominal length (images: the model's size; speech: data.crop_seconds; text: model.max_length), no padding; the
masks are the config's own kinds and sizes (d2v.masking), so a data2vec 2.0 clone keeps exactly what a real batch's
clone keeps."""
from __future__ import annotations

import numpy as np
import torch

from d2v.core.batch import Batch
from d2v.core.config import PretrainConfig
from d2v.data.batches import make_batch
from d2v.data.sampling import STREAM_MASKS, sample_rngs
from d2v.masking import Site, bert_corrupt, clone_masks
from d2v.models.speech import conv_output_lengths
from d2v.models.vision import auto_patch_size

FIRST_PLAIN_TOKEN = 5  # ids below are the specials (<s> <pad> </s> <unk> <mask>), RoBERTa's order


def synthetic_batch(cfg: PretrainConfig, first: int, count: int, seed: int = 0) -> Batch:
    """A CPU Batch of `count` random samples at sample positions first .. first + count - 1 with the config's masks.

    Vision: (count, C, H, W) uniform floats in [0, 1] at model.image_size; speech: (count, S) Gaussian waveforms of
    data.crop_seconds; text: (count, model.max_length) random ids of model.vocab_size (<s> first), BERT-corrupted
    for data2vec 1.0."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + first)
    m, mc = cfg.model, cfg.mask
    clones = mc.clones if cfg.recipe == "v2" else 1
    rngs = sample_rngs(cfg.run.seed, STREAM_MASKS, first, count)
    if cfg.modality == "vision":
        size = m.image_size or cfg.data.image_size
        chans = m.in_chans or 3
        side = size // (m.patch_size or auto_patch_size(size))
        images = torch.rand(count, chans, size, size, generator=g)
        mask = clone_masks("vision", mc, rngs, [Site(side * side, grid=(side, side))] * count, clones)
        return make_batch(cfg, first, inputs=images, mask=mask)
    if cfg.modality == "speech":
        samples = int(round(cfg.data.crop_seconds * m.sample_rate))
        wave = torch.randn(count, samples, generator=g)
        frames = conv_output_lengths(samples, m.conv_kernel, m.conv_stride)
        mask = clone_masks("speech", mc, rngs, [Site(frames)] * count, clones)
        return make_batch(cfg, first, inputs=wave, mask=mask)
    vocab = m.vocab_size or cfg.data.vocab_size
    ids = torch.randint(FIRST_PLAIN_TOKEN, vocab, (count, m.max_length), generator=g)
    ids[:, 0] = 0  # <s>
    maskable = np.ones(m.max_length, dtype=bool)
    maskable[0] = False
    sites = [Site(m.max_length, maskable=maskable)] * count
    mask = clone_masks("text", mc, rngs, sites, clones)
    if cfg.recipe == "v2":
        return make_batch(cfg, first, inputs=ids, mask=mask)
    student = np.stack([bert_corrupt(ids[b: b + 1].numpy(), mask[b: b + 1], rng, m.mask_id,
                                     (FIRST_PLAIN_TOKEN, vocab), mc.random_token, mc.unchanged)[0]
                        for b, rng in enumerate(rngs)])
    return make_batch(cfg, first, inputs=ids, mask=mask, student_inputs=torch.from_numpy(student))


def fill_model_fields(cfg: PretrainConfig) -> PretrainConfig:
    """The data-dependent model fields a synthetic batch implies, where the preset leaves them to the data: images
    at data.image_size (else 32 px), 3 channels, mean 0.5 / std 0.5 pixels; text at data.vocab_size. In place."""
    m = cfg.model
    if cfg.modality == "vision":
        m.image_size = m.image_size or cfg.data.image_size or 32
        m.in_chans = m.in_chans or 3
        m.patch_size = m.patch_size or auto_patch_size(m.image_size)
        m.pixel_mean = m.pixel_mean or [0.5] * m.in_chans
        m.pixel_std = m.pixel_std or [0.5] * m.in_chans
    if cfg.modality == "text":
        m.vocab_size = m.vocab_size or cfg.data.vocab_size
    return cfg
