#!/usr/bin/env bash
# Every GPU figure in one session, on a bare GPU machine with no network. Run from the repository root:
#
#     bench/run_gpu.sh [OUT_DIR]        # default: $OUT, else ./bench-out
#
# Needs: python3 (or $PYTHON) with a CUDA build of torch, triton and pytest already installed (nothing is
# downloaded), nvcc for the extension. Steps, each bounded by `timeout` (STEP_SECONDS, default 470 s, under
# 8 minutes) so that a session with a per-command limit can also run them one by one (bench/run_gpu.sh --list,
# bench/run_gpu.sh OUT_DIR STEP...):
#   env          device, driver, versions                                       -> env.txt
#   install      offline editable install that builds the CUDA extension
#                (pip install --no-build-isolation --no-deps -e ., D2V_BUILD_EXT=1, sm_XY of this GPU)
#   tests-triton every Triton test on CUDA tensors (compiled, not interpreted)
#   tests-cuda   the cuda-marked tests of the extension (cuda backend), Triton and torch on the GPU
#   codegen      the no-GPU PTX/SASS checks, for the record                      -> codegen.json
#   bench-*      the full kernel benchmark, one op (or case) per step; each row is appended to kernels.jsonl as
#                soon as it is measured, so a step cut short keeps every finished row
# Every step appends {"step", "rc", "seconds"} to steps.jsonl and writes OUT/<step>.log. A failed step does not
# stop the next ones (the benchmark still runs if the extension failed to build: its rows are just absent).
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

STEPS=(env install tests-triton tests-cuda codegen bench-targets-vitb bench-targets-vitl bench-targets-speech bench-ema-vitb bench-ema-vitl
       bench-loss)
if [[ "${1:-}" == "--list" ]]; then printf '%s\n' "${STEPS[@]}"; exit 0; fi
out="${1:-${OUT:-./bench-out}}"
shift || true
[[ $# -gt 0 ]] && STEPS=("$@")
mkdir -p "$out"
out="$(cd "$out" && pwd)"
py="${PYTHON:-python3}"
limit="${STEP_SECONDS:-470}"
unset TRITON_INTERPRET  # the interpreter would make Triton refuse CUDA tensors
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-8}" PYTHONUNBUFFERED=1 TRITON_DEFAULT_FP_FUSION=1
bench=("$py" -c 'from d2v.bench.cli import app; app()' kernels --device cuda --jsonl "$out/kernels.jsonl")

run_step() {
  local name=$1
  shift
  local start=$SECONDS
  echo "== $name (limit ${limit}s)"
  timeout --signal=TERM --kill-after=20 "$limit" "$@" > "$out/$name.log" 2>&1
  local rc=$?
  tail -n 25 "$out/$name.log"
  printf '{"step": "%s", "rc": %d, "seconds": %d}\n' "$name" "$rc" $((SECONDS - start)) >> "$out/steps.jsonl"
  echo "== $name: rc=$rc in $((SECONDS - start)) s"
  return $rc
}

step_env() {
  date -u +"date: %Y-%m-%dT%H:%M:%SZ"
  git rev-parse HEAD 2>/dev/null | sed 's/^/commit: /'
  nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap --format=csv,noheader 2>&1 | sed 's/^/gpu: /'
  "$py" -c 'import torch, triton; print("torch", torch.__version__, "cuda", torch.version.cuda, "triton", triton.__version__,
"| gpu", torch.cuda.get_device_name(0), "| capability", torch.cuda.get_device_capability(0))'
  command -v nvcc && nvcc --version | tail -1
}

step_install() {
  local arch
  arch="$("$py" -c 'import torch; print("%d%d" % torch.cuda.get_device_capability(0))')"
  D2V_BUILD_EXT=1 D2V_CUDA_ARCHS="${D2V_CUDA_ARCHS:-$arch}" MAX_JOBS="${MAX_JOBS:-16}" \
    "$py" -m pip install --no-build-isolation --no-deps --no-index -e . || return 1
  "$py" -c 'import torch, d2v.ops.extension as e; print(e.status("cuda")); assert e.status("cuda")[0]'
}

step_tests_triton() {  # on a GPU every test of this file runs compiled Triton on CUDA tensors
  "$py" -m pytest -q -p no:cacheprovider tests/test_triton_ops.py
}

step_tests_cuda() {  # the cuda-marked cases of every backend: extension (cuda), triton and torch on the GPU
  "$py" -m pytest -q -m cuda -p no:cacheprovider tests/test_extension.py tests/test_ops.py tests/test_bench.py
}

export py out
export -f step_env step_install step_tests_triton step_tests_cuda
export PIP_BREAK_SYSTEM_PACKAGES=1  # a bare machine's system python may be marked externally managed

for step in "${STEPS[@]}"; do
  case "$step" in
    env) run_step env bash -c step_env; cp "$out/env.log" "$out/env.txt" ;;
    install) run_step install bash -c step_install ;;
    tests-triton) run_step tests-triton bash -c step_tests_triton ;;
    tests-cuda) run_step tests-cuda bash -c step_tests_cuda ;;
    codegen) run_step codegen sh -c "'$py' tests/triton_codegen.py > '$out/codegen.json'" ;;
    bench-targets-vitb) run_step "$step" "${bench[@]}" --ops targets --case ViT-B ;;
    bench-targets-vitl) run_step "$step" "${bench[@]}" --ops targets --case ViT-L ;;
    bench-targets-speech) run_step "$step" "${bench[@]}" --ops targets --case speech ;;
    bench-ema-vitb) run_step "$step" "${bench[@]}" --ops ema --case ViT-B ;;
    bench-ema-vitl) run_step "$step" "${bench[@]}" --ops ema --case ViT-L ;;
    bench-loss) run_step "$step" "${bench[@]}" --ops loss ;;
    *) echo "unknown step $step; bench/run_gpu.sh --list names them" >&2 ;;
  esac
done
echo "results in $out: steps.jsonl, kernels.jsonl, *.log"
! grep -q '"rc": [1-9]' "$out/steps.jsonl"
