// Linear attention (recurrent/linear_attention.hpp), the causal short conv (short_conv.hpp) and the
// gated RMSNorm (gated_norm.hpp) against the float64 oracles in tests/reference/
// linear_attention_ref.hpp, on fresh random inputs each run (seed printed on failure). Outputs
// start as NaN, so an element a kernel forgets fails (rel_l2 returns +inf on any NaN).
//
// Bounds (relative L2 error):
//  * linear attention vs float64: 5e-6 (float32 sums over up to 600 tokens; measured <= 5e-7);
//  * chunked vs recurrent: 5e-6 (tighter than spec §7.4's 1e-5 target; measured <= 5e-7);
//  * conv and gated norm vs float64: 1e-6 (at most 5 products per output, one rsqrt; measured ~1e-7);
//  * splitting a sequence over calls: bit-identical where the arithmetic is the same (recurrent
//    pieces, chunked pieces on chunk boundaries, the conv in any pieces), else the path bound.
#include <catch2/catch.hpp>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#if defined(_OPENMP)
#include <omp.h>
#endif

#include "attnkit/recurrent/gated_norm.hpp"
#include "attnkit/recurrent/linear_attention.hpp"
#include "attnkit/recurrent/short_conv.hpp"
#include "reference/linear_attention_ref.hpp"
#include "test_util.hpp"

using namespace attnkit;
using attnkit::test::rel_l2;
using Catch::Contains;

