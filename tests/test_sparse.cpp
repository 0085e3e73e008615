// Tests of DeepSeek-style sparse attention (sparse/): top-k selection, the lightning indexer and
// sparse attention, against the float64 oracle (tests/reference/sparse_ref.hpp) on fresh random
// inputs each run (seed printed on failure): odd head counts and dims (SIMD tails, index heads
// not a multiple of 16), q_offset, GQA groups of 1-3, f32 and bf16 K/V, selections with padding
// and empty ones; then the invariants (every key selected = dense causal attention; decode =
// the last row of prefill; 1 vs 2 threads bit-identical), the fixture sparse-a, and every
// validation error.
// Bounds (relative L2 error ‖ours − ref‖ / ‖ref‖):
//   kScoreTol = 1e-5  index scores against float64 (f32 dot products of length d_I);
//   kAttnTol  = 1e-5  sparse attention against float64;
//   kDenseTol = 1e-6  the sparse kernels with every key selected against attention_prefill (f32);
//   Precision::fast index scores: 1e-5 against float64 of the dequantised int8 vectors, and
//     each score within its quantisation bound (see the indexer's contract) of the f32 one;
//   fixture: index_score 1e-5, topk_indices identical, out 1e-4 (the bounds);
//   int8 K/V: kAttnTol against float64 over the dequantised rows (exact), 1.5e-2 under
//     Precision::fast (VNNI scores, 8-bit probabilities), measured against attention over |v|.
// Outputs are NaN-poisoned before every call and NaN never passes a bound (test_util.hpp rel_l2).
#include <catch2/catch.hpp>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <functional>
#include <limits>
#include <string>
#include <utility>
#include <vector>

#include "attnkit/attention/decode.hpp"
#include "attnkit/attention/prefill.hpp"
#include "attnkit/io/safetensors.hpp"
#include "attnkit/sparse/indexer.hpp"
#include "attnkit/sparse/sparse_attention.hpp"
#include "attnkit/sparse/topk.hpp"
#include "reference/sparse_ref.hpp"
#include "test_util.hpp"

using namespace attnkit;
using attnkit::test::kScale;
using attnkit::test::rel_l2;
using attnkit::test::Rng;
using Catch::Contains;

