"""`d2v bench kernels --quick` runs in seconds on the CPU and writes JSON rows with every reported field."""
import json

import pytest
import torch
from typer.testing import CliRunner

from d2v.bench.cli import app
from d2v.bench.kernels import run, vit_param_shapes

ROW_FIELDS = {"op", "case", "impl", "median_ms", "bytes", "gbps", "pct_copy", "speedup_vs_eager", "speedup_vs_compile"}


@pytest.mark.triton
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def test_quick_benchmark_writes_json(tmp_path, device):
    """On the CPU the Triton row comes from the interpreter (conftest sets it when there is no GPU)."""
    out = tmp_path / "bench.json"
    interpreted = device == "cpu" and not torch.cuda.is_available()
    extra = ["--include-interpreter"] if interpreted else []
    result = CliRunner().invoke(app, ["kernels", "--quick", "--device", device, *extra, "--json", str(out)])
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    assert data["meta"]["device"] == device and data["meta"]["copy_gbps"] > 0
    rows = data["rows"]
    assert all(ROW_FIELDS <= set(r) for r in rows)
    assert {r["op"] for r in rows} == {"targets", "ema", "loss"}
    impls = {r["impl"] for r in rows}
    assert {"reference", "torch", "foreach_lerp"} <= impls
    assert ("triton" in impls) == (interpreted or device == "cuda")
    assert all(r["median_ms"] > 0 and r["bytes"] > 0 for r in rows)
    assert all(r["speedup_vs_eager"] is not None for r in rows)


def test_interpreter_is_never_timed_unless_asked():
    data = run(quick=True, device="cpu", ops=("loss",), runs=1)
    assert "triton" not in {r["impl"] for r in data["rows"]}
    assert any(s["impl"] == "triton" for s in data["skipped"])


def test_unavailable_device_is_one_clear_error():
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    result = CliRunner().invoke(app, ["kernels", "--quick", "--device", "cuda"])
    assert result.exit_code == 2 and "no CUDA device" in result.output


def test_vit_parameter_counts():
    """The EMA cases really are ViT-B (86M) and ViT-L (304M) parameter sets."""
    count = lambda shapes: sum(torch.Size(s).numel() for s in shapes)  # noqa: E731
    assert 85e6 < count(vit_param_shapes(768, 12, 3072)) < 87e6
    assert 302e6 < count(vit_param_shapes(1024, 24, 4096)) < 305e6


