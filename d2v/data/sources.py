"""Where samples come from, listed without reading them: a folder, WebDataset-style tar shards, or a TSV manifest.

A `SampleList` names every sample of a source in a fixed order (sorted paths in a folder; shard then member order
in tar shards; line order in a TSV) and knows how to read one sample's bytes, so decoding can happen later, in
DataLoader workers. Names live in one bytes blob with offsets (not a list of str objects): a million samples cost a
few tens of MB and forked workers share them without copying.

A run keeps its list as `data_manifest.tsv` in the run directory; a resumed run reads it back (and checks it) instead
of listing the source again, so files added since do not shift the sample order.
"""
from __future__ import annotations

import hashlib
import io
import os
import re
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from d2v.errors import DataError

MANIFEST_NAME = "data_manifest.tsv"
_MANIFEST_MAGIC = "# d2v data manifest v1"


def expand(source: str) -> Path:
    """A user's data path with `~` expanded and made absolute."""
    return Path(os.path.expanduser(str(source))).absolute()


def cache_dir() -> Path:
    """Where d2v keeps data it derives (tokenized corpora, trained tokenizers, generated sets): $D2V_CACHE_DIR,
    else $XDG_CACHE_HOME/d2v, else ~/.cache/d2v."""
    if os.environ.get("D2V_CACHE_DIR"):
        return expand(os.environ["D2V_CACHE_DIR"])
    return expand(os.environ.get("XDG_CACHE_HOME") or "~/.cache") / "d2v"


def _braces(pattern: str) -> list[str]:
    """Expand one WebDataset-style range such as shard-{000..099}.tar (zero padding kept)."""
    m = re.search(r"\{(\d+)\.\.(\d+)\}", pattern)
    if not m:
        return [pattern]
    lo, hi, width = int(m.group(1)), int(m.group(2)), len(m.group(1))
    return [s for i in range(lo, hi + 1)
            for s in _braces(pattern[: m.start()] + str(i).zfill(width) + pattern[m.end():])]


@dataclass
class SampleList:
    """Samples of a source: names (relative path or shard key with its member's extension) in a fixed order.

    kind 'folder': name is a path under root. kind 'tar': the bytes are member data in shards[shard[i]] at
    offset[i], size[i] bytes. kind 'tsv': name is a path under root. frames[i], where known, is the length of an
    audio sample at the model's sample rate (fairseq manifests count 16 kHz frames).
    """

    kind: str
    root: str
    blob: np.ndarray  # uint8, every name's UTF-8 bytes back to back
    ends: np.ndarray  # int64 (N,), end offset of name i in blob
    shards: list[str] | None = None
    shard: np.ndarray | None = None  # int32 (N,)
    offset: np.ndarray | None = None  # int64 (N,)
    size: np.ndarray | None = None  # int64 (N,)
    frames: np.ndarray | None = None  # int64 (N,): audio length at the model's rate, or None

    def __len__(self) -> int:
        return int(self.ends.size)

    def name(self, i: int) -> str:
        start = int(self.ends[i - 1]) if i > 0 else 0
        return self.blob[start: int(self.ends[i])].tobytes().decode("utf-8")

    def names(self) -> list[str]:
        return [self.name(i) for i in range(len(self))]

    def where(self, i: int) -> str:
        """A user-readable location of sample i (for error messages)."""
        if self.kind == "tar":
            return f"{self.name(i)} in {self.shards[int(self.shard[i])]}"
        return str(Path(self.root) / self.name(i))

    def path(self, i: int) -> Path | None:
        """The file of sample i, or None when it is a member of a shard."""
        return None if self.kind == "tar" else Path(self.root) / self.name(i)

    def open(self, i: int):
        """A path (files) or a seekable file object over the sample's bytes (shard members)."""
        if self.kind != "tar":
            return str(Path(self.root) / self.name(i))
        with open(self.shards[int(self.shard[i])], "rb") as f:
            f.seek(int(self.offset[i]))
            return io.BytesIO(f.read(int(self.size[i])))

    def read_bytes(self, i: int) -> bytes:
        src = self.open(i)
        if isinstance(src, str):
            with open(src, "rb") as f:
                return f.read()
        return src.getvalue()

    def subset(self, indices) -> "SampleList":
        indices = np.asarray(indices, dtype=np.int64)
        names = [self.name(int(i)) for i in indices]
        pick = lambda a: None if a is None else a[indices]  # noqa: E731
        out = from_names(self.kind, self.root, names)
        out.shards, out.shard, out.offset, out.size, out.frames = (self.shards, pick(self.shard), pick(self.offset),
                                                                    pick(self.size), pick(self.frames))
        return out

    # ------------------------------------------------------------------------------------------ manifest
    def to_manifest(self) -> bytes:
        """The list as a TSV file with a checksum, so a resumed run can verify it reads back the same list."""
        rows = []
        for i in range(len(self)):
            cols = [self.name(i)]
            if self.kind == "tar":
                cols += [str(int(self.shard[i])), str(int(self.offset[i])), str(int(self.size[i]))]
            if self.frames is not None:
                cols.append(str(int(self.frames[i])))
            rows.append("\t".join(cols))
        body = "".join(r + "\n" for r in rows)
        shards = "".join(f"# shard\t{s}\n" for s in (self.shards or []))
        digest = hashlib.sha256((shards + body).encode()).hexdigest()
        header = f"{_MANIFEST_MAGIC}\t{self.kind}\t{self.root}\t{len(self)}\t{digest}\n"
        return (header + shards + body).encode()


