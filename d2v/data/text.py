"""Text data: corpora (the embedded pydoc topics, Debian's fortunes, a .txt file or folder), the byte-level BPE
tokenizer trained on them (or a given tokenizer.json), the corpus tokenized once into a cached token file read in
fixed-length blocks, and labelled sets for the probe."""
from __future__ import annotations

import codecs
import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from d2v.data.labels import labels_from_names
from d2v.data.pipeline import SampleOrder, sample_rngs
from d2v.data.sources import SampleList, from_names, cache_dir, expand, list_source
from d2v.errors import ConfigError, DataError
from d2v.masking import bert_corrupt, token_masks
from d2v.objective import Batch

SPECIAL_TOKENS = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]  # ids 0..4, RoBERTa's order
BOS_ID, PAD_ID, EOS_ID, UNK_ID, MASK_ID = range(5)
FORTUNE_DIRS = [Path("/usr/share/games/fortunes")]  # Debian package fortunes (and fortunes-min)
BUILTIN = ("pydoc", "fortunes")
MIN_CATEGORY = 20  # fortune files with fewer entries are left out of the probe's classes


# ------------------------------------------------------------------------------------------------ reading
PIECE_BYTES = 1 << 20  # large files are read, trained on and tokenized in pieces of about this size, cut at newlines


def _binary(src):
    """A binary file object for a path or an in-memory shard member."""
    return open(src, "rb") if isinstance(src, (str, Path)) else src


def _check_utf8(src, name: str, skip_bad_files: bool) -> bool:
    """True if the file is UTF-8; else False under skip_bad_files, or a DataError naming the file and offset.
    Reads the file in pieces, so a large file never sits in memory whole."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = 0
    with _binary(src) as f:
        while True:
            chunk = f.read(PIECE_BYTES)
            try:
                decoder.decode(chunk, final=not chunk)
            except UnicodeDecodeError as exc:
                if skip_bad_files:
                    return False
                at = offset + exc.start - len(decoder.getstate()[0])
                bad = (chunk[exc.start] if 0 <= exc.start < len(chunk) else 0)
                raise DataError(f"{name} is not UTF-8 text (invalid byte 0x{bad:02x} at byte offset {max(at, 0)}); "
                                f"convert it or pass --skip-bad-files to leave it out") from None
            if not chunk:
                return True
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

    pieces() yields (text, starts_document, ends_document); a document larger than PIECE_BYTES comes in pieces."""

    samples: SampleList
    doc_per_line: bool
    skip_bad_files: bool
    skipped: int = 0  # non-UTF-8 files left out under --skip-bad-files
    fortune: bool = False  # fortune files: entries separated by '%' lines

    def usable(self) -> list[int]:
        s = self.samples
        good = [i for i in range(len(s)) if _check_utf8(s.open(i), s.where(i), self.skip_bad_files)]
        self.skipped = len(s) - len(good)
        return good

    def _size(self, i: int) -> int:
        s = self.samples
        return int(s.size[i]) if s.size is not None else os.stat(s.open(i)).st_size

    def pieces(self, files: list[int] | None = None):
        s = self.samples
        for i in self.usable() if files is None else files:
            if self.fortune:
                with _binary(s.open(i)) as f:
                    for entry in _fortune_entries(f.read().decode("utf-8")):
                        yield entry, True, True
            elif self.doc_per_line:
                for piece in _file_pieces(s.open(i)):
                    for line in piece.splitlines():
                        if line.strip():
                            yield line, True, True
            elif self._size(i) <= PIECE_BYTES:
                with _binary(s.open(i)) as f:
                    text = f.read().decode("utf-8")
                if text.strip():
                    yield text, True, True
            else:
                parts = _file_pieces(s.open(i))
                prev = next(parts, None)
                first = True
                for part in parts:
                    yield prev, first, False
                    prev, first = part, False
                if prev is not None:
                    yield prev, first, True

    def fingerprint(self) -> str:
        """sha256 of the corpus as read: file names, their bytes and how they are split into documents."""
        h = hashlib.sha256(f"d2v text v1 per_line={self.doc_per_line} fortune={self.fortune} "
                           f"skip={self.skip_bad_files}\n".encode())
        s = self.samples
        for i in range(len(s)):
            h.update(f"{s.name(i)}\0{self._size(i)}\0".encode())
            with _binary(s.open(i)) as f:
                for chunk in iter(lambda: f.read(PIECE_BYTES), b""):
                    h.update(chunk)
        return h.hexdigest()


