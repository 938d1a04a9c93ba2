"""d2v export onnx: every modality and recipe as an ONNX graph that onnxruntime runs to within 1e-4 of the PyTorch
encoder, at batch sizes and lengths other than the ones it was exported with; text ships its tokenizer."""
import dataclasses
import importlib.util
import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from d2v.cli import app

runner = CliRunner()
MISSING = [m for m in ("onnx", "onnxruntime", "onnxscript") if importlib.util.find_spec(m) is None]
needs_onnx = pytest.mark.skipif(bool(MISSING), reason=f"needs {', '.join(MISSING)} (pip install 'd2v[onnx]')")
SMALL = {
    "vision": {"image_size": 16, "patch_size": 4, "in_chans": 3, "dim": 32, "depth": 2, "num_heads": 2},
    "speech": {"conv_dim": [32, 32, 32], "conv_kernel": [10, 3, 3], "conv_stride": [5, 2, 2], "dim": 32, "depth": 2,
               "num_heads": 2, "ffn_dim": 64, "pos_conv_groups": 4, "pos_conv_kernel": 5},
    "text": {"vocab_size": 300, "max_length": 24, "dim": 32, "depth": 2, "num_heads": 2, "ffn_dim": 64},
}


def _encoder_dir(tmp_path, modality, recipe):
    """A d2v encoder directory (what `d2v export checkpoint` writes) with random weights, biases and norms too."""
    from safetensors.torch import save_file

    from d2v.core.presets import preset_config
    from d2v.encoders.load import ENCODER_FORMAT
    from d2v.models import build_encoder

    cfg = dataclasses.replace(preset_config(modality, "tiny", recipe).model, **SMALL[modality])
    torch.manual_seed(0)
    encoder = build_encoder(cfg)
    with torch.no_grad():
        for p in encoder.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    path = tmp_path / f"{modality}-{recipe}"
    path.mkdir()
    save_file({k: v.contiguous() for k, v in encoder.state_dict().items()}, str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps({"format": ENCODER_FORMAT, "version": 1,
                                                  "model": dataclasses.asdict(cfg)}))
    return path


