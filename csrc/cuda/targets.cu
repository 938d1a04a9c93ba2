// CUDA kernels of `targets`:
//   instance_stats_kernel      tiled per-channel statistics of every layer of a table in one launch: 16-byte
//                              loads along D, a Welford pass per thread over its steps, a Chan merge of the
//                              threads; writes scale = rstd and shift = mean, applied as (x - mean) * rstd
//                              (exactly 0 for a constant channel; x * rstd - mean * rstd, one FMA, is not).
//   targets_rows_reg_kernel    one warp per row, the row accumulated in registers over the K layers (layer k+1
//                              is loaded before layer k is reduced) and written once; D <= 1024.
//   targets_rows_global_kernel rows longer than 1024: accumulated in the output row in memory, as many passes.
// Layers are read through (stride_b, stride_t, 1), so views such as layer[:, 1:] need no copy.
#include "common.cuh"

namespace d2v::cuda {
namespace {

constexpr int kRowsPerBlock = 8;  // warps per block of the row kernels
constexpr int kStatRows = 16;     // steps walked in parallel by a block of the statistics kernel
constexpr int kMaxPerLane = 32;   // floats of a row one lane holds in registers (D <= 32 * 32)

// ------------------------------------------------------------------------------------------------ statistics
// Grid (ceil(D / (32 * VEC)), B, layers), block (32, kStatRows): thread (x, y) owns channels
// [c0, c0 + VEC) of one (b, layer) and steps y, y + kStatRows, ...
template <typename T, int VEC>
__global__ void __launch_bounds__(32 * kStatRows)
    instance_stats_kernel(const LayerTable table, const bool* __restrict__ pad, int64_t T_, int64_t D, int64_t stride_b,
                          int64_t stride_t, float eps) {
  __shared__ float s_n[kStatRows];
  __shared__ float s_mean[kStatRows][32 * VEC];
  __shared__ float s_m2[kStatRows][32 * VEC];
  const int64_t b = blockIdx.y;
  const int layer = blockIdx.z;
  const int64_t c0 = (static_cast<int64_t>(blockIdx.x) * 32 + threadIdx.x) * VEC;
  const bool full = c0 + VEC <= D;  // the whole VEC-wide slice is in the row (VEC > 1 is used only if D % VEC == 0)
  const T* x = static_cast<const T*>(table.ptr[layer]) + b * stride_b + c0;
  const bool* pb = pad == nullptr ? nullptr : pad + b * T_;

  // Welford over this thread's steps: one reciprocal per step, shared by its VEC channels.
  float n = 0.f, mean[VEC], m2[VEC];
#pragma unroll
  for (int j = 0; j < VEC; ++j) mean[j] = m2[j] = 0.f;
  for (int64_t t = threadIdx.y; t < T_; t += kStatRows) {
    if (pb != nullptr && pb[t]) continue;
    n += 1.f;
    if (!full) continue;  // count the step anyway: every thread of a row contributes the same count
    float v[VEC];
    load_float<T, VEC>(x + t * stride_t, v);
    const float inv = 1.f / n;
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      const float d = v[j] - mean[j];
      mean[j] += d * inv;
      m2[j] += d * (v[j] - mean[j]);
    }
  }
  if (threadIdx.x == 0) s_n[threadIdx.y] = n;
#pragma unroll
  for (int j = 0; j < VEC; ++j) {
    s_mean[threadIdx.y][threadIdx.x * VEC + j] = mean[j];
    s_m2[threadIdx.y][threadIdx.x * VEC + j] = m2[j];
  }
  __syncthreads();
  // Chan merge of the kStatRows partial (n, mean, M2), in a fixed order: each thread of row 0 merges its channels.
  if (threadIdx.y != 0 || !full) return;
  float* scale = table.scale[layer] + b * D + c0;
  float* shift = table.shift[layer] + b * D + c0;
#pragma unroll
  for (int j = 0; j < VEC; ++j) {
    float na = s_n[0], ma = s_mean[0][threadIdx.x * VEC + j], qa = s_m2[0][threadIdx.x * VEC + j];
    for (int i = 1; i < kStatRows; ++i) {
      const float nb = s_n[i];
      if (nb == 0.f) continue;
      const float mb = s_mean[i][threadIdx.x * VEC + j], qb = s_m2[i][threadIdx.x * VEC + j];
      const float nn = na + nb, delta = mb - ma, frac = nb / nn;
      ma += delta * frac;
      qa += qb + delta * delta * na * frac;
      na = nn;
    }
    const float rstd = rsqrtf(qa / fmaxf(na, 1.f) + eps);
    scale[j] = rstd;
    shift[j] = ma;
  }
}

// ------------------------------------------------------------------------------------------------ rows
struct RowsArgs {
  LayerTable layers;
  NormKind norm;
  int64_t rows, T, D, stride_b, stride_t;
  float eps, inv_k;
  const int64_t* dest_row;
  float* dest;
  bool accumulate, finalize, final_layer;
};

// Lane `lane` owns elements (c * 32 + lane) * VEC + j, c < CHUNKS, j < VEC, of a row: contiguous VEC-wide
// slices, so each is one 16-byte access when VEC * sizeof(T) == 16. VEC divides D (the launcher's condition),
// so a slice is either wholly inside the row or wholly past its end (then zeros).
template <typename T, int VEC, int CHUNKS>
__device__ __forceinline__ void load_row(const T* x, int64_t D, int lane, float (&v)[CHUNKS * VEC]) {
#pragma unroll
  for (int c = 0; c < CHUNKS; ++c) {
    const int64_t i = (static_cast<int64_t>(c) * kWarp + lane) * VEC;
    float piece[VEC];
    if (i < D) {
      load_float<T, VEC>(x + i, piece);
    } else {
#pragma unroll
      for (int j = 0; j < VEC; ++j) piece[j] = 0.f;
    }
#pragma unroll
    for (int j = 0; j < VEC; ++j) v[c * VEC + j] = piece[j];
  }
}

// Mean and rstd of a row held in registers: two passes over registers, exact; slices past D are ignored
// (they may hold anything: (0 - mean) * rstd after a normalization).
template <int VEC, int CHUNKS>
__device__ __forceinline__ void reg_row_stats(const float (&v)[CHUNKS * VEC], int64_t D, int lane, float eps,
                                              float& mean, float& rstd) {
  float s = 0.f;
#pragma unroll
  for (int c = 0; c < CHUNKS; ++c) {
    const bool in_row = (static_cast<int64_t>(c) * kWarp + lane) * VEC < D;
#pragma unroll
    for (int j = 0; j < VEC; ++j) s += in_row ? v[c * VEC + j] : 0.f;
  }
  mean = warp_sum(s) / static_cast<float>(D);
  float sq = 0.f;
#pragma unroll
  for (int c = 0; c < CHUNKS; ++c) {
    const bool in_row = (static_cast<int64_t>(c) * kWarp + lane) * VEC < D;
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      const float d = in_row ? v[c * VEC + j] - mean : 0.f;
      sq += d * d;
    }
  }
  rstd = rsqrtf(warp_sum(sq) / static_cast<float>(D) + eps);
}

