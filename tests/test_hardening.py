"""Run directories that nothing corrupts, and every user mistake as one sentence with a non-zero exit.

Each test names the case of the hardening issue it covers; each failed before the fix."""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from conftest import tiny_cli_args, tiny_config
from d2v.runtime import checkpoint as ckpt
from d2v.cli import app
from d2v.core.errors import CheckpointError, ConfigError, UserError
from d2v.train import pretrain

runner = CliRunner()


def run(*args, env=None):
    result = runner.invoke(app, [str(a) for a in args], env=env)
    assert "Traceback" not in result.output, result.output
    assert not (result.exception and not isinstance(result.exception, SystemExit)), repr(result.exception)
    return result


def fails_with(result, text, code=2):
    assert result.exit_code == code, result.output
    assert "Error:" in result.output and text in result.output, result.output


@pytest.fixture(scope="module")
def done_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("hard") / "run"
    result = run("pretrain", "--out", out, *tiny_cli_args())
    assert result.exit_code == 0, result.output
    return out


def _weights(path):
    return load_file(str(ckpt.latest_checkpoint(path) / "model.safetensors"))


def _same(a, b):
    assert a.keys() == b.keys()
    return all(torch.equal(a[k], b[k]) for k in a)


# 1. export into the run directory


def test_export_into_a_run_directory_is_refused_and_the_run_untouched(done_run):
    before = (done_run / "config.json").read_bytes()
    fails_with(run("export", "checkpoint", done_run, "--out", done_run), "is the run directory")
    fails_with(run("export", "checkpoint", done_run, "--out", done_run / "checkpoints" / "x"), "lies inside the run")
    assert (done_run / "config.json").read_bytes() == before
    assert run("pretrain", "--out", done_run, "--resume", "--no-progress").exit_code == 0


def test_export_target_that_is_a_file_or_another_kind_of_directory(done_run, tmp_path):
    (tmp_path / "file").write_text("x")
    fails_with(run("export", "checkpoint", done_run, "--out", tmp_path / "file"), "is a file")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("mine")
    fails_with(run("export", "checkpoint", done_run, "--out", tmp_path / "mine"), "not a d2v export")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "mine"
    fails_with(run("export", "checkpoint", done_run, "--out", "/proc/d2v-x"), "not writable", code=1)


def test_exports_from_threads_of_one_process_into_one_parent_all_succeed(tmp_path):
    """The writability check of --out must not trip over a sibling thread's check of the same parent folder."""
    from concurrent.futures import ThreadPoolExecutor

    from d2v.runtime.rundir import check_writable_dir

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda i: [check_writable_dir(tmp_path / f"enc{i}", "--out") for _ in range(200)], range(8)))
    assert not list(tmp_path.iterdir())  # nothing left behind


# 2. failures mid-run


def test_invalid_config_is_refused_before_the_run_directory_exists(tmp_path):
    out = tmp_path / "run"
    fails_with(run("pretrain", "--out", out, "--set", "optim.schedule=linear", *tiny_cli_args()), "optim.schedule")
    assert not out.exists()


def test_error_mid_run_saves_a_checkpoint_and_resume_matches_the_uninterrupted_run(tmp_path, monkeypatch):
    from d2v.data.vision import VisionPipeline
    from d2v.core.errors import DataError

    cfg = lambda: tiny_config(**{"run.steps": 8})  # noqa: E731
    full = pretrain(cfg(), out=tmp_path / "full", progress=False)
    original = VisionPipeline.micro_batch

    def failing(self, first, count):
        if first == 5 * count:  # the 6th micro-batch
            raise DataError("file images/0005.png vanished")
        return original(self, first, count)

    with monkeypatch.context() as m:
        m.setattr(VisionPipeline, "micro_batch", failing)
        with pytest.raises(DataError, match="vanished"):
            pretrain(cfg(), out=tmp_path / "part", progress=False)
    assert ckpt.latest_checkpoint(tmp_path / "part").name == "step_00000005"
    resumed = pretrain(cfg(), out=tmp_path / "part", resume=True, progress=False)
    assert resumed.steps == 8 and _same(_weights(tmp_path / "full"), _weights(tmp_path / "part"))
    assert full.steps == 8


