// The scalar forward of the chunked attention (IEEE float32 FFMA): chunk_attention_fwd.cu launches it for
// float32 under the "highest" precision policy and for what the tensor-core kernel cannot take; the ownership of
// threads and rows is described there. Torch-free: tests/cuda_emulation runs it on the CPU.
//
// Magnitudes: the key norms come from key_norms_kernel (overflow-safe), and beyond ~1e18 query rows are staged
// scaled by 2^-a and their scores scaled back by 2^a (key_norms.cuh: query_shift), so q . key cannot overflow
// float32 where the score q . k_hat does not (xm * 1e30).
// lss nullptr: no learned score (NLSA); the scores are q . k_hat, the bits of lss = zeros.
#pragma once

#include <cmath>
#include <cstdint>

#include "cuda/block_index.cuh"
#include "cuda/key_norms.cuh"
#include "cuda/simt_tile.cuh"
#include "slot_layout.h"

namespace dlsn {
namespace cuda_impl {

template <typename T, typename idx_t>
struct ForwardArgs {
  const T* xm;      // [N, L, Cm]
  const T* v;       // [N, L, Cv]
  const T* lss;     // [N, L, K]; nullptr: no learned score
  const idx_t* perm;  // [N, R, L]
  const float* inv_norm;  // [N, L]: 1 / max(||xm||, eps) (key_norms_kernel)
  const int* row_exp;     // [N, L]: exponent of the row's largest magnitude (key_norms.cuh)
  const int* top_exp;     // [1]: the largest of them (at least 0)
  int64_t rounds, length, chunk, cm, cv, n_chunks, n_qtiles, pad;
  int64_t round_offset, rounds_in_launch;  // rounds handled by this launch: round_offset + 0..rounds_in_launch-1
  // chunk_attention (kMerge = false)
  T* out;      // [N, R, L, Cv]
  float* lse;  // [N, R, L]
  // gla_attention (kMerge = true, one round per launch)
  float* y_acc;           // [N, L, Cv] running output
  const float* lse_prev;  // [N, L] running lse before this round; nullptr for round 0
  float* lse_next;        // [N, L] running lse after this round
};

template <typename T, typename idx_t, bool kMerge>
__global__ void __launch_bounds__(kThreads) chunk_attention_fwd_kernel(const ForwardArgs<T, idx_t> a) {
  __shared__ float s_a[kTile][kChanTile + 1];
  __shared__ float s_b[kTile][kChanTile + 1];
  __shared__ float s_v[kTile][kCols];
  __shared__ int64_t s_qrow[kTile];    // xm row n*L + position of query row q; -1 past the chunk
  __shared__ int64_t s_qstore[kTile];  // position where row q is written; -1 for padding / past the chunk
  __shared__ int s_qslot[kTile];       // slot index i of row q within its chunk; -1 past the chunk
  __shared__ int64_t s_krow[kTile];    // xm/v/lss row n*L + position of key j of the current tile; -1 past 3K
  __shared__ float s_kinv[kTile];      // its inverse norm
  __shared__ float s_qdown[kTile], s_qup[kTile];  // 2^-a and 2^a of query row q (query_shift; 1 past the chunk)

  const int tid = threadIdx.x, lane = tid % kWarp, warp = tid / kWarp;
  const BlockWork work = decode_block(blockIdx.x, a.n_qtiles, a.n_chunks, a.rounds_in_launch);
  const int64_t qt = work.tile, c = work.chunk, r = a.round_offset + work.round, n = work.n;
  const int64_t L = a.length, K = a.chunk;
  const idx_t* perm_row = a.perm + (n * a.rounds + r) * L;
  const int64_t col0 = int64_t(blockIdx.y) * kCols;

  if (tid < kTile) {
    const int64_t i = qt * kTile + tid, slot = c * K + i;
    if (i < K) {
      const int64_t pos = slot_position(perm_row, slot, L, a.pad);
      s_qrow[tid] = n * L + pos;
      s_qstore[tid] = slot < L ? pos : -1;
      s_qslot[tid] = static_cast<int>(i);
      const int shift = tc::query_shift(a.row_exp[n * L + pos], *a.top_exp, static_cast<int>(a.cm));
      s_qdown[tid] = tc::pow2f(-shift);
      s_qup[tid] = tc::pow2f(shift);
    } else {
      s_qrow[tid] = -1;
      s_qstore[tid] = -1;
      s_qslot[tid] = -1;
      s_qdown[tid] = 1.f;
      s_qup[tid] = 1.f;
    }
  }

  float m[kRowsPerWarp], l[kRowsPerWarp], acc[kRowsPerWarp][kColsPerLane];
#pragma unroll
  for (int ra = 0; ra < kRowsPerWarp; ++ra) {
    m[ra] = -INFINITY;
    l[ra] = 0.f;
#pragma unroll
    for (int u = 0; u < kColsPerLane; ++u) acc[ra][u] = 0.f;
  }

  const int64_t n_keys = 3 * K;
  for (int64_t k0 = 0; k0 < n_keys; k0 += kTile) {
    __syncthreads();  // everyone is done with s_krow and s_v of the previous key tile
    if (tid < kTile) {
      const int64_t key = k0 + tid;
      if (key < n_keys) {
        const int t = static_cast<int>(key / K);
        const int64_t slot = key_chunk_of(c, t, a.n_chunks) * K + key % K;
        const int64_t krow = n * L + slot_position(perm_row, slot, L, a.pad);
        s_krow[tid] = krow;
        s_kinv[tid] = a.inv_norm[krow];
      } else {
        s_krow[tid] = -1;
        s_kinv[tid] = 0.f;
      }
    }
    __syncthreads();

    float s[kRowsPerWarp] = {};
    float unused = 0.f;
    tile_dot<T, false, true>(a.xm, s_qrow, a.xm, s_krow, a.cm, s, unused, s_a, s_b, s_qdown);
    const int64_t krow = s_krow[lane];
    const bool key_valid = krow >= 0;
    const float inv_norm = s_kinv[lane];

    // Online softmax of the tile; every tile holds at least one valid key (its first), so m stays finite.
    float p[kRowsPerWarp];
#pragma unroll
    for (int ra = 0; ra < kRowsPerWarp; ++ra) {
      const int q = warp + kWarps * ra, i = s_qslot[q];
      float score = -INFINITY;
      // inv_norm * 2^a is exact (a power of two, below 2^127 within the ops' magnitude limit): an unscaled
      // row rounds as s * inv_norm + lss; no lss adds +0.0, which changes no bits
      if (key_valid) {
        const float learned = (a.lss != nullptr && i >= 0) ? to_float(a.lss[krow * K + i]) : 0.f;
        score = s[ra] * (inv_norm * s_qup[q]) + learned;
      }
      const float m_new = fmaxf(m[ra], warp_max(score));
      p[ra] = key_valid ? expf(score - m_new) : 0.f;
      const float rescale = expf(m[ra] - m_new);  // 0 on the first tile (m = -inf)
      l[ra] = l[ra] * rescale + warp_sum(p[ra]);
      m[ra] = m_new;
#pragma unroll
      for (int u = 0; u < kColsPerLane; ++u) acc[ra][u] *= rescale;
    }

    // Values of the tile's keys, this block's column slice.
    for (int e = tid; e < kTile * kCols; e += kThreads) {
      const int row = e / kCols, cc = e % kCols;
      const int64_t col = col0 + cc, vrow = s_krow[row];
      s_v[row][cc] = (vrow >= 0 && col < a.cv) ? to_float(a.v[vrow * a.cv + col]) : 0.f;
    }
    __syncthreads();
    for (int j = 0; j < kTile; ++j) {
#pragma unroll
      for (int ra = 0; ra < kRowsPerWarp; ++ra) {
        const float pj = __shfl_sync(kFullMask, p[ra], j);
#pragma unroll
        for (int u = 0; u < kColsPerLane; ++u) acc[ra][u] += pj * s_v[j][lane + kWarp * u];
      }
    }
  }

#pragma unroll
  for (int ra = 0; ra < kRowsPerWarp; ++ra) {
    const int64_t pos = s_qstore[warp + kWarps * ra];
    if (pos < 0) continue;
    const float inv_l = 1.f / l[ra];
    const float lse_r = m[ra] + logf(l[ra]);
    if (!kMerge) {
      T* out_row = a.out + ((n * a.rounds + r) * L + pos) * a.cv;
#pragma unroll
      for (int u = 0; u < kColsPerLane; ++u) {
        const int64_t col = col0 + lane + kWarp * u;
        if (col < a.cv) out_row[col] = static_cast<T>(acc[ra][u] * inv_l);
      }
      if (blockIdx.y == 0 && lane == 0) a.lse[(n * a.rounds + r) * L + pos] = lse_r;
    } else {
      float* y_row = a.y_acc + (n * L + pos) * a.cv;
      float w_old = 0.f, w_new = 1.f, lse_merged = lse_r;
      if (a.lse_prev != nullptr) {
        const float lse_old = a.lse_prev[n * L + pos];
        const float hi = fmaxf(lse_old, lse_r);
        if (hi == -INFINITY) {
          lse_merged = -INFINITY;
          w_old = 1.f;
          w_new = 0.f;
        } else {
          lse_merged = hi + logf(expf(lse_old - hi) + expf(lse_r - hi));
          w_old = expf(lse_old - lse_merged);
          w_new = expf(lse_r - lse_merged);
        }
      }
#pragma unroll
      for (int u = 0; u < kColsPerLane; ++u) {
        const int64_t col = col0 + lane + kWarp * u;
        if (col >= a.cv) continue;
        const float out_r = acc[ra][u] * inv_l;
        y_row[col] = a.lse_prev != nullptr ? y_row[col] * w_old + out_r * w_new : out_r;
      }
      if (blockIdx.y == 0 && lane == 0) a.lse_next[n * L + pos] = lse_merged;
    }
  }
}

}  // namespace cuda_impl
}  // namespace dlsn
