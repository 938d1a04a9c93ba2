"""Speech: span masks, conv lengths and padding, instance-norm targets with padding, resampling, data errors,
training, resume, export round trip and the Hugging Face layout."""
import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from d2v.cli import app
from d2v.core.config import set_by_path
from d2v.data import recordings
from d2v.data.recordings import load_audio
from d2v.data.audio import read_audio, resample
from d2v.core.errors import DataError
from d2v.masking import span_masks
from d2v.models.speech import SpeechEncoder, conv_output_lengths, frame_padding_mask
from d2v.core.batch import Batch
from d2v.objective import Data2Vec
from d2v.core.presets import preset_config

SR = 16000
TINY = {
    "model.conv_dim": [16, 16, 32, 32, 32, 32, 32], "model.dim": 32, "model.depth": 2, "model.num_heads": 2,
    "model.ffn_dim": 64, "model.pos_conv_groups": 4, "targets.top_k": 2, "run.batch_size": 4, "run.steps": 8,
    "run.log_every": 1, "data.crop_seconds": 0.5,
}


def tiny_config(data, **overrides):
    cfg = preset_config("speech", "tiny")
    for key, value in {**TINY, "data.source": str(data), **overrides}.items():
        set_by_path(cfg, key, value)
    return cfg


def cli_args():
    args = []
    for key, value in TINY.items():
        args += ["--set", f"{key}={json.dumps(value) if isinstance(value, list) else value}"]
    return args + ["--no-progress"]


def write_wav(path, wave, sr=SR):
    import soundfile as sf

    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(str(path), wave, sr, subtype="PCM_16")
    return path


