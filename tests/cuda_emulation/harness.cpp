// Runs the tensor-core CUDA kernels on the CPU through the SIMT emulator, launched in the order and with the
// arguments of the launchers in csrc/cuda/*.cu. Driven by tests/test_cuda_emulation.py:
//   harness forward  DTYPE N L CM CV K R MERGE EPS DIR
//   harness backward DTYPE N L CM CV K R RG EPS DIR
// DIR holds xm, v, lss (float32, rounded here to DTYPE) and perm (int64, [N, R, L]).
// forward writes out [N, R, L, Cv] and lse [N, R, L] (MERGE 0, chunk_attention) or y [N, L, Cv] and lse
// [N, L] (MERGE 1, the rounds merged as gla_attention does). backward also reads grad_out [N, RG, L, Cv]
// (rounded to DTYPE), delta and lse [N, RG, L] (float32) and writes dxm, dv, dlss. Everything float32.
//   harness hash     DTYPE N L CM R B 0 0 EPS DIR
// reads xm [N, L, CM] and rot [CM, R, B] (rounded to DTYPE) and writes codes [N, R, L] (as float32).
#include "simt.h"

#include <cstdio>
#include <string>
#include <vector>

#include "cuda/attention_bwd_steps.cuh"
#include "cuda/attention_bwd_tc.cuh"
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

template <typename T>
std::vector<float> key_norms(const std::vector<T>& xm, int64_t rows, int64_t cm, float eps) {
  std::vector<float> inv_norm(rows);
  simt::launch(dim3{static_cast<unsigned>((rows + 7) / 8)}, dim3{256}, 0, [&] {
    dlsn::cuda_impl::tc::key_norms_kernel<T>(xm.data(), inv_norm.data(), rows, cm, eps);
  });
  return inv_norm;
}

