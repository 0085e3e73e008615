// Tests of loop_attention / loop_attention_decode (attention/loop.hpp) against the float64
// reference (tests/reference/loop_ref.hpp), plus the invariants: window >= T gives global
// attention, a saturated gate gives global (bit for bit) or local attention, the one-run paths
// (fused, two-source) equal the two-pass path, decode equals the last row of prefill, thread count and sub-ranges
// do not change a bit, the portable code path, and every validation error.
#include <catch2/catch.hpp>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <span>
#include <string>
#include <vector>

#include "attnkit/attention/kv_cache.hpp"
#include "attnkit/attention/loop.hpp"
#include "attnkit/attention/prefill.hpp"
#include "reference/loop_ref.hpp"
#include "test_util.hpp"

using namespace attnkit;
using attnkit::test::Rng;
using Catch::Contains;

namespace {

using attnkit::test::kScale;

constexpr double kOutTol = 2e-6;   // relative L2 of out against the float64 reference
constexpr double kGateTol = 1e-6;  // max |g - g_ref|
constexpr double kSameTol = 1e-6;  // relative L2 between two kernel paths that should agree to rounding
constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();

enum class Mode { layer, stack };  // local K/V = global K/V (fused path), or separate local K/V

struct Case {
  std::int64_t T_q, T_g, H, H_kv, d_k, d_v, window;
  std::int64_t q_offset = -1;      // as passed (-1: default)
  std::int64_t local_begin = 0;    // stack: first row (= absolute position) of the local K/V passed
  bool explicit_local_offset = false;
  Mode mode = Mode::layer;
  float gate_bias_shift = 0.f;  // added to every gate bias (+-30 saturates the gate)
};

// The absolute query offset a case resolves to.
std::int64_t resolved_q_offset(const Case& c) { return c.q_offset >= 0 ? c.q_offset : c.T_g - c.T_q; }

// Contiguous inputs; *_f hold K/V as float (bf16-rounded when KV = bf16), which the reference
// sees. Local K/V span the same positions 0 .. T_g - 1 as the global ones (stack mode: other
// values); the kernel gets rows local_begin .. T_g - 1 of them.
template <class KV>
struct Inputs {
  Case c;
  std::vector<float> q, kg_f, vg_f, kl_f, vl_f, gate_w, gate_b;
  std::vector<KV> kg, vg, kl, vl;

  static void make_kv(Rng& rng, std::size_t n, std::vector<float>& f, std::vector<KV>& x) {
    test::rounded_normal(rng, n, f, x);
  }
  Inputs(Rng& rng, const Case& cs) : c(cs) {
    q = rng.normal_vec(static_cast<std::size_t>(c.T_q * c.H * c.d_k));
    make_kv(rng, static_cast<std::size_t>(c.T_g * c.H_kv * c.d_k), kg_f, kg);
    make_kv(rng, static_cast<std::size_t>(c.T_g * c.H_kv * c.d_v), vg_f, vg);
    if (c.mode == Mode::stack) {
      make_kv(rng, kg.size(), kl_f, kl);
      make_kv(rng, vg.size(), vl_f, vl);
    }
    // Gate logits of order 1 around the bias, so g spans (0, 1).
    gate_w = rng.normal_vec(static_cast<std::size_t>(c.H * c.d_k), 1.f / std::sqrt(static_cast<float>(c.d_k)));
    gate_b.resize(static_cast<std::size_t>(c.H));
    for (auto& b : gate_b) b = rng.uniform(-1.5f, 1.5f) + c.gate_bias_shift;
  }
  const std::vector<KV>& kl_all() const { return c.mode == Mode::stack ? kl : kg; }
  const std::vector<KV>& vl_all() const { return c.mode == Mode::stack ? vl : vg; }
  const std::vector<float>& kl_all_f() const { return c.mode == Mode::stack ? kl_f : kg_f; }
  const std::vector<float>& vl_all_f() const { return c.mode == Mode::stack ? vl_f : vg_f; }

