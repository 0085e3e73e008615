// Paged KV cache (attention/paged_kv.hpp) and batched decode / prefill over it
// (attention/batched_decode.hpp): random page tables (shuffled pages, shared prefix pages, pages
// listed ahead of need), lengths 0 to a few thousand, B 1 to 17, f32, bf16 and int8 pages; against the
// float64 oracle and bit for bit against the contiguous kernels; outputs poisoned with NaN.
#include <catch2/catch.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <memory>
#include <numeric>
#include <optional>
#include <vector>

#include "attnkit/attention/batched_decode.hpp"
#include "attnkit/attention/loop.hpp"
#include "attnkit/attention/routed.hpp"
#include "attnkit/sparse/sparse_attention.hpp"
#include "reference/decode_ref.hpp"
#include "reference/loop_ref.hpp"
#include "reference/sparse_ref.hpp"
#include "reference/variant_ref.hpp"
#include "test_util.hpp"
#include "variant_combos.hpp"

using namespace attnkit;
using attnkit::test::rel_l2;
using Catch::Contains;

namespace {

// bf16 Precision::fast takes the vdpbf16ps path on any build that has it, whatever the CPU's
// vendor (by default only AMD's, where it pays: decode.hpp's bf16_dot_pays).
const bool kBf16DotForced = (attnkit::detail::decode::bf16_dot_override() = 1, true);


#if defined(ATTNKIT_SANITIZED)
constexpr std::int64_t kMaxLen = 700;
constexpr int kRounds = 1;
#else
constexpr std::int64_t kMaxLen = 4200;
constexpr int kRounds = 2;
#endif

template <class KV>
float stored(float x) {
  if constexpr (std::is_same_v<KV, bf16>) return static_cast<float>(bf16(x));
  else return x;
}

// B sequences in a PagePool: each one's K/V as float (exactly as stored) and its page table.
template <class KV>
struct Batch {
  std::int64_t B, P, Hk, dk, dv;
  PagePool<KV> pool;
  std::vector<std::vector<float>> k, v;  // [L_b, Hk, d]
  std::vector<std::int64_t> indptr{0}, lengths;
  std::vector<std::int32_t> indices;
  PageTable table() const { return {indptr, indices, lengths}; }
};

// Sequences: an optional shared prefix of whole pages (written once), then each sequence's own
// tokens appended in one batched paged_append. Page ids are handed out in shuffled order.
template <class KV>
Batch<KV> make_batch(test::Rng& rng, std::int64_t B, std::int64_t P, std::int64_t Hk, std::int64_t dk,
                     std::int64_t dv, std::int64_t max_len) {
  std::vector<std::int64_t> own(static_cast<std::size_t>(B));
  std::vector<char> shares(static_cast<std::size_t>(B));
  const std::int64_t prefix_pages = rng.integer(0, 3), Lp = prefix_pages * P;
  std::int64_t need = prefix_pages;
  for (std::int64_t b = 0; b < B; ++b) {
    const int kind = static_cast<int>(rng.integer(0, 5));  // some empty, some tiny, most random
    own[b] = kind == 0 ? 0 : kind == 1 ? rng.integer(1, 3) : rng.integer(0, max_len);
    shares[b] = rng.integer(0, 1) == 1;
    need += (own[b] + (shares[b] ? Lp : 0) + P - 1) / P + 1;
  }
  Batch<KV> bt{B, P, Hk, dk, dv, PagePool<KV>(need + 3, P, Hk, dk, dv), {}, {}, {0}, {}, {}};
  std::vector<std::int32_t> ids;
  for (std::int64_t i = 0; i < need + 3; ++i) ids.push_back(bt.pool.allocate());
  std::shuffle(ids.begin(), ids.end(), rng.gen);
  std::size_t next = 0;
  const auto rows = [&](std::int64_t n) {
    std::vector<float> x = rng.normal_vec(static_cast<std::size_t>(n * Hk * dk));
    return x;
  };
  // The shared prefix.
  std::vector<std::int32_t> pre(ids.begin(), ids.begin() + prefix_pages);
  next = static_cast<std::size_t>(prefix_pages);
  std::vector<float> pk = rows(Lp), pv = rng.normal_vec(static_cast<std::size_t>(Lp * Hk * dv));
  paged_append(bt.pool.view(), std::span<const std::int32_t>(pre), 0, ConstView3<float>(pk.data(), {Lp, Hk, dk}),
               ConstView3<float>(pv.data(), {Lp, Hk, dv}));
  // Each sequence's own tokens, appended together.
  std::vector<std::int64_t> cu{0};
  std::vector<float> ak, av;
  for (std::int64_t b = 0; b < B; ++b) {
    const std::int64_t start = shares[b] ? Lp : 0, L = start + own[b];
    if (shares[b]) bt.indices.insert(bt.indices.end(), pre.begin(), pre.end());
    const std::int64_t n_own_pages = (L + P - 1) / P - (shares[b] ? prefix_pages : 0) + rng.integer(0, 1);
    for (std::int64_t p = 0; p < n_own_pages; ++p) bt.indices.push_back(ids[next++]);
    bt.indptr.push_back(static_cast<std::int64_t>(bt.indices.size()));
    bt.lengths.push_back(start);
    std::vector<float> kb = rows(own[b]), vb = rng.normal_vec(static_cast<std::size_t>(own[b] * Hk * dv));
    ak.insert(ak.end(), kb.begin(), kb.end());
    av.insert(av.end(), vb.begin(), vb.end());
    cu.push_back(cu.back() + own[b]);
    std::vector<float> fk(pk.begin(), pk.begin() + start * Hk * dk), fv(pv.begin(), pv.begin() + start * Hk * dv);
    fk.insert(fk.end(), kb.begin(), kb.end());
    fv.insert(fv.end(), vb.begin(), vb.end());
    for (auto& x : fk) x = stored<KV>(x);
    for (auto& x : fv) x = stored<KV>(x);
    bt.k.push_back(std::move(fk));
    bt.v.push_back(std::move(fv));
  }
  // On 1 or 2 threads (rows spread over threads from kParallelAppendRows on): every stored row
  // is read back through the kernels against bt.k / bt.v.
  paged_append(bt.pool.view(), bt.table(), cu, ConstView3<float>(ak.data(), {cu.back(), Hk, dk}),
               ConstView3<float>(av.data(), {cu.back(), Hk, dv}), static_cast<int>(rng.integer(1, 2)));
  for (std::int64_t b = 0; b < B; ++b) bt.lengths[b] += own[b];
  return bt;
}

// Contiguous copy of sequence b's keys or values as stored.
template <class KV>
std::vector<KV> as_kv(const std::vector<float>& f) {
  std::vector<KV> x(f.size());
  for (std::size_t i = 0; i < f.size(); ++i) x[i] = KV(f[i]);
  return x;
}

template <class KV>
void check_decode(std::uint64_t seed, std::int64_t P, std::int64_t H, std::int64_t Hk, std::int64_t dk,
                  std::int64_t dv, Precision precision = Precision::exact) {
  CAPTURE(seed, P, H, Hk, dk, dv, static_cast<int>(precision));
  // fast (bf16: vdpbf16ps) against float64: the bound of tests/test_attention_decode.cpp's bf16
  // fast case; against the contiguous kernel with the same precision: the same bits.
  const bool fast = precision == Precision::fast;
  test::Rng rng(seed);
  const std::int64_t B = rng.integer(1, 17);
  CAPTURE(B);
  Batch<KV> bt = make_batch<KV>(rng, B, P, Hk, dk, dv, kMaxLen);
  CAPTURE(bt.lengths);
  const std::vector<float> q = rng.normal_vec(static_cast<std::size_t>(B * H * dk));
  const PagedKV<KV> cache = bt.pool.view();
  DecodeOptions opt;
  opt.kv_chunk = P * rng.integer(1, 512 / P + 2);
  opt.precision = precision;
  CAPTURE(opt.kv_chunk);
  std::vector<float> first_out, first_lse;
  for (int threads : {1, 2, 3}) {
    CAPTURE(threads);
    opt.num_threads = threads;
    std::vector<float> out(static_cast<std::size_t>(B * H * dv)), lse(static_cast<std::size_t>(B * H));
    test::poison(out);
    test::poison(lse);
    attention_decode_paged<KV>(ConstView3<float>(q.data(), {B, H, dk}), cache, bt.table(),
                               View3<float>(out.data(), {B, H, dv}), opt, View2<float>(lse.data(), {B, H}));
    if (threads == 1) {
      first_out = out;
      first_lse = lse;
      {  // The same pages in the caller's own NHD buffer ([page][token][head][d], vLLM's layout): same bits.
        const std::int64_t N = bt.pool.num_pages();
        std::vector<KV> kn(static_cast<std::size_t>(N * P * Hk * dk)), vn(static_cast<std::size_t>(N * P * Hk * dv));
        for (std::int64_t pg = 0; pg < N; ++pg)
          for (std::int64_t r = 0; r < P; ++r)
            for (std::int64_t h = 0; h < Hk; ++h) {
              std::copy_n(cache.k.ptr(pg, r, h), dk, kn.data() + ((pg * P + r) * Hk + h) * dk);
              std::copy_n(cache.v.ptr(pg, r, h), dv, vn.data() + ((pg * P + r) * Hk + h) * dv);
            }
        const PagedKV<KV> nhd{ConstView4<KV>(kn.data(), {N, P, Hk, dk}), ConstView4<KV>(vn.data(), {N, P, Hk, dv})};
        std::vector<float> o2(out.size());
        test::poison(o2);
        attention_decode_paged<KV>(ConstView3<float>(q.data(), {B, H, dk}), nhd, bt.table(),
                                   View3<float>(o2.data(), {B, H, dv}), opt);
        CHECK(test::bit_equal(o2, out));
      }
      for (std::int64_t b = 0; b < B; ++b) {
        CAPTURE(b);
        const std::int64_t L = bt.lengths[b];
        const std::vector<float> qb(q.begin() + b * H * dk, q.begin() + (b + 1) * H * dk);
        const auto ref = test::reference_decode(qb, bt.k[b], bt.v[b], L, H, Hk, dk, dv, 1.0 / std::sqrt(double(dk)));
        const std::vector<float> ob(out.begin() + b * H * dv, out.begin() + (b + 1) * H * dv);
        CHECK(rel_l2(ob, ref.out) <= (fast ? 2e-2 : 1e-5));
        for (std::int64_t h = 0; h < H; ++h) {
          if (L == 0) CHECK(lse[b * H + h] == -std::numeric_limits<float>::infinity());
          else CHECK(std::abs(lse[b * H + h] - ref.lse[h]) <= (fast ? 2e-2 : 1e-4) * std::max(1.0, std::abs(ref.lse[h])));
        }
        // Bit for bit the single-sequence kernel on a contiguous copy, same chunk.
        const std::vector<KV> kc = as_kv<KV>(bt.k[b]), vc = as_kv<KV>(bt.v[b]);
        std::vector<float> oc(static_cast<std::size_t>(H * dv)), lc(static_cast<std::size_t>(H));
        test::poison(oc);
        DecodeOptions o1 = opt;
        o1.num_threads = 2;
        attention_decode<KV>(ConstView2<float>(qb.data(), {H, dk}), ConstView3<KV>(kc.data(), {L, Hk, dk}),
                             ConstView3<KV>(vc.data(), {L, Hk, dv}), View2<float>(oc.data(), {H, dv}), o1,
                             View1<float>(lc.data(), {H}));
        CHECK(test::bit_equal(ob, oc));
        CHECK(test::bit_equal(std::vector<float>(lse.begin() + b * H, lse.begin() + (b + 1) * H), lc));
      }
    } else {
      CHECK(test::bit_equal(out, first_out));
      CHECK(test::bit_equal(lse, first_lse));
    }
  }
  // A sliding window: each sequence sees its last W keys. Table entries of pages wholly below
  // a window point at a page no sequence uses, filled with NaN (as an engine may free those
  // pages and reuse the entries): they must never be read.
  const std::int64_t W = rng.integer(1, 700);
  CAPTURE(W);
  std::int32_t nan_page = 0;
  while (std::count(bt.indices.begin(), bt.indices.end(), nan_page) != 0) ++nan_page;  // make_batch leaves spares
  std::vector<std::int32_t> cut = bt.indices;
  for (std::int64_t b = 0; b < B; ++b)
    for (std::int64_t pg = 0; pg < std::max<std::int64_t>(0, bt.lengths[b] - W) / P; ++pg) cut[bt.indptr[b] + pg] = nan_page;
  std::vector<KV> kcopy, vcopy;  // the pool's pages, NHD, nan_page NaN
  {
    const std::int64_t N = bt.pool.num_pages();
    const KV nan = KV(std::numeric_limits<float>::quiet_NaN());
    kcopy.resize(static_cast<std::size_t>(N * P * Hk * dk));
    vcopy.resize(static_cast<std::size_t>(N * P * Hk * dv));
    for (std::int64_t pg = 0; pg < N; ++pg)
      for (std::int64_t r = 0; r < P; ++r)
        for (std::int64_t h = 0; h < Hk; ++h) {
          KV* kd = kcopy.data() + ((pg * P + r) * Hk + h) * dk;
          KV* vd = vcopy.data() + ((pg * P + r) * Hk + h) * dv;
          if (pg == nan_page) {
            std::fill(kd, kd + dk, nan);
            std::fill(vd, vd + dv, nan);
          } else {
            std::copy_n(cache.k.ptr(pg, r, h), dk, kd);
            std::copy_n(cache.v.ptr(pg, r, h), dv, vd);
          }
        }
  }
  const std::int64_t N = bt.pool.num_pages();
  const PagedKV<KV> wc{ConstView4<KV>(kcopy.data(), {N, P, Hk, dk}), ConstView4<KV>(vcopy.data(), {N, P, Hk, dv})};
  const PageTable wt{bt.indptr, cut, bt.lengths};
  std::vector<float> w1(static_cast<std::size_t>(B * H * dv)), w2(w1.size()), wl(static_cast<std::size_t>(B * H));
  for (int threads : {1, 2}) {
    auto& o = threads == 1 ? w1 : w2;
    test::poison(o);
    opt.num_threads = threads;
    attention_decode_paged<KV>(ConstView3<float>(q.data(), {B, H, dk}), wc, wt, View3<float>(o.data(), {B, H, dv}), opt,
                               View2<float>(wl.data(), {B, H}), W);
  }
  CHECK(test::bit_equal(w1, w2));
  for (std::int64_t b = 0; b < B; ++b) {
    CAPTURE(b);
    const std::int64_t L = bt.lengths[b];
    const std::vector<float> qb(q.begin() + b * H * dk, q.begin() + (b + 1) * H * dk);
    const auto ref = test::reference_decode(qb, bt.k[b], bt.v[b], L, H, Hk, dk, dv, 1.0 / std::sqrt(double(dk)),
                                            std::max<std::int64_t>(0, L - W));
    CHECK(rel_l2(std::vector<float>(w2.begin() + b * H * dv, w2.begin() + (b + 1) * H * dv), ref.out) <=
          (fast ? 2e-2 : 1e-5));
  }
}

template <class KV, class Mask>
void check_prefill(std::uint64_t seed, std::int64_t P, const Mask& mask) {
  constexpr std::int64_t H = 4, Hk = 2, dk = 64, dv = 32;
  CAPTURE(seed, P);
  test::Rng rng(seed);
  const std::int64_t B = rng.integer(1, 9);
  Batch<KV> bt = make_batch<KV>(rng, B, P, Hk, dk, dv, kMaxLen / 2);
  CAPTURE(B, bt.lengths);
  // The last n_b tokens of each sequence are its new tokens (a chunk of a prompt).
  std::vector<std::int64_t> cu{0};
  for (std::int64_t b = 0; b < B; ++b) cu.push_back(cu.back() + rng.integer(0, std::min<std::int64_t>(bt.lengths[b], 70)));
  const std::int64_t T = cu.back();
  const std::vector<float> q = rng.normal_vec(static_cast<std::size_t>(T * H * dk));
  std::vector<float> out(static_cast<std::size_t>(T * H * dv)), lse(static_cast<std::size_t>(T * H));
  test::poison(out);
  test::poison(lse);
  AttentionOptions opt;
  opt.num_threads = 2;
  attention_prefill_paged<KV>(ConstView3<float>(q.data(), {T, H, dk}), bt.pool.view(), bt.table(), cu,
                              View3<float>(out.data(), {T, H, dv}), mask, opt, View2<float>(lse.data(), {T, H}));
  const double scale = 1.0 / std::sqrt(double(dk));
  for (std::int64_t b = 0; b < B; ++b) {
    CAPTURE(b);
    const std::int64_t n = cu[b + 1] - cu[b], L = bt.lengths[b];
    if (n == 0) continue;
    // Bit for bit attention_prefill on the contiguous keys.
    const std::vector<KV> kc = as_kv<KV>(bt.k[b]), vc = as_kv<KV>(bt.v[b]);
    std::vector<float> oc(static_cast<std::size_t>(n * H * dv)), lc(static_cast<std::size_t>(n * H));
    AttentionOptions o1;
    o1.q_offset = L - n;
    attention_prefill<KV>(ConstView3<float>(q.data() + cu[b] * H * dk, {n, H, dk}),
                          ConstView3<KV>(kc.data(), {L, Hk, dk}), ConstView3<KV>(vc.data(), {L, Hk, dv}),
                          View3<float>(oc.data(), {n, H, dv}), mask, o1, View2<float>(lc.data(), {n, H}));
    CHECK(test::bit_equal(std::vector<float>(out.begin() + cu[b] * H * dv, out.begin() + cu[b + 1] * H * dv), oc));
    CHECK(test::bit_equal(std::vector<float>(lse.begin() + cu[b] * H, lse.begin() + cu[b + 1] * H), lc));
    // float64 oracle on the first and last rows of the sequence.
    for (std::int64_t t : {std::int64_t{0}, n - 1}) {
      const std::int64_t p = L - n + t;
      const std::vector<float> qt(q.begin() + (cu[b] + t) * H * dk, q.begin() + (cu[b] + t + 1) * H * dk);
      const auto ref = test::reference_decode(qt, bt.k[b], bt.v[b], p + 1, H, Hk, dk, dv, scale, mask.first_key(p));
      const std::vector<float> ot(out.begin() + (cu[b] + t) * H * dv, out.begin() + (cu[b] + t + 1) * H * dv);
      CHECK(rel_l2(ot, ref.out) <= 1e-5);
    }
  }
}

// int8 pages: sequence b's codes and scales read back through its page table, as a contiguous
// int8 cache would hold them ([L, Hk, d] codes, [L, Hk] scales), and their dequantised values.
struct QuantSeq {
  std::vector<std::int8_t> kc, vc;
  std::vector<float> ks, vs, kf, vf;  // scales; dequantised rows (code · scale, f32)
  QuantView3 keys(std::int64_t L, std::int64_t Hk, std::int64_t dk) const {
    return {ConstView3<std::int8_t>(kc.data(), {L, Hk, dk}), ConstView2<float>(ks.data(), {L, Hk})};
  }
  QuantView3 values(std::int64_t L, std::int64_t Hk, std::int64_t dv) const {
    return {ConstView3<std::int8_t>(vc.data(), {L, Hk, dv}), ConstView2<float>(vs.data(), {L, Hk})};
  }
};

// c: the pool's pages, or other int8 pages under the same page ids (Loop Attention's stack reading).
QuantSeq read_quant(const Batch<std::int8_t>& bt, std::int64_t b, const PagedKV<std::int8_t>& c) {
  const std::int64_t L = bt.lengths[b], Hk = bt.Hk, dk = bt.dk, dv = bt.dv, P = bt.P;
  QuantSeq q;
  for (std::int64_t s = 0; s < L; ++s) {
    const std::int32_t pg = bt.indices[bt.indptr[b] + s / P];
    for (std::int64_t h = 0; h < Hk; ++h) {
      const float ks = c.k_scale(pg, s % P, h), vs = c.v_scale(pg, s % P, h);
      q.ks.push_back(ks);
      q.vs.push_back(vs);
      for (std::int64_t e = 0; e < dk; ++e) {
        q.kc.push_back(c.k(pg, s % P, h, e));
        q.kf.push_back(static_cast<float>(c.k(pg, s % P, h, e)) * ks);
      }
      for (std::int64_t e = 0; e < dv; ++e) {
        q.vc.push_back(c.v(pg, s % P, h, e));
        q.vf.push_back(static_cast<float>(c.v(pg, s % P, h, e)) * vs);
      }
    }
  }
  return q;
}
QuantSeq read_quant(const Batch<std::int8_t>& bt, std::int64_t b) { return read_quant(bt, b, bt.pool.view()); }

// int8 pages: paged_append stores quantize_row's codes and scales; decode (exact and fast)
// equals attention_decode on the same int8 rows held contiguously, bit for bit and for any
// thread count, and matches float64 attention over the dequantised rows; a sliding window
// too; prefill equals attention_prefill over the dequantised rows bit for bit.
void check_int8_pages(std::uint64_t seed, std::int64_t P, std::int64_t H, std::int64_t Hk, std::int64_t dk, std::int64_t dv) {
  CAPTURE(seed, P, H, Hk, dk, dv);
  test::Rng rng(seed);
  const std::int64_t B = rng.integer(1, 17);
  Batch<std::int8_t> bt = make_batch<std::int8_t>(rng, B, P, Hk, dk, dv, kMaxLen);  // bt.k / bt.v: unquantised
  CAPTURE(B, bt.lengths);
  std::vector<QuantSeq> qs;
  for (std::int64_t b = 0; b < B; ++b) {
    qs.push_back(read_quant(bt, b));
    // The stored rows are quantize_row's.
    bool same = true;
    std::vector<std::int8_t> code(static_cast<std::size_t>(std::max(dk, dv)));
    for (std::int64_t r = 0; r < bt.lengths[b] * Hk; ++r) {
      float sc = 0.f;
      REQUIRE(detail::quant::quantize_row(bt.k[b].data() + r * dk, code.data(), sc, dk));
      same &= sc == qs[b].ks[r] && std::equal(code.begin(), code.begin() + dk, qs[b].kc.begin() + r * dk);
      REQUIRE(detail::quant::quantize_row(bt.v[b].data() + r * dv, code.data(), sc, dv));
      same &= sc == qs[b].vs[r] && std::equal(code.begin(), code.begin() + dv, qs[b].vc.begin() + r * dv);
    }
    CHECK(same);
  }
  const std::vector<float> q = rng.normal_vec(static_cast<std::size_t>(B * H * dk));
  const double scale = 1.0 / std::sqrt(double(dk));
  for (Precision precision : {Precision::exact, Precision::fast}) {
    CAPTURE(static_cast<int>(precision));
    DecodeOptions opt;
    opt.kv_chunk = P * rng.integer(1, 512 / P + 2);
    opt.precision = precision;
    const std::int64_t W = rng.integer(0, 1) ? rng.integer(1, 700) : 0;
    CAPTURE(opt.kv_chunk, W);
    std::vector<float> first;
    for (int threads : {1, 2, 3}) {
      opt.num_threads = threads;
      std::vector<float> out(static_cast<std::size_t>(B * H * dv)), lse(static_cast<std::size_t>(B * H));
      test::poison(out);
      test::poison(lse);
      attention_decode_paged<std::int8_t>(ConstView3<float>(q.data(), {B, H, dk}), bt.pool.view(), bt.table(),
                                          View3<float>(out.data(), {B, H, dv}), opt, View2<float>(lse.data(), {B, H}), W);
      if (threads > 1) {
        CHECK(test::bit_equal(out, first));
        continue;
      }
      first = out;
      for (std::int64_t b = 0; b < B; ++b) {
        CAPTURE(b);
        const std::int64_t L = bt.lengths[b], w0 = W > 0 ? std::max<std::int64_t>(0, L - W) : 0;
        const std::vector<float> qb(q.begin() + b * H * dk, q.begin() + (b + 1) * H * dk);
        const std::vector<float> ob(out.begin() + b * H * dv, out.begin() + (b + 1) * H * dv);
        const auto ref = test::reference_decode(qb, qs[b].kf, qs[b].vf, L, H, Hk, dk, dv, scale, w0);
        // exact: attention over the dequantised rows; fast: also the query's rounding (the
        // contiguous kernel's bound, tests/test_attention_decode.cpp).
        CHECK(rel_l2(ob, ref.out) <= (precision == Precision::exact ? 1e-5 : 4e-2));
        if (W == 0) {  // bit for bit the contiguous int8 kernel, same chunk
          std::vector<float> oc(static_cast<std::size_t>(H * dv));
          test::poison(oc);
          DecodeOptions o1 = opt;
          o1.num_threads = 2;
          attention_decode(ConstView2<float>(qb.data(), {H, dk}), qs[b].keys(L, Hk, dk), qs[b].values(L, Hk, dv),
                           View2<float>(oc.data(), {H, dv}), o1);
          CHECK(test::bit_equal(ob, oc));
        }
      }
    }
  }
  // Prefill: the last n_b tokens of each sequence, against attention_prefill over the
  // dequantised rows bit for bit (the pages are read in place, widened as the tiles are packed).
  std::vector<std::int64_t> cu{0};
  for (std::int64_t b = 0; b < B; ++b) cu.push_back(cu.back() + rng.integer(0, std::min<std::int64_t>(bt.lengths[b], 40)));
  const std::int64_t T = cu.back();
  const std::vector<float> qp = rng.normal_vec(static_cast<std::size_t>(T * H * dk));
  // Causal and sliding window, exact and fast (on AMX: the dequantised rows rounded to bf16 in
  // both paths; elsewhere fast is the exact kernel).
  for (const std::int64_t W : {std::int64_t{0}, rng.integer(1, 50)})
    for (const Precision prec : {Precision::exact, Precision::fast}) {
      CAPTURE(W, static_cast<int>(prec));
      std::vector<float> out(static_cast<std::size_t>(T * H * dv));
      test::poison(out);
      AttentionOptions opt;
      opt.num_threads = 2;
      opt.precision = prec;
      const auto paged = [&](const auto& mask) {
        attention_prefill_paged<std::int8_t>(ConstView3<float>(qp.data(), {T, H, dk}), bt.pool.view(), bt.table(), cu,
                                             View3<float>(out.data(), {T, H, dv}), mask, opt);
      };
      if (W == 0) paged(CausalMask{});
      else paged(SlidingWindowMask{W});
      for (std::int64_t b = 0; b < B; ++b) {
        const std::int64_t n = cu[b + 1] - cu[b], L = bt.lengths[b];
        if (n == 0) continue;
        CAPTURE(b);
        std::vector<float> oc(static_cast<std::size_t>(n * H * dv));
        AttentionOptions o1;
        o1.q_offset = L - n;
        o1.precision = prec;
        const auto contiguous = [&](const auto& mask) {
          attention_prefill<float>(ConstView3<float>(qp.data() + cu[b] * H * dk, {n, H, dk}),
                                   ConstView3<float>(qs[b].kf.data(), {L, Hk, dk}),
                                   ConstView3<float>(qs[b].vf.data(), {L, Hk, dv}), View3<float>(oc.data(), {n, H, dv}),
                                   mask, o1);
        };
        if (W == 0) contiguous(CausalMask{});
        else contiguous(SlidingWindowMask{W});
        CHECK(test::bit_equal(std::vector<float>(out.begin() + cu[b] * H * dv, out.begin() + cu[b + 1] * H * dv), oc));
      }
    }
}

// Attention variants over pages (every combination of tests/variant_combos.hpp): batched decode
// (all keys, or a sliding window) and paged prefill (causal or sliding), f32, bf16 and int8 pages,
// random shapes and pages; against the float64 oracle (tests/reference/variant_ref.hpp, the
// contiguous variant tests' 2e-5 bound) and bit for bit against the contiguous kernels with the
// same variant (decode: each sequence's output-scale row; prefill: its rows).
template <class KV>
void check_variants_paged(std::uint64_t seed) {
  CAPTURE(seed);
  test::Rng rng(seed);
  const std::int64_t P = std::int64_t{1} << rng.integer(0, 5), Hk = rng.integer(1, 3), H = Hk * rng.integer(1, 4);
  const std::int64_t dk = rng.integer(0, 1) ? rng.integer(3, 40) : 16 * rng.integer(1, 8) + rng.integer(0, 1);
  const std::int64_t dv = rng.integer(0, 1) ? dk : rng.integer(5, 70), B = rng.integer(1, 9);
  CAPTURE(P, H, Hk, dk, dv, B);
  Batch<KV> bt = make_batch<KV>(rng, B, P, Hk, dk, dv, kMaxLen / 4);
  CAPTURE(bt.lengths);
  // Each sequence's rows as the kernels see them (int8: code · scale) and, for int8, its codes.
  constexpr bool quant = std::is_same_v<KV, std::int8_t>;
  std::vector<QuantSeq> qs;
  std::vector<std::vector<float>> kf = bt.k, vf = bt.v;
  if constexpr (quant)
    for (std::int64_t b = 0; b < B; ++b) {
      qs.push_back(read_quant(bt, b));
      kf[b] = qs[b].kf;
      vf[b] = qs[b].vf;
    }
  const double scale = 1.0 / std::sqrt(double(dk));

  // Decode: one query per sequence; the output scale has a row per sequence.
  const std::vector<float> q = rng.normal_vec(static_cast<std::size_t>(B * H * dk));
  const test::VariantInputs vd(rng, H, dk, B);
  const std::int64_t W = rng.integer(0, 1) ? rng.integer(1, 300) : 0;
  DecodeOptions opt;
  opt.kv_chunk = P * rng.integer(1, 512 / P + 2);
  CAPTURE(W, opt.kv_chunk);
  for (test::Combo c : test::kCombos) {
    INFO("decode, variant " << test::combo_name(c));
    std::vector<float> out(static_cast<std::size_t>(B * H * dv)), lse(static_cast<std::size_t>(B * H)), out2(out.size());
    test::poison(out), test::poison(lse), test::poison(out2);
    test::with_variant(vd, c, [&](const auto& var) {
      opt.num_threads = 1;
      attention_decode_paged<KV>(ConstView3<float>(q.data(), {B, H, dk}), bt.pool.view(), bt.table(),
                                 View3<float>(out.data(), {B, H, dv}), opt, View2<float>(lse.data(), {B, H}), W, var);
      opt.num_threads = 2;
      attention_decode_paged<KV>(ConstView3<float>(q.data(), {B, H, dk}), bt.pool.view(), bt.table(),
                                 View3<float>(out2.data(), {B, H, dv}), opt, {}, W, var);
    });
    CHECK(test::bit_equal(out, out2));
    for (std::int64_t b = 0; b < B; ++b) {
      CAPTURE(b);
      const std::int64_t L = bt.lengths[b];
      const std::vector<float> qb(q.begin() + b * H * dk, q.begin() + (b + 1) * H * dk);
      const std::vector<float> ob(out.begin() + b * H * dv, out.begin() + (b + 1) * H * dv),
          lb(lse.begin() + b * H, lse.begin() + (b + 1) * H);
      const auto want = ref::variant_attention(qb, kf[b], vf[b], 1, L, H, Hk, dk, dv, L - 1, W, scale,
                                               test::variant_params(vd, c, b, 1));
      CHECK(rel_l2(ob, want.out) < 2e-5);
      CHECK(test::lse_close(want.lse, lb));
      if (W > 0) continue;  // a window's chunks keep their positions: not the contiguous kernel's split
      std::vector<float> oc(static_cast<std::size_t>(H * dv)), lc(static_cast<std::size_t>(H));
      test::poison(oc), test::poison(lc);
      test::with_variant(vd, c, [&](const auto& var) {
        DecodeOptions o1 = opt;
        o1.num_threads = 2;
        const ConstView2<float> q1(qb.data(), {H, dk});
        const View2<float> out1(oc.data(), {H, dv});
        const View1<float> lse1(lc.data(), {H});
        if constexpr (quant) {
          attention_decode(q1, qs[b].keys(L, Hk, dk), qs[b].values(L, Hk, dv), out1, o1, lse1, var);
        } else {
          const std::vector<KV> kc = as_kv<KV>(bt.k[b]), vc = as_kv<KV>(bt.v[b]);
          attention_decode<KV>(q1, ConstView3<KV>(kc.data(), {L, Hk, dk}), ConstView3<KV>(vc.data(), {L, Hk, dv}), out1,
                               o1, lse1, var);
        }
      }, b, 1);
      CHECK(test::bit_equal(ob, oc));
      CHECK(test::bit_equal(lb, lc));
    }
  }

  // Prefill: the last n_b tokens of each sequence; the output scale has a row per packed token.
  std::vector<std::int64_t> cu{0};
  for (std::int64_t b = 0; b < B; ++b) cu.push_back(cu.back() + rng.integer(0, std::min<std::int64_t>(bt.lengths[b], 9)));
  const std::int64_t T = cu.back(), Wp = rng.integer(0, 1) ? rng.integer(1, 60) : 0;
  CAPTURE(T, Wp);
  const std::vector<float> qp = rng.normal_vec(static_cast<std::size_t>(T * H * dk));
  const test::VariantInputs vp(rng, H, dk, T);
  for (test::Combo c : test::kCombos) {
    INFO("prefill, variant " << test::combo_name(c));
    std::vector<float> out(static_cast<std::size_t>(T * H * dv)), lse(static_cast<std::size_t>(T * H));
    test::poison(out), test::poison(lse);
    AttentionOptions opt2;
    opt2.num_threads = 2;
    test::with_variant(vp, c, [&](const auto& var) {
      const auto run = [&](const auto& mask) {
        attention_prefill_paged<KV>(ConstView3<float>(qp.data(), {T, H, dk}), bt.pool.view(), bt.table(), cu,
                                    View3<float>(out.data(), {T, H, dv}), mask, opt2, View2<float>(lse.data(), {T, H}), var);
      };
      if (Wp > 0) run(SlidingWindowMask{Wp});
      else run(CausalMask{});
    });
    for (std::int64_t b = 0; b < B; ++b) {
      const std::int64_t n = cu[b + 1] - cu[b], L = bt.lengths[b];
      if (n == 0) continue;
      CAPTURE(b, n);
      const std::vector<float> qb(qp.begin() + cu[b] * H * dk, qp.begin() + cu[b + 1] * H * dk);
      const std::vector<float> ob(out.begin() + cu[b] * H * dv, out.begin() + cu[b + 1] * H * dv),
          lb(lse.begin() + cu[b] * H, lse.begin() + cu[b + 1] * H);
      const auto want = ref::variant_attention(qb, kf[b], vf[b], n, L, H, Hk, dk, dv, L - n, Wp, scale,
                                               test::variant_params(vp, c, cu[b], n));
      CHECK(rel_l2(ob, want.out) < 2e-5);
      CHECK(test::lse_close(want.lse, lb));
      // Bit for bit attention_prefill on the sequence's rows held contiguously (int8: dequantised).
      std::vector<float> oc(ob.size()), lc(lb.size());
      test::poison(oc), test::poison(lc);
      test::with_variant(vp, c, [&](const auto& var) {
        AttentionOptions o1;
        o1.q_offset = L - n;
        const auto run = [&](const auto& mask) {
          const ConstView3<float> q1(qb.data(), {n, H, dk});
          const View3<float> out1(oc.data(), {n, H, dv});
          const View2<float> lse1(lc.data(), {n, H});
          if constexpr (quant) {
            attention_prefill<float>(q1, ConstView3<float>(kf[b].data(), {L, Hk, dk}),
                                     ConstView3<float>(vf[b].data(), {L, Hk, dv}), out1, mask, o1, lse1, var);
          } else {
            const std::vector<KV> kc = as_kv<KV>(bt.k[b]), vc = as_kv<KV>(bt.v[b]);
            attention_prefill<KV>(q1, ConstView3<KV>(kc.data(), {L, Hk, dk}), ConstView3<KV>(vc.data(), {L, Hk, dv}), out1,
                                  mask, o1, lse1, var);
          }
        };
        if (Wp > 0) run(SlidingWindowMask{Wp});
        else run(CausalMask{});
      }, cu[b], n);
      CHECK(test::bit_equal(ob, oc));
      CHECK(test::bit_equal(lb, lc));
    }
  }
  // A variant whose output scale has the wrong number of rows is refused by name.
  std::vector<float> out(static_cast<std::size_t>(B * H * dv)), bad(static_cast<std::size_t>((B + 1) * H), 1.f);
  CHECK_THROWS_WITH(attention_decode_paged<KV>(ConstView3<float>(q.data(), {B, H, dk}), bt.pool.view(), bt.table(),
                                               View3<float>(out.data(), {B, H, dv}), opt, {}, 0,
                                               make_variant(OutputScale{ConstView2<float>(bad.data(), {B + 1, H})})),
                    Contains("attention_decode_paged: argument 'variant.output.scale'"));
}

// Routed attention (R-GQA) over pages: random routes (k_r of G heads per KV group, weights);
// decode and prefill (causal or sliding) against the float64 oracle (plain attention scaled by
// each kept head's weight, 0 elsewhere; lse -inf for the heads not kept), bit for bit against
// the contiguous routed kernels on each sequence's rows (int8 prefill: over the dequantised
// rows; int8 decode reads the codes, so it is checked against float64 only), and for any thread
// count.
template <class KV>
void check_routed_paged(std::uint64_t seed) {
  CAPTURE(seed);
  test::Rng rng(seed);
  const std::int64_t P = std::int64_t{1} << rng.integer(0, 5), Hk = rng.integer(1, 3), G = rng.integer(2, 4), H = Hk * G;
  const std::int64_t K = rng.integer(1, G);
  const std::int64_t dk = rng.integer(0, 1) ? rng.integer(3, 40) : 16 * rng.integer(1, 8) + rng.integer(0, 1);
  const std::int64_t dv = rng.integer(0, 1) ? dk : rng.integer(5, 70), B = rng.integer(1, 9);
  CAPTURE(P, H, Hk, K, dk, dv, B);
  Batch<KV> bt = make_batch<KV>(rng, B, P, Hk, dk, dv, kMaxLen / 4);
  CAPTURE(bt.lengths);
  constexpr bool quant = std::is_same_v<KV, std::int8_t>;
  std::vector<std::vector<float>> kf = bt.k, vf = bt.v;
  if constexpr (quant)
    for (std::int64_t b = 0; b < B; ++b) {
      const QuantSeq qs = read_quant(bt, b);
      kf[b] = qs.kf;
      vf[b] = qs.vf;
    }
  const double scale = 1.0 / std::sqrt(double(dk));
  const std::int64_t R = Hk * K;  // routes per token
  // Token t's routes alone, and whether head h is kept.
  const auto routes_of = [&](const test::Routes& r, std::int64_t t, std::int64_t n) {
    return test::Routes{{r.heads.begin() + t * R, r.heads.begin() + (t + n) * R},
                        {r.weights.begin() + t * R, r.weights.begin() + (t + n) * R}};
  };
  const auto lse_ok = [&](const test::Routes& r, const std::vector<double>& want, const float* got, std::int64_t n) {
    bool ok = true;
    for (std::int64_t t = 0; t < n; ++t)
      for (std::int64_t h = 0; h < H; ++h) {
        const bool kept = std::count(r.heads.begin() + t * R, r.heads.begin() + (t + 1) * R, h) > 0;
        ok = ok && (kept ? test::lse_entry_close(want[t * H + h], got[t * H + h])
                         : got[t * H + h] == -std::numeric_limits<float>::infinity());
      }
    return ok;
  };

  // Decode: one token per sequence.
  {
    const std::vector<float> q = rng.normal_vec(static_cast<std::size_t>(B * H * dk));
    const test::Routes r = test::random_routes(rng, B, Hk, G, K);
    const ConstView3<std::int32_t> hv(r.heads.data(), {B, Hk, K});
    const ConstView3<float> wv(r.weights.data(), {B, Hk, K});
    std::vector<float> out(static_cast<std::size_t>(B * H * dv)), lse(static_cast<std::size_t>(B * H)), out2(out.size());
    test::poison(out), test::poison(lse), test::poison(out2);
    DecodeOptions opt;
    opt.kv_chunk = P * rng.integer(1, 512 / P + 2);
    opt.num_threads = 1;
    routed_attention_decode_paged<KV>(ConstView3<float>(q.data(), {B, H, dk}), bt.pool.view(), bt.table(), hv, wv,
                                      View3<float>(out.data(), {B, H, dv}), opt, View2<float>(lse.data(), {B, H}));
    opt.num_threads = 2;
    routed_attention_decode_paged<KV>(ConstView3<float>(q.data(), {B, H, dk}), bt.pool.view(), bt.table(), hv, wv,
                                      View3<float>(out2.data(), {B, H, dv}), opt);
    CHECK(test::bit_equal(out, out2));
    for (std::int64_t b = 0; b < B; ++b) {
      CAPTURE(b);
      const std::int64_t L = bt.lengths[b];
      const std::vector<float> qb(q.begin() + b * H * dk, q.begin() + (b + 1) * H * dk);
      const std::vector<float> ob(out.begin() + b * H * dv, out.begin() + (b + 1) * H * dv);
      const test::Routes rb = routes_of(r, b, 1);
      ref::VariantParams vp;
      vp.out_scale = test::routed_scale(rb, 1, H, Hk, K);
      const auto want = ref::variant_attention(qb, kf[b], vf[b], 1, L, H, Hk, dk, dv, L - 1, 0, scale, vp);
      CHECK(rel_l2(ob, want.out) < 2e-5);
      CHECK(lse_ok(rb, want.lse, lse.data() + b * H, 1));
      if constexpr (!quant) {
        std::vector<float> oc(static_cast<std::size_t>(H * dv));
        test::poison(oc);
        const std::vector<KV> kc = as_kv<KV>(bt.k[b]), vc = as_kv<KV>(bt.v[b]);
        DecodeOptions o1 = opt;
        routed_attention_decode<KV>(ConstView2<float>(qb.data(), {H, dk}), ConstView3<KV>(kc.data(), {L, Hk, dk}),
                                    ConstView3<KV>(vc.data(), {L, Hk, dv}), ConstView3<std::int32_t>(rb.heads.data(), {1, Hk, K}),
                                    ConstView3<float>(rb.weights.data(), {1, Hk, K}), View2<float>(oc.data(), {H, dv}), o1);
        CHECK(test::bit_equal(ob, oc));
      }
    }
  }

  // Prefill: the last n_b tokens of each sequence, causal or a sliding window.
  std::vector<std::int64_t> cu{0};
  for (std::int64_t b = 0; b < B; ++b) cu.push_back(cu.back() + rng.integer(0, std::min<std::int64_t>(bt.lengths[b], 9)));
  const std::int64_t T = cu.back(), W = rng.integer(0, 1) ? rng.integer(1, 60) : 0;
  CAPTURE(T, W);
  const std::vector<float> q = rng.normal_vec(static_cast<std::size_t>(T * H * dk));
  const test::Routes r = test::random_routes(rng, T, Hk, G, K);
  std::vector<float> out(static_cast<std::size_t>(T * H * dv)), lse(static_cast<std::size_t>(T * H)), out1(out.size());
  test::poison(out), test::poison(lse), test::poison(out1);
  for (int threads : {2, 1}) {
    AttentionOptions opt;
    opt.num_threads = threads;
    const auto run = [&](const auto& mask) {
      routed_attention_prefill_paged<KV>(ConstView3<float>(q.data(), {T, H, dk}), bt.pool.view(), bt.table(), cu,
                                         ConstView3<std::int32_t>(r.heads.data(), {T, Hk, K}),
                                         ConstView3<float>(r.weights.data(), {T, Hk, K}),
                                         View3<float>((threads == 2 ? out : out1).data(), {T, H, dv}), mask, opt,
                                         threads == 2 ? View2<float>(lse.data(), {T, H}) : View2<float>{});
    };
    if (W > 0) run(SlidingWindowMask{W});
    else run(CausalMask{});
  }
  CHECK(test::bit_equal(out, out1));
  for (std::int64_t b = 0; b < B; ++b) {
    const std::int64_t n = cu[b + 1] - cu[b], L = bt.lengths[b];
    if (n == 0) continue;
    CAPTURE(b, n);
    const std::vector<float> qb(q.begin() + cu[b] * H * dk, q.begin() + cu[b + 1] * H * dk);
    const std::vector<float> ob(out.begin() + cu[b] * H * dv, out.begin() + cu[b + 1] * H * dv),
        lb(lse.begin() + cu[b] * H, lse.begin() + cu[b + 1] * H);
    const test::Routes rb = routes_of(r, cu[b], n);
    ref::VariantParams vp;
    vp.out_scale = test::routed_scale(rb, n, H, Hk, K);
    const auto want = ref::variant_attention(qb, kf[b], vf[b], n, L, H, Hk, dk, dv, L - n, W, scale, vp);
    CHECK(rel_l2(ob, want.out) < 2e-5);
    CHECK(lse_ok(rb, want.lse, lb.data(), n));
    // Bit for bit routed_attention_prefill on the sequence's rows held contiguously (int8: dequantised).
    std::vector<float> oc(ob.size()), lc(lb.size());
    test::poison(oc), test::poison(lc);
    AttentionOptions o1;
    o1.q_offset = L - n;
    const auto run = [&](const auto& mask) {
      const ConstView3<std::int32_t> h1(rb.heads.data(), {n, Hk, K});
      const ConstView3<float> w1(rb.weights.data(), {n, Hk, K});
      const ConstView3<float> q1(qb.data(), {n, H, dk});
      const View3<float> out1v(oc.data(), {n, H, dv});
      const View2<float> lse1(lc.data(), {n, H});
      if constexpr (quant) {
        routed_attention_prefill<float>(q1, ConstView3<float>(kf[b].data(), {L, Hk, dk}), ConstView3<float>(vf[b].data(), {L, Hk, dv}),
                                        h1, w1, out1v, mask, o1, lse1);
      } else {
        const std::vector<KV> kc = as_kv<KV>(bt.k[b]), vc = as_kv<KV>(bt.v[b]);
        routed_attention_prefill<KV>(q1, ConstView3<KV>(kc.data(), {L, Hk, dk}), ConstView3<KV>(vc.data(), {L, Hk, dv}), h1, w1,
                                     out1v, mask, o1, lse1);
      }
    };
    if (W > 0) run(SlidingWindowMask{W});
    else run(CausalMask{});
    CHECK(test::bit_equal(ob, oc));
    CHECK(test::bit_equal(lb, lc));
  }
  // Routes that do not fit the step are refused by the paged function's name.
  std::vector<std::int32_t> bad(static_cast<std::size_t>(B * (Hk + 1) * K), 0);
  std::vector<float> o(static_cast<std::size_t>(B * H * dv));
  const std::vector<float> qd(static_cast<std::size_t>(B * H * dk), 0.f);
  if (Hk > 1)
    CHECK_THROWS_WITH(routed_attention_decode_paged<KV>(ConstView3<float>(qd.data(), {B, H, dk}), bt.pool.view(), bt.table(),
                                                        ConstView3<std::int32_t>(bad.data(), {B, Hk, K}), ConstView3<float>{},
                                                        View3<float>(o.data(), {B, H, dv})),
                      Contains("routed_attention_decode_paged: argument 'heads'"));
  CHECK_THROWS_WITH(routed_attention_decode_paged<KV>(ConstView3<float>(qd.data(), {B, H, dk}), bt.pool.view(), bt.table(),
                                                      ConstView3<std::int32_t>(bad.data(), {B, Hk + 1, K}), ConstView3<float>{},
                                                      View3<float>(o.data(), {B, H, dv})),
                    Contains("routed_attention_decode_paged: argument 'heads': shape"));
}

}  // namespace

