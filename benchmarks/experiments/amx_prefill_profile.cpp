// benchmarks/experiments/amx_prefill_profile.cpp — where the AMX prefill kernel's time goes in a
// real call: one thread, Qwen3-0.6B heads, bf16 K/V stored head-major, Precision::fast, with the
// kernel's phase timers on (ATTNKIT_AMX_PROFILE: TSC cycles per phase of every work item, in
// attention/detail/flash_prefill_amx.hpp). Unlike amx_prefill_phases.cpp (each phase alone, in
// cache), this includes the query and output rows' trips to memory and every masked tile.
// Arguments: repetitions (5), then cases T:W (W 0 = causal; default 4096:512 2048:0).
// Measured 2026-12-04 on an AMX host (one thread on core 2), shares of the items' cycles:
//   case                  GFLOP/s  pack K/V  pack Q  Q·K^T  softmax  P·V  finalize  rest
//   T 4096, W 512           357      7.6     14.7   18.8    15.9   20.1    17.0     5.9
//   T 32768, W 512          344      7.5     14.1   19.8    15.5   21.5    15.8     5.8
//   T 2048, causal          269      5.0      7.0   26.9    15.5   33.4     7.0     5.2
// (the causal run was a slow one: the host gave 519-582 GFLOP/s in other one-thread calls). A
// sliding window's sub-tile sees 512 keys, a causal one 1024 on average, so packing the 64
// query rows (H·d floats apart, from memory) and writing their outputs weigh twice as much
// there: 30% of the time. Fetching those rows under the previous sub-tile's tile work (a second
// prefetch queue) took finalize to 5.8% and query packing down too, yet the calls were no
// faster (one thread 258-395 against 353-373 GFLOP/s, four alternated pairs): the time moved
// into the tile and softmax phases, so that queue was not kept.
// Not built by CMake (needs an AMX CPU):
//   g++ -std=c++20 -O3 -march=native -fopenmp -ffp-contract=off -DNDEBUG -Iinclude benchmarks/experiments/amx_prefill_profile.cpp
#define ATTNKIT_AMX_PROFILE 1

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <vector>

#include "attnkit/attention/prefill.hpp"

using namespace attnkit;

#if !defined(ATTNKIT_AMX)
int main() { std::puts("no AMX in this build"); }
#else
namespace {

constexpr std::int64_t kH = 16, kHkv = 8, kD = 128;

void profile(std::int64_t T, std::int64_t W, int reps) {
  using detail::flash::AmxPhase;
  std::mt19937 gen(7);
  std::normal_distribution<float> nd;
  std::vector<float> q(T * kH * kD), out(q.size());
  std::vector<bf16> k(T * kHkv * kD), v(k.size());
  for (auto& x : q) x = nd(gen);
  for (auto& x : k) x = bf16(nd(gen));
  for (auto& x : v) x = bf16(nd(gen));
  const ConstView3<float> qv(q.data(), {T, kH, kD});
  const ConstView3<bf16> kv(k.data(), {T, kHkv, kD}, {kD, T * kD, 1}), vv(v.data(), {T, kHkv, kD}, {kD, T * kD, 1});
  const View3<float> ov(out.data(), {T, kH, kD});
  AttentionOptions opt;
  opt.num_threads = 1;
  opt.precision = Precision::fast;
  std::uint64_t* cycles = detail::flash::amx_profile();
  std::vector<double> ts;
  for (int r = 0; r <= reps; ++r) {
    if (r == 1) std::fill(cycles, cycles + static_cast<int>(AmxPhase::count), 0);  // the first call warms up
    const auto t0 = std::chrono::steady_clock::now();
    if (W > 0) attention_prefill(qv, kv, vv, ov, SlidingWindowMask{W}, opt);
    else attention_prefill(qv, kv, vv, ov, CausalMask{}, opt);
    if (r > 0) ts.push_back(std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
  }
  std::sort(ts.begin(), ts.end());
  double pairs = 0;
  for (std::int64_t t = 0; t < T; ++t) pairs += W > 0 ? std::min<std::int64_t>(t + 1, W) : t + 1;
  const double item = static_cast<double>(cycles[static_cast<int>(AmxPhase::item)]);
  std::printf("T %6lld W %4lld: %6.1f GFLOP/s (one thread, median of %d)  %%:", (long long)T, (long long)W,
              pairs * kH * 4.0 * kD / ts[ts.size() / 2] * 1e-9, reps);
  static const char* names[] = {"pack K/V", "pack Q", "Q·K^T", "softmax", "P·V", "finalize"};
  double rest = item;
  for (int p = 1; p < static_cast<int>(AmxPhase::count); ++p) {
    std::printf("  %s %.1f", names[p - 1], 100.0 * cycles[p] / item);
    rest -= static_cast<double>(cycles[p]);
  }
  std::printf("  rest %.1f\n", 100.0 * rest / item);
}

}  // namespace

int main(int argc, char** argv) {
  const int reps = argc > 1 ? std::max(1, std::atoi(argv[1])) : 5;
  std::vector<std::pair<long long, long long>> cases;
  for (int i = 2; i < argc; ++i) {
    const char* colon = std::strchr(argv[i], ':');
    cases.push_back({std::atoll(argv[i]), colon ? std::atoll(colon + 1) : 0});
  }
  if (cases.empty()) cases = {{4096, 512}, {2048, 0}};
  for (const auto& [T, W] : cases) profile(T, W, reps);
}
#endif