  ConstView3<float> qv() const { return {q.data(), {c.T_q, c.H, c.d_k}}; }
  ConstView3<KV> kgv() const { return {kg.data(), {c.T_g, c.H_kv, c.d_k}}; }
  ConstView3<KV> vgv() const { return {vg.data(), {c.T_g, c.H_kv, c.d_v}}; }
  ConstView3<KV> klv() const {
    return ConstView3<KV>(kl_all().data(), {c.T_g, c.H_kv, c.d_k}).slice(0, c.local_begin, c.T_g);
  }
  ConstView3<KV> vlv() const {
    return ConstView3<KV>(vl_all().data(), {c.T_g, c.H_kv, c.d_v}).slice(0, c.local_begin, c.T_g);
  }
  ConstView2<float> wv() const { return {gate_w.data(), {c.H, c.d_k}}; }
  std::span<const float> bv() const { return gate_b; }
  LoopOptions options() const {
    LoopOptions o;
    o.q_offset = c.q_offset;
    if (c.explicit_local_offset) o.local_offset = c.local_begin;
    return o;
  }
};

struct Outputs {
  std::vector<float> out, gates;
  explicit Outputs(const Case& c)
      : out(static_cast<std::size_t>(c.T_q * c.H * c.d_v), kNaN), gates(static_cast<std::size_t>(c.T_q * c.H), kNaN) {}
  View3<float> ov(const Case& c) { return {out.data(), {c.T_q, c.H, c.d_v}}; }
  View2<float> gv(const Case& c) { return {gates.data(), {c.T_q, c.H}}; }
};

template <class Arch = simd::default_arch, class KV>
Outputs run(const Inputs<KV>& in, LoopOptions opt) {
  const Case& c = in.c;
  Outputs o(c);
  detail::loop_attention_arch<Arch, KV>(in.qv(), in.kgv(), in.vgv(), in.klv(), in.vlv(), in.wv(), in.bv(), c.window,
                                        o.ov(c), opt, o.gv(c));
  return o;
}

template <class KV>
ref::LoopResult reference(const Inputs<KV>& in) {
  const Case& c = in.c;
  // The reference gets the local K/V rows the kernel gets, with their offset.
  const auto rows = [&](const std::vector<float>& x, std::int64_t d) {
    return std::vector<float>(x.begin() + c.local_begin * c.H_kv * d, x.end());
  };
  const ref::LoopDims d{c.T_q, c.T_g, c.T_g - c.local_begin, c.H, c.H_kv, c.d_k, c.d_v};
  return ref::reference_loop(in.q, in.kg_f, in.vg_f, rows(in.kl_all_f(), c.d_k), rows(in.vl_all_f(), c.d_v), in.gate_w,
                             in.gate_b, d, resolved_q_offset(c), c.local_begin, c.window,
                             1.0 / std::sqrt(static_cast<double>(c.d_k)));
}

double max_abs_diff(const std::vector<float>& a, const std::vector<double>& b) {
  if (a.size() != b.size()) return std::numeric_limits<double>::infinity();
  double m = 0;
  for (std::size_t i = 0; i < a.size(); ++i) {
    const double e = std::abs(static_cast<double>(a[i]) - b[i]);
    if (!(e <= m)) m = e;  // NaN propagates
  }
  return m;
}

std::int64_t pick(Rng& rng, std::initializer_list<std::int64_t> xs) {
  return *(xs.begin() + rng.integer(0, static_cast<std::int64_t>(xs.size()) - 1));
}

// Random case: odd head dims, G in {1, 2, 4, 8}, lengths that are not multiples of 16 or 64,
// continuation (q_offset), windows from 1 to beyond T, both modes, trimmed local K/V.
Case random_case(Rng& rng, std::int64_t max_t, Mode mode) {
  Case c{};
  c.d_k = pick(rng, {16, 24, 40, 72, 128});
  c.d_v = rng.integer(0, 2) == 0 ? pick(rng, {16, 24, 40, 72}) : c.d_k;
  const std::int64_t G = pick(rng, {1, 2, 4, 8});
  c.H_kv = rng.integer(1, std::max<std::int64_t>(1, 8 / G));
  c.H = G * c.H_kv;
  c.T_g = rng.integer(1, max_t);
  c.T_q = rng.integer(0, 2) == 0 ? rng.integer(1, c.T_g) : c.T_g;
  if (c.T_q < c.T_g && rng.integer(0, 1)) c.q_offset = rng.integer(0, c.T_g - c.T_q);
  c.window = pick(rng, {1, rng.integer(2, 40), 64, 65, c.T_g + rng.integer(0, 5)});
  c.mode = mode;
  if (mode == Mode::stack && rng.integer(0, 1)) {
    // Pass only the local rows from some start at or before the first query's window start.
    const std::int64_t need = std::max<std::int64_t>(0, resolved_q_offset(c) - c.window + 1);
    c.local_begin = rng.integer(0, need);
    c.explicit_local_offset = true;
  }
  return c;
}

#define LOOP_CAPTURE(c)                                                                                        \
  INFO("T_q " << (c).T_q << " T_g " << (c).T_g << " H " << (c).H << " H_kv " << (c).H_kv << " d_k " << (c).d_k \
              << " d_v " << (c).d_v << " W " << (c).window << " q_offset " << (c).q_offset << " local_begin "    \
              << (c).local_begin << " mode " << ((c).mode == Mode::layer ? "layer" : "stack"))

template <class KV, class Arch = simd::default_arch>
void check_against_reference(Rng& rng, const Case& c, LoopOptions::Fuse fuse = LoopOptions::Fuse::automatic) {
  LOOP_CAPTURE(c);
  const Inputs<KV> in(rng, c);
  LoopOptions opt = in.options();
  opt.fuse = fuse;
  const Outputs o = run<Arch>(in, opt);
  const auto r = reference(in);
  const double err = test::rel_l2(o.out, r.out), gerr = max_abs_diff(o.gates, r.gates);
  CAPTURE(err, gerr);
  CHECK(err <= kOutTol);
  CHECK(gerr <= kGateTol);
}

}  // namespace

TEMPLATE_TEST_CASE("loop_attention matches the float64 reference on random shapes", "[loop]", float, bf16) {
  const auto seed = test::fresh_seed();
  CAPTURE(seed);
  Rng rng(seed);
  for (int i = 0; i < 40 / kScale; ++i) {
    const Mode mode = i % 2 ? Mode::stack : Mode::layer;
    const Case c = random_case(rng, 300 / kScale, mode);
    check_against_reference<TestType>(rng, c, i % 3 == 2 ? LoopOptions::Fuse::never : LoopOptions::Fuse::automatic);
  }
}

TEMPLATE_TEST_CASE("loop_attention with Qwen3 head shape, long tails and W = 64", "[loop]", float, bf16) {
  const auto seed = test::fresh_seed();
  CAPTURE(seed);
  Rng rng(seed);
  const std::int64_t T = 600 / kScale + rng.integer(0, 63);
  for (Mode mode : {Mode::layer, Mode::stack}) {
    Case c{T, T, 4, 2, 128, 128, 64};
    c.mode = mode;
    check_against_reference<TestType>(rng, c);
    c.T_q = T / 3 + 5;  // a continuation chunk
    check_against_reference<TestType>(rng, c);
  }
}

TEST_CASE("loop_attention with W = 1: local is the query's own value", "[loop]") {
  const auto seed = test::fresh_seed();
  CAPTURE(seed);
  Rng rng(seed);
  for (Mode mode : {Mode::layer, Mode::stack}) {
    const Case c{77, 90, 6, 3, 40, 24, 1, -1, 0, false, mode};
    check_against_reference<float>(rng, c);
  }
}