def test_jsonl_rows_are_written_as_measured(tmp_path):
    """--jsonl appends a meta line, then one line per measured row (what bench/gpu_session.sh collects)."""
    out = tmp_path / "rows.jsonl"
    args = ["kernels", "--quick", "--device", "cpu", "--ops", "ema", "--case", "bf16", "--runs", "1",
            "--jsonl", str(out)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert lines[0]["kind"] == "meta" and lines[0]["copy_gbps"] > 0 and lines[0]["auto"] in ("cpu", "torch")
    rows = [r for r in lines if r["kind"] == "row"]
    assert rows and all(r["op"] == "ema" and "bf16" in r["case"] for r in rows)
    assert all(r["speedup_vs_foreach"] is not None for r in rows)
    CliRunner().invoke(app, args)  # a second step appends: earlier rows are kept
    assert len(out.read_text().splitlines()) > len(lines)


def test_text_ceiling_word_vectors_follow_cooccurrence():
    """PPMI + SVD puts tokens that share contexts together: two disjoint 'topics' of tokens, each sequence drawn from
    one topic, give vectors whose within-topic cosine beats the cross-topic one; the mean embedding divides by the
    token count and leaves empty rows at zero."""
    import numpy as np

    from d2v.bench.text_ceiling import counts, mean_embedding, ppmi_svd

    rng = np.random.default_rng(int(torch.randint(0, 2**31 - 1, ()).item()))
    vocab, topics = 12, [np.arange(0, 6), np.arange(6, 12)]
    sequences = [rng.choice(topics[i % 2], size=int(rng.integers(8, 30))) for i in range(400)]
    vectors = ppmi_svd(sequences, vocab, dim=4)
    assert vectors.shape == (vocab, 4)
    unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    cos = unit @ unit.T
    same = np.mean([cos[i, j] for t in topics for i in t for j in t if i != j])
    cross = np.mean([cos[i, j] for i in topics[0] for j in topics[1]])
    assert same > cross + 0.5
    bow = counts([np.array([0, 0, 3]), np.array([], dtype=np.int64)], vocab)
    assert bow[0, 0] == 2 and bow[0, 3] == 1 and bow.sum() == 3
    pooled = mean_embedding(bow, vectors)
    assert np.allclose(pooled[0], (2 * vectors[0] + vectors[3]) / 3) and np.allclose(pooled[1], 0)


def test_text_ceiling_errors_are_one_line(tmp_path):
    """A missing export, a vision export and bad --dims: one error line and a non-zero exit, nothing else run."""
    from conftest import tiny_config

    from d2v.export import export_checkpoint
    from d2v.train import pretrain

    result = CliRunner().invoke(app, ["text-ceiling", str(tmp_path / "missing")])
    assert result.exit_code == 1 and "error" in result.output
    pretrain(tiny_config(**{"run.steps": 1}), out=tmp_path / "run", progress=False)
    export_checkpoint(tmp_path / "run", tmp_path / "enc", hf=False)
    result = CliRunner().invoke(app, ["text-ceiling", str(tmp_path / "enc")])
    assert result.exit_code == 1 and "vision encoder; give d2v text exports" in result.output
    result = CliRunner().invoke(app, ["text-ceiling", str(tmp_path / "enc"), "--dims", "12x"])
    assert result.exit_code == 2 and "--dims" in result.output


def test_sweep_probes_every_checkpoint_of_every_run(tmp_path):
    """Two tiny runs in parallel: one JSON line each, a probe per checkpoint and weights; a failing run is recorded
    without losing the other's result, and the exit code says something failed."""
    spec = [{"name": "a", "modality": "vision", "steps": 2, "checkpoints": 2, "probe": "digits", "max_train": 200,
             "weights": ["student", "teacher"], "set": ["run.batch_size=8"]},
            {"name": "bad", "modality": "vision", "steps": 1, "probe": "digits", "set": ["no.such_key=1"]}]
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    result = CliRunner().invoke(app, ["sweep", str(tmp_path / "spec.json"), "--out", str(tmp_path / "w"),
                                      "--parallel", "2"])
    assert result.exit_code == 1, result.output
    records = {r["name"]: r for r in map(json.loads, (tmp_path / "w" / "sweep.jsonl").read_text().splitlines())}
    assert set(records) == {"a", "bad"} and "no.such_key" in records["bad"]["error"]
    rows = records["a"]["rows"]
    assert [r["step"] for r in rows] == [1, 2]
    assert all(0.0 <= r[w] <= 1.0 for r in rows for w in ("student", "teacher"))
    again = CliRunner().invoke(app, ["sweep", str(tmp_path / "spec.json"), "--out", str(tmp_path / "w")])
    assert again.exit_code == 1 and "already holds runs named a;" in again.output
    assert len((tmp_path / "w" / "sweep.jsonl").read_text().splitlines()) == 2  # nothing appended, nothing run


@pytest.mark.parametrize("spec, message", [
    ("not json", "cannot read the sweep spec"),
    ("[]", "non-empty JSON list"),
    ('[{"name": "a", "modality": "vision", "steps": 1}]', "missing keys ['probe']"),
    ('[{"name": "a b", "modality": "vision", "steps": 1, "probe": "digits"}]', "must be unique"),
    ('[{"name": "a", "modality": "vision", "steps": 0, "probe": "digits"}]', "positive integer"),
    ('[{"name": "a", "modality": "vision", "steps": 1, "probe": "digits", "weights": ["ema"]}]', "weights"),
    ('[{"name": "a", "modality": "vision", "steps": 1, "probe": "digits", "lr": 1}]', "unknown keys ['lr']"),
])
def test_sweep_spec_errors_are_one_line(tmp_path, spec, message):
    (tmp_path / "spec.json").write_text(spec)
    result = CliRunner().invoke(app, ["sweep", str(tmp_path / "spec.json"), "--out", str(tmp_path / "w")])
    assert result.exit_code == 1 and message in result.output and not (tmp_path / "w").exists()


def test_recipes_seeds_set_each_pair_and_means_count_pairs_that_never_reach(tmp_path, monkeypatch):
    from d2v.bench import recipes

    calls = []
    # v1 ends at 0.9 (wall 100 s); v2 of seed 3 reaches it at 30 s, v2 of seed 5 never does
    curves = {("v1", 3): [0.8, 0.9], ("v2", 3): [0.85, 0.92], ("v1", 5): [0.7, 0.9], ("v2", 5): [0.8, 0.88]}

    def fake_pretrain(recipe, modality, args, out, checkpoints, steps, threads):
        seed = int(args[args.index("--set") + 1].split("=")[1])
        calls.append((recipe, seed))
        out.mkdir(parents=True)
        (out / "metrics.jsonl").write_text('{"samples_per_s": 5.0}\n')
        return 0.0, 100.0

    def fake_probe(run, t0, probe_data, max_train, holdout, work):
        recipe, seed = calls[-1]
        walls = (50.0, 100.0) if recipe == "v1" else (15.0, 30.0)
        return [{"step": i + 1, "wall_s": w, "accuracy": a} for i, (w, a) in enumerate(zip(walls, curves[calls[-1]]))]

    monkeypatch.setattr(recipes, "_pretrain", fake_pretrain)
    monkeypatch.setattr(recipes, "_probe_checkpoints", fake_probe)
    monkeypatch.setattr(recipes, "_last", lambda run: "step_2")
    monkeypatch.setattr("d2v.probe.probe_path", lambda *a, **k: type("R", (), {"accuracy": 0.5})())
    result = recipes.run("speech", "spoken-digits", checkpoints=2, seeds=[3, 5])
    assert calls == [("v1", 3), ("v2", 3), ("v1", 5), ("v2", 5)]
    assert [r["seed"] for r in result["records"]] == [3, 3, 5, 5]
    first, second = result["summaries"]
    assert first["time_ratio"] == pytest.approx(100 / 30) and first["v2_wall_s_to_v1_accuracy"] == 30.0
    assert second["time_ratio"] is None and second["v2_best_accuracy_within_v1_wall"] == 0.88
    mean = result["mean"]
    assert mean["pairs"] == 2 and mean["v2_reached"] == 1
    assert mean["time_ratio"] == pytest.approx(100 / 30)  # over the pairs that reach
    assert mean["v2_final_accuracy"] == pytest.approx((0.92 + 0.88) / 2)


@pytest.mark.parametrize("seeds", ["1,x", "-1", ","])
def test_recipes_bad_seeds_are_one_line(seeds):
    result = CliRunner().invoke(app, ["recipes", "--probe-data", "fashion-mnist", "--seeds", seeds])
    assert result.exit_code == 2 and "--seeds" in result.output and "Traceback" not in result.output
