// Declarations shared by the CPU kernel files.
#pragma once

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "checks.h"
#include "cpu/vec_loops.h"
#include "slot_layout.h"  // SlotLayout: the sorted-slot layout of DESIGN.md 1.3

namespace dlsn::cpu {

// The type the kernels compute in: float32 for float16/bfloat16/float32 storage, float64 for float64.
template <typename scalar_t>
using acc_type_t = at::opmath_type<scalar_t>;

// Options of the accumulation type of t (float32 for 16-bit and float32 storage, float64 for float64).
inline at::TensorOptions acc_options_of(const at::Tensor& t) {
  return t.options().dtype(accumulate_type(t.scalar_type()));
}

// ||x|| of one row of cm values, computed scaled by its largest magnitude so that no square overflows or
// underflows (x * 1e30 has a finite norm in float32; its squares would be inf).
template <typename scalar_t>
acc_type_t<scalar_t> row_norm(const scalar_t* x, int64_t cm) {
  using acc_t = acc_type_t<scalar_t>;
  acc_t top = 0;
  for (int64_t k = 0; k < cm; ++k) top = std::max(top, std::abs(static_cast<acc_t>(x[k])));
  if (!(top > 0) || std::isinf(top)) return top;  // 0, inf or NaN: scaling would give 0/0
  acc_t sq = 0;
  for (int64_t k = 0; k < cm; ++k) {
    const acc_t y = static_cast<acc_t>(x[k]) / top;
    sq += y * y;
  }
  return top * std::sqrt(sq);
}

// 1 / max(||xm[n, l]||, eps) for every position, in the accumulation type: keys are normalised by it.
template <typename scalar_t>
at::Tensor inverse_norms(const at::Tensor& xm) {
  using acc_t = acc_type_t<scalar_t>;
  const int64_t rows = xm.size(0) * xm.size(1), cm = xm.size(2);
  at::Tensor inv = at::empty({xm.size(0), xm.size(1)}, acc_options_of(xm));
  const scalar_t* x = xm.data_ptr<scalar_t>();
  acc_t* out = inv.data_ptr<acc_t>();
  at::parallel_for(0, rows, 256, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      out[row] = acc_t(1) / std::max(row_norm(x + row * cm, cm), acc_t(kKeyNormEps));
    }
  });
  return inv;
}

// dst[i, :] = src[rows[i], :] in the accumulation type: a row copy for float32/float64, a widening copy for
// 16-bit storage (rows are read in 16 bits; the job's scratch is float32).
template <typename scalar_t, typename acc_t>
void gather_rows(const scalar_t* src, int64_t width, const int64_t* rows, int64_t count, acc_t* dst) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    for (int64_t i = 0; i < count; ++i) std::memcpy(dst + i * width, src + rows[i] * width, width * sizeof(acc_t));
  } else {
    for (int64_t i = 0; i < count; ++i) widen_scaled(src + rows[i] * width, acc_t(1), dst + i * width, width);
  }
}

// dst[i, :] = src[rows[i], :] * scale[rows[i]]: keys normalised as they are gathered, before any product, so
// that the scores never hold the unnormalised (possibly overflowing) dot products.
template <typename scalar_t, typename acc_t>
void gather_scaled_rows(const scalar_t* src, int64_t width, const int64_t* rows, int64_t count, const acc_t* scale,
                        acc_t* dst) {
  for (int64_t i = 0; i < count; ++i) widen_scaled(src + rows[i] * width, scale[rows[i]], dst + i * width, width);
}

// perm [N,R,L] int64 must be a permutation of 0..L-1 per (n, round); codes [N,R,L] must lie in
// [0, n_buckets). Both raise ValueError naming the argument and the first bad (n, round, position).
void check_permutation(const at::Tensor& perm64, const char* name);
void check_codes(const at::Tensor& codes, int64_t n_buckets);

// perm as contiguous int64 (int32 input is widened once; int64 input is returned as is).
at::Tensor as_int64(const at::Tensor& index);

// Forward of the chunk attention over every round of perm [N,R,L]; lss [N,L,K], or undefined for no learned score.
// merge == false: out [N,R,L,Cv], lse [N,R,L] (per round).
// merge == true:  out [N,L,Cv], lse [N,L] (rounds merged on the fly, DESIGN.md).
void attention_forward(const at::Tensor& xm, const at::Tensor& v, const at::Tensor& lss, const at::Tensor& perm,
                       int64_t chunk_size, bool merge, at::Tensor& out, at::Tensor& lse);

at::Tensor sblsh_hash_cpu(const at::Tensor& xm, const at::Tensor& rot);
at::Tensor bucket_sort_cpu(const at::Tensor& codes, int64_t n_buckets);

}  // namespace dlsn::cpu
