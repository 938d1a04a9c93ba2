"""Fine-tuned classifiers out of d2v: the head each modality uses, its export (head + label names) and the
transformers Data2Vec...For...Classification directory that computes the same logits."""
import json

import pytest
import torch

from d2v.core.config import MODEL_CONFIGS
from d2v.encoders import hf_export
from d2v.encoders.classifier import Classifier, pooling
from d2v.models import build_encoder

SMALL = {
    "vision": {"dim": 32, "depth": 2, "num_heads": 2, "image_size": 8, "patch_size": 2, "in_chans": 1,
               "pixel_mean": [0.3], "pixel_std": [0.2], "layer_scale_init": 0.1, "drop_path": 0.0},
    "speech": {"dim": 32, "depth": 2, "num_heads": 2, "ffn_dim": 64, "conv_dim": [16, 16], "conv_kernel": [10, 3],
               "conv_stride": [5, 2], "pos_conv_depth": 2, "pos_conv_kernel": 5, "pos_conv_groups": 2,
               "dropout": 0.0, "attention_dropout": 0.0, "layerdrop": 0.0},
    "text": {"dim": 32, "depth": 2, "num_heads": 2, "ffn_dim": 64, "vocab_size": 300, "max_length": 32,
             "dropout": 0.0, "attention_dropout": 0.0},
}
LABELS = ["cat", "dog", "eel"]


def small_classifier(modality: str, head: str = "data2vec", seed: int = 0) -> Classifier:
    """A Classifier with every weight, the head's and the standardization's non-trivial."""
    import dataclasses

    cfg = dataclasses.asdict(MODEL_CONFIGS[modality]())
    cfg.update(SMALL[modality])
    torch.manual_seed(seed)
    model = Classifier(build_encoder(cfg), len(LABELS), head, LABELS)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
        model.feature_mean.normal_()
        model.feature_std.uniform_(0.5, 2.0)
    return model.eval()


def inputs(modality: str):
    """(d2v classifier inputs, the transformers model's keyword arguments) for the same three items."""
    torch.manual_seed(1)
    if modality == "vision":
        x = torch.rand(3, 1, 8, 8)
        return (x,), {"pixel_values": (x - 0.3) / 0.2}
    if modality == "text":
        ids = torch.randint(5, 300, (3, 12))
        ids[:, 0] = 0  # <s>
        ids[1, 9:] = 1  # padding
        return (ids,), {"input_ids": ids, "attention_mask": ids.ne(1).long()}
    from d2v.models.speech import normalize_waveform

    wave = torch.randn(3, 1600)
    pad = torch.zeros(3, 1600, dtype=torch.bool)
    pad[2, 1100:] = True
    wave[pad] = 0.0
    return (wave, pad), {"input_values": normalize_waveform(wave, pad), "attention_mask": (~pad).long()}


def test_each_modality_pools_as_its_data2vec_head():
    assert pooling("vision", "data2vec") == "patch_mean_norm" and pooling("text", "data2vec") == "first_token"
    assert pooling("speech", "data2vec") == "embed" and all(pooling(m, "mean") == "embed" for m in SMALL)
    model = small_classifier("vision")
    x, _ = inputs("vision")
    enc = model.student
    out = enc.encode(x[0], output_layers="block", top_k=1)
    want = out.layers[-1][:, 1:].mean(1)  # the last block's patches before the final norm
    torch.testing.assert_close(model.embed(*x), want)
    assert not torch.allclose(model.embed(*x), enc.embed(*x))  # not the mean of the normed patches
    text = small_classifier("text")
    ids, _ = inputs("text")
    torch.testing.assert_close(text.embed(*ids), text.student(ids[0])[0][:, 0])


@pytest.mark.parametrize("modality", ["vision", "speech", "text"])
def test_transformers_classifier_gives_the_same_logits(modality, tmp_path):
    transformers = pytest.importorskip("transformers")
    from safetensors.torch import save_file

    model = small_classifier(modality)
    state = {k: v.contiguous() for k, v in model.student.state_dict().items()}
    config, tensors, _ = hf_export.convert_classifier(model.student.cfg.__dict__, state, model.describe(),
                                                      model.head_state())
    (tmp_path / "hf").mkdir()
    save_file(tensors, str(tmp_path / "hf" / "model.safetensors"), metadata={"format": "pt"})
    (tmp_path / "hf" / "config.json").write_text(json.dumps(config))
    cls = getattr(transformers, hf_export.CLASSIFIERS[modality][0])
    hf = cls.from_pretrained(tmp_path / "hf").eval()
    assert hf.config.id2label == dict(enumerate(LABELS))
    ours, theirs = inputs(modality)
    with torch.no_grad():
        want = model(ours)
        got = hf(**theirs).logits
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)


def test_a_mean_head_maps_only_for_speech():
    for modality in ("vision", "text"):
        model = small_classifier(modality, head="mean")
        assert "--head data2vec" in hf_export.classifier_unmappable(model.student.cfg.__dict__, "mean")
    assert hf_export.classifier_unmappable(small_classifier("speech", "mean").student.cfg.__dict__, "mean") == ""


