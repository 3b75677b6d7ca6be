// The element-wise loops of the attention kernels, written so the compiler vectorises them, and
// compiled for several x86 levels at once (GCC function multi-versioning: the loader picks the
// AVX-512, AVX2+FMA or baseline clone for the running CPU, so one wheel is fast and portable).
// They take whole [rows, cols] blocks so the dispatch cost is paid once per block, not per row.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && defined(__linux__)
#define DLSN_MULTIVERSION __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define DLSN_MULTIVERSION
#endif

namespace dlsn::cpu {

// exp for softmax arguments: branch-free polynomial, max relative error ~1e-7 over the float range
// (x is clamped to [-87, 88]; softmax arguments are <= 0, where the clamp only maps 0 to ~1e-38).
// Rounding uses the 1.5 * 2^23 trick instead of nearbyint, which is a libm call without SSE4.1.
inline float exp_approx(float x) {
  x = std::min(std::max(x, -87.0f), 88.0f);
  const float shifter = 12582912.0f;  // 1.5 * 2^23
  const float n = (x * 1.44269504088896341f + shifter) - shifter;
  const float r = (x - n * 0.693359375f) + n * 2.12194440e-4f;  // x - n ln2, ln2 in two parts
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}
inline double exp_approx(double x) { return std::exp(x); }  // float64 is for gradcheck: exact

// s[j, :] += learned[j][:]; col_max = max over j. s is [rows, cols] (keys arrive normalised).
// learned == nullptr: no learned score (lss=None, NLSA), the scores are left as they are and only col_max is
// taken: the same values as adding zeros (x + 0.0 == x), without reading any.
template <typename T>
inline void score_block_impl(T* __restrict s, int64_t rows, int64_t cols, const T* const* learned,
                             T* __restrict col_max) {
  for (int64_t i = 0; i < cols; ++i) col_max[i] = -INFINITY;
  if (learned == nullptr) {
    for (int64_t j = 0; j < rows; ++j) {
      const T* __restrict row = s + j * cols;
      for (int64_t i = 0; i < cols; ++i) col_max[i] = col_max[i] > row[i] ? col_max[i] : row[i];
    }
    return;
  }
  for (int64_t j = 0; j < rows; ++j) {
    T* __restrict row = s + j * cols;
    const T* __restrict add = learned[j];
    for (int64_t i = 0; i < cols; ++i) {
      const T x = row[i] + add[i];
      row[i] = x;
      col_max[i] = col_max[i] > x ? col_max[i] : x;
    }
  }
}

// s[j, :] = exp(s[j, :] - col_max); col_sum = sum over j.
template <typename T>
inline void softmax_block_impl(T* __restrict s, int64_t rows, int64_t cols, const T* __restrict col_max,
                               T* __restrict col_sum) {
  for (int64_t i = 0; i < cols; ++i) col_sum[i] = 0;
  for (int64_t j = 0; j < rows; ++j) {
    T* __restrict row = s + j * cols;
    for (int64_t i = 0; i < cols; ++i) {
      const T e = exp_approx(row[i] - col_max[i]);
      row[i] = e;
      col_sum[i] += e;
    }
  }
}

// Backward: p[j, :] = exp(p[j, :] + learned[j][:] - lse); ds[j, :] = p[j, :] * (ds[j, :] - delta).
// learned == nullptr: no learned score, p[j, :] = exp(p[j, :] - lse) (what adding zeros gives, bit for bit).
template <typename T>
inline void probabilities_block_impl(T* __restrict p, int64_t rows, int64_t cols, const T* const* learned,
                                     const T* __restrict lse) {
  if (learned == nullptr) {
    for (int64_t j = 0; j < rows; ++j) {
      T* __restrict row = p + j * cols;
      for (int64_t i = 0; i < cols; ++i) row[i] = exp_approx(row[i] - lse[i]);
    }
    return;
  }
  for (int64_t j = 0; j < rows; ++j) {
    T* __restrict row = p + j * cols;
    const T* __restrict add = learned[j];
    for (int64_t i = 0; i < cols; ++i) row[i] = exp_approx(row[i] + add[i] - lse[i]);
  }
}

template <typename T>
inline void score_grad_block_impl(T* __restrict ds, const T* __restrict p, int64_t rows, int64_t cols,
                                  const T* __restrict delta) {
  for (int64_t j = 0; j < rows; ++j) {
    for (int64_t i = 0; i < cols; ++i) ds[j * cols + i] = p[j * cols + i] * (ds[j * cols + i] - delta[i]);
  }
}

template <typename T>
inline void add_to(T* __restrict dst, const T* __restrict src, int64_t n) {
  for (int64_t k = 0; k < n; ++k) dst[k] += src[k];
}

// dst[k] = float(src[k]) * scale: 16-bit rows widened to the float32 scratch of a job (DESIGN.md "Precision":
// rows are read in 16 bits, everything after the load is float32). Also float -> float (a scaled copy).
template <typename S, typename T>
inline void widen_scaled_impl(const S* __restrict src, T scale, T* __restrict dst, int64_t n) {
  for (int64_t k = 0; k < n; ++k) dst[k] = static_cast<T>(src[k]) * scale;
}

// dst[k] = round(src[k] * scale) to the storage type (float32 results stored in 16 bits).
template <typename T, typename D>
inline void narrow_scaled_impl(const T* __restrict src, T scale, D* __restrict dst, int64_t n) {
  for (int64_t k = 0; k < n; ++k) dst[k] = static_cast<D>(src[k] * scale);
}

// Float entry points, multi-versioned in vec_loops.cpp (callers see one plain symbol, an ifunc);
// float64 takes the templates directly.
void score_block(float* s, int64_t rows, int64_t cols, const float* const* learned, float* col_max);
void widen_scaled(const float* src, float scale, float* dst, int64_t n);
void widen_scaled(const c10::BFloat16* src, float scale, float* dst, int64_t n);
void widen_scaled(const c10::Half* src, float scale, float* dst, int64_t n);
void narrow_scaled(const float* src, float scale, c10::BFloat16* dst, int64_t n);
void narrow_scaled(const float* src, float scale, c10::Half* dst, int64_t n);
inline void widen_scaled(const double* src, double scale, double* dst, int64_t n) {
  widen_scaled_impl(src, scale, dst, n);
}
inline void narrow_scaled(const float* src, float scale, float* dst, int64_t n) {
  narrow_scaled_impl(src, scale, dst, n);
}
inline void narrow_scaled(const double* src, double scale, double* dst, int64_t n) {
  narrow_scaled_impl(src, scale, dst, n);
}
void softmax_block(float* s, int64_t rows, int64_t cols, const float* col_max, float* col_sum);
void probabilities_block(float* p, int64_t rows, int64_t cols, const float* const* learned,
                                           const float* lse);
void score_grad_block(float* ds, const float* p, int64_t rows, int64_t cols, const float* delta);

inline void score_block(double* s, int64_t rows, int64_t cols, const double* const* learned, double* col_max) {
  score_block_impl(s, rows, cols, learned, col_max);
}
inline void softmax_block(double* s, int64_t rows, int64_t cols, const double* col_max, double* col_sum) {
  softmax_block_impl(s, rows, cols, col_max, col_sum);
}
inline void probabilities_block(double* p, int64_t rows, int64_t cols, const double* const* learned,
                                const double* lse) {
  probabilities_block_impl(p, rows, cols, learned, lse);
}
inline void score_grad_block(double* ds, const double* p, int64_t rows, int64_t cols, const double* delta) {
  score_grad_block_impl(ds, p, rows, cols, delta);
}

}  // namespace dlsn::cpu
