// benchmarks/bench_recurrent.cpp — the gated delta rule (recurrent/gated_delta.hpp) at a Gated
// DeltaNet layer's shape, H_k = H_v = 16 heads, d_k = d_v = 128, f32, 2 threads, beside the
// causal attention it replaces (16 query and 16 KV heads of d 128):
//   gated_delta/prefill/T:<T>                 the chunked path (chunk 64) over T = 4096 and 32768
//                                             tokens, the state carried from call to call;
//   gated_delta/prefill/T:4096/attention      attention_prefill on the same heads and tokens,
//                                             timed alternately with the gated delta call;
//   gated_delta/decode                        one token (T = 1, recurrent path) of one layer;
//   gated_delta/decode/attention/T_kv:4096    attention_decode of one token over a KV cache of
//                                             4096 tokens, timed alternately with the decode step.
// Counters:
//   GFLOPS (prefill) — effective rate, 6·d_k·d_v flops per token and head (the recurrence's
//     S ← αS, u = S^T k, S += k δ^T, o = S^T q); the chunked path does more (its C·d terms), so
//     this is the useful work per second; fma_frac = GFLOPS / the measured fp32 FMA peak
//     (roofline.hpp, once per process); fma_frac_paired = median over the iterations of GFLOPS /
//     the FMA peak measured (30 ms, the same 2 threads) just before that iteration: on a shared
//     machine the share of the cores this process gets changes from second to second, and a
//     pair sees about the same share twice;
//   tok_s — tokens per second of the layer (all heads);
//   GBps (decode) — state bytes touched per step / time: the recurrent step makes a read pass over
//     S, then a read + write pass, H·d_k·d_v·4 bytes each (3 MiB per step at this shape);
//     bw_frac = GBps / the measured DRAM read bandwidth. The 1 MiB state sits in L2 between
//     steps (512 KiB per core on 2 cores), so bw_frac > 1 is possible: it is a cache rate;
//   gdn_speedup (attention cases) — median over the pairs of attention time / gated delta time.
// Attention decode rotates over KV caches of >= 1 GiB in all (as bench_decode.cpp does), so its
// K/V come from DRAM, as a layer's cache does in a model.
#include <benchmark/benchmark.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <string>
#include <vector>

#include "attnkit/attention/decode.hpp"
#include "attnkit/attention/kv_cache.hpp"
#include "attnkit/attention/prefill.hpp"
#include "attnkit/recurrent/gated_delta.hpp"
#include "bench_data.hpp"
#include "roofline.hpp"