namespace {

constexpr double kScoreTol = 1e-5;
constexpr double kAttnTol = 1e-5;
constexpr double kDenseTol = 1e-6;
constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();
constexpr float kInf = std::numeric_limits<float>::infinity();

std::size_t sz(std::int64_t n) { return static_cast<std::size_t>(n); }

// Finite parts compared by relative L2; -inf must sit exactly where the reference has it.
double score_error(const std::vector<float>& ours, const std::vector<double>& ref) {
  std::vector<float> a;
  std::vector<double> b;
  for (std::size_t i = 0; i < ref.size(); ++i) {
    if (std::isinf(ref[i])) {
      if (!(std::isinf(ours[i]) && ours[i] < 0)) return kInf;
      continue;
    }
    a.push_back(ours[i]);
    b.push_back(ref[i]);
  }
  return rel_l2(a, b);
}

// Index heads (not a multiple of 16, one, more than 64) and head dims (1, odd, past 64).
std::pair<std::int64_t, std::int64_t> random_index_shape(Rng& rng) {
  return {std::vector<std::int64_t>{1, 3, 16, 17, 40, 64, 70}[sz(rng.integer(0, 6))],
          std::vector<std::int64_t>{1, 7, 16, 64, 65}[sz(rng.integer(0, 4))]};
}

struct IndexerProblem {
  std::int64_t T, T_k, H, d, off;
  std::vector<float> q, k, w;
  static IndexerProblem random(Rng& rng, std::int64_t T, std::int64_t T_k, std::int64_t H, std::int64_t d) {
    IndexerProblem p{T, T_k, H, d, T_k - T, {}, {}, {}};
    p.q = rng.normal_vec(sz(T * H * d));
    p.k = rng.normal_vec(sz(T_k * d));
    p.w = rng.normal_vec(sz(T * H));
    return p;
  }
  ConstView3<float> qv() const { return {q.data(), {T, H, d}}; }
  ConstView2<float> kv() const { return {k.data(), {T_k, d}}; }
  ConstView2<float> wv() const { return {w.data(), {T, H}}; }
};

std::vector<float> scores(const IndexerProblem& p, int threads = 0, Precision precision = Precision::exact) {
  std::vector<float> s(sz(p.T * p.T_k));
  test::poison(s);
  IndexerOptions o;
  o.num_threads = threads;
  o.precision = precision;
  indexer_scores(p.qv(), p.kv(), p.wv(), View2<float>(s.data(), {p.T, p.T_k}), o);
  return s;
}

std::vector<std::int32_t> topk(const IndexerProblem& p, std::int64_t K, int threads = 0,
                               Precision precision = Precision::exact) {
  std::vector<std::int32_t> idx(sz(p.T * K), -7);
  IndexerOptions o;
  o.num_threads = threads;
  o.precision = precision;
  indexer_topk(p.qv(), p.kv(), p.wv(), View2<std::int32_t>(idx.data(), {p.T, K}), o);
  return idx;
}

// A random valid selection per query: each visible key kept with probability `keep`, at most K.
std::vector<std::int32_t> random_selection(Rng& rng, std::int64_t T, std::int64_t K, std::int64_t off, double keep) {
  std::vector<std::int32_t> idx(sz(T * K), -1);
  for (std::int64_t t = 0; t < T; ++t) {
    std::int64_t n = 0;
    for (std::int64_t s = 0; s <= off + t && n < K; ++s)
      if (rng.uniform(0.f, 1.f) < keep) idx[sz(t * K + n++)] = static_cast<std::int32_t>(s);
  }
  return idx;
}

template <class KV>
struct AttnProblem {
  std::int64_t T, T_k, H, H_kv, dk, dv;
  std::vector<float> q, kf, vf;  // kf/vf: K/V as the kernel reads them (bf16-rounded for bf16)
  std::vector<KV> k, v;
  static AttnProblem random(Rng& rng, std::int64_t T, std::int64_t T_k, std::int64_t H, std::int64_t H_kv,
                            std::int64_t dk, std::int64_t dv) {
    AttnProblem p{T, T_k, H, H_kv, dk, dv, rng.normal_vec(sz(T * H * dk)), {}, {}, {}, {}};
    test::rounded_normal(rng, sz(T_k * H_kv * dk), p.kf, p.k);
    test::rounded_normal(rng, sz(T_k * H_kv * dv), p.vf, p.v);
    return p;
  }
  ConstView3<KV> kview() const { return {k.data(), {T_k, H_kv, dk}}; }
  ConstView3<KV> vview() const { return {v.data(), {T_k, H_kv, dv}}; }
  std::vector<float> prefill(const std::vector<std::int32_t>& idx, std::int64_t K, int threads = 0,
                             std::vector<float>* lse = nullptr) const {
    std::vector<float> out(sz(T * H * dv));
    test::poison(out);
    SparseAttentionOptions o;
    o.num_threads = threads;
    View2<float> lv;
    if (lse) {
      lse->assign(sz(T * H), kNaN);
      lv = View2<float>(lse->data(), {T, H});
    }
    sparse_attention_prefill<KV>(ConstView3<float>(q.data(), {T, H, dk}), kview(), vview(),
                                 ConstView2<std::int32_t>(idx.data(), {T, K}), View3<float>(out.data(), {T, H, dv}), o, lv);
    return out;
  }
};

// Prefill of p over the selection idx against the float64 reference (out and lse; lse -inf
// exactly for empty selections), and 1 thread bit-identical to the default; returns out and
// the reference output.
template <class KV>
std::vector<float> check_prefill(const AttnProblem<KV>& p, const std::vector<std::int32_t>& idx, std::int64_t K,
                                 std::vector<double>& ref_out) {
  std::vector<double> ref_lse;
  ref::sparse_attention(p.q, p.kf, p.vf, idx, p.T, K, p.H, p.H_kv, p.dk, p.dv, 1.0 / std::sqrt(double(p.dk)), ref_out,
                        ref_lse);
  std::vector<float> lse;
  const auto out = p.prefill(idx, K, 0, &lse);
  CHECK(rel_l2(out, ref_out) <= kAttnTol);
  CHECK(score_error(lse, ref_lse) <= kAttnTol);
  CHECK(test::bit_equal(out, p.prefill(idx, K, 1)));
  return out;
}

template <class KV>
void check_attention_random(Rng& rng) {
  const std::int64_t H_kv = rng.integer(1, 3), G = rng.integer(1, 4), H = H_kv * G;
  const std::int64_t dk = rng.integer(1, 3) == 1 ? rng.integer(1, 20) : rng.integer(60, 140);
  const std::int64_t dv = rng.integer(0, 1) ? dk : rng.integer(1, 70);
  const std::int64_t T = rng.integer(1, 40 / kScale), T_k = T + rng.integer(0, 300 / kScale);
  const std::int64_t K = rng.integer(1, 90);
  const double keep = rng.uniform(0.05f, 1.f);
  CAPTURE(T, T_k, H, H_kv, dk, dv, K, keep);
  const auto p = AttnProblem<KV>::random(rng, T, T_k, H, H_kv, dk, dv);
  const auto idx = random_selection(rng, T, K, T_k - T, keep);
  std::vector<double> ref_out;
  const auto out = check_prefill(p, idx, K, ref_out);
  CHECK(test::bit_equal(out, p.prefill(idx, K, 2)));
  // Decode of every row (the query at its own position, a cache of exactly what it may see),
  // gathered and checked as a whole like prefill: one row of H * dv values can be a sum that
  // nearly cancels (dv 1, H 1), where a per-row relative error measures the cancellation, not
  // the kernel.
  std::vector<float> dec(sz(T * H * dv));
  test::poison(dec);
  for (std::int64_t t = 0; t < T; ++t) {
    View2<float> o(dec.data() + t * H * dv, {H, dv});
    SparseAttentionOptions so;
    so.q_offset = T_k - T + t;
    so.kv_chunk = rng.integer(0, 1) ? 0 : rng.integer(1, 40);
    const ConstView2<float> qt(p.q.data() + t * H * dk, {H, dk});
    const ConstView1<std::int32_t> sel(idx.data() + t * K, {K});
    sparse_attention_decode<KV>(qt, p.kview(), p.vview(), sel, o, so);
    // Bit-identical for any thread count.
    for (const int threads : {1, 2}) {
      std::vector<float> ot(sz(H * dv));
      test::poison(ot);
      so.num_threads = threads;
      sparse_attention_decode<KV>(qt, p.kview(), p.vview(), sel, View2<float>(ot.data(), {H, dv}), so);
      CHECK(test::bit_equal(ot, std::vector<float>(o.data, o.data + H * dv)));
    }
  }
  CHECK(rel_l2(dec, ref_out) <= kAttnTol);
  // Against prefill (another merge order: blocks of keys there, chunks of the list here): both
  // are within kAttnTol of the reference, so (triangle inequality, relative to prefill's norm)
  // within 2 kAttnTol / (1 - kAttnTol) of each other.
  CHECK(rel_l2(dec, out) <= 2 * kAttnTol / (1 - kAttnTol));
}

}  // namespace