// attention_backward_cuda's tensor-core path.
template <typename T>
int run_backward(int64_t n, int64_t length, int64_t cm, int64_t cv, int64_t chunk, int64_t rounds,
                 int64_t grad_rounds, float eps, const std::string& dir) {
  using namespace dlsn::cuda_impl;
  using namespace dlsn::cuda_impl::tc;
  const auto xm = to_type<T>(read_file<float>(dir + "/xm", n * length * cm));
  const auto v = to_type<T>(read_file<float>(dir + "/v", n * length * cv));
  const auto lss = to_type<T>(read_file<float>(dir + "/lss", n * length * chunk));
  const auto perm = read_file<int64_t>(dir + "/perm", n * rounds * length);
  const auto grad_out = to_type<T>(read_file<float>(dir + "/grad_out", n * grad_rounds * length * cv));
  const auto delta = read_file<float>(dir + "/delta", n * grad_rounds * length);
  const auto lse = read_file<float>(dir + "/lse", n * grad_rounds * length);
  const auto inv_norm = key_norms(xm, n * length, cm, eps);

  BackwardTcArgs<T> a{};
  tc_backward_sizes(a, rounds, grad_rounds, length, cm, cv, chunk);
  const int64_t lp = a.padded_length;
  std::vector<int64_t> inv(n * rounds * length);
  std::vector<float> dq_acc(n * length * cm), dkn_acc(n * length * cm), dv_acc(n * length * cv),
      dlss_acc(n * length * chunk);
  std::vector<float> dv_slot(n * lp * cv, NAN), dkn_slot(n * lp * cm, NAN), dlss_slot(n * lp * chunk, NAN);
  tc_backward_inputs(a, grad_out.data(), delta.data(), lse.data(), xm.data(), v.data(), lss.data(), perm.data(),
                     inv_norm.data());
  a.dq_acc = dq_acc.data();
  a.dv_slot = dv_slot.data();
  a.dkn_slot = dkn_slot.data();
  a.dlss_slot = dlss_slot.data();

  simt::launch(dim3{static_cast<unsigned>((n * rounds * length + 255) / 256)}, dim3{256}, 0,
               [&] { inverse_perm_kernel<int64_t>(perm.data(), inv.data(), n * rounds, length); });
  const unsigned blocks = static_cast<unsigned>(n * a.n_chunks * a.n_own_tiles);
  for (int64_t r = 0; r < rounds; ++r) {
    a.round = r;
    const auto pass = [&](BwdPass kind, auto&& kernel) {
      const auto smem = tc_backward_smem<T>(kind, a.cm_pad, a.cv_pad);
      const dim3 grid{blocks, static_cast<unsigned>(tc_backward_slices(kind, cm, cv))};
      simt::launch(grid, dim3{kBwdThreads}, smem.bytes, kernel);
    };
    pass(BwdPass::kDq, [&] { attention_bwd_dq_tc_kernel<T>(a); });
    pass(BwdPass::kDv, [&] { attention_bwd_keys_tc_kernel<T, true>(a); });
    pass(BwdPass::kScore, [&] { attention_bwd_keys_tc_kernel<T, false>(a); });
    simt::launch(dim3{scatter_blocks(n * length)}, dim3{kScatterThreads}, 0, [&] {
      scatter_slots_kernel(inv.data(), dv_slot.data(), dkn_slot.data(), dlss_slot.data(), dv_acc.data(),
                           dkn_acc.data(), dlss_acc.data(), n, rounds, r, length, lp, a.pad, cm, cv, chunk);
    });
  }
  std::vector<T> dxm(n * length * cm), dv(n * length * cv), dlss(n * length * chunk);
  simt::launch(dim3{static_cast<unsigned>((n * length + kFinishWarps - 1) / kFinishWarps)}, dim3{kFinishWarps * 32},
               0, [&] {
                 finish_grads_kernel<T>(eps, xm.data(), dq_acc.data(), dkn_acc.data(), dv_acc.data(),
                                        dlss_acc.data(), dxm.data(), dv.data(), dlss.data(), n * length, cm, cv,
                                        chunk);
               });
  write_file(dir + "/dxm", std::vector<float>(dxm.begin(), dxm.end()));
  write_file(dir + "/dv", std::vector<float>(dv.begin(), dv.end()));
  write_file(dir + "/dlss", std::vector<float>(dlss.begin(), dlss.end()));
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
  const auto lss = to_type<T>(read_file<float>(dir + "/lss", n * length * chunk));
  const auto perm = read_file<int64_t>(dir + "/perm", n * rounds * length);

  const auto inv_norm = key_norms(xm, n * length, cm, eps);

  ForwardTcArgs<T> a{};
  tc_forward_sizes(a, rounds, length, cm, cv, chunk);
  tc_forward_inputs(a, xm.data(), v.data(), lss.data(), perm.data(), inv_norm.data());
  a.merge = merge;
  const auto smem = tc_forward_smem<T>(a.cm_pad);
  const unsigned slices = static_cast<unsigned>(tc_forward_slices(cv));
  auto kernel = [&] { chunk_attention_fwd_tc_kernel<T>(a); };

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

}  // namespace

int main(int argc, char** argv) {
  if (argc != 12) {
    std::fprintf(stderr, "usage: %s forward|backward|hash bf16|fp16|fp32 N L CM CV K R MERGE|RG EPS DIR\n", argv[0]);
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
  if (what == "backward") {
    if (dtype == "bf16") return run_backward<c10::BFloat16>(s[0], s[1], s[2], s[3], s[4], s[5], s[6], eps, dir);
    if (dtype == "fp16") return run_backward<c10::Half>(s[0], s[1], s[2], s[3], s[4], s[5], s[6], eps, dir);
    return run_backward<float>(s[0], s[1], s[2], s[3], s[4], s[5], s[6], eps, dir);
  }
  if (dtype == "bf16") return run<c10::BFloat16>(s[0], s[1], s[2], s[3], s[4], s[5], s[6] != 0, eps, dir);
  if (dtype == "fp16") return run<c10::Half>(s[0], s[1], s[2], s[3], s[4], s[5], s[6] != 0, eps, dir);
  return run<float>(s[0], s[1], s[2], s[3], s[4], s[5], s[6] != 0, eps, dir);
}