TEMPLATE_TEST_CASE("window >= T_k: local equals global, so out is causal attention", "[loop]", float, bf16) {
  const auto seed = test::fresh_seed();
  CAPTURE(seed);
  Rng rng(seed);
  for (int i = 0; i < 6; ++i) {
    Case c = random_case(rng, 250 / kScale, Mode::layer);
    c.window = c.T_g + rng.integer(0, 100);
    LOOP_CAPTURE(c);
    const Inputs<TestType> in(rng, c);
    for (auto fuse : {LoopOptions::Fuse::automatic, LoopOptions::Fuse::never}) {
      LoopOptions opt = in.options();
      opt.fuse = fuse;
      const Outputs o = run(in, opt);
      std::vector<float> plain(o.out.size(), kNaN);
      AttentionOptions popt;
      popt.q_offset = c.q_offset;
      attention_prefill(in.qv(), in.kgv(), in.vgv(), View3<float>(plain.data(), {c.T_q, c.H, c.d_v}), CausalMask{},
                        popt);
      CHECK(test::rel_l2(o.out, plain) <= kSameTol);
    }
  }
}

TEMPLATE_TEST_CASE("gate bias +30 gives global attention bit for bit, -30 local attention", "[loop]", float, bf16) {
  const auto seed = test::fresh_seed();
  CAPTURE(seed);
  Rng rng(seed);
  for (int i = 0; i < 6; ++i) {
    for (float shift : {30.f, -30.f}) {
      Case c = random_case(rng, 200 / kScale, i % 2 ? Mode::stack : Mode::layer);
      c.gate_bias_shift = shift;
      LOOP_CAPTURE(c);
      CAPTURE(shift);
      Inputs<TestType> in(rng, c);
      for (auto& w : in.gate_w) w *= 0.1f;  // |w·q| stays far below 30
      for (auto fuse : {LoopOptions::Fuse::automatic, LoopOptions::Fuse::never}) {
        LoopOptions opt = in.options();
        opt.fuse = fuse;
        const Outputs o = run(in, opt);
        std::vector<float> expect(o.out.size(), kNaN);
        const View3<float> ev(expect.data(), {c.T_q, c.H, c.d_v});
        AttentionOptions popt;
        if (shift > 0) {
          popt.q_offset = c.q_offset;
          attention_prefill(in.qv(), in.kgv(), in.vgv(), ev, CausalMask{}, popt);
          CHECK(test::bit_equal(o.out, expect));  // g rounds to exactly 1
        } else {
          popt.q_offset = resolved_q_offset(c) - c.local_begin;
          attention_prefill(in.qv(), in.klv(), in.vlv(), ev, SlidingWindowMask{c.window}, popt);
          CHECK(test::rel_l2(o.out, expect) <= kSameTol);  // g ~ 1e-13
        }
      }
    }
  }
}

TEMPLATE_TEST_CASE("one-run paths (fused, two-source) equal the two-pass path", "[loop][fused]", float, bf16) {
  const auto seed = test::fresh_seed();
  CAPTURE(seed);
  Rng rng(seed);
  for (int i = 0; i < 12 / kScale + 2; ++i) {
    const Case c = random_case(rng, 400 / kScale, i % 2 ? Mode::stack : Mode::layer);
    LOOP_CAPTURE(c);
    const Inputs<TestType> in(rng, c);
    LoopOptions opt = in.options();
    const Outputs fused = run(in, opt);
    opt.fuse = LoopOptions::Fuse::never;
    const Outputs two_pass = run(in, opt);
    CHECK(test::rel_l2(fused.out, two_pass.out) <= kSameTol);
    CHECK(test::bit_equal(fused.gates, two_pass.gates));
  }
}

TEMPLATE_TEST_CASE("1 and 2 threads give bit-identical results (fused, two-pass, decode)", "[loop][threads]", float,
                   bf16) {
  const auto seed = test::fresh_seed();
  CAPTURE(seed);
  Rng rng(seed);
  for (Mode mode : {Mode::layer, Mode::stack}) {
    const Case c{300 / kScale + 7, 300 / kScale + 7, 8, 2, 72, 72, 37, -1, 0, false, mode};
    LOOP_CAPTURE(c);
    const Inputs<TestType> in(rng, c);
    for (auto fuse : {LoopOptions::Fuse::automatic, LoopOptions::Fuse::never}) {
      LoopOptions opt = in.options();
      opt.fuse = fuse;
      opt.num_threads = 1;
      const Outputs a = run(in, opt);
      opt.num_threads = 2;
      const Outputs b = run(in, opt);
      CHECK(test::bit_equal(a.out, b.out));
      CHECK(test::bit_equal(a.gates, b.gates));
    }
  }
  // Decode over a cache long enough for several KV chunks.
  const std::int64_t T = 1500 / kScale, H = 8, H_kv = 4, d = 40, W = 64;
  const Case c{1, T, H, H_kv, d, d, W, -1, 0, false, Mode::stack};
  const Inputs<TestType> in(rng, c);
  std::vector<float> a(H * d, kNaN), b(H * d, kNaN), ga(H, kNaN), gb(H, kNaN);
  DecodeOptions opt;
  opt.kv_chunk = 128;
  const auto dec = [&](std::vector<float>& o, std::vector<float>& g) {
    loop_attention_decode<TestType>(ConstView2<float>(in.q.data(), {H, d}), in.kgv(), in.vgv(), in.klv().slice(0, T - W, T),
                                    in.vlv().slice(0, T - W, T), in.wv(), in.bv(), View2<float>(o.data(), {H, d}), opt,
                                    g);
  };
  opt.num_threads = 1;
  dec(a, ga);
  opt.num_threads = 2;
  dec(b, gb);
  CHECK(test::bit_equal(a, b));
  CHECK(test::bit_equal(ga, gb));
}

