// benchmarks/bench_loop.cpp — Loop Attention (attention/loop.hpp) at Qwen3-0.6B head shapes
// (H = 16, H_kv = 8, d = 128), 2 threads, f32 and bf16 K/V:
//   loop/layer/<kv>/T:<T>/W:<W>   local K/V = global K/V: the fused one-pass path;
//   loop/stack/<kv>/T:<T>/W:<W>   global over one K/V, local over another (two-loop reading):
//                                 causal pass + sliding pass that blends into out;
//   loop_decode/<kv>/T:<T>/W:<W>  one token against a head-major KVCache of T tokens plus a
//                                 RingKVCache of the last W.
// Counters (prefill): vs_plain = loop time / time of plain causal attention_prefill on the same
// q, k, v, measured in the same benchmark: the two alternate every iteration and vs_plain is the
// median over iterations of the ratio of the adjacent pair, so a burst of load from elsewhere
// on the machine skews one pair, not the ratio (the reported time is the loop call's alone);
// plain_ms (mean); GFLOPS counts
// 2·d_k + 2·d_v flops per attended (query, key) pair and head, over the causal pairs plus the
// window's pairs; peak_frac = GFLOPS / measured fp32 FMA peak.
// Counters (decode): GBps and bw_frac over the bytes read, global K/V + the window's K/V;
// vs_plain = time / time of attention_decode over the global cache alone (alternating, median of
// the pairs' ratios), plain_us (mean). As in
// bench_decode.cpp the iterations rotate over >= 2 GiB of caches so that each is read from DRAM.
#include <benchmark/benchmark.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <memory>
#include <random>
#include <span>
#include <string>
#include <vector>

#include "attnkit/attention/decode.hpp"
#include "attnkit/attention/kv_cache.hpp"
#include "attnkit/attention/loop.hpp"
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

using bench::clk;
using bench::seconds;

template <class KV>
void BM_loop(benchmark::State& state, std::int64_t T, std::int64_t W, bool stack) {
  const auto q = fill<float>(T * kH * kD, 1);
  const auto k = fill<KV>(T * kHkv * kD, 2), v = fill<KV>(T * kHkv * kD, 3);
  const auto k2 = fill<KV>(stack ? T * kHkv * kD : 1, 5), v2 = fill<KV>(stack ? T * kHkv * kD : 1, 6);
  const auto out = fill<float>(T * kH * kD, 4), out_plain = fill<float>(T * kH * kD, 4);
  const auto gw = fill<float>(kH * kD, 7, 0.1f), gb = fill<float>(kH, 8);
  const ConstView3<float> qv(q.data(), {T, kH, kD});
  const ConstView3<KV> kv(k.data(), {T, kHkv, kD}), vv(v.data(), {T, kHkv, kD});
  const ConstView3<KV> klv = stack ? ConstView3<KV>(k2.data(), {T, kHkv, kD}) : kv;
  const ConstView3<KV> vlv = stack ? ConstView3<KV>(v2.data(), {T, kHkv, kD}) : vv;
  const View3<float> ov(out.data(), {T, kH, kD}), pv(out_plain.data(), {T, kH, kD});
  LoopOptions opt;
  opt.num_threads = 2;
  AttentionOptions popt;
  popt.num_threads = 2;
  const double peak = bench::roofline().fma_gflops;
  bench::Paired pairs;
  for (auto _ : state) {
    const auto t0 = clk::now();
    loop_attention<KV>(qv, kv, vv, klv, vlv, ConstView2<float>(gw.data(), {kH, kD}),
                       std::span<const float>(gb.data(), kH), W, ov, opt);
    benchmark::DoNotOptimize(out.data());
    benchmark::ClobberMemory();
    const auto t1 = clk::now();
    attention_prefill(qv, kv, vv, pv, CausalMask{}, popt);
    benchmark::DoNotOptimize(out_plain.data());
    benchmark::ClobberMemory();
    const auto t2 = clk::now();
    state.SetIterationTime(seconds(t0, t1));
    pairs.add(seconds(t0, t1), seconds(t1, t2));
  }
  const double n = static_cast<double>(state.iterations());
  const double flops = (attended_pairs(T, 0) + attended_pairs(T, W)) * static_cast<double>(kH) * (4.0 * kD);
  const double gflops = flops / (pairs.variant_s / n) / 1e9;
  state.counters["GFLOPS"] = gflops;
  state.counters["peak_frac"] = gflops / peak;
  state.counters["vs_plain"] = pairs.time_ratio();
  state.counters["plain_ms"] = pairs.plain_s / n * 1e3;
}

