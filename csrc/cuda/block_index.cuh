// The work item of an attention block: blocks enumerate (n, round, chunk, tile) with the tile fastest, so
// the blocks of one chunk run side by side and share its gathered rows in L2. Kernels without a round
// dimension (the backward, one launch per round) pass n_rounds = 1. Torch-free.
#pragma once

#include <cstdint>

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

}  // namespace cuda_impl
}  // namespace dlsn