TEMPLATE_TEST_CASE("head and query sub-ranges compute the full call's values and touch nothing else", "[loop]", float,
                   bf16) {
  const auto seed = test::fresh_seed();
  CAPTURE(seed);
  Rng rng(seed);
  for (int i = 0; i < 8; ++i) {
    const Case c = random_case(rng, 200 / kScale, i % 2 ? Mode::stack : Mode::layer);
    const Inputs<TestType> in(rng, c);
    LoopOptions opt = in.options();
    if (i % 4 == 3) opt.fuse = LoopOptions::Fuse::never;
    const Outputs full = run(in, opt);
    opt.heads.begin = rng.integer(0, c.H - 1);
    opt.heads.end = rng.integer(opt.heads.begin, c.H);
    opt.queries.begin = rng.integer(0, c.T_q - 1);
    opt.queries.end = rng.integer(0, 3) == 0 ? -1 : rng.integer(opt.queries.begin, c.T_q);
    LOOP_CAPTURE(c);
    CAPTURE(opt.heads.begin, opt.heads.end, opt.queries.begin, opt.queries.end);
    const Outputs part = run(in, opt);
    const std::int64_t qe = opt.queries.resolve_end(c.T_q);
    std::size_t wrong = 0;
    for (std::int64_t t = 0; t < c.T_q; ++t)
      for (std::int64_t h = 0; h < c.H; ++h) {
        const bool inside = t >= opt.queries.begin && t < qe && h >= opt.heads.begin && h < opt.heads.end;
        const auto gi = static_cast<std::size_t>(t * c.H + h);
        const auto same = [&](const std::vector<float>& a, const std::vector<float>& b, std::size_t k) {
          return std::memcmp(&a[k], &b[k], sizeof(float)) == 0;
        };
        if (inside ? !same(part.gates, full.gates, gi) : !std::isnan(part.gates[gi])) ++wrong;
        for (std::int64_t e = 0; e < c.d_v; ++e) {
          const auto oi = static_cast<std::size_t>((t * c.H + h) * c.d_v + e);
          if (inside ? !same(part.out, full.out, oi) : !std::isnan(part.out[oi])) ++wrong;
        }
      }
    CHECK(wrong == 0);  // inside: bit-identical to the full call; outside: still poisoned
  }
}

TEMPLATE_TEST_CASE("decode equals the last row of prefill (ring buffer and last rows of the cache)", "[loop][decode]",
                   float, bf16) {
  const auto seed = test::fresh_seed();
  CAPTURE(seed);
  Rng rng(seed);
  for (int i = 0; i < 8; ++i) {
    Case c = random_case(rng, 700 / kScale, i % 2 ? Mode::stack : Mode::layer);
    c.T_q = c.T_g;
    c.q_offset = -1;
    c.local_begin = 0;
    c.explicit_local_offset = false;
    LOOP_CAPTURE(c);
    const Inputs<TestType> in(rng, c);
    const Outputs pre = run(in, in.options());
    const std::int64_t T = c.T_g, H = c.H, Hk = c.H_kv, dk = c.d_k, dv = c.d_v, W = std::min(c.window, T);

    // The global cache and a ring buffer that has seen every local row (keeps the last W).
    KVCache<TestType> cache(Hk, dk, dv);
    RingKVCache<TestType> ring(Hk, dk, dv, c.window);
    cache.append(ConstView3<float>(in.kg_f.data(), {T, Hk, dk}), ConstView3<float>(in.vg_f.data(), {T, Hk, dv}));
    ring.append(ConstView3<float>(in.kl_all_f().data(), {T, Hk, dk}), ConstView3<float>(in.vl_all_f().data(), {T, Hk, dv}));
    REQUIRE(ring.size() == W);

    const ConstView2<float> q_last(in.q.data() + (T - 1) * H * dk, {H, dk});
    std::vector<float> pre_last(pre.out.end() - H * dv, pre.out.end());
    std::vector<float> g_last(pre.gates.end() - H, pre.gates.end());
    const auto ref = ref::reference_loop_decode(
        std::vector<float>(in.q.end() - H * dk, in.q.end()), in.kg_f, in.vg_f,
        std::vector<float>(in.kl_all_f().end() - W * Hk * dk, in.kl_all_f().end()),
        std::vector<float>(in.vl_all_f().end() - W * Hk * dv, in.vl_all_f().end()), in.gate_w, in.gate_b,
        ref::LoopDims{1, T, W, H, Hk, dk, dv}, 1.0 / std::sqrt(static_cast<double>(dk)));

    for (int variant = 0; variant < 2; ++variant) {
      CAPTURE(variant);  // 0: ring buffer slots, 1: the last W rows of the local K/V
      std::vector<float> out(static_cast<std::size_t>(H * dv), kNaN), gates(static_cast<std::size_t>(H), kNaN);
      const ConstView3<TestType> kl = variant == 0 ? ring.keys() : in.klv().slice(0, T - W, T);
      const ConstView3<TestType> vl = variant == 0 ? ring.values() : in.vlv().slice(0, T - W, T);
      loop_attention_decode<TestType>(q_last, cache.keys(), cache.values(), kl, vl, in.wv(), in.bv(),
                                      View2<float>(out.data(), {H, dv}), {}, gates);
      CHECK(test::rel_l2(out, pre_last) <= kOutTol);
      CHECK(test::rel_l2(out, ref.out) <= kOutTol);
      CHECK(test::bit_equal(gates, g_last));  // same float32 dot and sigmoid as prefill
      CHECK(max_abs_diff(gates, ref.gates) <= kGateTol);
    }
  }
}