namespace {

constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();
constexpr double kRefBound = 5e-6;
constexpr double kPathBound = 5e-6;
constexpr double kSmallBound = 1e-6;

#if defined(ATTNKIT_SANITIZED)
constexpr int kCases = 16;
#else
constexpr int kCases = 120;
#endif

// A logical row-major tensor held either contiguously or with padded strides (gaps hold NaN,
// so a kernel that reads them shows up as NaN in its outputs).
template <int Rank>
struct Tensor {
  std::array<std::int64_t, Rank> shape{}, stride{};
  std::vector<float> buf;
  Tensor(std::array<std::int64_t, Rank> shp, bool padded) : shape(shp) {
    std::int64_t s = 1;
    for (int i = Rank - 1; i >= 0; --i) {
      stride[i] = s;
      s = s * shape[i] + (padded && i > 0 ? 3 : 0);  // a few floats of padding after every row
    }
    buf.assign(static_cast<std::size_t>(std::max<std::int64_t>(1, s)), kNaN);
  }
  std::int64_t numel() const {
    std::int64_t n = 1;
    for (auto e : shape) n *= e;
    return n;
  }
  std::int64_t offset(std::int64_t flat) const {  // flat row-major index -> buffer offset
    std::int64_t off = 0;
    for (int i = Rank - 1; i >= 0; --i) {
      off += (flat % shape[i]) * stride[i];
      flat /= shape[i];
    }
    return off;
  }
  void set(const std::vector<float>& x) {
    for (std::int64_t i = 0; i < numel(); ++i) buf[offset(i)] = x[i];
  }
  std::vector<float> get() const {
    std::vector<float> x(static_cast<std::size_t>(numel()));
    for (std::int64_t i = 0; i < numel(); ++i) x[i] = buf[offset(i)];
    return x;
  }
  void poison() { std::fill(buf.begin(), buf.end(), kNaN); }
  View<float, Rank> view() { return View<float, Rank>(buf.data(), shape, stride); }
  View<const float, Rank> cview() const { return View<const float, Rank>(buf.data(), shape, stride); }
};

// test::bit_equal, but empty vectors (z without normalisation, the state of a K = 1 conv) are
// fine: memcmp must not see their null data pointers (UBSan).
bool same_bits(const std::vector<float>& a, const std::vector<float>& b) {
  return a.size() == b.size() && (a.empty() || std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0);
}

const char* map_name(LinearFeatureMap m) {
  switch (m) {
    case LinearFeatureMap::identity: return "identity";
    case LinearFeatureMap::elu: return "elu";
    case LinearFeatureMap::relu: return "relu";
  }
  return "?";
}

// ---- linear attention --------------------------------------------------------------------------

struct LaCase {
  std::int64_t T, Hq, Hk, Hv, dk, dv;
  LinearAttentionOptions opt;
  bool padded;
  std::vector<float> q, k, v, state0, z0;
  std::int64_t H() const { return std::max({Hq, Hk, Hv}); }
};

// Inputs for the case's shape and options. Normalising (or norm_q/k) divides by sums of
// features: for the identity map the inputs are kept positive, as elu+1 and relu features are,
// so the division is well conditioned (the output is a convex combination of values).
void fill_inputs(LaCase& c, test::Rng& rng) {
  const bool positive =
      c.opt.feature_map == LinearFeatureMap::identity && (c.opt.normalize || c.opt.norm_q || c.opt.norm_k);
  auto input = [&](std::int64_t n) {
    std::vector<float> x(static_cast<std::size_t>(n));
    for (auto& e : x) e = positive ? rng.uniform(0.05f, 1.f) : rng.normal();
    return x;
  };
  c.q = input(c.T * c.Hq * c.dk);
  c.k = input(c.T * c.Hk * c.dk);
  c.v = rng.normal_vec(static_cast<std::size_t>(c.T * c.Hv * c.dv));
  c.state0.assign(static_cast<std::size_t>(c.H() * c.dk * c.dv), 0.f);
  if (rng.integer(0, 2) != 0) c.state0 = rng.normal_vec(c.state0.size(), 0.5f);
  c.z0.clear();
  if (c.opt.normalize) {  // a state that some earlier (non-negative) features could have left
    c.z0.assign(static_cast<std::size_t>(c.H() * c.dk), 0.f);
    for (auto& e : c.z0) e = rng.uniform(0.5f, 3.f);
  }
}

// Random shapes with tails: odd head dims, T around chunk multiples, all head layouts.
LaCase random_la_case(test::Rng& rng, int i) {
  LaCase c{};
  const std::int64_t chunks[] = {1, 3, 16, 64, 37};
  c.opt.chunk = chunks[rng.integer(0, 4)];
  switch (rng.integer(0, 3)) {
    case 0: c.T = rng.integer(0, 3); break;
    case 1: c.T = c.opt.chunk * rng.integer(1, 3) + rng.integer(-1, 1); break;
    default: c.T = rng.integer(4, 300 / (c.opt.chunk == 1 ? 3 : 1)); break;
  }
  c.T = std::max<std::int64_t>(c.T, 0);
  const std::int64_t dims[] = {1, 5, 8, 17, 32, 64};
  c.dk = dims[rng.integer(0, 5)];
  c.dv = rng.integer(0, 2) ? dims[rng.integer(0, 5)] : rng.integer(1, 70);
  const std::int64_t base = rng.integer(1, 3), G = rng.integer(1, 3);
  switch (rng.integer(0, 3)) {
    case 0: c.Hq = c.Hk = c.Hv = base; break;                  // multi-head
    case 1: c.Hq = base * G, c.Hk = c.Hv = base; break;        // fla GQA: k, v shared
    case 2: c.Hq = c.Hk = base, c.Hv = base * G; break;        // GVA: q, k shared
    default: c.Hq = base * G, c.Hk = base, c.Hv = base * G; break;
  }
  c.opt.feature_map = static_cast<LinearFeatureMap>(i % 3);
  c.opt.normalize = (i / 3) % 2 == 1;
  c.opt.norm_q = rng.integer(0, 3) == 0;
  c.opt.norm_k = rng.integer(0, 3) == 0;
  if (rng.integer(0, 3) == 0) c.opt.scale = rng.uniform(0.05f, 1.f);
  c.padded = rng.integer(0, 1) == 1;
  fill_inputs(c, rng);
  return c;
}

struct LaResult {
  std::vector<float> out, state, z;
};

// Runs the kernel on token range [t0, t1) of the case, continuing `state` / `z` (in/out).
LaResult run_la(const LaCase& c, LinearAttentionMode mode, int threads, std::int64_t t0, std::int64_t t1,
                const std::vector<float>& state, const std::vector<float>& z) {
  const std::int64_t n = t1 - t0, H = c.H();
  Tensor<3> q({n, c.Hq, c.dk}, c.padded), k({n, c.Hk, c.dk}, c.padded), v({n, c.Hv, c.dv}, c.padded);
  auto sub = [&](const std::vector<float>& x, std::int64_t row) {
    return std::vector<float>(x.begin() + t0 * row, x.begin() + t1 * row);
  };
  q.set(sub(c.q, c.Hq * c.dk));
  k.set(sub(c.k, c.Hk * c.dk));
  v.set(sub(c.v, c.Hv * c.dv));
  Tensor<3> out({n, H, c.dv}, c.padded), st({H, c.dk, c.dv}, c.padded);
  st.set(state);
  Tensor<2> zt({H, c.dk}, c.padded);
  if (c.opt.normalize) zt.set(z);
  LinearAttentionOptions opt = c.opt;
  opt.mode = mode;
  opt.num_threads = threads;
  linear_attention(q.cview(), k.cview(), v.cview(), st.view(), c.opt.normalize ? zt.view() : View2<float>{},
                   out.view(), opt);
  return {out.get(), st.get(), c.opt.normalize ? zt.get() : std::vector<float>{}};
}

LaResult run_la(const LaCase& c, LinearAttentionMode mode, int threads = 2) {
  return run_la(c, mode, threads, 0, c.T, c.state0, c.z0);
}

}  // namespace