TEST_CASE("paged batched decode matches float64 and the contiguous kernel, any thread count", "[paged][decode]") {
  for (int r = 0; r < kRounds; ++r) {
    check_decode<float>(test::fresh_seed(), 16, 8, 2, 64, 64);
    check_decode<bf16>(test::fresh_seed(), 16, 8, 2, 64, 64);
    check_decode<bf16>(test::fresh_seed(), 64, 16, 8, 128, 128);  // Qwen3-0.6B shapes, blocks inside a page
    check_decode<float>(test::fresh_seed(), 1, 6, 3, 40, 24);     // P = 1, odd head dims
    check_decode<bf16>(test::fresh_seed(), 32, 4, 4, 72, 48);     // G = 1
    check_decode<bf16>(test::fresh_seed(), 16, 16, 8, 128, 128, Precision::fast);  // vdpbf16ps
    check_decode<bf16>(test::fresh_seed(), 8, 6, 2, 40, 24, Precision::fast);      // short pairs, G = 3
  }
}

TEST_CASE("int8 pages: quantised appends, decode (exact and fast) and prefill equal the contiguous int8 path",
          "[paged][int8]") {
  for (int r = 0; r < kRounds; ++r) {
    check_int8_pages(test::fresh_seed(), 16, 16, 8, 128, 128);  // Qwen3-0.6B shapes
    check_int8_pages(test::fresh_seed(), 4, 6, 3, 40, 24);      // odd head dims, small pages
    check_int8_pages(test::fresh_seed(), 64, 4, 4, 72, 48);     // G = 1
  }
  // A row that cannot be quantised is refused before anything is written; pages need scales.
  PagePool<std::int8_t> pool(2, 4, 1, 8, 8);
  const std::int32_t pages[1] = {pool.allocate()};
  std::vector<float> k(2 * 8, 1.f);
  paged_append(pool.view(), std::span<const std::int32_t>(pages), 0, ConstView3<float>(k.data(), {1, 1, 8}),
               ConstView3<float>(k.data(), {1, 1, 8}));
  CHECK(pool.view().k_scale(pages[0], 0, 0) == 1.f / 127.f);
  std::fill(k.begin(), k.end(), 5.f);
  k[12] = std::numeric_limits<float>::infinity();
  REQUIRE_THROWS_WITH(paged_append(pool.view(), std::span<const std::int32_t>(pages), 0,
                                   ConstView3<float>(k.data(), {2, 1, 8}), ConstView3<float>(k.data(), {2, 1, 8})),
                      Contains("paged_append: argument 'k': non-finite value inf at token 1, KV head 0, element 4"));
  CHECK(pool.view().k_scale(pages[0], 0, 0) == 1.f / 127.f);  // token 0 was not overwritten either
  CHECK(pool.view().k(pages[0], 0, 0, 0) == 127);
  auto bare = pool.view();
  bare.v_scale = {};
  std::vector<float> q(4 * 8), out(4 * 8);
  const std::int64_t indptr[2] = {0, 1}, lengths[1] = {0};
  REQUIRE_THROWS_WITH(attention_decode_paged<std::int8_t>(ConstView3<float>(q.data(), {1, 4, 8}), bare,
                                                          PageTable{indptr, pages, lengths}, View3<float>(out.data(), {1, 4, 8})),
                      Contains("attention_decode_paged: argument 'cache.v_scale': int8 pages need their scales"));
}

