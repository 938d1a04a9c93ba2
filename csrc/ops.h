// Entry points of the d2v_ext ops, one per op and device; ops.cpp registers them with the dispatcher.
//
// Semantics are those of d2v/ops/reference.py:
//   targets(layers K x (B, T, D), norm, final_norm, mask?, padding_mask?, eps) -> fp32 (B, T, D) or (N, D)
//   ema_update_(teacher fp32 [], student fp32/bf16/fp16 [], decay)            -> teacher updated in place
//   masked_regression_loss(pred (B*M, *S, D), target (B, *S, D), mask?, beta, scale, reduction, need_grad, M)
//                                                                            -> (loss fp32 0-dim, grad_pred)
//     (M = clones: pred row (b*M + m, s) pairs with target row (b, s); target is never copied M times)
#pragma once

#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include <ATen/core/Tensor.h>

namespace d2v {

enum class Norm { None, Layer, Instance };
Norm parse_norm(const std::string& name);

// (B*T) -> destination row of every (b, t) step where mask is set, -1 elsewhere; returns N, the masked count.
int64_t mask_rows(const at::Tensor& mask, std::vector<int64_t>& rows);

// The loss's shape contract: pred (clones * B, *S, D) and target (B, *S, D), clones >= 1 (a ValueError otherwise).
void check_loss_shapes(const at::Tensor& pred, const at::Tensor& target, int64_t clones);
// prod(S): the rows of D in one sample of pred (B*M, *S, D); 1 for pred (N, D).
int64_t loss_rows_per_sample(const at::Tensor& pred);

at::Tensor targets_cpu(at::TensorList layers, const std::string& norm, const std::string& final_norm,
                       const std::optional<at::Tensor>& mask, const std::optional<at::Tensor>& padding_mask,
                       double eps);
void ema_update_cpu(at::TensorList teacher, at::TensorList student, double decay);
std::tuple<at::Tensor, at::Tensor> masked_regression_loss_cpu(const at::Tensor& pred, const at::Tensor& target,
                                                              const std::optional<at::Tensor>& mask, double beta,
                                                              double scale, const std::string& reduction,
                                                              bool need_grad, int64_t clones);

#ifdef D2V_WITH_CUDA
at::Tensor targets_cuda(at::TensorList layers, const std::string& norm, const std::string& final_norm,
                        const std::optional<at::Tensor>& mask, const std::optional<at::Tensor>& padding_mask,
                        double eps);
void ema_update_cuda(at::TensorList teacher, at::TensorList student, double decay);
std::tuple<at::Tensor, at::Tensor> masked_regression_loss_cuda(const at::Tensor& pred, const at::Tensor& target,
                                                               const std::optional<at::Tensor>& mask, double beta,
                                                               double scale, const std::string& reduction,
                                                               bool need_grad, int64_t clones);
#endif

}  // namespace d2v
