// Tensor-core forward of the chunked attention (DESIGN "Forward"): bfloat16/float16 on m16n8k16 and float32 as
// TF32 m16n8k8, float32 accumulation and softmax, FlashAttention-2 structure.
//
// Block (4 warps) = (n, round, query chunk c, query tile qt, column slice): the 64 sorted slots
// c*K + qt*64 + 0..63 against the 3K keys of chunks c, c - 1, c + 1 (slot_layout.h), 32 keys per step, for
// value columns [slice*256, slice*256 + 256). Warp w owns query rows 16w..16w+15: their scores, running
// max and sum, and their output accumulator stay in its registers (FragA/Acc layouts of tensor_core.cuh).
// Per key tile: the key rows of xm, the value rows and the lss rows [key, this tile's query slots] are
// gathered through perm into shared memory (staging.cuh, run_steps: the next tile's gathers overlap this
// tile's products), S = Q K^T runs once on tensor cores, the scores
// get the inverse key norms (computed once per call by key_norms_kernel) and lss, the online softmax
// updates in registers, and P (rounded to the input type, as FlashAttention does) multiplies V.
// Rows past the chunk and padded slots are computed on zeros and not stored.
// kHasLss = false (NLSA, lss=None): no lss tile in shared memory, no lss gathers, scores q . k_hat; the same
// bits as lss = zeros (adding +0.0 is exact).
// Magnitudes: beyond ~1e18 query rows are scaled by 2^-a once staged and their scores by 2^a (key_norms.cuh:
// query_shift), so that xm * 1e30 gives the exact one-hot softmax instead of overflowing q . key.
//
// Writes as the scalar kernel does: chunk_attention stores out/lse at the query's position; gla_attention
// (merge) folds round r into a float32 running (y, lse), reading lse_prev and writing lse_next.
// Limits: sm_80 or newer; the launcher checks the shared memory (tc_forward_smem) against the device's.
// Torch-free: tests/cuda_emulation runs this kernel on the CPU through a SIMT emulator.
#pragma once

#include <cmath>
#include <cstdint>
#include <type_traits>

#include "cuda/block_index.cuh"
#include "cuda/key_norms.cuh"
#include "cuda/staging.cuh"
#include "cuda/tensor_core.cuh"
#include "slot_layout.h"

