"""Where samples come from, listed without reading them: a folder, WebDataset-style tar shards (on disk or on a
server: d2v.data.remote), or a TSV manifest; and a mixture of several such sources.

A `SampleList` names every sample of a source in a fixed order (sorted paths in a folder; shard then member order
in tar shards; line order in a TSV) and knows how to read one sample's bytes, so decoding can happen later, in
DataLoader workers. Names live in one bytes blob with offsets (not a list of str objects): a million samples cost a
few tens of MB and forked workers share them without copying.

Shards on a server are listed by reading each once, start to end, without writing it anywhere (the tar headers give
each member's offset and size; a `probe` may look at each member's bytes as they pass, e.g. for an audio length);
samples are then read by offset, one Range request each, the members of a micro-batch fetched concurrently
(`prefetch`). So a remote shard set has the same samples in the same order as the same shards on disk, and a run
reads the same bytes wherever its shards are.

A run keeps its list as `data_manifest.tsv` in the run directory; a resumed run reads it back (and checks it) instead
of listing the source again, so files added since do not shift the sample order (and remote shards are not read
again to list them). A `MixedSamples` (several sources) keeps one manifest of all its parts.
"""
from __future__ import annotations

import hashlib
import io
import os
import re
import tarfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from d2v.core.errors import DataError
from d2v.core.files import atomic_write_bytes
from d2v.data import remote

MANIFEST_NAME = "data_manifest.tsv"
_MANIFEST_MAGIC = "# d2v data manifest v1"
_MIXTURE_MAGIC = "# d2v data manifest mixture v1"
LIST_THREADS = 8  # remote shards listed at once
PROBE_BYTES = 64 << 20  # a remote member larger than this is not handed to a listing probe (memory stays bounded)
PREFETCH_BYTES = 64 << 20  # bytes of remote members fetched ahead by sequential passes (opened)


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
    offset[i], size[i] bytes; shards are paths, or URLs (remote) with their listed sizes in shard_bytes and the
    sha256 of their bytes in shard_sha256 (known when listed in this process). kind 'tsv': name is a path under
    root. frames[i], where known, is the length of an audio sample at the model's sample rate (fairseq manifests
    count 16 kHz frames).
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
    shard_bytes: np.ndarray | None = None  # int64 (shards,): remote shards' sizes as listed
    shard_sha256: list[str] | None = None  # remote shards' digests, from the listing pass (not kept in manifests)
    fetched: dict = field(default_factory=dict, repr=False, compare=False)  # prefetched member bytes, by index

    def __len__(self) -> int:
        return int(self.ends.size)

    @property
    def sizes(self) -> list[int]:
        """Samples per source: one source here (MixedSamples has several)."""
        return [len(self)]

    @property
    def remote(self) -> bool:
        """Whether the samples are members of shards on a server."""
        return self.kind == "tar" and bool(self.shards) and remote.is_remote(self.shards[0])

    def _request(self, i: int) -> tuple[str, int, int, int | None]:
        s = int(self.shard[i])
        total = None if self.shard_bytes is None else int(self.shard_bytes[s])
        return self.shards[s], int(self.offset[i]), int(self.size[i]), total

    def prefetch(self, indices) -> None:
        """Fetch the bytes of these samples at once, concurrently (remote shards; elsewhere nothing to do), so
        that open() finds them in memory. Holds one call's samples: the previous call's are dropped."""
        if not self.remote:
            return
        wanted = sorted({int(i) for i in indices})
        self.fetched = {}
        self.fetched = dict(zip(wanted, remote.read_ranges([self._request(i) for i in wanted])))

    def opened(self, indices):
        """(index, what open() gives) for each index in order; remote members are fetched ahead concurrently, in
        groups of at most PREFETCH_BYTES (or one member), so a pass over a remote source is not one round trip
        per member."""
        indices = [int(i) for i in indices]
        if not self.remote:
            for i in indices:
                yield i, self.open(i)
            return
        start = 0
        while start < len(indices):
            stop, budget = start + 1, int(self.size[indices[start]])
            while stop < len(indices) and budget + int(self.size[indices[stop]]) <= PREFETCH_BYTES:
                budget += int(self.size[indices[stop]])
                stop += 1
            self.prefetch(indices[start:stop])
            for i in indices[start:stop]:
                yield i, self.open(i)
            start = stop
        self.fetched = {}

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
        if self.remote:
            data = self.fetched.get(i)
            return io.BytesIO(data if data is not None else remote.read_range(*self._request(i)))
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
        out.shard_bytes, out.shard_sha256 = self.shard_bytes, self.shard_sha256
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
        sizes = [""] * len(self.shards or []) if self.shard_bytes is None else [f"\t{n}" for n in self.shard_bytes]
        shards = "".join(f"# shard\t{s}{n}\n" for s, n in zip(self.shards or [], sizes))
        digest = hashlib.sha256((shards + body).encode()).hexdigest()
        header = f"{_MANIFEST_MAGIC}\t{self.kind}\t{self.root}\t{len(self)}\t{digest}\n"
        return (header + shards + body).encode()


