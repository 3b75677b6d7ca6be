// Operator schemas of the `dlsn` namespace and the Python module of the extension.
// Kernels register themselves per device in csrc/cpu/*.cpp and csrc/cuda/*.cu; autograd and
// fake (meta) kernels are registered from Python (dlsn_kernels/_ops.py), once for all backends.
#include <Python.h>
#include <torch/library.h>

TORCH_LIBRARY(dlsn, m) {
  m.def("sblsh_hash(Tensor xm, Tensor rot) -> Tensor");
  m.def("bucket_sort(Tensor codes, int n_buckets) -> Tensor");
  m.def("chunk_attention(Tensor xm, Tensor v, Tensor lss, Tensor perm, int chunk_size) -> (Tensor, Tensor)");
  m.def("gla_attention(Tensor xm, Tensor v, Tensor lss, Tensor rot, int chunk_size) -> (Tensor, Tensor, Tensor)");
  m.def(
      "attention_backward(Tensor grad_out, Tensor delta, Tensor xm, Tensor v, Tensor lss, "
      "Tensor perm, Tensor lse, int chunk_size) -> (Tensor, Tensor, Tensor)");
}

// Importing dlsn_kernels._C runs the static registrations above. The module holds one flag,
// WITH_CUDA: whether the CUDA kernels were compiled in (setup.py defines DLSN_WITH_CUDA then), so a
// test can tell a CPU-only build from a CUDA build whose kernels failed to register.
static struct PyModuleDef dlsn_module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};

#ifdef DLSN_WITH_CUDA
constexpr long kWithCuda = 1;
#else
constexpr long kWithCuda = 0;
#endif

PyMODINIT_FUNC PyInit__C(void) {
  PyObject* module = PyModule_Create(&dlsn_module);
  if (module != nullptr && PyModule_AddIntConstant(module, "WITH_CUDA", kWithCuda) != 0) {
    Py_DECREF(module);
    return nullptr;
  }
  return module;
}