def test_full_disk_is_one_sentence_and_keeps_the_earlier_checkpoint(tmp_path, monkeypatch):
    import errno

    original = ckpt.save_checkpoint

    def full_disk(run_dir, step, *args, **kwargs):
        if step == 8:
            raise OSError(errno.ENOSPC, "No space left on device", str(run_dir))
        return original(run_dir, step, *args, **kwargs)

    monkeypatch.setattr(ckpt, "save_checkpoint", full_disk)
    out = tmp_path / "run"
    result = run("pretrain", "--out", out, "--checkpoint-every", "4", *tiny_cli_args())
    fails_with(result, "No space left on device", code=1)
    assert ckpt.latest_checkpoint(out).name == "step_00000004"
    monkeypatch.setattr(ckpt, "save_checkpoint", original)
    assert run("pretrain", "--out", out, "--resume", "--no-progress").exit_code == 0


def test_run_directory_without_checkpoint_starts_again(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.json").write_text(json.dumps(tiny_config().to_dict()))
    (out / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n')
    result = run("pretrain", "--out", out, *tiny_cli_args())
    assert result.exit_code == 0 and "starting it again from scratch" in result.output, result.output
    result = run("pretrain", "--out", tmp_path / "r2", "--resume")
    fails_with(result, "no run to resume")
    shutil_out = tmp_path / "r3"
    shutil_out.mkdir()
    (shutil_out / "config.json").write_text(json.dumps(tiny_config().to_dict()))
    result = run("pretrain", "--out", shutil_out, "--resume", "--no-progress")
    assert result.exit_code == 0 and "no checkpoint yet" in result.output, result.output
    assert ckpt.latest_checkpoint(shutil_out).name == "step_00000008"


# 3. divergence


def test_divergence_exits_non_zero_and_keeps_the_last_finite_checkpoint(tmp_path, monkeypatch):
    import d2v.train as train

    original = train.lr_at
    monkeypatch.setattr(train, "lr_at", lambda cfg, step, total: float("inf") if step == 3 else original(cfg, step, total))
    out = tmp_path / "run"
    result = run("pretrain", "--out", out, "--checkpoint-every", "2", *tiny_cli_args())
    fails_with(result, "training diverged", code=3)
    assert "step_00000002" in result.output
    names = sorted(p.name for p in (out / "checkpoints").iterdir() if p.name.startswith("step_"))
    assert names == ["step_00000002"]
    assert all(torch.isfinite(v).all() for v in _weights(out).values())
    assert run("export", "checkpoint", out, "--out", tmp_path / "enc", "--no-hf").exit_code == 0


def test_export_refuses_non_finite_weights(done_run, tmp_path):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(done_run, bad)
    c = ckpt.latest_checkpoint(bad)
    w = load_file(str(c / "model.safetensors"))
    w["student.blocks.0.mlp.fc1.weight"][0, 0] = float("nan")
    save_file(w, str(c / "model.safetensors"))
    ckpt.write_manifest(c, ckpt.FILES)
    fails_with(run("export", "checkpoint", bad, "--out", tmp_path / "enc"), "not finite")
    assert not (tmp_path / "enc").exists()


# 4. two processes on one run directory


def test_a_locked_run_directory_is_refused(tmp_path):
    from d2v.runtime.rundir import RunLock

    out = tmp_path / "run"
    out.mkdir()
    with RunLock(out):
        fails_with(run("pretrain", "--out", out, *tiny_cli_args()), "in use by another d2v process")
    assert not (out / "config.json").exists()
    (out / ".lock").write_text("999999\n")  # left by a process that died: flock is gone with it
    assert run("pretrain", "--out", out, *tiny_cli_args()).exit_code == 0


# 6. and 9. incomplete, corrupt and partial checkpoints


def _two_checkpoints(tmp_path):
    out = tmp_path / "run"
    pretrain(tiny_config(**{"run.steps": 4, "run.checkpoint_every": 2}), out=out, progress=False)
    return out, out / "checkpoints" / "step_00000002", out / "checkpoints" / "step_00000004"


def test_missing_optimizer_state_falls_back_to_the_older_checkpoint(tmp_path):
    out, older, newer = _two_checkpoints(tmp_path)
    (newer / "state.safetensors").unlink()
    with pytest.warns(UserWarning, match="state.safetensors is missing"):
        path, *_ = ckpt.read_latest(out)
    assert path == older
    (older / "state.safetensors").unlink()
    with pytest.raises(CheckpointError, match="state.safetensors is missing"):
        ckpt.read_latest(out)


def test_corrupt_latest_checkpoint_resumes_from_the_older_one(tmp_path):
    out, older, newer = _two_checkpoints(tmp_path)
    data = bytearray((newer / "model.safetensors").read_bytes())
    data[-5] ^= 0xFF  # one flipped byte, same size
    (newer / "model.safetensors").write_bytes(bytes(data))
    result = run("pretrain", "--out", out, "--resume", "--steps", "4", "--no-progress")
    assert result.exit_code == 0, result.output
    assert "corrupt" in result.output and "step_00000002" in result.output and "Resuming" in result.output


def test_partial_checkpoint_left_by_kill_is_removed(tmp_path):
    out, _, _ = _two_checkpoints(tmp_path)
    partial = out / "checkpoints" / ".tmp-step_00000006-12345"
    partial.mkdir()
    (partial / "model.safetensors").write_bytes(b"half")
    result = run("pretrain", "--out", out, "--resume", "--no-progress")
    assert result.exit_code == 0 and not partial.exists(), result.output


# 7. export into an existing export


def test_export_refuses_an_existing_export_and_force_leaves_no_stale_file(done_run, tmp_path):
    enc = tmp_path / "enc"
    assert run("export", "checkpoint", done_run, "--out", enc).exit_code == 0
    (enc / "tokenizer.json").write_text("{}")  # stale: from another modality's export
    fails_with(run("export", "checkpoint", done_run, "--out", enc, "--no-hf"), "--force")
    assert (enc / "hf").exists()
    assert run("export", "checkpoint", done_run, "--out", enc, "--no-hf", "--force").exit_code == 0
    assert sorted(p.name for p in enc.iterdir()) == ["config.json", "model.safetensors"]
    assert oct((enc / "model.safetensors").stat().st_mode & 0o777) == oct(0o666 & ~_umask())


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_checkpoint_files_have_the_umask_mode(done_run):
    for p in ckpt.latest_checkpoint(done_run).iterdir():
        assert p.stat().st_mode & 0o777 == 0o666 & ~_umask(), p


# 8. and 11. resume takes the run's own options; data paths stored resolved


def test_resume_needs_no_repeated_options_and_data_path_is_absolute(tmp_path, monkeypatch):
    images = (np.random.default_rng(0).random((40, 8, 8)) * 255).astype(np.uint8)
    (tmp_path / "data").mkdir()
    np.save(tmp_path / "data" / "x.npy", images)
    monkeypatch.chdir(tmp_path)
    result = run("pretrain", "--data", "data/x.npy", "--out", "run", "--steps", "3", *tiny_cli_args())
    assert result.exit_code == 0, result.output
    cfg = json.loads((tmp_path / "run" / "config.json").read_text())
    assert cfg["data"]["source"] == str(tmp_path / "data" / "x.npy")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    result = run("pretrain", "--out", tmp_path / "run", "--resume")
    assert result.exit_code == 0 and "is complete" in result.output, result.output


def test_resume_of_a_text_run_without_modality():
    from d2v.train import apply_resume_overrides
    from d2v.core.presets import preset_config

    saved = preset_config("text")
    apply_resume_overrides(saved, {"run.device": "cpu"}, None, None)  # no --modality: the run's own
    assert saved.modality == "text" and saved.run.device == "cpu"
    with pytest.raises(ConfigError, match="--modality cannot change"):
        apply_resume_overrides(saved, {}, None, "vision")


# 10. signals


def _cli_process(args, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "d2v", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env, cwd=tmp_path)


def test_sigterm_saves_exits_143_and_resume_finishes(tmp_path):
    out = tmp_path / "run"
    args = ["pretrain", "--out", out, *tiny_cli_args()]
    args[args.index("run.steps=8")] = "run.steps=100000"
    proc = _cli_process(args, tmp_path)
    deadline = time.time() + 120
    while time.time() < deadline and not ((out / "metrics.jsonl").exists() and (out / "metrics.jsonl").read_text()):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 143, output
    assert "Traceback" not in output and f"d2v pretrain --out {out} --resume" in output, output
    step = int(ckpt.latest_checkpoint(out).name.split("_")[1])
    assert step >= 1
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["step"] <= step


# Tracebacks that became one sentence


@pytest.mark.parametrize("args, text", [
    (["--set", "model.num_heads=5"], "must divide model.dim"),
    (["--set", "targets.top_k=10"], "cannot exceed"),
    (["--set", "run.log_every=0"], "run.log_every"),
    (["--set", "model.pixel_mean=0.5,0.5,0.5"], "one value per channel"),
    (["--set", "data.crop_scale=0.1"], "data.crop_scale"),
    (["--seed", "-1"], "--seed (run.seed)"),
    (["--num-workers", "-2"], "--num-workers"),
    (["--image-size", "4096"], "GiB"),
    (["--image-size", "-5"], "--image-size"),
    (["--checkpoint-every", "-1"], "--checkpoint-every"),
    (["--set", "ema.decay=1.5"], "ema.decay"),
    (["--image-size", "1"], "--image-size"),
    (["--image-size", "3"], "at least 2x2 patches"),
    (["--set", "optim.lr=nan"], "optim.lr"),
    (["--lr", "1e6"], "--lr"),
    (["--set", "ema.shared=nothing."], "matches no parameter"),
    (["--device", "tpu"], "must be auto, cpu, cuda or cuda:N"),
])
def test_bad_values_are_one_sentence(args, text, tmp_path):
    out = tmp_path / "run"
    fails_with(run("pretrain", "--out", out, "--dry-run", *args), text)
    assert not out.exists()


def test_a_step_that_cannot_fit_in_memory_is_refused_with_the_figure(tmp_path):
    out = tmp_path / "run"
    args = ["--image-size", "64", "--batch-size", "100000", "--set", "model.patch_size=8"]
    fails_with(run("pretrain", "--out", out, *args), "GiB per step")
    assert not out.exists()
    result = run("pretrain", "--dry-run", "--no-estimate", *args)  # a dry run shows the config and warns
    assert result.exit_code == 0 and "Warning:" in result.output and "GiB" in result.output


def test_unwritable_out_and_probe_json(done_run, tmp_path):
    # a permission refusal is the system's (exit 1, as the README says), not a usage error
    fails_with(run("pretrain", "--out", "/proc/d2v-run", *tiny_cli_args()), "not writable", code=1)
    (tmp_path / "f").write_text("")
    fails_with(run("pretrain", "--out", tmp_path / "f", *tiny_cli_args()), "is a file")
    fails_with(run("probe", done_run, "--json", "/proc/none/probe.json"), "does not exist")
    fails_with(run("probe", done_run, "--json", tmp_path), "is a directory")


def test_partial_metrics_line_and_wrong_type_in_config(tmp_path):
    out = tmp_path / "run"
    pretrain(tiny_config(**{"run.steps": 8, "run.checkpoint_every": 4}), out=out, progress=False)
    import shutil

    shutil.rmtree(out / "checkpoints" / "step_00000008")
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 9, "lo')  # cut by a crash
    result = run("pretrain", "--out", out, "--resume", "--no-progress")
    assert result.exit_code == 0, result.output
    steps = [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 9))
    cfg = json.loads((out / "config.json").read_text())
    cfg["run"]["steps"] = "many"
    (out / "config.json").write_text(json.dumps(cfg))
    fails_with(run("pretrain", "--out", out, "--resume"), "run.steps expects an integer")


def test_embed_converts_uint8_and_load_encoder_without_gpu(done_run, tmp_path):
    import d2v

    assert run("export", "checkpoint", done_run, "--out", tmp_path / "enc", "--no-hf").exit_code == 0
    enc = d2v.load_encoder(tmp_path / "enc")
    u8 = torch.randint(0, 256, (3, 1, 8, 8), dtype=torch.uint8)
    torch.testing.assert_close(enc.embed(u8), enc.embed(u8.float() / 255))
    with pytest.raises(TypeError, match="uint8"):
        enc.embed(u8.long())
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="no CUDA device"):
            d2v.load_encoder(tmp_path / "enc", device="cuda")


