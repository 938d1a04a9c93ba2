"""Audio data sets: the embedded default (synthesized speech shipped with the package), Debian's Asterisk prompts,
the generated spoken digits, a folder of audio files, tar shards (on disk or on a server), a fairseq TSV manifest,
or a mixture of several; listed with their lengths from the files' headers, decoded when a batch needs them;
labelled splits for the probe."""
from __future__ import annotations

import fnmatch
import io
from pathlib import Path

import numpy as np
import torch

from d2v.core.errors import DataError
from d2v.data.audio import AUDIO_SUFFIXES, pad_batch, read_audio
from d2v.data.labels import labels_from_names, unlabelled_message
from d2v.data.sampling import split_indices
from d2v.data.remote import is_remote
from d2v.data.sources import SampleList, expand, from_names, list_mixture, list_source
from d2v.data.spoken_digits import HOLDOUT, spoken_digits_dir

DEFAULT_DIR = Path(__file__).with_name("speech_default")  # made by speech_default/make.py
ASTERISK_DIRS = [Path("/usr/share/asterisk/sounds/en"), Path("/usr/share/asterisk/sounds/en_US_f_Allison")]
BUILTIN = ("default", "asterisk", "spoken-digits")
CACHE_SAMPLES = 64_000_000  # decoded audio kept in memory up to this many samples (256 MB); beyond, read per batch


def builtin_source(name: str) -> str:
    """The folder of a built-in speech set (the embedded default, Asterisk's prompts, the generated digits)."""
    if name == "default":
        if not any(DEFAULT_DIR.glob("*.flac")):
            raise DataError(f"the embedded speech default is missing from {DEFAULT_DIR}; reinstall d2v")
        return str(DEFAULT_DIR)
    if name == "spoken-digits":
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
                 skip_bad_files: bool, sample_rate: int, bad: dict[int, str] | None = None):
        self.samples, self.lengths = samples, np.asarray(lengths, dtype=np.int64)
        self.labels = None if labels is None else torch.from_numpy(np.asarray(labels)).long()
        self.classes, self.skip_bad_files, self.sample_rate = classes, skip_bad_files, sample_rate
        self.name = samples.root
        self.bad: dict[int, str] = dict(bad or {})  # unusable in this set -> why: found when decoding
        self.decodes = 0  # files decoded in this process (tests check laziness with it)
        self.scan_bad: list[tuple[str, str]] = []  # (file, why) refused when the set was listed (unreadable header,
        # empty, too short): they never enter the set
        self._cache: dict[int, np.ndarray] | None = {} if self.lengths.sum() <= CACHE_SAMPLES else None

    @property
    def skipped(self) -> int:
        return len(self.scan_bad) + len(self.bad)

    def skipped_files(self) -> list[tuple[str, str]]:
        """(file, why) of each file left out as unusable so far: those refused at the scan, then those found
        undecodable, in sample order."""
        return self.scan_bad + [(self.samples.where(i), self.bad[i]) for i in sorted(self.bad)]

    @property
    def part_sizes(self) -> list[int]:
        """Files per source (a mixture's parts, concatenated)."""
        return self.samples.sizes

    @property
    def files(self) -> list[Path]:
        return [Path(self.samples.where(i)) for i in range(len(self))]

    def prefetch(self, indices) -> None:
        """Fetch a batch's files at once (shards on a server: concurrently), save those decoded already or
        found unreadable."""
        cached = self._cache or {}
        self.samples.prefetch([int(i) for i in indices if int(i) not in cached and int(i) not in self.bad])

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
            self.bad[i] = str(exc)
            return None
        if self._cache is not None:
            self._cache[i] = wave
        return wave

    def read(self, i: int) -> np.ndarray | None:
        """File i alone, decoded; None when it is unreadable and bad files are skipped (never another file)."""
        return self._decode(int(i))

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
        sub = AudioFiles(self.samples.subset(indices), self.lengths[indices], labels, self.classes,
                         self.skip_bad_files, self.sample_rate, {where[b]: why for b, why in self.bad.items()
                                                                 if b in where})
        sub.scan_bad = list(self.scan_bad)  # the set's listing refused them: every part of it names them
        return sub


