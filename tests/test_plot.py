"""`d2v plot`: a PNG of a run's curves from metrics.jsonl; a clear error without matplotlib or metrics."""
import json

import pytest
from typer.testing import CliRunner

from d2v.cli import app

runner = CliRunner()


def _run_dir(tmp_path, lines):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text("".join(lines))
    return run


def test_plot_writes_a_png_with_every_panel(tmp_path):
    pytest.importorskip("matplotlib")
    records = [{"step": s, "loss": 1.0 / s, "lr": 1e-3, "tau": 0.99, "target_std": 1.0, "pred_std": 0.5,
                "knn_teacher": 0.1 * (s % 10), "knn_seconds": 1.0} for s in range(1, 30)]
    run = _run_dir(tmp_path, [json.dumps(r) + "\n" for r in records] + ['{"step": 30, "lo'])  # cut last line
    result = runner.invoke(app, ["plot", str(run)])
    assert result.exit_code == 0, result.output
    png = (run / "metrics.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    from PIL import Image

    assert Image.open(run / "metrics.png").size[1] > Image.open(run / "metrics.png").size[0]  # 5 stacked panels
    result = runner.invoke(app, ["plot", str(run), "--out", str(tmp_path / "x.png")])
    assert result.exit_code == 0 and (tmp_path / "x.png").exists()


def test_plot_of_a_finetuning_run_draws_only_what_it_logged(tmp_path):
    """A fine-tuning run logs loss, lr and accuracies, no EMA tau or std: three panels, no empty ones, no
    matplotlib warning (an empty legend warns 'No artists with labels')."""
    pytest.importorskip("matplotlib")
    import warnings

    records = [{"step": s, "loss": 2.0 / s, "lr": 1e-3} for s in range(1, 30)]
    records[-1].update(test_accuracy=0.9, train_accuracy=0.95)
    run = _run_dir(tmp_path, [json.dumps(r) + "\n" for r in records])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = runner.invoke(app, ["plot", str(run)])
    assert result.exit_code == 0, result.output
    from PIL import Image

    assert Image.open(run / "metrics.png").size[1] == round(2.1 * 3 * 110)  # loss, learning rate, accuracy


def test_plot_errors_are_one_sentence(tmp_path, monkeypatch):
    result = runner.invoke(app, ["plot", str(tmp_path)])
    assert result.exit_code == 2 and "no metrics.jsonl" in result.output
    run = _run_dir(tmp_path, ["garbage\n"])
    result = runner.invoke(app, ["plot", str(run)])
    assert result.exit_code == 2 and "holds no metrics" in result.output
    import builtins

    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name.startswith("matplotlib"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n')
    result = runner.invoke(app, ["plot", str(run)])
    assert result.exit_code == 2 and "pip install 'd2v[plot]'" in result.output, result.output
