"""A modality's data, as the training loop sees it: the Pipeline protocol, and the one place that picks a modality's
pipeline and fills the model fields its data decides (image size and channels, pixel statistics, vocabulary).

A new modality plugs in here: one module with its pipeline class (see vision.py, speech.py, text.py) and one line in
PIPELINES."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Protocol

from d2v.core.batch import Batch
from d2v.core.config import PretrainConfig
from d2v.core.errors import ConfigError
from d2v.data import corpus, images, recordings
from d2v.data.speech import SpeechPipeline
from d2v.data.text import TextPipeline
from d2v.data.vision import VisionPipeline


class Pipeline(Protocol):
    """From a data source to micro-batches. The sample at global position p, its mask and its augmentation are
    functions of (seed, p) alone (d2v.data.sampling), so micro_batch may run in any DataLoader worker."""

    reads_files: bool  # batches decode files: DataLoader workers pay off (in-memory data: none)
    order: Any  # sampling.SampleOrder (one source) or mixture.MixtureOrder: indices(start, count), drawn(positions)
    model_fields: dict[str, Any]  # model config values the data decides, filled in by build_pipeline
    tokenizer: Any  # text: the tokenizer the run trains with (others: absent)
    # None: every update holds run.batch_size samples. Speech with run.batch_tokens > 0: a
    # d2v.data.budget.BudgetedUpdates saying which positions each update holds and how it splits into micro-batches
    budget: Any

    @property
    def skipped(self) -> int:
        """Files left out as unreadable so far (with data.skip_bad_files)."""

    def skipped_files(self) -> list[tuple[str, str]]:
        """(file, why) of each file left out so far (with data.skip_bad_files)."""

    @property
    def bad_files(self) -> dict[int, str]:
        """Indices this process found unreadable -> why; the loader adds what its workers find."""

    def micro_batch(self, first: int, count: int) -> Batch:
        """The CPU batch of sample positions first .. first + count - 1."""

    def on_device(self, batch: Batch, first: int) -> Batch:
        """Device-side augmentation of a batch already moved to the device."""

    def run_files(self) -> dict[str, bytes]:
        """Files the run directory keeps (a data manifest, a tokenizer) so that a resumed run reads the same data."""


PIPELINES: dict[str, type] = {"vision": VisionPipeline, "speech": SpeechPipeline, "text": TextPipeline}
BUILTIN = {"vision": images.BUILTIN, "speech": recordings.BUILTIN, "text": corpus.BUILTIN}


def is_builtin(name: str) -> bool:
    """Whether `name` is a built-in data set of any modality."""
    return any(name in names for names in BUILTIN.values())


def build_pipeline(cfg: PretrainConfig, run_dir: Path | None = None) -> Pipeline:
    """The modality's pipeline, with the model fields its data decides filled into cfg.model; run_dir (when
    resuming) holds the files the run saved, such as its data manifest."""
    cls = PIPELINES.get(cfg.modality)
    if cls is None:
        raise ConfigError(f"unknown modality {cfg.modality!r}")
    pipeline = cls(cfg, run_dir)
    for name, value in pipeline.model_fields.items():
        setattr(cfg.model, name, value)
    return pipeline


def resolve_source(source: str) -> str:
    """A data path as an absolute path (so that --resume works from any directory); built-in names and URLs
    unchanged."""
    expanded = os.path.expanduser(source)
    if os.path.exists(expanded) and (os.sep in source or source.startswith((".", "~")) or not is_builtin(source)):
        return str(Path(expanded).resolve())
    return expanded if source.startswith("~") else source