TEST_CASE("decode with a sub-range of heads writes only those", "[loop][decode]") {
  const auto seed = test::fresh_seed();
  CAPTURE(seed);
  Rng rng(seed);
  const std::int64_t T = 200, H = 8, Hk = 2, d = 24, W = 16;
  const Case c{1, T, H, Hk, d, d, W, -1, 0, false, Mode::stack};
  const Inputs<float> in(rng, c);
  std::vector<float> full(H * d, kNaN), part(H * d, kNaN), gf(H, kNaN), gp(H, kNaN);
  const auto dec = [&](std::vector<float>& o, std::vector<float>& g, DecodeOptions opt) {
    loop_attention_decode<float>(ConstView2<float>(in.q.data(), {H, d}), in.kgv(), in.vgv(), in.klv().slice(0, T - W, T),
                                 in.vlv().slice(0, T - W, T), in.wv(), in.bv(), View2<float>(o.data(), {H, d}), opt, g);
  };
  dec(full, gf, {});
  DecodeOptions opt;
  opt.heads = {3, 6};
  dec(part, gp, opt);
  std::size_t wrong = 0;
  for (std::int64_t h = 0; h < H; ++h) {
    const bool inside = h >= 3 && h < 6;
    if (inside ? gp[h] != gf[h] : !std::isnan(gp[h])) ++wrong;
    for (std::int64_t e = 0; e < d; ++e)
      if (inside ? part[h * d + e] != full[h * d + e] : !std::isnan(part[h * d + e])) ++wrong;
  }
  CHECK(wrong == 0);
}

TEMPLATE_TEST_CASE("strided views: fused qkv buffer, head-major K/V, padded out and gates", "[loop]", float,
                   bf16) {
  const auto seed = test::fresh_seed();
  CAPTURE(seed);
  Rng rng(seed);
  for (Mode mode : {Mode::layer, Mode::stack}) {
    const std::int64_t T = rng.integer(40, 200 / kScale + 40), H = 4, H_kv = 2, d = 40;
    const Case c{T, T, H, H_kv, d, d, 17, -1, 0, false, mode};
    LOOP_CAPTURE(c);
    const Inputs<TestType> in(rng, c);
    const Outputs dense = run(in, in.options());
    // q inside a [T, q | pad] buffer; K/V head-major [H_kv, T, d] (as KVCache stores them).
    const std::int64_t qrow = H * d + 5;
    std::vector<float> qbuf(static_cast<std::size_t>(T * qrow), kNaN);
    for (std::int64_t t = 0; t < T; ++t)
      for (std::int64_t i = 0; i < H * d; ++i) qbuf[t * qrow + i] = in.q[t * H * d + i];
    const auto head_major = [&](const std::vector<TestType>& x) {
      std::vector<TestType> y(x.size());
      for (std::int64_t t = 0; t < T; ++t)
        for (std::int64_t j = 0; j < H_kv; ++j)
          for (std::int64_t e = 0; e < d; ++e) y[(j * T + t) * d + e] = x[(t * H_kv + j) * d + e];
      return y;
    };
    const std::vector<TestType> kg = head_major(in.kg), vg = head_major(in.vg), kl = head_major(in.kl_all()),
                                vl = head_major(in.vl_all());
    const auto hm = [&](const std::vector<TestType>& x) { return ConstView3<TestType>(x.data(), {T, H_kv, d}, {d, T * d, 1}); };
    const std::int64_t orow = H * d + 3;
    const std::int64_t grow = H + 3;
    std::vector<float> out(static_cast<std::size_t>(T * orow), kNaN), gates_p(static_cast<std::size_t>(T * grow), kNaN);
    // Layer mode passes the same views twice (the fused path); stack mode separate ones.
    const ConstView3<TestType> klv = mode == Mode::layer ? hm(kg) : hm(kl), vlv = mode == Mode::layer ? hm(vg) : hm(vl);
    loop_attention<TestType>(ConstView3<float>(qbuf.data(), {T, H, d}, {qrow, d, 1}), hm(kg), hm(vg), klv, vlv, in.wv(),
                             in.bv(), c.window, View3<float>(out.data(), {T, H, d}, {orow, d, 1}), {},
                             View2<float>(gates_p.data(), {T, H}, {grow, 1}));
    std::vector<float> o(dense.out.size()), g(dense.gates.size());
    std::size_t pad_touched = 0;
    for (std::int64_t t = 0; t < T; ++t) {
      for (std::int64_t i = 0; i < H * d; ++i) o[t * H * d + i] = out[t * orow + i];
      for (std::int64_t i = H * d; i < orow; ++i) pad_touched += !std::isnan(out[t * orow + i]);
      for (std::int64_t h = 0; h < H; ++h) g[t * H + h] = gates_p[t * grow + h];
      for (std::int64_t h = H; h < grow; ++h) pad_touched += !std::isnan(gates_p[t * grow + h]);
    }
    CHECK(pad_touched == 0);
    CHECK(test::bit_equal(o, dense.out));  // same rows, same arithmetic, whatever the strides
    CHECK(test::bit_equal(g, dense.gates));
  }
}

// The instruction sets the portable path is compiled for here (whatever the build targets).
#if XSIMD_WITH_AVX2
#define ATTNKIT_PORTABLE_ARCHS xsimd::sse2, xsimd::avx2
#elif XSIMD_WITH_SSE2
#define ATTNKIT_PORTABLE_ARCHS xsimd::sse2
#else
#define ATTNKIT_PORTABLE_ARCHS simd::default_arch
#endif

