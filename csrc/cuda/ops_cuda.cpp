// ATen glue of the CUDA kernels: checks and converts tensors, allocates outputs and workspaces, and calls the
// raw-pointer launchers of launch.h on the current stream. Compiled only against a CUDA build of torch.
#include <cstring>

#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "cuda/launch.h"
#include "ops.h"

namespace d2v {
namespace {

cuda::DType dtype_of(c10::ScalarType t) {
  switch (t) {
    case at::kFloat: return cuda::DType::F32;
    case at::kBFloat16: return cuda::DType::BF16;
    case at::kHalf: return cuda::DType::F16;
    default: TORCH_CHECK(false, "d2v: unsupported dtype ", t);
  }
}

at::Tensor as_supported(const at::Tensor& x) {
  const auto d = x.scalar_type();
  return (d == at::kFloat || d == at::kBFloat16 || d == at::kHalf ? x : x.to(at::kFloat)).contiguous();
}

void check(cudaError_t err) { TORCH_CHECK(err == cudaSuccess, "d2v: CUDA kernel failed: ", cudaGetErrorString(err)); }

cuda::NormKind kind_of(Norm n) {
  return n == Norm::Layer ? cuda::NormKind::Layer : n == Norm::Instance ? cuda::NormKind::Instance
                                                                         : cuda::NormKind::None;
}

}  // namespace

at::Tensor targets_cuda(at::TensorList layers, const std::string& norm_name, const std::string& final_name,
                        const std::optional<at::Tensor>& mask, const std::optional<at::Tensor>& padding_mask,
                        double eps) {
  TORCH_CHECK(!layers.empty(), "d2v: targets needs at least one layer");
  const Norm norm = parse_norm(norm_name), final_norm = parse_norm(final_name);
  const at::Tensor& first = layers[0];
  TORCH_CHECK(first.dim() == 3, "d2v: targets layers must be (B, T, D), got ", first.sizes());
  const c10::cuda::CUDAGuard guard(first.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int64_t K = static_cast<int64_t>(layers.size()), B = first.size(0), T = first.size(1), D = first.size(2);
  c10::ScalarType dtype = first.scalar_type();
  for (const auto& l : layers) {
    TORCH_CHECK(l.sizes() == first.sizes() && l.device() == first.device(), "d2v: targets layers differ");
    if (l.scalar_type() != dtype) dtype = at::kFloat;
  }
  if (dtype != at::kFloat && dtype != at::kBFloat16 && dtype != at::kHalf) dtype = at::kFloat;
  std::vector<at::Tensor> xs;
  for (const auto& l : layers) xs.push_back(l.to(dtype).contiguous());
  at::Tensor pad;
  if (padding_mask.has_value()) pad = padding_mask->to(first.device(), at::kBool).contiguous();
  const bool* pad_ptr = pad.defined() ? pad.data_ptr<bool>() : nullptr;

  // Destination row of each masked step; N, the output size, needs the one host sync of this op.
  at::Tensor rows;
  int64_t N = B * T;
  if (mask.has_value()) {
    const at::Tensor m = mask->to(first.device(), at::kBool).reshape({-1});
    const at::Tensor idx = m.to(at::kLong).cumsum(0);
    N = B * T == 0 ? 0 : idx[-1].item<int64_t>();
    rows = at::where(m, idx - 1, at::full_like(idx, -1)).contiguous();
  }
  const int64_t* out_row = rows.defined() ? rows.data_ptr<int64_t>() : nullptr;
  const auto f32 = first.options().dtype(at::kFloat);
  at::Tensor out = mask.has_value() ? at::empty({N, D}, f32) : at::empty({B, T, D}, f32);
  if (B * T == 0 || D == 0 || N == 0) return out;

  const bool need_full = final_norm == Norm::Instance && mask.has_value();
  at::Tensor full = need_full ? at::empty({B, T, D}, f32) : out;
  const int64_t* dest_row = need_full ? nullptr : out_row;
  const float e = static_cast<float>(eps);
  at::Tensor stats;
  if (norm == Norm::Instance) {
    stats = at::empty({2, K, B, D}, f32);
    for (int64_t k = 0; k < K; ++k) {
      check(cuda::instance_stats(xs[k].data_ptr(), dtype_of(dtype), pad_ptr, B, T, D, e,
                                 stats[0][k].data_ptr<float>(), stats[1][k].data_ptr<float>(), stream));
    }
  }
  for (int64_t k0 = 0; k0 < K; k0 += cuda::kMaxLayersPerLaunch) {
    cuda::LayerTable table{};
    table.count = static_cast<int>(std::min<int64_t>(cuda::kMaxLayersPerLaunch, K - k0));
    for (int j = 0; j < table.count; ++j) {
      table.ptr[j] = xs[k0 + j].data_ptr();
      if (norm == Norm::Instance) {
        table.mean[j] = stats[0][k0 + j].data_ptr<float>();
        table.rstd[j] = stats[1][k0 + j].data_ptr<float>();
      }
    }
    const bool last = k0 + table.count == K;
    check(cuda::targets_rows(table, dtype_of(dtype), kind_of(norm), B, T, D, e, dest_row, full.data_ptr<float>(),
                             /*accumulate=*/k0 > 0, /*finalize=*/last, 1.f / static_cast<float>(K),
                             /*final_layer=*/final_norm == Norm::Layer, stream));
  }
  if (final_norm == Norm::Instance) {
    at::Tensor final_stats = at::empty({2, B, D}, f32);
    check(cuda::instance_stats(full.data_ptr(), cuda::DType::F32, pad_ptr, B, T, D, e,
                               final_stats[0].data_ptr<float>(), final_stats[1].data_ptr<float>(), stream));
    check(cuda::instance_apply(full.data_ptr<float>(), final_stats[0].data_ptr<float>(),
                               final_stats[1].data_ptr<float>(), B, T, D, out_row, out.data_ptr<float>(), stream));
  }
  return out;
}

void ema_update_cuda(at::TensorList teacher, at::TensorList student, double decay) {
  TORCH_CHECK(teacher.size() == student.size(), "d2v: ema_update_ needs as many student as teacher tensors");
  if (teacher.empty()) return;
  const c10::cuda::CUDAGuard guard(teacher[0].device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const size_t n = teacher.size();
  std::vector<at::Tensor> t(n), s(n);
  std::vector<cuda::EmaTensor> tensors;
  std::vector<cuda::EmaChunk> chunks;
  for (size_t i = 0; i < n; ++i) {
    TORCH_CHECK(teacher[i].scalar_type() == at::kFloat, "d2v: ema_update_ teacher tensors must be float32");
    TORCH_CHECK(teacher[i].sizes() == student[i].sizes(), "d2v: ema_update_ teacher/student shapes differ");
    TORCH_CHECK(teacher[i].device() == teacher[0].device() && student[i].device() == teacher[0].device(),
                "d2v: ema_update_ tensors must be on one CUDA device");
    t[i] = teacher[i].contiguous();
    s[i] = as_supported(student[i]);
    if (t[i].numel() == 0) continue;
    tensors.push_back({t[i].data_ptr<float>(), s[i].data_ptr(), t[i].numel(), dtype_of(s[i].scalar_type())});
    for (int64_t b = 0; b < t[i].numel(); b += cuda::kEmaChunk) {
      chunks.push_back({static_cast<int64_t>(tensors.size() - 1), b});
    }
  }
  if (!chunks.empty()) {
    // Both tables in one pinned buffer and one asynchronous copy; the caching host allocator keeps the buffer
    // alive until the copy has run.
    const size_t tbytes = tensors.size() * sizeof(cuda::EmaTensor), cbytes = chunks.size() * sizeof(cuda::EmaChunk);
    at::Tensor host = at::empty({static_cast<int64_t>(tbytes + cbytes)},
                                at::TensorOptions().dtype(at::kByte).pinned_memory(true));
    std::memcpy(host.data_ptr(), tensors.data(), tbytes);
    std::memcpy(static_cast<char*>(host.data_ptr()) + tbytes, chunks.data(), cbytes);
    at::Tensor dev = host.to(teacher[0].device(), /*non_blocking=*/true);
    const auto* base = static_cast<const char*>(dev.data_ptr());
    check(cuda::ema_update(reinterpret_cast<const cuda::EmaTensor*>(base),
                           reinterpret_cast<const cuda::EmaChunk*>(base + tbytes),
                           static_cast<int64_t>(chunks.size()), static_cast<float>(1.0 - decay), stream));
  }
  for (size_t i = 0; i < n; ++i) {
    if (!t[i].is_same(teacher[i])) teacher[i].copy_(t[i]);
  }
}

std::tuple<at::Tensor, at::Tensor> masked_regression_loss_cuda(const at::Tensor& pred_in, const at::Tensor& target_in,
                                                               const std::optional<at::Tensor>& mask_in, double beta,
                                                               double scale, const std::string& reduction,
                                                               bool need_grad) {
  TORCH_CHECK(pred_in.sizes() == target_in.sizes() && pred_in.dim() >= 1,
              "d2v: pred and target must have one shape (..., D)");
  TORCH_CHECK(reduction == "mean" || reduction == "sum", "d2v: reduction must be 'mean' or 'sum'");
  const c10::cuda::CUDAGuard guard(pred_in.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const at::Tensor pred = as_supported(pred_in), target = as_supported(target_in);
  const int64_t D = pred.size(-1), R = D == 0 ? 0 : pred.numel() / D;
  at::Tensor mask;
  if (mask_in.has_value()) {
    TORCH_CHECK(mask_in->numel() == R, "d2v: mask must have pred.shape[:-1]");
    mask = mask_in->to(pred.device(), at::kBool).contiguous();
  }
  at::Tensor loss = at::zeros({}, pred.options().dtype(at::kFloat));
  at::Tensor grad = need_grad ? at::empty(pred.sizes(), pred.options()) : at::empty({0}, pred_in.options());
  if (R > 0) {
    at::Tensor partials = at::empty({cuda::regression_loss_blocks(R)}, pred.options().dtype(at::kFloat));
    at::Tensor counters = at::zeros({2}, pred.options().dtype(at::kLong));
    check(cuda::regression_loss(pred.data_ptr(), dtype_of(pred.scalar_type()), target.data_ptr(),
                                dtype_of(target.scalar_type()), mask.defined() ? mask.data_ptr<bool>() : nullptr, R,
                                D, static_cast<float>(beta), static_cast<float>(scale), reduction == "mean",
                                need_grad ? grad.data_ptr() : nullptr, loss.data_ptr<float>(),
                                partials.data_ptr<float>(),
                                reinterpret_cast<unsigned long long*>(counters.data_ptr<int64_t>()), stream));
  } else if (need_grad) {
    grad.zero_();
  }
  if (need_grad && grad.scalar_type() != pred_in.scalar_type()) grad = grad.to(pred_in.scalar_type());
  return {loss, grad};
}

}  // namespace d2v
