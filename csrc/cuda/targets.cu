// CUDA kernels of `targets`: instance-norm statistics by column blocks, and a row kernel (one warp per row,
// several rows per block) that normalizes, sums and finalizes the K layers straight into the output rows.
#include "common.cuh"

namespace d2v::cuda {
namespace {

constexpr int kRowsPerBlock = 8;  // warps per block of the row kernels
constexpr int kStatCols = 32;     // channels per block of the statistics kernel (one warp wide)
constexpr int kStatRows = 8;      // steps walked in parallel by that block

// Grid (ceil(D / 32), B), block (32, 8): thread (c, s) sums channel c over steps s, s + 8, ...
template <typename T>
__global__ void instance_stats_kernel(const T* __restrict__ x,  // (B, T, D)
                                      const bool* __restrict__ pad,  // (B, T) or null
                                      int64_t T_, int64_t D, float eps,
                                      float* __restrict__ mean, float* __restrict__ rstd) {  // (B, D)
  __shared__ float part[kStatRows][kStatCols];
  __shared__ float count_part[kStatRows];
  __shared__ float stat[kStatCols];
  const int64_t b = blockIdx.y;
  const int64_t c = static_cast<int64_t>(blockIdx.x) * kStatCols + threadIdx.x;
  const bool active = c < D;
  const T* xb = x + b * T_ * D;
  const bool* pb = pad == nullptr ? nullptr : pad + b * T_;

  float sum = 0.f, count = 0.f;
  for (int64_t t = threadIdx.y; t < T_; t += kStatRows) {
    if (pb != nullptr && pb[t]) continue;
    count += 1.f;
    if (active) sum += to_float(xb[t * D + c]);
  }
  part[threadIdx.y][threadIdx.x] = sum;
  if (threadIdx.x == 0) count_part[threadIdx.y] = count;
  __syncthreads();
  if (threadIdx.y == 0) {
    float s = 0.f, n = 0.f;
    for (int i = 0; i < kStatRows; ++i) s += part[i][threadIdx.x], n += count_part[i];
    stat[threadIdx.x] = s / fmaxf(n, 1.f);
  }
  __syncthreads();
  const float m = stat[threadIdx.x];
  float sq = 0.f;
  for (int64_t t = threadIdx.y; t < T_; t += kStatRows) {
    if ((pb != nullptr && pb[t]) || !active) continue;
    const float d = to_float(xb[t * D + c]) - m;
    sq += d * d;
  }
  __syncthreads();
  part[threadIdx.y][threadIdx.x] = sq;
  __syncthreads();
  if (threadIdx.y == 0 && active) {
    float s = 0.f, n = 0.f;
    for (int i = 0; i < kStatRows; ++i) s += part[i][threadIdx.x], n += count_part[i];
    mean[b * D + c] = m;
    rstd[b * D + c] = rsqrtf(s / fmaxf(n, 1.f) + eps);
  }
}

// Mean and rstd of one row of n elements read by a warp, two-pass.
template <typename T, int VEC>
__device__ void row_stats(const T* x, int64_t n, int lane, float eps, float& mean, float& rstd) {
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

struct RowsArgs {
  LayerTable layers;
  NormKind norm;
  int64_t rows, T, D;
  float eps, inv_k;
  const int64_t* dest_row;
  float* dest;
  bool accumulate, finalize, final_layer;
};

// One warp per row; each lane owns the same VEC-wide slices of the row in every pass, so the accumulation in
// `dest` needs no synchronization.
template <typename T, int VEC>
__global__ void targets_rows_kernel(const RowsArgs a) {
  const int lane = threadIdx.x % kWarp;
  const int64_t r = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + threadIdx.x / kWarp;
  if (r >= a.rows) return;
  const int64_t o = a.dest_row == nullptr ? r : a.dest_row[r];
  if (o < 0) return;
  const int64_t b = r / a.T, D = a.D;
  float* acc = a.dest + o * D;
  for (int k = 0; k < a.layers.count; ++k) {
    const T* x = static_cast<const T*>(a.layers.ptr[k]) + r * D;
    float mean = 0.f, rstd = 1.f;
    if (a.norm == NormKind::Layer) row_stats<T, VEC>(x, D, lane, a.eps, mean, rstd);
    const float* cm = a.norm == NormKind::Instance ? a.layers.mean[k] + b * D : nullptr;
    const float* cr = a.norm == NormKind::Instance ? a.layers.rstd[k] + b * D : nullptr;
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
      for (int j = 0; j < VEC; ++j) {
        y[j] += cm != nullptr ? (v[j] - cm[i + j]) * cr[i + j] : (v[j] - mean) * rstd;
      }
      store_float<float, VEC>(acc + i, y);
    }
  }
  if (!a.finalize) return;
  float mean = 0.f, rstd = 1.f;
  if (a.final_layer) {
    // Statistics of inv_k * acc: scale the stats of acc rather than rereading.
    row_stats<float, VEC>(acc, D, lane, 0.f, mean, rstd);  // rstd = 1/sqrt(var(acc))
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

// Elementwise over y (B*T, D); in place when out == y and dest_row is null.
__global__ void instance_apply_kernel(const float* y, const float* __restrict__ mean, const float* __restrict__ rstd,
                                      int64_t T_, int64_t D, int64_t total, const int64_t* __restrict__ dest_row,
                                      float* out) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t r = i / D, c = i % D, b = r / T_;
    const int64_t o = dest_row == nullptr ? r : dest_row[r];
    if (o >= 0) out[o * D + c] = (y[i] - mean[b * D + c]) * rstd[b * D + c];
  }
}

}  // namespace

cudaError_t instance_stats(const void* x, DType dtype, const bool* pad, int64_t B, int64_t T, int64_t D, float eps,
                           float* mean, float* rstd, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>((D + kStatCols - 1) / kStatCols), static_cast<unsigned>(B));
  const dim3 block(kStatCols, kStatRows);
  dispatch(dtype, [&](auto tag) {
    using T_ = decltype(tag);
    instance_stats_kernel<T_><<<grid, block, 0, stream>>>(static_cast<const T_*>(x), pad, T, D, eps, mean, rstd);
  });
  return cudaGetLastError();
}

