// CPU kernel of `targets`: normalize K teacher layers, average them, apply the final norm, keep masked rows.
//
// Every output row is computed once, row by row (parallel over rows), reading the K input rows once: layer norm
// and "none" need nothing else. Instance norm first takes per-(b, k, channel) statistics in one streaming pass
// over each layer (shifted moments: fp32 over blocks of rows, fp64 across), so it reads the unpadded input once more. Only rows that reach the
// output are computed, unless the final norm is instance norm, which needs every step of the average.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#if defined(__linux__)
#include <sys/mman.h>
#endif

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

// Ask for transparent huge pages over a large fresh output: first-touch page faults of 4 KiB pages otherwise cost
// about as much as the whole kernel (38 MB of ViT-B targets: 9,500 faults). Only advice; harmless if refused.
void advise_huge_pages(const at::Tensor& t) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t{1} << 21;
  const size_t bytes = t.nbytes();
  if (bytes < 4 * kHuge) return;
  const auto p = reinterpret_cast<uintptr_t>(t.data_ptr());
  const uintptr_t a = (p + kHuge - 1) & ~(kHuge - 1), e = (p + bytes) & ~(kHuge - 1);
  if (e > a) madvise(reinterpret_cast<void*>(a), e - a, MADV_HUGEPAGE);
#endif
}

constexpr int64_t kFlush = 64;  // rows of fp32 partial moments before they move to fp64

struct Problem {
  std::vector<const char*> layers;  // K pointers to (B, T, D) of `dtype`
  c10::ScalarType dtype;
  int64_t B, T, D;
  const bool* valid_pad;  // (B, T) padding mask (true = padded) or nullptr
  float eps;

  const char* row(int64_t k, int64_t r) const { return layers[k] + r * D * c10::elementSize(dtype); }
  bool padded(int64_t b, int64_t t) const { return valid_pad != nullptr && valid_pad[b * T + t]; }
};

// Instance-norm statistics of every (b, k): mean and rstd (B, K, D) over the unpadded steps of layer k of
// sequence b. A task owns (b, k, a column chunk) and streams the T rows of its slab once, which is contiguous
// memory when the chunk is all of D, accumulating moments shifted by the first unpadded row (so a single pass
// is as accurate as two) in fp32 over blocks of kFlush rows and in fp64 across blocks. Chunks narrower than D only serve to give every thread work when B * K
// is small.
void instance_stats(const Problem& p, float* mean, float* rstd) {
  const int64_t K = static_cast<int64_t>(p.layers.size());
  const int64_t slabs = p.B * K;
  const int64_t threads = at::get_num_threads();
  int64_t chunks = std::max<int64_t>(1, std::min<int64_t>((2 * threads + slabs - 1) / slabs, p.D / 64));
  const int64_t width = ((p.D + chunks - 1) / chunks + 15) / 16 * 16;
  chunks = (p.D + width - 1) / width;
  const size_t esize = c10::elementSize(p.dtype);
  std::vector<int64_t> first(p.B), count(p.B);
  for (int64_t b = 0; b < p.B; ++b) {
    first[b] = -1;
    count[b] = 0;
    for (int64_t t = p.T - 1; t >= 0; --t) {
      if (!p.padded(b, t)) {
        first[b] = t;
        ++count[b];
      }
    }
  }
  at::parallel_for(0, slabs * chunks, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> shift(width), f1(width), f2(width);
    std::vector<double> s1(width), s2(width);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t slab = task / chunks, b = slab / K, k = slab % K;
      const int64_t c0 = (task % chunks) * width, n = std::min(width, p.D - c0);
      float* m = mean + slab * p.D + c0;
      float* r = rstd + slab * p.D + c0;
      if (count[b] == 0) {  // all padded: mean 0, var 0, as the reference's clamp(n, 1) gives
        std::fill(m, m + n, 0.f);
        std::fill(r, r + n, static_cast<float>(1.0 / std::sqrt(static_cast<double>(p.eps))));
        continue;
      }
      std::fill(s1.begin(), s1.begin() + n, 0.0);
      std::fill(s2.begin(), s2.begin() + n, 0.0);
      std::fill(f1.begin(), f1.begin() + n, 0.f);
      std::fill(f2.begin(), f2.begin() + n, 0.f);
      cpu::load_row(p.row(k, b * p.T + first[b]) + c0 * esize, p.dtype, shift.data(), n);
      // Rows go 4 at a time into fp32 partial moments, flushed to fp64 every kFlush rows.
      const void* group[4];
      int g = 0;
      int64_t pending = 0;
      auto flush = [&] {
        for (int64_t i = 0; i < n; ++i) {
          s1[i] += f1[i];
          s2[i] += f2[i];
          f1[i] = f2[i] = 0.f;
        }
        pending = 0;
      };
      for (int64_t t = first[b] + 1; t < p.T; ++t) {
        if (p.padded(b, t)) continue;
        group[g++] = p.row(k, b * p.T + t) + c0 * esize;
        if (g == 4) {
          cpu::add_moments_rows(f1.data(), f2.data(), group, 4, p.dtype, shift.data(), n);
          g = 0;
          if ((pending += 4) >= kFlush) flush();
        }
      }
      if (g > 0) cpu::add_moments_rows(f1.data(), f2.data(), group, g, p.dtype, shift.data(), n);
      flush();
      const double inv = 1.0 / static_cast<double>(count[b]);
      for (int64_t i = 0; i < n; ++i) {
        const double dm = s1[i] * inv;
        const double var = std::max(0.0, s2[i] * inv - dm * dm);
        m[i] = static_cast<float>(static_cast<double>(shift[i]) + dm);
        r[i] = static_cast<float>(1.0 / std::sqrt(var + static_cast<double>(p.eps)));
      }
    }
  });
}

