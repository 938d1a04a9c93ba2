"""d2v finetune: supervised fine-tuning of an exported encoder, with pretrain's run-directory conventions."""
import json
import os
import signal

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from conftest import tiny_config
from d2v import checkpoint as ckpt
from d2v.cli import app
from d2v.finetune import Classifier, FinetuneConfig, _layer_id, finetune, param_groups

runner = CliRunner()


@pytest.fixture(scope="module")
def encoder_dir(tmp_path_factory):
    from d2v.train import pretrain

    root = tmp_path_factory.mktemp("ft")
    pretrain(tiny_config(**{"run.steps": 3}), out=root / "run", progress=False)
    assert runner.invoke(app, ["export", "checkpoint", str(root / "run"), "--out", str(root / "enc"),
                               "--no-hf"]).exit_code == 0
    return root / "enc"


def test_layer_wise_lr_decay_groups(encoder_dir):
    import d2v

    enc = d2v.load_encoder(encoder_dir)
    model = Classifier(enc, 10)
    depth = len(enc.blocks)
    assert _layer_id("student.patch_embed.weight", depth) == 0 and _layer_id("student.blocks.1.mlp.fc1.weight", depth) == 2
    assert _layer_id("head.weight", depth) == depth + 1
    groups = param_groups(model, FinetuneConfig(layer_decay=0.5, weight_decay=0.05))
    scale = {id(p): g["lr_scale"] for g in groups for p in g["params"]}
    decay = {id(p): g["weight_decay"] for g in groups for p in g["params"]}
    assert scale[id(model.head.weight)] == 1.0 and scale[id(enc.patch_embed.weight)] == 0.5 ** (depth + 1)
    assert decay[id(model.head.bias)] == 0.0 and decay[id(enc.blocks[0].mlp.fc1.weight)] == 0.05
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))


def test_finetune_learns_resumes_exactly_and_exports(encoder_dir, tmp_path, monkeypatch):
    cfg = FinetuneConfig(encoder=str(encoder_dir), data="digits", steps=24, batch_size=64, lr=1e-2, layer_decay=1.0,
                         label_smoothing=0.0, crop_scale=(1.0, 1.0), eval_every=12)
    full = finetune(cfg, tmp_path / "full", progress=False)
    records = [json.loads(x) for x in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 25))
    assert [r["step"] for r in records if "test_accuracy" in r] == [12, 24]
    assert full.test_accuracy > 0.15  # 10 classes, 539 test items: chance is 0.10 +- 0.013
    assert sum(r["loss"] for r in records[-6:]) < sum(r["loss"] for r in records[:6])

    import d2v.finetune as ft

    original = ft.accuracy
    with monkeypatch.context() as m:
        def interrupt(model, dataset, device, batch_size=256):
            os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C at the first evaluation (step 12)
            return original(model, dataset, device, batch_size)

        m.setattr(ft, "accuracy", interrupt)
        part = finetune(cfg, tmp_path / "part", progress=False)
    assert part.steps == 12 and part.signal == signal.SIGINT
    resumed = finetune(FinetuneConfig(), tmp_path / "part", resume=True, progress=False)
    assert resumed.steps == 24
    a = load_file(str(ckpt.latest_checkpoint(tmp_path / "full") / "model.safetensors"))
    b = load_file(str(ckpt.latest_checkpoint(tmp_path / "part") / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)

    result = runner.invoke(app, ["export", "checkpoint", str(tmp_path / "full"), "--out", str(tmp_path / "enc"),
                                 "--no-hf"])
    assert result.exit_code == 0, result.output
    import d2v

    enc = d2v.load_encoder(tmp_path / "enc")
    for k, v in enc.state_dict().items():
        assert torch.equal(v, a[f"student.{k}"]), k


def test_finetune_cli_random_init_and_errors(encoder_dir, tmp_path):
    result = runner.invoke(app, ["finetune", str(encoder_dir), "--out", str(tmp_path / "r"), "--steps", "4",
                                 "--random-init", "--no-progress"])
    assert result.exit_code == 0 and "random-init" in result.output and "test accuracy" in result.output, result.output
    again = runner.invoke(app, ["finetune", str(encoder_dir), "--out", str(tmp_path / "r"), "--steps", "4"])
    assert again.exit_code == 2 and "already holds a run" in again.output, again.output
    bad = runner.invoke(app, ["finetune", str(encoder_dir), "--out", str(tmp_path / "x"), "--lr", "nan"])
    assert bad.exit_code == 2 and "--lr" in bad.output and not (tmp_path / "x").exists()
    none = runner.invoke(app, ["finetune", str(tmp_path / "missing"), "--out", str(tmp_path / "y")])
    assert none.exit_code == 2 and "no config.json" in none.output


def test_image_folder_crops_come_from_the_original_files(encoder_dir, tmp_path, monkeypatch):
    import numpy as np
    from PIL import Image

    from d2v.data import vision

    enc_size = json.loads((encoder_dir / "config.json").read_text())["model"]["image_size"]
    big = 4 * enc_size
    for c in range(2):
        (tmp_path / "imgs" / f"c{c}").mkdir(parents=True)
        for i in range(6):
            arr = (np.random.default_rng(10 * c + i).random((big, big)) * 255).astype(np.uint8)
            Image.fromarray(arr, mode="L").save(tmp_path / "imgs" / f"c{c}" / f"{i}.png")
    sizes = []

    def spy(w, h, scale, rng):
        sizes.append((w, h))
        return real(w, h, scale, rng)

    real = vision.random_resized_box
    monkeypatch.setattr(vision, "random_resized_box", spy)
    finetune(FinetuneConfig(encoder=str(encoder_dir), data=str(tmp_path / "imgs"), steps=2, batch_size=4,
                            crop_scale=(0.5, 1.0)), tmp_path / "r", progress=False)
    assert len(sizes) == 2 * 4 and set(sizes) == {(big, big)}  # boxes drawn on the original, not the resized view
