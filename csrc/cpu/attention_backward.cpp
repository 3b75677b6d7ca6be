// Chunk attention backward on the CPU (op attention_backward; DESIGN.md, "Backward").
//
// Per round: a key-centric pass, one job per (batch, key chunk c'), recomputes the three score
// blocks of the query chunks that read c' (t = 0, 1, 2) from the saved logsumexp and writes
// - the slot gradients of its own K keys (dv, dkn, dlss), summed over t in order, and
// - dq_part[b, c, t] = the gradient its keys send to query chunk c (exactly one writer each).
// A second pass, one job per position, adds up its slots (the real one, then padded duplicates
// in increasing slot order) and its three dq parts. Nothing is accumulated by two threads, so the
// result is bitwise the same on every run. The key normalisation backward runs once at the end
// (it is linear in dkn, so rounds can be summed first).
// A job gathers the 3K queries of its three readers side by side, so each product is one [K, 3K]-sized GEMM
// called straight on the scratch tiles (cpu/gemm.h): five per job, where per-t at::mm calls made 18, each
// paying ATen's dispatch. The sums over t happen inside the GEMMs; every tile is one job's, per thread.
// Without a learned score (lss absent: NLSA) nothing of lss is read, and neither dlss nor its per-slot
// buffer is allocated (N * L * K values each): dlss comes back empty, shape [0].
// float16/bfloat16 inputs: rows are read in 16
// bits into float32 scratch, every product and sum is float32, each gradient is rounded to 16 bits once.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "checks.h"
#include "magnitudes.h"
#include "cpu/cpu_kernels.h"
#include "cpu/gemm.h"
#include "cpu/vec_loops.h"

