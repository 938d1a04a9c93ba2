"""Tar shards on a server (HTTP on 127.0.0.1; S3 from moto's server): the same samples, in the same order, as the
same shards on disk, so a run over either ends with the same weights; listed in one pass per shard and never again
on resume; dropped connections retried; a dead or missing URL is one line naming it."""
import logging
import os
import signal
import sys
import threading
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

import pytest
import soundfile as sf
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from conftest import micro, tiny_cli_args, tiny_config
from d2v.bench.shardserver import ShardServer
from d2v.core import tokenizer as toks
from d2v.core.errors import ConfigError, DataError
from d2v.data import remote
from d2v.data.pipeline import build_pipeline
from d2v.data.sources import MANIFEST_NAME, list_source
from d2v.runtime import checkpoint as ckpt
from d2v.train import pretrain
from test_data_images import make_folder
from test_data_shards import write_shards

RUN = {"data.image_size": 8, "model.image_size": 0, "run.steps": 4, "data.crop_scale": (0.3, 1.0),
       "data.skip_bad_files": True}


@pytest.fixture(autouse=True)
def _fast_retries(monkeypatch):
    """Two retries with short waits: a dead server fails in about a second, not a minute."""
    monkeypatch.setenv("D2V_REMOTE_RETRIES", "2")
    monkeypatch.setattr(remote, "BACKOFF_S", 0.05)


@pytest.fixture
def image_shards(tmp_path):
    """40 images in 4 shards on disk, one of them not an image (so --skip-bad-files has something to skip)."""
    folder = make_folder(tmp_path / "imgs", n=40, size=(14, 10))
    (folder / sorted(os.listdir(folder))[0] / "zz_broken.png").write_bytes(b"not a png")
    return write_shards(folder, tmp_path / "shards", 4)


def _weights(run):
    return load_file(str(ckpt.latest_checkpoint(run) / "model.safetensors"))


def _same(a, b) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _run(source, out, **over):
    return pretrain(tiny_config(**RUN, **{"data.source": source, **over}), out=out, progress=False)


def test_a_run_over_http_equals_the_run_over_disk_lists_once_and_resumes_without_listing(image_shards, tmp_path,
                                                                                        monkeypatch):
    from d2v.objective import Data2Vec

    disk = _run(str(image_shards), tmp_path / "disk", **{"data.num_workers": 0})
    with ShardServer(image_shards) as server:
        url = server.url + "/shard-{000..003}.tar"
        http = _run(url, tmp_path / "http", **{"data.num_workers": 2})
        assert _same(_weights(tmp_path / "disk"), _weights(tmp_path / "http"))
        assert http.skipped_files == disk.skipped_files == 1
        whole = [(name, lo) for name, lo, hi, size in server.log if hi == size - 1 and lo == 0 and size > 1 << 12]
        assert sorted(whole) == [(f"shard-{s:03d}.tar", 0) for s in range(4)]  # one listing pass per shard

        original = Data2Vec.ema_step
        with monkeypatch.context() as m:  # Ctrl-C after step 2, then resume
            m.setattr(Data2Vec, "ema_step", lambda self, step: (step == 2 and os.kill(os.getpid(), signal.SIGINT))
                      or original(self, step))
            _run(url, tmp_path / "r", **{"data.num_workers": 0})
        server.log.clear()
        resumed = pretrain(tiny_config(**RUN, **{"data.source": url}), out=tmp_path / "r", resume=True,
                           progress=False)
        assert resumed.steps == 4
        assert _same(_weights(tmp_path / "disk"), _weights(tmp_path / "r"))
        assert all(hi - lo + 1 < 4096 for _, lo, hi, _ in server.log)  # members only: the manifest was reused
        assert "\thttp://127.0.0.1" in (tmp_path / "r" / MANIFEST_NAME).read_text()


