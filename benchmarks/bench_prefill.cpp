// benchmarks/bench_prefill.cpp — prefill attention (attention_prefill) at Qwen3-0.6B head shapes
// (H = 16, H_kv = 8, d = 128): causal prefill/<kv>/T:<T> and sliding/<kv>/T:<T>/W:<W>, f32 and
// bf16 K/V, 2 threads unless the name says threads:1.
// Counters: GFLOPS counts 2·d_k + 2·d_v flops per attended (query, key) pair and head (masked
// pairs the kernel skips or computes anyway are not counted); peak_frac = GFLOPS / measured fp32
// FMA peak (roofline.hpp).
#include <benchmark/benchmark.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "attnkit/attention/prefill.hpp"
#include "attnkit/core/memory.hpp"
#include "roofline.hpp"

namespace {

using namespace attnkit;

constexpr std::int64_t kH = 16, kHkv = 8, kD = 128;

// Deterministic pseudo-random values in [-1, 1) (a cheap LCG: the data only needs to be
// non-trivial), in memory from attnkit's allocator: huge pages for large buffers, as the KV
// caches and an engine's arena provide (4 KiB pages cost ~5% here: every K/V row of a
// [T, H_kv, d] layout sits in a different page).
template <class T>
struct Buffer {
  std::shared_ptr<void> mem;
  T* data() const { return static_cast<T*>(mem.get()); }
};
template <class T>
Buffer<T> fill(std::int64_t n, std::uint32_t seed) {
  Buffer<T> b{allocate_aligned_shared(static_cast<std::size_t>(n) * sizeof(T))};
  std::uint32_t s = seed;
  for (std::int64_t i = 0; i < n; ++i) {
    s = s * 1664525u + 1013904223u;
    const float f = static_cast<float>(s >> 8) * (2.f / 16777216.f) - 1.f;
    if constexpr (std::is_same_v<T, bf16>) b.data()[i] = bf16(f);
    else b.data()[i] = f;
  }
  return b;
}

double attended_pairs(std::int64_t T, std::int64_t window) {
  double n = 0;
  for (std::int64_t t = 0; t < T; ++t) n += static_cast<double>(window > 0 ? std::min(t + 1, window) : t + 1);
  return n;
}

template <class KV>
void BM_prefill(benchmark::State& state, std::int64_t T, std::int64_t window, int threads) {
  const auto q = fill<float>(T * kH * kD, 1);
  const auto k = fill<KV>(T * kHkv * kD, 2), v = fill<KV>(T * kHkv * kD, 3);
  const auto out = fill<float>(T * kH * kD, 4);
  const ConstView3<float> qv(q.data(), {T, kH, kD});
  const ConstView3<KV> kv(k.data(), {T, kHkv, kD}), vv(v.data(), {T, kHkv, kD});
  const View3<float> ov(out.data(), {T, kH, kD});
  AttentionOptions opt;
  opt.num_threads = threads;
  const double peak = bench::roofline().fma_gflops;
  double seconds = 0;
  for (auto _ : state) {
    const auto t0 = std::chrono::steady_clock::now();
    if (window > 0) attention_prefill(qv, kv, vv, ov, SlidingWindowMask{window}, opt);
    else attention_prefill(qv, kv, vv, ov, CausalMask{}, opt);
    benchmark::DoNotOptimize(out.data());
    benchmark::ClobberMemory();
    seconds += std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  }
  const double flops = attended_pairs(T, window) * static_cast<double>(kH) * (2.0 * kD + 2.0 * kD);
  const double gflops = flops / (seconds / static_cast<double>(state.iterations())) / 1e9;
  state.counters["GFLOPS"] = gflops;
  state.counters["peak_frac"] = gflops / peak;
}

// Registered in one place so the names follow one pattern.
const bool registered = [] {
  const auto reg = [](const std::string& name, auto fn, std::int64_t T, std::int64_t window, int threads) {
    benchmark::RegisterBenchmark(name.c_str(), [=](benchmark::State& s) { fn(s, T, window, threads); })
        ->UseRealTime()
        ->Unit(benchmark::kMillisecond);
  };
  for (std::int64_t T : {512, 2048, 8192}) {
    reg("prefill/f32/T:" + std::to_string(T), BM_prefill<float>, T, 0, 2);
    reg("prefill/bf16/T:" + std::to_string(T), BM_prefill<bf16>, T, 0, 2);
  }
  reg("prefill/f32/T:2048/threads:1", BM_prefill<float>, 2048, 0, 1);
  reg("prefill/bf16/T:2048/threads:1", BM_prefill<bf16>, 2048, 0, 1);
  for (std::int64_t T : {8192, 32768}) {
    reg("sliding/f32/T:" + std::to_string(T) + "/W:512", BM_prefill<float>, T, 512, 2);
    reg("sliding/bf16/T:" + std::to_string(T) + "/W:512", BM_prefill<bf16>, T, 512, 2);
  }
  return true;
}();

}  // namespace
