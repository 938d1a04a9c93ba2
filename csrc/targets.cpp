// CPU kernel of `targets`: normalize K teacher layers, average them, apply the final norm, keep masked rows.
//
// Layer norm and "none" work row by row (parallel over rows). Instance norm works on column blocks: a task
// owns (b, a block of kColumns channels) and walks the T rows of that block, accumulating per-channel sums,
// so every read is a contiguous run of a row and the statistics stay in L1. Only rows that reach the output
// are computed, unless the final norm is instance norm, which needs every step of the average.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include "cpu_rows.h"
#include "ops.h"

namespace d2v {

Norm parse_norm(const std::string& name) {
  if (name == "layer") return Norm::Layer;
  if (name == "instance") return Norm::Instance;
  if (name == "none") return Norm::None;
  TORCH_CHECK(false, "d2v: unknown norm '", name, "'; expected layer, instance or none");
}

int64_t mask_rows(const at::Tensor& mask, std::vector<int64_t>& rows) {
  const at::Tensor m = mask.contiguous();
  const bool* p = m.data_ptr<bool>();
  rows.resize(m.numel());
  int64_t n = 0;
  for (int64_t i = 0; i < m.numel(); ++i) rows[i] = p[i] ? n++ : -1;
  return n;
}

namespace {

constexpr int64_t kColumns = 64;  // channels per instance-norm task: 256 B of fp32 per row read

struct Problem {
  std::vector<const char*> layers;  // K pointers to (B, T, D) of `dtype`
  c10::ScalarType dtype;
  int64_t B, T, D;
  const bool* valid_pad;  // (B, T) padding mask (true = padded) or nullptr
  float eps;

  const char* row(int64_t k, int64_t r) const { return layers[k] + r * D * c10::elementSize(dtype); }
  bool padded(int64_t b, int64_t t) const { return valid_pad != nullptr && valid_pad[b * T + t]; }
};

// Per-channel mean and rstd over the unpadded steps of x[b, :, c0:c0+n]; `row_of(t)` gives the row as fp32.
template <class RowOf>
void instance_stats(const Problem& p, int64_t b, int64_t n, RowOf row_of, float* mean, float* rstd, float* scratch) {
  int64_t count = 0;
  std::fill(mean, mean + n, 0.f);
  for (int64_t t = 0; t < p.T; ++t) {
    if (p.padded(b, t)) continue;
    cpu::add_row(mean, row_of(t, scratch), n, false);
    ++count;
  }
  const float inv = 1.f / static_cast<float>(std::max<int64_t>(count, 1));
  cpu::scale_row(mean, n, inv);
  std::fill(rstd, rstd + n, 0.f);
  for (int64_t t = 0; t < p.T; ++t) {
    if (p.padded(b, t)) continue;
    cpu::add_sq_dev_cols(rstd, row_of(t, scratch), mean, n);
  }
  for (int64_t i = 0; i < n; ++i) rstd[i] = 1.f / std::sqrt(rstd[i] * inv + p.eps);
}

// dest rows (B*T of width D, selected by `dest_row`) = mean over k of norm(layer k), for norm layer or none.
void average_rows(const Problem& p, Norm norm, Norm final_norm, float* dest, const int64_t* dest_row) {
  const int64_t K = static_cast<int64_t>(p.layers.size());
  at::parallel_for(0, p.B * p.T, std::max<int64_t>(1, 16384 / p.D), [&](int64_t begin, int64_t end) {
    std::vector<float> x(p.D);
    for (int64_t r = begin; r < end; ++r) {
      const int64_t out = dest_row ? dest_row[r] : r;
      if (out < 0) continue;
      float* acc = dest + out * p.D;
      for (int64_t k = 0; k < K; ++k) {
        cpu::load_row(p.row(k, r), p.dtype, x.data(), p.D);
        if (norm == Norm::Layer) {
          float mean, rstd;
          cpu::mean_rstd(x.data(), p.D, p.eps, &mean, &rstd);
          cpu::add_normalized(acc, x.data(), p.D, mean, rstd, k == 0);
        } else {
          cpu::add_row(acc, x.data(), p.D, k == 0);
        }
      }
      if (K > 1) cpu::scale_row(acc, p.D, 1.f / static_cast<float>(K));
      if (final_norm == Norm::Layer) {
        float mean, rstd;
        cpu::mean_rstd(acc, p.D, p.eps, &mean, &rstd);
        cpu::add_normalized(acc, acc, p.D, mean, rstd, true);
      }
    }
  });
}

// Same for norm == instance, by (b, column block) tasks.
void average_instance(const Problem& p, float* dest, const int64_t* dest_row) {
  const int64_t K = static_cast<int64_t>(p.layers.size());
  const int64_t blocks = (p.D + kColumns - 1) / kColumns;
  const size_t esize = c10::elementSize(p.dtype);
  at::parallel_for(0, p.B * blocks, 1, [&](int64_t begin, int64_t end) {
    float mean[kColumns], rstd[kColumns], scratch[kColumns];
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / blocks, c0 = (task % blocks) * kColumns, n = std::min(kColumns, p.D - c0);
      for (int64_t k = 0; k < K; ++k) {
        auto row_of = [&](int64_t t, float* buf) {
          cpu::load_row(p.row(k, b * p.T + t) + c0 * esize, p.dtype, buf, n);
          return buf;
        };
        instance_stats(p, b, n, row_of, mean, rstd, scratch);
        for (int64_t t = 0; t < p.T; ++t) {
          const int64_t out = dest_row ? dest_row[b * p.T + t] : b * p.T + t;
          if (out < 0) continue;
          cpu::add_normalized_cols(dest + out * p.D + c0, row_of(t, scratch), n, mean, rstd, k == 0);
        }
      }
      if (K > 1) {
        for (int64_t t = 0; t < p.T; ++t) {
          const int64_t out = dest_row ? dest_row[b * p.T + t] : b * p.T + t;
          if (out >= 0) cpu::scale_row(dest + out * p.D + c0, n, 1.f / static_cast<float>(K));
        }
      }
    }
  });
}

// Final instance norm of the full average y (B, T, D), written to out rows selected by out_row (in place if
// out == y and out_row == nullptr).
void final_instance(const Problem& p, float* y, float* out, const int64_t* out_row) {
  const int64_t blocks = (p.D + kColumns - 1) / kColumns;
  at::parallel_for(0, p.B * blocks, 1, [&](int64_t begin, int64_t end) {
    float mean[kColumns], rstd[kColumns], scratch[kColumns];
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / blocks, c0 = (task % blocks) * kColumns, n = std::min(kColumns, p.D - c0);
      auto row_of = [&](int64_t t, float*) -> const float* { return y + (b * p.T + t) * p.D + c0; };
      instance_stats(p, b, n, row_of, mean, rstd, scratch);
      for (int64_t t = 0; t < p.T; ++t) {
        const int64_t r = b * p.T + t;
        const int64_t o = out_row ? out_row[r] : r;
        if (o < 0) continue;
        cpu::add_normalized_cols(out + o * p.D + c0, row_of(t, nullptr), n, mean, rstd, true);
      }
    }
  });
}

