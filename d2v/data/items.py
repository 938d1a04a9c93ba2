"""Every item of a data source, each with a name, shaped for an encoder: what `d2v embed` and `d2v predict` read.

The views are those the probe and fine-tuning evaluate on (d2v.data.labelled): images at the encoder's size
(shorter side resized, centre crop), whole recordings at its sample rate, documents through its tokenizer (cut at
its max length). An item is named by its file (a path, or `member in shard`), by `path#k` for the k-th document of
a text file with several, and by `source/split/k` for items of in-memory sets (built-ins, arrays).

Unlike pretraining, which puts the next readable sample in an unreadable one's place, an unreadable item here is
left out (with skip_bad_files; else a DataError names it), so every row of the output is the item it names."""
from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np
import torch

from d2v.core.errors import DataError
from d2v.core.tokenizer import tokenize
from d2v.data.audio import pad_batch
from d2v.data.corpus import Corpus, load_labelled_text, open_corpus
from d2v.data.images import FileImages, load_images
from d2v.data.recordings import default_holdout, labelled_split, load_audio
from d2v.data.sources import expand

SPLITS = ("all", "train", "test")


@dataclass
class Items:
    """N named items; batch(indices) reads some of them as encoder inputs."""

    modality: str
    names: list[str]
    source: object  # what batch() reads from: an image or audio set, or a list of documents
    labels: np.ndarray | None = None  # class index per item, where the source has classes
    classes: list[str] = field(default_factory=list)
    tokenizer: object = None  # text
    max_length: int = 0  # text
    max_batch: int = 256
    reads_files: bool = False  # items are decoded from files: DataLoader workers pay off

    def __len__(self) -> int:
        return len(self.names)

    def class_name(self, i: int) -> str | None:
        """The true class of item i as a name ("0", "1", ... where the source has no class names), or None."""
        if self.labels is None:
            return None
        k = int(self.labels[i])
        return self.classes[k] if k < len(self.classes) else str(k)

    def batch(self, indices: list[int]) -> tuple[tuple, list[int]]:
        """(encoder inputs of the readable items among `indices`, those indices)."""
        if self.modality == "text":
            docs = [self.source[i] for i in indices]
            return (tokenize(self.tokenizer, docs, self.max_length)[0],), list(indices)
        if self.modality == "speech":
            waves = [self.source.read(i) for i in indices]
            kept = [i for i, w in zip(indices, waves) if w is not None]
            if not kept:
                return (), []
            return pad_batch([w for w in waves if w is not None]), kept
        if not isinstance(self.source, FileImages):
            return (self.source.get_batch(torch.as_tensor(indices)),), list(indices)
        images = [self.source.read(i) for i in indices]
        kept = [i for i, x in zip(indices, images) if x is not None]
        return ((torch.stack([x for x in images if x is not None]),) if kept else ()), kept


def load_items(source: str, encoder, split: str = "all", skip_bad_files: bool = False, doc_per_line: bool = False,
               holdout: list[str] | None = None) -> Items:
    """The items of `source` (a built-in name, a folder, shards, a manifest, an array or text file) for `encoder`
    (its cfg, and for text its tokenizer); split 'train' / 'test' picks the fixed split the probe and fine-tuning
    use."""
    if split not in SPLITS:
        raise DataError(f"--split must be one of {', '.join(SPLITS)}, got {split!r}")
    cfg = encoder.cfg
    if cfg.modality == "vision":
        return _images(source, cfg, split, skip_bad_files)
    if cfg.modality == "speech":
        return _recordings(source, encoder, split, skip_bad_files, holdout)
    if encoder.tokenizer is None:
        raise DataError("the text encoder has no tokenizer.json beside its weights; re-export the run")
    return _texts(source, encoder, split, skip_bad_files, doc_per_line)


def _images(source: str, cfg, split: str, skip_bad_files: bool) -> Items:
    ds = load_images(source, split, image_size=cfg.image_size, skip_bad_files=skip_bad_files)
    if ds.shape[0] != cfg.in_chans:
        raise DataError(f"{source} has {ds.shape[0]}-channel images but the encoder expects {cfg.in_chans}")
    if isinstance(ds, FileImages):
        names = [ds.samples.where(i) for i in range(len(ds))]
        return Items("vision", names, ds, _labels(ds), list(ds.classes), reads_files=True, max_batch=64)
    return Items("vision", [f"{_short(source)}/{split}/{i}" for i in range(len(ds))], ds, _labels(ds), [])


def _recordings(source: str, encoder, split: str, skip_bad_files: bool, holdout) -> Items:
    ds = load_audio(source, skip_bad_files=skip_bad_files, sample_rate=encoder.cfg.sample_rate,
                    min_samples=encoder.receptive_field)
    if split != "all":
        ds = labelled_split(ds, split, holdout or default_holdout(source))
    names = [ds.samples.where(i) for i in range(len(ds))]
    return Items("speech", names, ds, _labels(ds), list(ds.classes), reads_files=True, max_batch=ds.max_batch)


def _texts(source: str, encoder, split: str, skip_bad_files: bool, doc_per_line: bool) -> Items:
    tok, length = encoder.tokenizer, encoder.cfg.max_length
    if split != "all":  # the probe's labelled split: documents of fortunes categories or class folders
        ds = load_labelled_text(source, split, tok, length)
        names = [f"{_short(source)}/{split}/{i}" for i in range(len(ds))]
        return Items("text", names, ds.docs, ds.labels.numpy(), list(ds.classes), tok, length, max_batch=64)
    stream = open_corpus(source, doc_per_line, skip_bad_files)
    if isinstance(stream, Corpus):
        return Items("text", list(stream.names) or [f"{source}/all/{i}" for i in range(len(stream.docs))],
                     list(stream.docs), None, [], tok, length, max_batch=64)
    docs, names = [], []
    for i in stream.usable():
        found, current = [], []
        for text, _, ends in stream.pieces([i]):  # a document larger than a piece comes in several
            current.append(text)
            if ends:
                found.append("".join(current))
                current = []
        where = stream.samples.where(i)
        several = doc_per_line or stream.fortune
        names += [f"{where}#{k}" if several else where for k in range(len(found))]
        docs += found
    if not docs:
        raise DataError(f"text data {source!r} holds no text")
    return Items("text", names, docs, None, [], tok, length, max_batch=64)


def _labels(ds) -> np.ndarray | None:
    return None if getattr(ds, "labels", None) is None else ds.labels.numpy()


def _short(source: str) -> str:
    """A built-in's name, or an array file's base name, to name in-memory items by."""
    return source if os.sep not in source else expand(source).name


def batches(items: Items, batch_size: int, start: int = 0, num_workers: int = 0):
    """(first index, end index, encoder inputs, kept indices) of consecutive batches of items from `start`, read in
    `num_workers` DataLoader processes (0: here)."""
    size = max(1, min(batch_size, items.max_batch))
    spans = [(first, min(first + size, len(items))) for first in range(start, len(items), size)]

    class Spans(torch.utils.data.Dataset):
        def __len__(self):
            return len(spans)

        def __getitem__(self, k):
            first, end = spans[k]
            return (first, end, *items.batch(list(range(first, end))))

    if num_workers <= 0:
        yield from (Spans()[k] for k in range(len(spans)))
        return
    yield from torch.utils.data.DataLoader(Spans(), batch_size=None, shuffle=False, num_workers=num_workers)
