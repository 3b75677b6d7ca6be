// SB-LSH codes on CUDA (DESIGN.md 1.1): codes[n, r, l] = argmax_b xm[n, l, :] . rot[:, r, b], lowest b on ties.
//
// Who owns what: one thread per (position n*L + l, round r); blockIdx.y is the round. The thread computes
// the projections kBucketsPerPass buckets at a time in float32 registers and keeps the running argmax, so
// no [N, R, L, B] tensor ever exists. All threads of a block read the same rot entries (a broadcast).
#include "common.cuh"

namespace dlsn {
namespace cuda_impl {
namespace {

constexpr int kHashThreads = 256;
constexpr int kBucketsPerPass = 8;

template <typename T>
__global__ void __launch_bounds__(kHashThreads)
    sblsh_hash_kernel(const T* __restrict__ xm, const T* __restrict__ rot, int64_t* __restrict__ codes,
                      int64_t n_positions, int64_t length, int64_t rounds, int64_t n_buckets, int64_t channels) {
  const int64_t row = int64_t(blockIdx.x) * kHashThreads + threadIdx.x;  // n * L + l
  if (row >= n_positions) return;
  const int64_t r = blockIdx.y;
  const T* x = xm + row * channels;

  float best = 0.f;
  int64_t best_bucket = 0;
  for (int64_t b0 = 0; b0 < n_buckets; b0 += kBucketsPerPass) {
    float proj[kBucketsPerPass];
#pragma unroll
    for (int bb = 0; bb < kBucketsPerPass; ++bb) proj[bb] = 0.f;
    for (int64_t c = 0; c < channels; ++c) {
      const float xv = to_float(x[c]);
      const T* rot_row = rot + (c * rounds + r) * n_buckets;  // rot[c, r, :]
#pragma unroll
      for (int bb = 0; bb < kBucketsPerPass; ++bb) {
        if (b0 + bb < n_buckets) proj[bb] += xv * to_float(rot_row[b0 + bb]);
      }
    }
#pragma unroll
    for (int bb = 0; bb < kBucketsPerPass; ++bb) {
      const int64_t b = b0 + bb;
      if (b >= n_buckets) break;
      // Strictly greater keeps the lowest b on ties; a NaN wins over numbers, the first NaN stays
      // (torch.argmax's rule).
      const bool better = proj[bb] > best || (isnan(proj[bb]) && !isnan(best));
      if (b == 0 || better) {
        best = proj[bb];
        best_bucket = b;
      }
    }
  }
  const int64_t n = row / length, l = row % length;
  codes[(n * rounds + r) * length + l] = best_bucket;
}

}  // namespace

at::Tensor sblsh_hash_cuda(const at::Tensor& xm, const at::Tensor& rot) {
  const c10::cuda::CUDAGuard guard(xm.device());
  const int64_t n = xm.size(0), length = xm.size(1), channels = xm.size(2);
  const int64_t rounds = rot.size(1), n_buckets = rot.size(2);
  auto codes = at::empty({n, rounds, length}, xm.options().dtype(at::kLong));
  const int64_t n_positions = n * length;
  if (n_positions == 0) return codes;
  const dim3 grid(static_cast<unsigned>(ceil_div(n_positions, kHashThreads)), static_cast<unsigned>(rounds));
  const auto stream = at::cuda::getCurrentCUDAStream();
  dispatch_float(xm.scalar_type(), [&](auto element) {
    using scalar_t = decltype(element);
    sblsh_hash_kernel<scalar_t><<<grid, kHashThreads, 0, stream>>>(
        xm.data_ptr<scalar_t>(), rot.data_ptr<scalar_t>(), codes.data_ptr<int64_t>(), n_positions, length, rounds,
        n_buckets, channels);
  });
  return codes;
}

}  // namespace cuda_impl
}  // namespace dlsn
