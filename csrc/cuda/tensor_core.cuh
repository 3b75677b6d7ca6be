// Warp-level tensor-core products (mma.sync, sm_80 and later) for the attention kernels: fragment loads from
// shared memory, the accumulator -> operand conversion of FlashAttention, and the mma itself, for three
// element types:
//   c10::BFloat16, c10::Half  m16n8k16, operands in their own type, float32 accumulation;
//   float                     m16n8k8 TF32 (the kernel is chosen only when the precision policy allows TF32).
// Torch-free apart from the c10 half types, so the kernels built on it also compile for the host SIMT
// emulator of tests/cuda_emulation (DLSN_SIMT_EMULATION), which runs them on the CPU.
//
// Lane roles (PTX ISA, "Matrix fragments for mma.m16n8k16 / m16n8k8"): group g = lane / 4 holds rows g and
// g + 8 of A and of the accumulator, and column g of B; t = lane % 4 holds the accumulator columns 2t, 2t + 1.
// Along the reduction (k) axis a lane holds k = 2t, 2t + 1, 2t + 8, 2t + 9 in the 16-deep product. In the
// 8-deep TF32 product the hardware gives a lane k = t and t + 4; the loads below put the elements 2t and
// 2t + 1 there instead, in A and in B alike. A product over k does not depend on the order of k, and this
// order is the one of the accumulator columns, so an accumulator tile becomes an A operand without shuffles
// and every shared-memory fragment load reads two adjacent elements.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <cstring>

// Dynamic shared memory of a kernel (the emulator defines its own).
#if !defined(DLSN_DYNAMIC_SHARED)
#define DLSN_DYNAMIC_SHARED(name) extern __shared__ __align__(16) unsigned char name[]
#endif

namespace dlsn {
namespace cuda_impl {
namespace tc {

struct FragA {
  uint32_t r[4];
};
struct FragB {
  uint32_t r[2];
};
using Acc = float[4];  // (g, 2t), (g, 2t + 1), (g + 8, 2t), (g + 8, 2t + 1) of an m16n8 tile

template <typename T>
struct Kind;

template <>
struct Kind<c10::BFloat16> {
  static constexpr int kDepth = 16;
};
template <>
struct Kind<c10::Half> {
  static constexpr int kDepth = 16;
};
template <>
struct Kind<float> {
  static constexpr int kDepth = 8;
};

__device__ __forceinline__ int group_of(int lane) { return lane >> 2; }
__device__ __forceinline__ int thread_in_group(int lane) { return lane & 3; }

// Two adjacent 16-bit elements as one 32-bit register, the lower index in the low half.
template <typename T>
__device__ __forceinline__ uint32_t load_pair(const T* p) {
#if defined(__CUDA_ARCH__)
  return *reinterpret_cast<const uint32_t*>(p);
#else
  uint32_t bits;
  std::memcpy(&bits, p, sizeof(bits));
  return bits;
#endif
}

// float -> TF32 operand, rounded to nearest (ties away), as cuBLAS and CUTLASS do.
__device__ __forceinline__ uint32_t to_tf32(float x) {
#if defined(__CUDA_ARCH__)
  uint32_t bits;
  asm("cvt.rna.tf32.f32 %0, %1;" : "=r"(bits) : "f"(x));
  return bits;
#else
  uint32_t bits;
  std::memcpy(&bits, &x, sizeof(bits));
  if ((bits & 0x7f800000u) != 0x7f800000u) bits = (bits + 0x1000u) & 0xffffe000u;  // inf/nan pass through
  return bits;
#endif
}

// Two floats rounded to the 16-bit type (nearest even) and packed, the first in the low half.
template <typename T>
__device__ __forceinline__ uint32_t pack_pair(float lo, float hi);

template <>
__device__ __forceinline__ uint32_t pack_pair<c10::BFloat16>(float lo, float hi) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  uint32_t bits;
  asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(bits) : "f"(hi), "f"(lo));
  return bits;
#else
  return uint32_t(c10::BFloat16(lo).x) | (uint32_t(c10::BFloat16(hi).x) << 16);
#endif
}

template <>
__device__ __forceinline__ uint32_t pack_pair<c10::Half>(float lo, float hi) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  uint32_t bits;
  asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(bits) : "f"(hi), "f"(lo));
  return bits;
