// Tensor-core kernels of attention_backward (DESIGN "Backward"), FlashAttention-2 decomposition: P is
// recomputed from the saved lse, every gradient element has one writer, no atomics, fixed summation order.
//
// For round r (grad round r' = r, or 0 for gla_attention), query q at slot i, key j of its 3K keys:
//   P = exp(s - lse[q]),  dS = P (dO[q] . v[j] - delta[q]),  s = xm[q] . xm[j] / max(||xm[j]||, eps) + lss[j, i]
//   dq[q] += dS inv[j] xm[j];  dv[j] += P dO[q];  dkn[j] += dS xm[q];  dlss[j, i] += dS
// Padded query slots (slot >= L) have no output, so P is zero there; padded key slots are ordinary keys.
//
// dq kernel (query-centric): block (n, chunk c, 64-query tile, 64-column slice of Cm); warp w owns queries
//   16w..16w+15 and streams their 3K keys 32 at a time: S = Q K^T and dP = dO V^T on tensor cores, then
//   dq += (dS * inv) K. It adds its slice of dq into dq_acc[n, position] (one slot < L per position and round).
// key kernels (key-centric): block (n, key chunk c', 64-key tile, column slice); warp w owns keys 16w..16w+15
//   and visits the query chunks that read c' (c', c'+1, c'-1: t = 0, 1, 2), 32 query slots at a time.
//   S^T = K Q^T recomputes P^T. Two variants (together they would need more registers than a thread has):
//   - kDvPass: dv += P^T dO for a 256-column slice of Cv;
//   - score pass: dP^T = V dO^T, dS^T, dkn += dS^T Q for a 64-column slice of Cm, and (slice 0) dlss rows,
//     dS summed over t in registers.
//   Both write the slot buffers dv_slot/dkn_slot/dlss_slot [N, Lp, *] of their keys; attention_bwd_steps.cuh
//   scatters them to positions.
// All three stream their steps through run_steps (staging.cuh): 16-bit tiles double-buffered, the index values
// of a step loaded two steps ahead.
// kHasLss = false (NLSA, lss=None): no lss tiles, no lss gathers, and the score pass accumulates and writes no
// dlss (dlss_slot is nullptr); the scores and gradients are the bits of lss = zeros.
// Torch-free: tests/cuda_emulation runs these kernels on the CPU.
#pragma once

#include <cmath>
#include <cstdint>

#include "cuda/block_index.cuh"
#include "cuda/staging.cuh"
#include "cuda/tensor_core.cuh"
#include "slot_layout.h"