def voice(seed: int, seconds: float, sr: int = SR) -> np.ndarray:
    """A buzzy 'vowel' with a class-dependent pitch and formant, plus a little noise."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * sr)) / sr
    f0 = 100 + 20 * (seed % 5)
    wave = sum(np.sin(2 * np.pi * f0 * h * t) / h for h in range(1, 8))
    return (0.3 * wave / np.abs(wave).max() + 0.01 * rng.standard_normal(t.size)).astype(np.float32)


@pytest.fixture(scope="module")
def audio_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("speech")
    for i in range(12):  # lengths vary so batches hold padding; one file at 8 kHz stereo
        write_wav(root / f"c{i % 2}" / f"v{i % 3}_{i}.wav", voice(i, 0.3 + 0.05 * i))
    write_wav(root / "c0" / "stereo8k.wav", np.stack([voice(20, 0.6, 8000)] * 2, axis=1), 8000)
    return root


# ------------------------------------------------------------------------------------------------ masking
def test_span_masks_statistics_equal_counts_and_padding():
    rng = np.random.default_rng()
    lengths = np.array([500, 400, 320, 499, 450, 300, 480, 500])
    mask = span_masks(lengths, 500, rng, 0.065, 10)
    counts = mask.sum(axis=1)
    assert (counts == counts[0]).all() and counts[0] >= 1
    assert not mask[np.arange(500)[None, :] >= lengths[:, None]].any(), "a padded frame was masked"
    # one row at a time (no equalizing to the batch minimum): 1 - (1 - 0.065)^10 = 49% of frames
    single = [span_masks(np.array([1000]), 1000, rng, 0.065, 10) for _ in range(200)]
    assert abs(np.mean(single) - 0.49) < 0.02
    assert not any(m[0, -1] for m in single), "a span reached the last frame (fairseq never masks it)"
    runs = np.diff(np.concatenate([[0], single[0][0].astype(int), [0]]))
    assert np.median(np.flatnonzero(runs == -1) - np.flatnonzero(runs == 1)) >= 10  # spans of 10, merged if overlapping
    short = span_masks(np.array([3, 1, 50]), 50, rng, 0.065, 10)  # shorter than a span: still >= 1 frame
    assert (short.sum(axis=1) == short.sum(axis=1)[0]).all() and short[1, 0]


# ------------------------------------------------------------------------------------------------ encoder
def tiny_encoder(**overrides):
    cfg = tiny_config("default", **overrides).model
    torch.manual_seed(0)
    return SpeechEncoder(cfg).eval()


@pytest.mark.parametrize("c_in,c_out,k,stride,padding,groups,T", [
    (1, 7, 10, 5, 0, 1, 403),  # the front end's first layer: one input channel
    (6, 10, 3, 2, 0, 1, 57),
    (12, 8, 2, 2, 0, 1, 9),
    (12, 12, 19, 1, 9, 4, 33),  # a position conv: 'same' padding, groups
    (8, 6, 5, 1, 2, 2, 5),  # kernel as long as the sequence
    (5, 5, 3, 3, 1, 5, 8),  # depthwise, stride = kernel
])
@pytest.mark.parametrize("impl", ["conv1d_tc", "conv1d_windows"])
def test_conv1d_tc_equals_conv1d_in_float64(c_in, c_out, k, stride, padding, groups, T, impl):
    from d2v.models import common

    conv1d_tc = getattr(common, impl)  # the dispatcher and the windows path it takes for strided dense convs
    g = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())))
    x = torch.randn(3, T, c_in, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(c_out, c_in // groups, k, dtype=torch.float64, generator=g, requires_grad=True)
    b = torch.randn(c_out, dtype=torch.float64, generator=g, requires_grad=True)
    for bias in (None, b):
        got = conv1d_tc(x, w, bias, stride, padding, groups)
        want = torch.nn.functional.conv1d(x.transpose(1, 2), w, bias, stride, padding, groups=groups).transpose(1, 2)
        assert got.shape == want.shape
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
        up = torch.randn(want.shape, dtype=torch.float64, generator=g)
        grads = torch.autograd.grad((got * up).sum(), [x, w] + ([b] if bias is not None else []))
        refs = torch.autograd.grad((want * up).sum(), [x, w] + ([b] if bias is not None else []))
        for a, r in zip(grads, refs):
            torch.testing.assert_close(a, r, rtol=1e-12, atol=1e-12)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # as pretraining's --precision bf16 runs it
        got = conv1d_tc(x.float(), w.float(), b.float(), stride, padding, groups)
    assert got.dtype == torch.bfloat16
    want = torch.nn.functional.conv1d(x.transpose(1, 2), w, b, stride, padding, groups=groups).transpose(1, 2)
    torch.testing.assert_close(got.double(), want, rtol=0.05, atol=0.05 * want.abs().max().item())


def test_conv_lengths_and_frame_padding():
    enc = tiny_encoder()
    assert enc.receptive_field == 400
    for n in (400, 719, 720, 16000, 33333):
        assert enc(torch.randn(1, n)).shape[1] == conv_output_lengths(n, enc.cfg.conv_kernel, enc.cfg.conv_stride)
    assert conv_output_lengths(16000, [10, 3, 3, 3, 3, 2, 2], [5, 2, 2, 2, 2, 2, 2]) == 49  # 20 ms frames
    lengths = torch.tensor([16000, 9000, 400])
    pad = torch.arange(16000)[None, :] >= lengths[:, None]
    frames = frame_padding_mask(pad, 49, enc.cfg)
    assert (~frames).sum(1).tolist() == [49, 27, 1]
    wave = torch.randn(3, 16000)
    out = enc.encode(wave * ~pad, padding_mask=pad)
    assert torch.equal(out.padding_mask, frames)
    # valid frames of a padded batch equal the same utterance alone (one position conv layer; with more, the
    # reference designs, fairseq and transformers, let the padded tail's conv outputs reach the last frames)
    enc = tiny_encoder(**{"model.pos_conv_depth": 1})
    out = enc.encode(wave * ~pad, padding_mask=pad)
    alone = enc(wave[1:2, :9000])
    torch.testing.assert_close(out.hidden[1, :27], alone[0], atol=2e-5, rtol=1e-4)
    emb = enc.embed(wave * ~pad, padding_mask=pad)
    torch.testing.assert_close(emb[1], alone[0].mean(0), atol=2e-5, rtol=1e-4)


def test_instance_norm_targets_with_padding_through_the_objective():
    from d2v.ops.reference import targets_reference

    cfg = tiny_config("default")
    model = Data2Vec(SpeechEncoder(cfg.model), cfg.targets, cfg.ema, backend="torch")
    lengths = np.array([8000, 5000])
    wave = torch.randn(2, 8000)
    pad = torch.from_numpy(np.arange(8000)[None, :] >= lengths[:, None])
    t_out = model.teacher.encode(wave, padding_mask=pad, output_layers="ffn", top_k=2)
    got = torch.ops.d2v.targets(t_out.layers, "instance", "none", None, t_out.padding_mask, 1e-5, "torch")
    want = targets_reference(t_out.layers, "instance", "none", padding_mask=t_out.padding_mask, dtype=torch.float64)
    valid = ~t_out.padding_mask
    torch.testing.assert_close(got[valid].double(), want[valid], atol=1e-4, rtol=1e-4)
    one = torch.ops.d2v.targets(t_out.layers[:1], "instance", "none", None, t_out.padding_mask, 1e-12, "torch")
    per_channel = one[1][valid[1]]  # padding is excluded: valid steps have zero mean and unit variance
    torch.testing.assert_close(per_channel.mean(0), torch.zeros(32), atol=1e-4, rtol=0)
    torch.testing.assert_close(per_channel.var(0, unbiased=False), torch.ones(32), atol=2e-3, rtol=0)
    T = t_out.padding_mask.shape[1]
    mask = torch.from_numpy(span_masks((~t_out.padding_mask).sum(1).numpy(), T, np.random.default_rng(0)))
    loss, stats = model(Batch(inputs=wave, mask=mask, padding_mask=pad))
    assert torch.isfinite(loss) and stats["masked"] == mask.sum()


# ------------------------------------------------------------------------------------------------ data
@pytest.mark.parametrize("sr", [8000, 22050, 44100])
def test_resample_keeps_frequency_and_removes_aliases(sr):
    t = np.arange(sr) / sr
    y = resample(np.sin(2 * np.pi * 440 * t), sr, SR)
    assert y.size == SR
    spectrum = np.abs(np.fft.rfft(y[1000:-1000] * np.hanning(SR - 2000)))
    assert abs(np.argmax(spectrum) * SR / (SR - 2000) - 440) < 2
    assert abs(np.abs(y[1000:-1000]).max() - 1) < 0.02
    if sr > SR:  # a tone above the new Nyquist must be filtered out, not folded down
        z = resample(np.sin(2 * np.pi * 10000 * t), sr, SR)
        assert np.abs(z[1000:-1000]).max() < 0.01


def test_folder_loading_labels_and_holdout(audio_dir):
    ds = load_audio(str(audio_dir))
    assert len(ds) == 13 and ds.classes == ["c0", "c1"] and ds.skipped == 0
    stereo = read_audio(audio_dir / "c0" / "stereo8k.wav")
    assert stereo.ndim == 1 and stereo.size == 9600  # 0.6 s at 16 kHz
    test = recordings.labelled_split(ds, "test", ["v0_*"])
    train = recordings.labelled_split(ds, "train", ["v0_*"])
    assert all(p.name.startswith("v0_") for p in test.files) and len(test) + len(train) == 13
    with pytest.raises(DataError, match="matches no file"):
        recordings.labelled_split(ds, "test", ["nobody_*"])


@pytest.mark.parametrize("kind", ["corrupt", "empty", "silent"])
def test_bad_files_are_named_or_skipped(tmp_path, kind):
    write_wav(tmp_path / "good.wav", voice(1, 0.5))
    bad = tmp_path / "bad.wav"
    if kind == "corrupt":
        bad.write_bytes(b"RIFF\x00\x00\x00\x00WAVEnot really audio")
    elif kind == "empty":
        write_wav(bad, np.zeros(0, dtype=np.float32))
    else:
        write_wav(bad, np.zeros(8000, dtype=np.float32))
    name = str(bad).replace(".", r"\.")
    if kind == "silent":  # only decoding finds it: the error comes with the batch that needs the file
        ds = load_audio(str(tmp_path))
        assert len(ds) == 2 and ds.decodes == 0
        with pytest.raises(DataError, match=name):
            ds.get_batch([0, 1])
        ds = load_audio(str(tmp_path), skip_bad_files=True)
        wave, _ = ds.get_batch([0, 1])  # the silent file is replaced by the next readable one
        assert ds.skipped == 1 and torch.equal(wave[0], wave[1])
        return
    with pytest.raises(DataError, match=name):  # the header shows it: refused when the set is listed
        load_audio(str(tmp_path))
    ds = load_audio(str(tmp_path), skip_bad_files=True)
    assert len(ds) == 1 and ds.skipped == 1


def test_missing_debian_package_and_builtin_default(monkeypatch, tmp_path):
    monkeypatch.setattr(recordings, "ASTERISK_DIRS", [tmp_path / "nowhere"])
    with pytest.raises(DataError, match="asterisk-core-sounds-en-wav"):
        load_audio("asterisk")
    ds = load_audio("default")
    assert len(ds) >= 20 and sum(ds.lengths) / SR > 60


# ------------------------------------------------------------------------------------------------ end to end
def test_pretrain_loss_falls_resume_and_export(audio_dir, tmp_path):
    from d2v.encoders.load import load_encoder
    from d2v.train import pretrain

    # The loss-fall check is about the loop, not the preset: a linear head, unclipped, falls fast on 30 updates.
    cfg = tiny_config(audio_dir, **{"run.steps": 30, "run.log_every": 5, "optim.lr": 2e-3,
                                    "optim.warmup_fraction": 0.1, "run.checkpoint_every": 15,
                                    "targets.head": "linear", "optim.clip_grad": 0.0})
    summary = pretrain(cfg, out=tmp_path / "run", progress=False)
    losses = [json.loads(line)["loss"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert summary.steps == 30 and losses[-1] < 0.7 * losses[0]

    # resume from step 15 gives the same final weights as the uninterrupted run
    import shutil

    from d2v.runtime import checkpoint as ckpt

    shutil.copytree(tmp_path / "run", tmp_path / "half")
    shutil.rmtree(tmp_path / "half" / "checkpoints" / "step_00000030")
    (tmp_path / "half" / "checkpoints" / "latest").write_text("step_00000015")
    pretrain(cfg, out=tmp_path / "half", resume=True, progress=False)
    a, _, _ = ckpt.read_checkpoint(ckpt.latest_checkpoint(tmp_path / "run"))
    b, _, _ = ckpt.read_checkpoint(ckpt.latest_checkpoint(tmp_path / "half"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=0, rtol=0, msg=k)

    runner = CliRunner()
    res = runner.invoke(app, ["pretrain", "--out", str(tmp_path / "run"), "--resume"])  # no --modality needed
    assert res.exit_code == 0 and "is complete" in res.output, res.output
    res = runner.invoke(app, ["export", "checkpoint", str(tmp_path / "run"), "--out", str(tmp_path / "exp")])
    assert res.exit_code == 0, res.output
    enc = load_encoder(tmp_path / "exp")
    wave, pad = load_audio(str(audio_dir)).get_batch(torch.arange(3))
    hidden = enc(wave, padding_mask=pad)
    T = conv_output_lengths(wave.shape[1], enc.cfg.conv_kernel, enc.cfg.conv_stride)
    assert hidden.shape == (3, T, 32) and enc.embed(wave, pad).shape == (3, 32)
    res = runner.invoke(app, ["probe", str(tmp_path / "exp"), "--data", str(audio_dir), "--holdout", "v2_*"])
    assert res.exit_code == 0 and "accuracy" in res.output, res.output

    transformers = pytest.importorskip("transformers")
    hf = transformers.Data2VecAudioModel.from_pretrained(tmp_path / "exp" / "hf").eval()
    fe = transformers.AutoFeatureExtractor.from_pretrained(tmp_path / "exp" / "hf")
    lengths = (~pad).sum(1)
    inputs = fe([w[:n].numpy() for w, n in zip(wave, lengths)], sampling_rate=SR, padding=True, return_tensors="pt")
    with torch.no_grad():
        theirs = hf(inputs.input_values, attention_mask=inputs.attention_mask).last_hidden_state
        ours = enc.encode(wave, padding_mask=pad)
    valid = ~ours.padding_mask
    torch.testing.assert_close(theirs[valid], ours.hidden[valid], atol=1e-4, rtol=1e-4)


def test_cli_speech_errors(tmp_path):
    runner = CliRunner()
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "x.wav").write_bytes(b"garbage")
    res = runner.invoke(app, ["pretrain", "--modality", "speech", "--data", str(tmp_path / "bad"),
                              "--out", str(tmp_path / "r")] + cli_args())
    assert res.exit_code == 2 and "x.wav" in res.output and "--skip-bad-files" in res.output
    res = runner.invoke(app, ["pretrain", "--modality", "speech", "--data", str(tmp_path / "nothing"), "--dry-run"])
    assert res.exit_code == 2 and "neither a built-in" in res.output


