// benchmarks/experiments/model_context.hpp — a random Qwen3-0.6B (bf16 weights) whose session
// holds `depth` tokens of context in every layer's KV cache, rewound to `depth` after each timed
// forward, as attnkit-bench's model/qwen3-0.6b/.../depth:N cases build it (the context's K/V
// rows are appended directly: decode and prefill cost do not depend on their values). Shared by
// the experiments that time a model step at depth on hosts without Google Benchmark
// (model_decode_frac.cpp, model_prefill_depth.cpp).
#pragma once

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <vector>

#include "attnkit/attnkit.hpp"

namespace attnkit::bench::context {

using clk = std::chrono::steady_clock;

inline double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

inline double seconds(clk::time_point t0) { return std::chrono::duration<double>(clk::now() - t0).count(); }

inline model::Qwen3Model random_qwen3_0_6b(const model::Registry& reg) {
  return model::Qwen3Model::random(reg.parse_config(io::qwen3_0_6b_config().raw, "qwen3-0.6b"), model::WeightType::bf16, 1,
                                   &reg);
}

// f(cache) for every layer's (non-ring) KV cache of session s.
template <class F>
void for_each_cache(const model::Qwen3Model& m, model::Session& s, F&& f) {
  for (int l = 0; l < m.num_layers(); ++l) {
    const auto* attn = dynamic_cast<const model::Qwen3Attention*>(&m.mixer(l));
    attn->cache(s.state(l), 0).visit([&](auto& cache) {
      if constexpr (!requires { cache.total(); }) f(cache);
    });
  }
}

// Appends `depth` rows of fixed pseudo-random K/V to every layer's cache; the session then
// continues at position depth.
inline void fill(const model::Qwen3Model& m, model::Session& s, std::int64_t depth) {
  const auto& c = m.config();
  const std::int64_t Hkv = c.num_key_value_heads, d = c.head_dim, chunk = 512;
  std::vector<float> rows(static_cast<std::size_t>(chunk * Hkv * d));
  for (std::size_t i = 0; i < rows.size(); ++i) rows[i] = static_cast<float>((i * 7919) % 2001) / 1000.f - 1.f;
  const ConstView3<float> rv(rows.data(), {chunk, Hkv, d});
  for_each_cache(m, s, [&](auto& cache) {
    for (std::int64_t t = 0; t < depth; t += chunk) {
      const auto part = rv.slice(0, 0, std::min(chunk, depth - t));
      cache.append(part, part);
    }
  });
  s.set_position(depth);
}

// Cuts every cache back to `depth` rows after a timed forward.
inline void rewind(const model::Qwen3Model& m, model::Session& s, std::int64_t depth) {
  for_each_cache(m, s, [&](auto& cache) { cache.truncate(depth); });
  s.set_position(depth);
}

}  // namespace attnkit::bench::context
