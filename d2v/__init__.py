"""d2v: data2vec self-supervised pretraining for vision, speech and text, with kernels for its hot ops."""
__version__ = "0.1.0"


def load_encoder(path, device="cpu"):
    """An exported encoder directory (or a run directory's student) as an nn.Module in eval mode."""
    from d2v.encoders.load import load_encoder as _load

    return _load(path, device)


def load_classifier(path, device="cpu"):
    """A fine-tuned classifier (the export of a fine-tuning run, or the run) in eval mode: model((inputs,)) ->
    logits (B, classes); model.labels names the classes."""
    from d2v.encoders.load import load_classifier as _load

    return _load(path, device)


__all__ = ["__version__", "load_classifier", "load_encoder"]
