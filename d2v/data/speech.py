"""Speech data: the embedded default (synthesized speech shipped with the package), Debian's Asterisk prompts, or a
folder of .wav/.flac files; every file becomes 16 kHz mono float32. SpeechPipeline crops, pads and span-masks them.
"""
from __future__ import annotations

import fnmatch
import math
import os
from pathlib import Path

import numpy as np
import torch

from d2v.config import PretrainConfig
from d2v.data.labels import labels_from_subfolders
from d2v.errors import ConfigError, DataError
from d2v.objective import Batch

AUDIO_SUFFIXES = {".wav", ".flac"}
DEFAULT_DIR = Path(__file__).with_name("speech_default")  # made by speech_default/make.py
ASTERISK_DIRS = [Path("/usr/share/asterisk/sounds/en"), Path("/usr/share/asterisk/sounds/en_US_f_Allison")]
BUILTIN = ("default", "asterisk")
SILENCE_PEAK = 1e-4  # a file whose loudest sample is below this (full scale 1.0) counts as silent
CACHE_SAMPLES = 64_000_000  # decoded audio kept in memory up to this many samples (256 MB); beyond, read per batch


# ------------------------------------------------------------------------------------------------ resampling
def _sinc_kernels(up: int, down: int, zeros: int = 16, rolloff: float = 0.945) -> tuple[np.ndarray, int]:
    """Polyphase windowed-sinc filters: (up, K) taps, one row per output phase, and the half-width W.

    Output sample m * up + i sits at input time m * down + i * down / up; row i holds h(j - i * down / up) for input
    offsets j in [-W, W + down), h a Hann-windowed sinc low-passed at rolloff * min(1, up / down) of the input
    Nyquist, so downsampling does not alias.
    """
    cutoff = rolloff * min(1.0, up / down)  # in units of the input Nyquist
    width = int(math.ceil(zeros / cutoff))
    j = np.arange(-width, width + down, dtype=np.float64)
    tau = j[None, :] - (np.arange(up, dtype=np.float64) * down / up)[:, None]  # (up, K) input-sample offsets
    window = np.where(np.abs(tau) <= width, 0.5 * (1 + np.cos(np.pi * tau / width)), 0.0)
    return cutoff * np.sinc(cutoff * tau) * window, width


