// Decode attention, merging of attention states, KV caches: against the float64 oracle in
// tests/reference/decode_ref.hpp, on fresh random inputs each run (seed printed on failure).
#include <catch2/catch.hpp>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <limits>
#include <numeric>
#include <set>
#include <vector>

#include "attnkit/attention/decode.hpp"
#include "attnkit/attention/kv_cache.hpp"
#include "attnkit/attention/merge.hpp"
#include "reference/decode_ref.hpp"
#include "test_util.hpp"

using namespace attnkit;
using attnkit::test::rel_l2;
using Catch::Contains;

#if defined(ATTNKIT_DECODE_VNNI)
constexpr bool kVnniBuilt = true;  // Precision::fast quantises the query for int8 keys
#else
constexpr bool kVnniBuilt = false;
#endif

namespace {

// bf16 Precision::fast takes the vdpbf16ps path on any build that has it, whatever the CPU's
// vendor (by default only AMD's, where it pays: decode.hpp's bf16_dot_pays).
const bool kBf16DotForced = (attnkit::detail::decode::bf16_dot_override() = 1, true);

constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

#if defined(ATTNKIT_SANITIZED)
constexpr int kCases = 12;
constexpr std::int64_t kLongT = 700;
#else
constexpr int kCases = 60;
constexpr std::int64_t kLongT = 3000;
#endif

// Rounds through T's storage, so the float copy is exactly what the kernel reads.
template <class T>
std::vector<float> as_stored(std::vector<float> x) {
  if constexpr (std::is_same_v<T, bf16>)
    for (auto& e : x) e = round_to_bf16(e);
  return x;
}

enum class Layout { token_major, head_major, padded };

// Logical K or V [T][H_kv][d] stored as KV in the given layout; view() sees it as [T, H_kv, d].
template <class KV>
struct Stored {
  std::vector<KV> buf;
  std::array<std::int64_t, 3> shape{}, stride{};
  Stored(const std::vector<float>& x, std::int64_t T, std::int64_t Hk, std::int64_t d, Layout layout) : shape{T, Hk, d} {
    switch (layout) {
      case Layout::token_major: stride = {Hk * d, d, 1}; break;
      case Layout::head_major: stride = {d, T * d, 1}; break;
      case Layout::padded: stride = {Hk * (d + 5) + 3, d + 5, 1}; break;
    }
    buf.assign(static_cast<std::size_t>(std::max<std::int64_t>(1, (T + 1) * stride[0] + Hk * stride[1] + d + T * d)),
               KV(kNaN));
    for (std::int64_t t = 0; t < T; ++t)
      for (std::int64_t h = 0; h < Hk; ++h)
        for (std::int64_t e = 0; e < d; ++e) buf[t * stride[0] + h * stride[1] + e] = KV(x[(t * Hk + h) * d + e]);
  }
  ConstView3<KV> view() const { return ConstView3<KV>(buf.data(), shape, stride); }
};

struct Shape {
  std::int64_t T, H, Hk, dk, dv, chunk;
};

Shape random_shape(test::Rng& rng) {
  const std::int64_t dims[] = {16, 24, 64, 128};
  Shape s{};
  s.dk = dims[rng.integer(0, 3)];
  s.dv = rng.integer(0, 2) == 0 ? dims[rng.integer(0, 3)] : s.dk;
  if (rng.integer(0, 5) == 0) s.dv = rng.integer(1, 150);  // odd d_v, tails of every length
  const std::int64_t G = std::int64_t{1} << rng.integer(0, 3);
  s.Hk = rng.integer(1, 3);
  s.H = s.Hk * G;
  switch (rng.integer(0, 4)) {
    case 0: s.T = rng.integer(0, 2); break;
    case 1: s.T = rng.integer(3, 40); break;
    case 2: s.T = rng.integer(100, 700); break;
    case 3: s.T = rng.integer(513, 1600); break;  // several default chunks
    default: s.T = rng.integer(1, 300); break;
  }
  const std::int64_t chunks[] = {0, 0, 1, 7, 32, 33, 100};
  s.chunk = chunks[rng.integer(0, 6)];
  return s;
}

template <class KV>
void check_against_reference(std::uint64_t seed, bool vectorized) {
  CAPTURE(seed, vectorized, type_name<KV>());
  test::Rng rng(seed);
  for (int c = 0; c < kCases; ++c) {
    const Shape s = random_shape(rng);
    const Layout layout = static_cast<Layout>(rng.integer(0, 2));
    CAPTURE(c, s.T, s.H, s.Hk, s.dk, s.dv, s.chunk, static_cast<int>(layout));
    const float qscale = rng.integer(0, 2) == 0 ? 3.f : 1.f;  // sharper softmax now and then
    const auto q = rng.normal_vec(static_cast<std::size_t>(s.H * s.dk), qscale);
    const auto k = as_stored<KV>(rng.normal_vec(static_cast<std::size_t>(s.T * s.Hk * s.dk)));
    const auto v = as_stored<KV>(rng.normal_vec(static_cast<std::size_t>(s.T * s.Hk * s.dv)));
    const Stored<KV> ks(k, s.T, s.Hk, s.dk, layout), vs(v, s.T, s.Hk, s.dv, layout);
    std::vector<float> out(static_cast<std::size_t>(s.H * s.dv)), lse(static_cast<std::size_t>(s.H));
    test::poison(out);
    test::poison(lse);
    DecodeOptions opt;
    opt.kv_chunk = s.chunk;
    const float scale = rng.integer(0, 3) == 0 ? 0.05f : 0.f;
    opt.scale = scale;
    ConstView2<float> qv(q.data(), {s.H, s.dk});
    View2<float> ov(out.data(), {s.H, s.dv});
    View1<float> lv(lse.data(), {s.H});
    if (vectorized) attention_decode<KV>(qv, ks.view(), vs.view(), ov, opt, lv);
    else detail::decode::run<false, KV>(qv, ks.view(), vs.view(), ov, opt, lv);
    const double sc = scale != 0.f ? scale : 1.0 / std::sqrt(static_cast<double>(s.dk));
    const auto ref = test::reference_decode(q, k, v, s.T, s.H, s.Hk, s.dk, s.dv, sc);
    auto v_abs = v;
    for (auto& e : v_abs) e = std::fabs(e);
    const auto mag = test::reference_decode(q, k, v_abs, s.T, s.H, s.Hk, s.dk, s.dv, sc);
    // Bound: error <= 1e-5 of the output's magnitude (test::err_vs_magnitude: attention over |v|;
    // a plain relative error failed once at 3.2e-5 on a d_v = 1 average of 1576 keys that nearly
    // cancelled), widened by sqrt(merges / 256) when more than 256 chunk states are merged in
    // sequence (kv_chunk 1 over 1600 keys measured up to 1.08e-5: each merge rounds once);
    // |lse - ref| <= 1e-5 * max(1, |ref|), -inf exactly when T = 0.
    const std::int64_t merges = s.chunk > 0 ? (s.T + s.chunk - 1) / s.chunk : (s.T + 511) / 512;
    CHECK(test::err_vs_magnitude(out, ref.out, mag.out) <=
          1e-5 * std::max(1.0, std::sqrt(static_cast<double>(merges) / 256.0)));
    for (std::int64_t h = 0; h < s.H; ++h) {
      if (s.T == 0) {
        CHECK(lse[h] == kNegInf);
      } else {
        CHECK(std::isfinite(lse[h]));
        CHECK(std::abs(lse[h] - ref.lse[h]) <= 1e-5 * std::max(1.0, std::abs(ref.lse[h])));
      }
    }
  }
}

}  // namespace

TEST_CASE("decode matches the float64 reference (f32 K/V)", "[decode]") {
  check_against_reference<float>(test::fresh_seed(), true);
}

TEST_CASE("decode matches the float64 reference (bf16 K/V)", "[decode]") {
  check_against_reference<bf16>(test::fresh_seed(), true);
}

// Precision::fast over bf16 K/V (vdpbf16ps on AVX512-BF16 builds; elsewhere it is exact): the
// scaled query and the probabilities rounded to bf16. Errors against attention over |v|
// (test::err_vs_magnitude, as for int8 below). Measured over 46 runs of 60 random cases each
// (2026-12-02, AMD Zen 5): worst 1.6e-3 with unit-normal q, 3.7e-3 with q scaled by 3.
// Bound: 2e-2. lse: each score is off by at most scale · 2^-8 · max|q_h| · ||k||_1 (the
// query's rounding; bf16 keeps 8 significant bits) and the sum of the probabilities by 2^-8 of itself.
void check_bf16_fast_against_reference(std::uint64_t seed) {
  CAPTURE(seed);
  test::Rng rng(seed);
  double worst[2] = {0, 0};
  for (int c = 0; c < kCases; ++c) {
    Shape s = random_shape(rng);
    if (rng.integer(0, 4) == 0) s.dk = rng.integer(129, 300);  // more than one group of 4 pairs
    if (rng.integer(0, 4) == 0) s.dk = rng.integer(1, 40);     // a short pair
    const Layout layout = static_cast<Layout>(rng.integer(0, 2));
    CAPTURE(c, s.T, s.H, s.Hk, s.dk, s.dv, s.chunk, static_cast<int>(layout));
    const float qscale = rng.integer(0, 2) == 0 ? 3.f : 1.f;
    const auto q = rng.normal_vec(static_cast<std::size_t>(s.H * s.dk), qscale);
    const auto k = as_stored<bf16>(rng.normal_vec(static_cast<std::size_t>(s.T * s.Hk * s.dk)));
    const auto v = as_stored<bf16>(rng.normal_vec(static_cast<std::size_t>(s.T * s.Hk * s.dv)));
    const Stored<bf16> ks(k, s.T, s.Hk, s.dk, layout), vs(v, s.T, s.Hk, s.dv, layout);
    std::vector<float> out(static_cast<std::size_t>(s.H * s.dv)), lse(static_cast<std::size_t>(s.H));
    test::poison(out);
    test::poison(lse);
    DecodeOptions opt;
    opt.kv_chunk = s.chunk;
    opt.precision = Precision::fast;
    opt.num_threads = static_cast<int>(rng.integer(1, 3));
    attention_decode<bf16>(ConstView2<float>(q.data(), {s.H, s.dk}), ks.view(), vs.view(),
                           View2<float>(out.data(), {s.H, s.dv}), opt, View1<float>(lse.data(), {s.H}));
    const double sc = 1.0 / std::sqrt(static_cast<double>(s.dk));
    auto v_abs = v;
    for (auto& e : v_abs) e = std::fabs(e);
    const auto ref = test::reference_decode(q, k, v, s.T, s.H, s.Hk, s.dk, s.dv, sc);
    const auto mag = test::reference_decode(q, k, v_abs, s.T, s.H, s.Hk, s.dk, s.dv, sc);
    const double e = test::err_vs_magnitude(out, ref.out, mag.out);
    worst[qscale > 1.f] = std::max(worst[qscale > 1.f], e);
    CHECK(e <= 2e-2);
    for (std::int64_t h = 0; h < s.H; ++h) {
      if (s.T == 0) {
        CHECK(lse[h] == kNegInf);
        continue;
      }
      double qmax = 0, k1 = 0;
      for (std::int64_t e2 = 0; e2 < s.dk; ++e2) qmax = std::max(qmax, std::abs(double(q[h * s.dk + e2])));
      for (std::int64_t t = 0; t < s.T; ++t) {
        double n1 = 0;
        for (std::int64_t e2 = 0; e2 < s.dk; ++e2) n1 += std::abs(double(k[(t * s.Hk + h / (s.H / s.Hk)) * s.dk + e2]));
        k1 = std::max(k1, n1);
      }
      const double bound = sc * std::ldexp(qmax, -8) * k1 + std::ldexp(1.0, -8) + 1e-5 * std::max(1.0, std::abs(ref.lse[h]));
      CHECK(std::abs(lse[h] - ref.lse[h]) <= bound);
    }
  }
  if (std::getenv("ATTNKIT_PRINT_BF16_FAST"))
    std::printf("bf16 decode (fast): worst error vs magnitude %.3g (|q| ~ 1), %.3g (|q| ~ 3)\n", worst[0], worst[1]);
}

