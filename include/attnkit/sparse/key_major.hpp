// attnkit/sparse/key_major.hpp — the AVX-512 kernel behind sparse_attention_prefill
// (sparse/sparse_attention.hpp): a tile of queries walks the keys in blocks, and each selected
// K/V row is loaded and widened once for all the queries of the tile that selected it.
//
// Why key-major: an indexer's selections share few keys between neighbouring queries (random
// scores share almost none), so no dense query × key tile is worth computing: a late key block
// is wanted by nearly every 32-query tile, but each key by only ~K·32/T_k of its queries. Read
// per (query, row), as the decode kernel reads a cache, each K row costs its loads and its bf16
// widening for only G heads' worth of FMAs; read once per tile, those costs are shared by every
// query that selected the row.
//
// One work item is (tile of up to kTile queries, KV heads [j0, j1)). Per block of kKeyBlock keys:
//  1. once for the item's KV heads: each query's run of selected keys inside the block (its
//     slots), for each key the set of queries that selected it (a 64-bit mask), and the list of
//     the block's (query, slot) pairs in key order (walking the keys in order, a query's next
//     slot is simply its count so far). Rebuilt per KV head they cost ~7% more time (measured);
//  then for each KV head of the item:
//  2. scores, key by key: the widened K row in registers, one dot product per (pair, head)
//     against the query row in L1, 16 of them summed at once by decode's transpose tree;
//  3. per (query, head): an online-softmax update over its slots of the block (the block's
//     exact max; the accumulator rescaled once per block, not per key);
//  4. P·V per query: decode's accumulation over the query's slots (the accumulators in
//     registers, the V rows gathered through the selection, the next chunk's rows prefetched).
//     Done key-major instead, each (pair, head) would load and store its accumulator row per
//     key: measured slower (11 against 8 ns per selected pair and KV head).
// int8 K/V (codes with a scale per row and KV head): exact widens the codes and multiplies each
// dot product by its key's scale and each probability (after the softmax sum) by its value row's
// scale, as decode does. Precision::fast scores the codes on VNNI against each (query, head)
// row quantised by decode's rule, and runs P·V on VNNI with the probabilities rounded to 8 bits
// per (query, head, block) (accumulate_vnni).
// The order of every sum is fixed by the selections alone, so results are bit-identical for any
// thread count. Head dimensions up to kMaxDim (the K row in registers, zero padded to 16, 32, 64,
// 128 or 256 lanes); sparse_attention_prefill uses the query-major kernel for larger ones and
// without AVX-512. Measured against it (docs/performance.md): 0.89× the time on random selections at T 16384.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "attnkit/attention/decode.hpp"
#include "attnkit/attention/detail/flash_prefill.hpp"
#include "attnkit/core/memory.hpp"
#include "attnkit/core/view.hpp"

#if defined(__AVX512F__) && defined(__AVX512BW__)
#define ATTNKIT_SPARSE_KEY_MAJOR 1

