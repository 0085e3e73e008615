// tests/test_linear.cpp — PackedLinear against the float64 reference (tests/reference/linear_ref.hpp).
#include <catch2/catch.hpp>

#include <cmath>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

#include "attnkit/linalg/packed_linear.hpp"
#include "reference/linear_ref.hpp"
#include "test_util.hpp"

using namespace attnkit;
using attnkit::test::Rng;

namespace {

constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();

enum class WKind { f32, bf16, as_bf16 };
const char* kind_name(WKind k) { return k == WKind::f32 ? "f32" : k == WKind::bf16 ? "bf16" : "pack_as_bf16"; }

struct Layer {
  PackedLinear lin;
  std::vector<float> w;  // the exact stored weight values, dense [N, K]
};

// Random weights [N, K] with a row stride > K whose padding is NaN (pack must not read it).
Layer make_layer(Rng& rng, std::int64_t N, std::int64_t K, WKind kind) {
  const std::int64_t ldw = K + rng.integer(0, 3);
  std::vector<float> wf(static_cast<std::size_t>(N * ldw), kNaN);
  Layer L;
  L.w.resize(static_cast<std::size_t>(N * K));
  for (std::int64_t o = 0; o < N; ++o)
    for (std::int64_t k = 0; k < K; ++k) wf[o * ldw + k] = rng.normal(0.5f);
  if (kind == WKind::bf16) {
    std::vector<bf16> wb(wf.size());
    for (std::size_t i = 0; i < wf.size(); ++i) wb[i] = bf16(wf[i]);
    L.lin = PackedLinear::pack(wb.data(), N, K, ldw);
    for (std::int64_t o = 0; o < N; ++o)
      for (std::int64_t k = 0; k < K; ++k) L.w[o * K + k] = to_float(wb[o * ldw + k]);
  } else if (kind == WKind::as_bf16) {
    L.lin = PackedLinear::pack_as_bf16(wf.data(), N, K, ldw);
    for (std::int64_t o = 0; o < N; ++o)
      for (std::int64_t k = 0; k < K; ++k) L.w[o * K + k] = round_to_bf16(wf[o * ldw + k]);
  } else {
    L.lin = PackedLinear::pack(wf.data(), N, K, ldw);
    for (std::int64_t o = 0; o < N; ++o)
      for (std::int64_t k = 0; k < K; ++k) L.w[o * K + k] = wf[o * ldw + k];
  }
  return L;
}

struct Activations {
  std::int64_t T, K, ldx;
  std::vector<float> x;  // [T, ldx], padding NaN (the kernels must not read it)
};

Activations make_x(Rng& rng, std::int64_t T, std::int64_t K) {
  Activations a{T, K, K + rng.integer(0, 5), {}};
  a.x.assign(static_cast<std::size_t>(T * a.ldx), kNaN);
  for (std::int64_t t = 0; t < T; ++t)
    for (std::int64_t k = 0; k < K; ++k) a.x[t * a.ldx + k] = rng.normal();
  return a;
}

struct Result {
  std::vector<float> dense;  // [T, N]
  bool padding_untouched = true;
};

// Runs forward into a strided y (row stride N + pad). y starts poisoned (NaN), or from y0 when
// accumulating; the padding must stay NaN.
Result run(const PackedLinear& lin, const Activations& a, const LinearOptions& opt, std::int64_t ypad,
           const std::vector<float>* y0 = nullptr) {
  const std::int64_t N = lin.out_features(), T = a.T, ldy = N + ypad;
  std::vector<float> y(static_cast<std::size_t>(std::max<std::int64_t>(T * ldy, 1)));
  attnkit::test::poison(y);
  if (y0)
    for (std::int64_t t = 0; t < T; ++t)
      for (std::int64_t o = 0; o < N; ++o) y[t * ldy + o] = (*y0)[t * N + o];
  lin.forward(ConstView2<float>(a.x.data(), {T, a.K}, {a.ldx, 1}), View2<float>(y.data(), {T, N}, {ldy, 1}), opt);
  Result r;
  r.dense.resize(static_cast<std::size_t>(T * N));
  for (std::int64_t t = 0; t < T; ++t) {
    for (std::int64_t o = 0; o < N; ++o) r.dense[t * N + o] = y[t * ldy + o];
    for (std::int64_t o = N; o < ldy; ++o) r.padding_untouched &= std::isnan(y[t * ldy + o]);
  }
  return r;
}

// Forces the FMA path for Precision::fast prefill (instead of AMX) while alive.
struct AmxSwitch {
  bool previous;
  explicit AmxSwitch(bool enabled) : previous(detail::linear::amx_enabled().exchange(enabled)) {}
  ~AmxSwitch() { detail::linear::amx_enabled() = previous; }
};

struct Shape {
  std::int64_t T, N, K;
};

std::vector<Shape> test_shapes(Rng& rng) {
  std::vector<Shape> s = {
      {1, 1, 1},     {9, 17, 1},   {8, 48, 64},  {1, 200, 700}, {3, 33, 257},
      {17, 95, 31},  {16, 70, 700}, {12, 33, 257},  // 9..16 tokens: two register tiles streaming K
      {70, 49, 130}, {300, 50, 301},  // 300 tokens: two token chunks, three K blocks
  };
#if !defined(ATTNKIT_SANITIZED)
  s.push_back({257, 130, 1000});
#endif
  for (int i = 0; i < 8; ++i) s.push_back({rng.integer(1, 70), rng.integer(1, 100), rng.integer(1, 300)});
  return s;
}

}  // namespace

