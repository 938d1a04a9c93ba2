"""`d2v predict`: a fine-tuned classifier's label and probability for every item of a data source, as CSV
(path, label, probability: the most probable label and its softmax probability), written whole or not at all.
Where the data has classes, the accuracy against them is reported too."""
from __future__ import annotations

import csv
import io
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from d2v.core.device import resolve_device
from d2v.core.errors import DataError
from d2v.core.files import atomic_write, check_writable_file
from d2v.data.items import batches, load_items
from d2v.encoders.load import load_classifier


@dataclass
class PredictSummary:
    out: Path
    rows: int
    skipped: list[str]  # items left out as unreadable (with skip_bad_files)
    correct: int  # predictions equal to the item's class, among the `labelled` items whose class the model knows
    labelled: int
    labels: list[str]

    @property
    def accuracy(self) -> float | None:
        return self.correct / self.labelled if self.labelled else None


@torch.no_grad()
def predict(model_path: str | Path, source: str, out: Path, split: str = "all", batch_size: int = 64,
            device: str = "auto", skip_bad_files: bool = False, doc_per_line: bool = False, num_workers: int = -1,
            holdout: list[str] | None = None, progress=None) -> PredictSummary:
    """Classify every item of `source` with the classifier at `model_path` (an export of a fine-tuning run, or the
    run) and write `out`. progress(items done, items total) after each batch."""
    out = Path(out).expanduser()
    check_writable_file(out, "--out")
    dev = resolve_device(device)
    model = load_classifier(model_path, dev)
    items = load_items(source, model.student, split, skip_bad_files, doc_per_line, holdout)
    if len(items) == 0:
        raise DataError(f"{source} holds no items to classify")
    workers = num_workers if num_workers >= 0 else (min(4, max(1, (os.cpu_count() or 1) - 1)) if items.reads_files
                                                    else 0)
    known = set(model.labels)
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(["path", "label", "probability"])
    rows = correct = labelled = 0
    skipped = []
    for first, end, inputs, kept in batches(items, batch_size, 0, workers):
        skipped += [items.names[i] for i in sorted(set(range(first, end)) - set(kept))]
        if kept:
            probs = torch.softmax(model(tuple(t.to(dev) for t in inputs)).float(), dim=1).cpu()
            best = probs.max(dim=1)
            for i, k, p in zip(kept, best.indices.tolist(), best.values.tolist()):
                label = model.labels[k]
                writer.writerow([items.names[i], label, f"{p:.6f}"])
                truth = items.class_name(i)
                if truth is not None and truth in known:
                    labelled += 1
                    correct += truth == label
            rows += len(kept)
        if progress is not None:
            progress(end, len(items))
    if rows == 0:
        raise DataError(f"none of the {len(items)} items could be read")
    atomic_write(out, lambda f: f.write(text.getvalue().encode()))
    return PredictSummary(out, rows, skipped, correct, labelled, model.labels)
