// Runs the CUDA kernels on the CPU through the SIMT emulator, launched in the order and with the arguments of the
// launchers in csrc/cuda/*.cu. Driven by tests/test_cuda_emulation.py:
//   harness forward  DTYPE N L CM CV K R MERGE EPS DIR      the tensor-core forward
//   harness scalar   fp32  N L CM CV K R MERGE EPS DIR      the scalar (IEEE float32) forward
//   harness backward DTYPE N L CM CV K R RG EPS DIR         the tensor-core backward
// DIR holds xm, v, lss (float32, rounded here to DTYPE) and perm (int64, [N, R, L]); without a file lss the
// kernels run without the learned score (lss=None: the kHasLss = false kernels, nullptr in the scalar one).
// forward writes out [N, R, L, Cv] and lse [N, R, L] (MERGE 0, chunk_attention) or y [N, L, Cv] and lse
// [N, L] (MERGE 1, the rounds merged as gla_attention does). backward also reads grad_out [N, RG, L, Cv]
// (rounded to DTYPE), delta and lse [N, RG, L] (float32) and writes dxm, dv, and dlss (with lss). Everything
// float32.
//   harness hash     DTYPE N L CM R B 0 0 EPS DIR
// reads xm [N, L, CM] and rot [CM, R, B] (rounded to DTYPE) and writes codes [N, R, L] (as float32).
#include "simt.h"

#include <algorithm>
#include <cstdio>
#include <string>
#include <vector>

#include "cuda/attention_bwd_steps.cuh"
#include "cuda/attention_bwd_tc.cuh"
#include "cuda/chunk_attention_fwd_simt.cuh"
#include "cuda/chunk_attention_fwd_tc.cuh"
#include "cuda/key_norms.cuh"
#include "cuda/sblsh_hash.cuh"
#include "cuda/staging.cuh"

