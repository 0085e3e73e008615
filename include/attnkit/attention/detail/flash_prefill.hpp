// attnkit/attention/detail/flash_prefill.hpp — the tiled, online-softmax (Flash-style) kernel
// behind attention_prefill / attention_prefill_varlen. Not a public API: prefill.hpp validates
// arguments and calls run_prefill().
//
// Work item = (segment, KV head, query tile). The rows of an item are the (query head, query)
// pairs of every query head of that KV head's group (restricted to opt.heads) for the tile's
// queries, so one packed K/V tile serves all G heads. Per key tile of kBc keys:
//   S^T[key][row] = K_tile · Q^T     (Q pre-scaled by scale·log2(e), rows along SIMD lanes, so
//                                    the softmax reductions over keys are vertical)
//   online softmax in base 2 (running max m, running sum l per row)
//   O[row][:]     = alpha·O + P · V_tile
// Key tiles are aligned at absolute key positions (multiples of kBc) and visited only where
// some row of the item can see a key in them, so causal tiles above the diagonal and sliding
// window tiles outside the window are never touched. Every row's arithmetic is the same
// sequence of operations whatever tile or item it lands in (a visited tile that is fully
// masked for a row is an exact no-op for it), so results do not depend on thread count,
// opt.heads / opt.queries sub-ranges or varlen packing.
//
// The kernel is templated on the xsimd Arch: the same source compiles to AVX-512 (16 lanes,
// the hot path) or to narrower instruction sets (the portable path, tested via
// detail::attention_prefill_arch).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <new>
#include <vector>

#include <xsimd/xsimd.hpp>

#include "attnkit/attention/common.hpp"
#include "attnkit/core/bf16.hpp"
#include "attnkit/core/simd.hpp"
#include "attnkit/core/threading.hpp"
#include "attnkit/core/view.hpp"

namespace attnkit::detail::flash {

inline constexpr std::int64_t kBc = 64;  // keys per key tile (multiple of kKeyBlock)
inline constexpr int kKeyBlock = 8;      // keys per S micro-tile
inline constexpr int kPvRows = 6;        // rows per P·V micro-tile
inline constexpr int kPvCols = 4;        // SIMD batches of d_v per P·V micro-tile
inline constexpr float kLog2e = 1.4426950408889634f;
inline constexpr float kLn2 = 0.6931471805599453f;

template <class Arch>
using fb = xsimd::batch<float, Arch>;
template <class Arch>
inline constexpr std::int64_t lanes = static_cast<std::int64_t>(fb<Arch>::size);

inline std::int64_t round_up(std::int64_t x, std::int64_t m) { return (x + m - 1) / m * m; }

// 2^x, about 1 ulp for x in [-126, 0] (the softmax only evaluates x <= 0). Returns exactly 1
// at x = 0 and exactly 0 for x < -126 and x = -inf (masked logits), which is what makes
// visiting a masked tile an exact no-op.
template <class Arch>
inline fb<Arch> exp2(fb<Arch> x) {
  using B = fb<Arch>;
  using I = xsimd::batch<std::int32_t, Arch>;
  const B xc = xsimd::min(xsimd::max(x, B(-126.f)), B(127.f));
  const B n = xsimd::nearbyint(xc);
  const B f = xc - n;  // [-0.5, 0.5]
  // Taylor series of e^(f ln 2) to degree 7: truncation error < 6e-9 relative on [-0.5, 0.5].
  B p(1.5252733804059840e-05f);
  p = xsimd::fma(p, f, B(1.5403530393381608e-04f));
  p = xsimd::fma(p, f, B(1.3333558146428443e-03f));
  p = xsimd::fma(p, f, B(9.6181291076284772e-03f));
  p = xsimd::fma(p, f, B(5.5504108664821580e-02f));
  p = xsimd::fma(p, f, B(2.4022650695910071e-01f));
  p = xsimd::fma(p, f, B(6.9314718055994531e-01f));
  p = xsimd::fma(p, f, B(1.f));
  const I e = (xsimd::to_int(n) + I(127)) << 23;
  const B r = p * xsimd::bitwise_cast<B>(e);
  return xsimd::select(x < B(-126.f), B(0.f), r);
}

// One attention problem: a single sequence (varlen splits into several).
template <class KV>
struct Segment {
  ConstView3<float> q;
  ConstView3<KV> k, v;
  View3<float> out;
  View2<float> lse;  // data == nullptr: not requested
  std::int64_t q_offset;
};

struct Shape {
  std::int64_t H, H_kv, G, d_k, d_v;
  float q_scale;  // softmax scale · log2(e): logits come out in base-2 units
};

struct WorkItem {
  std::int32_t segment;
  std::int32_t kv_head;
  std::int32_t h_begin, h_end;  // query heads (all within kv_head's group)
  std::int64_t t_begin, t_end;  // query rows of the segment
};

// Queries per tile: about 64 rows per item (rows = heads of the group x queries).
inline std::int64_t query_tile(std::int64_t G) { return std::clamp<std::int64_t>(64 / std::max<std::int64_t>(G, 1), 8, 64); }

// 64-byte aligned float scratch owned by one work item.
class Scratch {
 public:
  explicit Scratch(std::int64_t n) : n_(n), p_(new (std::align_val_t(64)) float[static_cast<std::size_t>(n)]) {}
  ~Scratch() { ::operator delete[](p_, std::align_val_t(64)); }
  Scratch(const Scratch&) = delete;
  Scratch& operator=(const Scratch&) = delete;
  float* take(std::int64_t n) {  // n floats, 64-byte aligned
    float* r = p_ + used_;
    used_ += round_up(n, 16);
    return r;
  }
  static std::int64_t need(std::int64_t n) { return round_up(n, 16); }

