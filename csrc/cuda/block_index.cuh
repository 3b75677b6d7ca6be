// The work item of an attention block: blocks enumerate (n, round, chunk, tile) with the tile fastest, so
// the blocks of one chunk run side by side and share its gathered rows in L2. Kernels without a round
// dimension (the backward, one launch per round) pass n_rounds = 1. Torch-free.
#pragma once

#include <cstdint>

#include "slot_layout.h"

namespace dlsn {
namespace cuda_impl {

struct BlockWork {
  int64_t tile, chunk, round, n;
};

__host__ __device__ inline BlockWork decode_block(int64_t block, int64_t n_tiles, int64_t n_chunks, int64_t n_rounds) {
  BlockWork w;
  w.tile = block % n_tiles;
  block /= n_tiles;
  w.chunk = block % n_chunks;
  block /= n_chunks;
  w.round = block % n_rounds;
  w.n = block / n_rounds;
  return w;
}

// The same decomposition in 32-bit arithmetic, for the tensor-core kernels (gridDim.x < 2^31): a 32-bit
// division is a few instructions, a 64-bit one a subroutine.
struct BlockWork32 {
  int tile, chunk, round, n;
};

__host__ __device__ inline BlockWork32 decode_block32(unsigned block, unsigned n_tiles, unsigned n_chunks,
                                                      unsigned n_rounds) {
  BlockWork32 w;
  unsigned rest = block / n_tiles;
  w.tile = static_cast<int>(block - rest * n_tiles);
  block = rest;
  rest = block / n_chunks;
  w.chunk = static_cast<int>(block - rest * n_chunks);
  block = rest;
  rest = block / n_rounds;
  w.round = static_cast<int>(block - rest * n_rounds);
  w.n = static_cast<int>(rest);
  return w;
}

// The sorted-slot layout of one (n, round) row in 32-bit ints (L + pad < 2^31, checked by registration.cpp),
// without divisions on the common paths: the position of a slot, and the key chunks of a query chunk.
struct RowLayout32 {
  const int64_t* perm_row;  // [L]
  int length, chunk, pad, n_chunks;

  // slot_position of slot_layout.h: a padded slot (slot >= L) holds perm[(slot - pad) mod L]; slot - pad
  // is in [0, L) unless L < pad, the one case that needs the remainder. There s < 0, and s mod L is
  // L - (-s mod L) (or 0): one unsigned remainder, a shorter instruction sequence than a signed one and half
  // the two a C++ (s % L + L) % L compiles to.
  __host__ __device__ int position(int slot) const {
    int s = slot;
    if (s >= length) {
      s -= pad;
      if (s < 0) {
        const int back = static_cast<int>(static_cast<unsigned>(-s) % static_cast<unsigned>(length));
        s = back == 0 ? 0 : length - back;
      }
    }
    return static_cast<int>(perm_row[s]);
  }
  // key_chunk_of: c, c - 1, c + 1 (mod nc), t = 0, 1, 2.
  __host__ __device__ int key_chunk(int c, int t) const {
    if (t == 0) return c;
    if (t == 1) return c == 0 ? n_chunks - 1 : c - 1;
    return c + 1 == n_chunks ? 0 : c + 1;
  }
  // query_chunk_reading: ck, ck + 1, ck - 1 (mod nc).
  __host__ __device__ int query_chunk(int ck, int t) const {
    if (t == 0) return ck;
    if (t == 1) return ck + 1 == n_chunks ? 0 : ck + 1;
    return ck == 0 ? n_chunks - 1 : ck - 1;
  }
  // Position of key `key` (0..3K-1, DESIGN.md 1.4 order) of query chunk c; -1 past 3K.
  __host__ __device__ int key_position(int c, int key) const {
    if (key >= 3 * chunk) return -1;
    const int t = key < chunk ? 0 : key < 2 * chunk ? 1 : 2;
    return position(key_chunk(c, t) * chunk + key - t * chunk);
  }
};

// Key `key` of a step: its position in the block's batch row (-1 past 3K) and its inverse norm (0 there).
struct KeyMeta {
  int pos;
  float inv;
};

__host__ __device__ inline KeyMeta key_meta(const RowLayout32& row, const float* inv_norm_n, int c, int key) {
  KeyMeta k{row.key_position(c, key), 0.f};
  if (k.pos >= 0) k.inv = inv_norm_n[k.pos];
  return k;
}

}  // namespace cuda_impl
}  // namespace dlsn
