#!/usr/bin/env bash
# One GPU session's checks and figures in a single command, sized for a lease of a few minutes: the offline
# install, the GPU tests, the kernel benchmark and end-to-end `d2v pretrain` runs on the GPU, overlapped where
# that cannot distort a timing, each step bounded by what is left of a global deadline. Run from the repository root:
#
#     bench/gpu_session.sh OUT_DIR [SECONDS]     # SECONDS: the whole budget (default 520)
#
# Offline: needs python3 (or $PYTHON) with a CUDA build of torch, triton, pytest, typer, rich, safetensors,
# scikit-learn, tokenizers; nvcc for the extension; soundfile for the speech runs (skipped without it).
# Order (what runs at the same time is on one line):
#   1. env; pure-Python editable install (seconds)
#   2. CUDA extension built in place in the background  ||  Triton tests on the GPU  ||  pretrain smoke runs
#      (vision/speech/text x v1/v2, fp32 and bf16, kernels=auto)
#   3. cuda-marked tests (extension, Triton, torch on the GPU)
#   4. the kernel benchmark, alone on the GPU (all ops and cases in one process) -> kernels.jsonl
#   5. pretrain with --kernels cuda and with --compile on; `d2v bench pretrain --breakdown` on the GPU
# Every step appends {"step", "rc", "seconds"} to OUT/steps.jsonl and writes OUT/<step>.log.
#
# GPU_PLAN=scale (issue 28): instead of steps 2-5, the figures at the sizes users train, each step appending its rows
# to OUT/scale.jsonl as they are measured (bench/scale.py): scale-steps (samples/s, MFU, peak memory of ViT-B/16 v1
# and v2, ViT-L/16 v2, speech base v2 15 s, text base v2 512 tokens in bf16, and ViT-B v1 with fp32 / unfused AdamW /
# compile / activation checkpointing), scale-fit (largest ViT-L v2 micro-batch without and with checkpointing),
# scale-sdpa (the attention kernel each encoder runs), scale-peer (d2v / birder at ViT-B/16, v1 and v2; needs
# .whl/birder-0.8.4-py3-none-any.whl carried along: `python3 -m pip download --no-deps birder==0.8.4 -d .whl`),
# scale-data (a generated JPEG folder: loader samples/s, training samples/s from it, nvJPEG decode). About 12 minutes
# in all: two calls, e.g.
#     GPU_PLAN=scale GPU_ONLY="scale-steps scale-fit scale-sdpa" bench/gpu_session.sh OUT 560
#     GPU_PLAN=scale GPU_ONLY="scale-peer scale-data" bench/gpu_session.sh OUT2 560
# DRY=1 runs the plan on tiny shapes on the CPU, without installing anything (tests/test_gpu_prep.py).
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
out="${1:?usage: bench/gpu_session.sh OUT_DIR [SECONDS]}"
budget="${2:-520}"
mkdir -p "$out" && out="$(cd "$out" && pwd)"
py="${PYTHON:-python3}"
unset TRITON_INTERPRET
export PYTHONUNBUFFERED=1 TRITON_DEFAULT_FP_FUSION=1 PIP_BREAK_SYSTEM_PACKAGES=1 OMP_NUM_THREADS=4
end=$((SECONDS + budget))
runs="$out/runs-tmp"
mkdir -p "$runs"

step() {  # step NAME LIMIT CMD...: run CMD under min(LIMIT, time left - 5 s), log and record it
  local name=$1 limit=$2
  shift 2
  if [[ -n "${GPU_ONLY:-}" && " env install-py install-birder build-ext ext-status $GPU_ONLY " != *" $name "* ]]; then
    return 0  # GPU_ONLY="step ...": a rerun of some steps (the install steps always run)
  fi
  local left=$((end - SECONDS - 5))
  ((left < limit)) && limit=$left
  if ((limit < 10)); then
    printf '{"step": "%s", "rc": -1, "seconds": 0, "why": "no time left"}\n' "$name" >> "$out/steps.jsonl"
    return 1
  fi
  local start=$SECONDS
  timeout --signal=TERM --kill-after=10 "$limit" "$@" > "$out/$name.log" 2>&1
  local rc=$?
  printf '{"step": "%s", "rc": %d, "seconds": %d}\n' "$name" "$rc" $((SECONDS - start)) >> "$out/steps.jsonl"
  echo "== $name: rc=$rc in $((SECONDS - start)) s"
  ((rc != 0)) && tail -n 15 "$out/$name.log"
  return $rc
}

d2v_() { "$py" -m d2v "$@"; }
export -f d2v_
export py

