"""Seeing what pretraining learned: the live k-NN monitor, TensorBoard events, and continuing from a model
(--init-from a d2v export, run or transformers directory)."""
import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from conftest import tiny_cli_args, tiny_config
from d2v.cli import app
from d2v.monitor import knn_top1

runner = CliRunner()


def _knn_reference(train_x, train_y, test_x, test_y, k, t):
    a = train_x / np.linalg.norm(train_x, axis=1, keepdims=True)
    b = test_x / np.linalg.norm(test_x, axis=1, keepdims=True)
    sim = b @ a.T
    correct = 0
    for i in range(len(b)):
        idx = np.argsort(-sim[i])[:k]
        votes = np.zeros(int(train_y.max()) + 1)
        for j in idx:
            votes[train_y[j]] += np.exp(sim[i, j] / t)
        correct += votes.argmax() == test_y[i]
    return correct / len(b)


def test_knn_matches_a_plain_reference_and_separates_clusters():
    rng = np.random.default_rng()
    x, y = rng.normal(size=(300, 16)), rng.integers(0, 4, 300)
    q, qy = rng.normal(size=(50, 16)), rng.integers(0, 4, 50)
    got = knn_top1(torch.from_numpy(x), torch.from_numpy(y), torch.from_numpy(q), torch.from_numpy(qy), chunk=7)
    assert got == pytest.approx(_knn_reference(x, y, q, qy, 20, 0.07))
    centres = rng.normal(size=(4, 16)) * 10
    x = centres[y] + rng.normal(size=(300, 16))
    q = centres[qy] + rng.normal(size=(50, 16))
    assert knn_top1(torch.from_numpy(x), torch.from_numpy(y), torch.from_numpy(q), torch.from_numpy(qy)) == 1.0


def test_pretrain_logs_knn_and_tensorboard_and_resume_continues(tmp_path):
    out = tmp_path / "run"
    args = ["pretrain", "--out", str(out), "--eval-data", "digits", "--eval-every", "4", "--log", "tensorboard",
            *tiny_cli_args()]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "k-NN monitor on digits" in result.output and "% of the training time" in result.output
    knn = [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "knn_teacher" in r]
    assert [r["step"] for r in knn] == [4, 8]
    assert all(0.1 < r["knn_teacher"] <= 1 and 0.1 < r["knn_student"] <= 1 for r in knn)  # 10 classes: above chance
    events = list((out / "tb").glob("events.out.tfevents.*"))
    assert events
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(out / "tb")).Reload()
    assert [e.step for e in acc.Scalars("loss")] == list(range(1, 9))
    assert [e.step for e in acc.Scalars("knn_teacher")] == [4, 8]
    if pytest.importorskip("matplotlib"):
        assert (out / "metrics.png").exists()  # drawn at the end of every run when matplotlib is there


