// Runs the tensor-core forward kernel (csrc/cuda/chunk_attention_fwd_tc.cuh) on the CPU through the SIMT
// emulator, launched as chunk_attention_cuda and gla_attention_cuda launch it. Driven by
// tests/test_cuda_emulation.py:
//   forward_harness DTYPE N L CM CV K R MERGE EPS DIR
// DIR holds xm, v, lss (float32, rounded here to DTYPE), perm (int64, [N, R, L]); the harness writes out
// [N, R, L, Cv] and lse [N, R, L] (MERGE 0, chunk_attention) or y [N, L, Cv] and lse [N, L] (MERGE 1, the
// rounds merged as gla_attention does), float32.
#include "simt.h"

#include <cstdio>
#include <string>
#include <vector>

#include "cuda/chunk_attention_fwd_tc.cuh"

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
int run(int64_t n, int64_t length, int64_t cm, int64_t cv, int64_t chunk, int64_t rounds, bool merge,
        float eps, const std::string& dir) {
  using namespace dlsn::cuda_impl::tc;
  const auto xm = to_type<T>(read_file<float>(dir + "/xm", n * length * cm));
  const auto v = to_type<T>(read_file<float>(dir + "/v", n * length * cv));
  const auto lss = to_type<T>(read_file<float>(dir + "/lss", n * length * chunk));
  const auto perm = read_file<int64_t>(dir + "/perm", n * rounds * length);

  std::vector<float> inv_norm(n * length);
  simt::launch(dim3{static_cast<unsigned>((n * length + 7) / 8)}, dim3{256}, 0, [&] {
    key_norms_kernel<T>(xm.data(), inv_norm.data(), n * length, cm, eps);
  });

  ForwardTcArgs<T> a{};
  tc_forward_sizes(a, rounds, length, cm, cv, chunk);
  a.xm = xm.data();
  a.v = v.data();
  a.lss = lss.data();
  a.perm = perm.data();
  a.inv_norm = inv_norm.data();
  a.xm_aligned = rows_aligned16(a.xm, cm, sizeof(T));
  a.v_aligned = rows_aligned16(a.v, cv, sizeof(T));
  a.lss_aligned = rows_aligned16(a.lss, chunk, sizeof(T));
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
  if (argc != 11) {
    std::fprintf(stderr, "usage: %s bf16|fp16|fp32 N L CM CV K R MERGE EPS DIR\n", argv[0]);
    return 2;
  }
  const std::string dtype = argv[1];
  int64_t s[7];
  for (int i = 0; i < 7; ++i) s[i] = std::stoll(argv[2 + i]);
  const float eps = std::stof(argv[9]);
  const std::string dir = argv[10];
  if (dtype == "bf16") return run<c10::BFloat16>(s[0], s[1], s[2], s[3], s[4], s[5], s[6] != 0, eps, dir);
  if (dtype == "fp16") return run<c10::Half>(s[0], s[1], s[2], s[3], s[4], s[5], s[6] != 0, eps, dir);
  return run<float>(s[0], s[1], s[2], s[3], s[4], s[5], s[6] != 0, eps, dir);
}