def resample(wave: np.ndarray, orig_sr: int, new_sr: int) -> np.ndarray:
    """Band-limited resampling of a 1-D float signal; returns ceil(len * new_sr / orig_sr) float32 samples."""
    wave = np.asarray(wave, dtype=np.float32)
    if orig_sr == new_sr or wave.size == 0:
        return wave
    g = math.gcd(int(orig_sr), int(new_sr))
    up, down = new_sr // g, orig_sr // g
    kernels, width = _sinc_kernels(up, down)
    n_out = -(-wave.size * up // down)
    x = torch.from_numpy(wave)[None, None]  # (1, 1, N)
    steps = -(-n_out // up)  # conv outputs needed per phase
    right = max(0, (steps - 1) * down + kernels.shape[1] - width - wave.size)
    x = torch.nn.functional.pad(x, (width, right))
    w = torch.from_numpy(kernels.astype(np.float32))[:, None, :]  # (up, 1, K)
    y = torch.nn.functional.conv1d(x, w, stride=down)[0, :, :steps]  # (up, steps): phase i of output m
    return y.t().reshape(-1)[:n_out].numpy()


# ------------------------------------------------------------------------------------------------ files
def read_audio(path: Path, sample_rate: int = 16000) -> np.ndarray:
    """A file as mono float32 at `sample_rate`; DataError naming the file if it is unreadable, empty or silent."""
    import soundfile as sf

    try:
        data, sr = sf.read(str(path), dtype="float32", always_2d=True)
    except Exception as exc:
        raise DataError(f"cannot decode audio file {path}: {str(exc).strip() or type(exc).__name__}") from None
    if data.shape[0] == 0:
        raise DataError(f"audio file {path} is empty (no samples)")
    wave = resample(data.mean(axis=1), sr, sample_rate)
    if not np.isfinite(wave).all():
        raise DataError(f"audio file {path} contains NaN or infinite samples")
    if np.abs(wave).max() < SILENCE_PEAK:
        raise DataError(f"audio file {path} is silent (peak below {SILENCE_PEAK:g} of full scale)")
    return wave


def _builtin_dir(name: str) -> Path:
    if name == "default":
        if not any(DEFAULT_DIR.glob("*.flac")):
            raise DataError(f"the embedded speech default is missing from {DEFAULT_DIR}; reinstall d2v")
        return DEFAULT_DIR
    for root in ASTERISK_DIRS:
        if root.is_dir() and any(root.glob("*.wav")):
            return root
    raise DataError("the built-in 'asterisk' needs the Debian package asterisk-core-sounds-en-wav "
                    "(apt-get install asterisk-core-sounds-en-wav), which is not installed")


class AudioFiles(torch.utils.data.Dataset):
    """Audio files as 16 kHz mono waveforms; labels = first-level sub-folder when every file sits in one.

    Every file is decoded once when the set is built (so a bad file fails at once, naming it) and kept in memory
    while the total stays under CACHE_SAMPLES.
    """

    max_batch = 16  # feature extraction of whole files: keep batches of long files small

    def __init__(self, root: Path, files: list[Path], lengths: np.ndarray, waves: list[np.ndarray] | None,
                 labels: np.ndarray | None, classes: list[str], skipped: int, sample_rate: int):
        self.root, self.files, self.lengths, self.waves = root, files, lengths, waves
        self.labels = None if labels is None else torch.from_numpy(labels).long()
        self.classes, self.skipped, self.sample_rate = classes, skipped, sample_rate
        self.name = str(root)

    def __len__(self) -> int:
        return len(self.files)

    def wave(self, i: int) -> np.ndarray:
        return self.waves[i] if self.waves is not None else read_audio(self.files[i], self.sample_rate)

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
        waves = None if self.waves is None else [self.waves[i] for i in indices]
        return AudioFiles(self.root, [self.files[i] for i in indices], self.lengths[indices], waves, labels,
                          self.classes, self.skipped, self.sample_rate)


def pad_batch(waves: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    lengths = np.array([w.size for w in waves])
    x = np.zeros((len(waves), lengths.max()), dtype=np.float32)
    for b, w in enumerate(waves):
        x[b, : w.size] = w
    pad = np.arange(x.shape[1])[None, :] >= lengths[:, None]
    return torch.from_numpy(x), torch.from_numpy(pad)


def load_audio(source: str, skip_bad_files: bool = False, sample_rate: int = 16000, min_samples: int = 400) -> AudioFiles:
    """Every audio file under a built-in name or a folder (or one file), decoded and checked."""
    if source in BUILTIN:
        root = _builtin_dir(source)
    else:
        root = Path(os.path.expanduser(source))
        if not root.exists():
            raise DataError(f"data {source!r} is neither a built-in speech set ({', '.join(BUILTIN)}) "
                            f"nor an existing path")
    if root.is_file():
        files, root = [root], root.parent
    else:
        files = sorted(p for p in root.rglob("*") if p.suffix.lower() in AUDIO_SUFFIXES and p.is_file())
    if not files:
        raise DataError(f"no audio files ({', '.join(sorted(AUDIO_SUFFIXES))}) found under {root}")
    good, waves, lengths, skipped, total = [], [], [], 0, 0
    for path in files:
        try:
            wave = read_audio(path, sample_rate)
            if wave.size < min_samples:
                raise DataError(f"audio file {path} is too short ({wave.size} samples at {sample_rate} Hz; "
                                f"the encoder needs at least {min_samples})")
        except DataError as exc:
            if not skip_bad_files:
                raise DataError(f"{exc}; remove it or pass --skip-bad-files") from None
            skipped += 1
            continue
        good.append(path)
        lengths.append(wave.size)
        total += wave.size
        if total <= CACHE_SAMPLES:
            waves.append(wave)
    if not good:
        raise DataError(f"none of the {len(files)} audio files under {root} could be used")
    cached = len(waves) == len(good)
    labels, classes = labels_from_subfolders(root, good)
    return AudioFiles(root, good, np.array(lengths), waves if cached else None, labels, classes, skipped, sample_rate)


def labelled_split(ds: AudioFiles, split: str, holdout: list[str] | None = None, test_fraction: float = 0.2,
                   seed: int = 0) -> AudioFiles:
    """The train or test part of a labelled set: files whose path inside their class folder matches a `holdout`
    glob (e.g. 'en-sc_*' for one voice) are the test set; without holdout, a stratified 80/20 split."""
    from d2v.data.vision import _split_indices

    if ds.labels is None:
        raise DataError(f"{ds.name} has no labels (use a folder with one sub-folder per class)")
    if not holdout:
        return ds.subset(_split_indices(ds.labels.numpy(), len(ds), split, test_fraction, seed))
    inner = [Path(*p.relative_to(ds.root).parts[1:]).as_posix() for p in ds.files]
    is_test = np.array([any(fnmatch.fnmatch(name, pat) for pat in holdout) for name in inner])
    if not is_test.any() or is_test.all():
        raise DataError(f"--holdout {','.join(holdout)} matches {'no' if not is_test.any() else 'every'} file "
                        f"of {ds.name}; patterns match paths inside the class folders, e.g. 'voiceA_*'")
    return ds.subset(np.flatnonzero(is_test if split == "test" else ~is_test))


# ------------------------------------------------------------------------------------------------ pipeline
class SpeechPipeline:
    """Micro-batch k: batch_size files in a seeded order, random crops of at most data.crop_seconds, zero-padded to
    the longest, with a sample padding mask and wav2vec 2.0 span masks over the valid frames."""

    def __init__(self, cfg: PretrainConfig):
        from d2v.data.pipeline import SampleOrder
        from d2v.models.speech import receptive_field

        self.cfg = cfg
        m = cfg.model
        if cfg.mask.kind != "span":
            raise ConfigError(f"mask kind {cfg.mask.kind!r} is not available for speech; use 'span'")
        if cfg.data.crop_seconds <= 0:
            raise ConfigError(f"data.crop_seconds must be positive, got {cfg.data.crop_seconds}")
        self.receptive_field = receptive_field(m.conv_kernel, m.conv_stride)
        self.max_samples = int(round(cfg.data.crop_seconds * m.sample_rate))
        if self.max_samples < self.receptive_field:
            raise ConfigError(f"data.crop_seconds {cfg.data.crop_seconds} is shorter than the encoder's receptive "
                              f"field ({self.receptive_field} samples)")
        min_samples = max(self.receptive_field, int(round(cfg.data.min_seconds * m.sample_rate)))  # recipe: 32k
        self.dataset = load_audio(cfg.data.source, cfg.data.skip_bad_files, m.sample_rate, min_samples)
        self.order = SampleOrder(len(self.dataset), cfg.run.seed)

    @property
    def skipped(self) -> int:
        return self.dataset.skipped

    def micro_batch(self, first: int, count: int) -> Batch:
        """The files at global sample positions first .. first + count - 1; the crop and the span mask of each
        come from its own position's generator, so they do not depend on the rest of the micro-batch."""
        from d2v.data.pipeline import sample_rngs
        from d2v.masking import span_masks
        from d2v.models.speech import conv_output_lengths

        m, mc = self.cfg.model, self.cfg.mask
        idx = self.order.indices(first, count)
        rngs = sample_rngs(self.cfg.run.seed, 3, first, count)
        wave, pad = pad_batch([self.dataset.crop(int(i), self.max_samples, rng) for i, rng in zip(idx, rngs)])
        lengths = (~pad).sum(dim=1).numpy()
        frames = conv_output_lengths(lengths, m.conv_kernel, m.conv_stride)
        num_frames = conv_output_lengths(wave.shape[1], m.conv_kernel, m.conv_stride)
        mask = np.concatenate([span_masks(frames[b : b + 1], num_frames, rng, mc.span_prob, mc.span_length)
                               for b, rng in enumerate(rngs)])
        return Batch(inputs=wave, mask=torch.from_numpy(mask), padding_mask=pad if pad.any() else None)

    def on_device(self, batch: Batch, first: int) -> Batch:
        return batch