def test_init_from_an_export_and_from_transformers(tmp_path):
    pytest.importorskip("transformers")
    import d2v
    from d2v.objective import Data2Vec
    from d2v.models import build_encoder
    from d2v.encoders.init import adopt_layout, init_from
    from d2v.train import pretrain

    pretrain(tiny_config(**{"run.steps": 3}), out=tmp_path / "run", progress=False)
    assert runner.invoke(app, ["export", "checkpoint", str(tmp_path / "run"), "--out", str(tmp_path / "enc")]).exit_code == 0
    for source in (tmp_path / "enc", tmp_path / "enc" / "hf", tmp_path / "run"):
        cfg = tiny_config(**{"model.dim": 64, "model.depth": 3, "run.init_from": str(source)})  # layout adopted
        adopt_layout(cfg)
        assert (cfg.model.dim, cfg.model.depth) == (32, 2)
        model = Data2Vec(build_encoder(cfg.model), cfg.targets, cfg.ema)
        init_from(model, str(source), lambda msg: None)
        want = d2v.load_encoder(source).state_dict()
        for net in (model.student, model.teacher):
            for k, v in net.state_dict().items():
                torch.testing.assert_close(v, want[k], atol=0, rtol=0, msg=k)
    result = runner.invoke(app, ["pretrain", "--out", str(tmp_path / "cont"), "--init-from", str(tmp_path / "enc" / "hf"),
                                 *tiny_cli_args()])
    assert result.exit_code == 0 and "Initialized the student and the teacher" in result.output, result.output
    result = runner.invoke(app, ["pretrain", "--modality", "speech", "--dry-run", "--init-from", str(tmp_path / "enc")])
    assert result.exit_code == 2 and "is a vision encoder" in result.output, result.output
    result = runner.invoke(app, ["pretrain", "--dry-run", "--init-from", str(tmp_path / "nothing")])
    assert result.exit_code == 2 and "--init-from" in result.output, result.output
    # an explicit option the encoder's layout would override is an error, never dropped (8 px digits encoder)
    for option in (["--image-size", "28"], ["--set", "model.dim=64"], ["--set", "model.patch_size=4"]):
        result = runner.invoke(app, ["pretrain", "--dry-run", "--init-from", str(tmp_path / "enc"), *option])
        assert result.exit_code == 2 and "conflicts with --init-from" in result.output, result.output
        assert result.output.count("Error:") == 1 and option[-1].split("=")[-1] in result.output
    # colour images for a grayscale encoder: the channels are named, with how to convert (never "pixel_mean")
    from PIL import Image

    for c in ("a", "b"):
        (tmp_path / "rgb" / c).mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (8, 8), (40 * i, 90, 200)).save(tmp_path / "rgb" / c / f"{i}.png")
    for args in (["pretrain", "--dry-run", "--init-from", str(tmp_path / "enc"), "--data", str(tmp_path / "rgb"),
                  "--set", "targets.top_k=2"], ["probe", str(tmp_path / "enc"), "--data", str(tmp_path / "rgb")]):
        result = runner.invoke(app, args)
        assert result.exit_code == 2 and "pixel_mean" not in result.output, result.output
        assert "1-channel (grayscale)" in result.output and "3-channel (colour)" in result.output, result.output
        assert "convert('L')" in result.output
    for option in (["--image-size", "8"], ["--set", "model.drop_path=0.1"]):  # agree, or training-only
        result = runner.invoke(app, ["pretrain", "--dry-run", "--init-from", str(tmp_path / "enc"), *option,
                                     "--set", "targets.top_k=2"])
        assert result.exit_code == 0, result.output


def test_explicit_eval_every_is_honoured_and_the_default_says_when_its_budget_skips(tmp_path, monkeypatch):
    """--eval-every N evaluates every N steps whatever the evaluations cost; the default (about ten per run) keeps
    to the monitor's time budget and says so the first time it skips one."""
    from d2v.monitor import KnnMonitor
    from d2v.train import pretrain

    monkeypatch.setattr(KnnMonitor, "BUDGET", 0.0)  # every evaluation after the first is over budget

    def knn_steps(run_dir):
        return [r["step"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
                if "knn_teacher" in r]

    pretrain(tiny_config(**{"run.steps": 6, "run.eval_every": 2, "run.eval_data": "digits"}), out=tmp_path / "a",
             progress=False)
    assert knn_steps(tmp_path / "a") == [2, 4, 6]
    from rich.console import Console

    console = Console(file=open(tmp_path / "out.txt", "w"), width=200)
    pretrain(tiny_config(**{"run.steps": 30, "run.eval_data": "digits", "run.log_every": 10}), out=tmp_path / "b",
             console=console, progress=True)
    console.file.close()
    text = (tmp_path / "out.txt").read_text()
    assert knn_steps(tmp_path / "b") == [3, 30]  # the first (within any budget) and the last
    assert text.count("k-NN evaluation at step 6 skipped") == 1 and "--eval-every" in text, text


def test_monitor_keeps_within_its_share_of_training_time():
    from d2v.monitor import KnnMonitor

    m = KnnMonitor.__new__(KnnMonitor)
    m.seconds, m.evaluations = 0.0, 0
    assert m.within_budget(1.0)  # the first evaluation always runs
    m.seconds, m.evaluations = 10.0, 1  # one evaluation took 10 s
    assert not m.within_budget(150.0)  # a second would make 20 s > 10% of 150 s
    assert m.within_budget(200.0)
