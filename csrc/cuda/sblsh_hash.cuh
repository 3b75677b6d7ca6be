// SB-LSH codes on CUDA (DESIGN.md 1.1): codes[n, r, l] = argmax_b xm[n, l, :] . rot[:, r, b], lowest b on ties.
//
// Block = 64 positions (rows n*L + l) x one round (blockIdx.y), 256 threads. The projections of a 64-row x
// 64-bucket tile live in registers, a 4 x 4 block per thread (rows 4 * (tid / 16) + i, buckets 4 * (tid % 16) + j);
// the channels go through shared memory 32 at a time: x rows with coalesced loads (16 bytes per load when the
// rows are 16-byte aligned), stored channel-major so that a thread reads its 4 rows in one 16-byte load, and
// rot[c, r, b0..b0+63] likewise. Each bucket tile reads x once (the old kernel read it once per 8 buckets).
// Every projection is an IEEE float32 FMA chain over c = 0..Cm-1 in order, as before, so the codes are those of
// a float32 dot product; the argmax of a row is combined across its 16 threads with the rule of torch.argmax
// (larger wins, a NaN wins over numbers, the lowest bucket among equals), a total order, so the result does
// not depend on the order of the combination. No [N, R, L, B] tensor ever exists.
// Torch-free: tests/cuda_emulation runs it on the CPU.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

namespace dlsn {
namespace cuda_impl {
namespace hash {

constexpr int kThreads = 256;
constexpr int kRows = 64;      // positions per block
constexpr int kBuckets = 64;   // buckets per tile
constexpr int kChans = 32;     // channels per shared-memory step
constexpr int kLd = kRows + 4;  // x tile [channel][kLd]: 16-byte aligned rows
constexpr int kWLd = kBuckets + 4;

struct alignas(16) Vec16 {
  uint32_t w[4];
};

// Whether candidate (v, b) beats (best, best_b) under torch.argmax's order.
__host__ __device__ inline bool beats(float v, int b, float best, int best_b) {
  const bool v_nan = std::isnan(v), best_nan = std::isnan(best);
  if (v_nan != best_nan) return v_nan;
  if (!v_nan && v != best) return v > best;
  return b < best_b;  // equal values, or both NaN
}

template <typename T>
__device__ __forceinline__ float hash_float(T x) {
  return static_cast<float>(x);
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    sblsh_hash_kernel(const T* __restrict__ xm, const T* __restrict__ rot, int64_t* __restrict__ codes,
                      int64_t n_positions, int64_t length, int rounds, int n_buckets, int channels, bool aligned) {
  __shared__ __align__(16) float s_x[kChans][kLd];
  __shared__ __align__(16) float s_w[kChans][kWLd];
  const int tid = threadIdx.x, tr = tid / 16, tb = tid % 16;
  const int64_t row0 = int64_t(blockIdx.x) * kRows;
  const int r = static_cast<int>(blockIdx.y);
  const int rows = n_positions - row0 < kRows ? static_cast<int>(n_positions - row0) : kRows;
  const T* x_block = xm + row0 * channels;

  float best[4] = {0.f, 0.f, 0.f, 0.f};
  int best_b[4] = {-1, -1, -1, -1};
  for (int b0 = 0; b0 < n_buckets; b0 += kBuckets) {
    float proj[4][4];
#pragma unroll
    for (int i = 0; i < 4; ++i) {
#pragma unroll
      for (int j = 0; j < 4; ++j) proj[i][j] = 0.f;
    }
    for (int c0 = 0; c0 < channels; c0 += kChans) {
      const int width = channels - c0 < kChans ? channels - c0 : kChans;
      __syncthreads();  // the previous step's tiles are consumed
      constexpr int kVec = 16 / sizeof(T);
      if (aligned && width == kChans) {
        // kRows rows x kChans / kVec pieces of 16 bytes; consecutive threads read consecutive pieces of a row
        for (int e = tid; e < kRows * (kChans / kVec); e += kThreads) {
          const int row = e / (kChans / kVec), c = (e % (kChans / kVec)) * kVec;
          T vals[kVec];
          if (row < rows) {
            const T* p = x_block + int64_t(row) * channels + c0 + c;
#if defined(__CUDA_ARCH__)
            const Vec16 v = *reinterpret_cast<const Vec16*>(p);  // one 16-byte load
            std::memcpy(vals, &v, 16);
#else
            std::memcpy(vals, p, 16);
#endif
          } else {
            for (int k = 0; k < kVec; ++k) vals[k] = T(0.f);
          }
#pragma unroll
          for (int k = 0; k < kVec; ++k) s_x[c + k][row] = hash_float(vals[k]);
        }
      } else {
        for (int e = tid; e < kRows * kChans; e += kThreads) {
          const int row = e / kChans, c = e % kChans;
          s_x[c][row] = row < rows && c < width ? hash_float(x_block[int64_t(row) * channels + c0 + c]) : 0.f;
        }
      }
      for (int e = tid; e < kChans * kBuckets; e += kThreads) {
        const int c = e / kBuckets, b = e % kBuckets;
        s_w[c][b] = c < width && b0 + b < n_buckets
                        ? hash_float(rot[(int64_t(c0 + c) * rounds + r) * n_buckets + b0 + b])
                        : 0.f;
      }
      __syncthreads();
      for (int c = 0; c < width; ++c) {
        float xv[4], wv[4];
#pragma unroll
        for (int i = 0; i < 4; ++i) xv[i] = s_x[c][4 * tr + i];
#pragma unroll
        for (int j = 0; j < 4; ++j) wv[j] = s_w[c][4 * tb + j];
#pragma unroll
        for (int i = 0; i < 4; ++i) {
#pragma unroll
          for (int j = 0; j < 4; ++j) proj[i][j] = fmaf(xv[i], wv[j], proj[i][j]);
        }
      }
    }
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int b = b0 + 4 * tb + j;
      if (b >= n_buckets) break;
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        if (best_b[i] < 0 || beats(proj[i][j], b, best[i], best_b[i])) {
          best[i] = proj[i][j];
          best_b[i] = b;
        }
      }
    }
  }
  // The 16 threads of a row group are lanes 16k..16k+15 of one warp: a butterfly over them.
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    for (int offset = 8; offset > 0; offset >>= 1) {
      const float v = __shfl_xor_sync(0xffffffffu, best[i], offset);
      const int b = __shfl_xor_sync(0xffffffffu, best_b[i], offset);
      if (b >= 0 && (best_b[i] < 0 || beats(v, b, best[i], best_b[i]))) {
        best[i] = v;
        best_b[i] = b;
      }
    }
  }
  if (tb == 0) {
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int row = 4 * tr + i;
      if (row >= rows) continue;
      const int64_t p = row0 + row, n = p / length, l = p - n * length;
      codes[(n * rounds + r) * length + l] = best_b[i];
    }
  }
}

}  // namespace hash
}  // namespace cuda_impl
}  // namespace dlsn