TEST_CASE("PackedLinear exact and fast match the float64 reference", "[linear]") {
  const auto seed = attnkit::test::fresh_seed();
  CAPTURE(seed);
  Rng rng(seed);
  for (const Shape& sh : test_shapes(rng)) {
    for (WKind kind : {WKind::f32, WKind::bf16, WKind::as_bf16}) {
      INFO("T=" << sh.T << " N=" << sh.N << " K=" << sh.K << " weights=" << kind_name(kind));
      const Layer L = make_layer(rng, sh.N, sh.K, kind);
      REQUIRE(L.lin.out_features() == sh.N);
      REQUIRE(L.lin.in_features() == sh.K);
      REQUIRE(L.lin.is_bf16() == (kind != WKind::f32));
      const Activations a = make_x(rng, sh.T, sh.K);
      const std::int64_t ypad = rng.integer(0, 3);
      const auto ref = ref::linear(a.x.data(), a.ldx, L.w.data(), sh.K, sh.T, sh.N, sh.K);

      // exact: rel L2 <= 1e-5 against float64 with the stored weight values. Prefill runs on
      // AMX where available (x split into three bf16 planes); check the FMA path too.
      const Result ex = run(L.lin, a, {Precision::exact, 0, false}, ypad);
      CHECK(ex.padding_untouched);
      CHECK(attnkit::test::rel_l2(ex.dense, ref) <= 1e-5);
      {
        const AmxSwitch sw(false);
        const Result ex_fma = run(L.lin, a, {Precision::exact, 0, false}, ypad);
        CHECK(ex_fma.padding_untouched);
        CHECK(attnkit::test::rel_l2(ex_fma.dense, ref) <= 1e-5);
        // Both are fp32-accurate: far tighter than the bound (typically ~1e-7).
        CHECK(attnkit::test::rel_l2(ex_fma.dense, ex.dense) <= 1e-6);
      }

      // fast: <= 1e-2 against the exact reference, and <= 1e-5 against the reference with x
      // rounded to bf16 (so it is really the bf16-activation product). f32 weights: fast == exact.
      // Same for fast.
      for (const bool amx : {true, false}) {
        INFO("AMX allowed: " << amx);
        const AmxSwitch sw(amx);
        const Result fa = run(L.lin, a, {Precision::fast, 0, false}, ypad);
        CHECK(fa.padding_untouched);
        CHECK(attnkit::test::rel_l2(fa.dense, ref) <= (kind == WKind::f32 ? 1e-5 : 1e-2));
        if (kind != WKind::f32) {
          std::vector<float> xr = a.x;
          for (auto& v : xr) v = round_to_bf16(v);
          const auto ref_r = ref::linear(xr.data(), a.ldx, L.w.data(), sh.K, sh.T, sh.N, sh.K);
          CHECK(attnkit::test::rel_l2(fa.dense, ref_r) <= 1e-5);
          // ...and measurably not the exact result (bf16 activations lose ~8 bits).
          if (sh.K >= 16) CHECK(attnkit::test::rel_l2(fa.dense, ref) > 1e-5);
        } else {
          CHECK(attnkit::test::bit_equal(fa.dense, ex.dense));
        }
      }
    }
  }
}

