// benchmarks/bench_decode.cpp — machine ceilings (roofline/*) and decode attention (decode/*).
#include <benchmark/benchmark.h>

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

void BM_roofline_mem_read(benchmark::State& state) {
  const int threads = attnkit::default_num_threads();
  const auto buf = roofline_detail::make_read_buffer(roofline_detail::kReadBufferFloats, threads);
  double best = 0;
  for (auto _ : state)
    best = std::max(best, roofline_detail::read_pass(buf.get(), roofline_detail::kReadBufferFloats, threads));
  state.counters["GBps"] = best * 1e-9;
}
BENCHMARK(BM_roofline_mem_read)->Name("roofline/mem_read")->UseRealTime()->Unit(benchmark::kMillisecond);

}  // namespace
