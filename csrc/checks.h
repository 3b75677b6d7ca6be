// Argument checks of the raw CPU and CUDA ops (torch.ops.dlsn.*), which anyone can call directly: every one
// guards memory (ranks, shapes, dtypes, devices and contiguity decide what the kernels read and write; index
// values are checked by csrc/cpu/index_checks.cpp and csrc/cuda/registration.cpp). The public ops validate
// first in Python (dlsn_kernels/_checks.py), once, with the same messages, so these never fire through them.
#pragma once

#include <ATen/ATen.h>
#include <ATen/core/grad_mode.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <c10/util/Exception.h>

#include <optional>
#include <vector>

namespace dlsn {

constexpr double kKeyNormEps = 5e-5;
// The most buckets a sort takes (dlsn_kernels/_checks.py MAX_SORT_BUCKETS): the CPU counting sort holds one
// counter per bucket per thread, so an unbounded count is an allocation of any size (5e8 buckets: 4 GB).
constexpr int64_t kMaxSortBuckets = int64_t{1} << 24;

inline void check_rank(const at::Tensor& t, const char* name, int64_t rank, const char* layout) {
  TORCH_CHECK(t.dim() == rank, name, " must have shape ", layout, " (", rank, " dims), got ", t.sizes());
}

inline void check_contiguous(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous (call .contiguous() first)");
}

inline void check_same_device(const at::Tensor& a, const char* a_name, const at::Tensor& b, const char* b_name) {
  TORCH_CHECK(a.device() == b.device(), a_name, " is on ", a.device(), " but ", b_name, " is on ", b.device());
}

inline void check_index(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.scalar_type() == at::kLong || t.scalar_type() == at::kInt, name,
              " must be int32 or int64, got ", t.scalar_type());
}

// Floating inputs: float32, float16 and bfloat16 everywhere (float32 accumulation), float64 on CPU only
// (gradcheck). The messages match dlsn_kernels/_checks.py check_float.
inline void check_float(const at::Tensor& t, const char* name) {
  const auto st = t.scalar_type();
  if (t.is_cuda()) {
    TORCH_CHECK(st == at::kFloat || st == at::kHalf || st == at::kBFloat16, name,
                " must be float32, float16 or bfloat16 on CUDA, got ", st);
  } else {
    TORCH_CHECK(st == at::kFloat || st == at::kDouble || st == at::kHalf || st == at::kBFloat16, name,
                " must be float32, float64, float16 or bfloat16 on CPU, got ", st);
  }
}

inline void check_same_dtype(const at::Tensor& a, const char* a_name, const at::Tensor& b, const char* b_name) {
  TORCH_CHECK(a.scalar_type() == b.scalar_type(), a_name, " is ", a.scalar_type(), " but ", b_name, " is ",
              b.scalar_type(), "; they must share one dtype");
}

inline at::ScalarType accumulate_type(at::ScalarType st) {
  return st == at::kDouble ? at::kDouble : at::kFloat;
}

inline void check_hash_inputs(const at::Tensor& xm, const at::Tensor& rot) {
  check_rank(xm, "xm", 3, "[N, L, Cm]");
  check_rank(rot, "rot", 3, "[Cm, R, B]");
  check_float(xm, "xm");
  check_same_dtype(xm, "xm", rot, "rot");
  check_same_device(xm, "xm", rot, "rot");
  check_contiguous(xm, "xm");
  check_contiguous(rot, "rot");
  TORCH_CHECK(rot.size(0) == xm.size(2), "rot has ", rot.size(0), " rows but xm has Cm = ", xm.size(2),
              " channels");
  TORCH_CHECK(rot.size(1) >= 1, "rot must hold at least one hash round (R >= 1)");
  TORCH_CHECK(rot.size(2) >= 1, "rot must hold at least one bucket (B >= 1)");
  TORCH_CHECK(xm.size(1) >= 1, "xm must hold at least one position (L >= 1)");
}

inline void check_sort_inputs(const at::Tensor& codes, int64_t n_buckets) {
  check_rank(codes, "codes", 3, "[N, R, L]");
  check_index(codes, "codes");
  check_contiguous(codes, "codes");
  TORCH_CHECK_VALUE(n_buckets >= 1 && n_buckets <= kMaxSortBuckets, "n_buckets must be in [1, 2^24 = ",
                    kMaxSortBuckets, "], got ", n_buckets);
}

// The op schemas take `Tensor? lss`; inside the C++ code an absent learned score (lss=None, NLSA) is an
// undefined at::Tensor, which the checks skip and the kernels read as "add nothing".
inline at::Tensor tensor_or_absent(const std::optional<at::Tensor>& t) {
  return t.has_value() ? *t : at::Tensor();
}

// The CPU kernels read whole rows: a present strided lss is copied once (contiguous: no copy).
inline at::Tensor contiguous_or_absent(const std::optional<at::Tensor>& t) {
  return t.has_value() && t->defined() ? t->contiguous() : at::Tensor();
}