def test_square_brackets_in_messages_are_printed(tmp_path):
    result = run("pretrain", "--data", str(tmp_path / "[missing]"), "--dry-run")
    fails_with(result, "[missing]")


# Friction


def test_plain_progress_lines_when_not_a_terminal(tmp_path):
    args = tiny_cli_args()
    args.remove("--no-progress")
    result = run("pretrain", "--out", tmp_path / "run", *args)
    assert result.exit_code == 0, result.output
    lines = [x for x in result.output.splitlines() if x.startswith("step ")]
    assert lines and lines[-1].startswith("step 8/8") and "loss" in lines[-1] and "nan" not in lines[0]


def test_help_at_80_columns_shows_whole_option_names():
    result = run("pretrain", "--help", env={"COLUMNS": "80", "TERM": "dumb"})
    assert result.exit_code == 0
    assert "<bool>" not in result.output
    for name in ("--checkpoint-every", "--skip-bad-files", "--num-workers", "--no-progress", "--dry-run"):
        assert name in result.output, name
    assert max(len(line) for line in result.output.splitlines()) <= 80


def test_fp16_on_cpu_warns(tmp_path):
    result = run("pretrain", "--out", tmp_path / "run", "--precision", "fp16", "--device", "cpu",
                 *tiny_cli_args()[:-1], "--set", "run.steps=1", "--no-progress")
    assert result.exit_code == 0 and "bf16" in result.output, result.output