TEST_CASE("select_topk: against a full sort, ties to the lower index", "[sparse][topk]") {
  const std::uint64_t seed = test::fresh_seed();
  CAPTURE(seed);
  Rng rng(seed);
  for (int c = 0; c < 300 / kScale; ++c) {
    const std::int64_t n = rng.integer(0, 3000), K = rng.integer(1, 300);
    const int kind = static_cast<int>(rng.integer(0, 3));
    std::vector<float> row(sz(n));
    for (auto& x : row) {
      if (kind == 0) x = rng.normal();                                         // distinct
      else if (kind == 1) x = static_cast<float>(rng.integer(-3, 3));          // many ties
      else if (kind == 2) x = 1.f + 1e-7f * static_cast<float>(rng.integer(0, 5));  // one bin
      else x = rng.integer(0, 4) == 0 ? -kInf : rng.normal(1e-30f);            // -inf, tiny values
    }
    CAPTURE(n, K, kind);
    std::vector<std::int32_t> out(sz(K), -9);
    select_topk(row.data(), n, K, out.data());
    CHECK(out == ref::topk_row(row.data(), n, K));
  }
  std::vector<float> row{1.f, 3.f, 3.f, 2.f, 3.f};
  std::vector<std::int32_t> out(2);
  select_topk(row.data(), 5, 2, out.data());
  CHECK(out == std::vector<std::int32_t>{1, 2});
  select_topk(row.data(), 5, 1, out.data());
  CHECK(out[0] == 1);
  row[3] = kNaN;
  CHECK_THROWS_WITH(select_topk(row.data(), 5, 2, out.data()), Contains("NaN at index 3"));
  CHECK_THROWS_WITH(select_topk(row.data(), 5, 0, out.data()), Contains("'k': must be >= 1"));
}

TEST_CASE("indexer: scores and top-k against float64", "[sparse][indexer]") {
  const std::uint64_t seed = test::fresh_seed();
  CAPTURE(seed);
  Rng rng(seed);
  for (int c = 0; c < 40 / kScale; ++c) {
    const auto [H, d] = random_index_shape(rng);
    const std::int64_t T = rng.integer(1, 150 / kScale), T_k = T + rng.integer(0, 700 / kScale);
    const std::int64_t K = rng.integer(1, 200);
    CAPTURE(H, d, T, T_k, K);
    const auto p = IndexerProblem::random(rng, T, T_k, H, d);
    const auto ref = ref::indexer_scores(p.q, p.k, p.w, T, T_k, H, d, p.off);
    const auto s = scores(p);
    CHECK(score_error(s, ref) <= kScoreTol);
    CHECK(test::bit_equal(s, scores(p, 1)));
    // The model path selects exactly what the full matrix selects (same f32 scores) ...
    const auto idx = topk(p, K);
    std::vector<std::int32_t> from_matrix;
    for (std::int64_t t = 0; t < T; ++t) {
      const auto r = ref::topk_row(s.data() + t * T_k, p.off + t + 1, K);
      from_matrix.insert(from_matrix.end(), r.begin(), r.end());
    }
    CHECK(idx == from_matrix);
    CHECK(idx == topk(p, K, 1));
    // ... and a query that sees at most K keys keeps all of them.
    for (std::int64_t t = 0; t < T && p.off + t + 1 <= K; ++t)
      for (std::int64_t i = 0; i < K; ++i) CHECK(idx[sz(t * K + i)] == (i <= p.off + t ? i : -1));
  }
}

#if defined(ATTNKIT_INDEXER_VNNI)
// Rows of x [n, d] quantised as the fast indexer does (attention/quant.hpp), read back in float64.
std::vector<double> dequantised(const std::vector<float>& x, std::int64_t n, std::int64_t d, std::vector<double>& scale) {
  std::vector<double> y(x.size());
  std::vector<std::int8_t> code(sz(d));
  scale.resize(sz(n));
  for (std::int64_t r = 0; r < n; ++r) {
    float sc = 0.f;
    REQUIRE(detail::quant::quantize_row(x.data() + r * d, code.data(), sc, d));
    scale[sz(r)] = sc;
    for (std::int64_t e = 0; e < d; ++e) y[sz(r * d + e)] = static_cast<double>(code[sz(e)]) * sc;
  }
  return y;
}

