"""Test setup: Triton kernels run under the CPU interpreter when no GPU is present."""
import os

import torch

if not torch.cuda.is_available():
    # Must be set before triton is imported anywhere: @triton.jit picks the interpreter at decoration time.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
    skip_cuda = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_cuda)