TEST_CASE("bf16 decode fast (vdpbf16ps) matches the float64 reference within its bound", "[decode][fast]") {
  check_bf16_fast_against_reference(test::fresh_seed());
}

// int8 K/V: logical [T][H_kv][d] quantised per (token, head) row, the codes in a layout (unused
// bytes -128, which the quantiser never writes) and the scales beside them (unused entries NaN).
struct QuantStored {
  std::vector<std::int8_t> codes;
  std::vector<float> scales, dequant;  // dequant: token-major [T][H_kv][d], codes * scale in f32
  std::array<std::int64_t, 3> shape{}, stride{};
  std::array<std::int64_t, 2> sstride{};
  QuantStored(const std::vector<float>& x, std::int64_t T, std::int64_t Hk, std::int64_t d, Layout layout)
      : shape{T, Hk, d} {
    switch (layout) {
      case Layout::token_major: stride = {Hk * d, d, 1}; sstride = {Hk, 1}; break;
      case Layout::head_major: stride = {d, T * d, 1}; sstride = {1, T}; break;
      case Layout::padded: stride = {Hk * (d + 5) + 3, d + 5, 1}; sstride = {Hk + 3, 1}; break;
    }
    codes.assign(static_cast<std::size_t>(std::max<std::int64_t>(1, (T + 1) * stride[0] + Hk * stride[1] + d + T * d)),
                 std::int8_t{-128});
    scales.assign(static_cast<std::size_t>((T + 1) * (Hk + 3) + 1), kNaN);
    dequant.resize(x.size());
    for (std::int64_t t = 0; t < T; ++t)
      for (std::int64_t h = 0; h < Hk; ++h) {
        float& sc = scales[t * sstride[0] + h * sstride[1]];
        REQUIRE(detail::quant::quantize_row(x.data() + (t * Hk + h) * d, codes.data() + t * stride[0] + h * stride[1],
                                            sc, d));
        for (std::int64_t e = 0; e < d; ++e)
          dequant[(t * Hk + h) * d + e] = static_cast<float>(codes[t * stride[0] + h * stride[1] + e]) * sc;
      }
  }
  QuantView3 view() const {
    return {ConstView3<std::int8_t>(codes.data(), shape, stride),
            ConstView2<float>(scales.data(), {shape[0], shape[1]}, sstride)};
  }
};

// Error of int8 decode against float64 attention over the unquantised K/V, measured against the
// scale of the sums (test::err_vs_magnitude: ||out - ref|| / ||attention over |v|||; a plain
// relative error blows up when an average of random values nearly cancels, and was flaky). Elements
// are off by at most max|row| / 254 (about 0.6% of a unit-normal row's RMS), which moves both the
// scores (q·Δk, more with a larger |q|) and the averaged values. Measured over 234 runs of 60
// random cases each (the shapes below, 2026-11-30): worst 1.1e-2 with unit-normal q (median of
// the per-run worst 6.5e-3), 2.2e-2 with q scaled by 3 (median 1.1e-2).
// Bound: 5e-2 for |q| ~ 1, 8e-2 for |q| ~ 3.
double int8_bound(float qscale) { return qscale > 1.f ? 8e-2 : 5e-2; }

// Precision::fast (int8 keys scored against the query quantised to int8 per head, on VNNI): the
// query's rounding (at most max|q| / 254 an element) moves each score by about
// |q|_max · |k| / (254 · sqrt(3 d)) · scale, and a peaked softmax turns that into a heavy tail.
// Measured as above over 117 runs of 60 random cases: against attention over the dequantised
// K/V worst 1.1e-2 (|q| ~ 1; median of the per-run worst 3.2e-3) and 1.8e-2 (|q| ~ 3; median
// 9.1e-3); against the unquantised K/V worst 1.7e-2 and 3.1e-2.
// Bounds: fast_deq_bound below, and int8_bound + the same allowance.
double fast_deq_bound(float qscale) { return qscale > 1.f ? 5e-2 : 3e-2; }

void check_int8_against_reference(std::uint64_t seed, bool vectorized, Precision precision = Precision::exact) {
  CAPTURE(seed, vectorized, static_cast<int>(precision));
  const bool fast = precision == Precision::fast;
  test::Rng rng(seed);
  double worst[2] = {0, 0}, worst_deq[2] = {0, 0};
  for (int c = 0; c < kCases; ++c) {
    Shape s = random_shape(rng);
    if (rng.integer(0, 4) == 0) s.dk = rng.integer(129, 300);  // more than one group of 8 key slices
    const Layout layout = static_cast<Layout>(rng.integer(0, 2));
    CAPTURE(c, s.T, s.H, s.Hk, s.dk, s.dv, s.chunk, static_cast<int>(layout));
    const float qscale = rng.integer(0, 2) == 0 ? 3.f : 1.f;
    const auto q = rng.normal_vec(static_cast<std::size_t>(s.H * s.dk), qscale);
    auto k = rng.normal_vec(static_cast<std::size_t>(s.T * s.Hk * s.dk));
    auto v = rng.normal_vec(static_cast<std::size_t>(s.T * s.Hk * s.dv));
    if (s.T > 2) {  // a zero row (scale 0) now and then
      const std::int64_t t = rng.integer(0, s.T - 1);
      std::fill(k.begin() + t * s.Hk * s.dk, k.begin() + t * s.Hk * s.dk + s.dk, 0.f);
      std::fill(v.begin() + t * s.Hk * s.dv, v.begin() + t * s.Hk * s.dv + s.dv, 0.f);
    }
    const QuantStored ks(k, s.T, s.Hk, s.dk, layout), vs(v, s.T, s.Hk, s.dv, layout);
    std::vector<float> out(static_cast<std::size_t>(s.H * s.dv)), lse(static_cast<std::size_t>(s.H));
    test::poison(out);
    test::poison(lse);
    DecodeOptions opt;
    opt.kv_chunk = s.chunk;
    opt.precision = precision;
    ConstView2<float> qv(q.data(), {s.H, s.dk});
    View2<float> ov(out.data(), {s.H, s.dv});
    View1<float> lv(lse.data(), {s.H});
    if (vectorized) attention_decode(qv, ks.view(), vs.view(), ov, opt, lv);
    else detail::decode::run_quant<false>(qv, ks.view(), vs.view(), ov, opt, lv);
    const double sc = 1.0 / std::sqrt(static_cast<double>(s.dk));
    // The kernel itself: attention over the dequantised K/V, as tight as f32 K/V (1e-5, widened
    // for long merge chains as above).
    // Errors are measured against attention over |v| (test::err_vs_magnitude): the query's
    // rounding moves the weights, and what that does to Σ p·v scales with the values, not with a
    // near-cancelling output.
    const auto abs_of = [](std::vector<float> x) {
      for (auto& e : x) e = std::fabs(e);
      return x;
    };
    const auto ref_q = test::reference_decode(q, ks.dequant, vs.dequant, s.T, s.H, s.Hk, s.dk, s.dv, sc);
    const auto mag_q = test::reference_decode(q, ks.dequant, abs_of(vs.dequant), s.T, s.H, s.Hk, s.dk, s.dv, sc);
    const std::int64_t merges = s.chunk > 0 ? (s.T + s.chunk - 1) / s.chunk : (s.T + 511) / 512;
    const double e_deq = test::err_vs_magnitude(out, ref_q.out, mag_q.out);
    worst_deq[qscale > 1.f] = std::max(worst_deq[qscale > 1.f], e_deq);
    const bool quantized_q = fast && vectorized && kVnniBuilt;
    CHECK(e_deq <= (quantized_q ? fast_deq_bound(qscale)
                                : 1e-5 * std::max(1.0, std::sqrt(static_cast<double>(merges) / 256.0))));
    for (std::int64_t h = 0; h < s.H; ++h) {
      // fast: each score is off by at most scale · (max|q_h| / 254) · ||k||_1 (the query's
      // rounding), so lse, a log-sum-exp of them, by at most that over the keys.
      double q_err = 0;
      if (quantized_q) {
        double qmax = 0, k1 = 0;
        for (std::int64_t e = 0; e < s.dk; ++e) qmax = std::max(qmax, std::abs(double(q[h * s.dk + e])));
        for (std::int64_t t = 0; t < s.T; ++t) {
          double n1 = 0;
          for (std::int64_t e = 0; e < s.dk; ++e) n1 += std::abs(double(ks.dequant[(t * s.Hk + h / (s.H / s.Hk)) * s.dk + e]));
          k1 = std::max(k1, n1);
        }
        q_err = sc * qmax / 254.0 * k1;
      }
      if (s.T == 0) CHECK(lse[h] == kNegInf);
      else CHECK(std::abs(lse[h] - ref_q.lse[h]) <= 1e-5 * std::max(1.0, std::abs(ref_q.lse[h])) + q_err);
    }
    // The quantisation: against the unquantised K/V.
    if (s.T > 0) {
      const auto ref = test::reference_decode(q, k, v, s.T, s.H, s.Hk, s.dk, s.dv, sc);
      const auto mag = test::reference_decode(q, k, abs_of(v), s.T, s.H, s.Hk, s.dk, s.dv, sc);
      const double e = test::err_vs_magnitude(out, ref.out, mag.out);
      worst[qscale > 1.f] = std::max(worst[qscale > 1.f], e);
      CHECK(e <= int8_bound(qscale) + (quantized_q ? fast_deq_bound(qscale) : 0.0));
    }
  }
  if (std::getenv("ATTNKIT_PRINT_INT8"))
    std::printf("int8 decode%s: worst rel L2 vs unquantised %.3g (|q| ~ 1), %.3g (|q| ~ 3); vs dequantised %.3g, %.3g\n",
                fast ? " (fast)" : "", worst[0], worst[1], worst_deq[0], worst_deq[1]);
}

