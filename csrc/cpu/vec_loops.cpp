// The multi-versioned float loops of vec_loops.h (one definition, cloned per x86 level).
#include "cpu/vec_loops.h"

namespace dlsn::cpu {

DLSN_MULTIVERSION void score_block(float* s, int64_t rows, int64_t cols, const float* const* learned,
                                   float* col_max) {
  score_block_impl(s, rows, cols, learned, col_max);
}

DLSN_MULTIVERSION void widen_scaled(const float* src, float scale, float* dst, int64_t n) {
  widen_scaled_impl(src, scale, dst, n);
}

DLSN_MULTIVERSION void widen_scaled(const c10::BFloat16* src, float scale, float* dst, int64_t n) {
  widen_scaled_impl(src, scale, dst, n);
}

DLSN_MULTIVERSION void widen_scaled(const c10::Half* src, float scale, float* dst, int64_t n) {
  widen_scaled_impl(src, scale, dst, n);
}

DLSN_MULTIVERSION void narrow_scaled(const float* src, float scale, c10::BFloat16* dst, int64_t n) {
  narrow_scaled_impl(src, scale, dst, n);
}

DLSN_MULTIVERSION void narrow_scaled(const float* src, float scale, c10::Half* dst, int64_t n) {
  narrow_scaled_impl(src, scale, dst, n);
}

DLSN_MULTIVERSION void softmax_block(float* s, int64_t rows, int64_t cols, const float* col_max, float* col_sum) {
  softmax_block_impl(s, rows, cols, col_max, col_sum);
}

DLSN_MULTIVERSION void probabilities_block(float* p, int64_t rows, int64_t cols, const float* const* learned,
                                           const float* lse) {
  probabilities_block_impl(p, rows, cols, learned, lse);
}

DLSN_MULTIVERSION void score_grad_block(float* ds, const float* p, int64_t rows, int64_t cols, const float* delta) {
  score_grad_block_impl(ds, p, rows, cols, delta);
}

}  // namespace dlsn::cpu
