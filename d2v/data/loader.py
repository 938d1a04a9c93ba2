"""A process's micro-batches of a pipeline, prepared in DataLoader worker processes.

Workers run the pipeline's micro_batch (decoding, cropping, masking). Two things must come back from them besides
the batch: a data error (one sentence naming the file, not a worker traceback) and the files a worker found
unreadable and skipped, which the main process adds to the pipeline's count.
"""
from __future__ import annotations

import os

import torch

from d2v.errors import ConfigError, DataError, UserError

AUTO_WORKERS = -1  # data.num_workers: choose from the source (files: several workers; in-memory sets: none)
MAX_AUTO_WORKERS = 8


def auto_workers(pipeline) -> int:
    """Workers for a pipeline that reads files: one per spare core, at most MAX_AUTO_WORKERS; none for in-memory
    data, where batches are slices of a tensor and a worker would only add copying."""
    if not getattr(pipeline, "reads_files", False):
        return 0
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(MAX_AUTO_WORKERS, cores - 1))


def resolve_workers(requested: int, pipeline) -> int:
    if requested == AUTO_WORKERS:
        return auto_workers(pipeline)
    if requested < 0:
        raise ConfigError(f"data.num_workers must be 0 or more (or -1: automatic), got {requested}")
    return requested


def _bad_files(dataset) -> set:
    return set(getattr(dataset, "bad", ()) or ())


class _MicroBatches(torch.utils.data.Dataset):
    """This process's micro-batches of updates first_update, first_update + 1, ... (`updates` of them), in order.
    `plan` (d2v.distributed.BatchPlan) says which global sample positions each holds. Item i = (first sample
    position, Batch, indices newly found unreadable, error message or None)."""

    def __init__(self, pipeline, plan, first_update: int, updates: int):
        self.pipeline, self.plan, self.first_update, self.updates = pipeline, plan, first_update, updates

    def __len__(self) -> int:
        return self.updates * self.plan.accum

    def __getitem__(self, i: int):
        first = self.plan.first(self.first_update + i // self.plan.accum, i % self.plan.accum)
        dataset = getattr(self.pipeline, "dataset", None)
        before = _bad_files(dataset)
        try:
            batch = self.pipeline.micro_batch(first, self.plan.micro)
        except UserError as exc:  # crosses the process boundary as text, raised again as one sentence
            return first, None, set(), str(exc)
        return first, batch, _bad_files(dataset) - before, None


def _identity(item):
    return item


def batch_loader(pipeline, plan, first_update: int, updates: int, num_workers: int, pin_memory: bool = False):
    """An iterator over (first sample position, CPU Batch) of this process's micro-batches, in order, whatever the
    number of workers.

    The DataLoader's iterator is made here, at once: it draws a seed from torch's global generator, which must
    happen before the loop seeds each step, or a resumed run would draw differently from an uninterrupted one."""
    workers = resolve_workers(num_workers, pipeline)
    loader = torch.utils.data.DataLoader(
        _MicroBatches(pipeline, plan, first_update, updates), batch_size=None, collate_fn=_identity,
        num_workers=workers, pin_memory=pin_memory, persistent_workers=False, prefetch_factor=4 if workers else None)
    return _forward(iter(loader), getattr(pipeline, "dataset", None))


def _forward(items, dataset):
    for first, batch, bad, error in items:
        if error is not None:
            raise DataError(error)
        if bad and dataset is not None and hasattr(dataset, "bad"):
            dataset.bad |= bad  # the main process's count of skipped files includes the workers' finds
        yield first, batch
