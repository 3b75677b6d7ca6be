// SB-LSH codes on CUDA: the launcher of hash::sblsh_hash_kernel (sblsh_hash.cuh, which says who owns what).
#include "common.cuh"
#include "cuda/sblsh_hash.cuh"
#include "cuda/staging.cuh"  // rows_aligned16

namespace dlsn {
namespace cuda_impl {

at::Tensor sblsh_hash_cuda(const at::Tensor& xm, const at::Tensor& rot) {
  const c10::cuda::CUDAGuard guard(xm.device());
  const int64_t n = xm.size(0), length = xm.size(1), channels = xm.size(2);
  const int64_t rounds = rot.size(1), n_buckets = rot.size(2);
  auto codes = at::empty({n, rounds, length}, xm.options().dtype(at::kLong));
  const int64_t n_positions = n * length;
  if (n_positions == 0) return codes;
  // gridDim.y = rounds and n_buckets fit (registration.cpp: check_hash_grid, check_bucket_count)
  const dim3 grid(static_cast<unsigned>(ceil_div(n_positions, hash::kRows)), static_cast<unsigned>(rounds));
  const auto stream = at::cuda::getCurrentCUDAStream();
  dispatch_float(xm.scalar_type(), [&](auto element) {
    using scalar_t = decltype(element);
    const bool aligned = tc::rows_aligned16(xm.data_ptr<scalar_t>(), channels, sizeof(scalar_t));
    hash::sblsh_hash_kernel<scalar_t><<<grid, hash::kThreads, 0, stream>>>(
        xm.data_ptr<scalar_t>(), rot.data_ptr<scalar_t>(), codes.data_ptr<int64_t>(), n_positions, length,
        static_cast<int>(rounds), static_cast<int>(n_buckets), static_cast<int>(channels), aligned);
  });
  return codes;
}

}  // namespace cuda_impl
}  // namespace dlsn