// The one tile configuration of every AMX kernel, read back after amx_configure loads it: GCC
// 12's _tile_loadconfig let -O2 drop the configuration's stores (core/amx.hpp), and every tile
// instruction then raised SIGILL. Runs where the CPU has AMX (not on the CI machine).
TEST_CASE("AMX: amx_configure loads the kernels' tile configuration", "[linear][amx]") {
#if defined(ATTNKIT_AMX)
  if (!detail::amx::amx_available()) {
    SUCCEED("this CPU has no usable AMX");
    return;
  }
  // Through a pointer, so the test runs the function's own (not inlined) code, as the kernels
  // that showed the fault did.
  void (*volatile configure)() = &detail::amx::amx_configure;
  configure();
  const detail::amx::TileConfig got = detail::amx::stored_tile_config(), want = detail::amx::kernel_tile_config();
  detail::amx::amx_release();
  CHECK(got.palette == 1);
  for (int t = 0; t < 8; ++t) {
    INFO("tile " << t);
    CHECK(got.rows[t] == 16);
    CHECK(got.colsb[t] == 64);
  }
  CHECK(std::memcmp(&got, &want, sizeof want) == 0);
#else
  SUCCEED("not an AMX build");
#endif
}

TEST_CASE("PackedLinear accumulate adds to y", "[linear]") {
  const auto seed = attnkit::test::fresh_seed();
  CAPTURE(seed);
  Rng rng(seed);
  const std::vector<Shape> shapes = {{1, 37, 129}, {5, 16, 2}, {23, 70, 300}, {rng.integer(1, 40), rng.integer(1, 90), rng.integer(1, 400)}};
  for (const Shape& sh : shapes) {
    for (WKind kind : {WKind::f32, WKind::bf16}) {
      for (Precision prec : {Precision::exact, Precision::fast})
      for (const bool amx : {true, false}) {
        INFO("T=" << sh.T << " N=" << sh.N << " K=" << sh.K << " weights=" << kind_name(kind)
                  << " precision=" << (prec == Precision::exact ? "exact" : "fast") << " AMX allowed: " << amx);
        const AmxSwitch sw(amx);
        const Layer L = make_layer(rng, sh.N, sh.K, kind);
        const Activations a = make_x(rng, sh.T, sh.K);
        const std::vector<float> y0 = rng.normal_vec(static_cast<std::size_t>(sh.T * sh.N));
        std::vector<float> xr = a.x;
        if (prec == Precision::fast && kind != WKind::f32)
          for (auto& v : xr) v = round_to_bf16(v);
        const auto ref = ref::linear(xr.data(), a.ldx, L.w.data(), sh.K, sh.T, sh.N, sh.K, y0.data());
        const Result r = run(L.lin, a, {prec, 0, true}, rng.integer(0, 3), &y0);
        CHECK(r.padding_untouched);
        CHECK(attnkit::test::rel_l2(r.dense, ref) <= 1e-5);  // rel L2 <= 1e-5 vs float64
      }
    }
  }
}

