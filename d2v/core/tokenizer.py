"""The tokenizer of text encoders: byte-level BPE (the tokenizers package) with RoBERTa's special tokens, how a
text becomes token ids (<s> ... </s>, padded), and the digest that ties a text encoder to its tokenizer."""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from d2v.core.errors import DataError

SPECIAL_TOKENS = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]  # ids 0..4, RoBERTa's order
BOS_ID, PAD_ID, EOS_ID, UNK_ID, MASK_ID = range(5)


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

    path = Path(os.path.expanduser(str(path))).absolute()
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
