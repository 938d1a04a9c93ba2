// CUDA kernel of `ema_update_`: one launch over a table of chunks covering every (teacher, student) pair. The
// table lives on the device and is built once per parameter set by the caller (ops_cuda.cpp caches it).
#include "common.cuh"

namespace d2v::cuda {
namespace {

constexpr int kThreads = 256;

// kVec = 16 / sizeof(S) elements per access: one 16-byte student load (8 bf16/fp16 or 4 fp32) and one or two
// 16-byte teacher loads and stores.
template <typename S, int kVec = 16 / static_cast<int>(sizeof(S))>
__device__ void lerp_chunk(float* __restrict__ t, const S* __restrict__ s, int64_t n, float w) {
  // The pointers come from a table in device memory, so the compiler cannot tell their address space and
  // would emit generic LD/ST.E.128; they are global memory, and saying so gives LDG/STG.E.128.
  __builtin_assume(__isGlobal(t));
  __builtin_assume(__isGlobal(s));
  // Vector path: chunk starts are multiples of kEmaChunk, so a 16-byte aligned tensor stays aligned.
  const bool vec = aligned(t, 16) && aligned(s, 16);
  int64_t i = static_cast<int64_t>(threadIdx.x) * kVec;
  if (vec) {
    for (; i + kVec <= n; i += kThreads * kVec) {
      float tv[kVec], sv[kVec];
      load_float<float, kVec>(t + i, tv);
      load_float<S, kVec>(s + i, sv);
#pragma unroll
      for (int j = 0; j < kVec; ++j) tv[j] += w * (sv[j] - tv[j]);
      store_float<float, kVec>(t + i, tv);
    }
    // The tail (n % kVec elements) is left to the scalar loop below.
    i = (n / kVec) * kVec + threadIdx.x;
  } else {
    i = threadIdx.x;
  }
  for (; i < n; i += kThreads) t[i] += w * (to_float(s[i]) - t[i]);
}

__global__ void ema_kernel(const EmaTensor* __restrict__ tensors, const EmaChunk* __restrict__ chunks, float w) {
  const EmaChunk chunk = chunks[blockIdx.x];
  const EmaTensor tensor = tensors[chunk.tensor];
  const int64_t n = min(kEmaChunk, tensor.numel - chunk.begin);
  float* t = tensor.teacher + chunk.begin;
  switch (tensor.student_dtype) {
    case DType::F32: lerp_chunk(t, static_cast<const float*>(tensor.student) + chunk.begin, n, w); break;
    case DType::BF16: lerp_chunk(t, static_cast<const __nv_bfloat16*>(tensor.student) + chunk.begin, n, w); break;
    case DType::F16: lerp_chunk(t, static_cast<const __half*>(tensor.student) + chunk.begin, n, w); break;
  }
}

}  // namespace

cudaError_t ema_update(const EmaTensor* tensors, const EmaChunk* chunks, int64_t num_chunks, float w,
                       cudaStream_t stream) {
  // Launch in slices of at most 2^31 - 1 blocks (never more than one in practice).
  for (int64_t first = 0; first < num_chunks; first += 0x7fffffff) {
    const int64_t n = std::min<int64_t>(num_chunks - first, 0x7fffffff);
    ema_kernel<<<static_cast<unsigned>(n), kThreads, 0, stream>>>(tensors, chunks + first, w);
  }
  return cudaGetLastError();
}

}  // namespace d2v::cuda