TEST_CASE("linear_attention: both paths match the float64 reference", "[linear_attention]") {
  const auto seed = test::fresh_seed();
  CAPTURE(seed);
  test::Rng rng(seed);
  for (int i = 0; i < kCases; ++i) {
    const LaCase c = random_la_case(rng, i);
    CAPTURE(i, c.T, c.Hq, c.Hk, c.Hv, c.dk, c.dv, c.opt.chunk, map_name(c.opt.feature_map), c.opt.normalize,
            c.opt.norm_q, c.opt.norm_k, c.opt.scale, c.padded);
    const auto ref = test::reference_linear_attention(c.q, c.k, c.v, c.T, c.Hq, c.Hk, c.Hv, c.dk, c.dv, c.opt,
                                                      c.state0, c.z0);
    // The state sums k_t v_tᵀ terms of both signs; where they cancel, f32 rounding is relative to
    // the terms, not to their sum (a 1 x 1 state over 83 tokens drew 1.1e-5 against its small
    // sum). So its error is taken relative to the same state over |k|, |v| and |state0|, which
    // bounds each of its entries from above for all three feature maps (φ(|k|) >= |φ(k)|).
    const auto abs_of = [](std::vector<float> x) {
      for (auto& e : x) e = std::fabs(e);
      return x;
    };
    const auto scale = test::reference_linear_attention(c.q, abs_of(c.k), abs_of(c.v), c.T, c.Hq, c.Hk, c.Hv, c.dk,
                                                        c.dv, c.opt, abs_of(c.state0), c.z0);
    const auto state_err = [&](const std::vector<float>& got, const std::vector<double>& want) {
      return test::err_vs_magnitude(got, want, scale.state);
    };
    const LaResult rec = run_la(c, LinearAttentionMode::recurrent);
    const LaResult chk = run_la(c, LinearAttentionMode::chunked);
    CHECK(rel_l2(rec.out, ref.out) <= kRefBound);
    CHECK(rel_l2(chk.out, ref.out) <= kRefBound);
    CHECK(state_err(rec.state, ref.state) <= kRefBound);
    CHECK(state_err(chk.state, ref.state) <= kRefBound);
    CHECK(rel_l2(rec.z, ref.z) <= kRefBound);
    CHECK(rel_l2(chk.z, ref.z) <= kRefBound);
    std::vector<double> rec_out(rec.out.begin(), rec.out.end()), rec_state(rec.state.begin(), rec.state.end());
    CHECK(rel_l2(chk.out, rec_out) <= kPathBound);
    CHECK(state_err(chk.state, rec_state) <= kPathBound);
    // automatic takes the recurrent path up to recurrent_max_tokens, else the chunked one
    const LaResult aut = run_la(c, LinearAttentionMode::automatic);
    const LaResult& expect = c.T <= c.opt.recurrent_max_tokens ? rec : chk;
    CHECK(same_bits(aut.out, expect.out));
    CHECK(same_bits(aut.state, expect.state));
  }
}

