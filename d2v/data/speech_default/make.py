"""Regenerate the embedded default speech set: sentences spoken by espeak-ng in several English voices, variants
and speeds, resampled to 16 kHz mono and stored as 16-bit FLAC next to this script.

    python -m d2v.data.speech_default.make      # needs espeak-ng on PATH; deterministic for one espeak-ng version

The sentences contain no number words, so a probe on spoken digits measures transfer, not memorized words.
"""
from __future__ import annotations

import io
import itertools
import subprocess
from pathlib import Path

import numpy as np

from d2v.data.audio import resample

SENTENCES = [
    "The small boat drifted slowly across the quiet harbour at dawn.",
    "Bright yellow leaves were falling on the wet stone path.",
    "She packed a warm coat, a map, and a flask of strong tea.",
    "Heavy rain kept the farmers indoors for most of the week.",
    "A gentle breeze carried the smell of fresh bread down the street.",
    "The old clock in the hall stopped just before midnight.",
    "Please close the window before the storm reaches the valley.",
    "He found a rusty key buried under the garden wall.",
    "The children laughed as the puppy chased its own tail.",
    "Thick fog rolled in from the sea and hid the lighthouse.",
    "We walked along the river until the sun began to set.",
    "The museum opens early on weekdays and late on holidays.",
    "Fresh paint covered the fence, shining white in the morning light.",
    "A loud crash from the kitchen woke everyone in the house.",
    "The train was delayed because of snow on the northern line.",
    "Mix the flour and butter, then add a pinch of salt.",
    "Birds gathered on the wires, ready for their long journey south.",
    "The library smelled of dust, leather, and polished wood.",
    "Our neighbour grows tomatoes, beans, and tall sunflowers.",
    "The captain ordered the crew to lower the sails at once.",
    "A quiet voice in the crowd asked where the station was.",
    "Strong coffee and a good book make a rainy evening pleasant.",
    "The bridge swayed a little as the heavy lorry crossed it.",
    "Every spring the meadow is covered with purple and blue flowers.",
    "The teacher wrote the question slowly on the black board.",
    "Sharp stones on the beach cut through the soles of his shoes.",
    "They built a fire on the hill and watched the stars appear.",
    "The market was crowded with people buying fruit and fish.",
    "Never leave a candle burning in an empty room.",
    "The mountain road twisted past forests, lakes, and silent villages.",
]
VOICES = ["en-us", "en-gb", "en-gb-scotland", "en-gb-x-rp", "en-029", "en-gb-x-gbclan", "en-us-nyc", "en-gb-x-gbcwmd"]
VARIANTS = ["", "+m3", "+f2", "+f4"]
SPEEDS = [140, 165, 190]
SAMPLE_RATE = 16000


def synthesize(text: str, voice: str, speed: int, pitch: int) -> tuple[np.ndarray, int]:
    import soundfile as sf

    wav = subprocess.run(["espeak-ng", "-v", voice, "-s", str(speed), "-p", str(pitch), "--stdout", text],
                         check=True, capture_output=True).stdout
    data, sr = sf.read(io.BytesIO(wav), dtype="float32", always_2d=True)
    return data.mean(axis=1), sr


def main(out: Path = Path(__file__).parent) -> None:
    import soundfile as sf

    rng = np.random.default_rng(0)
    for old in out.glob("*.flac"):
        old.unlink()
    for n, (voice, variant) in enumerate(itertools.product(VOICES, VARIANTS)):
        # one or two sentences per voice and variant: about 2.5 minutes of speech, under 3 MB of FLAC
        for i in rng.choice(len(SENTENCES), size=1 + (n % 3 == 0), replace=False):
            speed, pitch = int(rng.choice(SPEEDS)), int(rng.integers(30, 70))
            wave, sr = synthesize(SENTENCES[i], voice + variant, speed, pitch)
            wave = resample(wave, sr, SAMPLE_RATE)
            wave = wave / max(1e-3, float(np.abs(wave).max())) * 0.9
            name = f"{voice}{variant.replace('+', '_')}_s{speed}_{i:02d}.flac"
            sf.write(str(out / name), wave, SAMPLE_RATE, subtype="PCM_16")
    total = sum(p.stat().st_size for p in out.glob("*.flac"))
    print(f"{len(list(out.glob('*.flac')))} files, {total / 1e6:.2f} MB in {out}")


if __name__ == "__main__":
    main()
