"""The d2v command line as a user drives it: pretrain -> export -> load_encoder / probe, and every error path
(one sentence, non-zero exit, no traceback)."""
import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from conftest import TINY_OVERRIDES, tiny_cli_args
from d2v.cli import app

runner = CliRunner()


def run(*args):
    result = runner.invoke(app, [str(a) for a in args])
    assert "Traceback" not in result.output, result.output
    return result


def fails_with(result, text):
    assert result.exit_code == 2, result.output
    assert "Error:" in result.output and text in result.output, result.output


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "run"
    result = run("pretrain", "--modality", "vision", "--out", out, *tiny_cli_args())
    assert result.exit_code == 0, result.output
    assert "pretrain summary" in result.output and "samples/s" in result.output
    return out


def test_pretrain_export_load_probe(run_dir, tmp_path):
    import d2v

    out = tmp_path / "enc"
    result = run("export", "checkpoint", run_dir, "--out", out)
    assert result.exit_code == 0, result.output
    enc = d2v.load_encoder(out)
    assert not enc.training
    images = torch.rand(5, 1, 8, 8)
    assert enc(images).shape == (5, 17, 32) and enc.embed(images).shape == (5, 32)
    # The exported encoder is the run's student, weight for weight.
    from safetensors.torch import load_file

    ckpt = load_file(str(run_dir / "checkpoints" / "step_00000008" / "model.safetensors"))
    for name, value in enc.state_dict().items():
        assert torch.equal(value, ckpt[f"student.{name}"]), name
    # The Hugging Face directory loads in transformers and gives the same hidden states.
    transformers = pytest.importorskip("transformers")
    hf = transformers.Data2VecVisionModel.from_pretrained(out / "hf").eval()
    with torch.no_grad():
        want = hf(pixel_values=(images - enc.pixel_mean) / enc.pixel_std).last_hidden_state
    torch.testing.assert_close(enc(images), want, atol=1e-5, rtol=1e-4)
    # As the README shows it: the exported image processor does resize, rescale and the run's normalization.
    from PIL import Image

    u8 = (np.random.default_rng(0).random((3, 8, 8)) * 255).astype(np.uint8)
    processor = transformers.AutoImageProcessor.from_pretrained(out / "hf")
    inputs = processor(images=[Image.fromarray(a, mode="L") for a in u8], return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(hf(**inputs).last_hidden_state, enc(torch.from_numpy(u8)[:, None]),
                                   atol=1e-5, rtol=1e-4)

    js = tmp_path / "probe.json"
    result = run("probe", out, "--data", "digits", "--json", js)
    assert result.exit_code == 0, result.output
    assert "test accuracy" in result.output
    probe = json.loads(js.read_text())
    assert 0.0 <= probe["accuracy"] <= 1.0 and probe["n_classes"] == 10
    blocks = min(4, enc.cfg.depth)  # images: the last 4 blocks by default (DINO's protocol)
    assert probe["blocks"] == blocks and probe["feature_dim"] == 32 * blocks
    assert f"the last {blocks} blocks" in result.output or blocks == 1
    result = run("probe", out, "--data", "digits", "--blocks", "1", "--json", js)
    assert result.exit_code == 0 and json.loads(js.read_text())["feature_dim"] == 32
    assert "the last hidden states" in result.output
    fails_with(run("probe", out, "--blocks", str(enc.cfg.depth + 1)), f"encoder's {enc.cfg.depth} blocks")
    fails_with(run("probe", out, "--data", "mr", "--blocks", "2"), "mr and trec read the last hidden states")
    assert run("probe", out, "--random-init", "--max-train", "300").exit_code == 0


def test_teacher_export_differs(run_dir, tmp_path):
    import d2v

    run("export", "checkpoint", run_dir, "--out", tmp_path / "s", "--no-hf")
    run("export", "checkpoint", run_dir, "--out", tmp_path / "t", "--weights", "teacher", "--no-hf")
    s, t = d2v.load_encoder(tmp_path / "s"), d2v.load_encoder(tmp_path / "t")
    assert not torch.equal(s.blocks[0].mlp.fc1.weight, t.blocks[0].mlp.fc1.weight)
    assert not (tmp_path / "s" / "hf").exists()


def test_dry_run_prints_resolved_config(tmp_path):
    result = run("pretrain", "--dry-run", "--out", tmp_path / "x")
    assert result.exit_code == 0, result.output
    cfg = json.loads(result.stdout)
    assert cfg["preset"] == "tiny" and cfg["model"]["image_size"] == 8 and cfg["model"]["patch_size"] == 2
    assert cfg["model"]["pixel_mean"] and not (tmp_path / "x").exists()


def test_presets_follow_spec():
    # v1's base and large (SPEC.md); v2's follow the reference's v2 configs (tests/test_recipes.py)
    result = run("pretrain", "--preset", "base", "--recipe", "v1", "--dry-run", "--no-estimate", "--image-size", "32",
                 "--set", "model.patch_size=16")
    cfg = json.loads(result.stdout)  # stderr may carry a memory warning: a base run does not fit this machine
    m, t = cfg["model"], cfg["targets"]
    assert (m["dim"], m["depth"], m["num_heads"], m["ln_eps"]) == (768, 12, 12, 1e-6)
    assert (t["top_k"], t["loss_beta"], t["norm"], t["final_norm"]) == (6, 2.0, "layer", "layer")
    assert round(cfg["mask"]["ratio"] * 196) == 120 and cfg["ema"]["decay"] == 0.9998  # 120 of 196, the recipe and cfg["optim"]["lr"] == 2e-3
    large = json.loads(run("pretrain", "--preset", "large", "--recipe", "v1", "--dry-run", "--no-estimate", "--image-size", "32",
                           "--set", "model.patch_size=16").stdout)["model"]
    assert (large["dim"], large["depth"], large["num_heads"]) == (1024, 24, 16)


def test_npy_and_folder_data(tmp_path):
    from PIL import Image

    arr = (np.random.rand(40, 12, 12) * 255).astype(np.uint8)
    np.save(tmp_path / "x.npy", arr)
    result = run("pretrain", "--data", tmp_path / "x.npy", "--out", tmp_path / "r1", *tiny_cli_args(), "--steps", "2")
    assert result.exit_code == 0, result.output
    folder = tmp_path / "imgs"
    for cls in ("a", "b"):
        (folder / cls).mkdir(parents=True)
        for i in range(6):
            Image.fromarray((np.random.rand(10, 10, 3) * 255).astype(np.uint8)).save(folder / cls / f"{i}.png")
    (folder / "a" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    result = run("pretrain", "--data", folder, "--out", tmp_path / "r2", *tiny_cli_args(), "--steps", "2")
    fails_with(result, "broken.png")
    result = run("pretrain", "--data", folder, "--out", tmp_path / "r2", *tiny_cli_args(), "--steps", "2",
                 "--skip-bad-files")
    assert result.exit_code == 0, result.output
    assert "skipped files" in result.output
    cfg = json.loads((tmp_path / "r2" / "config.json").read_text())
    assert cfg["model"]["in_chans"] == 3 and cfg["model"]["image_size"] == 10
    # A labelled folder works for the probe too (classes = sub-folders).
    result = run("probe", tmp_path / "r2", "--data", folder)
    fails_with(result, "broken.png")


def test_error_paths(run_dir, tmp_path):
    fails_with(run("pretrain", "--data", tmp_path / "nope"), "neither a built-in dataset")
    fails_with(run("pretrain", "--preset", "huge"), "unknown vision preset 'huge'")
    fails_with(run("pretrain", "--resume"), "--resume needs --out")
    fails_with(run("pretrain", "--resume", "--out", tmp_path / "empty"), "no run to resume")
    (tmp_path / "plain").mkdir()
    fails_with(run("pretrain", "--resume", "--out", tmp_path / "plain"), "not a d2v run directory")
    fails_with(run("pretrain", "--out", run_dir, *tiny_cli_args()), "already holds a run")
    fails_with(run("pretrain", "--resume", "--out", run_dir, "--lr", "0.5"), "cannot change when resuming")
    fails_with(run("pretrain", "--steps", "0"), "--steps (run.steps) must be an integer from 1")
    fails_with(run("pretrain", "--set", "optim.nope=1"), "unknown config field")
    fails_with(run("pretrain", "--set", "optim.lr=fast"), "optim.lr expects")
    fails_with(run("pretrain", "--kernels", "cuda", "--out", tmp_path / "k", *tiny_cli_args()), "unavailable")
    if not torch.cuda.is_available():
        fails_with(run("pretrain", "--device", "cuda", "--out", tmp_path / "d", *tiny_cli_args()), "no CUDA device")
    bad_precision = run("pretrain", "--precision", "fp8")
    assert bad_precision.exit_code == 2 and "fp8" in bad_precision.output
    np.save(tmp_path / "bad.npy", np.zeros((3, 5)))
    fails_with(run("pretrain", "--data", tmp_path / "bad.npy"), "must hold images")
    fails_with(run("export", "checkpoint", tmp_path, "--out", tmp_path / "e"), "not a d2v run directory")
    np.save(tmp_path / "unlabelled.npy", np.zeros((10, 8, 8), dtype=np.uint8))
    fails_with(run("probe", run_dir, "--data", tmp_path / "unlabelled.npy"), "has no labels")
    fails_with(run("probe", tmp_path / "missing"), "no config.json")


def test_fashion_mnist_missing_package_is_named(monkeypatch, tmp_path):
    from d2v.data import images

    monkeypatch.setattr(images, "FASHION_MNIST_DIRS", [tmp_path / "none"])
    fails_with(run("pretrain", "--data", "fashion-mnist"), "dataset-fashion-mnist")


def test_resume_of_a_finished_run_says_it_is_complete(run_dir):
    result = run("pretrain", "--resume", "--out", run_dir, "--no-progress")
    assert result.exit_code == 0, result.output  # already at its last step: nothing to do
    assert "is complete" in result.output and "all 8 steps" in result.output and "nan" not in result.output


def test_env_lists_backends():
    result = run("env")
    assert result.exit_code == 0
    assert "torch" in result.output and "op backends" in result.output and "auto on cpu" in result.output


def test_env_names_the_extra_to_install_when_triton_is_missing(monkeypatch):
    """Issue 25, item 12: "pip install 'd2v[triton]'", not "'d2v'" (rich read [triton] as markup)."""
    from d2v.ops import backends

    real = backends.import_optional
    monkeypatch.setattr(backends, "import_optional", lambda name: (None, "ModuleNotFoundError: No module named "
                                                                   f"'{name}'") if name == "triton" else real(name))
    result = run("env")
    assert result.exit_code == 0 and "pip install 'd2v[triton]'" in " ".join(result.output.split()), result.output


def test_probe_on_one_class_says_two_classes_are_needed(run_dir, tmp_path):
    """Issue 25, item 12: a folder whose files all sit in one class folder is not "unlabelled"."""
    import soundfile as sf
    from PIL import Image

    from d2v.data.corpus import load_labelled_text
    from d2v.data.recordings import labelled_split, load_audio
    from d2v.core.errors import DataError

    for i in range(4):
        (tmp_path / "img" / "cat").mkdir(parents=True, exist_ok=True)
        Image.new("L", (8, 8), 40 * i).save(tmp_path / "img" / "cat" / f"{i}.png")
        (tmp_path / "wav" / "yes").mkdir(parents=True, exist_ok=True)
        sf.write(tmp_path / "wav" / "yes" / f"{i}.wav", np.random.default_rng(i).normal(size=8000) * 0.1, 16000)
        (tmp_path / "txt" / "news").mkdir(parents=True, exist_ok=True)
        (tmp_path / "txt" / "news" / f"{i}.txt").write_text(f"document number {i}\n")
    fails_with(run("probe", run_dir, "--data", tmp_path / "img"), "at least two classes")
    with pytest.raises(DataError, match="one class .*'yes'.* at least two classes"):
        labelled_split(load_audio(str(tmp_path / "wav")), "train")
    with pytest.raises(DataError, match="one class .*'news'.* at least two classes"):
        load_labelled_text(str(tmp_path / "txt"), "train", None, 32)
    (tmp_path / "img" / "loose.png").write_bytes((tmp_path / "img" / "cat" / "0.png").read_bytes())
    fails_with(run("probe", run_dir, "--data", tmp_path / "img"), "one sub-folder per class")  # truly unlabelled


@pytest.mark.parametrize("command", [["probe"], ["finetune"], ["export", "checkpoint"], ["export", "onnx"], ["embed"],
                                     ["predict"], ["plot"], ["bench", "text-ceiling"]])
def test_usage_lines_name_arguments_in_capitals(command):
    """`Usage: d2v probe [OPTIONS] PATH`, not typer's `{path}`."""
    usage = next(line for line in run(*command, "--help").output.splitlines() if line.startswith("Usage:"))
    assert "{" not in usage and "}" not in usage, usage
    assert usage.split()[-1].rstrip(".").isupper(), usage


def test_python_m_d2v_in_a_checkout_leaves_the_kernels_name_to_transformers():
    """`python -m d2v` from the repository root: the top-level kernels/ folder (d2v.kernels) must not shadow the
    `kernels` package transformers imports."""
    pytest.importorskip("transformers")
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    code = ("import runpy\ntry:\n    runpy.run_module('d2v', run_name='__main__')\nexcept SystemExit:\n    pass\n"
            "import transformers.integrations.hub_kernels\nprint('imported')")
    proc = subprocess.run([sys.executable, "-c", code, "--version"], cwd=root, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0 and "imported" in proc.stdout, proc.stderr[-2000:]


def test_version_and_suggestions_for_a_mistyped_command():
    import d2v

    result = run("--version")
    assert result.exit_code == 0 and result.output.strip() == f"d2v {d2v.__version__}"
    fails_with(run("export", "runs/x"), "Did you mean: root export checkpoint runs/x")  # CliRunner calls it root
    fails_with(run("export", "runs/x", "--out", "enc"), "export checkpoint runs/x --out enc")
    fails_with(run("data", "./wavs", "--modality", "speech"), "data check --data ./wavs --modality speech")
    fails_with(run("export", "chekpoint", "runs/x"), "Did you mean 'checkpoint'?")
    fails_with(run("pretrian"), "Did you mean 'pretrain'?")
    assert "checkpoint" in run("export", "--help").output and "check" in run("data", "--help").output


@pytest.mark.parametrize("modality, default", [("vision", "v2"), ("speech", "v2"), ("text", "v1")])
def test_default_recipe_per_modality_and_v1_one_flag_away(modality, default, tmp_path):
    # Without --recipe a new run gets the recipe that wins on the modality's probes (README, Measured).
    from d2v.core.presets import DEFAULT_RECIPE

    assert DEFAULT_RECIPE[modality] == default
    plain = run("pretrain", "--modality", modality, "--dry-run", "--no-estimate", "--out", tmp_path / "a")
    assert plain.exit_code == 0, plain.output
    cfg = json.loads(plain.stdout)
    assert cfg["recipe"] == default and (cfg["mask"]["clones"] > 1) == (default == "v2")  # v2: masked clones
    v1 = json.loads(run("pretrain", "--modality", modality, "--recipe", "v1", "--dry-run", "--no-estimate",
                        "--out", tmp_path / "b").stdout)
    assert v1["recipe"] == "v1" and v1["mask"]["clones"] == 1


def test_resume_and_init_from_keep_the_encoders_recipe(tmp_path):
    # A run started with --recipe v1 (as every vision run before v2 became the default) resumes as v1 without
    # --recipe, and a default (v2) vision run resumes as v2; naming the other recipe is refused.
    for recipe, flags in (("v1", ["--recipe", "v1"]), ("v2", [])):
        out = tmp_path / recipe
        shrunk = [a for key, value in TINY_OVERRIDES.items() if key != "run.steps" for a in ("--set", f"{key}={value}")]
        started = run("pretrain", "--modality", "vision", "--out", out, *flags, *shrunk, "--steps", "2", "--no-progress")
        assert started.exit_code == 0, started.output
        result = run("pretrain", "--resume", "--out", out, "--steps", "3", "--no-progress")
        assert result.exit_code == 0, result.output
        saved = json.loads((out / "config.json").read_text())
        assert saved["recipe"] == recipe and saved["run"]["steps"] == 3
        assert (out / "checkpoints" / "step_00000003").is_dir()
        other = "v2" if recipe == "v1" else "v1"
        fails_with(run("pretrain", "--resume", "--out", out, "--recipe", other), "--recipe cannot change")
        # A new run from this encoder without --recipe trains under the recipe its architecture needs.
        new = run("pretrain", "--init-from", out, "--set", "targets.top_k=2", "--dry-run", "--no-estimate",
                  "--out", tmp_path / f"new-{recipe}")  # top_k: the 2-block encoder's
        assert new.exit_code == 0, new.output
        assert json.loads(new.stdout)["recipe"] == recipe