template <typename T, int VEC, int CHUNKS>
__global__ void targets_rows_reg_kernel(const RowsArgs a) {
  constexpr int N = CHUNKS * VEC;
  const int lane = threadIdx.x % kWarp;
  const int64_t r = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + threadIdx.x / kWarp;
  if (r >= a.rows) return;
  const int64_t o = a.dest_row == nullptr ? r : a.dest_row[r];
  if (o < 0) return;
  const int64_t b = r / a.T, t = r - b * a.T, D = a.D;  // one division per row
  const int64_t in_off = b * a.stride_b + t * a.stride_t;
  float* out = a.dest + o * D;

  float acc[N];
  if (a.accumulate) {
    load_row<float, VEC, CHUNKS>(out, D, lane, acc);
  } else {
#pragma unroll
    for (int e = 0; e < N; ++e) acc[e] = 0.f;
  }
  float cur[N];
  load_row<T, VEC, CHUNKS>(static_cast<const T*>(a.layers.ptr[0]) + in_off, D, lane, cur);
  for (int k = 0; k < a.layers.count; ++k) {
    float nxt[N];
    if (k + 1 < a.layers.count) {  // prefetch the next layer before this one's reductions
      load_row<T, VEC, CHUNKS>(static_cast<const T*>(a.layers.ptr[k + 1]) + in_off, D, lane, nxt);
    }
    if (a.norm == NormKind::Layer) {
      float mean, rstd;
      reg_row_stats<VEC, CHUNKS>(cur, D, lane, a.eps, mean, rstd);
#pragma unroll
      for (int e = 0; e < N; ++e) acc[e] += (cur[e] - mean) * rstd;
    } else if (a.norm == NormKind::Instance) {
      // scale/shift of (b, layer) one slice at a time: holding the whole row of both would spill.
      const float* scale = a.layers.scale[k] + b * D;
      const float* shift = a.layers.shift[k] + b * D;
#pragma unroll
      for (int c = 0; c < CHUNKS; ++c) {
        const int64_t i = (static_cast<int64_t>(c) * kWarp + lane) * VEC;
        if (i >= D) continue;
        float sc[VEC], sh[VEC];
        load_float<float, VEC>(scale + i, sc);
        load_float<float, VEC>(shift + i, sh);
#pragma unroll
        for (int j = 0; j < VEC; ++j) acc[c * VEC + j] += (cur[c * VEC + j] - sh[j]) * sc[j];
      }
    } else {
#pragma unroll
      for (int e = 0; e < N; ++e) acc[e] += cur[e];
    }
#pragma unroll
    for (int e = 0; e < N; ++e) cur[e] = nxt[e];
  }
  if (a.finalize) {
#pragma unroll
    for (int e = 0; e < N; ++e) acc[e] *= a.inv_k;
    if (a.final_layer) {
      float mean, rstd;
      reg_row_stats<VEC, CHUNKS>(acc, D, lane, a.eps, mean, rstd);
#pragma unroll
      for (int e = 0; e < N; ++e) acc[e] = (acc[e] - mean) * rstd;
    }
  }
  // The single write of the row: fp32 in 16-byte pieces.
#pragma unroll
  for (int c = 0; c < CHUNKS; ++c) {
    const int64_t i = (static_cast<int64_t>(c) * kWarp + lane) * VEC;
    float piece[VEC];
#pragma unroll
    for (int j = 0; j < VEC; ++j) piece[j] = acc[c * VEC + j];
    if (i < D) store_float<float, VEC>(out + i, piece);
  }
}

