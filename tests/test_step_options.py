"""The switches a GPU step near the hardware's limit uses (issue 28), as a CPU can check them: run.precision "auto"
(fp32 here, saved resolved), run.fused_adamw, and that runs saved before these fields existed resume unchanged."""
import json
import shutil

import pytest
import torch
from conftest import tiny_config

from d2v.core.config import PretrainConfig, from_dict
from d2v.core.device import resolve_precision
from d2v.runtime import checkpoint as ckpt
from d2v.train import pretrain, use_fused_adamw


def test_auto_precision_is_fp32_on_the_cpu_and_bf16_on_a_bf16_gpu(monkeypatch):
    assert PretrainConfig().run.precision == "auto"
    assert resolve_precision("auto", torch.device("cpu")) == "fp32"
    for explicit in ("fp32", "bf16", "fp16"):
        assert resolve_precision(explicit, torch.device("cpu")) == explicit
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    assert resolve_precision("auto", torch.device("cuda", 0)) == "bf16"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation)
    assert resolve_precision("auto", torch.device("cuda", 0)) == "fp32"  # emulated bf16 (pre-Ampere): fp32


def test_a_run_saves_the_resolved_precision(tmp_path):
    s = pretrain(tiny_config(**{"run.steps": 1, "run.precision": "auto"}), out=tmp_path / "run", progress=False)
    assert json.loads((s.run_dir / "config.json").read_text())["run"]["precision"] == "fp32"


def test_fused_adamw_switch():
    assert use_fused_adamw("auto", "cuda") and not use_fused_adamw("auto", "cpu")
    assert use_fused_adamw("on", "cpu") and not use_fused_adamw("off", "cuda")


def test_a_run_saved_before_the_new_fields_resumes_and_may_switch_them(tmp_path):
    run = tmp_path / "run"
    pretrain(tiny_config(**{"run.steps": 3, "run.checkpoint_every": 1}), out=run, progress=False)
    for p in ckpt.list_checkpoints(run):  # as if stopped after step 2
        if p.name.endswith("3"):
            shutil.rmtree(p)
    (run / "checkpoints" / "latest").unlink()
    saved = json.loads((run / "config.json").read_text())
    for key in ("activation_checkpointing", "fused_adamw"):
        del saved["run"][key]  # as a config.json written before issue 28
    (run / "config.json").write_text(json.dumps(saved))
    old = from_dict(PretrainConfig, saved)
    assert (old.run.activation_checkpointing, old.run.fused_adamw, old.run.precision) == ("off", "auto", "fp32")
    cfg = tiny_config(**{"run.steps": 3, "run.activation_checkpointing": "all", "run.fused_adamw": "on"})
    s = pretrain(cfg, out=run, resume=True, progress=False)
    assert s.steps == 3 and not s.complete and s.final_loss == pytest.approx(s.final_loss)  # finite


class _InMemory:
    reads_files = False


def test_in_memory_data_gets_workers_only_when_feeding_a_gpu(monkeypatch):
    from d2v.data import loader

    monkeypatch.setattr(loader.os, "sched_getaffinity", lambda pid: set(range(16)), raising=False)
    assert loader.resolve_workers(-1, _InMemory()) == 0
    assert loader.resolve_workers(-1, _InMemory(), on_gpu=True) == loader.MAX_AUTO_WORKERS_IN_MEMORY_GPU
    assert loader.resolve_workers(0, _InMemory(), on_gpu=True) == 0  # an explicit count is kept
    monkeypatch.setattr(loader.os, "sched_getaffinity", lambda pid: {0}, raising=False)
    assert loader.resolve_workers(-1, _InMemory(), on_gpu=True) == 0  # no spare core


@pytest.mark.parametrize("modality", ["vision", "text"])
def test_in_memory_batches_from_workers_equal_the_main_process(modality):
    from d2v.core.presets import preset_config
    from d2v.data.loader import batch_loader
    from d2v.data.pipeline import build_pipeline
    from d2v.runtime.distributed import batch_plan

    cfg = preset_config(modality, "tiny")
    pipeline = build_pipeline(cfg)
    plan = batch_plan(8, 1, 1)
    main = list(batch_loader(pipeline, plan, 3, 4, 0))
    workers = list(batch_loader(pipeline, plan, 3, 4, 2))
    assert [f for f, _ in main] == [f for f, _ in workers]
    for (_, a), (_, b) in zip(main, workers):
        assert torch.equal(a.inputs, b.inputs) and torch.equal(a.mask, b.mask)
        assert (a.student_inputs is None) == (b.student_inputs is None)
        if a.student_inputs is not None:
            assert torch.equal(a.student_inputs, b.student_inputs)


def test_resume_runs_the_optimizer_as_this_run_asks():
    from d2v.runtime.checkpoint import load_optimizer_state, optimizer_state

    w = torch.nn.Parameter(torch.randn(4, 3))
    saved = torch.optim.AdamW([w], lr=0.1)
    w.grad = torch.randn(4, 3)
    saved.step()
    tensors, meta = optimizer_state(saved)
    for fused in (True, None):
        now = torch.optim.AdamW([w], lr=0.1, fused=fused)
        load_optimizer_state(now, {k: v.clone() for k, v in tensors.items()}, json.loads(json.dumps(meta)))
        assert now.param_groups[0]["fused"] == fused
        assert torch.equal(now.state[w]["exp_avg"], saved.state[w]["exp_avg"])
        assert now.state[w]["step"].dtype == torch.float32 and float(now.state[w]["step"]) == 1.0
        now.step()  # runs with the loaded state