namespace {

template <typename V>
std::vector<V> read_file(const std::string& path, size_t count) {
  std::vector<V> data(count);
  FILE* f = std::fopen(path.c_str(), "rb");
  if (f == nullptr || std::fread(data.data(), sizeof(V), count, f) != count) {
    std::fprintf(stderr, "cannot read %zu values from %s\n", count, path.c_str());
    std::exit(2);
  }
  std::fclose(f);
  return data;
}

void write_file(const std::string& path, const std::vector<float>& data) {
  FILE* f = std::fopen(path.c_str(), "wb");
  std::fwrite(data.data(), sizeof(float), data.size(), f);
  std::fclose(f);
}

template <typename T>
std::vector<T> to_type(const std::vector<float>& x) {
  return std::vector<T>(x.begin(), x.end());
}

bool file_exists(const std::string& path) {
  FILE* f = std::fopen(path.c_str(), "rb");
  if (f != nullptr) std::fclose(f);
  return f != nullptr;
}

// lss rounded to T, or empty without a file lss (no learned score); lss_ptr: its data or nullptr.
template <typename T>
std::vector<T> read_lss(const std::string& dir, int64_t count) {
  return file_exists(dir + "/lss") ? to_type<T>(read_file<float>(dir + "/lss", count)) : std::vector<T>();
}

template <typename T>
const T* lss_ptr(const std::vector<T>& lss) {
  return lss.empty() ? nullptr : lss.data();
}

// key_norms() of common.cuh: the inverse norms, the rows' magnitude exponents and the largest (zeroed first).
struct Norms {
  std::vector<float> inv;
  std::vector<int> row_exp;
  int top_exp = 0;
};

template <typename T>
Norms key_norms(const std::vector<T>& xm, int64_t rows, int64_t cm, float eps) {
  Norms k{std::vector<float>(rows), std::vector<int>(rows)};
  simt::launch(dim3{static_cast<unsigned>((rows + 7) / 8)}, dim3{256}, 0, [&] {
    dlsn::cuda_impl::tc::key_norms_kernel<T>(xm.data(), k.inv.data(), k.row_exp.data(), &k.top_exp, rows, cm, eps);
  });
  return k;
}

// attention_backward_cuda's tensor-core path.
template <typename T>
int run_backward(int64_t n, int64_t length, int64_t cm, int64_t cv, int64_t chunk, int64_t rounds,
                 int64_t grad_rounds, float eps, const std::string& dir) {
  using namespace dlsn::cuda_impl;
  using namespace dlsn::cuda_impl::tc;
  const auto xm = to_type<T>(read_file<float>(dir + "/xm", n * length * cm));
  const auto v = to_type<T>(read_file<float>(dir + "/v", n * length * cv));
  const auto lss = read_lss<T>(dir, n * length * chunk);
  const bool has_lss = !lss.empty();
  const auto perm = read_file<int64_t>(dir + "/perm", n * rounds * length);
  const auto grad_out = to_type<T>(read_file<float>(dir + "/grad_out", n * grad_rounds * length * cv));
  const auto delta = read_file<float>(dir + "/delta", n * grad_rounds * length);
  const auto lse = read_file<float>(dir + "/lse", n * grad_rounds * length);
  const Norms norms = key_norms(xm, n * length, cm, eps);

  BackwardTcArgs<T> a{};
  tc_backward_sizes(a, rounds, grad_rounds, length, cm, cv, chunk);
  const int64_t lp = a.padded_length;
  std::vector<int64_t> inv(n * rounds * length);
  // without lss the dlss buffers are empty and go to the kernels as nullptr, as in the launcher
  const int64_t lss_width = has_lss ? chunk : 0;
  std::vector<float> dq_acc(n * length * cm), dkn_acc(n * length * cm), dv_acc(n * length * cv),
      dlss_acc(n * length * lss_width);
  std::vector<float> dv_slot(n * lp * cv, NAN), dkn_slot(n * lp * cm, NAN), dlss_slot(n * lp * lss_width, NAN);
  float* dlss_slot_ptr = has_lss ? dlss_slot.data() : nullptr;
  float* dlss_acc_ptr = has_lss ? dlss_acc.data() : nullptr;
  tc_backward_inputs(a, grad_out.data(), delta.data(), lse.data(), xm.data(), v.data(), lss_ptr(lss), perm.data(),
                     norms.inv.data());
  a.dq_acc = dq_acc.data();
  a.dv_slot = dv_slot.data();
  a.dkn_slot = dkn_slot.data();
  a.dlss_slot = dlss_slot_ptr;

  simt::launch(dim3{static_cast<unsigned>((n * rounds * length + 255) / 256)}, dim3{256}, 0,
               [&] { inverse_perm_kernel<int64_t>(perm.data(), inv.data(), n * rounds, length); });
  const unsigned blocks = static_cast<unsigned>(n * a.n_chunks * a.n_own_tiles);
  for (int64_t r = 0; r < rounds; ++r) {
    a.round = r;
    const auto pass = [&](BwdPass kind, auto&& kernel) {
      const auto smem = tc_backward_smem<T>(kind, a.cm_pad, a.cv_pad, has_lss);
      const dim3 grid{blocks, static_cast<unsigned>(tc_backward_slices(kind, cm, cv))};
      simt::launch(grid, dim3{kBwdThreads}, smem.bytes, kernel);
    };
    if (has_lss) {
      pass(BwdPass::kDq, [&] { attention_bwd_dq_tc_kernel<T, true>(a); });
      pass(BwdPass::kDv, [&] { attention_bwd_keys_tc_kernel<T, true, true>(a); });
      pass(BwdPass::kScore, [&] { attention_bwd_keys_tc_kernel<T, false, true>(a); });
    } else {
      pass(BwdPass::kDq, [&] { attention_bwd_dq_tc_kernel<T, false>(a); });
      pass(BwdPass::kDv, [&] { attention_bwd_keys_tc_kernel<T, true, false>(a); });
      pass(BwdPass::kScore, [&] { attention_bwd_keys_tc_kernel<T, false, false>(a); });
    }
    simt::launch(dim3{scatter_blocks(n * length)}, dim3{kScatterThreads}, 0, [&] {
      scatter_slots_kernel(inv.data(), dv_slot.data(), dkn_slot.data(), dlss_slot_ptr, dv_acc.data(),
                           dkn_acc.data(), dlss_acc_ptr, n, rounds, r, length, lp, a.pad, cm, cv, chunk);
    });
  }
  std::vector<T> dxm(n * length * cm), dv(n * length * cv), dlss(n * length * lss_width);
  simt::launch(dim3{static_cast<unsigned>((n * length + kFinishWarps - 1) / kFinishWarps)}, dim3{kFinishWarps * 32},
               0, [&] {
                 finish_grads_kernel<T>(eps, xm.data(), dq_acc.data(), dkn_acc.data(), dv_acc.data(),
                                        dlss_acc_ptr, dxm.data(), dv.data(), has_lss ? dlss.data() : nullptr,
                                        n * length, cm, cv, chunk);
               });
  write_file(dir + "/dxm", std::vector<float>(dxm.begin(), dxm.end()));
  write_file(dir + "/dv", std::vector<float>(dv.begin(), dv.end()));
  if (has_lss) write_file(dir + "/dlss", std::vector<float>(dlss.begin(), dlss.end()));
  return 0;
}

// sblsh_hash_cuda's launch.
template <typename T>
int run_hash(int64_t n, int64_t length, int64_t cm, int64_t rounds, int64_t n_buckets, const std::string& dir) {
  using namespace dlsn::cuda_impl;
  const auto xm = to_type<T>(read_file<float>(dir + "/xm", n * length * cm));
  const auto rot = to_type<T>(read_file<float>(dir + "/rot", cm * rounds * n_buckets));
  std::vector<int64_t> codes(n * rounds * length, -1);
  const int64_t positions = n * length;
  const bool aligned = tc::rows_aligned16(xm.data(), cm, sizeof(T));
  simt::launch(dim3{static_cast<unsigned>((positions + hash::kRows - 1) / hash::kRows), static_cast<unsigned>(rounds)},
               dim3{hash::kThreads}, 0, [&] {
                 hash::sblsh_hash_kernel<T>(xm.data(), rot.data(), codes.data(), positions, length,
                                            static_cast<int>(rounds), static_cast<int>(n_buckets),
                                            static_cast<int>(cm), aligned);
               });
  write_file(dir + "/codes", std::vector<float>(codes.begin(), codes.end()));
  return 0;
}

template <typename T>
int run(int64_t n, int64_t length, int64_t cm, int64_t cv, int64_t chunk, int64_t rounds, bool merge,
        float eps, const std::string& dir) {
  using namespace dlsn::cuda_impl::tc;
  const auto xm = to_type<T>(read_file<float>(dir + "/xm", n * length * cm));
  const auto v = to_type<T>(read_file<float>(dir + "/v", n * length * cv));
  const auto lss = read_lss<T>(dir, n * length * chunk);
  const auto perm = read_file<int64_t>(dir + "/perm", n * rounds * length);

  const Norms norms = key_norms(xm, n * length, cm, eps);

  ForwardTcArgs<T> a{};
  tc_forward_sizes(a, rounds, length, cm, cv, chunk);
  tc_forward_inputs(a, xm.data(), v.data(), lss_ptr(lss), perm.data(), norms.inv.data(), norms.row_exp.data(),
                    &norms.top_exp);
  a.merge = merge;
  const auto smem = tc_forward_smem<T>(a.cm_pad, !lss.empty());
  const unsigned slices = static_cast<unsigned>(tc_forward_slices(cv));
  auto kernel = [&] {
    if (a.lss != nullptr) {
      chunk_attention_fwd_tc_kernel<T, true>(a);
    } else {
      chunk_attention_fwd_tc_kernel<T, false>(a);
    }
  };

  if (!merge) {
    std::vector<T> out(n * rounds * length * cv);
    std::vector<float> lse(n * rounds * length);
    a.out = out.data();
    a.lse = lse.data();
    a.round_offset = 0;
    a.rounds_in_launch = rounds;
    const unsigned blocks = static_cast<unsigned>(n * rounds * a.n_chunks * a.n_qtiles);
    simt::launch(dim3{blocks, slices}, dim3{kFwdThreads}, smem.bytes, kernel);
    write_file(dir + "/out", std::vector<float>(out.begin(), out.end()));
    write_file(dir + "/lse", lse);
  } else {
    std::vector<float> y(n * length * cv), lse_cur(n * length), lse_next(n * length);
    a.y_acc = y.data();
    a.rounds_in_launch = 1;
    const unsigned blocks = static_cast<unsigned>(n * a.n_chunks * a.n_qtiles);
    for (int64_t r = 0; r < rounds; ++r) {
      a.round_offset = r;
      a.lse_prev = r == 0 ? nullptr : lse_cur.data();
      a.lse_next = lse_next.data();
      simt::launch(dim3{blocks, slices}, dim3{kFwdThreads}, smem.bytes, kernel);
      std::swap(lse_cur, lse_next);
    }
    write_file(dir + "/out", y);
    write_file(dir + "/lse", lse_cur);
  }
  return 0;
}

// The scalar kernel of chunk_attention_cuda / gla_attention_cuda: float32 copies of the inputs, the key norms of
// xm, a launch of 256-thread blocks per (n, round, chunk, 32-query tile) and 128-column slice.
int run_scalar(int64_t n, int64_t length, int64_t cm, int64_t cv, int64_t chunk, int64_t rounds, bool merge,
               float eps, const std::string& dir) {
  using namespace dlsn::cuda_impl;
  const auto xm = read_file<float>(dir + "/xm", n * length * cm);
  const auto v = read_file<float>(dir + "/v", n * length * cv);
  const auto lss = read_lss<float>(dir, n * length * chunk);
  const auto perm = read_file<int64_t>(dir + "/perm", n * rounds * length);
  const Norms norms = key_norms(xm, n * length, cm, eps);

  ForwardArgs<float, int64_t> a{};
  a.xm = xm.data();
  a.v = v.data();
  a.lss = lss_ptr(lss);
  a.perm = perm.data();
  a.inv_norm = norms.inv.data();
  a.row_exp = norms.row_exp.data();
  a.top_exp = &norms.top_exp;
  a.rounds = rounds;
  a.length = length;
  a.chunk = chunk;
  a.cm = cm;
  a.cv = cv;
  a.pad = dlsn::padding_for(length, chunk);
  a.n_chunks = (length + a.pad) / chunk;
  a.n_qtiles = (chunk + kTile - 1) / kTile;
  const unsigned slices = static_cast<unsigned>(std::max<int64_t>(1, (cv + kCols - 1) / kCols));
  if (!merge) {
    std::vector<float> out(n * rounds * length * cv), lse(n * rounds * length);
    a.out = out.data();
    a.lse = lse.data();
    a.round_offset = 0;
    a.rounds_in_launch = rounds;
    const unsigned blocks = static_cast<unsigned>(n * rounds * a.n_chunks * a.n_qtiles);
    simt::launch(dim3{blocks, slices}, dim3{kThreads}, 0,
                 [&] { chunk_attention_fwd_kernel<float, int64_t, false>(a); });
    write_file(dir + "/out", out);
    write_file(dir + "/lse", lse);
  } else {
    std::vector<float> y(n * length * cv), lse_cur(n * length), lse_next(n * length);
    a.y_acc = y.data();
    a.rounds_in_launch = 1;
    const unsigned blocks = static_cast<unsigned>(n * a.n_chunks * a.n_qtiles);
    for (int64_t r = 0; r < rounds; ++r) {
      a.round_offset = r;
      a.lse_prev = r == 0 ? nullptr : lse_cur.data();
      a.lse_next = lse_next.data();
      simt::launch(dim3{blocks, slices}, dim3{kThreads}, 0,
                   [&] { chunk_attention_fwd_kernel<float, int64_t, true>(a); });
      std::swap(lse_cur, lse_next);
    }
    write_file(dir + "/out", y);
    write_file(dir + "/lse", lse_cur);
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 12) {
    std::fprintf(stderr, "usage: %s forward|scalar|backward|hash bf16|fp16|fp32 N L CM CV K R MERGE|RG EPS DIR\n",
                 argv[0]);
    return 2;
  }
  const std::string what = argv[1], dtype = argv[2];
  int64_t s[7];
  for (int i = 0; i < 7; ++i) s[i] = std::stoll(argv[3 + i]);
  const float eps = std::stof(argv[10]);
  const std::string dir = argv[11];
  if (what == "hash") {
    if (dtype == "bf16") return run_hash<c10::BFloat16>(s[0], s[1], s[2], s[3], s[4], dir);
    if (dtype == "fp16") return run_hash<c10::Half>(s[0], s[1], s[2], s[3], s[4], dir);
    return run_hash<float>(s[0], s[1], s[2], s[3], s[4], dir);
  }
  if (what == "scalar") return run_scalar(s[0], s[1], s[2], s[3], s[4], s[5], s[6] != 0, eps, dir);
  if (what == "backward") {
    if (dtype == "bf16") return run_backward<c10::BFloat16>(s[0], s[1], s[2], s[3], s[4], s[5], s[6], eps, dir);
    if (dtype == "fp16") return run_backward<c10::Half>(s[0], s[1], s[2], s[3], s[4], s[5], s[6], eps, dir);
    return run_backward<float>(s[0], s[1], s[2], s[3], s[4], s[5], s[6], eps, dir);
  }
  if (dtype == "bf16") return run<c10::BFloat16>(s[0], s[1], s[2], s[3], s[4], s[5], s[6] != 0, eps, dir);
  if (dtype == "fp16") return run<c10::Half>(s[0], s[1], s[2], s[3], s[4], s[5], s[6] != 0, eps, dir);
  return run<float>(s[0], s[1], s[2], s[3], s[4], s[5], s[6] != 0, eps, dir);
}