// int8 K/V (QuantView3) read in place: bit for bit loop_attention<float> over the dequantised
// rows (held to float64 above) on every path: layer mode (the same views: fused), stack mode
// (two-source, trimmed local rows) and two-pass; and int8 global rows beside f32 local rows.
TEST_CASE("loop_attention on int8 K/V (QuantView3) equals the f32 kernel over the dequantised rows", "[loop][int8]") {
  const auto seed = test::fresh_seed();
  CAPTURE(seed);
  Rng rng(seed);
  struct Quant {
    std::vector<std::int8_t> codes;
    std::vector<float> scales;
  };
  // Quantises x [T, H_kv, d] row by row, replacing x by its dequantised values.
  const auto quantise = [](std::vector<float>& x, std::int64_t T, std::int64_t Hk, std::int64_t d) {
    Quant q{std::vector<std::int8_t>(x.size()), std::vector<float>(static_cast<std::size_t>(T * Hk))};
    for (std::int64_t r = 0; r < T * Hk; ++r) {
      REQUIRE(detail::quant::quantize_row(x.data() + r * d, q.codes.data() + r * d, q.scales[r], d));
      detail::quant::dequantize_row(q.codes.data() + r * d, q.scales[r], x.data() + r * d, d);
    }
    return q;
  };
  for (int i = 0; i < 12; ++i) {
    const Case c = random_case(rng, 200 / kScale, i % 2 ? Mode::stack : Mode::layer);
    LOOP_CAPTURE(c);
    Inputs<float> in(rng, c);
    const Quant kg = quantise(in.kg, c.T_g, c.H_kv, c.d_k), vg = quantise(in.vg, c.T_g, c.H_kv, c.d_v);
    Quant kl, vl;
    if (c.mode == Mode::stack) {
      kl = quantise(in.kl, c.T_g, c.H_kv, c.d_k);
      vl = quantise(in.vl, c.T_g, c.H_kv, c.d_v);
    }
    const auto view = [&](const Quant& x, std::int64_t d) {
      return QuantView3{ConstView3<std::int8_t>(x.codes.data(), {c.T_g, c.H_kv, d}),
                        ConstView2<float>(x.scales.data(), {c.T_g, c.H_kv})};
    };
    const QuantView3 kgq = view(kg, c.d_k), vgq = view(vg, c.d_v);
    const QuantView3 klq = c.mode == Mode::stack ? view(kl, c.d_k).slice(0, c.local_begin, c.T_g) : kgq;
    const QuantView3 vlq = c.mode == Mode::stack ? view(vl, c.d_v).slice(0, c.local_begin, c.T_g) : vgq;
    for (const auto fuse : {LoopOptions::Fuse::automatic, LoopOptions::Fuse::never}) {
      LoopOptions opt = in.options();
      opt.fuse = fuse;
      opt.num_threads = static_cast<int>(rng.integer(1, 2));
      Outputs o(c);
      loop_attention(in.qv(), kgq, vgq, klq, vlq, in.wv(), in.bv(), c.window, o.ov(c), opt, o.gv(c));
      const Outputs e = run(in, opt);  // f32 over the dequantised rows
      CHECK(test::bit_equal(o.out, e.out));
      CHECK(test::bit_equal(o.gates, e.gates));
      if (c.mode == Mode::stack) {  // int8 global rows beside an f32 window (a ring staged in f32, as the model runs it)
        Outputs m(c);
        detail::loop_attention_arch<simd::default_arch, std::int8_t, float>(in.qv(), kgq, vgq, in.klv(), in.vlv(), in.wv(),
                                                                           in.bv(), c.window, m.ov(c), opt, m.gv(c));
        CHECK(test::bit_equal(m.out, e.out));
        CHECK(test::bit_equal(m.gates, e.gates));
      }
    }
  }
}

TEMPLATE_TEST_CASE("portable (non-AVX-512) code path matches the reference", "[loop][generic]",
                   ATTNKIT_PORTABLE_ARCHS) {
  const auto seed = test::fresh_seed();
  CAPTURE(seed);
  Rng rng(seed);
  for (int i = 0; i < 8 / kScale + 2; ++i) {
    const Case c = random_case(rng, 160 / kScale, i % 2 ? Mode::stack : Mode::layer);
    const auto fuse = i % 3 == 2 ? LoopOptions::Fuse::never : LoopOptions::Fuse::automatic;
    if (i % 4 < 2) check_against_reference<float, TestType>(rng, c, fuse);
    else check_against_reference<bf16, TestType>(rng, c, fuse);
  }
}

