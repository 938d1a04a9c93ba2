"""`d2v bench kernels --quick` runs in seconds on the CPU and writes JSON rows with every reported field; `d2v bench
text-diagnosis` trains both arms and measures what features and targets encode."""
import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from d2v.bench.kernels import run, vit_param_shapes
from d2v.cli import app as d2v_app


def bench(args: list[str]):
    """`d2v bench ARGS` through the d2v command (its error rules apply)."""
    return CliRunner().invoke(d2v_app, ["bench", *args])


ROW_FIELDS = {"op", "case", "impl", "median_ms", "bytes", "gbps", "pct_copy", "speedup_vs_eager", "speedup_vs_compile"}


@pytest.mark.triton
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def test_quick_benchmark_writes_json(tmp_path, device):
    """On the CPU the Triton row comes from the interpreter (conftest sets it when there is no GPU)."""
    out = tmp_path / "bench.json"
    interpreted = device == "cpu" and not torch.cuda.is_available()
    extra = ["--include-interpreter"] if interpreted else []
    result = bench(["kernels", "--quick", "--device", device, *extra, "--json", str(out)])
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
    result = bench(["kernels", "--quick", "--device", "cuda"])
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
    result = bench(args)
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert lines[0]["kind"] == "meta" and lines[0]["copy_gbps"] > 0 and lines[0]["auto"] in ("cpu", "torch")
    rows = [r for r in lines if r["kind"] == "row"]
    assert rows and all(r["op"] == "ema" and "bf16" in r["case"] for r in rows)
    assert all(r["speedup_vs_foreach"] is not None for r in rows)
    bench(args)  # a second step appends: earlier rows are kept
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

    result = bench(["text-ceiling", str(tmp_path / "missing")])
    assert result.exit_code == 2 and result.output.count("Error:") == 1, result.output
    pretrain(tiny_config(**{"run.steps": 1}), out=tmp_path / "run", progress=False)
    export_checkpoint(tmp_path / "run", tmp_path / "enc", hf=False)
    result = bench(["text-ceiling", str(tmp_path / "enc")])
    assert result.exit_code == 2 and "vision encoder; give d2v text exports" in result.output
    result = bench(["text-ceiling", str(tmp_path / "enc"), "--dims", "12x"])
    assert result.exit_code == 2 and "--dims" in result.output


def test_sweep_probes_every_checkpoint_of_every_run(tmp_path):
    """Two tiny runs in parallel: one JSON line each, a probe per checkpoint and weights; a failing run is recorded
    without losing the other's result, and the exit code says something failed."""
    spec = [{"name": "a", "modality": "vision", "steps": 2, "checkpoints": 2, "probe": "digits", "max_train": 200,
             "weights": ["student", "teacher"], "set": ["run.batch_size=8"]},
            {"name": "bad", "modality": "vision", "steps": 1, "probe": "digits", "set": ["no.such_key=1"]}]
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    result = bench(["sweep", str(tmp_path / "spec.json"), "--out", str(tmp_path / "w"),
                                      "--parallel", "2"])
    assert result.exit_code == 1, result.output
    records = {r["name"]: r for r in map(json.loads, (tmp_path / "w" / "sweep.jsonl").read_text().splitlines())}
    assert set(records) == {"a", "bad"} and "no.such_key" in records["bad"]["error"]
    rows = records["a"]["rows"]
    assert [r["step"] for r in rows] == [1, 2]
    assert all(0.0 <= r[w] <= 1.0 for r in rows for w in ("student", "teacher"))
    again = bench(["sweep", str(tmp_path / "spec.json"), "--out", str(tmp_path / "w")])
    assert again.exit_code == 2 and "already holds runs named a;" in again.output
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
    result = bench(["sweep", str(tmp_path / "spec.json"), "--out", str(tmp_path / "w")])
    assert result.exit_code == 2 and message in result.output and not (tmp_path / "w").exists()
    assert result.output.startswith("Error:") and result.output.count("\n") == 1, result.output


def test_recipes_seeds_set_each_pair_and_means_count_pairs_that_never_reach(tmp_path, monkeypatch):
    from d2v.bench import recipes

    calls = []
    # v1 ends at 0.9 (wall 100 s); v2 of seed 3 reaches it at 30 s, v2 of seed 5 never does
    curves = {("v1", 3): [0.8, 0.9], ("v2", 3): [0.85, 0.92], ("v1", 5): [0.7, 0.9], ("v2", 5): [0.8, 0.88]}

    def fake_pretrain(recipe, modality, args, out, checkpoints, steps, threads):
        seed = int(args[args.index("--set") + 1].split("=")[1])
        calls.append((recipe, seed))
        out.mkdir(parents=True)
        (out / "metrics.jsonl").write_text('{"step": 1, "samples_per_s": 5.0}\n')
        return 0.0, 100.0

    def fake_probe(run, t0, probe_data, max_train, holdout, work, blocks=0):
        recipe, seed = calls[-1]
        walls = (50.0, 100.0) if recipe == "v1" else (15.0, 30.0)
        return [{"step": i + 1, "wall_s": w, "accuracy": a} for i, (w, a) in enumerate(zip(walls, curves[calls[-1]]))]

    monkeypatch.setattr(recipes, "_pretrain", fake_pretrain)
    monkeypatch.setattr(recipes, "_probe_checkpoints", fake_probe)
    monkeypatch.setattr(recipes, "_last", lambda run: "step_2")
    monkeypatch.setattr(recipes, "probe_path", lambda *a, **k: type("R", (), {"accuracy": 0.5})())
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
    result = bench(["recipes", "--probe-data", "fashion-mnist", "--seeds", seeds])
    assert result.exit_code == 2 and "--seeds" in result.output and "Traceback" not in result.output


