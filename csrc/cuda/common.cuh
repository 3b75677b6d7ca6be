// Shared pieces of the CUDA kernels: tile sizes, float32 accumulation, warp reductions and the block-wide
// "32 rows x 32 rows" dot-product tile used by the attention forward and backward kernels. The sorted-slot
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
#include "slot_layout.h"  // slot_position, key_chunk_of, query_chunk_reading, first_padded_copy

namespace dlsn {
namespace cuda_impl {

constexpr int kWarp = 32;
constexpr unsigned kFullMask = 0xffffffffu;

// Attention kernels: a block of 8 warps works on a tile of 32 query rows against 32 key rows at a time.
// Score-like quantities of the tile live in registers as (row = warp + 8 * a, key = lane), a = 0..3.
constexpr int kThreads = 256;
constexpr int kWarps = kThreads / kWarp;             // 8
constexpr int kRowsPerWarp = kTile / kWarps;         // 4
constexpr int kChanTile = 32;                        // channels staged in shared memory per step
constexpr int kColsPerLane = kCols / kWarp;          // 4: column lane + 32 * u, u = 0..3
constexpr float kKeyNormEpsF = static_cast<float>(kKeyNormEps);

static_assert(kTile == kWarp, "the key of a tile is indexed by the lane");
static_assert(kRowsPerWarp * kWarps == kTile, "every row of a tile belongs to one warp");

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

// float16/bfloat16/float32 -> float32.
template <typename T>
__device__ __forceinline__ float to_float(T x) {
  return static_cast<float>(x);
}

// Butterfly reductions: every lane ends with the result, and the order of the additions is fixed,
// so the result is bitwise the same on every run.
__device__ __forceinline__ float warp_max(float x) {
  for (int offset = kWarp / 2; offset > 0; offset >>= 1) x = fmaxf(x, __shfl_xor_sync(kFullMask, x, offset));
  return x;
}

__device__ __forceinline__ float warp_sum(float x) {
  for (int offset = kWarp / 2; offset > 0; offset >>= 1) x += __shfl_xor_sync(kFullMask, x, offset);
  return x;
}

// Block-wide tile of dot products over C channels:
//   acc[a] += sum_c A[a_rows[warp + 8a], c] * B[b_rows[lane], c]      (a = 0..3)
// and, with kSumSq, sumsq += sum_c B[b_rows[lane], c]^2 (the squared norm of this lane's B row).
// a_rows/b_rows (shared memory, 32 entries each) hold row indices into the [*, C] matrices A and B;
// -1 marks a row that reads as zeros. The channels go through shared memory kChanTile at a time.
// Every thread of the block must call it (it synchronises the block); the caller synchronises after
// writing a_rows/b_rows.
template <typename T, bool kSumSq>
__device__ __forceinline__ void tile_dot(const T* __restrict__ A, const int64_t* a_rows, const T* __restrict__ B,
                                         const int64_t* b_rows, int64_t C, float (&acc)[kRowsPerWarp],
                                         float& sumsq, float (*s_a)[kChanTile + 1], float (*s_b)[kChanTile + 1]) {
  const int tid = threadIdx.x, lane = tid % kWarp, warp = tid / kWarp;
  for (int64_t c0 = 0; c0 < C; c0 += kChanTile) {
    __syncthreads();  // the previous step (or the previous user of s_a/s_b) has finished reading
    for (int e = tid; e < kTile * kChanTile; e += kThreads) {
      const int row = e / kChanTile, cc = e % kChanTile;
      const int64_t c = c0 + cc;
      const int64_t ra = a_rows[row], rb = b_rows[row];
      s_a[row][cc] = (ra >= 0 && c < C) ? to_float(A[ra * C + c]) : 0.f;
      s_b[row][cc] = (rb >= 0 && c < C) ? to_float(B[rb * C + c]) : 0.f;
    }
    __syncthreads();
#pragma unroll 8
    for (int cc = 0; cc < kChanTile; ++cc) {
      const float bv = s_b[lane][cc];  // row pitch 33: the 32 lanes hit 32 different banks
      if (kSumSq) sumsq += bv * bv;
#pragma unroll
      for (int a = 0; a < kRowsPerWarp; ++a) acc[a] += s_a[warp + kWarps * a][cc] * bv;  // broadcast read
    }
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

// 1 / max(||xm||, eps) per position [N, L], float32.
inline at::Tensor inverse_key_norms(const at::Tensor& xm, cudaStream_t stream) {
  auto inv = at::empty({xm.size(0), xm.size(1)}, xm.options().dtype(at::kFloat));
  const int64_t rows = xm.size(0) * xm.size(1);
  if (rows == 0) return inv;
  dispatch_float(xm.scalar_type(), [&](auto element) {
    using scalar_t = decltype(element);
    tc::key_norms_kernel<scalar_t><<<static_cast<unsigned>(ceil_div(rows, 8)), 256, 0, stream>>>(
        xm.data_ptr<scalar_t>(), inv.data_ptr<float>(), rows, xm.size(2), kKeyNormEpsF);
  });
  return inv;
}

}  // namespace cuda_impl
}  // namespace dlsn