def from_names(kind: str, root: str, names: list[str]) -> SampleList:
    encoded = [n.encode("utf-8") for n in names]
    ends = np.cumsum([len(e) for e in encoded], dtype=np.int64) if encoded else np.zeros(0, np.int64)
    blob = np.frombuffer(b"".join(encoded), dtype=np.uint8) if encoded else np.zeros(0, np.uint8)
    return SampleList(kind, root, blob, ends)


def _same_source(source: str, root: str) -> bool:
    return source == root or (not remote.is_remote(source) and str(expand(source)) == root)


def _parse_manifest(lines: list[str], path: Path) -> tuple[SampleList, int]:
    """The sample list whose header is lines[0], checked against its digest, and the number of lines it spans."""
    head = lines[0].split("\t")
    if len(head) != 5 or head[0] != _MANIFEST_MAGIC:
        raise DataError(f"{path} is not a d2v data manifest; delete it to list the data again")
    kind, root, count, digest = head[1], head[2], int(head[3]), head[4]
    shard_lines = 0
    while 1 + shard_lines < len(lines) and lines[1 + shard_lines].startswith("# shard\t"):
        shard_lines += 1
    span = 1 + shard_lines + count
    if hashlib.sha256("".join(ln + "\n" for ln in lines[1:span]).encode()).hexdigest() != digest:
        raise DataError(f"the run's data manifest {path} is damaged (checksum mismatch); delete it to list the "
                        f"data again (the sample order then follows the data as it is now)")
    shards = [ln.split("\t")[1:] for ln in lines[1: 1 + shard_lines]]
    rows = [ln.split("\t") for ln in lines[1 + shard_lines: span]]
    out = from_names(kind, root, [r[0] for r in rows])
    col = 1
    if kind == "tar":
        out.shards = [s[0] for s in shards]
        if shards and len(shards[0]) > 1:  # remote shards: their sizes as listed
            out.shard_bytes = np.array([int(s[1]) for s in shards], dtype=np.int64)
        out.shard = np.array([int(r[1]) for r in rows], dtype=np.int32)
        out.offset = np.array([int(r[2]) for r in rows], dtype=np.int64)
        out.size = np.array([int(r[3]) for r in rows], dtype=np.int64)
        col = 4
    if rows and len(rows[0]) > col:
        out.frames = np.array([int(r[col]) for r in rows], dtype=np.int64)
    if kind != "tar" and not Path(root).is_dir():
        raise DataError(f"the data folder {root} of this run no longer exists")
    for s in out.shards or []:
        if not remote.is_remote(s) and not Path(s).is_file():
            raise DataError(f"shard {s} of this run no longer exists")
    return out, span


def read_manifest(path: Path, source: str | list[str]):
    """The sample list a run saved (a MixedSamples when `source` is a mixture's list of sources); DataError if it
    is damaged or was made from other sources."""
    try:
        lines = path.read_text(encoding="utf-8").split("\n")
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read the run's data manifest {path}: {exc}") from None
    try:
        if lines[0].startswith(_MIXTURE_MAGIC + "\t"):
            named = lines[0].split("\t")[2:]  # the sources as the run named them
            parts, at = [], 1
            for _ in range(int(lines[0].split("\t")[1])):
                part, span = _parse_manifest(lines[at:], path)
                parts.append(part)
                at += span
            listed = MixedSamples(parts, named)
        else:
            listed = _parse_manifest(lines, path)[0]
            named = [listed.root]
    except (IndexError, ValueError):
        raise DataError(f"the run's data manifest {path} is damaged (cut short or edited); delete it to list the "
                        f"data again") from None
    given = list(source) if isinstance(source, (list, tuple)) else [source]
    if len(named) != len(given) or not all(_same_source(s, r) for s, r in zip(given, named)):
        raise DataError(f"the run's data manifest lists {' + '.join(named)}, but the data is now "
                        f"{' + '.join(map(str, given))}; resume with the same --data")
    return listed


