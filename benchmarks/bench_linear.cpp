// benchmarks/bench_linear.cpp — PackedLinear on the Qwen3-0.6B projection shapes.
//
//  linear/prefill/<bf16|f32|q8>/<fast|exact>/N:<out>/K:<in>/M:<tokens>
//      counters GFLOPS (2*M*N*K / time) and peak_frac = GFLOPS / the measured peak of the units
//      the call runs on (bench::linear_peak in roofline.hpp; the label names them): AMX bf16 for
//      bf16 weights (fast and exact; more than 8 tokens, where AMX is usable), fp32 FMA for f32
//      weights. Label "amx x3": exact on AMX multiplies three bf16 planes of x (hi + mid + lo),
//      so its ceiling is peak_frac 1/3.
//  linear/decode/<bf16|f32>/N:<out>/K:<in>, linear/decode/q8/<fast|exact>/N:<out>/K:<in>
//      one token, Precision::exact (q8: both; fast = VNNI on int8 activations, exact = weights
//      widened to f32); counters GBps (packed weight bytes / time) and bw_frac vs
//      the measured DRAM read bandwidth. Each iteration uses the next of several packed copies
//      of the weights, > 1 GiB apart in traffic, so the weights come from DRAM, not the LLC.
// Real time (multi-threaded); run with --benchmark_repetitions=3 or rely on the built-in 3.
#include <benchmark/benchmark.h>

#include <cstdint>
#include <string>
#include <vector>

#include "attnkit/linalg/packed_linear.hpp"
#include "roofline.hpp"

