// ATen glue of the CUDA kernels: checks and converts tensors, allocates outputs and workspaces, and calls the
// raw-pointer launchers of launch.h on the current stream. Compiled only against a CUDA build of torch.
#include <cstring>
#include <list>
#include <mutex>
#include <utility>
#include <vector>

#include <ATen/ATen.h>
#include <c10/util/accumulate.h>
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
  // Strided views (the objective passes layer[:, 1:]) are read in place when the layers share (stride_b,
  // stride_t, 1); only a different dtype or layout makes a copy.
  std::vector<at::Tensor> xs;
  bool same_strides = true;
  for (const auto& l : layers) {
    xs.push_back(l.scalar_type() == dtype ? l : l.to(dtype));
    same_strides = same_strides && xs.back().strides() == xs[0].strides() && xs.back().stride(2) == 1;
  }
  if (!same_strides) {
    for (auto& x : xs) x = x.contiguous();
  }
  const int64_t stride_b = xs[0].stride(0), stride_t = xs[0].stride(1);
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
  if (B * T == 0 || D == 0 || N == 0) {
    return mask.has_value() ? at::zeros({N, D}, f32) : at::zeros({B, T, D}, f32);
  }
  at::Tensor out = mask.has_value() ? at::empty({N, D}, f32) : at::empty({B, T, D}, f32);

  // A final instance norm needs the whole average before its statistics: kept apart from `out` when masked.
  const bool need_full = final_norm == Norm::Instance && mask.has_value();
  at::Tensor full = need_full ? at::empty({B, T, D}, f32) : out;
  const int64_t* dest_row = need_full ? nullptr : out_row;
  const float e = static_cast<float>(eps);
  // (2, K, B, D): scale and shift of every layer (instance norm), filled by one launch per table of layers.
  at::Tensor stats = norm == Norm::Instance ? at::empty({2, K, B, D}, f32) : at::Tensor();
  for (int64_t k0 = 0; k0 < K; k0 += cuda::kMaxLayersPerLaunch) {
    cuda::LayerTable table{};
    table.count = static_cast<int>(std::min<int64_t>(cuda::kMaxLayersPerLaunch, K - k0));
    for (int j = 0; j < table.count; ++j) {
      table.ptr[j] = xs[k0 + j].data_ptr();
      if (norm == Norm::Instance) {
        table.scale[j] = stats[0][k0 + j].data_ptr<float>();
        table.shift[j] = stats[1][k0 + j].data_ptr<float>();
      }
    }
    if (norm == Norm::Instance) {
      check(cuda::instance_stats(table, dtype_of(dtype), pad_ptr, B, T, D, stride_b, stride_t, e, stream));
    }
    const bool last = k0 + table.count == K;
    check(cuda::targets_rows(table, dtype_of(dtype), kind_of(norm), B, T, D, stride_b, stride_t, e, dest_row,
                             full.data_ptr<float>(), /*accumulate=*/k0 > 0, /*finalize=*/last,
                             1.f / static_cast<float>(K), /*final_layer=*/final_norm == Norm::Layer, stream));
  }
  if (final_norm == Norm::Instance) {
    // Statistics of the fp32 average, then the row kernel with that one "layer" applies them into the output.
    at::Tensor final_stats = at::empty({2, B, D}, f32);
    cuda::LayerTable table{};
    table.count = 1;
    table.ptr[0] = full.data_ptr();
    table.scale[0] = final_stats[0].data_ptr<float>();
    table.shift[0] = final_stats[1].data_ptr<float>();
    check(cuda::instance_stats(table, cuda::DType::F32, pad_ptr, B, T, D, T * D, D, e, stream));
    check(cuda::targets_rows(table, cuda::DType::F32, cuda::NormKind::Instance, B, T, D, T * D, D, e, out_row,
                             out.data_ptr<float>(), /*accumulate=*/false, /*finalize=*/true, 1.f,
                             /*final_layer=*/false, stream));
  }
  return out;
}

namespace {

// Device copies of the EMA tensor and chunk tables, keyed by every pointer, size and dtype of the parameter
// set: a training loop builds them on its first step and then launches with no host-to-device copy at all
// (also what a captured CUDA graph needs: its launches refer to this persistent buffer, never to a recycled
// pinned staging buffer).
struct EmaTables {
  at::Tensor buffer;  // tensors then chunks, on the device
  size_t tensors_bytes = 0;
  int64_t num_chunks = 0;
};

using EmaCache = std::list<std::pair<std::vector<int64_t>, EmaTables>>;  // most recent first
constexpr size_t kEmaCacheEntries = 8;
std::mutex ema_cache_mutex;
// Never destroyed: its device tensors must not be freed after the CUDA allocator at interpreter exit.
EmaCache& ema_cache = *new EmaCache();

EmaTables ema_tables(const std::vector<cuda::EmaTensor>& tensors, const at::Device& device) {
  std::vector<int64_t> key{device.index()};
  for (const auto& t : tensors) {
    key.insert(key.end(), {reinterpret_cast<int64_t>(t.teacher), reinterpret_cast<int64_t>(t.student), t.numel,
                           static_cast<int64_t>(t.student_dtype)});
  }
  const std::lock_guard<std::mutex> lock(ema_cache_mutex);
  for (auto it = ema_cache.begin(); it != ema_cache.end(); ++it) {
    if (it->first == key) {
      ema_cache.splice(ema_cache.begin(), ema_cache, it);
      return it->second;
    }
  }
  std::vector<cuda::EmaChunk> chunks;
  for (size_t i = 0; i < tensors.size(); ++i) {
    for (int64_t b = 0; b < tensors[i].numel; b += cuda::kEmaChunk) chunks.push_back({static_cast<int64_t>(i), b});
  }
  EmaTables entry;
  entry.tensors_bytes = tensors.size() * sizeof(cuda::EmaTensor);
  entry.num_chunks = static_cast<int64_t>(chunks.size());
  const size_t cbytes = chunks.size() * sizeof(cuda::EmaChunk);
  at::Tensor host =
      at::empty({static_cast<int64_t>(entry.tensors_bytes + cbytes)}, at::TensorOptions().dtype(at::kByte));
  std::memcpy(host.data_ptr(), tensors.data(), entry.tensors_bytes);
  std::memcpy(static_cast<char*>(host.data_ptr()) + entry.tensors_bytes, chunks.data(), cbytes);
  entry.buffer = host.to(device);  // once per parameter set: a synchronous copy is fine here
  ema_cache.emplace_front(std::move(key), entry);
  if (ema_cache.size() > kEmaCacheEntries) ema_cache.pop_back();
  return entry;
}

}  // namespace

