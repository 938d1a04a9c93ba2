"""Several processes, one run (torchrun, gloo on the CPU): a 2-process run equals the 1-process run of the same
config, a run stopped by SIGTERM on one rank checkpoints and resumes at another process count, and a simulated
two-node launch (c10d rendezvous on 127.0.0.1) joins one run.

Each torchrun launch costs a few seconds of start-up, so every test here launches at most twice."""
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import torch.distributed as td

from d2v.runtime import checkpoint as ckpt
from d2v.core.config import set_by_path
from d2v.runtime.distributed import BatchPlan, batch_plan
from d2v.core.errors import ConfigError
from d2v.core.presets import preset_config
from d2v.train import load_run_config, pretrain

pytestmark = pytest.mark.skipif(not td.is_available() or not td.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")

# Small models at the tiny presets' dropout (speech and text: 0.1 on residuals and attention); vision adds the base
# preset's drop-path and attention dropout and speech LayerDrop (0 in the tiny presets), so every kind of training
# randomness is drawn in these runs.
VISION = {"model.dim": 32, "model.depth": 2, "model.num_heads": 2, "targets.top_k": 2, "run.batch_size": 16,
          "run.steps": 6, "run.log_every": 1, "model.drop_path": 0.25, "model.attention_dropout": 0.05}
SPEECH = {"model.conv_dim": [16, 16, 32, 32, 32, 32, 32], "model.dim": 32, "model.depth": 2, "model.num_heads": 2,
          "model.ffn_dim": 64, "model.pos_conv_groups": 4, "targets.top_k": 2, "run.batch_size": 4, "run.steps": 4,
          "run.log_every": 1, "data.crop_seconds": 0.5, "model.layerdrop": 0.2}
TEXT = {"model.dim": 32, "model.depth": 2, "model.num_heads": 2, "model.ffn_dim": 64, "model.max_length": 32,
        "targets.top_k": 2, "data.vocab_size": 400, "run.batch_size": 16, "run.steps": 4, "run.log_every": 1}
MODALITY = {"vision": VISION, "speech": SPEECH, "text": TEXT}
# data2vec 2.0 at the same sizes: a small decoder, 3 clones, the reference's decoder input dropout (speech, text)
V2 = {"decoder.dim": 32, "decoder.groups": 4, "mask.clones": 3, "decoder.input_dropout": 0.1}
V2_TEXT = {**V2, "decoder.proj_hidden": 48}
SAME = 1e-6  # max |weight difference| of runs that differ only in how each global batch is split


def config(modality: str, recipe: str = "v1", **overrides):
    cfg = preset_config(modality, "tiny", recipe=recipe)
    for key, value in {**MODALITY[modality], **overrides}.items():
        set_by_path(cfg, key, value)
    return cfg


def cli_args(modality: str, recipe: str = "v1", **overrides) -> list[str]:
    """config(modality, recipe, **overrides) as d2v pretrain options (the recipe named: the CLI's default differs
    per modality)."""
    args = ["pretrain", "--modality", modality, "--recipe", recipe, "--no-progress"]
    for key, value in {**MODALITY[modality], **overrides}.items():
        args += ["--set", f"{key}={json.dumps(value) if isinstance(value, list) else value}"]
    return args


def env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "TORCHELASTIC_ERROR_FILE": ""}


