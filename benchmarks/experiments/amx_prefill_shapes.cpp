// benchmarks/experiments/amx_prefill_shapes.cpp — the AMX prefill kernel's tile shapes, measured
// against each other: build it once per shape (the ATTNKIT_AMX_* macros of
// attention/detail/flash_prefill_amx.hpp) and alternate the binaries. Each run prints GFLOP/s
// (median of the repetitions) for Qwen3-0.6B heads, bf16 K/V, Precision::fast, causal T 2048
// and sliding T 32768 / W 512, 2 threads; the relative L2 of the output against the FMA kernel
// (exact); and a hash of the output bits, so shapes that must agree bit for bit can be checked.
// Arguments: repetitions (9), then optionally cases T:W instead of the two default ones.
// Not built by CMake (needs an AMX CPU):
//   g++ -std=c++20 -O3 -march=native -fopenmp -ffp-contract=off -DNDEBUG -Iinclude \
//       [-DATTNKIT_AMX_ROWS=32 -DATTNKIT_AMX_4X1=0 ...] benchmarks/experiments/amx_prefill_shapes.cpp
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <vector>

#include "attnkit/attention/prefill.hpp"

using namespace attnkit;

namespace {

constexpr std::int64_t kH = 16, kHkv = 8, kD = 128;

double attended(std::int64_t T, std::int64_t W) {
  double n = 0;
  for (std::int64_t t = 0; t < T; ++t) n += W > 0 ? std::min<std::int64_t>(t + 1, W) : t + 1;
  return n;
}

void run(std::int64_t T, std::int64_t W, int reps) {
  std::mt19937 gen(7);
  std::normal_distribution<float> nd;
  std::vector<float> q(T * kH * kD), out(q.size()), ref(q.size());
  std::vector<bf16> k(T * kHkv * kD), v(k.size());
  for (auto& x : q) x = nd(gen);
  for (auto& x : k) x = bf16(nd(gen));
  for (auto& x : v) x = bf16(nd(gen));
  const ConstView3<float> qv(q.data(), {T, kH, kD});
  const ConstView3<bf16> kv(k.data(), {T, kHkv, kD}), vv(v.data(), {T, kHkv, kD});
  AttentionOptions opt;
  opt.num_threads = 2;
  const auto call = [&](std::vector<float>& o, Precision p) {
    opt.precision = p;
    const View3<float> ov(o.data(), {T, kH, kD});
    const auto t0 = std::chrono::steady_clock::now();
    if (W > 0) attention_prefill(qv, kv, vv, ov, SlidingWindowMask{W}, opt);
    else attention_prefill(qv, kv, vv, ov, CausalMask{}, opt);
    return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  };
  call(ref, Precision::exact);
  std::fill(out.begin(), out.end(), std::nanf(""));
  call(out, Precision::fast);
  std::vector<double> ts;
  for (int r = 0; r < reps; ++r) ts.push_back(call(out, Precision::fast));
  std::sort(ts.begin(), ts.end());
  double num = 0, den = 0;
  std::uint64_t hash = 1469598103934665603ull;
  for (std::size_t i = 0; i < out.size(); ++i) {
    const double d = double(out[i]) - ref[i];
    num += d * d;
    den += double(ref[i]) * ref[i];
    std::uint32_t b;
    std::memcpy(&b, &out[i], 4);
    hash = (hash ^ b) * 1099511628211ull;
  }
  const double flops = attended(T, W) * kH * 4.0 * kD;
  std::printf("T %6lld W %4lld  fast %7.1f GFLOP/s (min %.4f s, median %.4f s)  rel %.2e  hash %016llx%s\n",
              (long long)T, (long long)W, flops / ts[ts.size() / 2] * 1e-9, ts.front(), ts[ts.size() / 2],
              std::sqrt(num / den), (unsigned long long)hash, std::isfinite(num) ? "" : "  NaN!");
}

}  // namespace

int main(int argc, char** argv) {
  const int reps = argc > 1 ? std::atoi(argv[1]) : 9;
#if defined(ATTNKIT_AMX) && defined(ATTNKIT_AMX_ROWS)
  std::printf("keys %d rows %d item %d\n", ATTNKIT_AMX_KEYS, ATTNKIT_AMX_ROWS, ATTNKIT_AMX_ITEM_ROWS);
#else
  std::printf("no AMX in this build\n");
#endif
  if (argc <= 2) {
    run(2048, 0, reps);
    run(32768, 512, std::max(3, reps / 3));
  }
  for (int i = 2; i < argc; ++i) {  // further arguments: T:W (W 0 = causal)
    const long long T = std::atoll(argv[i]);
    const char* colon = std::strchr(argv[i], ':');
    const long long W = colon ? std::atoll(colon + 1) : 0;
    run(T, W, T * (W > 0 ? W : T) > 2048LL * 2048 * 4 ? std::max(3, reps / 3) : reps);
  }
}