TEST_CASE("linear_attention: every feature map, normalisation on and off, on one shape", "[linear_attention]") {
  const auto seed = test::fresh_seed();
  CAPTURE(seed);
  test::Rng rng(seed);
  for (int i = 0; i < 12; ++i) {  // 3 maps x normalise off/on, twice
    LaCase c = random_la_case(rng, i);
    c.T = 130;  // two chunks of 64 and a tail of 2
    c.opt.chunk = 64;
    c.Hq = 4, c.Hk = 2, c.Hv = 2, c.dk = 24, c.dv = 40;
    fill_inputs(c, rng);
    CAPTURE(i, map_name(c.opt.feature_map), c.opt.normalize, c.opt.norm_q, c.opt.norm_k);
    const auto ref = test::reference_linear_attention(c.q, c.k, c.v, c.T, c.Hq, c.Hk, c.Hv, c.dk, c.dv, c.opt,
                                                      c.state0, c.z0);
    for (auto mode : {LinearAttentionMode::recurrent, LinearAttentionMode::chunked}) {
      CAPTURE(static_cast<int>(mode));
      const LaResult r = run_la(c, mode);
      CHECK(rel_l2(r.out, ref.out) <= kRefBound);
      CHECK(rel_l2(r.state, ref.state) <= kRefBound);
      if (c.opt.normalize) CHECK(rel_l2(r.z, ref.z) <= kRefBound);
    }
  }
}

TEST_CASE("linear_attention: the state carries a sequence across calls", "[linear_attention]") {
  const auto seed = test::fresh_seed();
  CAPTURE(seed);
  test::Rng rng(seed);
  for (int i = 0; i < kCases / 4; ++i) {
    LaCase c = random_la_case(rng, i);
    if (c.T < 2) continue;
    CAPTURE(i, c.T, c.Hq, c.Hk, c.Hv, c.dk, c.dv, c.opt.chunk, map_name(c.opt.feature_map), c.opt.normalize);
    const LaResult one_rec = run_la(c, LinearAttentionMode::recurrent);
    const LaResult one_chk = run_la(c, LinearAttentionMode::chunked);
    // Pieces: token-by-token decode (recurrent) equals one recurrent call bit for bit.
    {
      LaResult acc{{}, c.state0, c.z0};
      for (std::int64_t t = 0; t < c.T; ++t) {
        const LaResult r = run_la(c, LinearAttentionMode::recurrent, 2, t, t + 1, acc.state, acc.z);
        acc.out.insert(acc.out.end(), r.out.begin(), r.out.end());
        acc.state = r.state, acc.z = r.z;
      }
      CHECK(same_bits(acc.out, one_rec.out));
      CHECK(same_bits(acc.state, one_rec.state));
      CHECK(same_bits(acc.z, one_rec.z));
    }
    // Chunked pieces cut on chunk boundaries equal one chunked call bit for bit.
    {
      LaResult acc{{}, c.state0, c.z0};
      for (std::int64_t t0 = 0; t0 < c.T;) {
        const std::int64_t t1 = std::min(c.T, t0 + c.opt.chunk * rng.integer(1, 2));
        const LaResult r = run_la(c, LinearAttentionMode::chunked, 2, t0, t1, acc.state, acc.z);
        acc.out.insert(acc.out.end(), r.out.begin(), r.out.end());
        acc.state = r.state, acc.z = r.z;
        t0 = t1;
      }
      CHECK(same_bits(acc.out, one_chk.out));
      CHECK(same_bits(acc.state, one_chk.state));
    }
    // Random pieces in random modes (prefill chunks, then decode steps) agree within the path bound.
    {
      LaResult acc{{}, c.state0, c.z0};
      for (std::int64_t t0 = 0; t0 < c.T;) {
        const std::int64_t t1 = std::min(c.T, t0 + rng.integer(1, 90));
        const auto mode = rng.integer(0, 1) ? LinearAttentionMode::chunked : LinearAttentionMode::recurrent;
        const LaResult r = run_la(c, mode, 2, t0, t1, acc.state, acc.z);
        acc.out.insert(acc.out.end(), r.out.begin(), r.out.end());
        acc.state = r.state, acc.z = r.z;
        t0 = t1;
      }
      const std::vector<double> o(one_rec.out.begin(), one_rec.out.end()), s(one_rec.state.begin(), one_rec.state.end());
      CHECK(rel_l2(acc.out, o) <= kPathBound);
      CHECK(rel_l2(acc.state, s) <= kPathBound);
    }
  }
}

