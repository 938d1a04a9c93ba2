"""WebDataset-style tar shards and fairseq TSV manifests: the same samples in the same order as the folder they were
made from, so a run on shards equals a run on the folder, and resumes exactly."""
import os
import signal
import tarfile

import numpy as np
import pytest
import soundfile as sf
import torch
from safetensors.torch import load_file

from conftest import tiny_config, micro
from d2v.runtime import checkpoint as ckpt
from d2v.core import tokenizer as toks
from d2v.data.pipeline import build_pipeline
from d2v.data.sources import list_source, shard_paths
from d2v.core.errors import DataError
from d2v.train import pretrain
from test_data_images import make_folder


def write_shards(folder, out, n_shards, pattern="shard-{:03d}.tar"):
    """The folder's files, in sorted order, split into n_shards uncompressed tars (member = relative path)."""
    files = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    out.mkdir(parents=True, exist_ok=True)
    for s, chunk in enumerate(np.array_split(np.array(files, dtype=object), n_shards)):
        with tarfile.open(out / pattern.format(s), "w") as tar:
            for name in chunk:
                tar.add(folder / name, arcname=name)
    return out


def _weights(run):
    return load_file(str(ckpt.latest_checkpoint(run) / "model.safetensors"))


def test_image_shards_run_equals_folder_run_and_resumes_exactly(tmp_path, monkeypatch):
    from d2v.objective import Data2Vec

    folder = make_folder(tmp_path / "imgs", n=40, size=(14, 10))
    shards = write_shards(folder, tmp_path / "shards", 3)
    over = {"data.image_size": 8, "model.image_size": 0, "run.steps": 4, "data.hflip": True,
            "data.crop_scale": (0.3, 1.0)}
    pretrain(tiny_config(**over, **{"data.source": str(folder), "data.num_workers": 0}), out=tmp_path / "f",
             progress=False)
    pretrain(tiny_config(**over, **{"data.source": str(shards), "data.num_workers": 2}), out=tmp_path / "s",
             progress=False)
    a, b = _weights(tmp_path / "f"), _weights(tmp_path / "s")
    assert all(torch.equal(a[k], b[k]) for k in a)

    original = Data2Vec.ema_step
    with monkeypatch.context() as m:  # Ctrl-C after step 2, then resume
        m.setattr(Data2Vec, "ema_step", lambda self, step: (step == 2 and os.kill(os.getpid(), signal.SIGINT))
                  or original(self, step))
        pretrain(tiny_config(**over, **{"data.source": str(shards)}), out=tmp_path / "r", progress=False)
    pretrain(tiny_config(**over, **{"data.source": str(shards)}), out=tmp_path / "r", resume=True, progress=False)
    c = _weights(tmp_path / "r")
    assert all(torch.equal(a[k], c[k]) for k in a)


def test_speech_shards_and_tsv_manifest_equal_the_folder(tmp_path):
    from test_speech import tiny_config as speech_config, voice

    folder = tmp_path / "wavs"
    for i in range(14):
        (folder / f"c{i % 2}").mkdir(parents=True, exist_ok=True)
        sf.write(str(folder / f"c{i % 2}" / f"{i:02d}.flac"), voice(i, 0.2 + 0.05 * i), 16000)
    shards = write_shards(folder, tmp_path / "shards", 2, pattern="part-{:02d}.tar")
    names = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*.flac"))
    tsv = tmp_path / "train.tsv"
    tsv.write_text(f"{folder}\n" + "".join(f"{n}\t{sf.info(str(folder / n)).frames}\n" for n in names))
    pipes = [build_pipeline(speech_config(src)) for src in (folder, str(tmp_path / "shards/part-{00..01}.tar"), tsv)]
    assert [p.dataset.classes for p in pipes] == [["c0", "c1"]] * 3
    for k in range(4):
        ref = micro(pipes[0], k)
        for p in pipes[1:]:
            b = micro(p, k)
            assert torch.equal(b.inputs, ref.inputs) and torch.equal(b.mask, ref.mask)
    assert pipes[2].dataset.decodes <= 4 * 4  # the manifest's lengths: no headers read, files decoded per batch


def test_text_shards_equal_the_folder(tmp_path):
    from test_data_text import text_config, write_corpus

    folder = write_corpus(tmp_path / "corpus", 30_000, lines_per_file=40)
    write_shards(folder, tmp_path / "shards", 3)
    a = build_pipeline(text_config(**{"data.source": str(folder), "data.doc_per_line": True}))
    b = build_pipeline(text_config(**{"data.source": str(tmp_path / "shards"), "data.doc_per_line": True}))
    assert toks.tokenizer_sha256(a.tokenizer) == toks.tokenizer_sha256(b.tokenizer)
    for k in range(3):
        assert torch.equal(micro(a, k).inputs, micro(b, k).inputs)


def test_shard_listing_reads_headers_only_and_errors(tmp_path):
    folder = make_folder(tmp_path / "imgs", n=12, size=(8, 8))
    write_shards(folder, tmp_path / "shards", 2)
    (tmp_path / "shards" / "notes.txt").write_text("not a shard")  # a folder with other files is not a shard set
    assert shard_paths(str(tmp_path / "shards")) is None
    (tmp_path / "shards" / "notes.txt").unlink()
    samples = list_source(str(tmp_path / "shards"), {".png"}, "images")
    assert samples.names() == sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*.png"))
    assert samples.read_bytes(5) == (folder / samples.name(5)).read_bytes()
    with pytest.raises(DataError, match=r"shard-002\.tar of .* does not exist"):  # two shards exist
        list_source(str(tmp_path / "shards" / "shard-{000..004}.tar"), {".png"}, "images")
    with tarfile.open(tmp_path / "gz.tar", "w:gz") as tar:
        tar.add(folder / samples.name(0), arcname="x.png")
    with pytest.raises(DataError, match="uncompressed"):
        list_source(str(tmp_path / "gz.tar"), {".png"}, "images")
    cfg = tiny_config(**{"data.source": str(tmp_path / "shards"), "data.image_size": 8, "model.image_size": 0})
    assert micro(build_pipeline(cfg), 0).inputs.shape == (16, 3, 8, 8)
