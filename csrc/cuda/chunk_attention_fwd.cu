// Forward of the chunked attention on CUDA: chunk_attention (per round) and gla_attention (hash, sort, and
// rounds merged on the fly), DESIGN "Forward". Two kernels: the tensor-core one (chunk_attention_fwd_tc.cuh)
// for bfloat16/float16, and float32 when the precision policy allows TF32; and the scalar one below, IEEE
// float32 FFMA, for float32 under "highest" and for what the tensor-core kernel cannot take (GPUs before
// sm_80, channel counts whose tiles exceed the shared memory), computed in float32.
//
// Who owns what: one block (256 threads, 8 warps) per (n, r, query chunk c, query tile qt, column slice).
//   - The block's queries are the 32 sorted slots c*K + qt*32 + 0..31 (query row q = 0..31); rows past the
//     chunk (i >= K) are computed on zeros and dropped; padded slots (slot >= L) are computed and dropped.
//   - The block's output columns are [slice*128, slice*128 + 128) of Cv: wide Cv is split over blockIdx.y
//     (each slice recomputes the scores, which is cheap next to the gather of v).
//   - Keys: the 3K slots of chunks c, c-1, c+1 (DESIGN order) are streamed 32 at a time (key = lane).
//     Positions are gathered through perm inside the kernel; nothing sorted or padded is materialised.
//   - Thread (warp w, lane j) holds the scores of query rows w + 8a (a = 0..3) against key j, and the
//     running softmax (m, l) of those rows (identical in all lanes of the warp) plus the output accumulator
//     of columns slice*128 + j + 32u (u = 0..3) of those rows.
//   - Key normalisation max(||xm_j||, 5e-5) is computed in registers while the dot products run.
// chunk_attention writes out [N,R,L,Cv] and lse [N,R,L] at the query's original position (slot < L only).
// gla_attention launches one round at a time and merges into a float32 running (y, lse) at the position:
// lse' = logaddexp(lse, lse_r), y = y e^(lse - lse') + out_r e^(lse_r - lse'). The lse of the previous
// round is read from one buffer and the new one written to another (the column slices of a position run
// concurrently), so there is no race; round 0 writes.
#include <tuple>

#include "chunk_attention_fwd_tc.cuh"
#include "common.cuh"

