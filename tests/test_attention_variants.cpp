// Attention variants (attention/variant.hpp) in prefill and decode, and R-GQA routing
// (attention/routed.hpp), against the float64 oracle in tests/reference/variant_ref.hpp, on
// fresh random inputs each run (seed printed on failure); outputs are poisoned first.
#include <catch2/catch.hpp>

#include <algorithm>
#include <cmath>
#include <limits>
#include <string>
#include <vector>

#include "attnkit/attention/decode.hpp"
#include "attnkit/attention/prefill.hpp"
#include "attnkit/attention/routed.hpp"
#include "attnkit/attention/variant.hpp"
#include "reference/variant_ref.hpp"
#include "test_util.hpp"
#include "variant_combos.hpp"

using namespace attnkit;
using attnkit::test::poison;
using attnkit::test::rel_l2;
using attnkit::test::Rng;
using attnkit::test::Combo;
using attnkit::test::combo_name;
using attnkit::test::kCombos;
using attnkit::test::lse_close;
using attnkit::test::lse_entry_close;
using attnkit::test::variant_params;
using attnkit::test::with_variant;
using attnkit::test::Routes;
using attnkit::test::random_routes;
using attnkit::test::routed_scale;
using Catch::Contains;

namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();
constexpr int kCases = 24 / attnkit::test::kScale;

// One random problem: shapes with odd sizes and tails, q/k/v stored as the kernel reads them.
template <class KV>
struct Problem : attnkit::test::VariantInputs {
  std::int64_t T_q, T_k, H, H_kv, d_k, d_v, q_offset, window;
  std::vector<float> q, kf, vf;  // kf / vf: k, v as float exactly as stored
  std::vector<KV> k, v;
  Problem(Rng& rng, bool decode) {
    H_kv = rng.integer(1, 3);
    H = H_kv * rng.integer(1, 4);
    d_k = rng.integer(1, 3) == 1 ? rng.integer(3, 40) : 16 * rng.integer(1, 8) + rng.integer(0, 1);
    d_v = rng.integer(0, 1) ? d_k : rng.integer(5, 70);
    T_k = rng.integer(1, 300);
    T_q = decode ? 1 : rng.integer(1, T_k);
    q_offset = decode ? T_k - 1 : rng.integer(0, 2) == 0 ? rng.integer(0, T_k - T_q) : T_k - T_q;
    window = rng.integer(0, 2) == 0 ? rng.integer(1, 40) : 0;
    q = rng.normal_vec(static_cast<std::size_t>(T_q * H * d_k));
    attnkit::test::rounded_normal(rng, static_cast<std::size_t>(T_k * H_kv * d_k), kf, k);
    attnkit::test::rounded_normal(rng, static_cast<std::size_t>(T_k * H_kv * d_v), vf, v);
    static_cast<VariantInputs&>(*this) = VariantInputs(rng, H, d_k, T_q);
  }
  ConstView3<float> qv() const { return {q.data(), {T_q, H, d_k}}; }
  ConstView3<KV> kv() const { return {k.data(), {T_k, H_kv, d_k}}; }
  ConstView3<KV> vv() const { return {v.data(), {T_k, H_kv, d_v}}; }
};

template <class KV>
void prefill_case(Rng& rng, std::uint64_t seed) {
  const Problem<KV> p(rng, false);
  for (Combo c : kCombos) {
    const ref::VariantResult want = ref::variant_attention(p.q, p.kf, p.vf, p.T_q, p.T_k, p.H, p.H_kv, p.d_k, p.d_v,
                                                           p.q_offset, p.window, 1.0 / std::sqrt(double(p.d_k)), variant_params(p, c));
    std::vector<float> out1(static_cast<std::size_t>(p.T_q * p.H * p.d_v)), lse1(static_cast<std::size_t>(p.T_q * p.H));
    std::vector<float> out2 = out1, lse2 = lse1;
    poison(out1), poison(lse1), poison(out2), poison(lse2);
    with_variant(p, c, [&](const auto& var) {
      for (int threads : {1, 2}) {
        AttentionOptions opt;
        opt.q_offset = p.q_offset;
        opt.num_threads = threads;
        auto& o = threads == 1 ? out1 : out2;
        auto& l = threads == 1 ? lse1 : lse2;
        const View3<float> ov(o.data(), {p.T_q, p.H, p.d_v});
        const View2<float> lv(l.data(), {p.T_q, p.H});
        if (p.window > 0) attention_prefill(p.qv(), p.kv(), p.vv(), ov, SlidingWindowMask{p.window}, opt, lv, var);
        else attention_prefill(p.qv(), p.kv(), p.vv(), ov, CausalMask{}, opt, lv, var);
      }
    });
    INFO("seed " << seed << " variant " << combo_name(c) << " T_q " << p.T_q << " T_k " << p.T_k << " H " << p.H << "/"
                 << p.H_kv << " d " << p.d_k << "/" << p.d_v << " q_offset " << p.q_offset << " window " << p.window);
    // f32 arithmetic over <= 300 keys with logits of size ~1: 2e-5 relative (bf16 K/V are exact inputs).
    CHECK(rel_l2(out1, want.out) < 2e-5);
    CHECK(lse_close(want.lse, lse1));
    CHECK(std::equal(out1.begin(), out1.end(), out2.begin()));  // bit-identical on 1 and 2 threads
  }
}