def torchrun(args: list[str], log_dir: Path, nproc: int = 2, launcher: list[str] | None = None,
             wait: bool = True, timeout: float = 240):
    """`torchrun ... -m d2v ARGS`, each rank's output in log_dir/<attempt>/<rank>/std{out,err}.log."""
    launcher = launcher or ["--standalone"]
    cmd = [sys.executable, "-m", "torch.distributed.run", *launcher, "--nproc-per-node", str(nproc),
           "--log-dir", str(log_dir), "--redirects", "3", "-m", "d2v", *args]
    proc = subprocess.Popen(cmd, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if not wait:
        return proc
    out, _ = proc.communicate(timeout=timeout)
    return proc.returncode, out + rank_logs(log_dir)


def rank_logs(log_dir: Path) -> str:
    return "".join(f"\n--- {p.relative_to(log_dir)}\n{p.read_text()}" for p in sorted(Path(log_dir).rglob("std*.log")))


def weights(run_dir: Path, step: int) -> dict[str, torch.Tensor]:
    return load_file(str(Path(run_dir) / "checkpoints" / f"step_{step:08d}" / "model.safetensors"))


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ------------------------------------------------------------------------------------------------ batch arithmetic
def test_batch_plan_splits_the_global_batch_and_covers_every_position_once():
    assert batch_plan(16, 2, 2).micro == 4
    one = [(BatchPlan(16, 1, 1).first(u, 0), 16) for u in range(3)]
    four = [(BatchPlan(16, 2, 2, r).first(u, m), 4) for u in range(3) for m in range(2) for r in range(2)]
    covered = lambda plan: sorted(p for first, n in plan for p in range(first, first + n))  # noqa: E731
    assert covered(one) == covered(four) == list(range(48))
    with pytest.raises(ConfigError, match="divisible by processes x --grad-accum = 3 x 2 = 6"):
        batch_plan(16, 2, 3)


def test_masks_and_crops_do_not_depend_on_how_the_batch_is_split():
    from d2v.data.pipeline import build_pipeline

    for modality in ("vision", "speech", "text"):
        pipe = build_pipeline(config(modality))
        whole = pipe.micro_batch(8, 8)
        halves = [pipe.micro_batch(8, 4), pipe.micro_batch(12, 4)]
        assert torch.equal(whole.mask, torch.cat([h.mask for h in halves])), modality
        if modality == "text":
            assert torch.equal(whole.student_inputs, torch.cat([h.student_inputs for h in halves]))
        if modality == "vision":
            crops = [pipe.on_device(h, f).inputs for h, f in zip(halves, (8, 12))]
            torch.testing.assert_close(pipe.on_device(whole, 8).inputs, torch.cat(crops), rtol=0, atol=1e-6)
        if modality == "speech":
            torch.testing.assert_close(whole.inputs, torch.cat([h.inputs for h in halves]))


def test_dry_run_shows_the_batch_split(monkeypatch):
    from typer.testing import CliRunner

    from d2v.cli import app

    result = CliRunner().invoke(app, ["pretrain", "--dry-run", "--batch-size", "32", "--grad-accum", "2"])
    assert result.exit_code == 0, result.output
    assert "global batch 32 per update = 1 process x 2 accumulated micro-batches x 16 samples" in result.output
    result = CliRunner().invoke(app, ["pretrain", "--dry-run", "--batch-size", "30", "--grad-accum", "4"])
    assert result.exit_code == 2 and "must be divisible by processes x --grad-accum = 1 x 4 = 4" in result.output


# ------------------------------------------------------------------------------------------------ 1 vs 2 processes
def recipe_overrides(modality: str, recipe: str) -> dict:
    return {} if recipe == "v1" else V2_TEXT if modality == "text" else V2


@pytest.mark.parametrize("recipe", ["v1", "v2"])
@pytest.mark.parametrize("modality,accum", [("vision", 2), ("speech", 1), ("text", 2)])
def test_two_processes_and_grad_accum_equal_one(tmp_path, modality, accum, recipe):
    """Same global batch, with dropout, drop-path and LayerDrop drawn: 2 processes (x accum micro-batches each) and 1
    process accumulating 2 micro-batches end with the weights of 1 process taking the batch whole (within 1e-6), for
    both recipes. Speech and text masks differ in size per sample, so this also checks the global masked-count
    normalization; data2vec 2.0 adds the kept positions, the clones' masks and the decoder's noise."""
    steps, extra = MODALITY[modality]["run.steps"], recipe_overrides(modality, recipe)
    one = pretrain(config(modality, recipe=recipe, **extra), out=tmp_path / "one", progress=False)
    accum2 = pretrain(config(modality, recipe=recipe, **extra, **{"run.grad_accum": 2}), out=tmp_path / "accum",
                      progress=False)
    assert max_diff(weights(one.run_dir, steps), weights(accum2.run_dir, steps)) < SAME
    rc, out = torchrun([*cli_args(modality, recipe, **extra, **{"run.grad_accum": accum}),
                        "--out", str(tmp_path / "two")], tmp_path / "logs")
    assert rc == 0, out
    assert "Traceback" not in out
    assert max_diff(weights(one.run_dir, steps), weights(tmp_path / "two", steps)) < SAME
    # one metrics log (rank 0's), with losses reduced over ranks
    a = [json.loads(x) for x in (tmp_path / "one" / "metrics.jsonl").read_text().splitlines()]
    b = [json.loads(x) for x in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in b] == list(range(1, steps + 1))
    for x, y in zip(a, b):
        assert abs(x["loss"] - y["loss"]) < 1e-5 * max(1.0, abs(x["loss"]))
        assert abs(x["target_std"] - y["target_std"]) < 0.05 * x["target_std"]


def test_two_processes_equal_one_with_a_budget_of_audio_samples(tmp_path):
    """Speech updates by run.batch_tokens: an update's utterances are cut into processes x grad_accum parts of about
    equal samples, the same parts on one process accumulating two micro-batches as on two processes, so the weights
    agree within 1e-5. (Utterances of different lengths are padded to their micro-batch's longest, and a padded tail
    reaches the last valid frames through the position convs, as in the reference: the same split, not only the
    same update, is what gives the same bits.)"""
    budget = {"data.crop_seconds": 4.0, "run.batch_size": 0, "run.batch_tokens": 200_000}  # 3 to 4 utterances
    one = pretrain(config("speech", **budget, **{"run.grad_accum": 2}), out=tmp_path / "one", progress=False)
    rc, out = torchrun([*cli_args("speech", **budget), "--out", str(tmp_path / "two")], tmp_path / "logs")
    assert rc == 0, out
    assert "Traceback" not in out
    steps = MODALITY["speech"]["run.steps"]
    assert max_diff(weights(one.run_dir, steps), weights(tmp_path / "two", steps)) < 1e-5


# ------------------------------------------------------------------------------------------------ preemption, resume
def _wait_for_step(run_dir: Path, step: int, proc, timeout: float = 120) -> None:
    path = run_dir / "metrics.jsonl"
    t0 = time.time()
    while time.time() - t0 < timeout:
        if path.exists() and len(path.read_text().splitlines()) >= step:
            return
        if proc.poll() is not None:
            raise AssertionError(f"the run ended before step {step}: {proc.stdout.read()}")
        time.sleep(0.05)
    raise AssertionError(f"no step {step} within {timeout} s")


def _rank_pid(launcher_pid: int, rank: int) -> int:
    """The pid of the worker process of `rank` under a torchrun launcher (Linux /proc)."""
    for _ in range(100):
        for child in Path(f"/proc/{launcher_pid}/task/{launcher_pid}/children").read_text().split():
            try:
                environ = Path(f"/proc/{child}/environ").read_bytes().split(b"\0")
            except OSError:
                continue
            if f"RANK={rank}".encode() in environ:
                return int(child)
        time.sleep(0.05)
    raise AssertionError(f"no worker of rank {rank} under pid {launcher_pid}")


# ------------------------------------------------------------------------------------------------ --nproc-per-node
def d2v_launch(args: list[str], wait: bool = True, timeout: float = 240):
    """`d2v ARGS` (with --nproc-per-node) as a user runs it: (exit code, stdout, stderr), or the process."""
    proc = subprocess.Popen([sys.executable, "-m", "d2v", *args], env=env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    if not wait:
        return proc
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


def test_nproc_per_node_equals_one_process_and_prints_one_error(tmp_path):
    """`d2v pretrain --nproc-per-node 2` launches the run itself (torch.distributed's launcher): the weights of one
    process, one console, and a data error printed once with exit 2 (torchrun prints it per rank plus its own
    report)."""
    steps = TEXT["run.steps"]
    one = pretrain(config("text"), out=tmp_path / "one", progress=False)
    rc, out, err = d2v_launch([*cli_args("text"), "--out", str(tmp_path / "two"), "--nproc-per-node", "2"])
    assert rc == 0, out + err
    assert "2 processes (ddp, cpu)" in out and out.count("pretrain summary") == 1
    assert "Traceback" not in out + err and "torch.distributed" not in err and "OMP_NUM_THREADS" not in err
    assert max_diff(weights(one.run_dir, steps), weights(tmp_path / "two", steps)) < SAME
    (tmp_path / "bad" / "a").mkdir(parents=True)
    (tmp_path / "bad" / "a" / "x.png").write_bytes(b"not an image")
    rc, out, err = d2v_launch(["pretrain", "--data", str(tmp_path / "bad"), "--out", str(tmp_path / "r"),
                               "--batch-size", "4", "--steps", "2", "--no-progress", "--nproc-per-node", "2"])
    assert rc == 2, out + err
    assert (out + err).count("Error:") == 1 and "x.png" in err and "Traceback" not in out + err, out + err
    rc, out, err = d2v_launch(["pretrain", "--batch-size", "5", "--nproc-per-node", "2", "--dry-run"])
    assert rc == 2 and err.count("Error:") == 1 and "divisible by processes x --grad-accum = 2 x 1" in err


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_nproc_per_node_stopped_by_a_signal_saves_and_exits_like_one_process(tmp_path, signum):
    """Ctrl-C (SIGINT to the launcher, as a terminal sends it) or SIGTERM: every process saves at the same update,
    the command exits 130 / 143 without a traceback, and --resume on one process finishes the run."""
    steps, quiet = 300, {"run.collapse_after": 1.0, "run.steps": 300}
    run = tmp_path / "run"
    proc = d2v_launch([*cli_args("text", **quiet), "--out", str(run), "--nproc-per-node", "2"], wait=False)
    try:
        _wait_for_step(run, 3, proc)
        proc.send_signal(signum)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 128 + signum, out + err
    assert "Traceback" not in out + err and "SignalException" not in out + err, out + err
    assert out.count(f"Interrupted ({signal.Signals(signum).name}): saving a checkpoint") == 1, out
    k = int(ckpt.latest_checkpoint(run).name.split("_")[1])
    assert 3 <= k < steps
    resumed = pretrain(load_run_config(run), out=run, resume=True, progress=False)
    assert resumed.steps == steps


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="needs Linux /proc to find a worker's pid")
def test_sigterm_on_one_rank_checkpoints_and_resume_on_one_process_equals_uninterrupted(tmp_path):
    steps, quiet = 40, {"run.collapse_after": 1.0}  # a tiny model's prediction std dips: not what this tests
    ref = pretrain(config("vision", **{"run.steps": steps}, **quiet), out=tmp_path / "ref", progress=False)
    run = tmp_path / "run"
    proc = torchrun([*cli_args("vision", **{"run.steps": steps}, **quiet), "--out", str(run)], tmp_path / "logs",
                    wait=False)
    try:
        _wait_for_step(run, 3, proc)
        os.kill(_rank_pid(proc.pid, 1), signal.SIGTERM)  # preemption of one rank only
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    logs = rank_logs(tmp_path / "logs")
    assert proc.returncode != 0, out  # torchrun reports the workers' non-zero exit
    assert "Traceback" not in logs, logs
    assert "exitcode  : 143" in out or "exitcode: 143" in out.replace(" ", ""), out  # 128 + SIGTERM
    assert "Interrupted (SIGTERM): saving a checkpoint" in logs
    stopped = ckpt.latest_checkpoint(run)
    k = int(stopped.name.split("_")[1])
    assert 3 <= k < steps
    # 2 -> 1 processes: the run continues the same sample stream
    resumed = pretrain(load_run_config(run), out=run, resume=True, progress=False)
    assert resumed.steps == steps
    assert max_diff(weights(ref.run_dir, steps), weights(run, steps)) < SAME
    assert [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()] == list(range(1, steps + 1))


def _stop_after_update(monkeypatch, update: int):
    """SIGUSR1 (SLURM's --signal warning) right after optimizer update `update`: a checkpoint there."""
    from d2v.objective import Data2Vec

    original = Data2Vec.ema_step

    def ema_step(self, step):
        if step == update:
            os.kill(os.getpid(), signal.SIGUSR1)
        return original(self, step)

    monkeypatch.setattr(Data2Vec, "ema_step", ema_step)


@pytest.mark.parametrize("modality,recipe", [("speech", "v1"), ("text", "v2")])
def test_resume_on_two_processes_continues_a_one_process_run_with_dropout(tmp_path, monkeypatch, modality, recipe):
    """A run stopped after update 2 on one process and resumed on two draws the same dropout, attention dropout and
    LayerDrop masks as the uninterrupted run: the same weights within 1e-6."""
    extra = recipe_overrides(modality, recipe)
    steps = MODALITY[modality]["run.steps"]
    ref = pretrain(config(modality, recipe=recipe, **extra), out=tmp_path / "ref", progress=False)
    with monkeypatch.context() as m:
        _stop_after_update(m, 2)
        part = pretrain(config(modality, recipe=recipe, **extra), out=tmp_path / "run", progress=False)
    assert part.steps == 2 and part.signal == signal.SIGUSR1
    rc, out = torchrun(["pretrain", "--out", str(tmp_path / "run"), "--resume", "--no-progress"], tmp_path / "logs")
    assert rc == 0, out
    assert "2 processes (ddp, cpu)" in out and "Resuming" in out
    assert max_diff(weights(ref.run_dir, steps), weights(tmp_path / "run", steps)) < SAME


def test_two_node_launch_resumes_a_one_process_run(tmp_path, monkeypatch):
    """1 -> 2 processes, launched as two single-process 'nodes' (c10d rendezvous on 127.0.0.1)."""
    ref = pretrain(config("vision"), out=tmp_path / "ref", progress=False)
    with monkeypatch.context() as m:
        _stop_after_update(m, 2)
        part = pretrain(config("vision"), out=tmp_path / "run", progress=False)
    assert part.steps == 2 and part.signal == signal.SIGUSR1

    port = free_port()
    procs = [torchrun(["pretrain", "--out", str(tmp_path / "run"), "--resume", "--no-progress"],
                      tmp_path / f"logs{node}", nproc=1, wait=False,
                      launcher=["--nnodes", "2", "--node-rank", str(node), "--rdzv-backend", "c10d",
                                "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "d2v-test"])
             for node in (0, 1)]
    try:
        outs = [p.communicate(timeout=240)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    logs = rank_logs(tmp_path / "logs0") + rank_logs(tmp_path / "logs1")
    assert [p.returncode for p in procs] == [0, 0], "".join(outs) + logs
    assert "2 processes (ddp, cpu)" in logs
    steps = VISION["run.steps"]
    assert max_diff(weights(ref.run_dir, steps), weights(tmp_path / "run", steps)) < SAME


# ------------------------------------------------------------------------------------------------ one process
def test_bench_pretrain_reports_samples_per_second(tmp_path):
    from typer.testing import CliRunner

    from d2v.bench.cli import app

    out = tmp_path / "bench.json"
    args = [a for a in cli_args("vision", **{"run.steps": 4})[1:] if a != "--no-progress"]
    result = CliRunner().invoke(app, ["pretrain", "--nproc", "1", "--threads", "1", "--warmup", "1", "--json",
                                      str(out), "--", *args])
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    assert data["summary"]["1"]["samples_per_s"] > 0 and data["summary"]["1"]["scaling_efficiency"] == 1.0
    assert [r["records"] for r in data["rows"]] == [3]


def _other_rank_raises(monkeypatch, at_call: int, flags: list[int]):
    """Make the per-update agreement report what another rank raised (a signal, a divergence) at one update."""
    import d2v.runtime.distributed as distributed

    original, calls = distributed.agree, []

    def agree(values, dist):
        out = original(values, dist)
        if len(values) == 4:  # the per-update agreement: signal, diverged, collapse-stop, time-due
            calls.append(1)
            if len(calls) == at_call:
                out = [max(a, b) for a, b in zip(out, flags)]
        return out

    monkeypatch.setattr(distributed, "agree", agree)


def test_a_signal_on_another_rank_stops_this_one_with_a_checkpoint(tmp_path, monkeypatch):
    _other_rank_raises(monkeypatch, 3, [int(signal.SIGTERM), 0, 0, 0])
    s = pretrain(config("vision"), out=tmp_path / "run", progress=False)
    assert s.steps == 3 and s.signal == signal.SIGTERM and s.interrupted
    assert ckpt.latest_checkpoint(tmp_path / "run").name == "step_00000003"


def test_divergence_on_another_rank_stops_this_one_without_saving(tmp_path, monkeypatch):
    from d2v.train import DivergedError

    _other_rank_raises(monkeypatch, 2, [0, 1, 0, 0])
    with pytest.raises(DivergedError):
        pretrain(config("vision", **{"run.checkpoint_every": 1}), out=tmp_path / "run", progress=False)
    assert ckpt.latest_checkpoint(tmp_path / "run").name == "step_00000001"  # nothing written after it


def test_time_based_checkpoints(tmp_path):
    """run.checkpoint_minutes: a checkpoint whenever that much time has passed since the last one."""
    cfg = config("vision", **{"run.steps": 4, "run.checkpoint_minutes": 1e-9, "run.keep_checkpoints": 0})
    pretrain(cfg, out=tmp_path / "run", progress=False)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path / "run")] == [f"step_{s:08d}" for s in (1, 2, 3, 4)]
    cfg = config("vision", **{"run.steps": 4, "run.keep_checkpoints": 0})  # default 30 minutes: only the end
    pretrain(cfg, out=tmp_path / "default", progress=False)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path / "default")] == ["step_00000004"]


