"""How much can any 128-d word-level feature gain on the text probe? Ceilings for issue 15's fortunes probe.

The text probe (`d2v probe RUN --data fortunes`) fits a logistic regression on mean-pooled features of fortunes
texts by category. A 1-update encoder already scores about what a mean of random token embeddings scores (a bag of
words, randomly projected), so the question is how much a *trained* encoder could add. This script measures, with the
tokenizer of a given text encoder and the probe's own split and classifier (standardized features, logistic
regression, C = 1):

- `tfidf`: TF-IDF of the token counts (the whole vocabulary), logistic regression with C = 10: what the words carry;
- `random_mean_D`: the mean of random Gaussian token embeddings of width D (a 1-update encoder, idealized);
- `ppmi_svd_D`: the mean of word embeddings learnt from the pretraining corpus (PPMI of token co-occurrence in a
  +-5 window, context smoothing 0.75, rank-D SVD): the best a word-level learner on that corpus could offer;
- `order <encoder>`: for each encoder given, a second probe that depends on word order, not on which words occur:
  original fortunes against the same texts with their words shuffled (binary, balanced).

    d2v bench text-ceiling EXPORT [MORE_EXPORTS...] [--corpus pydoc] [--dims 128,512] [--json OUT]

The first export's tokenizer is used for the word-level rows; every export gets its own `order` row."""
from __future__ import annotations

import numpy as np

from d2v.core.errors import ConfigError


def token_rows(dataset, max_length: int) -> list[np.ndarray]:
    from d2v.core.tokenizer import special_ids, tokenize

    specials = special_ids(dataset.tokenizer).all
    rows = []
    for start in range(0, len(dataset.docs), 512):
        ids = tokenize(dataset.tokenizer, dataset.docs[start:start + 512], max_length)[0].numpy()
        rows += [r[~np.isin(r, specials)] for r in ids]
    return rows


def counts(rows: list[np.ndarray], vocab: int) -> np.ndarray:
    out = np.zeros((len(rows), vocab))
    for i, r in enumerate(rows):
        np.add.at(out[i], r, 1.0)
    return out


def probe(x_train, y_train, x_test, y_test, C: float = 1.0) -> float:
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    scaler = StandardScaler().fit(x_train)
    clf = LogisticRegression(max_iter=3000, C=C).fit(scaler.transform(x_train), y_train)
    return float(clf.score(scaler.transform(x_test), y_test))


def ppmi_svd(sequences: list[np.ndarray], vocab: int, dim: int, window: int = 5, alpha: float = 0.75) -> np.ndarray:
    """(vocab, dim) word vectors: rank-dim SVD of the positive PMI of co-occurrence within +-window tokens."""
    co = np.zeros((vocab, vocab))
    for s in sequences:
        for k in range(1, window + 1):
            if len(s) > k:
                np.add.at(co, (s[:-k], s[k:]), 1.0)
    co += co.T
    words, contexts = co.sum(1), co.sum(0) ** alpha
    with np.errstate(divide="ignore", invalid="ignore"):
        pmi = np.log(co * co.sum() / np.outer(words, contexts / contexts.sum() * co.sum()))
    ppmi = np.where(np.isfinite(pmi), np.maximum(pmi, 0.0), 0.0)
    u, s, _ = np.linalg.svd(ppmi, full_matrices=False)
    return u[:, :dim] * np.sqrt(s[:dim])


def mean_embedding(bow: np.ndarray, table: np.ndarray) -> np.ndarray:
    return bow @ table / np.maximum(bow.sum(1, keepdims=True), 1.0)


def order_probe(encoder, seed: int = 0) -> float:
    """Original fortunes vs their word-shuffled copies, on the encoder's mean-pooled features (d2v.probe.features)."""
    from d2v.data.corpus import LabelledText, load_labelled_text
    from d2v.encoders.features import features

    encoder = encoder.eval()
    rng = np.random.default_rng(seed)
    split = {}
    for name in ("train", "test"):
        ds = load_labelled_text("fortunes", name, encoder.tokenizer, encoder.cfg.max_length)
        docs = [" ".join(d.split()) for d in ds.docs]
        shuffled = []
        for d in docs:
            words = d.split()
            rng.shuffle(words)
            shuffled.append(" ".join(words))
        both = LabelledText(docs + shuffled, np.r_[np.zeros(len(docs)), np.ones(len(docs))].astype(np.int64),
                            ["original", "shuffled"], encoder.tokenizer, encoder.cfg.max_length)
        split[name] = (features(encoder, both), both.labels.numpy())
    return probe(*split["train"], *split["test"])


def run(encoders: list[str], corpus: str = "pydoc", dims: tuple[int, ...] = (128, 512), on_row=None) -> dict:
    """{"results": {name: accuracy}, "meta": ...}; on_row(name, accuracy, note) is called as each row is ready."""
    from sklearn.feature_extraction.text import TfidfTransformer
    from sklearn.linear_model import LogisticRegression

    from d2v.core.tokenizer import special_ids
    from d2v.data.corpus import load_labelled_text, read_corpus
    from d2v.encoders.load import load_encoder

    encoder = load_encoder(encoders[0])
    if encoder.cfg.modality != "text":
        raise ConfigError(f"{encoders[0]} is a {encoder.cfg.modality} encoder; give d2v text exports")
    tok, length = encoder.tokenizer, encoder.cfg.max_length
    vocab = tok.get_vocab_size()
    train, test = (load_labelled_text("fortunes", s, tok, length) for s in ("train", "test"))
    y_train, y_test = train.labels.numpy(), test.labels.numpy()
    bow_train, bow_test = counts(token_rows(train, length), vocab), counts(token_rows(test, length), vocab)
    results: dict[str, float] = {}

    def row(name: str, accuracy: float, note: str = "") -> None:
        results[name] = accuracy
        if on_row is not None:
            on_row(name, accuracy, note)

    tfidf = TfidfTransformer().fit(bow_train)
    clf = LogisticRegression(max_iter=3000, C=10.0).fit(tfidf.transform(bow_train), y_train)
    row("tfidf", float(clf.score(tfidf.transform(bow_test), y_test)), f"all {vocab} token counts")

    specials = special_ids(tok).all
    sequences = [np.asarray(e.ids) for e in tok.encode_batch(read_corpus(corpus).docs, add_special_tokens=False)]
    sequences = [s[~np.isin(s, specials)] for s in sequences]
    for dim in dims:
        table = np.random.default_rng(0).standard_normal((vocab, dim))
        row(f"random_mean_{dim}", probe(mean_embedding(bow_train, table), y_train, mean_embedding(bow_test, table),
                                        y_test))
        table = ppmi_svd(sequences, vocab, dim)
        row(f"ppmi_svd_{dim}", probe(mean_embedding(bow_train, table), y_train, mean_embedding(bow_test, table),
                                     y_test), f"{corpus}, {sum(map(len, sequences))} tokens")
    for i, path in enumerate(encoders):
        row(f"order {path}", order_probe(encoder if i == 0 else load_encoder(path)),
            "original vs word-shuffled fortunes")
    return {"results": results, "meta": {"corpus": corpus, "dims": list(dims), "encoders": list(encoders),
                                         "n_train": len(train), "n_test": len(test)}}
