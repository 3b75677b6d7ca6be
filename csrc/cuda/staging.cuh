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
__device__ __forceinline__ void run_steps(int64_t n_steps, Fetch&& fetch, Publish&& publish, Compute&& compute) {
  static_assert(kStages == 1 || kStages == 2, "one or two stages");
  auto next = fetch(int64_t(0));
  publish(0, next);
  if (n_steps > 1) next = fetch(int64_t(1));
  for (int64_t step = 0; step < n_steps; ++step) {
    const int buf = static_cast<int>(step % kStages);
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
