"""Bandwidth evidence without a GPU: the Triton kernels compiled for sm_90 load 16 bytes at a time and do not spill.

tests/triton_codegen.py compiles every kernel for a CUDA target of compute capability 9.0 (no device needed),
bound to tensors laid out as training lays them out (bf16 views layer[:, 1:], fp32 teacher, bf16 student...).
The compiled code is then read: PTX `ld.global.v4.b32` is a 16-byte load, SASS LDL/STL a register spill. The
CUDA extension's kernels get the same checks from .ci/extension.sh (.ci/check_sass.py on the nvcc objects).
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

triton = pytest.importorskip("triton")
try:
    from triton.backends.compiler import GPUTarget  # noqa: F401
    from triton.backends.nvidia import compiler as _nvidia  # noqa: F401
except Exception as exc:  # a triton without the NVIDIA backend cannot compile for sm_90
    pytest.skip(f"triton has no NVIDIA backend: {exc}", allow_module_level=True)

PROBE = Path(__file__).with_name("triton_codegen.py")


@pytest.fixture(scope="module")
def codegen():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, str(PROBE)], capture_output=True, text=True, env=env, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    result = json.loads(res.stdout)
    if "_unsupported" in result:
        pytest.skip(f"cannot bind kernels for an offline compile with this triton: {result['_unsupported']}")
    return result


ALIGNED = ["targets rows bf16 layer+final layer", "targets rows bf16 instance", "targets instance stats bf16",
           "ema fp32 student", "ema bf16 student", "loss bf16 pred", "loss bf16 pred clones"]


@pytest.mark.parametrize("case", ALIGNED)
def test_aligned_path_uses_16_byte_loads(codegen, case):
    ptx = codegen[case]["ptx"]
    assert ptx.get("ld.global.v4.b32", 0) > 0, f"{case}: no 16-byte global loads in the PTX: {ptx}"
    if case.startswith("targets"):
        # every layer read is vectorized: no 2-byte bf16 loads are left on the aligned path
        assert ptx.get("ld.global.b16", 0) == 0, f"{case}: scalar bf16 loads remain: {ptx}"
    if "sass" in codegen[case]:
        assert codegen[case]["sass"]["LDG.128"] > 0, codegen[case]


def test_unaligned_rows_are_not_vectorized(codegen):
    """Rows of 98 bf16 (196 bytes) are not 16-byte aligned: a 16-byte load there would fault."""
    ptx = codegen["targets rows bf16 unaligned"]["ptx"]
    assert ptx.get("ld.global.v4.b32", 0) == 0 and ptx.get("ld.global.b16", 0) > 0, ptx


def test_no_register_spills(codegen):
    with_sass = {case: c["sass"] for case, c in codegen.items() if "sass" in c}
    if not with_sass:
        pytest.skip("no cuobjdump to disassemble the cubins (set CUOBJDUMP)")
    spilling = {case: s["local"] for case, s in with_sass.items() if s["local"]}
    assert not spilling, f"local-memory (spill) accesses in: {spilling}"
