"""Image files: listed not decoded, bad files found lazily, every PIL mode as a user expects it, crops from the
original image without stretching, a run's file list kept for an exact resume, workers equal no workers."""
import io

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from typer.testing import CliRunner

from conftest import tiny_cli_args, tiny_config, micro
from d2v.cli import app
from d2v.data import images, imagedecode
from d2v.data.imagedecode import center_box, decode, random_resized_box
from d2v.data.pipeline import build_pipeline
from d2v.data.sources import MANIFEST_NAME
from d2v.core.errors import DataError
from d2v.train import pretrain


def make_folder(root, n=40, size=(24, 24), classes=2, seed=0, fmt="png"):
    rng = np.random.default_rng(seed)
    for i in range(n):
        d = root / f"c{i % classes}"
        d.mkdir(parents=True, exist_ok=True)
        level = 40 + 170 * (i % classes)  # classes differ in brightness
        arr = np.clip(rng.normal(level, 30, (size[1], size[0], 3)), 0, 255).astype(np.uint8)
        Image.fromarray(arr).save(d / f"img{i:04d}.{fmt}")
    return root


def png_bytes(im, **kw) -> io.BytesIO:
    b = io.BytesIO()
    im.save(b, format=kw.pop("format", "PNG"), **kw)
    b.seek(0)
    return b


# ------------------------------------------------------------------------------------------------ modes
def test_16_bit_png_is_scaled_not_clipped():
    a = np.array([[0, 256, 32768, 65535]], dtype=np.uint16).repeat(4, axis=0)
    im = Image.fromarray(a)
    assert im.mode == "I;16"
    out = decode(png_bytes(im), 1, 4, lambda w, h: (0, 0, w, h))[0, 0]  # (4,) uint8
    assert out.tolist() == [0, 1, 128, 255]  # was [0, 255, 255, 255]: 8-bit clipping


@pytest.mark.parametrize("mode", ["I", "F"])
def test_32_bit_and_float_modes(mode):
    values = [0, 16384, 65535] if mode == "I" else [0.0, 0.25, 1.0]
    a = np.array([values], dtype=np.int32 if mode == "I" else np.float32).repeat(3, axis=0)
    im = Image.fromarray(a, mode=mode)
    out = decode(png_bytes(im, format="TIFF"), 1, 3, lambda w, h: (0, 0, w, h))[0, 0]
    assert out.tolist() == [0, 64, 255]


def test_cmyk_palette_alpha_and_one_bit():
    red = Image.new("RGB", (8, 8), (255, 0, 0))
    cmyk = decode(png_bytes(red.convert("CMYK"), format="JPEG", quality=100), 3, 8, center_box)
    assert cmyk[0].mean() > 240 and cmyk[1].mean() < 15 and cmyk[2].mean() < 15
    pal = decode(png_bytes(red.convert("P")), 3, 8, center_box)
    assert pal[0].min() == 255 and pal[1].max() == 0
    clear = Image.new("RGBA", (8, 8), (0, 0, 0, 0))  # fully transparent black: the background shows (white)
    assert decode(png_bytes(clear), 3, 8, center_box).min() == 255
    half = Image.new("LA", (8, 8), (0, 128))  # half-transparent black over white
    assert abs(int(decode(png_bytes(half), 1, 8, center_box).mean()) - 127) <= 1
    transparent_palette = Image.new("P", (8, 8), 0)
    transparent_palette.info["transparency"] = 0
    assert decode(png_bytes(transparent_palette, transparency=0), 3, 8, center_box).min() == 255
    one_bit = Image.new("1", (8, 8), 1)
    assert decode(png_bytes(one_bit), 1, 8, center_box).min() == 255


def test_exif_rotation_is_applied():
    a = np.zeros((20, 40, 3), dtype=np.uint8)  # stored 40 wide, 20 high, left half white
    a[:, :20] = 255
    im = Image.fromarray(a)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display": the displayed image is 20 wide, 40 high, top half white
    data = png_bytes(im, format="JPEG", exif=exif.tobytes(), quality=95)
    (w, h), _ = imagedecode.header(data)
    assert (w, h) == (20, 40)
    data.seek(0)
    out = decode(data, 1, 20, lambda w, h: (0, 0, w, h)).astype(float)[0]  # box = whole upright image
    assert out[:8].mean() > 200 and out[-8:].mean() < 50


