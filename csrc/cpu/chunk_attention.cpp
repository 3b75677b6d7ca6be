// Chunk attention forward on the CPU (ops chunk_attention and gla_attention).
//
// One job = one (batch, query chunk) of one round; jobs of a round run in parallel, rounds one
// after another. A job gathers its K queries and 3K keys/values through perm into per-thread
// scratch (rows are contiguous, so each gather is a row copy; keys are normalised as they are copied,
// so no product ever sees an unnormalised key), computes the scores transposed,
// S^T [3K, K] = keys . queries^T, with a BLAS call, adds the learned score row by row (lss[key] is a
// contiguous row indexed by query slot, which is why the transpose pays), softmaxes each column, and
// finishes with O = P . V. The [3K, K] block lives in per-thread scratch only (~200 KB at K = 128), never
// in a tensor of the problem's size. Without a learned score (lss absent: NLSA, DESIGN.md) nothing of lss is
// read or gathered and the scores are q . k_hat alone: the values lss = zeros gives, bit for bit.
//
// float16/bfloat16 inputs (DESIGN.md "Precision"): rows are read in 16 bits and widened into the float32
// scratch as they are gathered (no float32 copy of an input ever exists), products are float32 SGEMM, lse
// is float32, merged rounds are summed in float32 and each output is rounded to 16 bits once.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "checks.h"
#include "cpu/cpu_kernels.h"
#include "cpu/vec_loops.h"

