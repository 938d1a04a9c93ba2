"""Activation checkpointing (run.activation_checkpointing): the same gradients as without it (fp32, 1e-6) for the
three modalities and both recipes, in one process and under DDP and FSDP2 (torchrun, gloo); never on the teacher;
and the memory it saves on the CPU at the base vision preset."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as td

import ac_grads
from d2v.core.config import set_by_path
from d2v.core.errors import ConfigError
from d2v.core.presets import preset_config
from d2v.data.synthetic import synthetic_batch
from d2v.models import common
from d2v.models.common import set_activation_checkpointing
from d2v.objective import build_objective
from d2v.train import pretrain
from d2v.validation import estimate_bytes, validate_config

HERE = Path(__file__).parent


@pytest.mark.parametrize("modality,recipe", ac_grads.CASES)
def test_checkpointed_blocks_give_the_same_gradients(modality, recipe):
    cfg = ac_grads.config(modality, recipe)
    torch.manual_seed(0)
    model = build_objective(cfg).train()
    batch = synthetic_batch(cfg, 0, 4)
    plain = ac_grads.grads(model, model, batch, seed=7)
    assert set_activation_checkpointing(model.student, "all") == cfg.model.depth
    checked = ac_grads.grads(model, model, batch, seed=7)
    assert ac_grads.max_diff(plain, checked) <= 1e-6
    # the draws were replayed, not skipped: another run seed changes the gradients
    other = ac_grads.grads(model, model, batch, seed=8)  # (LayerDrop may leave other blocks out)
    assert max((plain[k] - other[k]).abs().max().item() for k in plain.keys() & other.keys()) > 1e-4


def test_only_the_students_marked_blocks_are_recomputed(monkeypatch):
    cfg = ac_grads.config("vision", "v1")
    model = build_objective(cfg).train()
    calls = []
    real = common.checkpoint
    monkeypatch.setattr(common, "checkpoint", lambda fn, *a, **k: calls.append(fn) or real(fn, *a, **k))
    assert set_activation_checkpointing(model.student, "2") == 2
    loss, _ = model(synthetic_batch(cfg, 0, 2))
    calls = [getattr(fn, "__wrapped__", fn) for fn in calls]  # each block bound to its keyed pass's keys
    assert calls == list(model.student.blocks[:2])  # the teacher's pass records no gradients: never recomputed
    loss.backward()
    assert set_activation_checkpointing(model.student, "off") == 0
    calls.clear()
    model(synthetic_batch(cfg, 0, 2))
    assert calls == []


def test_setting_is_validated_and_lowers_the_memory_estimate():
    cfg = preset_config("vision", "base")
    for bad in ("some", "0", "-1", "1.5"):
        set_by_path(cfg, "run.activation_checkpointing", bad)
        with pytest.raises(ConfigError, match="activation_checkpointing"):
            validate_config(cfg, memory=False)
    set_by_path(cfg, "run.activation_checkpointing", "off")
    off = estimate_bytes(cfg)
    set_by_path(cfg, "run.activation_checkpointing", "6")
    half = estimate_bytes(cfg)
    set_by_path(cfg, "run.activation_checkpointing", "all")
    assert estimate_bytes(cfg) < half < off


def test_a_checkpointed_run_trains_the_same_weights(tmp_path):
    from safetensors.torch import load_file

    def run(name, setting):
        cfg = preset_config("vision", "tiny")
        for key, value in {"run.steps": 2, "run.batch_size": 8, "run.log_every": 1, "model.drop_path": 0.1,
                           "run.kernels": "torch", "run.activation_checkpointing": setting}.items():
            set_by_path(cfg, key, value)
        summary = pretrain(cfg, out=tmp_path / name, progress=False)
        return load_file(str(summary.checkpoint / "model.safetensors"))

    plain, checked = run("plain", "off"), run("checked", "all")
    assert plain.keys() == checked.keys()
    assert max((plain[k] - checked[k]).abs().max().item() for k in plain) <= 1e-6


@pytest.mark.skipif(not td.is_available() or not td.is_gloo_available(), reason="needs torch.distributed with gloo")
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_same_gradients_under_ddp_and_fsdp(strategy, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "TORCHELASTIC_ERROR_FILE": ""}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "--log-dir", str(tmp_path / "logs"), "--redirects", "3", str(HERE / "ac_grads.py"), strategy]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=HERE)
    logs = "".join(p.read_text() for p in sorted((tmp_path / "logs").rglob("std*.log")))
    assert proc.returncode == 0, proc.stdout + proc.stderr + logs
    rows = [json.loads(line) for line in logs.splitlines() if line.startswith("{")]
    assert sorted(r["case"] for r in rows) == sorted(f"{m}-{r}" for m, r in ac_grads.CASES), logs
    for row in rows:
        assert row["max_diff"] <= 1e-6, row
        assert row["recomputed"] == 3 and row["parameters"] > 0, row


MEMORY_STEP = r"""
import json, sys, torch
from d2v.core.presets import preset_config
from d2v.data.synthetic import fill_model_fields, synthetic_batch
from d2v.models.common import set_activation_checkpointing
from d2v.objective import build_objective

def rss_peak_mb():
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) for l in f if l.startswith("VmHWM")) / 1024

def rss_mb():
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) for l in f if l.startswith("VmRSS")) / 1024

torch.set_num_threads(1)
cfg = fill_model_fields(preset_config("vision", "base"))
cfg.run.kernels = "torch"
torch.manual_seed(0)
model = build_objective(cfg).train()
set_activation_checkpointing(model.student, sys.argv[1])
params = [p for p in model.parameters() if p.requires_grad]
opt = torch.optim.AdamW(params, lr=1e-4)
for p in params:  # the optimizer's moments and the gradients exist before the step is measured
    p.grad = torch.zeros_like(p)
opt.step()
batch = synthetic_batch(cfg, 0, int(sys.argv[2]))
before = rss_mb()
loss, _ = model(batch)
loss.backward()
opt.step()
print(json.dumps({"before_mb": before, "peak_mb": rss_peak_mb()}))
"""


def peaks(settings: list[str], batch: int) -> list[dict]:
    """The MEMORY_STEP figures of each setting, each in its own process, run side by side (one thread each)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-c", MEMORY_STEP, s, str(batch)], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for s in settings]
    rows = []
    for proc in procs:
        out, err = proc.communicate(timeout=900)
        assert proc.returncode == 0, err[-2000:]
        rows.append(json.loads(out.strip().splitlines()[-1]))
    return rows


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux /proc for the peak RSS")
def test_base_vision_at_batch_8_peaks_at_most_75_percent_with_checkpointing():
    """The process's peak resident memory (VmHWM) over one full update (forward, backward, AdamW step) of the
    base vision preset (ViT-B/16, 224 px, v1) at batch 8, each setting in a fresh process: weights, gradients and
    AdamW's moments exist before the update, so the difference is the activations kept for the backward."""
    off, on = peaks(["off", "all"], 8)
    assert on["peak_mb"] <= 0.75 * off["peak_mb"], (off, on)