TEST_CASE("indexer: Precision::fast (int8 on VNNI) against float64", "[sparse][indexer]") {
  const std::uint64_t seed = test::fresh_seed();
  CAPTURE(seed);
  Rng rng(seed);
  for (int c = 0; c < 30 / kScale; ++c) {
    const auto [H, d] = random_index_shape(rng);
    // At least 16 queries: fewer take the f32 path (checked below).
    const std::int64_t T = rng.integer(16, std::max<std::int64_t>(16, 120 / kScale)), T_k = T + rng.integer(0, 600 / kScale);
    const std::int64_t K = rng.integer(1, 150);
    CAPTURE(H, d, T, T_k, K);
    const auto p = IndexerProblem::random(rng, T, T_k, H, d);
    const auto s = scores(p, 0, Precision::fast);
    CHECK(test::bit_equal(s, scores(p, 1, Precision::fast)));
    // Exactly the scores of the dequantised vectors, to f32 rounding.
    std::vector<double> sq, sk;
    const auto qd = dequantised(p.q, T * H, d, sq), kd = dequantised(p.k, T_k, d, sk);
    std::vector<double> w(p.w.begin(), p.w.end());
    const auto ref_deq = ref::indexer_scores(qd, kd, w, T, T_k, H, d, p.off);
    CHECK(score_error(s, ref_deq) <= kScoreTol);
    // Within the quantisation bound of the exact scores: |q^·k^ - q·k| <= (s_q·|k|_1 + s_k·|q|_1)/2
    // + d·s_q·s_k/4 per index head, times |w| (ReLU does not enlarge a difference).
    const auto ref = ref::indexer_scores(p.q, p.k, p.w, T, T_k, H, d, p.off);
    std::vector<double> bound(sz(T * T_k), 0.0);
    double worst = 0;  // measured error / bound
    for (std::int64_t t = 0; t < T; ++t)
      for (std::int64_t k = 0; k <= p.off + t; ++k) {
        double b = 0, k1 = 0;
        for (std::int64_t e = 0; e < d; ++e) k1 += std::abs(p.k[sz(k * d + e)]);
        for (std::int64_t j = 0; j < H; ++j) {
          double q1 = 0;
          for (std::int64_t e = 0; e < d; ++e) q1 += std::abs(p.q[sz((t * H + j) * d + e)]);
          const double a = sq[sz(t * H + j)], bk = sk[sz(k)];
          b += std::abs(p.w[sz(t * H + j)]) * ((a * k1 + bk * q1) / 2 + static_cast<double>(d) * a * bk / 4);
        }
        const std::size_t i = sz(t * T_k + k);
        bound[i] = b;
        const double err = std::abs(static_cast<double>(s[i]) - ref[i]);
        CHECK(err <= b + 1e-5 * (1 + std::abs(ref[i])));
        worst = std::max(worst, err / (b + 1e-30));
      }
    CAPTURE(worst);
    // The model path selects what the fast score matrix selects ...
    const auto idx = topk(p, K, 0, Precision::fast);
    CHECK(idx == topk(p, K, 1, Precision::fast));
    for (std::int64_t t = 0; t < T; ++t) {
      const std::int64_t n = p.off + t + 1;
      const std::vector<std::int32_t> row(idx.begin() + t * K, idx.begin() + (t + 1) * K);
      if (n <= K) {  // keeps every key it sees, unscored
        for (std::int64_t i = 0; i < K; ++i) CHECK(row[sz(i)] == (i < n ? i : -1));
        continue;
      }
      CHECK(row == ref::topk_row(s.data() + t * T_k, n, K));
      // ... and every key it keeps lies within twice the bound of the exact K-th score.
      std::vector<double> exact(ref.begin() + t * T_k, ref.begin() + t * T_k + n);
      std::nth_element(exact.begin(), exact.begin() + (K - 1), exact.end(), std::greater<>());
      const double kth = exact[sz(K - 1)];
      double bmax = 0;
      for (std::int64_t k = 0; k < n; ++k) bmax = std::max(bmax, bound[sz(t * T_k + k)]);
      for (std::int32_t k : row) CHECK(ref[sz(t * T_k + k)] >= kth - 2 * bmax - 1e-5 * (1 + std::abs(kth)));
    }
  }
  Rng r2(11);
  // Fewer than 16 queries (decode): the f32 scores, bit for bit.
  auto p = IndexerProblem::random(r2, 15, 300, 16, 64);
  CHECK(test::bit_equal(scores(p, 0, Precision::fast), scores(p)));
  CHECK(topk(p, 40, 0, Precision::fast) == topk(p, 40));
  // A NaN or an infinity has no scale: named, not scored.
  p = IndexerProblem::random(r2, 20, 40, 3, 8);
  p.q[sz((2 * 3 + 1) * 8 + 5)] = kNaN;
  CHECK_THROWS_WITH(topk(p, 5, 0, Precision::fast), Contains("argument 'index_q': query 2, head 1 holds a NaN or an infinity"));
  p = IndexerProblem::random(r2, 20, 40, 3, 8);
  p.k[sz(17 * 8)] = kInf;
  CHECK_THROWS_WITH(scores(p, 0, Precision::fast), Contains("argument 'index_k': row 17 holds a NaN or an infinity"));
}
#endif

TEST_CASE("indexer: an explicit q_offset, strided views, validation", "[sparse][indexer]") {
  Rng rng(7);
  const std::int64_t T = 5, T_k = 40, H = 4, d = 8;
  auto p = IndexerProblem::random(rng, T, T_k, H, d);
  p.off = 20;
  const auto ref = ref::indexer_scores(p.q, p.k, p.w, T, T_k, H, d, 20);
  std::vector<float> s(sz(T * T_k));
  test::poison(s);
  IndexerOptions o;
  o.q_offset = 20;
  indexer_scores(p.qv(), p.kv(), p.wv(), View2<float>(s.data(), {T, T_k}), o);
  CHECK(score_error(s, ref) <= kScoreTol);
  std::vector<std::int32_t> idx(sz(T * 6));
  indexer_topk(p.qv(), p.kv(), p.wv(), View2<std::int32_t>(idx.data(), {T, 6}), o);
  for (std::int64_t t = 0; t < T; ++t) {
    const std::vector<std::int32_t> row(idx.begin() + t * 6, idx.begin() + (t + 1) * 6);
    CHECK(row == ref::topk_row(ref.data() + t * T_k, 21 + t, 6));
  }
  // Strided index keys (every other row of a wider buffer).
  std::vector<float> wide(sz(T_k * 2 * d));
  for (std::int64_t s2 = 0; s2 < T_k; ++s2) std::copy(p.k.begin() + s2 * d, p.k.begin() + (s2 + 1) * d, wide.begin() + s2 * 2 * d);
  std::vector<float> s2v(sz(T * T_k));
  indexer_scores(p.qv(), ConstView2<float>(wide.data(), {T_k, d}, {2 * d, 1}), p.wv(), View2<float>(s2v.data(), {T, T_k}), o);
  CHECK(test::bit_equal(s, s2v));

  const View2<float> sv(s.data(), {T, T_k});
  CHECK_THROWS_WITH(indexer_scores(p.qv(), ConstView2<float>(p.k.data(), {T_k / 2, 2 * d}), p.wv(), sv),
                    Contains("argument 'index_k': dimension 16 differs from index_q's head dimension 8"));
  CHECK_THROWS_WITH(indexer_scores(p.qv(), p.kv(), ConstView2<float>(p.w.data(), {T, H - 1}), sv),
                    Contains("argument 'index_w': shape [5, 3] must be [T, H_I] = [5, 4]"));
  o.q_offset = 36;
  CHECK_THROWS_WITH(indexer_scores(p.qv(), p.kv(), p.wv(), sv, o), Contains("5 queries at position 36 need 41 index keys"));
  CHECK_THROWS_WITH(indexer_topk(p.qv(), p.kv(), p.wv(), View2<std::int32_t>(idx.data(), {T, 0})),
                    Contains("argument 'indices': shape [5, 0] must be [T, K]"));
  CHECK_THROWS_WITH(indexer_scores(p.qv(), p.kv(), p.wv(), View2<float>(s.data(), {T, T_k - 1})),
                    Contains("argument 'score': shape [5, 39] must be [T, T_k] = [5, 40]"));
  p.k[3] = kNaN;
  CHECK_THROWS_WITH(topk(p, 6), Contains("NaN"));
}