namespace dlsn {
namespace cuda_impl {
namespace tc {

constexpr int kBwdWarps = 4;
constexpr int kBwdThreads = 32 * kBwdWarps;
constexpr int kBwdOwn = 16 * kBwdWarps;     // rows a block owns: queries (dq kernel) or keys (key kernels)
constexpr int kBwdStep = 32;                // rows streamed per step: keys (dq kernel) or queries (key kernels)
constexpr int kBwdStepTiles = kBwdStep / 8;
constexpr int kBwdCmCols = 64;              // dq / dkn columns per block
constexpr int kBwdCmTiles = kBwdCmCols / 8;
constexpr int kBwdDvCols = 256;             // dv columns per block
constexpr int kBwdDvTiles = kBwdDvCols / 8;

enum class BwdPass { kDq, kDv, kScore };

template <typename T>
struct BackwardTcArgs {
  const T* grad_out;      // [N, R', L, Cv]
  const float* delta;     // [N, R', L]
  const float* lse;       // [N, R', L]
  const T* xm;            // [N, L, Cm]
  const T* v;             // [N, L, Cv]
  const T* lss;           // [N, L, K]; nullptr without a learned score (kHasLss = false)
  const int64_t* perm;    // [N, R, L]
  const float* inv_norm;  // [N, L]
  int64_t rounds, grad_rounds, round, length, chunk, cm, cv, n_chunks, pad, padded_length;
  int64_t n_own_tiles;    // ceil(K / 64)
  int cm_pad, cv_pad;     // Cm, Cv rounded up to 16
  bool xm_aligned, v_aligned, lss_aligned, grad_aligned;
  float* dq_acc;          // [N, L, Cm]
  float* dv_slot;         // [N, Lp, Cv]
  float* dkn_slot;        // [N, Lp, Cm]
  float* dlss_slot;       // [N, Lp, K]; nullptr without a learned score
};

// Steps in flight, as in the forward: 16-bit tiles double-buffered, float32 single-buffered.
template <typename T>
constexpr int bwd_stages() {
  return sizeof(T) == 2 ? 2 : 1;
}

// Dynamic shared memory of a pass: the block's own rows (xm; plus dO or v), then per stage the streamed rows
// (xm; plus v or dO) and the lss tile [key][query slot] (none without lss). Pads of 16 bytes keep fragment loads
// conflict-free and rows aligned.
struct BackwardTcSmem {
  int ld_cm, ld_own_x, ld_step_x, ld_lss;
  int64_t own, own_x, step, step_x, lss, stage, bytes;  // step, step_x, lss: in stage 0; stage: bytes apart
};

template <typename T>
__host__ __device__ inline BackwardTcSmem tc_backward_smem(BwdPass pass, int cm_pad, int cv_pad, bool has_lss) {
  const int pad = 16 / static_cast<int>(sizeof(T));
  const int dv_width = cv_pad < kBwdDvCols ? cv_pad : kBwdDvCols;
  BackwardTcSmem s{};
  s.ld_cm = cm_pad + pad;
  s.ld_own_x = pass == BwdPass::kDv ? 0 : cv_pad + pad;  // dO (dq kernel) or v (score pass)
  s.ld_step_x = (pass == BwdPass::kDv ? dv_width : cv_pad) + pad;  // v (dq kernel) or dO (key kernels)
  s.ld_lss = (pass == BwdPass::kDq ? kBwdOwn : kBwdStep) + pad;
  const int lss_rows = pass == BwdPass::kDq ? kBwdStep : kBwdOwn;
  s.own = 0;
  s.own_x = s.own + int64_t(kBwdOwn) * s.ld_cm * sizeof(T);
  s.step = s.own_x + int64_t(kBwdOwn) * s.ld_own_x * sizeof(T);
  s.step_x = s.step + int64_t(kBwdStep) * s.ld_cm * sizeof(T);
  s.lss = s.step_x + int64_t(kBwdStep) * s.ld_step_x * sizeof(T);
  s.stage = s.lss + (has_lss ? int64_t(lss_rows) * s.ld_lss * sizeof(T) : 0) - s.step;
  s.bytes = s.step + bwd_stages<T>() * s.stage;
  return s;
}

template <typename T>
__host__ __device__ inline void tc_backward_sizes(BackwardTcArgs<T>& a, int64_t rounds, int64_t grad_rounds,
                                                  int64_t length, int64_t cm, int64_t cv, int64_t chunk) {
  a.rounds = rounds;
  a.grad_rounds = grad_rounds;
  a.length = length;
  a.chunk = chunk;
  a.cm = cm;
  a.cv = cv;
  a.pad = padding_for(length, chunk);
  a.padded_length = length + a.pad;
  a.n_chunks = a.padded_length / chunk;
  a.n_own_tiles = (chunk + kBwdOwn - 1) / kBwdOwn;
  a.cm_pad = static_cast<int>((cm + 15) / 16 * 16);
  a.cv_pad = static_cast<int>((cv + 15) / 16 * 16);
}

// The input pointers, and whether their rows can be staged with cp.async (after tc_backward_sizes); lss nullptr:
// no learned score.
template <typename T>
__host__ __device__ inline void tc_backward_inputs(BackwardTcArgs<T>& a, const T* grad_out, const float* delta,
                                                   const float* lse, const T* xm, const T* v, const T* lss,
                                                   const int64_t* perm, const float* inv_norm) {
  a.grad_out = grad_out;
  a.delta = delta;
  a.lse = lse;
  a.xm = xm;
  a.v = v;
  a.lss = lss;
  a.perm = perm;
  a.inv_norm = inv_norm;
  a.xm_aligned = rows_aligned16(xm, a.cm, sizeof(T));
  a.v_aligned = rows_aligned16(v, a.cv, sizeof(T));
  a.lss_aligned = lss != nullptr && rows_aligned16(lss, a.chunk, sizeof(T));
  a.grad_aligned = rows_aligned16(grad_out, a.cv, sizeof(T));
}

// Column slices (gridDim.y) of each pass.
inline int64_t tc_backward_slices(BwdPass pass, int64_t cm, int64_t cv) {
  if (pass == BwdPass::kDv) return cv <= kBwdDvCols ? 1 : (cv + kBwdDvCols - 1) / kBwdDvCols;
  return cm <= kBwdCmCols ? 1 : (cm + kBwdCmCols - 1) / kBwdCmCols;
}

// The block's batch row n of every input, and of the gradient round it reads, offset once so that the staging
// works with 32-bit positions as row indices.
template <typename T>
struct BackwardBases {
  const T *xm, *v, *lss, *grad_out;
  const float *lse, *delta, *inv_norm;
};

template <typename T>
__device__ __forceinline__ BackwardBases<T> backward_bases(const BackwardTcArgs<T>& a, int64_t n) {
  const int64_t L = a.length, grad_row = (n * a.grad_rounds + (a.grad_rounds == a.rounds ? a.round : 0)) * L;
  return {a.xm + n * L * a.cm, a.v + n * L * a.cv, a.lss != nullptr ? a.lss + n * L * a.chunk : nullptr,
          a.grad_out + grad_row * a.cv, a.lse + grad_row, a.delta + grad_row, a.inv_norm + n * L};
}

template <typename T>
__device__ __forceinline__ RowLayout32 backward_layout(const BackwardTcArgs<T>& a, int64_t n) {
  return {a.perm + (n * a.rounds + a.round) * a.length, static_cast<int>(a.length), static_cast<int>(a.chunk),
          static_cast<int>(a.pad), static_cast<int>(a.n_chunks)};
}

// Query slot i of chunk c: its position (the row of xm and of the gradient round), lse (log2 domain) and
// delta, or -1 and zeros for slots past the chunk and padded slots.
struct QueryMeta {
  int pos;
  float lse2, delta;
};

template <typename T>
__device__ __forceinline__ QueryMeta query_meta(const RowLayout32& layout, const BackwardBases<T>& b, int c, int i) {
  const int slot = c * layout.chunk + i;
  if (i < layout.chunk && slot < layout.length) {
    const int pos = static_cast<int>(layout.perm_row[slot]);
    return {pos, b.lse[pos] * kLog2e, b.delta[pos]};
  }
  return {-1, 0.f, 0.f};
}

template <typename T, bool kHasLss>
__global__ void __launch_bounds__(kBwdThreads) attention_bwd_dq_tc_kernel(const BackwardTcArgs<T> a) {
  constexpr int kStages = bwd_stages<T>();
  DLSN_DYNAMIC_SHARED(smem);
  __shared__ int s_qpos[kBwdOwn], s_krow[kStages][kBwdStep];
  __shared__ float s_lse2[kBwdOwn], s_delta[kBwdOwn], s_inv[kStages][kBwdStep];

  const BackwardTcSmem plan = tc_backward_smem<T>(BwdPass::kDq, a.cm_pad, a.cv_pad, kHasLss);
  T* sq = reinterpret_cast<T*>(smem + plan.own);
  T* sdo = reinterpret_cast<T*>(smem + plan.own_x);

  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  const int g = group_of(lane), t = thread_in_group(lane);
  const BlockWork32 work = decode_block32(blockIdx.x, static_cast<unsigned>(a.n_own_tiles),
                                          static_cast<unsigned>(a.n_chunks), 1u);
  const int qt = work.tile, c = work.chunk;
  const int64_t n = work.n;
  const int K = static_cast<int>(a.chunk), cm = static_cast<int>(a.cm), cv = static_cast<int>(a.cv);
  const RowLayout32 layout = backward_layout(a, n);
  const BackwardBases<T> base = backward_bases(a, n);
  const int q0 = qt * kBwdOwn;
  const int cm0 = static_cast<int>(blockIdx.y) * kBwdCmCols;
  const int cols = cm - cm0 < kBwdCmCols ? cm - cm0 : kBwdCmCols;
  const int n_col_tiles = (cols + 7) / 8;

  if (tid < kBwdOwn) {
    const QueryMeta q = query_meta(layout, base, c, q0 + tid);
    s_qpos[tid] = q.pos;
    s_lse2[tid] = q.lse2;
    s_delta[tid] = q.delta;
  }
  __syncthreads();
  // Their copies join the first step's group.
  stage_rows<T, kBwdThreads>(sq, plan.ld_cm, base.xm, s_qpos, kBwdOwn, cm, cm, a.cm_pad, a.xm_aligned, tid);
  stage_rows<T, kBwdThreads>(sdo, plan.ld_own_x, base.grad_out, s_qpos, kBwdOwn, cv, cv, a.cv_pad, a.grad_aligned,
                             tid);

  Acc dq[kBwdCmTiles];
  zero_tiles(dq);
  const int row0 = warp * 16 + g;  // the lane's queries: row0 (h = 0) and row0 + 8 (h = 1)
  const float lse2[2] = {s_lse2[row0], s_lse2[row0 + 8]};
  const float delta[2] = {s_delta[row0], s_delta[row0 + 8]};

  const auto fetch = [&](int step) {  // key j = tid of the step (threads tid < kBwdStep)
    return tid < kBwdStep ? key_meta(layout, base.inv_norm, c, step * kBwdStep + tid) : KeyMeta{-1, 0.f};
  };
  const T* lss_q = kHasLss ? base.lss + q0 : nullptr;
  const auto publish = [&](int buf, const KeyMeta& k) {
    if (tid < kBwdStep) {
      s_krow[buf][tid] = k.pos;
      s_inv[buf][tid] = k.inv;
    }
    __syncthreads();
    unsigned char* stage = smem + buf * plan.stage;
    stage_rows<T, kBwdThreads>(reinterpret_cast<T*>(stage + plan.step), plan.ld_cm, base.xm, s_krow[buf], kBwdStep,
                               cm, cm, a.cm_pad, a.xm_aligned, tid);
    stage_rows<T, kBwdThreads>(reinterpret_cast<T*>(stage + plan.step_x), plan.ld_step_x, base.v, s_krow[buf],
                               kBwdStep, cv, cv, a.cv_pad, a.v_aligned, tid);
    if (kHasLss) {
      stage_rows<T, kBwdThreads>(reinterpret_cast<T*>(stage + plan.lss), plan.ld_lss, lss_q, s_krow[buf], kBwdStep,
                                 K, K - q0, kBwdOwn, a.lss_aligned, tid);
    }
    stage_commit();
  };
  run_steps<kStages>((3 * K + kBwdStep - 1) / kBwdStep, fetch, publish, [&](int, int buf) {
    const int* krow = s_krow[buf];
    const float* kinv = s_inv[buf];
    const unsigned char* stage = smem + buf * plan.stage;
    const T* sk = reinterpret_cast<const T*>(stage + plan.step);
    const T* sv = reinterpret_cast<const T*>(stage + plan.step_x);
    const T* slss = reinterpret_cast<const T*>(stage + plan.lss);

    Acc s[kBwdStepTiles], dp[kBwdStepTiles];
    zero_tiles(s);
    zero_tiles(dp);
    gemm_rows_by_cols<T>(s, sq + warp * 16 * plan.ld_cm, plan.ld_cm, sk, plan.ld_cm, a.cm_pad, lane);
    gemm_rows_by_cols<T>(dp, sdo + warp * 16 * plan.ld_own_x, plan.ld_own_x, sv, plan.ld_step_x, a.cv_pad, lane);

    // w = dS * inv[j]; P is zero for keys past 3K (and the rows of invalid queries are not stored).
#pragma unroll
    for (int nt = 0; nt < kBwdStepTiles; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int key = nt * 8 + 2 * t + (e & 1), h = e >> 1, row = row0 + 8 * h;
        const float score = kHasLss ? s[nt][e] * kinv[key] + static_cast<float>(slss[key * plan.ld_lss + row])
                                    : s[nt][e] * kinv[key];
        const float p = krow[key] >= 0 ? exp2f(score * kLog2e - lse2[h]) : 0.f;
        s[nt][e] = p * (dp[nt][e] - delta[h]) * kinv[key];
      }
    }
    gemm_acc_by_rows<T>(dq, s, sk + cm0, plan.ld_cm, n_col_tiles, lane);
  });

#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int row = row0 + 8 * h;
    if (s_qpos[row] < 0) continue;
    float* dq_row = a.dq_acc + (n * a.length + s_qpos[row]) * a.cm + cm0;
#pragma unroll
    for (int ct = 0; ct < kBwdCmTiles; ++ct) {
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int col = ct * 8 + 2 * t + e;
        if (col < cols) dq_row[col] += dq[ct][2 * h + e];
      }
    }
  }
}