TEST_CASE("linear_attention: 1 and 2 threads give identical bits", "[linear_attention][threads]") {
  const auto seed = test::fresh_seed();
  CAPTURE(seed);
  test::Rng rng(seed);
  for (int i = 0; i < 6; ++i) {
    LaCase c = random_la_case(rng, i);
    // Large enough that Eigen would thread its GEMMs (rows·cols·depth >> 50000) if let; with
    // chunk 512 (the depth of K^T V) Eigen's threaded GEMM blocks differently and rounds
    // differently from its serial one, so this case fails unless the kernel keeps Eigen serial.
    if (i % 2 == 0) c.T = 200, c.Hq = c.Hk = c.Hv = 3, c.dk = 64, c.dv = 96, c.opt.chunk = 64;
    else c.T = 600, c.Hq = c.Hk = c.Hv = 2, c.dk = 32, c.dv = 48, c.opt.chunk = 512;
    c.opt.norm_q = c.opt.norm_k = false;
    fill_inputs(c, rng);
    for (bool force_eigen_threads : {false, true}) {
      CAPTURE(i, map_name(c.opt.feature_map), c.opt.normalize, force_eigen_threads);
      // A program may force Eigen's own threading; the kernel then uses lazy products.
      if (force_eigen_threads) Eigen::setNbThreads(2);
      for (auto mode : {LinearAttentionMode::recurrent, LinearAttentionMode::chunked}) {
#if defined(_OPENMP)
        const int before = omp_get_max_threads();
#endif
        const LaResult a = run_la(c, mode, 1), b = run_la(c, mode, 2), d = run_la(c, mode, 3);
#if defined(_OPENMP)
        CHECK(omp_get_max_threads() == before);  // the OpenMP setting is restored after the call
#endif
        CHECK(same_bits(a.out, b.out));
        CHECK(same_bits(a.state, b.state));
        CHECK(same_bits(a.z, b.z));
        CHECK(same_bits(a.out, d.out));
        const auto ref = test::reference_linear_attention(c.q, c.k, c.v, c.T, c.Hq, c.Hk, c.Hv, c.dk, c.dv, c.opt,
                                                          c.state0, c.z0);
        CHECK(rel_l2(a.out, ref.out) <= kRefBound);
      }
      Eigen::setNbThreads(0);  // back to OpenMP's default
    }
  }
}

TEST_CASE("linear_attention: validation errors name the argument", "[linear_attention][errors]") {
  std::vector<float> buf(4096, 0.f);
  float* p = buf.data();
  const std::int64_t T = 5, H = 2, dk = 4, dv = 3;
  ConstView3<float> q(p, {T, H, dk}), k(p, {T, H, dk}), v(p, {T, H, dv});
  View3<float> st(p + 1000, {H, dk, dv}), out(p + 2000, {T, H, dv});
  View2<float> z(p + 3000, {H, dk});
  LinearAttentionOptions norm;
  norm.normalize = true;
  const char* fn = "linear_attention";
  REQUIRE_NOTHROW(linear_attention(q, k, v, st, {}, out));
  REQUIRE_NOTHROW(linear_attention(q, k, v, st, z, out, norm));
  REQUIRE_THROWS_WITH(linear_attention(ConstView3<float>(nullptr, {T, H, dk}), k, v, st, {}, out),
                      Contains(fn) && Contains("'q': null data pointer"));
  REQUIRE_THROWS_WITH(linear_attention(q, ConstView3<float>(p, {T, H, dk}, {H * dk, dk, 2}), v, st, {}, out),
                      Contains("'k': the last dimension must be contiguous"));
  REQUIRE_THROWS_WITH(linear_attention(q, ConstView3<float>(p, {T + 1, H, dk}), v, st, {}, out),
                      Contains("'k': 6 tokens, q has 5"));
  REQUIRE_THROWS_WITH(linear_attention(q, k, ConstView3<float>(p, {T - 1, H, dv}), st, {}, out),
                      Contains("'v': 4 tokens"));
  REQUIRE_THROWS_WITH(linear_attention(q, ConstView3<float>(p, {T, H, dk + 1}), v, st, {}, out),
                      Contains("'k': head dim 5 differs from q's d_k 4"));
  REQUIRE_THROWS_WITH(linear_attention(ConstView3<float>(p, {T, H, 0}), ConstView3<float>(p, {T, H, 0}), v, st, {}, out),
                      Contains("'q': head dim d_k must be positive"));
  REQUIRE_THROWS_WITH(linear_attention(q, k, ConstView3<float>(p, {T, 3, dv}), View3<float>(p + 1000, {6, dk, dv}), {},
                                       View3<float>(p + 2000, {T, 6, dv})),
                      Contains("'q': 2 heads do not divide the 3 output heads"));
  REQUIRE_THROWS_WITH(linear_attention(q, k, v, st, {}, View3<float>(p + 2000, {T, H + 1, dv})),
                      Contains("'out': shape [5, 3, 3], expected [5, 2, 3]"));
  REQUIRE_THROWS_WITH(linear_attention(q, k, v, View3<float>(p + 1000, {H, dv, dk}), {}, out),
                      Contains("'state': shape [2, 3, 4], expected [2, 4, 3]"));
  REQUIRE_THROWS_WITH(linear_attention(q, k, v, st, {}, out, norm), Contains("'z': opt.normalize needs"));
  REQUIRE_THROWS_WITH(linear_attention(q, k, v, st, View2<float>(p + 3000, {H, dk + 1}), out, norm),
                      Contains("'z': shape [2, 5], expected [2, 4]"));
  REQUIRE_THROWS_WITH(linear_attention(q, k, v, st, z, out), Contains("'z': given, but opt.normalize is off"));
  LinearAttentionOptions bad;
  bad.chunk = 0;
  REQUIRE_THROWS_WITH(linear_attention(q, k, v, st, {}, out, bad), Contains(fn) && Contains("'chunk'"));
  bad = {};
  bad.scale = std::numeric_limits<float>::infinity();
  REQUIRE_THROWS_WITH(linear_attention(q, k, v, st, {}, out, bad), Contains("'scale' must be finite"));
  bad = {};
  bad.recurrent_max_tokens = -1;
  REQUIRE_THROWS_WITH(linear_attention(q, k, v, st, {}, out, bad), Contains("'recurrent_max_tokens'"));
}