cudaError_t targets_rows(const LayerTable& layers, DType dtype, NormKind norm, int64_t B, int64_t T, int64_t D,
                         float eps, const int64_t* dest_row, float* dest, bool accumulate, bool finalize, float inv_k,
                         bool final_layer, cudaStream_t stream) {
  const RowsArgs args{layers, norm, B * T, T, D, eps, inv_k, dest_row, dest, accumulate, finalize, final_layer};
  const dim3 grid(static_cast<unsigned>((B * T + kRowsPerBlock - 1) / kRowsPerBlock));
  const dim3 block(kRowsPerBlock * kWarp);
  dispatch(dtype, [&](auto tag) {
    using T_ = decltype(tag);
    constexpr int kVec = 16 / sizeof(T_);
    // 16-byte loads when every row starts 16-byte aligned (and dest rows kVec-float aligned); else scalar.
    bool vec = D % kVec == 0 && aligned(dest, kVec * sizeof(float));
    for (int k = 0; k < layers.count; ++k) vec = vec && aligned(layers.ptr[k], 16);
    if (vec) {
      targets_rows_kernel<T_, kVec><<<grid, block, 0, stream>>>(args);
    } else {
      targets_rows_kernel<T_, 1><<<grid, block, 0, stream>>>(args);
    }
  });
  return cudaGetLastError();
}

cudaError_t instance_apply(const float* y, const float* mean, const float* rstd, int64_t B, int64_t T, int64_t D,
                           const int64_t* dest_row, float* out, cudaStream_t stream) {
  const int64_t total = B * T * D;
  const int threads = 256;
  const int64_t blocks = std::min<int64_t>((total + threads - 1) / threads, 65535);
  instance_apply_kernel<<<static_cast<unsigned>(blocks), threads, 0, stream>>>(y, mean, rstd, T, D, total, dest_row,
                                                                               out);
  return cudaGetLastError();
}

}  // namespace d2v::cuda