TEST_CASE("attention variants over pages: decode and prefill match float64 and the contiguous kernels",
          "[paged][variants]") {
  for (int r = 0; r < kRounds; ++r) {
    check_variants_paged<float>(test::fresh_seed());
    check_variants_paged<bf16>(test::fresh_seed());
    check_variants_paged<std::int8_t>(test::fresh_seed());
  }
}

TEST_CASE("routed attention (R-GQA) over pages matches float64 and the contiguous routed kernels",
          "[paged][routed]") {
  for (int r = 0; r < 3 * kRounds; ++r) {
    check_routed_paged<float>(test::fresh_seed());
    check_routed_paged<bf16>(test::fresh_seed());
    check_routed_paged<std::int8_t>(test::fresh_seed());
  }
}

TEST_CASE("paged prefill (chunked, several sequences) matches attention_prefill and float64", "[paged][prefill]") {
  check_prefill<float>(test::fresh_seed(), 16, CausalMask{});
  check_prefill<bf16>(test::fresh_seed(), 64, CausalMask{});
  check_prefill<bf16>(test::fresh_seed(), 8, SlidingWindowMask{100});
}

TEST_CASE("paged decode heads sub-range leaves other heads untouched; empty batch", "[paged][decode]") {
  const auto seed = test::fresh_seed();
  CAPTURE(seed);
  test::Rng rng(seed);
  constexpr std::int64_t H = 8, Hk = 2, d = 32, B = 3;
  Batch<float> bt = make_batch<float>(rng, B, 16, Hk, d, d, 300);
  const std::vector<float> q = rng.normal_vec(B * H * d);
  std::vector<float> full(B * H * d), part(B * H * d, 7.f);
  attention_decode_paged<float>(ConstView3<float>(q.data(), {B, H, d}), bt.pool.view(), bt.table(),
                                View3<float>(full.data(), {B, H, d}));
  DecodeOptions opt;
  opt.heads = {3, 6};
  attention_decode_paged<float>(ConstView3<float>(q.data(), {B, H, d}), bt.pool.view(), bt.table(),
                                View3<float>(part.data(), {B, H, d}), opt);
  for (std::int64_t b = 0; b < B; ++b)
    for (std::int64_t h = 0; h < H; ++h)
      for (std::int64_t e = 0; e < d; ++e) {
        const float x = part[(b * H + h) * d + e];
        if (h >= 3 && h < 6) CHECK(x == full[(b * H + h) * d + e]);
        else CHECK(x == 7.f);
      }
  // B = 0: nothing to do.
  const std::int64_t z[1] = {0};
  REQUIRE_NOTHROW(attention_decode_paged<float>(ConstView3<float>(q.data(), {0, H, d}), bt.pool.view(),
                                                PageTable{z, {}, {}}, View3<float>(full.data(), {0, H, d})));
}

