// Gathers of matrix rows into shared memory, shared by the tensor-core attention kernels: rows picked through
// an index array (the sorted slots' positions), zero-filled past the valid width and for rows marked -1.
//
// Aligned rows go through cp.async, 16 bytes per instruction, so the copies run while the block computes;
// TMA cannot gather rows, cp.async can. stage_commit() and stage_wait_groups() end them (run_steps does).
// Rows whose pitch or start is not 16-byte aligned take plain loads; the launcher decides which
// (rows_aligned16) once per tensor.
// Torch-free: also compiled by the host SIMT emulator of tests/cuda_emulation.
#pragma once

#include <cstdint>
#include <cstring>

namespace dlsn {
namespace cuda_impl {
namespace tc {

// Whether rows of `pitch` elements of size `element` starting at `base` are all 16-byte aligned.
__host__ __device__ inline bool rows_aligned16(const void* base, int64_t pitch, int64_t element) {
  return reinterpret_cast<uintptr_t>(base) % 16 == 0 && (pitch * element) % 16 == 0;
}

// 16 bytes from global src to shared dst, of which the first src_bytes are copied and the rest zeroed.
__device__ __forceinline__ void copy16_async(void* dst, const void* src, int src_bytes) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  const uint32_t d = static_cast<uint32_t>(__cvta_generic_to_shared(dst));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(d), "l"(src), "r"(src_bytes));
#elif defined(DLSN_SIMT_EMULATION) && !defined(__CUDA_ARCH__)
  simt::async_copy(dst, src, src_bytes);
#elif defined(__CUDA_ARCH__)
  __trap();
#endif
}

// Closes this thread's group of cp.async copies issued since the last commit.
__device__ __forceinline__ void stage_commit() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.commit_group;\n" ::: "memory");
#elif defined(DLSN_SIMT_EMULATION) && !defined(__CUDA_ARCH__)
  simt::async_commit();
#endif
}

// Waits until at most kPending of this thread's committed groups are still in flight; a __syncthreads()
// must follow before other threads read what the finished groups wrote.
template <int kPending>
__device__ __forceinline__ void stage_wait_groups() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending) : "memory");
#elif defined(DLSN_SIMT_EMULATION) && !defined(__CUDA_ARCH__)
  simt::async_wait(kPending);
#endif
}

// The step loop of the attention kernels, with kStages (1 or 2) sets of shared tiles. Per step a block
// gathers rows picked by a few index values (the step's "meta": key rows and norms, or query rows, lse and
// delta), then multiplies. Called by every thread of the block:
//   fetch(step) -> Meta      loads the step's meta from global memory into registers, two steps ahead of use
//                            (the loads are in flight during a step's products);
//   publish(buf, meta)       writes it to shared memory, __syncthreads(), issues the gathers into stage buf
//                            (stage_rows) and stage_commit();
//   compute(step, buf)       the products of a step, reading stage buf only.
// With two stages the gathers of step k + 1 run during the products of step k; with one they follow them.
template <int kStages, typename Fetch, typename Publish, typename Compute>
__device__ __forceinline__ void run_steps(int n_steps, Fetch&& fetch, Publish&& publish, Compute&& compute) {
  static_assert(kStages == 1 || kStages == 2, "one or two stages");
  auto next = fetch(0);
  publish(0, next);
  if (n_steps > 1) next = fetch(1);
  for (int step = 0; step < n_steps; ++step) {
    const int buf = step & (kStages - 1);
    stage_wait_groups<0>();
    __syncthreads();  // the step's tiles are in place for everyone, and the other stage is free again
    if (kStages == 2 && step + 1 < n_steps) {
      publish(buf ^ 1, next);
      if (step + 2 < n_steps) next = fetch(step + 2);
    }
    compute(step, buf);
    if (kStages == 1 && step + 1 < n_steps) {
      __syncthreads();  // everyone is done with the only stage
      publish(0, next);
      if (step + 2 < n_steps) next = fetch(step + 2);
    }
  }
}

// ceil(log2(x)) for 1 <= x, capped at log2(kCap) (a power of two).
template <int kCap>
__device__ __forceinline__ int lanes_shift(int x) {
  int shift;
#if defined(__CUDA_ARCH__)
  shift = x <= 1 ? 0 : 32 - __clz(x - 1);
#else
  shift = 0;
  while ((1 << shift) < x) ++shift;
#endif
  int cap = 0;
  while ((1 << cap) < kCap) ++cap;  // constant-folded
  return shift < cap ? shift : cap;
}

// dst[row * ld + col] = src[rows[row] * pitch + col] for row < n_rows, col < width_pad; zero where col >= width
// or rows[row] < 0. src already points at the block's matrix and first column (so row indices and pitches fit
// in 32 bits; the one 64-bit product per copy is an IMAD.WIDE). With `aligned` (rows_aligned16 of src) and
// width_pad and ld multiples of 16 bytes, the copies are asynchronous.
//
// Thread mapping, chosen so that the copy loop has no division: a row's 16-byte pieces (or elements) are
// spread over 2^s consecutive threads, 2^s the smallest power of two covering the row (at most kThreads);
// thread tid takes piece tid % 2^s of rows tid / 2^s, + kThreads / 2^s, ... A thread's column, and so its
// byte count, is fixed for the whole call; per copy it reads one row index and computes two addresses.
template <typename T, int kThreads>
__device__ __forceinline__ void stage_rows(T* dst, int ld, const T* __restrict__ src, const int* rows, int n_rows,
                                           int pitch, int width, int width_pad, bool aligned, int tid) {
  constexpr int kVec = 16 / sizeof(T);
  const int unit = aligned ? kVec : 1;  // elements per copy
  const int per_row = width_pad / unit;
  const int shift = lanes_shift<kThreads>(per_row);
  const int lanes = 1 << shift, row_step = kThreads >> shift;
  const int row0 = tid >> shift;
  if (aligned) {
    for (int piece = tid & (lanes - 1); piece < per_row; piece += lanes) {
      const int col = piece * kVec, left = width - col;
      const int bytes = left <= 0 ? 0 : (left < kVec ? left : kVec) * static_cast<int>(sizeof(T));
      const T* from_col = bytes > 0 ? src + col : src;  // a readable address even when nothing is read
      for (int row = row0; row < n_rows; row += row_step) {
        const int r = rows[row];
        copy16_async(dst + row * ld + col, from_col + int64_t(r < 0 ? 0 : r) * pitch, r < 0 ? 0 : bytes);
      }
    }
  } else {
    for (int col = tid & (lanes - 1); col < width_pad; col += lanes) {
      const bool in = col < width;
      for (int row = row0; row < n_rows; row += row_step) {
        const int r = rows[row];
        dst[row * ld + col] = (r >= 0 && in) ? src[int64_t(r) * pitch + col] : T(0.f);
      }
    }
  }
}

}  // namespace tc
}  // namespace cuda_impl
}  // namespace dlsn