TEST_CASE("sparse attention: random selections against float64 (f32 K/V)", "[sparse][attention]") {
  const std::uint64_t seed = test::fresh_seed();
  CAPTURE(seed);
  Rng rng(seed);
  for (int c = 0; c < 40 / kScale; ++c) check_attention_random<float>(rng);
}

TEST_CASE("sparse attention: random selections against float64 (bf16 K/V)", "[sparse][attention]") {
  const std::uint64_t seed = test::fresh_seed();
  CAPTURE(seed);
  Rng rng(seed);
  for (int c = 0; c < 40 / kScale; ++c) check_attention_random<bf16>(rng);
}

TEMPLATE_TEST_CASE("sparse attention: every key selected is dense causal attention", "[sparse][attention]", float, bf16) {
  const std::uint64_t seed = test::fresh_seed();
  CAPTURE(seed);
  Rng rng(seed);
  const std::int64_t T = 77 / kScale + 3, H = 6, H_kv = 2, dk = 72, dv = 40, K = T + 5;
  const auto p = AttnProblem<TestType>::random(rng, T, T, H, H_kv, dk, dv);
  std::vector<std::int32_t> all(sz(T * K), -1);
  for (std::int64_t t = 0; t < T; ++t)
    for (std::int64_t s = 0; s <= t; ++s) all[sz(t * K + s)] = static_cast<std::int32_t>(s);
  const auto out = p.prefill(all, K);
  std::vector<float> dense(sz(T * H * dv));
  attention_prefill<TestType>(ConstView3<float>(p.q.data(), {T, H, dk}), p.kview(), p.vview(),
                              View3<float>(dense.data(), {T, H, dv}));
  // Every query selects all it sees: the dense kernel computes them all, bit for bit.
  CHECK(test::bit_equal(out, dense));
  // The sparse kernels on full selections: query 0 drops its one key (an empty selection), so
  // no leading query is full and every other row goes through the sparse kernels.
  auto most = all;
  most[0] = -1;
  const auto out_sparse = p.prefill(most, K);
  const std::vector<float> rest(out_sparse.begin() + H * dv, out_sparse.end()), dense_rest(dense.begin() + H * dv, dense.end());
  CHECK(rel_l2(rest, dense_rest) <= kDenseTol);
  CHECK(std::all_of(out_sparse.begin(), out_sparse.begin() + H * dv, [](float x) { return x == 0.f; }));
  // Decode over every key is attention_decode, bit for bit (same chunks, same arithmetic).
  std::vector<float> o1(sz(H * dv)), o2(sz(H * dv));
  const ConstView2<float> q_last(p.q.data() + (T - 1) * H * dk, {H, dk});
  sparse_attention_decode<TestType>(q_last, p.kview(), p.vview(), ConstView1<std::int32_t>(all.data() + (T - 1) * K, {K}),
                                    View2<float>(o1.data(), {H, dv}));
  attention_decode<TestType>(q_last, p.kview(), p.vview(), View2<float>(o2.data(), {H, dv}));
  CHECK(test::bit_equal(o1, o2));
  // Top-k with K >= T through the indexer selects everything: the same dense result.
  auto ip = IndexerProblem::random(rng, T, T, 3, 16);
  const auto idx = topk(ip, K);
  CHECK(idx == all);
}

TEMPLATE_TEST_CASE("sparse attention: wide GQA groups and head dims past the key-major kernel", "[sparse][attention]", float,
                   bf16) {
  const std::uint64_t seed = test::fresh_seed();
  CAPTURE(seed);
  Rng rng(seed);
  // G 40 > the 16 dot products a flush reduces; G 12 fills a flush with one pair; d 264 / 300 take
  // the query-major kernel; d 256 the widest key-major one. Several KV heads: an item takes a group
  // of them, sized by the thread count (so the 1-thread run groups them differently).
  for (const auto& [H, H_kv, dk, dv] : std::vector<std::array<std::int64_t, 4>>{
           {40, 1, 24, 33}, {36, 3, 24, 33}, {4, 2, 264, 300}, {2, 1, 256, 256}, {7, 7, 20, 17}}) {
    const std::int64_t T = 37, T_k = 300, K = 70;
    CAPTURE(H, H_kv, dk, dv);
    const auto p = AttnProblem<TestType>::random(rng, T, T_k, H, H_kv, dk, dv);
    const auto idx = random_selection(rng, T, K, T_k - T, 0.4);
    std::vector<double> ref_out;
    check_prefill(p, idx, K, ref_out);
  }
}

