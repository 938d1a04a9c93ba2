// Device helpers shared by the d2v kernels: fp32 conversion of each dtype, packed vector loads, warp sums.
#pragma once

#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "launch.h"

namespace d2v::cuda {

constexpr int kWarp = 32;

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }

template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) { return x; }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }
template <>
__device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }

// VEC elements of T loaded or stored as one access of sizeof(T) * VEC bytes.
template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Pack {
  T v[VEC];
};

// N elements of T at p, converted to float. When N * sizeof(T) is a multiple of 16 the row is read in 16-byte
// pieces (LDG.E.128; p must be 16-byte aligned), e.g. 8 fp32 targets beside 8 bf16 predictions; otherwise as
// one access of N * sizeof(T) bytes (p aligned to that).
template <typename T, int N>
__device__ __forceinline__ void load_float(const T* p, float (&out)[N]) {
  constexpr int kPiece = 16 / static_cast<int>(sizeof(T));
  if constexpr (N % kPiece == 0) {
#pragma unroll
    for (int c = 0; c < N / kPiece; ++c) {
      const Pack<T, kPiece> pack = reinterpret_cast<const Pack<T, kPiece>*>(p)[c];
#pragma unroll
      for (int v = 0; v < kPiece; ++v) out[c * kPiece + v] = to_float(pack.v[v]);
    }
  } else {
    const Pack<T, N> pack = *reinterpret_cast<const Pack<T, N>*>(p);
#pragma unroll
    for (int v = 0; v < N; ++v) out[v] = to_float(pack.v[v]);
  }
}

template <typename T, int N>
__device__ __forceinline__ void store_float(T* p, const float (&in)[N]) {
  constexpr int kPiece = 16 / static_cast<int>(sizeof(T));
  if constexpr (N % kPiece == 0) {
#pragma unroll
    for (int c = 0; c < N / kPiece; ++c) {
      Pack<T, kPiece> pack;
#pragma unroll
      for (int v = 0; v < kPiece; ++v) pack.v[v] = from_float<T>(in[c * kPiece + v]);
      reinterpret_cast<Pack<T, kPiece>*>(p)[c] = pack;
    }
  } else {
    Pack<T, N> pack;
#pragma unroll
    for (int v = 0; v < N; ++v) pack.v[v] = from_float<T>(in[v]);
    *reinterpret_cast<Pack<T, N>*>(p) = pack;
  }
}

__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
  for (int offset = kWarp / 2; offset > 0; offset /= 2) x += __shfl_xor_sync(0xffffffffu, x, offset);
  return x;
}

__host__ __device__ inline bool aligned(const void* p, int64_t bytes) { return reinterpret_cast<uintptr_t>(p) % bytes == 0; }

// Calls f(T{}) with T the C++ type of `dtype`.
template <class F>
void dispatch(DType dtype, F&& f) {
  switch (dtype) {
    case DType::F32: f(float{}); break;
    case DType::BF16: f(__nv_bfloat16{}); break;
    case DType::F16: f(__half{}); break;
  }
}

}  // namespace d2v::cuda