TEST_CASE("PackedLinear results are bit-identical for 1 and 2 threads", "[linear]") {
  const auto seed = attnkit::test::fresh_seed();
  CAPTURE(seed);
  Rng rng(seed);
  // Large enough to go parallel (>= 2^18 multiply-adds): prefill and decode shapes, odd tails.
  const std::vector<Shape> shapes = {{37, 201, 300}, {1, 2001, 301}, {4, 999, 257}, {270, 77, 131}};
  for (const Shape& sh : shapes) {
    for (WKind kind : {WKind::f32, WKind::bf16}) {
      for (Precision prec : {Precision::exact, Precision::fast})
      for (const bool amx : {true, false}) {
        INFO("T=" << sh.T << " N=" << sh.N << " K=" << sh.K << " weights=" << kind_name(kind)
                  << " precision=" << (prec == Precision::exact ? "exact" : "fast") << " AMX allowed: " << amx);
        const AmxSwitch sw(amx);
        const Layer L = make_layer(rng, sh.N, sh.K, kind);
        const Activations a = make_x(rng, sh.T, sh.K);
        const Result r1 = run(L.lin, a, {prec, 1, false}, 0);
        const Result r2 = run(L.lin, a, {prec, 2, false}, 0);
        const Result r3 = run(L.lin, a, {prec, 3, false}, 0);
        CHECK(attnkit::test::bit_equal(r1.dense, r2.dense));
        CHECK(attnkit::test::bit_equal(r1.dense, r3.dense));
        const auto ref = ref::linear(a.x.data(), a.ldx, L.w.data(), sh.K, sh.T, sh.N, sh.K);
        CHECK(attnkit::test::rel_l2(r2.dense, ref) <= (prec == Precision::exact || kind == WKind::f32 ? 1e-5 : 1e-2));
      }
    }
  }
}

TEST_CASE("PackedLinear row() returns the stored weights; copies share them", "[linear]") {
  const auto seed = attnkit::test::fresh_seed();
  CAPTURE(seed);
  Rng rng(seed);
  for (WKind kind : {WKind::f32, WKind::bf16, WKind::as_bf16}) {
    const std::int64_t N = rng.integer(1, 70), K = rng.integer(1, 90);
    INFO("N=" << N << " K=" << K << " weights=" << kind_name(kind));
    const Layer L = make_layer(rng, N, K, kind);
    const PackedLinear copy = L.lin;
    const std::int64_t blocks = (N + 15) / 16;
    const std::int64_t stored_pairs = ((K + 1) / 2 + 15) / 16 * 16;  // bf16: K-pairs padded to whole AMX steps
    CHECK(L.lin.bytes() == static_cast<std::size_t>(kind == WKind::f32 ? blocks * 16 * K * 4 : blocks * 16 * stored_pairs * 4));
    std::vector<float> r(static_cast<std::size_t>(K));
    for (std::int64_t o = 0; o < N; ++o) {
      attnkit::test::poison(r);
      copy.row(o, r.data());
      CHECK(std::memcmp(r.data(), L.w.data() + o * K, static_cast<std::size_t>(K) * 4) == 0);
    }
  }
}

TEST_CASE("PackedLinear handles zero tokens", "[linear]") {
  Rng rng(attnkit::test::fresh_seed());
  const Layer L = make_layer(rng, 5, 7, WKind::bf16);
  std::vector<float> x(7), y(5, 1.f);
  L.lin.forward(ConstView2<float>(x.data(), {0, 7}), View2<float>(y.data(), {0, 5}));
  CHECK(y[0] == 1.f);
}

