// specdec._C_cuda: torch.library registrations only (ops live in their own files).
// Importing the module registers the ops as torch.ops.specdec.*; their fake (meta)
// kernels are registered from Python in specdec/ops/kv.py.
#include <Python.h>
#include <torch/library.h>

#include "device_ops.h"

extern "C" PyObject* PyInit__C_cuda(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C_cuda", "specdec CUDA ops (torch.ops.specdec)", -1,
                               nullptr};
  return PyModule_Create(&module);
}

TORCH_LIBRARY_FRAGMENT(specdec, m) {
  m.def("compact_kv(Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor accepted_idx, Tensor? num_accepted, "
        "Tensor? start_t, int start) -> ()");
  m.def("greedy_accept_out(Tensor parents, Tensor tokens, Tensor argmax, Tensor(a!) path, "
        "Tensor(b!) num_accepted, Tensor(c!) bonus) -> ()");
}

TORCH_LIBRARY_IMPL(specdec, CUDA, m) {
  m.impl("compact_kv", &specdec::compact_kv_cuda);
  m.impl("greedy_accept_out", &specdec::greedy_accept_cuda);
}