class MixedSamples:
    """Several sources' sample lists as one (a mixture's parts, in --data order): sample i is part p's sample
    i - starts[p]. Reads the way a SampleList does, so a data set built on it needs no change."""

    kind = "mixture"

    def __init__(self, parts: list[SampleList], sources: list[str]):
        self.parts, self.sources = list(parts), [str(s) for s in sources]
        self.starts = np.concatenate([[0], np.cumsum([len(p) for p in self.parts])]).astype(np.int64)
        self.root = " + ".join(self.sources)

    def __len__(self) -> int:
        return int(self.starts[-1])

    @property
    def sizes(self) -> list[int]:
        return [len(p) for p in self.parts]

    @property
    def remote(self) -> bool:
        return any(p.remote for p in self.parts)

    def locate(self, i: int) -> tuple[SampleList, int]:
        p = int(np.searchsorted(self.starts, int(i), side="right")) - 1
        return self.parts[p], int(i) - int(self.starts[p])

    def name(self, i: int) -> str:
        part, j = self.locate(i)
        return part.name(j)

    def names(self) -> list[str]:
        return [n for p in self.parts for n in p.names()]

    def where(self, i: int) -> str:
        part, j = self.locate(i)
        return part.where(j)

    def path(self, i: int) -> Path | None:
        part, j = self.locate(i)
        return part.path(j)

    def open(self, i: int):
        part, j = self.locate(i)
        return part.open(j)

    def read_bytes(self, i: int) -> bytes:
        part, j = self.locate(i)
        return part.read_bytes(j)

    def _by_part(self, indices) -> list[np.ndarray]:
        idx = np.asarray(indices, dtype=np.int64)
        return [idx[(idx >= lo) & (idx < hi)] - lo for lo, hi in zip(self.starts[:-1], self.starts[1:])]

    def prefetch(self, indices) -> None:
        for part, local in zip(self.parts, self._by_part(indices)):
            part.prefetch(local)

    def subset(self, indices) -> "MixedSamples":
        """The samples at `indices` (in increasing order, so each part keeps its place)."""
        idx = np.asarray(indices, dtype=np.int64)
        if idx.size and np.any(np.diff(idx) < 0):
            raise ValueError("MixedSamples.subset needs increasing indices")
        return MixedSamples([p.subset(local) for p, local in zip(self.parts, self._by_part(idx))], self.sources)

    @property
    def frames(self) -> np.ndarray | None:
        if all(p.frames is None for p in self.parts):
            return None
        return np.concatenate([p.frames if p.frames is not None else np.full(len(p), -1, np.int64)
                               for p in self.parts])

    @frames.setter
    def frames(self, value) -> None:
        for p, lo, hi in zip(self.parts, self.starts[:-1], self.starts[1:]):
            p.frames = None if value is None else np.asarray(value[lo:hi], dtype=np.int64)

    def to_manifest(self) -> bytes:
        """Every part's manifest after one line naming how many there are and the sources they were listed from."""
        head = "\t".join([_MIXTURE_MAGIC, str(len(self.parts)), *self.sources])
        return f"{head}\n".encode() + b"".join(p.to_manifest() for p in self.parts)


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


def shard_paths(source: str) -> list | None:
    """The tar shards a source names (a .tar file, a brace range, or a folder holding only .tar files), else None:
    paths, or URLs for shards on a server (a .tar URL or a brace range of them; a server lists no folders)."""
    s = str(source)
    if remote.is_remote(s):
        urls = _braces(s)
        if not all(u.split("?", 1)[0].endswith(".tar") for u in urls):
            raise DataError(f"{source} does not name .tar shards; name them with a range such as "
                            f"https://host/shard-{{000..099}}.tar")
        return urls
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


def _wanted(name: str, suffixes: set[str]) -> bool:
    """WebDataset convention: a sample's key is the member name up to its first dot, the rest its extension."""
    base = name.rsplit("/", 1)[-1]
    ext = "." + base.split(".", 1)[1].lower() if "." in base else ""
    return ext in suffixes or os.path.splitext(base)[1].lower() in suffixes


class _Hashed:
    """A file object's bytes as tarfile reads them, hashed on the way."""

    def __init__(self, f):
        self.f, self.digest = f, hashlib.sha256()

    def read(self, n: int = -1) -> bytes:
        data = self.f.read(n)
        self.digest.update(data)
        return data

    def drain(self) -> None:
        while self.read(1 << 20):
            pass


def _list_remote_shard(url: str, suffixes: set[str], probe) -> tuple[list, int, str]:
    """(rows (name, data offset, size, probe's answer or -1), shard size, sha256) of one shard on a server, read
    once from start to end; nothing is written to disk, and only a member handed to `probe` is held whole."""
    rows = []
    with remote.ShardStream(url) as stream:
        hashed = _Hashed(stream)
        try:
            with tarfile.open(fileobj=hashed, mode="r|", bufsize=1 << 20) as tar:
                for member in tar:
                    tar.members.clear()  # a stream keeps no member it has passed: memory stays flat
                    if not member.isfile() or not _wanted(member.name, suffixes):
                        continue
                    info = -1
                    if probe is not None and member.size <= PROBE_BYTES:
                        info = probe(tar.extractfile(member).read())
                    rows.append((member.name, member.offset_data, member.size, info))
            hashed.drain()  # the archive's end blocks too: the digest is of the whole shard
        except tarfile.TarError as exc:
            raise DataError(f"cannot read shard {url} ({exc}); shards must be uncompressed .tar files") from None
        return rows, stream.total if stream.total is not None else stream.pos, hashed.digest.hexdigest()