namespace {

using namespace attnkit;

struct Shape {
  const char* what;
  std::int64_t N, K;
};
// Qwen3-0.6B: fused q/k/v, o_proj, fused gate+up, down, tied lm_head.
const Shape kShapes[] = {{"qkv", 4096, 1024}, {"o", 1024, 2048}, {"gate_up", 6144, 1024},
                         {"down", 1024, 3072}, {"lm_head", 151936, 1024}};

std::vector<float> random_floats(std::int64_t n, std::uint64_t seed, float scale) {
  std::vector<float> v(static_cast<std::size_t>(n));
  std::uint64_t s = seed * 0x9E3779B97F4A7C15ull + 1;
  for (auto& x : v) {
    s = s * 6364136223846793005ull + 1442695040888963407ull;
    x = scale * (static_cast<float>(static_cast<std::int64_t>(s >> 40)) / static_cast<float>(1 << 23) - 1.f);
  }
  return v;
}

PackedLinear make_layer(std::int64_t N, std::int64_t K, LinearFormat format, std::uint64_t seed) {
  const auto w = random_floats(N * K, seed, 0.05f);
  if (format == LinearFormat::q8) return PackedLinear::pack_q8(w.data(), N, K, K);
  return format == LinearFormat::bf16 ? PackedLinear::pack_as_bf16(w.data(), N, K, K) : PackedLinear::pack(w.data(), N, K, K);
}

void prefill(benchmark::State& state, std::int64_t N, std::int64_t K, std::int64_t M, LinearFormat format,
             Precision prec) {
  (void)bench::roofline();  // the ceilings are measured (once per process) before the timed loop
  const PackedLinear lin = make_layer(N, K, format, 1);
  const auto x = random_floats(M * K, 2, 1.f);
  std::vector<float> y(static_cast<std::size_t>(M * N));
  const LinearOptions opt{prec, 0, false};
  for (auto _ : state) {
    lin.forward(ConstView2<float>(x.data(), {M, K}), View2<float>(y.data(), {M, N}), opt);
    benchmark::DoNotOptimize(y.data());
    benchmark::ClobberMemory();
  }
  const double gflop = 2.0 * static_cast<double>(M) * static_cast<double>(N) * static_cast<double>(K) * 1e-9;
  const bench::Peak peak = bench::linear_peak(format, prec, M);
  state.SetLabel(peak.products > 1 ? std::string(peak.unit) + " x" + std::to_string(peak.products) : peak.unit);
  state.counters["GFLOPS"] = benchmark::Counter(gflop, benchmark::Counter::kIsIterationInvariantRate);
  state.counters["peak_frac"] = benchmark::Counter(gflop / peak.gflops, benchmark::Counter::kIsIterationInvariantRate);
}

void decode(benchmark::State& state, std::int64_t N, std::int64_t K, LinearFormat format, Precision prec) {
  const auto& roof = bench::roofline();
  // Enough copies that > 1 GiB of other weights is read between two uses of one copy.
  const std::int64_t one = (format == LinearFormat::f32 ? 4 : format == LinearFormat::bf16 ? 2 : 1) * N * K;
  const std::int64_t copies = (std::int64_t{1} << 30) / one + 2;
  std::vector<PackedLinear> layers;
  layers.reserve(static_cast<std::size_t>(copies));
  for (std::int64_t c = 0; c < copies; ++c) layers.push_back(make_layer(N, K, format, 10 + static_cast<std::uint64_t>(c)));
  const auto x = random_floats(K, 3, 1.f);
  std::vector<float> y(static_cast<std::size_t>(N));
  const LinearOptions opt{prec, 0, false};
  std::size_t i = 0;
  for (auto _ : state) {
    layers[i].forward(ConstView2<float>(x.data(), {1, K}), View2<float>(y.data(), {1, N}), opt);
    benchmark::DoNotOptimize(y.data());
    benchmark::ClobberMemory();
    i = (i + 1) % layers.size();
  }
  const double gb = static_cast<double>(layers[0].bytes()) * 1e-9;
  state.counters["GBps"] = benchmark::Counter(gb, benchmark::Counter::kIsIterationInvariantRate);
  state.counters["bw_frac"] = benchmark::Counter(gb / roof.read_gbps, benchmark::Counter::kIsIterationInvariantRate);
}

std::string dims(const Shape& s) { return "/N:" + std::to_string(s.N) + "/K:" + std::to_string(s.K); }

const bool registered = [] {
  constexpr std::int64_t M = 512;
  for (const Shape& s : kShapes) {
    const bool lm_head = s.N > 100000;
    struct Variant {
      const char* name;
      LinearFormat format;
      Precision prec;
    };
    for (const Variant v : {Variant{"bf16/fast", LinearFormat::bf16, Precision::fast},
                            Variant{"bf16/exact", LinearFormat::bf16, Precision::exact},
                            Variant{"f32/exact", LinearFormat::f32, Precision::exact},
                            Variant{"q8/fast", LinearFormat::q8, Precision::fast},
                            Variant{"q8/exact", LinearFormat::q8, Precision::exact}}) {
      // lm_head: ~0.5 s per call; the model runs it fast
      if (lm_head && v.prec != Precision::fast) continue;
      benchmark::RegisterBenchmark(("linear/prefill/" + std::string(v.name) + dims(s) + "/M:" + std::to_string(M)).c_str(),
                                   [=](benchmark::State& st) { prefill(st, s.N, s.K, M, v.format, v.prec); })
          ->UseRealTime()
          ->Unit(benchmark::kMillisecond)
          ->Repetitions(3)
          ->DisplayAggregatesOnly(true);
    }
    struct DecodeVariant {
      const char* name;
      LinearFormat format;
      Precision prec;
    };
    for (const DecodeVariant v : {DecodeVariant{"bf16", LinearFormat::bf16, Precision::exact},
                                  DecodeVariant{"f32", LinearFormat::f32, Precision::exact},
                                  DecodeVariant{"q8/fast", LinearFormat::q8, Precision::fast},
                                  DecodeVariant{"q8/exact", LinearFormat::q8, Precision::exact}}) {
      if (lm_head && v.format == LinearFormat::f32) continue;  // 622 MB of f32 weights per copy
      benchmark::RegisterBenchmark(("linear/decode/" + std::string(v.name) + dims(s)).c_str(),
                                   [=](benchmark::State& st) { decode(st, s.N, s.K, v.format, v.prec); })
          ->UseRealTime()
          ->Unit(benchmark::kMicrosecond)
          ->Repetitions(3)
          ->DisplayAggregatesOnly(true);
    }
  }
  return true;
}();

}  // namespace