def from_names(kind: str, root: str, names: list[str]) -> SampleList:
    encoded = [n.encode("utf-8") for n in names]
    ends = np.cumsum([len(e) for e in encoded], dtype=np.int64) if encoded else np.zeros(0, np.int64)
    blob = np.frombuffer(b"".join(encoded), dtype=np.uint8) if encoded else np.zeros(0, np.uint8)
    return SampleList(kind, root, blob, ends)


def read_manifest(path: Path, source: str) -> SampleList:
    """The sample list a run saved; DataError if it is damaged or was made from another source."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read the run's data manifest {path}: {exc}") from None
    lines = text.split("\n")
    head = lines[0].split("\t")
    if len(head) != 5 or head[0] != _MANIFEST_MAGIC:
        raise DataError(f"{path} is not a d2v data manifest; delete it to list the data again")
    kind, root, count, digest = head[1], head[2], int(head[3]), head[4]
    rest = "\n".join(lines[1:])
    if hashlib.sha256(rest.encode()).hexdigest() != digest:
        raise DataError(f"the run's data manifest {path} is damaged (checksum mismatch); delete it to list the "
                        f"data again (the sample order then follows the data as it is now)")
    if str(expand(source)) != root and source != root:
        raise DataError(f"the run's data manifest lists {root}, but the data is now {source}; resume with the "
                        f"same --data")
    shards = [ln.split("\t", 1)[1] for ln in lines[1:] if ln.startswith("# shard\t")]
    rows = [ln.split("\t") for ln in lines[1 + len(shards):] if ln]
    if len(rows) != count:
        raise DataError(f"the run's data manifest {path} lists {len(rows)} samples but says {count}")
    out = from_names(kind, root, [r[0] for r in rows])
    col = 1
    if kind == "tar":
        out.shards = shards
        out.shard = np.array([int(r[1]) for r in rows], dtype=np.int32)
        out.offset = np.array([int(r[2]) for r in rows], dtype=np.int64)
        out.size = np.array([int(r[3]) for r in rows], dtype=np.int64)
        col = 4
    if rows and len(rows[0]) > col:
        out.frames = np.array([int(r[col]) for r in rows], dtype=np.int64)
    if kind != "tar" and not Path(root).is_dir():
        raise DataError(f"the data folder {root} of this run no longer exists")
    for s in out.shards or []:
        if not Path(s).is_file():
            raise DataError(f"shard {s} of this run no longer exists")
    return out


# ---------------------------------------------------------------------------------------------- listing
def list_folder(root: Path, suffixes: set[str]) -> SampleList:
    """Every file under root with one of `suffixes` (case-insensitive), sorted by relative path; nothing is opened."""
    names = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        rel = os.path.relpath(dirpath, root)
        for f in filenames:
            if os.path.splitext(f)[1].lower() in suffixes:
                names.append(f if rel == "." else os.path.join(rel, f))
    names.sort()
    return from_names("folder", str(root), names)


def shard_paths(source: str) -> list[Path] | None:
    """The tar shards a source names (a .tar file, a brace range, or a folder holding only .tar files), else None."""
    s = str(source)
    if "{" in s and ".." in s:
        paths = [expand(p) for p in _braces(s)]
        missing = [p for p in paths if not p.is_file()]
        if missing:
            raise DataError(f"shard {missing[0]} of {source} does not exist")
        return paths
    path = expand(s)
    if path.is_file() and path.name.endswith(".tar"):
        return [path]
    if path.is_dir():
        entries = [e for e in os.scandir(path) if not e.name.startswith(".")]
        tars = sorted(Path(e.path) for e in entries if e.is_file() and e.name.endswith(".tar"))
        if tars and len(tars) == len(entries):
            return tars
    return None


def list_shards(shards: list[Path], suffixes: set[str], source: str) -> SampleList:
    """One sample per member whose extension is in `suffixes`, read from the tar headers only (members' data is
    skipped over, not read). WebDataset convention: a sample's key is the member name up to its first dot."""
    names, shard, offset, size = [], [], [], []
    for s, path in enumerate(shards):
        try:
            with tarfile.open(path, mode="r:") as tar:
                for member in tar:
                    if not member.isfile():
                        continue
                    base = member.name.rsplit("/", 1)[-1]
                    ext = "." + base.split(".", 1)[1].lower() if "." in base else ""
                    if ext in suffixes or os.path.splitext(base)[1].lower() in suffixes:
                        names.append(member.name)
                        shard.append(s)
                        offset.append(member.offset_data)
                        size.append(member.size)
        except (tarfile.TarError, OSError) as exc:
            raise DataError(f"cannot read shard {path} ({exc}); shards must be uncompressed .tar files") from None
    out = from_names("tar", str(source), names)
    out.shards = [str(p) for p in shards]
    out.shard = np.array(shard, dtype=np.int32)
    out.offset = np.array(offset, dtype=np.int64)
    out.size = np.array(size, dtype=np.int64)
    return out


