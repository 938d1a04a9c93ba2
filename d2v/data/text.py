"""Text data: corpora (the embedded pydoc topics, Debian's fortunes, a .txt file or folder), the byte-level BPE
tokenizer trained on them, packing into fixed-length blocks, and labelled sets for the probe."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from d2v.data.pipeline import SampleOrder, sample_rngs
from d2v.errors import ConfigError, DataError
from d2v.masking import bert_corrupt, token_masks
from d2v.objective import Batch

SPECIAL_TOKENS = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]  # ids 0..4, RoBERTa's order
BOS_ID, PAD_ID, EOS_ID, UNK_ID, MASK_ID = range(5)
FORTUNE_DIRS = [Path("/usr/share/games/fortunes")]  # Debian package fortunes (and fortunes-min)
BUILTIN = ("pydoc", "fortunes")
MIN_CATEGORY = 20  # fortune files with fewer entries are left out of the probe's classes


@dataclass
class Corpus:
    """Documents, with a class per document where the source has them (fortune file, sub-folder)."""

    docs: list[str]
    labels: np.ndarray | None = None
    classes: list[str] = field(default_factory=list)
    skipped: int = 0  # files decoded with replacement characters under --skip-bad-files


# ------------------------------------------------------------------------------------------------ reading
def _decode(path: Path, skip_bad_files: bool, counter: list[int]) -> str:
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        if not skip_bad_files:
            raise DataError(f"{path} is not UTF-8 text (invalid byte 0x{data[exc.start]:02x} at byte offset "
                            f"{exc.start}); convert it or pass --skip-bad-files to decode it with replacement "
                            f"characters") from None
        counter[0] += 1
        return data.decode("utf-8", errors="replace")


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


def _fortunes(skip_bad_files: bool) -> Corpus:
    counter = [0]
    docs, labels, classes = [], [], []
    for path in fortune_files():
        entries = _fortune_entries(_decode(path, skip_bad_files, counter))
        if entries:
            labels += [len(classes)] * len(entries)
            classes.append(path.name)
            docs += entries
    return Corpus(docs, np.asarray(labels), classes, counter[0])


def _path(path: Path, doc_per_line: bool, skip_bad_files: bool) -> Corpus:
    if not path.exists():
        raise DataError(f"text data {str(path)!r} is neither a built-in name ({', '.join(BUILTIN)}) nor an existing path")
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*.txt") if p.is_file())
    if not files:
        raise DataError(f"{path} holds no .txt files")
    counter = [0]
    docs, labels, classes = [], [], []
    # class = first-level sub-folder when every file sits in one (a labelled folder for the probe)
    parts = [f.relative_to(path).parts for f in files] if path.is_dir() else []
    labelled = bool(parts) and all(len(p) >= 2 for p in parts)
    if labelled:
        classes = sorted({p[0] for p in parts})
    for i, f in enumerate(files):
        text = _decode(f, skip_bad_files, counter)
        found = [line for line in text.splitlines() if line.strip()] if doc_per_line else [text] if text.strip() else []
        docs += found
        if labelled:
            labels += [classes.index(parts[i][0])] * len(found)
    return Corpus(docs, np.asarray(labels) if labelled else None, classes, counter[0])


def read_corpus(source: str, doc_per_line: bool = False, skip_bad_files: bool = False) -> Corpus:
    """The documents of a built-in name or a path; an empty corpus is an error."""
    if source == "pydoc":
        corpus = _pydoc()
    elif source == "fortunes":
        corpus = _fortunes(skip_bad_files)
    else:
        corpus = _path(Path(source), doc_per_line, skip_bad_files)
    if not any(d.strip() for d in corpus.docs):
        raise DataError(f"text data {source!r} holds no text")
    return corpus


# ---------------------------------------------------------------------------------------------- tokenizer
def train_tokenizer(docs: list[str], vocab_size: int):
    """Byte-level BPE (the tokenizers package) trained on `docs`; deterministic for a given corpus.

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
    tok.train_from_iterator(docs, trainer, length=len(docs))
    return tok


def tokenizer_sha256(tok) -> str:
    return hashlib.sha256(tok.to_str().encode()).hexdigest()


def load_tokenizer(path: Path):
    from tokenizers import Tokenizer

    try:
        return Tokenizer.from_file(str(path))
    except Exception as exc:
        raise DataError(f"cannot read tokenizer {path}: {exc}") from None


