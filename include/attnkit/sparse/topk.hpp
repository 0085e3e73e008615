// attnkit/sparse/topk.hpp — top-k selection of one score row, in linear time.
//
//   select_topk(score, n, k, out):  out[0 .. m) = the indices of the m = min(k, n) largest
//   scores among score[0 .. n), in ascending index order; ties go to the lower index;
//   out[m .. k) = -1.
//
// Why not a sort: a DeepSeek-style indexer selects 2048 of up to 10^5 keys for every query, so
// the selection runs T times per prefill over rows of up to T_k scores. A radix select finds the
// exact threshold in three histogram passes over shrinking candidate sets (11, 11 and 10 bits
// of the order-preserving integer image of the float), then one pass over the row writes the
// indices above the threshold, and those equal to it from the lowest index on, already in
// ascending order. Cost ~2n plus the candidates, whatever the score distribution.
// NaN scores are refused (an Error naming the first one), -inf is a score like any other.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include "attnkit/core/error.hpp"

namespace attnkit {

namespace detail::topk {

// Order-preserving map float -> uint32 (larger float, larger key; -0 < +0 is harmless here).
inline std::uint32_t key(float f) {
  std::uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

#if defined(__AVX512F__)
// key() of 16 floats' bits.
inline __m512i keys16(__m512i u) {
  const __m512i neg = _mm512_srai_epi32(u, 31);  // all ones for negative floats
  return _mm512_xor_si512(u, _mm512_or_si512(neg, _mm512_set1_epi32(static_cast<int>(0x80000000u))));
}
#endif

// Among `keys`, finds the bin (of the bits selected by shift/width) from the top that holds the
// need-th largest; returns it and reduces `need` to the rank within that bin.
inline std::uint32_t pick_bin(const std::uint32_t* hist, int bins, std::int64_t& need) {
  std::int64_t above = 0;
  for (int b = bins - 1; b >= 0; --b) {
    if (above + hist[b] >= need) {
      need -= above;
      return static_cast<std::uint32_t>(b);
    }
    above += hist[b];
  }
  return 0;  // unreachable when need <= the number of keys
}

// Keys of the scores whose top 11 key bits are `bin`, in index order.
inline void collect_bin(const float* score, std::int64_t n, std::uint32_t bin, std::uint32_t* cand) {
  std::int64_t s = 0, m = 0;
#if defined(__AVX512F__)
  const __m512i vbin = _mm512_set1_epi32(static_cast<int>(bin));
  for (; s + 16 <= n; s += 16) {
    const __m512i u = keys16(_mm512_loadu_si512(score + s));
    const __mmask16 hit = _mm512_cmpeq_epi32_mask(_mm512_srli_epi32(u, 21), vbin);
    _mm512_mask_compressstoreu_epi32(cand + m, hit, u);
    m += __builtin_popcount(hit);
  }
#endif
  for (; s < n; ++s) {
    const std::uint32_t u = key(score[s]);
    if ((u >> 21) == bin) cand[m++] = u;
  }
}

// out = the indices s (ascending) with key > thr, and the first `eq` with key == thr.
inline void write_selection(const float* score, std::int64_t n, std::uint32_t thr, std::int64_t eq, std::int32_t* out) {
  std::int64_t s = 0, m = 0;
#if defined(__AVX512F__)
  const __m512i vthr = _mm512_set1_epi32(static_cast<int>(thr));
  const __m512i step = _mm512_set1_epi32(16);
  __m512i ids = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  for (; s + 16 <= n; s += 16, ids = _mm512_add_epi32(ids, step)) {
    const __m512i u = keys16(_mm512_loadu_si512(score + s));
    __mmask16 take = _mm512_cmpgt_epu32_mask(u, vthr);
    __mmask16 same = _mm512_cmpeq_epi32_mask(u, vthr);
    while (same != 0 && eq > 0) {  // the lowest equal lanes first
      take |= static_cast<__mmask16>(same & -same);
      same = static_cast<__mmask16>(same & (same - 1));
      --eq;
    }
    _mm512_mask_compressstoreu_epi32(out + m, take, ids);
    m += __builtin_popcount(take);
  }
#endif
  for (; s < n; ++s) {
    const std::uint32_t u = key(score[s]);
    if (u > thr || (u == thr && eq-- > 0)) out[m++] = static_cast<std::int32_t>(s);
  }
}

// Scratch per thread, reused across calls.
inline std::vector<std::uint32_t>& candidates() {
  thread_local std::vector<std::uint32_t> c;
  return c;
}

}  // namespace detail::topk

// See the contract at the top of this file. k >= 1; n >= 0.
inline void select_topk(const float* score, std::int64_t n, std::int64_t k, std::int32_t* out) {
  using namespace detail::topk;
  ATTNKIT_REQUIRE(k >= 1, "select_topk: argument 'k': must be >= 1, got ", k);
  ATTNKIT_REQUIRE(n >= 0 && n <= INT32_MAX, "select_topk: argument 'n': must be in [0, 2^31), got ", n);
  if (n <= k) {
    for (std::int64_t s = 0; s < n; ++s) out[s] = static_cast<std::int32_t>(s);
    for (std::int64_t s = n; s < k; ++s) out[s] = -1;
    return;
  }
  // Level 1: the top 11 bits over the whole row, in 4 interleaved histograms (neighbouring
  // scores often share a bin, and one histogram would serialise on its own increments).
  std::uint32_t hist4[4][2048];
  std::memset(hist4, 0, sizeof hist4);
  bool nan = false;
  std::int64_t s = 0;
  for (; s + 4 <= n; s += 4) {
#pragma GCC unroll 4
    for (int c = 0; c < 4; ++c) {
      nan |= std::isnan(score[s + c]);
      ++hist4[c][key(score[s + c]) >> 21];
    }
  }
  for (; s < n; ++s) {
    nan |= std::isnan(score[s]);
    ++hist4[0][key(score[s]) >> 21];
  }
  if (nan) {
    std::int64_t at = 0;
    while (!std::isnan(score[at])) ++at;
    detail::throw_error("select_topk: argument 'score': NaN at index ", at, " (of ", n, ")");
  }
  std::uint32_t hist[2048];
  for (int b = 0; b < 2048; ++b) hist[b] = hist4[0][b] + hist4[1][b] + hist4[2][b] + hist4[3][b];
  std::int64_t need = k;
  const std::uint32_t b1 = pick_bin(hist, 2048, need);
  std::vector<std::uint32_t>& cand = candidates();
  cand.resize(static_cast<std::size_t>(hist[b1]));
  collect_bin(score, n, b1, cand.data());
  // Level 2: the next 11 bits among the candidates; level 3: the last 10.
  std::memset(hist, 0, sizeof hist);
  for (std::uint32_t u : cand) ++hist[(u >> 10) & 2047u];
  const std::uint32_t b2 = pick_bin(hist, 2048, need);
  std::memset(hist, 0, 1024 * sizeof(std::uint32_t));
  for (std::uint32_t u : cand)
    if (((u >> 10) & 2047u) == b2) ++hist[u & 1023u];
  const std::uint32_t b3 = pick_bin(hist, 1024, need);
  const std::uint32_t thr = (b1 << 21) | (b2 << 10) | b3;
  // need = how many keys equal to the threshold to take, the lowest indices first.
  write_selection(score, n, thr, need, out);
}

}  // namespace attnkit
