// attention_backward on CUDA: gradients of chunk_attention (R' = R) and gla_attention (R' = 1), DESIGN
// "Backward". Scores are recomputed from the saved lse (flash-attention style); no atomics anywhere, and
// every sum runs in a fixed order, so the gradients are bitwise the same on every run.
//
// For round r (r' = r if R' == R else 0), query q at slot i of chunk c and key j of its 3K keys:
//   P = exp(s - lse[r', q]),  ds = P * (grad_out[r', q] . v[j] - delta[r', q])
//   dq[q] += ds kn[j];  dv[j] += P grad_out[r', q];  dkn[j] += ds xm[q];  dlss[j, i] += ds
// Padded query slots (slot >= L) produce no output, hence no gradient; padded key slots are ordinary keys.
//
// Per round, in this order on the current stream: the attention kernels, then the scatter of their slot
// gradients to positions (attention_bwd_steps.cuh); after all rounds, finish (key-norm backward, casts).
// The attention kernels are the tensor-core passes of attention_bwd_tc.cuh (dq, dv, scores) when the
// dtype, precision policy and device allow (as in the forward), else the two scalar IEEE float32 kernels
// below, on float32 copies of the inputs:
//   1. dq (query-centric, like the forward): block (n, c, query tile, column slice of Cm) streams the 3K
//      keys of its 32 query rows, and adds sum_j ds kn_j of its columns to dq_acc[n, position] (float32).
//      A position is the query of exactly one slot < L per round: one writer per element.
//   2. keys (key-centric): block (n, key chunk c', key tile, column slice) owns 32 key slots of c' and
//      visits the query chunks that read c' (c', c'+1, c'-1 mod nc: t = 0, 1, 2; with nc <= 2 the same chunk
//      comes several times, as it was read several times). It writes the slot gradients of its keys:
//      dv_slot [N, Lp, Cv] or dkn_slot [N, Lp, Cm] for its column slice (slices 0..n_dv-1 are columns of
//      dv, the rest columns of dkn), and dlss_slot [N, Lp, K] (slice 0). One writer per element.
// Thread ownership inside the scalar blocks (8 warps): scores and ds of query row w + 8a (a = 0..3)
// against key = lane live in the registers of (warp w, lane); column accumulators hold columns
// slice*128 + lane + 32u (u = 0..3) of 4 rows per warp (query rows in kernel 1, key rows w + 8b in kernel 2).
#include <tuple>

#include "attention_bwd_steps.cuh"
#include "attention_bwd_tc.cuh"
#include "common.cuh"