namespace dlsn::cpu {
namespace {

template <typename scalar_t>
struct Inputs {
  using acc_t = acc_type_t<scalar_t>;
  const scalar_t *xm, *v, *lss, *grad_out;
  const acc_t *inv_norm, *delta, *lse;
  const int64_t* perm;
};

// The position gradients summed over rounds: the outputs themselves for float32/float64 storage, float32
// buffers rounded into the 16-bit outputs once at the end otherwise.
template <typename acc_t>
at::Tensor accumulator_for(const at::Tensor& out) {
  if (out.scalar_type() == c10::CppTypeToScalarType<acc_t>::value) return out.zero_();
  return at::zeros(out.sizes(), acc_options_of(out));
}

template <typename scalar_t>
void backward_kernel(const at::Tensor& grad_out, const at::Tensor& delta, const at::Tensor& xm, const at::Tensor& v,
                     const at::Tensor& lss, const at::Tensor& perm, const at::Tensor& lse, int64_t chunk,
                     at::Tensor& dxm, at::Tensor& dv, at::Tensor& dlss) {
  using acc_t = acc_type_t<scalar_t>;
  constexpr bool kWide = std::is_same_v<scalar_t, acc_t>;  // float32/float64 storage: no conversions
  const int64_t batch = xm.size(0), length = xm.size(1), cm = xm.size(2), cv = v.size(2);
  const int64_t rounds = perm.size(1), saved_rounds = grad_out.size(1);
  const SlotLayout layout(length, chunk);
  const int64_t nc = layout.n_chunks, lp = layout.padded, kk = 3 * chunk;
  const auto acc_options = acc_options_of(xm);

  const at::Tensor inv_norm = inverse_norms<scalar_t>(xm);
  const bool has_lss = lss.defined();  // undefined: no learned score (lss=None), no dlss
  const scalar_t* lss_ptr = has_lss ? lss.data_ptr<scalar_t>() : nullptr;
  const Inputs<scalar_t> in{xm.data_ptr<scalar_t>(),     v.data_ptr<scalar_t>(),   lss_ptr,
                            grad_out.data_ptr<scalar_t>(), inv_norm.data_ptr<acc_t>(), delta.data_ptr<acc_t>(),
                            lse.data_ptr<acc_t>(),        perm.data_ptr<int64_t>()};

  // Per-round slot gradients, overwritten every round; position gradients summed over rounds.
  at::Tensor dv_slot = at::empty({batch, lp, cv}, acc_options);
  at::Tensor dkn_slot = at::empty({batch, lp, cm}, acc_options);
  at::Tensor dlss_slot = has_lss ? at::empty({batch, lp, chunk}, acc_options) : at::Tensor();
  // dq_part[b, kc, t * K + i]: the gradient key chunk kc sends to query i of chunk query_chunk(kc, t).
  at::Tensor dq_part = at::empty({batch, nc, 3 * chunk, cm}, acc_options);
  at::Tensor dkn = at::zeros(xm.sizes(), acc_options);
  const at::Tensor dxm_acc = accumulator_for<acc_t>(dxm), dv_acc = accumulator_for<acc_t>(dv);
  const at::Tensor dlss_acc = has_lss ? accumulator_for<acc_t>(dlss) : at::Tensor();
  // Fully rewritten every round: perm is a permutation (checked by the caller), so inv[pr[s]] = s
  // covers every position.
  at::Tensor inverse = at::empty({batch, length}, perm.options());

  for (int64_t r = 0; r < rounds; ++r) {
    const int64_t rs = saved_rounds == rounds ? r : 0;  // the round of grad_out / delta / lse

    at::parallel_for(0, batch * nc, 1, [&](int64_t begin, int64_t end) {
      // Per-thread scratch: the job's K keys, the 3K queries of the three chunks that read them (t-major), and the
      // [K, 3K] blocks P^T / dS^T of those three chunks side by side, so that each product is one GEMM.
      std::vector<acc_t> keys_n(chunk * cm), values(chunk * cv), q3(kk * cm), g3(kk * cv);
      std::vector<acc_t> p(chunk * kk), ds(chunk * kk), learned3(has_lss ? chunk * kk : 0);
      std::vector<int64_t> kpos(chunk), qpos(kk);
      std::vector<acc_t> q_delta(kk), q_lse(kk);
      std::vector<const acc_t*> learned(has_lss ? chunk : 0);
      for (int64_t j = 0; j < static_cast<int64_t>(learned.size()); ++j) learned[j] = learned3.data() + j * kk;

      for (int64_t job = begin; job < end; ++job) {
        const int64_t b = job / nc, kc = job % nc;
        const int64_t* pr = in.perm + (b * rounds + r) * length;
        const int64_t row0 = (b * saved_rounds + rs) * length;
        for (int64_t j = 0; j < chunk; ++j) kpos[j] = layout.position(pr, kc * chunk + j);
        // lss[key] is indexed by query slot within a chunk, the same for the three query chunks: repeated 3x.
        if (has_lss) {
          for (int64_t j = 0; j < chunk; ++j) {
            const scalar_t* src = in.lss + (b * length + kpos[j]) * chunk;
            for (int t = 0; t < 3; ++t) widen_scaled(src, acc_t(1), learned3.data() + j * kk + t * chunk, chunk);
          }
        }
        // Keys normalised as they are gathered: no product sees an unnormalised key (overflow-safe).
        gather_scaled_rows(in.xm + b * length * cm, cm, kpos.data(), chunk, in.inv_norm + b * length, keys_n.data());
        gather_rows(in.v + b * length * cv, cv, kpos.data(), chunk, values.data());

        for (int t = 0; t < 3; ++t) {
          const int64_t qc = layout.query_chunk(kc, t);
          const int64_t valid = std::min(chunk, length - qc * chunk);
          for (int64_t i = 0; i < chunk; ++i) {
            const int64_t col = t * chunk + i;
            const int64_t pos = layout.position(pr, qc * chunk + i);
            qpos[col] = pos;
            q_lse[col] = in.lse[row0 + pos];
            acc_t* g = g3.data() + col * cv;
            // A padded query slot has no output: zero incoming gradient makes its terms vanish.
            if (i < valid) {
              widen_scaled(in.grad_out + (row0 + pos) * cv, acc_t(1), g, cv);
              q_delta[col] = in.delta[row0 + pos];
            } else {
              std::fill(g, g + cv, acc_t(0));
              q_delta[col] = 0;
            }
          }
        }
        gather_rows(in.xm + b * length * cm, cm, qpos.data(), kk, q3.data());

        // P^T [keys, 3K queries] recomputed from the saved logsumexp.
        gemm_rm<acc_t>(false, true, chunk, kk, cm, keys_n.data(), cm, q3.data(), cm, 0, p.data(), kk);
        probabilities_block(p.data(), chunk, kk, has_lss ? learned.data() : nullptr, q_lse.data());
        // dS^T = P^T * (V g^T - delta)
        gemm_rm<acc_t>(false, true, chunk, kk, cv, values.data(), cv, g3.data(), cv, 0, ds.data(), kk);
        score_grad_block(ds.data(), p.data(), chunk, kk, q_delta.data());
        // The key slots' gradients, summed over the three query chunks inside the GEMM (one writer per slot).
        acc_t* dv_keys = dv_slot.data_ptr<acc_t>() + (b * lp + kc * chunk) * cv;
        acc_t* dkn_keys = dkn_slot.data_ptr<acc_t>() + (b * lp + kc * chunk) * cm;
        gemm_rm<acc_t>(false, false, chunk, cv, kk, p.data(), kk, g3.data(), cv, 0, dv_keys, cv);
        gemm_rm<acc_t>(false, false, chunk, cm, kk, ds.data(), kk, q3.data(), cm, 0, dkn_keys, cm);
        if (has_lss) {
          acc_t* dlss_keys = dlss_slot.data_ptr<acc_t>() + (b * lp + kc * chunk) * chunk;
          for (int64_t j = 0; j < chunk; ++j) {
            const acc_t* d = ds.data() + j * kk;
            acc_t* out = dlss_keys + j * chunk;
            for (int64_t i = 0; i < chunk; ++i) out[i] = d[i] + d[chunk + i] + d[2 * chunk + i];
          }
        }
        // dq_part[b, kc, t * K + i]: what these keys send to query i of chunk query_chunk(kc, t).
        acc_t* dq_dst = dq_part.data_ptr<acc_t>() + (b * nc + kc) * kk * cm;
        gemm_rm<acc_t>(true, false, kk, cm, chunk, ds.data(), kk, keys_n.data(), cm, 0, dq_dst, cm);
      }
    });

    // Each position sums its slots: its own, then padded duplicates, then its three dq parts.
    at::parallel_for(0, batch, 1, [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b) {
        const int64_t* pr = in.perm + (b * rounds + r) * length;
        int64_t* inv = inverse.data_ptr<int64_t>() + b * length;
        for (int64_t s = 0; s < length; ++s) inv[pr[s]] = s;
      }
    });
    const acc_t* dv_s = dv_slot.data_ptr<acc_t>();
    const acc_t* dkn_s = dkn_slot.data_ptr<acc_t>();
    const acc_t* dlss_s = has_lss ? dlss_slot.data_ptr<acc_t>() : nullptr;
    const acc_t* dq_s = dq_part.data_ptr<acc_t>();
    acc_t* dv_out = dv_acc.data_ptr<acc_t>();
    acc_t* dkn_out = dkn.data_ptr<acc_t>();
    acc_t* dlss_out = has_lss ? dlss_acc.data_ptr<acc_t>() : nullptr;
    acc_t* dq_out = dxm_acc.data_ptr<acc_t>();
    const int64_t* inverse_ptr = inverse.data_ptr<int64_t>();
    at::parallel_for(0, batch * length, 64, [&](int64_t begin, int64_t end) {
      const auto add = add_to<acc_t>;
      for (int64_t pos = begin; pos < end; ++pos) {
        const int64_t b = pos / length, slot = inverse_ptr[pos];
        for (int64_t s = slot; s < lp; s = (s < length ? layout.first_copy(slot) : s + length)) {
          const int64_t row = b * lp + s;
          add(dv_out + pos * cv, dv_s + row * cv, cv);
          add(dkn_out + pos * cm, dkn_s + row * cm, cm);
          if (has_lss) add(dlss_out + pos * chunk, dlss_s + row * chunk, chunk);
        }
        const int64_t qc = slot / chunk, i = slot % chunk;
        for (int t = 0; t < 3; ++t) {
          const int64_t kc = layout.key_chunk(qc, t);  // the key chunk that this query chunk reads as its t-th
          add(dq_out + pos * cm, dq_s + ((b * nc + kc) * kk + t * chunk + i) * cm, cm);
        }
      }
    });
  }

