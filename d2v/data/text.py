"""The text pipeline: token blocks of a corpus (or of a mixture's corpora, drawn by weight) with BERT (or span)
masking for data2vec 1.0, or several masked clones per block for data2vec 2.0."""
from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

import numpy as np
import torch

from d2v.core.batch import Batch
from d2v.core.errors import ConfigError
from d2v.core.tokenizer import load_tokenizer, special_ids, tokenizer_sha256
from d2v.data.batches import make_batch
from d2v.data.corpus import Blend, open_corpus
from d2v.data.mixture import mixture_sources, sample_order
from d2v.data.sampling import STREAM_MASKS, sample_rngs
from d2v.data.tokens import SAMPLE_BREAKS, MixedBlocks, cached_tokenizer, cached_tokens
from d2v.masking import Site, bert_corrupt, clone_masks


class TextPipeline:
    """Token blocks of a corpus; micro-batch k is the same for a given seed.

    The corpus is tokenized once into a cached token file and read block by block, so memory stays flat however
    large the corpus. data2vec 1.0: the teacher gets the full ids (Batch.inputs), the student the corrupted ids
    (Batch.student_inputs: BERT's <mask> / random / unchanged). data2vec 2.0: `mask.clones` masks per block and no
    corrupted view (the student skips masked tokens)."""

    reads_files = False  # blocks are slices of one memory-mapped token file: workers would only add copying
    bad_files: Mapping[int, str] = MappingProxyType({})  # none: the corpus is checked before tokenizing
    budget = None  # every update holds run.batch_size blocks

    def __init__(self, cfg, run_dir=None):
        self.cfg = cfg
        m, d = cfg.model, cfg.data
        sources = mixture_sources(d)
        corpora = [open_corpus(s, d.doc_per_line, d.skip_bad_files) for s in sources]
        shas = [c.fingerprint() for c in corpora]
        corpus = corpora[0] if len(corpora) == 1 else Blend(corpora, d.weights or [1.0] * len(corpora), shas)
        corpus_sha = shas[0] if len(corpora) == 1 else corpus.fingerprint()
        if d.tokenizer:
            self.tokenizer = load_tokenizer(d.tokenizer)
        else:
            self.tokenizer = cached_tokenizer(corpus, corpus_sha, d.vocab_size)
        self.special = special_ids(self.tokenizer, d.tokenizer or "the tokenizer")
        digest = tokenizer_sha256(self.tokenizer)
        if m.tokenizer_sha256 and m.tokenizer_sha256 != digest:
            raise ConfigError("the text data gives a different tokenizer than the one this run was trained with; "
                              "resume with the same corpus and --vocab-size (or --tokenizer)")
        self.vocab = self.tokenizer.get_vocab_size()
        if m.vocab_size and m.vocab_size != self.vocab:
            raise ConfigError(f"the model expects a vocabulary of {m.vocab_size} but the tokenizer has {self.vocab}; "
                              f"leave model.vocab_size at 0 to take it from the tokenizer")
        self.model_fields = {"vocab_size": self.vocab, "tokenizer_sha256": digest, "pad_id": self.special.pad,
                             "mask_id": self.special.mask}
        if d.sample_break not in SAMPLE_BREAKS:
            raise ConfigError(f"data.sample_break {d.sample_break!r} is not available; use 'complete_doc' or 'none'")
        parts = [cached_tokens(c, sha, self.tokenizer, m.max_length, d.sample_break) for c, sha in zip(corpora, shas)]
        self.blocks = parts[0] if len(parts) == 1 else MixedBlocks(parts)
        self.skipped = sum(getattr(c, "skipped", 0) for c in corpora)
        self.skipped_list = [f for c in corpora for f in c.skipped_files()]
        self.order = sample_order([len(p) for p in parts], d.weights, cfg.run.seed, sources)

    def skipped_files(self) -> list[tuple[str, str]]:
        return list(self.skipped_list)

    def run_files(self) -> dict[str, bytes]:
        """Files the run directory keeps beside its config: the tokenizer (export copies it)."""
        return {"tokenizer.json": self.tokenizer.to_str().encode()}

    def micro_batch(self, first: int, count: int) -> Batch:
        """The blocks at global sample positions first .. first + count - 1; each block's masks (and corruption)
        come from its own position's generator, so they do not depend on the rest of the micro-batch."""
        mc, sp = self.cfg.mask, self.special
        ids = self.blocks.blocks(self.order.indices(first, count).numpy())  # (B, T) int64
        padding = ids == sp.pad
        maskable = ~np.isin(ids, sp.all)  # never <s>, </s>, <pad>
        rngs = sample_rngs(self.cfg.run.seed, STREAM_MASKS, first, count)
        sites = [Site(ids.shape[1], valid=~padding[b], maskable=maskable[b]) for b in range(count)]
        pad = torch.from_numpy(padding) if padding.any() else None
        if self.cfg.recipe == "v2":
            mask = clone_masks("text", mc, rngs, sites, mc.clones)
            return make_batch(self.cfg, first, inputs=torch.from_numpy(ids), mask=mask,
                              valid=np.repeat(~padding, mc.clones, axis=0), padding_mask=pad)
        mask = clone_masks("text", mc, rngs, sites)
        student = np.stack([bert_corrupt(ids[b: b + 1], mask[b: b + 1], rng, sp.mask, (sp.first_plain, self.vocab),
                                         mc.random_token, mc.unchanged)[0] for b, rng in enumerate(rngs)])
        return make_batch(self.cfg, first, inputs=torch.from_numpy(ids), mask=mask,
                          student_inputs=torch.from_numpy(student), padding_mask=pad)

    def on_device(self, batch: Batch, first: int) -> Batch:
        return batch