TEST_CASE("decode matches the float64 reference (int8 K/V)", "[decode][int8]") {
  check_int8_against_reference(test::fresh_seed(), true);
  check_int8_against_reference(test::fresh_seed(), false);
  check_int8_against_reference(test::fresh_seed(), true, Precision::fast);
  check_int8_against_reference(test::fresh_seed(), false, Precision::fast);  // portable: ignores fast
}

// Precision::fast over int8 values takes each block's P·V sums in fp16 on AVX512-FP16 builds
// (decode.hpp, accumulate_block_f16) and on vpdpbusd with 16-bit fixed-point probabilities on
// other VNNI builds (accumulate_block_vnni). With a query that quantises exactly (integer
// multiples of a power of two, the largest ±127), fast scores equal exact ones to f32 rounding,
// so fast against exact isolates that rounding. Measured: fp16 (2026-12-01, 40 runs of 12
// cases) median of the per-run worst 4.3e-4 of the output's magnitude (attention over |v|),
// worst 5.9e-4 (each probability rounded to 11 bits is off by up to 2.4e-4); bound 2e-3.
// Fixed point (2026-12-01, AMD Zen 5, 16 runs) worst 1.9-2.1e-5 (each probability off by up to
// 7.6e-6 of its block's largest); bound 2e-4. A wrong slice, a column permuted or a lost block
// gives errors of order 1.
#if defined(ATTNKIT_DECODE_FP16_PV) || !defined(ATTNKIT_DECODE_VNNI_PV)
constexpr double kFastPvBound = 2e-3;
constexpr const char* kFastPvName = "fp16";
#else
constexpr double kFastPvBound = 2e-4;
constexpr const char* kFastPvName = "fixed-point";
#endif
TEST_CASE("int8 decode fast: the P·V stays within its bound of the exact path", "[decode][int8]") {
  const auto seed = test::fresh_seed();
  CAPTURE(seed);
  test::Rng rng(seed);
  double worst = 0;
  for (int c = 0; c < 12; ++c) {
    const std::int64_t Hk = rng.integer(1, 3), H = Hk * rng.integer(1, 3), T = rng.integer(1, 700);
    const std::int64_t dk = 16 * rng.integer(1, 9), dv = rng.integer(0, 2) ? 128 : rng.integer(1, 300);
    const Layout layout = rng.integer(0, 1) ? Layout::head_major : Layout::token_major;
    CAPTURE(c, T, H, Hk, dk, dv, static_cast<int>(layout));
    std::vector<float> q(static_cast<std::size_t>(H * dk));
    for (std::int64_t h = 0; h < H; ++h)
      for (std::int64_t e = 0; e < dk; ++e)
        q[h * dk + e] = static_cast<float>(e == 0 ? 127 : rng.integer(-127, 127)) * 0.0625f;
    const auto k = rng.normal_vec(static_cast<std::size_t>(T * Hk * dk));
    const auto v = rng.normal_vec(static_cast<std::size_t>(T * Hk * dv));
    const QuantStored ks(k, T, Hk, dk, layout);
    QuantStored vs(v, T, Hk, dv, layout);
    // A caller's value scales may be negative: every fourth case flips some, which sends their
    // blocks to the f32 path (fixed point needs probabilities >= 0).
    if (c % 4 == 3)
      for (std::int64_t t = 0; t < T; t += rng.integer(1, 40))
        for (std::int64_t h = 0; h < Hk; ++h) {
          vs.scales[t * vs.sstride[0] + h * vs.sstride[1]] *= -1.f;
          for (std::int64_t e = 0; e < dv; ++e) vs.dequant[(t * Hk + h) * dv + e] *= -1.f;
        }
    std::vector<float> out[2];
    for (int f = 0; f < 2; ++f) {
      out[f].resize(static_cast<std::size_t>(H * dv));
      test::poison(out[f]);
      DecodeOptions opt;
      opt.precision = f ? Precision::fast : Precision::exact;
      attention_decode(ConstView2<float>(q.data(), {H, dk}), ks.view(), vs.view(), View2<float>(out[f].data(), {H, dv}), opt);
    }
    auto abs_v = vs.dequant;
    for (auto& x : abs_v) x = std::fabs(x);
    const auto mag = test::reference_decode(q, ks.dequant, abs_v, T, H, Hk, dk, dv, 1.0 / std::sqrt(double(dk)));
    const double e = test::err_vs_magnitude(out[1], std::vector<double>(out[0].begin(), out[0].end()), mag.out);
    worst = std::max(worst, e);
    CHECK(e <= kFastPvBound);
  }
  if (std::getenv("ATTNKIT_PRINT_INT8")) std::printf("int8 fast vs exact (%s P·V): worst %.3g\n", kFastPvName, worst);
}

// A NaN in one query head reaches that head's output on every int8 path: the fast path rounds
// the query to 8 bits, which would otherwise turn it into a finite number.
TEST_CASE("int8 decode: a NaN query gives NaN for its head only (exact and fast)", "[decode][int8]") {
  test::Rng rng(test::fresh_seed());
  const std::int64_t T = 77, H = 6, Hk = 3, dk = 72, dv = 40;
  auto q = rng.normal_vec(static_cast<std::size_t>(H * dk));
  const auto k = rng.normal_vec(static_cast<std::size_t>(T * Hk * dk)), v = rng.normal_vec(static_cast<std::size_t>(T * Hk * dv));
  q[3 * dk + 5] = kNaN;  // head 3 (KV head 1, shared with head 2)
  const QuantStored ks(k, T, Hk, dk, Layout::token_major), vs(v, T, Hk, dv, Layout::token_major);
  for (Precision precision : {Precision::exact, Precision::fast}) {
    CAPTURE(static_cast<int>(precision));
    std::vector<float> out(static_cast<std::size_t>(H * dv), 1e30f);  // not NaN: a NaN must come from the kernel
    DecodeOptions opt;
    opt.precision = precision;
    attention_decode(ConstView2<float>(q.data(), {H, dk}), ks.view(), vs.view(), View2<float>(out.data(), {H, dv}), opt);
    for (std::int64_t h = 0; h < H; ++h)
      for (std::int64_t e = 0; e < dv; ++e) {
        CAPTURE(h, e);
        if (h == 3) CHECK(std::isnan(out[h * dv + e]));
        else CHECK(std::abs(out[h * dv + e]) < 1e3f);  // written, and finite
      }
  }
}

TEST_CASE("decode generic (non-AVX-512) path matches the reference", "[decode]") {
  check_against_reference<float>(test::fresh_seed(), false);
  check_against_reference<bf16>(test::fresh_seed(), false);
}

TEST_CASE("decode with no keys gives 0 and lse -inf", "[decode]") {
  const std::vector<float> q(4 * 16, 1.f);
  std::vector<float> out(4 * 8), lse(4);
  test::poison(out);
  test::poison(lse);
  std::vector<float> none(1);
  attention_decode<float>(ConstView2<float>(q.data(), {4, 16}), ConstView3<float>(none.data(), {0, 2, 16}),
                          ConstView3<float>(none.data(), {0, 2, 8}), View2<float>(out.data(), {4, 8}), {},
                          View1<float>(lse.data(), {4}));
  for (float x : out) CHECK(x == 0.f);
  for (float x : lse) CHECK(x == kNegInf);
}