TEST_CASE("PackedLinear validates its arguments", "[linear]") {
  using Catch::Contains;
  std::vector<float> wf(6 * 10, 0.5f);
  std::vector<bf16> wb(6 * 10, bf16(0.5f));

  SECTION("pack") {
    REQUIRE_THROWS_WITH(PackedLinear::pack(static_cast<const float*>(nullptr), 6, 10, 10),
                        Contains("PackedLinear::pack: argument 'w': null pointer"));
    REQUIRE_THROWS_WITH(PackedLinear::pack(static_cast<const bf16*>(nullptr), 6, 10, 10),
                        Contains("PackedLinear::pack: argument 'w': null pointer"));
    REQUIRE_THROWS_WITH(PackedLinear::pack_as_bf16(nullptr, 6, 10, 10),
                        Contains("PackedLinear::pack_as_bf16: argument 'w': null pointer"));
    REQUIRE_THROWS_WITH(PackedLinear::pack(wf.data(), 0, 10, 10),
                        Contains("PackedLinear::pack: argument 'out_features': must be positive, got 0"));
    REQUIRE_THROWS_WITH(PackedLinear::pack(wb.data(), -3, 10, 10),
                        Contains("PackedLinear::pack: argument 'out_features': must be positive, got -3"));
    REQUIRE_THROWS_WITH(PackedLinear::pack_as_bf16(wf.data(), 6, 0, 10),
                        Contains("PackedLinear::pack_as_bf16: argument 'in_features': must be positive, got 0"));
    REQUIRE_THROWS_WITH(PackedLinear::pack(wf.data(), 6, 10, 9),
                        Contains("PackedLinear::pack: argument 'ld_w': row stride 9 is smaller than in_features 10"));
    REQUIRE_THROWS_WITH(PackedLinear::pack(wb.data(), 6, 10, 5),
                        Contains("PackedLinear::pack: argument 'ld_w': row stride 5 is smaller than in_features 10"));
    REQUIRE_THROWS_WITH(PackedLinear::pack_as_bf16(wf.data(), 6, 10, 1),
                        Contains("PackedLinear::pack_as_bf16: argument 'ld_w': row stride 1"));
  }

  SECTION("forward") {
    const PackedLinear lin = PackedLinear::pack(wb.data(), 6, 10, 10);
    std::vector<float> x(4 * 20, 1.f), y(4 * 12, 0.f);
    const ConstView2<float> xv(x.data(), {4, 10});
    const View2<float> yv(y.data(), {4, 6});
    REQUIRE_NOTHROW(lin.forward(xv, yv));
    REQUIRE_THROWS_WITH(PackedLinear().forward(xv, yv),
                        Contains("PackedLinear::forward: argument 'this': the layer is empty"));
    REQUIRE_THROWS_WITH(lin.forward(ConstView2<float>(x.data(), {4, 9}), yv),
                        Contains("PackedLinear::forward: argument 'x': expected 10 columns (in_features), got shape [4, 9]"));
    REQUIRE_THROWS_WITH(lin.forward(xv, View2<float>(y.data(), {4, 7})),
                        Contains("PackedLinear::forward: argument 'y': expected 6 columns (out_features), got shape [4, 7]"));
    REQUIRE_THROWS_WITH(lin.forward(xv, View2<float>(y.data(), {3, 6})),
                        Contains("PackedLinear::forward: argument 'y': token count 3 does not match x's 4"));
    REQUIRE_THROWS_WITH(lin.forward(ConstView2<float>(x.data(), {4, 10}, {20, 2}), yv),
                        Contains("PackedLinear::forward: argument 'x': the last dimension must be contiguous"));
    REQUIRE_THROWS_WITH(lin.forward(xv, View2<float>(y.data(), {4, 6}, {12, 2})),
                        Contains("PackedLinear::forward: argument 'y': the last dimension must be contiguous"));
    REQUIRE_THROWS_WITH(lin.forward(ConstView2<float>(nullptr, {4, 10}), yv),
                        Contains("PackedLinear::forward: argument 'x': null data pointer"));
    REQUIRE_THROWS_WITH(lin.forward(xv, View2<float>(nullptr, {4, 6})),
                        Contains("PackedLinear::forward: argument 'y': null data pointer"));
    REQUIRE_THROWS_WITH(lin.forward(ConstView2<float>(x.data(), {4, 10}, {-10, 1}), yv),
                        Contains("PackedLinear::forward: argument 'x': negative row stride"));
    REQUIRE_THROWS_WITH(lin.forward(xv, View2<float>(y.data(), {4, 6}, {5, 1})),
                        Contains("PackedLinear::forward: argument 'y': row stride 5 is smaller than out_features 6"));
    REQUIRE_THROWS_WITH(lin.forward(xv, View2<float>(x.data() + 30, {4, 6})),
                        Contains("PackedLinear::forward: argument 'y': overlaps x"));
  }

  SECTION("row") {
    const PackedLinear lin = PackedLinear::pack(wf.data(), 6, 10, 10);
    std::vector<float> dst(10);
    REQUIRE_THROWS_WITH(lin.row(6, dst.data()), Contains("PackedLinear::row: argument 'o': row 6 out of range [0, 6)"));
    REQUIRE_THROWS_WITH(lin.row(-1, dst.data()), Contains("PackedLinear::row: argument 'o': row -1 out of range"));
    REQUIRE_THROWS_WITH(lin.row(0, nullptr), Contains("PackedLinear::row: argument 'dst': null pointer"));
    REQUIRE_THROWS_WITH(PackedLinear().row(0, dst.data()),
                        Contains("PackedLinear::row: argument 'this': the layer is empty"));
  }
}

