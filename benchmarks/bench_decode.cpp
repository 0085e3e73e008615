// benchmarks/bench_decode.cpp — machine ceilings (roofline/*) and decode attention (decode/*).
#include <benchmark/benchmark.h>

#include <cstdint>
#include <random>
#include <type_traits>
#include <vector>

#include "attnkit/attention/decode.hpp"
#include "attnkit/attention/kv_cache.hpp"
#include "roofline.hpp"

namespace {

using namespace attnkit::bench;

// Each case re-runs the measurement kernel of roofline.hpp per iteration and reports its rate.
void BM_roofline_fp32_fma(benchmark::State& state) {
  const int threads = attnkit::default_num_threads();
  const std::int64_t iters = roofline_detail::calibrate(roofline_detail::fma_thread, 0.1);
  double rate = 0;
  for (auto _ : state) rate = roofline_detail::parallel_rate(threads, iters, roofline_detail::fma_thread);
  state.counters["GFLOPS"] = rate * 1e-9;
}
BENCHMARK(BM_roofline_fp32_fma)->Name("roofline/fp32_fma")->UseRealTime()->Unit(benchmark::kMillisecond);

void BM_roofline_bf16_dot(benchmark::State& state) {
  const int threads = attnkit::default_num_threads();
  const std::int64_t iters = roofline_detail::calibrate(roofline_detail::bf16_thread, 0.1);
  double rate = 0;
  for (auto _ : state) rate = roofline_detail::parallel_rate(threads, iters, roofline_detail::bf16_thread);
  state.counters["GFLOPS"] = rate * 1e-9;
}
BENCHMARK(BM_roofline_bf16_dot)->Name("roofline/bf16_dot")->UseRealTime()->Unit(benchmark::kMillisecond);

void BM_roofline_amx_bf16(benchmark::State& state) {
  if (!roofline_detail::amx_usable()) {
    state.SkipWithError("AMX tiles not usable here (not compiled for AMX, or the kernel refused the tile state)");
    return;
  }
  const int threads = attnkit::default_num_threads();
  const std::int64_t iters = roofline_detail::calibrate(roofline_detail::amx_thread, 0.1);
  double rate = 0;
  for (auto _ : state) rate = roofline_detail::parallel_rate(threads, iters, roofline_detail::amx_thread);
  state.counters["GFLOPS"] = rate * 1e-9;
}
BENCHMARK(BM_roofline_amx_bf16)->Name("roofline/amx_bf16")->UseRealTime()->Unit(benchmark::kMillisecond);

void BM_roofline_mem_read(benchmark::State& state) {
  const int threads = attnkit::default_num_threads();
  const auto buf = roofline_detail::make_read_buffer(roofline_detail::kReadBufferFloats, threads);
  double best = 0;
  for (auto _ : state)
    best = std::max(best, roofline_detail::read_pass(buf.get(), roofline_detail::kReadBufferFloats, threads));
  state.counters["GBps"] = best * 1e-9;
}
BENCHMARK(BM_roofline_mem_read)->Name("roofline/mem_read")->UseRealTime()->Unit(benchmark::kMillisecond);

// Decode of one token with Qwen3-0.6B attention shapes (H = 16, H_kv = 8, d = 128) against a
// head-major KVCache of T_kv tokens, 2 threads. To measure DRAM rather than cache, the
// iterations rotate over enough separate caches (>= 2 GiB in all) that each one is read again
// only after more than 1 GiB of other traffic. GBps counts the K and V bytes read (int8: the
// codes and the f32 scale of each row).
template <class KV>
void BM_decode(benchmark::State& state) {
  constexpr std::int64_t H = 16, Hk = 8, d = 128;
  const std::int64_t T = state.range(0);
  constexpr std::int64_t scale_bytes = std::is_same_v<KV, std::int8_t> ? sizeof(float) : 0;
  const std::int64_t bytes = 2 * T * Hk * (d * static_cast<std::int64_t>(sizeof(KV)) + scale_bytes);
  const std::int64_t n_caches = std::max<std::int64_t>(2, ((std::int64_t{2} << 30) + bytes - 1) / bytes);

  std::mt19937 gen(42);
  std::normal_distribution<float> nd;
  std::vector<float> src(static_cast<std::size_t>(T * Hk * d)), q(static_cast<std::size_t>(H * d)),
      out(static_cast<std::size_t>(H * d));
  for (auto& x : src) x = nd(gen);
  for (auto& x : q) x = nd(gen);
  std::vector<attnkit::KVCache<KV>> caches;
  caches.reserve(static_cast<std::size_t>(n_caches));
  for (std::int64_t c = 0; c < n_caches; ++c) {
    caches.emplace_back(Hk, d, d, T);
    const attnkit::ConstView3<float> kv(src.data(), {T, Hk, d});
    caches.back().append(kv, kv);
  }
  attnkit::DecodeOptions opt;
  opt.num_threads = 2;
  std::size_t i = 0;
  for (auto _ : state) {
    const auto& c = caches[i++ % caches.size()];
    attnkit::attention_decode<KV>(attnkit::ConstView2<float>(q.data(), {H, d}), c.keys(), c.values(),
                                  attnkit::View2<float>(out.data(), {H, d}), opt);
    benchmark::DoNotOptimize(out.data());
    benchmark::ClobberMemory();
  }
  const double gb = static_cast<double>(bytes) * 1e-9;
  state.counters["GBps"] = benchmark::Counter(gb, benchmark::Counter::kIsIterationInvariantRate);
  state.counters["bw_frac"] =
      benchmark::Counter(gb / roofline().read_gbps, benchmark::Counter::kIsIterationInvariantRate);
  state.counters["caches"] = static_cast<double>(n_caches);
}
BENCHMARK_TEMPLATE(BM_decode, float)
    ->Name("decode/f32")->ArgName("T")->Arg(512)->Arg(2048)->Arg(8192)->Arg(32768)
    ->UseRealTime()->Unit(benchmark::kMicrosecond);
BENCHMARK_TEMPLATE(BM_decode, attnkit::bf16)
    ->Name("decode/bf16")->ArgName("T")->Arg(512)->Arg(2048)->Arg(8192)->Arg(32768)
    ->UseRealTime()->Unit(benchmark::kMicrosecond);
BENCHMARK_TEMPLATE(BM_decode, std::int8_t)
    ->Name("decode/int8")->ArgName("T")->Arg(512)->Arg(2048)->Arg(8192)->Arg(32768)
    ->UseRealTime()->Unit(benchmark::kMicrosecond);

}  // namespace