namespace dlsn {
namespace cuda_impl {
namespace tc {

constexpr int kFwdWarps = 4;
constexpr int kFwdThreads = 32 * kFwdWarps;
constexpr int kFwdRows = 16 * kFwdWarps;      // query rows per block
constexpr int kFwdKeys = 32;                  // keys per step
constexpr int kFwdCols = 256;                 // value columns per block
constexpr int kFwdKeyTiles = kFwdKeys / 8;    // n8 tiles of a score row
constexpr int kFwdColTiles = kFwdCols / 8;    // n8 tiles of an output row
constexpr int kFwdOutLd = kFwdCols + 4;       // float32 output tile [rows][kFwdOutLd] staged at the end

// Key steps in flight: 16-bit tiles are double-buffered (the gathers of step k + 1 run during the products of
// step k); float32 tiles are twice as large, and two copies would leave room for one block per SM.
template <typename T>
constexpr int fwd_stages() {
  return sizeof(T) == 2 ? 2 : 1;
}

template <typename T>
struct ForwardTcArgs {
  const T* xm;           // [N, L, Cm]
  const T* v;            // [N, L, Cv]
  const T* lss;          // [N, L, K]; nullptr without a learned score (kernel template kHasLss = false)
  const int64_t* perm;   // [N, R, L]
  const float* inv_norm; // [N, L]: 1 / max(||xm||, eps)
  const int* row_exp;    // [N, L]: exponent of the row's largest magnitude (key_norms.cuh)
  const int* top_exp;    // [1]: the largest of them (at least 0)
  int64_t rounds, length, chunk, cm, cv, n_chunks, n_qtiles, pad;
  int64_t round_offset, rounds_in_launch;  // rounds of this launch: round_offset + 0..rounds_in_launch-1
  int cm_pad;                              // cm rounded up to the mma depth
  bool xm_aligned, v_aligned, lss_aligned; // rows_aligned16 of each tensor
  bool merge;                              // gla_attention: fold into (y_acc, lse_next)
  T* out;                 // [N, R, L, Cv]
  float* lse;             // [N, R, L]
  float* y_acc;           // [N, L, Cv]
  const float* lse_prev;  // [N, L]; nullptr for round 0
  float* lse_next;        // [N, L]
};

// Dynamic shared memory: the Q tile [rows][cm_pad + 8], and per stage a K tile [keys][cm_pad + 8], a V tile
// [keys][256 + 16 bytes] and an lss tile [keys][64 + 16 bytes] (none without lss). The pads make every fragment
// load and ldmatrix conflict-free and keep rows 16-byte aligned for cp.async. At the end the same memory holds
// the float32 output tile [rows][kFwdOutLd] (bytes covers both).
struct ForwardTcSmem {
  int ld_qk, ld_v, ld_lss;
  int64_t q, k, v, lss, stage, bytes;  // k, v, lss: offsets in stage 0; stage: bytes between stages
};

template <typename T>
__host__ __device__ inline ForwardTcSmem tc_forward_smem(int cm_pad, bool has_lss) {
  ForwardTcSmem s{};
  s.ld_qk = cm_pad + 8;
  s.ld_v = kFwdCols + 16 / static_cast<int>(sizeof(T));
  s.ld_lss = kFwdRows + 16 / static_cast<int>(sizeof(T));
  s.q = 0;
  s.k = s.q + int64_t(kFwdRows) * s.ld_qk * sizeof(T);
  s.v = s.k + int64_t(kFwdKeys) * s.ld_qk * sizeof(T);
  s.lss = s.v + int64_t(kFwdKeys) * s.ld_v * sizeof(T);
  s.stage = s.lss + (has_lss ? int64_t(kFwdKeys) * s.ld_lss * sizeof(T) : 0) - s.k;
  s.bytes = s.k + fwd_stages<T>() * s.stage;
  const int64_t out_bytes = int64_t(kFwdRows) * kFwdOutLd * sizeof(float);  // the epilogue's, over the tiles
  if (s.bytes < out_bytes) s.bytes = out_bytes;
  return s;
}

// The sizes of a launch (everything but pointers, flags and the round range). Grid: blocks_x =
// N * rounds_in_launch * n_chunks * n_qtiles, gridDim.y = ceil(Cv / 256) column slices.
template <typename T>
__host__ __device__ inline void tc_forward_sizes(ForwardTcArgs<T>& a, int64_t n_rounds, int64_t length, int64_t cm,
                                                 int64_t cv, int64_t chunk) {
  a.rounds = n_rounds;
  a.length = length;
  a.chunk = chunk;
  a.cm = cm;
  a.cv = cv;
  a.pad = padding_for(length, chunk);
  a.n_chunks = (length + a.pad) / chunk;
  a.n_qtiles = (chunk + kFwdRows - 1) / kFwdRows;
  a.cm_pad = static_cast<int>((cm + Kind<T>::kDepth - 1) / Kind<T>::kDepth * Kind<T>::kDepth);
}

// The input pointers, and whether their rows can be staged with cp.async (after tc_forward_sizes); lss nullptr:
// no learned score (launch the kHasLss = false kernel).
template <typename T>
__host__ __device__ inline void tc_forward_inputs(ForwardTcArgs<T>& a, const T* xm, const T* v, const T* lss,
                                                  const int64_t* perm, const float* inv_norm, const int* row_exp,
                                                  const int* top_exp) {
  a.xm = xm;
  a.v = v;
  a.lss = lss;
  a.perm = perm;
  a.inv_norm = inv_norm;
  a.row_exp = row_exp;
  a.top_exp = top_exp;
  a.xm_aligned = rows_aligned16(xm, a.cm, sizeof(T));
  a.v_aligned = rows_aligned16(v, a.cv, sizeof(T));
  a.lss_aligned = lss != nullptr && rows_aligned16(lss, a.chunk, sizeof(T));
}

inline int64_t tc_forward_slices(int64_t cv) { return cv <= kFwdCols ? 1 : (cv + kFwdCols - 1) / kFwdCols; }

template <typename T, bool kHasLss>
__global__ void __launch_bounds__(kFwdThreads) chunk_attention_fwd_tc_kernel(const ForwardTcArgs<T> a) {
  DLSN_DYNAMIC_SHARED(smem);
  __shared__ int s_qrow[kFwdRows];    // position of query row q; -1 past the chunk
  __shared__ int s_qstore[kFwdRows];  // position where row q is written; -1 for padding / past the chunk
  __shared__ int s_qexp[kFwdRows];    // the exponent it is scaled down by (query_shift; 0 past the chunk)
  // float16 rows never overflow the products (key_norms.cuh): no scaling code at all
  constexpr bool kScaleQueries = !std::is_same<T, c10::Half>::value;
  constexpr int kStages = fwd_stages<T>();
  __shared__ int s_krow[kStages][kFwdKeys];   // position of key j of a step; -1 past 3K
  __shared__ float s_inv[kStages][kFwdKeys];  // its inverse norm

  const ForwardTcSmem plan = tc_forward_smem<T>(a.cm_pad, kHasLss);
  T* sq = reinterpret_cast<T*>(smem + plan.q);

  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  const int g = group_of(lane), t = thread_in_group(lane);
  const BlockWork32 work = decode_block32(blockIdx.x, static_cast<unsigned>(a.n_qtiles),
                                          static_cast<unsigned>(a.n_chunks), static_cast<unsigned>(a.rounds_in_launch));
  const int qt = work.tile, c = work.chunk;
  const int64_t r = a.round_offset + work.round, n = work.n;
  const int L = static_cast<int>(a.length), K = static_cast<int>(a.chunk), cm = static_cast<int>(a.cm);
  const int cv = static_cast<int>(a.cv);
  const RowLayout32 layout{a.perm + (n * a.rounds + r) * L, L, K, static_cast<int>(a.pad),
                           static_cast<int>(a.n_chunks)};
  const int q0 = qt * kFwdRows;  // slot index in the chunk of query row 0
  const int col0 = static_cast<int>(blockIdx.y) * kFwdCols;
  const int cols = cv - col0 < kFwdCols ? cv - col0 : kFwdCols;  // valid columns of the slice
  const int n_col_tiles = (cols + 7) / 8;
  const int v_width = (n_col_tiles + 1) / 2 * 16;  // staged columns: whole pairs of n8 tiles (ldmatrix x4)
  // The block's batch row of each input, offset once here so that the staging works in 32-bit rows.
  const T* xm_n = a.xm + n * L * cm;
  const T* v_n = a.v + n * L * cv + col0;
  const T* lss_n = kHasLss ? a.lss + n * L * K + q0 : nullptr;
  const float* inv_n = a.inv_norm + n * L;

  int qexp = 0;
  if (tid < kFwdRows) {
    const int i = q0 + tid, slot = c * K + i;
    const int pos = i < K ? layout.position(slot) : -1;
    s_qrow[tid] = pos;
    s_qstore[tid] = i < K && slot < L ? pos : -1;
    if (kScaleQueries && pos >= 0) qexp = query_shift(a.row_exp[n * L + pos], *a.top_exp, cm);
    s_qexp[tid] = qexp;
  }
  // Whether any query row of the block needs scaling (block-uniform; only for inputs beyond ~1e18).
  bool scale_queries = false;
  if (kScaleQueries) {
    scale_queries = __syncthreads_or(qexp != 0) != 0;
  } else {
    __syncthreads();
  }
  stage_rows<T, kFwdThreads>(sq, plan.ld_qk, xm_n, s_qrow, kFwdRows, cm, cm, a.cm_pad, a.xm_aligned, tid);
  if (scale_queries) {
    // The Q tile must be in place first (otherwise its copies join the first step's group). Warp w scales its
    // own rows 16w..16w+15, which only it reads; publish()'s barrier orders this before any product.
    stage_commit();
    stage_wait_groups<0>();
    __syncthreads();
    for (int row = warp * 16; row < warp * 16 + 16; ++row) {
      const int x = s_qexp[row];
      if (x == 0) continue;
      const float down = pow2f(-x);
      T* q = sq + row * plan.ld_qk;
      for (int col = lane; col < a.cm_pad; col += 32) q[col] = static_cast<T>(static_cast<float>(q[col]) * down);
    }
  }

  Acc o[kFwdColTiles];
  zero_tiles(o);
  float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.f, 0.f};  // rows g and g + 8 of the warp, log2 domain
  // 2^a of rows g and g + 8: the scores' scale back (1 for unscaled rows)
  const float up[2] = {kScaleQueries ? pow2f(s_qexp[warp * 16 + g]) : 1.f,
                       kScaleQueries ? pow2f(s_qexp[warp * 16 + g + 8]) : 1.f};

