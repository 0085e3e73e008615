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

#include "attnkit/core/error.hpp"

namespace attnkit {

namespace detail::topk {

// Order-preserving map float -> uint32 (larger float, larger key; -0 < +0 is harmless here).
inline std::uint32_t key(float f) {
  std::uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

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
  // Level 1: the top 11 bits over the whole row.
  std::uint32_t hist[2048];
  std::memset(hist, 0, sizeof hist);
  bool nan = false;
  for (std::int64_t s = 0; s < n; ++s) {
    nan |= std::isnan(score[s]);
    ++hist[key(score[s]) >> 21];
  }
  if (nan) {
    std::int64_t s = 0;
    while (!std::isnan(score[s])) ++s;
    detail::throw_error("select_topk: argument 'score': NaN at index ", s, " (of ", n, ")");
  }
  std::int64_t need = k;
  const std::uint32_t b1 = pick_bin(hist, 2048, need);
  std::vector<std::uint32_t>& cand = candidates();
  cand.clear();
  for (std::int64_t s = 0; s < n; ++s) {
    const std::uint32_t u = key(score[s]);
    if ((u >> 21) == b1) cand.push_back(u);
  }
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
  std::int64_t m = 0, eq_left = need;
  for (std::int64_t s = 0; s < n; ++s) {
    const std::uint32_t u = key(score[s]);
    if (u > thr || (u == thr && eq_left-- > 0)) out[m++] = static_cast<std::int32_t>(s);
  }
}

}  // namespace attnkit
