"""`d2v bench data` draws micro-batches through the training loader and reports loader and step samples/s."""
import json

from typer.testing import CliRunner

from d2v.cli import app as d2v_app


def bench(args: list[str]):
    """`d2v bench ARGS` through the d2v command (its error rules apply)."""
    return CliRunner().invoke(d2v_app, ["bench", *args])
from test_data_images import make_folder


def test_bench_data_on_a_folder_writes_a_row(tmp_path):
    folder = make_folder(tmp_path / "imgs", n=24, size=(20, 12))
    out = tmp_path / "data.json"
    res = bench(["data", "--data", str(folder), "--image-size", "8", "--batches", "3",
                                   "--batch-size", "8", "--num-workers", "1", "--model-steps", "1",
                                   "--json", str(out)])
    assert res.exit_code == 0, res.output
    row = json.loads(out.read_text())["rows"][0]
    assert row["source_kind"] == "folder" and row["num_workers"] == 1 and row["batch_size"] == 8
    assert row["loader_samples_per_s"] > 0 and row["step_samples_per_s"] > 0 and row["first_batch_s"] > 0
    res = bench(["data", "--data", str(tmp_path / "nothing"), "--batches", "2"])
    assert res.exit_code == 2 and "nothing" in res.output