  const T* qw = sq + warp * 16 * plan.ld_qk;
  const int n_steps = (3 * K + kFwdKeys - 1) / kFwdKeys;
  const auto fetch = [&](int step) {  // key j = tid of the step (threads tid < kFwdKeys)
    return tid < kFwdKeys ? key_meta(layout, inv_n, c, step * kFwdKeys + tid) : KeyMeta{-1, 0.f};
  };
  const auto publish = [&](int buf, const KeyMeta& k) {
    if (tid < kFwdKeys) {
      s_krow[buf][tid] = k.pos;
      s_inv[buf][tid] = k.inv;
    }
    __syncthreads();
    unsigned char* stage = smem + buf * plan.stage;
    stage_rows<T, kFwdThreads>(reinterpret_cast<T*>(stage + plan.k), plan.ld_qk, xm_n, s_krow[buf], kFwdKeys, cm, cm,
                               a.cm_pad, a.xm_aligned, tid);
    stage_rows<T, kFwdThreads>(reinterpret_cast<T*>(stage + plan.v), plan.ld_v, v_n, s_krow[buf], kFwdKeys, cv, cols,
                               v_width, a.v_aligned, tid);
    if (kHasLss) {
      stage_rows<T, kFwdThreads>(reinterpret_cast<T*>(stage + plan.lss), plan.ld_lss, lss_n, s_krow[buf], kFwdKeys,
                                 K, K - q0, kFwdRows, a.lss_aligned, tid);
    }
    stage_commit();
  };
  // The Q tile's copies join the first step's group.
  run_steps<kStages>(n_steps, fetch, publish, [&](int, int buf) {
    const int* krow = s_krow[buf];
    const float* kinv = s_inv[buf];
    const unsigned char* stage = smem + buf * plan.stage;
    const T* sk = reinterpret_cast<const T*>(stage + plan.k);
    const T* sv = reinterpret_cast<const T*>(stage + plan.v);
    const T* slss = reinterpret_cast<const T*>(stage + plan.lss);  // kHasLss only

    // S = Q K^T for the warp's 16 rows and the step's keys.
    Acc s[kFwdKeyTiles];
    zero_tiles(s);
    gemm_rows_by_cols<T>(s, qw, plan.ld_qk, sk, plan.ld_qk, a.cm_pad, lane);

    // Scores in the log2 domain, then the online softmax of rows g (h = 0) and g + 8 (h = 1).
    float mx[2] = {-INFINITY, -INFINITY};
#pragma unroll
    for (int nt = 0; nt < kFwdKeyTiles; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int key = nt * 8 + 2 * t + (e & 1), row = warp * 16 + g + 8 * (e >> 1);
        // kinv * up is exact (up a power of two, the product below 2^127 within the ops' magnitude limit), so an
        // unscaled row rounds as s * kinv + lss did; without lss, the bits of adding lss = +0.0
        const float scale = kinv[key] * up[e >> 1];
        const float score = kHasLss ? s[nt][e] * scale + static_cast<float>(slss[key * plan.ld_lss + row])
                                    : s[nt][e] * scale;
        s[nt][e] = krow[key] >= 0 ? score * kLog2e : -INFINITY;
        mx[e >> 1] = fmaxf(mx[e >> 1], s[nt][e]);
      }
    }
    float rescale[2];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      mx[h] = fmaxf(mx[h], __shfl_xor_sync(0xffffffffu, mx[h], 1));
      mx[h] = fmaxf(mx[h], __shfl_xor_sync(0xffffffffu, mx[h], 2));
      const float m_new = fmaxf(m[h], mx[h]);  // finite: key k0 of every step is a real key
      rescale[h] = exp2f(m[h] - m_new);        // 0 on the first step
      m[h] = m_new;
      l[h] *= rescale[h];
    }
#pragma unroll
    for (int nt = 0; nt < kFwdKeyTiles; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        s[nt][e] = exp2f(s[nt][e] - m[e >> 1]);
        l[e >> 1] += s[nt][e];
      }
    }
#pragma unroll
    for (int vt = 0; vt < kFwdColTiles; ++vt) {
      o[vt][0] *= rescale[0];
      o[vt][1] *= rescale[0];
      o[vt][2] *= rescale[1];
      o[vt][3] *= rescale[1];
    }