void ema_update_cuda(at::TensorList teacher, at::TensorList student, double decay) {
  TORCH_CHECK(teacher.size() == student.size(), "d2v: ema_update_ needs as many student as teacher tensors");
  if (teacher.empty()) return;
  const c10::cuda::CUDAGuard guard(teacher[0].device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const size_t n = teacher.size();
  std::vector<at::Tensor> t(n), s(n);
  std::vector<cuda::EmaTensor> tensors;
  for (size_t i = 0; i < n; ++i) {
    TORCH_CHECK(teacher[i].scalar_type() == at::kFloat, "d2v: ema_update_ teacher tensors must be float32");
    TORCH_CHECK(teacher[i].sizes() == student[i].sizes(), "d2v: ema_update_ teacher/student shapes differ");
    TORCH_CHECK(teacher[i].device() == teacher[0].device() && student[i].device() == teacher[0].device(),
                "d2v: ema_update_ tensors must be on one CUDA device");
    t[i] = teacher[i].contiguous();
    s[i] = as_supported(student[i]);
    if (t[i].numel() == 0) continue;
    tensors.push_back({t[i].data_ptr<float>(), s[i].data_ptr(), t[i].numel(), dtype_of(s[i].scalar_type())});
  }
  if (!tensors.empty()) {
    const EmaTables tables = ema_tables(tensors, teacher[0].device());
    const auto* base = static_cast<const char*>(tables.buffer.data_ptr());
    check(cuda::ema_update(reinterpret_cast<const cuda::EmaTensor*>(base),
                           reinterpret_cast<const cuda::EmaChunk*>(base + tables.tensors_bytes), tables.num_chunks,
                           static_cast<float>(1.0 - decay), stream));
  }
  for (size_t i = 0; i < n; ++i) {
    if (!t[i].is_same(teacher[i])) teacher[i].copy_(t[i]);
  }
}

std::tuple<at::Tensor, at::Tensor> masked_regression_loss_cuda(const at::Tensor& pred_in, const at::Tensor& target_in,
                                                               const std::optional<at::Tensor>& mask_in, double beta,
                                                               double scale, const std::string& reduction,
                                                               bool need_grad, int64_t clones) {
  check_loss_shapes(pred_in, target_in, clones);
  TORCH_CHECK(reduction == "mean" || reduction == "sum", "d2v: reduction must be 'mean' or 'sum'");
  const c10::cuda::CUDAGuard guard(pred_in.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const at::Tensor pred = as_supported(pred_in), target = as_supported(target_in);
  // R rows of D; with D = 0 still the product of the leading sizes (the mask has that many entries).
  const int64_t D = pred.size(-1), R = c10::multiply_integers(pred.sizes().slice(0, pred.dim() - 1));
  at::Tensor mask;
  if (mask_in.has_value()) {
    TORCH_CHECK(mask_in->numel() == R, "d2v: mask must have pred.shape[:-1]");
    mask = mask_in->to(pred.device(), at::kBool).contiguous();
  }
  at::Tensor loss = at::zeros({}, pred.options().dtype(at::kFloat));
  // fp32 gradient (bf16 for bf16 pred): the autograd wrapper scales it by the incoming gradient before rounding
  // to pred's dtype.
  const auto gd = pred.scalar_type() == at::kBFloat16 ? at::kBFloat16 : at::kFloat;
  at::Tensor grad = need_grad ? at::empty(pred.sizes(), pred.options().dtype(gd)) : at::empty({0}, pred_in.options());
  if (R > 0 && D > 0) {
    at::Tensor partials = at::empty({cuda::regression_loss_blocks(R)}, pred.options().dtype(at::kFloat));
    at::Tensor counters = at::zeros({2}, pred.options().dtype(at::kLong));
    check(cuda::regression_loss(pred.data_ptr(), dtype_of(pred.scalar_type()), target.data_ptr(),
                                dtype_of(target.scalar_type()), mask.defined() ? mask.data_ptr<bool>() : nullptr, R,
                                D, loss_rows_per_sample(pred), clones, static_cast<float>(beta),
                                static_cast<float>(scale), reduction == "mean",
                                need_grad ? grad.data_ptr() : nullptr, loss.data_ptr<float>(),
                                partials.data_ptr<float>(),
                                reinterpret_cast<unsigned long long*>(counters.data_ptr<int64_t>()), stream));
  } else if (need_grad) {
    grad.zero_();
  }
  return {loss, grad};
}

}  // namespace d2v