template <typename T, bool kDvPass, bool kHasLss>
__global__ void __launch_bounds__(kBwdThreads) attention_bwd_keys_tc_kernel(const BackwardTcArgs<T> a) {
  constexpr int kStages = bwd_stages<T>();
  DLSN_DYNAMIC_SHARED(smem);
  __shared__ int s_krow[kBwdOwn], s_kslot[kBwdOwn], s_qpos[kStages][kBwdStep];
  __shared__ float s_inv[kBwdOwn], s_lse2[kStages][kBwdStep], s_delta[kStages][kBwdStep];

  constexpr BwdPass kPass = kDvPass ? BwdPass::kDv : BwdPass::kScore;
  constexpr int kTiles = kDvPass ? kBwdDvTiles : kBwdCmTiles;
  constexpr int kCols = kDvPass ? kBwdDvCols : kBwdCmCols;
  const BackwardTcSmem plan = tc_backward_smem<T>(kPass, a.cm_pad, a.cv_pad, kHasLss);
  T* sk = reinterpret_cast<T*>(smem + plan.own);
  T* sv = reinterpret_cast<T*>(smem + plan.own_x);  // score pass only

  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  const int g = group_of(lane), t = thread_in_group(lane);
  const BlockWork32 work = decode_block32(blockIdx.x, static_cast<unsigned>(a.n_own_tiles),
                                          static_cast<unsigned>(a.n_chunks), 1u);
  const int kt = work.tile, ck = work.chunk;
  const int64_t n = work.n;
  const int K = static_cast<int>(a.chunk), cm = static_cast<int>(a.cm), cv = static_cast<int>(a.cv);
  const int64_t Lp = a.padded_length;
  const RowLayout32 layout = backward_layout(a, n);
  const BackwardBases<T> base = backward_bases(a, n);
  const int col0 = static_cast<int>(blockIdx.y) * kCols;
  const int width = kDvPass ? cv : cm;
  const int cols = width - col0 < kCols ? width - col0 : kCols;
  const int n_col_tiles = (cols + 7) / 8;
  const int dv_width = (n_col_tiles + 1) / 2 * 16;  // dO columns staged by the dv pass: whole tile pairs

  if (tid < kBwdOwn) {
    const int j = kt * kBwdOwn + tid;
    const int slot = j < K ? ck * K + j : -1;
    const int pos = slot >= 0 ? layout.position(slot) : -1;
    s_kslot[tid] = slot;
    s_krow[tid] = pos;
    s_inv[tid] = pos >= 0 ? base.inv_norm[pos] : 0.f;
  }
  __syncthreads();
  // Their copies join the first step's group.
  stage_rows<T, kBwdThreads>(sk, plan.ld_cm, base.xm, s_krow, kBwdOwn, cm, cm, a.cm_pad, a.xm_aligned, tid);
  if (!kDvPass) {
    stage_rows<T, kBwdThreads>(sv, plan.ld_own_x, base.v, s_krow, kBwdOwn, cv, cv, a.cv_pad, a.v_aligned, tid);
  }

  Acc acc[kTiles];
  zero_tiles(acc);
  const int key0 = warp * 16 + g;  // the lane's keys: key0 (h = 0) and key0 + 8 (h = 1)
  const float inv[2] = {s_inv[key0], s_inv[key0 + 8]};
  const bool key_valid[2] = {s_krow[key0] >= 0, s_krow[key0 + 8] >= 0};
  Acc dl[kBwdStepTiles];  // score pass with lss: dlss of (key, query slot i0 + column), summed over t

  // Steps: query slots i0 = 32 qs .. 32 qs + 31 (qs outer) of the query chunks c', c'+1, c'-1 (t inner).
  const auto fetch = [&](int step) {  // query i0 + tid of the step (threads tid < kBwdStep)
    QueryMeta q{-1, 0.f, 0.f};
    if (tid < kBwdStep) q = query_meta(layout, base, layout.query_chunk(ck, step % 3), (step / 3) * kBwdStep + tid);
    return q;
  };
  const T* go_cols = kDvPass ? base.grad_out + col0 : base.grad_out;
  int publish_step = 0;  // publish is called once per step, in order
  const auto publish = [&](int buf, const QueryMeta& q) {
    if (tid < kBwdStep) {
      s_qpos[buf][tid] = q.pos;
      s_lse2[buf][tid] = q.lse2;
      s_delta[buf][tid] = q.delta;
    }
    __syncthreads();
    const int i0 = (publish_step++ / 3) * kBwdStep;
    unsigned char* stage = smem + buf * plan.stage;
    // lss[key, i0..i0+31] is the same for the three query chunks; staged with each, like the rest
    if (kHasLss) {
      stage_rows<T, kBwdThreads>(reinterpret_cast<T*>(stage + plan.lss), plan.ld_lss, base.lss + i0, s_krow, kBwdOwn,
                                 K, K - i0, kBwdStep, a.lss_aligned, tid);
    }
    stage_rows<T, kBwdThreads>(reinterpret_cast<T*>(stage + plan.step), plan.ld_cm, base.xm, s_qpos[buf], kBwdStep,
                               cm, cm, a.cm_pad, a.xm_aligned, tid);
    T* sdo = reinterpret_cast<T*>(stage + plan.step_x);
    stage_rows<T, kBwdThreads>(sdo, plan.ld_step_x, go_cols, s_qpos[buf], kBwdStep, cv, kDvPass ? cols : cv,
                               kDvPass ? dv_width : a.cv_pad, a.grad_aligned, tid);
    stage_commit();
  };
  run_steps<kStages>((K + kBwdStep - 1) / kBwdStep * 3, fetch, publish, [&](int step, int buf) {
    const int i0 = (step / 3) * kBwdStep;
    const int tq = step % 3;
    const int* qpos = s_qpos[buf];
    const float* lse2 = s_lse2[buf];
    const unsigned char* stage = smem + buf * plan.stage;
    const T* sq = reinterpret_cast<const T*>(stage + plan.step);
    const T* sdo = reinterpret_cast<const T*>(stage + plan.step_x);
    const T* slss = reinterpret_cast<const T*>(stage + plan.lss);
    if (!kDvPass && kHasLss && tq == 0) zero_tiles(dl);

    // P^T: rows = the warp's keys, columns = the step's queries.
    Acc s[kBwdStepTiles];
    zero_tiles(s);
    gemm_rows_by_cols<T>(s, sk + warp * 16 * plan.ld_cm, plan.ld_cm, sq, plan.ld_cm, a.cm_pad, lane);
#pragma unroll
    for (int nt = 0; nt < kBwdStepTiles; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int q = nt * 8 + 2 * t + (e & 1), h = e >> 1;
        const float score = kHasLss ? s[nt][e] * inv[h] + static_cast<float>(slss[(key0 + 8 * h) * plan.ld_lss + q])
                                    : s[nt][e] * inv[h];
        s[nt][e] = key_valid[h] && qpos[q] >= 0 ? exp2f(score * kLog2e - lse2[q]) : 0.f;
      }
    }

    if (kDvPass) {
      gemm_acc_by_rows<T>(acc, s, sdo, plan.ld_step_x, n_col_tiles, lane);
      return;
    }
    Acc dp[kBwdStepTiles];
    zero_tiles(dp);
    gemm_rows_by_cols<T>(dp, sv + warp * 16 * plan.ld_own_x, plan.ld_own_x, sdo, plan.ld_step_x, a.cv_pad, lane);
#pragma unroll
    for (int nt = 0; nt < kBwdStepTiles; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int q = nt * 8 + 2 * t + (e & 1);
        s[nt][e] *= dp[nt][e] - s_delta[buf][q];  // dS^T
        if (kHasLss) dl[nt][e] += s[nt][e];
      }
    }
    gemm_acc_by_rows<T>(acc, s, sq + col0, plan.ld_cm, n_col_tiles, lane);
    if (kHasLss && tq == 2 && blockIdx.y == 0) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int kslot = s_kslot[key0 + 8 * h];
        if (kslot < 0) continue;
        float* row = a.dlss_slot + (n * Lp + kslot) * K + i0;
#pragma unroll
        for (int nt = 0; nt < kBwdStepTiles; ++nt) {
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            const int q = nt * 8 + 2 * t + e;
            if (i0 + q < K) row[q] = dl[nt][2 * h + e];
          }
        }
      }
    }
  });

  float* slot_grad = kDvPass ? a.dv_slot : a.dkn_slot;
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int kslot = s_kslot[key0 + 8 * h];
    if (kslot < 0) continue;
    float* row = slot_grad + (n * Lp + kslot) * width + col0;
#pragma unroll
    for (int ct = 0; ct < kTiles; ++ct) {
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int col = ct * 8 + 2 * t + e;
        if (col < cols) row[col] = acc[ct][2 * h + e];
      }
    }
  }
}

}  // namespace tc
}  // namespace cuda_impl
}  // namespace dlsn
