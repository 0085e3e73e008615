// attnkit/attention/variant.hpp — attention variants as small policy types, one kernel serving
// them all (FlashInfer's design): attention_prefill and attention_decode take an
// AttentionVariant<Query, Logits, Sink, Output> as their last argument, and each slot is a
// policy type. The masks (CausalMask, SlidingWindowMask in common.hpp) are the fifth policy.
//
// For query row t at position p, query head h and a visible key s at position p_s:
//   q̃      = q[t, h] · M                          Query:  QueryMetric{M}   (else q̃ = q)
//   z_s    = scale · q̃ · k[s]                     (scale: the options', default 1/sqrt(d_k))
//   z_s    = cap · tanh(z_s / cap)                 Logits: SoftCap{cap}
//   z_s    = z_s + slope[h] · (p_s - p)            Logits: Alibi{slopes}
//   out    = Σ_s e^{z_s} v[s] / (e^{sink[h]} + Σ_s e^{z_s})     Sink: Sinks{logits} (else no e^{sink})
//   lse    = log(e^{sink[h]} + Σ_s e^{z_s})        (the sink is part of the denominator)
//   out    = w[t, h] · out                         Output: OutputScale{w}
// A row that sees no key gets out = 0 and lse = sink[h] (-inf without sinks).
//
// Every slot defaults to "off" and an off slot is compiled out (the plain kernel is the code it
// was). Where each comes from:
//  * QueryMetric: Tuneable attention folded (spec §11): M = U Uᵀ [d_k, d_k] applied to the
//    post-RoPE query, keys untouched, so the cache stays d_k wide. M breaks RoPE's strict
//    relative-position invariance unless it commutes with the rotations.
//  * SoftCap: Gemma 2 / Grok logit soft-capping, on the scaled logits.
//  * Alibi: Press et al.; slopes per query head in natural-log units per position
//    (alibi_slopes(H) is the standard geometric series). Decode needs key positions: key row s
//    sits at position s (or, for a ring buffer, see DecodeOptions::ring) and the query at
//    DecodeOptions::q_position.
//  * Sinks: gpt-oss attention sinks, a learned per-head logit that joins the softmax
//    denominator. Merging split states: compute them without sinks, merge, then apply_sink().
//  * OutputScale: a per-token, per-head factor on the output (an R-GQA router weight, a gate).
//
// Build one with make_variant(policies...) in any order, e.g.
//   attention_prefill(q, k, v, out, CausalMask{}, opt, {}, make_variant(SoftCap{30.f}, Sinks{s}));
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <vector>

#include "attnkit/core/error.hpp"
#include "attnkit/core/view.hpp"

