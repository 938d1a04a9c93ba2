"""d2v finetune: supervised fine-tuning of an exported encoder, with pretrain's run-directory conventions."""
import dataclasses
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
    cfg = FinetuneConfig(encoder=str(encoder_dir), data="digits", steps=24, head_epochs=0, batch_size=64, lr=1e-2,
                         layer_decay=1.0, label_smoothing=0.0, crop_scale=(1.0, 1.0), eval_every=12)
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


def test_lr_schedule_restarts_for_the_fine_tuning_phase():
    from d2v.finetune import lr_at, phase_steps

    cfg = FinetuneConfig(lr=1e-3, head_lr=1e-2, warmup_fraction=0.1, batch_size=10, head_epochs=5, epochs=15)
    frozen, tuned = phase_steps(cfg, 100)
    assert (frozen, tuned) == (50, 150) and phase_steps(dataclasses.replace(cfg, steps=7), 100) == (50, 7)
    total = frozen + tuned
    head, rest = [lr_at(cfg, s, total, frozen) for s in range(frozen)], [lr_at(cfg, s, total, frozen)
                                                                         for s in range(frozen, total)]
    for phase, peak in ((head, cfg.head_lr), (rest, cfg.lr)):  # each warms up to its peak, then decays towards 0
        assert max(phase) == pytest.approx(peak) and phase[0] <= 0.2 * peak and phase[-1] < 0.01 * peak
    assert rest[0] < head[len(head) // 2]  # the encoder's first updates come at a low learning rate
    assert phase_steps(dataclasses.replace(cfg, head_epochs=0, epochs=0.001), 100) == (0, 1)  # never 0 updates
    curve = [lr_at(cfg, s, 200) for s in range(200)]  # no head phase: one warm-up + cosine
    assert curve.index(max(curve)) == 19 and curve[-1] < 0.01 * cfg.lr


def test_frozen_phase_trains_only_the_head_and_resumes_exactly_across_the_boundary(encoder_dir, tmp_path, monkeypatch):
    """The encoder must not move, get optimizer state or see weight decay until the head-only phase ends, and a
    run stopped at the boundary resumes (re-embedding the split) to the same weights as one that never stopped."""
    import d2v
    import d2v.finetune as ft

    cfg = FinetuneConfig(encoder=str(encoder_dir), data="digits", steps=4, head_epochs=0.1, batch_size=32, lr=1e-2,
                         eval_every=4)  # 1258 training digits: 4 head-only updates, then 4 that fine-tune all
    full = finetune(cfg, tmp_path / "full", progress=False)
    assert full.steps == 8
    original = ft.accuracy
    with monkeypatch.context() as m:
        def interrupt(model, dataset, device, batch_size=256):
            os.kill(os.getpid(), signal.SIGINT)  # stop at the first evaluation: step 4, the last head-only one
            return original(model, dataset, device, batch_size)

        m.setattr(ft, "accuracy", interrupt)
        part = finetune(cfg, tmp_path / "part", progress=False)
    assert part.steps == 4
    at_boundary = ckpt.latest_checkpoint(tmp_path / "part")
    weights = load_file(str(at_boundary / "model.safetensors"))
    pretrained = d2v.load_encoder(encoder_dir).state_dict()
    assert all(torch.equal(weights[f"student.{k}"], v) for k, v in pretrained.items())  # encoder untouched
    initial, _, _ = ft._build(cfg)  # the same seed: the head as the run started
    assert not torch.equal(weights["head.weight"], initial.head.weight.detach())  # the head trained
    with_state = {k.split(".")[0] for k in load_file(str(at_boundary / "state.safetensors"))}
    assert len(with_state) == 2  # AdamW state for head.weight and head.bias only

    resumed = finetune(FinetuneConfig(), tmp_path / "part", resume=True, progress=False)
    assert resumed.steps == 8
    a = load_file(str(ckpt.latest_checkpoint(tmp_path / "full") / "model.safetensors"))
    b = load_file(str(ckpt.latest_checkpoint(tmp_path / "part") / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[f"student.{k}"], v) for k, v in pretrained.items())  # then the encoder trained


def test_head_standardizes_with_the_training_embeddings(encoder_dir, tmp_path):
    import d2v
    from d2v.probe import features, load_labelled

    finetune(FinetuneConfig(encoder=str(encoder_dir), data="digits", steps=2, head_epochs=0.05, batch_size=16),
             tmp_path / "r", progress=False)
    weights = load_file(str(ckpt.latest_checkpoint(tmp_path / "r") / "model.safetensors"))
    enc = d2v.load_encoder(encoder_dir)
    x = torch.from_numpy(features(enc.eval(), load_labelled("digits", enc, "train")))
    torch.testing.assert_close(weights["feature_mean"], x.mean(0).float())
    torch.testing.assert_close(weights["feature_std"], x.std(0, correction=0).float())
    from d2v.finetune import DEFAULT_LR

    saved = json.loads((tmp_path / "r" / "config.json").read_text())["finetune"]
    assert saved["lr"] == DEFAULT_LR["vision"]  # lr 0 resolved to the modality's, and saved so resume keeps it


def test_head_phase_flags_are_validated_and_documented(encoder_dir, tmp_path):
    for flag, bad in (("--head-epochs", "-1"), ("--head-epochs", "1e9"), ("--head-epochs", "nan"),
                      ("--head-lr", "0"), ("--head-lr", "inf"), ("--lr", "-1")):
        result = runner.invoke(app, ["finetune", str(encoder_dir), "--out", str(tmp_path / "x"), flag, bad])
        assert result.exit_code == 2 and flag in result.output, result.output
        assert not (tmp_path / "x").exists()
    help_text = runner.invoke(app, ["finetune", "--help"]).output
    assert "--head-epochs" in help_text and "--head-lr" in help_text