TEST_CASE("linear_attention: T = 0 leaves the state as it is", "[linear_attention]") {
  std::vector<float> st(2 * 3 * 4, 1.5f), z(2 * 3, 2.5f);
  LinearAttentionOptions opt;
  opt.normalize = true;
  for (auto mode : {LinearAttentionMode::recurrent, LinearAttentionMode::chunked}) {
    opt.mode = mode;
    linear_attention(ConstView3<float>(nullptr, {0, 2, 3}), ConstView3<float>(nullptr, {0, 2, 3}),
                     ConstView3<float>(nullptr, {0, 2, 4}), View3<float>(st.data(), {2, 3, 4}), View2<float>(z.data(), {2, 3}),
                     View3<float>(nullptr, {0, 2, 4}), opt);
    CHECK(std::all_of(st.begin(), st.end(), [](float x) { return x == 1.5f; }));
    CHECK(std::all_of(z.begin(), z.end(), [](float x) { return x == 2.5f; }));
  }
}

// ---- causal_conv1d -------------------------------------------------------------------------------

namespace {

struct ConvCase {
  std::int64_t T, C, K;
  bool silu, padded;
  std::vector<float> x, w, state0;
};

ConvCase random_conv_case(test::Rng& rng, int i) {
  ConvCase c{};
  c.K = 1 + i % 5;
  c.silu = (i / 5) % 2 == 0;
  c.C = rng.integer(0, 3) == 0 ? rng.integer(1, 8) : rng.integer(9, 300);  // blocks of 64 with tails
  switch (rng.integer(0, 3)) {
    case 0: c.T = rng.integer(0, c.K); break;  // shorter than the kernel
    case 1: c.T = rng.integer(1, 20); break;
    default: c.T = rng.integer(21, 400); break;  // T·C crosses the threading threshold
  }
  c.padded = rng.integer(0, 1) == 1;
  c.x = rng.normal_vec(static_cast<std::size_t>(c.T * c.C));
  c.w = rng.normal_vec(static_cast<std::size_t>(c.C * c.K), 0.5f);
  c.state0 = rng.normal_vec(static_cast<std::size_t>((c.K - 1) * c.C));
  if (rng.integer(0, 3) == 0) std::fill(c.state0.begin(), c.state0.end(), 0.f);
  return c;
}

struct ConvResult {
  std::vector<float> y, state;
};

// Token range [t0, t1), continuing `state`; in place (y = x) when asked.
ConvResult run_conv(const ConvCase& c, std::int64_t t0, std::int64_t t1, const std::vector<float>& state, int threads,
                    bool in_place, bool padded) {
  const std::int64_t n = t1 - t0;
  Tensor<2> x({n, c.C}, padded), y({n, c.C}, padded), w({c.C, c.K}, padded), st({c.K - 1, c.C}, padded);
  x.set(std::vector<float>(c.x.begin() + t0 * c.C, c.x.begin() + t1 * c.C));
  w.set(c.w);
  st.set(state);
  ShortConvOptions opt;
  opt.activation = c.silu ? ConvActivation::silu : ConvActivation::none;
  opt.num_threads = threads;
  View2<float> out = in_place ? x.view() : y.view();
  causal_conv1d(x.cview(), w.cview(), st.view(), out, opt);
  return {in_place ? x.get() : y.get(), st.get()};
}

}  // namespace