TEST_CASE("loop_attention validation errors name the function and the argument", "[loop][errors]") {
  const std::int64_t T = 6, H = 4, H_kv = 2, dk = 8, dv = 8, W = 3;
  std::vector<float> q(T * H * dk, 0.f), k(T * H_kv * dk, 0.f), v(T * H_kv * dv, 0.f), out(T * H * dv),
      gates(T * H), gw(H * dk, 0.f), gb(H, 0.f), big(4096, 0.f);
  const ConstView3<float> qv(q.data(), {T, H, dk}), kv(k.data(), {T, H_kv, dk}), vv(v.data(), {T, H_kv, dv});
  const View3<float> ov(out.data(), {T, H, dv});
  const ConstView2<float> wv(gw.data(), {H, dk});
  const std::span<const float> bv(gb);
  const View2<float> gv(gates.data(), {T, H});
  struct Args {
    ConstView3<float> q, kg, vg, kl, vl;
    ConstView2<float> w;
    std::span<const float> b;
    std::int64_t window;
    View3<float> out;
    LoopOptions opt;
    View2<float> gates;
  };
  const Args good{qv, kv, vv, kv, vv, wv, bv, W, ov, {}, gv};
  const auto call = [](const Args& a) {
    loop_attention<float>(a.q, a.kg, a.vg, a.kl, a.vl, a.w, a.b, a.window, a.out, a.opt, a.gates);
  };
  REQUIRE_NOTHROW(call(good));
  Args a = good;
  a.window = 0;
  CHECK_THROWS_WITH(call(a), Contains("loop_attention: argument 'window': must be >= 1, got 0"));
  a = good;
  a.w = ConstView2<float>(gw.data(), {H, dk - 1});
  CHECK_THROWS_WITH(call(a), Contains("loop_attention: argument 'gate_w': shape [4, 7] must be [H, d_k] = [4, 8]"));
  a = good;
  a.w = ConstView2<float>(gw.data(), {H - 1, dk});
  CHECK_THROWS_WITH(call(a), Contains("loop_attention: argument 'gate_w': shape [3, 8] must be [H, d_k] = [4, 8]"));
  a = good;
  a.w = ConstView2<float>(nullptr, {H, dk});
  CHECK_THROWS_WITH(call(a), Contains("loop_attention: argument 'gate_w': null data pointer"));
  a = good;
  a.b = bv.subspan(0, H - 1);
  CHECK_THROWS_WITH(call(a), Contains("loop_attention: argument 'gate_b': size 3 must be H = 4"));
  a = good;
  a.gates = View2<float>(gates.data(), {T, H - 1});
  CHECK_THROWS_WITH(call(a), Contains("loop_attention: argument 'gates': shape [6, 3] must be [T_q, H] = [6, 4]"));
  a = good;
  a.gates = View2<float>(gates.data(), {T, H}, {1, 2});
  CHECK_THROWS_WITH(call(a), Contains("loop_attention: argument 'gates': the last dimension must be contiguous"));
  // Global part (check_prefill, with the loop argument names).
  a = good;
  a.kg = ConstView3<float>(k.data(), {T, H_kv, dk / 2});
  CHECK_THROWS_WITH(call(a), Contains("loop_attention: argument 'k_glob': head_dim 4 does not match q's head_dim 8"));
  a = good;
  a.vg = ConstView3<float>(v.data(), {T - 1, H_kv, dv});
  CHECK_THROWS_WITH(call(a), Contains("loop_attention: argument 'v_glob': 5 rows, but k_glob has T_k = 6"));
  a = good;
  a.out = View3<float>(out.data(), {T, H, dv - 1});
  CHECK_THROWS_WITH(call(a), Contains("loop_attention: argument 'out': shape [6, 4, 7] must be [T_q, H, d_v]"));
  a = good;
  a.opt.heads = {1, 5};
  CHECK_THROWS_WITH(call(a), Contains("loop_attention: argument 'opt.heads': range [1, 5) is out of bounds for H = 4"));
  a = good;
  a.opt.q_offset = 1;
  CHECK_THROWS_WITH(call(a), Contains("loop_attention: argument 'opt.q_offset': q_offset + T_q = 7 exceeds T_k = 6"));
  a = good;
  a.q = ConstView3<float>(big.data(), {T + 2, H, dk});
  a.out = View3<float>(big.data() + 1024, {T + 2, H, dv});
  a.gates = {};
  CHECK_THROWS_WITH(call(a), Contains("loop_attention: argument 'q': T_q = 8 queries, but k_glob has only T_k = 6 keys"));
  // Local K/V against the global ones.
  a = good;
  a.kl = ConstView3<float>(big.data(), {T, H_kv, dk / 2});
  CHECK_THROWS_WITH(call(a), Contains("loop_attention: argument 'k_loc': head_dim 4 does not match q's head_dim 8"));
  a = good;
  a.kl = ConstView3<float>(big.data(), {T, 1, dk});
  a.vl = ConstView3<float>(big.data(), {T, 1, dv});
  CHECK_THROWS_WITH(call(a), Contains("loop_attention: argument 'k_loc': 1 KV heads, but k_glob has H_kv = 2"));
  a = good;
  a.vl = ConstView3<float>(big.data(), {T, 1, dv});
  CHECK_THROWS_WITH(call(a), Contains("loop_attention: argument 'v_loc': 1 KV heads, but k_glob has H_kv = 2"));
  a = good;
  a.vl = ConstView3<float>(big.data(), {T - 1, H_kv, dv});
  CHECK_THROWS_WITH(call(a), Contains("loop_attention: argument 'v_loc': 5 rows, but k_loc has 6"));
  a = good;
  a.vl = ConstView3<float>(big.data(), {T, H_kv, dv + 2});
  CHECK_THROWS_WITH(call(a), Contains("loop_attention: argument 'v_loc': head_dim 10 does not match v_glob's head_dim "
                                      "d_v = 8"));
  a = good;
  a.kl = ConstView3<float>(k.data(), {T, H_kv, dk}, {H_kv * dk, dk, 2});
  CHECK_THROWS_WITH(call(a), Contains("loop_attention: argument 'k_loc': the last dimension must be contiguous"));
  a = good;
  a.vl = ConstView3<float>(nullptr, {T, H_kv, dv});
  CHECK_THROWS_WITH(call(a), Contains("loop_attention: argument 'v_loc': null data pointer"));
  // Coverage of the windows. Queries at positions 0..5, W = 3: the first window starts at 0.
  a = good;
  a.opt.local_offset = -2;
  CHECK_THROWS_WITH(call(a), Contains("loop_attention: argument 'opt.local_offset': must be -1 (default) or >= 0, "
                                      "got -2"));
  a = good;
  a.kl = kv.slice(0, 1, T);
  a.vl = vv.slice(0, 1, T);  // default local_offset = 1 > 0
  CHECK_THROWS_WITH(call(a), Contains("loop_attention: argument 'opt.local_offset': local keys start at position 1, "
                                      "after the start 0 of the first query's window (query position 0, window 3)"));
  a = good;
  a.kl = ConstView3<float>(big.data(), {T + 1, H_kv, dk});
  a.vl = ConstView3<float>(big.data(), {T + 1, H_kv, dv});
  CHECK_THROWS_WITH(call(a), Contains("loop_attention: argument 'k_loc': 7 rows, more than k_glob's T_k = 6"));
  a = good;
  a.kl = kv.slice(0, 0, T - 1);
  a.vl = vv.slice(0, 0, T - 1);
  a.opt.local_offset = 0;
  CHECK_THROWS_WITH(call(a), Contains("loop_attention: argument 'k_loc': local keys cover positions [0, 5), which end "
                                      "before the last query's position 5"));
  // No queries: nothing to do, nothing written.
  a = good;
  a.q = qv.slice(0, 0, 0);
  a.out = ov.slice(0, 0, 0);
  a.gates = gv.slice(0, 0, 0);
  REQUIRE_NOTHROW(call(a));
  // A continuation chunk: queries at positions 4, 5 (W = 3) need local keys from position 2 on.
  a = good;
  a.q = qv.slice(0, 0, 2);
  a.out = ov.slice(0, 0, 2);
  a.gates = gv.slice(0, 0, 2);
  a.kl = kv.slice(0, 2, T);
  a.vl = vv.slice(0, 2, T);
  REQUIRE_NOTHROW(call(a));
  a.kl = kv.slice(0, 3, T);
  a.vl = vv.slice(0, 3, T);
  CHECK_THROWS_WITH(call(a), Contains("loop_attention: argument 'opt.local_offset': local keys start at position 3, "
                                      "after the start 2 of the first query's window (query position 4, window 3)"));
}