def test_dropped_connections_are_retried_and_give_the_same_bytes(image_shards, tmp_path):
    disk = list_source(str(image_shards), {".png"}, "images")
    with ShardServer(image_shards) as server:
        server.cut_after, server.cut_count = 3000, 4  # the listing streams are cut mid-shard, then continued
        listed = list_source(server.url + "/shard-{000..003}.tar", {".png"}, "images")
        assert server.cuts == 4 and listed.names() == disk.names()
        assert listed.offset.tolist() == disk.offset.tolist()
        server.cut_after, server.cut_count = 50, 6  # member reads cut after 50 bytes, six times
        listed.prefetch(range(len(listed)))
        assert server.cuts == 10
        assert all(listed.read_bytes(i) == disk.read_bytes(i) for i in range(len(disk)))
        moved = list_source(server.url + "/moved/shard-{000..003}.tar", {".png"}, "images")  # redirects followed
        assert [moved.read_bytes(i) for i in (0, 17)] == [disk.read_bytes(i) for i in (0, 17)]
        server.cut_after, server.cut_count = 3000, 4
        _run(server.url + "/shard-{000..003}.tar", tmp_path / "cut", **{"data.num_workers": 0})
    _run(str(image_shards), tmp_path / "disk", **{"data.num_workers": 0})
    assert _same(_weights(tmp_path / "disk"), _weights(tmp_path / "cut"))