TEST_CASE("causal_conv1d: matches the float64 reference", "[short_conv]") {
  const auto seed = test::fresh_seed();
  CAPTURE(seed);
  test::Rng rng(seed);
  for (int i = 0; i < kCases; ++i) {
    const ConvCase c = random_conv_case(rng, i);
    CAPTURE(i, c.T, c.C, c.K, c.silu, c.padded);
    const auto ref = test::reference_short_conv(c.x, c.w, c.state0, c.T, c.C, c.K, c.silu);
    const ConvResult r = run_conv(c, 0, c.T, c.state0, 2, false, c.padded);
    CHECK(rel_l2(r.y, ref.y) <= kSmallBound);
    CHECK(rel_l2(r.state, ref.state) == 0.0);  // the state is a copy of inputs
    // y may alias x: the same bits
    const ConvResult a = run_conv(c, 0, c.T, c.state0, 2, true, c.padded);
    CHECK(same_bits(a.y, r.y));
    CHECK(same_bits(a.state, r.state));
    // 1 and 2 threads: the same bits
    const ConvResult one = run_conv(c, 0, c.T, c.state0, 1, false, c.padded);
    CHECK(same_bits(one.y, r.y));
    CHECK(same_bits(one.state, r.state));
  }
}

TEST_CASE("causal_conv1d: prefill in chunks and token-by-token decode equal one call exactly", "[short_conv]") {
  const auto seed = test::fresh_seed();
  CAPTURE(seed);
  test::Rng rng(seed);
  for (int i = 0; i < kCases / 2; ++i) {
    const ConvCase c = random_conv_case(rng, i);
    CAPTURE(i, c.T, c.C, c.K, c.silu);
    const ConvResult one = run_conv(c, 0, c.T, c.state0, 2, false, false);
    for (int way = 0; way < 2; ++way) {  // 0: random chunks (some shorter than K), 1: one token at a time
      CAPTURE(way);
      ConvResult acc{{}, c.state0};
      for (std::int64_t t0 = 0; t0 < c.T;) {
        const std::int64_t t1 = way ? t0 + 1 : std::min(c.T, t0 + rng.integer(1, 40));
        const ConvResult r = run_conv(c, t0, t1, acc.state, 2, rng.integer(0, 1) == 1, rng.integer(0, 1) == 1);
        acc.y.insert(acc.y.end(), r.y.begin(), r.y.end());
        acc.state = r.state;
        t0 = t1;
      }
      CHECK(same_bits(acc.y, one.y));
      CHECK(same_bits(acc.state, one.state));
    }
  }
}

TEST_CASE("causal_conv1d: validation errors name the argument", "[short_conv][errors]") {
  std::vector<float> buf(1024, 0.f);
  float* p = buf.data();
  ConstView2<float> x(p, {6, 4}), w(p, {4, 3});
  View2<float> st(p + 100, {2, 4}), y(p + 200, {6, 4});
  const char* fn = "causal_conv1d";
  REQUIRE_NOTHROW(causal_conv1d(x, w, st, y));
  REQUIRE_NOTHROW(causal_conv1d(x, ConstView2<float>(p, {4, 1}), View2<float>(nullptr, {0, 4}), y));
  REQUIRE_THROWS_WITH(causal_conv1d(ConstView2<float>(nullptr, {6, 4}), w, st, y), Contains(fn) && Contains("'x': null"));
  REQUIRE_THROWS_WITH(causal_conv1d(x, ConstView2<float>(p, {4, 0}), st, y), Contains("'weight': kernel size must be at least 1"));
  REQUIRE_THROWS_WITH(causal_conv1d(x, ConstView2<float>(p, {5, 3}), st, y), Contains("'weight': 5 channels, x has 4"));
  REQUIRE_THROWS_WITH(causal_conv1d(x, w, st, View2<float>(p + 200, {5, 4})), Contains("'y': shape [5, 4] differs from x"));
  REQUIRE_THROWS_WITH(causal_conv1d(x, w, View2<float>(p + 100, {3, 4}), y), Contains("'state': shape [3, 4], expected [2, 4]"));
  REQUIRE_THROWS_WITH(causal_conv1d(x, w, View2<float>(nullptr, {2, 4}), y), Contains("'state': null"));
  REQUIRE_THROWS_WITH(causal_conv1d(x, w, View2<float>(p + 100, {2, 4}, {8, 2}), y),
                      Contains("'state': the last dimension must be contiguous"));
}