TEST_CASE("PagePool allocates and frees pages; paged_append refuses what does not fit", "[paged][pool][errors]") {
  PagePool<bf16> pool(3, 4, 2, 8, 8);
  CHECK(pool.allocate() == 0);
  CHECK(pool.allocate() == 1);
  CHECK(pool.allocate() == 2);
  REQUIRE_THROWS_WITH(pool.allocate(), Contains("PagePool::allocate: all 3 pages are in use"));
  pool.free(1);
  CHECK(pool.pages_in_use() == 2);
  REQUIRE_THROWS_WITH(pool.free(1), Contains("PagePool::free: argument 'page': page 1 is not allocated"));
  REQUIRE_THROWS_WITH(pool.free(3), Contains("'page': 3 is out of range [0, num_pages = 3)"));
  CHECK(pool.allocate() == 1);
  REQUIRE_THROWS_WITH(PagePool<float>(4, 12, 2, 8, 8), Contains("'page_size': must be a power of two"));

  std::vector<float> k(5 * 2 * 8, 1.f);
  const std::int32_t pages[2] = {2, 0};
  REQUIRE_NOTHROW(paged_append(pool.view(), std::span<const std::int32_t>(pages), 3,
                               ConstView3<float>(k.data(), {5, 2, 8}), ConstView3<float>(k.data(), {5, 2, 8})));
  REQUIRE_THROWS_WITH(paged_append(pool.view(), std::span<const std::int32_t>(pages), 4,
                                   ConstView3<float>(k.data(), {5, 2, 8}), ConstView3<float>(k.data(), {5, 2, 8})),
                      Contains("paged_append: argument 'table.lengths': sequence 0 needs 9 tokens (length 4 + 5 appended) "
                               "but its 2 pages of 4 hold only 8"));
  REQUIRE_THROWS_WITH(paged_append(pool.view(), std::span<const std::int32_t>(pages), 0,
                                   ConstView3<float>(k.data(), {5, 2, 8}), ConstView3<float>(k.data(), {5, 1, 8})),
                      Contains("paged_append: argument 'v': shape [5, 1, 8] must be [n, H_kv, d_v] = [5, 2, 8]"));

  // Two rows of one call into the same slot: two sequences appending into the page they share
  // (not copied on write), or one sequence whose table lists a page twice; refused before any
  // write, on one thread and on two (from kParallelAppendRows rows on).
  const std::int64_t indptr[3] = {0, 2, 4}, cu[3] = {0, 1, 2};
  const std::int32_t shared[4] = {2, 0, 1, 0};
  std::int64_t lengths[2] = {5, 6};
  const auto append_two = [&] {
    paged_append(pool.view(), PageTable{indptr, shared, lengths}, cu, ConstView3<float>(k.data(), {2, 2, 8}),
                 ConstView3<float>(k.data(), {2, 2, 8}));
  };
  REQUIRE_NOTHROW(append_two());  // page 0, slots 1 and 2
  lengths[1] = 5;
  REQUIRE_THROWS_WITH(append_two(), Contains("paged_append: argument 'table': rows 0 and 1 (sequence 0 position 5, "
                                             "sequence 1 position 5) would both be written to slot 1 of page 0: "
                                             "the sequences share that page"));
  const std::int32_t twice[2] = {2, 2};
  REQUIRE_THROWS_WITH(paged_append(pool.view(), std::span<const std::int32_t>(twice), 0,
                                   ConstView3<float>(k.data(), {5, 2, 8}), ConstView3<float>(k.data(), {5, 2, 8})),
                      Contains("rows 0 and 4 (sequence 0 position 0, sequence 0 position 4) would both be written to "
                               "slot 0 of page 2: the sequence's table lists that page twice"));
  PagePool<float> big(8, 16, 1, 4, 4);
  std::vector<float> rows(kParallelAppendRows * 4, 1.f), kept(8 * 16 * 4, -3.f);
  std::copy(kept.begin(), kept.end(), big.view().k.data);
  const std::vector<std::int32_t> many(4, 5);  // 4 entries, all page 5: 64 rows over one page
  const std::vector<std::int64_t> many_indptr{0, 4}, many_lengths{0}, many_cu{0, kParallelAppendRows};
  const ConstView3<float> rv(rows.data(), {kParallelAppendRows, 1, 4});
  REQUIRE_THROWS_WITH(paged_append(big.view(), PageTable{many_indptr, many, many_lengths}, many_cu, rv, rv, 2),
                      Contains("rows 0 and 16 (sequence 0 position 0, sequence 0 position 16) would both be written to "
                               "slot 0 of page 5"));
  CHECK(std::equal(kept.begin(), kept.end(), big.view().k.data));  // nothing written
}

