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
from d2v.runtime import checkpoint as ckpt
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
        def interrupt(model, dataset, device, batch_size=256, fired=[]):
            if not fired:  # one Ctrl-C at the first evaluation (step 12; it scores the test and validation sets)
                fired.append(os.kill(os.getpid(), signal.SIGINT))
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

    from d2v.data import images as vision

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
    import d2v.finetune as ft

    monkeypatch.setattr(ft, "CROP_MIN_STEPS", 1)  # crops in a 2-update run (they start at 1000 updates)
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
    # each warms up to its peak, then decays towards 0; the fine-tuning phase's peak is scaled by its length (150 of
    # FULL_STRENGTH_STEPS updates) and its warm-up starts at WARMUP_START of it
    from d2v.finetune import FULL_STRENGTH_STEPS, WARMUP_START

    for phase, peak in ((head, cfg.head_lr), (rest, cfg.lr * 150 / FULL_STRENGTH_STEPS)):
        assert max(phase) == pytest.approx(peak) and phase[0] <= 0.2 * peak and phase[-1] < 0.01 * peak
    assert rest[0] == pytest.approx(WARMUP_START * max(rest))  # the encoder's first updates at a small lr
    assert rest[0] < head[len(head) // 2]
    assert phase_steps(dataclasses.replace(cfg, head_epochs=0, epochs=0.001), 100) == (0, 1)  # never 0 updates
    curve = [lr_at(cfg, s, 400) for s in range(400)]  # no head phase, a long run: one warm-up + cosine at full peak
    assert curve.index(max(curve)) == 40 and max(curve) == pytest.approx(cfg.lr) and curve[-1] < 0.01 * cfg.lr
    short = [lr_at(cfg, s, 60) for s in range(60)]  # 60 updates: a fifth of the peak
    assert max(short) == pytest.approx(cfg.lr * 60 / FULL_STRENGTH_STEPS)


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
        def interrupt(model, dataset, device, batch_size=256, fired=[]):
            if not fired:  # stop at the first evaluation: step 4, the last head-only one
                fired.append(os.kill(os.getpid(), signal.SIGINT))
            return original(model, dataset, device, batch_size)

        m.setattr(ft, "accuracy", interrupt)
        part = finetune(cfg, tmp_path / "part", progress=False)
    assert part.steps == 4
    at_boundary = ckpt.latest_checkpoint(tmp_path / "part")
    weights = load_file(str(at_boundary / "model.safetensors"))
    pretrained = d2v.load_encoder(encoder_dir).state_dict()
    assert all(torch.equal(weights[f"student.{k}"], v) for k, v in pretrained.items())  # encoder untouched
    initial = ft._build(cfg)[0]  # the same seed: the head as the run started
    assert not torch.equal(weights["head.weight"], initial.head.weight.detach())  # the head trained
    with_state = {k.split(".")[0] for k in load_file(str(at_boundary / "state.safetensors"))}
    head = [n for n, _ in initial.named_parameters() if not n.startswith("student.")]
    assert len(with_state) == len(head) == 4  # AdamW state for the head only (fc_norm and Linear, weight and bias)

    resumed = finetune(FinetuneConfig(), tmp_path / "part", resume=True, progress=False)
    assert resumed.steps == 8
    a = load_file(str(ckpt.latest_checkpoint(tmp_path / "full") / "model.safetensors"))
    b = load_file(str(ckpt.latest_checkpoint(tmp_path / "part") / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[f"student.{k}"], v) for k, v in pretrained.items())  # then the encoder trained


@pytest.mark.parametrize("head", ["mean", "data2vec"])
def test_head_standardizes_with_the_training_embeddings(encoder_dir, tmp_path, head):
    """The fixed standardization is the mean and std of what the head's first Linear sees on the training split as
    fine-tuning starts: encoder.embed (mean head), or the LayerNorm of the mean of the last block's patches, the
    LayerNorm as it starts, from the encoder's final norm (data2vec head)."""
    import d2v
    from d2v.encoders.features import features
    from d2v.data.labelled import load_labelled

    finetune(FinetuneConfig(encoder=str(encoder_dir), data="digits", steps=2, head_epochs=0.05, batch_size=16,
                            head=head, val_fraction=0.0), tmp_path / "r", progress=False)
    weights = load_file(str(ckpt.latest_checkpoint(tmp_path / "r") / "model.safetensors"))
    enc = d2v.load_encoder(encoder_dir)
    start = Classifier(enc, 10, head).eval()
    with torch.no_grad():
        x = start.normalized(torch.from_numpy(features(start, load_labelled("digits", enc, "train"))).float())
    torch.testing.assert_close(weights["feature_mean"], x.mean(0), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(weights["feature_std"], x.std(0, correction=0), rtol=1e-4, atol=1e-5)
    from d2v.finetune import DEFAULT_LR

    saved = json.loads((tmp_path / "r" / "config.json").read_text())
    assert saved["finetune"]["lr"] == DEFAULT_LR["vision"]  # lr 0 resolved to the modality's, and saved so resume keeps it
    assert saved["finetune"]["head"] == head and saved["labels"] == [str(i) for i in range(10)]


def test_head_phase_flags_are_validated_and_documented(encoder_dir, tmp_path):
    for flag, bad in (("--head-epochs", "-1"), ("--head-epochs", "1e9"), ("--head-epochs", "nan"),
                      ("--head-lr", "0"), ("--head-lr", "inf"), ("--lr", "-1"), ("--head", "cls")):
        result = runner.invoke(app, ["finetune", str(encoder_dir), "--out", str(tmp_path / "x"), flag, bad])
        assert result.exit_code == 2 and flag in result.output, result.output
        assert not (tmp_path / "x").exists()
    help_text = runner.invoke(app, ["finetune", "--help"]).output
    assert "--head-epochs" in help_text and "--head-lr" in help_text


def test_short_finetune_ends_at_or_above_its_head_only_phase_and_says_what_it_exports(encoder_dir, tmp_path):
    """Issue 25, item 2: `--steps 60` on digits ends at or above the head-only phase's test accuracy, and the
    progress counts the 60 fine-tuning steps, not the head-only ones with them."""
    result = runner.invoke(app, ["finetune", str(encoder_dir), "--data", "digits", "--out", str(tmp_path / "r"),
                                 "--steps", "60"])
    assert result.exit_code == 0, result.output
    records = [json.loads(x) for x in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    evaluated = [r for r in records if "test_accuracy" in r]
    frozen = len(records) - 60
    head_only = next(r for r in evaluated if r["step"] == frozen)["test_accuracy"]
    summary = next(x for x in result.output.splitlines() if x.startswith("Fine-tuned"))
    exported = float(summary.split("test accuracy ")[1].split()[0])
    assert exported >= round(head_only, 4), result.output  # printed to 4 decimals
    assert "Exported: the" in result.output and "Warning" not in result.output
    lines = [x for x in result.output.splitlines() if "step" in x and "loss" in x]
    assert lines[-1].startswith("fine-tune: step 60/60") and f"/{frozen + 60}" not in result.output
    assert any(x.startswith(f"head only: step {frozen}/{frozen}") for x in lines)


def test_finetune_never_exports_worse_than_its_head_only_phase_without_saying_so(encoder_dir, tmp_path):
    """A destructive fine-tune (lr 2): the exported model is the best evaluated one on the validation split (here
    the head-only phase's), the final checkpoint holds its weights, and the summary says which it is."""
    import d2v.finetune as ft

    cfg = FinetuneConfig(encoder=str(encoder_dir), data="digits", steps=30, head_epochs=5, lr=2.0, layer_decay=1.0)
    s = finetune(cfg, tmp_path / "r", progress=False)
    assert s.last_accuracy < s.head_only_accuracy - 0.05  # the fine-tuning phase did damage
    assert s.test_accuracy >= s.head_only_accuracy or s.warning
    best = json.loads((tmp_path / "r" / "best" / "best.json").read_text())
    assert s.exported_step == best["best"]["step"] < s.steps and s.test_accuracy == best["best"]["test_accuracy"]
    final = load_file(str(ckpt.latest_checkpoint(tmp_path / "r") / "model.safetensors"))
    kept = load_file(str(tmp_path / "r" / "best" / "model.safetensors"))
    assert all(torch.equal(final[k], kept[k]) for k in kept)  # d2v export takes the exported model
    state = json.loads((ckpt.latest_checkpoint(tmp_path / "r") / "state.json").read_text())
    assert state["exported_step"] == s.exported_step
    model, _, _, test = ft._build(cfg)
    model.load_state_dict(final)
    assert ft.accuracy(model, test, "cpu") == pytest.approx(s.test_accuracy)
    from d2v.cli import _exported_line

    assert f"the model of step {s.exported_step}, the best on the validation split" in _exported_line(s)


def test_an_exported_model_below_the_head_only_phase_is_said():
    from d2v.finetune import exported_choice

    info = {"head_only": {"step": 100, "val_accuracy": 0.60, "test_accuracy": 0.62},
            "best": {"step": 160, "val_accuracy": 0.64, "test_accuracy": 0.61}}
    step, acc, head, warning = exported_choice(info)
    assert (step, acc, head) == (160, 0.61, 0.62) and "below the head-only phase's 0.6200" in warning
    info["best"]["test_accuracy"] = 0.70
    assert exported_choice(info)[3] == ""
