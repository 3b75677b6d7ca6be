// Declarations shared by the CPU kernel files.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

#include "checks.h"
#include "slot_layout.h"  // SlotLayout: the sorted-slot layout of DESIGN.md 1.3

namespace dlsn::cpu {

// 1 / max(||xm[n, l]||, eps) for every position: keys are normalised through this factor.
template <typename scalar_t>
at::Tensor inverse_norms(const at::Tensor& xm) {
  const int64_t rows = xm.size(0) * xm.size(1), cm = xm.size(2);
  at::Tensor inv = at::empty({xm.size(0), xm.size(1)}, xm.options());
  const scalar_t* x = xm.data_ptr<scalar_t>();
  scalar_t* out = inv.data_ptr<scalar_t>();
  at::parallel_for(0, rows, 256, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      scalar_t sq = 0;
      for (int64_t k = 0; k < cm; ++k) sq += x[row * cm + k] * x[row * cm + k];
      out[row] = scalar_t(1) / std::max(std::sqrt(sq), scalar_t(kKeyNormEps));
    }
  });
  return inv;
}

template <typename scalar_t>
void gather_rows(const scalar_t* src, int64_t width, const int64_t* rows, int64_t count, scalar_t* dst) {
  for (int64_t i = 0; i < count; ++i) std::memcpy(dst + i * width, src + rows[i] * width, width * sizeof(scalar_t));
}

// perm [N,R,L] int64 must be a permutation of 0..L-1 per (n, round); codes [N,R,L] must lie in
// [0, n_buckets). Both raise ValueError naming the argument and the first bad (n, round, position).
void check_permutation(const at::Tensor& perm64, const char* name);
void check_codes(const at::Tensor& codes, int64_t n_buckets);

// perm as contiguous int64 (int32 input is widened once; int64 input is returned as is).
at::Tensor as_int64(const at::Tensor& index);

// Forward of the chunk attention over every round of perm [N,R,L].
// merge == false: out [N,R,L,Cv], lse [N,R,L] (per round).
// merge == true:  out [N,L,Cv], lse [N,L] (rounds merged on the fly, DESIGN.md).
void attention_forward(const at::Tensor& xm, const at::Tensor& v, const at::Tensor& lss, const at::Tensor& perm,
                       int64_t chunk_size, bool merge, at::Tensor& out, at::Tensor& lse);

at::Tensor sblsh_hash_cpu(const at::Tensor& xm, const at::Tensor& rot);
at::Tensor bucket_sort_cpu(const at::Tensor& codes, int64_t n_buckets);

}  // namespace dlsn::cpu
