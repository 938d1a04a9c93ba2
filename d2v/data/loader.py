"""A process's micro-batches of a pipeline, prepared in DataLoader worker processes.

Workers run the pipeline's micro_batch (decoding, cropping, masking). Two things must come back from them besides
the batch: a data error (one sentence naming the file, not a worker traceback) and the files a worker found
unreadable and skipped (and why), which the main process adds to the pipeline's list.
"""
from __future__ import annotations

import os

import torch

from d2v.core.errors import ConfigError, DataError, UserError

AUTO_WORKERS = -1  # data.num_workers: choose from the source (files: several workers; in-memory sets: see below)
MAX_AUTO_WORKERS = 8
# In-memory data feeding a GPU: a few workers make the masks (and text's corruption) of the next micro-batches while
# the GPU runs this one; on the H100 the main process spent 11.6 of a 28.9 ms tiny vision step on them (bench/RESULTS.md)
MAX_AUTO_WORKERS_IN_MEMORY_GPU = 4


def auto_workers(pipeline, on_gpu: bool = False) -> int:
    """Workers for a pipeline that reads files: one per spare core, at most MAX_AUTO_WORKERS. In-memory data: none
    on the CPU, where the same cores would train and a worker would only add copying; on a GPU one per spare core
    up to MAX_AUTO_WORKERS_IN_MEMORY_GPU, so that the host's share of a step overlaps the device's."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if not pipeline.reads_files:
        return max(0, min(MAX_AUTO_WORKERS_IN_MEMORY_GPU, cores - 1)) if on_gpu else 0
    return max(1, min(MAX_AUTO_WORKERS, cores - 1))


def resolve_workers(requested: int, pipeline, on_gpu: bool = False) -> int:
    if requested == AUTO_WORKERS:
        return auto_workers(pipeline, on_gpu)
    if requested < 0:
        raise ConfigError(f"data.num_workers must be 0 or more (or -1: automatic), got {requested}")
    return requested


class _MicroBatches(torch.utils.data.Dataset):
    """This process's micro-batches of updates first_update, first_update + 1, ... (`updates` of them), in order.
    `plan` (d2v.runtime.distributed.BatchPlan) says which global sample positions each holds. Item i = (first sample
    position, Batch, {index newly found unreadable: why}, error message or None)."""

    def __init__(self, pipeline, plan, first_update: int, updates: int):
        self.pipeline, self.plan, self.first_update, self.updates = pipeline, plan, first_update, updates

    def __len__(self) -> int:
        return self.updates * self.plan.accum

    def __getitem__(self, i: int):
        first, count = self.plan.micro_batch(self.first_update + i // self.plan.accum, i % self.plan.accum)
        before = set(self.pipeline.bad_files)
        try:
            batch = self.pipeline.micro_batch(first, count)
        except UserError as exc:  # crosses the process boundary as text, raised again as one sentence
            return first, None, {}, str(exc)
        bad = self.pipeline.bad_files
        return first, batch, {i: bad[i] for i in bad if i not in before}, None


def _identity(item):
    return item


def batch_loader(pipeline, plan, first_update: int, updates: int, num_workers: int, pin_memory: bool = False):
    """An iterator over (first sample position, CPU Batch) of this process's micro-batches, in order, whatever the
    number of workers. pin_memory: the batches go to a GPU (pinned, and automatic workers for in-memory data too).

    The DataLoader's iterator is made here, at once: it draws a seed from torch's global generator, which must
    happen before the loop seeds each step, or a resumed run would draw differently from an uninterrupted one."""
    workers = resolve_workers(num_workers, pipeline, on_gpu=pin_memory)  # pinned memory: the batches go to a GPU
    loader = torch.utils.data.DataLoader(
        _MicroBatches(pipeline, plan, first_update, updates), batch_size=None, collate_fn=_identity,
        num_workers=workers, pin_memory=pin_memory, persistent_workers=False, prefetch_factor=4 if workers else None)
    return _forward(iter(loader), pipeline)


def _forward(items, pipeline):
    for first, batch, bad, error in items:
        if error is not None:
            raise DataError(error)
        if bad:
            pipeline.bad_files.update(bad)  # the main process's count of skipped files includes the workers' finds
        yield first, batch