namespace dlsn {
namespace cuda_impl {
namespace {

template <typename T, typename idx_t>
struct BackwardArgs {
  const T* grad_out;   // [N, R', L, Cv]
  const float* delta;  // [N, R', L]
  const float* lse;    // [N, R', L]
  const T* xm;         // [N, L, Cm]
  const T* v;          // [N, L, Cv]
  const T* lss;        // [N, L, K]; nullptr: no learned score
  const idx_t* perm;   // [N, R, L]
  int64_t rounds, grad_rounds, round, length, chunk, cm, cv, n_chunks, n_tiles, pad, padded_length;
  int64_t n_dv_slices;  // kernel 2: column slices of dv; the following slices are columns of dkn
  float* dq_acc;        // [N, L, Cm]
  float* dv_slot;       // [N, Lp, Cv]
  float* dkn_slot;      // [N, Lp, Cm]
  float* dlss_slot;     // [N, Lp, K]; nullptr: no learned score
};

// Query row `tid` of a tile: slot c*K + qt*32 + tid. Rows past the chunk and padded slots are invalid
// (row indices -1, slot index -1) and contribute nothing.
template <typename T, typename idx_t>
__device__ __forceinline__ void load_query_row(const BackwardArgs<T, idx_t>& a, int64_t n, int64_t c, int64_t qt,
                                               int tid, int64_t* s_qrow, int64_t* s_grow, int* s_qslot,
                                               float* s_lse, float* s_delta) {
  const int64_t L = a.length, K = a.chunk;
  const int64_t i = qt * kTile + tid, slot = c * K + i;
  if (i < K && slot < L) {
    const int64_t pos = static_cast<int64_t>(a.perm[(n * a.rounds + a.round) * L + slot]);
    const int64_t grad_round = a.grad_rounds == a.rounds ? a.round : 0;
    const int64_t grow = (n * a.grad_rounds + grad_round) * L + pos;
    s_qrow[tid] = n * L + pos;
    s_grow[tid] = grow;
    s_qslot[tid] = static_cast<int>(i);
    s_lse[tid] = a.lse[grow];
    s_delta[tid] = a.delta[grow];
  } else {
    s_qrow[tid] = -1;
    s_grow[tid] = -1;
    s_qslot[tid] = -1;
    s_lse[tid] = 0.f;
    s_delta[tid] = 0.f;
  }
}

// Kernel 1: dq. Block (n, c, qt, Cm column slice); see the top of the file.
template <typename T, typename idx_t>
__global__ void __launch_bounds__(kThreads) attention_bwd_dq_kernel(const BackwardArgs<T, idx_t> a) {
  __shared__ float s_a[kTile][kChanTile + 1];
  __shared__ float s_b[kTile][kChanTile + 1];
  __shared__ float s_key[kTile][kCols];  // raw xm of the tile's keys, this block's column slice
  __shared__ int64_t s_qrow[kTile], s_grow[kTile], s_krow[kTile];
  __shared__ int s_qslot[kTile];
  __shared__ float s_lse[kTile], s_delta[kTile];

  const int tid = threadIdx.x, lane = tid % kWarp, warp = tid / kWarp;
  const BlockWork work = decode_block(blockIdx.x, a.n_tiles, a.n_chunks, 1);
  const int64_t qt = work.tile, c = work.chunk, n = work.n;
  const int64_t L = a.length, K = a.chunk;
  const idx_t* perm_row = a.perm + (n * a.rounds + a.round) * L;
  const int64_t col0 = int64_t(blockIdx.y) * kCols;

  if (tid < kTile) load_query_row(a, n, c, qt, tid, s_qrow, s_grow, s_qslot, s_lse, s_delta);

  float dq[kRowsPerWarp][kColsPerLane];
#pragma unroll
  for (int ra = 0; ra < kRowsPerWarp; ++ra)
#pragma unroll
    for (int u = 0; u < kColsPerLane; ++u) dq[ra][u] = 0.f;

  const int64_t n_keys = 3 * K;
  for (int64_t k0 = 0; k0 < n_keys; k0 += kTile) {
    __syncthreads();  // everyone is done with s_krow and s_key of the previous key tile
    if (tid < kTile) {
      const int64_t key = k0 + tid;
      if (key < n_keys) {
        const int t = static_cast<int>(key / K);
        const int64_t slot = key_chunk_of(c, t, a.n_chunks) * K + key % K;
        s_krow[tid] = n * L + slot_position(perm_row, slot, L, a.pad);
      } else {
        s_krow[tid] = -1;
      }
    }
    __syncthreads();

    float s[kRowsPerWarp] = {}, gv[kRowsPerWarp] = {};
    float key_sumsq = 0.f, unused = 0.f;
    tile_dot<T, true>(a.xm, s_qrow, a.xm, s_krow, a.cm, s, key_sumsq, s_a, s_b);
    tile_dot<T, false>(a.grad_out, s_grow, a.v, s_krow, a.cv, gv, unused, s_a, s_b);
    const int64_t krow = s_krow[lane];
    const float inv_norm = 1.f / fmaxf(sqrtf(key_sumsq), kKeyNormEpsF);

    // w = ds / max(||xm_j||, eps), so that ds * kn_j = w * xm_j.
    float w[kRowsPerWarp];
#pragma unroll
    for (int ra = 0; ra < kRowsPerWarp; ++ra) {
      const int q = warp + kWarps * ra;
      const int i = s_qslot[q];
      w[ra] = 0.f;
      if (i >= 0 && krow >= 0) {
        const float score = s[ra] * inv_norm + (a.lss != nullptr ? to_float(a.lss[krow * K + i]) : 0.f);
        const float prob = expf(score - s_lse[q]);
        w[ra] = prob * (gv[ra] - s_delta[q]) * inv_norm;
      }
    }

    for (int e = tid; e < kTile * kCols; e += kThreads) {
      const int row = e / kCols, cc = e % kCols;
      const int64_t col = col0 + cc, xrow = s_krow[row];
      s_key[row][cc] = (xrow >= 0 && col < a.cm) ? to_float(a.xm[xrow * a.cm + col]) : 0.f;
    }
    __syncthreads();
    for (int j = 0; j < kTile; ++j) {
#pragma unroll
      for (int ra = 0; ra < kRowsPerWarp; ++ra) {
        const float wj = __shfl_sync(kFullMask, w[ra], j);
#pragma unroll
        for (int u = 0; u < kColsPerLane; ++u) dq[ra][u] += wj * s_key[j][lane + kWarp * u];
      }
    }
  }

#pragma unroll
  for (int ra = 0; ra < kRowsPerWarp; ++ra) {
    const int q = warp + kWarps * ra;
    if (s_qslot[q] < 0) continue;
    float* dq_row = a.dq_acc + s_qrow[q] * a.cm;
#pragma unroll
    for (int u = 0; u < kColsPerLane; ++u) {
      const int64_t col = col0 + lane + kWarp * u;
      if (col < a.cm) dq_row[col] += dq[ra][u];
    }
  }
}

// Kernel 2: slot gradients of the keys. Block (n, key chunk ck, key tile kt, column slice).
template <typename T, typename idx_t>
__global__ void __launch_bounds__(kThreads) attention_bwd_keys_kernel(const BackwardArgs<T, idx_t> a) {
  __shared__ float s_a[kTile][kChanTile + 1];
  __shared__ float s_b[kTile][kChanTile + 1];
  __shared__ float s_p[kTile][kTile + 1];   // P[query row][key]
  __shared__ float s_ds[kTile][kTile + 1];  // ds[query row][key]
  __shared__ float s_x[kTile][kCols];       // grad_out (dv slices) or xm (dkn slices) of the query rows
  __shared__ int64_t s_qrow[kTile], s_grow[kTile], s_krow[kTile], s_kslot[kTile];
  __shared__ int s_qslot[kTile];
  __shared__ float s_lse[kTile], s_delta[kTile];

  const int tid = threadIdx.x, lane = tid % kWarp, warp = tid / kWarp;
  const BlockWork work = decode_block(blockIdx.x, a.n_tiles, a.n_chunks, 1);
  const int64_t kt = work.tile, ck = work.chunk, n = work.n;
  const int64_t L = a.length, K = a.chunk, Lp = a.padded_length;
  const idx_t* perm_row = a.perm + (n * a.rounds + a.round) * L;
  const int64_t slice = blockIdx.y;
  const bool is_dv = slice < a.n_dv_slices;
  const int64_t col0 = (is_dv ? slice : slice - a.n_dv_slices) * kCols;
  const int64_t width = is_dv ? a.cv : a.cm;

  if (tid < kTile) {
    const int64_t jj = kt * kTile + tid;
    if (jj < K) {
      const int64_t slot = ck * K + jj;
      s_kslot[tid] = slot;
      s_krow[tid] = n * L + slot_position(perm_row, slot, L, a.pad);
    } else {
      s_kslot[tid] = -1;
      s_krow[tid] = -1;
    }
  }

  // acc[b][u]: key row warp + 8b, column col0 + lane + 32u.
  float acc[kRowsPerWarp][kColsPerLane];
#pragma unroll
  for (int kb = 0; kb < kRowsPerWarp; ++kb)
#pragma unroll
    for (int u = 0; u < kColsPerLane; ++u) acc[kb][u] = 0.f;

  for (int64_t qt = 0; qt < a.n_tiles; ++qt) {
    // dl[a]: dlss of (key = lane, query slot index qt*32 + warp + 8a), summed over t = 0, 1, 2.
    float dl[kRowsPerWarp] = {};
    for (int t = 0; t < 3; ++t) {
      const int64_t cq = query_chunk_reading(ck, t, a.n_chunks);
      __syncthreads();  // everyone is done with the query rows, s_p/s_ds and s_x of the previous step
      if (tid < kTile) load_query_row(a, n, cq, qt, tid, s_qrow, s_grow, s_qslot, s_lse, s_delta);
      __syncthreads();

      float s[kRowsPerWarp] = {}, gv[kRowsPerWarp] = {};
      float key_sumsq = 0.f, unused = 0.f;
      tile_dot<T, true>(a.xm, s_qrow, a.xm, s_krow, a.cm, s, key_sumsq, s_a, s_b);
      tile_dot<T, false>(a.grad_out, s_grow, a.v, s_krow, a.cv, gv, unused, s_a, s_b);
      const int64_t krow = s_krow[lane];
      const float inv_norm = 1.f / fmaxf(sqrtf(key_sumsq), kKeyNormEpsF);

#pragma unroll
      for (int ra = 0; ra < kRowsPerWarp; ++ra) {
        const int q = warp + kWarps * ra;
        const int i = s_qslot[q];
        float prob = 0.f, ds = 0.f;
        if (i >= 0 && krow >= 0) {
          const float score = s[ra] * inv_norm + (a.lss != nullptr ? to_float(a.lss[krow * K + i]) : 0.f);
          prob = expf(score - s_lse[q]);
          ds = prob * (gv[ra] - s_delta[q]);
        }
        dl[ra] += ds;
        s_p[q][lane] = prob;
        s_ds[q][lane] = ds;
      }

      for (int e = tid; e < kTile * kCols; e += kThreads) {
        const int row = e / kCols, cc = e % kCols;
        const int64_t col = col0 + cc;
        float x = 0.f;
        if (col < width) {
          if (is_dv) {
            const int64_t grow = s_grow[row];
            if (grow >= 0) x = to_float(a.grad_out[grow * a.cv + col]);
          } else {
            const int64_t qrow = s_qrow[row];
            if (qrow >= 0) x = to_float(a.xm[qrow * a.cm + col]);
          }
        }
        s_x[row][cc] = x;
      }
      __syncthreads();
      // dv[j] += P[q, j] grad_out[q]; dkn[j] += ds[q, j] xm[q]; query rows in increasing order.
      float(*weight)[kTile + 1] = is_dv ? s_p : s_ds;
      for (int q = 0; q < kTile; ++q) {
#pragma unroll
        for (int kb = 0; kb < kRowsPerWarp; ++kb) {
          const float wq = weight[q][warp + kWarps * kb];  // broadcast read
#pragma unroll
          for (int u = 0; u < kColsPerLane; ++u) acc[kb][u] += wq * s_x[q][lane + kWarp * u];
        }
      }
    }
    if (slice == 0 && a.dlss_slot != nullptr) {
      const int64_t kslot = s_kslot[lane];
      if (kslot >= 0) {
#pragma unroll
        for (int ra = 0; ra < kRowsPerWarp; ++ra) {
          const int64_t i = qt * kTile + warp + kWarps * ra;
          if (i < K) a.dlss_slot[(n * Lp + kslot) * K + i] = dl[ra];
        }
      }
    }
  }

  float* slot_grad = is_dv ? a.dv_slot : a.dkn_slot;
#pragma unroll
  for (int kb = 0; kb < kRowsPerWarp; ++kb) {
    const int64_t kslot = s_kslot[warp + kWarps * kb];
    if (kslot < 0) continue;
    float* row = slot_grad + (n * Lp + kslot) * width;
#pragma unroll
    for (int u = 0; u < kColsPerLane; ++u) {
      const int64_t col = col0 + lane + kWarp * u;
      if (col < width) row[col] = acc[kb][u];
    }
  }
}

// The tensor-core passes when the dtype, precision policy and device allow them and the largest one's shared
// memory fits.
constexpr const char* kDqTcName = "attention_bwd_dq_tc_kernel";
constexpr const char* kDvTcName = "attention_bwd_keys_tc_kernel<dv pass>";
constexpr const char* kScoreTcName = "attention_bwd_keys_tc_kernel<score pass>";

// The three passes of one dtype, with or without the learned score.
template <typename T, bool kHasLss>
struct TcPasses {
  static constexpr auto* dq = &tc::attention_bwd_dq_tc_kernel<T, kHasLss>;
  static constexpr auto* dv = &tc::attention_bwd_keys_tc_kernel<T, true, kHasLss>;
  static constexpr auto* score = &tc::attention_bwd_keys_tc_kernel<T, false, kHasLss>;
};

template <typename T, bool kHasLss>
bool tc_passes_fit(int64_t length, int64_t cm, int64_t cv) {
  using P = TcPasses<T, kHasLss>;
  tc::BackwardTcArgs<T> a{};
  tc::tc_backward_sizes(a, 1, 1, length, cm, cv, 1);
  const auto bytes = [&](tc::BwdPass pass) { return tc::tc_backward_smem<T>(pass, a.cm_pad, a.cv_pad, kHasLss).bytes; };
  return fits_shared_memory<T>(P::dq, bytes(tc::BwdPass::kDq), kDqTcName) &&
         fits_shared_memory<T>(P::dv, bytes(tc::BwdPass::kDv), kDvTcName) &&
         fits_shared_memory<T>(P::score, bytes(tc::BwdPass::kScore), kScoreTcName);
}

bool use_tensor_cores(const at::Tensor& xm, const at::Tensor& v, bool has_lss) {
  if (!tensor_cores_allowed(xm)) return false;
  bool fits = false;
  dispatch_float(xm.scalar_type(), [&](auto element) {
    using scalar_t = decltype(element);
    fits = has_lss ? tc_passes_fit<scalar_t, true>(xm.size(1), xm.size(2), v.size(2))
                   : tc_passes_fit<scalar_t, false>(xm.size(1), xm.size(2), v.size(2));
  });
  return fits;
}

// The three tensor-core passes of round a.round, in order: dq, dv, scores (dkn, dlss).
template <typename T, bool kHasLss>
void launch_tc_round(const tc::BackwardTcArgs<T>& a, int64_t n, cudaStream_t stream) {
  using P = TcPasses<T, kHasLss>;
  const unsigned blocks = static_cast<unsigned>(n * a.n_chunks * a.n_own_tiles);
  const auto launch = [&](auto* kernel, tc::BwdPass pass, const char* name) {
    const int64_t smem = tc::tc_backward_smem<T>(pass, a.cm_pad, a.cv_pad, kHasLss).bytes;
    if (!allow_shared_memory<T>(kernel, smem, name)) return;  // registration.cpp raises
    const dim3 grid(blocks, static_cast<unsigned>(tc::tc_backward_slices(pass, a.cm, a.cv)));
    kernel<<<grid, tc::kBwdThreads, smem, stream>>>(a);
  };
  launch(P::dq, tc::BwdPass::kDq, kDqTcName);
  launch(P::dv, tc::BwdPass::kDv, kDvTcName);
  launch(P::score, tc::BwdPass::kScore, kScoreTcName);
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_backward_cuda(
    const at::Tensor& grad_out, const at::Tensor& delta, const at::Tensor& xm, const at::Tensor& v,
    const at::Tensor& lss, const at::Tensor& perm, const at::Tensor& lse, int64_t chunk_size) {
  const c10::cuda::CUDAGuard guard(xm.device());
  const int64_t n = xm.size(0), length = xm.size(1), cm = xm.size(2), cv = v.size(2), chunk = chunk_size;
  const int64_t rounds = perm.size(1), grad_rounds = grad_out.size(1);
  const SlotLayout layout(length, chunk);
  const int64_t n_chunks = layout.n_chunks, padded_length = layout.padded, pad = layout.pad;
  // Without a learned score there is no dlss: an empty [0] in its place, and no dlss buffers at all.
  const bool has_lss = lss.defined();
  auto dxm = at::empty_like(xm), dv = at::empty_like(v);
  auto dlss = has_lss ? at::empty_like(lss) : at::empty({0}, xm.options());
  if (n == 0) return {dxm, dv, dlss};

  const auto f32 = xm.options().dtype(at::kFloat);
  auto dq_acc = at::zeros({n, length, cm}, f32);
  auto dkn_acc = at::zeros({n, length, cm}, f32);
  auto dv_acc = at::zeros({n, length, cv}, f32);
  const at::Tensor dlss_acc = has_lss ? at::zeros({n, length, chunk}, f32) : at::Tensor();
  // Slot buffers, fully rewritten by every round's key kernels.
  auto dv_slot = at::empty({n, padded_length, cv}, f32);
  auto dkn_slot = at::empty({n, padded_length, cm}, f32);
  const at::Tensor dlss_slot = has_lss ? at::empty({n, padded_length, chunk}, f32) : at::Tensor();
  const auto data_or_null = [](const at::Tensor& t) { return t.defined() ? t.data_ptr<float>() : nullptr; };
  auto inv = at::empty({n, rounds, length}, xm.options().dtype(at::kLong));
  const at::Tensor perm64 = perm.to(at::kLong);

  const auto stream = at::cuda::getCurrentCUDAStream();
  const int64_t n_perm = n * rounds * length;
  inverse_perm_kernel<int64_t><<<static_cast<unsigned>(ceil_div(n_perm, 256)), 256, 0, stream>>>(
      perm64.data_ptr<int64_t>(), inv.data_ptr<int64_t>(), n * rounds, length);
  const auto scatter = [&](int64_t r) {
    scatter_slots_kernel<<<scatter_blocks(n * length), kScatterThreads, 0, stream>>>(
        inv.data_ptr<int64_t>(), dv_slot.data_ptr<float>(), dkn_slot.data_ptr<float>(), data_or_null(dlss_slot),
        dv_acc.data_ptr<float>(), dkn_acc.data_ptr<float>(), data_or_null(dlss_acc), n, rounds, r, length,
        padded_length, pad, cm, cv, chunk);
  };

  if (use_tensor_cores(xm, v, has_lss)) {
    const KeyNorms norms = key_norms(xm, stream);
    dispatch_float(xm.scalar_type(), [&](auto element) {
      using scalar_t = decltype(element);
      tc::BackwardTcArgs<scalar_t> a{};
      tc::tc_backward_sizes(a, rounds, grad_rounds, length, cm, cv, chunk);
      tc::tc_backward_inputs(a, grad_out.data_ptr<scalar_t>(), delta.data_ptr<float>(), lse.data_ptr<float>(),
                             xm.data_ptr<scalar_t>(), v.data_ptr<scalar_t>(),
                             has_lss ? lss.data_ptr<scalar_t>() : nullptr, perm64.data_ptr<int64_t>(),
                             norms.inv.data_ptr<float>());
      a.dq_acc = dq_acc.data_ptr<float>();
      a.dv_slot = dv_slot.data_ptr<float>();
      a.dkn_slot = dkn_slot.data_ptr<float>();
      a.dlss_slot = data_or_null(dlss_slot);
      for (int64_t r = 0; r < rounds; ++r) {
        a.round = r;
        if (has_lss) {
          launch_tc_round<scalar_t, true>(a, n, stream);
        } else {
          launch_tc_round<scalar_t, false>(a, n, stream);
        }
        scatter(r);
      }
    });
  } else {
    // The scalar kernels, in float32 (a no-op cast for float32 inputs).
    const at::Tensor go32 = grad_out.to(at::kFloat), xm32 = xm.to(at::kFloat), v32 = v.to(at::kFloat),
                     lss32 = has_lss ? lss.to(at::kFloat) : at::Tensor();
    const int64_t n_tiles = ceil_div(chunk, kTile);
    const int64_t n_cm_slices = ceil_div(cm, kCols);
    const int64_t n_dv_slices = std::max<int64_t>(1, ceil_div(cv, kCols));
    const int64_t attention_blocks = n * n_chunks * n_tiles;
    // Grid sizes fit: registration.cpp checked them (check_backward_grid).
    const dim3 dq_grid(static_cast<unsigned>(attention_blocks),
                       static_cast<unsigned>(std::max<int64_t>(1, n_cm_slices)));
    const dim3 keys_grid(static_cast<unsigned>(attention_blocks), static_cast<unsigned>(n_dv_slices + n_cm_slices));
    BackwardArgs<float, int64_t> a{};
    a.grad_out = go32.data_ptr<float>();
    a.delta = delta.data_ptr<float>();
    a.lse = lse.data_ptr<float>();
    a.xm = xm32.data_ptr<float>();
    a.v = v32.data_ptr<float>();
    a.lss = has_lss ? lss32.data_ptr<float>() : nullptr;
    a.perm = perm64.data_ptr<int64_t>();
    a.rounds = rounds;
    a.grad_rounds = grad_rounds;
    a.length = length;
    a.chunk = chunk;
    a.cm = cm;
    a.cv = cv;
    a.n_chunks = n_chunks;
    a.n_tiles = n_tiles;
    a.pad = pad;
    a.padded_length = padded_length;
    a.n_dv_slices = n_dv_slices;
    a.dq_acc = dq_acc.data_ptr<float>();
    a.dv_slot = dv_slot.data_ptr<float>();
    a.dkn_slot = dkn_slot.data_ptr<float>();
    a.dlss_slot = data_or_null(dlss_slot);
    for (int64_t r = 0; r < rounds; ++r) {
      a.round = r;
      attention_bwd_dq_kernel<float, int64_t><<<dq_grid, kThreads, 0, stream>>>(a);
      attention_bwd_keys_kernel<float, int64_t><<<keys_grid, kThreads, 0, stream>>>(a);
      scatter(r);
    }
  }

  const int64_t n_positions = n * length;
  dispatch_float(xm.scalar_type(), [&](auto element) {
    using scalar_t = decltype(element);
    finish_grads_kernel<scalar_t><<<static_cast<unsigned>(ceil_div(n_positions, kFinishWarps)),
                                    kFinishWarps * kWarp, 0, stream>>>(
        kKeyNormEpsF, xm.data_ptr<scalar_t>(), dq_acc.data_ptr<float>(), dkn_acc.data_ptr<float>(),
        dv_acc.data_ptr<float>(), data_or_null(dlss_acc), dxm.data_ptr<scalar_t>(), dv.data_ptr<scalar_t>(),
        has_lss ? dlss.data_ptr<scalar_t>() : nullptr, n_positions, cm, cv, chunk);
  });
  return {dxm, dv, dlss};
}

}  // namespace cuda_impl
}  // namespace dlsn