class _Quiet(SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def _one_line_error(args) -> str:
    result = CliRunner().invoke(__import__("d2v.cli", fromlist=["app"]).app, args)
    assert result.exit_code == 2, result.output
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: ") and "Traceback" not in result.output, result.output
    return lines[0]


def test_a_dead_missing_or_rangeless_server_is_one_line_naming_the_url(image_shards, tmp_path):
    with ShardServer(image_shards) as server:
        base = server.url
        line = _one_line_error(["pretrain", "--data", base + "/shard-{000..005}.tar", "--out", str(tmp_path / "a"),
                                *tiny_cli_args()])
        assert f"{base}/shard-004.tar does not exist (HTTP 404)" in line
    line = _one_line_error(["pretrain", "--data", base + "/shard-{000..003}.tar", "--out", str(tmp_path / "b"),
                            *tiny_cli_args()])  # the server is gone: connection refused, retried, then one line
    assert f"cannot read {base}/shard-000.tar (connection refused, 3 tries)" in line
    plain = ThreadingHTTPServer(("127.0.0.1", 0), partial(_Quiet, directory=str(image_shards)))
    threading.Thread(target=plain.serve_forever, daemon=True).start()
    try:  # python -m http.server answers Range requests with whole files: refused, never read as members
        line = _one_line_error(["pretrain", "--data", f"http://127.0.0.1:{plain.server_address[1]}/shard-000.tar",
                                "--out", str(tmp_path / "c"), *tiny_cli_args()])
        assert "ignores Range requests" in line
    finally:
        plain.shutdown()
        plain.server_close()


def test_a_server_lost_mid_run_stops_with_a_checkpoint_and_the_run_resumes_exactly(image_shards, tmp_path,
                                                                                    monkeypatch):
    from d2v.objective import Data2Vec

    server = ShardServer(image_shards).start()
    port, url = server.server_address[1], server.url + "/shard-{000..003}.tar"
    original = Data2Vec.ema_step
    with monkeypatch.context() as m:  # the server goes away after step 2
        m.setattr(Data2Vec, "ema_step", lambda self, step: (step == 2 and server.stop()) or original(self, step))
        with pytest.raises(DataError, match=rf"cannot read http://127\.0\.0\.1:{port}/shard-00\d\.tar"):
            _run(url, tmp_path / "r", **{"data.num_workers": 0})
    assert ckpt.latest_checkpoint(tmp_path / "r") is not None
    with ShardServer(image_shards, port):
        pretrain(tiny_config(**RUN, **{"data.source": url}), out=tmp_path / "r", resume=True, progress=False)
    _run(str(image_shards), tmp_path / "disk", **{"data.num_workers": 0})
    assert _same(_weights(tmp_path / "disk"), _weights(tmp_path / "r"))


def test_speech_over_http_reads_lengths_in_the_listing_pass(tmp_path):
    from test_speech import tiny_config as speech_config, voice

    folder = tmp_path / "wavs"
    for i in range(14):
        (folder / f"c{i % 2}").mkdir(parents=True, exist_ok=True)
        sf.write(str(folder / f"c{i % 2}" / f"{i:02d}.flac"), voice(i, 0.2 + 0.05 * i), 16000)
    shards = write_shards(folder, tmp_path / "shards", 2, pattern="part-{:02d}.tar")
    disk = build_pipeline(speech_config(str(shards / "part-{00..01}.tar")))
    with ShardServer(shards) as server:
        http = build_pipeline(speech_config(server.url + "/part-{00..01}.tar"))
        assert len(server.log) == 2  # one GET per shard: no member fetched again for its header
        assert http.dataset.lengths.tolist() == disk.dataset.lengths.tolist()
        for k in range(3):
            a, b = micro(disk, k), micro(http, k)
            assert torch.equal(a.inputs, b.inputs) and torch.equal(a.mask, b.mask)


def test_text_over_http_trains_the_same_tokenizer_and_blocks(tmp_path):
    from test_data_text import text_config, write_corpus

    folder = write_corpus(tmp_path / "corpus", 30_000, lines_per_file=40)
    write_shards(folder, tmp_path / "shards", 3)
    a = build_pipeline(text_config(**{"data.source": str(tmp_path / "shards"), "data.doc_per_line": True}))
    with ShardServer(tmp_path / "shards") as server:
        b = build_pipeline(text_config(**{"data.source": server.url + "/shard-{000..002}.tar",
                                          "data.doc_per_line": True}))
    assert toks.tokenizer_sha256(a.tokenizer) == toks.tokenizer_sha256(b.tokenizer)
    for k in range(3):
        assert torch.equal(micro(a, k).inputs, micro(b, k).inputs)


# ------------------------------------------------------------------------------------------------ S3
@pytest.fixture
def s3_server(monkeypatch):
    """moto's S3 server on 127.0.0.1 with dummy credentials, found through AWS_ENDPOINT_URL."""
    pytest.importorskip("botocore", reason="s3:// needs the s3 extra (botocore)")
    moto_server = pytest.importorskip("moto.server", reason="the S3 tests need moto[s3] (the test extra)")
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    for key, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                       "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": f"http://{host}:{port}",
                       "AWS_CONFIG_FILE": "/nonexistent", "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent"}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setitem(remote._shared, "s3", None)  # a signer made for another endpoint is not reused
    import botocore.session

    client = botocore.session.get_session().create_client("s3", endpoint_url=f"http://{host}:{port}",
                                                          region_name="us-east-1")
    client.create_bucket(Bucket="data")
    yield client
    server.stop()


def test_a_run_over_s3_equals_the_run_over_disk(image_shards, tmp_path, s3_server):
    for shard in sorted(image_shards.glob("*.tar")):
        s3_server.put_object(Bucket="data", Key=f"train/{shard.name}", Body=shard.read_bytes())
    _run(str(image_shards), tmp_path / "disk", **{"data.num_workers": 0})
    _run("s3://data/train/shard-{000..003}.tar", tmp_path / "s3", **{"data.num_workers": 2})
    assert _same(_weights(tmp_path / "disk"), _weights(tmp_path / "s3"))
    with pytest.raises(DataError, match=r"^s3://data/train/shard-004\.tar does not exist \(HTTP 404\)$"):
        list_source("s3://data/train/shard-{003..004}.tar", {".png"}, "images")


def test_s3_without_botocore_is_one_line_naming_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "botocore", None)
    monkeypatch.setitem(sys.modules, "botocore.session", None)
    monkeypatch.setitem(remote._shared, "s3", None)
    with pytest.raises(ConfigError, match=r"s3:// data needs botocore: pip install 'd2v\[s3\]'"):
        list_source("s3://bucket/shard-{000..001}.tar", {".png"}, "images")
