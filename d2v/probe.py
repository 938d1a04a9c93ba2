"""Linear probe: a logistic-regression classifier on frozen mean-pooled features; reports test accuracy. Images: the
means of the last 4 blocks' outputs, concatenated (DINO's linear-probe protocol); speech and text: `embed` (the
last hidden states). On SentEval's
sentence sets (`mr`, `trec`: d2v.data.sentences) it cross-validates over their fixed folds and reports, beside the
encoder, what the words alone carry (TF-IDF logistic regression) and the untrained architecture (random init)."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from d2v.core.errors import ConfigError, DataError, check_count
from d2v.data.corpus import LabelledText
from d2v.data.labelled import load_labelled, skipped_files
from d2v.data.sentences import TASKS, SentenceTask, load_sentence_task
from d2v.encoders.features import features
from d2v.encoders.load import load_encoder, random_encoder


# How many of an encoder's last blocks the probe reads by default, per modality (at most its depth): images follow
# DINO's linear evaluation (the last 4 blocks of a ViT-S, concatenated); speech and text read the last hidden states,
# as SUPERB-style single-layer and SentEval probes do.
PROBE_BLOCKS = {"vision": 4, "speech": 1, "text": 1}


def probe_blocks(cfg, requested: int = 0) -> int:
    """The blocks a probe of an encoder with config `cfg` reads: `requested`, or 0 for the modality's default."""
    if requested < 0 or requested > cfg.depth:
        raise ConfigError(f"--blocks must be from 1 to the encoder's {cfg.depth} blocks (0: the default for "
                          f"{cfg.modality}, {min(cfg.depth, PROBE_BLOCKS[cfg.modality])}), got {requested}")
    return requested or min(cfg.depth, PROBE_BLOCKS[cfg.modality])


@dataclass
class ProbeResult:
    accuracy: float
    train_accuracy: float
    n_train: int
    n_test: int
    n_classes: int
    feature_dim: int
    random_init: bool
    skipped_files: list = field(default_factory=list)  # (file, why) of each file left out (--skip-bad-files)
    blocks: int = 1  # the features: the means of this many last blocks, concatenated


def linear_probe(encoder, source: str, max_train: int = 0, device="cpu", seed: int = 0, random_init: bool = False,
                 progress=None, holdout: list[str] | None = None, skip_bad_files: bool = False,
                 blocks: int = 0) -> ProbeResult:
    """Fit logistic regression on train-split features of `source`; score it on the test split. blocks: the
    features are the means of the encoder's last `blocks` blocks, concatenated (0: PROBE_BLOCKS's default)."""
    check_count("--max-train", max_train, 0, 10**9, zero="all")  # a negative count would slice from the end
    blocks = probe_blocks(encoder.cfg, blocks)
    train = load_labelled(source, encoder, "train", holdout, skip_bad_files)
    test = load_labelled(source, encoder, "test", holdout, skip_bad_files)
    if max_train and len(train) > max_train:
        keep = np.random.default_rng(seed).permutation(len(train))[:max_train]
        train = train.subset(np.sort(keep))
    y_train, y_test = train.labels.numpy(), test.labels.numpy()
    if len(np.unique(y_train)) < 2:
        raise DataError(f"{source} needs at least two classes in its training split for a probe")
    if len(test) == 0:
        raise DataError(f"{source} has no test split to score the probe on")
    x_train = features(encoder, train, device=device, progress=progress, blocks=blocks)
    x_test = features(encoder, test, device=device, progress=progress, blocks=blocks)
    accuracy, train_accuracy = fit_and_score(x_train, y_train, x_test, y_test, seed)
    return ProbeResult(
        accuracy=accuracy, train_accuracy=train_accuracy,
        n_train=len(train), n_test=len(test), n_classes=int(len(np.unique(y_train))),
        feature_dim=int(x_train.shape[1]), random_init=random_init,
        skipped_files=[list(p) for p in skipped_files(train, test)],  # found while extracting the features
        blocks=blocks,
    )