namespace attnkit {

namespace variant_slot {
struct query {};
struct logits {};
struct sink {};
struct output {};
}  // namespace variant_slot

// ---- query transform ----------------------------------------------------------------------
struct NoQueryTransform {
  using slot = variant_slot::query;
  static constexpr const char* name = "none";
};
// q̃ = q · M, M [d_k, d_k] (rows contiguous, any row stride).
struct QueryMetric {
  using slot = variant_slot::query;
  static constexpr const char* name = "metric";
  ConstView2<float> M;
};

// ---- logits transform ---------------------------------------------------------------------
struct NoLogitsTransform {
  using slot = variant_slot::logits;
  static constexpr const char* name = "none";
};
// z -> cap · tanh(z / cap), cap > 0.
struct SoftCap {
  using slot = variant_slot::logits;
  static constexpr const char* name = "softcap";
  float cap = 0.f;
};
// z -> z + slopes[h] · (key position - query position); slopes [H].
struct Alibi {
  using slot = variant_slot::logits;
  static constexpr const char* name = "alibi";
  const float* slopes = nullptr;
};

// ---- sinks --------------------------------------------------------------------------------
struct NoSinks {
  using slot = variant_slot::sink;
  static constexpr const char* name = "none";
};
// logits [H]: a per-head logit in the softmax denominator (natural-log units, like z).
struct Sinks {
  using slot = variant_slot::sink;
  static constexpr const char* name = "sinks";
  const float* logits = nullptr;
};

// ---- output transform ---------------------------------------------------------------------
struct NoOutputScale {
  using slot = variant_slot::output;
  static constexpr const char* name = "none";
};
// out[t, h, :] *= scale(t, h); scale [T_q, H] (decode: [1, H]).
struct OutputScale {
  using slot = variant_slot::output;
  static constexpr const char* name = "scale";
  ConstView2<float> scale;
};

template <class Query = NoQueryTransform, class Logits = NoLogitsTransform, class Sink = NoSinks,
          class Output = NoOutputScale>
struct AttentionVariant {
  static_assert(std::is_same_v<typename Query::slot, variant_slot::query>, "AttentionVariant: slot 1 takes a query transform");
  static_assert(std::is_same_v<typename Logits::slot, variant_slot::logits>, "AttentionVariant: slot 2 takes a logits transform");
  static_assert(std::is_same_v<typename Sink::slot, variant_slot::sink>, "AttentionVariant: slot 3 takes a sink policy");
  static_assert(std::is_same_v<typename Output::slot, variant_slot::output>, "AttentionVariant: slot 4 takes an output transform");
  using query_type = Query;
  using logits_type = Logits;
  using sink_type = Sink;
  using output_type = Output;
  static constexpr bool has_query = !std::is_same_v<Query, NoQueryTransform>;
  static constexpr bool has_logits = !std::is_same_v<Logits, NoLogitsTransform>;
  static constexpr bool has_softcap = std::is_same_v<Logits, SoftCap>;
  static constexpr bool has_alibi = std::is_same_v<Logits, Alibi>;
  static constexpr bool has_sink = !std::is_same_v<Sink, NoSinks>;
  static constexpr bool has_output = !std::is_same_v<Output, NoOutputScale>;
  static constexpr bool is_plain = !has_query && !has_logits && !has_sink && !has_output;
  Query query{};
  Logits logits{};
  Sink sink{};
  Output output{};
};
using PlainAttention = AttentionVariant<>;

template <class T>
struct is_attention_variant : std::false_type {};
template <class Q, class L, class S, class O>
struct is_attention_variant<AttentionVariant<Q, L, S, O>> : std::true_type {};

namespace detail {
template <class Slot, class Default, class... Ps>
struct pick_slot {
  using type = Default;
};
template <class Slot, class Default, class P, class... Ps>
struct pick_slot<Slot, Default, P, Ps...> {
  using type = std::conditional_t<std::is_same_v<typename P::slot, Slot>, P, typename pick_slot<Slot, Default, Ps...>::type>;
};
template <class Slot, class... Ps>
inline constexpr int count_slot = (0 + ... + (std::is_same_v<typename Ps::slot, Slot> ? 1 : 0));
template <class Out, class... Ps>
void assign_slots(Out& v, const Ps&... ps) {
  [[maybe_unused]] const auto one = [&](const auto& p) {
    using P = std::decay_t<decltype(p)>;
    if constexpr (std::is_same_v<typename P::slot, variant_slot::query>) v.query = p;
    else if constexpr (std::is_same_v<typename P::slot, variant_slot::logits>) v.logits = p;
    else if constexpr (std::is_same_v<typename P::slot, variant_slot::sink>) v.sink = p;
    else v.output = p;
  };
  (one(ps), ...);
}
}  // namespace detail

// make_variant(SoftCap{30.f}, Sinks{s}) -> AttentionVariant<NoQueryTransform, SoftCap, Sinks, NoOutputScale>.
template <class... Ps>
auto make_variant(const Ps&... ps) {
  static_assert(detail::count_slot<variant_slot::query, Ps...> <= 1 && detail::count_slot<variant_slot::logits, Ps...> <= 1 &&
                    detail::count_slot<variant_slot::sink, Ps...> <= 1 && detail::count_slot<variant_slot::output, Ps...> <= 1,
                "make_variant: at most one policy per slot (query, logits, sink, output)");
  AttentionVariant<typename detail::pick_slot<variant_slot::query, NoQueryTransform, Ps...>::type,
                   typename detail::pick_slot<variant_slot::logits, NoLogitsTransform, Ps...>::type,
                   typename detail::pick_slot<variant_slot::sink, NoSinks, Ps...>::type,
                   typename detail::pick_slot<variant_slot::output, NoOutputScale, Ps...>::type>
      v;
  detail::assign_slots(v, ps...);
  return v;
}

// ALiBi slopes for H heads (Press et al., as BLOOM / MPT build them): for the largest power of
// two n <= H, 2^(-8 i / n) for i = 1..n; past n, the odd terms 2^(-4 (2 i - 1) / n)... of the
// series for 2n, until H slopes exist. Positive: the kernel adds slope · (p_s - p) <= 0.
inline std::vector<float> alibi_slopes(std::int64_t H) {
  ATTNKIT_REQUIRE(H >= 1, "alibi_slopes: argument 'H': must be >= 1, got ", H);
  std::int64_t n = 1;
  while (n * 2 <= H) n *= 2;
  std::vector<float> s;
  for (std::int64_t i = 1; i <= n; ++i) s.push_back(static_cast<float>(std::exp2(-8.0 * static_cast<double>(i) / static_cast<double>(n))));
  for (std::int64_t i = 1; static_cast<std::int64_t>(s.size()) < H; i += 2)
    s.push_back(static_cast<float>(std::exp2(-8.0 * static_cast<double>(i) / static_cast<double>(2 * n))));
  return s;
}

// Joins a sink logit to a finished softmax state: out *= σ(lse - sink), lse = logaddexp(lse, sink).
// lse = -inf (no key seen) leaves out = 0 and gives lse = sink.
inline void apply_sink(float* out, float& lse, float sink, std::int64_t d) {
  constexpr float neg_inf = -std::numeric_limits<float>::infinity();
  if (lse == neg_inf) {
    for (std::int64_t i = 0; i < d; ++i) out[i] = 0.f;
    lse = sink;
    return;
  }
  const double a = static_cast<double>(lse), b = static_cast<double>(sink);
  const double mx = a > b ? a : b;
  const double f = std::exp(a - mx) / (std::exp(a - mx) + std::exp(b - mx));  // σ(lse - sink)
  for (std::int64_t i = 0; i < d; ++i) out[i] = static_cast<float>(out[i] * f);
  lse = static_cast<float>(mx + std::log(std::exp(a - mx) + std::exp(b - mx)));
}

namespace detail {
// Argument checks shared by prefill and decode: H query heads, d_k, rows of OutputScale.
template <class V>
void check_variant(const char* fn, const V& var, std::int64_t H, std::int64_t d_k, std::int64_t rows) {
  static_assert(is_attention_variant<V>::value, "attention: the variant argument must be an AttentionVariant");
  if constexpr (V::has_query) {
    check_view(var.query.M, fn, "variant.query.M");
    ATTNKIT_REQUIRE(var.query.M.shape[0] == d_k && var.query.M.shape[1] == d_k, fn, ": argument 'variant.query.M': shape ",
                    detail::shape_string(var.query.M), " must be [d_k, d_k] = [", d_k, ", ", d_k, "]");
  }
  if constexpr (V::has_softcap)
    ATTNKIT_REQUIRE(var.logits.cap > 0.f && std::isfinite(var.logits.cap), fn,
                    ": argument 'variant.logits.cap': soft-cap must be finite and > 0, got ", var.logits.cap);
  if constexpr (V::has_alibi) {
    ATTNKIT_REQUIRE(var.logits.slopes != nullptr, fn, ": argument 'variant.logits.slopes': null (ALiBi needs H = ", H,
                    " slopes)");
    for (std::int64_t h = 0; h < H; ++h)
      ATTNKIT_REQUIRE(std::isfinite(var.logits.slopes[h]), fn, ": argument 'variant.logits.slopes': slope ", h,
                      " is not finite (", var.logits.slopes[h], ")");
  }
  if constexpr (V::has_sink) {
    ATTNKIT_REQUIRE(var.sink.logits != nullptr, fn, ": argument 'variant.sink.logits': null (sinks need H = ", H, " logits)");
    for (std::int64_t h = 0; h < H; ++h)
      ATTNKIT_REQUIRE(!std::isnan(var.sink.logits[h]) && var.sink.logits[h] != std::numeric_limits<float>::infinity(), fn,
                      ": argument 'variant.sink.logits': logit ", h, " is ", var.sink.logits[h],
                      " (must be finite or -inf)");
  }
  if constexpr (V::has_output) {
    check_view(var.output.scale, fn, "variant.output.scale");
    ATTNKIT_REQUIRE(var.output.scale.shape[0] == rows && var.output.scale.shape[1] == H, fn,
                    ": argument 'variant.output.scale': shape ", detail::shape_string(var.output.scale), " must be [", rows, ", ",
                    H, "]");
  }
}
}  // namespace detail

}  // namespace attnkit
