"""The training loop: loss falls, resume is exact, checkpoints are atomic and pickle-free, precisions run."""
import json
import os
import signal

import pytest
import torch
from safetensors.torch import load_file

from conftest import tiny_config
from d2v.runtime import checkpoint as ckpt
from d2v.objective import Data2Vec
from d2v.train import pretrain


def test_loss_falls(tmp_path):
    cfg = tiny_config(**{"run.steps": 80, "run.batch_size": 32, "ema.decay": 0.999, "ema.end_decay": 0.999,
                         "optim.lr": 5e-3})
    s = pretrain(cfg, out=tmp_path / "run", progress=False)
    losses = [json.loads(line)["loss"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 80 and s.steps == 80
    # Predicting a constant leaves the loss near its start (about 0.25 here); learning takes it well below.
    assert sum(losses[-10:]) / 10 < 0.8 * sum(losses[:10]) / 10


def test_run_directory_contents(tmp_path):
    s = pretrain(tiny_config(), out=tmp_path / "run", progress=False)
    run = tmp_path / "run"
    config = json.loads((run / "config.json").read_text())
    assert config["model"]["image_size"] == 8 and config["model"]["in_chans"] == 1  # resolved from the data
    record = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    assert {"step", "loss", "lr", "tau", "target_std", "pred_std", "samples_per_s"} <= set(record)
    assert s.checkpoint == run / "checkpoints" / "step_00000008"
    files = {p.name for p in s.checkpoint.iterdir()}
    assert files == {"model.safetensors", "state.safetensors", "state.json", "manifest.json"}  # nothing pickled
    assert not list(run.rglob("*.pt")) and not list(run.rglob("*.pkl"))


def _interrupt_at(monkeypatch, step_to_stop):
    original = Data2Vec.ema_step

    def ema_step(self, step):
        if step == step_to_stop:
            os.kill(os.getpid(), signal.SIGINT)  # what Ctrl-C does
        return original(self, step)

    monkeypatch.setattr(Data2Vec, "ema_step", ema_step)


def test_ctrl_c_saves_and_resume_is_exact(tmp_path, monkeypatch):
    overrides = {"run.steps": 10, "model.drop_path": 0.1}  # drop-path: resume must restore randomness too
    full = pretrain(tiny_config(**overrides), out=tmp_path / "full", progress=False)

    with monkeypatch.context() as m:
        _interrupt_at(m, 4)
        part = pretrain(tiny_config(**overrides), out=tmp_path / "part", progress=False)
    assert part.interrupted and part.steps == 4
    assert ckpt.latest_checkpoint(tmp_path / "part").name == "step_00000004"
    resumed = pretrain(tiny_config(**overrides), out=tmp_path / "part", resume=True, progress=False)
    assert resumed.steps == 10
    a = load_file(str(full.checkpoint / "model.safetensors"))
    b = load_file(str(resumed.checkpoint / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    lines = (tmp_path / "part" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines] == list(range(1, 11))


def test_periodic_checkpoints_keep_newest(tmp_path):
    cfg = tiny_config(**{"run.steps": 9, "run.checkpoint_every": 2, "run.keep_checkpoints": 2})
    pretrain(cfg, out=tmp_path / "run", progress=False)
    names = [p.name for p in ckpt.list_checkpoints(tmp_path / "run")]
    assert names == ["step_00000008", "step_00000009"]


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    run = tmp_path / "run"
    pretrain(tiny_config(**{"run.steps": 3}), out=run, progress=False)
    before = sorted(p.name for p in (run / "checkpoints").iterdir())
    model = torch.nn.Linear(3, 3)
    opt = torch.optim.AdamW(model.parameters())
    calls = {"n": 0}
    real = ckpt.save_file

    def failing_save(tensors, path, metadata=None):
        calls["n"] += 1
        real(tensors, path, metadata=metadata)
        if calls["n"] == 2:
            raise OSError("disk full")  # dies after one complete file and one half-way through

    monkeypatch.setattr(ckpt, "save_file", failing_save)
    with pytest.raises(OSError):
        ckpt.save_checkpoint(run, 99, model, opt, {})
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == before  # no partial dir, no temp left
    assert ckpt.latest_checkpoint(run).name == "step_00000003"


def test_corrupt_checkpoint_is_a_clear_error(tmp_path):
    run = tmp_path / "run"
    s = pretrain(tiny_config(**{"run.steps": 2}), out=run, progress=False)
    (s.checkpoint / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ckpt.CheckpointError, match="corrupt"):
        pretrain(tiny_config(), out=run, resume=True, progress=False)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_runs(tmp_path, precision):
    s = pretrain(tiny_config(**{"run.steps": 3, "run.precision": precision}), out=tmp_path / "run", progress=False)
    assert s.steps == 3 and torch.isfinite(torch.tensor(s.final_loss))
    weights = load_file(str(s.checkpoint / "model.safetensors"))
    assert all(v.dtype == torch.float32 for k, v in weights.items() if k.startswith("teacher."))  # EMA in fp32


def test_gradient_accumulation_matches_big_batch(tmp_path):
    """Two micro-batches of 8 accumulate to the gradient of the same 16 samples in one batch."""
    from d2v.data.pipeline import build_pipeline
    from d2v.models import build_encoder

    cfg = tiny_config(**{"run.batch_size": 8, "data.crop_scale": [1.0, 1.0]})
    pipe = build_pipeline(cfg)
    torch.manual_seed(0)
    model = Data2Vec(build_encoder(cfg.model), cfg.targets, cfg.ema)
    b0, b1 = pipe.micro_batch(0, 8), pipe.micro_batch(8, 8)
    for b in (b0, b1):
        loss, _ = model(b)
        (loss / 2).backward()
    g_acc = [p.grad.clone() for p in model.student.parameters()]
    model.zero_grad()
    from d2v.core.batch import Batch

    big = Batch(torch.cat([b0.inputs, b1.inputs]), torch.cat([b0.mask, b1.mask]))
    model(big)[0].backward()  # equal masked counts per image, so the mean over rows matches
    for a, b in zip(g_acc, (p.grad for p in model.student.parameters())):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)

    s = pretrain(tiny_config(**{"run.steps": 2, "run.grad_accum": 2}), out=tmp_path / "run", progress=False)
    assert s.steps == 2


def test_shared_parameters_are_copied_not_averaged():
    from d2v.core.config import EMAConfig, TargetConfig
    from d2v.models import build_encoder

    cfg = tiny_config()
    cfg.model.image_size, cfg.model.in_chans, cfg.model.patch_size = 8, 1, 2
    model = Data2Vec(build_encoder(cfg.model), TargetConfig(top_k=2),
                     EMAConfig(decay=0.5, end_decay=0.5, shared=["patch_embed"]))
    with torch.no_grad():
        for p in model.student.parameters():
            p.add_(1.0)
    old = {k: v.clone() for k, v in model.teacher.state_dict().items()}
    model.ema_step(1)
    new = model.teacher.state_dict()
    student = model.student.state_dict()
    assert torch.equal(new["patch_embed.weight"], student["patch_embed.weight"])
    torch.testing.assert_close(new["cls_token"] - old["cls_token"], 0.5 * (student["cls_token"] - old["cls_token"]))


@pytest.mark.triton
def test_pretrain_with_triton_kernels(tmp_path):
    """--kernels triton through the whole loop (on the CPU: Triton's interpreter, set up by conftest)."""
    pytest.importorskip("triton")
    s = pretrain(tiny_config(**{"run.steps": 3, "run.kernels": "triton"}), out=tmp_path / "run", progress=False)
    assert s.steps == 3 and torch.isfinite(torch.tensor(s.final_loss))
    ref = pretrain(tiny_config(**{"run.steps": 3, "run.kernels": "torch"}), out=tmp_path / "ref", progress=False)
    assert abs(s.final_loss - ref.final_loss) < 1e-3 * max(1.0, abs(ref.final_loss))
