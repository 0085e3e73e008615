// benchmarks/bench_prefill.cpp — prefill attention (attention_prefill) at Qwen3-0.6B head shapes
// (H = 16, H_kv = 8, d = 128): causal prefill/<kv>/T:<T> and sliding/<kv>/T:<T>/W:<W>, f32 and
// bf16 K/V, 2 threads unless the name says threads:1.
// Counters: GFLOPS counts 2·d_k + 2·d_v flops per attended (query, key) pair and head (masked
// pairs the kernel skips or computes anyway are not counted); peak_frac = GFLOPS / the measured
// peak of the units the path runs on (roofline.hpp): fp32 FMA for the exact kernel, AMX bf16 for
// the .../amx/... cases (Precision::fast on AMX tiles; skipped where AMX is not usable). The amx
// cases also time the exact kernel on the same inputs right before each iteration and report
// vs_exact = median over iterations of t_exact / t_amx (the speed-up within one run).
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
void BM_prefill(benchmark::State& state, std::int64_t T, std::int64_t window, int threads,
                Precision precision = Precision::exact) {
  const bool amx = precision == Precision::fast;
  if (amx && !detail::flash::use_amx_prefill<simd::default_arch>(precision)) {
    state.SkipWithError("AMX is not usable on this CPU (Precision::fast would run the exact kernel)");
    return;
  }
  const auto q = fill<float>(T * kH * kD, 1);
  const auto k = fill<KV>(T * kHkv * kD, 2), v = fill<KV>(T * kHkv * kD, 3);
  const auto out = fill<float>(T * kH * kD, 4);
  const ConstView3<float> qv(q.data(), {T, kH, kD});
  const ConstView3<KV> kv(k.data(), {T, kHkv, kD}), vv(v.data(), {T, kHkv, kD});
  const View3<float> ov(out.data(), {T, kH, kD});
  AttentionOptions opt;
  opt.num_threads = threads;
  opt.precision = precision;
  const double peak = amx ? bench::roofline().amx_bf16_gflops : bench::roofline().fma_gflops;
  const auto call = [&](const AttentionOptions& o) {
    const auto t0 = std::chrono::steady_clock::now();
    if (window > 0) attention_prefill(qv, kv, vv, ov, SlidingWindowMask{window}, o);
    else attention_prefill(qv, kv, vv, ov, CausalMask{}, o);
    benchmark::DoNotOptimize(out.data());
    benchmark::ClobberMemory();
    return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  };
  AttentionOptions exact = opt;
  exact.precision = Precision::exact;
  double seconds = 0;
  std::vector<double> ratios;
  for (auto _ : state) {
    state.PauseTiming();
    const double t_exact = amx ? call(exact) : 0.0;
    state.ResumeTiming();
    const double t = call(opt);
    seconds += t;
    if (amx) ratios.push_back(t_exact / t);
  }
  const double flops = attended_pairs(T, window) * static_cast<double>(kH) * (2.0 * kD + 2.0 * kD);
  const double gflops = flops / (seconds / static_cast<double>(state.iterations())) / 1e9;
  state.counters["GFLOPS"] = gflops;
  state.counters["peak_frac"] = peak > 0 ? gflops / peak : 0.0;
  if (!ratios.empty()) {
    std::sort(ratios.begin(), ratios.end());
    state.counters["vs_exact"] = ratios[ratios.size() / 2];
  }
}

// Registered in one place so the names follow one pattern.
const bool registered = [] {
  const auto reg = [](const std::string& name, auto fn, std::int64_t T, std::int64_t window, int threads,
                      Precision precision = Precision::exact) {
    benchmark::RegisterBenchmark(name.c_str(), [=](benchmark::State& s) { fn(s, T, window, threads, precision); })
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
  // Precision::fast on AMX tiles (bf16 Q, K, V, P; f32 accumulation).
  for (std::int64_t T : {512, 2048, 8192}) reg("prefill/bf16/amx/T:" + std::to_string(T), BM_prefill<bf16>, T, 0, 2, Precision::fast);
  reg("prefill/f32/amx/T:2048", BM_prefill<float>, 2048, 0, 2, Precision::fast);
  reg("sliding/bf16/amx/T:32768/W:512", BM_prefill<bf16>, 32768, 512, 2, Precision::fast);
  return true;
}();

}  // namespace
