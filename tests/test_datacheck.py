"""d2v data check: every item read once, a report of counts, classes, distributions and unusable items (TSV), and
exit 0 only when a pretraining run with the same options could use the data."""
import json

import numpy as np
import pytest
from typer.testing import CliRunner

from d2v.cli import app

runner = CliRunner()


def check(*args):
    return runner.invoke(app, ["data", "check", "--no-progress", *map(str, args)])


def _png(path, size=(16, 16), mode="L"):
    from PIL import Image

    shape = (size[1], size[0]) + ((len(mode),) if mode not in ("L", "1") else ())
    arr = (np.random.default_rng(len(str(path))).random(shape) * 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr, mode=mode if mode != "1" else "L").convert(mode).save(path)


@pytest.fixture
def images(tmp_path):
    root = tmp_path / "imgs"
    for c in ("cat", "dog"):
        for i in range(4):
            _png(root / c / f"{i}.png")
    _png(root / "dog" / "rgba.png", mode="RGBA")
    (root / "cat" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    return root


def test_images_report_and_exit_codes(images, tmp_path):
    problems, report = tmp_path / "p.tsv", tmp_path / "r.json"
    result = check("--data", images, "--problems", problems, "--json", report)
    assert result.exit_code == 2, result.output
    assert "broken.png" in result.output and "--skip-bad-files" in result.output and "mode RGBA" in result.output
    lines = problems.read_text().splitlines()
    assert lines[0] == "item\tproblem\tdetail" and len(lines) == 3
    assert lines[1].startswith(str(images / "cat" / "broken.png") + "\tunreadable")
    assert lines[2].startswith(str(images / "dog" / "rgba.png") + "\todd mode\tRGBA")
    data = json.loads(report.read_text())
    assert data["items"] == 10 and data["usable_items"] == 9 and data["classes"] == {"cat": 5, "dog": 5}
    assert data["distributions"]["width"]["max"] == 16 and not data["usable"]
    result = check("--data", images, "--problems", problems, "--skip-bad-files", "--num-workers", "2")
    assert result.exit_code == 0 and "a run skips" in result.output, result.output

    _png(images / "dog" / "wide.png", size=(24, 16))
    result = check("--data", images, "--problems", problems, "--skip-bad-files")
    assert result.exit_code == 2 and "--image-size" in result.output
    assert check("--data", images, "--problems", problems, "--skip-bad-files", "--image-size", "16").exit_code == 0


def test_what_check_refuses_pretrain_refuses(images, tmp_path):
    """The exit code follows what `d2v pretrain` does with the same data and flags."""
    from conftest import tiny_cli_args

    for flags, code in (([], 2), (["--skip-bad-files"], 0)):
        checked = check("--data", images, "--problems", tmp_path / "p.tsv", *flags)
        run = runner.invoke(app, ["pretrain", "--data", str(images), "--out", str(tmp_path / f"r{code}"),
                                  "--steps", "2", *flags, *tiny_cli_args()])
        assert checked.exit_code == code and (run.exit_code == 0) == (code == 0), (checked.output, run.output)


def test_speech_and_text_problems(tmp_path):
    import soundfile as sf

    wavs = tmp_path / "wavs"
    wavs.mkdir()
    rng = np.random.default_rng(0)
    sf.write(wavs / "ok.wav", (rng.standard_normal(8000) * 0.1).astype(np.float32), 16000)
    sf.write(wavs / "stereo44k.wav", (rng.standard_normal((44100, 2)) * 0.1).astype(np.float32), 44100)
    sf.write(wavs / "short.wav", (rng.standard_normal(200) * 0.1).astype(np.float32), 16000)
    sf.write(wavs / "silent.wav", np.zeros(8000, np.float32), 16000)
    (wavs / "junk.wav").write_bytes(b"RIFF....WAVE")
    result = check("--modality", "speech", "--data", wavs, "--problems", tmp_path / "p.tsv", "--skip-bad-files")
    assert result.exit_code == 0, result.output
    rows = [line.split("\t") for line in (tmp_path / "p.tsv").read_text().splitlines()[1:]]
    found = {r[0].rsplit("/", 1)[1]: r[1] for r in rows}
    assert found == {"short.wav": "too short", "silent.wav": "unreadable", "junk.wav": "unreadable"}
    assert "44100 Hz" in result.output and "mono" in result.output
    result = check("--modality", "speech", "--data", wavs, "--problems", tmp_path / "p.tsv", "--min-seconds", "0.75",
                   "--skip-bad-files", "--json", tmp_path / "s.json")
    assert json.loads((tmp_path / "s.json").read_text())["usable_items"] == 1  # 0.5 s is now too short

    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "a.txt").write_text("hello world\nsecond line here\n")
    (docs / "empty.txt").write_text("  \n")
    (docs / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    result = check("--modality", "text", "--data", docs, "--problems", tmp_path / "t.tsv", "--doc-per-line",
                   "--json", tmp_path / "t.json")
    assert result.exit_code == 2 and "not UTF-8" in result.output
    data = json.loads((tmp_path / "t.json").read_text())
    assert {p["problem"] for p in data["problems"]} == {"not UTF-8", "empty"}
    assert data["distributions"]["docs"]["max"] == 2 and data["distributions"]["words"]["max"] == 2.5
    assert check("--modality", "text", "--data", docs, "--problems", tmp_path / "t.tsv",
                 "--skip-bad-files").exit_code == 0


def test_bad_input_is_one_line(tmp_path):
    for args, text in ((["--data", tmp_path / "none"], "neither a built-in"),
                       (["--data", "digits", "--problems", tmp_path], "is a directory"),
                       (["--modality", "smell", "--data", "x"], "smell")):
        result = check(*args)
        assert result.exit_code == 2 and text in result.output, result.output
    result = check("--data", "digits", "--json", tmp_path / "d.json")
    assert result.exit_code == 0 and json.loads((tmp_path / "d.json").read_text())["items"] == 1797