// Mean and rstd of one row of n elements read from memory by a warp, two-pass.
template <typename T, int VEC>
__device__ void mem_row_stats(const T* x, int64_t n, int lane, float eps, float& mean, float& rstd) {
  float s = 0.f;
  for (int64_t i = static_cast<int64_t>(lane) * VEC; i < n; i += kWarp * VEC) {
    float v[VEC];
    load_float<T, VEC>(x + i, v);
#pragma unroll
    for (int j = 0; j < VEC; ++j) s += v[j];
  }
  mean = warp_sum(s) / static_cast<float>(n);
  float sq = 0.f;
  for (int64_t i = static_cast<int64_t>(lane) * VEC; i < n; i += kWarp * VEC) {
    float v[VEC];
    load_float<T, VEC>(x + i, v);
#pragma unroll
    for (int j = 0; j < VEC; ++j) sq += (v[j] - mean) * (v[j] - mean);
  }
  rstd = rsqrtf(warp_sum(sq) / static_cast<float>(n) + eps);
}

// Rows longer than registers hold: each lane owns the same VEC-wide slices of the row in every pass, so the
// accumulation in `dest` needs no synchronization. VEC divides D.
template <typename T, int VEC>
__global__ void __launch_bounds__(kRowsPerBlock * kWarp) targets_rows_global_kernel(const RowsArgs a) {
  const int lane = threadIdx.x % kWarp;
  const int64_t r = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + threadIdx.x / kWarp;
  if (r >= a.rows) return;
  const int64_t o = a.dest_row == nullptr ? r : a.dest_row[r];
  if (o < 0) return;
  const int64_t b = r / a.T, t = r - b * a.T, D = a.D;
  float* acc = a.dest + o * D;
  for (int k = 0; k < a.layers.count; ++k) {
    const T* x = static_cast<const T*>(a.layers.ptr[k]) + b * a.stride_b + t * a.stride_t;
    float mean = 0.f, rstd = 1.f;
    if (a.norm == NormKind::Layer) mem_row_stats<T, VEC>(x, D, lane, a.eps, mean, rstd);
    const float* sc = a.norm == NormKind::Instance ? a.layers.scale[k] + b * D : nullptr;
    const float* sh = a.norm == NormKind::Instance ? a.layers.shift[k] + b * D : nullptr;
    const bool first = k == 0 && !a.accumulate;
    for (int64_t i = static_cast<int64_t>(lane) * VEC; i < D; i += kWarp * VEC) {
      float v[VEC], y[VEC];
      load_float<T, VEC>(x + i, v);
      if (first) {
#pragma unroll
        for (int j = 0; j < VEC; ++j) y[j] = 0.f;
      } else {
        load_float<float, VEC>(acc + i, y);
      }
#pragma unroll
      for (int j = 0; j < VEC; ++j) y[j] += sc != nullptr ? (v[j] - sh[i + j]) * sc[i + j] : (v[j] - mean) * rstd;
      store_float<float, VEC>(acc + i, y);
    }
  }
  if (!a.finalize) return;
  float mean = 0.f, rstd = 1.f;
  if (a.final_layer) {
    // Statistics of inv_k * acc: scale the stats of acc rather than rereading.
    mem_row_stats<float, VEC>(acc, D, lane, 0.f, mean, rstd);  // rstd = 1/sqrt(var(acc))
    const float var = a.inv_k * a.inv_k / (rstd * rstd);
    mean *= a.inv_k;
    rstd = rsqrtf(var + a.eps);
  }
  for (int64_t i = static_cast<int64_t>(lane) * VEC; i < D; i += kWarp * VEC) {
    float y[VEC];
    load_float<float, VEC>(acc + i, y);
#pragma unroll
    for (int j = 0; j < VEC; ++j) y[j] = (y[j] * a.inv_k - mean) * rstd;
    store_float<float, VEC>(acc + i, y);
  }
}