template <class KV>
void decode_case(Rng& rng, std::uint64_t seed, bool ring) {
  const Problem<KV> p(rng, true);
  // As a ring of W >= T_k slots: the query at position P >= T_k - 1, slot s holds the position in
  // (P - W, P] that is s mod W; the oracle gets the same key positions.
  const std::int64_t W = ring ? p.T_k + rng.integer(0, 5) : 0;
  const std::int64_t P = ring ? p.T_k - 1 + rng.integer(0, 500) : p.T_k - 1;
  std::vector<std::int64_t> key_pos;
  if (ring)
    for (std::int64_t s = 0; s < p.T_k; ++s) key_pos.push_back(P - ((P - s) % W + W) % W);
  for (Combo c : kCombos) {
    ref::VariantParams vp = variant_params(p, c);
    // Decode has no window (the caller passes the keys it sees); only ALiBi reads positions.
    const ref::VariantResult want = ref::variant_attention(p.q, p.kf, p.vf, 1, p.T_k, p.H, p.H_kv, p.d_k, p.d_v, P, 0,
                                                           1.0 / std::sqrt(double(p.d_k)), vp, key_pos);
    std::vector<float> out(static_cast<std::size_t>(p.H * p.d_v)), lse(static_cast<std::size_t>(p.H));
    poison(out), poison(lse);
    with_variant(p, c, [&](const auto& var) {
      DecodeOptions opt;
      opt.kv_chunk = rng.integer(0, 1) ? 0 : rng.integer(1, 100);
      opt.q_position = ring || rng.integer(0, 1) ? P : -1;
      opt.ring = W;
      attention_decode(ConstView2<float>(p.q.data(), {p.H, p.d_k}), p.kv(), p.vv(), View2<float>(out.data(), {p.H, p.d_v}),
                       opt, View1<float>(lse.data(), {p.H}), var);
    });
    INFO("seed " << seed << " variant " << combo_name(c) << " T_kv " << p.T_k << " H " << p.H << "/" << p.H_kv << " d "
                 << p.d_k << "/" << p.d_v << " ring " << W << " q_position " << P);
    CHECK(rel_l2(out, want.out) < 2e-5);
    CHECK(lse_close(want.lse, lse));
  }
}

}  // namespace

TEST_CASE("variants: prefill against float64, every combination, masks, offsets, threads", "[variants]") {
  for (int i = 0; i < kCases; ++i) {
    const std::uint64_t seed = attnkit::test::fresh_seed();
    Rng rng(seed);
    if (i % 2) prefill_case<bf16>(rng, seed);
    else prefill_case<float>(rng, seed);
  }
}

TEST_CASE("variants: decode against float64, ALiBi over a ring's slots", "[variants]") {
  for (int i = 0; i < kCases; ++i) {
    const std::uint64_t seed = attnkit::test::fresh_seed();
    Rng rng(seed);
    if (i % 2) decode_case<bf16>(rng, seed, i % 3 == 0);
    else decode_case<float>(rng, seed, i % 3 == 0);
  }
}

