// Qwen3-0.6B-shaped model with random bf16 weights: prefill of a 512-token prompt and cached
// decode, tokens/s, 1 and 2 threads. Decode also reports the weight bytes streamed per second
// against the measured DRAM read bandwidth (decode reads every weight once per token).
// Loop Attention variants of the same shape (qwen3-0.6b-loop: gates, loop_num 2, window 64)
// run beside the plain model in the same binary: model/loop-stack/... and model/loop-layer/....
// Stack mode makes two passes over the weights per token, so its ideal is 0.5x plain.
#include <benchmark/benchmark.h>

#include <map>
#include <memory>
#include <string>
#include <random>
#include <vector>

#include "attnkit/attnkit.hpp"
#include "roofline.hpp"

using namespace attnkit;

namespace {

// "plain", "loop-stack" or "loop-layer"; built once, on first use.
const model::Qwen3Model& qwen3_0_6b(const std::string& variant = "plain") {
  static std::map<std::string, std::unique_ptr<model::Qwen3Model>> models;
  auto& m = models[variant];
  if (!m) {
    nlohmann::json j = io::qwen3_0_6b_config().raw;
    if (variant != "plain") {
      j["loop_num"] = 2;
      j["loop_window_size"] = 64;
      j["loop_mode"] = variant == "loop-stack" ? "stack" : "layer";
    }
    const auto reg = model::default_registry();
    m = std::make_unique<model::Qwen3Model>(
        model::Qwen3Model::random(reg.parse_config(j, "qwen3-0.6b " + variant), model::WeightType::bf16, 1, &reg));
  }
  return *m;
}

std::vector<std::int64_t> prompt(std::int64_t n, std::int64_t vocab) {
  std::mt19937_64 g(5);
  std::uniform_int_distribution<std::int64_t> d(0, vocab - 1);
  std::vector<std::int64_t> ids(static_cast<std::size_t>(n));
  for (auto& x : ids) x = d(g);
  return ids;
}

// Prefill: the whole prompt in one step; logits of the last row only (what generation needs).
void BM_model_prefill(benchmark::State& state, Precision precision, std::string variant) {
  const auto& m = qwen3_0_6b(variant);
  const std::int64_t T = state.range(0);
  const int threads = static_cast<int>(state.range(1));
  const auto ids = prompt(T, m.config().vocab_size);
  std::vector<float> logits(static_cast<std::size_t>(m.config().vocab_size));
  model::ForwardOptions fo;
  fo.logits = model::LogitsRows::last;
  fo.precision = precision;
  fo.num_threads = threads;
  for (auto _ : state) {
    auto s = m.new_session({model::CacheType::f32, T});
    m.forward(s, ids, View2<float>(logits.data(), {1, m.config().vocab_size}), fo);
    benchmark::DoNotOptimize(logits.data());
  }
  state.counters["tok_s"] = benchmark::Counter(static_cast<double>(T) * state.iterations(), benchmark::Counter::kIsRate);
}

// Decode: after a prefill of `T` tokens (untimed), each iteration decodes one token.
void BM_model_decode(benchmark::State& state, model::CacheType kv, std::string variant) {
  const auto& m = qwen3_0_6b(variant);
  const std::int64_t T = state.range(0);
  const int threads = static_cast<int>(state.range(1));
  const std::int64_t V = m.config().vocab_size;
  const auto ids = prompt(T, V);
  std::vector<float> logits(static_cast<std::size_t>(V));
  model::ForwardOptions fo;
  fo.logits = model::LogitsRows::last;
  fo.num_threads = threads;
  fo.precision = Precision::fast;  // prefill only; a one-token step is bandwidth bound either way
  auto s = m.new_session({kv, T + 4096});
  m.forward(s, ids, View2<float>(logits.data(), {1, V}), fo);
  fo.precision = Precision::exact;
  std::int64_t next = ops::argmax(logits.data(), V);
  for (auto _ : state) {
    m.forward(s, std::span<const std::int64_t>(&next, 1), View2<float>(logits.data(), {1, V}), fo);
    next = ops::argmax(logits.data(), V);
  }
  state.counters["tok_s"] = benchmark::Counter(static_cast<double>(state.iterations()), benchmark::Counter::kIsRate);
  // Weight bytes only (the KV cache read adds 2 * T * layers * H_kv * d * sizeof(kv) per step);
  // a stack of several passes reads the layers' weights once per pass.
  const double gb = static_cast<double>(m.streamed_bytes_per_token()) * state.iterations() / 1e9;
  state.counters["GBps"] = benchmark::Counter(gb, benchmark::Counter::kIsRate);
  state.counters["bw_frac"] = benchmark::Counter(gb / bench::roofline().read_gbps, benchmark::Counter::kIsRate);
}

template <class F, class... A>
void add(const char* name, int iterations, F fn, A... args) {
  benchmark::RegisterBenchmark(name, fn, args...)
      ->ArgNames({"T", "threads"})
      ->Args({512, 1})
      ->Args({512, 2})
      ->Unit(benchmark::kMillisecond)
      ->UseRealTime()
      ->Iterations(iterations);
}

const bool registered = [] {
  add("model/prefill/bf16/fast", 2, BM_model_prefill, Precision::fast, std::string("plain"));
  add("model/prefill/bf16/exact", 2, BM_model_prefill, Precision::exact, std::string("plain"));
  add("model/decode/bf16/kv:f32", 32, BM_model_decode, model::CacheType::f32, std::string("plain"));
  add("model/decode/bf16/kv:bf16", 32, BM_model_decode, model::CacheType::bf16, std::string("plain"));
  for (const char* v : {"loop-stack", "loop-layer"}) {
    const std::string n = std::string("model/") + v;
    add((n + "/prefill/bf16/fast").c_str(), 2, BM_model_prefill, Precision::fast, std::string(v));
    add((n + "/prefill/bf16/exact").c_str(), 2, BM_model_prefill, Precision::exact, std::string(v));
    add((n + "/decode/bf16/kv:f32").c_str(), 32, BM_model_decode, model::CacheType::f32, std::string(v));
    add((n + "/decode/bf16/kv:bf16").c_str(), 32, BM_model_decode, model::CacheType::bf16, std::string(v));
  }
  return true;
}();

}  // namespace
