// Stable bucket sort on the CPU: a counting sort per (n, round) — histogram, exclusive scan,
// then a scatter in position order, which is what makes it stable.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "checks.h"
#include "cpu/cpu_kernels.h"

namespace dlsn::cpu {

at::Tensor as_int64(const at::Tensor& index) {
  return index.scalar_type() == at::kLong ? index.contiguous() : index.to(at::kLong).contiguous();
}

namespace {

template <typename index_t>
void counting_sort(const at::Tensor& codes, int64_t n_buckets, at::Tensor& perm) {
  const int64_t rows = codes.size(0) * codes.size(1), length = codes.size(2);
  const index_t* codes_ptr = codes.data_ptr<index_t>();
  int64_t* perm_ptr = perm.data_ptr<int64_t>();
  at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
    std::vector<int64_t> start(n_buckets + 1);
    for (int64_t row = begin; row < end; ++row) {
      const index_t* code = codes_ptr + row * length;
      int64_t* out = perm_ptr + row * length;
      std::fill(start.begin(), start.end(), 0);
      for (int64_t l = 0; l < length; ++l) ++start[static_cast<int64_t>(code[l]) + 1];  // in range: checked
      for (int64_t b = 0; b < n_buckets; ++b) start[b + 1] += start[b];
      for (int64_t l = 0; l < length; ++l) out[start[code[l]]++] = l;
    }
  });
}

}  // namespace

at::Tensor bucket_sort_cpu(const at::Tensor& codes_in, int64_t n_buckets) {
  at::AutoDispatchBelowADInplaceOrView below_autograd;  // kernels call ATen ops (mm) internally
  const at::Tensor codes = codes_in.contiguous();  // any strides: one copy if strided
  check_sort_inputs(codes, n_buckets);
  check_codes(codes, n_buckets);
  at::Tensor perm = at::empty(codes.sizes(), codes.options().dtype(at::kLong));
  if (codes.scalar_type() == at::kLong) {
    counting_sort<int64_t>(codes, n_buckets, perm);
  } else {
    counting_sort<int32_t>(codes, n_buckets, perm);
  }
  return perm;
}

TORCH_LIBRARY_IMPL(dlsn, CPU, m) { m.impl("bucket_sort", &bucket_sort_cpu); }

}  // namespace dlsn::cpu