def _inputs(modality, cfg, rng):
    """Inputs at shapes the export never saw: batch 5; speech 3111 samples, text 9 tokens, one item padded."""
    if modality == "vision":
        return {"images": rng.random((5, 3, 16, 16), dtype=np.float32)}
    length = 3111 if modality == "speech" else 9
    mask = np.ones((5, length), dtype=np.int64)
    mask[1, length // 2:] = 0
    if modality == "speech":
        return {"waveform": (rng.standard_normal((5, length)) * mask).astype(np.float32), "attention_mask": mask}
    ids = rng.integers(5, cfg.vocab_size, (5, length))
    return {"input_ids": np.where(mask == 1, ids, cfg.pad_id), "attention_mask": mask}


@needs_onnx
@pytest.mark.parametrize("recipe", ["v1", "v2"])
@pytest.mark.parametrize("modality", ["vision", "speech", "text"])
def test_onnx_graph_matches_the_pytorch_encoder(tmp_path, modality, recipe):
    import onnxruntime

    import d2v
    from d2v.export import export_onnx

    source = _encoder_dir(tmp_path, modality, recipe)
    result = export_onnx(source, tmp_path / "out" / "enc.onnx")
    assert result["max_abs_diff"] <= 1e-4 and result["tokenizer"] is None  # no tokenizer.json beside this one
    session = onnxruntime.InferenceSession(str(tmp_path / "out" / "enc.onnx"), providers=["CPUExecutionProvider"])
    meta = json.loads(session.get_modelmeta().custom_metadata_map["d2v"])
    assert meta["model"]["modality"] == modality and meta["inputs"] == [i.name for i in session.get_inputs()]

    encoder = d2v.load_encoder(source)
    feeds = _inputs(modality, encoder.cfg, np.random.default_rng(1))
    got = dict(zip([o.name for o in session.get_outputs()], session.run(None, feeds)))
    x = {k: torch.from_numpy(v) for k, v in feeds.items()}
    with torch.no_grad():
        if modality == "vision":
            want = {"last_hidden_state": encoder(x["images"]), "pooled": encoder.embed(x["images"])}
        elif modality == "speech":
            padding = x["attention_mask"] == 0
            out = encoder.encode(x["waveform"], padding_mask=padding)
            want = {"last_hidden_state": out.hidden, "frame_mask": (~out.padding_mask).long(),
                    "pooled": encoder.embed(x["waveform"], padding)}
            assert got["frame_mask"][1].sum() < got["frame_mask"][0].sum()  # the padded item has fewer frames
        else:
            hidden, attention = encoder(x["input_ids"])
            assert torch.equal(attention, x["attention_mask"])
            want = {"last_hidden_state": hidden, "pooled": encoder.embed(x["input_ids"])}
    assert set(got) == set(want)
    for name, value in want.items():
        assert got[name].shape == tuple(value.shape), name
        np.testing.assert_allclose(got[name], value.numpy(), rtol=0, atol=1e-4, err_msg=name)


@needs_onnx
def test_text_export_ships_the_tokenizer_and_never_overwrites_without_force(tmp_path):
    import onnxruntime
    from tokenizers import Tokenizer

    import d2v
    from d2v.core.config import set_by_path
    from d2v.core.presets import preset_config
    from d2v.train import pretrain

    text = preset_config("text", "tiny")
    for key, value in {"model.dim": 32, "model.depth": 1, "model.num_heads": 2, "model.ffn_dim": 64,
                       "targets.top_k": 1, "run.steps": 1, "run.batch_size": 4, "data.vocab_size": 300}.items():
        set_by_path(text, key, value)
    pretrain(text, out=tmp_path / "run", progress=False)
    out = tmp_path / "enc.onnx"
    result = runner.invoke(app, ["export", "onnx", str(tmp_path / "run"), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "max abs difference" in result.output and "enc.tokenizer.json" in result.output
    shipped = tmp_path / "enc.tokenizer.json"
    assert shipped.read_bytes() == (tmp_path / "run" / "tokenizer.json").read_bytes()

    tokenizer = Tokenizer.from_file(str(shipped))
    ids = np.array([tokenizer.encode("def load(path): return open(path).read()").ids], dtype=np.int64)
    session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    hidden, _ = session.run(None, {"input_ids": ids, "attention_mask": np.ones_like(ids)})
    with torch.no_grad():
        want, _ = d2v.load_encoder(tmp_path / "run")(torch.from_numpy(ids))
    np.testing.assert_allclose(hidden, want.numpy(), rtol=0, atol=1e-4)

    before = out.read_bytes()
    again = runner.invoke(app, ["export", "onnx", str(tmp_path / "run"), "--out", str(out)])
    assert again.exit_code == 2 and "--force" in again.output and len(again.output.strip().splitlines()) == 1
    assert out.read_bytes() == before
    forced = runner.invoke(app, ["export", "onnx", str(tmp_path / "run"), "--out", str(out), "--force"])
    assert forced.exit_code == 0, forced.output
    inside = runner.invoke(app, ["export", "onnx", str(tmp_path / "run"), "--out", str(tmp_path / "run" / "x.onnx")])
    assert inside.exit_code == 2 and "inside the run directory" in inside.output
    folder = runner.invoke(app, ["export", "onnx", str(tmp_path / "run"), "--out", str(tmp_path)])
    assert folder.exit_code == 2 and "is a directory" in folder.output


def test_missing_onnx_packages_are_one_line(tmp_path, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda m, *a: None if m == "onnxscript" else real(m, *a))
    result = runner.invoke(app, ["export", "onnx", str(tmp_path), "--out", str(tmp_path / "e.onnx")])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "pip install 'd2v[onnx]'" in " ".join(result.output.split()) and "onnxscript" in result.output