TEST_CASE("paged kernels name bad page tables and arguments", "[paged][errors]") {
  PagePool<float> pool(4, 16, 2, 8, 8);
  std::vector<float> q(3 * 4 * 8, 0.5f), out(3 * 4 * 8);
  const ConstView3<float> qv(q.data(), {2, 4, 8});
  const View3<float> ov(out.data(), {2, 4, 8});
  std::vector<std::int64_t> indptr{0, 2, 3}, lengths{20, 16};
  std::vector<std::int32_t> indices{3, 1, 0};
  const auto run = [&](DecodeOptions opt = {}) {
    attention_decode_paged<float>(qv, pool.view(), PageTable{indptr, indices, lengths}, ov, opt);
  };
  REQUIRE_NOTHROW(run());
  const char* fn = "attention_decode_paged: ";
  indices[1] = 4;
  REQUIRE_THROWS_WITH(run(), Contains(fn) && Contains("argument 'table.indices': entry 1 (page 1 of sequence 0) = 4 "
                                                      "is out of range [0, num_pages = 4)"));
  indices[1] = -1;
  REQUIRE_THROWS_WITH(run(), Contains("entry 1 (page 1 of sequence 0) = -1 is out of range"));
  indices[1] = 1;
  lengths[1] = 17;
  REQUIRE_THROWS_WITH(run(), Contains(fn) && Contains("argument 'table.lengths': sequence 1 needs 17 tokens but its "
                                                      "1 pages of 16 hold only 16"));
  lengths[1] = -1;
  REQUIRE_THROWS_WITH(run(), Contains("'table.lengths': length of sequence 1 is negative (-1)"));
  lengths[1] = 16;
  indptr = {0, 3, 2};
  REQUIRE_THROWS_WITH(run(), Contains("'table.indptr': must be non-decreasing, but [2] = 2 < [1] = 3"));
  indptr = {0, 2, 4};
  REQUIRE_THROWS_WITH(run(), Contains("'table.indices': has 3 entries but table.indptr[2] = 4 pages are listed"));
  indptr = {1, 2, 3};
  REQUIRE_THROWS_WITH(run(), Contains("'table.indptr': must start with 0, got 1"));
  indptr = {0, 2};
  REQUIRE_THROWS_WITH(run(), Contains("'table.indptr': has 2 entries, must have batch + 1 = 3"));
  indptr = {0, 2, 3};
  DecodeOptions opt;
  opt.kv_chunk = 24;
  REQUIRE_THROWS_WITH(run(opt), Contains("'opt.kv_chunk': must be 0 (default) or a positive multiple of the page size P = 16, got 24"));
  REQUIRE_THROWS_WITH(attention_decode_paged<float>(ConstView3<float>(q.data(), {3, 4, 8}), pool.view(),
                                                    PageTable{indptr, indices, lengths}, ov),
                      Contains("argument 'q': has 3 sequences (dimension 0 of [B, H, d_k]) but the table has B = 2"));
  REQUIRE_THROWS_WITH(attention_decode_paged<float>(ConstView3<float>(q.data(), {2, 3, 8}), pool.view(),
                                                    PageTable{indptr, indices, lengths}, ov),
                      Contains("number of query heads H = 3 is not a positive multiple of the number of KV heads H_kv = 2"));
  REQUIRE_THROWS_WITH(attention_decode_paged<float>(qv, pool.view(), PageTable{indptr, indices, lengths},
                                                    View3<float>(out.data(), {2, 4, 4})),
                      Contains("argument 'out': shape [2, 4, 4] must be [B, H, d_v] = [2, 4, 8]"));
  // P not a power of two (a caller's own view).
  const PagedKV<float> odd{ConstView4<float>(out.data(), {2, 12, 2, 8}), ConstView4<float>(out.data(), {2, 12, 2, 8})};
  REQUIRE_THROWS_WITH(attention_decode_paged<float>(qv, odd, PageTable{indptr, indices, lengths}, ov),
                      Contains("argument 'cache.k': page size P = 12 (dimension 1 of [num_pages, P, H_kv, d_k]) must be a power of two"));

  // Prefill: the new tokens must already be cached; cu_seqlens must match q.
  const std::vector<std::int64_t> cu{0, 5, 21};
  std::vector<float> qp(21 * 4 * 8, 0.1f), op(21 * 4 * 8);
  const auto prefill = [&](std::vector<std::int64_t> c, std::int64_t T) {
    attention_prefill_paged<float>(ConstView3<float>(qp.data(), {T, 4, 8}), pool.view(),
                                   PageTable{indptr, indices, lengths}, c, View3<float>(op.data(), {T, 4, 8}));
  };
  REQUIRE_NOTHROW(prefill({0, 5, 21}, 21));
  REQUIRE_THROWS_WITH(prefill({0, 5, 22}, 22), Contains("attention_prefill_paged: argument 'table.lengths': sequence 1 "
                                                        "has 17 new tokens in q but only 16 cached"));
  REQUIRE_THROWS_WITH(prefill({0, 5, 20}, 21), Contains("argument 'cu_seqlens': last entry 20 must equal the number of q rows T = 21"));
  REQUIRE_THROWS_WITH(prefill({0, 21}, 21), Contains("argument 'cu_seqlens': has 2 entries, must have batch + 1 = 3"));
}

