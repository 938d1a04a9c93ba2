"""Speech data: the embedded default (synthesized speech shipped with the package), Debian's Asterisk prompts, the
generated spoken digits, a folder of audio files (anything libsndfile reads), tar shards or a fairseq TSV manifest;
every file becomes 16 kHz mono float32 when a batch needs it. SpeechPipeline groups files by length, crops, pads
and span-masks them.
"""
from __future__ import annotations

import fnmatch
import math
from pathlib import Path

import numpy as np
import torch

from d2v.config import PretrainConfig
from d2v.data.labels import labels_from_names
from d2v.data.sources import SampleList, expand, from_names, list_source
from d2v.errors import ConfigError, DataError
from d2v.objective import Batch

AUDIO_SUFFIXES = {".wav", ".flac", ".ogg", ".opus", ".mp3", ".aiff", ".aif", ".au"}  # what libsndfile reads
DEFAULT_DIR = Path(__file__).with_name("speech_default")  # made by speech_default/make.py
ASTERISK_DIRS = [Path("/usr/share/asterisk/sounds/en"), Path("/usr/share/asterisk/sounds/en_US_f_Allison")]
BUILTIN = ("default", "asterisk", "spoken-digits")
SILENCE_PEAK = 1e-4  # a file whose loudest sample is below this (full scale 1.0) counts as silent
CACHE_SAMPLES = 64_000_000  # decoded audio kept in memory up to this many samples (256 MB); beyond, read per batch


