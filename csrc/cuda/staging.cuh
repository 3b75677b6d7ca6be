// Gathers of matrix rows into shared memory, shared by the tensor-core attention kernels: rows picked through
// an index array (the sorted slots' positions), zero-filled past the valid width and for rows marked -1.
//
// Aligned rows go through cp.async, 16 bytes per instruction, so the copies run while the block computes;
// TMA cannot gather rows, cp.async can. stage_wait() ends them. Rows whose pitch or start is not 16-byte
// aligned take plain loads; the launcher decides which (rows_aligned16) once per tensor.
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

// Commits and waits for all of this thread's copies.
__device__ __forceinline__ void stage_wait() {
  stage_commit();
  stage_wait_groups<0>();
}

// dst[row * ld + col] = src[rows[row] * pitch + col0 + col] for row < n_rows, col < width_pad; zero where
// col >= width or rows[row] < 0. With `aligned` (rows_aligned16 of src and col0 a multiple of 16 bytes) and
// width_pad a multiple of 16 bytes, and ld too, the copies are asynchronous.
template <typename T, int kThreads>
__device__ __forceinline__ void stage_rows(T* dst, int ld, const T* __restrict__ src, const int64_t* rows,
                                           int n_rows, int64_t pitch, int64_t col0, int64_t width, int width_pad,
                                           bool aligned, int tid) {
  if (aligned) {
    constexpr int kVec = 16 / sizeof(T);
    const int per_row = width_pad / kVec;
    for (int e = tid; e < n_rows * per_row; e += kThreads) {
      const int row = e / per_row, col = (e % per_row) * kVec;
      const int64_t r = rows[row];
      const int64_t left = r >= 0 ? width - col : 0;
      const int bytes = left <= 0 ? 0 : static_cast<int>((left < kVec ? left : kVec) * sizeof(T));
      const T* from = bytes > 0 ? src + r * pitch + col0 + col : src;
      copy16_async(dst + row * ld + col, from, bytes);
    }
  } else {
    for (int e = tid; e < n_rows * width_pad; e += kThreads) {
      const int row = e / width_pad, col = e % width_pad;
      const int64_t r = rows[row];
      dst[row * ld + col] = (r >= 0 && col < width) ? src[r * pitch + col0 + col] : T(0.f);
    }
  }
}

}  // namespace tc
}  // namespace cuda_impl
}  // namespace dlsn