namespace attnkit::detail::sparse::key_major {

using decode::exp2_ps;
using decode::kNegInf;
using decode::load16;
using decode::reduce16;
using decode::tail_mask;

inline constexpr std::int64_t kTile = 64;       // queries per work item, at most
// Queries per work item: their query rows stay in L1 (f32 rows: 32 queries of 2 heads of 128).
// VNNI scores read the rows' int8 codes, a quarter of the bytes: 64 queries then, which halves
// the K/V rows read per dot product (2-5% faster at T 16384; 64 f32 rows were 7% slower).
inline std::int64_t tile_queries(bool vnni) { return vnni ? kTile : 32; }
static_assert(kTile <= 64, "a key's selecting queries are a 64-bit mask");
inline constexpr std::int64_t kKeyBlock = 512;  // keys per block
inline constexpr std::int64_t kMaxDim = 256;
inline constexpr std::int64_t kAhead = 6;  // keys prefetched ahead in the scores
inline constexpr std::int64_t kChunk = decode::kBlock;  // slots per probability chunk: [G][kChunk], as decode's ItemState.p

// 16-lane slices a key dimension is padded to (1, 2, 4, 8 or 16); 0 if above kMaxDim.
inline int slices(std::int64_t d) {
  const std::int64_t n = (d + 15) / 16;
  return n <= 1 ? 1 : n <= 2 ? 2 : n <= 4 ? 4 : n <= 8 ? 8 : n <= 16 ? 16 : 0;
}

// A selected (query, key) pair of a block, in key order: the query's row offset in a head's
// query rows ([nt][G][dkp]: i·G·dkp) and its slot (head 0's; head g's is slot + g·kChunk).
struct Pair {
  std::int32_t q, slot;
};

// One work item's state (thread scratch): a tile of queries against KV heads [j0, j1).
// The block's bookkeeping (which queries selected which keys, each pair's slot) is shared by the
// item's KV heads; per block, each head in turn runs scores, softmax and P·V.
// Per block, query i's slots (its selected keys inside the block, in order) hold scores, then
// probabilities, in chunks of kChunk slots laid out [G][kChunk] (decode's ItemState.p): slot x
// of head g at p + area[i] + (x / kChunk)·G·kChunk + g·kChunk + x % kChunk.
struct Tile {
  std::int64_t nt, G, dk, dv, dkp, dv_pad;
  float* qs;            // [heads][nt][G][dkp] queries · scale · log2(e), zero padded
  float* o;             // [heads][nt][G][dv_pad] unnormalised outputs (decode's accumulator layout)
  float* m;             // [heads][nt][G] running max (base 2)
  float* l;             // [heads][nt][G] running sum
  float* alpha;         // [nt][G] this block's rescaling of o (one head at a time)
  float* ones;          // [G] 1s
  float* p;             // the block's slots of one head, see above
  std::uint64_t* who;   // [kKeyBlock] bit i: query i of the tile selected key u of the block
  Pair* pairs;          // the block's pairs, in key order (within a key: ascending query)
  // int8 keys under Precision::fast: each (query, head) row of qs quantised (decode's
  // quantize_query_row), codes [heads][nt][G][dkq] and scale [heads][nt][G]; qinit
  // [heads][nt][G][16] int32 whose lanes sum to -bias (a dot product's starting value).
  std::int8_t* qc;
  float* qscale;
  std::int32_t* qinit;
  std::int64_t dkq;  // max(64, dkp): a code row (dkq / dkp = the ratio of a pair's q offsets)
  int q_shift;       // log2(dkp): Pair::q >> q_shift is the pair's row i·G
  std::int64_t n[kTile], area[kTile], c0[kTile];
};

// One KV head's quantised query rows (Tile::qc, qinit from that head's first row).
struct QuantHead {
  const std::int8_t* codes;
  const std::int32_t* init;
};

#if defined(ATTNKIT_DECODE_VNNI)
// The int32 dot product of one quantised query row with the key codes ku (read as k + 128, as
// decode's scores_group_vnni), started from the row's qinit so that it sums to q·k: NQ slices
// of 64 codes.
template <int NQ>
__attribute__((always_inline)) inline __m512i dot_vnni(const __m512i (&ku)[NQ], const std::int8_t* qc,
                                                       const std::int32_t* init) {
  __m512i a = decode::dpbusd(_mm512_load_si512(init), ku[0], qc);
#pragma GCC unroll 4
  for (int e = 1; e < NQ; ++e) a = decode::dpbusd(a, ku[e], qc + 64 * e);
  return a;
}
#endif

// q · k for one query row against the widened key row kv: two chains (even and odd slices)
// halve the latency.
template <int NS>
__attribute__((always_inline)) inline __m512 dot(const __m512 (&kv)[NS], const float* qg) {
  __m512 a = _mm512_mul_ps(kv[0], _mm512_loadu_ps(qg));
  if constexpr (NS == 1) {
    return a;
  } else {
    __m512 b = _mm512_mul_ps(kv[1], _mm512_loadu_ps(qg + 16));
#pragma GCC unroll 16
    for (int e = 2; e < NS; e += 2) {
      a = _mm512_fmadd_ps(kv[e], _mm512_loadu_ps(qg + 16 * e), a);
      b = _mm512_fmadd_ps(kv[e + 1], _mm512_loadu_ps(qg + 16 * e + 16), b);
    }
    return _mm512_add_ps(a, b);
  }
}

// Scores of every pair of the block for one KV head (keys u in [0, nb) of the rows k0 + u·ks;
// qs the head's query rows): key by key, the widened row in registers; 16 dot products at a
// time summed by one transpose tree, their sums stored to the pairs' slots.
// Rows of one KV head from key s0 on: row(u) = row s0 + u, contiguous (base + u · stride, the
// common case, kept to its two operations) or through a page table.
template <class KV>
struct StridedRows {
  const KV* base;
  std::int64_t stride;
  const KV* operator()(std::int64_t u) const { return base + u * stride; }
};
template <class KV>
struct PagedRows {
  const flash::KVRows<KV>* rows;
  std::int64_t j, s0;
  const KV* operator()(std::int64_t u) const { return rows->ptr(s0 + u, j); }
};

// int8 keys (KV = std::int8_t) score as decode scores them: exact, the codes widened; Vnni
// (Precision::fast), the codes against the quantised query on vpdpbusd, the exact integer q·k.
// The softmax multiplies by the key's scale (and the query's), 16 slots at a time: carried with
// each pending dot here, it was a serial chain of masked broadcasts through one register.
template <int NS, class KV, bool Vnni, class KRows, class VRows>
void scores_rows(const Tile& tl, const float* qs, const QuantHead& qh, const KRows& k_rows, const VRows& v_rows,
                 std::int64_t nb) {
  constexpr bool quant = std::is_same_v<KV, std::int8_t>;
  static_assert(quant || !Vnni, "VNNI scores read int8 keys");
  constexpr int NQ = NS >= 4 ? NS / 4 : 1;  // 64-code slices of a key row (Vnni)
  // Everything the loops read in locals: the flush's memory barrier would reload them through
  // tl and qh after every flush, and keep them out of registers in between.
  const std::int64_t G = tl.G, dk = tl.dk, dkp = tl.dkp, dkq = tl.dkq;
  const int q_shift = tl.q_shift;
  float* const p = tl.p;
  const std::int8_t* const qcodes = qh.codes;
  const std::int32_t* const qinit = qh.init;
  const KRows krow = k_rows;
  const VRows vrow = v_rows;
  const std::uint64_t* const who = tl.who;
  const Pair* pr = tl.pairs;
  // Pending dot products, kept in memory: held in registers they would push the key row out.
  // Dot r belongs to pair pend_pairs[r / G], head r % G.
  alignas(64) float pend[16][16];
  const Pair* pend_pairs = pr;
  int np = 0;
  // The sums of pending dots [0, np), lane r = dot r.
  const auto sums = [&]() __attribute__((always_inline)) {
    if constexpr (Vnni) {
#if defined(ATTNKIT_DECODE_VNNI)
      __m512i red[16];
#pragma GCC unroll 16
      for (int r = 0; r < 16; ++r) red[r] = r < np ? _mm512_load_si512(pend[r]) : _mm512_setzero_si512();
      return _mm512_cvtepi32_ps(decode::reduce16_epi32(red));
#endif
    } else {
      __m512 red[16];
#pragma GCC unroll 16
      for (int r = 0; r < 16; ++r) red[r] = r < np ? _mm512_load_ps(pend[r]) : _mm512_setzero_ps();
      return reduce16(red);
    }
  };
  const auto flush = [&]() __attribute__((always_inline)) {
    alignas(64) float sum[16];
    _mm512_store_ps(sum, sums());
    // Through memory: scalar loads instead of lane extracts on the shuffle port (the barrier
    // keeps GCC from turning them back into extracts).
    __asm__ volatile("" ::: "memory");
    if (G == 2) {
      for (int r = 0; r < np; r += 2, ++pend_pairs) {
        p[pend_pairs->slot] = sum[r];
        p[pend_pairs->slot + kChunk] = sum[r + 1];
        __asm__ volatile("");  // not a vscatterdps: plain stores are faster
      }
    } else {
      for (int r = 0; r < np; r += static_cast<int>(G), ++pend_pairs)
        for (std::int64_t g = 0; g < G; ++g) p[pend_pairs->slot + g * kChunk] = sum[r + g];
    }
    np = 0;
  };
  const std::int64_t row_bytes = dk * static_cast<std::int64_t>(sizeof(KV));
  const std::int64_t v_bytes = tl.dv * static_cast<std::int64_t>(sizeof(KV));
  // A flush holds whole pairs: 16 / G of them (G <= 16; larger groups reduce per pair below).
  const int per_flush = static_cast<int>(G <= 16 ? 16 / G * G : 16);
  for (std::int64_t u = 0; u < nb; ++u) {
    // K rows a few keys ahead into L1: each row feeds only a few dot products, too few to hide
    // its latency. The same key's V row into L2 for the P·V that follows, which reads the rows
    // in each query's order, where no prefetcher can follow.
    if (u + kAhead < nb && who[u + kAhead] != 0) {
      const char* kp = reinterpret_cast<const char*>(krow(u + kAhead));
      const char* vp = reinterpret_cast<const char*>(vrow(u + kAhead));
      for (std::int64_t b = 0; b < row_bytes; b += 64) __builtin_prefetch(kp + b, 0, 3);
      for (std::int64_t b = 0; b < v_bytes; b += 64) __builtin_prefetch(vp + b, 0, 1);
    }
    const int cnt = __builtin_popcountll(who[u]);
    if (cnt == 0) continue;
    const KV* kr = krow(u);
    // The key row in registers: widened to f32, or (Vnni) its codes read as k + 128.
    __m512 kv[Vnni ? 1 : NS];
    [[maybe_unused]] __m512i ku[NQ];
    if constexpr (Vnni) {
      const __m512i flip = _mm512_set1_epi8(static_cast<char>(0x80));
#pragma GCC unroll 4
      for (int e = 0; e < NQ; ++e) {
        const std::int64_t left = dk - 64 * e;  // codes past dk load as 0 against query codes 0
        const __mmask64 m = left >= 64 ? ~__mmask64{0} : left <= 0 ? __mmask64{0} : (__mmask64{1} << left) - 1;
        ku[e] = _mm512_xor_si512(_mm512_maskz_loadu_epi8(m, reinterpret_cast<const std::int8_t*>(kr) + 64 * e), flip);
      }
    } else {
#pragma GCC unroll 16
      for (int e = 0; e < NS; ++e) kv[e] = load16(kr + 16 * e, tail_mask(dk - 16 * e));
    }
    // Pending dot np: query row qi's head g (row index rq = its i·G + g).
    const auto push = [&](const float* qi, std::int64_t rq) __attribute__((always_inline)) {
      if constexpr (Vnni) {
#if defined(ATTNKIT_DECODE_VNNI)
        _mm512_store_si512(pend[np], dot_vnni<NQ>(ku, qcodes + rq * dkq, qinit + rq * 16));
#endif
      } else {
        _mm512_store_ps(pend[np], dot<NS>(kv, qi));
      }
      ++np;
    };
    const Pair* const end = pr + cnt;
    if (G == 2) {  // the common GQA group (Qwen3): both heads, one check
      for (; pr != end; ++pr) {
        if (np == 16) flush();
        const float* qi = qs + pr->q;
        const std::int64_t rq = pr->q >> q_shift;
        push(qi, rq);
        push(qi + dkp, rq + 1);
      }
    } else if (G <= 16) {
      for (; pr != end; ++pr) {
        if (np == per_flush) flush();
        const float* qi = qs + pr->q;
        const std::int64_t rq = pr->q >> q_shift;
        for (std::int64_t g = 0; g < G; ++g) push(qi + g * dkp, rq + g);
      }
    } else {  // more heads than a flush holds: one pair at a time, in runs of 16 heads
      for (; pr != end; ++pr) {
        const float* qi = qs + pr->q;
        const std::int64_t rq = pr->q >> q_shift;
        for (std::int64_t g0 = 0; g0 < G; g0 += 16) {
          const std::int64_t g1 = std::min(G, g0 + 16);
          for (std::int64_t g = g0; g < g1; ++g) push(qi + g * dkp, rq + g);
          alignas(64) float sum[16];
          _mm512_store_ps(sum, sums());
          for (std::int64_t g = g0; g < g1; ++g) p[pr->slot + g * kChunk] = sum[g - g0];
          np = 0;
        }
      }
    }
  }
  if (np > 0) flush();
}

template <int NS, class KV, bool Vnni>
void scores(const Tile& tl, const float* qs, const QuantHead& qh, const flash::KVRows<KV>& k,
            const flash::KVRows<KV>& v, std::int64_t j, std::int64_t s0, std::int64_t nb) {
  if (k.pages == nullptr && v.pages == nullptr)
    scores_rows<NS, KV, Vnni>(tl, qs, qh, StridedRows<KV>{k.ptr(s0, j), k.stride[0]},
                              StridedRows<KV>{v.ptr(s0, j), v.stride[0]}, nb);
  else
    scores_rows<NS, KV, Vnni>(tl, qs, qh, PagedRows<KV>{&k, j, s0}, PagedRows<KV>{&v, j, s0}, nb);
}

// Online-softmax update of one KV head's (query, head) rows with slots in the block: scores ->
// probabilities exp2(s - m_new), alpha = exp2(m_old - m_new). m and l: the head's [nt][G].
// int8 K/V (Scales = StridedRowScales or PagedRowScales; else NoRowScales): kscale each score
// times its key row's scale first (then as decode's scores); vscale each stored probability
// times its value row's scale, after the sum (decode's scale_rows). qscale (Vnni scores; else
// null): the rows' query scales [nt][G], each score s · qscale (fused into the exponent's
// subtraction). A Scales (sel, m) gives the scales of the 16 rows sel[0, 16), lanes in m.
struct NoRowScales {
  static constexpr bool active = false;
  __m512 operator()(const std::int32_t*, __mmask16) const { return _mm512_setzero_ps(); }
};
// Heads [g0, g0 + NH) of query i (the slots of one query share the keys, so a chunk's key and
// value scales are gathered once for all NH heads; per head the arithmetic is the same).
template <int NH, class Scales>
inline void softmax_heads(const Tile& tl, std::int64_t i, std::int64_t g0, float* const mh, float* const lh,
                          const std::int32_t* sel, const float* qscale, const Scales& kscale, const Scales& vscale) {
  const std::int64_t G = tl.G, n = tl.n[i];
  float* const s0 = tl.p + tl.area[i] + g0 * kChunk;
  const auto at = [&](std::int64_t x, int h) { return s0 + x / kChunk * G * kChunk + x % kChunk + h * kChunk; };
  __m512 mx[NH];
#pragma GCC unroll 4
  for (int h = 0; h < NH; ++h) mx[h] = _mm512_set1_ps(kNegInf);
  for (std::int64_t x = 0; x < n; x += 16) {
    const __mmask16 msk = tail_mask(n - x);
    if constexpr (Scales::active) {
      const __m512 ks = kscale(sel + x, msk);
#pragma GCC unroll 4
      for (int h = 0; h < NH; ++h) {
        const __m512 sx = _mm512_mul_ps(_mm512_maskz_loadu_ps(msk, at(x, h)), ks);
        _mm512_storeu_ps(at(x, h), sx);  // lanes past n: never read
        mx[h] = _mm512_mask_max_ps(mx[h], msk, mx[h], sx);
      }
    } else {
#pragma GCC unroll 4
      for (int h = 0; h < NH; ++h) mx[h] = _mm512_max_ps(mx[h], _mm512_mask_loadu_ps(mx[h], msk, at(x, h)));
    }
  }
  float m_new[NH];
  __m512 vb[NH], vq[NH], sum[NH];
#pragma GCC unroll 4
  for (int h = 0; h < NH; ++h) {
    const std::int64_t r = i * G + g0 + h;
    const float qs = qscale ? qscale[r] : 1.f;
    // qs >= 0: the largest scaled score is the largest score, scaled.
    m_new[h] = std::max(mh[r], qscale ? simd::hmax(mx[h]) * qs : simd::hmax(mx[h]));
    // All scores -inf (only with infinite inputs): nothing to add.
    vb[h] = _mm512_set1_ps(m_new[h] == kNegInf ? 0.f : m_new[h]);
    vq[h] = _mm512_set1_ps(qs);
    sum[h] = _mm512_setzero_ps();
  }
  for (std::int64_t x = 0; x < n; x += 16) {
    const __mmask16 msk = tail_mask(n - x);
    [[maybe_unused]] __m512 vs;
    if constexpr (Scales::active) vs = vscale(sel + x, msk);
#pragma GCC unroll 4
    for (int h = 0; h < NH; ++h) {
      float* const s = at(x, h);
      const __m512 sx = _mm512_maskz_loadu_ps(msk, s);
      const __m512 e = exp2_ps(qscale ? _mm512_fmsub_ps(sx, vq[h], vb[h]) : _mm512_sub_ps(sx, vb[h]));
      sum[h] = _mm512_add_ps(sum[h], _mm512_maskz_mov_ps(msk, e));
      if constexpr (Scales::active) _mm512_storeu_ps(s, _mm512_mul_ps(e, vs));
      else _mm512_storeu_ps(s, e);  // lanes past n: never read
    }
  }
#pragma GCC unroll 4
  for (int h = 0; h < NH; ++h) {
    const std::int64_t r = i * G + g0 + h;
    const float m = mh[r];
    const float a = m == kNegInf ? 0.f : std::exp2(m - (m_new[h] == kNegInf ? 0.f : m_new[h]));
    tl.alpha[r] = a;
    lh[r] = lh[r] * a + simd::hsum(sum[h]);
    mh[r] = m_new[h];
  }
}

template <class Scales = NoRowScales>
inline void softmax(const Tile& tl, float* const mh, float* const lh, const std::int32_t* const* idx = nullptr,
                    const float* qscale = nullptr, const Scales& kscale = {}, const Scales& vscale = {}) {
  const std::int64_t G = tl.G;
  for (std::int64_t i = 0; i < tl.nt; ++i) {
    if (tl.n[i] == 0) continue;
    const std::int32_t* sel = idx ? idx[i] + tl.c0[i] : nullptr;
    if (G % 4 == 0)
      for (std::int64_t g0 = 0; g0 < G; g0 += 4) softmax_heads<4>(tl, i, g0, mh, lh, sel, qscale, kscale, vscale);
    else if (G % 2 == 0)
      for (std::int64_t g0 = 0; g0 < G; g0 += 2) softmax_heads<2>(tl, i, g0, mh, lh, sel, qscale, kscale, vscale);
    else
      for (std::int64_t g0 = 0; g0 < G; ++g0) softmax_heads<1>(tl, i, g0, mh, lh, sel, qscale, kscale, vscale);
  }
}

// int8 K or V: the scales of 16 selected rows of KV head j, gathered (contiguous scales within
// an int32 index's reach) or read one by one.
struct StridedRowScales {
  static constexpr bool active = true;
  const float* base;  // head j's scale of row 0
  std::int32_t stride;
  __m512 operator()(const std::int32_t* sel, __mmask16 m) const {
    const __m512i r = _mm512_mullo_epi32(_mm512_maskz_loadu_epi32(m, sel), _mm512_set1_epi32(stride));
    return _mm512_mask_i32gather_ps(_mm512_setzero_ps(), m, r, base, 4);
  }
};
template <class KV>
struct PagedRowScales {
  static constexpr bool active = true;
  const flash::KVRows<KV>* rows;
  std::int64_t j;
  __m512 operator()(const std::int32_t* sel, __mmask16 m) const {
    alignas(64) float sc[16] = {};
    for (int r = 0; r < 16; ++r)
      if (m >> r & 1) sc[r] = rows->scale_of(sel[r], j);
    return _mm512_load_ps(sc);
  }
};

// o += Σ p · v over each query's slots of the block, query by query: decode's accumulation
// (the accumulators in registers, rows read through the selection), a chunk of slots at a time.
// oh: the head's [nt][G][dv_pad] accumulators.
// V rows of a paged cache gathered through a selection (contiguous rows: decode::GatheredRows).
template <class KV>
struct PagedGatheredRows {
  const flash::KVRows<KV>* v;
  std::int64_t j;
  const std::int32_t* idx;
  const KV* operator()(std::int64_t i) const { return v->ptr(idx[i], j); }
};
// make(sel) gives the rows of the selection entries sel[0, ...): contiguous or paged.
template <class KV, class MakeRows>
void accumulate_rows(const Tile& tl, const std::int32_t* const* idx, float* const oh, const MakeRows& make) {
  const std::int64_t G = tl.G;
  float* const ones = tl.ones;  // alpha of a query's later chunks
  // The next chunk's rows (this query's or the next one's) are prefetched while a chunk is
  // accumulated: the gathered rows defeat the hardware prefetcher.
  const auto prefetch = [&](std::int64_t i, std::int64_t x) {
    for (; i < tl.nt; ++i, x = 0)
      if (x < tl.n[i]) {
        decode::prefetch_rows(make(idx[i] + tl.c0[i] + x), static_cast<int>(std::min(kChunk, tl.n[i] - x)), tl.dv);
        return;
      }
  };
  prefetch(0, 0);
  for (std::int64_t i = 0; i < tl.nt; ++i) {
    const std::int64_t n = tl.n[i];
    for (std::int64_t x = 0; x < n; x += kChunk) {
      prefetch(i, x + kChunk);
      const decode::ItemState st{nullptr, tl.p + tl.area[i] + x / kChunk * G * kChunk, nullptr, nullptr,
                                 x == 0 ? tl.alpha + i * G : ones};
      const auto r = make(idx[i] + tl.c0[i] + x);
      const int cnt = static_cast<int>(std::min(kChunk, n - x));
      if constexpr (decode::uses_pairs_v<true, KV>)
        decode::accumulate_block_bf16(r, cnt, st, oh + i * G * tl.dv_pad, 0, G, tl.dv, tl.dv_pad);
      else
        decode::accumulate_block(r, cnt, st, oh + i * G * tl.dv_pad, 0, G, tl.dv, tl.dv_pad);
    }
  }
}

template <class KV>
void accumulate(const Tile& tl, const std::int32_t* const* idx, const flash::KVRows<KV>& v, std::int64_t j, float* const oh) {
  if (v.pages == nullptr) {
    const KV* base = v.ptr(0, j);
    const std::int64_t stride = v.stride[0];
    accumulate_rows<KV>(tl, idx, oh, [&](const std::int32_t* sel) { return decode::GatheredRows<KV>{base, stride, sel}; });
  } else {
    accumulate_rows<KV>(tl, idx, oh, [&](const std::int32_t* sel) { return PagedGatheredRows<KV>{&v, j, sel}; });
  }
}

#if defined(ATTNKIT_DECODE_VNNI)
// Precision::fast over int8 values: P·V on vpdpbusd. Per (query, head) and block, the
// probabilities (already times their value rows' scales) are rounded to 8 bits against their
// largest: u = round(255 · p / p_max). Four keys at a time, the four value rows' codes are
// interleaved into dwords (two rounds of unpacks, shared by the heads), and one vpdpbusd per 16
// elements and head sums four u · code products exactly in int32 (at most kKeyBlock = 512 keys:
// no overflow). Then o = o · alpha + Σ · p_max / 255. The softmax sum and so lse keep the
// unrounded probabilities. A 64-element group of o is held in the unpacks' order (element
// 16L + 4m + k in vector m, lane 4L + k); unpermute_quads restores it at the end.
static_assert(kKeyBlock / 4 * 4 * 255 * 128 <= INT32_MAX, "a block's u · code sums must fit in int32");
inline __mmask64 code_mask(std::int64_t left) {
  return left >= 64 ? ~__mmask64{0} : left <= 0 ? __mmask64{0} : (__mmask64{1} << left) - 1;
}

// Query i's slots of the block for heads [g, g + GT): rounded probabilities u [GT][n4] (zero
// padded to n4 = n rounded up to 4) and their steps p_max / 255.
template <int GT>
inline void round_probabilities(const Tile& tl, std::int64_t i, std::int64_t g, std::uint8_t* u, std::int64_t n4,
                                float* step) {
  const std::int64_t G = tl.G, n = tl.n[i];
  for (int t = 0; t < GT; ++t) {
    const float* p0 = tl.p + tl.area[i] + (g + t) * kChunk;
    __m512 mx = _mm512_setzero_ps();
    for (std::int64_t x = 0; x < n; x += 16)
      mx = _mm512_max_ps(mx, _mm512_maskz_loadu_ps(tail_mask(n - x), p0 + x / kChunk * G * kChunk + x % kChunk));
    const float pmax = simd::hmax(mx);
    step[t] = pmax / 255.f;
    const __m512 inv = _mm512_set1_ps(pmax > 0.f ? 255.f / pmax : 0.f);
    std::uint8_t* ut = u + t * n4;
    // Whole 16-byte stores (u has room past the last head's n4): the 4-byte reads that follow
    // are forwarded from them, not stalled as behind a masked store.
    for (std::int64_t x = 0; x < n4; x += 16) {
      const __m512 px = _mm512_maskz_loadu_ps(tail_mask(n - x), p0 + x / kChunk * G * kChunk + x % kChunk);
      const __m512i c = _mm512_cvtps_epi32(_mm512_mul_ps(px, inv));  // round to nearest, in [0, 255]
      _mm_storeu_si128(reinterpret_cast<__m128i*>(ut + x), _mm512_cvtusepi32_epi8(c));
    }
  }
}

// o[t] (head g + t's row, stride dv_pad) = o · alpha + the block's P·V, for the value rows
// row(x), x < n, of one query.
template <int GT, class Row>
inline void pv_heads_vnni(const Row& row, std::int64_t n, const std::uint8_t* u, std::int64_t n4, const float* step,
                          const float* alpha, float* o, std::int64_t dv, std::int64_t dv_pad) {
  for (std::int64_t e0 = 0; e0 < dv; e0 += 64) {
    const __mmask64 m = code_mask(dv - e0);
    __m512i acc[GT][4];
#pragma GCC unroll 2
    for (int t = 0; t < GT; ++t)
#pragma GCC unroll 4
      for (int q = 0; q < 4; ++q) acc[t][q] = _mm512_setzero_si512();
    for (std::int64_t x = 0; x < n; x += 4) {
      // Rows past n repeat the last one, against u = 0.
      __m512i w[4];
      decode::interleave_quads(_mm512_maskz_loadu_epi8(m, row(x) + e0),
                               _mm512_maskz_loadu_epi8(m, row(std::min(x + 1, n - 1)) + e0),
                               _mm512_maskz_loadu_epi8(m, row(std::min(x + 2, n - 1)) + e0),
                               _mm512_maskz_loadu_epi8(m, row(std::min(x + 3, n - 1)) + e0), w);
#pragma GCC unroll 2
      for (int t = 0; t < GT; ++t) {
        std::int32_t quad;
        std::memcpy(&quad, u + t * n4 + x, 4);
        const __m512i pb = _mm512_set1_epi32(quad);
#pragma GCC unroll 4
        for (int q = 0; q < 4; ++q) acc[t][q] = decode::dpbusd(acc[t][q], pb, w[q]);
      }
    }
#pragma GCC unroll 2
    for (int t = 0; t < GT; ++t) {
      const __m512 st = _mm512_set1_ps(step[t]), al = _mm512_set1_ps(alpha[t]);
#pragma GCC unroll 4
      for (int q = 0; q < 4; ++q) {
        float* oq = o + t * dv_pad + e0 + 16 * q;
        _mm512_storeu_ps(oq, _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc[t][q]), st, _mm512_mul_ps(_mm512_loadu_ps(oq), al)));
      }
    }
  }
}

