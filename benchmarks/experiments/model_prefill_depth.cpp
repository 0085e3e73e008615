// benchmarks/experiments/model_prefill_depth.cpp — issue 12's long-context prefill target (512
// tokens continuing 8192 of context, >= 400 tok/s under Precision::fast) on any host: the AMX
// device host has no Google Benchmark, so attnkit-bench's
// model/qwen3-0.6b/prefill:512/bf16/{fast,exact}/depth:8192 is rebuilt here (experiments/
// model_context.hpp: random Qwen3-0.6B, bf16 weights, the cache filled to `depth` and rewound
// after every call; last row's logits). Each round times one prefill call and then the same
// call's projections and MLP alone (28 x {qkv, o, gate_up, down} on the 512 rows, separate
// weights of the same shapes), so the rest (attention, norms, RoPE, the cache writes) shows as
// the difference. GFLOP/s counts as attnkit-bench does: 2 x params x tokens for the linear layers,
// 4 x heads x head_dim per attended (query, key) pair, the head for one row. 2 threads.
// Not built by CMake:
//   F="-std=c++20 -O3 -march=native -fopenmp -ffp-contract=off -DNDEBUG -Iinclude -Ibenchmarks"
//   g++ $F benchmarks/experiments/model_prefill_depth.cpp -o model_prefill_depth
//   ./model_prefill_depth [fast|exact] [depth 8192] [f32|bf16|int8 cache, f32 as attnkit-bench] [rounds 5]
// Measured 2026-12-04 on an AMX host (fast, after 8192, four processes alternating the cache):
// f32 341 and 238 tok/s, bf16 245 and 355 (fastest calls 1.29-1.30 s); linear layers alone
// 0.42-0.63 s (711-1087 GFLOP/s), the rest 0.97-1.61 s.
// Built with -DATTNKIT_AMX_PROFILE it also prints the AMX attention kernel's own time (its work
// items' cycles): late on 2026-12-04, two processes on one AMX host (bf16 cache), calls 1.435 and
// 1.704 s, linear layers alone 0.390 and 0.468 s, attention items 0.803 and 0.876 s on 2 threads
// (1236 and 1132 GFLOP/s), so 0.24-0.36 s went to the rest of the layer and to what the linear
// layers lose in the call against alone. It also prints the stage profile (core/stage_profile.hpp:
// wall time per stage of the forward) and the minor page faults per call: late on 2026-12-04 the
// stages showed 0.08-0.09 s of zero-filled scratch buffers and 0.05 s of scalar norms per call;
// with the per-call workspace and vectorised norms, old and new alternated on one AMX host (three
// processes each): new 414.0, 450.2 and 270.0 tok/s (a slow core pair), old 302.3, 299.5, 289.5.
#include <cstdio>
#include <sys/resource.h>
#include <cstdlib>
#include <string>
#include <vector>

#include "attnkit/attnkit.hpp"
#include "experiments/model_context.hpp"

using namespace attnkit;
using namespace bench::context;