TEST_CASE("loop_attention_decode validation errors name the function and the argument", "[loop][decode][errors]") {
  const std::int64_t T = 6, H = 4, H_kv = 2, d = 8;
  std::vector<float> q(H * d, 0.f), k(T * H_kv * d, 0.f), v(T * H_kv * d, 0.f), out(H * d), gates(H), gw(H * d, 0.f),
      gb(H, 0.f), big(4096, 0.f);
  const ConstView2<float> qv(q.data(), {H, d});
  const ConstView3<float> kv(k.data(), {T, H_kv, d}), vv(v.data(), {T, H_kv, d});
  const View2<float> ov(out.data(), {H, d});
  const ConstView2<float> wv(gw.data(), {H, d});
  struct Args {
    ConstView2<float> q;
    ConstView3<float> kg, vg, kl, vl;
    ConstView2<float> w;
    std::span<const float> b;
    View2<float> out;
    DecodeOptions opt;
    std::span<float> gates;
  };
  const Args good{qv, kv, vv, kv.slice(0, 3, T), vv.slice(0, 3, T), wv, gb, ov, {}, gates};
  const auto call = [](const Args& a) {
    loop_attention_decode<float>(a.q, a.kg, a.vg, a.kl, a.vl, a.w, a.b, a.out, a.opt, a.gates);
  };
  REQUIRE_NOTHROW(call(good));
  const std::string fn = "loop_attention_decode: argument ";
  Args a = good;
  a.w = ConstView2<float>(gw.data(), {H, d - 1});
  CHECK_THROWS_WITH(call(a), Contains(fn + "'gate_w': shape [4, 7] must be [H, d_k] = [4, 8]"));
  a = good;
  a.b = std::span<const float>(gb).subspan(1);
  CHECK_THROWS_WITH(call(a), Contains(fn + "'gate_b': size 3 must be H = 4"));
  a = good;
  a.gates = std::span<float>(gates).subspan(1);
  CHECK_THROWS_WITH(call(a), Contains(fn + "'gates': size 3 must be H = 4 (or empty)"));
  a = good;
  a.kl = kv.slice(0, 0, 0);
  a.vl = vv.slice(0, 0, 0);
  CHECK_THROWS_WITH(call(a), Contains(fn + "'k_loc': no keys (it must hold at least the current token's key)"));
  a = good;
  a.kg = kv.slice(0, 0, 0);
  a.vg = vv.slice(0, 0, 0);
  CHECK_THROWS_WITH(call(a), Contains(fn + "'k_glob': no keys"));
  a = good;
  a.kl = ConstView3<float>(big.data(), {3, H_kv, d + 1});
  CHECK_THROWS_WITH(call(a), Contains(fn + "'k_loc': head_dim 9 does not match q's head_dim 8"));
  a = good;
  a.kl = ConstView3<float>(big.data(), {3, 1, d});
  CHECK_THROWS_WITH(call(a), Contains(fn + "'k_loc': 1 KV heads, but k_glob has H_kv = 2"));
  a = good;
  a.vl = ConstView3<float>(big.data(), {2, H_kv, d});
  CHECK_THROWS_WITH(call(a), Contains(fn + "'v_loc': 2 rows, but k_loc has 3"));
  a = good;
  a.vl = ConstView3<float>(big.data(), {3, H_kv, d + 2});
  CHECK_THROWS_WITH(call(a), Contains(fn + "'v_loc': head_dim 10 does not match v_glob's head_dim d_v = 8"));
  a = good;
  a.vg = ConstView3<float>(big.data(), {T - 1, H_kv, d});
  CHECK_THROWS_WITH(call(a), Contains(fn + "'v_glob': 5 rows, but k_glob has 6"));
  a = good;
  a.kg = ConstView3<float>(big.data(), {T, H_kv, d - 1});
  CHECK_THROWS_WITH(call(a), Contains(fn + "'k_glob': head_dim 7 does not match q's head_dim 8"));
  a = good;
  a.q = ConstView2<float>(big.data(), {3, d});
  a.w = ConstView2<float>(gw.data(), {3, d});
  CHECK_THROWS_WITH(call(a), Contains(fn + "'q': number of query heads H = 3 is not a multiple of the number of KV "
                                           "heads H_kv = 2"));
  a = good;
  a.out = View2<float>(out.data(), {H, d - 1});
  CHECK_THROWS_WITH(call(a), Contains(fn + "'out': shape [4, 7] must be [H, d_v] = [4, 8]"));
  a = good;
  a.opt.heads = {2, 9};
  CHECK_THROWS_WITH(call(a), Contains(fn + "'opt.heads': range [2, 9) is out of bounds for H = 4"));
  a = good;
  a.opt.kv_chunk = -1;
  CHECK_THROWS_WITH(call(a), Contains(fn + "'opt.kv_chunk': must be >= 0"));
  a = good;
  a.opt.scale = std::numeric_limits<float>::infinity();
  CHECK_THROWS_WITH(call(a), Contains(fn + "'opt.scale': must be finite"));
  a = good;
  a.q = ConstView2<float>(nullptr, {H, d});
  CHECK_THROWS_WITH(call(a), Contains(fn + "'q': null data pointer"));
}
