// CUDA kernels of `masked_regression_loss`: a mask count on the device, then one kernel computing the loss and
// d(loss)/d(pred) together, whose last block to finish adds the block partials in a fixed order. With clones > 1
// each pred row computes its target row (multi-mask: M clones of a sample share one target, never repeated).
#include <type_traits>

#include "common.cuh"

namespace d2v::cuda {
namespace {

constexpr int kRowsPerBlock = 8;  // warps per block, one row each (grid-stride)
constexpr int kThreads = kRowsPerBlock * kWarp;
constexpr int kMaxResidentThreads = 2048;  // per SM, sm_80 / sm_90: bounds the blocks an occupancy grid can have

// Streaming multiprocessors of the current device (cached per device).
int sm_count() {
  static int counts[64] = {0};
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess || dev < 0 || dev >= 64) return 132;
  if (counts[dev] == 0) {
    int n = 0;
    cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, dev);
    counts[dev] = n > 0 ? n : 132;
  }
  return counts[dev];
}

__global__ void count_mask_kernel(const bool* __restrict__ mask, int64_t R, unsigned long long* count) {
  unsigned long long local = 0;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < R;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    local += mask[i] ? 1 : 0;
  }
  for (int offset = kWarp / 2; offset > 0; offset /= 2) local += __shfl_xor_sync(0xffffffffu, local, offset);
  if (threadIdx.x % kWarp == 0 && local != 0) atomicAdd(count, local);
}

// The gradient's storage type: fp32, or bf16 for bf16 pred (fp32's exponent range); never fp16, which cannot hold
// the unscaled gradient nor a grad scaler's factor.
template <typename P>
using GradType = std::conditional_t<std::is_same_v<P, __nv_bfloat16>, __nv_bfloat16, float>;

struct LossArgs {
  const void* pred;
  const void* target;
  const bool* mask;
  int64_t R, D;
  int64_t rows_per_sample, clones;  // pred row r reads target row (r / (S * clones)) * S + r % S, S = rows_per_sample
  float beta, scale;
  bool mean;
  void* grad;  // GradType<P>
  float* loss;
  float* partials;
  unsigned long long* counters;  // [0] selected rows (when mask), [1] blocks done
};

template <typename P, typename Q, int VEC>
__global__ void regression_loss_kernel(const LossArgs a) {
  __shared__ float warp_part[kRowsPerBlock];
  __shared__ bool last;
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  const P* pred = static_cast<const P*>(a.pred);
  const Q* target = static_cast<const Q*>(a.target);
  using G = GradType<P>;
  G* grad = static_cast<G*>(a.grad);
  const float count = a.mask == nullptr ? static_cast<float>(a.R) : static_cast<float>(a.counters[0]);
  const float factor = a.mean ? a.scale / fmaxf(count, 1.f) : a.scale;
  const float half_over_beta = a.beta > 0.f ? 0.5f / a.beta : 0.f, inv_beta = a.beta > 0.f ? 1.f / a.beta : 0.f;

  float sum = 0.f;
  for (int64_t r = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + warp; r < a.R;
       r += static_cast<int64_t>(gridDim.x) * kRowsPerBlock) {
    const bool selected = a.mask == nullptr || a.mask[r];
    const int64_t S = a.rows_per_sample, tr = a.clones == 1 ? r : (r / (S * a.clones)) * S + r % S;
    for (int64_t i = static_cast<int64_t>(lane) * VEC; i < a.D; i += kWarp * VEC) {
      const int64_t off = r * a.D + i;
      float g[VEC];
      if (selected) {
        float p[VEC], q[VEC];
        load_float<P, VEC>(pred + off, p);
        load_float<Q, VEC>(target + (tr * a.D + i), q);
#pragma unroll
        for (int j = 0; j < VEC; ++j) {
          const float d = p[j] - q[j];
          if (a.beta == 0.f) {
            sum += d * d;
            g[j] = 2.f * d * factor;
          } else {
            const float ad = fabsf(d);
            const bool small = ad < a.beta;
            sum += small ? half_over_beta * d * d : ad - 0.5f * a.beta;
            g[j] = factor * (small ? d * inv_beta : copysignf(1.f, d) * (d != 0.f));
          }
        }
      } else {
#pragma unroll
        for (int j = 0; j < VEC; ++j) g[j] = 0.f;
      }
      if (grad != nullptr) store_float<G, VEC>(grad + off, g);
    }
  }
  sum = warp_sum(sum);
  if (lane == 0) warp_part[warp] = sum;
  __syncthreads();
  if (threadIdx.x == 0) {
    float block = 0.f;
    for (int w = 0; w < kRowsPerBlock; ++w) block += warp_part[w];
    a.partials[blockIdx.x] = block;
    __threadfence();
    last = atomicAdd(&a.counters[1], 1ull) == gridDim.x - 1;
  }
  __syncthreads();
  if (!last) return;
  // The last block: every partial is visible (threadfence before the counter); add them in block order.
  __threadfence();
  if (threadIdx.x == 0) {
    float total = 0.f;
    const volatile float* partials = a.partials;
    for (unsigned i = 0; i < gridDim.x; ++i) total += partials[i];
    *a.loss = total * factor;
  }
}

