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

// Importing dlsn_kernels._C runs the static registrations above; the module itself is empty.
static struct PyModuleDef dlsn_module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&dlsn_module); }
