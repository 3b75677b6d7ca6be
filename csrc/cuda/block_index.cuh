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

// Key `key` (0..3K-1, DESIGN.md 1.4 order) of query chunk c in a row of perm: its xm row n*L + position and its
// inverse norm; row -1 and norm 0 past 3K.
struct KeyMeta {
  int64_t row;
  float inv;
};

__host__ __device__ inline KeyMeta key_meta(const int64_t* perm_row, const float* inv_norm, int64_t n, int64_t c,
                                            int64_t key, int64_t length, int64_t chunk, int64_t pad,
                                            int64_t n_chunks) {
  KeyMeta k{-1, 0.f};
  if (key < 3 * chunk) {
    const int64_t slot = key_chunk_of(c, static_cast<int>(key / chunk), n_chunks) * chunk + key % chunk;
    k.row = n * length + slot_position(perm_row, slot, length, pad);
    k.inv = inv_norm[k.row];
  }
  return k;
}

}  // namespace cuda_impl
}  // namespace dlsn