def test_fp16_update_skipped_by_the_scaler_does_not_count(tmp_path, monkeypatch):
    """An overflowing fp16 update consumes its batch but not a step: the step count, LR and EMA stay put."""
    from d2v.objective import Data2Vec
    from d2v.runtime.schedule import lr_at

    original, calls = Data2Vec.forward, []

    def forward(self, batch):
        loss, stats = original(self, batch)
        calls.append(1)
        return (loss * float("inf") if len(calls) == 3 else loss), stats  # the 3rd update overflows

    taus = []
    ema = Data2Vec.ema_step
    monkeypatch.setattr(Data2Vec, "forward", forward)
    monkeypatch.setattr(Data2Vec, "ema_step", lambda self, step: taus.append(step) or ema(self, step))
    cfg = config("vision", **{"run.steps": 4, "run.precision": "fp16", "run.batch_size": 8})
    s = pretrain(cfg, out=tmp_path / "run", progress=False)
    records = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    skipped = records[-1]["skipped_updates"]
    assert s.steps == 4 and [r["step"] for r in records] == [1, 2, 3, 4] and skipped >= 1
    assert taus == [1, 2, 3, 4]  # one EMA update per counted step
    assert [r["lr"] for r in records] == [lr_at(cfg.optim, k, 4) for k in range(4)]
    state = json.loads((s.checkpoint / "state.json").read_text())
    assert state["step"] == 4 and state["batches"] == 4 + skipped == len(calls)


