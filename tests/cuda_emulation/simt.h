// A small SIMT emulator that runs the torch-free CUDA kernels of csrc/cuda on the CPU, so their index math,
// fragment layouts and synchronisation are tested on machines without a GPU (tests/test_cuda_emulation.py).
//
// Each CUDA thread of a block is a cooperative fiber (ucontext); blocks run one after another. A fiber runs
// until it waits at a barrier (__syncthreads, or the warp-wide exchange behind shuffles, mma.sync and
// ldmatrix), so every interleaving the emulator produces is one a GPU may produce too. The tensor-core
// instructions follow the PTX ISA fragment layouts exactly (not the kernels' own helpers), with float32
// accumulation in k order: the result is compared with tolerances, not bits.
// Include this before any csrc/cuda kernel header, with DLSN_SIMT_EMULATION defined.
#pragma once

#ifndef DLSN_SIMT_EMULATION
#define DLSN_SIMT_EMULATION 1
#endif

#include <ucontext.h>

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <string>
#include <type_traits>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __restrict__
#define __align__(n) __attribute__((aligned(n)))
#define __shared__ static  // blocks run one at a time, so a static is the block's shared memory

struct dim3 {
  unsigned x = 1, y = 1, z = 1;
};

namespace simt {

struct Barrier {
  int expected = 0, arrived = 0;
  unsigned generation = 0;
};

struct Fiber {
  ucontext_t context;
  std::vector<char> stack;
  bool done = false;
};

struct State {
  dim3 thread_idx, block_idx, block_dim, grid_dim;
  std::vector<Fiber> fibers;
  ucontext_t scheduler;
  int current = 0;
  Barrier block_barrier;
  std::vector<Barrier> warp_barriers;
  // Per-warp exchange slots: 32 lanes x 8 words, plus the lanes' pointers.
  std::vector<uint32_t> exchange;
  std::vector<const void*> pointers;
  std::vector<int> votes;  // __syncthreads_or: one per thread
  std::vector<unsigned char> dynamic_shared;
  std::function<void()> body;
};

inline State& state() {
  static State s;
  return s;
}

inline void yield() {
  State& s = state();
  swapcontext(&s.fibers[s.current].context, &s.scheduler);
}

inline void wait(Barrier& b) {
  const unsigned generation = b.generation;
  if (++b.arrived == b.expected) {
    b.arrived = 0;
    ++b.generation;
    return;
  }
  while (b.generation == generation) yield();
}

inline int lane() { return static_cast<int>(state().thread_idx.x % 32); }
inline int warp() { return static_cast<int>(state().thread_idx.x / 32); }
inline void warp_sync() { wait(state().warp_barriers[warp()]); }
inline uint32_t* slots(int l) { return &state().exchange[(warp() * 32 + l) * 8]; }

inline void fiber_entry() {
  State& s = state();
  s.body();
  s.fibers[s.current].done = true;
  swapcontext(&s.fibers[s.current].context, &s.scheduler);
}

inline void check_no_copies_in_flight();

// Runs body() as every thread of every block of the grid, blocks in order.
inline void launch(dim3 grid, dim3 block, size_t dynamic_bytes, std::function<void()> body) {
  State& s = state();
  const int threads = static_cast<int>(block.x);
  if (block.y != 1 || block.z != 1 || threads % 32 != 0) {
    std::fprintf(stderr, "simt: only 1-D blocks of whole warps\n");
    std::exit(2);
  }
  s.block_dim = block;
  s.grid_dim = grid;
  s.body = std::move(body);
  s.dynamic_shared.assign(dynamic_bytes, 0xff);  // garbage, as on a GPU: a kernel must not read unwritten bytes
  s.exchange.assign(size_t(threads) * 8, 0);
  s.pointers.assign(size_t(threads), nullptr);
  s.votes.assign(size_t(threads), 0);
  for (unsigned bz = 0; bz < grid.z; ++bz)
    for (unsigned by = 0; by < grid.y; ++by)
      for (unsigned bx = 0; bx < grid.x; ++bx) {
        s.block_idx = {bx, by, bz};
        s.block_barrier = {threads, 0, 0};
        s.warp_barriers.assign(threads / 32, Barrier{32, 0, 0});
        s.fibers.assign(threads, Fiber{});
        for (int i = 0; i < threads; ++i) {
          Fiber& f = s.fibers[i];
          f.stack.resize(256 * 1024);
          getcontext(&f.context);
          f.context.uc_stack.ss_sp = f.stack.data();
          f.context.uc_stack.ss_size = f.stack.size();
          f.context.uc_link = nullptr;
          makecontext(&f.context, fiber_entry, 0);
        }
        int live = threads;
        while (live > 0) {
          live = 0;
          for (int i = 0; i < threads; ++i) {
            if (s.fibers[i].done) continue;
            s.current = i;
            s.thread_idx = {static_cast<unsigned>(i), 0, 0};
            swapcontext(&s.scheduler, &s.fibers[i].context);
            if (!s.fibers[i].done) ++live;
          }
          // A finished thread never reaches a __syncthreads that others wait at.
          if (live > 0 && live < threads && s.block_barrier.arrived > 0) {
            std::fprintf(stderr, "simt: __syncthreads reached by only part of the block\n");
            std::exit(3);
          }
        }
        check_no_copies_in_flight();
      }
}

inline void syncthreads() { wait(state().block_barrier); }

// __syncthreads_or: a barrier that returns whether any thread's predicate was true. The second barrier keeps a
// later call from overwriting a vote that a slower thread has yet to read.
inline int syncthreads_or(int predicate) {
  State& s = state();
  s.votes[s.thread_idx.x] = predicate != 0;
  syncthreads();
  int any = 0;
  for (int v : s.votes) any |= v;
  syncthreads();
  return any;
}

// cp.async: DLSN_SIMT_ASYNC=deferred runs a thread's copies only when it waits for their group (the latest a
// GPU may land them: a read before the wait sees stale bytes); otherwise they run when issued (the earliest:
// a copy into a buffer other threads still read overwrites it). Testing both modes covers both hazards.
struct AsyncCopy {
  void* dst;
  const void* src;
  int bytes;
};

inline bool deferred_copies() {
  static const bool deferred = [] {
    const char* mode = std::getenv("DLSN_SIMT_ASYNC");
    return mode != nullptr && std::string(mode) == "deferred";
  }();
  return deferred;
}

inline void run_copy(const AsyncCopy& c) {
  std::memset(c.dst, 0, 16);
  if (c.bytes > 0) std::memcpy(c.dst, c.src, static_cast<size_t>(c.bytes));
}

// Per thread: the open group, then the committed groups, oldest first.
inline std::vector<std::vector<std::vector<AsyncCopy>>>& async_groups() {
  static std::vector<std::vector<std::vector<AsyncCopy>>> groups;
  const size_t threads = state().block_dim.x;
  if (groups.size() != threads) groups.assign(threads, {});
  return groups;
}

inline void async_copy(void* dst, const void* src, int bytes) {
  if (!deferred_copies()) return run_copy({dst, src, bytes});
  auto& mine = async_groups()[state().thread_idx.x];
  if (mine.empty()) mine.emplace_back();
  mine.back().push_back({dst, src, bytes});  // the open group is the last one
}

inline void async_commit() {
  if (!deferred_copies()) return;
  auto& mine = async_groups()[state().thread_idx.x];
  if (mine.empty()) mine.emplace_back();
  mine.emplace_back();  // a new open group; the previous one is committed
}

inline void check_no_copies_in_flight() {
  for (auto& mine : async_groups()) {
    for (const auto& group : mine) {
      if (!group.empty()) {
        std::fprintf(stderr, "simt: a block ended with cp.async copies it never waited for\n");
        std::exit(5);
      }
    }
    mine.clear();
  }
}

inline void async_wait(int pending) {
  if (!deferred_copies()) return;
  auto& mine = async_groups()[state().thread_idx.x];
  // committed groups: all but the last (open) one
  const int committed = mine.empty() ? 0 : static_cast<int>(mine.size()) - 1;
  for (int g = 0; g < committed - pending; ++g) {
    for (const AsyncCopy& c : mine.front()) run_copy(c);
    mine.erase(mine.begin());
  }
}

// The value of lane source(lane()) of the warp (every lane takes part, as with a full mask).
template <typename V, typename Source>
inline V shfl(V value, Source source) {
  static_assert(sizeof(V) == 4, "32-bit shuffles only");
  uint32_t bits;
  std::memcpy(&bits, &value, 4);
  slots(lane())[0] = bits;
  warp_sync();
  bits = slots(source(lane()) & 31)[0];
  warp_sync();
  std::memcpy(&value, &bits, 4);
  return value;
}

template <typename V>
inline V shfl_xor(V value, int mask) {
  return shfl(value, [mask](int l) { return l ^ mask; });
}

inline float element(uint32_t reg, int half_index, c10::BFloat16) {
  c10::BFloat16 v;
  v.x = static_cast<uint16_t>(reg >> (16 * half_index));
  return static_cast<float>(v);
}
inline float element(uint32_t reg, int half_index, c10::Half) {
  c10::Half v;
  v.x = static_cast<uint16_t>(reg >> (16 * half_index));
  return static_cast<float>(v);
}

// D += A B for the warp, PTX layouts: m16n8k16 (.bf16/.f16) or m16n8k8 (.tf32, T = float).
template <typename T>
inline void mma_sync(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  uint32_t* mine = slots(lane());
  for (int i = 0; i < 4; ++i) mine[i] = a[i];
  mine[4] = b[0];
  mine[5] = b[1];
  warp_sync();
  const int g = lane() / 4, t = lane() % 4;
  float result[4];
  for (int e = 0; e < 4; ++e) {
    const int row = g + 8 * (e >> 1), col = 2 * t + (e & 1);
    float acc = d[e];
    if constexpr (std::is_same_v<T, float>) {
      for (int k = 0; k < 8; ++k) {
        const uint32_t a_bits = slots((row % 8) * 4 + k % 4)[(row >= 8) + 2 * (k >= 4)];
        const uint32_t b_bits = slots(col * 4 + k % 4)[4 + (k >= 4)];
        if ((a_bits & 0x1fffu) || (b_bits & 0x1fffu)) {
          std::fprintf(stderr, "simt: tf32 operand with more than 10 mantissa bits\n");
          std::exit(4);
        }
        float x, y;
        std::memcpy(&x, &a_bits, 4);
        std::memcpy(&y, &b_bits, 4);
        acc += x * y;
      }
    } else {
      for (int k = 0; k < 16; ++k) {
        const uint32_t a_reg = slots((row % 8) * 4 + (k % 8) / 2)[(row >= 8) + 2 * (k >= 8)];
        const uint32_t b_reg = slots(col * 4 + (k % 8) / 2)[4 + (k >= 8)];
        acc += element(a_reg, k % 2, T{}) * element(b_reg, k % 2, T{});
      }
    }
    result[e] = acc;
  }
  warp_sync();
  for (int e = 0; e < 4; ++e) d[e] = result[e];
}

// ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16: lanes 8j..8j+7 give the rows of matrix j; lane l receives
// (row 2(l%4), column l/4) and (row 2(l%4) + 1, column l/4) of each matrix.
inline void ldmatrix_x4_trans(uint32_t (&r)[4], const void* row_address) {
  state().pointers[warp() * 32 + lane()] = row_address;
  warp_sync();
  const int l = lane();
  for (int j = 0; j < 4; ++j) {
    uint16_t lo, hi;
    const auto* row0 = static_cast<const unsigned char*>(state().pointers[warp() * 32 + 8 * j + 2 * (l % 4)]);
    const auto* row1 = static_cast<const unsigned char*>(state().pointers[warp() * 32 + 8 * j + 2 * (l % 4) + 1]);
    std::memcpy(&lo, row0 + 2 * (l / 4), 2);
    std::memcpy(&hi, row1 + 2 * (l / 4), 2);
    r[j] = uint32_t(lo) | (uint32_t(hi) << 16);
  }
  warp_sync();
}

}  // namespace simt

#define threadIdx (simt::state().thread_idx)
#define blockIdx (simt::state().block_idx)
#define blockDim (simt::state().block_dim)
#define gridDim (simt::state().grid_dim)
#define DLSN_DYNAMIC_SHARED(name) unsigned char* name = simt::state().dynamic_shared.data()

inline void __syncthreads() { simt::syncthreads(); }
inline void __syncwarp(unsigned = 0xffffffffu) { simt::warp_sync(); }
template <typename V>
inline V __shfl_xor_sync(unsigned, V value, int mask) {
  return simt::shfl_xor(value, mask);
}
template <typename V>
inline V __shfl_sync(unsigned, V value, int source) {
  return simt::shfl(value, [source](int) { return source; });
}
inline int __syncthreads_or(int predicate) { return simt::syncthreads_or(predicate); }
// Fibers never run at the same time: a read-modify-write is atomic.
inline int atomicMax(int* address, int value) {
  const int old = *address;
  if (value > old) *address = value;
  return old;
}
