"""Labelled data sets shaped for an encoder (the probe, the k-NN monitor and fine-tuning use them): images at the
encoder's size and channels, audio at its sample rate, text through its tokenizer; fixed train/test splits."""
from __future__ import annotations

from d2v.core.errors import DataError
from d2v.data.corpus import LabelledText, load_labelled_text
from d2v.data.images import channel_mismatch, load_images
from d2v.data.labels import unlabelled_message
from d2v.data.recordings import default_holdout, labelled_split, load_audio
from d2v.data.sampling import split_indices
from d2v.data.sentences import TASKS, load_sentence_task


def load_labelled(source: str, encoder, split: str, holdout: list[str] | None = None, skip_bad_files: bool = False):
    """A labelled split of `source` shaped for the encoder (images resized to its input size). skip_bad_files:
    unreadable files are left out as pretraining leaves them out (the split's skipped_files() names them)."""
    cfg = encoder.cfg
    if cfg.modality == "speech":
        audio = load_audio(source, skip_bad_files, sample_rate=cfg.sample_rate, min_samples=encoder.receptive_field)
        return labelled_split(audio, split, holdout or default_holdout(source))
    if holdout:
        raise DataError("--holdout is available for speech folders only")
    if cfg.modality == "text":
        if encoder.tokenizer is None:
            raise DataError("the text encoder has no tokenizer.json beside its weights; re-export the run")
        if source in TASKS:  # mr, trec: a fixed stratified 80/20 split (d2v probe cross-validates them instead)
            task = load_sentence_task(source)
            idx = split_indices(task.labels, len(task.texts), split, test_fraction=0.2)
            return LabelledText([task.texts[i] for i in idx], task.labels[idx], task.classes, encoder.tokenizer,
                                cfg.max_length)
        return load_labelled_text(source, split, encoder.tokenizer, cfg.max_length, skip_bad_files)
    ds = load_images(source, split, image_size=cfg.image_size, skip_bad_files=skip_bad_files)
    if ds.labels is None:
        names = ds.samples.names() if hasattr(ds, "samples") else None
        raise DataError(unlabelled_message(source, names, "use a folder with one sub-folder per class, or an .npz "
                                                          "with labels"))
    if ds.shape[0] != cfg.in_chans:
        raise DataError(channel_mismatch(source, ds.shape[0], cfg.in_chans, "the encoder"))
    return ds


def skipped_files(*splits) -> list[tuple[str, str]]:
    """(file, why) of every file the splits of one labelled set left out, each once, sorted."""
    return sorted({tuple(p) for ds in splits if ds is not None for p in getattr(ds, "skipped_files", list)()})
