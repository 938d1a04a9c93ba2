// Row primitives of the CPU kernels: dtype conversion and fp32 arithmetic over contiguous rows.
//
// The kernels convert each row of bf16/fp16/fp32 input into an fp32 scratch row that stays in L1, and do all
// arithmetic there, so the loops below see only float* and vectorize. They live in cpu_rows.cpp, built for
// AVX-512, AVX2 and baseline x86-64 at once (GCC target_clones), so one binary runs everywhere at full width.
#pragma once

#include <cstdint>

#include <c10/core/ScalarType.h>

namespace d2v::cpu {

// dst[0:n] = float(src[0:n]); src has dtype `dtype` (Float, BFloat16 or Half).
void load_row(const void* src, c10::ScalarType dtype, float* dst, int64_t n);
// dst[0:n] = dtype(src[0:n]), rounding to nearest even.
void store_row(const float* src, c10::ScalarType dtype, void* dst, int64_t n);

// Biased mean and 1/sqrt(var + eps) of x[0:n], two-pass for accuracy.
void mean_rstd(const float* x, int64_t n, float eps, float* mean, float* rstd);
// x[0:n] = float(src[0:n]) as load_row, returning the sum of x (one pass: conversion fused with the reduction).
float load_row_sum(const void* src, c10::ScalarType dtype, float* x, int64_t n);
// The same given sum(x[0:n]).
void mean_rstd_from_sum(const float* x, int64_t n, float sum, float eps, float* mean, float* rstd);
// acc = (x - mean) * rstd (assign; acc may be x) or acc += (x - mean) * rstd (accumulate).
void add_normalized(float* acc, const float* x, int64_t n, float mean, float rstd, bool assign);
// acc = (x - mean[i]) * rstd[i] per column i, assign or accumulate (instance norm).
void add_normalized_cols(float* acc, const float* x, int64_t n, const float* mean, const float* rstd, bool assign);
// acc = x (assign) or acc += x.
void add_row(float* acc, const float* x, int64_t n, bool assign);
// acc += (x - mean)^2 per column.
void add_sq_dev_cols(float* acc, const float* x, const float* mean, int64_t n);
// For r < rows (1 to 4 rows of dtype `dtype`, each n wide): d = float(src[r][i]) - shift[i]; s1[i] += d and
// s2[i] += d * d, in fp32 (callers flush these partial sums to fp64 every few dozen rows).
void add_moments_rows(float* s1, float* s2, const void* const* src, int rows, c10::ScalarType dtype,
                      const float* shift, int64_t n);
// x *= s.
void scale_row(float* x, int64_t n, float s);
// t += w * (s - t): the EMA update of fp32 teacher t from fp32 student s.
void lerp_row(float* t, const float* s, int64_t n, float w);
// Per element d = p - q; loss d^2 (beta == 0) or smooth-L1(beta); g = dloss/dp * factor when g != nullptr.
// Returns the fp32 sum of the per-element loss (unscaled).
float regression_row(const float* p, const float* q, float* g, int64_t n, float beta, float factor);

}  // namespace d2v::cpu
