// Tests of attnres_route / attnres_inv_rms (depth/attnres.hpp) against the float64 reference
// (tests/reference/attnres_ref.hpp), on fresh random inputs each run (seed printed on failure):
// random source counts, widths with SIMD tails, odd token counts, f32 / bf16 / mixed and strided
// sources, broadcast sources, with and without the partial, the residual and the weights output.
// Then the invariants: precomputed inv_rms, a pre-folded query and the thread count change no
// bit; a token computed alone (decode, T = 1) or in a sub-range equals its row of the full call;
// duplicated sources each get their own weight; a zero query averages; an infinite bias returns
// the partial exactly; residual may alias out; NaN stays in its token; every validation error.
// Bounds: relative L2 error ‖ours − ref‖ / ‖ref‖ <= 1e-5 for out and the weights (the reference
// sees the same bf16-rounded values as the kernel); outputs are NaN-poisoned before each call
// and NaN never passes a bound.
#include <catch2/catch.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <initializer_list>
#include <limits>
#include <span>
#include <string>
#include <vector>

#include "attnkit/depth/attnres.hpp"
#include "reference/attnres_ref.hpp"
#include "test_util.hpp"

using namespace attnkit;
using attnkit::test::Rng;
using Catch::Contains;
using ref::MatrixXdR;

namespace {

using attnkit::test::kScale;

constexpr double kTol = 1e-5;     // relative L2 of the weights, and of out (random cases: against ref.mag), vs float64
constexpr double kSumTol = 1e-5;  // |Σ_n w_n − 1| of every token's weights
constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();
constexpr float kInf = std::numeric_limits<float>::infinity();

enum class Store { f32, bf16 };
enum class Mix { f32, bf16, mixed };

const char* mix_name(Mix m) { return m == Mix::f32 ? "f32" : m == Mix::bf16 ? "bf16" : "mixed"; }

std::int64_t pick(Rng& rng, std::initializer_list<std::int64_t> xs) {
  return *(xs.begin() + rng.integer(0, static_cast<std::int64_t>(xs.size()) - 1));
}

// One routed source [T, D] stored as f32 or bf16, rows `stride` >= D elements apart with the
// padding between rows NaN (a kernel that reads past D fails); broadcast: one stored row seen
// as T rows (row stride 0). f holds the values as float exactly as the kernel reads them
// (bf16-rounded for bf16 storage), in the same layout.
struct Source {
  Store store = Store::f32;
  bool broadcast = false;
  std::int64_t T = 0, D = 0, stride = 0;
  std::vector<float> f;
  std::vector<bf16> b;
  std::vector<float> inv;  // attnres_inv_rms of the rows, once computed

  Source(Rng& rng, std::int64_t T_, std::int64_t D_, Store s, std::int64_t pad = 0, bool bcast = false,
         float scale = 1.f)
      : store(s), broadcast(bcast), T(T_), D(D_), stride(D_ + pad) {
    const std::int64_t rows = broadcast ? 1 : T;
    f.assign(static_cast<std::size_t>(rows * stride), kNaN);
    for (std::int64_t r = 0; r < rows; ++r)
      for (std::int64_t c = 0; c < D; ++c) {
        // No exact zeros (std::normal_distribution<float> returns 0 about once in 2^24 draws): a
        // zero row with eps = 0 has the RMS 0 and a NaN logit, here and in the reference.
        float x = 0.f;
        while (x == 0.f) x = rng.normal(scale);
        f[static_cast<std::size_t>(r * stride + c)] = x;
      }
    if (store == Store::bf16) {
      b.resize(f.size());
      convert(f.data(), b.data(), static_cast<long>(f.size()));
      convert(b.data(), f.data(), static_cast<long>(f.size()));
    }
  }
  std::int64_t row_stride() const { return broadcast ? 0 : stride; }
  float& at(std::int64_t t, std::int64_t c) { return f[static_cast<std::size_t>((broadcast ? 0 : t) * stride + c)]; }
  float at(std::int64_t t, std::int64_t c) const {
    return f[static_cast<std::size_t>((broadcast ? 0 : t) * stride + c)];
  }
  // Writes value (float storage) or its bf16 rounding into row t, column c of both copies.
  void set(std::int64_t t, std::int64_t c, float value) {
    const auto i = static_cast<std::size_t>((broadcast ? 0 : t) * stride + c);
    if (store == Store::bf16) {
      b[i] = bf16(value);
      f[i] = to_float(b[i]);
    } else {
      f[i] = value;
    }
  }