// Random int8 K or V rows [T_k, H_kv, d]: codes, a scale per row, and the dequantised values
// (what the float64 reference sees).
struct QuantRows {
  std::int64_t T_k, H_kv, d;
  std::vector<std::int8_t> codes;
  std::vector<float> scales, deq;
  static QuantRows random(Rng& rng, std::int64_t T_k, std::int64_t H_kv, std::int64_t d, float q_scale = 1.f) {
    QuantRows r{T_k, H_kv, d, std::vector<std::int8_t>(sz(T_k * H_kv * d)), std::vector<float>(sz(T_k * H_kv)),
                rng.normal_vec(sz(T_k * H_kv * d))};
    for (auto& x : r.deq) x *= q_scale;
    for (std::int64_t i = 0; i < T_k * H_kv; ++i) {
      REQUIRE(detail::quant::quantize_row(r.deq.data() + i * d, r.codes.data() + i * d, r.scales[sz(i)], d));
      detail::quant::dequantize_row(r.codes.data() + i * d, r.scales[sz(i)], r.deq.data() + i * d, d);
    }
    return r;
  }
  QuantView3 view() const {
    return {ConstView3<std::int8_t>(codes.data(), {T_k, H_kv, d}), ConstView2<float>(scales.data(), {T_k, H_kv})};
  }
  std::vector<float> abs_deq() const {
    std::vector<float> a(deq);
    for (auto& x : a) x = std::fabs(x);
    return a;
  }
};

// int8 K/V (QuantView3): decode reads only the selected rows, with the int8 decode kernel.
// Against float64 over the dequantised rows within kAttnTol (measured against attention over
// |v|: test::err_vs_magnitude); selecting every key equals attention_decode on the QuantView3
// bit for bit; any thread count gives the same bits.
TEST_CASE("sparse attention: int8 K/V decode reads the selection in place", "[sparse][attention][int8]") {
  const auto seed = test::fresh_seed();
  CAPTURE(seed);
  Rng rng(seed);
  for (int c = 0; c < 20; ++c) {
    const std::int64_t H_kv = rng.integer(1, 3), G = rng.integer(1, 3), H = H_kv * G;
    const std::int64_t dk = rng.integer(1, 3) == 1 ? rng.integer(1, 20) : rng.integer(60, 140);
    const std::int64_t dv = rng.integer(0, 1) ? dk : rng.integer(1, 70);
    const std::int64_t T_k = rng.integer(1, 700 / kScale), K = rng.integer(1, 90);
    CAPTURE(c, H, H_kv, dk, dv, T_k, K);
    const auto kr = QuantRows::random(rng, T_k, H_kv, dk), vr = QuantRows::random(rng, T_k, H_kv, dv);
    const QuantView3 kq = kr.view(), vq = vr.view();
    const auto q = rng.normal_vec(sz(H * dk));
    const auto idx = random_selection(rng, 1, K, T_k - 1, rng.uniform(0.05f, 1.f));
    SparseAttentionOptions so;
    so.kv_chunk = rng.integer(0, 1) ? 0 : rng.integer(1, 40);
    std::vector<float> o(sz(H * dv)), o1(sz(H * dv));
    test::poison(o);
    test::poison(o1);
    sparse_attention_decode(ConstView2<float>(q.data(), {H, dk}), kq, vq, ConstView1<std::int32_t>(idx.data(), {K}),
                            View2<float>(o.data(), {H, dv}), so);
    std::vector<double> ref_out, ref_lse, mag_out;
    const double scale = 1.0 / std::sqrt(double(dk));
    ref::sparse_attention(q, kr.deq, vr.deq, idx, 1, K, H, H_kv, dk, dv, scale, ref_out, ref_lse);
    ref::sparse_attention(q, kr.deq, vr.abs_deq(), idx, 1, K, H, H_kv, dk, dv, scale, mag_out, ref_lse);
    CHECK(test::err_vs_magnitude(o, ref_out, mag_out) <= kAttnTol);
    so.num_threads = 1;
    sparse_attention_decode(ConstView2<float>(q.data(), {H, dk}), kq, vq, ConstView1<std::int32_t>(idx.data(), {K}),
                            View2<float>(o1.data(), {H, dv}), so);
    CHECK(test::bit_equal(o, o1));
  }
  // Every key selected: attention_decode on the int8 cache, bit for bit (same chunks).
  const std::int64_t T_k = 300 / kScale + 5, H = 4, H_kv = 2, d = 64;
  const auto kr = QuantRows::random(rng, T_k, H_kv, d), vr = QuantRows::random(rng, T_k, H_kv, d);
  const QuantView3 kq = kr.view(), vq = vr.view();
  const auto q = rng.normal_vec(sz(H * d));
  std::vector<std::int32_t> all(sz(T_k));
  for (std::int64_t s = 0; s < T_k; ++s) all[sz(s)] = static_cast<std::int32_t>(s);
  std::vector<float> a(sz(H * d)), b(sz(H * d));
  test::poison(a);
  test::poison(b);
  sparse_attention_decode(ConstView2<float>(q.data(), {H, d}), kq, vq, ConstView1<std::int32_t>(all.data(), {T_k}),
                          View2<float>(a.data(), {H, d}));
  attention_decode(ConstView2<float>(q.data(), {H, d}), kq, vq, View2<float>(b.data(), {H, d}));
  CHECK(test::bit_equal(a, b));
}