def fit_and_score(x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, y_test: np.ndarray,
                  seed: int = 0) -> tuple[float, float]:
    """The probe's classifier: features standardized with the training split's statistics, then L2-regularized
    logistic regression (C 1); (test accuracy, train accuracy)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    scaler = StandardScaler().fit(x_train)
    clf = LogisticRegression(max_iter=2000, C=1.0, random_state=seed)
    clf.fit(scaler.transform(x_train), y_train)
    return (float(clf.score(scaler.transform(x_test), y_test)),
            float(clf.score(scaler.transform(x_train), y_train)))


def probe_path(path: str | Path, source: str, random_init: bool = False, **kwargs) -> ProbeResult:
    encoder = random_encoder(path, seed=kwargs.get("seed", 0)) if random_init else load_encoder(path)
    return linear_probe(encoder, source, random_init=random_init, **kwargs)


@dataclass
class Scored:
    """One row of a cross-validated probe: what was probed, its mean test accuracy over the folds and their spread."""

    name: str
    accuracy: float
    fold_std: float


@dataclass
class SentenceProbeResult:
    task: str
    n_items: int
    n_classes: int
    folds: int
    feature_dim: int
    rows: list[Scored]  # the encoder first, then the baselines and any encoders it is compared against

    @property
    def accuracy(self) -> float:
        return self.rows[0].accuracy


def cross_validated(x: np.ndarray, task: SentenceTask, seed: int = 0, C: float = 1.0) -> tuple[float, float]:
    """(mean, std) test accuracy over the task's folds of the probe's classifier (standardized features, logistic
    regression) on features x (N, D) or a per-fold feature function fold -> (x_train, x_test)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    accs = []
    for k in range(task.folds):
        test = task.fold == k
        if callable(x):
            x_train, x_test = x(k)
            scaler = None
        else:
            scaler = StandardScaler().fit(x[~test])
            x_train, x_test = scaler.transform(x[~test]), scaler.transform(x[test])
        clf = LogisticRegression(max_iter=2000, C=C, random_state=seed).fit(x_train, task.labels[~test])
        accs.append(clf.score(x_test, task.labels[test]))
    return float(np.mean(accs)), float(np.std(accs))


def tfidf_accuracy(task: SentenceTask, seed: int = 0) -> tuple[float, float]:
    """What the words alone carry: logistic regression (C = 10) on sublinear TF-IDF of word unigrams, the
    vocabulary learnt on each training part."""
    from sklearn.feature_extraction.text import TfidfVectorizer

    def fold_features(k: int):
        test = task.fold == k
        vec = TfidfVectorizer(sublinear_tf=True).fit([t for t, f in zip(task.texts, test) if not f])
        return (vec.transform([t for t, f in zip(task.texts, test) if not f]),
                vec.transform([t for t, f in zip(task.texts, test) if f]))

    return cross_validated(fold_features, task, seed, C=10.0)


def sentence_features(encoder, task: SentenceTask, device="cpu", progress=None) -> np.ndarray:
    """(N, D) float64 `embed` features of every sentence of the task, through the encoder's own tokenizer."""
    if encoder.cfg.modality != "text":
        raise DataError(f"{task.name} is a text probe; this is a {encoder.cfg.modality} encoder")
    if encoder.tokenizer is None:
        raise DataError("the text encoder has no tokenizer.json beside its weights; re-export the run")
    data = LabelledText(task.texts, task.labels, task.classes, encoder.tokenizer, encoder.cfg.max_length)
    return features(encoder, data, device=device, progress=progress)


def sentence_probe(path: str | Path, task_name: str, baselines: bool = True, against: list[str] | None = None,
                   device="cpu", seed: int = 0, random_init: bool = False, progress=None) -> SentenceProbeResult:
    """SentEval's protocol on `mr` or `trec` for the encoder at `path` (random init with random_init), then, with
    baselines, TF-IDF and the random-init architecture, then each encoder in `against` (e.g. the 1-update encoder
    of the same run), all on the same folds."""
    task = load_sentence_task(task_name)
    encoder = random_encoder(path, seed=seed) if random_init else load_encoder(path)
    x = sentence_features(encoder, task, device, progress)
    rows = [Scored("random init" if random_init else "encoder", *cross_validated(x, task, seed))]
    if baselines:
        rows.append(Scored("TF-IDF of the words", *tfidf_accuracy(task, seed)))
        if not random_init:
            x_random = sentence_features(random_encoder(path, seed=seed), task, device, progress)
            rows.append(Scored("random init", *cross_validated(x_random, task, seed)))
    for other in against or []:
        rows.append(Scored(str(other), *cross_validated(sentence_features(load_encoder(other), task, device,
                                                                          progress), task, seed)))
    return SentenceProbeResult(task.name, len(task.texts), len(task.classes), task.folds, int(x.shape[1]), rows)


def is_sentence_task(source: str) -> bool:
    return source in TASKS