def test_user_errors_all_subclass_user_error():
    from d2v.train import DivergedError

    assert issubclass(DivergedError, UserError) and DivergedError.exit_code == 3


@pytest.mark.parametrize("args, flag", [
    (["probe", "ENC", "--max-train", "-1000"], "--max-train"),  # negative slicing trained on 258 items
    (["probe", "ENC", "--seed", "-1"], "--seed"),
    (["finetune", "ENC", "--steps", "-1"], "--steps"),
    (["finetune", "ENC", "--batch-size", "0"], "--batch-size"),
    (["finetune", "ENC", "--seed", "-3"], "--seed"),
    (["finetune", "ENC", "--epochs", "1e300"], "--epochs"),
    (["pretrain", "--dry-run", "--steps", "0"], "--steps"),
    (["pretrain", "--dry-run", "--grad-accum", "0"], "--grad-accum"),
    (["pretrain", "--dry-run", "--num-workers", "-2"], "--num-workers"),
    (["pretrain", "--dry-run", "--eval-every", "-1"], "--eval-every"),
    (["pretrain", "--dry-run", "--checkpoint-every", "-1"], "--checkpoint-every"),
    (["pretrain", "--dry-run", "--nproc-per-node", "0"], "--nproc-per-node"),
])
def test_every_count_flag_is_range_checked_in_one_sentence(tmp_path, args, flag):
    """Issue 25, item 7: a count out of range is one `Error:` line naming the flag (exit 2), before any work."""
    args = [str(tmp_path / "enc") if a == "ENC" else a for a in args]
    result = run(*args, *(["--out", tmp_path / "out"] if args[0] == "finetune" else []))
    fails_with(result, flag)
    assert result.output.count("Error:") == 1 and "Usage:" not in result.output
    assert not (tmp_path / "out").exists()