TEST_CASE("variants: decode equals the last prefill row", "[variants]") {
  for (int i = 0; i < kCases / 2; ++i) {
    const std::uint64_t seed = attnkit::test::fresh_seed();
    Rng rng(seed);
    const Problem<float> p(rng, false);
    const std::int64_t last = p.T_q - 1;
    for (Combo c : kCombos) {
      std::vector<float> pre(static_cast<std::size_t>(p.T_q * p.H * p.d_v)), dec(static_cast<std::size_t>(p.H * p.d_v));
      poison(pre), poison(dec);
      // Decode sees the keys the last query sees under the window, at their positions.
      const std::int64_t P = p.q_offset + last, first = p.window > 0 ? std::max<std::int64_t>(0, P - p.window + 1) : 0;
      std::vector<float> scale_last(p.scale_tok.begin() + last * p.H, p.scale_tok.begin() + (last + 1) * p.H);
      with_variant(p, c, [&](const auto& var) {
        AttentionOptions opt;
        opt.q_offset = p.q_offset;
        const View3<float> ov(pre.data(), {p.T_q, p.H, p.d_v});
        if (p.window > 0) attention_prefill(p.qv(), p.kv(), p.vv(), ov, SlidingWindowMask{p.window}, opt, {}, var);
        else attention_prefill(p.qv(), p.kv(), p.vv(), ov, CausalMask{}, opt, {}, var);
        auto dvar = var;
        if constexpr (std::decay_t<decltype(var)>::has_output) dvar.output.scale = ConstView2<float>(scale_last.data(), {1, p.H});
        // Keys first..P as rows 0..; positions are row + first, so the query sits at row P - first.
        DecodeOptions dopt;
        dopt.q_position = P - first;
        attention_decode(ConstView2<float>(p.q.data() + last * p.H * p.d_k, {p.H, p.d_k}), p.kv().slice(0, first, P + 1),
                         p.vv().slice(0, first, P + 1), View2<float>(dec.data(), {p.H, p.d_v}), dopt, {}, dvar);
      });
      INFO("seed " << seed << " variant " << combo_name(c));
      CHECK(rel_l2(dec.data(), pre.data() + last * p.H * p.d_v, dec.size()) < 1e-5);
    }
  }
}

TEST_CASE("variants: off-valued policies reproduce plain attention bit for bit", "[variants]") {
  const std::uint64_t seed = attnkit::test::fresh_seed();
  Rng rng(seed);
  const Problem<float> p(rng, false);
  INFO("seed " << seed);
  std::vector<float> I(static_cast<std::size_t>(p.d_k * p.d_k), 0.f), ones(static_cast<std::size_t>(p.T_q * p.H), 1.f),
      no_sinks(static_cast<std::size_t>(p.H), kNegInf), zeros(static_cast<std::size_t>(p.H), 0.f);
  for (std::int64_t e = 0; e < p.d_k; ++e) I[e * p.d_k + e] = 1.f;
  const auto run = [&](const auto& var) {
    std::vector<float> out(static_cast<std::size_t>(p.T_q * p.H * p.d_v));
    poison(out);
    AttentionOptions opt;
    opt.q_offset = p.q_offset;
    attention_prefill(p.qv(), p.kv(), p.vv(), View3<float>(out.data(), {p.T_q, p.H, p.d_v}), CausalMask{}, opt, {}, var);
    return out;
  };
  const std::vector<float> plain = run(PlainAttention{});
  CHECK(run(make_variant(QueryMetric{ConstView2<float>(I.data(), {p.d_k, p.d_k})})) == plain);  // q · I is exact
  CHECK(run(make_variant(OutputScale{ConstView2<float>(ones.data(), {p.T_q, p.H})})) == plain);
  CHECK(run(make_variant(Sinks{no_sinks.data()})) == plain);
  CHECK(run(make_variant(Alibi{zeros.data()})) == plain);
  // A large cap leaves logits of size ~1 almost unchanged: close, not identical.
  CHECK(rel_l2(run(make_variant(SoftCap{1e4f})), plain) < 1e-6);
}