  // Key normalisation backward, kn = x / max(||x||, eps): dx = (g - kn (kn . g)) / ||x||, written with kn
  // (unit length) rather than x so that nothing squares x (overflow-safe, like the norm itself).
  const acc_t* dkn_ptr = dkn.data_ptr<acc_t>();
  acc_t* dxm_ptr = dxm_acc.data_ptr<acc_t>();
  at::parallel_for(0, batch * length, 256, [&](int64_t begin, int64_t end) {
    for (int64_t pos = begin; pos < end; ++pos) {
      const scalar_t* x = in.xm + pos * cm;
      const acc_t* g = dkn_ptr + pos * cm;
      acc_t* out = dxm_ptr + pos * cm;
      const acc_t norm = row_norm(x, cm);
      if (norm < acc_t(kKeyNormEps)) {
        for (int64_t k = 0; k < cm; ++k) out[k] += g[k] / acc_t(kKeyNormEps);
        continue;
      }
      const acc_t inv = acc_t(1) / norm;
      acc_t dot = 0;
      for (int64_t k = 0; k < cm; ++k) dot += static_cast<acc_t>(x[k]) * inv * g[k];
      for (int64_t k = 0; k < cm; ++k) out[k] += (g[k] - static_cast<acc_t>(x[k]) * inv * dot) * inv;
    }
  });
  if constexpr (!kWide) {
    dxm.copy_(dxm_acc);
    dv.copy_(dv_acc);
    if (has_lss) dlss.copy_(dlss_acc);
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_backward_cpu(
    const at::Tensor& grad_out_in, const at::Tensor& delta_in, const at::Tensor& xm_in, const at::Tensor& v_in,
    const std::optional<at::Tensor>& lss_in, const at::Tensor& perm_in, const at::Tensor& lse_in,
    int64_t chunk_size) {
  at::AutoDispatchBelowADInplaceOrView below_autograd;  // kernels call ATen ops (mm) internally
  // Any strides: the kernel reads whole rows, so strided views are copied once here (contiguous: no copy).
  const at::Tensor grad_out = grad_out_in.contiguous(), delta = delta_in.contiguous(), xm = xm_in.contiguous();
  const at::Tensor v = v_in.contiguous(), lss = contiguous_or_absent(lss_in), perm = perm_in.contiguous();
  const at::Tensor lse = lse_in.contiguous();
  check_backward_inputs(grad_out, delta, xm, v, lss, perm, lse, chunk_size);
  const at::Tensor perm64 = as_int64(perm);
  check_permutation(perm64, "perm");  // so every entry of the inverse permutation below gets written
  check_lse_range(lse);
  at::Tensor dxm = at::empty_like(xm), dv = at::empty_like(v);
  // No lss: an empty dlss (the op's contract, dlsn_kernels/_ops.py), autograd turns it into None.
  at::Tensor dlss = lss.defined() ? at::empty_like(lss) : at::empty({0}, xm.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, xm.scalar_type(), "attention_backward_cpu", [&] {
    backward_kernel<scalar_t>(grad_out, delta, xm, v, lss, perm64, lse, chunk_size, dxm, dv, dlss);
  });
  return {dxm, dv, dlss};
}

}  // namespace

TORCH_LIBRARY_IMPL(dlsn, CPU, m) { m.impl("attention_backward", &attention_backward_cpu); }

}  // namespace dlsn::cpu
