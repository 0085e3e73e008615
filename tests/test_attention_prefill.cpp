// Tests of attention_prefill / attention_prefill_varlen against the float64 reference
// (tests/reference/attention_ref.hpp), plus the invariants the kernel promises: window >= T is
// causal, thread count and sub-ranges do not change a bit, varlen equals separate calls,
// fully masked rows give 0 / -inf, strided views, the portable (non-AVX-512) code path, and
// every validation error.
#include <catch2/catch.hpp>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <span>
#include <vector>

#include "attnkit/attention/prefill.hpp"
#include "reference/attention_ref.hpp"
#include "test_util.hpp"

using namespace attnkit;
using attnkit::test::Rng;

namespace {

using attnkit::test::kScale;

constexpr double kOutTol = 1e-5;  // relative L2 of out against the float64 reference
constexpr double kLseTol = 1e-5;  // |lse - ref| <= kLseTol * max(1, |ref|)
// Precision::fast on AMX rounds Q, K, V and the probabilities to bf16 (8 significant bits).
// Measured on an AMX Xeon over masks, offsets, GQA shapes and variants: out 1.4-2.8e-3,
// lse 1.7e-4-4.4e-3.
constexpr double kFastOutTol = 1e-2;
constexpr double kFastLseTol = 2e-2;
constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();
constexpr float kInf = std::numeric_limits<float>::infinity();

struct Dims {
  std::int64_t T_q, T_k, H, H_kv, d_k, d_v;
};

// Contiguous inputs; kf / vf hold the K / V values as float (bf16-rounded when KV = bf16),
// which is what the reference sees.
template <class KV>
struct Inputs {
  Dims dims;
  std::vector<float> q, kf, vf;
  std::vector<KV> k, v;

  Inputs(Rng& rng, Dims d) : dims(d) {
    q = rng.normal_vec(static_cast<std::size_t>(d.T_q * d.H * d.d_k));
    test::rounded_normal(rng, static_cast<std::size_t>(d.T_k * d.H_kv * d.d_k), kf, k);
    test::rounded_normal(rng, static_cast<std::size_t>(d.T_k * d.H_kv * d.d_v), vf, v);
  }
  ConstView3<float> qv() const { return {q.data(), {dims.T_q, dims.H, dims.d_k}}; }
  ConstView3<KV> kv() const { return {k.data(), {dims.T_k, dims.H_kv, dims.d_k}}; }
  ConstView3<KV> vv() const { return {v.data(), {dims.T_k, dims.H_kv, dims.d_v}}; }
};

struct Outputs {
  std::vector<float> out, lse;
  explicit Outputs(const Dims& d)
      : out(static_cast<std::size_t>(d.T_q * d.H * d.d_v), kNaN), lse(static_cast<std::size_t>(d.T_q * d.H), kNaN) {}
  View3<float> ov(const Dims& d) { return {out.data(), {d.T_q, d.H, d.d_v}}; }
  View2<float> lv(const Dims& d) { return {lse.data(), {d.T_q, d.H}}; }
};

// window 0 = causal.
template <class Arch = simd::default_arch, class KV>
void run(const Inputs<KV>& in, std::int64_t window, const AttentionOptions& opt, Outputs& o) {
  const Dims& d = in.dims;
  if (window == 0)
    detail::attention_prefill_arch<Arch>(in.qv(), in.kv(), in.vv(), o.ov(d), CausalMask{}, opt, o.lv(d));
  else
    detail::attention_prefill_arch<Arch>(in.qv(), in.kv(), in.vv(), o.ov(d), SlidingWindowMask{window}, opt, o.lv(d));
}

template <class KV>
ref::AttentionResult reference(const Inputs<KV>& in, std::int64_t q_offset, std::int64_t window, double scale = 0) {
  const Dims& d = in.dims;
  if (q_offset < 0) q_offset = d.T_k - d.T_q;
  if (scale == 0) scale = 1.0 / std::sqrt(static_cast<double>(d.d_k));
  return ref::reference_attention(in.q, in.kf, in.vf, d.T_q, d.T_k, d.H, d.H_kv, d.d_k, d.d_v, q_offset, window,
                                  scale);
}

void check_lse(const std::vector<float>& lse, const std::vector<double>& ref, double tol = kLseTol) {
  REQUIRE(lse.size() == ref.size());
  std::size_t bad = 0;
  double worst = 0;
  for (std::size_t i = 0; i < lse.size(); ++i) {
    if (std::isinf(ref[i])) {  // a row that sees no key: exactly -inf
      if (!(lse[i] == -kInf)) ++bad;
      continue;
    }
    const double err = std::abs(static_cast<double>(lse[i]) - ref[i]) / std::max(1.0, std::abs(ref[i]));
    if (!(err <= tol)) ++bad;  // NaN fails
    if (err > worst || std::isnan(err)) worst = err;
  }
  CAPTURE(worst);
  CHECK(bad == 0);  // |lse - ref| <= tol * max(1, |ref|), -inf where the row sees nothing
}

template <class T>
bool bits_equal_at(const std::vector<T>& a, const std::vector<T>& b, std::size_t i) {
  return std::memcmp(&a[i], &b[i], sizeof(T)) == 0;
}

std::int64_t pick(Rng& rng, std::initializer_list<std::int64_t> xs) {
  return *(xs.begin() + rng.integer(0, static_cast<std::int64_t>(xs.size()) - 1));
}

// Random shape: head_dim 16/24/64/128, d_v sometimes different, G in {1, 2, 4, 8}.
Dims random_dims(Rng& rng, std::int64_t max_t) {
  Dims d;
  d.d_k = pick(rng, {16, 24, 64, 128});
  d.d_v = rng.integer(0, 2) == 0 ? pick(rng, {16, 24, 40, 64, 128}) : d.d_k;
  const std::int64_t G = pick(rng, {1, 2, 4, 8});
  d.H_kv = rng.integer(1, std::max<std::int64_t>(1, 8 / G));
  d.H = G * d.H_kv;
  d.T_k = rng.integer(1, max_t);
  d.T_q = rng.integer(0, 2) == 0 ? rng.integer(1, d.T_k) : d.T_k;  // continuation or plain prefill
  return d;
}

template <class KV>
void random_case(Rng& rng, std::int64_t max_t, Precision precision = Precision::exact) {
  const Dims d = random_dims(rng, max_t);
  const std::int64_t window = pick(rng, {0, 0, 1, rng.integer(2, 40), d.T_k + rng.integer(0, 5)});
  AttentionOptions opt;
  opt.precision = precision;
  if (d.T_q < d.T_k && rng.integer(0, 1)) opt.q_offset = rng.integer(0, d.T_k - d.T_q);  // explicit offset
  CAPTURE(d.T_q, d.T_k, d.H, d.H_kv, d.d_k, d.d_v, window, opt.q_offset);
  Inputs<KV> in(rng, d);
  Outputs o(d);
  run(in, window, opt, o);
  const auto r = reference(in, opt.q_offset, window);
  if (precision == Precision::exact) {
    CHECK(test::rel_l2(o.out, r.out) <= kOutTol);
    check_lse(o.lse, r.lse);
  } else {
    CHECK(test::rel_l2(o.out, r.out) <= kFastOutTol);
    check_lse(o.lse, r.lse, kFastLseTol);
  }
}

// Whether Precision::fast runs on AMX tiles here (else it is the exact kernel).
bool fast_on_amx() { return detail::flash::use_amx_prefill<simd::default_arch>(Precision::fast); }

}  // namespace