// Qwen3-0.6B shapes, several chunks: the thread count must never change a bit.
template <class KV>
void check_thread_invariance(std::uint64_t seed, Precision precision = Precision::exact) {
  CAPTURE(seed, type_name<KV>(), static_cast<int>(precision));
  test::Rng rng(seed);
  const std::int64_t T = rng.integer(kLongT / 2, kLongT), H = 16, Hk = 8, d = 128;
  CAPTURE(T);
  const auto q = rng.normal_vec(static_cast<std::size_t>(H * d));
  const auto k = as_stored<KV>(rng.normal_vec(static_cast<std::size_t>(T * Hk * d)));
  const auto v = as_stored<KV>(rng.normal_vec(static_cast<std::size_t>(T * Hk * d)));
  const Stored<KV> ks(k, T, Hk, d, Layout::head_major), vs(v, T, Hk, d, Layout::head_major);
  std::vector<std::vector<float>> outs, lses;
  for (int threads : {1, 2, 3, 4}) {
    for (std::int64_t chunk : {std::int64_t{0}, std::int64_t{129}}) {
      std::vector<float> out(static_cast<std::size_t>(H * d)), lse(static_cast<std::size_t>(H));
      test::poison(out);
      test::poison(lse);
      DecodeOptions opt;
      opt.num_threads = threads;
      opt.kv_chunk = chunk;
      opt.precision = precision;
      attention_decode<KV>(ConstView2<float>(q.data(), {H, d}), ks.view(), vs.view(), View2<float>(out.data(), {H, d}),
                           opt, View1<float>(lse.data(), {H}));
      outs.push_back(out);
      lses.push_back(lse);
    }
  }
  // Same chunk size, different thread counts: identical bits (entries alternate chunk 0 / 129).
  for (std::size_t i = 2; i < outs.size(); ++i) {
    CAPTURE(i);
    CHECK(test::bit_equal(outs[i], outs[i % 2]));
    CHECK(test::bit_equal(lses[i], lses[i % 2]));
  }
  const auto ref = test::reference_decode(q, k, v, T, H, Hk, d, d, 1.0 / std::sqrt(128.0));
  const double bound = precision == Precision::fast ? 2e-2 : 1e-5;  // fast: the bound of bf16 fast above
  CHECK(rel_l2(outs[0], ref.out) <= bound);
  CHECK(rel_l2(outs[1], ref.out) <= bound);
}

TEST_CASE("decode is bit-identical for any thread count", "[decode][threads]") {
  check_thread_invariance<float>(test::fresh_seed());
  check_thread_invariance<bf16>(test::fresh_seed());
  check_thread_invariance<bf16>(test::fresh_seed(), Precision::fast);
}

TEST_CASE("int8 decode is bit-identical for any thread count", "[decode][threads][int8]") {
  const auto seed = test::fresh_seed();
  CAPTURE(seed);
  test::Rng rng(seed);
  const std::int64_t T = rng.integer(kLongT / 2, kLongT), H = 16, Hk = 8, d = 128;
  CAPTURE(T);
  const auto q = rng.normal_vec(static_cast<std::size_t>(H * d));
  KVCache<std::int8_t> cache(Hk, d, d);
  const auto k = rng.normal_vec(static_cast<std::size_t>(T * Hk * d)), v = rng.normal_vec(k.size());
  cache.append(ConstView3<float>(k.data(), {T, Hk, d}), ConstView3<float>(v.data(), {T, Hk, d}));
  for (Precision precision : {Precision::exact, Precision::fast}) {
    std::vector<float> first;
    for (int threads : {1, 2, 3, 4}) {
      std::vector<float> out(static_cast<std::size_t>(H * d));
      test::poison(out);
      DecodeOptions opt;
      opt.num_threads = threads;
      opt.kv_chunk = 129;
      opt.precision = precision;
      attention_decode(ConstView2<float>(q.data(), {H, d}), cache.keys(), cache.values(),
                       View2<float>(out.data(), {H, d}), opt);
      if (first.empty()) first = out;
      CAPTURE(threads, static_cast<int>(precision));
      CHECK(test::bit_equal(out, first));
    }
  }
}

TEST_CASE("decode heads sub-range computes the same values and leaves the rest untouched", "[decode]") {
  const auto seed = test::fresh_seed();
  CAPTURE(seed);
  test::Rng rng(seed);
  const std::int64_t T = rng.integer(50, 900), Hk = 3, G = 4, H = Hk * G, dk = 64, dv = 40;
  CAPTURE(T);
  const auto q = rng.normal_vec(static_cast<std::size_t>(H * dk));
  const auto k = rng.normal_vec(static_cast<std::size_t>(T * Hk * dk));
  const auto v = rng.normal_vec(static_cast<std::size_t>(T * Hk * dv));
  const Stored<float> ks(k, T, Hk, dk, Layout::token_major), vs(v, T, Hk, dv, Layout::token_major);
  DecodeOptions opt;
  opt.kv_chunk = 100;
  std::vector<float> full(static_cast<std::size_t>(H * dv)), full_lse(static_cast<std::size_t>(H));
  attention_decode<float>(ConstView2<float>(q.data(), {H, dk}), ks.view(), vs.view(),
                          View2<float>(full.data(), {H, dv}), opt, View1<float>(full_lse.data(), {H}));
  for (int trial = 0; trial < 8; ++trial) {
    const std::int64_t b = rng.integer(0, H), e = rng.integer(b, H);
    CAPTURE(b, e);
    std::vector<float> out(full.size()), lse(full_lse.size());
    test::poison(out);
    test::poison(lse);
    opt.heads = {b, e};
    attention_decode<float>(ConstView2<float>(q.data(), {H, dk}), ks.view(), vs.view(),
                            View2<float>(out.data(), {H, dv}), opt, View1<float>(lse.data(), {H}));
    for (std::int64_t h = 0; h < H; ++h) {
      const bool in = h >= b && h < e;
      CHECK(in == !std::isnan(lse[h]));
      if (in) CHECK(lse[h] == full_lse[h]);
      for (std::int64_t x = 0; x < dv; ++x) {
        if (in) CHECK(out[h * dv + x] == full[h * dv + x]);
        else CHECK(std::isnan(out[h * dv + x]));
      }
    }
  }
}

// Token-major K/V ([T, H_kv, d], a token's heads adjacent) run items of all KV heads block by
// block (chunk_state_heads), head-major ones (KVCache) items of one head: the same arithmetic
// per block, so the same bits, for every type, variant, head range, chunk and thread count.
template <class KV, class Var>
void check_layouts_agree(test::Rng& rng, const Var& var, const std::vector<float>& q, const std::vector<float>& k,
                         const std::vector<float>& v, const Shape& s) {
  const std::int64_t hb = rng.integer(0, s.H - 1), he = rng.integer(hb + 1, s.H);
  CAPTURE(hb, he);
  std::vector<float> outs[3], lses[3];
  int i = 0;
  for (const Layout layout : {Layout::head_major, Layout::token_major, Layout::padded}) {
    std::vector<float>& out = outs[i];
    std::vector<float>& lse = lses[i++];
    out.resize(static_cast<std::size_t>(s.H * s.dv));
    lse.resize(static_cast<std::size_t>(s.H));
    test::poison(out);
    test::poison(lse);
    DecodeOptions opt;
    opt.kv_chunk = s.chunk;
    opt.heads = {hb, he};
    opt.num_threads = static_cast<int>(rng.integer(1, 3));
    ConstView2<float> qv(q.data(), {s.H, s.dk});
    View2<float> ov(out.data(), {s.H, s.dv});
    View1<float> lv(lse.data(), {s.H});
    if constexpr (std::is_same_v<KV, std::int8_t>) {
      for (const Precision precision : {Precision::exact, Precision::fast}) {
        opt.precision = precision;
        const QuantStored ks(k, s.T, s.Hk, s.dk, layout), vs(v, s.T, s.Hk, s.dv, layout);
        std::vector<float> o2(out.size()), l2(lse.size());
        test::poison(o2);
        test::poison(l2);
        attention_decode(qv, ks.view(), vs.view(), precision == Precision::exact ? ov : View2<float>(o2.data(), {s.H, s.dv}),
                         opt, precision == Precision::exact ? lv : View1<float>(l2.data(), {s.H}), var);
        if (precision == Precision::fast) {  // kept after the exact results, compared alike
          out.insert(out.end(), o2.begin(), o2.end());
          lse.insert(lse.end(), l2.begin(), l2.end());
        }
      }
    } else {
      const Stored<KV> ks(k, s.T, s.Hk, s.dk, layout), vs(v, s.T, s.Hk, s.dv, layout);
      attention_decode<KV>(qv, ks.view(), vs.view(), ov, opt, lv, var);
      if constexpr (std::is_same_v<KV, bf16>) {  // fast (vdpbf16ps) alike, kept after the exact results
        opt.precision = Precision::fast;
        std::vector<float> o2(out.size()), l2(lse.size());
        test::poison(o2);
        test::poison(l2);
        attention_decode<KV>(qv, ks.view(), vs.view(), View2<float>(o2.data(), {s.H, s.dv}), opt,
                             View1<float>(l2.data(), {s.H}), var);
        out.insert(out.end(), o2.begin(), o2.end());
        lse.insert(lse.end(), l2.begin(), l2.end());
      }
    }
  }
  for (int l = 1; l < 3; ++l) {
    CAPTURE(l);
    CHECK(test::bit_equal(outs[l], outs[0]));  // NaN-poisoned heads outside the range compare as bits too
    CHECK(test::bit_equal(lses[l], lses[0]));
  }
}

template <class KV>
void check_layouts_agree(std::uint64_t seed) {
  CAPTURE(seed, type_name<KV>());
  test::Rng rng(seed);
  for (int c = 0; c < kCases / 2; ++c) {
    Shape s = random_shape(rng);
    s.Hk = rng.integer(2, 5);  // several KV heads per item
    s.H = s.Hk * rng.integer(1, 3);
    if (rng.integer(0, 3) == 0) s.dk = rng.integer(1, 150);
    const int variant = static_cast<int>(rng.integer(0, 3));
    CAPTURE(c, s.T, s.H, s.Hk, s.dk, s.dv, s.chunk, variant);
    const auto q = rng.normal_vec(static_cast<std::size_t>(s.H * s.dk), 2.f);
    const auto k = as_stored<KV>(rng.normal_vec(static_cast<std::size_t>(s.T * s.Hk * s.dk)));
    const auto v = as_stored<KV>(rng.normal_vec(static_cast<std::size_t>(s.T * s.Hk * s.dv)));
    const auto slopes = rng.normal_vec(static_cast<std::size_t>(s.H), 0.1f), sinks = rng.normal_vec(slopes.size());
    switch (variant) {
      case 0: check_layouts_agree<KV>(rng, PlainAttention{}, q, k, v, s); break;
      case 1: check_layouts_agree<KV>(rng, make_variant(SoftCap{5.f}), q, k, v, s); break;
      case 2: check_layouts_agree<KV>(rng, make_variant(Alibi{slopes.data()}), q, k, v, s); break;
      default: check_layouts_agree<KV>(rng, make_variant(Sinks{sinks.data()}), q, k, v, s); break;
    }
  }
}

