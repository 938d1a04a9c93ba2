"""What issue 28's GPU session runs, checked where no GPU is: `d2v bench step` and its largest-batch search,
`d2v bench sdpa`, the peer's GPU config, and bench/gpu_session.sh's plan in its dry mode (tiny shapes on the CPU)."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from d2v.cli import app

ROOT = Path(__file__).resolve().parents[1]


def test_bench_step_reports_flops_and_memory(tmp_path):
    out = tmp_path / "step.json"
    result = CliRunner().invoke(app, ["bench", "step", "--modality", "text", "--recipe", "v2", "--device", "cpu",
                                      "--steps", "2", "--warmup", "1", "--batch-size", "4", "--set",
                                      "run.activation_checkpointing=all", "--json", str(out)])
    assert result.exit_code == 0, result.output
    r = json.loads(out.read_text())["result"]
    assert r["batch"] == 4 and r["precision"] == "fp32" and r["activation_checkpointing"] == "all"
    assert r["gflop_per_update"] > 0 and r["tflop_per_s"] > 0 and r["samples_per_s"] > 0
    assert r["mfu"] is None and r["peak_memory_mb"] > 0  # no peak rate for a CPU; its resident set peak
    parts = r["flops_parts"]
    assert parts["total"] == pytest.approx(sum(v for k, v in parts.items() if k != "total"))


def test_bench_step_usage_errors_are_one_line():
    result = CliRunner().invoke(app, ["bench", "step", "--device", "cpu", "--set", "run.activation_checkpointing=x"])
    assert result.exit_code == 2 and "activation_checkpointing" in result.output and "Traceback" not in result.output
    result = CliRunner().invoke(app, ["bench", "step", "--device", "cpu", "--max-batch"])
    assert result.exit_code == 2 and "GPU" in result.output


def test_largest_batch_search_predicts_then_lowers():
    from d2v.bench.step import config, largest_batch

    cfg = config("vision", "tiny", "v1", 8, "cpu", None)
    limit, fixed, per = 10_000, 1_000, 30  # a device of 10000 bytes: 300 samples fit
    seen = []

    def attempt(count):  # the real allocator needs a little more than the linear model near the limit
        seen.append(count)
        need = fixed + per * count + (400 if count > 290 else 0)
        return need if need <= limit else None

    result = largest_batch(cfg, (8, 16), limit, attempt=attempt)
    assert result["predicted"] == int(16 + (0.97 * limit - (fixed + 16 * per)) / per)
    assert result["largest"] <= 290 and result["largest"] >= 0.9 * 290
    assert seen[:2] == [8, 16] and all(t["fits"] == (t["batch"] <= 290) for t in result["tries"])


def test_bench_sdpa_names_a_kernel_for_every_encoder(tmp_path):
    out = tmp_path / "sdpa.json"
    result = CliRunner().invoke(app, ["bench", "sdpa", "--device", "cpu", "--precision", "fp32", "--preset", "tiny",
                                      "--crop-seconds", "1", "--json", str(out)])
    assert result.exit_code == 0, result.output
    rows = json.loads(out.read_text())["rows"]
    assert len(rows) == 6
    for r in rows:
        assert r["student"] and r["teacher"], r  # one of the named SDPA backends ran in each pass
        assert set(r["student"] + r["teacher"]) <= {"flash", "efficient", "cudnn", "cpu-flash", "math",
                                                    "overrideable"}


def test_peer_gpu_config_is_vit_b16(tmp_path):
    from d2v.bench.peer import CONFIG_GPU, CONFIG_GPU_V2, d2v_args, write_images

    data = write_images(tmp_path / "images.npy", n=4, size=224)
    for recipe, c in (("v1", CONFIG_GPU), ("v2", CONFIG_GPU_V2)):
        args = d2v_args(12, data, recipe, "cuda:0")
        assert args[args.index("--device") + 1] == "cuda:0" and args[args.index("--precision") + 1] == "bf16"
        # resolve the config as the GPU run would (a dry run needs no GPU)
        args[args.index("--device") + 1] = "cpu"
        result = CliRunner().invoke(app, ["pretrain", *args, "--dry-run", "--no-estimate",
                                          "--out", str(tmp_path / recipe)])
        assert result.exit_code == 0, result.output
        cfg = json.loads(result.stdout[result.stdout.index("{"):])
        m = cfg["model"]
        assert (m["image_size"], m["patch_size"], m["dim"], m["depth"], m["num_heads"]) == (224, 16, 768, 12, 12)
        assert cfg["run"]["batch_size"] == c["batch"] and cfg["targets"]["top_k"] == c["top_k"]
        assert m["drop_path"] == 0 and m["attention_dropout"] == 0  # birder's step has neither
        if recipe == "v2":
            assert cfg["mask"]["clones"] == c["clones"] and cfg["decoder"]["depth"] == c["decoder_layers"]


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None, reason="needs bash and timeout")
def test_gpu_session_scale_plan_runs_dry_on_the_cpu(tmp_path):
    """GPU_PLAN=scale DRY=1: every step of the issue-28 plan on tiny shapes on the CPU, each producing its files."""
    env = {**os.environ, "GPU_PLAN": "scale", "DRY": "1", "PYTHON": sys.executable, "PYTHONUNBUFFERED": "1"}
    out = tmp_path / "out"
    proc = subprocess.run(["bash", str(ROOT / "bench" / "gpu_session.sh"), str(out), "900"], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=1200)
    steps = [json.loads(line) for line in (out / "steps.jsonl").read_text().splitlines()]
    failed = [s for s in steps if s["rc"] != 0 and s["step"] not in ("env", "install-py")]
    assert not failed, (failed, proc.stdout[-3000:], [(out / f"{s['step']}.log").read_text()[-1500:] for s in failed])
    names = {s["step"] for s in steps}
    assert {"scale-steps", "scale-fit", "scale-sdpa", "scale-peer", "scale-data"} <= names
    rows = [json.loads(line) for line in (out / "scale.jsonl").read_text().splitlines()]
    kinds = {r["kind"] for r in rows}
    assert {"step", "fit", "sdpa", "peer", "loader"} <= kinds, kinds