// ---- q8 weights --------------------------------------------------------------------------------

namespace {

// The format's scale rule, restated: amax / 127 rounded up to a bf16 value.
float q8_scale_for(float amax) {
  std::uint32_t u;
  const float s = amax / 127.f;
  std::memcpy(&u, &s, 4);
  if (u & 0xffffu) u += 0x10000u;
  u &= 0xffff0000u;
  float r;
  std::memcpy(&r, &u, 4);
  return r;
}

// Packs random weights (f32 or bf16 source, NaN row padding) as q8; w = the dequantised stored
// values (row()), checked against the format: every value is q · s with q an integer in
// [-127, 127], s the group's scale, and |w - ŵ| <= s / 2 (half a step: amax / 254, so the
// per-group max error is <= 2^-8 of the group's max up to the bf16 rounding of s, < 2^-8 · 1.008).
Layer make_q8_layer(Rng& rng, std::int64_t N, std::int64_t K, bool bf16_source, float scale = 0.5f) {
  const std::int64_t ldw = K + rng.integer(0, 3);
  std::vector<float> wf(static_cast<std::size_t>(N * ldw), kNaN);
  for (std::int64_t o = 0; o < N; ++o)
    for (std::int64_t k = 0; k < K; ++k) wf[o * ldw + k] = rng.normal(scale);
  Layer L;
  if (bf16_source) {
    std::vector<bf16> wb(wf.size());
    for (std::size_t i = 0; i < wf.size(); ++i) wb[i] = bf16(wf[i]);
    for (std::size_t i = 0; i < wf.size(); ++i) wf[i] = to_float(wb[i]);
    L.lin = PackedLinear::pack_q8(wb.data(), N, K, ldw);
  } else {
    L.lin = PackedLinear::pack_q8(wf.data(), N, K, ldw);
  }
  L.w.resize(static_cast<std::size_t>(N * K));
  for (std::int64_t o = 0; o < N; ++o) L.lin.row(o, L.w.data() + o * K);
  for (std::int64_t o = 0; o < N; ++o)
    for (std::int64_t k0 = 0; k0 < K; k0 += 32) {
      float amax = 0.f;
      for (std::int64_t k = k0; k < std::min(K, k0 + 32); ++k) amax = std::max(amax, std::fabs(wf[o * ldw + k]));
      const float s = q8_scale_for(amax);
      double sq = 0;
      std::int64_t n = 0;
      for (std::int64_t k = k0; k < std::min(K, k0 + 32); ++k, ++n) sq += std::pow(L.w[o * K + k] - wf[o * ldw + k], 2.0);
      // The group's RMS error is within 2^-8 of its max (uniform rounding error: about amax / 440;
      // a tail group of a few values can sit near the element bound, amax / 254).
      if (n >= 8 && !(std::sqrt(sq / static_cast<double>(n)) <= amax / 256.0))
        FAIL("q8 group [" << o << ", " << k0 << "]: RMS error " << std::sqrt(sq / static_cast<double>(n)) << " > amax / 256");
      for (std::int64_t k = k0; k < std::min(K, k0 + 32); ++k) {
        const float stored = L.w[o * K + k];
        const double q = s > 0.f ? static_cast<double>(stored) / s : 0.0;
        if (!(q == std::nearbyint(q) && std::fabs(q) <= 127.0 && std::fabs(stored - wf[o * ldw + k]) <= 0.5 * s))
          FAIL("q8 value [" << o << ", " << k << "]: stored " << stored << " for " << wf[o * ldw + k] << ", scale " << s);
      }
    }
  return L;
}

// x with each token's groups of 32 quantised as the VNNI path does: round(x · 127 / amax) · amax / 127.
std::vector<float> quantise_activations(const Activations& a) {
  std::vector<float> xq = a.x;
  for (std::int64_t t = 0; t < a.T; ++t)
    for (std::int64_t k0 = 0; k0 < a.K; k0 += 32) {
      float amax = 0.f;
      for (std::int64_t k = k0; k < std::min(a.K, k0 + 32); ++k) amax = std::max(amax, std::fabs(a.x[t * a.ldx + k]));
      for (std::int64_t k = k0; k < std::min(a.K, k0 + 32); ++k) {
        float& v = xq[t * a.ldx + k];
        v = amax > 0.f ? std::nearbyint(v * (127.f / amax)) * (amax / 127.f) : 0.f;
      }
    }
  return xq;
}

}  // namespace