TEST_CASE("token-major and head-major K/V give the same bits (f32, bf16, int8)", "[decode][layout]") {
  check_layouts_agree<float>(test::fresh_seed());
  check_layouts_agree<bf16>(test::fresh_seed());
  check_layouts_agree<std::int8_t>(test::fresh_seed());
}

TEST_CASE("decode validation errors", "[decode][errors]") {
  std::vector<float> buf(4096, 0.f);
  float* p = buf.data();
  const ConstView2<float> q(p, {4, 16});
  const ConstView3<float> k(p, {10, 2, 16}), v(p, {10, 2, 8});
  View2<float> out(p + 2000, {4, 8});
  auto run = [&](ConstView2<float> q_, ConstView3<float> k_, ConstView3<float> v_, View2<float> o_,
                 DecodeOptions opt = {}, View1<float> l_ = {}) { attention_decode<float>(q_, k_, v_, o_, opt, l_); };
  REQUIRE_NOTHROW(run(q, k, v, out));
  const char* fn = "attention_decode: ";
  REQUIRE_THROWS_WITH(run(ConstView2<float>(nullptr, {4, 16}), k, v, out), Contains(fn) && Contains("'q': null data pointer"));
  REQUIRE_THROWS_WITH(run(ConstView2<float>(p, {4, 16}, {16, 2}), k, v, out), Contains("'q': the last dimension must be contiguous"));
  REQUIRE_THROWS_WITH(run(q, ConstView3<float>(p, {10, 2, -1}), v, out), Contains("'k': negative extent"));
  REQUIRE_THROWS_WITH(run(q, k, ConstView3<float>(p, {10, 2, 8}, {16, 8, 2}), out), Contains("'v': the last dimension"));
  REQUIRE_THROWS_WITH(run(q, k, v, View2<float>(nullptr, {4, 8})), Contains("'out': null data pointer"));
  REQUIRE_THROWS_WITH(run(ConstView2<float>(p, {4, 0}), ConstView3<float>(p, {10, 2, 0}), v, out),
                      Contains("'q': head dimension d_k must be >= 1"));
  REQUIRE_THROWS_WITH(run(q, ConstView3<float>(p, {10, 0, 16}), ConstView3<float>(p, {10, 0, 8}), out),
                      Contains("'k': number of KV heads H_kv must be >= 1"));
  REQUIRE_THROWS_WITH(run(q, ConstView3<float>(p, {10, 2, 24}), v, out),
                      Contains("'k': head dimension d_k = 24 differs from the query's d_k = 16"));
  REQUIRE_THROWS_WITH(run(q, k, ConstView3<float>(p, {9, 2, 8}), out), Contains("'v': has 9 keys (T_kv) but 'k' has 10"));
  REQUIRE_THROWS_WITH(run(q, k, ConstView3<float>(p, {10, 1, 8}), out), Contains("'v': has 1 KV heads but 'k' has 2"));
  REQUIRE_THROWS_WITH(run(q, k, ConstView3<float>(p, {10, 2, 0}), View2<float>(p + 2000, {4, 0})),
                      Contains("'v': head dimension d_v must be >= 1"));
  REQUIRE_THROWS_WITH(run(ConstView2<float>(p, {3, 16}), k, v, View2<float>(p + 2000, {3, 8})),
                      Contains(fn) && Contains("'q': number of query heads H = 3 is not a multiple of the number of KV heads H_kv = 2"));
  REQUIRE_THROWS_WITH(run(q, k, v, View2<float>(p + 2000, {4, 9})), Contains("'out': shape [4, 9] must be [H, d_v] = [4, 8]"));
  REQUIRE_THROWS_WITH(run(q, k, v, View2<float>(p + 2000, {2, 8})), Contains("'out': shape [2, 8] must be [H, d_v] = [4, 8]"));
  REQUIRE_THROWS_WITH(run(q, k, v, out, {}, View1<float>(p + 3000, {3})), Contains("'lse': shape [3] must be [H] = [4]"));
  REQUIRE_THROWS_WITH(run(q, k, v, out, {}, View1<float>(p + 3000, {4}, {-1})), Contains("'lse': the last dimension"));
  DecodeOptions bad;
  bad.heads = {3, 2};
  REQUIRE_THROWS_WITH(run(q, k, v, out, bad), Contains("'opt.heads': range [3, 2) is not within [0, H = 4]"));
  bad.heads = {0, 5};
  REQUIRE_THROWS_WITH(run(q, k, v, out, bad), Contains("'opt.heads': range [0, 5) is not within"));
  bad.heads = {-1, 2};
  REQUIRE_THROWS_WITH(run(q, k, v, out, bad), Contains("'opt.heads': range [-1, 2)"));
  bad = {};
  bad.kv_chunk = -1;
  REQUIRE_THROWS_WITH(run(q, k, v, out, bad), Contains("'opt.kv_chunk': must be >= 0 (0 = default), got -1"));
  bad = {};
  bad.num_threads = -2;
  REQUIRE_THROWS_WITH(run(q, k, v, out, bad), Contains("'opt.num_threads': must be >= 0 (0 = default), got -2"));
}

// ---- merge -------------------------------------------------------------------------------

namespace {

// Decode of T_q queries (separately) against keys [b, e): o [T_q][H][dv], lse [T_q][H].
struct States {
  std::vector<float> o, lse;
};
States decode_range(const std::vector<float>& qs, std::int64_t Tq, const std::vector<float>& k,
                    const std::vector<float>& v, std::int64_t b, std::int64_t e, std::int64_t H, std::int64_t Hk,
                    std::int64_t dk, std::int64_t dv) {
  States s{std::vector<float>(static_cast<std::size_t>(Tq * H * dv)), std::vector<float>(static_cast<std::size_t>(Tq * H))};
  test::poison(s.o);
  test::poison(s.lse);
  for (std::int64_t t = 0; t < Tq; ++t)
    attention_decode<float>(ConstView2<float>(qs.data() + t * H * dk, {H, dk}),
                            ConstView3<float>(k.data() + b * Hk * dk, {e - b, Hk, dk}),
                            ConstView3<float>(v.data() + b * Hk * dv, {e - b, Hk, dv}),
                            View2<float>(s.o.data() + t * H * dv, {H, dv}), {}, View1<float>(s.lse.data() + t * H, {H}));
  return s;
}

}  // namespace

TEST_CASE("merging the states of two key halves equals attention over all keys", "[merge]") {
  const auto seed = test::fresh_seed();
  CAPTURE(seed);
  test::Rng rng(seed);
  for (int c = 0; c < 10; ++c) {
    const std::int64_t Tq = rng.integer(1, 5), Hk = rng.integer(1, 3), H = Hk * rng.integer(1, 4);
    const std::int64_t dk = rng.integer(1, 80), dv = rng.integer(1, 80), T = rng.integer(2, 600);
    const std::int64_t split = rng.integer(1, T - 1);
    CAPTURE(c, Tq, H, Hk, dk, dv, T, split);
    const auto q = rng.normal_vec(static_cast<std::size_t>(Tq * H * dk));
    const auto k = rng.normal_vec(static_cast<std::size_t>(T * Hk * dk));
    const auto v = rng.normal_vec(static_cast<std::size_t>(T * Hk * dv));
    const States all = decode_range(q, Tq, k, v, 0, T, H, Hk, dk, dv);
    const States a = decode_range(q, Tq, k, v, 0, split, H, Hk, dk, dv);
    const States b = decode_range(q, Tq, k, v, split, T, H, Hk, dk, dv);
    std::vector<float> out(all.o.size()), lse(all.lse.size());
    test::poison(out);
    test::poison(lse);
    merge_states(ConstView3<float>(a.o.data(), {Tq, H, dv}), ConstView2<float>(a.lse.data(), {Tq, H}),
                 ConstView3<float>(b.o.data(), {Tq, H, dv}), ConstView2<float>(b.lse.data(), {Tq, H}),
                 View3<float>(out.data(), {Tq, H, dv}), View2<float>(lse.data(), {Tq, H}));
    // Both sides are f32 sums in different orders, so their difference scales with Σ p·|v|, not
    // with the output: a near-cancelling average (d_v = 1) made a plain relative error of 2.9e-6
    // once. The error is therefore measured against attention over |v| (the sum's own scale).
    std::vector<float> v_abs(v);
    for (auto& x : v_abs) x = std::fabs(x);
    const States mag = decode_range(q, Tq, k, v_abs, 0, T, H, Hk, dk, dv);
    CHECK(test::err_vs_magnitude(out, all.o, mag.o) <= 1e-6);  // bound 1e-6
    CHECK(rel_l2(lse, all.lse) <= 1e-6);

    // Aliasing: out = a (with lse_out = lse_a), then out = b; same bits as the separate output.
    States a2 = a, b2 = b;
    merge_states(ConstView3<float>(a2.o.data(), {Tq, H, dv}), ConstView2<float>(a2.lse.data(), {Tq, H}),
                 ConstView3<float>(b.o.data(), {Tq, H, dv}), ConstView2<float>(b.lse.data(), {Tq, H}),
                 View3<float>(a2.o.data(), {Tq, H, dv}), View2<float>(a2.lse.data(), {Tq, H}));
    CHECK(test::bit_equal(a2.o, out));
    CHECK(test::bit_equal(a2.lse, lse));
    merge_states(ConstView3<float>(a.o.data(), {Tq, H, dv}), ConstView2<float>(a.lse.data(), {Tq, H}),
                 ConstView3<float>(b2.o.data(), {Tq, H, dv}), ConstView2<float>(b2.lse.data(), {Tq, H}),
                 View3<float>(b2.o.data(), {Tq, H, dv}), View2<float>(b2.lse.data(), {Tq, H}));
    CHECK(test::bit_equal(b2.o, out));
    CHECK(test::bit_equal(b2.lse, lse));

    // The row primitive gives the same bits as merge_states.
    States a3 = a;
    for (std::int64_t r = 0; r < Tq * H; ++r)
      merge_state_inplace(a3.o.data() + r * dv, a3.lse[r], b.o.data() + r * dv, b.lse[r], dv);
    CHECK(test::bit_equal(a3.o, out));
    CHECK(test::bit_equal(a3.lse, lse));
  }
}