# ------------------------------------------------------------------------------------------------ resampling
def resample(wave: np.ndarray, orig_sr: int, new_sr: int) -> np.ndarray:
    """Band-limited resampling of a 1-D float signal; returns ceil(len * new_sr / orig_sr) float32 samples.

    soxr (the optional 'audio' extra) when installed, else scipy's polyphase resample_poly (Kaiser-windowed FIR)."""
    wave = np.asarray(wave, dtype=np.float32)
    if orig_sr == new_sr or wave.size == 0:
        return wave
    n_out = -(-wave.size * int(new_sr) // int(orig_sr))
    try:
        import soxr
    except ImportError:
        from scipy.signal import resample_poly

        g = math.gcd(int(orig_sr), int(new_sr))
        out = resample_poly(wave, int(new_sr) // g, int(orig_sr) // g)
    else:
        out = soxr.resample(wave, int(orig_sr), int(new_sr), quality="HQ")
    if out.size < n_out:  # soxr rounds the length; keep one rule for both
        out = np.pad(out, (0, n_out - out.size))
    return np.ascontiguousarray(out[:n_out], dtype=np.float32)


# ------------------------------------------------------------------------------------------------ files
def read_audio(src, sample_rate: int = 16000, name: str | None = None) -> np.ndarray:
    """A file (path or file object) as mono float32 at `sample_rate`; DataError naming the file if it is unreadable,
    empty or silent."""
    import soundfile as sf

    name = name or str(src)
    try:
        data, sr = sf.read(src if not isinstance(src, Path) else str(src), dtype="float32", always_2d=True)
    except Exception as exc:
        raise DataError(f"cannot decode audio file {name}: {str(exc).strip() or type(exc).__name__}") from None
    if data.shape[0] == 0:
        raise DataError(f"audio file {name} is empty (no samples)")
    wave = resample(data.mean(axis=1), sr, sample_rate)
    if not np.isfinite(wave).all():
        raise DataError(f"audio file {name} contains NaN or infinite samples")
    if np.abs(wave).max() < SILENCE_PEAK:
        raise DataError(f"audio file {name} is silent (peak below {SILENCE_PEAK:g} of full scale)")
    return wave


def _builtin_source(name: str) -> str:
    if name == "default":
        if not any(DEFAULT_DIR.glob("*.flac")):
            raise DataError(f"the embedded speech default is missing from {DEFAULT_DIR}; reinstall d2v")
        return str(DEFAULT_DIR)
    if name == "spoken-digits":
        from d2v.data.spoken_digits import spoken_digits_dir

        return str(spoken_digits_dir())
    for root in ASTERISK_DIRS:
        if root.is_dir() and any(root.glob("*.wav")):
            return str(root)
    raise DataError("the built-in 'asterisk' needs the Debian package asterisk-core-sounds-en-wav "
                    "(apt-get install asterisk-core-sounds-en-wav), which is not installed")


class AudioFiles(torch.utils.data.Dataset):
    """Audio files (a folder, tar shards or a TSV manifest) as 16 kHz mono waveforms, decoded when a batch needs
    them; labels = first-level sub-folder when every file sits in one.

    Lengths come from the files' headers (or the manifest), so nothing is decoded before the first step. A file
    found unreadable or silent when decoded raises a DataError naming it, or with skip_bad_files is counted and
    replaced by the next readable file. Decoded waves are kept in memory while the set's total length is under
    CACHE_SAMPLES.
    """

    max_batch = 16  # feature extraction of whole files: keep batches of long files small

    def __init__(self, samples: SampleList, lengths: np.ndarray, labels: np.ndarray | None, classes: list[str],
                 skip_bad_files: bool, sample_rate: int, bad: set | None = None):
        self.samples, self.lengths = samples, np.asarray(lengths, dtype=np.int64)
        self.labels = None if labels is None else torch.from_numpy(np.asarray(labels)).long()
        self.classes, self.skip_bad_files, self.sample_rate = classes, skip_bad_files, sample_rate
        self.name = samples.root
        self.bad: set[int] = set(bad or ())  # unusable in this set: found at the scan or when decoding
        self.decodes = 0  # files decoded in this process (tests check laziness with it)
        self.scan_skipped = 0  # files refused when the set was listed (unreadable header, empty, too short)
        self._cache: dict[int, np.ndarray] | None = {} if self.lengths.sum() <= CACHE_SAMPLES else None

    @property
    def skipped(self) -> int:
        return self.scan_skipped + len(self.bad)

    @property
    def files(self) -> list[Path]:
        return [Path(self.samples.where(i)) for i in range(len(self))]

    def __len__(self) -> int:
        return len(self.samples)

    def _decode(self, i: int) -> np.ndarray | None:
        if self._cache is not None and i in self._cache:
            return self._cache[i]
        if i in self.bad:
            return None
        self.decodes += 1
        try:
            wave = read_audio(self.samples.open(i), self.sample_rate, self.samples.where(i))
        except DataError as exc:
            if not self.skip_bad_files:
                raise DataError(f"{exc}; remove it or pass --skip-bad-files") from None
            self.bad.add(i)
            return None
        if self._cache is not None:
            self._cache[i] = wave
        return wave

    def wave(self, i: int) -> np.ndarray:
        """File i decoded, or (bad files skipped) the next readable one."""
        n = len(self)
        for j in range(n):
            wave = self._decode((int(i) + j) % n)
            if wave is not None:
                return wave
        raise DataError(f"none of the {n} audio files of {self.name} could be decoded")

    def crop(self, i: int, max_samples: int, rng: np.random.Generator) -> np.ndarray:
        """File i, or a random window of max_samples of it when longer."""
        wave = self.wave(i)
        if max_samples and wave.size > max_samples:
            start = int(rng.integers(0, wave.size - max_samples + 1))
            wave = wave[start : start + max_samples]
        return wave

    def get_batch(self, indices, max_samples: int = 0, rng: np.random.Generator | None = None):
        """(waveforms (B, S) float32 zero-padded, padding_mask (B, S) bool True = padded)."""
        rng = rng or np.random.default_rng(0)
        return pad_batch([self.crop(int(i), max_samples, rng) for i in indices])

    def subset(self, indices: np.ndarray) -> "AudioFiles":
        indices = np.asarray(indices, dtype=np.int64)
        labels = None if self.labels is None else self.labels.numpy()[indices]
        where = {int(old): new for new, old in enumerate(indices)}
        return AudioFiles(self.samples.subset(indices), self.lengths[indices], labels, self.classes,
                          self.skip_bad_files, self.sample_rate, {where[b] for b in self.bad if b in where})


def pad_batch(waves: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    lengths = np.array([w.size for w in waves])
    x = np.zeros((len(waves), lengths.max()), dtype=np.float32)
    for b, w in enumerate(waves):
        x[b, : w.size] = w
    pad = np.arange(x.shape[1])[None, :] >= lengths[:, None]
    return torch.from_numpy(x), torch.from_numpy(pad)


def _header_length(samples: SampleList, i: int, sample_rate: int) -> int:
    """Samples at sample_rate of file i, from its header (soundfile.info: no decoding)."""
    import soundfile as sf

    try:
        info = sf.info(samples.open(i))
    except Exception as exc:
        raise DataError(f"cannot read audio file {samples.where(i)}: {str(exc).strip() or type(exc).__name__}") \
            from None
    if info.frames <= 0:
        raise DataError(f"audio file {samples.where(i)} is empty (no samples)")
    return -(-int(info.frames) * sample_rate // int(info.samplerate))


def load_audio(source: str, skip_bad_files: bool = False, sample_rate: int = 16000, min_samples: int = 400,
               run_dir: Path | None = None) -> AudioFiles:
    """The audio files of a built-in name, a folder (or one file), tar shards or a TSV manifest, listed and their
    lengths read from headers; files too short for the encoder, empty or unreadable are refused (or skipped)."""
    if source in BUILTIN:
        source = _builtin_source(source)
    path = expand(source)
    if path.is_file() and path.suffix.lower() in AUDIO_SUFFIXES:
        samples = _single_file(path)
    elif not path.exists() and "{" not in source:
        raise DataError(f"data {source!r} is neither a built-in speech set ({', '.join(BUILTIN)}) "
                        f"nor an existing path")
    else:
        samples = list_source(source, AUDIO_SUFFIXES, "audio files", run_dir)
    n = len(samples)
    lengths = np.zeros(n, dtype=np.int64)
    bad = set()
    for i in range(n):
        try:
            if samples.frames is not None and samples.frames[i] >= 0:
                lengths[i] = samples.frames[i]  # a manifest's frames are at the model's rate (fairseq)
            else:
                lengths[i] = _header_length(samples, i, sample_rate)
            if lengths[i] < min_samples:
                raise DataError(f"audio file {samples.where(i)} is too short ({lengths[i]} samples at {sample_rate} "
                                f"Hz; the encoder needs at least {min_samples})")
        except DataError as exc:
            if not skip_bad_files:
                raise DataError(f"{exc}; remove it or pass --skip-bad-files") from None
            bad.add(i)
    if len(bad) == n:
        raise DataError(f"none of the {n} audio files of {source} could be used")
    if samples.frames is None:
        samples.frames = lengths  # kept in the run's manifest: a resumed run reads no headers
    labels, classes = labels_from_names(samples.names())
    if bad:  # files refused at the scan never enter the set
        keep = np.array([i for i in range(n) if i not in bad])
        ds = AudioFiles(samples.subset(keep), lengths[keep], None if labels is None else labels[keep], classes,
                        skip_bad_files, sample_rate)
        ds.scan_skipped = len(bad)
        return ds
    return AudioFiles(samples, lengths, labels, classes, skip_bad_files, sample_rate)


def _single_file(path: Path) -> SampleList:
    return from_names("folder", str(path.parent), [path.name])


def default_holdout(source: str) -> list[str]:
    """The probe's held-out files of a built-in labelled set (spoken-digits: two unseen voices), else none."""
    if source == "spoken-digits":
        from d2v.data.spoken_digits import HOLDOUT

        return list(HOLDOUT)
    return []


def labelled_split(ds: AudioFiles, split: str, holdout: list[str] | None = None, test_fraction: float = 0.2,
                   seed: int = 0) -> AudioFiles:
    """The train or test part of a labelled set: files whose path inside their class folder matches a `holdout`
    glob (e.g. 'en-sc_*' for one voice) are the test set; without holdout, a stratified 80/20 split."""
    from d2v.data.vision import _split_indices

    if ds.labels is None:
        raise DataError(f"{ds.name} has no labels (use a folder with one sub-folder per class)")
    if not holdout:
        return ds.subset(_split_indices(ds.labels.numpy(), len(ds), split, test_fraction, seed))
    inner = [name.split("/", 1)[1] if "/" in name else name for name in ds.samples.names()]
    is_test = np.array([any(fnmatch.fnmatch(name, pat) for pat in holdout) for name in inner])
    if not is_test.any() or is_test.all():
        raise DataError(f"--holdout {','.join(holdout)} matches {'no' if not is_test.any() else 'every'} file "
                        f"of {ds.name}; patterns match paths inside the class folders, e.g. 'voiceA_*'")
    return ds.subset(np.flatnonzero(is_test if split == "test" else ~is_test))


# ------------------------------------------------------------------------------------------------ pipeline
BUCKET_WINDOW = 32  # micro-batches whose samples are regrouped by length


def bucketed(order_indices: np.ndarray, lengths: np.ndarray, batch: int, rng: np.random.Generator) -> np.ndarray:
    """(W, batch) dataset indices: a window of W * batch samples in sample order, sorted by length and cut into W
    batches of similar lengths, in a random batch order. Every sample of the window is used exactly once."""
    windows = order_indices.reshape(-1, batch)
    by_length = order_indices[np.argsort(lengths[order_indices], kind="stable")].reshape(windows.shape)
    return by_length[rng.permutation(len(by_length))]


class SpeechPipeline:
    """A micro-batch: files of similar length (windows of BUCKET_WINDOW global batches in the seeded order,
    regrouped by length so padding stays small), random crops of at most data.crop_seconds, zero-padded to the
    longest, with a sample padding mask and wav2vec 2.0 span masks over the valid frames. Files are decoded in
    micro_batch, i.e. in DataLoader workers."""

    reads_files = True

    def __init__(self, cfg: PretrainConfig, run_dir=None):
        from d2v.data.pipeline import SampleOrder
        from d2v.models.speech import receptive_field

        self.cfg = cfg
        m = cfg.model
        if cfg.mask.kind not in ("span", "block_1d"):
            raise ConfigError(f"mask kind {cfg.mask.kind!r} is not available for speech; use 'span' or 'block_1d'")
        if cfg.data.crop_seconds <= 0:
            raise ConfigError(f"data.crop_seconds must be positive, got {cfg.data.crop_seconds}")
        self.receptive_field = receptive_field(m.conv_kernel, m.conv_stride)
        self.max_samples = int(round(cfg.data.crop_seconds * m.sample_rate))
        if self.max_samples < self.receptive_field:
            raise ConfigError(f"data.crop_seconds {cfg.data.crop_seconds} is shorter than the encoder's receptive "
                              f"field ({self.receptive_field} samples)")
        min_samples = max(self.receptive_field, int(round(cfg.data.min_seconds * m.sample_rate)))  # recipe: 32k
        self.dataset = load_audio(cfg.data.source, cfg.data.skip_bad_files, m.sample_rate, min_samples,
                                  run_dir=run_dir)
        self.order = SampleOrder(len(self.dataset), cfg.run.seed)

    @property
    def skipped(self) -> int:
        return self.dataset.skipped

    def run_files(self) -> dict[str, bytes]:
        """The list of audio files with their lengths, kept so a resumed run reads the same files and no headers."""
        from d2v.data.sources import MANIFEST_NAME

        return {MANIFEST_NAME: self.dataset.samples.to_manifest()}

    def indices(self, first: int, count: int) -> np.ndarray:
        """Dataset indices at global sample positions first .. first + count - 1, grouped by length.

        Positions come in windows of BUCKET_WINDOW global batches (run.batch_size samples each, the batch of one
        update); a window's samples are sorted by length and cut into batches of similar lengths, in a random
        order. A position's sample depends only on the seed and the global batch size, never on how an update is
        split over processes or micro-batches, and each process's share of an update is a contiguous run of
        positions, so it is of similar lengths too."""
        from d2v.data.pipeline import rng_for

        B = self.cfg.run.batch_size
        span = BUCKET_WINDOW * B
        lengths = np.minimum(self.dataset.lengths, self.max_samples)  # crops make long files equal
        out = np.empty(count, dtype=np.int64)
        for window in range(first // span, (first + count - 1) // span + 1):
            order = self.order.indices(window * span, span).numpy()
            grouped = bucketed(order, lengths, B, rng_for(self.cfg.run.seed, 4, window)).reshape(-1)
            lo, hi = max(first, window * span), min(first + count, (window + 1) * span)
            out[lo - first: hi - first] = grouped[lo - window * span: hi - window * span]
        return out

    def micro_batch(self, first: int, count: int) -> Batch:
        """The files at global sample positions first .. first + count - 1; the crop and the span mask of each
        come from its own position's generator, so they do not depend on the rest of the micro-batch."""
        from d2v.data.pipeline import make_batch, sample_rngs
        from d2v.masking import block_mask_1d, span_masks
        from d2v.models.speech import conv_output_lengths

        m, mc = self.cfg.model, self.cfg.mask
        idx = self.indices(first, count)
        rngs = sample_rngs(self.cfg.run.seed, 3, first, count)
        wave, pad = pad_batch([self.dataset.crop(int(i), self.max_samples, rng) for i, rng in zip(idx, rngs)])
        lengths = (~pad).sum(dim=1).numpy()
        frames = conv_output_lengths(lengths, m.conv_kernel, m.conv_stride)
        num_frames = conv_output_lengths(wave.shape[1], m.conv_kernel, m.conv_stride)
        clones = mc.clones if self.cfg.recipe == "v2" else 1
        if mc.kind == "block_1d":  # data2vec 2.0: exactly int(ratio x valid frames) per clone, after cropping
            mask = np.stack([block_mask_1d(int(frames[b]), num_frames, mc.ratio, rng, mc.span_length, mc.adjust)
                             for b, rng in enumerate(rngs) for _ in range(clones)])
        else:
            mask = np.concatenate([span_masks(np.repeat(frames[b : b + 1], clones), num_frames, rng, mc.span_prob,
                                              mc.span_length) for b, rng in enumerate(rngs)])
        valid = np.repeat(np.arange(num_frames)[None, :] < frames[:, None], clones, axis=0)
        return make_batch(self.cfg, first, inputs=wave, mask=mask, valid=valid, padding_mask=pad if pad.any() else None)

    def on_device(self, batch: Batch, first: int) -> Batch:
        return batch
