"""Extending a finished run: `d2v pretrain --out R --resume --steps N` continues with the optimizer, the teacher and
the data position kept, and its schedules follow d2v.train's stated rule (RESUME_MAY_EXTEND): from the update it
resumes at, those of the same config planned for N updates; the EMA anneal, a count of updates, is unchanged."""
import json
import shutil

import pytest
import torch
from typer.testing import CliRunner

from conftest import tiny_config
from d2v.cli import app
from d2v.objective import ema_decay
from d2v.runtime import checkpoint as ckpt
from d2v.runtime.schedule import lr_at
from d2v.train import load_run_config, pretrain

runner = CliRunner()


def rows(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def weights(path):
    return ckpt.read_checkpoint(path)[0]


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished 100-step run that saved every 50 updates and kept them all; its anneal ends at 80."""
    run = tmp_path_factory.mktemp("extend") / "run"
    pretrain(tiny_config(**{"run.steps": 100, "run.checkpoint_every": 50, "run.keep_checkpoints": 10,
                            "ema.anneal_steps": 80}), out=run, progress=False)
    return run


def test_extending_100_to_200_keeps_the_first_100_and_follows_the_rule(finished, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    result = runner.invoke(app, ["pretrain", "--out", str(run), "--resume", "--steps", "200", "--no-progress"])
    assert result.exit_code == 0 and "Extending" in result.output, result.output
    cfg = load_run_config(run)
    assert cfg.run.steps == 200  # the new total is the run's: a later --resume continues to it
    original, extended = rows(finished), rows(run)
    assert extended[:100] == original  # the first 100 updates are the original's, untouched
    for name in ("step_00000050", "step_00000100"):
        a, b = weights(finished / "checkpoints" / name), weights(run / "checkpoints" / name)
        assert all(torch.equal(a[k], b[k]) for k in a)
    tail = extended[100:]
    assert [r["step"] for r in tail] == list(range(101, 201))
    for r in tail:  # update s (1-based in the log) ran at lr_at(s - 1) of a 200-update run; tau after it
        assert r["lr"] == pytest.approx(lr_at(cfg.optim, r["step"] - 1, 200), rel=1e-12)
        assert r["tau"] == pytest.approx(ema_decay(cfg.ema, r["step"]), rel=1e-12) == cfg.ema.end_decay
    assert tail[0]["lr"] > 100 * original[-1]["lr"]  # the cosine over 200 is at its middle, not at its end
    assert tail[-1]["lr"] < 0.01 * cfg.optim.lr
    state = ckpt.read_checkpoint_state(ckpt.latest_checkpoint(run))
    assert state["step"] == 200 and state["batches"] == 200  # the data stream went on from update 100

    # the extension is an ordinary run from then on: stopped at 150 and resumed, it ends bit for bit the same
    half = tmp_path / "half"
    shutil.copytree(run, half)
    shutil.rmtree(half / "checkpoints" / "step_00000200")
    (half / "checkpoints" / "latest").write_text("step_00000150")
    (half / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in extended[:150]))
    pretrain(tiny_config(), out=half, resume=True, progress=False)
    a, b = weights(ckpt.latest_checkpoint(run)), weights(ckpt.latest_checkpoint(half))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_an_extension_is_not_a_restart(finished, tmp_path):
    """Resumed with its optimizer and teacher, the extension's first update differs from one that starts the same
    weights with a fresh optimizer (what --init-from does)."""
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    pretrain(tiny_config(**{"run.steps": 101}), out=run, resume=True, progress=False)
    with_state = weights(ckpt.latest_checkpoint(run))
    model = weights(finished / "checkpoints" / "step_00000100")
    moved = [k for k in model if k.startswith("student.") and not torch.equal(model[k], with_state[k])]
    assert moved  # it trained
    teacher = [k for k in model if k.startswith("teacher.") and not torch.equal(model[k], with_state[k])]
    assert teacher  # and the teacher followed


def test_a_total_can_only_grow(finished, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    result = runner.invoke(app, ["pretrain", "--out", str(run), "--resume", "--steps", "60"])
    assert result.exit_code == 2 and "extend a run, not shorten it" in result.output
    result = runner.invoke(app, ["pretrain", "--out", str(run), "--resume"])
    assert result.exit_code == 0 and "--steps N" in result.output  # complete: says how to extend it
    assert load_run_config(run).run.steps == 100