TEMPLATE_TEST_CASE("prefill matches the float64 reference on random shapes", "[prefill]", float, bf16) {
  const auto seed = test::fresh_seed();
  CAPTURE(seed);
  Rng rng(seed);
  for (int i = 0; i < 48 / kScale; ++i) random_case<TestType>(rng, 320 / kScale);
}

TEST_CASE("prefill with Qwen3 head shape and long tails", "[prefill]") {
  const auto seed = test::fresh_seed();
  CAPTURE(seed);
  Rng rng(seed);
  const std::int64_t T = 700 / kScale + rng.integer(0, 63);
  const Dims d{T, T, 4, 2, 128, 128};
  CAPTURE(T);
  Inputs<bf16> in(rng, d);
  for (std::int64_t window : {std::int64_t{0}, std::int64_t{100}}) {
    CAPTURE(window);
    Outputs o(d);
    run(in, window, {}, o);
    const auto r = reference(in, -1, window);
    CHECK(test::rel_l2(o.out, r.out) <= kOutTol);
    check_lse(o.lse, r.lse);
  }
}

TEST_CASE("prefill honours an explicit scale", "[prefill]") {
  const auto seed = test::fresh_seed();
  CAPTURE(seed);
  Rng rng(seed);
  const Dims d{33, 50, 4, 2, 24, 24};
  Inputs<float> in(rng, d);
  AttentionOptions opt;
  opt.scale = 0.37f;
  Outputs o(d);
  run(in, 0, opt, o);
  const auto r = reference(in, -1, 0, static_cast<double>(0.37f));
  CHECK(test::rel_l2(o.out, r.out) <= kOutTol);
  check_lse(o.lse, r.lse);
}

TEMPLATE_TEST_CASE("sliding window >= T_k equals causal bit for bit", "[prefill]", float, bf16) {
  const auto seed = test::fresh_seed();
  CAPTURE(seed);
  Rng rng(seed);
  for (int i = 0; i < 6; ++i) {
    const Dims d = random_dims(rng, 300 / kScale);
    const std::int64_t window = d.T_k + rng.integer(0, 100);
    CAPTURE(d.T_q, d.T_k, d.H, d.H_kv, d.d_k, d.d_v, window);
    Inputs<TestType> in(rng, d);
    Outputs a(d), b(d);
    run(in, 0, {}, a);
    run(in, window, {}, b);
    CHECK(test::bit_equal(a.out, b.out));
    CHECK(test::bit_equal(a.lse, b.lse));
  }
}

TEMPLATE_TEST_CASE("1 and 2 threads give bit-identical results", "[prefill]", float, bf16) {
  const auto seed = test::fresh_seed();
  CAPTURE(seed);
  Rng rng(seed);
  for (std::int64_t window : {std::int64_t{0}, std::int64_t{37}}) {
    const Dims d{257 / kScale + 3, 257 / kScale + 3, 8, 2, 64, 64};
    CAPTURE(window, d.T_q);
    Inputs<TestType> in(rng, d);
    Outputs a(d), b(d);
    AttentionOptions opt;
    opt.num_threads = 1;
    run(in, window, opt, a);
    opt.num_threads = 2;
    run(in, window, opt, b);
    CHECK(test::bit_equal(a.out, b.out));
    CHECK(test::bit_equal(a.lse, b.lse));
  }
}

TEMPLATE_TEST_CASE("head and query sub-ranges compute the full call's values and touch nothing else", "[prefill]",
                   float, bf16) {
  const auto seed = test::fresh_seed();
  CAPTURE(seed);
  Rng rng(seed);
  for (int i = 0; i < 8; ++i) {
    const Dims d = random_dims(rng, 200 / kScale);
    const std::int64_t window = pick(rng, {0, rng.integer(1, 30)});
    Inputs<TestType> in(rng, d);
    Outputs full(d), part(d);
    run(in, window, {}, full);
    AttentionOptions opt;
    opt.heads.begin = rng.integer(0, d.H - 1);
    opt.heads.end = rng.integer(opt.heads.begin, d.H);
    opt.queries.begin = rng.integer(0, d.T_q - 1);
    opt.queries.end = rng.integer(0, 3) == 0 ? -1 : rng.integer(opt.queries.begin, d.T_q);
    CAPTURE(d.T_q, d.T_k, d.H, d.H_kv, d.d_k, d.d_v, window, opt.heads.begin, opt.heads.end, opt.queries.begin,
            opt.queries.end);
    run(in, window, opt, part);
    const std::int64_t qe = opt.queries.resolve_end(d.T_q);
    std::size_t wrong = 0;
    for (std::int64_t t = 0; t < d.T_q; ++t)
      for (std::int64_t h = 0; h < d.H; ++h) {
        const bool inside = t >= opt.queries.begin && t < qe && h >= opt.heads.begin && h < opt.heads.end;
        const auto li = static_cast<std::size_t>(t * d.H + h);
        if (inside ? !bits_equal_at(part.lse, full.lse, li) : !std::isnan(part.lse[li])) ++wrong;
        for (std::int64_t c = 0; c < d.d_v; ++c) {
          const auto oi = static_cast<std::size_t>((t * d.H + h) * d.d_v + c);
          if (inside ? !bits_equal_at(part.out, full.out, oi) : !std::isnan(part.out[oi])) ++wrong;
        }
      }
    CHECK(wrong == 0);  // inside: bit-identical to the full call; outside: still poisoned
  }
}