// ---- gated_rms_norm ------------------------------------------------------------------------------

TEST_CASE("gated_rms_norm: matches the float64 reference, in place and on any thread count", "[gated_norm]") {
  const auto seed = test::fresh_seed();
  CAPTURE(seed);
  test::Rng rng(seed);
  for (int i = 0; i < kCases / 2; ++i) {
    const std::int64_t T = rng.integer(0, 3) == 0 ? rng.integer(0, 15) : rng.integer(16, 90);
    const std::int64_t H = rng.integer(1, 5), d = rng.integer(0, 1) ? rng.integer(1, 40) : 64 + rng.integer(0, 70);
    const float eps = rng.integer(0, 1) ? 1e-6f : 1e-5f;
    const bool padded = rng.integer(0, 1) == 1;
    CAPTURE(i, T, H, d, eps, padded);
    std::vector<float> xv = rng.normal_vec(static_cast<std::size_t>(T * H * d), 2.f);
    const std::vector<float> zv = rng.normal_vec(xv.size(), 2.f), w = rng.normal_vec(static_cast<std::size_t>(d));
    if (T > 0 && d > 1) std::fill(xv.begin(), xv.begin() + d, 0.f);  // an all-zero row: eps keeps it finite
    const auto ref = test::reference_gated_rms_norm(xv, zv, w, T * H, d, eps);
    Tensor<3> x({T, H, d}, padded), z({T, H, d}, padded), y({T, H, d}, padded);
    x.set(xv);
    z.set(zv);
    gated_rms_norm(x.cview(), z.cview(), w.data(), eps, y.view(), 2);
    const auto out = y.get();
    CHECK(rel_l2(out, ref) <= kSmallBound);
    y.poison();
    gated_rms_norm(x.cview(), z.cview(), w.data(), eps, y.view(), 1);
    CHECK(same_bits(y.get(), out));
    gated_rms_norm(x.cview(), z.cview(), w.data(), eps, x.view(), 2);  // y aliasing x
    CHECK(same_bits(x.get(), out));
  }
}

TEST_CASE("gated_rms_norm: validation errors name the argument", "[gated_norm][errors]") {
  std::vector<float> buf(1024, 0.f);
  float* p = buf.data();
  ConstView3<float> x(p, {3, 2, 4}), z(p + 100, {3, 2, 4});
  View3<float> y(p + 200, {3, 2, 4});
  const char* fn = "gated_rms_norm";
  REQUIRE_NOTHROW(gated_rms_norm(x, z, p, 1e-6f, y));
  REQUIRE_THROWS_WITH(gated_rms_norm(ConstView3<float>(nullptr, {3, 2, 4}), z, p, 1e-6f, y),
                      Contains(fn) && Contains("'x': null"));
  REQUIRE_THROWS_WITH(gated_rms_norm(x, ConstView3<float>(p, {3, 2, 5}), p, 1e-6f, y),
                      Contains("'z': shape [3, 2, 5] differs from x"));
  REQUIRE_THROWS_WITH(gated_rms_norm(x, z, p, 1e-6f, View3<float>(p + 200, {2, 2, 4})), Contains("'y': shape [2, 2, 4]"));
  REQUIRE_THROWS_WITH(gated_rms_norm(x, z, nullptr, 1e-6f, y), Contains("'w': null"));
  REQUIRE_THROWS_WITH(gated_rms_norm(x, z, p, -1.f, y), Contains("'eps': must be non-negative"));
  REQUIRE_THROWS_WITH(gated_rms_norm(x, ConstView3<float>(p, {3, 2, 4}, {8, 4, 2}), p, 1e-6f, y),
                      Contains("'z': the last dimension must be contiguous"));
}