TEST_CASE("variants: bad parameters are refused with the argument named", "[variants]") {
  Rng rng(7);
  const Problem<float> p(rng, false);
  std::vector<float> out(static_cast<std::size_t>(p.T_q * p.H * p.d_v)), nan_sinks(static_cast<std::size_t>(p.H), 0.f);
  nan_sinks.back() = std::numeric_limits<float>::quiet_NaN();
  const View3<float> ov(out.data(), {p.T_q, p.H, p.d_v});
  const ConstView3<float> q = p.qv();
  const auto pre = [&](const auto& var) { attention_prefill(q, p.kv(), p.vv(), ov, CausalMask{}, {}, {}, var); };
  std::vector<float> Mbad(static_cast<std::size_t>((p.d_k + 1) * p.d_k));
  CHECK_THROWS_WITH(pre(make_variant(QueryMetric{ConstView2<float>(Mbad.data(), {p.d_k + 1, p.d_k})})), Contains("variant.query.M"));
  CHECK_THROWS_WITH(pre(make_variant(SoftCap{0.f})), Contains("variant.logits.cap"));
  CHECK_THROWS_WITH(pre(make_variant(SoftCap{-1.f})), Contains("variant.logits.cap"));
  CHECK_THROWS_WITH(pre(make_variant(Alibi{nullptr})), Contains("variant.logits.slopes"));
  CHECK_THROWS_WITH(pre(make_variant(Sinks{nan_sinks.data()})), Contains("variant.sink.logits"));
  CHECK_THROWS_WITH(pre(make_variant(OutputScale{ConstView2<float>(out.data(), {p.T_q + 1, p.H})})),
                    Contains("variant.output.scale"));
  std::vector<float> dout(static_cast<std::size_t>(p.H * p.d_v));
  DecodeOptions dopt;
  dopt.ring = p.T_k - 1;
  if (p.T_k > 1)
    CHECK_THROWS_WITH(attention_decode(ConstView2<float>(p.q.data(), {p.H, p.d_k}), p.kv(), p.vv(),
                                       View2<float>(dout.data(), {p.H, p.d_v}), dopt),
                      Contains("opt.ring"));
  CHECK_THROWS_WITH(alibi_slopes(0), Contains("alibi_slopes"));
}

TEST_CASE("variants: ALiBi slopes are the standard geometric series", "[variants]") {
  const auto s8 = alibi_slopes(8);
  for (int i = 0; i < 8; ++i) CHECK(s8[i] == Approx(std::pow(2.0, -(i + 1.0))).epsilon(1e-7));
  // 12 heads: the 8 of n = 8, then 2^(-0.5 (2i - 1)) for i = 1..4 (the odd terms of n = 16).
  const auto s12 = alibi_slopes(12);
  REQUIRE(s12.size() == 12);
  for (int i = 0; i < 4; ++i) CHECK(s12[8 + i] == Approx(std::pow(2.0, -0.5 * (2 * i + 1))).epsilon(1e-7));
}

// ---- R-GQA ------------------------------------------------------------------------------------

TEST_CASE("routed: route_heads against float64 (scopes, weightings, top_k, ties)", "[routed]") {
  for (int i = 0; i < kCases; ++i) {
    const std::uint64_t seed = attnkit::test::fresh_seed();
    Rng rng(seed);
    const std::int64_t H_kv = rng.integer(1, 3), G = rng.integer(1, 5), H = H_kv * G, T = rng.integer(1, 40);
    std::vector<float> logits = rng.normal_vec(static_cast<std::size_t>(T * H));
    for (auto& x : logits)
      if (rng.integer(0, 4) == 0) x = 0.5f;  // ties
    RouteOptions opt;
    opt.top_k = static_cast<int>(rng.integer(1, G));
    opt.scope = rng.integer(0, 1) ? RouteScope::all : RouteScope::group;
    const int mode = static_cast<int>(rng.integer(0, 2));
    opt.weighting = mode == 0 ? RouteWeighting::none : mode == 1 ? RouteWeighting::prob : RouteWeighting::renorm;
    std::vector<std::int32_t> heads(static_cast<std::size_t>(T * H_kv * opt.top_k), -7);
    std::vector<float> weights(heads.size()), probs(static_cast<std::size_t>(T * H));
    poison(weights), poison(probs);
    route_heads(ConstView2<float>(logits.data(), {T, H}), H_kv, opt, View3<std::int32_t>(heads.data(), {T, H_kv, opt.top_k}),
                View3<float>(weights.data(), {T, H_kv, opt.top_k}), View2<float>(probs.data(), {T, H}));
    INFO("seed " << seed << " H " << H << " H_kv " << H_kv << " top_k " << opt.top_k << " mode " << mode);
    bool heads_ok = true;
    double werr = 0, perr = 0;
    for (std::int64_t t = 0; t < T; ++t) {
      const ref::RouteRef r = ref::route_ref(logits.data() + t * H, H, H_kv, opt.top_k, opt.scope == RouteScope::all, mode);
      for (std::size_t n = 0; n < r.heads.size(); ++n) {
        heads_ok = heads_ok && heads[t * H_kv * opt.top_k + n] == r.heads[n];
        werr = std::max(werr, std::abs(weights[t * H_kv * opt.top_k + n] - r.weights[n]));
      }
      for (std::int64_t h = 0; h < H; ++h) perr = std::max(perr, std::abs(probs[t * H + h] - r.probs[h]));
    }
    CHECK(heads_ok);
    CHECK(werr < 1e-6);
    CHECK(perr < 1e-6);
  }
  std::vector<float> bad{0.f, std::numeric_limits<float>::quiet_NaN()};
  std::vector<std::int32_t> h(1);
  std::vector<float> w(1);
  CHECK_THROWS_WITH(route_heads(ConstView2<float>(bad.data(), {1, 2}), 1, {}, View3<std::int32_t>(h.data(), {1, 1, 1}),
                                View3<float>(w.data(), {1, 1, 1})),
                    Contains("router logit [0, 1]"));
  RouteOptions k3;
  k3.top_k = 3;
  CHECK_THROWS_WITH(route_heads(ConstView2<float>(bad.data(), {1, 2}), 1, k3, View3<std::int32_t>(h.data(), {1, 1, 1}),
                                View3<float>(w.data(), {1, 1, 1})),
                    Contains("opt.top_k"));
}