// ---- Loop Attention and sparse attention over pages (attention/loop.hpp, sparse/sparse_attention.hpp)

namespace {

// Sequence b's rows [0, L) of a page buffer laid out as the pool's ([page][slot][head][d]), as float.
template <class KV>
std::vector<float> gather_seq(const std::vector<KV>& pages, const Batch<KV>& bt, std::int64_t b, std::int64_t d) {
  const std::int64_t L = bt.lengths[b];
  std::vector<float> x(static_cast<std::size_t>(L * bt.Hk * d));
  for (std::int64_t s = 0; s < L; ++s) {
    const std::int64_t page = bt.indices[bt.indptr[b] + s / bt.P], slot = s % bt.P;
    for (std::int64_t e = 0; e < bt.Hk * d; ++e)
      x[s * bt.Hk * d + e] = static_cast<float>(pages[((page * bt.P + slot) * bt.Hk) * d + e]);
  }
  return x;
}

// A copy of the pool's pages with fresh random values (loop 2's own K/V in the "stack" reading:
// the same page ids, other contents).
template <class KV>
std::vector<KV> random_pages(test::Rng& rng, const Batch<KV>& bt, std::int64_t d) {
  std::vector<KV> x(static_cast<std::size_t>(bt.pool.num_pages() * bt.P * bt.Hk * d));
  for (auto& e : x) e = KV(rng.normal());
  return x;
}

// The batch without its empty sequences (Loop Attention needs the current token's key).
template <class KV>
void drop_empty(Batch<KV>& bt) {
  std::vector<std::int64_t> indptr{0}, lengths;
  std::vector<std::int32_t> indices;
  std::vector<std::vector<float>> k, v;
  for (std::int64_t b = 0; b < bt.B; ++b) {
    if (bt.lengths[b] == 0) continue;
    indices.insert(indices.end(), bt.indices.begin() + bt.indptr[b], bt.indices.begin() + bt.indptr[b + 1]);
    indptr.push_back(static_cast<std::int64_t>(indices.size()));
    lengths.push_back(bt.lengths[b]);
    k.push_back(bt.k[b]);
    v.push_back(bt.v[b]);
  }
  bt.indptr = indptr;
  bt.indices = indices;
  bt.lengths = lengths;
  bt.k = k;
  bt.v = v;
  bt.B = static_cast<std::int64_t>(lengths.size());
}

// Other pages under the pool's page ids (loop 2's own K/V in the "stack" reading: the same page
// ids, other contents): every slot of every page random; int8 quantised as paged_append stores it.
template <class KV>
struct OtherPages {
  std::vector<KV> k, v;                                  // float / bf16
  std::unique_ptr<PagePool<std::int8_t>> quant;          // int8
  OtherPages(test::Rng& rng, const Batch<KV>& bt) {
    const std::int64_t N = bt.pool.num_pages(), n = N * bt.P;
    if constexpr (std::is_same_v<KV, std::int8_t>) {
      quant = std::make_unique<PagePool<std::int8_t>>(N, bt.P, bt.Hk, bt.dk, bt.dv);
      std::vector<std::int32_t> all(static_cast<std::size_t>(N));
      std::iota(all.begin(), all.end(), 0);
      const std::vector<float> kf = rng.normal_vec(static_cast<std::size_t>(n * bt.Hk * bt.dk)),
                               vf = rng.normal_vec(static_cast<std::size_t>(n * bt.Hk * bt.dv));
      paged_append(quant->view(), std::span<const std::int32_t>(all), 0, ConstView3<float>(kf.data(), {n, bt.Hk, bt.dk}),
                   ConstView3<float>(vf.data(), {n, bt.Hk, bt.dv}));
    } else {
      k = random_pages(rng, bt, bt.dk);
      v = random_pages(rng, bt, bt.dv);
    }
  }
  PagedKV<KV> view(const Batch<KV>& bt) const {
    if constexpr (std::is_same_v<KV, std::int8_t>) {
      return quant->view();
    } else {
      const std::int64_t N = bt.pool.num_pages();
      return {ConstView4<KV>(k.data(), {N, bt.P, bt.Hk, bt.dk}), ConstView4<KV>(v.data(), {N, bt.P, bt.Hk, bt.dv})};
    }
  }
};

// Loop Attention over pages: decode against float64 (the rows the kernels see: int8 dequantised),
// 1 = 2 = 3 threads bit for bit; prefill bit for bit loop_attention on each sequence's rows held
// contiguously (int8: its codes and scales, QuantView3) and against float64.
template <class KV>
void check_loop_paged(std::uint64_t seed, std::int64_t P, bool stack) {
  constexpr std::int64_t H = 6, Hk = 3, dk = 40, dv = 24;
  constexpr bool quant = std::is_same_v<KV, std::int8_t>;
  CAPTURE(seed, P, stack);
  test::Rng rng(seed);
  Batch<KV> bt = make_batch<KV>(rng, rng.integer(2, 9), P, Hk, dk, dv, kMaxLen / 2);
  drop_empty(bt);
  const std::int64_t B = bt.B, W = rng.integer(1, 300);
  CAPTURE(B, W, bt.lengths);
  if (B == 0) return;
  const PagedKV<KV> glob = bt.pool.view();
  const std::optional<OtherPages<KV>> other = stack ? std::optional<OtherPages<KV>>(std::in_place, rng, bt) : std::nullopt;
  const PagedKV<KV> loc = stack ? other->view(bt) : glob;
  // Each sequence's global and local rows as the kernels see them, and (int8) their codes.
  std::vector<std::vector<float>> kg(B), vg(B), kl(B), vl(B);
  std::vector<QuantSeq> qg(B), ql(B);
  for (std::int64_t b = 0; b < B; ++b) {
    if constexpr (quant) {
      qg[b] = read_quant(bt, b);
      ql[b] = stack ? read_quant(bt, b, loc) : qg[b];
      kg[b] = qg[b].kf, vg[b] = qg[b].vf, kl[b] = ql[b].kf, vl[b] = ql[b].vf;
    } else {
      kg[b] = bt.k[b], vg[b] = bt.v[b];
      kl[b] = stack ? gather_seq(other->k, bt, b, dk) : bt.k[b];
      vl[b] = stack ? gather_seq(other->v, bt, b, dv) : bt.v[b];
    }
  }
  const std::vector<float> gw = rng.normal_vec(static_cast<std::size_t>(H * dk), 0.2f), gb = rng.normal_vec(H);
  const double scale = 1.0 / std::sqrt(double(dk));

  // Decode: one query per sequence.
  const std::vector<float> q = rng.normal_vec(static_cast<std::size_t>(B * H * dk));
  DecodeOptions opt;
  opt.kv_chunk = P * rng.integer(1, 512 / P + 2);
  std::vector<float> first, first_g;
  for (int threads : {1, 2, 3}) {
    opt.num_threads = threads;
    std::vector<float> out(static_cast<std::size_t>(B * H * dv)), gates(static_cast<std::size_t>(B * H));
    test::poison(out);
    test::poison(gates);
    loop_attention_decode_paged<KV>(ConstView3<float>(q.data(), {B, H, dk}), glob, loc, bt.table(),
                                    ConstView2<float>(gw.data(), {H, dk}), gb, W, View3<float>(out.data(), {B, H, dv}),
                                    opt, View2<float>(gates.data(), {B, H}));
    if (threads > 1) {
      CHECK(test::bit_equal(out, first));
      CHECK(test::bit_equal(gates, first_g));
      continue;
    }
    first = out;
    first_g = gates;
    for (std::int64_t b = 0; b < B; ++b) {
      CAPTURE(b);
      const std::int64_t L = bt.lengths[b];
      const std::vector<float> qb(q.begin() + b * H * dk, q.begin() + (b + 1) * H * dk);
      const auto ref = ref::reference_loop(qb, kg[b], vg[b], kl[b], vl[b], gw, gb, {1, L, L, H, Hk, dk, dv}, L - 1, 0, W, scale);
      CHECK(rel_l2(std::vector<float>(out.begin() + b * H * dv, out.begin() + (b + 1) * H * dv), ref.out) <= 1e-5);
      CHECK(rel_l2(std::vector<float>(gates.begin() + b * H, gates.begin() + (b + 1) * H), ref.gates) <= 1e-6);
    }
  }

  // Prefill: the last n_b tokens of each sequence, packed; bit for bit loop_attention on contiguous copies.
  std::vector<std::int64_t> cu{0};
  for (std::int64_t b = 0; b < B; ++b) cu.push_back(cu.back() + rng.integer(0, std::min<std::int64_t>(bt.lengths[b], 37)));
  const std::int64_t T = cu.back();
  const std::vector<float> qp = rng.normal_vec(static_cast<std::size_t>(T * H * dk));
  std::vector<float> out(static_cast<std::size_t>(T * H * dv)), gates(static_cast<std::size_t>(T * H));
  test::poison(out);
  test::poison(gates);
  LoopOptions lo;
  lo.num_threads = 2;
  loop_attention_prefill_paged<KV>(ConstView3<float>(qp.data(), {T, H, dk}), glob, loc, bt.table(), cu,
                                   ConstView2<float>(gw.data(), {H, dk}), gb, W, View3<float>(out.data(), {T, H, dv}), lo,
                                   View2<float>(gates.data(), {T, H}));
  for (std::int64_t b = 0; b < B; ++b) {
    CAPTURE(b);
    const std::int64_t L = bt.lengths[b], n = cu[b + 1] - cu[b];
    if (n == 0) continue;
    const std::vector<float> qb(qp.begin() + cu[b] * H * dk, qp.begin() + cu[b + 1] * H * dk);
    std::vector<float> oc(static_cast<std::size_t>(n * H * dv)), gc(static_cast<std::size_t>(n * H));
    test::poison(oc);
    const ConstView3<float> qv(qb.data(), {n, H, dk});
    const ConstView2<float> gwv(gw.data(), {H, dk});
    const View3<float> ov(oc.data(), {n, H, dv});
    const View2<float> gv(gc.data(), {n, H});
    if constexpr (quant) {  // the same views twice in the layer reading: the fused path, as over the pages
      const QuantView3 kgq = qg[b].keys(L, Hk, dk), vgq = qg[b].values(L, Hk, dv);
      loop_attention(qv, kgq, vgq, stack ? ql[b].keys(L, Hk, dk) : kgq, stack ? ql[b].values(L, Hk, dv) : vgq, gwv, gb, W,
                     ov, lo, gv);
    } else {
      const std::vector<KV> kgc = as_kv<KV>(kg[b]), vgc = as_kv<KV>(vg[b]), klc = as_kv<KV>(kl[b]), vlc = as_kv<KV>(vl[b]);
      const ConstView3<KV> kgv(kgc.data(), {L, Hk, dk}), vgv(vgc.data(), {L, Hk, dv});
      loop_attention<KV>(qv, kgv, vgv, stack ? ConstView3<KV>(klc.data(), {L, Hk, dk}) : kgv,
                         stack ? ConstView3<KV>(vlc.data(), {L, Hk, dv}) : vgv, gwv, gb, W, ov, lo, gv);
    }
    CHECK(test::bit_equal(std::vector<float>(out.begin() + cu[b] * H * dv, out.begin() + cu[b + 1] * H * dv), oc));
    CHECK(test::bit_equal(std::vector<float>(gates.begin() + cu[b] * H, gates.begin() + cu[b + 1] * H), gc));
    const auto ref = ref::reference_loop(qb, kg[b], vg[b], kl[b], vl[b], gw, gb, {n, L, L, H, Hk, dk, dv}, L - n, 0, W, scale);
    CHECK(rel_l2(oc, ref.out) <= 1e-5);
  }
}

// A random ascending selection of at most K positions of [0, p], -1 padded to K.
std::vector<std::int32_t> random_selection(test::Rng& rng, std::int64_t p, std::int64_t K) {
  std::vector<std::int32_t> all(static_cast<std::size_t>(p + 1));
  std::iota(all.begin(), all.end(), 0);
  std::shuffle(all.begin(), all.end(), rng.gen);
  const std::int64_t n = std::min<std::int64_t>(rng.integer(0, K), p + 1);
  std::vector<std::int32_t> sel(all.begin(), all.begin() + n);
  std::sort(sel.begin(), sel.end());
  sel.resize(static_cast<std::size_t>(K), -1);
  return sel;
}

// Calls f(k, v) with sequence b's rows held contiguously, as the contiguous kernels take them:
// int8 its codes and scales (QuantView3, qs[b]), else ConstView3<KV> copies.
template <class KV, class F>
void with_contiguous(const Batch<KV>& bt, const std::vector<QuantSeq>& qs, std::int64_t b, const F& f) {
  const std::int64_t L = bt.lengths[b];
  if constexpr (std::is_same_v<KV, std::int8_t>) {
    f(qs[b].keys(L, bt.Hk, bt.dk), qs[b].values(L, bt.Hk, bt.dv));
  } else {
    const std::vector<KV> kc = as_kv<KV>(bt.k[b]), vc = as_kv<KV>(bt.v[b]);
    f(ConstView3<KV>(kc.data(), {L, bt.Hk, bt.dk}), ConstView3<KV>(vc.data(), {L, bt.Hk, bt.dv}));
  }
}

// Sparse attention over pages: decode against float64 (the rows the kernels see: int8
// dequantised), 1 = 2 = 3 threads, and bit for bit the contiguous kernel on each sequence's rows
// (int8: its codes and scales, QuantView3); prefill likewise. int8 pages also under
// Precision::fast (scores on VNNI against the quantised query): bit for bit the contiguous fast
// kernels, and within the int8 decode test's bound of float64.
template <class KV>
void check_sparse_paged(std::uint64_t seed, std::int64_t P, std::int64_t H, std::int64_t Hk, std::int64_t dk, std::int64_t dv) {
  constexpr bool quant = std::is_same_v<KV, std::int8_t>;
  CAPTURE(seed, P, H, Hk, dk, dv);
  test::Rng rng(seed);
  Batch<KV> bt = make_batch<KV>(rng, rng.integer(1, 12), P, Hk, dk, dv, kMaxLen / 2);
  const std::int64_t B = bt.B, K = rng.integer(1, 400);
  CAPTURE(B, K, bt.lengths);
  const PagedKV<KV> cache = bt.pool.view();
  const double scale = 1.0 / std::sqrt(double(dk));
  std::vector<std::vector<float>> kf = bt.k, vf = bt.v;
  std::vector<QuantSeq> qs(static_cast<std::size_t>(B));
  if constexpr (quant)
    for (std::int64_t b = 0; b < B; ++b) {
      qs[b] = read_quant(bt, b);
      kf[b] = qs[b].kf;
      vf[b] = qs[b].vf;
    }
  const std::vector<Precision> precisions =
      quant ? std::vector<Precision>{Precision::exact, Precision::fast} : std::vector<Precision>{Precision::exact};
  const auto tol = [](Precision p) { return p == Precision::exact ? 1e-5 : 4e-2; };

  // Decode: each sequence's query at its newest position with its own selection.
  std::vector<std::int32_t> idx;
  for (std::int64_t b = 0; b < B; ++b) {
    const auto sel = bt.lengths[b] > 0 ? random_selection(rng, bt.lengths[b] - 1, K) : std::vector<std::int32_t>(K, -1);
    idx.insert(idx.end(), sel.begin(), sel.end());
  }
  const std::vector<float> q = rng.normal_vec(static_cast<std::size_t>(B * H * dk));
  SparseAttentionOptions opt;
  opt.kv_chunk = P * rng.integer(1, 256 / P + 2);
  for (const Precision prec : precisions) {
    CAPTURE(static_cast<int>(prec));
    opt.precision = prec;
    std::vector<float> first;
    for (int threads : {1, 2, 3}) {
      opt.num_threads = threads;
      std::vector<float> out(static_cast<std::size_t>(B * H * dv)), lse(static_cast<std::size_t>(B * H));
      test::poison(out);
      test::poison(lse);
      sparse_attention_decode_paged<KV>(ConstView3<float>(q.data(), {B, H, dk}), cache, bt.table(),
                                        ConstView2<std::int32_t>(idx.data(), {B, K}), View3<float>(out.data(), {B, H, dv}),
                                        opt, View2<float>(lse.data(), {B, H}));
      if (threads > 1) {
        CHECK(test::bit_equal(out, first));
        continue;
      }
      first = out;
      for (std::int64_t b = 0; b < B; ++b) {
        CAPTURE(b);
        const std::int64_t L = bt.lengths[b];
        const std::vector<float> qb(q.begin() + b * H * dk, q.begin() + (b + 1) * H * dk);
        const std::vector<std::int32_t> ib(idx.begin() + b * K, idx.begin() + (b + 1) * K);
        std::vector<double> ro, rl;
        ref::sparse_attention(qb, kf[b], vf[b], ib, 1, K, H, Hk, dk, dv, scale, ro, rl);
        const std::vector<float> ob(out.begin() + b * H * dv, out.begin() + (b + 1) * H * dv);
        CHECK(rel_l2(ob, ro) <= tol(prec));
        for (std::int64_t h = 0; h < H && prec == Precision::exact; ++h) {
          if (std::isinf(rl[h])) CHECK(lse[b * H + h] == -std::numeric_limits<float>::infinity());
          else CHECK(std::abs(lse[b * H + h] - rl[h]) <= 1e-4 * std::max(1.0, std::abs(rl[h])));
        }
        if (L == 0) continue;
        std::vector<float> oc(static_cast<std::size_t>(H * dv));
        test::poison(oc);
        const ConstView2<float> qv(qb.data(), {H, dk});
        const ConstView1<std::int32_t> iv(ib.data(), {K});
        const View2<float> ov(oc.data(), {H, dv});
        with_contiguous(bt, qs, b, [&](const auto& k, const auto& v) { sparse_attention_decode(qv, k, v, iv, ov, opt); });
        CHECK(test::bit_equal(ob, oc));
      }
    }
  }
  // An entry past its sequence's length is named.
  std::int64_t longest = 0;
  for (std::int64_t b = 0; b < B; ++b) longest = bt.lengths[b] > bt.lengths[longest] ? b : longest;
  std::vector<std::int32_t> bad = idx;
  bad[longest * K] = static_cast<std::int32_t>(bt.lengths[longest]);
  std::fill(bad.begin() + longest * K + 1, bad.begin() + (longest + 1) * K, -1);
  std::vector<float> out(static_cast<std::size_t>(B * H * dv));
  CHECK_THROWS_WITH(sparse_attention_decode_paged<KV>(ConstView3<float>(q.data(), {B, H, dk}), cache, bt.table(),
                                                      ConstView2<std::int32_t>(bad.data(), {B, K}),
                                                      View3<float>(out.data(), {B, H, dv}), opt),
                    Contains("sparse_attention_decode_paged") && Contains("'indices'") && Contains("query " + std::to_string(longest)));

  // Prefill: the last n_b tokens of each sequence, each query with its own selection.
  std::vector<std::int64_t> cu{0};
  for (std::int64_t b = 0; b < B; ++b) cu.push_back(cu.back() + rng.integer(0, std::min<std::int64_t>(bt.lengths[b], 29)));
  const std::int64_t T = cu.back();
  // Some sequences' first queries select every key they see (a prompt's first K tokens under
  // top-K): the kernel runs those on the flash kernel, over the pages too.
  std::vector<std::int32_t> pidx;
  for (std::int64_t b = 0; b < B; ++b) {
    const std::int64_t lead = rng.integer(0, cu[b + 1] - cu[b]);
    for (std::int64_t t = cu[b]; t < cu[b + 1]; ++t) {
      const std::int64_t pos = bt.lengths[b] - (cu[b + 1] - t);
      std::vector<std::int32_t> sel = random_selection(rng, pos, K);
      if (t - cu[b] < lead && pos + 1 <= K) {
        std::iota(sel.begin(), sel.begin() + pos + 1, 0);
        std::fill(sel.begin() + pos + 1, sel.end(), -1);
      }
      pidx.insert(pidx.end(), sel.begin(), sel.end());
    }
  }
  const std::vector<float> qp = rng.normal_vec(static_cast<std::size_t>(T * H * dk));
  for (const Precision prec : precisions) {
    CAPTURE(static_cast<int>(prec));
    std::vector<float> po(static_cast<std::size_t>(T * H * dv));
    test::poison(po);
    opt.num_threads = 2;
    opt.precision = prec;
    sparse_attention_prefill_paged<KV>(ConstView3<float>(qp.data(), {T, H, dk}), cache, bt.table(), cu,
                                       ConstView2<std::int32_t>(pidx.data(), {T, K}), View3<float>(po.data(), {T, H, dv}), opt);
    for (std::int64_t b = 0; b < B; ++b) {
      CAPTURE(b);
      const std::int64_t L = bt.lengths[b], n = cu[b + 1] - cu[b];
      if (n == 0) continue;
      const std::vector<float> qb(qp.begin() + cu[b] * H * dk, qp.begin() + cu[b + 1] * H * dk);
      const std::vector<std::int32_t> ib(pidx.begin() + cu[b] * K, pidx.begin() + cu[b + 1] * K);
      const std::vector<float> ob(po.begin() + cu[b] * H * dv, po.begin() + cu[b + 1] * H * dv);
      std::vector<double> ro, rl;
      ref::sparse_attention(qb, kf[b], vf[b], ib, n, K, H, Hk, dk, dv, scale, ro, rl);
      CHECK(rel_l2(ob, ro) <= tol(prec));
      std::vector<float> oc(static_cast<std::size_t>(n * H * dv));
      test::poison(oc);
      SparseAttentionOptions o1 = opt;
      o1.q_offset = L - n;
      const ConstView3<float> qv(qb.data(), {n, H, dk});
      const ConstView2<std::int32_t> iv(ib.data(), {n, K});
      const View3<float> ov(oc.data(), {n, H, dv});
      with_contiguous(bt, qs, b, [&](const auto& k, const auto& v) { sparse_attention_prefill(qv, k, v, iv, ov, o1); });
      CHECK(test::bit_equal(ob, oc));
    }
  }
}

}  // namespace