@dataclass
class Corpus:
    """Documents held in memory, with a class per document where the source has them (fortune file, sub-folder)."""

    docs: list[str]
    labels: np.ndarray | None = None
    classes: list[str] = field(default_factory=list)
    skipped: int = 0  # files left out under --skip-bad-files

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

    return Corpus([topics[k] for k in sorted(topics)])


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


def _text_samples(source: str) -> SampleList:
    """The .txt files of a path (a file, a folder, tar shards of .txt members), listed in a fixed order."""
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
    """A streamed corpus (TextFiles) for a path or fortunes, an in-memory Corpus for pydoc."""
    if source == "pydoc":
        return _pydoc()
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
        corpus = Corpus(docs, np.asarray(labels) if by_file is not None else None, classes, stream.skipped)
    if not any(d.strip() for d in corpus.docs):
        raise DataError(f"text data {source!r} holds no text")
    return corpus


# ---------------------------------------------------------------------------------------------- tokenizer
TOKENIZER_TRAIN_BYTES = 256 << 20  # BPE merges are learnt from the corpus's first 256 MB (memory stays bounded)


def train_tokenizer(docs, vocab_size: int):
    """Byte-level BPE (the tokenizers package) trained on `docs` (a list or an iterator of strings); deterministic
    for a given corpus.

    encode(s) adds <s> ... </s>; decode(encode(s).ids) == s for any text (bytes, not characters, are the alphabet).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    if vocab_size < 300:
        raise DataError(f"--vocab-size must be at least 300 (256 bytes + specials + merges), got {vocab_size}")
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.RobertaProcessing(("</s>", EOS_ID), ("<s>", BOS_ID), add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(docs, trainer, length=len(docs) if isinstance(docs, list) else None)
    return tok


def tokenizer_sha256(tok) -> str:
    return hashlib.sha256(tok.to_str().encode()).hexdigest()


def load_tokenizer(path: Path):
    from tokenizers import Tokenizer

    path = expand(path)
    try:
        return Tokenizer.from_file(str(path))
    except Exception as exc:
        raise DataError(f"cannot read tokenizer {path}: {str(exc).strip() or type(exc).__name__}") from None


@dataclass(frozen=True)
class SpecialIds:
    bos: int
    pad: int
    eos: int
    unk: int
    mask: int

    @property
    def all(self) -> np.ndarray:
        return np.array([self.bos, self.pad, self.eos, self.unk, self.mask])

    @property
    def first_plain(self) -> int:
        """Random replacement tokens are drawn from this id up (the specials that lead the vocabulary excluded)."""
        return max(i for i in self.all.tolist() if i < len(SPECIAL_TOKENS)) + 1


def special_ids(tok, where: str = "the tokenizer") -> SpecialIds:
    """Ids of RoBERTa's special tokens in a tokenizer; a DataError names any it lacks."""
    ids = {name: tok.token_to_id(name) for name in SPECIAL_TOKENS}
    missing = [name for name, i in ids.items() if i is None]
    if missing:
        raise DataError(f"{where} has no {', '.join(missing)} token(s); d2v needs RoBERTa's special tokens "
                        f"{' '.join(SPECIAL_TOKENS)} (a RoBERTa or d2v tokenizer.json)")
    return SpecialIds(ids["<s>"], ids["<pad>"], ids["</s>"], ids["<unk>"], ids["<mask>"])