TEMPLATE_TEST_CASE("varlen equals separate per-sequence calls", "[prefill][varlen]", float, bf16) {
  const auto seed = test::fresh_seed();
  CAPTURE(seed);
  Rng rng(seed);
  for (int iter = 0; iter < 4; ++iter) {
    const std::int64_t batch = rng.integer(1, 5);
    std::vector<std::int64_t> cu{0};
    for (std::int64_t b = 0; b < batch; ++b) cu.push_back(cu.back() + pick(rng, {0, 1, rng.integer(2, 150 / kScale)}));
    const std::int64_t T = cu.back();
    if (T == 0) continue;
    const std::int64_t G = pick(rng, {1, 2, 4}), H_kv = rng.integer(1, 2), dk = pick(rng, {16, 64}),
                       window = pick(rng, {0, rng.integer(1, 40)});
    const Dims d{T, T, G * H_kv, H_kv, dk, dk};
    CAPTURE(T, d.H, d.H_kv, dk, window, cu);
    Inputs<TestType> in(rng, d);
    Outputs packed(d);
    const std::span<const std::int64_t> cus(cu);
    if (window == 0)
      attention_prefill_varlen(in.qv(), in.kv(), in.vv(), packed.ov(d), cus, CausalMask{}, {}, packed.lv(d));
    else
      attention_prefill_varlen(in.qv(), in.kv(), in.vv(), packed.ov(d), cus, SlidingWindowMask{window}, {},
                               packed.lv(d));

    Outputs separate(d);
    for (std::int64_t b = 0; b < batch; ++b) {
      const std::int64_t s0 = cu[b], s1 = cu[b + 1];
      if (s0 == s1) continue;
      const auto o = separate.ov(d).slice(0, s0, s1);
      const auto l = separate.lv(d).slice(0, s0, s1);
      if (window == 0)
        attention_prefill(in.qv().slice(0, s0, s1), in.kv().slice(0, s0, s1), in.vv().slice(0, s0, s1), o,
                          CausalMask{}, {}, l);
      else
        attention_prefill(in.qv().slice(0, s0, s1), in.kv().slice(0, s0, s1), in.vv().slice(0, s0, s1), o,
                          SlidingWindowMask{window}, {}, l);
    }
    CHECK(test::bit_equal(packed.out, separate.out));
    CHECK(test::bit_equal(packed.lse, separate.lse));

    // And each sequence against the reference on its own.
    for (std::int64_t b = 0; b < batch; ++b) {
      const std::int64_t s0 = cu[b], n = cu[b + 1] - cu[b];
      if (n == 0) continue;
      const auto sub = [&](const std::vector<float>& x, std::int64_t row) {
        return std::vector<float>(x.begin() + s0 * row, x.begin() + (s0 + n) * row);
      };
      const auto r = ref::reference_attention(sub(in.q, d.H * dk), sub(in.kf, d.H_kv * dk), sub(in.vf, d.H_kv * dk),
                                              n, n, d.H, d.H_kv, dk, dk, 0, window, 1.0 / std::sqrt(double(dk)));
      const std::vector<float> got = sub(packed.out, d.H * dk);
      CHECK(test::rel_l2(got, r.out) <= kOutTol);
    }

    // A query sub-range of the packed axis touches exactly those rows.
    AttentionOptions opt;
    opt.queries = {rng.integer(0, T - 1), -1};
    opt.queries.end = rng.integer(opt.queries.begin, T);
    CAPTURE(opt.queries.begin, opt.queries.end);
    Outputs part(d);
    if (window == 0)
      attention_prefill_varlen(in.qv(), in.kv(), in.vv(), part.ov(d), cus, CausalMask{}, opt, part.lv(d));
    else
      attention_prefill_varlen(in.qv(), in.kv(), in.vv(), part.ov(d), cus, SlidingWindowMask{window}, opt,
                               part.lv(d));
    std::size_t wrong = 0;
    for (std::int64_t t = 0; t < T; ++t)
      for (std::int64_t i = 0; i < d.H * dk; ++i) {
        const auto oi = static_cast<std::size_t>(t * d.H * dk + i);
        const bool inside = t >= opt.queries.begin && t < opt.queries.end;
        if (inside ? !bits_equal_at(part.out, packed.out, oi) : !std::isnan(part.out[oi])) ++wrong;
      }
    CHECK(wrong == 0);
  }
}

TEST_CASE("queries that see no key give 0 and lse -inf", "[prefill]") {
  const auto seed = test::fresh_seed();
  CAPTURE(seed);
  Rng rng(seed);
  // T_q > T_k with the default offset: the first T_q - T_k queries sit at negative positions.
  const Dims d{40, 13, 4, 2, 24, 16};
  Inputs<float> in(rng, d);
  for (std::int64_t window : {std::int64_t{0}, std::int64_t{5}}) {
    Outputs o(d);
    run(in, window, {}, o);
    const std::int64_t dead = d.T_q - d.T_k;
    std::size_t wrong = 0;
    for (std::int64_t t = 0; t < dead; ++t)
      for (std::int64_t h = 0; h < d.H; ++h) {
        if (!(o.lse[t * d.H + h] == -kInf)) ++wrong;
        for (std::int64_t c = 0; c < d.d_v; ++c)
          if (o.out[(t * d.H + h) * d.d_v + c] != 0.f) ++wrong;
      }
    CHECK(wrong == 0);
    const auto r = reference(in, -1, window);
    CHECK(test::rel_l2(o.out, r.out) <= kOutTol);
    check_lse(o.lse, r.lse);
  }
  // No keys at all (T_k = 0, null K/V pointers are allowed for empty views).
  const Dims d0{7, 0, 2, 1, 16, 16};
  Outputs o0(d0);
  attention_prefill(ConstView3<float>(in.q.data(), {7, 2, 16}), ConstView3<float>(nullptr, {0, 1, 16}),
                    ConstView3<float>(nullptr, {0, 1, 16}), o0.ov(d0), CausalMask{}, {}, o0.lv(d0));
  std::size_t wrong0 = 0;
  for (float x : o0.out) wrong0 += x != 0.f;
  for (float x : o0.lse) wrong0 += !(x == -kInf);
  CHECK(wrong0 == 0);
}