def _frames_probe(sample_rate: int):
    """For listing shards on a server: the length at sample_rate of a member's bytes as they stream past (the
    header's, as _header_length reads it), or -1, so that no member is fetched again for its header."""
    import soundfile as sf

    def probe(data: bytes) -> int:
        try:
            info = sf.info(io.BytesIO(data))
        except Exception:  # noqa: BLE001 - read again (and reported) by _header_length
            return -1
        return -(-int(info.frames) * sample_rate // int(info.samplerate)) if info.frames > 0 else -1

    return probe


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
    """The audio files of a built-in name, a folder (or one file), tar shards or a TSV manifest, or of a mixture's
    list of them (one set, in order: part_sizes says where each ends), listed and their lengths read from headers;
    files too short for the encoder, empty or unreadable are refused (or skipped)."""
    if isinstance(source, (list, tuple)):
        resolved = [builtin_source(s) if s in BUILTIN else s for s in source]
        samples = list_mixture(resolved, lambda s: _audio_samples(s, sample_rate), run_dir)
        source = " + ".join(source)
    else:
        samples = _audio_samples(builtin_source(source) if source in BUILTIN else source, sample_rate, run_dir)
    n = len(samples)
    lengths = np.zeros(n, dtype=np.int64)
    bad: dict[int, str] = {}
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
            bad[i] = str(exc)
    if len(bad) == n:
        raise DataError(f"none of the {n} audio files of {source} could be used")
    samples.frames = lengths  # kept in the run's manifest: a resumed run reads no headers
    labels, classes = labels_from_names(samples.names())
    if bad:  # files refused at the scan never enter the set
        keep = np.array([i for i in range(n) if i not in bad])
        ds = AudioFiles(samples.subset(keep), lengths[keep], None if labels is None else labels[keep], classes,
                        skip_bad_files, sample_rate)
        ds.scan_bad = [(samples.where(i), why) for i, why in sorted(bad.items())]
        return ds
    return AudioFiles(samples, lengths, labels, classes, skip_bad_files, sample_rate)


def _audio_samples(source: str, sample_rate: int, run_dir: Path | None = None) -> SampleList:
    """The listed files of one path or URL source (a built-in already resolved to its folder)."""
    if is_remote(source):
        return list_source(source, AUDIO_SUFFIXES, "audio files", run_dir, probe=_frames_probe(sample_rate))
    path = expand(source)
    if path.is_file() and path.suffix.lower() in AUDIO_SUFFIXES:
        return _single_file(path)
    if not path.exists() and "{" not in source:
        raise DataError(f"data {source!r} is neither a built-in speech set ({', '.join(BUILTIN)}) "
                        f"nor an existing path or URL")
    return list_source(source, AUDIO_SUFFIXES, "audio files", run_dir)


def _single_file(path: Path) -> SampleList:
    return from_names("folder", str(path.parent), [path.name])


def default_holdout(source: str) -> list[str]:
    """The probe's held-out files of a built-in labelled set (spoken-digits: two unseen voices), else none."""
    if source == "spoken-digits":
        return list(HOLDOUT)
    return []


def labelled_split(ds: AudioFiles, split: str, holdout: list[str] | None = None, test_fraction: float = 0.2,
                   seed: int = 0) -> AudioFiles:
    """The train or test part of a labelled set: files whose path inside their class folder matches a `holdout`
    glob (e.g. 'en-sc_*' for one voice) are the test set; without holdout, a stratified 80/20 split."""
    if ds.labels is None:
        raise DataError(unlabelled_message(ds.name, ds.samples.names(), "use a folder with one sub-folder per class"))
    if not holdout:
        return ds.subset(split_indices(ds.labels.numpy(), len(ds), split, test_fraction, seed))
    inner = [name.split("/", 1)[1] if "/" in name else name for name in ds.samples.names()]
    is_test = np.array([any(fnmatch.fnmatch(name, pat) for pat in holdout) for name in inner])
    if not is_test.any() or is_test.all():
        raise DataError(f"--holdout {','.join(holdout)} matches {'no' if not is_test.any() else 'every'} file "
                        f"of {ds.name}; patterns match paths inside the class folders, e.g. 'voiceA_*'")
    return ds.subset(np.flatnonzero(is_test if split == "test" else ~is_test))
