"""Synthetic data sets for the data benchmark figures in bench/RESULTS.md (nothing is downloaded):

    python -m d2v.bench.datasets images DIR --count 100000   # small JPEGs: varied sizes and aspect ratios, ~1% grey,
                                                             # ~0.5% CMYK, ~0.5% 16-bit PNG, ~0.1% corrupt
    python -m d2v.bench.datasets audio DIR --count 10000     # FLAC files of 0.5 to 3 s at 16/22.05/44.1 kHz
    python -m d2v.bench.datasets text DIR --megabytes 512    # .txt files of sentences from a 5,000-word vocabulary
    python -m d2v.bench.datasets shards DIR --from FOLDER --count 4   # FOLDER's files, sorted, in 4 tar shards
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np


def images(root: Path, count: int, seed: int = 0, classes: int = 10) -> None:
    from PIL import Image

    rng = np.random.default_rng(seed)
    for c in range(classes):
        (root / f"class{c:02d}").mkdir(parents=True, exist_ok=True)
    for i in range(count):
        d = root / f"class{i % classes:02d}"
        w, h = int(rng.integers(48, 161)), int(rng.integers(48, 161))
        base = rng.integers(0, 256, (h // 8 + 1, w // 8 + 1, 3), dtype=np.uint8)  # smooth-ish blocks, small files
        arr = np.kron(base, np.ones((8, 8, 1), dtype=np.uint8))[:h, :w]
        kind = rng.random()
        if kind < 0.001:
            (d / f"{i:07d}.jpg").write_bytes(b"\xff\xd8\xff\xe0 corrupt")
        elif kind < 0.011:
            Image.fromarray(arr[..., 0]).save(d / f"{i:07d}.jpg", quality=85)
        elif kind < 0.016:
            Image.fromarray(arr).convert("CMYK").save(d / f"{i:07d}.jpg", quality=85)
        elif kind < 0.021:
            Image.fromarray(arr[..., 0].astype(np.uint16) * 257).save(d / f"{i:07d}.png")
        else:
            Image.fromarray(arr).save(d / f"{i:07d}.jpg", quality=85)


def audio(root: Path, count: int, seed: int = 0) -> None:
    import soundfile as sf

    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        sr = int(rng.choice([16000, 22050, 44100]))
        n = int(rng.uniform(0.5, 3.0) * sr)
        t = np.arange(n) / sr
        wave = 0.3 * np.sin(2 * np.pi * rng.uniform(100, 400) * t) + 0.01 * rng.standard_normal(n)
        sf.write(str(root / f"{i:06d}.flac"), wave.astype(np.float32), sr, subtype="PCM_16")


def text(root: Path, megabytes: float, seed: int = 0, file_megabytes: float = 8.0) -> None:
    rng = np.random.default_rng(seed)
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    words = ["".join(rng.choice(letters, size=int(rng.integers(2, 10)))) for _ in range(5000)]
    zipf = 1.0 / np.arange(1, len(words) + 1)
    zipf /= zipf.sum()
    root.mkdir(parents=True, exist_ok=True)
    written, f = 0, 0
    while written < megabytes * 2**20:
        lines = []
        size = 0
        while size < file_megabytes * 2**20:
            line = " ".join(rng.choice(words, size=int(rng.integers(6, 30)), p=zipf)) + ".\n"
            lines.append(line)
            size += len(line)
        (root / f"part{f:05d}.txt").write_text("".join(lines))
        written += size
        f += 1


def shards(root: Path, source: Path, count: int) -> None:
    """source's files in sorted order (as d2v lists a folder), split into `count` uncompressed tars named
    shard-000.tar ... (members named by their paths under source), so the shards hold the folder's order."""
    import tarfile

    files = sorted(p.relative_to(source).as_posix() for p in source.rglob("*") if p.is_file())
    root.mkdir(parents=True, exist_ok=True)
    for s, chunk in enumerate(np.array_split(np.array(files, dtype=object), count)):
        with tarfile.open(root / f"shard-{s:03d}.tar", "w") as tar:
            for name in chunk:
                tar.add(source / name, arcname=name)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("kind", choices=["images", "audio", "text", "shards"])
    p.add_argument("root", type=Path)
    p.add_argument("--count", type=int, default=1000, help="files (images, audio) or shards (shards)")
    p.add_argument("--megabytes", type=float, default=64)
    p.add_argument("--from", dest="source", type=Path, help="shards: the folder to pack")
    a = p.parse_args()
    if a.kind == "images":
        images(a.root, a.count)
    elif a.kind == "audio":
        audio(a.root, a.count)
    elif a.kind == "shards":
        if a.source is None or not a.source.is_dir():
            p.error("shards needs --from FOLDER")
        shards(a.root, a.source, a.count)
    else:
        text(a.root, a.megabytes)


if __name__ == "__main__":
    main()