int main(int argc, char** argv) {
  constexpr int kThreads = 2;
  constexpr std::int64_t kTokens = 512;
  const Precision precision = argc > 1 && std::string(argv[1]) == "exact" ? Precision::exact : Precision::fast;
  const std::int64_t depth = argc > 2 ? std::atoll(argv[2]) : 8192;
  const std::string kv = argc > 3 ? argv[3] : "f32";
  const int rounds = argc > 4 ? std::atoi(argv[4]) : 5;
  const model::CacheType type = kv == "bf16" ? model::CacheType::bf16 : kv == "int8" ? model::CacheType::int8 : model::CacheType::f32;

  const auto reg = model::default_registry();
  const auto m = random_qwen3_0_6b(reg);
  const auto& c = m.config();
  auto s = m.new_session({type, depth + kTokens});
  fill(m, s, depth);

  const std::int64_t V = c.vocab_size, D = c.hidden_size, H = c.num_attention_heads, Hkv = c.num_key_value_heads,
                     d = c.head_dim, I = c.intermediate_size, L = c.num_hidden_layers;
  std::vector<std::int64_t> ids(static_cast<std::size_t>(kTokens));
  for (std::int64_t t = 0; t < kTokens; ++t) ids[static_cast<std::size_t>(t)] = (t * 7919 + 11) % V;
  std::vector<float> logits(static_cast<std::size_t>(V));
  model::ForwardOptions fo;
  fo.logits = model::LogitsRows::last;
  fo.precision = precision;
  fo.num_threads = kThreads;
  // Minor page faults (a buffer's first touch), per call and per pass of the linear layers alone.
  const auto faults = [] {
    rusage u{};
    getrusage(RUSAGE_SELF, &u);
    return static_cast<double>(u.ru_minflt);
  };
  double call_faults = 0, linear_faults = 0;
  const auto call = [&] {
    const double f0 = faults();
    const auto t0 = clk::now();
    m.forward(s, std::span<const std::int64_t>(ids), View2<float>(logits.data(), {1, V}), fo);
    const double sec = seconds(t0);
    call_faults += faults() - f0;
    rewind(m, s, depth);
    return sec;
  };

  // The call's projections and MLP alone, on kTokens rows.
  std::vector<PackedLinear> linears;
  {
    const auto add = [&](std::int64_t N, std::int64_t K) {
      std::vector<float> w(static_cast<std::size_t>(N * K));
      for (std::size_t i = 0; i < w.size(); ++i) w[i] = 0.01f * static_cast<float>(static_cast<int>((i * 7919) % 201) - 100);
      linears.push_back(PackedLinear::pack_as_bf16(w.data(), N, K, K));
    };
    for (std::int64_t l = 0; l < L; ++l) {
      add((H + 2 * Hkv) * d, D);
      add(D, H * d);
      add(2 * I, D);
      add(D, I);
    }
  }
  const std::int64_t widest = std::max({2 * I, I, H * d, (H + 2 * Hkv) * d, D});
  std::vector<float> x(static_cast<std::size_t>(kTokens * widest), 0.5f), y(x.size());
  const auto linear_alone = [&] {
    const double f0 = faults();
    const auto t0 = clk::now();
    for (const auto& lin : linears)
      lin.forward(ConstView2<float>(x.data(), {kTokens, lin.in_features()}),
                  View2<float>(y.data(), {kTokens, lin.out_features()}), {precision, kThreads, false});
    const double sec = seconds(t0);
    linear_faults += faults() - f0;
    return sec;
  };

  const double params = static_cast<double>(D * (H + 2 * Hkv) * d + H * d * D + 3 * D * I);
  const double pairs = static_cast<double>(kTokens) * static_cast<double>(depth) + kTokens * (kTokens + 1) / 2.0;
  const double linear_flops = static_cast<double>(L) * 2 * params * kTokens;
  const double attn_flops = static_cast<double>(L) * 4 * static_cast<double>(H * d) * pairs;
  const double flops = linear_flops + attn_flops + 2.0 * static_cast<double>(D * V);

  call();  // warm-up: thread scratch, first touch of the call's buffers
  linear_alone();
#if defined(ATTNKIT_AMX_PROFILE)
  // Built with -DATTNKIT_AMX_PROFILE: the AMX attention items' TSC cycles during the timed calls
  // (both threads' items add up in one counter), to tell the attention kernel from the rest.
  std::fill_n(detail::flash::amx_profile(), static_cast<int>(detail::flash::AmxPhase::count), 0);
#endif
  profile::enable_stage_profile(true);
  profile::reset_stage_totals();
  call_faults = linear_faults = 0;
  std::vector<double> calls, lins, rest;
  for (int r = 0; r < rounds; ++r) {
    calls.push_back(call());
    lins.push_back(linear_alone());
    rest.push_back(calls.back() - lins.back());
  }
  std::printf("qwen3-0.6b prefill %lld after %lld, kv %s, %s, %d threads (median of %d rounds)\n",
              static_cast<long long>(kTokens), static_cast<long long>(depth), kv.c_str(),
              precision == Precision::fast ? "fast" : "exact", kThreads, rounds);
  std::printf("  call: %.3f s, %.1f tok/s, %.1f GFLOP/s (calls %.3f-%.3f s)\n", median(calls), kTokens / median(calls),
              flops / median(calls) * 1e-9, *std::min_element(calls.begin(), calls.end()),
              *std::max_element(calls.begin(), calls.end()));
  std::printf("  minor page faults: %.0f per call, %.0f per pass of the linear layers alone\n", call_faults / rounds,
              linear_faults / rounds);
  std::printf("  its linear layers alone: %.3f s, %.1f GFLOP/s; the rest (attention, norms, RoPE, cache): %.3f s, "
              "attention at %.1f GFLOP/s if it were all of it\n",
              median(lins), linear_flops / median(lins) * 1e-9, median(rest), attn_flops / median(rest) * 1e-9);
  // Wall time per stage of the forward (core/stage_profile.hpp), per call (stages nest: "mixer"
  // holds the "attn.*" ones, "mlp" the "mlp.*" ones).
  profile::enable_stage_profile(false);
  std::printf("  stages (wall time per call):\n");
  for (const auto& st : profile::stage_totals())
    std::printf("    %-18s %8.4f s  %6.1f%%  (%lld calls)\n", st.name.c_str(), st.seconds / rounds,
                100.0 * st.seconds / rounds / median(calls), static_cast<long long>(st.calls / rounds));
#if defined(ATTNKIT_AMX_PROFILE)
  const auto t0 = clk::now();
  const std::uint64_t c0 = __rdtsc();
  while (seconds(t0) < 0.2) {
  }
  const double tsc_hz = static_cast<double>(__rdtsc() - c0) / seconds(t0);
  const double item_s = static_cast<double>(detail::flash::amx_profile()[0]) / tsc_hz / rounds;
  std::printf("  attention kernel (AMX items, ATTNKIT_AMX_PROFILE): %.3f s of thread time per call, %.3f s on %d "
              "threads if balanced (%.1f GFLOP/s)\n",
              item_s, item_s / kThreads, kThreads, attn_flops / (item_s / kThreads) * 1e-9);
#endif
}
