"""What a run costs, known before it starts (d2v.runtime.cost, `d2v pretrain --estimate` / `--dry-run`): counted
FLOPs that match the model's matmuls, activations that scale with the micro-batch, and a memory figure that holds
against the peak a real run reaches. Time is measured in `d2v bench estimate` (bench/RESULTS.md), never asserted."""
import json
import os
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from conftest import TINY_OVERRIDES, tiny_cli_args, tiny_config
from d2v.cli import app
from d2v.runtime import cost
from d2v.runtime.distributed import Dist, batch_plan
from d2v.train import NoTimes, prepare, setup

runner = CliRunner()


def probe(cfg, samples: int, first: int = 0) -> tuple:
    pipeline = prepare(cfg, memory=False)
    t = setup(cfg, pipeline, Dist(), False, print, NoTimes())
    t.model.train()
    t.plan = batch_plan(samples, 1, 1)
    with cost.counting(t.model, samples) as counts:
        t.update(0, cfg.run.steps, iter([(first, pipeline.micro_batch(first, samples))]))
    return t.model, counts


def test_counted_flops_are_the_models_matmuls():
    """data2vec 1.0 on images: the student's masked view goes forward and backward (3x its forward), the teacher
    forward once; per block and token, qkv + projection + MLP are 2 (3 + 1 + 2 r) D^2 FLOPs and attention 4 T D."""
    cfg = tiny_config()
    model, counts = probe(cfg, 4)
    m = model.student.cfg
    T, D, L, r = (m.image_size // m.patch_size) ** 2 + 1, m.dim, m.depth, m.mlp_ratio
    per_sample = L * T * (2 * (4 + 2 * r) * D * D + 4 * T * D)
    patches = (T - 1) * 2 * m.in_chans * m.patch_size ** 2 * D
    head = T * 2 * D * D  # the regression head, student only
    want = 4 * (per_sample + patches) + 3 * head
    assert counts.flops / 4 == pytest.approx(want, rel=0.03)


def test_flops_and_activations_scale_with_the_micro_batch():
    cfg = tiny_config()
    _, two = probe(cfg, 2)
    _, eight = probe(cfg, 8, first=2)
    assert eight.flops == 4 * two.flops  # exact masks: the same shapes per sample
    assert eight.activations == pytest.approx(4 * two.activations, rel=0.1)
    for c in (two, eight):
        assert c.outside_blocks + sum(c.block_saved) == c.activations and len(c.block_saved) == cfg.model.depth
        assert all(i > 0 for i in c.block_input)
        assert c.block_input[0] < c.block_saved[0]  # a block keeps far more than its input
        assert cost.checkpointed_activations(c) < c.activations


def test_parameters_and_state():
    cfg = tiny_config()
    model, counts = probe(cfg, 2)
    est = cost.estimate(model, counts, micro=16, accum=1, world=1, baseline=0)
    encoder = sum(p.numel() for p in model.student.parameters())
    assert est.params["student"] == est.params["teacher"] == encoder
    assert est.params["head"] == sum(p.numel() for p in model.head.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert est.gradients == 4 * trainable and est.optimizer == 8 * trainable
    assert est.flops_per_update == counts.flops * 8  # 16 samples per update from a probe of 2


def _peak_of_a_run(args, tmp_path) -> int:
    proc = subprocess.Popen([sys.executable, "-m", "d2v", "pretrain", *args, "--out", str(tmp_path / "run")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, proc.stderr.read().decode()[-2000:]
    return usage.ru_maxrss * 1024


@pytest.mark.parametrize("scaled", [False, True])
def test_the_memory_estimate_holds_against_a_real_runs_peak(tmp_path, scaled):
    """The estimate (a process of its own, as a user runs it) against the peak resident memory of the run it
    estimates (the kernel's accounting of that process), within 1.5x; scaled: the timed updates use micro-batches
    of a few samples (a tiny time budget), so the peak is extrapolated from them (within 1.75x); else whole updates
    (no budget)."""
    args = [*tiny_cli_args(), "--set", "run.steps=3", "--set", "run.batch_size=512", "--set", "model.dim=64", "--set",
            "model.num_heads=2", "--image-size", "16"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    budget = "1e-4" if scaled else "1e6"  # whole updates timed, or micro-batches of a few samples
    code = (f"import sys, d2v.train; d2v.train.TIME_BUDGET_S = {budget}; from d2v.cli import main; "
            f"sys.argv = ['d2v', 'pretrain', *sys.argv[1:]]; main()")
    out = tmp_path / "est.json"
    proc = subprocess.run([sys.executable, "-c", code, *args, "--estimate", "--estimate-json", str(out)], env=env,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    est = json.loads(out.read_text())
    assert est["timed_whole"] is not scaled and (est["timed_micro"] < 512) is scaled
    peak = _peak_of_a_run(args, tmp_path)
    # Extrapolated from micro-batches of a few samples to 512 (scaled), the peak errs high: temporaries and the
    # allocator's slack measured on a few samples grow with them (a clean CI clone read 1.50x, 2026-12-07); whole
    # updates are held to the 1.5x.
    bound = 1.75 if scaled else 1.5
    assert 1 / bound <= est["memory"] / peak <= bound, (est["memory"], peak)
    grew = est["counted"] - est["baseline"]
    assert grew > 0.2 * (peak - est["baseline"])  # the counted parts are a real share of what a run adds


def test_estimate_and_dry_run_print_the_cost(tmp_path):
    result = runner.invoke(app, ["pretrain", "--estimate", *tiny_cli_args(), "--estimate-json", str(tmp_path / "e.json")])
    assert result.exit_code == 0, result.output
    for row in ("parameters", "FLOPs per update", "memory", "with activation checkpointing", "time per update", "run"):
        assert row in result.output
    est = json.loads((tmp_path / "e.json").read_text())
    assert est["steps_left"] == TINY_OVERRIDES["run.steps"] and est["seconds_per_update"] > 0
    assert est["run_seconds"] == pytest.approx(est["seconds_per_update"] * est["steps_left"])
    dry = runner.invoke(app, ["pretrain", "--dry-run", *tiny_cli_args()])
    assert dry.exit_code == 0 and json.loads(dry.stdout)["preset"] == "tiny" and "FLOPs per update" in dry.stderr
    quick = runner.invoke(app, ["pretrain", "--dry-run", "--no-estimate", *tiny_cli_args()])
    assert quick.exit_code == 0 and "FLOPs" not in quick.output
    assert not (tmp_path / "run").exists()


def test_a_model_too_big_to_probe_still_gets_its_parameters(monkeypatch):
    import d2v.train as train

    monkeypatch.setattr(train, "free_bytes", lambda device: (1 << 20, "a small machine"))
    cfg = tiny_config()
    est = train.estimate_cost(cfg, prepare(cfg, memory=False))
    assert est.missing and est.params["student"] > 0 and est.weights > 0 and est.timed_updates == []
    result = runner.invoke(app, ["pretrain", "--estimate", *tiny_cli_args()])
    assert result.exit_code == 0 and "not measured" in result.output