TEST_CASE("PackedLinear q8: quantisation within half a step, forward against the float64 reference", "[linear][q8]") {
  const auto seed = attnkit::test::fresh_seed();
  CAPTURE(seed);
  Rng rng(seed);
  for (const Shape& sh : test_shapes(rng)) {
    for (const bool bf16_source : {false, true}) {
      INFO("T=" << sh.T << " N=" << sh.N << " K=" << sh.K << " source=" << (bf16_source ? "bf16" : "f32"));
      const Layer L = make_q8_layer(rng, sh.N, sh.K, bf16_source);
      REQUIRE(L.lin.format() == LinearFormat::q8);
      const std::int64_t blocks = (sh.N + 15) / 16, kq = (sh.K + 31) / 32;
      CHECK(L.lin.bytes() == static_cast<std::size_t>(blocks * ((kq * 544 + 63) / 64 * 64)));
      const Activations a = make_x(rng, sh.T, sh.K);
      const std::int64_t ypad = rng.integer(0, 3);
      // The reference multiplies the stored (dequantised) weights in float64.
      const auto ref = ref::linear(a.x.data(), a.ldx, L.w.data(), sh.K, sh.T, sh.N, sh.K);
      for (const bool amx : {true, false}) {
        INFO("AMX allowed: " << amx);
        const AmxSwitch sw(amx);
        // exact: the int8 weights widened exactly, f32 activations: rel L2 <= 1e-5.
        const Result ex = run(L.lin, a, {Precision::exact, 0, false}, ypad);
        CHECK(ex.padding_untouched);
        CHECK(attnkit::test::rel_l2(ex.dense, ref) <= 1e-5);
        // fast: decode (<= 8 tokens) quantises the activations per group too: rel L2 <= 1e-5
        // against the reference with those activations (and <= 2e-2 against the f32 ones);
        // prefill on AMX rounds x and q·s to bf16 (<= 1e-2); on FMA it equals exact (<= 1e-5).
        const Result fa = run(L.lin, a, {Precision::fast, 0, false}, ypad);
        CHECK(fa.padding_untouched);
        const bool amx_prefill = sh.T > 8 && detail::linear::amx_available();
#if defined(ATTNKIT_LINEAR_VNNI)
        if (sh.T <= 8) {
          const auto xq = quantise_activations(a);
          const auto ref_q = ref::linear(xq.data(), a.ldx, L.w.data(), sh.K, sh.T, sh.N, sh.K);
          CHECK(attnkit::test::rel_l2(fa.dense, ref_q) <= 1e-5);
          CHECK(attnkit::test::rel_l2(fa.dense, ref) <= 2e-2);
          continue;
        }
#endif
        CHECK(attnkit::test::rel_l2(fa.dense, ref) <= (amx_prefill ? 1e-2 : 1e-5));
      }
    }
  }
}