template <typename P, typename Q, int VEC>
void launch_loss_vec(const LossArgs& a, int max_blocks, cudaStream_t stream) {
  // Grid sized by occupancy: as many blocks as can be resident at once (a grid-stride loop covers the rest),
  // never more than there are rows for, nor than the partials workspace holds.
  int per_sm = 0;
  if (cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, regression_loss_kernel<P, Q, VEC>, kThreads, 0) !=
          cudaSuccess ||
      per_sm <= 0) {
    per_sm = 1;
  }
  const int64_t want = std::min<int64_t>((a.R + kRowsPerBlock - 1) / kRowsPerBlock,
                                         static_cast<int64_t>(per_sm) * sm_count());
  const int blocks = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(want, max_blocks)));
  regression_loss_kernel<P, Q, VEC><<<blocks, kThreads, 0, stream>>>(a);
}

template <typename P, typename Q>
void launch_loss(const LossArgs& a, int max_blocks, cudaStream_t stream) {
  // 16-byte packs of pred: 8 bf16/fp16 or 4 fp32 elements per access (an fp32 target or gradient of 8
  // elements takes two 16-byte accesses).
  constexpr int kVec = 16 / sizeof(P);
  const bool vec = a.D % kVec == 0 && aligned(a.pred, 16) && aligned(a.target, 16) &&
                   (a.grad == nullptr || aligned(a.grad, 16)) && (a.D * sizeof(Q)) % 16 == 0;
  if (vec) {
    launch_loss_vec<P, Q, kVec>(a, max_blocks, stream);
  } else {
    launch_loss_vec<P, Q, 1>(a, max_blocks, stream);
  }
}

}  // namespace

int regression_loss_blocks(int64_t R) {
  const int64_t resident = static_cast<int64_t>(sm_count()) * (kMaxResidentThreads / kThreads);
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>((R + kRowsPerBlock - 1) / kRowsPerBlock, resident)));
}

cudaError_t regression_loss(const void* pred, DType pred_dtype, const void* target, DType target_dtype,
                            const bool* mask, int64_t R, int64_t D, int64_t rows_per_sample, int64_t clones,
                            float beta, float scale, bool mean, void* grad,
                            float* loss, float* partials, unsigned long long* counters, cudaStream_t stream) {
  if (mask != nullptr) {
    const int64_t blocks = std::max<int64_t>(1, std::min<int64_t>((R + 255) / 256, 256));
    count_mask_kernel<<<static_cast<unsigned>(blocks), 256, 0, stream>>>(mask, R, counters);
  }
  const LossArgs args{pred, target, mask, R, D, rows_per_sample, clones, beta, scale, mean, grad, loss, partials,
                      counters};
  const int max_blocks = regression_loss_blocks(R);
  dispatch(pred_dtype, [&](auto p) {
    dispatch(target_dtype, [&](auto q) { launch_loss<decltype(p), decltype(q)>(args, max_blocks, stream); });
  });
  return cudaGetLastError();
}

}  // namespace d2v::cuda