// dest rows (B*T of width D, selected by `dest_row`) = mean over k of norm(layer k), then the final layer norm
// if asked; each row is computed once, in a scratch row that stays in L1. Instance norm reads its statistics
// (B, K, D) from `mean`/`rstd`.
void average_rows(const Problem& p, Norm norm, Norm final_norm, float* dest, const int64_t* dest_row,
                  const float* imean, const float* irstd) {
  const int64_t K = static_cast<int64_t>(p.layers.size());
  at::parallel_for(0, p.B * p.T, std::max<int64_t>(1, 16384 / p.D), [&](int64_t begin, int64_t end) {
    std::vector<float> x(p.D);
    for (int64_t r = begin; r < end; ++r) {
      const int64_t out = dest_row ? dest_row[r] : r;
      if (out < 0) continue;
      const int64_t b = r / p.T;
      float* acc = dest + out * p.D;
      for (int64_t k = 0; k < K; ++k) {
        if (norm == Norm::Layer) {  // convert and sum in one pass, then deviations and the update in L1
          float mean, rstd;
          const float sum = cpu::load_row_sum(p.row(k, r), p.dtype, x.data(), p.D);
          cpu::mean_rstd_from_sum(x.data(), p.D, sum, p.eps, &mean, &rstd);
          cpu::add_normalized(acc, x.data(), p.D, mean, rstd, k == 0);
          continue;
        }
        const float* xf = reinterpret_cast<const float*>(p.row(k, r));
        if (p.dtype != at::kFloat) {
          cpu::load_row(p.row(k, r), p.dtype, x.data(), p.D);
          xf = x.data();
        }
        if (norm == Norm::Instance) {
          const int64_t s = (b * K + k) * p.D;
          cpu::add_normalized_cols(acc, xf, p.D, imean + s, irstd + s, k == 0);
        } else {
          cpu::add_row(acc, xf, p.D, k == 0);
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

// Final instance norm of the full average y (B, T, D), written to out rows selected by out_row (in place if
// out == y and out_row == nullptr).
void final_instance(const Problem& p, float* y, float* out, const int64_t* out_row) {
  Problem q{{reinterpret_cast<const char*>(y)}, at::kFloat, p.B, p.T, p.D, p.valid_pad, p.eps};
  std::vector<float> mean(p.B * p.D), rstd(p.B * p.D);
  instance_stats(q, mean.data(), rstd.data());
  at::parallel_for(0, p.B * p.T, std::max<int64_t>(1, 16384 / p.D), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t o = out_row ? out_row[r] : r;
      if (o < 0) continue;
      const int64_t s = (r / p.T) * p.D;
      cpu::add_normalized_cols(out + o * p.D, y + r * p.D, p.D, mean.data() + s, rstd.data() + s, true);
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
  advise_huge_pages(out);
  if (need_full) advise_huge_pages(full);
  float* dest = full.data_ptr<float>();
  const int64_t* dest_row = need_full ? nullptr : out_row;
  std::vector<float> imean, irstd;
  if (norm == Norm::Instance) {
    imean.resize(B * static_cast<int64_t>(layers.size()) * D);
    irstd.resize(imean.size());
    instance_stats(p, imean.data(), irstd.data());
  }
  average_rows(p, norm, final_norm, dest, dest_row, imean.data(), irstd.data());
  if (final_norm == Norm::Instance) final_instance(p, dest, out.data_ptr<float>(), out_row);
  return out;
}

}  // namespace d2v