    gemm_acc_by_rows<T>(o, s, sv, plan.ld_v, n_col_tiles, lane);  // O += P V, P from the score registers
  });

  // Per row: 1 / l, the round's lse, and with merge the weights of the running and the new output.
  __shared__ float s_inv_l[kFwdRows], s_w_old[kFwdRows], s_w_new[kFwdRows];
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    l[h] += __shfl_xor_sync(0xffffffffu, l[h], 1);
    l[h] += __shfl_xor_sync(0xffffffffu, l[h], 2);
    const int row = warp * 16 + g + 8 * h, pos = s_qstore[row];
    if (t != 0 || pos < 0) continue;
    const float lse_r = (m[h] + log2f(l[h])) * kLn2;
    float w_old = 0.f, w_new = 1.f, lse_merged = lse_r;
    if (a.merge && a.lse_prev != nullptr) {
      const float lse_old = a.lse_prev[n * L + pos];
      const float hi = fmaxf(lse_old, lse_r);
      lse_merged = hi + logf(expf(lse_old - hi) + expf(lse_r - hi));
      w_old = expf(lse_old - lse_merged);
      w_new = expf(lse_r - lse_merged);
    }
    s_inv_l[row] = 1.f / l[h];
    s_w_old[row] = w_old;
    s_w_new[row] = w_new;
    if (blockIdx.y == 0) {
      if (a.merge) {
        a.lse_next[n * L + pos] = lse_merged;
      } else {
        a.lse[(n * a.rounds + r) * L + pos] = lse_r;
      }
    }
  }

  // The accumulators go through shared memory (the tiles are free once every warp is done), so that the
  // stores are coalesced rows and the code that writes them is one loop, not 128 unrolled guarded stores.
  __syncthreads();
  float* so = reinterpret_cast<float*>(smem);