 private:
  std::int64_t n_, used_ = 0;
  float* p_;
};

// S^T[kb + i][rb + j*W ...] = sum_d K[kb + i][d] * QT[d][rb + j*W ...] for i < kKeyBlock, j < NB.
template <class Arch, int NB>
inline void qk_block(const float* kbuf, const float* qt, float* st, std::int64_t d_k, std::int64_t rp,
                     std::int64_t kb, std::int64_t rb) {
  using B = fb<Arch>;
  constexpr std::int64_t W = lanes<Arch>;
  B acc[kKeyBlock][NB];
#pragma GCC unroll 8
  for (int i = 0; i < kKeyBlock; ++i)
#pragma GCC unroll 4
    for (int j = 0; j < NB; ++j) acc[i][j] = B(0.f);
  const float* krow = kbuf + kb * d_k;
  for (std::int64_t d = 0; d < d_k; ++d) {
    B qv[NB];
#pragma GCC unroll 4
    for (int j = 0; j < NB; ++j) qv[j] = B::load_aligned(qt + d * rp + rb + j * W);
#pragma GCC unroll 8
    for (int i = 0; i < kKeyBlock; ++i) {
      const B kx(krow[i * d_k + d]);
#pragma GCC unroll 4
      for (int j = 0; j < NB; ++j) acc[i][j] = xsimd::fma(kx, qv[j], acc[i][j]);
    }
  }
#pragma GCC unroll 8
  for (int i = 0; i < kKeyBlock; ++i)
#pragma GCC unroll 4
    for (int j = 0; j < NB; ++j) acc[i][j].store_aligned(st + (kb + i) * rp + rb + j * W);
}

// O[r0 + i][c0 + j*W ...] = alpha[r0 + i] * O[...] + sum_{c < kc} P^T[c][r0 + i] * V[c][c0 + j*W ...].
template <class Arch, int R, int NC>
inline void pv_block(const float* st, const float* vbuf, float* obuf, const float* alpha, std::int64_t rp,
                     std::int64_t dvp, std::int64_t kc, std::int64_t r0, std::int64_t c0) {
  using B = fb<Arch>;
  constexpr std::int64_t W = lanes<Arch>;
  B acc[R][NC];
#pragma GCC unroll 8
  for (int i = 0; i < R; ++i) {
    const B a(alpha[r0 + i]);
#pragma GCC unroll 4
    for (int j = 0; j < NC; ++j) acc[i][j] = a * B::load_aligned(obuf + (r0 + i) * dvp + c0 + j * W);
  }
  for (std::int64_t c = 0; c < kc; ++c) {
    B vv[NC];
#pragma GCC unroll 4
    for (int j = 0; j < NC; ++j) vv[j] = B::load_aligned(vbuf + c * dvp + c0 + j * W);
    const float* prow = st + c * rp + r0;
#pragma GCC unroll 8
    for (int i = 0; i < R; ++i) {
      const B p(prow[i]);
#pragma GCC unroll 4
      for (int j = 0; j < NC; ++j) acc[i][j] = xsimd::fma(p, vv[j], acc[i][j]);
    }
  }
#pragma GCC unroll 8
  for (int i = 0; i < R; ++i)
#pragma GCC unroll 4
    for (int j = 0; j < NC; ++j) acc[i][j].store_aligned(obuf + (r0 + i) * dvp + c0 + j * W);
}

template <class Arch, int NC>
inline void pv_rows(const float* st, const float* vbuf, float* obuf, const float* alpha, std::int64_t rows,
                    std::int64_t rp, std::int64_t dvp, std::int64_t kc, std::int64_t c0) {
  std::int64_t r = 0;
  for (; r + kPvRows <= rows; r += kPvRows) pv_block<Arch, kPvRows, NC>(st, vbuf, obuf, alpha, rp, dvp, kc, r, c0);
  switch (rows - r) {
    case 1: pv_block<Arch, 1, NC>(st, vbuf, obuf, alpha, rp, dvp, kc, r, c0); break;
    case 2: pv_block<Arch, 2, NC>(st, vbuf, obuf, alpha, rp, dvp, kc, r, c0); break;
    case 3: pv_block<Arch, 3, NC>(st, vbuf, obuf, alpha, rp, dvp, kc, r, c0); break;
    case 4: pv_block<Arch, 4, NC>(st, vbuf, obuf, alpha, rp, dvp, kc, r, c0); break;
    case 5: pv_block<Arch, 5, NC>(st, vbuf, obuf, alpha, rp, dvp, kc, r, c0); break;
    default: break;
  }
  static_assert(kPvRows == 6);
}

// Widens rows [k0, k0 + kc) of one KV head into dst[kBc][ld] (f32), zero-filling columns
// [n, ld) and rows [kc, kBc).
template <class Arch, class KV>
inline void pack_rows(const ConstView3<KV>& src, std::int64_t head, std::int64_t k0, std::int64_t kc,
                      std::int64_t n, std::int64_t ld, float* dst) {
  constexpr std::int64_t W = lanes<Arch>;
  for (std::int64_t c = 0; c < kc; ++c) {
    const KV* s = src.ptr(k0 + c, head);
    float* o = dst + c * ld;
    std::int64_t d = 0;
    for (; d + W <= n; d += W) simd::load<Arch>(s + d).store_unaligned(o + d);
    for (; d < n; ++d) o[d] = to_float(s[d]);
    for (; d < ld; ++d) o[d] = 0.f;
  }
  if (kc < kBc) std::memset(dst + kc * ld, 0, static_cast<std::size_t>((kBc - kc) * ld) * sizeof(float));
}

template <class Arch, class KV, class Mask>
void run_item(const Segment<KV>& seg, const Shape& sh, const Mask& mask, const WorkItem& it) {
  using B = fb<Arch>;
  constexpr std::int64_t W = lanes<Arch>;
  const std::int64_t nq = it.t_end - it.t_begin, nh = it.h_end - it.h_begin;
  const std::int64_t rows = nq * nh, rp = round_up(rows, W), dvp = round_up(sh.d_v, W), d_k = sh.d_k;
  const std::int64_t T_k = seg.k.shape[0];

  Scratch scratch(Scratch::need(d_k * rp) + Scratch::need(kBc * rp) + Scratch::need(kBc * d_k) +
                  Scratch::need(kBc * dvp) + Scratch::need(rows * dvp) + 5 * Scratch::need(rp));
  float* qt = scratch.take(d_k * rp);    // Q^T, scaled, rows zero-padded to rp
  float* st = scratch.take(kBc * rp);    // S^T, then P^T
  float* kbuf = scratch.take(kBc * d_k);
  float* vbuf = scratch.take(kBc * dvp);
  float* obuf = scratch.take(rows * dvp);
  float* m = scratch.take(rp);
  float* l = scratch.take(rp);
  float* alpha = scratch.take(rp);
  float* lo = scratch.take(rp);  // per tile: first / last visible key, relative to the tile
  float* hi = scratch.take(rp);

  // Row r = (head it.h_begin + r / nq, query it.t_begin + r % nq).
  for (std::int64_t r = 0; r < rows; ++r) {
    const float* src = seg.q.ptr(it.t_begin + r % nq, it.h_begin + r / nq);
    for (std::int64_t d = 0; d < d_k; ++d) qt[d * rp + r] = src[d] * sh.q_scale;
  }
  for (std::int64_t d = 0; d < d_k; ++d)
    for (std::int64_t r = rows; r < rp; ++r) qt[d * rp + r] = 0.f;
  std::fill(m, m + rp, -std::numeric_limits<float>::infinity());
  std::fill(l, l + rp, 0.f);
  std::fill(obuf, obuf + rows * dvp, 0.f);

  const std::int64_t p_first = seg.q_offset + it.t_begin, p_last = seg.q_offset + it.t_end - 1;
  const std::int64_t key_lo = mask.first_key(p_first);
  const std::int64_t key_hi = std::min(mask.last_key(p_last), T_k - 1);
  if (key_hi >= key_lo && key_hi >= 0) {
    for (std::int64_t kt = std::max<std::int64_t>(key_lo, 0) / kBc; kt <= key_hi / kBc; ++kt) {
      const std::int64_t k0 = kt * kBc, kc = std::min(kBc, T_k - k0);
      pack_rows<Arch>(seg.k, it.kv_head, k0, kc, d_k, d_k, kbuf);
      pack_rows<Arch>(seg.v, it.kv_head, k0, kc, sh.d_v, dvp, vbuf);

      std::int64_t rb = 0;
      for (; rb + 2 * W <= rp; rb += 2 * W)
        for (std::int64_t kb = 0; kb < kBc; kb += kKeyBlock) qk_block<Arch, 2>(kbuf, qt, st, d_k, rp, kb, rb);
      if (rb < rp)
        for (std::int64_t kb = 0; kb < kBc; kb += kKeyBlock) qk_block<Arch, 1>(kbuf, qt, st, d_k, rp, kb, rb);

      // The whole tile is visible to every row iff it is full and lies inside the visible
      // range of both the first and the last query (ranges move monotonically with position).
      const bool masked = kc < kBc || mask.first_key(p_last) > k0 || k0 + kBc - 1 > mask.last_key(p_first);
      if (masked) {
        for (std::int64_t r = 0; r < rp; ++r) {
          if (r < rows) {
            const std::int64_t p = seg.q_offset + it.t_begin + r % nq;
            lo[r] = static_cast<float>(std::clamp<std::int64_t>(mask.first_key(p) - k0, -1, kBc));
            hi[r] = static_cast<float>(std::clamp<std::int64_t>(std::min(mask.last_key(p), T_k - 1) - k0, -1, kBc));
          } else {
            lo[r] = 0.f;
            hi[r] = -1.f;  // padding rows see nothing
          }
        }
      }
      const B neg_inf(-std::numeric_limits<float>::infinity());
      for (std::int64_t r = 0; r < rp; r += W) {
        B mx = neg_inf;
        if (masked) {
          const B vlo = B::load_aligned(lo + r), vhi = B::load_aligned(hi + r);
          for (std::int64_t c = 0; c < kBc; ++c) {
            const B cf(static_cast<float>(c));
            B s = B::load_aligned(st + c * rp + r);
            s = xsimd::select((vlo <= cf) && (cf <= vhi), s, neg_inf);
            s.store_aligned(st + c * rp + r);
            mx = xsimd::max(mx, s);
          }
        } else {
          for (std::int64_t c = 0; c < kBc; ++c) mx = xsimd::max(mx, B::load_aligned(st + c * rp + r));
        }
        const B m_old = B::load_aligned(m + r);
        const B m_new = xsimd::max(m_old, mx);
        const B m_use = xsimd::select(m_new == neg_inf, B(0.f), m_new);
        const B a = exp2<Arch>(m_old - m_use);
        B sum(0.f);
        for (std::int64_t c = 0; c < kBc; ++c) {
          const B p = exp2<Arch>(B::load_aligned(st + c * rp + r) - m_use);
          p.store_aligned(st + c * rp + r);
          sum += p;
        }
        xsimd::fma(B::load_aligned(l + r), a, sum).store_aligned(l + r);
        m_new.store_aligned(m + r);
        a.store_aligned(alpha + r);
      }

      std::int64_t c0 = 0;
      for (; c0 + kPvCols * W <= dvp; c0 += kPvCols * W)
        pv_rows<Arch, kPvCols>(st, vbuf, obuf, alpha, rows, rp, dvp, kc, c0);
      switch ((dvp - c0) / W) {
        case 1: pv_rows<Arch, 1>(st, vbuf, obuf, alpha, rows, rp, dvp, kc, c0); break;
        case 2: pv_rows<Arch, 2>(st, vbuf, obuf, alpha, rows, rp, dvp, kc, c0); break;
        case 3: pv_rows<Arch, 3>(st, vbuf, obuf, alpha, rows, rp, dvp, kc, c0); break;
        default: break;
      }
      static_assert(kPvCols == 4);
    }
  }

  for (std::int64_t r = 0; r < rows; ++r) {
    const std::int64_t t = it.t_begin + r % nq, h = it.h_begin + r / nq;
    float* dst = seg.out.ptr(t, h);
    const float* src = obuf + r * dvp;
    if (m[r] == -std::numeric_limits<float>::infinity()) {  // the row saw no key
      std::fill(dst, dst + sh.d_v, 0.f);
      if (seg.lse.data) seg.lse(t, h) = -std::numeric_limits<float>::infinity();
      continue;
    }
    const float inv = 1.f / l[r];
    for (std::int64_t d = 0; d < sh.d_v; ++d) dst[d] = src[d] * inv;
    if (seg.lse.data) seg.lse(t, h) = m[r] * kLn2 + std::log(l[r]);
  }
}

// Runs queries [q_range) and heads [h_range) of every segment. Items are ordered with the
// longest (latest query tiles under a causal mask) first for the dynamic schedule.
template <class Arch, class KV, class Mask>
void run_prefill(const std::vector<Segment<KV>>& segs, const Shape& sh, const Mask& mask, std::int64_t h_begin,
                 std::int64_t h_end, const std::vector<std::pair<std::int64_t, std::int64_t>>& q_ranges,
                 int num_threads) {
  const std::int64_t bq = query_tile(sh.G);
  std::vector<WorkItem> items;
  for (std::size_t s = 0; s < segs.size(); ++s) {
    const auto [qb, qe] = q_ranges[s];
    for (std::int64_t t = qb; t < qe; t += bq)
      for (std::int64_t j = h_begin / sh.G; j * sh.G < h_end; ++j) {
        const std::int64_t hb = std::max(h_begin, j * sh.G), he = std::min(h_end, (j + 1) * sh.G);
        items.push_back({static_cast<std::int32_t>(s), static_cast<std::int32_t>(j), static_cast<std::int32_t>(hb),
                         static_cast<std::int32_t>(he), t, std::min(qe, t + bq)});
      }
  }
  std::stable_sort(items.begin(), items.end(), [&](const WorkItem& a, const WorkItem& b) {
    return segs[a.segment].q_offset + a.t_end > segs[b.segment].q_offset + b.t_end;
  });
  parallel_for(
      static_cast<std::int64_t>(items.size()), num_threads,
      [&](std::int64_t i) { run_item<Arch>(segs[items[i].segment], sh, mask, items[i]); }, /*dynamic=*/true);
}

}  // namespace attnkit::detail::flash