namespace {

template <class KV>
void routed_case(Rng& rng, std::uint64_t seed) {
  Problem<KV> p(rng, false);
  // More heads per group than the generic problem, so k_r < G happens.
  const std::int64_t G = rng.integer(2, 4);
  p.H = p.H_kv * G;
  p.q = rng.normal_vec(static_cast<std::size_t>(p.T_q * p.H * p.d_k));
  const std::int64_t K = rng.integer(1, G);
  const Routes r = random_routes(rng, p.T_q, p.H_kv, G, K);
  ref::VariantParams vp;
  vp.out_scale = routed_scale(r, p.T_q, p.H, p.H_kv, K);
  const auto want = ref::variant_attention(p.q, p.kf, p.vf, p.T_q, p.T_k, p.H, p.H_kv, p.d_k, p.d_v, p.q_offset, p.window,
                                           1.0 / std::sqrt(double(p.d_k)), vp);
  std::vector<float> out(static_cast<std::size_t>(p.T_q * p.H * p.d_v)), lse(static_cast<std::size_t>(p.T_q * p.H));
  poison(out), poison(lse);
  AttentionOptions opt;
  opt.q_offset = p.q_offset;
  const ConstView3<std::int32_t> hv(r.heads.data(), {p.T_q, p.H_kv, K});
  const ConstView3<float> wv(r.weights.data(), {p.T_q, p.H_kv, K});
  const View3<float> ov(out.data(), {p.T_q, p.H, p.d_v});
  const View2<float> lv(lse.data(), {p.T_q, p.H});
  if (p.window > 0) routed_attention_prefill(p.qv(), p.kv(), p.vv(), hv, wv, ov, SlidingWindowMask{p.window}, opt, lv);
  else routed_attention_prefill(p.qv(), p.kv(), p.vv(), hv, wv, ov, CausalMask{}, opt, lv);
  INFO("seed " << seed << " T_q " << p.T_q << " T_k " << p.T_k << " H " << p.H << "/" << p.H_kv << " k_r " << K << " d "
               << p.d_k << "/" << p.d_v << " window " << p.window);
  CHECK(rel_l2(out, want.out) < 2e-5);
  // Kept heads carry their lse, the others -inf.
  bool lse_ok = true;
  for (std::int64_t t = 0; t < p.T_q; ++t)
    for (std::int64_t h = 0; h < p.H; ++h) {
      const bool kept = std::count(r.heads.begin() + t * p.H_kv * K, r.heads.begin() + (t + 1) * p.H_kv * K, h) > 0;
      const double w = want.lse[t * p.H + h], g = lse[t * p.H + h];
      lse_ok = lse_ok && (kept ? lse_entry_close(w, g) : g == kNegInf);
    }
  CHECK(lse_ok);

  // Decode of the last row against the keys it sees = the last prefill row.
  const std::int64_t last = p.T_q - 1, P = p.q_offset + last;
  const std::int64_t first = p.window > 0 ? std::max<std::int64_t>(0, P - p.window + 1) : 0;
  std::vector<float> dec(static_cast<std::size_t>(p.H * p.d_v));
  poison(dec);
  routed_attention_decode(ConstView2<float>(p.q.data() + last * p.H * p.d_k, {p.H, p.d_k}), p.kv().slice(0, first, P + 1),
                          p.vv().slice(0, first, P + 1), ConstView3<std::int32_t>(r.heads.data() + last * p.H_kv * K, {1, p.H_kv, K}),
                          ConstView3<float>(r.weights.data() + last * p.H_kv * K, {1, p.H_kv, K}),
                          View2<float>(dec.data(), {p.H, p.d_v}));
  CHECK(rel_l2(dec.data(), out.data() + last * p.H * p.d_v, dec.size()) < 1e-5);
}

}  // namespace

