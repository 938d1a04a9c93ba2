"""Text at scale: the corpus is tokenized once into a cached token file and streamed, memory does not grow with
the corpus, a given tokenizer.json is used as is, paths expand `~`."""
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from conftest import micro
import torch
from typer.testing import CliRunner

from d2v.cli import app
from d2v.data.pipeline import build_pipeline
from d2v.core.config import set_by_path
from d2v.core import tokenizer as toks
from d2v.data import corpus as corpora
from d2v.data import tokens as token_files
from d2v.core.errors import DataError
from d2v.core.presets import preset_config

TINY = {"model.dim": 32, "model.depth": 2, "model.num_heads": 2, "model.ffn_dim": 64, "model.max_length": 32,
        "targets.top_k": 2, "data.vocab_size": 300, "run.batch_size": 8, "run.steps": 2, "run.log_every": 1}
WORDS = ("river stone harbour lantern meadow copper violin orchard glacier thunder pepper saddle "
         "compass velvet quarry falcon biscuit chimney ledger walnut").split()


def text_config(**overrides):
    cfg = preset_config("text", "tiny")
    for key, value in {**TINY, **overrides}.items():
        set_by_path(cfg, key, value)
    return cfg


def write_corpus(path, n_bytes, seed=0, lines_per_file=200):
    """Files of random sentences from a fixed word list (so the BPE's work does not grow with the size)."""
    rng = np.random.default_rng(seed)
    path.mkdir(parents=True, exist_ok=True)
    written, f = 0, 0
    while written < n_bytes:
        lines = [" ".join(rng.choice(WORDS, size=rng.integers(5, 15))) + "." for _ in range(lines_per_file)]
        data = "\n".join(lines) + "\n"
        (path / f"part{f:05d}.txt").write_text(data)
        written += len(data)
        f += 1
    return path


def test_tokens_are_cached_by_corpus_and_match_packing(tmp_path, monkeypatch):
    root = write_corpus(tmp_path / "c", 20_000)
    cfg = text_config(**{"data.source": str(root)})
    pipe = build_pipeline(cfg)
    assert pipe.blocks.path.exists() and pipe.blocks.dtype == np.uint16  # vocab 300: two bytes a token
    corpus = corpora.read_corpus(str(root))
    assert cfg.data.sample_break == "complete_doc"  # the text presets' default, as the reference
    want = token_files.pack(pipe.tokenizer, corpus.docs, 32, "complete_doc").numpy()
    assert np.array_equal(pipe.blocks.blocks(np.arange(len(pipe.blocks))), want)

    def no_tokenizing(*a, **k):
        raise AssertionError("the corpus was tokenized again")

    monkeypatch.setattr(token_files, "token_chunks", no_tokenizing)
    monkeypatch.setattr(token_files, "train_tokenizer", no_tokenizing)
    again = build_pipeline(text_config(**{"data.source": str(root)}))
    assert again.blocks.path == pipe.blocks.path
    assert torch.equal(micro(again, 1).inputs, micro(pipe, 1).inputs)
    (root / "part00000.txt").write_text("changed text\n")  # a changed corpus is a new cache entry
    with pytest.raises(AssertionError, match="tokenized again"):
        build_pipeline(text_config(**{"data.source": str(root)}))


def test_complete_doc_blocks_come_from_the_cached_document_index(tmp_path, monkeypatch):
    monkeypatch.setattr(corpora, "PIECE_BYTES", 256)  # the long document is tokenized in several pieces
    root = tmp_path / "c"
    root.mkdir()
    (root / "a.txt").write_text("".join(f"line {i} of a long document about {WORDS[i % 20]}\n" for i in range(60)))
    (root / "b.txt").write_text("a short one")
    (root / "c.txt").write_text("river stone harbour lantern meadow")
    cfg = text_config(**{"data.source": str(root), "data.sample_break": "complete_doc"})
    pipe = build_pipeline(cfg)
    docs_file = pipe.blocks.path.with_name(pipe.blocks.path.name + ".docs.int64")
    assert np.fromfile(docs_file, dtype=np.int64).size == 3  # one <s> per document, not per piece
    texts = [(root / n).read_text() for n in ("a.txt", "b.txt", "c.txt")]  # pieces are cut after newlines
    want = token_files.pack(pipe.tokenizer, texts, 32, "complete_doc").numpy()
    assert np.array_equal(pipe.blocks.blocks(np.arange(len(pipe.blocks))), want)
    batch = micro(pipe, 0)
    assert (batch.inputs[:, 0] == toks.BOS_ID).all() and not batch.mask[:, 0].any()
    packed = build_pipeline(text_config(**{"data.source": str(root), "data.sample_break": "none"}))
    assert packed.blocks.path == pipe.blocks.path and len(packed.blocks) < len(pipe.blocks)  # one token file
    docs_file.unlink()  # a token file cached before the document index is rebuilt with it
    again = build_pipeline(text_config(**{"data.source": str(root), "data.sample_break": "complete_doc"}))
    assert docs_file.exists() and np.array_equal(again.blocks.blocks(np.arange(len(again.blocks))), want)