@pytest.fixture(scope="module")
def finetuned(tmp_path_factory):
    """A tiny encoder pretrained for 3 steps, fine-tuned on digits with the default head, and exported."""
    from typer.testing import CliRunner

    from conftest import tiny_config
    from d2v.cli import app
    from d2v.finetune import FinetuneConfig, finetune
    from d2v.train import pretrain

    root = tmp_path_factory.mktemp("ft")
    pretrain(tiny_config(**{"run.steps": 3}), out=root / "run", progress=False)
    runner = CliRunner()
    assert runner.invoke(app, ["export", "checkpoint", str(root / "run"), "--out", str(root / "enc")]).exit_code == 0
    summary = finetune(FinetuneConfig(encoder=str(root / "enc"), data="digits", steps=20, head_epochs=1,
                                      batch_size=64), root / "ft", progress=False)
    result = runner.invoke(app, ["export", "checkpoint", str(root / "ft"), "--out", str(root / "ftenc")])
    assert result.exit_code == 0 and "10 labels" in result.output, result.output
    return root, summary


def test_a_fine_tuned_digits_model_loads_in_transformers_with_the_same_logits(finetuned):
    transformers = pytest.importorskip("transformers")
    from d2v.data.images import load_images
    from d2v.encoders.load import load_classifier

    root, summary = finetuned
    model = load_classifier(root / "ftenc")
    assert model.labels == [str(i) for i in range(10)] and model.head_kind == "data2vec"
    hf = transformers.Data2VecVisionForImageClassification.from_pretrained(root / "ftenc" / "hf").eval()
    assert hf.config.id2label[3] == "3" and hf.config.use_mean_pooling
    test = load_images("digits", "test", image_size=model.student.cfg.image_size)
    x = test.get_batch(torch.arange(len(test)))
    mean = torch.tensor(model.student.cfg.pixel_mean).view(1, -1, 1, 1)
    std = torch.tensor(model.student.cfg.pixel_std).view(1, -1, 1, 1)
    with torch.no_grad():
        ours, theirs = model((x,)), hf(pixel_values=(x - mean) / std).logits
    torch.testing.assert_close(theirs, ours, atol=1e-4, rtol=1e-4)
    right = int((ours.argmax(1) == test.labels).sum())
    assert right / len(test) == pytest.approx(summary.test_accuracy, abs=1e-9)  # the run's own test accuracy
    processor = transformers.AutoImageProcessor.from_pretrained(root / "ftenc" / "hf")
    from PIL import Image

    images = [Image.fromarray((img[0].numpy() * 255).round().astype("uint8"), mode="L") for img in x[:5]]
    with torch.no_grad():
        via_processor = hf(**processor(images=images, return_tensors="pt")).logits
    torch.testing.assert_close(via_processor, ours[:5], atol=1e-4, rtol=1e-4)


def test_predict_reproduces_the_fine_tuning_runs_test_accuracy(finetuned, tmp_path):
    import csv

    from typer.testing import CliRunner

    from d2v.cli import app
    from d2v.data.images import load_images

    root, summary = finetuned
    runner = CliRunner()
    for model in (root / "ftenc", root / "ft"):  # the export, or the run directory itself
        out = tmp_path / f"{model.name}.csv"
        result = runner.invoke(app, ["predict", str(model), "--data", "digits", "--split", "test", "--out", str(out)])
        assert result.exit_code == 0, result.output
        assert f"Accuracy {summary.test_accuracy:.4f}" in result.output
        rows = list(csv.DictReader(out.open()))
        labels = load_images("digits", "test").labels.tolist()
        assert len(rows) == len(labels) and set(rows[0]) == {"path", "label", "probability"}
        right = sum(int(r["label"]) == y for r, y in zip(rows, labels))
        assert right / len(labels) == pytest.approx(summary.test_accuracy, abs=1e-9)
        assert all(0.1 <= float(r["probability"]) <= 1.0 for r in rows)  # the top one of ten
    bad = runner.invoke(app, ["predict", str(root / "enc"), "--data", "digits", "--out", str(tmp_path / "x.csv")])
    assert bad.exit_code == 2 and "without a classifier" in bad.output and not (tmp_path / "x.csv").exists()
    bad = runner.invoke(app, ["predict", str(root / "ftenc"), "--data", "nothing-here", "--out", str(tmp_path)])
    assert bad.exit_code == 2 and "is a directory" in bad.output


def test_a_fine_tuning_run_from_before_the_data2vec_head_still_exports(finetuned, tmp_path):
    """Runs saved with the old head (encoder.embed -> Linear, no label names) export their classifier, and the
    transformers directory then holds the encoder alone, saying why."""
    import shutil

    from typer.testing import CliRunner

    from d2v.cli import app
    from d2v.encoders.load import load_classifier
    from d2v.finetune import FinetuneConfig, finetune

    root, _ = finetuned
    finetune(FinetuneConfig(encoder=str(root / "enc"), data="digits", steps=2, head_epochs=0, batch_size=16,
                            head="mean"), tmp_path / "old", progress=False)
    cfg = json.loads((tmp_path / "old" / "config.json").read_text())
    del cfg["labels"], cfg["finetune"]["head"]  # as such a run saved it
    (tmp_path / "old" / "config.json").write_text(json.dumps(cfg))
    result = CliRunner().invoke(app, ["export", "checkpoint", str(tmp_path / "old"), "--out", str(tmp_path / "e")])
    assert result.exit_code == 0 and "encoder only" in result.output and "--head data2vec" in result.output
    model = load_classifier(tmp_path / "e")
    assert model.head_kind == "mean" and model.labels[9] == "9"
    assert json.loads((tmp_path / "e" / "hf" / "config.json").read_text())["architectures"] == ["Data2VecVisionModel"]
    shutil.rmtree(tmp_path / "e")
