"""d2v embed: every item of a data set through an encoder into OUT.npy and OUT.index.tsv, resumable, with pretrain's
bad-file rule; and the data every command reads, as --data's help lists it."""
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from conftest import tiny_config
from d2v.cli import app

runner = CliRunner()


@pytest.fixture(scope="module")
def encoder_dir(tmp_path_factory):
    from d2v.train import pretrain

    root = tmp_path_factory.mktemp("emb")
    pretrain(tiny_config(**{"run.steps": 2}), out=root / "run", progress=False)
    assert runner.invoke(app, ["export", "checkpoint", str(root / "run"), "--out", str(root / "enc"),
                               "--no-hf"]).exit_code == 0
    return root / "enc"


def index_rows(path):
    lines = path.read_text().splitlines()
    return lines[0].split("\t"), [line.split("\t") for line in lines[1:]]


def test_embed_of_the_digits_test_split_equals_load_encoder_embed(encoder_dir, tmp_path):
    import d2v
    from d2v.data.images import load_images

    out = tmp_path / "e.npy"
    result = runner.invoke(app, ["embed", str(encoder_dir), "--data", "digits", "--split", "test", "--out", str(out),
                                 "--batch-size", "100"])
    assert result.exit_code == 0, result.output
    enc = d2v.load_encoder(encoder_dir)
    test = load_images("digits", "test", image_size=enc.cfg.image_size)
    with torch.no_grad():
        want = enc.embed(test.get_batch(torch.arange(len(test)))).numpy()
    got = np.load(out)
    assert got.dtype == np.float32 and got.shape == want.shape == (539, enc.cfg.dim)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    header, rows = index_rows(tmp_path / "e.index.tsv")
    assert header == ["row", "item", "class"] and len(rows) == 539
    assert rows[5] == ["5", "digits/test/5", str(int(test.labels[5]))]
    assert not list(tmp_path.glob(".*"))  # the partial file is gone


def test_layers_and_pools(encoder_dir, tmp_path):
    import d2v
    from d2v.encoders.features import pooled

    enc = d2v.load_encoder(encoder_dir)
    x = torch.rand(3, enc.cfg.in_chans, enc.cfg.image_size, enc.cfg.image_size)
    with torch.no_grad():
        out = enc.encode(x, output_layers="block", top_k=enc.cfg.depth)
        torch.testing.assert_close(pooled(enc, (x,), 1, "mean"), out.layers[0][:, 1:].mean(1))
        torch.testing.assert_close(pooled(enc, (x,), 0, "cls"), enc(x)[:, 0])
        torch.testing.assert_close(pooled(enc, (x,), enc.cfg.depth, "cls"), out.layers[-1][:, 0])
        # several blocks: each block's mean, lowest first, the last one as embed pools it; one pass
        for blocks in range(2, enc.cfg.depth + 1):
            want = [out.layers[i][:, 1:].mean(1) for i in range(enc.cfg.depth - blocks, enc.cfg.depth - 1)]
            torch.testing.assert_close(pooled(enc, (x,), blocks=blocks), torch.cat([*want, enc.embed(x)], dim=1))
        torch.testing.assert_close(pooled(enc, (x,), blocks=1), enc.embed(x))
        with pytest.raises(ValueError, match="blocks"):
            pooled(enc, (x,), blocks=enc.cfg.depth + 1)
        with pytest.raises(ValueError, match="layer 0"):
            pooled(enc, (x,), layer=1, blocks=2)
    for args, text in ((["--layer", "9"], "--layer"), (["--pool", "max"], "--pool")):
        result = runner.invoke(app, ["embed", str(encoder_dir), "--data", "digits", "--out", str(tmp_path / "x.npy"),
                                     *args])
        assert result.exit_code == 2 and text in result.output and len(result.output.strip().splitlines()) == 1
    result = runner.invoke(app, ["embed", str(encoder_dir), "--data", "digits", "--out", str(tmp_path / "x.csv")])
    assert result.exit_code == 2 and ".npy" in result.output
    result = runner.invoke(app, ["embed", str(encoder_dir), "--data", "digits", "--out", str(tmp_path / "no" / "x.npy")])
    assert result.exit_code == 2 and "does not exist" in result.output


def test_a_stopped_embed_continues_where_it_stopped(encoder_dir, tmp_path, monkeypatch):
    import d2v.embed as embed_module

    full = tmp_path / "full.npy"
    embed_module.embed(encoder_dir, "digits", full, batch_size=64)
    monkeypatch.setattr(embed_module, "SAVE_SECONDS", 0.0)  # make every batch durable
    real, calls = embed_module.pooled, []

    def stop_after_five(*args, **kwargs):
        calls.append(1)
        if len(calls) == 6:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    part = tmp_path / "part.npy"
    with monkeypatch.context() as m:
        m.setattr(embed_module, "pooled", stop_after_five)
        with pytest.raises(KeyboardInterrupt):
            embed_module.embed(encoder_dir, "digits", part, batch_size=64)
    assert not part.exists() and (tmp_path / ".part.npy.partial").is_dir()
    summary = embed_module.embed(encoder_dir, "digits", part, batch_size=64)
    assert summary.resumed_from == 5 * 64
    assert np.array_equal(np.load(full), np.load(part))
    assert (tmp_path / "full.index.tsv").read_text() == (tmp_path / "part.index.tsv").read_text()
    other = embed_module.embed(encoder_dir, "digits", part, batch_size=64, layer=1)  # other options: a fresh start
    assert other.resumed_from == 0 and not np.array_equal(np.load(full), np.load(part))