TEST_CASE("Loop Attention over pages (layer and stack readings) matches float64 and the contiguous kernels",
          "[paged][loop]") {
  check_loop_paged<float>(test::fresh_seed(), 16, false);
  check_loop_paged<bf16>(test::fresh_seed(), 32, true);
  check_loop_paged<bf16>(test::fresh_seed(), 1, false);  // P = 1
  check_loop_paged<std::int8_t>(test::fresh_seed(), 16, false);
  check_loop_paged<std::int8_t>(test::fresh_seed(), 8, true);
}

TEST_CASE("sparse attention over pages matches float64 and the contiguous kernels, any thread count",
          "[paged][sparse]") {
  check_sparse_paged<float>(test::fresh_seed(), 16, 8, 2, 64, 64);
  check_sparse_paged<bf16>(test::fresh_seed(), 64, 16, 8, 128, 128);
  check_sparse_paged<bf16>(test::fresh_seed(), 8, 6, 3, 40, 24);  // odd head dims
  check_sparse_paged<std::int8_t>(test::fresh_seed(), 16, 16, 8, 128, 128);
  check_sparse_paged<std::int8_t>(test::fresh_seed(), 4, 6, 3, 40, 24);
  check_sparse_paged<std::int8_t>(test::fresh_seed(), 32, 4, 1, 264, 72);  // past the key-major kernel's reach: staged
}
