"""Test setup: Triton kernels run under the CPU interpreter when no GPU is present."""
import os

import torch

if not torch.cuda.is_available():
    # Must be set before triton is imported anywhere: @triton.jit picks the interpreter at decoration time.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


@pytest.fixture(autouse=True, scope="session")
def _data_cache(tmp_path_factory):
    """Tokenized corpora and generated data sets go to a temporary cache, not the user's ~/.cache/d2v."""
    old = os.environ.get("D2V_CACHE_DIR")
    os.environ["D2V_CACHE_DIR"] = str(tmp_path_factory.mktemp("d2v-cache"))
    yield
    if old is None:
        os.environ.pop("D2V_CACHE_DIR", None)
    else:
        os.environ["D2V_CACHE_DIR"] = old


def pytest_collection_modifyitems(config, items):
    skip_cuda = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_cuda)


TINY_OVERRIDES = {
    "model.dim": 32, "model.depth": 2, "model.num_heads": 2, "targets.top_k": 2,
    "run.batch_size": 16, "run.steps": 8, "run.log_every": 1,
}


def tiny_config(**overrides):
    """The CPU preset shrunk further, for tests that train."""
    from d2v.core.config import set_by_path
    from d2v.core.presets import preset_config

    cfg = preset_config("vision", "tiny")
    for key, value in {**TINY_OVERRIDES, **overrides}.items():
        set_by_path(cfg, key, value)
    return cfg


def tiny_cli_args():
    """tiny_config() as command-line options: the v1 preset, named, as the CLI's vision default is v2."""
    args = ["--recipe", "v1"]
    for key, value in TINY_OVERRIDES.items():
        args += ["--set", f"{key}={value}"]
    return args + ["--no-progress"]


def micro(pipeline, k: int):
    """Micro-batch number k of a one-process run without accumulation (global positions k*B .. k*B + B - 1)."""
    B = pipeline.cfg.run.batch_size
    return pipeline.micro_batch(k * B, B)