TEST_CASE("merge with empty key sets (lse -inf)", "[merge]") {
  const std::int64_t d = 21;
  std::vector<float> oa(d), ob(d), out(d);
  for (std::int64_t i = 0; i < d; ++i) {
    oa[i] = 0.5f * static_cast<float>(i);
    ob[i] = -1.f + static_cast<float>(i);
  }
  auto merge = [&](float la, float lb, float& lo) {
    test::poison(out);
    lo = kNaN;
    merge_states(ConstView3<float>(oa.data(), {1, 1, d}), ConstView2<float>(&la, {1, 1}),
                 ConstView3<float>(ob.data(), {1, 1, d}), ConstView2<float>(&lb, {1, 1}),
                 View3<float>(out.data(), {1, 1, d}), View2<float>(&lo, {1, 1}));
  };
  float lo;
  merge(kNegInf, 1.5f, lo);
  CHECK(out == ob);
  CHECK(lo == 1.5f);
  merge(-2.f, kNegInf, lo);
  CHECK(out == oa);
  CHECK(lo == -2.f);
  merge(kNegInf, kNegInf, lo);
  CHECK(std::all_of(out.begin(), out.end(), [](float x) { return x == 0.f; }));
  CHECK(lo == kNegInf);
  // Very different magnitudes: no overflow, the small side's weight underflows to 0.
  merge(1000.f, -1000.f, lo);
  CHECK(out == oa);
  CHECK(lo == 1000.f);
  // Equal lse: the average, lse + log 2.
  merge(3.f, 3.f, lo);
  for (std::int64_t i = 0; i < d; ++i) CHECK(out[i] == Approx(0.5f * (oa[i] + ob[i])).margin(1e-6));
  CHECK(lo == Approx(3.f + std::log(2.f)).epsilon(1e-6));

  // In-place primitive: same rules; no lse_out requested works too.
  std::vector<float> acc(d, kNaN);
  float la = kNegInf;
  merge_state_inplace(acc.data(), la, ob.data(), kNegInf, d);
  CHECK(la == kNegInf);
  CHECK(std::all_of(acc.begin(), acc.end(), [](float x) { return x == 0.f; }));
  merge_state_inplace(acc.data(), la, ob.data(), 0.25f, d);
  CHECK(acc == ob);
  CHECK(la == 0.25f);
  merge_state_inplace(acc.data(), la, oa.data(), kNegInf, d);
  CHECK(acc == ob);
  CHECK(la == 0.25f);
  std::vector<float> out2(d, kNaN);
  float l1 = 0.f, l2 = kNegInf;
  merge_states(ConstView3<float>(oa.data(), {1, 1, d}), ConstView2<float>(&l1, {1, 1}),
               ConstView3<float>(ob.data(), {1, 1, d}), ConstView2<float>(&l2, {1, 1}), View3<float>(out2.data(), {1, 1, d}));
  CHECK(out2 == oa);
}

TEST_CASE("merge_states validation errors", "[merge][errors]") {
  std::vector<float> buf(1024, 0.f);
  float* p = buf.data();
  const ConstView3<float> o(p, {2, 3, 4});
  const ConstView2<float> l(p, {2, 3});
  const View3<float> out(p + 100, {2, 3, 4});
  REQUIRE_NOTHROW(merge_states(o, l, o, l, out, View2<float>(p + 200, {2, 3})));
  REQUIRE_THROWS_WITH(merge_states(ConstView3<float>(nullptr, {2, 3, 4}), l, o, l, out),
                      Contains("merge_states: argument 'o_a': null data pointer"));
  REQUIRE_THROWS_WITH(merge_states(o, l, ConstView3<float>(p, {2, 3, 4}, {12, 4, 2}), l, out),
                      Contains("merge_states: argument 'o_b': the last dimension must be contiguous"));
  REQUIRE_THROWS_WITH(merge_states(o, ConstView2<float>(p, {2, -3}), o, l, out),
                      Contains("merge_states: argument 'lse_a': negative extent"));
  REQUIRE_THROWS_WITH(merge_states(o, l, o, ConstView2<float>(nullptr, {2, 3}), out),
                      Contains("merge_states: argument 'lse_b': null data pointer"));
  REQUIRE_THROWS_WITH(merge_states(o, l, o, l, View3<float>(nullptr, {2, 3, 4})),
                      Contains("merge_states: argument 'out': null data pointer"));
  REQUIRE_THROWS_WITH(merge_states(o, l, ConstView3<float>(p, {2, 3, 5}), l, out),
                      Contains("merge_states: argument 'o_b': shape [2, 3, 5] differs from 'o_a' shape [2, 3, 4]"));
  REQUIRE_THROWS_WITH(merge_states(o, l, o, l, View3<float>(p + 100, {2, 4, 4})),
                      Contains("merge_states: argument 'out': shape [2, 4, 4] differs from 'o_a' shape [2, 3, 4]"));
  REQUIRE_THROWS_WITH(merge_states(o, ConstView2<float>(p, {2, 4}), o, l, out),
                      Contains("merge_states: argument 'lse_a': shape [2, 4] must be [T, H] = [2, 3]"));
  REQUIRE_THROWS_WITH(merge_states(o, l, o, ConstView2<float>(p, {1, 3}), out),
                      Contains("merge_states: argument 'lse_b': shape [1, 3] must be [T, H] = [2, 3]"));
  REQUIRE_THROWS_WITH(merge_states(o, l, o, l, out, View2<float>(p + 200, {3, 3})),
                      Contains("merge_states: argument 'lse_out': shape [3, 3] must be [T, H] = [2, 3]"));
  REQUIRE_THROWS_WITH(merge_states(o, l, o, l, out, View2<float>(p + 200, {2, 3}, {3, 2})),
                      Contains("merge_states: argument 'lse_out': the last dimension must be contiguous"));
}

// ---- KV caches ---------------------------------------------------------------------------

namespace {

template <class T>
bool same_value(T stored, float expected) {
  if constexpr (std::is_same_v<T, bf16>) return stored.bits == bf16::round(expected);
  else return stored == expected;
}

}  // namespace

template <class S>
void check_kv_cache(std::uint64_t seed) {
    CAPTURE(seed, type_name<S>());
  test::Rng rng(seed);
  const std::int64_t Hk = rng.integer(1, 4), dk = rng.integer(1, 70), dv = rng.integer(1, 70);
  CAPTURE(Hk, dk, dv);
  KVCache<S> cache(Hk, dk, dv, rng.integer(0, 40));
  CHECK(cache.size() == 0);
  CHECK(cache.kv_heads() == Hk);
  CHECK(cache.head_dim_k() == dk);
  CHECK(cache.head_dim_v() == dv);
  std::vector<float> all_k, all_v;  // logical content, token-major
  int reallocations = 0;
  for (int step = 0; step < 25; ++step) {
    const std::int64_t n = rng.integer(0, 3) == 0 ? rng.integer(20, 90) : rng.integer(0, 3);
    const auto k = rng.normal_vec(static_cast<std::size_t>(n * Hk * dk));
    const auto v = rng.normal_vec(static_cast<std::size_t>(n * Hk * dv));
    const std::int64_t cap_before = cache.capacity();
    cache.append(ConstView3<float>(k.data(), {n, Hk, dk}), ConstView3<float>(v.data(), {n, Hk, dv}));
    reallocations += cache.capacity() != cap_before;
    all_k.insert(all_k.end(), k.begin(), k.end());
    all_v.insert(all_v.end(), v.begin(), v.end());
    if (step == 12) {  // truncate, drop the same tokens from the logical copy
      const std::int64_t keep = rng.integer(0, cache.size());
      cache.truncate(keep);
      all_k.resize(static_cast<std::size_t>(keep * Hk * dk));
      all_v.resize(static_cast<std::size_t>(keep * Hk * dv));
    }
    const std::int64_t n_tok = cache.size();
    REQUIRE(n_tok * Hk * dk == static_cast<std::int64_t>(all_k.size()));
    const auto kv = cache.keys();
    const auto vv = cache.values();
    CHECK(kv.shape == std::array<std::int64_t, 3>{n_tok, Hk, dk});
    CHECK(kv.stride == std::array<std::int64_t, 3>{dk, cache.capacity() * dk, 1});
    CHECK(vv.stride == std::array<std::int64_t, 3>{dv, cache.capacity() * dv, 1});
    CHECK(reinterpret_cast<std::uintptr_t>(kv.data) % 64 == 0);
    bool ok = true;
    for (std::int64_t t = 0; t < n_tok; ++t)
      for (std::int64_t h = 0; h < Hk; ++h) {
        CHECK(reinterpret_cast<std::uintptr_t>(kv.ptr(0, h)) % 64 == 0);
        for (std::int64_t e = 0; e < dk; ++e) ok &= same_value(kv(t, h, e), all_k[(t * Hk + h) * dk + e]);
        for (std::int64_t e = 0; e < dv; ++e) ok &= same_value(vv(t, h, e), all_v[(t * Hk + h) * dv + e]);
      }
    CHECK(ok);
  }
  CHECK(reallocations >= 1);
  // Decode straight from the cache views equals the reference on the stored values.
  const std::int64_t G = rng.integer(1, 3), H = Hk * G, n_tok = cache.size();
  const auto q = rng.normal_vec(static_cast<std::size_t>(H * dk));
  std::vector<float> out(static_cast<std::size_t>(H * dv));
  test::poison(out);
  attention_decode<S>(ConstView2<float>(q.data(), {H, dk}), cache.keys(), cache.values(),
                      View2<float>(out.data(), {H, dv}));
  const auto ref = test::reference_decode(q, as_stored<S>(all_k), as_stored<S>(all_v), n_tok, H, Hk, dk, dv,
                                          1.0 / std::sqrt(static_cast<double>(dk)));
  CHECK(rel_l2(out, ref.out) <= 1e-5);  // bound 1e-5
  cache.reserve(cache.capacity() + 100);
  CHECK(cache.size() == n_tok);
  cache.clear();
  CHECK(cache.size() == 0);
  CHECK(cache.keys().numel() == 0);
}

