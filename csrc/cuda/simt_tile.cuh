// The scalar (IEEE float32 FFMA) attention kernels' building blocks: tile sizes, warp reductions and the
// block-wide "32 rows x 32 rows" dot-product tile used by the scalar forward and backward kernels. Torch-free,
// so that tests/cuda_emulation runs the scalar forward on the CPU as it runs the tensor-core kernels.
#pragma once

#include <cstdint>

#include "cuda/geometry.h"  // kTile, kCols

namespace dlsn {
namespace cuda_impl {

constexpr int kWarp = 32;
constexpr unsigned kFullMask = 0xffffffffu;

// Attention kernels: a block of 8 warps works on a tile of 32 query rows against 32 key rows at a time.
// Score-like quantities of the tile live in registers as (row = warp + 8 * a, key = lane), a = 0..3.
constexpr int kThreads = 256;
constexpr int kWarps = kThreads / kWarp;             // 8
constexpr int kRowsPerWarp = kTile / kWarps;         // 4
constexpr int kChanTile = 32;                        // channels staged in shared memory per step
constexpr int kColsPerLane = kCols / kWarp;          // 4: column lane + 32 * u, u = 0..3

static_assert(kTile == kWarp, "the key of a tile is indexed by the lane");
static_assert(kRowsPerWarp * kWarps == kTile, "every row of a tile belongs to one warp");

// float16/bfloat16/float32 -> float32.
template <typename T>
__device__ __forceinline__ float to_float(T x) {
  return static_cast<float>(x);
}

// Butterfly reductions: every lane ends with the result, and the order of the additions is fixed,
// so the result is bitwise the same on every run.
__device__ __forceinline__ float warp_max(float x) {
  for (int offset = kWarp / 2; offset > 0; offset >>= 1) x = fmaxf(x, __shfl_xor_sync(kFullMask, x, offset));
  return x;
}

__device__ __forceinline__ float warp_sum(float x) {
  for (int offset = kWarp / 2; offset > 0; offset >>= 1) x += __shfl_xor_sync(kFullMask, x, offset);
  return x;
}

// Block-wide tile of dot products over C channels:
//   acc[a] += sum_c A[a_rows[warp + 8a], c] * B[b_rows[lane], c]      (a = 0..3)
// and, with kSumSq, sumsq += sum_c B[b_rows[lane], c]^2 (the squared norm of this lane's B row).
// With kScaleA, row r of A is staged multiplied by a_scale[r] (shared memory, 32 entries): the forward's query
// rows scaled by 2^-a (key_norms.cuh: query_shift).
// a_rows/b_rows (shared memory, 32 entries each) hold row indices into the [*, C] matrices A and B;
// -1 marks a row that reads as zeros. The channels go through shared memory kChanTile at a time.
// Every thread of the block must call it (it synchronises the block); the caller synchronises after
// writing a_rows/b_rows (and a_scale).
template <typename T, bool kSumSq, bool kScaleA = false>
__device__ __forceinline__ void tile_dot(const T* __restrict__ A, const int64_t* a_rows, const T* __restrict__ B,
                                         const int64_t* b_rows, int64_t C, float (&acc)[kRowsPerWarp],
                                         float& sumsq, float (*s_a)[kChanTile + 1], float (*s_b)[kChanTile + 1],
                                         const float* a_scale = nullptr) {
  const int tid = threadIdx.x, lane = tid % kWarp, warp = tid / kWarp;
  for (int64_t c0 = 0; c0 < C; c0 += kChanTile) {
    __syncthreads();  // the previous step (or the previous user of s_a/s_b) has finished reading
    for (int e = tid; e < kTile * kChanTile; e += kThreads) {
      const int row = e / kChanTile, cc = e % kChanTile;
      const int64_t c = c0 + cc;
      const int64_t ra = a_rows[row], rb = b_rows[row];
      const float av = (ra >= 0 && c < C) ? to_float(A[ra * C + c]) : 0.f;
      s_a[row][cc] = kScaleA ? av * a_scale[row] : av;
      s_b[row][cc] = (rb >= 0 && c < C) ? to_float(B[rb * C + c]) : 0.f;
    }
    __syncthreads();
#pragma unroll 8
    for (int cc = 0; cc < kChanTile; ++cc) {
      const float bv = s_b[lane][cc];  // row pitch 33: the 32 lanes hit 32 different banks
      if (kSumSq) sumsq += bv * bv;
#pragma unroll
      for (int a = 0; a < kRowsPerWarp; ++a) acc[a] += s_a[warp + kWarps * a][cc] * bv;  // broadcast read
    }
  }
}

}  // namespace cuda_impl
}  // namespace dlsn