def tokenize(tok, texts: list[str], max_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids (B, T) with <s> ... </s>, right-padded to the longest text (at most max_length), and the
    attention mask (B, T) int64, 1 at real tokens (transformers' convention)."""
    if not texts:
        raise ValueError("no texts to tokenize")
    sp = special_ids(tok)
    rows = [[sp.bos] + e.ids + [sp.eos] for e in tok.encode_batch(list(texts), add_special_tokens=False)]
    rows = [r[: max_length - 1] + [sp.eos] if len(r) > max_length else r for r in rows]
    T = max(len(r) for r in rows)
    ids = torch.full((len(rows), T), sp.pad, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
    return ids, ids.ne(sp.pad).long()


def token_chunks(tok, pieces, batch_bytes: int = 256 << 10, starts: bool = False):
    """int64 id arrays for a stream of (text, starts_document, ends_document): <s> document </s>, in order.
    With starts=True, (ids, offsets within ids where a document's <s> is) pairs."""
    sp = special_ids(tok)
    encode_batch = getattr(tok, "encode_batch_fast", tok.encode_batch)  # ids without offsets: less memory
    batch, size = [], 0

    def encode(batch):
        out, first_at, at = [], [], 0
        encodings = encode_batch([b[0] for b in batch], add_special_tokens=False)
        for (text, first, last), enc in zip(batch, encodings):
            if first:
                first_at.append(at)
            out.append(np.asarray(([sp.bos] if first else []) + enc.ids + ([sp.eos] if last else []), dtype=np.int64))
            at += out[-1].size
        ids = np.concatenate(out) if out else np.zeros(0, np.int64)
        return (ids, np.asarray(first_at, dtype=np.int64)) if starts else ids

    for item in pieces:
        batch.append(item)
        size += len(item[0])
        if size >= batch_bytes:
            yield encode(batch)
            batch, size = [], 0
    if batch:
        yield encode(batch)


SAMPLE_BREAKS = ("complete_doc", "none")


def pack(tok, docs: list[str], length: int, sample_break: str = "none") -> torch.Tensor:
    """The blocks (N, length) of a list of documents, each <s> doc </s>. sample_break 'none': concatenated and cut
    every `length` tokens (the last block padded); 'complete_doc': every block from one document only, starting
    with <s>, padded (fairseq's complete_doc)."""
    ids, starts = (np.concatenate(a) for a in zip(*token_chunks(tok, ((d, True, True) for d in docs), starts=True)))
    blocks = TokenBlocks.from_array(ids, length, special_ids(tok), starts if sample_break == "complete_doc" else None)
    return torch.from_numpy(blocks.blocks(np.arange(len(blocks))))


# -------------------------------------------------------------------------------------------- token cache
def _atomic_write(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{os.getpid()}-{path.name}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def cached_tokenizer(corpus, corpus_sha: str, vocab_size: int):
    """The BPE trained on a corpus, from the cache or trained now (on its first TOKENIZER_TRAIN_BYTES)."""
    from tokenizers import Tokenizer

    path = cache_dir() / "text" / f"tokenizer-{corpus_sha[:32]}-{vocab_size}.json"
    if path.exists():
        try:
            return Tokenizer.from_file(str(path))
        except Exception:
            pass  # a damaged cache entry is rebuilt

    def texts():
        seen = 0
        for text, _, _ in corpus.pieces():
            yield text
            seen += len(text)
            if seen >= TOKENIZER_TRAIN_BYTES:
                return

    tok = train_tokenizer(texts(), vocab_size)
    try:
        _atomic_write(path, lambda f: f.write(tok.to_str().encode()))
    except OSError:
        pass  # an unwritable cache only costs time
    return tok


class TokenBlocks:
    """A tokenized corpus as one flat file of uint16 (vocabularies up to 65,536) or uint32 ids, read as blocks of
    `length` tokens. Each read maps the file anew, so no pages stay mapped between batches and the process's memory
    does not grow with the corpus.

    Without document starts (sample break 'none'): block i = ids[i * length: (i + 1) * length], documents packed
    across block boundaries, the last block padded. With the offsets of each document's <s> (fairseq's
    'complete_doc'): no block crosses a document boundary; every block is <s> then the next length - 1 tokens of
    one document (its </s> included), padded, so a document of n tokens after its <s> gives ceil(n / (length - 1))
    blocks."""

    def __init__(self, path: Path | None, dtype, count: int, length: int, special: SpecialIds,
                 array: np.ndarray | None = None, doc_starts: np.ndarray | None = None):
        self.path, self.dtype, self.count, self.length = path, np.dtype(dtype), count, length
        self.pad_id, self.bos_id = special.pad, special.bos
        self.array = array
        self.spans = None if doc_starts is None else _doc_blocks(np.asarray(doc_starts, np.int64), count, length)

    @classmethod
    def from_array(cls, ids: np.ndarray, length: int, special: SpecialIds,
                   doc_starts: np.ndarray | None = None) -> "TokenBlocks":
        return cls(None, ids.dtype, ids.size, length, special, ids, doc_starts)

    def __len__(self) -> int:
        return -(-self.count // self.length) if self.spans is None else len(self.spans)

    def blocks(self, indices) -> np.ndarray:
        """(len(indices), length) int64."""
        ids = self.array if self.array is not None else np.memmap(self.path, dtype=self.dtype, mode="r",
                                                                  shape=(self.count,))
        out = np.full((len(indices), self.length), self.pad_id, dtype=np.int64)
        for r, b in enumerate(np.asarray(indices).tolist()):
            if self.spans is None:
                piece = ids[b * self.length: (b + 1) * self.length]
                out[r, : piece.size] = piece
            else:
                start, stop = self.spans[b].tolist()
                out[r, 0] = self.bos_id
                out[r, 1: 1 + stop - start] = ids[start:stop]
        del ids
        return out


def _doc_blocks(doc_starts: np.ndarray, count: int, length: int) -> np.ndarray:
    """(N, 2) [start, stop) of each complete_doc block's tokens after its <s>, in corpus order."""
    if length < 2:
        raise ConfigError("complete_doc blocks need model.max_length of at least 2 (<s> and one token)")
    if doc_starts.size == 0 or doc_starts[0] != 0:
        doc_starts = np.concatenate([[0], doc_starts]).astype(np.int64)  # tokens before the first <s>: a document
    content = doc_starts + 1  # after each document's <s>
    ends = np.append(doc_starts[1:], count)
    per_doc = np.maximum(1, -(-(ends - content) // (length - 1)))
    first = np.repeat(content, per_doc)
    within = np.arange(per_doc.sum()) - np.repeat(np.cumsum(per_doc) - per_doc, per_doc)
    start = first + within * (length - 1)
    stop = np.minimum(start + length - 1, np.repeat(ends, per_doc))
    return np.stack([start, np.maximum(stop, start)], axis=1)


def cached_tokens(corpus, corpus_sha: str, tok, length: int, sample_break: str = "none") -> TokenBlocks:
    """The corpus tokenized once into the cache (keyed by corpus and tokenizer), streamed in pieces; beside the
    token file, the offset of every document's <s> (int64), which complete_doc blocks are cut from."""
    vocab = tok.get_vocab_size()
    dtype = np.uint16 if vocab <= 1 << 16 else np.uint32
    key = hashlib.sha256(f"{corpus_sha}{tokenizer_sha256(tok)}".encode()).hexdigest()[:32]
    path = cache_dir() / "text" / f"tokens-{key}.{np.dtype(dtype).name}"
    starts_path = path.with_name(path.name + ".docs.int64")
    special = special_ids(tok)
    if not (path.exists() and starts_path.exists()):  # token files from before the document index are rebuilt
        starts_tmp = path.with_name(f".docs-{os.getpid()}-{path.name}")

        def write(f):
            at = 0
            with open(starts_tmp, "wb") as g:
                for chunk, first in token_chunks(tok, corpus.pieces(), starts=True):
                    chunk.astype(dtype).tofile(f)
                    (first + at).tofile(g)
                    at += chunk.size
                g.flush()
                os.fsync(g.fileno())

        try:
            _atomic_write(path, write)
            os.replace(starts_tmp, starts_path)  # after the token file: both present means both complete
        except OSError as exc:
            raise DataError(f"cannot write the tokenized corpus to {path.parent} ({exc}); set D2V_CACHE_DIR to a "
                            f"writable folder") from None
        finally:
            starts_tmp.unlink(missing_ok=True)
    count = path.stat().st_size // np.dtype(dtype).itemsize
    if count == 0:
        raise DataError("the text data holds no text")
    doc_starts = np.fromfile(starts_path, dtype=np.int64) if sample_break == "complete_doc" else None
    return TokenBlocks(path, dtype, count, length, special, doc_starts=doc_starts)


# ----------------------------------------------------------------------------------------- probe datasets
class LabelledText:
    """Labelled documents for the probe; get_batch tokenizes with the encoder's tokenizer."""

    def __init__(self, docs: list[str], labels: np.ndarray, classes: list[str], tokenizer, max_length: int):
        self.docs, self.classes, self.tokenizer, self.max_length = docs, classes, tokenizer, max_length
        self.labels = torch.from_numpy(np.asarray(labels)).long()

    def __len__(self) -> int:
        return len(self.docs)

    def get_batch(self, indices: torch.Tensor) -> torch.Tensor:
        return tokenize(self.tokenizer, [self.docs[int(i)] for i in indices], self.max_length)[0]  # (B, T)

    def subset(self, indices: np.ndarray) -> "LabelledText":
        return LabelledText([self.docs[i] for i in indices], self.labels.numpy()[indices], self.classes,
                            self.tokenizer, self.max_length)


def load_labelled_text(source: str, split: str, tokenizer, max_length: int) -> LabelledText:
    """A fixed stratified 80/20 split of fortunes categories (small ones left out) or of a labelled folder."""
    from d2v.data.vision import _split_indices

    if source == "pydoc":
        raise DataError("pydoc has no labels; probe text on fortunes or a folder with one sub-folder per class")
    corpus = read_corpus(source)
    if corpus.labels is None:
        raise DataError(f"{source} has no labels (use fortunes or a folder with one sub-folder per class of .txt "
                        f"files)")
    counts = np.bincount(corpus.labels, minlength=len(corpus.classes))
    min_count = MIN_CATEGORY if source == "fortunes" else 2
    keep = np.flatnonzero(counts[corpus.labels] >= min_count)
    kept_classes = np.flatnonzero(counts >= min_count)
    remap = np.full(len(corpus.classes), -1)
    remap[kept_classes] = np.arange(kept_classes.size)
    labels = remap[corpus.labels[keep]]
    docs = [corpus.docs[i] for i in keep]
    idx = _split_indices(labels, len(docs), split, test_fraction=0.2)
    return LabelledText([docs[i] for i in idx], labels[idx], [corpus.classes[c] for c in kept_classes], tokenizer,
                        max_length)


# ---------------------------------------------------------------------------------------------- pretraining
class TextPipeline:
    """Packed token blocks with BERT (or span) masking; micro-batch k is the same for a given seed.

    The corpus is tokenized once into a cached token file and read block by block, so memory stays flat however
    large the corpus. The teacher gets the full ids (Batch.inputs), the student the corrupted ids
    (Batch.student_inputs).
    """

    def __init__(self, cfg):
        self.cfg = cfg
        m, d = cfg.model, cfg.data
        if cfg.mask.kind not in ("bert", "span", "random"):
            raise ConfigError(f"mask kind {cfg.mask.kind!r} is not available for text; use 'bert', 'span' or "
                              "'random'")
        if not 0 <= cfg.mask.random_token + cfg.mask.unchanged <= 1:
            raise ConfigError("mask.random_token + mask.unchanged must be between 0 and 1")
        corpus = open_corpus(d.source, d.doc_per_line, d.skip_bad_files)
        corpus_sha = corpus.fingerprint()
        if d.tokenizer:
            self.tokenizer = load_tokenizer(d.tokenizer)
        else:
            self.tokenizer = cached_tokenizer(corpus, corpus_sha, d.vocab_size)
        self.special = special_ids(self.tokenizer, d.tokenizer or "the tokenizer")
        digest = tokenizer_sha256(self.tokenizer)
        if m.tokenizer_sha256 and m.tokenizer_sha256 != digest:
            raise ConfigError("the text data gives a different tokenizer than the one this run was trained with; "
                              "resume with the same corpus and --vocab-size (or --tokenizer)")
        vocab = self.tokenizer.get_vocab_size()
        if m.vocab_size and m.vocab_size != vocab:
            raise ConfigError(f"the model expects a vocabulary of {m.vocab_size} but the tokenizer has {vocab}; "
                              f"leave model.vocab_size at 0 to take it from the tokenizer")
        m.vocab_size, m.tokenizer_sha256, m.pad_id, m.mask_id = vocab, digest, self.special.pad, self.special.mask
        if d.sample_break not in SAMPLE_BREAKS:
            raise ConfigError(f"data.sample_break {d.sample_break!r} is not available; use 'complete_doc' or 'none'")
        self.blocks = cached_tokens(corpus, corpus_sha, self.tokenizer, m.max_length, d.sample_break)
        self.skipped = getattr(corpus, "skipped", 0)
        self.order = SampleOrder(len(self.blocks), cfg.run.seed)

    def run_files(self) -> dict[str, bytes]:
        """Files the run directory keeps beside its config: the tokenizer (export copies it)."""
        return {"tokenizer.json": self.tokenizer.to_str().encode()}

    def micro_batch(self, first: int, count: int) -> Batch:
        """The blocks at global sample positions first .. first + count - 1; each block's mask and corruption come
        from its own position's generator, so they do not depend on the rest of the micro-batch."""
        mc, sp = self.cfg.mask, self.special
        ids = self.blocks.blocks(self.order.indices(first, count).numpy())  # (B, T) int64
        padding = ids == sp.pad
        if self.cfg.recipe == "v2":
            return self._v2_batch(ids, padding, first, count)
        maskable = ~np.isin(ids, sp.all)  # never <s>, </s>, <pad>
        span = mc.span_length if mc.kind == "span" else 1
        vocab = (sp.first_plain, self.cfg.model.vocab_size)
        mask, student = np.zeros(ids.shape, dtype=bool), ids.copy()
        for b, rng in enumerate(sample_rngs(self.cfg.run.seed, 1, first, count)):
            mask[b : b + 1] = token_masks(maskable[b : b + 1], mc.ratio, rng, span)
            student[b : b + 1] = bert_corrupt(ids[b : b + 1], mask[b : b + 1], rng, sp.mask, vocab, mc.random_token,
                                              mc.unchanged)
        return Batch(inputs=torch.from_numpy(ids), mask=torch.from_numpy(mask),
                     student_inputs=torch.from_numpy(student),
                     padding_mask=torch.from_numpy(padding) if padding.any() else None)

    def _v2_batch(self, ids: np.ndarray, padding: np.ndarray, first: int, count: int) -> Batch:
        """data2vec 2.0: `clones` masks per block ("random": exactly int(n x (1 - ratio)) of its n real tokens kept;
        "bert" / "span": as v1, without corruption), no corrupted view: the student skips masked tokens."""
        from d2v.data.pipeline import make_batch
        from d2v.masking import random_mask

        mc, sp = self.cfg.mask, self.special
        clones, T = mc.clones, ids.shape[1]
        valid = ~padding
        maskable = ~np.isin(ids, sp.all)
        span = mc.span_length if mc.kind == "span" else 1
        rows = []
        for b, rng in enumerate(sample_rngs(self.cfg.run.seed, 1, first, count)):
            for _ in range(clones):
                if mc.kind == "random":
                    where = np.flatnonzero(valid[b])
                    row = np.zeros(T, dtype=bool)
                    row[where] = random_mask(where.size, where.size, mc.ratio, rng)
                    rows.append(row)
                else:
                    rows.append(token_masks(maskable[b : b + 1], mc.ratio, rng, span)[0])
        return make_batch(self.cfg, first, inputs=torch.from_numpy(ids), mask=np.stack(rows),
                          valid=np.repeat(valid, clones, axis=0),
                          padding_mask=torch.from_numpy(padding) if padding.any() else None)

    def on_device(self, batch: Batch, first: int) -> Batch:
        return batch
