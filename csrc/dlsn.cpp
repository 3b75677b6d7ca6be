// The Python module of the extension. The operator schemas are defined once, in Python
// (dlsn_kernels/_ops.py SCHEMAS), before this module is imported; the kernels register their
// implementations per device in csrc/cpu/*.cpp and csrc/cuda/registration.cpp. Autograd and fake (meta)
// kernels are registered from Python too, once for all backends.
#include <Python.h>

// Importing dlsn_kernels._C runs the static kernel registrations. The module holds one flag,
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
