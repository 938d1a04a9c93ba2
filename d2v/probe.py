"""Linear probe: a logistic-regression classifier on frozen `embed` features; reports test accuracy."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from d2v.errors import DataError


@dataclass
class ProbeResult:
    accuracy: float
    train_accuracy: float
    n_train: int
    n_test: int
    n_classes: int
    feature_dim: int
    random_init: bool


@torch.no_grad()
def features(encoder, dataset, batch_size: int = 256, device: str | torch.device = "cpu", progress=None) -> np.ndarray:
    """(N, D) float64 embeddings of every item of a dataset."""
    encoder = encoder.to(device)
    batch_size = min(batch_size, getattr(dataset, "max_batch", batch_size))
    out = []
    for start in range(0, len(dataset), batch_size):
        idx = torch.arange(start, min(start + batch_size, len(dataset)))
        inputs = dataset.get_batch(idx)  # a tensor, or a tuple such as (waveforms, padding mask)
        inputs = tuple(t.to(device) for t in inputs) if isinstance(inputs, tuple) else (inputs.to(device),)
        out.append(encoder.embed(*inputs).float().cpu())
        if progress is not None:
            progress(len(idx))
    return torch.cat(out).double().numpy()


def load_labelled(source: str, encoder, split: str, holdout: list[str] | None = None):
    """A labelled split of `source` shaped for the encoder (images resized to its input size)."""
    from d2v.data.vision import load_images

    cfg = encoder.cfg
    if cfg.modality == "speech":
        from d2v.data.speech import default_holdout, labelled_split, load_audio

        return labelled_split(load_audio(source, sample_rate=cfg.sample_rate, min_samples=encoder.receptive_field),
                              split, holdout or default_holdout(source))
    if holdout:
        raise DataError("--holdout is available for speech folders only")
    if cfg.modality == "text":
        from d2v.data.text import load_labelled_text

        if encoder.tokenizer is None:
            raise DataError("the text encoder has no tokenizer.json beside its weights; re-export the run")
        return load_labelled_text(source, split, encoder.tokenizer, cfg.max_length)
    ds = load_images(source, split, image_size=cfg.image_size)
    if ds.labels is None:
        raise DataError(f"{source} has no labels (use a folder with one sub-folder per class, or an .npz with labels)")
    if ds.shape[0] != cfg.in_chans:
        raise DataError(f"{source} has {ds.shape[0]}-channel images but the encoder expects {cfg.in_chans}")
    return ds


def linear_probe(encoder, source: str, max_train: int = 0, device="cpu", seed: int = 0, random_init: bool = False,
                 progress=None, holdout: list[str] | None = None) -> ProbeResult:
    """Fit logistic regression on train-split features of `source`; score it on the test split."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    train, test = load_labelled(source, encoder, "train", holdout), load_labelled(source, encoder, "test", holdout)
    if max_train and len(train) > max_train:
        keep = np.random.default_rng(seed).permutation(len(train))[:max_train]
        train = train.subset(np.sort(keep))
    y_train, y_test = train.labels.numpy(), test.labels.numpy()
    if len(np.unique(y_train)) < 2:
        raise DataError(f"{source} needs at least two classes in its training split for a probe")
    if len(test) == 0:
        raise DataError(f"{source} has no test split to score the probe on")
    x_train = features(encoder, train, device=device, progress=progress)
    x_test = features(encoder, test, device=device, progress=progress)
    scaler = StandardScaler().fit(x_train)
    clf = LogisticRegression(max_iter=2000, C=1.0, random_state=seed)
    clf.fit(scaler.transform(x_train), y_train)
    return ProbeResult(
        accuracy=float(clf.score(scaler.transform(x_test), y_test)),
        train_accuracy=float(clf.score(scaler.transform(x_train), y_train)),
        n_train=len(train), n_test=len(test), n_classes=int(len(np.unique(y_train))),
        feature_dim=int(x_train.shape[1]), random_init=random_init,
    )


def probe_path(path: str | Path, source: str, random_init: bool = False, **kwargs) -> ProbeResult:
    from d2v.export import load_encoder, random_encoder

    encoder = random_encoder(path, seed=kwargs.get("seed", 0)) if random_init else load_encoder(path)
    return linear_probe(encoder, source, random_init=random_init, **kwargs)
