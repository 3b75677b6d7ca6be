// The CUDA implementations' host entry points. They trust their arguments: registration.cpp checks
// them first (in host C++ compiled by the C++ compiler, like the CPU ops), then calls these.
// lss may be an undefined tensor: no learned score (the op's `Tensor? lss` was None, NLSA); the kernels then
// read no lss and the backward returns an empty dlss ([0], xm's dtype and device).
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <tuple>

namespace dlsn {
namespace cuda_impl {

// A kernel the launchers could not set up (cudaFuncGetAttributes or cudaFuncSetAttribute failed). The .cu
// host code never throws: it records the first failure here and skips that launch; registration.cpp
// raises it, naming the kernel, right after the launcher returns (check_launch). One per host thread.
struct SetupFailure {
  const char* kernel = nullptr;  // nullptr: none
  const char* dtype = "";
  const char* call = "";         // the CUDA runtime function that failed
  int64_t bytes = 0;             // the dynamic shared memory asked for
  int error = 0;                 // its cudaError_t
};
SetupFailure& setup_failure();

at::Tensor sblsh_hash_cuda(const at::Tensor& xm, const at::Tensor& rot);
at::Tensor bucket_sort_cuda(const at::Tensor& codes, int64_t n_buckets);
std::tuple<at::Tensor, at::Tensor> chunk_attention_cuda(const at::Tensor& xm, const at::Tensor& v,
                                                        const at::Tensor& lss, const at::Tensor& perm,
                                                        int64_t chunk_size);
std::tuple<at::Tensor, at::Tensor, at::Tensor> gla_attention_cuda(const at::Tensor& xm, const at::Tensor& v,
                                                                  const at::Tensor& lss, const at::Tensor& rot,
                                                                  int64_t chunk_size);
std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_backward_cuda(
    const at::Tensor& grad_out, const at::Tensor& delta, const at::Tensor& xm, const at::Tensor& v,
    const at::Tensor& lss, const at::Tensor& perm, const at::Tensor& lse, int64_t chunk_size);

}  // namespace cuda_impl
}  // namespace dlsn
