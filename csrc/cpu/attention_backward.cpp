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
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "checks.h"
#include "cpu/cpu_kernels.h"
#include "cpu/vec_loops.h"

namespace dlsn::cpu {
namespace {

template <typename scalar_t>
struct Inputs {
  const scalar_t *xm, *v, *lss, *inv_norm, *grad_out, *delta, *lse;
  const int64_t* perm;
};

template <typename scalar_t>
void backward_kernel(const at::Tensor& grad_out, const at::Tensor& delta, const at::Tensor& xm, const at::Tensor& v,
                     const at::Tensor& lss, const at::Tensor& perm, const at::Tensor& lse, int64_t chunk,
                     at::Tensor& dxm, at::Tensor& dv, at::Tensor& dlss) {
  const int64_t batch = xm.size(0), length = xm.size(1), cm = xm.size(2), cv = v.size(2);
  const int64_t rounds = perm.size(1), saved_rounds = grad_out.size(1);
  const SlotLayout layout(length, chunk);
  const int64_t nc = layout.n_chunks, lp = layout.padded;

  const at::Tensor inv_norm = inverse_norms<scalar_t>(xm);
  const Inputs<scalar_t> in{xm.data_ptr<scalar_t>(),       v.data_ptr<scalar_t>(),     lss.data_ptr<scalar_t>(),
                            inv_norm.data_ptr<scalar_t>(), grad_out.data_ptr<scalar_t>(), delta.data_ptr<scalar_t>(),
                            lse.data_ptr<scalar_t>(),      perm.data_ptr<int64_t>()};

  // Per-round slot gradients, overwritten every round; position gradients summed over rounds.
  at::Tensor dv_slot = at::empty({batch, lp, cv}, xm.options());
  at::Tensor dkn_slot = at::empty({batch, lp, cm}, xm.options());
  at::Tensor dlss_slot = at::empty({batch, lp, chunk}, xm.options());
  at::Tensor dq_part = at::empty({batch, nc, 3, chunk, cm}, xm.options());
  at::Tensor dkn = at::zeros_like(xm);
  // Fully rewritten every round: perm is a permutation (checked by the caller), so inv[pr[s]] = s
  // covers every position.
  at::Tensor inverse = at::empty({batch, length}, perm.options());
  dxm.zero_();
  dv.zero_();
  dlss.zero_();

  for (int64_t r = 0; r < rounds; ++r) {
    const int64_t rs = saved_rounds == rounds ? r : 0;  // the round of grad_out / delta / lse

    at::parallel_for(0, batch * nc, 1, [&](int64_t begin, int64_t end) {
      at::Tensor keys = at::empty({chunk, cm}, xm.options());
      at::Tensor keys_n = at::empty({chunk, cm}, xm.options());
      at::Tensor values = at::empty({chunk, cv}, xm.options());
      at::Tensor q = at::empty({chunk, cm}, xm.options());
      at::Tensor g = at::empty({chunk, cv}, xm.options());
      at::Tensor p_t = at::empty({chunk, chunk}, xm.options());
      at::Tensor ds_t = at::empty({chunk, chunk}, xm.options());
      std::vector<int64_t> kpos(chunk), qpos(chunk);
      std::vector<scalar_t> q_delta(chunk), q_lse(chunk);
      std::vector<const scalar_t*> learned(chunk);
      scalar_t* p = p_t.data_ptr<scalar_t>();
      scalar_t* ds = ds_t.data_ptr<scalar_t>();

      for (int64_t job = begin; job < end; ++job) {
        const int64_t b = job / nc, kc = job % nc;
        const int64_t* pr = in.perm + (b * rounds + r) * length;
        for (int64_t j = 0; j < chunk; ++j) {
          kpos[j] = layout.position(pr, kc * chunk + j);
          learned[j] = in.lss + (b * length + kpos[j]) * chunk;
        }
        gather_rows(in.xm + b * length * cm, cm, kpos.data(), chunk, keys.data_ptr<scalar_t>());
        gather_rows(in.v + b * length * cv, cv, kpos.data(), chunk, values.data_ptr<scalar_t>());
        scalar_t* kn = keys_n.data_ptr<scalar_t>();
        const scalar_t* kr = keys.data_ptr<scalar_t>();
        for (int64_t j = 0; j < chunk; ++j) {
          const scalar_t scale = in.inv_norm[b * length + kpos[j]];
          for (int64_t k = 0; k < cm; ++k) kn[j * cm + k] = kr[j * cm + k] * scale;
        }
        at::Tensor dv_keys = dv_slot[b].narrow(0, kc * chunk, chunk);
        at::Tensor dkn_keys = dkn_slot[b].narrow(0, kc * chunk, chunk);
        scalar_t* dlss_keys = dlss_slot.data_ptr<scalar_t>() + (b * lp + kc * chunk) * chunk;

        for (int t = 0; t < 3; ++t) {
          const int64_t qc = layout.query_chunk(kc, t);
          const int64_t valid = std::min(chunk, length - qc * chunk);
          const int64_t row0 = (b * saved_rounds + rs) * length;
          scalar_t* gp = g.data_ptr<scalar_t>();
          for (int64_t i = 0; i < chunk; ++i) {
            qpos[i] = layout.position(pr, qc * chunk + i);
            q_lse[i] = in.lse[row0 + qpos[i]];
            // A padded query slot has no output: zero incoming gradient makes its terms vanish.
            if (i < valid) {
              std::memcpy(gp + i * cv, in.grad_out + (row0 + qpos[i]) * cv, cv * sizeof(scalar_t));
              q_delta[i] = in.delta[row0 + qpos[i]];
            } else {
              std::fill(gp + i * cv, gp + (i + 1) * cv, scalar_t(0));
              q_delta[i] = 0;
            }
          }
          gather_rows(in.xm + b * length * cm, cm, qpos.data(), chunk, q.data_ptr<scalar_t>());

          // P^T [keys, queries] recomputed from the saved logsumexp.
          at::mm_out(p_t, keys_n, q.t());
          probabilities_block(p, chunk, chunk, learned.data(), q_lse.data());
          // dS^T = P^T * (V g^T - delta)
          at::mm_out(ds_t, values, g.t());
          score_grad_block(ds, p, chunk, chunk, q_delta.data());
          if (t == 0) {
            at::mm_out(dv_keys, p_t, g);
            at::mm_out(dkn_keys, ds_t, q);
            std::memcpy(dlss_keys, ds, chunk * chunk * sizeof(scalar_t));
          } else {
            dv_keys.addmm_(p_t, g);
            dkn_keys.addmm_(ds_t, q);
            add_to(dlss_keys, ds, chunk * chunk);
          }
          at::Tensor dq_dst = dq_part[b][qc][t];
          at::mm_out(dq_dst, ds_t.t(), keys_n);
        }
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
    const scalar_t* dv_s = dv_slot.data_ptr<scalar_t>();
    const scalar_t* dkn_s = dkn_slot.data_ptr<scalar_t>();
    const scalar_t* dlss_s = dlss_slot.data_ptr<scalar_t>();
    const scalar_t* dq_s = dq_part.data_ptr<scalar_t>();
    scalar_t* dv_out = dv.data_ptr<scalar_t>();
    scalar_t* dkn_out = dkn.data_ptr<scalar_t>();
    scalar_t* dlss_out = dlss.data_ptr<scalar_t>();
    scalar_t* dq_out = dxm.data_ptr<scalar_t>();
    const int64_t* inverse_ptr = inverse.data_ptr<int64_t>();
    at::parallel_for(0, batch * length, 64, [&](int64_t begin, int64_t end) {
      const auto add = add_to<scalar_t>;
      for (int64_t pos = begin; pos < end; ++pos) {
        const int64_t b = pos / length, slot = inverse_ptr[pos];
        for (int64_t s = slot; s < lp; s = (s < length ? layout.first_copy(slot) : s + length)) {
          const int64_t row = b * lp + s;
          add(dv_out + pos * cv, dv_s + row * cv, cv);
          add(dkn_out + pos * cm, dkn_s + row * cm, cm);
          add(dlss_out + pos * chunk, dlss_s + row * chunk, chunk);
        }
        const int64_t qc = slot / chunk, i = slot % chunk;
        for (int t = 0; t < 3; ++t) add(dq_out + pos * cm, dq_s + (((b * nc + qc) * 3 + t) * chunk + i) * cm, cm);
      }
    });
  }

  // Key normalisation backward: kn = x / max(||x||, eps).
  const scalar_t* dkn_ptr = dkn.data_ptr<scalar_t>();
  scalar_t* dxm_ptr = dxm.data_ptr<scalar_t>();
  at::parallel_for(0, batch * length, 256, [&](int64_t begin, int64_t end) {
    for (int64_t pos = begin; pos < end; ++pos) {
      const scalar_t* x = in.xm + pos * cm;
      const scalar_t* g = dkn_ptr + pos * cm;
      scalar_t* out = dxm_ptr + pos * cm;
      scalar_t sq = 0;
      for (int64_t k = 0; k < cm; ++k) sq += x[k] * x[k];
      const scalar_t norm = std::sqrt(sq);
      if (norm < scalar_t(kKeyNormEps)) {
        for (int64_t k = 0; k < cm; ++k) out[k] += g[k] / scalar_t(kKeyNormEps);
        continue;
      }
      scalar_t dot = 0;
      for (int64_t k = 0; k < cm; ++k) dot += x[k] * g[k];
      const scalar_t inv = scalar_t(1) / norm, proj = dot * inv * inv;
      for (int64_t k = 0; k < cm; ++k) out[k] += (g[k] - x[k] * proj) * inv;
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& delta, const at::Tensor& xm, const at::Tensor& v,
    const at::Tensor& lss, const at::Tensor& perm, const at::Tensor& lse, int64_t chunk_size) {
  at::AutoDispatchBelowADInplaceOrView below_autograd;  // kernels call ATen ops (mm) internally
  check_backward_inputs(grad_out, delta, xm, v, lss, perm, lse, chunk_size);
  const at::Tensor perm64 = as_int64(perm);
  check_permutation(perm64, "perm");  // so every entry of the inverse permutation below gets written
  at::Tensor dxm = at::empty_like(xm), dv = at::empty_like(v), dlss = at::empty_like(lss);
  AT_DISPATCH_FLOATING_TYPES(xm.scalar_type(), "attention_backward_cpu", [&] {
    backward_kernel<scalar_t>(grad_out, delta, xm, v, lss, perm64, lse, chunk_size, dxm, dv, dlss);
  });
  return {dxm, dv, dlss};
}

}  // namespace

TORCH_LIBRARY_IMPL(dlsn, CPU, m) { m.impl("attention_backward", &attention_backward_cpu); }

}  // namespace dlsn::cpu
