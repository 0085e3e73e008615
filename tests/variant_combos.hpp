// tests/variant_combos.hpp — the attention variant combinations the kernel tests walk
// (test_attention_variants.cpp over contiguous K/V, test_attention_paged.cpp over pages): random
// variant parameters, each combination as the kernel's AttentionVariant and as the float64
// oracle's parameters (tests/reference/variant_ref.hpp); random routes of routed attention (R-GQA)
// and the output scale that makes them the oracle's.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "attnkit/attention/variant.hpp"
#include "reference/variant_ref.hpp"
#include "test_util.hpp"

namespace attnkit::test {

// Random parameters of every policy for H query heads of width d_k and `rows` query rows.
struct VariantInputs {
  std::int64_t var_H = 0, var_dk = 0, var_rows = 0;
  std::vector<float> M, slopes, sinks, scale_tok;  // [d_k, d_k], [H], [H], [rows, H]
  VariantInputs() = default;
  VariantInputs(Rng& rng, std::int64_t H, std::int64_t d_k, std::int64_t rows) : var_H(H), var_dk(d_k), var_rows(rows) {
    // A metric like Tuneable's M = U Uᵀ (U [d_k, 2 d_k] scaled so M stays near the identity's size).
    std::vector<float> U = rng.normal_vec(static_cast<std::size_t>(d_k * 2 * d_k), 1.f / std::sqrt(2.f * d_k));
    M.assign(static_cast<std::size_t>(d_k * d_k), 0.f);
    for (std::int64_t a = 0; a < d_k; ++a)
      for (std::int64_t b = 0; b < d_k; ++b) {
        double s = 0;
        for (std::int64_t r = 0; r < 2 * d_k; ++r) s += static_cast<double>(U[a * 2 * d_k + r]) * U[b * 2 * d_k + r];
        M[a * d_k + b] = static_cast<float>(s);
      }
    slopes = alibi_slopes(H);
    for (auto& s : slopes) s *= rng.uniform(0.5f, 4.f);  // steeper than standard, so the bias matters at short range
    sinks = rng.normal_vec(static_cast<std::size_t>(H), 2.f);
    if (H > 1) sinks[0] = -std::numeric_limits<float>::infinity();  // a head without a sink
    scale_tok.resize(static_cast<std::size_t>(rows * H));
    for (auto& w : scale_tok) w = rng.uniform(0.f, 2.f);
  }
  ConstView2<float> Mv() const { return {M.data(), {var_dk, var_dk}}; }
  ConstView2<float> scale_v() const { return {scale_tok.data(), {var_rows, var_H}}; }
};

// One lse entry: -inf must match exactly, the rest within 1e-5 (relative past 1).
inline bool lse_entry_close(double want, double got) {
  return std::isinf(want) ? got == want : std::abs(got - want) < 1e-5 * std::max(1.0, std::abs(want));
}
inline bool lse_close(const std::vector<double>& want, const std::vector<float>& got) {
  bool ok = want.size() == got.size();
  for (std::size_t i = 0; ok && i < want.size(); ++i) ok = lse_entry_close(want[i], got[i]);
  return ok;
}

// The combinations every test walks.
enum class Combo { plain, metric, softcap, alibi, sinks, output, metric_softcap_sinks_output, metric_alibi_sinks_output };
inline constexpr Combo kCombos[] = {Combo::plain, Combo::metric, Combo::softcap, Combo::alibi, Combo::sinks, Combo::output,
                                    Combo::metric_softcap_sinks_output, Combo::metric_alibi_sinks_output};
inline const char* combo_name(Combo c) {
  switch (c) {
    case Combo::plain: return "plain";
    case Combo::metric: return "metric";
    case Combo::softcap: return "softcap";
    case Combo::alibi: return "alibi";
    case Combo::sinks: return "sinks";
    case Combo::output: return "output";
    case Combo::metric_softcap_sinks_output: return "metric+softcap+sinks+output";
    default: return "metric+alibi+sinks+output";
  }
}
inline constexpr float kCap = 2.5f;  // small enough that the cap bends typical logits

// The oracle's parameters of combination c. Output scale rows [row0, row0 + rows) of scale_tok
// (all of them by default).
inline ref::VariantParams variant_params(const VariantInputs& p, Combo c, std::int64_t row0 = 0, std::int64_t rows = -1) {
  const auto d = [](const std::vector<float>& x) { return std::vector<double>(x.begin(), x.end()); };
  ref::VariantParams vp;
  const bool metric = c == Combo::metric || c == Combo::metric_softcap_sinks_output || c == Combo::metric_alibi_sinks_output;
  const bool softcap = c == Combo::softcap || c == Combo::metric_softcap_sinks_output;
  const bool alibi = c == Combo::alibi || c == Combo::metric_alibi_sinks_output;
  const bool sinks = c == Combo::sinks || c == Combo::metric_softcap_sinks_output || c == Combo::metric_alibi_sinks_output;
  const bool output = c == Combo::output || c == Combo::metric_softcap_sinks_output || c == Combo::metric_alibi_sinks_output;
  if (metric) vp.M = d(p.M);
  if (softcap) vp.cap = kCap;
  if (alibi) vp.slopes = d(p.slopes);
  if (sinks) vp.sinks = d(p.sinks);
  if (output) {
    const std::int64_t n = rows < 0 ? p.var_rows - row0 : rows;
    vp.out_scale.assign(p.scale_tok.begin() + row0 * p.var_H, p.scale_tok.begin() + (row0 + n) * p.var_H);
  }
  return vp;
}

// Calls f(variant) with the kernel variant of combination c; its output scale is rows
// [row0, row0 + rows) of scale_tok (all of them by default).
template <class F>
void with_variant(const VariantInputs& p, Combo c, F&& f, std::int64_t row0 = 0, std::int64_t rows = -1) {
  const QueryMetric m{p.Mv()};
  const Sinks s{p.sinks.data()};
  const OutputScale o{ConstView2<float>(p.scale_tok.data() + row0 * p.var_H, {rows < 0 ? p.var_rows - row0 : rows, p.var_H})};
  switch (c) {
    case Combo::plain: return f(PlainAttention{});
    case Combo::metric: return f(make_variant(m));
    case Combo::softcap: return f(make_variant(SoftCap{kCap}));
    case Combo::alibi: return f(make_variant(Alibi{p.slopes.data()}));
    case Combo::sinks: return f(make_variant(s));
    case Combo::output: return f(make_variant(o));
    case Combo::metric_softcap_sinks_output: return f(make_variant(o, s, SoftCap{kCap}, m));
    default: return f(make_variant(m, Alibi{p.slopes.data()}, s, o));
  }
}

// Random routes: heads [T, H_kv, K] ascending within each group, weights random.
struct Routes {
  std::vector<std::int32_t> heads;
  std::vector<float> weights;
};
inline Routes random_routes(Rng& rng, std::int64_t T, std::int64_t H_kv, std::int64_t G, std::int64_t K) {
  Routes r;
  for (std::int64_t t = 0; t < T; ++t)
    for (std::int64_t j = 0; j < H_kv; ++j) {
      std::vector<std::int32_t> g(static_cast<std::size_t>(G));
      for (std::int64_t i = 0; i < G; ++i) g[i] = static_cast<std::int32_t>(j * G + i);
      std::shuffle(g.begin(), g.end(), rng.gen);
      g.resize(static_cast<std::size_t>(K));
      std::sort(g.begin(), g.end());
      for (auto h : g) {
        r.heads.push_back(h);
        r.weights.push_back(rng.uniform(0.f, 1.f));
      }
    }
  return r;
}

// The oracle of a routed call: plain attention with the output scale w on kept heads, 0 elsewhere.
inline std::vector<double> routed_scale(const Routes& r, std::int64_t T, std::int64_t H, std::int64_t H_kv, std::int64_t K) {
  std::vector<double> s(static_cast<std::size_t>(T * H), 0.0);
  for (std::int64_t t = 0; t < T; ++t)
    for (std::int64_t n = 0; n < H_kv * K; ++n) s[t * H + r.heads[t * H_kv * K + n]] = r.weights[t * H_kv * K + n];
  return s;
}

}  // namespace attnkit::test