// The block's P·V of one KV head for every query of the tile (oh: the head's [nt][G][dv_pad]).
template <class MakeRow>
void accumulate_vnni(const Tile& tl, const std::int32_t* const* idx, float* const oh, const MakeRow& make) {
  const std::int64_t G = tl.G;
  alignas(64) std::uint8_t u[2 * (kKeyBlock + 4) + 16];
  float step[2];
  for (std::int64_t i = 0; i < tl.nt; ++i) {
    const std::int64_t n = tl.n[i];
    if (n == 0) continue;
    const std::int64_t n4 = (n + 3) / 4 * 4;
    const auto row = make(idx[i] + tl.c0[i]);
    std::int64_t g = 0;
    for (; g + 2 <= G; g += 2) {
      round_probabilities<2>(tl, i, g, u, n4, step);
      pv_heads_vnni<2>(row, n, u, n4, step, tl.alpha + i * G + g, oh + (i * G + g) * tl.dv_pad, tl.dv, tl.dv_pad);
    }
    if (g < G) {
      round_probabilities<1>(tl, i, g, u, n4, step);
      pv_heads_vnni<1>(row, n, u, n4, step, tl.alpha + i * G + g, oh + (i * G + g) * tl.dv_pad, tl.dv, tl.dv_pad);
    }
  }
}