template <typename T, int VEC, int CHUNKS>
void launch_reg(const RowsArgs& args, dim3 grid, dim3 block, cudaStream_t stream) {
  targets_rows_reg_kernel<T, VEC, CHUNKS><<<grid, block, 0, stream>>>(args);
}

// The register kernel with the fewest chunks that cover D (D <= 32 * VEC * CHUNKS, CHUNKS * VEC <= 32).
template <typename T, int VEC>
bool launch_reg_for(const RowsArgs& args, dim3 grid, dim3 block, cudaStream_t stream) {
  const int64_t per_lane = (args.D + kWarp - 1) / kWarp;  // elements per lane
  const int64_t chunks = (per_lane + VEC - 1) / VEC;
  if (chunks * VEC > kMaxPerLane) return false;
  if constexpr (VEC == 1) {  // the unaligned fallback: one instantiation covers every D <= 1024
    launch_reg<T, 1, kMaxPerLane>(args, grid, block, stream);
  } else {
    static_assert(4 * VEC <= kMaxPerLane, "a lane holds at least 4 vector chunks");
    if (chunks <= 1) launch_reg<T, VEC, 1>(args, grid, block, stream);
    else if (chunks <= 2) launch_reg<T, VEC, 2>(args, grid, block, stream);
    else if (chunks <= 4) launch_reg<T, VEC, 4>(args, grid, block, stream);
    else launch_reg<T, VEC, (8 * VEC <= kMaxPerLane ? 8 : 4)>(args, grid, block, stream);  // fp32 only
  }
  return true;
}

bool aligned_rows(const LayerTable& layers, int64_t stride_b, int64_t stride_t, int64_t elem) {
  if ((stride_b * elem) % 16 != 0 || (stride_t * elem) % 16 != 0) return false;
  for (int k = 0; k < layers.count; ++k) {
    if (!aligned(layers.ptr[k], 16)) return false;
  }
  return true;
}

}  // namespace

cudaError_t instance_stats(const LayerTable& layers, DType dtype, const bool* pad, int64_t B, int64_t T, int64_t D,
                           int64_t stride_b, int64_t stride_t, float eps, cudaStream_t stream) {
  dispatch(dtype, [&](auto tag) {
    using T_ = decltype(tag);
    constexpr int kVec = 16 / sizeof(T_);
    const bool vec = D % kVec == 0 && aligned_rows(layers, stride_b, stride_t, sizeof(T_));
    const int per_block = 32 * (vec ? kVec : 1);
    const dim3 grid(static_cast<unsigned>((D + per_block - 1) / per_block), static_cast<unsigned>(B),
                    static_cast<unsigned>(layers.count));
    const dim3 block(32, kStatRows);
    if (vec) {
      instance_stats_kernel<T_, kVec><<<grid, block, 0, stream>>>(layers, pad, T, D, stride_b, stride_t, eps);
    } else {
      instance_stats_kernel<T_, 1><<<grid, block, 0, stream>>>(layers, pad, T, D, stride_b, stride_t, eps);
    }
  });
  return cudaGetLastError();
}

cudaError_t targets_rows(const LayerTable& layers, DType dtype, NormKind norm, int64_t B, int64_t T, int64_t D,
                         int64_t stride_b, int64_t stride_t, float eps, const int64_t* dest_row, float* dest,
                         bool accumulate, bool finalize, float inv_k, bool final_layer, cudaStream_t stream) {
  const RowsArgs args{layers, norm,     B * T,  T,    D,        stride_b,   stride_t,   eps,
                      inv_k,  dest_row, dest,   accumulate,     finalize,   final_layer};
  const dim3 grid(static_cast<unsigned>((B * T + kRowsPerBlock - 1) / kRowsPerBlock));
  const dim3 block(kRowsPerBlock * kWarp);
  dispatch(dtype, [&](auto tag) {
    using T_ = decltype(tag);
    constexpr int kVec = 16 / sizeof(T_);
    // 16-byte loads when every row starts 16-byte aligned (and the fp32 output rows too); else scalar.
    const bool vec = D % kVec == 0 && aligned(dest, 16) && (D * sizeof(float)) % 16 == 0 &&
                     aligned_rows(layers, stride_b, stride_t, sizeof(T_));
    if (vec ? launch_reg_for<T_, kVec>(args, grid, block, stream) : launch_reg_for<T_, 1>(args, grid, block, stream)) {
      return;
    }
    if (vec) {
      targets_rows_global_kernel<T_, kVec><<<grid, block, 0, stream>>>(args);
    } else {
      targets_rows_global_kernel<T_, 1><<<grid, block, 0, stream>>>(args);
    }
  });
  return cudaGetLastError();
}

}  // namespace d2v::cuda