#else
  return uint32_t(c10::Half(lo).x) | (uint32_t(c10::Half(hi).x) << 16);
#endif
}

// A operand (16 x depth) from a row-major shared-memory tile: s points at (row 0, k 0), ld in elements.
template <typename T>
__device__ __forceinline__ FragA load_a(const T* s, int ld, int lane) {
  const int g = group_of(lane), t = thread_in_group(lane);
  const T* lo = s + g * ld + 2 * t;
  const T* hi = lo + 8 * ld;
  return {{load_pair(lo), load_pair(hi), load_pair(lo + 8), load_pair(hi + 8)}};
}

template <>
__device__ __forceinline__ FragA load_a<float>(const float* s, int ld, int lane) {
  const int g = group_of(lane), t = thread_in_group(lane);
  const float* lo = s + g * ld + 2 * t;
  const float* hi = lo + 8 * ld;
  return {{to_tf32(lo[0]), to_tf32(hi[0]), to_tf32(lo[1]), to_tf32(hi[1])}};
}

// B operand (depth x 8) from a tile stored [n][k] (k contiguous): s points at (n 0, k 0), ld in elements.
template <typename T>
__device__ __forceinline__ FragB load_b(const T* s, int ld, int lane) {
  const T* p = s + group_of(lane) * ld + 2 * thread_in_group(lane);
  return {{load_pair(p), load_pair(p + 8)}};
}

template <>
__device__ __forceinline__ FragB load_b<float>(const float* s, int ld, int lane) {
  const float* p = s + group_of(lane) * ld + 2 * thread_in_group(lane);
  return {{to_tf32(p[0]), to_tf32(p[1])}};
}

// The B operands of two adjacent n-tiles (columns n0..n0+7 and n0+8..n0+15) from a tile stored [k][n]
// (n contiguous, as gathered value rows are): s points at (k 0, n0). 16-bit types use ldmatrix.trans, one
// instruction for both tiles; lane l gives the address of row l % 16 of column block l / 16.
template <typename T>
__device__ __forceinline__ void load_b_kn_x2(FragB& b0, FragB& b1, const T* s, int ld, int lane) {
  const T* row = s + (lane & 15) * ld + (lane >> 4) * 8;
  uint32_t r[4] = {0, 0, 0, 0};  // set below (the host pass of nvcc compiles no branch)
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  const uint32_t addr = static_cast<uint32_t>(__cvta_generic_to_shared(row));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
#elif defined(DLSN_SIMT_EMULATION) && !defined(__CUDA_ARCH__)
  simt::ldmatrix_x4_trans(r, row);
#elif defined(__CUDA_ARCH__)
  __trap();
#endif
  b0 = {{r[0], r[1]}};
  b1 = {{r[2], r[3]}};
}

template <>
__device__ __forceinline__ void load_b_kn_x2<float>(FragB& b0, FragB& b1, const float* s, int ld, int lane) {
  const float* p = s + 2 * thread_in_group(lane) * ld + group_of(lane);
  b0 = {{to_tf32(p[0]), to_tf32(p[ld])}};
  b1 = {{to_tf32(p[8]), to_tf32(p[ld + 8])}};
}

// A operand from accumulator tiles: the 16 x depth block made of the depth / 8 tiles acc[0], acc[1], ...
template <typename T>
__device__ __forceinline__ FragA acc_to_a(const Acc* acc) {
  return {{pack_pair<T>(acc[0][0], acc[0][1]), pack_pair<T>(acc[0][2], acc[0][3]),
           pack_pair<T>(acc[1][0], acc[1][1]), pack_pair<T>(acc[1][2], acc[1][3])}};
}

template <>
__device__ __forceinline__ FragA acc_to_a<float>(const Acc* acc) {
  return {{to_tf32(acc[0][0]), to_tf32(acc[0][2]), to_tf32(acc[0][1]), to_tf32(acc[0][3])}};
}

// d += a b.
template <typename T>
__device__ __forceinline__ void mma(Acc& d, const FragA& a, const FragB& b);

