"""Audio I/O: any file libsndfile reads, as mono float32 at the model's sample rate (band-limited resampling),
and batches of waveforms zero-padded to the longest."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from d2v.core.errors import DataError

AUDIO_SUFFIXES = {".wav", ".flac", ".ogg", ".opus", ".mp3", ".aiff", ".aif", ".au"}  # what libsndfile reads
SILENCE_PEAK = 1e-4  # a file whose loudest sample is below this (full scale 1.0) counts as silent


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


def pad_batch(waves: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    lengths = np.array([w.size for w in waves])
    x = np.zeros((len(waves), lengths.max()), dtype=np.float32)
    for b, w in enumerate(waves):
        x[b, : w.size] = w
    pad = np.arange(x.shape[1])[None, :] >= lengths[:, None]
    return torch.from_numpy(x), torch.from_numpy(pad)
