// CPU kernel of `masked_regression_loss`: loss and d(loss)/d(pred) in one pass over the selected rows.
//
// Rows are processed in fixed blocks whose partial sums are added in block order, so the loss does not depend
// on the number of threads. With clones = M, pred (B*M, *S, D) holds M clones of each sample of target
// (B, *S, D): each pred row reads its target row in place (target is never repeated in memory).
#include <ATen/ATen.h>
#include <c10/util/accumulate.h>
#include <ATen/Parallel.h>

#include <cstring>

#include "cpu_rows.h"
#include "ops.h"

namespace d2v {

namespace {
constexpr int64_t kRowsPerBlock = 32;

at::Tensor as_supported(const at::Tensor& x) {
  const auto d = x.scalar_type();
  return (d == at::kFloat || d == at::kBFloat16 || d == at::kHalf ? x : x.to(at::kFloat)).contiguous();
}
}  // namespace

// Plain TORCH_CHECK (c10::Error -> RuntimeError), not TORCH_CHECK_VALUE: on an H100/H200 image whose default
// compiler is a wrapper (/opt/gcc/bin/g++, GCC 13.3), an extension built with it crashed the interpreter (SIGSEGV)
// when it threw c10::ValueError, while c10::Error was caught fine; the same code built with /usr/bin/g++ 13.3 raised
// both. d2v.ops already raises the ValueError users see before any kernel runs; this is the kernel's own guard.
void check_loss_shapes(const at::Tensor& pred, const at::Tensor& target, int64_t clones) {
  TORCH_CHECK(clones >= 1, "d2v: clones must be >= 1, got ", clones);
  if (clones == 1) {
    TORCH_CHECK(pred.sizes() == target.sizes() && pred.dim() >= 1,
                      "d2v: pred and target must have one shape (..., D); got ", pred.sizes(), " and ",
                      target.sizes());
    return;
  }
  TORCH_CHECK(pred.dim() >= 2 && pred.dim() == target.dim() && pred.size(0) == clones * target.size(0) &&
                        pred.sizes().slice(1) == target.sizes().slice(1),
                    "d2v: with clones=", clones, ", pred must have shape (", clones,
                    " * B, ..., D) for target (B, ..., D); got pred ", pred.sizes(), " and target ", target.sizes());
}

int64_t loss_rows_per_sample(const at::Tensor& pred) {
  return pred.dim() >= 2 ? c10::multiply_integers(pred.sizes().slice(1, pred.dim() - 2)) : 1;
}

std::tuple<at::Tensor, at::Tensor> masked_regression_loss_cpu(const at::Tensor& pred_in, const at::Tensor& target_in,
                                                              const std::optional<at::Tensor>& mask_in, double beta,
                                                              double scale, const std::string& reduction,
                                                              bool need_grad, int64_t clones) {
  check_loss_shapes(pred_in, target_in, clones);
  TORCH_CHECK(reduction == "mean" || reduction == "sum", "d2v: reduction must be 'mean' or 'sum'");
  const at::Tensor pred = as_supported(pred_in), target = as_supported(target_in);
  // R rows of D; with D = 0 still the product of the leading sizes (the mask has that many entries).
  const int64_t D = pred.size(-1), R = c10::multiply_integers(pred.sizes().slice(0, pred.dim() - 1));
  // pred row r = (b * M + m) * S + s reads target row b * S + s (S rows per sample).
  const int64_t S = loss_rows_per_sample(pred), group = S * clones;
  at::Tensor mask;
  const bool* m = nullptr;
  int64_t count = R;
  if (mask_in.has_value()) {
    TORCH_CHECK(mask_in->numel() == R, "d2v: mask must have pred.shape[:-1]");
    mask = mask_in->to(at::kBool).contiguous();
    m = mask.data_ptr<bool>();
    count = 0;
    for (int64_t r = 0; r < R; ++r) count += m[r];
  }
  const double factor = reduction == "mean" ? scale / static_cast<double>(std::max<int64_t>(count, 1)) : scale;
  // The gradient is fp32, or bf16 for bf16 pred (fp32's exponent range), never fp16: the autograd wrapper scales
  // it by the incoming gradient before rounding (an unscaled fp16 gradient underflows, and a grad scaler's
  // factor overflows fp16).
  const auto gd = pred.scalar_type() == at::kBFloat16 ? at::kBFloat16 : at::kFloat;
  at::Tensor grad = need_grad ? at::empty(pred.sizes(), pred.options().dtype(gd)) : at::empty({0}, pred_in.options());
  char* gp = need_grad ? static_cast<char*>(grad.data_ptr()) : nullptr;
  const bool grad_direct = gd == at::kFloat;  // else through a scratch row, converted on store
  const auto pd = pred.scalar_type(), td = target.scalar_type();
  const char* pp = static_cast<const char*>(pred.data_ptr());
  const char* tp = static_cast<const char*>(target.data_ptr());
  const size_t ps = c10::elementSize(pd), ts = c10::elementSize(td), gs = c10::elementSize(gd);

  const int64_t blocks = (R + kRowsPerBlock - 1) / kRowsPerBlock;
  std::vector<double> partial(blocks, 0.0);
  at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> p(D), q(D), g(D);
    for (int64_t blk = begin; blk < end; ++blk) {
      double sum = 0.0;
      for (int64_t r = blk * kRowsPerBlock; r < std::min(R, (blk + 1) * kRowsPerBlock); ++r) {
        char* grow = need_grad ? gp + r * D * gs : nullptr;
        if (m != nullptr && !m[r]) {
          if (grow != nullptr) std::memset(grow, 0, D * gs);
          continue;
        }
        const float* prow = reinterpret_cast<const float*>(pp + r * D * ps);
        const int64_t tr = clones == 1 ? r : (r / group) * S + r % S;
        const float* qrow = reinterpret_cast<const float*>(tp + tr * D * ts);
        if (pd != at::kFloat) cpu::load_row(pp + r * D * ps, pd, p.data(), D), prow = p.data();
        if (td != at::kFloat) cpu::load_row(tp + tr * D * ts, td, q.data(), D), qrow = q.data();
        float* g_out = grow == nullptr ? nullptr : grad_direct ? reinterpret_cast<float*>(grow) : g.data();
        sum += cpu::regression_row(prow, qrow, g_out, D, static_cast<float>(beta), static_cast<float>(factor));
        if (grow != nullptr && !grad_direct) cpu::store_row(g.data(), gd, grow, D);
      }
      partial[blk] = sum;
    }
  });
  double total = 0.0;
  for (double v : partial) total += v;
  at::Tensor loss = at::scalar_tensor(total * factor, pred_in.options().dtype(at::kFloat));
  return {loss, grad};
}

}  // namespace d2v
