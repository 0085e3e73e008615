// benchmarks/bench_prefill.cpp — prefill attention (attention_prefill) at Qwen3-0.6B head shapes
// (H = 16, H_kv = 8, d = 128): causal prefill/<kv>/T:<T> and sliding/<kv>/T:<T>/W:<W>, f32 and
// bf16 K/V, 2 threads unless the name says threads:1.
// Counters: GFLOPS counts 2·d_k + 2·d_v flops per attended (query, key) pair and head (masked
// pairs the kernel skips or computes anyway are not counted); peak_frac = GFLOPS / the measured
// peak of the units the path runs on (roofline.hpp): AMX bf16 where the call runs on tiles (the
// .../amx/... cases, Precision::fast; .../amx-exact/...: exact with bf16 K/V on tiles, Q and P
// in three exact bf16 planes, opt-in through detail::flash::amx_exact_prefill(); counter
// amx = 1), fp32 FMA otherwise. Cases on tiles also time the FMA
// kernel on the same inputs right before each iteration and report vs_fma = median over
// iterations of t_fma / t (the speed-up within one run). The amx cases are skipped where AMX
// is not usable.
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

// Sets amx_exact_prefill() for the life of a benchmark case.
struct ExactTiles {
  bool was;
  explicit ExactTiles(bool on) : was(detail::flash::amx_exact_prefill().exchange(on)) {}
  ~ExactTiles() { detail::flash::amx_exact_prefill().store(was); }
};

template <class KV>
void BM_prefill(benchmark::State& state, std::int64_t T, std::int64_t window, int threads,
                Precision precision = Precision::exact, bool exact_tiles = false) {
  const ExactTiles tiles_switch(exact_tiles);
  const bool amx = detail::flash::use_amx_prefill<simd::default_arch, KV>(precision);
  if ((precision == Precision::fast || exact_tiles) && !amx) {
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
  const auto fma_call = [&] {  // the FMA kernel: exact, with the exact tile path switched off
    auto& tiles = detail::flash::amx_exact_prefill();
    const bool was = tiles.exchange(false);
    const double t = call(exact);
    tiles.store(was);
    return t;
  };
  double seconds = 0;
  std::vector<double> ratios;
  for (auto _ : state) {
    state.PauseTiming();
    const double t_fma = amx ? fma_call() : 0.0;
    state.ResumeTiming();
    const double t = call(opt);
    seconds += t;
    if (amx) ratios.push_back(t_fma / t);
  }
  const double flops = attended_pairs(T, window) * static_cast<double>(kH) * (2.0 * kD + 2.0 * kD);
  const double gflops = flops / (seconds / static_cast<double>(state.iterations())) / 1e9;
  state.counters["GFLOPS"] = gflops;
  state.counters["peak_frac"] = peak > 0 ? gflops / peak : 0.0;
  if (!ratios.empty()) {
    std::sort(ratios.begin(), ratios.end());
    state.counters["vs_fma"] = ratios[ratios.size() / 2];
  }
  state.counters["amx"] = amx ? 1 : 0;
}

// Registered in one place so the names follow one pattern.
const bool registered = [] {
  const auto reg = [](const std::string& name, auto fn, std::int64_t T, std::int64_t window, int threads,
                      Precision precision = Precision::exact, bool exact_tiles = false) {
    benchmark::RegisterBenchmark(name.c_str(),
                                 [=](benchmark::State& s) { fn(s, T, window, threads, precision, exact_tiles); })
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
  // Precision::exact with bf16 K/V on tiles (three exact bf16 planes of Q and P).
  reg("prefill/bf16/amx-exact/T:2048", BM_prefill<bf16>, 2048, 0, 2, Precision::exact, true);
  return true;
}();

}  // namespace