def test_unreadable_files_stop_it_or_are_left_out(encoder_dir, tmp_path):
    from PIL import Image

    root = tmp_path / "imgs"
    for c in ("a", "b"):
        (root / c).mkdir(parents=True)
        for i in range(3):
            arr = (np.random.default_rng(i).random((8, 8)) * 255).astype(np.uint8)
            Image.fromarray(arr, mode="L").save(root / c / f"{i}.png")
    (root / "b" / "9.png").write_bytes(b"not an image")
    out = tmp_path / "e.npy"
    result = runner.invoke(app, ["embed", str(encoder_dir), "--data", str(root), "--out", str(out)])
    assert result.exit_code == 2 and "9.png" in result.output and "--skip-bad-files" in result.output
    assert not out.exists()
    result = runner.invoke(app, ["embed", str(encoder_dir), "--data", str(root), "--out", str(out), "--skip-bad-files",
                                 "--num-workers", "2"])
    assert result.exit_code == 0 and "Left out 1" in result.output and "9.png" in result.output, result.output
    header, rows = index_rows(tmp_path / "e.index.tsv")
    assert np.load(out).shape[0] == len(rows) == 6 and header[-1] == "class"
    assert [r[1] for r in rows] == [str(root / c / f"{i}.png") for c in "ab" for i in range(3)]
    assert [r[2] for r in rows] == ["a"] * 3 + ["b"] * 3


def test_speech_and_text_items(tmp_path):
    """Speech: one row per recording (mean over its valid frames); text: one per document, named by file and
    position."""
    import soundfile as sf

    import d2v
    from d2v.core.presets import preset_config
    from d2v.train import pretrain

    wavs = tmp_path / "wavs"
    wavs.mkdir()
    rng = np.random.default_rng(0)
    for i, n in enumerate((4000, 6400, 5000)):
        sf.write(wavs / f"{i}.wav", (rng.standard_normal(n) * 0.1).astype(np.float32), 16000)
    cfg = preset_config("speech", "tiny")
    for key, value in {"model.dim": 32, "model.depth": 2, "model.num_heads": 2, "model.ffn_dim": 64,
                       "model.conv_dim": [16] * 7, "model.pos_conv_groups": 2, "model.pos_conv_depth": 1,
                       "targets.top_k": 2, "run.batch_size": 2, "run.steps": 1, "data.source": str(wavs),
                       "data.crop_seconds": 0.25}.items():
        setattr(getattr(cfg, key.split(".")[0]), key.split(".")[1], value)
    pretrain(cfg, out=tmp_path / "s", progress=False)
    out = tmp_path / "s.npy"
    result = runner.invoke(app, ["embed", str(tmp_path / "s"), "--data", str(wavs), "--out", str(out),
                                 "--batch-size", "2"])
    assert result.exit_code == 0, result.output
    enc = d2v.load_encoder(tmp_path / "s")
    import soundfile

    with torch.no_grad():
        want = [enc.embed(torch.from_numpy(soundfile.read(wavs / f"{i}.wav", dtype="float32")[0])[None])[0]
                for i in range(3)]
    np.testing.assert_allclose(np.load(out), torch.stack(want).numpy(), rtol=1e-4, atol=1e-5)
    result = runner.invoke(app, ["embed", str(tmp_path / "s"), "--data", str(wavs), "--out", str(out), "--pool",
                                 "cls"])
    assert result.exit_code == 2 and "speech" in result.output

    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "a.txt").write_text("one line\n\nanother line here\n")
    (docs / "b.txt").write_text("the only line\n")
    text_cfg = preset_config("text", "tiny")
    for key, value in {"model.dim": 32, "model.depth": 2, "model.num_heads": 2, "model.ffn_dim": 64,
                       "targets.top_k": 2, "run.batch_size": 2, "run.steps": 1, "data.source": str(docs),
                       "data.vocab_size": 300, "model.max_length": 16}.items():
        setattr(getattr(text_cfg, key.split(".")[0]), key.split(".")[1], value)
    pretrain(text_cfg, out=tmp_path / "t", progress=False)
    result = runner.invoke(app, ["embed", str(tmp_path / "t"), "--data", str(docs), "--out", str(tmp_path / "t.npy"),
                                 "--doc-per-line"])
    assert result.exit_code == 0, result.output
    _, rows = index_rows(tmp_path / "t.index.tsv")
    assert [r[1] for r in rows] == [f"{docs / 'a.txt'}#0", f"{docs / 'a.txt'}#1", f"{docs / 'b.txt'}#0"]
    enc = d2v.load_encoder(tmp_path / "t")
    with torch.no_grad():
        want = enc.embed(["one line", "another line here", "the only line"]).numpy()
    np.testing.assert_allclose(np.load(tmp_path / "t.npy"), want, rtol=1e-4, atol=1e-5)


def test_data_help_names_every_accepted_form():
    from d2v.cli import DATA_FORMS
    from d2v.data.pipeline import BUILTIN

    for names in BUILTIN.values():
        for name in names:
            assert name in DATA_FORMS
    for form in ("folder", ".npy", "tar", "{000000..000146}", ".tsv", "manifest", ".txt"):
        assert form in DATA_FORMS
    for command in (["pretrain"], ["embed"], ["predict"], ["data", "check"]):
        help_text = " ".join(runner.invoke(app, [*command, "--help"]).output.split()).replace("- ", "-")  # wrapped
        assert "spoken-digits" in help_text and "fairseq .tsv manifest" in help_text, command