// Row-wise final layer norm in place over the rows of dest (after an instance-norm average).
void final_layer(const Problem& p, float* dest, int64_t rows) {
  at::parallel_for(0, rows, std::max<int64_t>(1, 16384 / p.D), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      float* y = dest + r * p.D;
      float mean, rstd;
      cpu::mean_rstd(y, p.D, p.eps, &mean, &rstd);
      cpu::add_normalized(y, y, p.D, mean, rstd, true);
    }
  });
}

}  // namespace

at::Tensor targets_cpu(at::TensorList layers, const std::string& norm_name, const std::string& final_name,
                       const std::optional<at::Tensor>& mask, const std::optional<at::Tensor>& padding_mask,
                       double eps) {
  TORCH_CHECK(!layers.empty(), "d2v: targets needs at least one layer");
  const Norm norm = parse_norm(norm_name), final_norm = parse_norm(final_name);
  const at::Tensor& first = layers[0];
  TORCH_CHECK(first.dim() == 3, "d2v: targets layers must be (B, T, D), got ", first.sizes());
  const int64_t B = first.size(0), T = first.size(1), D = first.size(2);
  // One dtype for all K; anything other than bf16/fp16/fp32 is computed from fp32.
  c10::ScalarType dtype = first.scalar_type();
  for (const auto& l : layers) {
    TORCH_CHECK(l.sizes() == first.sizes(), "d2v: targets layers differ in shape");
    if (l.scalar_type() != dtype) dtype = at::kFloat;
  }
  if (dtype != at::kFloat && dtype != at::kBFloat16 && dtype != at::kHalf) dtype = at::kFloat;
  std::vector<at::Tensor> owned;
  Problem p{{}, dtype, B, T, D, nullptr, static_cast<float>(eps)};
  for (const auto& l : layers) {
    owned.push_back(l.to(dtype).contiguous());
    p.layers.push_back(static_cast<const char*>(owned.back().data_ptr()));
  }
  at::Tensor pad;
  if (padding_mask.has_value()) {
    TORCH_CHECK(padding_mask->sizes() == at::IntArrayRef({B, T}), "d2v: padding_mask must be (B, T)");
    pad = padding_mask->to(at::kBool).contiguous();
    p.valid_pad = pad.data_ptr<bool>();
  }
  std::vector<int64_t> rows;
  int64_t N = B * T;
  if (mask.has_value()) {
    TORCH_CHECK(mask->sizes() == at::IntArrayRef({B, T}), "d2v: mask must be (B, T)");
    N = mask_rows(mask->to(at::kBool), rows);
  }
  const int64_t* out_row = mask.has_value() ? rows.data() : nullptr;
  const auto f32 = first.options().dtype(at::kFloat);
  at::Tensor out = mask.has_value() ? at::empty({N, D}, f32) : at::empty({B, T, D}, f32);
  if (B * T == 0 || D == 0 || N == 0) return out;

  // The average goes straight to the output rows unless a final instance norm needs all of it.
  const bool need_full = final_norm == Norm::Instance && mask.has_value();
  at::Tensor full = need_full ? at::empty({B, T, D}, f32) : out;
  float* dest = full.data_ptr<float>();
  const int64_t* dest_row = need_full ? nullptr : out_row;
  if (norm == Norm::Instance) {
    average_instance(p, dest, dest_row);
    if (final_norm == Norm::Layer) final_layer(p, dest, dest_row ? N : B * T);
  } else {
    average_rows(p, norm, final_norm, dest, dest_row);
  }
  if (final_norm == Norm::Instance) final_instance(p, dest, out.data_ptr<float>(), out_row);
  return out;
}

}  // namespace d2v