def test_num_workers_minus_one_is_automatic_as_the_config_says():
    assert run("pretrain", "--dry-run", "--num-workers", "-1").exit_code == 0


@pytest.mark.parametrize("modality, option, owner", [
    ("speech", ["--image-size", "32"], "vision"),  # was "unknown config field 'model.image_size'"
    ("speech", ["--vocab-size", "5000"], "text"),  # was accepted silently
    ("vision", ["--vocab-size", "5000"], "text"),
    ("vision", ["--doc-per-line"], "text"),
    ("speech", ["--tokenizer", "tok.json"], "text"),
    ("text", ["--image-size", "32"], "vision"),
    ("vision", ["--set", "data.crop_seconds=3"], "speech"),
    ("text", ["--set", "model.conv_dim=[16]"], "speech"),
    ("speech", ["--set", "model.patch_size=4"], "vision"),
])
def test_a_flag_of_another_modality_is_one_error_naming_both(modality, option, owner):
    """Issue 25, item 11."""
    result = run("pretrain", "--modality", modality, *option, "--dry-run")
    fails_with(result, f"applies to {owner} only; this run pretrains {modality}")
    assert result.output.count("Error:") == 1


def _image_classes(root, bad: dict[str, bytes]):
    from PIL import Image

    rng = np.random.default_rng(0)
    for i in range(24):
        d = root / f"c{i % 2}"
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((8, 8), 40 + 170 * (i % 2), np.uint8) + rng.integers(0, 20, (8, 8), dtype=np.uint8)
                        ).save(d / f"img{i:03d}.png")
    for name, data in bad.items():
        (root / name).write_bytes(data)
    return root