def test_large_document_is_streamed_in_pieces(tmp_path, monkeypatch):
    monkeypatch.setattr(corpora, "PIECE_BYTES", 64)
    text = "".join(f"line {i} of one long document\n" for i in range(50)) + "no newline at the end"
    (tmp_path / "big.txt").write_text(text)
    pieces = list(corpora.open_corpus(str(tmp_path)).pieces())
    assert len(pieces) > 10 and pieces[0][1] and not pieces[0][2] and pieces[-1][2] and not pieces[-1][1]
    assert "".join(p[0] for p in pieces) == text
    tok = toks.train_tokenizer([text], 300)
    ids = np.concatenate(list(token_files.token_chunks(tok, iter(pieces))))
    assert ids[0] == toks.BOS_ID and ids[-1] == toks.EOS_ID and (ids == toks.BOS_ID).sum() == 1
    assert tok.decode(ids[1:-1].tolist()) == text


def roberta_like_tokenizer(docs, path):
    """A BPE with RoBERTa's layout: <s> <pad> </s> <unk> first, <mask> as the last id."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.RobertaProcessing(("</s>", 2), ("<s>", 0), add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=350, special_tokens=["<s>", "<pad>", "</s>", "<unk>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(docs, trainer)
    tok.add_special_tokens(["<mask>"])
    tok.save(str(path))
    return tok


def test_given_tokenizer_is_used_with_its_own_special_ids(tmp_path, monkeypatch):
    root = write_corpus(tmp_path / "c", 10_000)
    tok = roberta_like_tokenizer(corpora.read_corpus(str(root)).docs, tmp_path / "rob.json")
    mask_id = tok.token_to_id("<mask>")
    assert mask_id == tok.get_vocab_size() - 1 and mask_id != toks.MASK_ID
    monkeypatch.setenv("HOME", str(tmp_path))
    cfg = text_config(**{"data.source": str(root), "data.tokenizer": "~/rob.json", "data.doc_per_line": True})
    pipe = build_pipeline(cfg)
    assert cfg.model.vocab_size == tok.get_vocab_size() and cfg.model.mask_id == mask_id
    b = micro(pipe, 0)
    assert (b.student_inputs[b.mask] == mask_id).float().mean() > 0.5
    assert not (b.inputs == mask_id).any() and (b.inputs == 0).any()
    assert not b.mask[b.inputs == 0].any()  # <s> never masked; the id 4 ('.' here) may be

    run = tmp_path / "run"
    args = ["pretrain", "--modality", "text", "--data", str(root), "--tokenizer", str(tmp_path / "rob.json"),
            "--out", str(run), "--no-progress"] + [a for k, v in TINY.items() for a in ("--set", f"{k}={v}")]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    assert toks.load_tokenizer(run / "tokenizer.json").to_str() == tok.to_str()

    from tokenizers import Tokenizer, models

    bare = Tokenizer(models.WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]"))
    bare.save(str(tmp_path / "bare.json"))
    with pytest.raises(DataError, match="<mask>"):
        build_pipeline(text_config(**{"data.source": str(root), "data.tokenizer": str(tmp_path / "bare.json")}))


def test_text_paths_expand_home(tmp_path, monkeypatch):
    write_corpus(tmp_path / "corpus", 2_000)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert len(corpora.read_corpus("~/corpus").docs) > 0  # before: "neither a built-in name nor a path"
    assert micro(build_pipeline(text_config(**{"data.source": "~/corpus"})), 0).inputs.shape == (8, 32)


_PEAK = textwrap.dedent("""
    import sys
    from pathlib import Path
    sys.path.insert(0, {tests!r})
    from test_data_text import text_config
    from d2v.train import pretrain
    pretrain(text_config(**{{"data.source": sys.argv[1], "data.num_workers": 0}}), out=Path(sys.argv[2]),
             progress=False)
    hwm = [l for l in open("/proc/self/status") if l.startswith("VmHWM")][0]
    print(int(hwm.split()[1]) * 1024)
""")


def _peak_rss(corpus, out):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "RAYON_NUM_THREADS": "1"}
    code = _PEAK.format(tests=os.path.dirname(__file__))
    res = subprocess.run([sys.executable, "-c", code, str(corpus), str(out)], capture_output=True, text=True,
                         env=env, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    return int(res.stdout.split()[-1])


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="needs Linux /proc")
def test_peak_memory_does_not_grow_with_the_corpus(tmp_path):
    """An 8 MB corpus peaks within 8 MB of a 1 MB one: memory is bounded by the pieces and batches, not the corpus.

    Scaled up, a 2 GB corpus stays within the same few MB of the small corpus's peak (well under a 1.5 GB bound);
    before the token file, docs, int64 ids and the tokenizer's encodings of the whole corpus were held at once
    (hundreds of bytes per token)."""
    small = _peak_rss(write_corpus(tmp_path / "small", 1 << 20, seed=1), tmp_path / "r1")
    large = _peak_rss(write_corpus(tmp_path / "large", 8 << 20, seed=2), tmp_path / "r2")
    assert large - small < 8 << 20, f"peak RSS {small / 2**20:.0f} MB -> {large / 2**20:.0f} MB"
