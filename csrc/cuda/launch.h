// Host launchers of the d2v CUDA kernels: raw pointers, sizes and a stream, no torch types.
//
// The .cu files implementing these need only the CUDA toolkit, so they compile (nvcc -c) on any machine; the
// ATen-facing glue (ops_cuda.cpp) is compiled only against a CUDA build of torch. Every launcher returns the
// launch status (cudaGetLastError) for the caller to check. Offsets are 64-bit; any D >= 1.
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

namespace d2v::cuda {

enum class DType : int { F32 = 0, BF16 = 1, F16 = 2 };
enum class NormKind : int { None = 0, Layer = 1, Instance = 2 };

// ------------------------------------------------------------------------------------------------ targets
constexpr int kMaxLayersPerLaunch = 16;  // more layers are summed over several launches

// The layers of one launch, passed by value as a kernel argument: no device table, so nothing is copied from
// the host per call (a CUDA graph replays launches with their arguments, but not pinned staging buffers).
struct LayerTable {
  const void* ptr[kMaxLayersPerLaunch];    // each (B, T, D) with strides (stride_b, stride_t, 1), of one dtype
  float* scale[kMaxLayersPerLaunch];        // instance norm only: (B, D) rstd of each layer
  float* shift[kMaxLayersPerLaunch];        // instance norm only: (B, D) -mean * rstd of each layer
  int count;
};

// For every layer j of the table: scale[j], shift[j] (B, D) fp32 from the per-channel statistics of layer j over
// the steps where pad (B, T) is false (all steps when pad is null); biased variance, rstd = 1/sqrt(var + eps).
// One launch for the whole table.
cudaError_t instance_stats(const LayerTable& layers, DType dtype, const bool* pad, int64_t B, int64_t T, int64_t D,
                           int64_t stride_b, int64_t stride_t, float eps, cudaStream_t stream);

// For every row r of B*T with dest_row[r] >= 0 (every row, at r, when dest_row is null):
//   dest[o] = (accumulate ? dest[o] : 0) + sum over the table's layers of norm(layer[r])
// and when `finalize`: dest[o] *= inv_k, then a layer norm of the row if `final_layer`. norm Instance applies
// the table's scale/shift. Rows of up to 1024 elements are accumulated in registers and written once.
cudaError_t targets_rows(const LayerTable& layers, DType dtype, NormKind norm, int64_t B, int64_t T, int64_t D,
                         int64_t stride_b, int64_t stride_t, float eps, const int64_t* dest_row, float* dest,
                         bool accumulate, bool finalize, float inv_k, bool final_layer, cudaStream_t stream);

// ------------------------------------------------------------------------------------------------ EMA
constexpr int64_t kEmaChunk = 4096;  // elements per block

struct EmaTensor {
  float* teacher;
  const void* student;
  int64_t numel;
  DType student_dtype;
};

struct EmaChunk {
  int64_t tensor;  // index into the tensor table
  int64_t begin;   // first element, a multiple of kEmaChunk
};

// teacher += w * (student - teacher) over every chunk, in one launch. `tensors` and `chunks` are device arrays
// that the caller builds once per parameter set and caches (no host-to-device copy per call).
cudaError_t ema_update(const EmaTensor* tensors, const EmaChunk* chunks, int64_t num_chunks, float w,
                       cudaStream_t stream);

// ------------------------------------------------------------------------------------------------ loss
// An upper bound of the blocks the loss kernel runs with for R rows on the current device: the length of the
// `partials` workspace. The launch itself sizes its grid by the kernel's occupancy (resident blocks x SMs).
int regression_loss_blocks(int64_t R);

// Loss over rows r of pred (R, D) with mask[r] set (all rows when mask is null) against target row
// (r / (S * clones)) * S + r % S of target (R / clones, D): pred holds `clones` copies of each sample of S rows
// (pred (B*M, *S, D), target (B, *S, D); clones = 1: target row r). When grad is not
// null, grad (R, D): d(loss)/d(pred), zero on unselected rows, in fp32, or bf16 when pred is bf16 (never fp16: the
// caller scales it by the incoming gradient before rounding to pred's dtype). Forward and backward are one
// kernel; the "mean" count is taken on the device. Workspace: partials (regression_loss_blocks(R) floats),
// counters (2 x uint64, zeroed by the caller). Writes the fp32 scalar *loss. No host synchronization.
cudaError_t regression_loss(const void* pred, DType pred_dtype, const void* target, DType target_dtype,
                            const bool* mask, int64_t R, int64_t D, int64_t rows_per_sample, int64_t clones,
                            float beta, float scale, bool mean, void* grad,
                            float* loss, float* partials, unsigned long long* counters, cudaStream_t stream);

}  // namespace d2v::cuda