TEST_CASE("KVCache round-trips appended content across growth and truncation", "[kv_cache]") {
  check_kv_cache<float>(test::fresh_seed());
  check_kv_cache<bf16>(test::fresh_seed());
}

TEST_CASE("KVCache bf16 rounds to nearest even", "[kv_cache]") {
  // 1 + 2^-8 is halfway between two bf16 values: ties to the even one (1.0); 1 + 3*2^-8 -> up.
  const float vals[] = {1.f + 1.f / 256.f, 1.f + 3.f / 256.f, -1.f - 1.f / 256.f, 1.f + 1.f / 256.f + 1.f / 65536.f};
  const std::uint16_t expect[] = {0x3f80, 0x3f82, 0xbf80, 0x3f81};
  std::vector<float> k(16 * 4, 0.f), v(16, 0.f);  // v sized 16: GCC warns on short buffers
  for (int i = 0; i < 16 * 4; ++i) k[i] = vals[i % 4];
  KVCache<bf16> cache(1, 64, 1);
  cache.append(ConstView3<float>(k.data(), {1, 1, 64}), ConstView3<float>(v.data(), {1, 1, 1}));
  for (int i = 0; i < 64; ++i) CHECK(cache.keys()(0, 0, i).bits == expect[i % 4]);
}

TEST_CASE("KVCache validation errors", "[kv_cache][errors]") {
  REQUIRE_THROWS_WITH(KVCache<float>(0, 8, 8), Contains("KVCache: argument 'kv_heads': must be >= 1, got 0"));
  REQUIRE_THROWS_WITH(KVCache<float>(2, 0, 8), Contains("KVCache: argument 'head_dim_k': must be >= 1, got 0"));
  REQUIRE_THROWS_WITH(KVCache<bf16>(2, 8, -1), Contains("KVCache: argument 'head_dim_v': must be >= 1, got -1"));
  REQUIRE_THROWS_WITH(KVCache<float>(2, 8, 8, -5), Contains("KVCache: argument 'reserve_tokens': must be >= 0, got -5"));
  KVCache<float> c(2, 8, 4);
  std::vector<float> buf(512, 1.f);
  REQUIRE_NOTHROW(c.append(ConstView3<float>(buf.data(), {3, 2, 8}), ConstView3<float>(buf.data(), {3, 2, 4})));
  REQUIRE_THROWS_WITH(c.append(ConstView3<float>(buf.data(), {3, 1, 8}), ConstView3<float>(buf.data(), {3, 2, 4})),
                      Contains("KVCache::append: argument 'k': shape [3, 1, 8] must be [n, H_kv, d_k] = [n, 2, 8]"));
  REQUIRE_THROWS_WITH(c.append(ConstView3<float>(buf.data(), {3, 2, 8}), ConstView3<float>(buf.data(), {3, 2, 5})),
                      Contains("KVCache::append: argument 'v': shape [3, 2, 5] must be [n, H_kv, d_v] = [n, 2, 4]"));
  REQUIRE_THROWS_WITH(c.append(ConstView3<float>(buf.data(), {3, 2, 8}), ConstView3<float>(buf.data(), {2, 2, 4})),
                      Contains("KVCache::append: argument 'v': has 2 tokens but 'k' has 3"));
  REQUIRE_THROWS_WITH(c.append(ConstView3<float>(nullptr, {3, 2, 8}), ConstView3<float>(buf.data(), {3, 2, 4})),
                      Contains("KVCache::append: argument 'k': null data pointer"));
  REQUIRE_THROWS_WITH(c.truncate(4), Contains("KVCache::truncate: argument 'n': must be in [0, size = 3], got 4"));
  REQUIRE_THROWS_WITH(c.truncate(-1), Contains("KVCache::truncate: argument 'n': must be in [0, size = 3], got -1"));
  REQUIRE_THROWS_WITH(c.reserve(-1), Contains("KVCache::reserve: argument 'tokens': must be >= 0, got -1"));
  CHECK(c.size() == 3);
}

template <class T>
void check_ring(std::uint64_t seed) {
  CAPTURE(seed, type_name<T>());
  test::Rng rng(seed);
  const std::int64_t Hk = rng.integer(1, 3), G = rng.integer(1, 4), H = Hk * G, dk = rng.integer(1, 70),
                     dv = rng.integer(1, 70), W = rng.integer(1, 60);
  CAPTURE(Hk, G, dk, dv, W);
  RingKVCache<T> ring(Hk, dk, dv, W);
  CHECK(ring.window() == W);
  CHECK(ring.size() == 0);
  std::vector<float> all_k, all_v;
  while (static_cast<std::int64_t>(all_k.size()) < (3 * W + 5) * Hk * dk) {
    const std::int64_t n = rng.integer(0, 2) == 0 ? rng.integer(W, 2 * W + 3) : rng.integer(0, 4);
    const auto k = rng.normal_vec(static_cast<std::size_t>(n * Hk * dk));
    const auto v = rng.normal_vec(static_cast<std::size_t>(n * Hk * dv));
    ring.append(ConstView3<float>(k.data(), {n, Hk, dk}), ConstView3<float>(v.data(), {n, Hk, dv}));
    all_k.insert(all_k.end(), k.begin(), k.end());
    all_v.insert(all_v.end(), v.begin(), v.end());
    const std::int64_t N = static_cast<std::int64_t>(all_k.size()) / (Hk * dk);
    CAPTURE(N);
    REQUIRE(ring.total() == N);
    REQUIRE(ring.size() == std::min(N, W));
    // Slots hold exactly the last min(N, W) positions, each with its token's content.
    std::set<std::int64_t> positions;
    bool ok = true;
    const auto kv = ring.keys();
    const auto vv = ring.values();
    for (std::int64_t s = 0; s < ring.size(); ++s) {
      const std::int64_t p = ring.position_of_slot(s);
      positions.insert(p);
      ok &= p % W == s;
      for (std::int64_t h = 0; h < Hk; ++h) {
        for (std::int64_t e = 0; e < dk; ++e) ok &= same_value(kv(s, h, e), all_k[(p * Hk + h) * dk + e]);
        for (std::int64_t e = 0; e < dv; ++e) ok &= same_value(vv(s, h, e), all_v[(p * Hk + h) * dv + e]);
      }
    }
    CHECK(ok);
    CHECK(static_cast<std::int64_t>(positions.size()) == ring.size());
    if (!positions.empty()) {
      CHECK(*positions.begin() == N - ring.size());
      CHECK(*positions.rbegin() == N - 1);
    }
    // copy_recent: position order, oldest first.
    const std::int64_t nr = rng.integer(0, ring.size());
    std::vector<T> ck(static_cast<std::size_t>(std::max<std::int64_t>(1, nr * Hk * dk))),
        cv(static_cast<std::size_t>(std::max<std::int64_t>(1, nr * Hk * dv)));
    ring.copy_recent(nr, View3<T>(ck.data(), {nr, Hk, dk}), View3<T>(cv.data(), {nr, Hk, dv}));
    for (std::int64_t r = 0; r < nr; ++r) {
      const std::int64_t p = N - nr + r;
      for (std::int64_t x = 0; x < Hk * dk; ++x) ok &= same_value(ck[r * Hk * dk + x], all_k[p * Hk * dk + x]);
      for (std::int64_t x = 0; x < Hk * dv; ++x) ok &= same_value(cv[r * Hk * dv + x], all_v[p * Hk * dv + x]);
    }
    CHECK(ok);
    // Decode over the ring's slots equals the sliding-window reference for the newest position.
    const auto q = rng.normal_vec(static_cast<std::size_t>(H * dk));
    std::vector<float> out(static_cast<std::size_t>(H * dv)), lse(static_cast<std::size_t>(H));
    test::poison(out);
    test::poison(lse);
    DecodeOptions opt;
    opt.kv_chunk = rng.integer(0, 1) ? 7 : 0;
    attention_decode<T>(ConstView2<float>(q.data(), {H, dk}), ring.keys(), ring.values(),
                        View2<float>(out.data(), {H, dv}), opt, View1<float>(lse.data(), {H}));
    const auto ref = test::reference_decode(q, as_stored<T>(all_k), as_stored<T>(all_v), N, H, Hk, dk, dv,
                                            1.0 / std::sqrt(static_cast<double>(dk)), std::max<std::int64_t>(0, N - W));
    CHECK(rel_l2(out, ref.out) <= 1e-5);  // bound 1e-5
    for (std::int64_t h = 0; h < H; ++h) {
      if (N == 0) CHECK(lse[h] == kNegInf);
      else CHECK(std::abs(lse[h] - ref.lse[h]) <= 1e-5 * std::max(1.0, std::abs(ref.lse[h])));
    }
  }
  ring.clear();
  CHECK(ring.size() == 0);
  CHECK(ring.total() == 0);
}

TEST_CASE("RingKVCache keeps exactly the last W positions", "[kv_cache][ring]") {
  check_ring<float>(test::fresh_seed());
  check_ring<bf16>(test::fresh_seed());
}

