// benchmarks/experiments/model_decode_frac.cpp — issue 12's model decode target (a step after
// 512 / 8192 tokens of context, >= 0.90 of the bandwidth bound) measured two ways in one process,
// on any host (no Google Benchmark: the AMX device host has none):
//  * against the best of 5 read passes taken before the rounds (attnkit-bench's roofline), and
//  * per round, against one read pass of the same buffer taken just before the round's step,
//    median of the rounds' ratios: on a shared VM whose bandwidth swings by tens of percent
//    between seconds, a best-of-5 peak set against a median step mixes the swing into the ratio.
// Each round also runs the step's weight GEMVs alone (28 x {qkv, o, gate_up, down} + lm head,
// the same shapes, separate weights), which says how much of the step is the linear layers.
// Random Qwen3-0.6B (bf16 weights), 2 threads, the cache filled to `depth` and rewound after
// every step, as attnkit-bench's model/qwen3-0.6b/decode/.../depth:N cases do.
// Not built by CMake:
//   F="-std=c++20 -O3 -march=native -fopenmp -ffp-contract=off -DNDEBUG -Iinclude -Ibenchmarks"
//   g++ $F benchmarks/experiments/model_decode_frac.cpp -o model_decode_frac
//   ./model_decode_frac [exact|fast] [depth] [bf16|int8] [rounds]
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <string>
#include <type_traits>
#include <vector>

#include "attnkit/attnkit.hpp"
#include "experiments/model_context.hpp"
#include "roofline.hpp"

using namespace attnkit;
namespace rl = bench::roofline_detail;
using namespace bench::context;

namespace {

constexpr int kThreads = 2;

}  // namespace

int main(int argc, char** argv) {
  const Precision precision = argc > 1 && std::string(argv[1]) == "fast" ? Precision::fast : Precision::exact;
  const std::int64_t depth = argc > 2 ? std::atoll(argv[2]) : 512;
  const bool int8 = argc > 3 && std::string(argv[3]) == "int8";
  const int rounds = argc > 4 ? std::atoi(argv[4]) : 15;

  const auto reg = model::default_registry();
  const auto m = random_qwen3_0_6b(reg);
  const auto& c = m.config();
  auto s = m.new_session({int8 ? model::CacheType::int8 : model::CacheType::bf16, depth + 64});
  const std::int64_t Hkv = c.num_key_value_heads, d = c.head_dim;
  fill(m, s, depth);
  // A step reads the weights and depth + 1 rows of every cache (the caches' own byte rule).
  double step_bytes = static_cast<double>(m.streamed_bytes_per_token());
  for_each_cache(m, s, [&](auto& cache) {
    using T = std::remove_const_t<typename decltype(cache.keys())::element_type>;
    step_bytes += static_cast<double>(
        detail::kv::bytes<T>(cache.kv_heads(), depth + 1, cache.head_dim_k(), cache.head_dim_v()));
  });

  const std::int64_t V = c.vocab_size;
  std::vector<float> logits(static_cast<std::size_t>(V));
  model::ForwardOptions fo;
  fo.logits = model::LogitsRows::last;
  fo.precision = precision;
  fo.num_threads = kThreads;
  std::int64_t next = 1;
  const auto step = [&] {
    const auto t0 = clk::now();
    m.forward(s, std::span<const std::int64_t>(&next, 1), View2<float>(logits.data(), {1, V}), fo);
    const double sec = seconds(t0);
    next = ops::argmax(logits.data(), V);
    rewind(m, s, depth);
    return sec;
  };

  // The step's GEMVs alone: random weights of the same shapes.
  std::vector<PackedLinear> linears;
  double gemv_bytes = 0;
  {
    const std::int64_t D = c.hidden_size, H = c.num_attention_heads, I = c.intermediate_size;
    const auto add = [&](std::int64_t N, std::int64_t K) {
      std::vector<float> w(static_cast<std::size_t>(N * K));
      for (std::size_t i = 0; i < w.size(); ++i) w[i] = 0.01f * static_cast<float>(static_cast<int>((i * 7919) % 201) - 100);
      linears.push_back(PackedLinear::pack_as_bf16(w.data(), N, K, K));
      gemv_bytes += 2.0 * static_cast<double>(N * K);
    };
    for (int l = 0; l < m.num_layers(); ++l) {
      add((H + 2 * Hkv) * d, D);
      add(D, H * d);
      add(2 * I, D);
      add(D, I);
    }
    add(V, D);
  }
  std::vector<float> x(static_cast<std::size_t>(c.intermediate_size + c.hidden_size * 4), 0.5f), y(static_cast<std::size_t>(V));
  const auto gemvs = [&] {
    const auto t0 = clk::now();
    for (const auto& lin : linears)
      lin.forward(ConstView2<float>(x.data(), {1, lin.in_features()}), View2<float>(y.data(), {1, lin.out_features()}),
                  {precision, kThreads, false});
    return seconds(t0);
  };

  const double best_read = rl::read_bandwidth(kThreads) * 1e-9;
  const auto buf = rl::make_read_buffer(rl::kReadBufferFloats, kThreads);
  step();  // warm-up: thread scratch, first touch of the step's buffers
  gemvs();
  std::vector<double> reads, step_gbps, gemv_gbps, step_ratio, gemv_ratio;
  profile::enable_stage_profile(true);  // the steps' stages (core/stage_profile.hpp); the GEMVs have none
  profile::reset_stage_totals();
  for (int r = 0; r < rounds; ++r) {
    const double read = rl::read_pass(buf.get(), rl::kReadBufferFloats, kThreads) * 1e-9;
    const double gs = step_bytes / step() * 1e-9;
    const double gg = gemv_bytes / gemvs() * 1e-9;
    reads.push_back(read);
    step_gbps.push_back(gs);
    gemv_gbps.push_back(gg);
    step_ratio.push_back(gs / read);
    gemv_ratio.push_back(gg / read);
  }
  std::printf("qwen3-0.6b decode after %lld, kv %s, %s, %d threads: %.3f GB a step (weights %.3f)\n",
              static_cast<long long>(depth), int8 ? "int8" : "bf16", precision == Precision::fast ? "fast" : "exact",
              kThreads, step_bytes * 1e-9, gemv_bytes * 1e-9);
  std::printf("  read: best of 5 before %.1f GB/s, per-round passes median %.1f (%.1f-%.1f)\n", best_read,
              median(reads), *std::min_element(reads.begin(), reads.end()), *std::max_element(reads.begin(), reads.end()));
  std::printf("  step: %.1f GB/s (%.1f tok/s): %.3f of the best read, %.3f per round (median of %d)\n",
              median(step_gbps), median(step_gbps) * 1e9 / step_bytes, median(step_gbps) / best_read,
              median(step_ratio), rounds);
  std::printf("  its GEMVs alone: %.1f GB/s: %.3f of the best read, %.3f per round\n", median(gemv_gbps),
              median(gemv_gbps) / best_read, median(gemv_ratio));
  profile::enable_stage_profile(false);
  std::printf("  stages (wall time per step, mean of the rounds; nested: mixer > attn.*, mlp > mlp.*):\n");
  for (const auto& st : profile::stage_totals())
    std::printf("    %-18s %9.1f us  (%lld calls)\n", st.name.c_str(), st.seconds / rounds * 1e6,
                static_cast<long long>(st.calls / rounds));
}
