"""Mixtures (--data A --data B --weights 0.7,0.3): samples drawn from several sources by weight, as a function of
(seed, position): shares within 2% over 2,000 samples, the same on 1 and 2 processes, exact on resume, counted per
source in metrics.jsonl and the summary; bad weights and sources of another modality are one-line errors."""
import json
import os
import signal

import numpy as np
import pytest
import soundfile as sf
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from conftest import tiny_cli_args, tiny_config
from d2v.cli import app
from d2v.core.errors import ConfigError
from d2v.data.mixture import MIXTURE_WINDOW, MixtureOrder, quotas
from d2v.data.pipeline import build_pipeline
from d2v.data.sources import MANIFEST_NAME
from d2v.runtime import checkpoint as ckpt
from d2v.train import pretrain
from test_data_images import make_folder

IMAGES = {"data.image_size": 8, "model.image_size": 0, "run.steps": 4}


@pytest.fixture
def folders(tmp_path):
    return make_folder(tmp_path / "a", n=30, size=(10, 10)), make_folder(tmp_path / "b", n=20, size=(12, 9), seed=1)


def _mixture(a, b, weights=(0.7, 0.3), **over):
    return tiny_config(**{**IMAGES, "data.source": "", "data.sources": [str(a), str(b)],
                          "data.weights": list(weights), **over})


def _weights(run):
    return load_file(str(ckpt.latest_checkpoint(run) / "model.safetensors"))


def test_weights_give_the_shares_at_every_window_and_each_source_is_read_through(folders):
    pipe = build_pipeline(_mixture(*folders))
    idx = pipe.order.indices(0, 2000).numpy()
    from_a = idx < 30  # the first source's images come first in the mixture's data set
    assert abs(from_a.mean() - 0.7) <= 0.02 and abs((~from_a).mean() - 0.3) <= 0.02
    assert pipe.order.drawn(2000) == [int(from_a.sum()), int((~from_a).sum())]
    assert [pipe.order.drawn(p)[0] for p in range(0, 2001, 250)] == \
        [int(from_a[:p].sum()) for p in range(0, 2001, 250)]
    assert sorted(idx[from_a][:30]) == list(range(30))  # a source's first pass: each of its samples once
    assert sorted(idx[~from_a][:20]) == list(range(30, 50))
    # a position's sample is the same however the positions are asked for (processes, micro-batches, resume)
    assert torch.equal(pipe.order.indices(1234, 40), torch.from_numpy(idx[1234:1274]))
    assert torch.equal(torch.cat([pipe.order.indices(990, 5), pipe.order.indices(995, 10)]),
                       torch.from_numpy(idx[990:1005]))


def test_quotas_apportion_any_weights_exactly():
    assert quotas([0.7, 0.3], 2) == [700, 300] and quotas([7, 3], 2) == [700, 300]
    assert quotas([], 3) == [334, 333, 333] and sum(quotas([1, 1, 1, 1, 1, 1, 1], 7)) == MIXTURE_WINDOW
    order = MixtureOrder([5, 1000, 37], [0.2, 0.5, 0.3], seed=3)
    counts = np.bincount(np.searchsorted(order.starts, order.indices(0, 3 * MIXTURE_WINDOW).numpy(), "right") - 1)
    assert counts.tolist() == [600, 1500, 900]