# ------------------------------------------------------------------------------------------------ FSDP2
def _drop_after(run_dir: Path, step: int) -> None:
    """Lose the checkpoints after `step` (as a node lost before it could save them)."""
    import shutil

    for p in ckpt.list_checkpoints(run_dir):
        if int(p.name.split("_")[1]) > step:
            shutil.rmtree(p)
    (run_dir / "checkpoints" / "latest").unlink()


def test_fsdp_refuses_what_sharding_cannot_do():
    from d2v.runtime.distributed import check_strategy

    check_strategy(config("vision", **{"run.strategy": "fsdp", "run.precision": "bf16"}))
    with pytest.raises(ConfigError, match="--precision bf16"):
        check_strategy(config("vision", **{"run.strategy": "fsdp", "run.precision": "fp16"}))
    # LayerDrop runs every block on every process (dropped rows keep their input), so sharded blocks can take it
    check_strategy(config("speech", **{"run.strategy": "fsdp", "model.layerdrop": 0.05}))
    assert preset_config("vision", "large").run.strategy == "fsdp"


def test_fsdp_sharded_checkpoints_resume_at_other_world_sizes_and_export(tmp_path):
    """1 process -> FSDP on 2 ranks (single-file checkpoint sharded as it loads) -> sharded checkpoints, which resume
    on FSDP at 1 rank (DCP reshards) and on one plain process (consolidated), and export; all equal the 1-process
    run. Two torchrun launches."""
    import shutil

    from typer.testing import CliRunner

    import d2v
    from d2v.cli import app

    every = {"run.steps": 6, "run.checkpoint_every": 2, "run.keep_checkpoints": 0}
    ref = pretrain(config("vision", **every), out=tmp_path / "ref", progress=False)
    want = weights(ref.run_dir, 6)

    # single-file step 2 (1 process) -> FSDP on 2 ranks, which writes sharded steps 4 and 6
    shutil.copytree(tmp_path / "ref", tmp_path / "two")
    _drop_after(tmp_path / "two", 2)
    rc, out = torchrun(["pretrain", "--out", str(tmp_path / "two"), "--resume", "--no-progress",
                        "--set", "run.strategy=fsdp"], tmp_path / "logs")
    assert rc == 0, out
    assert "2 processes (fsdp, cpu)" in out and "Traceback" not in out
    step6 = tmp_path / "two" / "checkpoints" / "step_00000006"
    assert ckpt.is_sharded(step6) and len(list((step6 / "dcp").glob("*.safetensors"))) == 2  # one file per rank
    model, _, _ = ckpt.read_checkpoint(step6)  # consolidated in this process
    assert max_diff(want, model) < 1e-5

    # the sharded checkpoint exports to the usual single-file encoder
    result = CliRunner().invoke(app, ["export", "checkpoint", str(tmp_path / "two"), "--out", str(tmp_path / "enc"),
                                      "--no-hf"])
    assert result.exit_code == 0, result.output
    enc = d2v.load_encoder(tmp_path / "enc")
    assert max_diff({k: v for k, v in want.items() if k.startswith("student.")},
                    {f"student.{k}": v for k, v in enc.state_dict().items()}) < 1e-5

    # sharded step 4 (2 ranks) -> FSDP on 1 rank: DCP reshards
    shutil.copytree(tmp_path / "two", tmp_path / "fsdp1")
    _drop_after(tmp_path / "fsdp1", 4)
    rc, out = torchrun(["pretrain", "--out", str(tmp_path / "fsdp1"), "--resume", "--no-progress"],
                       tmp_path / "logs1", nproc=1)
    assert rc == 0, out
    model, _, _ = ckpt.read_checkpoint(tmp_path / "fsdp1" / "checkpoints" / "step_00000006")
    assert max_diff(want, model) < 1e-5

    # sharded step 4 (2 ranks) -> one plain process, consolidated
    shutil.copytree(tmp_path / "two", tmp_path / "to1")
    _drop_after(tmp_path / "to1", 4)
    pretrain(load_run_config(tmp_path / "to1"), out=tmp_path / "to1", resume=True, progress=False)
    assert max_diff(want, weights(tmp_path / "to1", 6)) < 1e-5