@pytest.mark.parametrize("command", ["probe", "finetune"])
def test_probe_and_finetune_skip_bad_files_as_pretrain_does(done_run, tmp_path, command):
    """Issue 25, items 5 and 13: the error suggests --skip-bad-files, and the command has it; the files left out
    are named (finetune: all of them in RUN/skipped_files.tsv, path and reason)."""
    bad = {"c0/zz_broken.png": b"\x89PNG\r\n\x1a\n garbage", "c1/zz_empty.png": b""}
    folder = _image_classes(tmp_path / "imgs", bad)
    extra = ["--out", tmp_path / "ft", "--steps", "2", "--head-epochs", "1", "--batch-size", "8"] \
        if command == "finetune" else []
    result = run(command, done_run, "--data", folder, *extra)
    fails_with(result, "--skip-bad-files")
    assert "broken.png" in result.output or "empty.png" in result.output
    if command == "finetune":
        import shutil

        shutil.rmtree(tmp_path / "ft", ignore_errors=True)
    result = run(command, done_run, "--data", folder, *extra, "--skip-bad-files")
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert "Skipped files: 2 (" in text and "zz_broken.png" in text and "zz_empty.png" in text
    if command == "finetune":
        rows = (tmp_path / "ft" / "skipped_files.tsv").read_text().splitlines()
        assert rows[0] == "path\treason" and len(rows) == 3
        assert {r.split("\t")[0].rsplit("/", 2)[-2] + "/" + r.split("\t")[0].rsplit("/", 1)[-1] for r in rows[1:]} \
            == set(bad) and all(r.split("\t")[1] for r in rows[1:])


def test_every_skip_bad_files_suggestion_names_a_flag_of_that_command():
    """Issue 25, item 5: each command that loads a user's files and can say "pass --skip-bad-files" has the flag."""
    for command in ("pretrain", "probe", "finetune"):
        assert "--skip-bad-files" in runner.invoke(app, [command, "--help"], terminal_width=200).output


def test_pretrain_names_its_skipped_files_in_the_summary_and_the_run_directory(tmp_path):
    """Issue 25, item 13: skipped files are listed (path, reason) in RUN/skipped_files.tsv and the first few are
    named in the summary; a run without skipped files writes no list."""
    bad = {f"c{i % 2}/img{i:03d}.png": b"\x89PNG\r\n\x1a\n garbage" for i in (3, 8, 13, 18, 21)}
    folder = _image_classes(tmp_path / "imgs", bad)
    result = run("pretrain", "--data", folder, "--image-size", "8", *tiny_cli_args(), "--out", tmp_path / "r",
                 "--skip-bad-files", "--steps", "4", "--num-workers", "1")
    assert result.exit_code == 0, result.output
    rows = (tmp_path / "r" / "skipped_files.tsv").read_text().splitlines()
    assert rows[0] == "path\treason"
    paths = [r.split("\t")[0] for r in rows[1:]]
    assert {p.rsplit("/", 2)[-2] + "/" + p.rsplit("/", 1)[-1] for p in paths} == set(bad)
    assert all("cannot" in r.split("\t")[1] for r in rows[1:])
    text = "".join(result.output.replace("│", " ").split())  # the summary table folds long cells
    assert "5(" in text and "and2more" in text and "skipped_files.tsv" in text
    assert sum(p.replace(" ", "") in text for p in paths) == 3
    assert not list((tmp_path / "r").glob("*.tmp*"))
    clean = run("pretrain", "--data", _image_classes(tmp_path / "ok", {}), "--image-size", "8", *tiny_cli_args(),
                "--out", tmp_path / "r2", "--steps", "2")
    assert clean.exit_code == 0 and not (tmp_path / "r2" / "skipped_files.tsv").exists()


def test_collapse_warning_is_said_once_and_not_also_a_python_warning():
    """Issue 25, item 14: the collapse warning was printed twice, once as a UserWarning with file and line."""
    import warnings

    from d2v.train import Health

    cfg = tiny_config()
    said = []
    health = Health(cfg, model=None, say=said.append, main=True)
    record = {"step": cfg.run.steps, "loss": 0.5, "target_std": 0.01, "pred_std": 0.5}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        health.check(record)
        health.check({**record, "step": record["step"] + 1})
    assert not caught, [str(w.message) for w in caught]
    assert len(said) == 1 and said[0].startswith("Warning: representation collapse suspected")