pretrain_smoke() {  # pretrain_smoke TAG [d2v pretrain options]: a short run on the GPU, then its summary line
  local tag=$1
  shift
  d2v_ pretrain --device cuda --steps 30 --no-progress --out "$runs/$tag" "$@" &&
    ls "$runs/$tag" && tail -n 3 "$runs/$tag"/*.jsonl 2>/dev/null | tail -n 3
}
export -f pretrain_smoke
export runs

# 1. environment and the pure-Python install
step env 30 bash -c 'nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap --format=csv,noheader;
  "$py" -c "import torch, triton; print(torch.__version__, torch.version.cuda, triton.__version__, torch.cuda.get_device_name(0))";
  nvcc --version | tail -1; nproc; git rev-parse HEAD 2>/dev/null'
cp "$out/env.log" "$out/env.txt" 2>/dev/null
[[ -z "${DRY:-}" ]] && step install-py 90 env D2V_BUILD_EXT=0 "$py" -m pip install --no-build-isolation --no-deps --no-index -e .

if [[ "${GPU_PLAN:-}" == scale ]]; then
  dry=()
  [[ -n "${DRY:-}" ]] && dry=(--dry)
  if [[ -z "${DRY:-}" ]] && compgen -G ".whl/birder-*.whl" > /dev/null; then  # birder alone: no dependency installed
    step install-birder 60 "$py" -m pip install -q --no-index --no-deps --no-compile --target "$out/site" .whl/birder-*.whl &&
      export PYTHONPATH="$out/site${PYTHONPATH:+:$PYTHONPATH}"
  fi
  declare -A limit=([steps]=300 [fit]=200 [sdpa]=60 [peer]=300 [data]=240)
  for what in steps fit sdpa peer data; do
    step "scale-$what" "${limit[$what]}" "$py" -m d2v.bench.scale "$what" --jsonl "$out/scale.jsonl" \
      --work "$runs/scale-$what" "${dry[@]}"
  done
  rm -rf "$runs" "$out/site"
  echo "results in $out"
  ! grep -v '"step": "env"' "$out/steps.jsonl" | grep -q '"rc": [1-9-]'
  exit
fi

# 2. the extension builds on the CPUs while the GPU runs the Triton tests and the smoke runs
arch="$("$py" -c 'import torch; print("%d%d" % torch.cuda.get_device_capability(0))')"
step build-ext 300 env D2V_BUILD_EXT=1 D2V_CUDA_ARCHS="$arch" MAX_JOBS=10 "$py" setup.py -q build_ext --inplace &
build_pid=$!
step tests-triton 200 "$py" -m pytest -q --maxfail=10 -p no:cacheprovider tests/test_triton_ops.py &
tri_pid=$!
step smoke-auto 240 bash -c '
  bad=0
  for spec in "vision-v1 --modality vision" "vision-v2-bf16 --modality vision --recipe v2 --precision bf16" \
              "text-v1-bf16 --modality text --precision bf16" "text-v2 --modality text --recipe v2" \
              "speech-v1-bf16 --modality speech --precision bf16" "speech-v2 --modality speech --recipe v2"; do
    set -- $spec; tag=$1; shift
    echo "### $tag: d2v pretrain $*"; s=$SECONDS
    if pretrain_smoke "$tag" "$@"; then echo "### $tag ok in $((SECONDS - s)) s"; else echo "### $tag FAILED"; bad=1; fi
  done
  exit $bad'
wait "$tri_pid" "$build_pid"
step ext-status 30 "$py" -c 'import d2v.ops.extension as e; print(e.status("cuda"), e.status("cpu"))'

# 3. the cuda-marked tests of every backend
# (a test that kills the interpreter would hide the rest: the shape-check one runs last, on its own)
raise_test=tests/test_extension.py::test_loss_clones_wrong_shapes_raise_in_the_kernel
step tests-cuda 150 "$py" -m pytest -q -rfE --maxfail=20 -m cuda -p no:cacheprovider --deselect "$raise_test[cuda]" \
  tests/test_extension.py tests/test_ops.py tests/test_bench.py
step tests-cuda-raise 60 "$py" -X faulthandler -m pytest -q -rfE -p no:cacheprovider "$raise_test"

# 4. the kernel benchmark alone on the GPU
step bench-kernels 200 "$py" -m d2v bench kernels --device cuda --jsonl "$out/kernels.jsonl"

# 5. the extension's kernels and torch.compile inside training; where a GPU step's time goes
step smoke-cuda 90 bash -c 'pretrain_smoke vision-v1-cuda --modality vision --kernels cuda --precision bf16;
  a=$?; pretrain_smoke text-v2-cuda --modality text --recipe v2 --kernels cuda && exit $a'
step bench-pretrain 120 "$py" -m d2v bench pretrain --breakdown --warmup 5 --json "$out/breakdown.json" -- \
  --modality vision --device cuda --precision bf16 --steps 40 --out "$runs/breakdown"
step smoke-compile 120 bash -c 'pretrain_smoke vision-v1-compile --modality vision --compile on --steps 60'
rm -rf "$runs"
echo "results in $out"
! grep -q '"rc": [1-9-]' "$out/steps.jsonl"
