// Row primitives of the CPU kernels (see cpu_rows.h); every function is compiled three times by target_clones.
#include "cpu_rows.h"

#include <cmath>
#include <cstring>

#include <c10/util/Exception.h>
#include <c10/util/Half.h>

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define D2V_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define D2V_CLONES
#endif

namespace d2v::cpu {
namespace {

// bf16 <-> fp32 as bit operations, so the compiler vectorizes them (c10::BFloat16 goes through memcpy helpers).
inline float bf16_to_float(uint16_t h) {
  uint32_t bits = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

inline uint16_t float_to_bf16(float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, sizeof bits);
  uint32_t rounded = (bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16;
  return f != f ? uint16_t{0x7FC0} : static_cast<uint16_t>(rounded);
}

D2V_CLONES void bf16_to_float_row(const uint16_t* __restrict src, float* __restrict dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = bf16_to_float(src[i]);
}

D2V_CLONES void float_to_bf16_row(const float* __restrict src, uint16_t* __restrict dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = float_to_bf16(src[i]);
}

D2V_CLONES void half_to_float_row(const c10::Half* __restrict src, float* __restrict dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<float>(src[i]);
}

D2V_CLONES void float_to_half_row(const float* __restrict src, c10::Half* __restrict dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = c10::Half(src[i]);
}

// Sum of f(i) over i < n in 16 independent lanes: a float reduction the compiler can vectorize without
// -ffast-math (and a slightly more accurate one than a single running sum).
template <class F>
__attribute__((always_inline)) inline float lane_sum(int64_t n, F f) {
  constexpr int kLanes = 16;
  float lanes[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int j = 0; j < kLanes; ++j) lanes[j] += f(i + j);
  }
  float sum = 0.f;
  for (; i < n; ++i) sum += f(i);
  for (int j = 0; j < kLanes; ++j) sum += lanes[j];
  return sum;
}

D2V_CLONES float bf16_to_float_row_sum(const uint16_t* __restrict src, float* __restrict dst, int64_t n) {
  return lane_sum(n, [&](int64_t i) { return dst[i] = bf16_to_float(src[i]); });
}

D2V_CLONES float half_to_float_row_sum(const c10::Half* __restrict src, float* __restrict dst, int64_t n) {
  return lane_sum(n, [&](int64_t i) { return dst[i] = static_cast<float>(src[i]); });
}

D2V_CLONES float float_row_sum(const float* __restrict src, float* __restrict dst, int64_t n) {
  return lane_sum(n, [&](int64_t i) { return dst[i] = src[i]; });
}

// Moments of R rows at once, so s1/s2 are loaded and stored once per R rows.
template <int R, class S, class Cvt>
__attribute__((always_inline)) inline void moments_rows(float* __restrict s1, float* __restrict s2,
                                                        const S* const* src, const float* __restrict shift,
                                                        int64_t n, Cvt cvt) {
  const S* __restrict r[R];
  for (int j = 0; j < R; ++j) r[j] = src[j];
  for (int64_t i = 0; i < n; ++i) {
    float a = s1[i], q = s2[i];
    const float m = shift[i];
#pragma GCC unroll 4
    for (int j = 0; j < R; ++j) {
      const float d = cvt(r[j][i]) - m;
      a += d;
      q += d * d;
    }
    s1[i] = a;
    s2[i] = q;
  }
}

#define D2V_MOMENTS(NAME, S, CVT)                                                                             \
  D2V_CLONES void NAME(float* s1, float* s2, const void* const* src, int rows, const float* shift, int64_t n) { \
    auto cvt = [](S v) { return CVT; };                                                                       \
    const S* const* s = reinterpret_cast<const S* const*>(src);                                               \
    if (rows == 4) return moments_rows<4>(s1, s2, s, shift, n, cvt);                                         \
    for (int j = 0; j < rows; ++j) moments_rows<1>(s1, s2, s + j, shift, n, cvt);                            \
  }
D2V_MOMENTS(moments_bf16, uint16_t, bf16_to_float(v))
D2V_MOMENTS(moments_half, c10::Half, static_cast<float>(v))
D2V_MOMENTS(moments_float, float, v)
#undef D2V_MOMENTS

}  // namespace

void add_moments_rows(float* s1, float* s2, const void* const* src, int rows, c10::ScalarType dtype,
                      const float* shift, int64_t n) {
  switch (dtype) {
    case c10::ScalarType::Float: return moments_float(s1, s2, src, rows, shift, n);
    case c10::ScalarType::BFloat16: return moments_bf16(s1, s2, src, rows, shift, n);
    case c10::ScalarType::Half: return moments_half(s1, s2, src, rows, shift, n);
    default: TORCH_CHECK(false, "d2v: unsupported dtype ", dtype);
  }
}

float load_row_sum(const void* src, c10::ScalarType dtype, float* x, int64_t n) {
  switch (dtype) {
    case c10::ScalarType::Float: return float_row_sum(static_cast<const float*>(src), x, n);
    case c10::ScalarType::BFloat16: return bf16_to_float_row_sum(static_cast<const uint16_t*>(src), x, n);
    case c10::ScalarType::Half: return half_to_float_row_sum(static_cast<const c10::Half*>(src), x, n);
    default: TORCH_CHECK(false, "d2v: unsupported dtype ", dtype);
  }
}

void load_row(const void* src, c10::ScalarType dtype, float* dst, int64_t n) {
  switch (dtype) {
    case c10::ScalarType::Float: std::memcpy(dst, src, n * sizeof(float)); return;
    case c10::ScalarType::BFloat16: bf16_to_float_row(static_cast<const uint16_t*>(src), dst, n); return;
    case c10::ScalarType::Half: half_to_float_row(static_cast<const c10::Half*>(src), dst, n); return;
    default: TORCH_CHECK(false, "d2v: unsupported dtype ", dtype);
  }
}

void store_row(const float* src, c10::ScalarType dtype, void* dst, int64_t n) {
  switch (dtype) {
    case c10::ScalarType::Float: std::memcpy(dst, src, n * sizeof(float)); return;
    case c10::ScalarType::BFloat16: float_to_bf16_row(src, static_cast<uint16_t*>(dst), n); return;
    case c10::ScalarType::Half: float_to_half_row(src, static_cast<c10::Half*>(dst), n); return;
    default: TORCH_CHECK(false, "d2v: unsupported dtype ", dtype);
  }
}

D2V_CLONES void mean_rstd_from_sum(const float* __restrict x, int64_t n, float sum, float eps, float* mean,
                                   float* rstd) {
  const float m = sum / static_cast<float>(n);
  const float sq = lane_sum(n, [&](int64_t i) { return (x[i] - m) * (x[i] - m); });
  *mean = m;
  *rstd = 1.f / std::sqrt(sq / static_cast<float>(n) + eps);
}

D2V_CLONES void mean_rstd(const float* __restrict x, int64_t n, float eps, float* mean, float* rstd) {
  const float m = lane_sum(n, [&](int64_t i) { return x[i]; }) / static_cast<float>(n);
  const float sq = lane_sum(n, [&](int64_t i) { return (x[i] - m) * (x[i] - m); });
  *mean = m;
  *rstd = 1.f / std::sqrt(sq / static_cast<float>(n) + eps);
}

D2V_CLONES void add_normalized(float* acc, const float* x, int64_t n, float mean, float rstd,
                               bool assign) {
  if (assign) {
    for (int64_t i = 0; i < n; ++i) acc[i] = (x[i] - mean) * rstd;
  } else {
    for (int64_t i = 0; i < n; ++i) acc[i] += (x[i] - mean) * rstd;
  }
}

D2V_CLONES void add_normalized_cols(float* acc, const float* x, int64_t n,
                                    const float* __restrict mean, const float* __restrict rstd, bool assign) {
  if (assign) {
    for (int64_t i = 0; i < n; ++i) acc[i] = (x[i] - mean[i]) * rstd[i];
  } else {
    for (int64_t i = 0; i < n; ++i) acc[i] += (x[i] - mean[i]) * rstd[i];
  }
}

D2V_CLONES void add_row(float* __restrict acc, const float* __restrict x, int64_t n, bool assign) {
  if (assign) {
    for (int64_t i = 0; i < n; ++i) acc[i] = x[i];
  } else {
    for (int64_t i = 0; i < n; ++i) acc[i] += x[i];
  }
}

D2V_CLONES void add_sq_dev_cols(float* __restrict acc, const float* __restrict x, const float* __restrict mean,
                                int64_t n) {
  for (int64_t i = 0; i < n; ++i) acc[i] += (x[i] - mean[i]) * (x[i] - mean[i]);
}

D2V_CLONES void scale_row(float* __restrict x, int64_t n, float s) {
  for (int64_t i = 0; i < n; ++i) x[i] *= s;
}

D2V_CLONES void lerp_row(float* __restrict t, const float* __restrict s, int64_t n, float w) {
  for (int64_t i = 0; i < n; ++i) t[i] += w * (s[i] - t[i]);
}

D2V_CLONES float regression_row(const float* __restrict p, const float* __restrict q, float* __restrict g, int64_t n,
                                float beta, float factor) {
  if (beta == 0.f) {
    const float sum = lane_sum(n, [&](int64_t i) { return (p[i] - q[i]) * (p[i] - q[i]); });
    if (g != nullptr) {
      const float two_f = 2.f * factor;
      for (int64_t i = 0; i < n; ++i) g[i] = two_f * (p[i] - q[i]);
    }
    return sum;
  }
  const float half_over_beta = 0.5f / beta, half_beta = 0.5f * beta, inv_beta = 1.f / beta;
  const float sum = lane_sum(n, [&](int64_t i) {
    const float d = p[i] - q[i];
    const float ad = std::fabs(d);
    return ad < beta ? half_over_beta * d * d : ad - half_beta;
  });
  if (g != nullptr) {
    for (int64_t i = 0; i < n; ++i) {
      const float d = p[i] - q[i];
      const float sign = static_cast<float>(d > 0.f) - static_cast<float>(d < 0.f);
      g[i] = factor * (std::fabs(d) < beta ? d * inv_beta : sign);
    }
  }
  return sum;
}

}  // namespace d2v::cpu