#pragma unroll
  for (int vt = 0; vt < kFwdColTiles; ++vt) {
#pragma unroll
    for (int e = 0; e < 4; ++e) so[(warp * 16 + g + 8 * (e >> 1)) * kFwdOutLd + vt * 8 + 2 * t + (e & 1)] = o[vt][e];
  }
  __syncwarp();
  for (int i = 0; i < 16; ++i) {
    const int row = warp * 16 + i, pos = s_qstore[row];
    if (pos < 0) continue;
    const float* src = so + row * kFwdOutLd;
    const float inv_l = s_inv_l[row];
    if (!a.merge) {
      T* out_row = a.out + ((n * a.rounds + r) * L + pos) * cv + col0;
      for (int col = lane; col < cols; col += 32) out_row[col] = static_cast<T>(src[col] * inv_l);
    } else {
      float* y_row = a.y_acc + (n * L + pos) * cv + col0;
      const float w_old = s_w_old[row], w_new = s_w_new[row];
      for (int col = lane; col < cols; col += 32) {
        const float out_r = src[col] * inv_l;
        y_row[col] = a.lse_prev != nullptr ? y_row[col] * w_old + out_r * w_new : out_r;
      }
    }
  }
}

}  // namespace tc
}  // namespace cuda_impl
}  // namespace dlsn