def _list_local_shard(path, suffixes: set[str]) -> list:
    try:
        with tarfile.open(path, mode="r:") as tar:
            return [(m.name, m.offset_data, m.size, -1) for m in tar if m.isfile() and _wanted(m.name, suffixes)]
    except (tarfile.TarError, OSError) as exc:
        raise DataError(f"cannot read shard {path} ({exc}); shards must be uncompressed .tar files") from None


def list_shards(shards: list, suffixes: set[str], source: str,
                probe: Callable[[bytes], int] | None = None) -> SampleList:
    """One sample per member whose extension is in `suffixes`. Shards on disk: read from the tar headers only
    (members' data is skipped over). Shards on a server: each streamed once (LIST_THREADS at a time), and `probe`
    (data -> a length, -1 if unknown; e.g. an audio header's) sees every listed member's bytes on the way, its
    answers kept as frames."""
    if shards and remote.is_remote(shards[0]):
        with ThreadPoolExecutor(min(LIST_THREADS, len(shards))) as pool:
            listed = list(pool.map(lambda url: _list_remote_shard(url, suffixes, probe), shards))
        per_shard = [rows for rows, _, _ in listed]
    else:
        listed, per_shard = None, [_list_local_shard(path, suffixes) for path in shards]
    rows = [(s, *row) for s, shard_rows in enumerate(per_shard) for row in shard_rows]
    out = from_names("tar", str(source), [r[1] for r in rows])
    out.shards = [str(p) for p in shards]
    out.shard = np.array([r[0] for r in rows], dtype=np.int32)
    out.offset = np.array([r[2] for r in rows], dtype=np.int64)
    out.size = np.array([r[3] for r in rows], dtype=np.int64)
    if listed is not None:
        out.shard_bytes = np.array([total for _, total, _ in listed], dtype=np.int64)
        out.shard_sha256 = [digest for _, _, digest in listed]
        if probe is not None:
            out.frames = np.array([r[4] for r in rows], dtype=np.int64)
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


def list_source(source: str, suffixes: set[str], what: str, run_dir: Path | None = None,
                probe: Callable[[bytes], int] | None = None) -> SampleList:
    """The samples of a path or URL source: the run's saved manifest when resuming, else a fresh listing (probe:
    see list_shards)."""
    if run_dir is not None and (Path(run_dir) / MANIFEST_NAME).exists():
        return read_manifest(Path(run_dir) / MANIFEST_NAME, source)
    shards = shard_paths(source)
    if shards is not None:
        samples = list_shards(shards, suffixes, source, probe)
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


SKIPPED_FILES = "skipped_files.tsv"  # in a run directory: the files left out under --skip-bad-files
SKIPPED_SHOWN = 3  # files a summary names; the rest are in SKIPPED_FILES


def write_skipped_files(run_dir: Path, skipped: list[tuple[str, str]]) -> Path | None:
    """RUN/skipped_files.tsv: a `path<TAB>reason` header, then one line per file left out (tabs and newlines in
    either replaced by spaces), written atomically; None (and nothing written) when no file was left out."""
    if not skipped:
        return None
    clean = (lambda text: " ".join(str(text).replace("\t", " ").splitlines()))
    lines = ["path\treason"] + [f"{clean(path)}\t{clean(why)}" for path, why in skipped]
    atomic_write_bytes(run_dir / SKIPPED_FILES, ("\n".join(lines) + "\n").encode())
    return run_dir / SKIPPED_FILES


def skipped_summary(skipped: list[tuple[str, str]], listed: Path | None) -> str:
    """'5 (a.png, b.wav, c.txt and 2 more; all in RUN/skipped_files.tsv)', naming the first SKIPPED_SHOWN files."""
    names = ", ".join(str(path) for path, _ in skipped[:SKIPPED_SHOWN])
    more = f" and {len(skipped) - SKIPPED_SHOWN} more" if len(skipped) > SKIPPED_SHOWN else ""
    return f"{len(skipped)} ({names}{more}" + (f"; all in {listed})" if listed else ")")


def list_mixture(sources: list[str], list_one: Callable[[str], SampleList], run_dir: Path | None = None):
    """The samples of a mixture's sources as one MixedSamples: the run's saved manifest when resuming, else each
    source listed by list_one(source)."""
    if run_dir is not None and (Path(run_dir) / MANIFEST_NAME).exists():
        return read_manifest(Path(run_dir) / MANIFEST_NAME, list(sources))
    return MixedSamples([list_one(s) for s in sources], sources)
