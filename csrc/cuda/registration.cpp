// CUDA kernels of the dlsn ops: argument checks, then the launchers of the .cu files.
//
// The checks live here, in host code built by the C++ compiler as for the CPU ops, rather than in
// the .cu files: the error paths (message formatting, the thrown c10::Error) then never run through
// nvcc-compiled host code. The launchers trust what they are given.
#include <torch/library.h>

#include <climits>
#include <tuple>

#include "checks.h"
#include "cuda/launchers.h"

namespace dlsn {
namespace cuda_impl {
namespace {

void check_on_cuda(const at::Tensor& t, const char* name, const char* op) {
  TORCH_CHECK(t.is_cuda(), name, " must be a CUDA tensor for the CUDA ", op, " kernel, got ", t.device());
}

void check_bucket_count(int64_t n_buckets) {
  TORCH_CHECK(n_buckets <= INT_MAX, "n_buckets must be at most ", INT_MAX, ", got ", n_buckets);
}

at::Tensor sblsh_hash(const at::Tensor& xm, const at::Tensor& rot) {
  check_hash_inputs(xm, rot);
  check_on_cuda(xm, "xm", "sblsh_hash");
  return sblsh_hash_cuda(xm, rot);
}

at::Tensor bucket_sort(const at::Tensor& codes, int64_t n_buckets) {
  check_sort_inputs(codes, n_buckets);
  check_on_cuda(codes, "codes", "bucket_sort");
  check_bucket_count(n_buckets);
  return bucket_sort_cuda(codes, n_buckets);
}

std::tuple<at::Tensor, at::Tensor> chunk_attention(const at::Tensor& xm, const at::Tensor& v, const at::Tensor& lss,
                                                   const at::Tensor& perm, int64_t chunk_size) {
  check_attention_inputs(xm, v, lss, chunk_size);
  check_perm(perm, xm);
  check_on_cuda(xm, "xm", "chunk_attention");
  return chunk_attention_cuda(xm, v, lss, perm, chunk_size);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> gla_attention(const at::Tensor& xm, const at::Tensor& v,
                                                             const at::Tensor& lss, const at::Tensor& rot,
                                                             int64_t chunk_size) {
  check_attention_inputs(xm, v, lss, chunk_size);
  check_hash_inputs(xm, rot);
  check_on_cuda(xm, "xm", "gla_attention");
  check_bucket_count(rot.size(2));
  return gla_attention_cuda(xm, v, lss, rot, chunk_size);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_backward(
    const at::Tensor& grad_out, const at::Tensor& delta, const at::Tensor& xm, const at::Tensor& v,
    const at::Tensor& lss, const at::Tensor& perm, const at::Tensor& lse, int64_t chunk_size) {
  check_backward_inputs(grad_out, delta, xm, v, lss, perm, lse, chunk_size);
  check_on_cuda(xm, "xm", "attention_backward");
  return attention_backward_cuda(grad_out, delta, xm, v, lss, perm, lse, chunk_size);
}

}  // namespace
}  // namespace cuda_impl
}  // namespace dlsn

TORCH_LIBRARY_IMPL(dlsn, CUDA, m) {
  m.impl("sblsh_hash", &dlsn::cuda_impl::sblsh_hash);
  m.impl("bucket_sort", &dlsn::cuda_impl::bucket_sort);
  m.impl("chunk_attention", &dlsn::cuda_impl::chunk_attention);
  m.impl("gla_attention", &dlsn::cuda_impl::gla_attention);
  m.impl("attention_backward", &dlsn::cuda_impl::attention_backward);
}