@pytest.mark.parametrize("args, flag", [
    (["kernels", "--runs", "0"], "--runs"),
    (["kernels", "--ops", "nothing"], "--ops"),
    (["pretrain", "--nproc", "0"], "--nproc"),
    (["pretrain", "--repeats", "0"], "--repeats"),
    (["pretrain", "--threads", "-2"], "--threads"),
    (["shared", "--warmup", "-1"], "--warmup"),
    (["shared", "--busy", "nothing"], "--busy"),
    (["peer", "--steps", "2"], "--steps"),
    (["peer", "--peer-python", "/no/such/python"], "--peer-python"),
    (["data", "--batches", "1"], "--batches"),
    (["data", "--num-workers", "-5"], "--num-workers"),
    (["recipes", "--probe-data", "digits", "--max-train", "-1000"], "--max-train"),
    (["recipes", "--probe-data", "digits", "--checkpoints", "0"], "--checkpoints"),
    (["sweep", "nonexist.json", "--out", "w"], "cannot read the sweep spec"),
    (["sweep", "nonexist.json", "--out", "w", "--parallel", "0"], "--parallel"),
    (["text-ceiling", "x", "--dims", "0"], "--dims"),
])
def test_bench_errors_follow_the_cli_rules(tmp_path, monkeypatch, args, flag):
    """Every benchmark's usage error: one `Error:` line naming what is wrong, exit 2, nothing run."""
    monkeypatch.chdir(tmp_path)
    result = bench(args)
    assert result.exit_code == 2, result.output
    assert result.output.startswith("Error:") and result.output.count("\n") == 1 and flag in result.output, \
        result.output
    assert "Traceback" not in result.output and "Usage:" not in result.output


def test_r2_by_group_reads_what_the_features_encode():
    from d2v.bench.text_diagnosis import r2_by_group

    groups = torch.arange(400) % 8
    table = torch.randn(8, 16)
    assert r2_by_group(table[groups], groups) == pytest.approx(1.0)  # features that are the group
    noise = torch.randn(400, 16, generator=torch.Generator().manual_seed(0))
    assert r2_by_group(noise, groups) < 0.05  # features that ignore it
    mixed = r2_by_group(table[groups] + noise, groups)
    assert 0.2 < mixed < 0.9


@pytest.mark.slow
@pytest.mark.parametrize("objective", ["d2v", "mlm"])
def test_text_diagnosis_trains_and_measures_position_and_token(tmp_path, objective):
    """Both arms train on the same data and write the diagnostics; the masked-LM loss starts near log(vocab)."""
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("".join(f"the cat sat on mat {i} while the dog ran to park {i % 7}\n" for i in range(300)))
    out = tmp_path / "diag.jsonl"
    tiny = ["model.dim=32", "model.depth=2", "model.num_heads=2", "model.ffn_dim=64", "model.max_length=32",
            "targets.top_k=2", "data.vocab_size=300", "run.batch_size=8"]
    args = ["text-diagnosis", "--objective", objective, "--data", str(corpus), "--steps", "20", "--diag-at", "0,20",
            "--probes", "", "--jsonl", str(out)] + [a for kv in tiny for a in ("--set", kv)]
    result = bench(args)
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert records[0]["objective"] == objective and "text-diagnosis" in records[0]["command"]
    diag = [r["diag"] for r in records if "diag" in r]
    assert len(diag) == 2 and all(0.0 <= v <= 1.0 + 1e-9 for d in diag for v in d.values())
    assert ("target_R2_position" in diag[0]) == (objective == "d2v")
    if objective == "d2v":
        assert {"teacher_layer0_R2_token", "teacher_layer1_R2_position"} <= set(diag[0])
    losses = [r["loss"] for r in records if "loss" in r]
    assert records[-1] == {"done": True, "steps": 20, "train_s": records[-1]["train_s"]} and len(losses) == 2
    if objective == "mlm":
        assert losses[-1] < losses[0] < 1.5 * np.log(300)


def test_pixels_scores_the_raw_pixels_with_the_probes_classifier(tmp_path):
    """`d2v bench pixels`: the probe's classifier on the flattened pixels (digits: 8 x 8 = 64 values each), the same
    figure as fitting it by hand; an unlabelled source is one sentence and exit 2."""
    from d2v.data.images import load_images
    from d2v.probe import fit_and_score

    out = tmp_path / "pixels.json"
    result = bench(["pixels", "--data", "digits", "--max-train", "500", "--json", str(out)])
    assert result.exit_code == 0, result.output
    rec = json.loads(out.read_text())
    assert rec["pixels"] == 64 and rec["n_train"] == 500 and rec["command"].startswith("d2v bench pixels")
    train, test = load_images("digits", "train"), load_images("digits", "test")
    keep = np.sort(np.random.default_rng(0).permutation(len(train))[:500])
    train = train.subset(keep)
    flat = lambda ds: ds.get_batch(torch.arange(len(ds))).reshape(len(ds), -1).double().numpy()  # noqa: E731
    want, _ = fit_and_score(flat(train), train.labels.numpy(), flat(test), test.labels.numpy())
    assert rec["accuracy"] == pytest.approx(want) and 0.8 < want <= 1.0
    assert f"test accuracy {want:.4f}" in result.output
    np.save(tmp_path / "unlabelled.npy", np.zeros((6, 8, 8), dtype=np.uint8))
    result = bench(["pixels", "--data", str(tmp_path / "unlabelled.npy")])
    assert result.exit_code == 2 and "no labels" in result.output, result.output