def list_tsv(path: Path) -> SampleList:
    """A fairseq-style audio manifest: the root folder on the first line, then `relative/path<TAB>frames` lines."""
    try:
        lines = [ln for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read manifest {path}: {exc}") from None
    if len(lines) < 2:
        raise DataError(f"manifest {path} needs a root folder on its first line and one file per line after it")
    root = expand(lines[0].strip()) if os.path.isabs(os.path.expanduser(lines[0].strip())) \
        else (path.parent / lines[0].strip()).resolve()
    names, frames = [], []
    for n, line in enumerate(lines[1:], start=2):
        cols = line.split("\t")
        try:
            names.append(cols[0])
            frames.append(int(cols[1]) if len(cols) > 1 else -1)
        except ValueError:
            raise DataError(f"manifest {path} line {n}: expected 'path<TAB>frames', got {line!r}") from None
    out = from_names("tsv", str(root), names)
    out.frames = np.array(frames, dtype=np.int64)
    return out


def list_source(source: str, suffixes: set[str], what: str, run_dir: Path | None = None) -> SampleList:
    """The samples of a path source: the run's saved manifest when resuming, else a fresh listing."""
    if run_dir is not None and (Path(run_dir) / MANIFEST_NAME).exists():
        return read_manifest(Path(run_dir) / MANIFEST_NAME, source)
    shards = shard_paths(source)
    if shards is not None:
        samples = list_shards(shards, suffixes, source)
        where = f"the shards of {source}"
    else:
        path = expand(source)
        if path.suffix == ".tsv" and path.is_file():
            samples, where = list_tsv(path), str(path)
        elif path.is_dir():
            samples, where = list_folder(path, suffixes), str(path)
        else:
            raise DataError(f"{source} is not a folder, a .tar shard (or folder of them) or a .tsv manifest")
    if len(samples) == 0:
        raise DataError(f"no {what} ({', '.join(sorted(suffixes))}) found in {where}")
    return samples
