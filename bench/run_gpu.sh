#!/usr/bin/env bash
# One call for a session with a GPU: the GPU-marked tests (Triton compiled, not interpreted) and the full
# kernel benchmark. Results land in $1 (default $OUT, else ./bench-out): pytest.log, bench.log, kernels.json,
# env.txt. Run from the repository root with d2v installed (pip install -e '.[test]').
set -uo pipefail
out="${1:-${OUT:-./bench-out}}"
mkdir -p "$out"
unset TRITON_INTERPRET  # the interpreter would make Triton refuse CUDA tensors
py="${PYTHON:-python}"

{
  date -u +"date: %Y-%m-%dT%H:%M:%SZ"
  git rev-parse HEAD 2>/dev/null | sed 's/^/commit: /'
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null | sed 's/^/gpu: /'
  "$py" -c 'import torch, triton; print("torch", torch.__version__, "cuda", torch.version.cuda, "triton", triton.__version__)'
} > "$out/env.txt" 2>&1
cat "$out/env.txt"

"$py" -m pytest -q -m "cuda or triton" tests/test_triton_ops.py tests/test_bench.py 2>&1 | tee "$out/pytest.log"
tests_rc=${PIPESTATUS[0]}

COLUMNS=200 "$py" -c 'from d2v.bench.cli import app; app()' kernels --device cuda --json "$out/kernels.json" \
  2>&1 | tee "$out/bench.log"
bench_rc=${PIPESTATUS[0]}

echo "tests rc=$tests_rc bench rc=$bench_rc; results in $out"
exit $(( tests_rc != 0 || bench_rc != 0 ))