def test_non_square_images_are_cropped_not_stretched():
    # 20-pixel checker squares on a 200 x 100 image: after 'shorter side to 50, centre crop' they are 10 x 10
    y, x = np.mgrid[0:100, 0:200]
    a = (((x // 20) + (y // 20)) % 2 * 255).astype(np.uint8)
    out = decode(png_bytes(Image.fromarray(a)), 1, 50, center_box)[0] > 127
    runs_x = np.diff(np.flatnonzero(np.diff(out[25].astype(int)))).tolist()
    runs_y = np.diff(np.flatnonzero(np.diff(out[:, 25].astype(int)))).tolist()
    assert set(runs_x) == {10} and set(runs_y) == {10}  # stretched to square, x runs would be 5


def test_random_resized_box_statistics():
    rng = np.random.default_rng()
    boxes = np.array([random_resized_box(300, 200, (0.08, 1.0), rng) for _ in range(2000)])
    w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    assert (boxes[:, 0] >= 0).all() and (boxes[:, 2] <= 300 + 1e-9).all() and (boxes[:, 3] <= 200 + 1e-9).all()
    area = w * h / (300 * 200)
    assert area.min() >= 0.08 - 1e-9 and area.max() <= 1 + 1e-9 and area.min() < 0.12
    assert area.max() > 0.85  # at most 0.89 of a 3:2 image: a box is at most 4:3
    assert (w / h).min() >= 3 / 4 - 1e-9 and (w / h).max() <= 4 / 3 + 1e-9


def test_jpeg_draft_mode_matches_full_decode():
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:512, 0:512]
    a = np.stack([128 + 100 * np.sin(x / 40), 128 + 100 * np.cos(y / 50), np.full_like(x, 90)], -1)
    a = np.clip(a + rng.normal(0, 5, a.shape), 0, 255).astype(np.uint8)
    data = png_bytes(Image.fromarray(a), format="JPEG", quality=95).getvalue()
    fast = decode(io.BytesIO(data), 3, 64, center_box).astype(float)  # box 512 -> 64: decoded at 1/4 scale
    with Image.open(io.BytesIO(data)) as im:
        full = np.asarray(im.convert("RGB").resize((64, 64), Image.BICUBIC)).transpose(2, 0, 1).astype(float)
    assert np.abs(fast - full).mean() < 2.0


# ------------------------------------------------------------------------------------------------ folders
def test_scan_lists_without_decoding_and_first_batch_is_lazy(tmp_path, monkeypatch):
    make_folder(tmp_path / "imgs", n=600, size=(20, 20))
    opened = []
    real_open = Image.open
    monkeypatch.setattr(Image, "open", lambda *a, **k: opened.append(1) or real_open(*a, **k))
    ds = images.load_images(str(tmp_path / "imgs"), "all", image_size=16)
    assert len(ds) == 600 and ds.classes == ["c0", "c1"]
    assert len(opened) <= images.HEADER_SAMPLE and ds.decodes == 0  # headers only
    cfg = tiny_config(**{"data.source": str(tmp_path / "imgs"), "data.image_size": 16, "model.image_size": 0})
    pipe = build_pipeline(cfg)  # channels, size and pixel statistics from a few files
    batch = micro(pipe, 0)
    assert batch.inputs.shape == (16, 3, 16, 16) and batch.inputs.dtype == torch.uint8
    assert pipe.dataset.decodes <= images.FILE_STATS_IMAGES + 16 < 600 // 2


def test_bad_files_are_found_lazily_named_or_skipped(tmp_path):
    root = make_folder(tmp_path / "imgs", n=40, size=(12, 12))
    (root / "c1" / "img0019.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")  # not among the headers read
    (root / "c0" / "img0020.png").write_bytes(b"")
    args = ["pretrain", "--data", str(root), "--image-size", "8", "--num-workers", "1"] + tiny_cli_args()
    res = CliRunner().invoke(app, args + ["--out", str(tmp_path / "a")])
    assert res.exit_code == 2, res.output
    assert ("img0019.png" in res.output or "img0020.png" in res.output) and "--skip-bad-files" in res.output
    assert "Traceback" not in res.output
    # 8 steps x 16 = 128 samples: three passes over the 40 files, so both bad files are met and skipped
    res = CliRunner().invoke(app, args + ["--out", str(tmp_path / "b"), "--skip-bad-files"])
    assert res.exit_code == 0, res.output
    assert "skipped files" in res.output and "│ 2" in res.output.replace("  ", " ").replace("| ", "│ ")


def test_npy_non_square_is_cropped_with_image_size(tmp_path):
    arr = np.random.default_rng(0).integers(0, 255, (10, 12, 20), dtype=np.uint8)
    np.save(tmp_path / "x.npy", arr)
    with pytest.raises(DataError, match="--image-size"):
        images.load_images(str(tmp_path / "x.npy"), "all")
    ds = images.load_images(str(tmp_path / "x.npy"), "all", image_size=8)
    assert ds.shape == (1, 8, 8) and len(ds) == 10


def test_tilde_paths_are_expanded(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    make_folder(tmp_path / "imgs", n=6, size=(8, 8))
    assert len(images.load_images("~/imgs", "all")) == 6


def _weights(run):
    from d2v.runtime import checkpoint as ckpt

    return load_file(str(ckpt.latest_checkpoint(run) / "model.safetensors"))


def test_resume_reads_the_saved_file_list_and_is_exact(tmp_path, monkeypatch):
    import os
    import signal

    from d2v.objective import Data2Vec

    root = make_folder(tmp_path / "imgs", n=48, size=(14, 10))
    over = {"data.source": str(root), "data.image_size": 8, "model.image_size": 0, "run.steps": 6,
            "data.crop_scale": (0.3, 1.0), "data.hflip": True, "data.num_workers": 0}
    pretrain(tiny_config(**over), out=tmp_path / "full", progress=False)
    original = Data2Vec.ema_step
    with monkeypatch.context() as m:  # Ctrl-C after step 3
        m.setattr(Data2Vec, "ema_step", lambda self, step: (step == 3 and os.kill(os.getpid(), signal.SIGINT))
                  or original(self, step))
        part = pretrain(tiny_config(**over), out=tmp_path / "part", progress=False)
    assert part.steps == 3 and (tmp_path / "part" / MANIFEST_NAME).exists()
    for i in range(5):  # files added meanwhile sort first: a fresh listing would shift every sample
        (root / "c0" / f"a{i}.png").write_bytes((root / "c1" / "img0001.png").read_bytes())
    pretrain(tiny_config(**over), out=tmp_path / "part", resume=True, progress=False)
    a, b = _weights(tmp_path / "full"), _weights(tmp_path / "part")
    for k in a:
        assert torch.equal(a[k], b[k]), k
    manifest = tmp_path / "part" / MANIFEST_NAME
    manifest.write_text(manifest.read_text().replace("img0001", "img0002", 1))
    with pytest.raises(DataError, match="damaged"):
        build_pipeline(tiny_config(**over), tmp_path / "part")


def test_workers_give_the_same_run_as_no_workers(tmp_path):
    root = make_folder(tmp_path / "imgs", n=30, size=(16, 12))
    over = {"data.source": str(root), "data.image_size": 8, "model.image_size": 0, "run.steps": 3,
            "data.hflip": True}
    pretrain(tiny_config(**over, **{"data.num_workers": 0}), out=tmp_path / "w0", progress=False)
    pretrain(tiny_config(**over, **{"data.num_workers": 2}), out=tmp_path / "w2", progress=False)
    a, b = _weights(tmp_path / "w0"), _weights(tmp_path / "w2")
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_color_jitter_changes_brightness_contrast_saturation_within_bounds():
    from d2v.data.augment import color_jitter

    rng = np.random.default_rng()
    x = torch.rand(64, 3, 8, 8) * 0.5 + 0.25
    y = color_jitter(x, 0.4, rng)
    assert y.shape == x.shape and y.min() >= 0 and y.max() <= 1
    ratio = y.mean(dim=(1, 2, 3)) / x.mean(dim=(1, 2, 3))
    assert ratio.min() < 0.85 and ratio.max() > 1.15 and ratio.min() > 0.3  # brightness moves, within bounds
    assert torch.equal(color_jitter(x, 0.4, np.random.default_rng(3)), color_jitter(x, 0.4, np.random.default_rng(3)))
    gray = color_jitter(x[:, :1], 0.4, rng)
    assert gray.shape == (64, 1, 8, 8)
    from d2v.core.presets import preset_config

    assert preset_config("vision", "base").data.color_jitter == 0.4
    assert preset_config("vision", "base").data.crop_scale == (0.08, 1.0)


def test_builtin_digits_are_scikit_learns():
    """The built-in digits are read from scikit-learn's file without importing it: the same images and labels as
    load_digits, scaled from 0..16 to 0..255."""
    from sklearn.datasets import load_digits

    from d2v.data.images import _digits

    images, labels = _digits()
    d = load_digits()
    assert images.shape == (1797, 1, 8, 8) and images.dtype == np.uint8
    np.testing.assert_array_equal(images[:, 0], np.clip(d.images * (255.0 / 16.0), 0, 255).round().astype(np.uint8))
    np.testing.assert_array_equal(labels, d.target)