namespace dlsn::cpu {
namespace {

template <typename scalar_t>
void forward_kernel(const at::Tensor& xm, const at::Tensor& v, const at::Tensor& lss, const at::Tensor& perm,
                    int64_t chunk, bool merge, at::Tensor& out, at::Tensor& lse) {
  using acc_t = acc_type_t<scalar_t>;
  constexpr bool kWide = std::is_same_v<scalar_t, acc_t>;  // float32/float64 storage: no conversions
  const int64_t batch = xm.size(0), length = xm.size(1), cm = xm.size(2), cv = v.size(2);
  const int64_t rounds = perm.size(1);
  const SlotLayout layout(length, chunk);
  const int64_t kk = 3 * chunk;
  const auto acc_options = xm.options().dtype(c10::CppTypeToScalarType<acc_t>::value);

  const at::Tensor inv_norm = inverse_norms<scalar_t>(xm);
  const scalar_t* xm_ptr = xm.data_ptr<scalar_t>();
  const scalar_t* v_ptr = v.data_ptr<scalar_t>();
  const bool has_lss = lss.defined();  // undefined: no learned score (lss=None)
  const scalar_t* lss_ptr = has_lss ? lss.data_ptr<scalar_t>() : nullptr;
  const acc_t* inv_ptr = inv_norm.data_ptr<acc_t>();
  const int64_t* perm_ptr = perm.data_ptr<int64_t>();
  acc_t* lse_ptr = lse.data_ptr<acc_t>();
  // Merged rounds are summed in the accumulation type and stored once (16-bit storage: one rounding at the end).
  at::Tensor merged = (merge && !kWide) ? at::empty(out.sizes(), acc_options) : at::Tensor();
  scalar_t* out_ptr = out.data_ptr<scalar_t>();
  acc_t* y_ptr = merge ? (kWide ? reinterpret_cast<acc_t*>(out_ptr) : merged.data_ptr<acc_t>()) : nullptr;

  for (int64_t r = 0; r < rounds; ++r) {
    at::parallel_for(0, batch * layout.n_chunks, 1, [&](int64_t begin, int64_t end) {
      at::Tensor q = at::empty({chunk, cm}, acc_options);
      at::Tensor keys = at::empty({kk, cm}, acc_options);
      at::Tensor values = at::empty({kk, cv}, acc_options);
      at::Tensor scores_t = at::empty({kk, chunk}, acc_options);
      at::Tensor o = at::empty({chunk, cv}, acc_options);
      at::Tensor learned_rows = (kWide || !has_lss) ? at::Tensor() : at::empty({kk, chunk}, acc_options);
      std::vector<int64_t> qpos(chunk), kpos(kk);
      std::vector<acc_t> col_max(chunk), col_sum(chunk);
      std::vector<const acc_t*> learned(has_lss ? kk : 0);
      acc_t* s = scores_t.data_ptr<acc_t>();

      for (int64_t job = begin; job < end; ++job) {
        const int64_t b = job / layout.n_chunks, c = job % layout.n_chunks;
        const int64_t* pr = perm_ptr + (b * rounds + r) * length;
        for (int64_t i = 0; i < chunk; ++i) qpos[i] = layout.position(pr, c * chunk + i);
        for (int t = 0; t < 3; ++t) {
          const int64_t kc = layout.key_chunk(c, t);
          for (int64_t i = 0; i < chunk; ++i) kpos[t * chunk + i] = layout.position(pr, kc * chunk + i);
        }
        const scalar_t* xb = xm_ptr + b * length * cm;
        gather_rows(xb, cm, qpos.data(), chunk, q.data_ptr<acc_t>());
        gather_scaled_rows(xb, cm, kpos.data(), kk, inv_ptr + b * length, keys.data_ptr<acc_t>());
        gather_rows(v_ptr + b * length * cv, cv, kpos.data(), kk, values.data_ptr<acc_t>());
        if (has_lss) {
          if constexpr (kWide) {
            for (int64_t j = 0; j < kk; ++j) learned[j] = lss_ptr + (b * length + kpos[j]) * chunk;
          } else {
            acc_t* rows = learned_rows.data_ptr<acc_t>();
            gather_rows(lss_ptr + b * length * chunk, chunk, kpos.data(), kk, rows);
            for (int64_t j = 0; j < kk; ++j) learned[j] = rows + j * chunk;
          }
        }

        at::mm_out(scores_t, keys, q.t());
        score_block(s, kk, chunk, has_lss ? learned.data() : nullptr, col_max.data());  // nullptr: no lss
        softmax_block(s, kk, chunk, col_max.data(), col_sum.data());
        at::mm_out(o, scores_t.t(), values);

        const acc_t* o_ptr = o.data_ptr<acc_t>();
        const int64_t valid = std::min(chunk, length - c * chunk);  // padded query slots store nothing
        for (int64_t i = 0; i < valid; ++i) {
          const acc_t norm = acc_t(1) / col_sum[i];
          const acc_t row_lse = col_max[i] + std::log(col_sum[i]);
          const acc_t* src = o_ptr + i * cv;
          if (!merge) {
            const int64_t dst = (b * rounds + r) * length + qpos[i];
            narrow_scaled(src, norm, out_ptr + dst * cv, cv);
            lse_ptr[dst] = row_lse;
            continue;
          }
          const int64_t dst = b * length + qpos[i];
          acc_t* y = y_ptr + dst * cv;
          if (r == 0) {
            for (int64_t k = 0; k < cv; ++k) y[k] = src[k] * norm;
            lse_ptr[dst] = row_lse;
            continue;
          }
          // Merge this round into the running result: softmax over rounds, done incrementally.
          const acc_t old_lse = lse_ptr[dst];
          const acc_t top = std::max(old_lse, row_lse);
          const acc_t w_old = std::exp(old_lse - top), w_new = std::exp(row_lse - top);
          const acc_t total = w_old + w_new;
          const acc_t a = w_old / total, bnew = w_new / total * norm;
          for (int64_t k = 0; k < cv; ++k) y[k] = y[k] * a + src[k] * bnew;
          lse_ptr[dst] = top + std::log(total);
        }
      }
    });
  }
  if (merged.defined()) out.copy_(merged);
}

std::tuple<at::Tensor, at::Tensor> chunk_attention_cpu(const at::Tensor& xm_in, const at::Tensor& v_in,
                                                       const std::optional<at::Tensor>& lss_in,
                                                       const at::Tensor& perm_in, int64_t chunk_size) {
  at::AutoDispatchBelowADInplaceOrView below_autograd;  // kernels call ATen ops (mm) internally
  // Any strides: the kernel reads whole rows, so a strided view is copied once here (contiguous: no copy).
  const at::Tensor xm = xm_in.contiguous(), v = v_in.contiguous(), lss = contiguous_or_absent(lss_in);
  const at::Tensor perm = perm_in.contiguous();
  check_attention_inputs(xm, v, lss, chunk_size);
  check_perm(perm, xm);
  const at::Tensor perm64 = as_int64(perm);
  check_permutation(perm64, "perm");  // a repeated position would leave rows of out and lse unwritten
  at::Tensor out = at::empty({xm.size(0), perm.size(1), xm.size(1), v.size(2)}, v.options());
  at::Tensor lse = at::empty({xm.size(0), perm.size(1), xm.size(1)}, acc_options_of(xm));
  attention_forward(xm, v, lss, perm64, chunk_size, /*merge=*/false, out, lse);
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> gla_attention_cpu(const at::Tensor& xm_in, const at::Tensor& v_in,
                                                                 const std::optional<at::Tensor>& lss_in,
                                                                 const at::Tensor& rot_in, int64_t chunk_size) {
  at::AutoDispatchBelowADInplaceOrView below_autograd;  // kernels call ATen ops (mm) internally
  const at::Tensor xm = xm_in.contiguous(), v = v_in.contiguous(), lss = contiguous_or_absent(lss_in);  // see above
  const at::Tensor rot = rot_in.contiguous();
  check_attention_inputs(xm, v, lss, chunk_size);
  check_hash_inputs(xm, rot);
  const at::Tensor perm = bucket_sort_cpu(sblsh_hash_cpu(xm, rot), rot.size(2));
  at::Tensor y = at::empty({xm.size(0), xm.size(1), v.size(2)}, v.options());
  at::Tensor lse = at::empty({xm.size(0), xm.size(1)}, acc_options_of(xm));
  attention_forward(xm, v, lss, perm, chunk_size, /*merge=*/true, y, lse);
  return {y, lse, perm};
}

}  // namespace

void attention_forward(const at::Tensor& xm, const at::Tensor& v, const at::Tensor& lss, const at::Tensor& perm,
                       int64_t chunk_size, bool merge, at::Tensor& out, at::Tensor& lse) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, xm.scalar_type(), "chunk_attention_forward_cpu", [&] {
    forward_kernel<scalar_t>(xm, v, lss, perm, chunk_size, merge, out, lse);
  });
}

TORCH_LIBRARY_IMPL(dlsn, CPU, m) {
  m.impl("chunk_attention", &chunk_attention_cpu);
  m.impl("gla_attention", &gla_attention_cpu);
}

}  // namespace dlsn::cpu