  DepthSource view(bool with_inv = false) const {
    const float* ir = with_inv ? inv.data() : nullptr;
    if (store == Store::bf16) return DepthSource(ConstView2<bf16>(b.data(), {T, D}, {row_stride(), 1}), ir);
    return DepthSource(ConstView2<float>(f.data(), {T, D}, {row_stride(), 1}), ir);
  }
  MatrixXdR matrix() const {
    MatrixXdR m(T, D);
    for (std::int64_t t = 0; t < T; ++t)
      for (std::int64_t c = 0; c < D; ++c) m(t, c) = at(t, c);
    return m;
  }
  void compute_inv(float eps) {
    inv.assign(static_cast<std::size_t>(T), kNaN);
    attnres_inv_rms(view(), eps, inv.data());
  }
};

// A [rows, cols] output with rows `stride` elements apart, NaN-poisoned (gaps included).
struct Out {
  std::int64_t rows = 0, cols = 0, stride = 0;
  std::vector<float> buf;
  Out(std::int64_t r, std::int64_t c, std::int64_t pad = 0)
      : rows(r), cols(c), stride(c + pad), buf(static_cast<std::size_t>(r * (c + pad)), kNaN) {}
  View2<float> view() { return {buf.data(), {rows, cols}, {stride, 1}}; }
  float at(std::int64_t r, std::int64_t c) const { return buf[static_cast<std::size_t>(r * stride + c)]; }
  std::vector<float> values() const {
    std::vector<float> v;
    v.reserve(static_cast<std::size_t>(rows * cols));
    for (std::int64_t r = 0; r < rows; ++r)
      for (std::int64_t c = 0; c < cols; ++c) v.push_back(at(r, c));
    return v;
  }
  std::vector<float> row(std::int64_t r) const {
    return std::vector<float>(buf.begin() + r * stride, buf.begin() + r * stride + cols);
  }
  // The padding between rows is still NaN: nothing was written outside [rows, cols].
  bool gaps_untouched() const {
    for (std::int64_t r = 0; r < rows; ++r)
      for (std::int64_t c = cols; c < stride; ++c)
        if (!std::isnan(buf[static_cast<std::size_t>(r * stride + c)])) return false;
    return true;
  }
};

std::vector<double> values(const MatrixXdR& m) { return std::vector<double>(m.data(), m.data() + m.size()); }

Eigen::VectorXd to_eigen(const std::vector<float>& v) {
  Eigen::VectorXd e(static_cast<Eigen::Index>(v.size()));
  for (std::size_t i = 0; i < v.size(); ++i) e[static_cast<Eigen::Index>(i)] = v[i];
  return e;
}

MatrixXdR to_matrix(const std::vector<float>& v, std::int64_t rows, std::int64_t cols) {
  MatrixXdR m(rows, cols);
  for (std::int64_t i = 0; i < rows * cols; ++i) m.data()[i] = v[static_cast<std::size_t>(i)];
  return m;
}

std::vector<DepthSource> views(const std::vector<Source>& src, std::int64_t count,
                               const std::vector<bool>& with_inv = {}) {
  std::vector<DepthSource> v;
  for (std::int64_t n = 0; n < count; ++n)
    v.push_back(src[static_cast<std::size_t>(n)].view(!with_inv.empty() && with_inv[static_cast<std::size_t>(n)]));
  return v;
}

std::vector<MatrixXdR> matrices(const std::vector<Source>& src, std::int64_t count) {
  std::vector<MatrixXdR> m;
  for (std::int64_t n = 0; n < count; ++n) m.push_back(src[static_cast<std::size_t>(n)].matrix());
  return m;
}

// max over tokens of |Σ_n w[t, n] − 1| (NaN: infinity).
double worst_row_sum_error(const Out& w) {
  double worst = 0;
  for (std::int64_t t = 0; t < w.rows; ++t) {
    double s = 0;
    for (std::int64_t n = 0; n < w.cols; ++n) s += w.at(t, n);
    const double e = std::abs(s - 1.0);
    if (!(e <= worst)) worst = std::isnan(e) ? std::numeric_limits<double>::infinity() : e;
  }
  return worst;
}

// Rows [a, b) of a source as their own source (what a caller routing a token range passes).
DepthSource rows_of(DepthSource s, std::int64_t a, std::int64_t b) {
  if (s.f32) s.f32 += a * s.row_stride;
  else s.b16 += a * s.row_stride;
  if (s.inv_rms) s.inv_rms += a;
  s.rows = b - a;
  return s;
}

std::span<const DepthSource> span_of(const std::vector<DepthSource>& v) { return {v.data(), v.size()}; }

// ---- random cases against the reference --------------------------------------------------

void check_random(std::uint64_t seed, Mix mix) {
  CAPTURE(seed, mix_name(mix));
  Rng rng(seed);
  const int cases = 30 / kScale;
  for (int c = 0; c < cases; ++c) {
    const std::int64_t N = rng.integer(1, 60 / kScale);
    const std::int64_t D = pick(rng, {1, 7, 16, 33, 100, 1024 + 5});
    const std::int64_t T = 2 * rng.integer(0, 35 / kScale) + 1;
    const bool has_partial = rng.integer(0, 3) != 0;
    const bool has_residual = rng.integer(0, 2) == 0;
    const bool want_weights = rng.integer(0, 1) == 0;
    const bool has_gamma = rng.integer(0, 1) == 0;
    const std::int64_t out_pad = rng.integer(0, 2) == 0 ? rng.integer(1, 9) : 0;
    const std::int64_t w_pad = rng.integer(0, 1) * rng.integer(1, 5);
    const float eps = std::vector<float>{0.f, 1e-6f, 1e-5f, 1e-2f, 0.5f}[static_cast<std::size_t>(rng.integer(0, 4))];
    const float bias = has_partial ? rng.uniform(-3.f, 3.f) : 0.f;
    const std::int64_t S = N + (has_partial ? 1 : 0);
    CAPTURE(c, N, D, T, has_partial, has_residual, want_weights, has_gamma, out_pad, eps, bias);

    // Sources of different magnitudes (as layer outputs are), some strided, a few broadcast.
    std::vector<Source> src;
    src.reserve(static_cast<std::size_t>(S));
    std::string layout;
    for (std::int64_t n = 0; n < S; ++n) {
      const Store st = mix == Mix::f32 ? Store::f32 : mix == Mix::bf16 ? Store::bf16
                                                    : (rng.integer(0, 1) ? Store::bf16 : Store::f32);
      const std::int64_t pad = rng.integer(0, 2) == 0 ? rng.integer(1, 17) : 0;
      const bool bcast = n < N && rng.integer(0, 9) == 0;
      src.emplace_back(rng, T, D, st, pad, bcast, std::exp(rng.uniform(-2.f, 2.f)));
      layout += st == Store::bf16 ? 'b' : 'f';
      layout += std::to_string(pad);
      layout += bcast ? "B " : " ";
    }
    CAPTURE(layout);
    // Logits of order 1-5: |proj ⊙ γ| ~ 0.5-3 against rows normalised to norm sqrt(D).
    const std::vector<float> proj =
        rng.normal_vec(static_cast<std::size_t>(D), rng.uniform(0.5f, 3.f) / std::sqrt(float(D)));
    std::vector<float> gamma;
    if (has_gamma)
      for (std::int64_t i = 0; i < D; ++i) gamma.push_back(rng.uniform(0.5f, 1.5f));
    std::vector<float> residual;
    if (has_residual) residual = rng.normal_vec(static_cast<std::size_t>(T * D));

    AttnResQuery query;
    query.proj = proj.data();
    query.norm_weight = has_gamma ? gamma.data() : nullptr;
    query.bias = bias;
    query.eps = eps;
    const auto ref = ref::reference_attnres(matrices(src, N), has_partial ? src.back().matrix() : MatrixXdR(),
                                            to_eigen(proj), has_gamma ? to_eigen(gamma) : Eigen::VectorXd(), bias, eps,
                                            has_residual ? to_matrix(residual, T, D) : MatrixXdR());

    // A: 1/rms computed inline, weights output as drawn.
    const std::vector<DepthSource> plain = views(src, N);
    const DepthSource partial = has_partial ? src.back().view() : DepthSource{};
    Out out_a(T, D, out_pad), w_a(T, S, w_pad);
    AttnResOptions opt;
    if (want_weights) opt.weights = w_a.view();
    if (has_residual) opt.residual = ConstView2<float>(residual.data(), {T, D});
    opt.num_threads = static_cast<int>(rng.integer(1, 2));
    attnres_route(span_of(plain), partial, query, out_a.view(), opt);
    const std::vector<float> out = out_a.values();
    // Against the magnitude Σ w |V| + |residual| (ref.mag): a case may have a single output (T 1,
    // D 1), a sum of sources that can nearly cancel; seed 0x3e4bf56ae57a6505 (bf16) had 5.5e-5
    // relative to that one value.
    CHECK(test::err_vs_magnitude(out, values(ref.out), values(ref.mag)) <= kTol);
    CHECK(out_a.gaps_untouched());
    if (want_weights) {
      CHECK(test::rel_l2(w_a.values(), values(ref.weights)) <= kTol);
      CHECK(worst_row_sum_error(w_a) <= kSumTol);
    }

    // attnres_inv_rms agrees with the float64 1/rms of every row.
    std::vector<bool> with_inv(static_cast<std::size_t>(S));
    for (std::int64_t n = 0; n < S; ++n) {
      Source& s = src[static_cast<std::size_t>(n)];
      s.compute_inv(eps);
      const MatrixXdR m = s.matrix();
      std::vector<double> expect(static_cast<std::size_t>(T));
      for (std::int64_t t = 0; t < T; ++t)
        expect[static_cast<std::size_t>(t)] = 1.0 / std::sqrt(m.row(t).squaredNorm() / double(D) + eps);
      CHECK(test::rel_l2(s.inv, expect) <= 1e-6);
      with_inv[static_cast<std::size_t>(n)] = rng.integer(0, 1) == 0;
    }
    with_inv[static_cast<std::size_t>(rng.integer(0, S - 1))] = true;

    // B: precomputed inv_rms for some sources, weights always requested, the other thread count:
    // bit-identical to A.
    const std::vector<DepthSource> pre = views(src, N, with_inv);
    const DepthSource partial_pre = has_partial ? src.back().view(with_inv.back()) : DepthSource{};
    Out out_b(T, D, out_pad), w_b(T, S, w_pad);
    AttnResOptions opt_b = opt;
    opt_b.weights = w_b.view();
    opt_b.num_threads = 3 - opt.num_threads;
    attnres_route(span_of(pre), partial_pre, query, out_b.view(), opt_b);
    CHECK(test::bit_equal(out_b.values(), out));
    if (want_weights) CHECK(test::bit_equal(w_b.values(), w_a.values()));
    else CHECK(test::rel_l2(w_b.values(), values(ref.weights)) <= kTol);

    // C: the query folded by the caller (attnres_fold_query): bit-identical to A.
    if (has_gamma) {
      std::vector<float> folded(static_cast<std::size_t>(D), kNaN);
      attnres_fold_query(proj.data(), gamma.data(), D, folded.data());
      AttnResQuery q2 = query;
      q2.proj = folded.data();
      q2.norm_weight = nullptr;
      Out out_c(T, D, out_pad);
      AttnResOptions opt_c = opt;
      opt_c.weights = {};
      attnres_route(span_of(plain), partial, q2, out_c.view(), opt_c);
      CHECK(test::bit_equal(out_c.values(), out));
    }
  }
}

TEST_CASE("attnres_route matches the float64 reference: f32 sources", "[attnres]") {
  check_random(test::fresh_seed(), Mix::f32);
}

TEST_CASE("attnres_route matches the float64 reference: bf16 sources", "[attnres]") {
  check_random(test::fresh_seed(), Mix::bf16);
}

TEST_CASE("attnres_route matches the float64 reference: f32 and bf16 sources in one call", "[attnres]") {
  check_random(test::fresh_seed(), Mix::mixed);
}

// ---- special inputs -------------------------------------------------------------------------

struct Fixed {
  std::vector<float> proj, gamma;
  AttnResQuery query;
  Fixed(Rng& rng, std::int64_t D, float bias = 0.f, float eps = 1e-6f) {
    proj = rng.normal_vec(static_cast<std::size_t>(D), 1.5f / std::sqrt(float(D)));
    for (std::int64_t i = 0; i < D; ++i) gamma.push_back(rng.uniform(0.5f, 1.5f));
    query.proj = proj.data();
    query.norm_weight = gamma.data();
    query.bias = bias;
    query.eps = eps;
  }
  ref::AttnResResult reference(const std::vector<MatrixXdR>& sources, const MatrixXdR& partial,
                               const MatrixXdR& residual = MatrixXdR()) const {
    return ref::reference_attnres(sources, partial, to_eigen(proj), to_eigen(gamma), query.bias, query.eps, residual);
  }
};

TEST_CASE("attnres_route: a source passed twice (same pointer) gets a weight per copy", "[attnres]") {
  // open-attention-residuals checkpoints route over lists that repeat a block output.
  const auto seed = test::fresh_seed();
  CAPTURE(seed);
  Rng rng(seed);
  const std::int64_t T = 19, D = 100;
  std::vector<Source> src;
  for (int i = 0; i < 3; ++i) src.emplace_back(rng, T, D, i == 1 ? Store::bf16 : Store::f32);
  const Source& A = src[0];
  const Source& B = src[1];
  const Source& P = src[2];
  Fixed fx(rng, D, 0.7f);
  const std::vector<DepthSource> list{A.view(), B.view(), A.view(), A.view()};  // A three times, same pointer
  Out out(T, D), w(T, 5);
  AttnResOptions opt;
  opt.weights = w.view();
  attnres_route(span_of(list), P.view(), fx.query, out.view(), opt);
  const auto ref = fx.reference({A.matrix(), B.matrix(), A.matrix(), A.matrix()}, P.matrix());
  CHECK(test::rel_l2(out.values(), values(ref.out)) <= kTol);
  CHECK(test::rel_l2(w.values(), values(ref.weights)) <= kTol);
  for (std::int64_t t = 0; t < T; ++t) {
    CAPTURE(t);
    CHECK(w.at(t, 0) == w.at(t, 2));
    CHECK(w.at(t, 0) == w.at(t, 3));
  }
  // The same values in three separate buffers: the same bits.
  Source A2 = A, A3 = A;
  const std::vector<DepthSource> copies{A.view(), B.view(), A2.view(), A3.view()};
  Out out2(T, D);
  attnres_route(span_of(copies), P.view(), fx.query, out2.view());
  CHECK(test::bit_equal(out2.values(), out.values()));
}

TEST_CASE("attnres_route: logits scored in advance (DepthSource::logits) give the same output", "[attnres]") {
  // The model scores each stored source against every call's query once; the call then reads the
  // source only for the weighted sum. Logits computed as the kernel does give the same bits;
  // others (a GEMM) agree within the bound.
  const auto seed = test::fresh_seed();
  CAPTURE(seed);
  Rng rng(seed);
  const std::int64_t T = 21, D = 133, C = 3;  // C calls' logits interleaved per token
  std::vector<Source> src;
  for (int i = 0; i < 4; ++i) src.emplace_back(rng, T, D, Store::f32);
  Fixed fx(rng, D, 0.3f);
  std::vector<float> folded(static_cast<std::size_t>(D));
  attnres_fold_query(fx.proj.data(), fx.gamma.data(), D, folded.data());
  AttnResQuery q = fx.query;
  q.proj = folded.data();
  q.norm_weight = nullptr;
  std::vector<DepthSource> plain, scored;
  std::vector<std::vector<float>> logits(3, std::vector<float>(static_cast<std::size_t>(T * C), -1e30f));
  for (int i = 0; i < 3; ++i) {
    plain.push_back(src[static_cast<std::size_t>(i)].view());
    DepthSource d = plain.back();
    std::vector<float> inv(static_cast<std::size_t>(T));
    attnres_inv_rms(d, q.eps, inv.data());
    for (std::int64_t t = 0; t < T; ++t)
      logits[static_cast<std::size_t>(i)][static_cast<std::size_t>(t * C + 1)] =
          simd::dot(folded.data(), d.f32 + t * d.row_stride, D) * inv[static_cast<std::size_t>(t)];
    d.logits = logits[static_cast<std::size_t>(i)].data() + 1;  // call 1 of C
    d.logit_stride = C;
    scored.push_back(d);
  }
  Out a(T, D), b(T, D);
  attnres_route(span_of(plain), src[3].view(), q, a.view());
  attnres_route(span_of(scored), src[3].view(), q, b.view());
  CHECK(test::bit_equal(a.values(), b.values()));
  const auto ref = fx.reference({src[0].matrix(), src[1].matrix(), src[2].matrix()}, src[3].matrix());
  CHECK(test::rel_l2(b.values(), values(ref.out)) <= kTol);
  // The logits are what the kernel uses: change one and that token changes.
  logits[0][static_cast<std::size_t>(5 * C + 1)] += 3.f;
  attnres_route(span_of(scored), src[3].view(), q, b.view());
  CHECK(!test::bit_equal(a.values(), b.values()));
  scored[0].logit_stride = -1;
  REQUIRE_THROWS_WITH(attnres_route(span_of(scored), src[3].view(), q, b.view()), Contains("negative logit stride"));
}

TEST_CASE("attnres_route: a zero query gives exactly uniform weights, out the average of the sources", "[attnres]") {
  const auto seed = test::fresh_seed();
  CAPTURE(seed);
  Rng rng(seed);
  const std::int64_t T = 15, D = 33, N = 6;
  for (Store st : {Store::f32, Store::bf16}) {
    CAPTURE(static_cast<int>(st));
    std::vector<Source> src;
    for (std::int64_t n = 0; n <= N; ++n)
      src.emplace_back(rng, T, D, st, n % 2, false, std::exp(rng.uniform(-2.f, 2.f)));
    Fixed fx(rng, D);
    std::fill(fx.proj.begin(), fx.proj.end(), 0.f);
    Out out(T, D), w(T, N + 1);
    AttnResOptions opt;
    opt.weights = w.view();
    attnres_route(span_of(views(src, N)), src.back().view(), fx.query, out.view(), opt);
    for (std::int64_t t = 0; t < T; ++t)
      for (std::int64_t n = 0; n <= N; ++n) REQUIRE(w.at(t, n) == 1.f / 7.f);
    MatrixXdR mean = MatrixXdR::Zero(T, D);
    for (const auto& s : src) mean += s.matrix() / 7.0;
    CHECK(test::rel_l2(out.values(), values(mean)) <= 1e-6);
  }
}

TEST_CASE("attnres_route: a huge bias returns the partial (exactly for +inf); -inf drops it", "[attnres]") {
  const auto seed = test::fresh_seed();
  CAPTURE(seed);
  Rng rng(seed);
  const std::int64_t T = 21, D = 100, N = 5;
  for (Store st : {Store::f32, Store::bf16}) {
    CAPTURE(static_cast<int>(st));
    std::vector<Source> src;
    for (std::int64_t n = 0; n <= N; ++n) src.emplace_back(rng, T, D, st, 3 * (n % 2));
    const Source& P = src.back();
    std::vector<float> partial_rows;  // the partial's values, [T, D]
    for (std::int64_t t = 0; t < T; ++t)
      for (std::int64_t c = 0; c < D; ++c) partial_rows.push_back(P.at(t, c));
    const std::vector<DepthSource> sv = views(src, N);
    Fixed fx(rng, D);
    const auto route = [&](float bias, const DepthSource& partial, Out& w, const std::vector<float>* residual) {
      Out out(T, D);
      AttnResQuery q = fx.query;
      q.bias = bias;
      AttnResOptions opt;
      opt.weights = w.view();
      if (residual) opt.residual = ConstView2<float>(residual->data(), {T, D});
      attnres_route(span_of(sv), partial, q, out.view(), opt);
      return out.values();
    };
    {
      Out w(T, N + 1);
      const auto out = route(1e4f, P.view(), w, nullptr);
      CHECK(test::rel_l2(out, partial_rows) <= 1e-6);
      for (std::int64_t t = 0; t < T; ++t) CHECK(w.at(t, N) >= 1.f - 1e-6f);
    }
    {
      Out w(T, N + 1);
      const auto out = route(kInf, P.view(), w, nullptr);
      CHECK(test::bit_equal(out, partial_rows));
      for (std::int64_t t = 0; t < T; ++t)
        for (std::int64_t n = 0; n <= N; ++n) CHECK(w.at(t, n) == (n == N ? 1.f : 0.f));
    }
    {  // With a residual: out = residual + partial, one float addition per element.
      const std::vector<float> residual = rng.normal_vec(static_cast<std::size_t>(T * D));
      std::vector<float> expect(residual.size());
      for (std::size_t i = 0; i < expect.size(); ++i) expect[i] = residual[i] + partial_rows[i];
      Out w(T, N + 1);
      CHECK(test::bit_equal(route(kInf, P.view(), w, &residual), expect));
    }
    {  // -inf: the partial gets weight 0 and out is the routing over the other sources alone.
      Out w(T, N + 1), w_alone(T, N);
      const auto out = route(-kInf, P.view(), w, nullptr);
      const auto alone = route(0.f, DepthSource{}, w_alone, nullptr);
      CHECK(test::bit_equal(out, alone));
      for (std::int64_t t = 0; t < T; ++t) CHECK(w.at(t, N) == 0.f);
    }
  }
}

TEST_CASE("attnres_route: no partial with a residual (Delta AttnRes), residual aliasing out", "[attnres]") {
  const auto seed = test::fresh_seed();
  CAPTURE(seed);
  Rng rng(seed);
  const std::int64_t T = 131, D = 100, N = 5;  // several token tiles
  std::vector<Source> src;
  for (std::int64_t n = 0; n < N; ++n) src.emplace_back(rng, T, D, n % 2 ? Store::bf16 : Store::f32, n);
  Fixed fx(rng, D);
  const std::vector<float> residual = rng.normal_vec(static_cast<std::size_t>(T * D));
  const auto ref = fx.reference(matrices(src, N), MatrixXdR(), to_matrix(residual, T, D));
  const std::vector<DepthSource> sv = views(src, N);

  Out out(T, D), w(T, N);
  AttnResOptions opt;
  opt.weights = w.view();
  opt.residual = ConstView2<float>(residual.data(), {T, D});
  opt.num_threads = 2;
  attnres_route(span_of(sv), DepthSource{}, fx.query, out.view(), opt);
  CHECK(test::rel_l2(out.values(), values(ref.out)) <= kTol);
  CHECK(test::rel_l2(w.values(), values(ref.weights)) <= kTol);
  CHECK(worst_row_sum_error(w) <= kSumTol);

  // residual == out: the update happens in place, with the same bits.
  std::vector<float> inplace = residual;
  const View2<float> iv(inplace.data(), {T, D});
  AttnResOptions opt2;
  opt2.residual = iv;
  opt2.num_threads = 2;
  attnres_route(span_of(sv), DepthSource{}, fx.query, iv, opt2);
  CHECK(test::bit_equal(inplace, out.values()));
}

TEST_CASE("attnres_route: a broadcast source (row stride 0, a learned null source)", "[attnres]") {
  const auto seed = test::fresh_seed();
  CAPTURE(seed);
  Rng rng(seed);
  const std::int64_t T = 23, D = 1024 + 5;
  const std::vector<float> null_row = rng.normal_vec(static_cast<std::size_t>(D));
  std::vector<float> null_full;  // the same row materialised T times
  for (std::int64_t t = 0; t < T; ++t) null_full.insert(null_full.end(), null_row.begin(), null_row.end());
  std::vector<Source> src;
  for (int i = 0; i < 3; ++i) src.emplace_back(rng, T, D, i == 1 ? Store::bf16 : Store::f32);
  Fixed fx(rng, D, -0.5f);
  const std::vector<DepthSource> sv{src[0].view(), DepthSource::broadcast(null_row.data(), T, D), src[1].view()};
  Out out(T, D), w(T, 4);
  AttnResOptions opt;
  opt.weights = w.view();
  attnres_route(span_of(sv), src[2].view(), fx.query, out.view(), opt);
  const MatrixXdR null_m = to_matrix(null_full, T, D);
  const auto ref = fx.reference({src[0].matrix(), null_m, src[1].matrix()}, src[2].matrix());
  CHECK(test::rel_l2(out.values(), values(ref.out)) <= kTol);
  CHECK(test::rel_l2(w.values(), values(ref.weights)) <= kTol);

  const std::vector<DepthSource> full{src[0].view(), DepthSource(ConstView2<float>(null_full.data(), {T, D})),
                                      src[1].view()};
  Out out2(T, D);
  attnres_route(span_of(full), src[2].view(), fx.query, out2.view());
  CHECK(test::bit_equal(out2.values(), out.values()));
}

TEST_CASE("attnres_route: thread count, token sub-ranges and T = 1 (decode) change no bit", "[attnres]") {
  const auto seed = test::fresh_seed();
  CAPTURE(seed);
  Rng rng(seed);
  const std::int64_t T = 67, D = 1024 + 5, N = 20;  // a dozen tokens per tile: several tiles
  std::vector<Source> src;
  for (std::int64_t n = 0; n <= N; ++n)
    src.emplace_back(rng, T, D, rng.integer(0, 1) ? Store::bf16 : Store::f32, rng.integer(0, 1) * 5, n == 3);
  Fixed fx(rng, D, 1.f);
  const std::vector<float> residual = rng.normal_vec(static_cast<std::size_t>(T * D));
  const std::vector<DepthSource> sv = views(src, N);
  const DepthSource partial = src.back().view();
  const auto route = [&](std::int64_t a, std::int64_t b, int threads, Out& out, Out& w) {
    std::vector<DepthSource> part;
    for (const auto& s : sv) part.push_back(rows_of(s, a, b));
    AttnResOptions opt;
    opt.weights = w.view();
    opt.residual = ConstView2<float>(residual.data() + a * D, {b - a, D});
    opt.num_threads = threads;
    attnres_route(span_of(part), rows_of(partial, a, b), fx.query, out.view(), opt);
  };
  Out out1(T, D), w1(T, N + 1);
  route(0, T, 1, out1, w1);
  const auto ref = fx.reference(matrices(src, N), src.back().matrix(), to_matrix(residual, T, D));
  CHECK(test::rel_l2(out1.values(), values(ref.out)) <= kTol);
  CHECK(test::rel_l2(w1.values(), values(ref.weights)) <= kTol);
  for (int threads : {2, 3, 4}) {
    CAPTURE(threads);
    Out out(T, D), w(T, N + 1);
    route(0, T, threads, out, w);
    CHECK(test::bit_equal(out.values(), out1.values()));
    CHECK(test::bit_equal(w.values(), w1.values()));
  }
  for (std::int64_t t : {std::int64_t{0}, std::int64_t{1}, T / 2, T - 1}) {  // decode: one token alone
    CAPTURE(t);
    Out out(1, D), w(1, N + 1);
    route(t, t + 1, 2, out, w);
    CHECK(test::bit_equal(out.values(), out1.row(t)));
    CHECK(test::bit_equal(w.values(), w1.row(t)));
  }
  {  // a token range that does not start on a tile boundary
    const std::int64_t a = 5, b = 41;
    Out out(b - a, D), w(b - a, N + 1);
    route(a, b, 2, out, w);
    for (std::int64_t t = a; t < b; ++t) {
      CAPTURE(t);
      CHECK(test::bit_equal(out.row(t - a), out1.row(t)));
    }
  }
}

TEST_CASE("attnres_route: NaN in a source reaches its token's output and no other", "[attnres]") {
  const auto seed = test::fresh_seed();
  CAPTURE(seed);
  Rng rng(seed);
  const std::int64_t T = 9, D = 33, N = 3;
  for (Store st : {Store::f32, Store::bf16}) {
    CAPTURE(static_cast<int>(st));
    std::vector<Source> src;
    for (std::int64_t n = 0; n <= N; ++n) src.emplace_back(rng, T, D, st, 2);
    Fixed fx(rng, D, 0.3f);
    Out clean(T, D);
    attnres_route(span_of(views(src, N)), src.back().view(), fx.query, clean.view());
    src[1].set(5, 7, kNaN);
    Out out(T, D);
    attnres_route(span_of(views(src, N)), src.back().view(), fx.query, out.view());
    for (std::int64_t t = 0; t < T; ++t) {
      CAPTURE(t);
      if (t == 5) {
        for (std::int64_t c = 0; c < D; ++c) CHECK(std::isnan(out.at(t, c)));
      } else {
        CHECK(test::bit_equal(out.row(t), clean.row(t)));
      }
    }
  }
}

// ---- validation -----------------------------------------------------------------------------

// Throws attnkit::Error and its message matches.
#define REQUIRE_ATTNKIT_ERROR(expr, matcher) \
  do {                                       \
    REQUIRE_THROWS_AS(expr, attnkit::Error); \
    REQUIRE_THROWS_WITH(expr, matcher);      \
  } while (0)

TEST_CASE("attnres_route / attnres_inv_rms reject bad arguments with a message naming them", "[attnres]") {
  Rng rng(7);
  const std::int64_t T = 5, D = 8;
  std::vector<float> a = rng.normal_vec(T * D), b = rng.normal_vec(T * D), proj = rng.normal_vec(D);
  std::vector<float> p2 = rng.normal_vec(2 * T * D);  // the partial is its first T rows
  const DepthSource A(ConstView2<float>(a.data(), {T, D})), B(ConstView2<float>(b.data(), {T, D}));
  const DepthSource P(ConstView2<float>(p2.data(), {T, D}));
  const std::vector<DepthSource> two{A, B};
  Out out(T, D);
  const View2<float> ov = out.view();
  AttnResQuery q;
  q.proj = proj.data();
  q.bias = 0.5f;
  // Nothing below writes out (checked at the end).
  const auto route = [&](std::vector<DepthSource> srcs, const DepthSource& partial, const AttnResQuery& query,
                         View2<float> o, const AttnResOptions& opt = {}) {
    attnres_route(span_of(srcs), partial, query, o, opt);
  };

  SECTION("a source of the wrong shape") {
    const DepthSource short_b(ConstView2<float>(b.data(), {T - 1, D}));
    REQUIRE_ATTNKIT_ERROR(route({A, short_b}, P, q, ov),
                          Contains("attnres_route") && Contains("sources[1]") &&
                              Contains("shape [4, 8], expected [5, 8]"));
    const DepthSource narrow_p(ConstView2<float>(p2.data(), {T, D - 1}));
    REQUIRE_ATTNKIT_ERROR(route(two, narrow_p, q, ov), Contains("'partial'") && Contains("expected [5, 8]"));
    const DepthSource strided(ConstView2<float>(a.data(), {T, D / 2}, {D, 2}));
    Out half(T, D / 2);
    REQUIRE_ATTNKIT_ERROR(route({strided}, DepthSource{}, AttnResQuery{proj.data()}, half.view()),
                          Contains("sources[0]") && Contains("contiguous"));
    DepthSource negative = A;
    negative.row_stride = -D;
    REQUIRE_ATTNKIT_ERROR(route({A, negative}, P, q, ov), Contains("sources[1]") && Contains("negative row stride"));
  }
  SECTION("a null proj") {
    AttnResQuery nq = q;
    nq.proj = nullptr;
    REQUIRE_ATTNKIT_ERROR(route(two, P, nq, ov), Contains("'query'") && Contains("null proj"));
  }
  SECTION("a bias without a partial") {
    REQUIRE_ATTNKIT_ERROR(route(two, DepthSource{}, q, ov), Contains("'query'") && Contains("needs a partial"));
  }
  SECTION("nothing to route over") {
    AttnResQuery q0 = q;
    q0.bias = 0.f;
    REQUIRE_ATTNKIT_ERROR(route({}, DepthSource{}, q0, ov), Contains("nothing to route over"));
  }
  SECTION("weights of the wrong shape") {
    Out w(T, 2);  // 3 routed with the partial
    AttnResOptions opt;
    opt.weights = w.view();
    REQUIRE_ATTNKIT_ERROR(route(two, P, q, ov, opt), Contains("'opt.weights'") && Contains("expected [5, 3]"));
    std::vector<float> r(T * (D + 1));
    AttnResOptions opt_r;
    opt_r.residual = ConstView2<float>(r.data(), {T, D + 1});
    REQUIRE_ATTNKIT_ERROR(route(two, P, q, ov, opt_r), Contains("'opt.residual'") && Contains("expected [5, 8]"));
  }
  SECTION("out overlapping a source") {
    const View2<float> onto_b(b.data(), {T, D});
    REQUIRE_ATTNKIT_ERROR(route(two, P, q, onto_b), Contains("'out'") && Contains("overlaps sources[1]"));
    const View2<float> into_p(p2.data() + (T - 1) * D, {T, D});  // shares the partial's last row
    REQUIRE_ATTNKIT_ERROR(route(two, P, q, into_p), Contains("'out'") && Contains("overlaps partial"));
    // The rows just after the partial are not part of it.
    route(two, P, q, View2<float>(p2.data() + T * D, {T, D}));
  }
  SECTION("a NaN bias, a bad eps") {
    AttnResQuery bad = q;
    bad.bias = kNaN;
    REQUIRE_ATTNKIT_ERROR(route(two, P, bad, ov), Contains("'query'") && Contains("bias is NaN"));
    bad = q;
    bad.eps = -1e-6f;
    REQUIRE_ATTNKIT_ERROR(route(two, P, bad, ov), Contains("'query'") && Contains("eps must be finite and >= 0"));
    bad.eps = kInf;
    REQUIRE_ATTNKIT_ERROR(route(two, P, bad, ov), Contains("eps must be finite and >= 0"));
    std::vector<float> inv(T);
    REQUIRE_ATTNKIT_ERROR(attnres_inv_rms(A, -1.f, inv.data()), Contains("attnres_inv_rms") && Contains("'eps'"));
    REQUIRE_ATTNKIT_ERROR(attnres_inv_rms(A, 1e-6f, nullptr), Contains("attnres_inv_rms") && Contains("'inv_rms'"));
  }
  SECTION("a missing source") {
    REQUIRE_ATTNKIT_ERROR(route({A, DepthSource{}}, P, q, ov), Contains("sources[1]") && Contains("null data pointer"));
  }
  CHECK(std::all_of(out.buf.begin(), out.buf.end(), [](float x) { return std::isnan(x); }));
}

}  // namespace
