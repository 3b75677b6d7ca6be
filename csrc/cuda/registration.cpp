// CUDA kernels of the dlsn ops: argument checks, then the launchers of the .cu files, then the launch
// error check.
//
// Every check lives here, in host code built by the C++ compiler as for the CPU ops, rather than in
// the .cu files: the error paths (message formatting, the thrown c10::Error) then never run through
// nvcc-compiled host code. The launchers trust what they are given: shapes and dtypes, grid sizes, and
// the index values (perm a permutation, codes in range), which are checked with ATen ops on the device
// before launch (one synchronisation per call; an out-of-range index would otherwise be an illegal
// memory access or a device-side assert, both fatal to the process's CUDA context).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <climits>
#include <optional>
#include <tuple>

#include "checks.h"
#include "magnitudes.h"
#include "cuda/geometry.h"
#include "cuda/launchers.h"

namespace dlsn {
namespace cuda_impl {

SetupFailure& setup_failure() {
  thread_local SetupFailure failure;
  return failure;
}

namespace {

void check_on_cuda(const at::Tensor& t, const char* name, const char* op) {
  TORCH_CHECK(t.is_cuda(), name, " must be a CUDA tensor for the CUDA ", op, " kernel, got ", t.device());
  setup_failure() = SetupFailure{};  // the last check before the launcher: none left from an earlier call
}

void check_bucket_count(int64_t n_buckets) {
  TORCH_CHECK_VALUE(n_buckets <= kMaxSortBuckets, "n_buckets must be in [1, 2^24 = ", kMaxSortBuckets, "], got ",
                    n_buckets);
}

// (n, round, position) of the first true entry of mask [N, R, L] (argmax returns the first maximum).
std::array<int64_t, 3> first_true(const at::Tensor& mask) {
  const int64_t flat = mask.reshape({-1}).to(at::kByte).argmax().item<int64_t>();
  const int64_t rounds = mask.size(1), length = mask.size(2);
  return {flat / (rounds * length), (flat / length) % rounds, flat % length};
}

// perm must be a permutation of 0..L-1 for each (n, round): values in range, and every position hit (L values in
// range that hit all L positions hold none twice). Both flags come back in one host synchronisation (the scatter
// reads clamped values, so an out-of-range entry cannot write out of bounds); only a failure pays for locating the
// first bad entry. The messages match dlsn_kernels/_checks.py and the CPU kernels.
void check_permutation(const at::Tensor& perm) {
  if (perm.numel() == 0) return;
  const int64_t length = perm.size(2);
  const at::Tensor p = perm.to(at::kLong);
  const at::Tensor outside = p.lt(0).logical_or_(p.ge(length));
  const at::Tensor seen =
      at::zeros(p.sizes(), p.options().dtype(at::kBool)).scatter_(2, p.clamp(0, length - 1), true);
  const at::Tensor flags = at::stack({outside.any(), seen.all().logical_not()}).cpu();  // the one sync
  const bool* flag = flags.data_ptr<bool>();
  if (flag[0]) {
    const auto [n, r, l] = first_true(outside);
    TORCH_CHECK_VALUE(false, "perm must hold positions in [0, L=", length, "): perm[n=", n, ", round=", r,
                      ", position=", l, "] = ", p[n][r][l].item<int64_t>());
  }
  if (!flag[1]) return;
  const at::Tensor count = at::zeros_like(p).scatter_add_(2, p, at::ones_like(p));
  const auto [n, r, l] = first_true(count.gather(2, p).gt(1));
  TORCH_CHECK_VALUE(false, "perm must be a permutation of 0..L-1 for each (n, round), but perm[n=", n, ", round=", r,
                    ", position=", l, "] = ", p[n][r][l].item<int64_t>(), " occurs more than once in that row");
}

void check_code_values(const at::Tensor& codes, int64_t n_buckets) {
  if (codes.numel() == 0) return;
  const at::Tensor outside = codes.lt(0).logical_or_(codes.ge(n_buckets));
  if (!outside.any().item<bool>()) return;
  const auto [n, r, l] = first_true(outside);
  TORCH_CHECK_VALUE(false, "codes must lie in [0, n_buckets=", n_buckets, "): codes[n=", n, ", round=", r,
                    ", position=", l, "] = ", codes[n][r][l].item<int64_t>());
}

// The tensor-core kernels index sorted slots, the 3K keys of a chunk and rows of one batch element in 32-bit
// ints (block_index.cuh, staging.cuh): L + K and 3K must fit.
void check_index_range(const at::Tensor& xm, int64_t chunk, const char* op) {
  TORCH_CHECK(xm.size(1) + chunk <= INT_MAX && 3 * chunk <= INT_MAX,
              "L + chunk_size and 3 * chunk_size must be at most ", INT_MAX, " for the CUDA ", op,
              " kernel, got L = ", xm.size(1), ", chunk_size = ", chunk);
}

// The grids of the attention kernels (chunk_attention_fwd.cu, chunk_attention_bwd.cu): blocks along x,
// column slices of kCols channels along y.
void check_forward_grid(const at::Tensor& xm, const at::Tensor& v, int64_t chunk, int64_t rounds_in_launch,
                        const char* op) {
  check_index_range(xm, chunk, op);
  const int64_t slices = std::max<int64_t>(1, ceil_div(v.size(2), kCols));
  TORCH_CHECK(slices <= kMaxGridY, "v has too many channels (", v.size(2), ") for the CUDA ", op,
              " kernel: at most ", kMaxGridY * kCols);
  const int64_t blocks = xm.size(0) * rounds_in_launch * ceil_div(xm.size(1), chunk) * ceil_div(chunk, kTile);
  TORCH_CHECK(blocks <= kMaxGridX, "input too large for the CUDA ", op, " kernel (", blocks, " blocks, at most ",
              kMaxGridX, ")");
}

void check_backward_grid(const at::Tensor& xm, const at::Tensor& v, int64_t chunk) {
  check_index_range(xm, chunk, "attention_backward");
  const int64_t n = xm.size(0), length = xm.size(1);
  const int64_t blocks = n * ceil_div(length, chunk) * ceil_div(chunk, kTile);
  TORCH_CHECK(blocks <= kMaxGridX && n * length <= kMaxGridX,
              "input too large for the CUDA attention_backward kernel (", blocks, " blocks, ", n * length,
              " positions, at most ", kMaxGridX, " each)");
  const int64_t slices = std::max<int64_t>(1, ceil_div(v.size(2), kCols)) + ceil_div(xm.size(2), kCols);
  TORCH_CHECK(slices <= kMaxGridY, "too many channels for the CUDA attention_backward kernel: Cm = ", xm.size(2),
              ", Cv = ", v.size(2), " need ", slices, " column slices of ", kCols, ", at most ", kMaxGridY);
}

void check_hash_grid(const at::Tensor& xm, const at::Tensor& rot) {
  TORCH_CHECK(rot.size(1) <= kMaxGridY, "rot holds ", rot.size(1), " hash rounds; the CUDA kernel supports at most ",
              kMaxGridY);
  TORCH_CHECK(xm.size(2) <= INT_MAX, "xm has ", xm.size(2), " channels; the CUDA sblsh_hash kernel supports at most ",
              INT_MAX);
}

// A kernel the launcher could not set up (launchers.h: SetupFailure), then a failed launch (bad
// configuration, no kernel image for this GPU), are reported here, not in the .cu code.
void check_launch() {
  const SetupFailure f = setup_failure();
  setup_failure() = SetupFailure{};
  if (f.kernel != nullptr) {
    (void)cudaGetLastError();  // the runtime recorded the same error; it is reported here instead
    TORCH_CHECK(false, f.call, " failed for the CUDA kernel ", f.kernel, " (", f.dtype, ", ", f.bytes,
                " bytes of dynamic shared memory): ", cudaGetErrorString(static_cast<cudaError_t>(f.error)));
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

at::Tensor sblsh_hash(const at::Tensor& xm, const at::Tensor& rot) {
  check_hash_inputs(xm, rot);
  check_hash_grid(xm, rot);
  check_on_cuda(xm, "xm", "sblsh_hash");
  at::Tensor codes = sblsh_hash_cuda(xm, rot);
  check_launch();
  return codes;
}

at::Tensor bucket_sort(const at::Tensor& codes, int64_t n_buckets) {
  check_sort_inputs(codes, n_buckets);
  check_bucket_count(n_buckets);
  check_code_values(codes, n_buckets);
  check_on_cuda(codes, "codes", "bucket_sort");
  at::Tensor perm = bucket_sort_cuda(codes, n_buckets);
  check_launch();
  return perm;
}

// lss: `Tensor? lss` in the schema; absent (NLSA, no learned score) goes to the launchers as an undefined tensor.
std::tuple<at::Tensor, at::Tensor> chunk_attention(const at::Tensor& xm, const at::Tensor& v,
                                                   const std::optional<at::Tensor>& lss_opt, const at::Tensor& perm,
                                                   int64_t chunk_size) {
  const at::Tensor lss = tensor_or_absent(lss_opt);
  check_attention_inputs(xm, v, lss, chunk_size);
  check_perm(perm, xm);
  check_forward_grid(xm, v, chunk_size, perm.size(1), "chunk_attention");
  check_permutation(perm);
  check_on_cuda(xm, "xm", "chunk_attention");
  check_product_range(xm, "chunk_attention");
  auto result = chunk_attention_cuda(xm, v, lss, perm, chunk_size);
  check_launch();
  return result;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> gla_attention(const at::Tensor& xm, const at::Tensor& v,
                                                             const std::optional<at::Tensor>& lss_opt,
                                                             const at::Tensor& rot, int64_t chunk_size) {
  const at::Tensor lss = tensor_or_absent(lss_opt);
  check_attention_inputs(xm, v, lss, chunk_size);
  check_hash_inputs(xm, rot);
  check_bucket_count(rot.size(2));
  check_hash_grid(xm, rot);
  check_forward_grid(xm, v, chunk_size, 1, "gla_attention");
  check_on_cuda(xm, "xm", "gla_attention");
  check_product_range(xm, "gla_attention");
  auto result = gla_attention_cuda(xm, v, lss, rot, chunk_size);
  check_launch();
  return result;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_backward(
    const at::Tensor& grad_out, const at::Tensor& delta, const at::Tensor& xm, const at::Tensor& v,
    const std::optional<at::Tensor>& lss_opt, const at::Tensor& perm, const at::Tensor& lse, int64_t chunk_size) {
  const at::Tensor lss = tensor_or_absent(lss_opt);
  check_backward_inputs(grad_out, delta, xm, v, lss, perm, lse, chunk_size);
  check_backward_grid(xm, v, chunk_size);
  check_permutation(perm);  // the inverse permutation built on the device must cover every position
  check_on_cuda(xm, "xm", "attention_backward");
  check_backward_magnitudes(lse, xm, "attention_backward");
  auto result = attention_backward_cuda(grad_out, delta, xm, v, lss, perm, lse, chunk_size);
  check_launch();
  return result;
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
