// Row-major GEMM on raw scratch pointers for the CPU kernels.
//
// The attention backward issues a handful of small products per (batch, chunk) job. Through at::mm each one pays
// ATen's dispatch (tensor views, checks, the profiler's record) on top of the product itself, which at K = 128
// costs about as much as the arithmetic. PyTorch's own float gemm wrapper (at::native::cpublas::gemm) is not
// exported from libtorch_cpu, but the BLAS it calls is: the Fortran sgemm_/dgemm_ symbols (MKL on x86 wheels,
// OpenBLAS elsewhere). They are declared weak here, so an extension built against a torch without them still
// loads and falls back to at::mm on from_blob views (the same BLAS call, plus the dispatch).
//
// Inside at::parallel_for the BLAS runs single-threaded (OpenMP nested regions), exactly as at::mm did there, so
// a product's summation order depends only on its shapes: results stay bitwise repeatable.
#pragma once

#include <ATen/ATen.h>

#include <climits>
#include <cstdint>

extern "C" {
// NOLINTBEGIN: the standard Fortran BLAS interface (column-major, every argument by pointer, 32-bit ints).
void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k, const float* alpha,
            const float* a, const int* lda, const float* b, const int* ldb, const float* beta, float* c,
            const int* ldc) __attribute__((weak));
void dgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k, const double* alpha,
            const double* a, const int* lda, const double* b, const int* ldb, const double* beta, double* c,
            const int* ldc) __attribute__((weak));
// NOLINTEND
}

namespace dlsn::cpu {

// C[m, n] = op(A)[m, k] . op(B)[k, n] + beta * C, all row-major with leading dimensions lda, ldb, ldc;
// op(X) = X^T when trans_x. beta is 0 (overwrite; C may hold garbage) or 1 (accumulate).
template <typename T>
void gemm_rm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, const T* a, int64_t lda, const T* b,
             int64_t ldb, T beta, T* c, int64_t ldc) {
  static_assert(std::is_same_v<T, float> || std::is_same_v<T, double>, "gemm_rm: float or double");
  // A row-major X is the column-major X^T with the same leading dimension, so C^T = op(B)^T op(A)^T is one
  // column-major call with the operands swapped and the transpose flags unchanged.
  const bool fits = m <= INT_MAX && n <= INT_MAX && k <= INT_MAX && lda <= INT_MAX && ldb <= INT_MAX &&
                    ldc <= INT_MAX;
  auto* blas = [] {
    if constexpr (std::is_same_v<T, float>) return &sgemm_;
    else return &dgemm_;
  }();
  if (blas != nullptr && fits && m > 0 && n > 0) {
    if (k == 0) {
      for (int64_t i = 0; i < m; ++i)
        for (int64_t j = 0; j < n; ++j) c[i * ldc + j] = beta == T(0) ? T(0) : c[i * ldc + j] * beta;
      return;
    }
    const char ta = trans_b ? 'T' : 'N', tb = trans_a ? 'T' : 'N';
    const int im = static_cast<int>(n), in = static_cast<int>(m), ik = static_cast<int>(k);
    const int ilda = static_cast<int>(ldb), ildb = static_cast<int>(lda), ildc = static_cast<int>(ldc);
    const T alpha = 1;
    blas(&ta, &tb, &im, &in, &ik, &alpha, b, &ilda, a, &ildb, &beta, c, &ildc);
    return;
  }
  if (m == 0 || n == 0) return;
  const auto options = at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value);
  auto view = [&](const T* p, int64_t rows, int64_t cols, int64_t ld, bool trans) {
    at::Tensor t = at::from_blob(const_cast<T*>(p), {trans ? cols : rows, trans ? rows : cols}, {ld, 1}, options);
    return trans ? t.t() : t;
  };
  at::Tensor out = at::from_blob(c, {m, n}, {ldc, 1}, options);
  const at::Tensor lhs = view(a, m, k, lda, trans_a), rhs = view(b, k, n, ldb, trans_b);
  if (beta == T(0)) {
    at::mm_out(out, lhs, rhs);
  } else {
    out.addmm_(lhs, rhs);
  }
}

}  // namespace dlsn::cpu
