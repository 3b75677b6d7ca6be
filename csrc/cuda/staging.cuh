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

// 16 bytes from global src to shared dst when `copy`, else 16 zero bytes (src is then not read): the
// ignore-src form of cp.async, whose predicate costs less than a byte count.
__device__ __forceinline__ void copy16_async_or_zero(void* dst, const void* src, bool copy) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  const uint32_t d = static_cast<uint32_t>(__cvta_generic_to_shared(dst));
  asm volatile(
      "{\n .reg .pred ignore;\n setp.eq.u32 ignore, %2, 0;\n"
      " cp.async.cg.shared.global [%0], [%1], 16, ignore;\n}\n" ::"r"(d),
      "l"(src), "r"(static_cast<uint32_t>(copy)));
#elif defined(DLSN_SIMT_EMULATION) && !defined(__CUDA_ARCH__)
  simt::async_copy(dst, src, copy ? 16 : 0);
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
  // One call site each for publish and compute (they are inlined: a second copy of the gathers' code
  // would double its share of the kernel's static instructions).
  auto next = fetch(0);
  if (kStages == 2) {
    // Iteration i publishes step i into stage i % 2 while computing step i - 1.
    for (int i = 0; i <= n_steps; ++i) {
      if (i > 0) {
        stage_wait_groups<0>();
        __syncthreads();  // step i - 1's tiles are in place for everyone; step i - 2's stage is free
      }
      if (i < n_steps) {
        publish(i & 1, next);
        if (i + 1 < n_steps) next = fetch(i + 1);
      }
      if (i > 0) compute(i - 1, (i - 1) & 1);
    }
  } else {
    for (int i = 0; i < n_steps; ++i) {
      if (i > 0) __syncthreads();  // everyone is done with the only stage
      publish(0, next);
      if (i + 1 < n_steps) next = fetch(i + 1);
      stage_wait_groups<0>();
      __syncthreads();  // the step's tiles are in place for everyone
      compute(i, 0);
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
// in 32 bits). With `aligned` (rows_aligned16 of src), width a multiple of 16 bytes (which rows_aligned16 of
// the tensor implies for every width the kernels pass) and width_pad and ld multiples of 16 bytes too, the copies
// are asynchronous, whole 16-byte pieces that are copied or zeroed.
//
// Thread mapping, chosen so that the copy loop has no division: a row's 16-byte pieces (or elements) are
// spread over 2^s consecutive threads, 2^s the smallest power of two covering the row (at most kThreads);
// thread tid takes piece tid % 2^s of rows tid / 2^s, + kThreads / 2^s, ... A thread's column is fixed for
// the whole call; per copy it reads one row index, forms the source address with one 32 x 32 -> 64-bit
// multiply-add and steps the destination by a constant.
template <typename T, int kThreads>
__device__ __forceinline__ void stage_rows(T* dst, int ld, const T* __restrict__ src, const int* rows, int n_rows,
                                           int pitch, int width, int width_pad, bool aligned, int tid) {
  constexpr int kVec = 16 / sizeof(T);
  aligned = aligned && width % kVec == 0;  // whole pieces only (true whenever the tensor's rows are aligned)
  const int unit = aligned ? kVec : 1;     // elements per copy
  const int per_row = width_pad / unit;
  const int shift = lanes_shift<kThreads>(per_row);
  const int lanes = 1 << shift, row_step = kThreads >> shift;
  const int row0 = tid >> shift;
  if (aligned) {
    const uint32_t pitch_bytes = static_cast<uint32_t>(pitch) * sizeof(T);
    for (int piece = tid & (lanes - 1); piece < per_row; piece += lanes) {
      const int col = piece * kVec;
      const bool in = col < width;
      const char* from_col = reinterpret_cast<const char*>(in ? src + col : src);  // readable even if unused
      T* to = dst + row0 * ld + col;
      for (int row = row0; row < n_rows; row += row_step, to += row_step * ld) {
        const int r = rows[row];
        const uint32_t rr = r < 0 ? 0u : static_cast<uint32_t>(r);
        copy16_async_or_zero(to, from_col + uint64_t(rr) * pitch_bytes, in && r >= 0);
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
