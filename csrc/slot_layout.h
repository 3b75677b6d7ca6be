// The sorted-slot layout of one (n, round) row (DESIGN.md 1.3), shared by the CPU and CUDA kernels.
//
// perm [L] orders the positions; the row is padded to Lp = L + pad slots, a multiple of the chunk
// size K, and cut into nc = Lp / K chunks. Slot p < L holds perm[p]; a padded slot p >= L holds
// perm[(p - pad) mod L], a copy of a position that already has a real slot. With L < pad the index
// wraps more than once, so one position can have several padded copies. Query chunk c reads key
// chunks c, c - 1, c + 1 (mod nc), in that order (t = 0, 1, 2).
#pragma once

#include <c10/macros/Macros.h>

#include <cstdint>

namespace dlsn {

C10_HOST_DEVICE inline int64_t padding_for(int64_t length, int64_t chunk) { return (chunk - length % chunk) % chunk; }

// Position held by sorted slot `slot` (0 <= slot < Lp) of a row of perm.
template <typename idx_t>
C10_HOST_DEVICE inline int64_t slot_position(const idx_t* perm_row, int64_t slot, int64_t length, int64_t pad) {
  if (slot < length) return static_cast<int64_t>(perm_row[slot]);
  int64_t wrapped = (slot - pad) % length;
  if (wrapped < 0) wrapped += length;
  return static_cast<int64_t>(perm_row[wrapped]);
}

// The padded copies of the position held by real slot `slot` (0 <= slot < L) are the slots
// first_padded_copy(..), + L, + 2L, ... below Lp: p >= L with p - pad = slot (mod L), the first in [L, 2L).
// With pad == 0 it returns a slot >= Lp, so a loop over the copies runs zero times.
C10_HOST_DEVICE inline int64_t first_padded_copy(int64_t slot, int64_t length, int64_t pad) {
  return length + (slot + pad) % length;
}

// Key chunk t (0, 1, 2) of query chunk c: c, c - 1, c + 1 (mod nc), the order of the reference.
C10_HOST_DEVICE inline int64_t key_chunk_of(int64_t c, int t, int64_t n_chunks) {
  if (t == 0) return c;
  if (t == 1) return (c + n_chunks - 1) % n_chunks;
  return (c + 1) % n_chunks;
}

// The query chunk that reads key chunk ck as its key chunk t: ck, ck + 1, ck - 1 (mod nc).
C10_HOST_DEVICE inline int64_t query_chunk_reading(int64_t ck, int t, int64_t n_chunks) {
  if (t == 0) return ck;
  if (t == 1) return (ck + 1) % n_chunks;
  return (ck + n_chunks - 1) % n_chunks;
}

// The sizes of a row in one place, for host code that keeps them together.
struct SlotLayout {
  int64_t length, chunk, pad, padded, n_chunks;

  C10_HOST_DEVICE SlotLayout(int64_t length_, int64_t chunk_)
      : length(length_), chunk(chunk_), pad(padding_for(length_, chunk_)), padded(length_ + pad),
        n_chunks(padded / chunk_) {}

  template <typename idx_t>
  C10_HOST_DEVICE int64_t position(const idx_t* perm_row, int64_t slot) const {
    return slot_position(perm_row, slot, length, pad);
  }
  C10_HOST_DEVICE int64_t first_copy(int64_t slot) const { return first_padded_copy(slot, length, pad); }
  C10_HOST_DEVICE int64_t key_chunk(int64_t c, int t) const { return key_chunk_of(c, t, n_chunks); }
  C10_HOST_DEVICE int64_t query_chunk(int64_t c, int t) const { return query_chunk_reading(c, t, n_chunks); }
};

}  // namespace dlsn