def tokenize(tok, texts: list[str], max_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids (B, T) with <s> ... </s>, right-padded to the longest text (at most max_length), and the
    attention mask (B, T) int64, 1 at real tokens (transformers' convention)."""
    if not texts:
        raise ValueError("no texts to tokenize")
    encodings = tok.encode_batch(list(texts))
    rows = [e.ids[: max_length - 1] + [EOS_ID] if len(e.ids) > max_length else e.ids for e in encodings]
    T = max(len(r) for r in rows)
    ids = torch.full((len(rows), T), PAD_ID, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
    return ids, ids.ne(PAD_ID).long()


def pack(tok, docs: list[str], length: int) -> torch.Tensor:
    """<s> doc </s> for every document, concatenated and cut into blocks (N, length); the last block padded."""
    ids = np.fromiter((i for e in tok.encode_batch(docs) for i in e.ids), dtype=np.int64)
    n = -(-ids.size // length)
    blocks = np.full(n * length, PAD_ID, dtype=np.int64)
    blocks[: ids.size] = ids
    return torch.from_numpy(blocks.reshape(n, length))


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
        raise DataError(f"{source} has no labels (use fortunes or a folder with one sub-folder per class of .txt files)")
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

    The teacher gets the full ids (Batch.inputs), the student the corrupted ids (Batch.student_inputs).
    """

    def __init__(self, cfg):
        self.cfg = cfg
        m, d = cfg.model, cfg.data
        if cfg.mask.kind not in ("bert", "span"):
            raise ConfigError(f"mask kind {cfg.mask.kind!r} is not available for text; use 'bert' or 'span'")
        if not 0 <= cfg.mask.random_token + cfg.mask.unchanged <= 1:
            raise ConfigError("mask.random_token + mask.unchanged must be between 0 and 1")
        corpus = read_corpus(d.source, d.doc_per_line, d.skip_bad_files)
        self.skipped = corpus.skipped
        self.tokenizer = train_tokenizer(corpus.docs, d.vocab_size)
        digest = tokenizer_sha256(self.tokenizer)
        if m.tokenizer_sha256 and m.tokenizer_sha256 != digest:
            raise ConfigError("the text data gives a different tokenizer than the one this run was trained with; "
                              "resume with the same corpus and --vocab-size")
        vocab = self.tokenizer.get_vocab_size()
        if m.vocab_size and m.vocab_size != vocab:
            raise ConfigError(f"the model expects a vocabulary of {m.vocab_size} but the tokenizer has {vocab}; "
                              f"leave model.vocab_size at 0 to take it from the tokenizer")
        m.vocab_size, m.tokenizer_sha256, m.pad_id, m.mask_id = vocab, digest, PAD_ID, MASK_ID
        self.blocks = pack(self.tokenizer, corpus.docs, m.max_length)  # (N, max_length)
        self.order = SampleOrder(len(self.blocks), cfg.run.seed)

    def run_files(self) -> dict[str, bytes]:
        """Files the run directory keeps beside its config: the tokenizer (export copies it)."""
        return {"tokenizer.json": self.tokenizer.to_str().encode()}

    def micro_batch(self, first: int, count: int) -> Batch:
        """The blocks at global sample positions first .. first + count - 1; each block's mask and corruption come
        from its own position's generator, so they do not depend on the rest of the micro-batch."""
        mc = self.cfg.mask
        ids = self.blocks[self.order.indices(first, count)].numpy()  # (B, T)
        maskable = ids >= len(SPECIAL_TOKENS)  # never <s>, </s>, <pad>
        span = mc.span_length if mc.kind == "span" else 1
        vocab = (len(SPECIAL_TOKENS), self.cfg.model.vocab_size)
        mask, student = np.zeros(ids.shape, dtype=bool), ids.copy()
        for b, rng in enumerate(sample_rngs(self.cfg.run.seed, 1, first, count)):
            mask[b : b + 1] = token_masks(maskable[b : b + 1], mc.ratio, rng, span)
            student[b : b + 1] = bert_corrupt(ids[b : b + 1], mask[b : b + 1], rng, MASK_ID, vocab, mc.random_token,
                                              mc.unchanged)
        padding = ids == PAD_ID
        return Batch(inputs=torch.from_numpy(ids), mask=torch.from_numpy(mask),
                     student_inputs=torch.from_numpy(student),
                     padding_mask=torch.from_numpy(padding) if padding.any() else None)

    def on_device(self, batch: Batch, first: int) -> Batch:
        return batch