// xm [N,L,Cm], v [N,L,Cv], lss [N,L,K] or undefined (no learned score: nothing of it is checked).
inline void check_attention_inputs(const at::Tensor& xm, const at::Tensor& v, const at::Tensor& lss,
                                   int64_t chunk_size) {
  TORCH_CHECK(chunk_size >= 1, "chunk_size must be >= 1, got ", chunk_size);
  check_rank(xm, "xm", 3, "[N, L, Cm]");
  check_rank(v, "v", 3, "[N, L, Cv]");
  if (lss.defined()) check_rank(lss, "lss", 3, "[N, L, K]");
  check_float(xm, "xm");
  check_same_dtype(xm, "xm", v, "v");
  if (lss.defined()) check_same_dtype(xm, "xm", lss, "lss");
  check_same_device(xm, "xm", v, "v");
  if (lss.defined()) check_same_device(xm, "xm", lss, "lss");
  check_contiguous(xm, "xm");
  check_contiguous(v, "v");
  if (lss.defined()) check_contiguous(lss, "lss");
  const int64_t n = xm.size(0), length = xm.size(1);
  TORCH_CHECK(length >= 1, "xm must hold at least one position (L >= 1)");
  TORCH_CHECK(v.size(0) == n && v.size(1) == length, "v must have shape [N, L, Cv] = [", n, ", ", length,
              ", Cv] like xm, got ", v.sizes());
  if (!lss.defined()) return;
  TORCH_CHECK(lss.size(0) == n && lss.size(1) == length && lss.size(2) == chunk_size,
              "lss must have shape [N, L, chunk_size] = [", n, ", ", length, ", ", chunk_size, "], got ",
              lss.sizes());
}

// perm [N,R,L] matching xm [N,L,Cm]: shape, dtype, device. Its values (a permutation of 0..L-1 per
// (n, round)) are checked by each device's entry point: csrc/cpu/index_checks.cpp on the CPU, ATen ops
// before launch in csrc/cuda/registration.cpp.
inline void check_perm(const at::Tensor& perm, const at::Tensor& xm) {
  check_rank(perm, "perm", 3, "[N, R, L]");
  check_index(perm, "perm");
  check_same_device(xm, "xm", perm, "perm");
  check_contiguous(perm, "perm");
  TORCH_CHECK(perm.size(0) == xm.size(0) && perm.size(2) == xm.size(1) && perm.size(1) >= 1,
              "perm must have shape [N, R, L] with N = ", xm.size(0), ", L = ", xm.size(1), ", R >= 1, got ",
              perm.sizes());
}

// lss undefined: no learned score (as in check_attention_inputs).
inline void check_backward_inputs(const at::Tensor& grad_out, const at::Tensor& delta, const at::Tensor& xm,
                                  const at::Tensor& v, const at::Tensor& lss, const at::Tensor& perm,
                                  const at::Tensor& lse, int64_t chunk_size) {
  check_attention_inputs(xm, v, lss, chunk_size);
  check_perm(perm, xm);
  const int64_t n = xm.size(0), rounds = perm.size(1), length = xm.size(1);
  check_rank(grad_out, "grad_out", 4, "[N, R', L, Cv]");
  check_rank(delta, "delta", 3, "[N, R', L]");
  check_rank(lse, "lse", 3, "[N, R', L]");
  const int64_t rr = grad_out.size(1);
  TORCH_CHECK(rr == 1 || rr == rounds, "grad_out must hold 1 or R = ", rounds, " rounds, got ", rr);
  TORCH_CHECK(grad_out.size(0) == n && grad_out.size(2) == length && grad_out.size(3) == v.size(2),
              "grad_out must have shape [", n, ", ", rr, ", ", length, ", ", v.size(2), "], got ", grad_out.sizes());
  TORCH_CHECK(delta.sizes() == at::IntArrayRef({n, rr, length}), "delta must have shape [", n, ", ", rr, ", ",
              length, "], got ", delta.sizes());
  TORCH_CHECK(lse.sizes() == at::IntArrayRef({n, rr, length}), "lse must have shape [", n, ", ", rr, ", ", length,
              "], got ", lse.sizes());
  check_same_dtype(grad_out, "grad_out", v, "v");
  const auto acc = accumulate_type(xm.scalar_type());
  TORCH_CHECK(delta.scalar_type() == acc, "delta must be ", acc, ", got ", delta.scalar_type());
  TORCH_CHECK(lse.scalar_type() == acc, "lse must be ", acc, ", got ", lse.scalar_type());
  for (const auto* t : {&grad_out, &delta, &lse}) check_same_device(xm, "xm", *t, "grad_out/delta/lse");
  check_contiguous(grad_out, "grad_out");
  check_contiguous(delta, "delta");
  check_contiguous(lse, "lse");
}

}  // namespace dlsn