namespace {

using namespace attnkit;

constexpr std::int64_t kHeads = 16, kDim = 128;
constexpr int kThreads = 2;

// One layer's inputs for T tokens: q, k, v [T, 16, 128], g = log decay in [-1, 0), beta in
// [0, 1), the state [16, 128, 128] and out.
struct Layer {
  std::int64_t T;
  bench::Buffer<float> q, k, v, g, beta, state, out;
  explicit Layer(std::int64_t T_)
      : T(T_),
        q(bench::fill<float>(T * kHeads * kDim, 1)),
        k(bench::fill<float>(T * kHeads * kDim, 2)),
        v(bench::fill<float>(T * kHeads * kDim, 3)),
        g(bench::fill<float>(T * kHeads, 4, 0.5f)),
        beta(bench::fill<float>(T * kHeads, 5, 0.5f)),
        state(bench::fill<float>(kHeads * kDim * kDim, 6, 0.1f)),
        out(bench::fill<float>(T * kHeads * kDim, 7)) {
    for (std::int64_t i = 0; i < T * kHeads; ++i) {
      g.data()[i] -= 0.5f;
      beta.data()[i] += 0.5f;
    }
  }
  void run(GatedDeltaMode mode) const {
    GatedDeltaOptions opt;
    opt.mode = mode;
    opt.num_threads = kThreads;
    gated_delta_rule(ConstView3<float>(q.data(), {T, kHeads, kDim}), ConstView3<float>(k.data(), {T, kHeads, kDim}),
                     ConstView3<float>(v.data(), {T, kHeads, kDim}), ConstView2<float>(g.data(), {T, kHeads}),
                     ConstView2<float>(beta.data(), {T, kHeads}), View3<float>(state.data(), {kHeads, kDim, kDim}),
                     View3<float>(out.data(), {T, kHeads, kDim}), opt);
    benchmark::DoNotOptimize(out.data());
    benchmark::ClobberMemory();
  }
};

double seconds_of(const auto& fn) {
  const auto t0 = bench::clk::now();
  fn();
  return bench::seconds(t0, bench::clk::now());
}

void BM_prefill(benchmark::State& state, std::int64_t T) {
  const Layer layer(T);
  const double peak = bench::roofline().fma_gflops;  // measured before the timed loop
  namespace rd = bench::roofline_detail;
  const std::int64_t fma_iters = rd::calibrate(rd::fma_thread, 0.03);
  const double flops = 6.0 * kDim * kDim * static_cast<double>(kHeads * T);
  double seconds = 0;
  std::vector<double> paired;
  for (auto _ : state) {
    const double peak_now = rd::parallel_rate(kThreads, fma_iters, rd::fma_thread) * 1e-9;  // untimed
    const double s = seconds_of([&] { layer.run(GatedDeltaMode::chunked); });
    state.SetIterationTime(s);
    seconds += s;
    paired.push_back(flops / s * 1e-9 / peak_now);
  }
  const double gflops = flops / (seconds / static_cast<double>(state.iterations())) * 1e-9;
  state.counters["GFLOPS"] = gflops;
  state.counters["fma_frac"] = gflops / peak;
  state.counters["fma_frac_paired"] = bench::median(paired);
  state.counters["tok_s"] = static_cast<double>(T) * static_cast<double>(state.iterations()) / seconds;
}

// Causal attention over the same heads, paired call for call with the gated delta layer.
void BM_prefill_attention(benchmark::State& state, std::int64_t T) {
  const Layer layer(T);
  const auto out = bench::fill<float>(T * kHeads * kDim, 8);
  const ConstView3<float> q(layer.q.data(), {T, kHeads, kDim}), k(layer.k.data(), {T, kHeads, kDim}),
      v(layer.v.data(), {T, kHeads, kDim});
  AttentionOptions opt;
  opt.num_threads = kThreads;
  const double peak = bench::roofline().fma_gflops;
  bench::Paired pairs;
  for (auto _ : state) {
    const double gdn_s = seconds_of([&] { layer.run(GatedDeltaMode::chunked); });
    const double s = seconds_of([&] {
      attention_prefill(q, k, v, View3<float>(out.data(), {T, kHeads, kDim}), CausalMask{}, opt);
      benchmark::DoNotOptimize(out.data());
      benchmark::ClobberMemory();
    });
    pairs.add(s, gdn_s);
    state.SetIterationTime(s);
  }
  const double iters = static_cast<double>(state.iterations());
  const double flops = bench::attended_pairs(T, 0) * kHeads * 4.0 * kDim;  // as bench_prefill.cpp counts
  state.counters["GFLOPS"] = flops * iters / pairs.variant_s * 1e-9;
  state.counters["fma_frac"] = flops * iters / pairs.variant_s * 1e-9 / peak;
  state.counters["tok_s"] = static_cast<double>(T) * iters / pairs.variant_s;
  state.counters["gdn_speedup"] = pairs.time_ratio();
}

constexpr double kStateBytes = static_cast<double>(kHeads * kDim * kDim * sizeof(float));

void set_decode_counters(benchmark::State& state, double seconds) {
  const double iters = static_cast<double>(state.iterations());
  const double gbps = 3.0 * kStateBytes * iters / seconds * 1e-9;  // a read pass, then read + write
  state.counters["GBps"] = gbps;
  state.counters["bw_frac"] = gbps / bench::roofline().read_gbps;
  state.counters["tok_s"] = iters / seconds;
}

void BM_decode(benchmark::State& state) {
  const Layer layer(1);
  bench::roofline();
  double total = 0;
  for (auto _ : state) {
    const double s = seconds_of([&] { layer.run(GatedDeltaMode::recurrent); });
    state.SetIterationTime(s);
    total += s;
  }
  set_decode_counters(state, total);
}

// Attention decode over T_kv cached tokens of the same heads, paired with the gated delta step.
void BM_decode_attention(benchmark::State& state, std::int64_t T_kv) {
  const Layer layer(1);
  const std::int64_t bytes = 2 * T_kv * kHeads * kDim * static_cast<std::int64_t>(sizeof(float));
  const std::int64_t n_caches = std::max<std::int64_t>(2, ((std::int64_t{1} << 30) + bytes - 1) / bytes);
  const auto src = bench::fill<float>(T_kv * kHeads * kDim, 9);
  std::vector<KVCache<float>> caches;
  caches.reserve(static_cast<std::size_t>(n_caches));
  for (std::int64_t c = 0; c < n_caches; ++c) {
    caches.emplace_back(kHeads, kDim, kDim, T_kv);
    const ConstView3<float> kv(src.data(), {T_kv, kHeads, kDim});
    caches.back().append(kv, kv);
  }
  std::vector<float> out(static_cast<std::size_t>(kHeads * kDim));
  DecodeOptions opt;
  opt.num_threads = kThreads;
  bench::roofline();
  bench::warm_rotation(n_caches, [&](std::int64_t c) {
    attention_decode<float>(ConstView2<float>(layer.q.data(), {kHeads, kDim}), caches[c].keys(), caches[c].values(),
                            View2<float>(out.data(), {kHeads, kDim}), opt);
  });
  bench::Paired pairs;
  std::size_t i = 0;
  for (auto _ : state) {
    const double gdn_s = seconds_of([&] { layer.run(GatedDeltaMode::recurrent); });
    const auto& c = caches[i++ % caches.size()];
    const double s = seconds_of([&] {
      attention_decode<float>(ConstView2<float>(layer.q.data(), {kHeads, kDim}), c.keys(), c.values(),
                              View2<float>(out.data(), {kHeads, kDim}), opt);
      benchmark::DoNotOptimize(out.data());
      benchmark::ClobberMemory();
    });
    pairs.add(s, gdn_s);
    state.SetIterationTime(s);
  }
  const double gbps = static_cast<double>(bytes) * static_cast<double>(state.iterations()) / pairs.variant_s * 1e-9;
  state.counters["GBps"] = gbps;
  state.counters["bw_frac"] = gbps / bench::roofline().read_gbps;
  state.counters["tok_s"] = static_cast<double>(state.iterations()) / pairs.variant_s;
  state.counters["gdn_speedup"] = pairs.time_ratio();
}

const bool registered = [] {
  for (std::int64_t T : {4096, 32768})
    benchmark::RegisterBenchmark(("gated_delta/prefill/T:" + std::to_string(T)).c_str(),
                                 [=](benchmark::State& s) { BM_prefill(s, T); })
        ->UseManualTime()
        ->Unit(benchmark::kMillisecond);
  // Attention at T 32768 would take about 20 s a call (64x the 4096 case): compared at 4096 only.
  benchmark::RegisterBenchmark("gated_delta/prefill/T:4096/attention",
                               [](benchmark::State& s) { BM_prefill_attention(s, 4096); })
      ->UseManualTime()
      ->Unit(benchmark::kMillisecond);
  benchmark::RegisterBenchmark("gated_delta/decode", BM_decode)->UseManualTime()->Unit(benchmark::kMicrosecond);
  benchmark::RegisterBenchmark("gated_delta/decode/attention/T_kv:4096",
                               [](benchmark::State& s) { BM_decode_attention(s, 4096); })
      ->UseManualTime()
      ->Unit(benchmark::kMicrosecond);
  return true;
}();

}  // namespace
