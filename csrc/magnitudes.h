// Inputs of extreme magnitude (xm * 1e30): the limits the backwards and the CUDA kernels refuse beyond, with one
// host read each. The same rules as dlsn_kernels/_magnitudes.py (lse_limit, product_headroom, check_saved_lse);
// the CUDA forwards scale query rows (csrc/cuda/key_norms.cuh) and so take xm * 1e30, up to
// forward_magnitude_exponent.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cmath>

#include "checks.h"  // kKeyNormEps

namespace dlsn {

// The backward recomputes P = exp(s - lse) from the saved lse, so lse's rounding error becomes P's relative error:
// |lse| * eps. Beyond 2^16 in float32 (2^40 in float64) that exceeds 0.4% and P stops summing to one (features
// scaled by 1e30 give |lse| ~ 1e30, a one-hot softmax the forward computes exactly); refuse rather than return
// gradients that are wrong by whole factors.
inline double lse_limit(at::ScalarType acc) { return acc == at::kDouble ? 1099511627776.0 : 65536.0; }

inline int ceil_log2(double x) {
  int e = 0;
  while (std::ldexp(1.0, e) < x) ++e;
  return e;
}

// The largest 2E for which Cm (2^E)^2, a bound on an unnormalised q . key with every |xm| below 2^E, stays at a
// quarter of float32's range. The CUDA backward kernels multiply raw rows and scale by the inverse key norm
// afterwards.
inline int product_headroom(int64_t channels) { return 128 - 2 - ceil_log2(static_cast<double>(channels)); }

// The CUDA forwards scale a query row by 2^-a and its scores by 2^a after the inverse key norm, a the smallest
// shift that keeps Cm 2^(e - a) 2^E_top (a bound on q . key, max |row| < 2^e) within float32 (csrc/cuda/
// key_norms.cuh: query_shift); a <= e, so the scale 2^a / max(||key||, eps) stays below 2^E_top / eps. Both fit
// float32 while every |xm| < 2^E for this E (112 for Cm <= 2^15 and eps = 5e-5; ~5e33).
inline int forward_magnitude_exponent(int64_t channels) {
  return std::min(127 - ceil_log2(1.0 / kKeyNormEps), 127 - ceil_log2(static_cast<double>(channels)));
}

// Refuses a saved lse beyond lse_limit (NaN compares false and is left to propagate, as in the forward).
inline void check_lse_magnitude(double top, at::ScalarType acc) {
  const double limit = lse_limit(acc);
  TORCH_CHECK_VALUE(!(top > limit), "attention_backward: the saved lse reaches ", top,
                    " in magnitude; the backward recomputes the softmax from it, which ", acc,
                    " resolves only while |lse| <= ", limit, " (scores this large make the softmax one-hot: scale xm "
                    "down, its norm sets the scores)");
}

inline void check_lse_range(const at::Tensor& lse) {
  if (lse.numel() == 0) return;
  check_lse_magnitude(lse.abs().max().item<double>(), lse.scalar_type());
}

// Refuses max |xm| whose unnormalised score products could overflow float32 in the backward kernels (about 1e18 at
// Cm = 64), where the reference, normalising first, stays finite: an error instead of inf/NaN. (The lse limit
// refuses any such input first: its scores reach |xm|.)
inline void check_product_magnitude(double top, int64_t channels, const char* op) {
  if (!(top > 0) || !std::isfinite(top)) return;  // NaN/inf propagate as in every backend
  const int headroom = product_headroom(channels);
  int exponent = 0;
  std::frexp(top, &exponent);
  TORCH_CHECK_VALUE(2 * exponent <= headroom, op, ": xm reaches ", top, " in magnitude; the CUDA kernels resolve "
                    "scores only while max |xm| < ", std::ldexp(1.0, headroom / 2), " (Cm = ", channels,
                    "): scale xm down, its norm sets the scores");
}

// The forwards' limit (forward_magnitude_exponent): max |xm| below ~5e33, so xm * 1e30 runs (one host read).
inline void check_forward_magnitude(double top, int64_t channels, const char* op) {
  if (!(top > 0) || !std::isfinite(top)) return;  // NaN/inf propagate as in every backend
  const int limit = forward_magnitude_exponent(channels);
  int exponent = 0;
  std::frexp(top, &exponent);  // top < 2^exponent
  TORCH_CHECK_VALUE(exponent <= limit, op, ": xm reaches ", top, " in magnitude; the CUDA kernels resolve scores "
                    "only while max |xm| < ", std::ldexp(1.0, limit), " (Cm = ", channels,
                    "): scale xm down, its norm sets the scores");
}

inline void check_product_range(const at::Tensor& xm, const char* op) {
  if (xm.numel() == 0) return;
  check_forward_magnitude(xm.abs().max().item<double>(), xm.size(2), op);
}

// The backward's two limits with one host read (the amax of lse and of xm together).
inline void check_backward_magnitudes(const at::Tensor& lse, const at::Tensor& xm, const char* op) {
  if (lse.numel() == 0 || xm.numel() == 0) return;
  const at::Tensor tops = at::stack({lse.abs().max().to(at::kDouble), xm.abs().max().to(at::kDouble)}).cpu();
  const double* top = tops.data_ptr<double>();
  check_lse_magnitude(top[0], lse.scalar_type());
  check_product_magnitude(top[1], xm.size(2), op);
}

}  // namespace dlsn
