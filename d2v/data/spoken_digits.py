"""The built-in labelled speech set 'spoken-digits': the words zero to nine spoken by espeak-ng in eight English
voices, four voice variants and three speeds, one sub-folder per digit (960 files, 16 kHz FLAC).

It is generated once, when first asked for, into the d2v cache (~/.cache/d2v/spoken-digits/<espeak-ng version>);
the probe holds out two voices (HOLDOUT) so its figure measures transfer to unseen speakers:

    d2v probe ENCODER --data spoken-digits
"""
from __future__ import annotations

import itertools
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np

from d2v.core.errors import DataError
from d2v.data.audio import resample
from d2v.data.sources import cache_dir
from d2v.data.speech_default.make import synthesize

DIGITS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
VOICES = ["en-us", "en-gb", "en-gb-scotland", "en-gb-x-rp", "en-029", "en-gb-x-gbclan", "en-us-nyc", "en-gb-x-gbcwmd"]
VARIANTS = ["", "+m3", "+f2", "+f4"]
SPEEDS = [140, 165, 190]
HOLDOUT = ["en-us-nyc*", "en-gb-x-gbcwmd*"]  # voices the probe tests on (file names inside the digit folders)
SAMPLE_RATE = 16000


def espeak_version() -> str:
    """The installed espeak-ng's version; DataError naming the Debian package when it is missing."""
    exe = shutil.which("espeak-ng")
    if exe is None:
        raise DataError("the built-in 'spoken-digits' is generated with espeak-ng, which is not installed "
                        "(Debian/Ubuntu: apt-get install espeak-ng)")
    out = subprocess.run([exe, "--version"], capture_output=True, text=True, check=False).stdout
    words = out.split()
    return words[words.index("text-to-speech:") + 1] if "text-to-speech:" in words else "unknown"


def generate(out: Path, voices=VOICES, variants=VARIANTS, speeds=SPEEDS) -> int:
    """Write out/<digit>/<voice><variant>_s<speed>_p<pitch>.flac for every combination; returns the file count."""
    import soundfile as sf

    rng = np.random.default_rng(0)
    count = 0
    for d, word in enumerate(DIGITS):
        (out / word).mkdir(parents=True, exist_ok=True)
        for voice, variant, speed in itertools.product(voices, variants, speeds):
            pitch = int(rng.integers(30, 70))
            wave, sr = synthesize(word, voice + variant, speed, pitch)
            wave = resample(wave, sr, SAMPLE_RATE)
            wave = wave / max(1e-3, float(np.abs(wave).max())) * 0.9
            name = f"{voice}{variant.replace('+', '_')}_s{speed}_p{pitch}.flac"
            sf.write(str(out / word / name), wave, SAMPLE_RATE, subtype="PCM_16")
            count += 1
    return count


def _version_key(name: str) -> tuple:
    """'espeak-ng-1.51.1' -> (1, 51, 1): numeric order of the generated sets' folder names."""
    return tuple(int(x) if x.isdigit() else -1 for x in name.removeprefix("espeak-ng-").split("."))


def spoken_digits_dir() -> Path:
    """The generated set's folder, made now if it is not in the cache yet (about a minute)."""
    if shutil.which("espeak-ng") is None:
        # Without espeak-ng (a GPU machine with a copied cache, say), a set generated earlier still serves; with
        # several, the newest espeak-ng's. Generating one needs espeak-ng, and espeak_version() says so.
        made = sorted((cache_dir() / "spoken-digits").glob("espeak-ng-*"), key=lambda p: _version_key(p.name))
        if made:
            return made[-1]
    version = espeak_version()
    root = cache_dir() / "spoken-digits" / f"espeak-ng-{version}"
    if root.is_dir():
        return root
    tmp = root.with_name(f".tmp-{os.getpid()}-{root.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        generate(tmp)
        os.replace(tmp, root)  # complete or absent: an interrupted generation is redone
    except subprocess.CalledProcessError as exc:
        raise DataError(f"espeak-ng failed while generating spoken-digits: "
                        f"{exc.stderr.decode(errors='replace').strip() or exc}") from None
    except OSError as exc:
        if root.is_dir():  # another process finished first
            return root
        raise DataError(f"cannot write spoken-digits to {root.parent} ({exc}); set D2V_CACHE_DIR to a writable "
                        f"folder") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root