TEST_CASE("routed: prefill and decode against float64 (k_r, G, masks, offsets, bf16)", "[routed]") {
  for (int i = 0; i < kCases; ++i) {
    const std::uint64_t seed = attnkit::test::fresh_seed();
    Rng rng(seed);
    if (i % 2) routed_case<bf16>(rng, seed);
    else routed_case<float>(rng, seed);
  }
}

TEST_CASE("routed: every head kept with weight 1 is GQA attention, bit for bit", "[routed]") {
  for (int i = 0; i < kCases / 4; ++i) {
    const std::uint64_t seed = attnkit::test::fresh_seed();
    Rng rng(seed);
    const Problem<float> p(rng, false);
    const std::int64_t G = p.H / p.H_kv;
    std::vector<std::int32_t> heads;
    for (std::int64_t t = 0; t < p.T_q; ++t)
      for (std::int64_t h = 0; h < p.H; ++h) heads.push_back(static_cast<std::int32_t>(h));
    std::vector<float> a(static_cast<std::size_t>(p.T_q * p.H * p.d_v)), b = a;
    poison(a), poison(b);
    AttentionOptions opt;
    opt.q_offset = p.q_offset;
    attention_prefill(p.qv(), p.kv(), p.vv(), View3<float>(a.data(), {p.T_q, p.H, p.d_v}), CausalMask{}, opt);
    routed_attention_prefill(p.qv(), p.kv(), p.vv(), ConstView3<std::int32_t>(heads.data(), {p.T_q, p.H_kv, G}),
                             ConstView3<float>{}, View3<float>(b.data(), {p.T_q, p.H, p.d_v}), CausalMask{}, opt);
    INFO("seed " << seed);
    CHECK(a == b);
  }
}

TEST_CASE("routed: bad routes are refused with the argument named", "[routed]") {
  Rng rng(3);
  std::vector<float> q = rng.normal_vec(2 * 4 * 8), k = rng.normal_vec(2 * 2 * 8), v = k, out(2 * 4 * 8);
  const ConstView3<float> qv(q.data(), {2, 4, 8}), kv(k.data(), {2, 2, 8}), vv(v.data(), {2, 2, 8});
  const View3<float> ov(out.data(), {2, 4, 8});
  const auto run = [&](std::vector<std::int32_t> h, std::int64_t K) {
    routed_attention_prefill(qv, kv, vv, ConstView3<std::int32_t>(h.data(), {2, 2, K}), ConstView3<float>{}, ov);
  };
  CHECK_THROWS_WITH(run({0, 2, 0, 4}, 1), Contains("must be a head of KV group 1"));   // head 4 does not exist
  CHECK_THROWS_WITH(run({1, 0, 2, 3, 0, 1, 2, 3}, 2), Contains("ascending"));          // [0, 0] = 1, [0, 0, 1] = 0
  CHECK_THROWS_WITH(run({0, 2, 2, 2}, 1), Contains("KV group 0"));                     // token 1 group 0 picked head 2
  std::vector<std::int32_t> ok{0, 2, 1, 3};
  std::vector<float> w(3);
  CHECK_THROWS_WITH(routed_attention_prefill(qv, kv, vv, ConstView3<std::int32_t>(ok.data(), {2, 2, 1}),
                                             ConstView3<float>(w.data(), {1, 3, 1}), ov),
                    Contains("'weights'"));
  AttentionOptions sub;
  sub.heads = {0, 2};
  CHECK_THROWS_WITH(routed_attention_prefill(qv, kv, vv, ConstView3<std::int32_t>(ok.data(), {2, 2, 1}), ConstView3<float>{}, ov,
                                             CausalMask{}, sub),
                    Contains("sub-ranges"));
}
