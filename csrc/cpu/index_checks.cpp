// Index checks of the CPU kernels: perm must be a permutation of 0..L-1 per (n, round) and codes must
// lie in [0, n_buckets). The raw torch.ops.dlsn ops are public, so the kernels cannot rely on the
// Python checks: a value out of range would read out of bounds, a repeated value would leave rows of
// the output (and of the backward's inverse permutation) unwritten.
//
// One pass per row with a per-thread "seen" buffer: O(L) per row, far below the attention's cost.
// Rows are scanned in parallel; the error reported is the first bad entry in (n, round, position)
// order whatever the thread count, and the messages match the Python checks (dlsn_kernels/_checks.py).
#include <ATen/Parallel.h>

#include <algorithm>
#include <limits>
#include <vector>

#include "checks.h"
#include "cpu/cpu_kernels.h"

namespace dlsn::cpu {
namespace {

constexpr int64_t kNone = std::numeric_limits<int64_t>::max();

struct RowFault {
  int64_t oob = kNone;  // first position whose value is outside the allowed range
  int64_t dup = kNone;  // first position whose value occurs more than once in the row
};

// The first row (in row order) holding a fault of the given kind, or -1.
template <typename Member>
int64_t first_row_with(const std::vector<RowFault>& faults, Member member) {
  for (size_t row = 0; row < faults.size(); ++row) {
    if (faults[row].*member != kNone) return static_cast<int64_t>(row);
  }
  return -1;
}

}  // namespace

void check_permutation(const at::Tensor& perm64, const char* name) {
  const int64_t rows = perm64.size(0) * perm64.size(1), length = perm64.size(2);
  if (rows == 0 || length == 0) return;
  const int64_t* data = perm64.data_ptr<int64_t>();
  std::vector<RowFault> faults(rows);
  // Rows in tasks of at least ~64k entries: a small perm (the training shape's 12 rows of 2304) runs on
  // the calling thread instead of paying a thread-pool wake-up that costs more than the check.
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 16) / length);
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    std::vector<int32_t> count(length);
    for (int64_t row = begin; row < end; ++row) {
      const int64_t* p = data + row * length;
      std::fill(count.begin(), count.end(), 0);
      bool repeated = false;
      for (int64_t s = 0; s < length; ++s) {
        const int64_t value = p[s];
        if (value < 0 || value >= length) {
          faults[row].oob = s;
          break;
        }
        repeated |= ++count[value] > 1;
      }
      if (faults[row].oob != kNone || !repeated) continue;
      for (int64_t s = 0; s < length; ++s) {
        if (count[p[s]] > 1) {
          faults[row].dup = s;
          break;
        }
      }
    }
  });
  const int64_t rounds = perm64.size(1);
  const int64_t oob_row = first_row_with(faults, &RowFault::oob);
  if (oob_row >= 0) {
    const int64_t s = faults[oob_row].oob;
    TORCH_CHECK_VALUE(false, name, " must hold positions in [0, L=", length, "): ", name, "[n=", oob_row / rounds,
                      ", round=", oob_row % rounds, ", position=", s, "] = ", data[oob_row * length + s]);
  }
  const int64_t dup_row = first_row_with(faults, &RowFault::dup);
  if (dup_row >= 0) {
    const int64_t s = faults[dup_row].dup;
    TORCH_CHECK_VALUE(false, name, " must be a permutation of 0..L-1 for each (n, round), but ", name, "[n=",
                      dup_row / rounds, ", round=", dup_row % rounds, ", position=", s, "] = ",
                      data[dup_row * length + s], " occurs more than once in that row");
  }
}

template <typename index_t>
void check_codes_typed(const at::Tensor& codes, int64_t n_buckets) {
  const int64_t total = codes.numel(), rounds = codes.size(1), length = codes.size(2);
  const index_t* data = codes.data_ptr<index_t>();
  // A cheap vectorisable scan first; only a failure pays for locating the first bad entry.
  bool bad = false;
  for (int64_t i = 0; i < total; ++i) {
    const int64_t c = static_cast<int64_t>(data[i]);
    bad |= c < 0 || c >= n_buckets;
  }
  if (!bad) return;
  for (int64_t i = 0; i < total; ++i) {
    const int64_t c = static_cast<int64_t>(data[i]);
    if (c >= 0 && c < n_buckets) continue;
    const int64_t row = i / length;
    TORCH_CHECK_VALUE(false, "codes must lie in [0, n_buckets=", n_buckets, "): codes[n=", row / rounds,
                      ", round=", row % rounds, ", position=", i % length, "] = ", c);
  }
}

void check_codes(const at::Tensor& codes, int64_t n_buckets) {
  if (codes.numel() == 0) return;
  if (codes.scalar_type() == at::kLong) {
    check_codes_typed<int64_t>(codes, n_buckets);
  } else {
    check_codes_typed<int32_t>(codes, n_buckets);
  }
}

}  // namespace dlsn::cpu