#if defined(DLSN_SIMT_EMULATION) && !defined(__CUDA_ARCH__)
template <typename T>
__device__ __forceinline__ void mma(Acc& d, const FragA& a, const FragB& b) {
  simt::mma_sync<T>(d, a.r, b.r);
}
#else
// One warp-wide mma.sync with float32 accumulators in place; TYPES names the operand types and shape.
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
#define DLSN_MMA_SYNC(TYPES, d, a, b)                                                                \
  asm volatile("mma.sync.aligned." TYPES " {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};" \
               : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])                                       \
               : "r"(a.r[0]), "r"(a.r[1]), "r"(a.r[2]), "r"(a.r[3]), "r"(b.r[0]), "r"(b.r[1]))
#elif defined(__CUDA_ARCH__)
#define DLSN_MMA_SYNC(TYPES, d, a, b) __trap()  // no mma.sync before sm_80: the launchers never pick these
#else
#define DLSN_MMA_SYNC(TYPES, d, a, b) ((void)0)  // the host pass of nvcc: never called
#endif

template <>
__device__ __forceinline__ void mma<c10::BFloat16>(Acc& d, const FragA& a, const FragB& b) {
  DLSN_MMA_SYNC("m16n8k16.row.col.f32.bf16.bf16.f32", d, a, b);
}

template <>
__device__ __forceinline__ void mma<c10::Half>(Acc& d, const FragA& a, const FragB& b) {
  DLSN_MMA_SYNC("m16n8k16.row.col.f32.f16.f16.f32", d, a, b);
}

template <>
__device__ __forceinline__ void mma<float>(Acc& d, const FragA& a, const FragB& b) {
  DLSN_MMA_SYNC("m16n8k8.row.col.f32.tf32.tf32.f32", d, a, b);
}
#endif

// The kernels' softmax runs in base 2.
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

template <int kTiles>
__device__ __forceinline__ void zero_tiles(Acc (&acc)[kTiles]) {
#pragma unroll
  for (int i = 0; i < kTiles; ++i) acc[i][0] = acc[i][1] = acc[i][2] = acc[i][3] = 0.f;
}

// acc[tiles] += A B over `depth_total` (a multiple of the mma depth): A = the warp's 16 rows of a [row][k]
// shared tile, B = the n8 tiles of a [n][k] shared tile.
template <typename T, int kTiles>
__device__ __forceinline__ void gemm_rows_by_cols(Acc (&acc)[kTiles], const T* a_rows, int lda, const T* b_rows,
                                                  int ldb, int depth_total, int lane) {
  for (int kc = 0; kc < depth_total; kc += Kind<T>::kDepth) {
    const FragA fa = load_a(a_rows + kc, lda, lane);
#pragma unroll
    for (int nt = 0; nt < kTiles; ++nt) mma<T>(acc[nt], fa, load_b(b_rows + nt * 8 * ldb + kc, ldb, lane));
  }
}

// acc[tiles] += W B where W (16 x 8 kWTiles) sits in accumulator tiles (a score or gradient tile, reused as
// the A operand) and B is a [k][n] shared tile of 8 kWTiles rows; only the n8 tiles below n_tiles run.
template <typename T, int kTiles, int kWTiles>
__device__ __forceinline__ void gemm_acc_by_rows(Acc (&acc)[kTiles], const Acc (&w)[kWTiles], const T* b, int ldb,
                                                 int n_tiles, int lane) {
#pragma unroll
  for (int kb = 0; kb < 8 * kWTiles / Kind<T>::kDepth; ++kb) {
    const FragA fa = acc_to_a<T>(&w[kb * Kind<T>::kDepth / 8]);
    const T* bk = b + kb * Kind<T>::kDepth * ldb;
#pragma unroll
    for (int ct = 0; ct < kTiles; ct += 2) {
      if (ct < n_tiles) {
        FragB b0, b1;
        load_b_kn_x2(b0, b1, bk + ct * 8, ldb, lane);
        mma<T>(acc[ct], fa, b0);
        mma<T>(acc[ct + 1], fa, b1);
      }
    }
  }
}

}  // namespace tc
}  // namespace cuda_impl
}  // namespace dlsn
