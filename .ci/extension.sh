#!/usr/bin/env bash
# CI check of the compiled extension, run after `pip install -e .`:
#   1. every csrc/cuda/*.cu compiles with nvcc for sm_80 and sm_90 (no GPU needed: the kernels include only the
#      CUDA toolkit's headers), and the SASS of those objects passes .ci/check_sass.py: 128-bit global loads
#      (LDG.E.128) on the vector path of every hot kernel, no local-memory spills (cuobjdump from the toolkit, or
#      the copy bundled with triton; the check is skipped with a notice when neither exists);
#   2. the CUDA glue (csrc/cuda/ops_cuda.cpp) passes a syntax check against torch's headers when the toolkit
#      and the torch headers it needs are present;
#   3. the CMake build (CPU module + the CUDA kernels as an object library) configures and builds.
# Fails on the first error. Env: PYTHON (default: python), NVCC (default: from PATH or /usr/local/cuda/bin),
# D2V_CUDA_ARCHS (default "80 90"), JOBS (default: nproc).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python}"
ARCHS="${D2V_CUDA_ARCHS:-80 90}"
JOBS="${JOBS:-$(nproc)}"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
cd "$ROOT"

NVCC="${NVCC:-$(command -v nvcc || true)}"
[[ -z "$NVCC" && -x /usr/local/cuda/bin/nvcc ]] && NVCC=/usr/local/cuda/bin/nvcc
if [[ -z "$NVCC" ]]; then
  echo "extension.sh: nvcc not found (set NVCC or put it on PATH)" >&2
  exit 1
fi

echo "== nvcc: $("$NVCC" --version | tail -1)"
gencode=()
for arch in $ARCHS; do gencode+=("-gencode=arch=compute_${arch},code=sm_${arch}"); done
pids=()
for cu in csrc/cuda/*.cu; do
  obj="$WORK/$(basename "${cu%.cu}").o"
  echo "   compiling $cu (sm_${ARCHS// /, sm_})"
  "$NVCC" -std=c++17 -O3 -Xcompiler -fPIC -Icsrc "${gencode[@]}" -c "$cu" -o "$obj" &
  pids+=($!)
done
for pid in "${pids[@]}"; do wait "$pid"; done

echo "== SASS of the kernels: 128-bit loads in the hot kernels, no spills"
set +e
"$PYTHON" .ci/check_sass.py "$WORK"/*.o
sass_rc=$?
set -e
if [[ $sass_rc -eq 2 ]]; then
  echo "   skipped: no cuobjdump (install the CUDA toolkit's cuobjdump or triton, or set CUOBJDUMP)"
elif [[ $sass_rc -ne 0 ]]; then
  exit 1
fi

echo "== syntax check of csrc/cuda/ops_cuda.cpp against torch's headers"
TORCH_INC="$("$PYTHON" -c 'from torch.utils.cpp_extension import include_paths; print(" ".join(include_paths()))')"
PY_INC="$("$PYTHON" -c 'import sysconfig; print(sysconfig.get_paths()["include"])')"
CUDA_INC=""
for dir in "${CUDA_HOME:-}/include" "$(dirname "$(dirname "$(readlink -f "$NVCC")")")/include" /usr/local/cuda/include; do
  if [[ -f "$dir/cuda_runtime.h" ]]; then CUDA_INC="$dir"; break; fi
done
[[ -n "$CUDA_INC" ]] || { echo "extension.sh: cuda_runtime.h not found (set CUDA_HOME)" >&2; exit 1; }
incs=(-I"$PY_INC" -I"$CUDA_INC" -Icsrc)
for dir in $TORCH_INC; do incs+=(-I"$dir"); done
# A CPU wheel ships c10/cuda headers but not the generated cuda_cmake_macros.h: an empty one stands in.
mkdir -p "$WORK/stub/c10/cuda/impl"
echo "#pragma once" > "$WORK/stub/c10/cuda/impl/cuda_cmake_macros.h"
"${CXX:-g++}" -std=c++20 -fsyntax-only -DD2V_WITH_CUDA -I"$WORK/stub" "${incs[@]}" csrc/cuda/ops_cuda.cpp csrc/ops.cpp

echo "== CMake configure + build"
cmake -S . -B "$WORK/build" -DPython_EXECUTABLE="$(command -v "$PYTHON")" -DCMAKE_CUDA_COMPILER="$NVCC" \
  -DD2V_CUDA_ARCHS="${ARCHS// /;}" $(command -v ninja >/dev/null && echo -G Ninja) > "$WORK/cmake.log" 2>&1 \
  || { cat "$WORK/cmake.log"; exit 1; }
grep "d2v:" "$WORK/cmake.log" || true
cmake --build "$WORK/build" -j "$JOBS"
echo "== extension.sh: OK"
