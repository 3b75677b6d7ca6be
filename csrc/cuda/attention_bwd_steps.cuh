// The steps of attention_backward around the attention kernels, shared by the scalar and the tensor-core
// paths (chunk_attention_bwd.cu): the inverse permutation, the per-round scatter of slot gradients to
// positions (padded duplicates included, in increasing slot order), and the final key-normalisation backward
// and casts. Torch-free: tests/cuda_emulation runs them on the CPU.
#pragma once

#include <cmath>
#include <cstdint>

#include "slot_layout.h"

namespace dlsn {
namespace cuda_impl {

// inv[n, r, perm[n, r, p]] = p for p < L (all rounds at once).
template <typename idx_t>
__global__ void inverse_perm_kernel(const idx_t* __restrict__ perm, int64_t* __restrict__ inv, int64_t n_rows,
                                    int64_t length) {
  const int64_t e = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (e >= n_rows * length) return;
  const int64_t row = e / length, slot = e % length;
  inv[row * length + static_cast<int64_t>(perm[e])] = slot;
}

// The scatter: a warp per position, kScatterWarps positions per block (a block per position left most of
// its threads idle and launched N*L blocks per round), lanes along the columns (coalesced rows).
constexpr int kScatterWarps = 8;
constexpr int kScatterThreads = kScatterWarps * 32;

inline unsigned scatter_blocks(int64_t n_positions) {
  return static_cast<unsigned>((n_positions + kScatterWarps - 1) / kScatterWarps);
}

// dst[position] += sum of src over the position's slots, slot inv[q] first, then its padded duplicates.
__device__ __forceinline__ void add_slot_rows(const float* __restrict__ src, float* __restrict__ dst, int64_t width,
                                              int64_t n, int64_t pos, int64_t slot0, int64_t first_dup,
                                              int64_t length, int64_t padded_length, int lane) {
  const float* first = src + (n * padded_length + slot0) * width;
  float* out = dst + (n * length + pos) * width;
  for (int64_t col = lane; col < width; col += 32) {
    float sum = first[col];
    for (int64_t slot = first_dup; slot < padded_length; slot += length) {
      sum += src[(n * padded_length + slot) * width + col];
    }
    out[col] += sum;
  }
}

// Kernel 3, per round: warp (n, position) of the flattened N*L positions. dlss_slot/dlss_acc are nullptr without a
// learned score (nothing of dlss is allocated then).
__global__ void __launch_bounds__(kScatterThreads)
    scatter_slots_kernel(const int64_t* __restrict__ inv, const float* __restrict__ dv_slot,
                         const float* __restrict__ dkn_slot, const float* __restrict__ dlss_slot,
                         float* __restrict__ dv_acc, float* __restrict__ dkn_acc, float* __restrict__ dlss_acc,
                         int64_t n_batch, int64_t rounds, int64_t round, int64_t length, int64_t padded_length,
                         int64_t pad, int64_t cm, int64_t cv, int64_t chunk) {
  const int lane = threadIdx.x % 32;
  const int64_t e = int64_t(blockIdx.x) * kScatterWarps + threadIdx.x / 32;
  if (e >= n_batch * length) return;  // the whole warp leaves together
  const int64_t n = e / length, pos = e - n * length;
  const int64_t slot0 = inv[(n * rounds + round) * length + pos];
  const int64_t first_dup = first_padded_copy(slot0, length, pad);  // >= Lp when there is no padding
  add_slot_rows(dv_slot, dv_acc, cv, n, pos, slot0, first_dup, length, padded_length, lane);
  add_slot_rows(dkn_slot, dkn_acc, cm, n, pos, slot0, first_dup, length, padded_length, lane);
  if (dlss_slot != nullptr) {
    add_slot_rows(dlss_slot, dlss_acc, chunk, n, pos, slot0, first_dup, length, padded_length, lane);
  }
}

constexpr int kFinishWarps = 8;

// dxm = dq + (dkn - kn (kn . dkn)) / ||xm||  (dkn / eps when ||xm|| < eps), then casts. Warp per position.
// dlss_acc/dlss are nullptr without a learned score.
template <typename T>
__global__ void __launch_bounds__(kFinishWarps* 32)
    finish_grads_kernel(float eps, const T* __restrict__ xm, const float* __restrict__ dq_acc, const float* __restrict__ dkn_acc,
                        const float* __restrict__ dv_acc, const float* __restrict__ dlss_acc, T* __restrict__ dxm,
                        T* __restrict__ dv, T* __restrict__ dlss, int64_t n_positions, int64_t cm, int64_t cv,
                        int64_t chunk) {
  const int lane = threadIdx.x % 32;
  const int64_t row = int64_t(blockIdx.x) * kFinishWarps + threadIdx.x / 32;
  if (row >= n_positions) return;  // the whole warp leaves together
  const T* x = xm + row * cm;
  const float* dkn = dkn_acc + row * cm;
  float sumsq = 0.f, dot = 0.f;
  for (int64_t col = lane; col < cm; col += 32) {
    const float xv = static_cast<float>(x[col]);
    sumsq += xv * xv;
    dot += xv * dkn[col];
  }
  for (int offset = 16; offset > 0; offset >>= 1) {
    sumsq += __shfl_xor_sync(0xffffffffu, sumsq, offset);
    dot += __shfl_xor_sync(0xffffffffu, dot, offset);
  }
  const float norm = sqrtf(sumsq);
  const bool clamped = norm < eps;
  const float inv_norm = 1.f / (clamped ? eps : norm);
  const float along = clamped ? 0.f : dot / sumsq;  // kn . dkn / ||xm||
  for (int64_t col = lane; col < cm; col += 32) {
    const float key_grad = (dkn[col] - static_cast<float>(x[col]) * along) * inv_norm;
    dxm[row * cm + col] = static_cast<T>(dq_acc[row * cm + col] + key_grad);
  }
  for (int64_t col = lane; col < cv; col += 32) dv[row * cv + col] = static_cast<T>(dv_acc[row * cv + col]);
  if (dlss == nullptr) return;
  for (int64_t col = lane; col < chunk; col += 32) dlss[row * chunk + col] = static_cast<T>(dlss_acc[row * chunk + col]);
}

}  // namespace cuda_impl
}  // namespace dlsn
