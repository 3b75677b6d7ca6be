// Forward of the chunked attention on CUDA: chunk_attention (per round) and gla_attention (hash, sort, and
// rounds merged on the fly), DESIGN "Forward". Two kernels: the tensor-core one (chunk_attention_fwd_tc.cuh)
// for bfloat16/float16, and float32 when the precision policy allows TF32; and the scalar one
// (chunk_attention_fwd_simt.cuh), IEEE float32 FFMA, for float32 under "highest" and for what the tensor-core
// kernel cannot take (GPUs before sm_80, channel counts whose tiles exceed the shared memory), in float32.
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
//   - The inverse key norms 1 / max(||xm_j||, 5e-5) come from key_norms_kernel (once per call, overflow-safe,
//     shared with the tensor-core kernel), and so do the query rows' scale exponents (key_norms.cuh).
// lss undefined (lss=None): the kernels get nullptr and read no learned score.
// chunk_attention writes out [N,R,L,Cv] and lse [N,R,L] at the query's original position (slot < L only).
// gla_attention launches one round at a time and merges into a float32 running (y, lse) at the position:
// lse' = logaddexp(lse, lse_r), y = y e^(lse - lse') + out_r e^(lse_r - lse'). The lse of the previous
// round is read from one buffer and the new one written to another (the column slices of a position run
// concurrently), so there is no race; round 0 writes.
#include <tuple>

#include "chunk_attention_fwd_simt.cuh"
#include "chunk_attention_fwd_tc.cuh"
#include "common.cuh"

namespace dlsn {
namespace cuda_impl {
namespace {

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

// The scalar kernel's arguments; lss undefined: no learned score.
template <typename T, typename idx_t>
ForwardArgs<T, idx_t> forward_args(const Geometry& g, const at::Tensor& xm, const at::Tensor& v,
                                   const at::Tensor& lss, const at::Tensor& perm, const KeyNorms& norms) {
  ForwardArgs<T, idx_t> a{};
  a.xm = xm.data_ptr<T>();
  a.v = v.data_ptr<T>();
  a.lss = lss.defined() ? lss.data_ptr<T>() : nullptr;
  a.perm = perm.data_ptr<idx_t>();
  a.inv_norm = norms.inv.data_ptr<float>();
  a.row_exp = norms.row_exp.data_ptr<int>();
  a.top_exp = norms.top_exp.data_ptr<int>();
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

// The tensor-core kernel when the dtype, precision policy and device allow it and its shared memory fits
// (the variant without lss has no lss tiles).
constexpr const char* kFwdTcName = "chunk_attention_fwd_tc_kernel";

template <typename T>
auto* tc_forward_kernel(bool has_lss) {
  return has_lss ? &tc::chunk_attention_fwd_tc_kernel<T, true> : &tc::chunk_attention_fwd_tc_kernel<T, false>;
}

bool use_tensor_cores(const at::Tensor& xm, bool has_lss) {
  if (!tensor_cores_allowed(xm)) return false;
  bool fits = false;
  dispatch_float(xm.scalar_type(), [&](auto element) {
    using scalar_t = decltype(element);
    tc::ForwardTcArgs<scalar_t> a{};
    tc::tc_forward_sizes(a, 1, xm.size(1), xm.size(2), 1, 1);
    fits = fits_shared_memory<scalar_t>(tc_forward_kernel<scalar_t>(has_lss),
                                        tc::tc_forward_smem<scalar_t>(a.cm_pad, has_lss).bytes, kFwdTcName);
  });
  return fits;
}

// Fills the pointers and sizes shared by both ops; the caller sets the outputs and the round range.
template <typename T>
tc::ForwardTcArgs<T> tc_forward_args(const at::Tensor& xm, const at::Tensor& v, const at::Tensor& lss,
                                     const at::Tensor& perm, const KeyNorms& norms, int64_t chunk) {
  tc::ForwardTcArgs<T> a{};
  tc::tc_forward_sizes(a, perm.size(1), xm.size(1), xm.size(2), v.size(2), chunk);
  tc::tc_forward_inputs(a, xm.data_ptr<T>(), v.data_ptr<T>(), lss.defined() ? lss.data_ptr<T>() : nullptr,
                        perm.data_ptr<int64_t>(), norms.inv.data_ptr<float>(), norms.row_exp.data_ptr<int>(),
                        norms.top_exp.data_ptr<int>());
  return a;
}

template <typename T>
void launch_tc_forward(const tc::ForwardTcArgs<T>& a, int64_t n, cudaStream_t stream) {
  const bool has_lss = a.lss != nullptr;
  const int64_t smem = tc::tc_forward_smem<T>(a.cm_pad, has_lss).bytes;
  auto* kernel = tc_forward_kernel<T>(has_lss);
  if (!allow_shared_memory<T>(kernel, smem, kFwdTcName)) return;  // registration.cpp raises
  const dim3 grid(static_cast<unsigned>(n * a.rounds_in_launch * a.n_chunks * a.n_qtiles),
                  static_cast<unsigned>(tc::tc_forward_slices(a.cv)));
  kernel<<<grid, tc::kFwdThreads, smem, stream>>>(a);
}

// The scalar kernel's float32 copy of lss (a no-op for float32), or undefined without one.
at::Tensor float_or_absent(const at::Tensor& t) { return t.defined() ? t.to(at::kFloat) : at::Tensor(); }

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
  const KeyNorms norms = key_norms(xm, stream);
  if (use_tensor_cores(xm, lss.defined())) {
    dispatch_float(xm.scalar_type(), [&](auto element) {
      using scalar_t = decltype(element);
      auto a = tc_forward_args<scalar_t>(xm, v, lss, perm64, norms, chunk_size);
      a.round_offset = 0;
      a.rounds_in_launch = g.rounds;
      a.out = out.data_ptr<scalar_t>();
      a.lse = lse.data_ptr<float>();
      launch_tc_forward(a, g.n, stream);
    });
    return {out, lse};
  }
  // The scalar kernel, in float32 (a no-op cast for float32 inputs).
  const at::Tensor xm32 = xm.to(at::kFloat), v32 = v.to(at::kFloat), lss32 = float_or_absent(lss);
  at::Tensor out32 = xm.scalar_type() == at::kFloat ? out : at::empty(out.sizes(), out.options().dtype(at::kFloat));
  auto a = forward_args<float, int64_t>(g, xm32, v32, lss32, perm64, norms);
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
  const KeyNorms norms = key_norms(xm, stream);
  if (use_tensor_cores(xm, lss.defined())) {
    dispatch_float(xm.scalar_type(), [&](auto element) {
      using scalar_t = decltype(element);
      auto a = tc_forward_args<scalar_t>(xm, v, lss, perm, norms, chunk_size);
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
    const at::Tensor xm32 = xm.to(at::kFloat), v32 = v.to(at::kFloat), lss32 = float_or_absent(lss);
    for (int64_t r = 0; r < g.rounds; ++r) {
      auto a = forward_args<float, int64_t>(g, xm32, v32, lss32, perm, norms);
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