// int8 K/V prefill (QuantView3): the kernels read the codes in place. Exact: against float64 over
// the dequantised rows within kAttnTol (out against attention over |v|, lse as scores); any thread
// count gives the same bits; the leading run of full selections is attention_prefill on the
// QuantView3, bit for bit. Precision::fast (VNNI: the query quantised per token and head, the
// probabilities rounded to 8 bits for P·V): within kFastTol of float64 over the dequantised rows,
// and every row within kFastPvTol of sparse_attention_decode under fast (the same quantised query
// and integer q·k; decode keeps f32 probabilities). Measured over 20-30 runs: worst 3.5e-3 and
// 7.2e-3. Head dimensions past 256 take the query-major kernel over a dequantised copy.
TEST_CASE("sparse attention: int8 K/V prefill reads the codes in place", "[sparse][attention][int8]") {
  constexpr double kFastTol = 1.5e-2, kFastPvTol = 2e-2;
  const auto seed = test::fresh_seed();
  CAPTURE(seed);
  Rng rng(seed);
  for (int c = 0; c < 30 / kScale; ++c) {
    const std::int64_t H_kv = rng.integer(1, 3), G = rng.integer(1, 4), H = H_kv * G;
    const int shape = rng.integer(0, 5);
    const std::int64_t dk = shape == 0 ? rng.integer(1, 20) : shape == 5 ? 264 : rng.integer(60, 140);
    const std::int64_t dv = rng.integer(0, 1) ? dk : rng.integer(1, 70);
    const std::int64_t T = rng.integer(1, 70 / kScale), T_k = T + rng.integer(0, 400 / kScale);
    const bool leading = rng.integer(0, 2) == 0;  // the first queries select every key they see
    const std::int64_t K = leading ? T_k : rng.integer(1, 120);
    const double keep = rng.uniform(0.05f, 1.f);
    CAPTURE(c, H, H_kv, dk, dv, T, T_k, K, keep, leading);
    const auto kr = QuantRows::random(rng, T_k, H_kv, dk), vr = QuantRows::random(rng, T_k, H_kv, dv);
    const auto q = rng.normal_vec(sz(T * H * dk));
    auto idx = random_selection(rng, T, K, T_k - T, keep);
    const std::int64_t n_lead = leading ? rng.integer(1, T) : 0;
    for (std::int64_t t = 0; t < n_lead; ++t)
      for (std::int64_t s = 0; s <= T_k - T + t; ++s) idx[sz(t * K + s)] = static_cast<std::int32_t>(s);
    const auto run = [&](Precision precision, int threads, std::vector<float>* lse = nullptr) {
      std::vector<float> out(sz(T * H * dv));
      test::poison(out);
      SparseAttentionOptions o;
      o.precision = precision;
      o.num_threads = threads;
      View2<float> lv;
      if (lse) {
        lse->assign(sz(T * H), kNaN);
        lv = View2<float>(lse->data(), {T, H});
      }
      sparse_attention_prefill(ConstView3<float>(q.data(), {T, H, dk}), kr.view(), vr.view(),
                               ConstView2<std::int32_t>(idx.data(), {T, K}), View3<float>(out.data(), {T, H, dv}), o, lv);
      return out;
    };
    const double scale = 1.0 / std::sqrt(double(dk));
    std::vector<double> ref_out, ref_lse, mag_out, mag_lse;
    ref::sparse_attention(q, kr.deq, vr.deq, idx, T, K, H, H_kv, dk, dv, scale, ref_out, ref_lse);
    ref::sparse_attention(q, kr.deq, vr.abs_deq(), idx, T, K, H, H_kv, dk, dv, scale, mag_out, mag_lse);
    std::vector<float> lse;
    const auto out = run(Precision::exact, 0, &lse);
    CHECK(test::err_vs_magnitude(out, ref_out, mag_out) <= kAttnTol);
    CHECK(score_error(lse, ref_lse) <= kAttnTol);
    CHECK(test::bit_equal(out, run(Precision::exact, 1)));
    CHECK(test::bit_equal(out, run(Precision::exact, 2)));
    if (n_lead > 0) {  // the leading rows: attention_prefill on the int8 K/V
      std::vector<float> dense(sz(T * H * dv));
      attention_prefill(ConstView3<float>(q.data(), {T, H, dk}), kr.view(), vr.view(), View3<float>(dense.data(), {T, H, dv}));
      CHECK(test::bit_equal(std::vector<float>(out.begin(), out.begin() + n_lead * H * dv),
                            std::vector<float>(dense.begin(), dense.begin() + n_lead * H * dv)));
    }
    const auto fast = run(Precision::fast, 0);
    CHECK(test::err_vs_magnitude(fast, ref_out, mag_out) <= kFastTol);
    CHECK(test::bit_equal(fast, run(Precision::fast, 1)));
    // Decode under fast scores the same way as the key-major kernel: the rows past the leading
    // full selections (which may run past n_lead) when the head dimension is within its reach.
    const auto selected = [&](std::int64_t t) {
      return std::count_if(idx.begin() + t * K, idx.begin() + (t + 1) * K, [](std::int32_t x) { return x >= 0; });
    };
    std::int64_t n_full = 0;
    while (n_full < T && selected(n_full) == T_k - T + n_full + 1) ++n_full;
    for (std::int64_t t = n_full; t < T && dk <= 256; ++t) {
      std::vector<float> o(sz(H * dv));
      test::poison(o);
      SparseAttentionOptions so;
      so.q_offset = T_k - T + t;
      so.precision = Precision::fast;
      sparse_attention_decode(ConstView2<float>(q.data() + t * H * dk, {H, dk}), kr.view(), vr.view(),
                              ConstView1<std::int32_t>(idx.data() + t * K, {K}), View2<float>(o.data(), {H, dv}), so);
      const std::vector<float> row(fast.begin() + t * H * dv, fast.begin() + (t + 1) * H * dv);
      const std::vector<double> mag(mag_out.begin() + t * H * dv, mag_out.begin() + (t + 1) * H * dv);
      CHECK(test::err_vs_magnitude(row, std::vector<double>(o.begin(), o.end()), mag) <= kFastPvTol);
    }
  }
}

TEST_CASE("sparse attention: k = 1 picks one value row", "[sparse][attention]") {
  Rng rng(3);
  const std::int64_t T = 9, H = 4, H_kv = 2, d = 16;
  const auto p = AttnProblem<float>::random(rng, T, T, H, H_kv, d, d);
  std::vector<std::int32_t> idx(sz(T));
  for (std::int64_t t = 0; t < T; ++t) idx[sz(t)] = static_cast<std::int32_t>(t / 2);
  const auto out = p.prefill(idx, 1);
  for (std::int64_t t = 0; t < T; ++t)
    for (std::int64_t h = 0; h < H; ++h)
      for (std::int64_t e = 0; e < d; ++e)
        CHECK(out[sz((t * H + h) * d + e)] == p.vf[sz(((t / 2) * H_kv + h / 2) * d + e)]);
}