TEST_CASE("PackedLinear q8: accumulate, thread counts, tiny and extreme groups, errors", "[linear][q8]") {
  const auto seed = attnkit::test::fresh_seed();
  CAPTURE(seed);
  Rng rng(seed);
  SECTION("accumulate adds to y; 1, 2 and 3 threads give the same bits") {
    const std::vector<Shape> shapes = {{1, 37, 129}, {5, 16, 2}, {23, 70, 300}, {1, 2001, 301}, {4, 999, 257},
                                       {37, 201, 300}, {rng.integer(1, 40), rng.integer(1, 90), rng.integer(1, 400)}};
    for (const Shape& sh : shapes)
      for (Precision prec : {Precision::exact, Precision::fast})
        for (const bool amx : {true, false}) {
          INFO("T=" << sh.T << " N=" << sh.N << " K=" << sh.K << " precision=" << (prec == Precision::exact ? "exact" : "fast")
                    << " AMX allowed: " << amx);
          const AmxSwitch sw(amx);
          const Layer L = make_q8_layer(rng, sh.N, sh.K, true);
          const Activations a = make_x(rng, sh.T, sh.K);
          const std::vector<float> y0 = rng.normal_vec(static_cast<std::size_t>(sh.T * sh.N));
          const auto ref = ref::linear(a.x.data(), a.ldx, L.w.data(), sh.K, sh.T, sh.N, sh.K, y0.data());
          const Result r = run(L.lin, a, {prec, 0, true}, rng.integer(0, 3), &y0);
          CHECK(r.padding_untouched);
          CHECK(attnkit::test::rel_l2(r.dense, ref) <= (prec == Precision::exact ? 1e-5 : 2e-2));
          const Result r1 = run(L.lin, a, {prec, 1, false}, 0), r2 = run(L.lin, a, {prec, 2, false}, 0),
                       r3 = run(L.lin, a, {prec, 3, false}, 0);
          CHECK(attnkit::test::bit_equal(r1.dense, r2.dense));
          CHECK(attnkit::test::bit_equal(r1.dense, r3.dense));
        }
  }
  SECTION("groups of zeros, of tiny and of huge magnitude keep their relative precision") {
    // bf16 scales keep f32's range: a group at 1e-30 or 1e30 is quantised as finely as one at 1.
    for (const float mag : {0.f, 1e-30f, 1e-6f, 1.f, 1e30f}) {
      INFO("magnitude " << mag);
      const Layer L = make_q8_layer(rng, 3, 70, false, mag);  // make_q8_layer checks |w - ŵ| <= s / 2
      if (mag == 0.f)
        for (float v : L.w) CHECK(v == 0.f);
    }
  }
  SECTION("weights the format cannot hold are refused by name") {
    std::vector<float> w(4 * 40, 0.25f);
    w[2 * 40 + 33] = std::numeric_limits<float>::infinity();
    REQUIRE_THROWS_WITH(PackedLinear::pack_q8(w.data(), 4, 40, 40),
                        Catch::Contains("PackedLinear::pack_q8: weight [2, 33] is inf: int8 groups with a finite scale cannot hold it"));
    w[2 * 40 + 33] = kNaN;
    REQUIRE_THROWS_WITH(PackedLinear::pack_q8(w.data(), 4, 40, 40), Catch::Contains("weight [2, 33] is nan"));
    REQUIRE_THROWS_WITH(PackedLinear::pack_q8(static_cast<const float*>(nullptr), 4, 40, 40),
                        Catch::Contains("PackedLinear::pack_q8: argument 'w': null pointer"));
    REQUIRE_THROWS_WITH(PackedLinear::pack_q8(w.data(), 4, 0, 40),
                        Catch::Contains("PackedLinear::pack_q8: argument 'in_features': must be positive, got 0"));
  }
}
