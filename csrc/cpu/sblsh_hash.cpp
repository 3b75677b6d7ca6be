// SB-LSH hashing on the CPU: projection onto every round's rotation and argmax, one row tile at a
// time, so the [N, R, L, B] projection never exists in memory.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "checks.h"
#include "cpu/cpu_kernels.h"

namespace dlsn::cpu {
namespace {

constexpr int64_t kRowTile = 64;

template <typename scalar_t>
void hash_kernel(const at::Tensor& xm, const at::Tensor& rot, at::Tensor& codes) {
  using acc_t = acc_type_t<scalar_t>;  // the projection is IEEE float32 for 16-bit inputs (DESIGN.md "Precision")
  const int64_t n = xm.size(0), length = xm.size(1), cm = xm.size(2);
  const int64_t rounds = rot.size(1), buckets = rot.size(2);
  const auto acc_options = acc_options_of(xm);
  // Detached: worker threads do not inherit the caller's below-autograd guard. rot is small (Cm x R B).
  const at::Tensor x = xm.detach();
  const at::Tensor rot_flat = rot.detach().reshape({cm, rounds * buckets}).to(acc_options.dtype());
  const scalar_t* x_ptr = x.data_ptr<scalar_t>();
  const int64_t tiles = (length + kRowTile - 1) / kRowTile;
  int64_t* codes_ptr = codes.data_ptr<int64_t>();

  at::parallel_for(0, n * tiles, 1, [&](int64_t begin, int64_t end) {
    at::Tensor proj = at::empty({kRowTile, rounds * buckets}, acc_options);
    at::Tensor widened = std::is_same_v<scalar_t, acc_t> ? at::Tensor() : at::empty({kRowTile, cm}, acc_options);
    for (int64_t job = begin; job < end; ++job) {
      const int64_t b = job / tiles, row0 = (job % tiles) * kRowTile;
      const int64_t rows = std::min(kRowTile, length - row0);
      at::Tensor tile = proj.narrow(0, 0, rows);
      if constexpr (std::is_same_v<scalar_t, acc_t>) {
        at::mm_out(tile, x[b].narrow(0, row0, rows), rot_flat);
      } else {  // 16-bit rows widened tile by tile: the product stays float32
        widen_scaled(x_ptr + (b * length + row0) * cm, acc_t(1), widened.data_ptr<acc_t>(), rows * cm);
        at::mm_out(tile, widened.narrow(0, 0, rows), rot_flat);
      }
      const acc_t* p = proj.data_ptr<acc_t>();
      for (int64_t i = 0; i < rows; ++i) {
        for (int64_t r = 0; r < rounds; ++r) {
          const acc_t* row = p + i * rounds * buckets + r * buckets;
          int64_t best = 0;
          for (int64_t k = 1; k < buckets; ++k) {
            if (row[k] > row[best]) best = k;  // strict: the lowest bucket wins ties
          }
          codes_ptr[(b * rounds + r) * length + row0 + i] = best;
        }
      }
    }
  });
}

}  // namespace

at::Tensor sblsh_hash_cpu(const at::Tensor& xm_in, const at::Tensor& rot_in) {
  at::AutoDispatchBelowADInplaceOrView below_autograd;  // kernels call ATen ops (mm) internally
  const at::Tensor xm = xm_in.contiguous(), rot = rot_in.contiguous();  // any strides: one copy if strided
  check_hash_inputs(xm, rot);
  at::Tensor codes = at::empty({xm.size(0), rot.size(1), xm.size(1)}, xm.options().dtype(at::kLong));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, xm.scalar_type(), "sblsh_hash_cpu", [&] { hash_kernel<scalar_t>(xm, rot, codes); });
  return codes;
}

TORCH_LIBRARY_IMPL(dlsn, CPU, m) { m.impl("sblsh_hash", &sblsh_hash_cpu); }

}  // namespace dlsn::cpu
