// Shared host pieces of the CUDA launchers: dtype dispatch, the tensor-core choice, shared-memory setup and the
// per-call key norms. The scalar kernels' tiles and reductions are simt_tile.cuh (torch-free); the sorted-slot
// layout (padding, adjacent chunks) is slot_layout.h, shared with the CPU kernels.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/macros/Macros.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <type_traits>

#include "checks.h"  // kKeyNormEps; the argument checks run in registration.cpp
#include "cuda/block_index.cuh"
#include "cuda/geometry.h"  // kTile, kCols, ceil_div: registration.cpp checks the grids with them
#include "cuda/key_norms.cuh"
#include "cuda/launchers.h"
#include "cuda/simt_tile.cuh"  // kThreads, tile_dot, warp_max/warp_sum of the scalar kernels
#include "slot_layout.h"  // slot_position, key_chunk_of, query_chunk_reading, first_padded_copy

namespace dlsn {
namespace cuda_impl {

constexpr float kKeyNormEpsF = static_cast<float>(kKeyNormEps);

// Dtype dispatch without an error branch, unlike AT_DISPATCH (whose default case throws from this
// nvcc-compiled host code): registration.cpp has already refused every other dtype, so the last case
// is the only one left. f receives a value of the element type.
template <typename F>
void dispatch_float(at::ScalarType st, F&& f) {
  if (st == at::kHalf) {
    f(at::Half{});
  } else if (st == at::kBFloat16) {
    f(at::BFloat16{});
  } else {
    f(float{});
  }
}

template <typename F>
void dispatch_index(at::ScalarType st, F&& f) {
  if (st == at::kInt) {
    f(int32_t{});
  } else {
    f(int64_t{});
  }
}

// The tensor-core kernels (*_tc.cuh) run bfloat16/float16 always and float32 when the precision policy
// allows TF32 (torch.get_float32_matmul_precision() != "highest"), on sm_80 or newer; the scalar kernels
// (IEEE float32 FFMA) run the rest. Each launcher also checks its kernels' shared memory (fits_shared_memory).
inline bool tensor_cores_allowed(const at::Tensor& xm) {
  if (at::cuda::getCurrentDeviceProperties()->major < 8) return false;
  return xm.scalar_type() != at::kFloat ||
         at::globalContext().float32MatmulPrecision() != at::Float32MatmulPrecision::HIGHEST;
}

template <typename T>
constexpr const char* dtype_name() {
  return sizeof(T) == 4 ? "float32" : std::is_same<T, at::BFloat16>::value ? "bfloat16" : "float16";
}

// Records the first setup failure of a call (launchers.h); returns false when err is one.
template <typename T>
bool setup_ok(cudaError_t err, const char* kernel, const char* call, int64_t bytes) {
  if (err == cudaSuccess) return true;
  SetupFailure& f = setup_failure();
  if (f.kernel == nullptr) f = SetupFailure{kernel, dtype_name<T>(), call, bytes, static_cast<int>(err)};
  return false;
}

// Whether `kernel` can run with `bytes` of dynamic shared memory on this device: its static shared memory
// (the __shared__ arrays) counts against the same per-block limit. A kernel whose attributes cannot be read
// is recorded as a setup failure (and reported as not fitting).
template <typename T, typename Kernel>
bool fits_shared_memory(Kernel* kernel, int64_t bytes, const char* name) {
  cudaFuncAttributes attr{};
  if (!setup_ok<T>(cudaFuncGetAttributes(&attr, kernel), name, "cudaFuncGetAttributes", bytes)) return false;
  const int64_t limit = static_cast<int64_t>(at::cuda::getCurrentDeviceProperties()->sharedMemPerBlockOptin);
  return static_cast<int64_t>(attr.sharedSizeBytes) + bytes <= limit;
}

// Above 48 KB of dynamic shared memory a kernel must opt in; fits_shared_memory() checked the device has it.
// false (recorded for registration.cpp to raise) when the runtime refuses: the caller skips the launch.
template <typename T, typename Kernel>
bool allow_shared_memory(Kernel* kernel, int64_t bytes, const char* name) {
  const cudaError_t err =
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes));
  return setup_ok<T>(err, name, "cudaFuncSetAttribute(cudaFuncAttributeMaxDynamicSharedMemorySize)", bytes);
}

// Per position [N, L]: inv = 1 / max(||xm||, eps) (float32) and row_exp, the exponent of the row's largest
// magnitude (int32), and top_exp [1], the largest (at least 0): the forwards' query scaling (key_norms.cuh).
struct KeyNorms {
  at::Tensor inv, row_exp, top_exp;
};

inline KeyNorms key_norms(const at::Tensor& xm, cudaStream_t stream) {
  const auto i32 = xm.options().dtype(at::kInt);
  KeyNorms k{at::empty({xm.size(0), xm.size(1)}, xm.options().dtype(at::kFloat)),
             at::empty({xm.size(0), xm.size(1)}, i32), at::zeros({1}, i32)};
  const int64_t rows = xm.size(0) * xm.size(1);
  if (rows == 0) return k;
  dispatch_float(xm.scalar_type(), [&](auto element) {
    using scalar_t = decltype(element);
    tc::key_norms_kernel<scalar_t><<<static_cast<unsigned>(ceil_div(rows, 8)), 256, 0, stream>>>(
        xm.data_ptr<scalar_t>(), k.inv.data_ptr<float>(), k.row_exp.data_ptr<int>(), k.top_exp.data_ptr<int>(), rows,
        xm.size(2), kKeyNormEpsF);
  });
  return k;
}

}  // namespace cuda_impl
}  // namespace dlsn