// A row of dv_pad (a multiple of 64) from the unpacks' order to natural order.
inline void unpermute_quads(float* o, std::int64_t dv_pad) {
  alignas(64) float tmp[64];
  for (std::int64_t e0 = 0; e0 < dv_pad; e0 += 64) {
    for (int q = 0; q < 4; ++q)
      for (int l = 0; l < 4; ++l)
        for (int k = 0; k < 4; ++k) tmp[16 * l + 4 * q + k] = o[e0 + 16 * q + 4 * l + k];
    std::copy(tmp, tmp + 64, o + e0);
  }
}
#endif

template <class KV>
using ScoresFn = void (*)(const Tile&, const float*, const QuantHead&, const flash::KVRows<KV>&,
                          const flash::KVRows<KV>&, std::int64_t, std::int64_t, std::int64_t);

template <class KV, bool Vnni>
ScoresFn<KV> scores_for(int ns) {
  switch (ns) {
    case 1: return &scores<1, KV, Vnni>;
    case 2: return &scores<2, KV, Vnni>;
    case 4: return &scores<4, KV, Vnni>;
    case 8: return &scores<8, KV, Vnni>;
    default: return &scores<16, KV, Vnni>;
  }
}

template <class KV>
ScoresFn<KV> scores_for(int ns, bool vnni) {
#if defined(ATTNKIT_DECODE_VNNI)
  if constexpr (std::is_same_v<KV, std::int8_t>)
    if (vnni) return scores_for<KV, true>(ns);
#endif
  (void)vnni;
  return scores_for<KV, false>(ns);
}

