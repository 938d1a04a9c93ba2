"""A corpus as token ids: tokenized once into a flat file in the d2v cache (keyed by corpus and tokenizer) and read
back in fixed-length blocks, so memory does not grow with the corpus; the BPE trained on a corpus is cached the same
way."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import torch

from d2v.core.errors import ConfigError, DataError
from d2v.core.files import atomic_write
from d2v.core.tokenizer import SpecialIds, special_ids, tokenizer_sha256, train_tokenizer
from d2v.data.sources import cache_dir

TOKENIZER_TRAIN_BYTES = 256 << 20  # BPE merges are learnt from the corpus's first 256 MB (memory stays bounded)


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
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, lambda f: f.write(tok.to_str().encode()))
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


class MixedBlocks:
    """Several corpora's blocks as one (a mixture's parts, in order, tokenized with one tokenizer into blocks of one
    length): block i is part p's block i - starts[p]; no block crosses from one corpus into another."""

    def __init__(self, parts: list[TokenBlocks]):
        self.parts = list(parts)
        self.starts = np.concatenate([[0], np.cumsum([len(p) for p in self.parts])]).astype(np.int64)
        self.length = self.parts[0].length

    def __len__(self) -> int:
        return int(self.starts[-1])

    @property
    def sizes(self) -> list[int]:
        return [len(p) for p in self.parts]

    def blocks(self, indices) -> np.ndarray:
        """(len(indices), length) int64."""
        idx = np.asarray(indices, dtype=np.int64)
        out = np.empty((idx.size, self.length), dtype=np.int64)
        part = np.searchsorted(self.starts, idx, side="right") - 1
        for p in np.unique(part).tolist():
            sel = part == p
            out[sel] = self.parts[p].blocks(idx[sel] - self.starts[p])
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
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(path, write)
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