template <class KV>
void BM_loop_decode(benchmark::State& state, std::int64_t T, std::int64_t W) {
  const std::int64_t row_bytes = 2 * kHkv * kD * static_cast<std::int64_t>(sizeof(KV));  // one K and one V row
  const std::int64_t bytes = (T + W) * row_bytes;
  const std::int64_t n_sets = std::max<std::int64_t>(2, ((std::int64_t{2} << 30) + bytes - 1) / bytes);

  std::mt19937 gen(42);
  std::normal_distribution<float> nd;
  std::vector<float> src(static_cast<std::size_t>(T * kHkv * kD)), q(static_cast<std::size_t>(kH * kD)),
      out(static_cast<std::size_t>(kH * kD)), gw(static_cast<std::size_t>(kH * kD)), gb(static_cast<std::size_t>(kH));
  for (auto& x : src) x = nd(gen);
  for (auto& x : q) x = nd(gen);
  for (auto& x : gw) x = 0.1f * nd(gen);
  for (auto& x : gb) x = nd(gen);
  std::vector<KVCache<KV>> caches;
  std::vector<RingKVCache<KV>> rings;
  caches.reserve(static_cast<std::size_t>(n_sets));
  rings.reserve(static_cast<std::size_t>(n_sets));
  const ConstView3<float> all(src.data(), {T, kHkv, kD});
  for (std::int64_t c = 0; c < n_sets; ++c) {
    caches.emplace_back(kHkv, kD, kD, T);
    caches.back().append(all, all);
    rings.emplace_back(kHkv, kD, kD, W);
    rings.back().append(all, all);  // keeps the last W
  }
  DecodeOptions opt;
  opt.num_threads = 2;
  const ConstView2<float> qv(q.data(), {kH, kD}), wv(gw.data(), {kH, kD});
  const View2<float> ov(out.data(), {kH, kD});
  bench::Paired pairs;
  bench::warm_rotation(n_sets, [&](std::int64_t c) {
    loop_attention_decode<KV>(qv, caches[c].keys(), caches[c].values(), rings[c].keys(), rings[c].values(), wv, gb, ov,
                              opt);
  });
  std::size_t i = 0;
  for (auto _ : state) {
    const std::size_t a = i++ % caches.size(), b = i++ % caches.size();  // a different set for each call
    const auto t0 = clk::now();
    loop_attention_decode<KV>(qv, caches[a].keys(), caches[a].values(), rings[a].keys(), rings[a].values(), wv, gb, ov,
                              opt);
    benchmark::DoNotOptimize(out.data());
    benchmark::ClobberMemory();
    const auto t1 = clk::now();
    attention_decode<KV>(qv, caches[b].keys(), caches[b].values(), ov, opt);
    benchmark::DoNotOptimize(out.data());
    benchmark::ClobberMemory();
    const auto t2 = clk::now();
    state.SetIterationTime(seconds(t0, t1));
    pairs.add(seconds(t0, t1), seconds(t1, t2));
  }
  const double gb_read = static_cast<double>(bytes) * 1e-9;
  const double per_call = pairs.variant_s / static_cast<double>(state.iterations());
  state.counters["GBps"] = gb_read / per_call;
  state.counters["bw_frac"] = gb_read / per_call / bench::roofline().read_gbps;
  state.counters["vs_plain"] = pairs.time_ratio();
  state.counters["plain_us"] = pairs.plain_s / static_cast<double>(state.iterations()) * 1e6;
  state.counters["caches"] = static_cast<double>(n_sets);
}

const bool registered = [] {
  const auto reg = [](const std::string& name, auto fn, auto... args) {
    benchmark::RegisterBenchmark(name.c_str(), [=](benchmark::State& s) { fn(s, args...); })
        ->UseManualTime()
        ->Unit(benchmark::kMillisecond);
  };
  constexpr std::int64_t W = 64;
  const std::string w = "/W:" + std::to_string(W);
  for (std::int64_t T : {2048}) {
    const std::string t = "/T:" + std::to_string(T);
    reg("loop/layer/f32" + t + w, BM_loop<float>, T, W, false);
    reg("loop/layer/bf16" + t + w, BM_loop<bf16>, T, W, false);
    reg("loop/stack/f32" + t + w, BM_loop<float>, T, W, true);
    reg("loop/stack/bf16" + t + w, BM_loop<bf16>, T, W, true);
  }
  for (std::int64_t T : {8192}) {
    const std::string t = "/T:" + std::to_string(T);
    benchmark::RegisterBenchmark(("loop_decode/f32" + t + w).c_str(),
                                 [=](benchmark::State& s) { BM_loop_decode<float>(s, T, W); })
        ->UseManualTime()
        ->Unit(benchmark::kMicrosecond);
    benchmark::RegisterBenchmark(("loop_decode/bf16" + t + w).c_str(),
                                 [=](benchmark::State& s) { BM_loop_decode<bf16>(s, T, W); })
        ->UseManualTime()
        ->Unit(benchmark::kMicrosecond);
  }
  return true;
}();

}  // namespace