struct TileScratch;

// Queries [t0, t1) (selection rows idx[t - t0] with count[t - t0] valid entries) against KV
// heads [j0, j1); writes out[t, j·G + g] and lse. scale_log2 = scale · log2(e). vnni: int8 keys
// scored against the quantised queries (Precision::fast on a VNNI build).
template <class KV>
void run_tile(ConstView3<float> q, const flash::KVRows<KV>& k, const flash::KVRows<KV>& v, const std::int32_t* const* idx,
              const std::int64_t* count, std::int64_t t0, std::int64_t t1, std::int64_t j0, std::int64_t j1,
              std::int64_t G, float scale_log2, View3<float> out, View2<float> lse, bool vnni = false) {
  constexpr bool pairs = decode::uses_pairs_v<true, KV>;
  constexpr bool quant = std::is_same_v<KV, std::int8_t>;
  ATTNKIT_REQUIRE(t1 - t0 <= kTile, "sparse key-major kernel: a tile holds at most ", kTile, " queries, got ", t1 - t0);
  Tile tl;
  tl.nt = t1 - t0;
  tl.G = G;
  tl.dk = k.shape[2];
  tl.dv = v.shape[2];
  const int nsk = slices(tl.dk);
  tl.dkp = 16 * nsk;
  tl.dv_pad = pairs ? decode::round_up32(tl.dv) : vnni ? decode::round_up64(tl.dv) : decode::round_up16(tl.dv);
  const std::int64_t nh = j1 - j0, rows = tl.nt * G;
  // Slots: each query's run rounded up to whole chunks.
  const std::int64_t slot_floats = (tl.nt * kKeyBlock + tl.nt * kChunk) * G;
  const std::int64_t pair_floats = tl.nt * kKeyBlock * static_cast<std::int64_t>(sizeof(Pair) / sizeof(float));
  tl.dkq = std::max<std::int64_t>(64, tl.dkp);
  tl.q_shift = __builtin_ctzll(static_cast<unsigned long long>(tl.dkp));
  const std::int64_t quant_floats = vnni ? nh * rows * (tl.dkq / 4 + 17) + 16 : 0;
  const std::int64_t floats =
      nh * rows * (tl.dkp + tl.dv_pad + 2) + rows + G + slot_floats + 2 * kKeyBlock + 1 + pair_floats + quant_floats;
  float* buf = thread_scratch<TileScratch>().get(floats);
  tl.o = buf;  // first: 64-byte aligned rows, as decode's accumulation stores them
  tl.qs = tl.o + nh * rows * tl.dv_pad;
  tl.p = tl.qs + nh * rows * tl.dkp;
  tl.m = tl.p + slot_floats;
  tl.l = tl.m + nh * rows;
  tl.alpha = tl.l + nh * rows;
  tl.ones = tl.alpha + rows;
  std::fill(tl.ones, tl.ones + G, 1.f);
  tl.who = reinterpret_cast<std::uint64_t*>((reinterpret_cast<std::uintptr_t>(tl.ones + G) + 7) & ~std::uintptr_t{7});
  tl.pairs = reinterpret_cast<Pair*>(tl.who + kKeyBlock);
  // Query code rows are loaded aligned: the first one at the next 64 bytes.
  const auto codes_at = (reinterpret_cast<std::uintptr_t>(tl.pairs + tl.nt * kKeyBlock) + 63) & ~std::uintptr_t{63};
  tl.qc = reinterpret_cast<std::int8_t*>(codes_at);
  tl.qinit = reinterpret_cast<std::int32_t*>(tl.qc + (vnni ? nh * rows * tl.dkq : 0));
  tl.qscale = reinterpret_cast<float*>(tl.qinit + (vnni ? nh * rows * 16 : 0));
  std::int64_t last = -1, cursor[kTile];
  for (std::int64_t h = 0; h < nh; ++h)
    for (std::int64_t i = 0; i < tl.nt; ++i)
      for (std::int64_t g = 0; g < G; ++g) {
        const float* src = q.ptr(t0 + i, (j0 + h) * G + g);
        float* dst = tl.qs + ((h * tl.nt + i) * G + g) * tl.dkp;
        for (std::int64_t e = 0; e < tl.dkp; ++e) dst[e] = e < tl.dk ? src[e] * scale_log2 : 0.f;
#if defined(ATTNKIT_DECODE_VNNI)
        if (vnni) {
          const std::int64_t r = (h * tl.nt + i) * G + g;
          std::int32_t bias;
          decode::quantize_query_row(dst, tl.dk, tl.dkq, tl.qc + r * tl.dkq, tl.qscale[r], bias);
          std::fill(tl.qinit + r * 16, tl.qinit + (r + 1) * 16, 0);
          tl.qinit[r * 16] = -bias;
        }
#endif
      }
  for (std::int64_t i = 0; i < tl.nt; ++i) {
    cursor[i] = 0;
    if (count[i] > 0) last = std::max<std::int64_t>(last, idx[i][count[i] - 1]);
  }
  std::fill(tl.o, tl.o + nh * rows * tl.dv_pad, 0.f);
  std::fill(tl.m, tl.m + nh * rows, kNegInf);
  std::fill(tl.l, tl.l + nh * rows, 0.f);
  const ScoresFn<KV> score_fn = scores_for<KV>(nsk, vnni);
  for (std::int64_t s0 = 0; s0 <= last; s0 += kKeyBlock) {
    const std::int64_t nb = std::min(kKeyBlock, last + 1 - s0);
    std::int64_t slots = 0;
    std::fill(tl.who, tl.who + nb, std::uint64_t{0});
    for (std::int64_t i = 0; i < tl.nt; ++i) {
      const std::int32_t* r = idx[i];
      const std::uint64_t bit = std::uint64_t{1} << i;
      std::int64_t c = cursor[i];
      tl.c0[i] = c;
      while (c < count[i] && r[c] < s0 + nb) tl.who[r[c++] - s0] |= bit;
      tl.n[i] = c - tl.c0[i];
      tl.area[i] = slots;
      slots += (tl.n[i] + kChunk - 1) / kChunk * kChunk * G;
      cursor[i] = c;
    }
    if (slots == 0) continue;
    // The pairs in key order; walking the keys in order, a query's next slot is its count so far.
    {
      std::int64_t next[kTile] = {};
      Pair* pp = tl.pairs;
      for (std::int64_t u = 0; u < nb; ++u)
        for (std::uint64_t m = tl.who[u]; m != 0; m &= m - 1) {
          const int i = __builtin_ctzll(static_cast<unsigned long long>(m));
          const std::int64_t x = next[i]++;
          *pp++ = Pair{static_cast<std::int32_t>(i * G * tl.dkp),
                       static_cast<std::int32_t>(tl.area[i] + x / kChunk * G * kChunk + x % kChunk)};
        }
    }
    for (std::int64_t h = 0; h < nh; ++h) {
      const std::int64_t j = j0 + h;
      const QuantHead qh{tl.qc + h * rows * tl.dkq, tl.qinit + h * rows * 16};
      score_fn(tl, tl.qs + h * rows * tl.dkp, qh, k, v, j, s0, nb);
      if constexpr (quant) {
        const float* qscale = vnni ? tl.qscale + h * rows : nullptr;
        // Gathers index in int32: contiguous scales within its reach (else, and through a page
        // table, one by one).
        const auto reach = [&](const flash::KVRows<KV>& r) {
          return r.pages == nullptr && (r.shape[0] - 1) * r.scale_stride[0] <= INT32_MAX;
        };
        if (reach(k) && reach(v))
          softmax(tl, tl.m + h * rows, tl.l + h * rows, idx, qscale,
                  StridedRowScales{k.scales + j * k.scale_stride[1], static_cast<std::int32_t>(k.scale_stride[0])},
                  StridedRowScales{v.scales + j * v.scale_stride[1], static_cast<std::int32_t>(v.scale_stride[0])});
        else
          softmax(tl, tl.m + h * rows, tl.l + h * rows, idx, qscale, PagedRowScales<KV>{&k, j}, PagedRowScales<KV>{&v, j});
#if defined(ATTNKIT_DECODE_VNNI)
        if (vnni) {
          float* oh = tl.o + h * rows * tl.dv_pad;
          if (v.pages == nullptr) {
            const std::int8_t* vb = v.ptr(0, j);
            const std::int64_t vst = v.stride[0];
            accumulate_vnni(tl, idx, oh, [&](const std::int32_t* sel) {
              return [=](std::int64_t x) { return vb + static_cast<std::int64_t>(sel[x]) * vst; };
            });
          } else {
            accumulate_vnni(tl, idx, oh, [&](const std::int32_t* sel) { return PagedGatheredRows<KV>{&v, j, sel}; });
          }
          continue;
        }
#endif
      } else {
        softmax(tl, tl.m + h * rows, tl.l + h * rows);
      }
      accumulate<KV>(tl, idx, v, j, tl.o + h * rows * tl.dv_pad);
    }
  }
  for (std::int64_t h = 0; h < nh; ++h)
    for (std::int64_t i = 0; i < tl.nt; ++i)
      for (std::int64_t g = 0; g < G; ++g) {
        const std::int64_t r = h * rows + i * G + g, col = (j0 + h) * G + g;
        float* o = tl.o + r * tl.dv_pad;
        if constexpr (pairs) decode::unpermute_pairs(o, tl.dv_pad);
#if defined(ATTNKIT_DECODE_VNNI)
        if (vnni) unpermute_quads(o, tl.dv_pad);
#endif
        float* dst = out.ptr(t0 + i, col);
        const float l = tl.l[r];
        if (l > 0.f || std::isnan(l)) {  // NaN (a NaN among the inputs) goes on to the output
          const float inv = 1.f / l;
          for (std::int64_t e = 0; e < tl.dv; ++e) dst[e] = o[e] * inv;
        } else {
          std::fill(dst, dst + tl.dv, 0.f);
        }
        if (!lse.empty()) lse(t0 + i, col) = l > 0.f || std::isnan(l) ? (tl.m[r] + std::log2(l)) * decode::kLn2 : kNegInf;
      }
}

}  // namespace attnkit::detail::sparse::key_major

#endif  // AVX-512
