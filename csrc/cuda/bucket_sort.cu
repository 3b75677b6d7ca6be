// Stable counting sort of the hash codes on CUDA (DESIGN.md 1.2): perm[n, r, :] = positions ordered by (code, position).
//
// Who owns what: every (n, r) row of L codes is cut into S segments of `segment` positions; one warp owns
// one (row, segment) and walks it in order, 32 positions at a time.
//   1. histogram: counts[row, b, s] = number of positions of segment s with code b (the warp's leader of
//      each group of equal codes adds the group size: no atomics, every counter has one writer);
//   2. exclusive scan of counts[row] flattened in (b, s) order (at::cumsum): offsets[row, b, s] is where
//      the positions of bucket b that lie in segment s start in the sorted row;
//   3. scatter: the warp walks its segment again; a position's destination is offsets[row, b, s] plus the
//      number of equal codes on lower lanes of the same step (__match_any_sync); the group leader then
//      advances offsets[row, b, s]. Lower positions always land first, so the sort is stable.
#include "common.cuh"

namespace dlsn {
namespace cuda_impl {
namespace {

constexpr int kSortWarpsPerBlock = 4;
constexpr int64_t kMinSegment = 1024;
constexpr int64_t kMaxSegmentsPerRow = 128;  // bounds the size of counts for long rows

// Code at position l of a row, or -1 past the end of the segment. registration.cpp refuses codes outside
// [0, n_buckets) before launch; the assert is a last guard for a caller that bypasses it.
template <typename code_t>
__device__ __forceinline__ int load_code(const code_t* code_row, int64_t l, int64_t end, int64_t n_buckets) {
  if (l >= end) return -1;
  const int64_t code = static_cast<int64_t>(code_row[l]);
  const bool in_range = code >= 0 && code < n_buckets;
  CUDA_KERNEL_ASSERT(in_range && "bucket_sort: codes must lie in [0, n_buckets)");
  return in_range ? static_cast<int>(code) : -1;
}

template <typename code_t>
__global__ void __launch_bounds__(kSortWarpsPerBlock* kWarp)
    bucket_histogram_kernel(const code_t* __restrict__ codes, int64_t* __restrict__ counts, int64_t n_rows,
                            int64_t length, int64_t n_buckets, int64_t n_segments, int64_t segment) {
  const int lane = threadIdx.x % kWarp;
  const int64_t task = int64_t(blockIdx.x) * kSortWarpsPerBlock + threadIdx.x / kWarp;  // (row, segment)
  if (task >= n_rows * n_segments) return;  // the whole warp leaves together
  const int64_t row = task / n_segments, s = task % n_segments;
  const code_t* code_row = codes + row * length;
  int64_t* row_counts = counts + row * n_buckets * n_segments;
  const int64_t begin = s * segment, end = min(begin + segment, length);
  for (int64_t base = begin; base < end; base += kWarp) {
    const int code = load_code(code_row, base + lane, end, n_buckets);
    const unsigned peers = __match_any_sync(kFullMask, code);
    const bool leader = (__ffs(peers) - 1) == lane;
    if (leader && code >= 0) row_counts[code * n_segments + s] += __popc(peers);
    __syncwarp();  // the next step's leader may be another lane of this warp
  }
}

template <typename code_t>
__global__ void __launch_bounds__(kSortWarpsPerBlock* kWarp)
    bucket_scatter_kernel(const code_t* __restrict__ codes, int64_t* __restrict__ offsets,
                          int64_t* __restrict__ perm, int64_t n_rows, int64_t length, int64_t n_buckets,
                          int64_t n_segments, int64_t segment) {
  const int lane = threadIdx.x % kWarp;
  const int64_t task = int64_t(blockIdx.x) * kSortWarpsPerBlock + threadIdx.x / kWarp;
  if (task >= n_rows * n_segments) return;
  const int64_t row = task / n_segments, s = task % n_segments;
  const code_t* code_row = codes + row * length;
  int64_t* row_offsets = offsets + row * n_buckets * n_segments;
  int64_t* perm_row = perm + row * length;
  const int64_t begin = s * segment, end = min(begin + segment, length);
  const unsigned lower_lanes = (1u << lane) - 1u;
  for (int64_t base = begin; base < end; base += kWarp) {
    const int64_t l = base + lane;
    const int code = load_code(code_row, l, end, n_buckets);
    const unsigned peers = __match_any_sync(kFullMask, code);
    int64_t start = 0;
    if (code >= 0) {
      start = row_offsets[code * n_segments + s];
      perm_row[start + __popc(peers & lower_lanes)] = l;
    }
    __syncwarp();  // every member of the group has read the offset before the leader moves it
    if (code >= 0 && (__ffs(peers) - 1) == lane) row_offsets[code * n_segments + s] = start + __popc(peers);
    __syncwarp();
  }
}

}  // namespace

at::Tensor bucket_sort_cuda(const at::Tensor& codes, int64_t n_buckets) {
  const c10::cuda::CUDAGuard guard(codes.device());
  const int64_t n_rows = codes.size(0) * codes.size(1), length = codes.size(2);
  auto perm = at::empty(codes.sizes(), codes.options().dtype(at::kLong));
  if (n_rows == 0 || length == 0) return perm;

  // Segments of at least kMinSegment positions (a multiple of the warp), at most kMaxSegmentsPerRow per row.
  int64_t segment = std::max(kMinSegment, ceil_div(length, kMaxSegmentsPerRow));
  segment = ceil_div(segment, kWarp) * kWarp;
  const int64_t n_segments = ceil_div(length, segment);
  auto counts = at::zeros({n_rows, n_buckets * n_segments}, codes.options().dtype(at::kLong));

  const int64_t n_tasks = n_rows * n_segments;
  const auto blocks = static_cast<unsigned>(ceil_div(n_tasks, kSortWarpsPerBlock));
  const auto stream = at::cuda::getCurrentCUDAStream();
  dispatch_index(codes.scalar_type(), [&](auto index) {
    using index_t = decltype(index);
    bucket_histogram_kernel<index_t><<<blocks, kSortWarpsPerBlock * kWarp, 0, stream>>>(
        codes.data_ptr<index_t>(), counts.data_ptr<int64_t>(), n_rows, length, n_buckets, n_segments, segment);
  });
  // Exclusive scan along (bucket, segment); at::cumsum runs on the current stream.
  auto offsets = at::cumsum(counts, 1).sub_(counts);
  dispatch_index(codes.scalar_type(), [&](auto index) {
    using index_t = decltype(index);
    bucket_scatter_kernel<index_t><<<blocks, kSortWarpsPerBlock * kWarp, 0, stream>>>(
        codes.data_ptr<index_t>(), offsets.data_ptr<int64_t>(), perm.data_ptr<int64_t>(), n_rows, length, n_buckets,
        n_segments, segment);
  });
  return perm;
}

}  // namespace cuda_impl
}  // namespace dlsn