TEST_CASE("RingKVCache validation errors", "[kv_cache][ring][errors]") {
  REQUIRE_THROWS_WITH(RingKVCache<float>(2, 8, 8, 0), Contains("RingKVCache: argument 'window': must be >= 1, got 0"));
  REQUIRE_THROWS_WITH(RingKVCache<float>(0, 8, 8, 4), Contains("RingKVCache: argument 'kv_heads': must be >= 1, got 0"));
  REQUIRE_THROWS_WITH(RingKVCache<bf16>(1, -2, 8, 4), Contains("RingKVCache: argument 'head_dim_k': must be >= 1, got -2"));
  REQUIRE_THROWS_WITH(RingKVCache<bf16>(1, 2, 0, 4), Contains("RingKVCache: argument 'head_dim_v': must be >= 1, got 0"));
  RingKVCache<float> r(2, 8, 4, 5);
  std::vector<float> buf(512, 1.f);
  r.append(ConstView3<float>(buf.data(), {3, 2, 8}), ConstView3<float>(buf.data(), {3, 2, 4}));
  REQUIRE_THROWS_WITH(r.append(ConstView3<float>(buf.data(), {3, 2, 7}), ConstView3<float>(buf.data(), {3, 2, 4})),
                      Contains("RingKVCache::append: argument 'k': shape [3, 2, 7] must be [n, H_kv, d_k] = [n, 2, 8]"));
  REQUIRE_THROWS_WITH(r.append(ConstView3<float>(buf.data(), {3, 2, 8}), ConstView3<float>(buf.data(), {3, 3, 4})),
                      Contains("RingKVCache::append: argument 'v': shape [3, 3, 4] must be [n, H_kv, d_v] = [n, 2, 4]"));
  REQUIRE_THROWS_WITH(r.append(ConstView3<float>(buf.data(), {3, 2, 8}), ConstView3<float>(buf.data(), {4, 2, 4})),
                      Contains("RingKVCache::append: argument 'v': has 4 tokens but 'k' has 3"));
  REQUIRE_THROWS_WITH(r.position_of_slot(3), Contains("RingKVCache::position_of_slot: argument 'slot': must be in [0, size = 3), got 3"));
  REQUIRE_THROWS_WITH(r.position_of_slot(-1), Contains("argument 'slot': must be in [0, size = 3), got -1"));
  std::vector<float> ok(512);
  REQUIRE_THROWS_WITH(r.copy_recent(4, View3<float>(ok.data(), {4, 2, 8}), View3<float>(ok.data(), {4, 2, 4})),
                      Contains("RingKVCache::copy_recent: argument 'n': must be in [0, size = 3], got 4"));
  REQUIRE_THROWS_WITH(r.copy_recent(2, View3<float>(ok.data(), {3, 2, 8}), View3<float>(ok.data(), {2, 2, 4})),
                      Contains("RingKVCache::copy_recent: argument 'k_out': shape [3, 2, 8] must be [n, H_kv, d_k] = [2, 2, 8]"));
  REQUIRE_THROWS_WITH(r.copy_recent(2, View3<float>(ok.data(), {2, 2, 8}), View3<float>(ok.data(), {2, 2, 5})),
                      Contains("RingKVCache::copy_recent: argument 'v_out': shape [2, 2, 5] must be [n, H_kv, d_v] = [2, 2, 4]"));
  REQUIRE_THROWS_WITH(r.copy_recent(2, View3<float>(nullptr, {2, 2, 8}), View3<float>(ok.data(), {2, 2, 4})),
                      Contains("RingKVCache::copy_recent: argument 'k_out': null data pointer"));
}

// Checks one stored int8 row against the spec: |q| <= 127, the largest |x| maps to ±127,
// q = round(x / scale) with x / scale rounded once in f32 first (so |x - q·scale| <= scale / 2 plus
// that rounding, 2^-24·|x|), zero rows scale 0 and q 0.
static bool quantised_row_ok(const float* x, const std::int8_t* q, float scale, std::int64_t n) {
  float mx = 0.f;
  for (std::int64_t i = 0; i < n; ++i) mx = std::max(mx, std::abs(x[i]));
  if (mx == 0.f) return scale == 0.f && std::all_of(q, q + n, [](std::int8_t c) { return c == 0; });
  bool ok = scale == mx / 127.f;
  for (std::int64_t i = 0; i < n; ++i) {
    ok &= q[i] != -128;  // symmetric: codes in [-127, 127]
    ok &= std::abs(static_cast<double>(x[i]) - static_cast<double>(q[i]) * scale) <= 0.5 * scale + 0x1p-23 * std::abs(x[i]);
    if (std::abs(x[i]) == mx) ok &= std::abs(q[i]) == 127;
  }
  return ok;
}

TEST_CASE("KVCache int8 quantises each (token, head) row; decode over it, growth, the ring", "[kv_cache][int8]") {
  const auto seed = test::fresh_seed();
  CAPTURE(seed);
  test::Rng rng(seed);
  const std::int64_t Hk = rng.integer(1, 3), G = rng.integer(1, 3), H = Hk * G, dk = rng.integer(1, 70),
                     dv = rng.integer(1, 70), W = rng.integer(1, 40);
  CAPTURE(Hk, G, dk, dv, W);
  KVCache<std::int8_t> cache(Hk, dk, dv, rng.integer(0, 40));
  RingKVCache<std::int8_t> ring(Hk, dk, dv, W);
  std::vector<float> all_k, all_v;
  for (int step = 0; step < 12; ++step) {
    const std::int64_t n = rng.integer(0, 2) == 0 ? rng.integer(20, 90) : rng.integer(0, 3);
    auto k = rng.normal_vec(static_cast<std::size_t>(n * Hk * dk), step % 3 == 0 ? 100.f : 1.f);
    const auto v = rng.normal_vec(static_cast<std::size_t>(n * Hk * dv));
    if (n > 0) std::fill(k.begin(), k.begin() + dk, 0.f);  // a zero row
    cache.append(ConstView3<float>(k.data(), {n, Hk, dk}), ConstView3<float>(v.data(), {n, Hk, dv}));
    ring.append(ConstView3<float>(k.data(), {n, Hk, dk}), ConstView3<float>(v.data(), {n, Hk, dv}));
    all_k.insert(all_k.end(), k.begin(), k.end());
    all_v.insert(all_v.end(), v.begin(), v.end());
  }
  const std::int64_t N = cache.size();
  REQUIRE(N * Hk * dk == static_cast<std::int64_t>(all_k.size()));
  const QuantView3 kq = cache.keys(), vq = cache.values();
  CHECK(kq.codes.stride == std::array<std::int64_t, 3>{dk, cache.capacity() * dk, 1});
  CHECK(kq.scales.stride == std::array<std::int64_t, 2>{1, cache.capacity()});
  CHECK(cache.capacity() % 64 == 0);
  bool ok = true;
  std::vector<float> deq_k(all_k.size()), deq_v(all_v.size());
  dequantize(kq, View3<float>(deq_k.data(), {N, Hk, dk}));
  dequantize(vq, View3<float>(deq_v.data(), {N, Hk, dv}));
  for (std::int64_t t = 0; t < N; ++t)
    for (std::int64_t h = 0; h < Hk; ++h) {
      ok &= quantised_row_ok(all_k.data() + (t * Hk + h) * dk, kq.codes.ptr(t, h), kq.scales(t, h), dk);
      ok &= quantised_row_ok(all_v.data() + (t * Hk + h) * dv, vq.codes.ptr(t, h), vq.scales(t, h), dv);
    }
  CHECK(ok);
  const auto q = rng.normal_vec(static_cast<std::size_t>(H * dk));
  const double sc = 1.0 / std::sqrt(static_cast<double>(dk));
  std::vector<float> out(static_cast<std::size_t>(H * dv));
  test::poison(out);
  attention_decode(ConstView2<float>(q.data(), {H, dk}), cache.keys(), cache.values(), View2<float>(out.data(), {H, dv}));
  CHECK(rel_l2(out, test::reference_decode(q, deq_k, deq_v, N, H, Hk, dk, dv, sc).out) <= 1e-5);
  // The ring holds the last W rows, quantised the same way; copy_recent dequantises them.
  const std::int64_t nr = ring.size();
  REQUIRE(nr == std::min(N, W));
  std::vector<float> rk(static_cast<std::size_t>(nr * Hk * dk)), rv(static_cast<std::size_t>(nr * Hk * dv));
  ring.copy_recent(nr, View3<float>(rk.data(), {nr, Hk, dk}), View3<float>(rv.data(), {nr, Hk, dv}));
  CHECK(std::equal(rk.begin(), rk.end(), deq_k.end() - static_cast<std::ptrdiff_t>(rk.size())));
  CHECK(std::equal(rv.begin(), rv.end(), deq_v.end() - static_cast<std::ptrdiff_t>(rv.size())));
  test::poison(out);
  DecodeOptions opt;
  opt.kv_chunk = 7;
  attention_decode<std::int8_t>(ConstView2<float>(q.data(), {H, dk}), ring.keys(), ring.values(),
                                View2<float>(out.data(), {H, dv}), opt);
  CHECK(rel_l2(out, test::reference_decode(q, deq_k, deq_v, N, H, Hk, dk, dv, sc, N - nr).out) <= 1e-5);

  // NaN or inf is refused with the place named, and nothing is written (the ring keeps its rows).
  std::vector<float> bad(static_cast<std::size_t>(2 * Hk * std::max(dk, dv)), 1.f);
  bad[static_cast<std::size_t>(Hk * dk + dk - 1)] = std::numeric_limits<float>::quiet_NaN();
  const ConstView3<float> bk(bad.data(), {2, Hk, dk}), bv(bad.data(), {2, Hk, dv});
  REQUIRE_THROWS_WITH(cache.append(bk, bv), Contains("KVCache::append: argument 'k': non-finite value nan at token 1, KV head 0") &&
                                                Contains("int8 cache cannot quantise it"));
  REQUIRE_THROWS_WITH(ring.append(bk, bv), Contains("RingKVCache::append: argument 'k': non-finite value nan at token 1"));
  bad[static_cast<std::size_t>(Hk * dk + dk - 1)] = 1.f;
  bad[0] = -std::numeric_limits<float>::infinity();
  REQUIRE_THROWS_WITH(cache.append(ConstView3<float>(bad.data() + Hk * dk, {1, Hk, dk}), bv.slice(0, 0, 1)),
                      Contains("argument 'v': non-finite value -inf at token 0, KV head 0, element 0"));
  CHECK(cache.size() == N);
  CHECK(ring.total() == N);
  std::vector<float> rk2(rk.size()), rv2(rv.size());
  ring.copy_recent(nr, View3<float>(rk2.data(), {nr, Hk, dk}), View3<float>(rv2.data(), {nr, Hk, dv}));
  CHECK(rk2 == rk);
  CHECK(rv2 == rv);
  // A QuantView3 whose scales do not match its codes.
  const QuantView3 wrong{kq.codes, kq.scales.slice(0, 0, std::max<std::int64_t>(0, N - 1))};
  if (N > 0)
    REQUIRE_THROWS_WITH(attention_decode(ConstView2<float>(q.data(), {H, dk}), wrong, vq, View2<float>(out.data(), {H, dv})),
                        Contains("attention_decode: argument 'k': scales of shape"));
}