def test_two_processes_draw_what_one_does(folders, tmp_path):
    """2,000 samples (50 updates of 40) on 1 and on 2 processes: the same draws per source, at 0.7 / 0.3 within 2%,
    and the same weights."""
    from test_distributed import max_diff, torchrun

    over = {**IMAGES, "run.steps": 50, "run.batch_size": 40, "run.log_every": 10}
    one = pretrain(_mixture(*folders, **over), out=tmp_path / "one", progress=False)
    args = ["pretrain", "--data", str(folders[0]), "--data", str(folders[1]), "--weights", "0.7,0.3",
            "--out", str(tmp_path / "two"), *tiny_cli_args()]
    for key, value in over.items():
        args += ["--set", f"{key}={value if not isinstance(value, tuple) else ','.join(map(str, value))}"]
    rc, out = torchrun(args, tmp_path / "logs")
    assert rc == 0, out
    rows = [[json.loads(x) for x in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
            for run in ("one", "two")]
    assert [(r["drawn_0"], r["drawn_1"]) for r in rows[0]] == [(r["drawn_0"], r["drawn_1"]) for r in rows[1]]
    assert rows[0][-1]["drawn_0"] + rows[0][-1]["drawn_1"] == 2000 and tuple(one.drawn) == (1400, 600)
    assert abs(rows[0][-1]["drawn_0"] / 2000 - 0.7) <= 0.02
    assert max_diff(_weights(tmp_path / "one"), _weights(tmp_path / "two")) < 1e-5


def test_a_mixture_resumes_exactly_and_reports_its_draws(folders, tmp_path, monkeypatch):
    from d2v.objective import Data2Vec

    args = ["pretrain", "--data", str(folders[0]), "--data", str(folders[1]), "--weights", "3,1",
            "--image-size", "8", *tiny_cli_args()]  # 8 updates of 16
    result = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "ref")])
    assert result.exit_code == 0, result.output
    last = json.loads((tmp_path / "ref" / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["drawn_0"] + last["drawn_1"] == 128 and abs(last["drawn_0"] / 128 - 0.75) < 0.05
    assert f"{last['drawn_0']} samples ({last['drawn_0'] / 128:.1%})" in result.output
    original = Data2Vec.ema_step
    with monkeypatch.context() as m:  # Ctrl-C after step 2, then resume with the same sources
        m.setattr(Data2Vec, "ema_step", lambda self, step: (step == 2 and os.kill(os.getpid(), signal.SIGINT))
                  or original(self, step))
        CliRunner().invoke(app, [*args, "--out", str(tmp_path / "r")])
    assert (tmp_path / "r" / MANIFEST_NAME).read_text().startswith("# d2v data manifest mixture v1\t2\t")
    result = CliRunner().invoke(app, ["pretrain", "--out", str(tmp_path / "r"), "--resume", "--no-progress"])
    assert result.exit_code == 0, result.output
    a, b = _weights(tmp_path / "ref"), _weights(tmp_path / "r")
    assert all(torch.equal(a[k], b[k]) for k in a)
    rows = [json.loads(x) for x in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert [r["drawn_0"] + r["drawn_1"] for r in rows] == [16 * k for k in range(1, 9)]
    swapped = CliRunner().invoke(app, ["pretrain", "--out", str(tmp_path / "r"), "--resume", "--data",
                                       str(folders[1]), "--data", str(folders[0]), "--no-progress"])
    assert swapped.exit_code == 2 and "cannot change when resuming" in swapped.output


def test_a_run_saved_before_mixtures_existed_resumes(tmp_path, monkeypatch):
    from d2v.objective import Data2Vec

    pretrain(tiny_config(**{"run.steps": 2}), out=tmp_path / "ref", progress=False)
    original = Data2Vec.ema_step
    with monkeypatch.context() as m:
        m.setattr(Data2Vec, "ema_step", lambda self, step: (step == 1 and os.kill(os.getpid(), signal.SIGINT))
                  or original(self, step))
        pretrain(tiny_config(**{"run.steps": 2}), out=tmp_path / "old", progress=False)
    saved = json.loads((tmp_path / "old" / "config.json").read_text())
    del saved["data"]["sources"], saved["data"]["weights"]  # as runs wrote it before
    (tmp_path / "old" / "config.json").write_text(json.dumps(saved))
    assert pretrain(tiny_config(**{"run.steps": 2}), out=tmp_path / "old", resume=True, progress=False).steps == 2
    a, b = _weights(tmp_path / "ref"), _weights(tmp_path / "old")
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("extra,message", [
    (["--weights", "0.7,-0.3"], "--weights (data.weights) must be positive numbers, got -0.3"),
    (["--weights", "0.7"], "gives 1 weight(s) for 2 --data source(s)"),
    (["--weights", "0.7,x"], "--weights takes comma-separated numbers, one per --data (e.g. 0.7,0.3), got '0.7,x'"),
    (["--weights", "1,nan"], "must be positive numbers, got nan"),
    (["--weights", "1,0.0001"], "weight 0.0001 of source 2 is too small"),
    (["--data", "pydoc"], "every source of a vision mixture must hold vision data, but 'pydoc' is a built-in text"),
])
def test_bad_weights_and_foreign_sources_are_one_line_errors(folders, extra, message):
    result = CliRunner().invoke(app, ["pretrain", "--data", str(folders[0]), "--data", str(folders[1]), *extra,
                                      "--dry-run"])
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    assert result.exit_code == 2 and len(lines) == 1 and message in lines[0], result.output


def test_weights_without_a_mixture_and_mixed_kinds_of_image_source_are_refused(folders, tmp_path):
    result = CliRunner().invoke(app, ["pretrain", "--data", str(folders[0]), "--weights", "1", "--dry-run"])
    assert result.exit_code == 2 and "give several --data" in result.output
    result = CliRunner().invoke(app, ["pretrain", "--data", "digits", "--data", str(folders[0]), "--dry-run"])
    assert result.exit_code == 2 and "either in-memory sets" in result.output


def test_in_memory_image_sets_mix_at_one_size_and_channel_count(tmp_path):
    rgb = np.random.default_rng(0).integers(0, 256, (50, 8, 8, 3), dtype=np.uint8)
    np.save(tmp_path / "rgb.npy", rgb)
    pipe = build_pipeline(tiny_config(**{"data.source": "", "data.sources": ["digits", str(tmp_path / "rgb.npy")],
                                         "data.weights": [1, 1]}))
    assert pipe.dataset.shape == (3, 8, 8) and pipe.dataset.part_sizes[1] == 50
    assert pipe.order.drawn(1000) == [500, 500]
    with pytest.raises(Exception, match="must be of one size"):
        np.save(tmp_path / "big.npy", rgb.repeat(2, axis=1).repeat(2, axis=2))
        build_pipeline(tiny_config(**{"data.source": "", "data.sources": ["digits", str(tmp_path / "big.npy")]}))


def test_speech_mixture_buckets_by_length(tmp_path):
    from d2v.data.speech import BUCKET_WINDOW
    from test_speech import tiny_config as speech_config, voice

    folder = tmp_path / "wavs"
    folder.mkdir()
    for i in range(12):
        sf.write(str(folder / f"{i:02d}.flac"), voice(i, 0.2 + 0.1 * i), 16000)
    cfg = speech_config("default")
    cfg.data.source, cfg.data.sources, cfg.data.weights = "", ["default", str(folder)], [0.5, 0.5]
    pipe = build_pipeline(cfg)
    B = cfg.run.batch_size
    span = BUCKET_WINDOW * B
    got, order = pipe.indices(0, span), pipe.order.indices(0, span).numpy()
    assert sorted(got.tolist()) == sorted(order.tolist())  # bucketing regroups the mixture's draws, keeps them all
    lengths = np.minimum(pipe.dataset.lengths, pipe.max_samples)[got].reshape(-1, B)
    ranges = sorted((b.min(), b.max()) for b in lengths)
    assert all(hi <= nxt_lo for (_, hi), (nxt_lo, _) in zip(ranges, ranges[1:]))  # batches of similar lengths
    from_folder = got >= pipe.dataset.part_sizes[0]
    assert 0 < from_folder.mean() < 1


def test_text_mixture_trains_one_tokenizer_on_both_and_draws_blocks_by_weight(tmp_path):
    from test_data_text import text_config

    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text("".join(f"the quick brown fox {i} jumps over the lazy dog\n" for i in range(400)))
    b.write_text("".join(f"lorem ipsum dolor sit amet {i} consectetur adipiscing\n" for i in range(400)))
    pipe = build_pipeline(text_config(**{"data.source": "", "data.sources": [str(a), str(b)],
                                         "data.weights": [0.25, 0.75], "data.doc_per_line": True,
                                         "data.vocab_size": 1000}))
    vocab = pipe.tokenizer.get_vocab()
    assert any("quick" in t for t in vocab) and any("lorem" in t for t in vocab)
    idx = pipe.order.indices(0, 2000).numpy()
    assert abs((idx >= pipe.blocks.sizes[0]).mean() - 0.75) <= 0.02
    ids = pipe.blocks.blocks(idx[:8])
    text = [pipe.tokenizer.decode(row.tolist()) for row in ids]
    assert all(("lorem" in t) == (i >= pipe.blocks.sizes[0]) for t, i in zip(text, idx[:8]))


def test_config_refuses_a_mixture_of_one_or_both_fields():
    from d2v.train import validate

    with pytest.raises(ConfigError, match="at least two sources"):
        validate(tiny_config(**{"data.source": "", "data.sources": ["digits"]}), memory=False)
    with pytest.raises(ConfigError, match="either as data.source"):
        validate(tiny_config(**{"data.sources": ["digits", "digits"]}), memory=False)
