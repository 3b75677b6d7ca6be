// The inverse key norms 1 / max(||xm||, eps) of every position, computed once per call and read by the
// tensor-core attention kernels (forward and backward) for each key they gather. Torch-free.
#pragma once

#include <cmath>
#include <cstdint>

namespace dlsn {
namespace cuda_impl {
namespace tc {

// inv_norm[row] = 1 / max(||xm[row]||, eps) for the N*L rows of xm [N*L, Cm]; a warp per row. The plain sum of
// squares cannot overflow: the ops refuse max |xm| >= 2^(product_headroom / 2) first (magnitudes.h), which keeps
// Cm max|xm|^2 below 2^126.
template <typename T>
__global__ void __launch_bounds__(256) key_norms_kernel(const T* __restrict__ xm, float* __restrict__ inv_norm,
                                                        int64_t n_rows, int64_t cm, float eps) {
  const int lane = threadIdx.x % 32;
  const int64_t row = int64_t(blockIdx.x) * 8 + threadIdx.x / 32;
  if (row >= n_rows) return;  // the whole warp leaves together
  float sumsq = 0.f;
  for (int64_t col = lane; col < cm; col += 32) {
    const float x = static_cast<float>(xm[row * cm + col]);
    sumsq += x * x;
  }
  for (int offset = 16; offset > 0; offset >>= 1) sumsq += __shfl_xor_sync(0xffffffffu, sumsq, offset);
  if (lane == 0) inv_norm[row] = 1.f / fmaxf(sqrtf(sumsq), eps);
}

}  // namespace tc
}  // namespace cuda_impl
}  // namespace dlsn