TEST_CASE("sparse attention: fixture sparse-a", "[sparse][fixture]") {
  const auto f = io::SafetensorsFile::open(std::string(ATTNKIT_TEST_DATA) + "/fixtures/sparse-a/sparse.safetensors");
  const auto& qs = f.tensor("q").shape;
  const auto& iqs = f.tensor("index_q").shape;
  const std::int64_t T = qs[0], H = qs[1], d = qs[2], H_kv = f.tensor("k").shape[1], H_I = iqs[1], d_I = iqs[2];
  const std::int64_t K = f.tensor("topk_indices").shape[1];
  IndexerProblem ip{T, T, H_I, d_I, 0, io::to_f32(f.tensor("index_q")), io::to_f32(f.tensor("index_k")),
                    io::to_f32(f.tensor("index_w"))};
  const auto ref_score = io::to_f32(f.tensor("index_score"));
  const auto s = scores(ip);
  std::vector<double> ref_d(ref_score.begin(), ref_score.end());
  CHECK(score_error(s, ref_d) <= 1e-5);
  const auto idx = topk(ip, K);
  const auto& ti = f.tensor("topk_indices");
  std::vector<std::int32_t> ref_idx(sz(T * K));
  for (std::int64_t i = 0; i < T * K; ++i) ref_idx[sz(i)] = static_cast<std::int32_t>(reinterpret_cast<const std::int64_t*>(ti.data)[i]);
  CHECK(idx == ref_idx);
  AttnProblem<float> ap{T, T, H, H_kv, d, d, io::to_f32(f.tensor("q")), io::to_f32(f.tensor("k")), io::to_f32(f.tensor("v")), {}, {}};
  ap.k = ap.kf;
  ap.v = ap.vf;
  const auto out = ap.prefill(idx, K);
  CHECK(rel_l2(out, io::to_f32(f.tensor("out"))) <= 1e-4);
}

TEST_CASE("sparse attention: validation", "[sparse][attention]") {
  Rng rng(5);
  const std::int64_t T = 4, T_k = 10, H = 4, H_kv = 2, d = 8, K = 3;
  const auto p = AttnProblem<float>::random(rng, T, T_k, H, H_kv, d, d);
  std::vector<float> out(sz(T * H * d));
  auto run = [&](std::vector<std::int32_t> idx) {
    sparse_attention_prefill<float>(ConstView3<float>(p.q.data(), {T, H, d}), p.kview(), p.vview(),
                                    ConstView2<std::int32_t>(idx.data(), {T, K}), View3<float>(out.data(), {T, H, d}));
  };
  CHECK_NOTHROW(run({0, 1, 6, -1, -1, -1, 7, -1, -1, 2, 8, 9}));
  CHECK_THROWS_WITH(run({0, 1, 7, -1, -1, -1, 7, -1, -1, 2, 8, 9}),
                    Contains("query 0 (position 6), entry 2 = 7 is after the query's position (causal)"));
  CHECK_THROWS_WITH(run({1, 0, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1}),
                    Contains("entry 1 = 0 is not above the entry before it (1; entries must be strictly ascending)"));
  CHECK_THROWS_WITH(run({0, -1, 3, -1, -1, -1, -1, -1, -1, -1, -1, -1}),
                    Contains("query 0, entry 2 = 3: after the first -1 every entry must be -1"));
  CHECK_THROWS_WITH(run({-2, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1}), Contains("entry 0 = -2"));
  std::vector<std::int32_t> idx(sz(T * K), -1);
  CHECK_THROWS_WITH(sparse_attention_prefill<float>(ConstView3<float>(p.q.data(), {T, H, d}), p.kview(), p.vview(),
                                                    ConstView2<std::int32_t>(idx.data(), {T - 1, K}),
                                                    View3<float>(out.data(), {T, H, d})),
                    Contains("argument 'indices': 3 rows, but q has T = 4"));
  CHECK_THROWS_WITH(sparse_attention_prefill<float>(ConstView3<float>(p.q.data(), {T, 3, d}), p.kview(), p.vview(),
                                                    ConstView2<std::int32_t>(idx.data(), {T, K}),
                                                    View3<float>(out.data(), {T, 3, d})),
                    Contains("H = 3 is not a multiple of the number of KV heads H_kv = 2"));
  SparseAttentionOptions o;
  o.q_offset = 8;
  CHECK_THROWS_WITH(sparse_attention_prefill<float>(ConstView3<float>(p.q.data(), {T, H, d}), p.kview(), p.vview(),
                                                    ConstView2<std::int32_t>(idx.data(), {T, K}),
                                                    View3<float>(out.data(), {T, H, d}), o),
                    Contains("4 queries at position 8 need 12 keys, but k has 10"));
  std::vector<std::int32_t> one{3, 10, -1};
  CHECK_THROWS_WITH(sparse_attention_decode<float>(ConstView2<float>(p.q.data(), {H, d}), p.kview(), p.vview(),
                                                   ConstView1<std::int32_t>(one.data(), {3}), View2<float>(out.data(), {H, d})),
                    Contains("entry 1 = 10 is past the last key (T_k = 10)"));
  // An empty selection: out 0, lse -inf.
  std::vector<float> o1(sz(H * d), kNaN), l1(sz(H), kNaN);
  std::vector<std::int32_t> none{-1, -1, -1};
  sparse_attention_decode<float>(ConstView2<float>(p.q.data(), {H, d}), p.kview(), p.vview(),
                                 ConstView1<std::int32_t>(none.data(), {3}), View2<float>(o1.data(), {H, d}), {},
                                 View1<float>(l1.data(), {H}));
  CHECK(std::all_of(o1.begin(), o1.end(), [](float x) { return x == 0.f; }));
  CHECK(std::all_of(l1.begin(), l1.end(), [](float x) { return x == -kInf; }));
}
