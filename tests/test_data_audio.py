"""Audio at scale: lengths from headers (nothing decoded before the first batch), batches grouped by length, any
format libsndfile reads, resampling by a maintained library, and the generated spoken-digits set."""
import shutil
import subprocess

import numpy as np
import pytest

from conftest import micro
import soundfile as sf

from d2v.data import speech as speech_data
from d2v.data import spoken_digits
from d2v.data.pipeline import build_pipeline
from d2v.data.speech import bucketed
from d2v.data.recordings import load_audio
from d2v.data.audio import read_audio, resample
from d2v.core.errors import DataError

SR = 16000


def tone(seconds, sr=SR, f=220.0):
    t = np.arange(int(seconds * sr)) / sr
    return (0.3 * np.sin(2 * np.pi * f * t)).astype(np.float32)


def test_lengths_come_from_headers_not_decoding(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    seconds = rng.uniform(0.1, 0.6, 60)
    rates = [(8000, 16000, 22050)[i % 3] for i in range(60)]
    for i, (s, sr) in enumerate(zip(seconds, rates)):
        (tmp_path / f"c{i % 2}").mkdir(exist_ok=True)
        sf.write(str(tmp_path / f"c{i % 2}" / f"{i:03d}.flac"), tone(s, sr), sr)
    decoded = []
    real_read = sf.read
    monkeypatch.setattr(sf, "read", lambda *a, **k: decoded.append(1) or real_read(*a, **k))
    ds = load_audio(str(tmp_path))
    assert len(ds) == 60 and not decoded and ds.decodes == 0
    want = {f"c{i % 2}/{i:03d}.flac": -(-int(s * sr) * SR // sr) for i, (s, sr) in enumerate(zip(seconds, rates))}
    assert ds.lengths.tolist() == [want[name] for name in ds.samples.names()]
    assert ds.wave(5).size == ds.lengths[5] and len(decoded) == 1  # decoding agrees with the header


def test_length_buckets_cut_padding():
    rng = np.random.default_rng()
    lengths = rng.integers(8000, 48000, 4096)  # 0.5 s to 3 s
    order = rng.permutation(4096)[: 32 * 16]
    batches = bucketed(order, lengths, 16, rng)
    assert sorted(batches.reshape(-1).tolist()) == sorted(order.tolist())  # each sample once

    def padded(rows):
        L = lengths[rows]
        return (L.max(axis=1, keepdims=True) - L).sum() / (L.max(axis=1) * rows.shape[1]).sum()

    before, after = padded(order.reshape(32, 16)), padded(batches)
    assert after < before / 5, (before, after)  # about 33% -> 2% padding


def test_pipeline_batches_are_bucketed_and_deterministic(tmp_path):
    from test_speech import tiny_config

    for i in range(24):
        sf.write(str(tmp_path / f"{i:02d}.wav"), tone(0.05 + 0.02 * i), SR)
    cfg = tiny_config(tmp_path, **{"data.crop_seconds": 2.0})
    pipe = build_pipeline(cfg)
    W, B = speech_data.BUCKET_WINDOW, cfg.run.batch_size
    window = pipe.indices(0, W * B).reshape(W, B)  # the window's samples, regrouped into batches by length
    assert sorted(window.reshape(-1).tolist()) == sorted(pipe.order.indices(0, W * B).tolist())
    # A position's sample does not depend on how positions are split into micro-batches (processes, accumulation)
    assert np.array_equal(np.concatenate([pipe.indices(p, 3) for p in range(0, W * B, 3)])[:W * B], window.reshape(-1))
    spread = np.ptp(pipe.dataset.lengths[window], axis=1).mean()
    assert spread < 0.25 * np.ptp(pipe.dataset.lengths)  # similar lengths in a batch
    b = micro(pipe, 2)
    again = micro(build_pipeline(tiny_config(tmp_path, **{"data.crop_seconds": 2.0})), 2)
    assert (b.inputs == again.inputs).all() and (b.mask == again.mask).all()


@pytest.mark.parametrize("fmt,ext", [("OGG", "ogg"), ("FLAC", "flac"), ("WAV", "wav")])
def test_formats_libsndfile_reads(tmp_path, fmt, ext):
    if fmt not in sf.available_formats():
        pytest.skip(f"libsndfile here has no {fmt}")
    path = tmp_path / f"x.{ext}"
    sf.write(str(path), tone(0.5, 22050), 22050, format=fmt)
    ds = load_audio(str(tmp_path))
    assert len(ds) == 1 and abs(ds.lengths[0] - 8000) <= 1 and abs(read_audio(path).size - ds.lengths[0]) <= 1


@pytest.mark.parametrize("backend", ["scipy", "soxr"])
def test_resampling_backends_agree(backend, monkeypatch):
    import sys

    if backend == "soxr":
        pytest.importorskip("soxr")
    else:
        monkeypatch.setitem(sys.modules, "soxr", None)  # import soxr fails: scipy's resample_poly
    sr = 44100
    t = np.arange(sr) / sr
    y = resample(np.sin(2 * np.pi * 440 * t) + np.sin(2 * np.pi * 10000 * t), sr, SR)
    assert y.size == SR and y.dtype == np.float32
    want = np.sin(2 * np.pi * 440 * np.arange(SR) / SR)  # the 10 kHz tone is above 8 kHz: filtered out
    assert np.abs(y[1000:-1000] - want[1000:-1000]).max() < 0.02


def test_spoken_digits_names_the_debian_package_when_espeak_is_missing(monkeypatch, tmp_path):
    monkeypatch.setenv("D2V_CACHE_DIR", str(tmp_path))  # an empty cache: nothing generated earlier
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(DataError, match="apt-get install espeak-ng"):
        load_audio("spoken-digits")


def test_spoken_digits_without_espeak_use_the_newest_set_generated_earlier(monkeypatch, tmp_path):
    monkeypatch.setenv("D2V_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(shutil, "which", lambda name: None)
    for version in ("1.9", "1.51", "1.51.1", "1.10"):
        (tmp_path / "spoken-digits" / f"espeak-ng-{version}").mkdir(parents=True)
    (tmp_path / "spoken-digits" / ".tmp-123-espeak-ng-9.0").mkdir()  # an interrupted generation is not a set
    assert spoken_digits.spoken_digits_dir() == tmp_path / "spoken-digits" / "espeak-ng-1.51.1"


@pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng is not installed")
def test_spoken_digits_are_generated_with_held_out_voices(tmp_path, monkeypatch):
    from d2v.data.recordings import default_holdout, labelled_split

    n = spoken_digits.generate(tmp_path / "sd", voices=["en-us", "en-gb", "en-us-nyc"], variants=[""],
                               speeds=[165])
    assert n == 30 and sorted(p.name for p in (tmp_path / "sd").iterdir()) == sorted(spoken_digits.DIGITS)
    import d2v.data.recordings as recordings

    monkeypatch.setattr(recordings, "spoken_digits_dir", lambda: tmp_path / "sd")  # where load_audio looks it up
    ds = load_audio("spoken-digits")
    assert ds.classes == sorted(spoken_digits.DIGITS) and len(ds) == 30
    test = labelled_split(ds, "test", default_holdout("spoken-digits"))
    assert len(test) == 10 and all("en-us-nyc" in str(f) for f in test.files)
    wave = ds.wave(0)
    assert 0.2 * SR < wave.size < 2 * SR and np.abs(wave).max() > 0.5  # a spoken word, normalized


@pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng is not installed")
def test_spoken_digits_generation_is_all_or_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("D2V_CACHE_DIR", str(tmp_path))

    def fail(out, **kw):
        (out / "zero").mkdir(parents=True)
        raise subprocess.CalledProcessError(1, "espeak-ng", stderr=b"voice not found")

    monkeypatch.setattr(spoken_digits, "generate", fail)
    with pytest.raises(DataError, match="voice not found"):
        spoken_digits.spoken_digits_dir()
    assert not any((tmp_path / "spoken-digits").iterdir())  # no half-made set left to be mistaken for a whole one