TEST_CASE("strided views: fused qkv buffer, head-major K, padded out, transposed lse", "[prefill]") {
  const auto seed = test::fresh_seed();
  CAPTURE(seed);
  Rng rng(seed);
  const std::int64_t T = rng.integer(50, 200 / kScale + 50), H = 4, H_kv = 2, dh = 64;
  const Dims d{T, T, H, H_kv, dh, dh};
  CAPTURE(T);
  Inputs<float> in(rng, d);
  const std::int64_t row = (H + 2 * H_kv) * dh;
  std::vector<float> qkv(static_cast<std::size_t>(T * row));  // [T, q | k | v]
  std::vector<float> k_hm(static_cast<std::size_t>(H_kv * T * dh));  // head-major K: [H_kv, T, d]
  for (std::int64_t t = 0; t < T; ++t) {
    for (std::int64_t i = 0; i < H * dh; ++i) qkv[t * row + i] = in.q[t * H * dh + i];
    for (std::int64_t i = 0; i < H_kv * dh; ++i) {
      qkv[t * row + H * dh + i] = in.kf[t * H_kv * dh + i];
      qkv[t * row + (H + H_kv) * dh + i] = in.vf[t * H_kv * dh + i];
    }
    for (std::int64_t j = 0; j < H_kv; ++j)
      for (std::int64_t c = 0; c < dh; ++c) k_hm[(j * T + t) * dh + c] = in.kf[(t * H_kv + j) * dh + c];
  }
  const ConstView3<float> q(qkv.data(), {T, H, dh}, {row, dh, 1});
  const ConstView3<float> k(qkv.data() + H * dh, {T, H_kv, dh}, {row, dh, 1});
  const ConstView3<float> v(qkv.data() + (H + H_kv) * dh, {T, H_kv, dh}, {row, dh, 1});
  const ConstView3<float> k2(k_hm.data(), {T, H_kv, dh}, {dh, T * dh, 1});
  const std::int64_t orow = H * dh + 7;
  std::vector<float> out(static_cast<std::size_t>(T * orow), kNaN), lse_t(static_cast<std::size_t>(H * T), kNaN);
  const View3<float> ov(out.data(), {T, H, dh}, {orow, dh, 1});
  const View2<float> lv(lse_t.data(), {T, H}, {1, T});  // stored [H, T]
  const auto r = reference(in, -1, 0);

  for (const auto& kk : {k, k2}) {
    attention_prefill(q, kk, v, ov, CausalMask{}, {}, lv);
    std::vector<float> dense(static_cast<std::size_t>(T * H * dh)), lse(static_cast<std::size_t>(T * H));
    std::size_t pad_touched = 0;
    for (std::int64_t t = 0; t < T; ++t) {
      for (std::int64_t i = 0; i < H * dh; ++i) dense[t * H * dh + i] = out[t * orow + i];
      for (std::int64_t i = H * dh; i < orow; ++i) pad_touched += !std::isnan(out[t * orow + i]);
      for (std::int64_t h = 0; h < H; ++h) lse[t * H + h] = lse_t[h * T + t];
    }
    CHECK(pad_touched == 0);
    CHECK(test::rel_l2(dense, r.out) <= kOutTol);
    check_lse(lse, r.lse);
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

TEMPLATE_TEST_CASE("portable (non-AVX-512) code path matches the reference", "[prefill][generic]",
                   ATTNKIT_PORTABLE_ARCHS) {
  const auto seed = test::fresh_seed();
  CAPTURE(seed);
  Rng rng(seed);
  for (int i = 0; i < 12 / kScale + 2; ++i) {
    const Dims d = random_dims(rng, 160 / kScale);
    const std::int64_t window = pick(rng, {0, 1, rng.integer(2, 30)});
    CAPTURE(d.T_q, d.T_k, d.H, d.H_kv, d.d_k, d.d_v, window);
    if (i % 2) {
      Inputs<bf16> in(rng, d);
      Outputs o(d);
      run<TestType>(in, window, {}, o);
      const auto r = reference(in, -1, window);
      CHECK(test::rel_l2(o.out, r.out) <= kOutTol);
      check_lse(o.lse, r.lse);
    } else {
      Inputs<float> in(rng, d);
      Outputs o(d);
      run<TestType>(in, window, {}, o);
      const auto r = reference(in, -1, window);
      CHECK(test::rel_l2(o.out, r.out) <= kOutTol);
      check_lse(o.lse, r.lse);
    }
  }
  // varlen through the same path
  Inputs<float> in(rng, Dims{30, 30, 2, 1, 24, 24});
  const std::vector<std::int64_t> cu{0, 11, 11, 30};
  Outputs o(in.dims), sep(in.dims);
  detail::attention_prefill_varlen_arch<TestType>(in.qv(), in.kv(), in.vv(), o.ov(in.dims), std::span(cu),
                                                  CausalMask{}, {}, o.lv(in.dims));
  for (std::size_t b = 0; b + 1 < cu.size(); ++b)
    if (cu[b + 1] > cu[b])
      detail::attention_prefill_arch<TestType>(
          in.qv().slice(0, cu[b], cu[b + 1]), in.kv().slice(0, cu[b], cu[b + 1]), in.vv().slice(0, cu[b], cu[b + 1]),
          sep.ov(in.dims).slice(0, cu[b], cu[b + 1]), CausalMask{}, {}, sep.lv(in.dims).slice(0, cu[b], cu[b + 1]));
  CHECK(test::bit_equal(o.out, sep.out));
}

TEST_CASE("prefill validation errors name the function and the argument", "[prefill][errors]") {
  const std::int64_t T = 5, H = 4, H_kv = 2, dk = 8, dv = 8;
  std::vector<float> q(T * H * dk, 0.f), k(T * H_kv * dk, 0.f), v(T * H_kv * dv, 0.f), out(T * H * dv),
      lse(T * H), big(4096, 0.f);
  const ConstView3<float> qv(q.data(), {T, H, dk}), kv(k.data(), {T, H_kv, dk}), vv(v.data(), {T, H_kv, dv});
  const View3<float> ov(out.data(), {T, H, dv});
  const View2<float> lv(lse.data(), {T, H});
  using Catch::Contains;
  const auto call = [&](ConstView3<float> a, ConstView3<float> b, ConstView3<float> c, View3<float> o,
                        AttentionOptions opt = {}, View2<float> l = {}) {
    attention_prefill(a, b, c, o, CausalMask{}, opt, l);
  };

  REQUIRE_NOTHROW(call(qv, kv, vv, ov, {}, lv));
  CHECK_THROWS_WITH(call(ConstView3<float>(nullptr, {T, H, dk}), kv, vv, ov),
                    Contains("attention_prefill: argument 'q': null data pointer"));
  CHECK_THROWS_WITH(call(qv, ConstView3<float>(k.data(), {T, H_kv, dk}, {H_kv * dk, dk, 2}), vv, ov),
                    Contains("attention_prefill: argument 'k': the last dimension must be contiguous"));
  CHECK_THROWS_WITH(call(qv, kv, ConstView3<float>(nullptr, {T, H_kv, dv}), ov),
                    Contains("attention_prefill: argument 'v': null data pointer"));
  CHECK_THROWS_WITH(call(qv, kv, vv, View3<float>(out.data(), {T, H, dv}, {H * dv, dv, 3})),
                    Contains("attention_prefill: argument 'out': the last dimension must be contiguous"));
  CHECK_THROWS_WITH(call(ConstView3<float>(q.data(), {T, H, 0}), ConstView3<float>(k.data(), {T, H_kv, 0}), vv, ov),
                    Contains("attention_prefill: argument 'q': head_dim d_k must be >= 1"));
  CHECK_THROWS_WITH(call(qv, kv, ConstView3<float>(v.data(), {T - 1, H_kv, dv}), ov),
                    Contains("attention_prefill: argument 'v': 4 rows, but k has T_k = 5"));
  CHECK_THROWS_WITH(call(ConstView3<float>(q.data(), {T, H, dk / 2}), kv, vv, ov),
                    Contains("attention_prefill: argument 'k': head_dim 8 does not match q's head_dim 4"));
  CHECK_THROWS_WITH(call(qv, ConstView3<float>(k.data(), {T, 0, dk}), ConstView3<float>(v.data(), {T, 0, dv}), ov),
                    Contains("attention_prefill: argument 'k': number of KV heads H_kv must be >= 1"));
  CHECK_THROWS_WITH(call(qv, kv, ConstView3<float>(v.data(), {T, 1, dv}), ov),
                    Contains("attention_prefill: argument 'v': 1 KV heads, but k has H_kv = 2"));
  CHECK_THROWS_WITH(call(ConstView3<float>(big.data(), {T, 3, dk}), kv, vv, View3<float>(big.data(), {T, 3, dv})),
                    Contains("attention_prefill: argument 'q': number of query heads H = 3 is not a multiple of the "
                             "number of KV heads H_kv = 2"));
  CHECK_THROWS_WITH(call(qv, kv, vv, View3<float>(out.data(), {T, H, dv - 1})),
                    Contains("attention_prefill: argument 'out': shape [5, 4, 7] must be [T_q, H, d_v] = [5, 4, 8]"));
  CHECK_THROWS_WITH(call(qv, kv, vv, View3<float>(out.data(), {T - 1, H, dv})),
                    Contains("attention_prefill: argument 'out': shape [4, 4, 8]"));
  CHECK_THROWS_WITH(attention_prefill(qv, kv, vv, ov, SlidingWindowMask{0}),
                    Contains("attention_prefill: argument 'mask': sliding window must be >= 1, got 0"));
  CHECK_THROWS_WITH(attention_prefill(qv, kv, vv, ov, SlidingWindowMask{-3}),
                    Contains("attention_prefill: argument 'mask': sliding window must be >= 1, got -3"));
  CHECK_THROWS_WITH(call(qv, kv, vv, ov, {}, View2<float>(lse.data(), {T, H - 1})),
                    Contains("attention_prefill: argument 'lse': shape [5, 3] must be [T_q, H] = [5, 4]"));
  AttentionOptions opt;
  opt.scale = std::numeric_limits<float>::quiet_NaN();
  CHECK_THROWS_WITH(call(qv, kv, vv, ov, opt), Contains("attention_prefill: argument 'opt.scale': must be finite"));
  opt = {};
  opt.heads = {1, 5};
  CHECK_THROWS_WITH(call(qv, kv, vv, ov, opt),
                    Contains("attention_prefill: argument 'opt.heads': range [1, 5) is out of bounds for H = 4"));
  opt.heads = {3, 2};
  CHECK_THROWS_WITH(call(qv, kv, vv, ov, opt), Contains("attention_prefill: argument 'opt.heads': range [3, 2)"));
  opt.heads = {-1, 2};
  CHECK_THROWS_WITH(call(qv, kv, vv, ov, opt), Contains("attention_prefill: argument 'opt.heads': range [-1, 2)"));
  opt = {};
  opt.queries = {2, 6};
  CHECK_THROWS_WITH(call(qv, kv, vv, ov, opt),
                    Contains("attention_prefill: argument 'opt.queries': range [2, 6) is out of bounds for T_q = 5"));
  opt = {};
  opt.q_offset = -2;
  CHECK_THROWS_WITH(call(qv, kv, vv, ov, opt),
                    Contains("attention_prefill: argument 'opt.q_offset': must be -1 (default) or >= 0, got -2"));
  opt.q_offset = 1;
  CHECK_THROWS_WITH(call(qv, kv, vv, ov, opt),
                    Contains("attention_prefill: argument 'opt.q_offset': q_offset + T_q = 6 exceeds T_k = 5"));

  // varlen-specific checks
  const auto varlen = [&](std::vector<std::int64_t> cu, AttentionOptions o = {}, ConstView3<float> kk = {}) {
    if (kk.data == nullptr) kk = kv;
    attention_prefill_varlen(qv, kk, kk.shape[0] == T ? vv : ConstView3<float>(v.data(), {kk.shape[0], H_kv, dv}), ov,
                             std::span<const std::int64_t>(cu), CausalMask{}, o);
  };
  REQUIRE_NOTHROW(varlen({0, 2, 5}));
  CHECK_THROWS_WITH(varlen({}), Contains("attention_prefill_varlen: argument 'cu_seqlens': must start with 0"));
  CHECK_THROWS_WITH(varlen({1, 5}), Contains("attention_prefill_varlen: argument 'cu_seqlens': must start with 0"));
  CHECK_THROWS_WITH(varlen({0, 3, 2, 5}),
                    Contains("attention_prefill_varlen: argument 'cu_seqlens': must be non-decreasing, but [2] = 2 < "
                             "[1] = 3"));
  CHECK_THROWS_WITH(varlen({0, 2, 4}),
                    Contains("attention_prefill_varlen: argument 'cu_seqlens': last entry 4 must equal the number of "
                             "tokens T = 5"));
  opt = {};
  opt.q_offset = 0;
  CHECK_THROWS_WITH(varlen({0, 5}, opt),
                    Contains("attention_prefill_varlen: argument 'opt.q_offset': must be -1 (each sequence starts at "
                             "0), got 0"));
  CHECK_THROWS_WITH(varlen({0, 5}, {}, ConstView3<float>(big.data(), {T + 2, H_kv, dk})),
                    Contains("attention_prefill_varlen: argument 'k': 7 tokens, but q has 5"));
  CHECK_THROWS_WITH(attention_prefill_varlen(qv, kv, vv, ov, std::span<const std::int64_t>(), SlidingWindowMask{0}),
                    Contains("attention_prefill_varlen: argument 'mask': sliding window must be >= 1"));
}

// ---- Precision::fast: the AMX tile kernel (detail/flash_prefill_amx.hpp) ------------------------
// Where the CPU has no AMX, fast is the exact kernel (checked bit for bit below), so these tests
// then check the fallback; on an AMX CPU they check the tile kernel.

TEMPLATE_TEST_CASE("fast prefill matches the float64 reference within the bf16 bound", "[prefill][fast]", float, bf16) {
  const auto seed = test::fresh_seed();
  CAPTURE(seed);
  INFO("fast runs on AMX tiles: " << fast_on_amx());
  Rng rng(seed);
  for (int i = 0; i < 48 / kScale; ++i) random_case<TestType>(rng, 600 / kScale, Precision::fast);
}

// Precision::fast against float64 under each window (0 = causal), within the bf16 bounds.
void check_fast_windows(const Inputs<bf16>& in, std::initializer_list<std::int64_t> windows) {
  for (const std::int64_t window : windows) {
    CAPTURE(in.dims.T_q, window);
    Outputs o(in.dims);
    AttentionOptions opt;
    opt.precision = Precision::fast;
    run(in, window, opt, o);
    const auto r = reference(in, -1, window);
    CHECK(test::rel_l2(o.out, r.out) <= kFastOutTol);
    check_lse(o.lse, r.lse, kFastLseTol);
  }
}

TEST_CASE("fast prefill: Qwen3 heads, T crossing several 256-key tiles, causal and window", "[prefill][fast]") {
  const auto seed = test::fresh_seed();
  CAPTURE(seed);
  Rng rng(seed);
  const std::int64_t T = 900 / kScale + rng.integer(0, 63);
  const Dims d{T, T, 4, 2, 128, 128};
  Inputs<bf16> in(rng, d);
  check_fast_windows(in, {0, 300});
}

TEST_CASE("fast prefill: scores growing along the keys move the softmax's reference, causal and window", "[prefill][fast]") {
  // The tile kernel's softmax keeps an integer reference per row and redoes a row when a key
  // tile's probabilities sum past 2^16 (settle_rows16_ref). Here every query leans on one
  // direction and key j carries 3 · j / T_k of it, so a row's scores climb 13-15 nats per
  // 256-key tile: the reference moves in full tiles, in the diagonal's masked ones and in a
  // window's (whose mask the exp pass applies). Elsewhere fast is the exact kernel.
  const auto seed = test::fresh_seed();
  CAPTURE(seed);
  INFO("fast runs on AMX tiles: " << fast_on_amx());
  Rng rng(seed);
  const std::int64_t T = 600 + rng.integer(0, 63);  // three key tiles in every build (kScale would shrink it to one)
  const Dims d{T, T, 4, 2, 128, 128};
  Inputs<bf16> in(rng, d);
  for (float& x : in.q) x += 1.f;
  for (std::int64_t j = 0; j < T; ++j)
    for (std::int64_t e = 0; e < d.H_kv * d.d_k; ++e) {
      float& kf = in.kf[static_cast<std::size_t>(j * d.H_kv * d.d_k + e)];
      kf = 0.5f * kf + 3.f * static_cast<float>(j) / static_cast<float>(T);
    }
  convert(in.kf.data(), in.k.data(), static_cast<long>(in.kf.size()));  // K as the kernel reads it, and its float copy
  convert(in.k.data(), in.kf.data(), static_cast<long>(in.kf.size()));
  check_fast_windows(in, {0, 300, 37});
}

TEMPLATE_TEST_CASE("fast prefill: threads and sub-ranges give the full call's bits", "[prefill][fast]", float, bf16) {
  const auto seed = test::fresh_seed();
  CAPTURE(seed);
  Rng rng(seed);
  for (int i = 0; i < 6; ++i) {
    const Dims d = random_dims(rng, 300 / kScale);
    const std::int64_t window = pick(rng, {0, rng.integer(1, 60)});
    CAPTURE(d.T_q, d.T_k, d.H, d.H_kv, d.d_k, d.d_v, window);
    Inputs<TestType> in(rng, d);
    Outputs one(d), two(d), part(d);
    AttentionOptions opt;
    opt.precision = Precision::fast;
    opt.num_threads = 1;
    run(in, window, opt, one);
    opt.num_threads = 2;
    run(in, window, opt, two);
    CHECK(test::bit_equal(one.out, two.out));
    CHECK(test::bit_equal(one.lse, two.lse));
    opt.heads.begin = rng.integer(0, d.H - 1);
    opt.queries.begin = rng.integer(0, d.T_q - 1);
    run(in, window, opt, part);
    std::size_t wrong = 0;
    for (std::int64_t t = 0; t < d.T_q; ++t)
      for (std::int64_t h = 0; h < d.H; ++h) {
        const bool inside = t >= opt.queries.begin && h >= opt.heads.begin;
        for (std::int64_t c = 0; c < d.d_v; ++c) {
          const auto oi = static_cast<std::size_t>((t * d.H + h) * d.d_v + c);
          if (inside ? !bits_equal_at(part.out, two.out, oi) : !std::isnan(part.out[oi])) ++wrong;
        }
      }
    CHECK(wrong == 0);
  }
}

TEST_CASE("fast prefill: varlen equals separate calls bit for bit", "[prefill][fast][varlen]") {
  const auto seed = test::fresh_seed();
  CAPTURE(seed);
  Rng rng(seed);
  const std::vector<std::int64_t> cu{0, 37, 37, 300 / kScale + 40, 300 / kScale + 41, 300 / kScale + 170};
  const std::int64_t T = cu.back();
  const Dims d{T, T, 6, 2, 64, 64};
  Inputs<bf16> in(rng, d);
  Outputs all(d);
  AttentionOptions opt;
  opt.precision = Precision::fast;
  attention_prefill_varlen(in.qv(), in.kv(), in.vv(), all.ov(d), cu, CausalMask{}, opt, all.lv(d));
  std::size_t wrong = 0;
  for (std::size_t b = 0; b + 1 < cu.size(); ++b) {
    const std::int64_t s0 = cu[b], s1 = cu[b + 1];
    if (s1 == s0) continue;
    const Dims ds{s1 - s0, s1 - s0, d.H, d.H_kv, d.d_k, d.d_v};
    Outputs one(ds);
    attention_prefill(in.qv().slice(0, s0, s1), in.kv().slice(0, s0, s1), in.vv().slice(0, s0, s1), one.ov(ds),
                      CausalMask{}, opt, one.lv(ds));
    const float* got = all.out.data() + s0 * d.H * d.d_v;
    if (std::memcmp(got, one.out.data(), one.out.size() * sizeof(float)) != 0) ++wrong;
  }
  CHECK(wrong == 0);
}

TEST_CASE("fast prefill: every attention variant within the bf16 bound of the exact kernel", "[prefill][fast]") {
  // The exact kernel's variants are checked against float64 in test_attention_variants.cpp.
  const auto seed = test::fresh_seed();
  CAPTURE(seed);
  Rng rng(seed);
  const Dims d{200 / kScale + 33, 200 / kScale + 33, 6, 3, 64, 48};
  Inputs<bf16> in(rng, d);
  const std::vector<float> slopes = alibi_slopes(d.H), sinks = rng.normal_vec(static_cast<std::size_t>(d.H));
  std::vector<float> M = rng.normal_vec(static_cast<std::size_t>(d.d_k * d.d_k)), w = rng.normal_vec(static_cast<std::size_t>(d.T_q * d.H));
  for (auto& x : M) x *= 0.15f;
  const ConstView2<float> Mv{M.data(), {d.d_k, d.d_k}}, wv{w.data(), {d.T_q, d.H}};
  const auto check_variant = [&](const char* name, const auto& var) {
    CAPTURE(name);
    Outputs e(d), f(d);
    AttentionOptions opt;
    attention_prefill(in.qv(), in.kv(), in.vv(), e.ov(d), CausalMask{}, opt, e.lv(d), var);
    opt.precision = Precision::fast;
    attention_prefill(in.qv(), in.kv(), in.vv(), f.ov(d), CausalMask{}, opt, f.lv(d), var);
    CHECK(test::rel_l2(f.out, e.out) <= kFastOutTol);
    CHECK(test::rel_l2(f.lse, e.lse) <= kFastLseTol);
  };
  check_variant("softcap", make_variant(SoftCap{5.f}));
  check_variant("alibi", make_variant(Alibi{slopes.data()}));
  check_variant("sinks + output scale", make_variant(Sinks{sinks.data()}, OutputScale{wv}));
  check_variant("metric + softcap", make_variant(QueryMetric{Mv}, SoftCap{20.f}));
}

// int8 K/V (QuantView3) are read in place, each row widened to code · scale as the key tiles are
// packed: bit for bit attention_prefill<float> over the dequantised rows (exact and fast, token-
// and head-major storage, strided scales, any thread count), which the tests above hold to the
// float64 reference; the exact result is also checked against float64 over the dequantised rows.
TEST_CASE("int8 K/V (QuantView3): read in place, bit for bit the f32 kernel over dequantised rows", "[prefill][int8]") {
  const auto seed = test::fresh_seed();
  CAPTURE(seed);
  Rng rng(seed);
  for (int c = 0; c < 12; ++c) {
    const Dims d = random_dims(rng, 300 / kScale);
    const std::int64_t window = pick(rng, {0, 0, rng.integer(2, 40)});
    const bool head_major = rng.integer(0, 1) == 1;
    AttentionOptions opt;
    opt.precision = c % 3 == 2 ? Precision::fast : Precision::exact;
    opt.num_threads = static_cast<int>(rng.integer(1, 2));
    if (d.T_q < d.T_k && rng.integer(0, 1)) opt.q_offset = rng.integer(0, d.T_k - d.T_q);
    CAPTURE(c, d.T_q, d.T_k, d.H, d.H_kv, d.d_k, d.d_v, window, head_major, static_cast<int>(opt.precision));
    const auto q = rng.normal_vec(static_cast<std::size_t>(d.T_q * d.H * d.d_k));
    // Codes and scales, token-major [T, Hk, d] / [T, Hk] or head-major [Hk, T, d] / [Hk, T].
    struct Quant {
      std::vector<std::int8_t> codes;
      std::vector<float> scales, deq;  // deq: token-major [T, Hk, d], the values the kernel must read
      QuantView3 view;
    };
    const auto quantise = [&](std::int64_t dim) {
      Quant qt;
      const std::int64_t T = d.T_k, Hk = d.H_kv;
      qt.codes.resize(static_cast<std::size_t>(T * Hk * dim));
      qt.scales.resize(static_cast<std::size_t>(T * Hk));
      qt.deq.resize(qt.codes.size());
      for (std::int64_t t = 0; t < T; ++t)
        for (std::int64_t h = 0; h < Hk; ++h) {
          auto x = rng.normal_vec(static_cast<std::size_t>(dim));
          if (rng.integer(0, 30) == 0) std::fill(x.begin(), x.end(), 0.f);  // a zero row: scale 0
          const std::int64_t row = head_major ? h * T + t : t * Hk + h;
          REQUIRE(detail::quant::quantize_row(x.data(), qt.codes.data() + row * dim, qt.scales[row], dim));
          detail::quant::dequantize_row(qt.codes.data() + row * dim, qt.scales[row], qt.deq.data() + (t * Hk + h) * dim, dim);
        }
      qt.view = head_major ? QuantView3{ConstView3<std::int8_t>(qt.codes.data(), {T, Hk, dim}, {dim, T * dim, 1}),
                                        ConstView2<float>(qt.scales.data(), {T, Hk}, {1, T})}
                           : QuantView3{ConstView3<std::int8_t>(qt.codes.data(), {T, Hk, dim}),
                                        ConstView2<float>(qt.scales.data(), {T, Hk})};
      return qt;
    };
    const Quant kq = quantise(d.d_k), vq = quantise(d.d_v);
    Outputs a(d), b(d);
    const ConstView3<float> qv(q.data(), {d.T_q, d.H, d.d_k});
    const ConstView3<float> kf(kq.deq.data(), {d.T_k, d.H_kv, d.d_k}), vf(vq.deq.data(), {d.T_k, d.H_kv, d.d_v});
    if (window == 0) {
      attention_prefill(qv, kq.view, vq.view, a.ov(d), CausalMask{}, opt, a.lv(d));
      attention_prefill<float>(qv, kf, vf, b.ov(d), CausalMask{}, opt, b.lv(d));
    } else {
      attention_prefill(qv, kq.view, vq.view, a.ov(d), SlidingWindowMask{window}, opt, a.lv(d));
      attention_prefill<float>(qv, kf, vf, b.ov(d), SlidingWindowMask{window}, opt, b.lv(d));
    }
    CHECK(test::bit_equal(a.out, b.out));
    CHECK(test::bit_equal(a.lse, b.lse));
    if (opt.precision == Precision::exact) {
      const std::int64_t off = opt.q_offset >= 0 ? opt.q_offset : d.T_k - d.T_q;
      const auto r = ref::reference_attention(q, kq.deq, vq.deq, d.T_q, d.T_k, d.H, d.H_kv, d.d_k, d.d_v, off, window,
                                              1.0 / std::sqrt(static_cast<double>(d.d_k)));
      CHECK(test::rel_l2(a.out, r.out) <= kOutTol);
      check_lse(a.lse, r.lse);
    }
  }
  // Scales that do not match the codes are refused by name.
  std::vector<std::int8_t> codes(4 * 2 * 8, 1);
  std::vector<float> scales(8, 0.1f), q(4 * 2 * 8, 0.f), out(4 * 2 * 8);
  const QuantView3 good{ConstView3<std::int8_t>(codes.data(), {4, 2, 8}), ConstView2<float>(scales.data(), {4, 2})};
  const QuantView3 bad{ConstView3<std::int8_t>(codes.data(), {4, 2, 8}), ConstView2<float>(scales.data(), {2, 4})};
  REQUIRE_THROWS_WITH(attention_prefill(ConstView3<float>(q.data(), {4, 2, 8}), good, bad, View3<float>(out.data(), {4, 2, 8})),
                      Catch::Contains("attention_prefill: argument 'v': scales of shape [2, 4] must be [T, H_kv] = [4, 2]"));
}

TEMPLATE_TEST_CASE("prefill: a NaN in q or k reaches exactly the outputs that see it, exact and fast", "[prefill][fast][nan]",
                   float, bf16) {
  // The online softmax must not turn a NaN score into a zero probability (the AMX kernel's exp2
  // once clamped its argument with max(x, -150), which drops NaN).
  const auto seed = test::fresh_seed();
  CAPTURE(seed);
  Rng rng(seed);
  const Dims d{70, 70, 4, 2, 64, 64};  // G = 2: query heads 0, 1 read KV head 0
  const std::int64_t tq = 33, hq = 3, tk = 41;
  for (const Precision precision : {Precision::exact, Precision::fast}) {
    for (const bool in_k : {false, true}) {
      CAPTURE(precision == Precision::fast, in_k);
      Inputs<TestType> in(rng, d);
      if (in_k) in.k[(tk * d.H_kv + 0) * d.d_k + 5] = TestType(kNaN);
      else in.q[(tq * d.H + hq) * d.d_k + 7] = kNaN;
      Outputs o(d);
      AttentionOptions opt;
      opt.precision = precision;
      run(in, 0, opt, o);
      int wrong = 0;
      for (std::int64_t t = 0; t < d.T_q; ++t)
        for (std::int64_t h = 0; h < d.H; ++h) {
          const bool sees = in_k ? (h / 2 == 0 && t >= tk) : (t == tq && h == hq);
          for (std::int64_t e = 0; e < d.d_v; ++e) wrong += std::isnan(o.out[(t * d.H + h) * d.d_v + e]) != sees;
        }
      CHECK(wrong == 0);
    }
  }
}

TEST_CASE("fast prefill without AMX is the exact kernel, bit for bit", "[prefill][fast]") {
  const auto seed = test::fresh_seed();
  CAPTURE(seed);
  Rng rng(seed);
  auto& amx = detail::amx::amx_enabled();
  const bool was = amx.load();
  amx.store(false);  // as on a CPU without AMX
  const Dims d{150 / kScale + 7, 150 / kScale + 7, 4, 2, 64, 64};
  Inputs<float> in(rng, d);
  Outputs e(d), f(d);
  AttentionOptions opt;
  run(in, 0, opt, e);
  opt.precision = Precision::fast;
  run(in, 0, opt, f);
  amx.store(was);
  CHECK(test::bit_equal(e.out, f.out));
  CHECK(test::bit_equal(e.lse, f.lse));
}

TEMPLATE_TEST_CASE("exact prefill: the AMX tile path (bf16 K/V, exact planes) equals the FMA kernel within 2e-6",
                   "[prefill][amx]", float, bf16) {
  // With amx_exact_prefill() on and AMX usable, exact prefill with bf16 K/V runs on tiles with Q
  // and P split into three bf16 planes (measured 1.5-6.5e-7 from the FMA kernel); f32 K/V and
  // CPUs without AMX run the FMA kernel, so there both calls below are the same kernel.
  const auto seed = test::fresh_seed();
  CAPTURE(seed);
  Rng rng(seed);
  auto& tiles = detail::flash::amx_exact_prefill();
  const bool was_on = tiles.exchange(true);
  const bool on_tiles = detail::flash::use_amx_prefill<simd::default_arch, TestType>(Precision::exact);
  tiles.store(was_on);
  INFO("exact runs on AMX tiles: " << on_tiles);
  for (int i = 0; i < 6; ++i) {
    const Dims d = random_dims(rng, 400 / kScale);
    const std::int64_t window = pick(rng, {0, 0, rng.integer(1, 60)});
    CAPTURE(d.T_q, d.T_k, d.H, d.H_kv, d.d_k, d.d_v, window);
    Inputs<TestType> in(rng, d);
    Outputs a(d), b(d);
    const bool was = tiles.exchange(false);
    run(in, window, {}, a);
    tiles.store(true);
    run(in, window, {}, b);
    tiles.store(was);
    if (on_tiles) {
      CHECK(test::rel_l2(b.out, a.out) <= 2e-6);
      CHECK(test::rel_l2(b.lse, a.lse) <= 2e-6);
    } else {
      CHECK(test::bit_equal(a.out, b.out));
    }
  }
}
