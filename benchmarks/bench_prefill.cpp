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
#include "bench_data.hpp"
#include "roofline.hpp"

namespace {

using namespace attnkit;

using bench::attended_pairs;
using bench::Buffer;
using bench::fill;
using bench::kD;
using bench::kH;
using bench::kHkv;

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