namespace dlsn {
namespace cuda_impl {
namespace {

template <typename T, typename idx_t>
struct ForwardArgs {
  const T* xm;      // [N, L, Cm]
  const T* v;       // [N, L, Cv]
  const T* lss;     // [N, L, K]
  const idx_t* perm;  // [N, R, L]
  int64_t rounds, length, chunk, cm, cv, n_chunks, n_qtiles, pad;
  int64_t round_offset, rounds_in_launch;  // rounds handled by this launch: round_offset + 0..rounds_in_launch-1
  // chunk_attention (kMerge = false)
  T* out;      // [N, R, L, Cv]
  float* lse;  // [N, R, L]
  // gla_attention (kMerge = true, one round per launch)
  float* y_acc;           // [N, L, Cv] running output
  const float* lse_prev;  // [N, L] running lse before this round; nullptr for round 0
  float* lse_next;        // [N, L] running lse after this round
};

template <typename T, typename idx_t, bool kMerge>
__global__ void __launch_bounds__(kThreads) chunk_attention_fwd_kernel(const ForwardArgs<T, idx_t> a) {
  __shared__ float s_a[kTile][kChanTile + 1];
  __shared__ float s_b[kTile][kChanTile + 1];
  __shared__ float s_v[kTile][kCols];
  __shared__ int64_t s_qrow[kTile];    // xm row n*L + position of query row q; -1 past the chunk
  __shared__ int64_t s_qstore[kTile];  // position where row q is written; -1 for padding / past the chunk
  __shared__ int s_qslot[kTile];       // slot index i of row q within its chunk; -1 past the chunk
  __shared__ int64_t s_krow[kTile];    // xm/v/lss row n*L + position of key j of the current tile; -1 past 3K

  const int tid = threadIdx.x, lane = tid % kWarp, warp = tid / kWarp;
  const BlockWork work = decode_block(blockIdx.x, a.n_qtiles, a.n_chunks, a.rounds_in_launch);
  const int64_t qt = work.tile, c = work.chunk, r = a.round_offset + work.round, n = work.n;
  const int64_t L = a.length, K = a.chunk;
  const idx_t* perm_row = a.perm + (n * a.rounds + r) * L;
  const int64_t col0 = int64_t(blockIdx.y) * kCols;

  if (tid < kTile) {
    const int64_t i = qt * kTile + tid, slot = c * K + i;
    if (i < K) {
      const int64_t pos = slot_position(perm_row, slot, L, a.pad);
      s_qrow[tid] = n * L + pos;
      s_qstore[tid] = slot < L ? pos : -1;
      s_qslot[tid] = static_cast<int>(i);
    } else {
      s_qrow[tid] = -1;
      s_qstore[tid] = -1;
      s_qslot[tid] = -1;
    }
  }

  float m[kRowsPerWarp], l[kRowsPerWarp], acc[kRowsPerWarp][kColsPerLane];
#pragma unroll
  for (int ra = 0; ra < kRowsPerWarp; ++ra) {
    m[ra] = -INFINITY;
    l[ra] = 0.f;
#pragma unroll
    for (int u = 0; u < kColsPerLane; ++u) acc[ra][u] = 0.f;
  }

  const int64_t n_keys = 3 * K;
  for (int64_t k0 = 0; k0 < n_keys; k0 += kTile) {
    __syncthreads();  // everyone is done with s_krow and s_v of the previous key tile
    if (tid < kTile) {
      const int64_t key = k0 + tid;
      if (key < n_keys) {
        const int t = static_cast<int>(key / K);
        const int64_t slot = key_chunk_of(c, t, a.n_chunks) * K + key % K;
        s_krow[tid] = n * L + slot_position(perm_row, slot, L, a.pad);
      } else {
        s_krow[tid] = -1;
      }
    }
    __syncthreads();

    float s[kRowsPerWarp] = {};
    float key_sumsq = 0.f;
    tile_dot<T, true>(a.xm, s_qrow, a.xm, s_krow, a.cm, s, key_sumsq, s_a, s_b);
    const int64_t krow = s_krow[lane];
    const bool key_valid = krow >= 0;
    const float inv_norm = 1.f / fmaxf(sqrtf(key_sumsq), kKeyNormEpsF);

    // Online softmax of the tile; every tile holds at least one valid key (its first), so m stays finite.
    float p[kRowsPerWarp];
#pragma unroll
    for (int ra = 0; ra < kRowsPerWarp; ++ra) {
      const int i = s_qslot[warp + kWarps * ra];
      float score = -INFINITY;
      if (key_valid) score = s[ra] * inv_norm + (i >= 0 ? to_float(a.lss[krow * K + i]) : 0.f);
      const float m_new = fmaxf(m[ra], warp_max(score));
      p[ra] = key_valid ? expf(score - m_new) : 0.f;
      const float rescale = expf(m[ra] - m_new);  // 0 on the first tile (m = -inf)
      l[ra] = l[ra] * rescale + warp_sum(p[ra]);
      m[ra] = m_new;
#pragma unroll
      for (int u = 0; u < kColsPerLane; ++u) acc[ra][u] *= rescale;
    }

    // Values of the tile's keys, this block's column slice.
    for (int e = tid; e < kTile * kCols; e += kThreads) {
      const int row = e / kCols, cc = e % kCols;
      const int64_t col = col0 + cc, vrow = s_krow[row];
      s_v[row][cc] = (vrow >= 0 && col < a.cv) ? to_float(a.v[vrow * a.cv + col]) : 0.f;
    }
    __syncthreads();
    for (int j = 0; j < kTile; ++j) {
#pragma unroll
      for (int ra = 0; ra < kRowsPerWarp; ++ra) {
        const float pj = __shfl_sync(kFullMask, p[ra], j);
#pragma unroll
        for (int u = 0; u < kColsPerLane; ++u) acc[ra][u] += pj * s_v[j][lane + kWarp * u];
      }
    }
  }

#pragma unroll
  for (int ra = 0; ra < kRowsPerWarp; ++ra) {
    const int64_t pos = s_qstore[warp + kWarps * ra];
    if (pos < 0) continue;
    const float inv_l = 1.f / l[ra];
    const float lse_r = m[ra] + logf(l[ra]);
    if (!kMerge) {
      T* out_row = a.out + ((n * a.rounds + r) * L + pos) * a.cv;
#pragma unroll
      for (int u = 0; u < kColsPerLane; ++u) {
        const int64_t col = col0 + lane + kWarp * u;
        if (col < a.cv) out_row[col] = static_cast<T>(acc[ra][u] * inv_l);
      }
      if (blockIdx.y == 0 && lane == 0) a.lse[(n * a.rounds + r) * L + pos] = lse_r;
    } else {
      float* y_row = a.y_acc + (n * L + pos) * a.cv;
      float w_old = 0.f, w_new = 1.f, lse_merged = lse_r;
      if (a.lse_prev != nullptr) {
        const float lse_old = a.lse_prev[n * L + pos];
        const float hi = fmaxf(lse_old, lse_r);
        if (hi == -INFINITY) {
          lse_merged = -INFINITY;
          w_old = 1.f;
          w_new = 0.f;
        } else {
          lse_merged = hi + logf(expf(lse_old - hi) + expf(lse_r - hi));
          w_old = expf(lse_old - lse_merged);
          w_new = expf(lse_r - lse_merged);
        }
      }
#pragma unroll
      for (int u = 0; u < kColsPerLane; ++u) {
        const int64_t col = col0 + lane + kWarp * u;
        if (col >= a.cv) continue;
        const float out_r = acc[ra][u] * inv_l;
        y_row[col] = a.lse_prev != nullptr ? y_row[col] * w_old + out_r * w_new : out_r;
      }
      if (blockIdx.y == 0 && lane == 0) a.lse_next[n * L + pos] = lse_merged;
    }
  }
}

struct Geometry {
  int64_t n, length, cm, cv, chunk, rounds, n_chunks, pad, n_qtiles, n_slices;
};

Geometry geometry(const at::Tensor& xm, const at::Tensor& v, int64_t chunk, int64_t rounds) {
  Geometry g{};
  g.n = xm.size(0);
  g.length = xm.size(1);
  g.cm = xm.size(2);
  g.cv = v.size(2);
  g.chunk = chunk;
  g.rounds = rounds;
  const SlotLayout layout(g.length, chunk);
  g.n_chunks = layout.n_chunks;
  g.pad = layout.pad;
  g.n_qtiles = ceil_div(chunk, kTile);
  g.n_slices = std::max<int64_t>(1, ceil_div(g.cv, kCols));
  return g;
}

template <typename T, typename idx_t>
ForwardArgs<T, idx_t> forward_args(const Geometry& g, const at::Tensor& xm, const at::Tensor& v,
                                   const at::Tensor& lss, const at::Tensor& perm) {
  ForwardArgs<T, idx_t> a{};
  a.xm = xm.data_ptr<T>();
  a.v = v.data_ptr<T>();
  a.lss = lss.data_ptr<T>();
  a.perm = perm.data_ptr<idx_t>();
  a.rounds = g.rounds;
  a.length = g.length;
  a.chunk = g.chunk;
  a.cm = g.cm;
  a.cv = g.cv;
  a.n_chunks = g.n_chunks;
  a.n_qtiles = g.n_qtiles;
  a.pad = g.pad;
  return a;
}

dim3 forward_grid(const Geometry& g, int64_t rounds_in_launch) {
  const int64_t blocks = g.n * rounds_in_launch * g.n_chunks * g.n_qtiles;
  // Fits in gridDim.x and gridDim.y: registration.cpp checked it (check_forward_grid).
  return dim3(static_cast<unsigned>(blocks), static_cast<unsigned>(g.n_slices));
}

// The tensor-core kernel when the dtype, precision policy and device allow it and its shared memory fits.
constexpr const char* kFwdTcName = "chunk_attention_fwd_tc_kernel";

bool use_tensor_cores(const at::Tensor& xm) {
  if (!tensor_cores_allowed(xm)) return false;
  bool fits = false;
  dispatch_float(xm.scalar_type(), [&](auto element) {
    using scalar_t = decltype(element);
    tc::ForwardTcArgs<scalar_t> a{};
    tc::tc_forward_sizes(a, 1, xm.size(1), xm.size(2), 1, 1);
    fits = fits_shared_memory<scalar_t>(&tc::chunk_attention_fwd_tc_kernel<scalar_t>,
                                        tc::tc_forward_smem<scalar_t>(a.cm_pad).bytes, kFwdTcName);
  });
  return fits;
}

// Fills the pointers and sizes shared by both ops; the caller sets the outputs and the round range.
template <typename T>
tc::ForwardTcArgs<T> tc_forward_args(const at::Tensor& xm, const at::Tensor& v, const at::Tensor& lss,
                                     const at::Tensor& perm, const at::Tensor& inv_norm, int64_t chunk) {
  tc::ForwardTcArgs<T> a{};
  tc::tc_forward_sizes(a, perm.size(1), xm.size(1), xm.size(2), v.size(2), chunk);
  tc::tc_forward_inputs(a, xm.data_ptr<T>(), v.data_ptr<T>(), lss.data_ptr<T>(), perm.data_ptr<int64_t>(),
                        inv_norm.data_ptr<float>());
  return a;
}

template <typename T>
void launch_tc_forward(const tc::ForwardTcArgs<T>& a, int64_t n, cudaStream_t stream) {
  const int64_t smem = tc::tc_forward_smem<T>(a.cm_pad).bytes;
  auto* kernel = &tc::chunk_attention_fwd_tc_kernel<T>;
  if (!allow_shared_memory<T>(kernel, smem, kFwdTcName)) return;  // registration.cpp raises
  const dim3 grid(static_cast<unsigned>(n * a.rounds_in_launch * a.n_chunks * a.n_qtiles),
                  static_cast<unsigned>(tc::tc_forward_slices(a.cv)));
  kernel<<<grid, tc::kFwdThreads, smem, stream>>>(a);
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> chunk_attention_cuda(const at::Tensor& xm, const at::Tensor& v,
                                                        const at::Tensor& lss, const at::Tensor& perm,
                                                        int64_t chunk_size) {
  const c10::cuda::CUDAGuard guard(xm.device());
  const Geometry g = geometry(xm, v, chunk_size, perm.size(1));
  auto out = at::empty({g.n, g.rounds, g.length, g.cv}, v.options());
  auto lse = at::empty({g.n, g.rounds, g.length}, xm.options().dtype(at::kFloat));
  if (g.n == 0) return {out, lse};
  const auto stream = at::cuda::getCurrentCUDAStream();
  const at::Tensor perm64 = perm.to(at::kLong);
  if (use_tensor_cores(xm)) {
    const at::Tensor inv_norm = inverse_key_norms(xm, stream);
    dispatch_float(xm.scalar_type(), [&](auto element) {
      using scalar_t = decltype(element);
      auto a = tc_forward_args<scalar_t>(xm, v, lss, perm64, inv_norm, chunk_size);
      a.round_offset = 0;
      a.rounds_in_launch = g.rounds;
      a.out = out.data_ptr<scalar_t>();
      a.lse = lse.data_ptr<float>();
      launch_tc_forward(a, g.n, stream);
    });
    return {out, lse};
  }
  // The scalar kernel, in float32 (a no-op cast for float32 inputs).
  const at::Tensor xm32 = xm.to(at::kFloat), v32 = v.to(at::kFloat), lss32 = lss.to(at::kFloat);
  at::Tensor out32 = xm.scalar_type() == at::kFloat ? out : at::empty(out.sizes(), out.options().dtype(at::kFloat));
  auto a = forward_args<float, int64_t>(g, xm32, v32, lss32, perm64);
  a.round_offset = 0;
  a.rounds_in_launch = g.rounds;
  a.out = out32.data_ptr<float>();
  a.lse = lse.data_ptr<float>();
  chunk_attention_fwd_kernel<float, int64_t, false><<<forward_grid(g, g.rounds), kThreads, 0, stream>>>(a);
  if (xm.scalar_type() != at::kFloat) out.copy_(out32);
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> gla_attention_cuda(const at::Tensor& xm, const at::Tensor& v,
                                                                  const at::Tensor& lss, const at::Tensor& rot,
                                                                  int64_t chunk_size) {
  const c10::cuda::CUDAGuard guard(xm.device());
  const at::Tensor perm = bucket_sort_cuda(sblsh_hash_cuda(xm, rot), rot.size(2));
  const Geometry g = geometry(xm, v, chunk_size, rot.size(1));
  const auto f32 = xm.options().dtype(at::kFloat);
  auto y_acc = at::empty({g.n, g.length, g.cv}, f32);
  at::Tensor lse_cur = at::empty({g.n, g.length}, f32);
  at::Tensor lse_next = at::empty({g.n, g.length}, f32);
  if (g.n == 0) return {y_acc.to(xm.scalar_type()), lse_cur, perm};
  const auto stream = at::cuda::getCurrentCUDAStream();
  if (use_tensor_cores(xm)) {
    const at::Tensor inv_norm = inverse_key_norms(xm, stream);
    dispatch_float(xm.scalar_type(), [&](auto element) {
      using scalar_t = decltype(element);
      auto a = tc_forward_args<scalar_t>(xm, v, lss, perm, inv_norm, chunk_size);
      a.merge = true;
      a.y_acc = y_acc.data_ptr<float>();
      a.rounds_in_launch = 1;
      for (int64_t r = 0; r < g.rounds; ++r) {
        a.round_offset = r;
        a.lse_prev = r == 0 ? nullptr : lse_cur.data_ptr<float>();
        a.lse_next = lse_next.data_ptr<float>();
        launch_tc_forward(a, g.n, stream);
        std::swap(lse_cur, lse_next);  // lse_cur now holds the lse over rounds 0..r
      }
    });
  } else {
    // The scalar kernel, in float32 (a no-op cast for float32 inputs).
    const at::Tensor xm32 = xm.to(at::kFloat), v32 = v.to(at::kFloat), lss32 = lss.to(at::kFloat);
    for (int64_t r = 0; r < g.rounds; ++r) {
      auto a = forward_args<float, int64_t>(g, xm32, v32, lss32, perm);
      a.round_offset = r;
      a.rounds_in_launch = 1;
      a.y_acc = y_acc.data_ptr<float>();
      a.lse_prev = r == 0 ? nullptr : lse_cur.data_ptr<float>();
      a.lse_next = lse_next.data_ptr<float>();
      chunk_attention_fwd_kernel<float, int64_t, true><<<forward_grid(g, 1), kThreads, 0, stream>>>(a);
      std::swap(lse_cur, lse_next);
    }
  }
  at::Tensor y = xm.scalar_type() == at::kFloat ? y_acc : y_acc.to(xm.scalar_type());
  return {y, lse_cur, perm};
}

}  // namespace cuda_impl
}  // namespace dlsn
