// The d2v_ext op library: schemas, the CPU (and, when built with CUDA, CUDA) kernels bound to them, and the
// Python module d2v._C whose import loads them.
#include <Python.h>

#include <torch/library.h>

#include "ops.h"

// `import d2v._C` only has to load this library: the static TORCH_LIBRARY initializers below do the rest.
extern "C" PyObject* PyInit__C(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", "d2v compiled ops (torch.ops.d2v_ext)", -1, nullptr};
  PyObject* m = PyModule_Create(&module);
#ifdef D2V_WITH_CUDA
  if (m != nullptr) PyModule_AddIntConstant(m, "with_cuda", 1);
#else
  if (m != nullptr) PyModule_AddIntConstant(m, "with_cuda", 0);
#endif
  return m;
}

TORCH_LIBRARY(d2v_ext, m) {
  m.def("targets(Tensor[] layers, str norm, str final_norm, Tensor? mask, Tensor? padding_mask, float eps) -> Tensor");
  m.def("ema_update_(Tensor(a!)[] teacher, Tensor[] student, float decay) -> ()");
  m.def(
      "masked_regression_loss(Tensor pred, Tensor target, Tensor? mask, float beta, float scale, str reduction, "
      "bool need_grad, int clones=1) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(d2v_ext, CPU, m) {
  m.impl("targets", &d2v::targets_cpu);
  m.impl("ema_update_", &d2v::ema_update_cpu);
  m.impl("masked_regression_loss", &d2v::masked_regression_loss_cpu);
}

#ifdef D2V_WITH_CUDA
TORCH_LIBRARY_IMPL(d2v_ext, CUDA, m) {
  m.impl("targets", &d2v::targets_cuda);
  m.impl("ema_update_", &d2v::ema_update_cuda);
  m.impl("masked_regression_loss", &d2v::masked_regression_loss_cuda);
}
#endif
