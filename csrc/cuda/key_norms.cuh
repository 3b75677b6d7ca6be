// Per position, once per call, for the attention kernels: the inverse key norm 1 / max(||xm||, eps), computed
// without overflow, and the exponent e of the row's largest magnitude (max |row| < 2^e), with E, the largest e of
// the call, in one int (atomicMax). Torch-free.
//
// Why the exponents: the forwards multiply raw rows (q . key) and scale by the inverse key norm afterwards. With
// xm * 1e30 that product (|q| |key| ~ 1e62) overflows float32, although the score q . key / ||key|| does not.
// Every |q . key| is below Cm 2^e 2^E, so a forward multiplies a query row by 2^-a, a = query_shift(e, E, Cm) =
// max(0, e + E + ceil(log2 Cm) - 127), and the row's scores by 2^a after the inverse key norm:
//   score = ((2^-a q) . key * inv_norm[key]) * 2^a,   |(2^-a q) . key| < 2^127.
// a is 0 for every row unless some |xm| reaches ~2^60 (Cm = 64): inputs the kernels took before are unchanged bit
// for bit, and no block runs the scaling code. Powers of two scale every product and sum exactly, so a scaled
// row differs only where terms fall below float32's normal range, some 2^100 under its largest, which changes
// none of its sums. float16 rows cannot overflow (65504^2 Cm is far below float32's range): never scaled.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

namespace dlsn {
namespace cuda_impl {
namespace tc {

// 2^n as a float, exact, for -126 <= n <= 127 (one integer shift instead of ldexpf's range handling).
__host__ __device__ inline float pow2f(int n) {
  const uint32_t bits = static_cast<uint32_t>(n + 127) << 23;
#if defined(__CUDA_ARCH__)
  return __uint_as_float(bits);
#else
  float x;
  std::memcpy(&x, &bits, sizeof(x));
  return x;
#endif
}

constexpr float kFloatMax = 3.40282346638528859812e+38f;

// The e of top = f 2^e (0.5 <= f < 1) for top >= 0, clamped to [-126, 126] (so that 2^-e is a normal float);
// 0 for NaN/inf (they propagate unscaled).
__host__ __device__ inline int magnitude_exponent(float top) {
  uint32_t bits;
#if defined(__CUDA_ARCH__)
  bits = __float_as_uint(top);
#else
  std::memcpy(&bits, &top, sizeof(bits));
#endif
  const int biased = static_cast<int>((bits >> 23) & 0xffu);  // top >= 0: no sign bit
  if (biased == 0xff) return 0;
  const int e = biased - 126;  // top in [2^(e-1), 2^e) for normal top
  return e < -126 ? -126 : e > 126 ? 126 : e;
}

// ceil(log2(x)) for x >= 1.
__host__ __device__ inline int ceil_log2(int x) {
#if defined(__CUDA_ARCH__)
  return x <= 1 ? 0 : 32 - __clz(x - 1);
#else
  int e = 0;
  while ((int64_t{1} << e) < x) ++e;
  return e;
#endif
}

// The exponent a query row with exponent e is scaled down by, given the call's largest exponent E (top_exp) and
// Cm: the smallest a >= 0 with Cm 2^(e - a) 2^E <= 2^127 (the header above).
__host__ __device__ inline int query_shift(int e, int top_exp, int cm) {
  const int a = e + top_exp + ceil_log2(cm) - 127;
  return a > 0 ? a : 0;
}

// inv_norm[row] = 1 / max(||xm[row]||, eps) and row_exp[row] = magnitude_exponent(max |xm[row]|) for the N*L rows
// of xm [N*L, Cm], a warp per row; *top_exp (zeroed by the caller) becomes max(0, the largest row_exp). The plain sum of squares overflows for rows beyond ~1e19 (float32, bfloat16): such a row (its sum is inf
// while its largest magnitude is finite) is summed again scaled by 2^-e, e the exponent of its largest magnitude,
// and its norm scaled back; powers of two keep every other row's bits those of the plain sum. Rows whose squares
// underflow have norms far below eps, which sets their inverse norm either way.
template <typename T>
__global__ void __launch_bounds__(256) key_norms_kernel(const T* __restrict__ xm, float* __restrict__ inv_norm,
                                                        int* __restrict__ row_exp, int* __restrict__ top_exp,
                                                        int64_t n_rows, int64_t cm, float eps) {
  const int lane = threadIdx.x % 32;
  const int64_t row = int64_t(blockIdx.x) * 8 + threadIdx.x / 32;
  if (row >= n_rows) return;  // the whole warp leaves together
  const T* x = xm + row * cm;
  float sumsq = 0.f, top = 0.f;
  for (int64_t col = lane; col < cm; col += 32) {
    const float v = static_cast<float>(x[col]);
    sumsq += v * v;
    top = fmaxf(top, fabsf(v));
  }
  for (int offset = 16; offset > 0; offset >>= 1) {
    sumsq += __shfl_xor_sync(0xffffffffu, sumsq, offset);
    top = fmaxf(top, __shfl_xor_sync(0xffffffffu, top, offset));
  }
  float norm = sqrtf(sumsq);
  // The sum overflowed but the row is finite (NaN compares false: it propagates). Warp-uniform: every lane
  // holds the same sums. Taken only for rows beyond ~1e19.
  if (sumsq > kFloatMax && top <= kFloatMax) {
    const int e = magnitude_exponent(top);  // top >= 2^63 here (e <= 126 keeps 2^-e normal; the sum stays finite)
    const float down = pow2f(-e);
    float scaled = 0.f;
    for (int64_t col = lane; col < cm; col += 32) {
      const float v = static_cast<float>(x[col]) * down;
      scaled += v * v;
    }
    for (int offset = 16; offset > 0; offset >>= 1) scaled += __shfl_xor_sync(0xffffffffu, scaled, offset);
    norm = sqrtf(scaled) * pow2f(e / 2) * pow2f(e - e / 2);  // two factors: 2^e alone may exceed 2^127
  }
  if (lane == 0) {
    const int e = magnitude_exponent(top);
    inv_norm[row] = 1.f / fmaxf(norm, eps);
    row_exp[row] = e;
    if (e > 0) atomicMax(top_exp, e);  // most rows: no atomic (the order of the maxima does not matter)
  }
}

}  // namespace tc
}  // namespace cuda_impl
}  // namespace dlsn
