"""`d2v embed`: an encoder's pooled representation of every item of a data source, written as OUT (.npy, float32
(N, D), row i = item i) and OUT's index beside it (OUT with .index.tsv: row, item, and the class where the source
has classes).

Resumable: rows are written into a partial file (.OUT.partial/) as they are computed, with the count done saved
after each flush; a run stopped for any reason and started again with the same encoder, data and options continues
from there. The outputs appear whole at the end (index first, then the .npy), never half-written."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from d2v.core.device import resolve_device
from d2v.core.errors import ConfigError, DataError
from d2v.core.files import atomic_write, atomic_write_bytes, atomic_write_json, check_writable_file
from d2v.data.items import Items, batches, load_items
from d2v.encoders.features import pool_error, pooled
from d2v.encoders.load import load_encoder

SAVE_SECONDS = 30.0  # the partial file's progress is made durable at least this often


@dataclass
class EmbedSummary:
    out: Path
    index: Path
    rows: int
    dim: int
    skipped: list[str]  # items left out as unreadable (with skip_bad_files)
    resumed_from: int  # items already done by an earlier, stopped run (0: a fresh start)
    seconds: float


def index_path(out: Path) -> Path:
    """The index file that goes with embeddings written to `out`."""
    return out.with_name(out.name[: -len(".npy")] + ".index.tsv" if out.name.endswith(".npy") else out.name + ".index.tsv")


def check_out(out: Path) -> None:
    """OUT must be a .npy file that can be written."""
    if out.suffix != ".npy":
        raise ConfigError(f"--out {out} must end in .npy (embeddings are written as a NumPy array)")
    check_writable_file(out, "--out")


def _key(encoder_path: Path, items: Items, options: dict) -> str:
    """What a partial file must have been made from to be continued: the encoder's files, the items, the options."""
    h = hashlib.sha256(json.dumps(options, sort_keys=True).encode())
    for name in ("config.json", "model.safetensors"):
        f = encoder_path / name
        if f.exists():
            st = f.stat()
            h.update(f"{name}\0{st.st_size}\0{st.st_mtime_ns}\0".encode())
    latest = encoder_path / "checkpoints" / "latest"
    if latest.exists():
        h.update(latest.read_bytes())
    for name in items.names:
        h.update(name.encode() + b"\0")
    return h.hexdigest()


class Partial:
    """The rows done so far: .OUT.partial/{rows.npy (N, D) float32 memory map, done.json}."""

    def __init__(self, out: Path, key: str, n: int, dim: int):
        self.dir = out.with_name(f".{out.name}.partial")
        self.key, self.n, self.dim = key, n, dim
        self.done, self.bad = 0, []
        state = self._read()
        if state is None:
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir.mkdir()
            self.rows = np.lib.format.open_memmap(self.dir / "rows.npy", mode="w+", dtype=np.float32, shape=(n, dim))
            self._save()
        else:
            self.done, self.bad = int(state["done"]), [int(i) for i in state["bad"]]
            self.rows = np.lib.format.open_memmap(self.dir / "rows.npy", mode="r+")

    def _read(self) -> dict | None:
        try:
            state = json.loads((self.dir / "done.json").read_text())
            rows = np.load(self.dir / "rows.npy", mmap_mode="r")
        except (OSError, ValueError):
            return None
        same = state.get("key") == self.key and rows.shape == (self.n, self.dim)
        return state if same and 0 <= state.get("done", -1) <= self.n else None

    def _save(self) -> None:
        atomic_write_json(self.dir / "done.json", {"key": self.key, "done": self.done, "bad": self.bad})

    def write(self, first: int, kept: list[int], vectors: np.ndarray, upto: int) -> None:
        """Rows of `kept` items (in order) and the end `upto` of the batch that began at `first`."""
        self.rows[kept] = vectors
        self.bad += sorted(set(range(first, upto)) - set(kept))
        self.done = upto

    def flush(self) -> None:
        self.rows.flush()
        self._save()

    def remove(self) -> None:
        del self.rows
        shutil.rmtree(self.dir, ignore_errors=True)


def embed(encoder_path: str | Path, source: str, out: Path, layer: int = 0, pool: str = "mean", split: str = "all",
          batch_size: int = 64, device: str = "auto", skip_bad_files: bool = False, doc_per_line: bool = False,
          num_workers: int = -1, progress=None) -> EmbedSummary:
    """Embed every item of `source` with the encoder at `encoder_path` into `out` (see the module docstring).
    progress(items done, items total) is called after each batch."""
    t0 = time.perf_counter()
    out, encoder_path = Path(out).expanduser(), Path(encoder_path).expanduser()
    check_out(out)
    dev = resolve_device(device)
    encoder = load_encoder(encoder_path, dev)
    problem = pool_error(encoder.cfg, layer, pool)
    if problem:
        raise ConfigError(problem)
    items = load_items(source, encoder, split, skip_bad_files, doc_per_line)
    if len(items) == 0:
        raise DataError(f"{source} holds no items to embed")
    options = {"source": source, "layer": layer, "pool": pool, "split": split, "doc_per_line": doc_per_line}
    partial = Partial(out, _key(encoder_path, items, options), len(items), encoder.cfg.dim)
    resumed, last_save = partial.done, time.perf_counter()
    workers = num_workers if num_workers >= 0 else (min(4, max(1, (os.cpu_count() or 1) - 1)) if items.reads_files
                                                    else 0)
    for first, upto, inputs, kept in batches(items, batch_size, partial.done, workers):
        vectors = np.zeros((0, encoder.cfg.dim), np.float32)
        if kept:
            vectors = pooled(encoder, tuple(t.to(dev) for t in inputs), layer, pool).float().cpu().numpy()
        partial.write(first, kept, vectors, upto)
        if time.perf_counter() - last_save >= SAVE_SECONDS:
            partial.flush()
            last_save = time.perf_counter()
        if progress is not None:
            progress(upto, len(items))
    partial.flush()
    return _finish(out, items, partial, resumed, t0)


def _finish(out: Path, items: Items, partial: Partial, resumed: int, t0: float) -> EmbedSummary:
    """The index, then the array, each written whole; then the partial file goes."""
    bad = set(partial.bad)
    if len(bad) == len(items):
        raise DataError(f"none of the {len(items)} items could be read")
    keep = np.array([i for i in range(len(items)) if i not in bad], dtype=np.int64)
    labelled = items.labels is not None
    lines = ["row\titem" + ("\tclass" if labelled else "")]
    for row, i in enumerate(keep.tolist()):
        name = items.names[i].replace("\t", " ").replace("\n", " ")
        lines.append(f"{row}\t{name}" + (f"\t{items.class_name(i)}" if labelled else ""))
    index = index_path(out)
    atomic_write_bytes(index, ("\n".join(lines) + "\n").encode())
    rows = np.asarray(partial.rows[keep], dtype=np.float32)
    atomic_write(out, lambda f: np.save(f, rows, allow_pickle=False))
    partial.remove()
    return EmbedSummary(out, index, len(keep), rows.shape[1], [items.names[i] for i in sorted(bad)], resumed,
                        time.perf_counter() - t0)

