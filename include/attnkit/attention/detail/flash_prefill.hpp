// attnkit/attention/detail/flash_prefill.hpp — the tiled, online-softmax (Flash-style) kernel
// behind attention_prefill / attention_prefill_varlen. Not a public API: prefill.hpp validates
// arguments and calls run_prefill().
//
// Work item = (segment, KV head, block of queries). The rows of an item are the (query head,
// query) pairs of every query head of that KV head's group (restricted to opt.heads), about
// 512 of them, split into sub-tiles of about 64 rows. The key-tile loop is outermost: each K/V
// tile is read from memory and widened to f32 once per item and then serves every sub-tile
// (all G heads) that can see it. Per key tile of kBc keys and sub-tile:
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
//
// Loop Attention (attention/loop.hpp) adds an epilogue policy, the last template parameter
// (Plain for ordinary attention; every Loop-only step is behind `if constexpr`, so the plain
// instantiation is the code above, unchanged):
//  * BlendIntoOut: one accumulator as usual, finalised as out = g·out + (1 - g)·(softmax·V),
//    blending into what a previous (global) pass left in out;
//  * FusedWindow: a second online-softmax state (m2, l2, O2) per row for a sliding window
//    inside the causal mask. Each S^T tile is computed once; for the key tiles that meet some
//    row's window, the window's softmax reads it (masked to the window, copied to st2) before
//    the global softmax exponentiates it in place, and a second P·V updates O2. Finalised as
//    out = g·global + (1 - g)·local.
//  * WindowSource: the window's K/V are separate; after the global key tiles, the item's
//    sub-tiles sweep the local key tiles (as the sliding-window kernel would) into the second
//    state, then finalise as FusedWindow does.
// All of them compute the gate g = sigmoid(w[h]·q + b[h]) of the raw query row while packing Q.
//
// Attention variants (attention/variant.hpp), the last template parameter of run_prefill, each
// at one place (and compiled out when unset): the query metric while Q is packed (M^T · Q^T by
// qk_block, M^T's rows playing the keys); soft-cap and ALiBi in the first pass of softmax_tile
// (which then writes a transformed copy of the tile); sinks and the output scale in finalize.
// Segment::positions lets a segment's query rows sit at any non-decreasing positions: routed
// attention (attention/routed.hpp) packs the rows that chose one KV group's heads that way.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <new>
#include <type_traits>
#include <vector>

#include <xsimd/xsimd.hpp>

#include "attnkit/attention/common.hpp"
#include "attnkit/attention/quant.hpp"
#include "attnkit/attention/variant.hpp"
#include "attnkit/core/bf16.hpp"
#include "attnkit/core/memory.hpp"
#include "attnkit/core/simd.hpp"
#include "attnkit/core/stage_profile.hpp"
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

// 2^x for x <= 0: the softmax only evaluates s - max and m_old - m_new (core/simd.hpp).
template <class Arch>
inline fb<Arch> exp2(fb<Arch> x) {
  return simd::exp2_nonpositive<Arch>(x);
}

// The K or V rows a segment reads: a view [T_k, H_kv, d] (any strides), or, with pages set, the
// same rows through a page table: row s is slot s mod P of page pages[s / P] of a pool
// [pages, P, H_kv, d] (data = the pool, stride = its slot and head strides, page_stride its page
// stride). The kernels read rows only through ptr(s, head), so both are the same arithmetic
// (attention_prefill_paged reads a paged cache in place, bit for bit the contiguous result).
// int8 rows (KV = std::int8_t, attention/quant.hpp) also carry their scales, addressed the same
// way ([T_k, H_kv], or [pages, P, H_kv] through the same page table): row (s, head) reads as
// codes · scale_of(s, head), widened as the tiles are packed, so no dequantised copy exists.
template <class KV>
struct KVRows : ConstView3<KV> {
  const std::int32_t* pages = nullptr;
  int page_shift = 0;
  std::int64_t page_stride = 0;
  const float* scales = nullptr;          // int8 only
  std::int64_t scale_stride[2] = {0, 0};  // per position (within a page) and per head
  std::int64_t scale_page_stride = 0;
  KVRows() = default;
  KVRows(const ConstView3<KV>& v) : ConstView3<KV>(v) {}  // NOLINT: a view is its own rows
  KVRows(const QuantView3& v)  // NOLINT: int8 codes with their scales
    requires std::is_same_v<KV, std::int8_t>
      : ConstView3<KV>(v.codes), scales(v.scales.data), scale_stride{v.scales.stride[0], v.scales.stride[1]} {}
  const KV* ptr(std::int64_t s, std::int64_t head) const {
    if (pages == nullptr) return ConstView3<KV>::ptr(s, head);
    return this->data + pages[s >> page_shift] * page_stride + (s & ((std::int64_t{1} << page_shift) - 1)) * this->stride[0] +
           head * this->stride[1];
  }
  float scale_of(std::int64_t s, std::int64_t head) const {
    if (pages == nullptr) return scales[s * scale_stride[0] + head * scale_stride[1]];
    return scales[pages[s >> page_shift] * scale_page_stride +
                  (s & ((std::int64_t{1} << page_shift) - 1)) * scale_stride[0] + head * scale_stride[1]];
  }
};

// One attention problem: a single sequence (varlen splits into several).
template <class KV>
struct Segment {
  ConstView3<float> q;
  KVRows<KV> k, v;
  View3<float> out;
  View2<float> lse;  // data == nullptr: not requested
  std::int64_t q_offset;
  // Query row t sits at position q_offset + t, or q_offset + positions[t] when given (routed
  // attention packs the rows that chose one head; positions must not decrease).
  const std::int64_t* positions = nullptr;
  std::int64_t row0 = 0;  // the segment's first row in the call's token axis (variant OutputScale rows)
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

// Epilogue policies (see the header comment). Plain: out = softmax·V.
struct Plain {};
// g[t, h] = sigmoid(w[h]·q[t, h] + b[h]) of the raw query row; written to `out` ([T_q, H] in
// segment rows) when out.data != nullptr.
struct LoopGate {
  ConstView2<float> w;  // [H, d_k]
  const float* b;       // [H]
  View2<float> out;
};
struct BlendIntoOut {
  LoopGate gate;
};
struct FusedWindow {
  LoopGate gate;
  std::int64_t window;  // keys p - window + 1 .. p (inside the causal mask)
};
// The window's K/V are separate (stack reading): after the global key tiles of a work item,
// its sub-tiles sweep the local key tiles (the sliding-window kernel's loop, into the second
// state) — one kernel run, Q packed and the gate computed once, one blended finalize. Their
// storage type may differ from the global K/V's (an int8 cache read in place beside a window
// staged in f32 from a ring).
template <class KV>
struct WindowSource {
  LoopGate gate;
  std::int64_t window;
  KVRows<KV> k, v;        // local K/V [T_l, H_kv, d]
  std::int64_t q_offset;  // local key row that query row 0 sits at (query position - local_offset)
};
template <class E>
inline constexpr bool has_gate_v = !std::is_same_v<E, Plain>;
template <class E>
inline constexpr bool is_fused_v = std::is_same_v<E, FusedWindow>;  // window state fed from the same S^T
template <class E>
struct is_window_source : std::false_type {};
template <class KV>
struct is_window_source<WindowSource<KV>> : std::true_type {};
template <class E>
inline constexpr bool is_source_v = is_window_source<E>::value;
template <class E>
inline constexpr bool has_window_state_v = is_fused_v<E> || is_source_v<E>;  // (o2, m2, l2) per row

// Loop Attention's gate nonlinearity, in double and rounded (the decode path uses it too).
inline float gate_sigmoid(float z) { return static_cast<float>(1.0 / (1.0 + std::exp(-static_cast<double>(z)))); }

// Queries per sub-tile: about 64 rows (rows = heads of the group x queries), which keeps Q^T,
// S^T and the output accumulators of a sub-tile in L1/L2.
inline std::int64_t query_tile(std::int64_t G) { return std::clamp<std::int64_t>(64 / std::max<std::int64_t>(G, 1), 8, 64); }
// Queries per work item: about 512 rows, so a packed K/V tile serves that many rows before the
// next one is read (K/V streaming from DRAM is what limits smaller items).
inline std::int64_t item_queries(std::int64_t G) {
  const std::int64_t bq = query_tile(G);
  return bq * std::max<std::int64_t>(1, 512 / (bq * std::max<std::int64_t>(G, 1)));
}

// 64-byte aligned float scratch for one work item, carved from a per-thread buffer that is
// kept between items and calls (fresh allocations of this size would page-fault every time).
class Scratch {
 public:
  explicit Scratch(std::int64_t n) {
    Buffer& b = buffer();
    if (b.size < n) {
      b.release();
      b.data = new (std::align_val_t(64)) float[static_cast<std::size_t>(n)];
      b.size = n;
    }
    p_ = b.data;
#if defined(ATTNKIT_POISON_SCRATCH)  // debug: every call starts from NaN scratch
    std::fill(b.data, b.data + b.size, std::numeric_limits<float>::quiet_NaN());
#endif
  }
  Scratch(const Scratch&) = delete;
  Scratch& operator=(const Scratch&) = delete;
  float* take(std::int64_t n) {  // n floats, 64-byte aligned
    float* r = p_ + used_;
    used_ += round_up(n, 16);
    return r;
  }
  static std::int64_t need(std::int64_t n) { return round_up(n, 16); }

 private:
  struct Buffer {
    float* data = nullptr;
    std::int64_t size = 0;
    void release() {
      if (data) ::operator delete[](data, std::align_val_t(64));
      data = nullptr;
      size = 0;
    }
    ~Buffer() { release(); }
  };
  static Buffer& buffer() {
    thread_local Buffer b;
    return b;
  }
  float* p_;
  std::int64_t used_ = 0;
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
      for (int j = 0; j < NB; ++j) acc[i][j] = simd::fma(kx, qv[j], acc[i][j]);
    }
  }
#pragma GCC unroll 8
  for (int i = 0; i < kKeyBlock; ++i)
#pragma GCC unroll 4
    for (int j = 0; j < NB; ++j) acc[i][j].store_aligned(st + (kb + i) * rp + rb + j * W);
}

// O[r0 + i][c0 + j*W ...] = alpha[r0 + i] * O[...] + sum_{kb <= c < ke} P^T[c][r0 + i] * V[c][c0 + j*W ...].
template <class Arch, int R, int NC>
inline void pv_block(const float* st, const float* vbuf, float* obuf, const float* alpha, std::int64_t rp,
                     std::int64_t dvp, std::int64_t kb, std::int64_t ke, std::int64_t r0, std::int64_t c0) {
  using B = fb<Arch>;
  constexpr std::int64_t W = lanes<Arch>;
  B acc[R][NC];
#pragma GCC unroll 8
  for (int i = 0; i < R; ++i) {
    const B a(alpha[r0 + i]);
#pragma GCC unroll 4
    for (int j = 0; j < NC; ++j) acc[i][j] = a * B::load_aligned(obuf + (r0 + i) * dvp + c0 + j * W);
  }
  for (std::int64_t c = kb; c < ke; ++c) {
    B vv[NC];
#pragma GCC unroll 4
    for (int j = 0; j < NC; ++j) vv[j] = B::load_aligned(vbuf + c * dvp + c0 + j * W);
    const float* prow = st + c * rp + r0;
#pragma GCC unroll 8
    for (int i = 0; i < R; ++i) {
      const B p(prow[i]);
#pragma GCC unroll 4
      for (int j = 0; j < NC; ++j) acc[i][j] = simd::fma(p, vv[j], acc[i][j]);
    }
  }
#pragma GCC unroll 8
  for (int i = 0; i < R; ++i)
#pragma GCC unroll 4
    for (int j = 0; j < NC; ++j) acc[i][j].store_aligned(obuf + (r0 + i) * dvp + c0 + j * W);
}

template <class Arch, int NC>
inline void pv_rows(const float* st, const float* vbuf, float* obuf, const float* alpha, std::int64_t rows,
                    std::int64_t rp, std::int64_t dvp, std::int64_t kb, std::int64_t ke, std::int64_t c0) {
  std::int64_t r = 0;
  for (; r + kPvRows <= rows; r += kPvRows) pv_block<Arch, kPvRows, NC>(st, vbuf, obuf, alpha, rp, dvp, kb, ke, r, c0);
  switch (rows - r) {
    case 1: pv_block<Arch, 1, NC>(st, vbuf, obuf, alpha, rp, dvp, kb, ke, r, c0); break;
    case 2: pv_block<Arch, 2, NC>(st, vbuf, obuf, alpha, rp, dvp, kb, ke, r, c0); break;
    case 3: pv_block<Arch, 3, NC>(st, vbuf, obuf, alpha, rp, dvp, kb, ke, r, c0); break;
    case 4: pv_block<Arch, 4, NC>(st, vbuf, obuf, alpha, rp, dvp, kb, ke, r, c0); break;
    case 5: pv_block<Arch, 5, NC>(st, vbuf, obuf, alpha, rp, dvp, kb, ke, r, c0); break;
    default: break;
  }
  static_assert(kPvRows == 6);
}

// Widens rows [k0, k0 + kc) of one KV head into dst[kBc][ld] (f32), zero-filling columns
// [n, ld) and rows [kc, kBc). int8 rows: code · scale, exactly dequantize_row's values.
template <class Arch, class KV>
inline void pack_rows(const KVRows<KV>& src, std::int64_t head, std::int64_t k0, std::int64_t kc,
                      std::int64_t n, std::int64_t ld, float* dst) {
  constexpr std::int64_t W = lanes<Arch>;
  for (std::int64_t c = 0; c < kc; ++c) {
    const KV* s = src.ptr(k0 + c, head);
    float* o = dst + c * ld;
    std::int64_t d = 0;
    if constexpr (std::is_same_v<KV, std::int8_t>) {
      quant::dequantize_row(s, src.scale_of(k0 + c, head), o, n);
      d = n;
    } else {
      for (; d + W <= n; d += W) simd::load<Arch>(s + d).store_unaligned(o + d);
      for (; d < n; ++d) o[d] = to_float(s[d]);
    }
    for (; d < ld; ++d) o[d] = 0.f;
  }
  if (kc < kBc) std::memset(dst + kc * ld, 0, static_cast<std::size_t>((kBc - kc) * ld) * sizeof(float));
}

// Software prefetch spread over the microkernel calls of a tile step. K/V rows of one head
// (and Q rows) are one page apart, so the hardware prefetcher cannot follow them; issuing
// all their lines at once would stall on the line-fill buffers, so tick() issues a few lines
// after every S micro-tile instead.
class Prefetcher {
 public:
  void clear() {
    rows_.clear();
    row_ = 0;
    line_ = 0;
    lines_ = 0;
  }
  template <class T>
  void add_row(const T* p, std::int64_t n) {
    const auto lines = static_cast<std::int64_t>((n * static_cast<std::int64_t>(sizeof(T)) + 63) / 64);
    rows_.push_back({reinterpret_cast<const char*>(p), lines});
    lines_ += lines;
  }
  // Spreads what is queued over about `ticks` calls of tick().
  void plan(std::int64_t ticks) { per_tick_ = (lines_ + std::max<std::int64_t>(ticks, 1) - 1) / std::max<std::int64_t>(ticks, 1); }
  void tick() {
    for (std::int64_t n = 0; n < per_tick_ && row_ < rows_.size(); ++n) {
      __builtin_prefetch(rows_[row_].first + 64 * line_);
      if (++line_ == rows_[row_].second) {
        ++row_;
        line_ = 0;
      }
    }
  }

 private:
  std::vector<std::pair<const char*, std::int64_t>> rows_;
  std::size_t row_ = 0;
  std::int64_t line_ = 0, lines_ = 0, per_tick_ = 0;
};

// State of one query sub-tile of a work item: rows (head, query) with row r = (head
// h_begin + r / nq, query t_begin + r % nq); Q^T is [d_k][rp] with rows zero-padded to rp.
struct SubTile {
  std::int64_t t_begin, nq, rows, rp;
  const std::int64_t* positions = nullptr;  // Segment::positions (null: affine)
  // Position of query i of the sub-tile (i < nq) relative to the sweep's q_offset.
  std::int64_t rel(std::int64_t i) const { return positions ? positions[t_begin + i] : t_begin + i; }
  float* qt;    // [d_k][rp], scaled by Shape::q_scale
  float* obuf;  // [rows][dvp], unnormalised output
  float* m;     // [rp] running max (base 2)
  float* l;     // [rp] running sum
  // FusedWindow: the window's state, as obuf / m / l; gate: g per row (any gated policy).
  float* o2 = nullptr;
  float* m2 = nullptr;
  float* l2 = nullptr;
  float* gate = nullptr;
  // ALiBi: each row's slope in base-2 units (0 for padding rows).
  float* slope = nullptr;
};

// Scratch shared by the sub-tiles of an item for the key tile at hand.
struct TileBuffers {
  float* st;     // [kBc][rp] S^T, then P^T
  float* kbuf;   // [kBc][d_k]
  float* vbuf;   // [kBc][dvp]
  float* alpha;  // [rp] per-row rescale of O for this tile
  float* lo;     // [rp] first / last visible key of each row, relative to the tile
  float* hi;
  // ALiBi: each row's bias for the tile's first key (base 2).
  float* bias = nullptr;
  // FusedWindow: the window's P^T, alpha and visible range.
  float* st2 = nullptr;
  float* alpha2 = nullptr;
  float* lo2 = nullptr;
  float* hi2 = nullptr;
};

// Online softmax of one key tile for rows [0, rp), columns [c_begin, c_end): reads base-2
// scores from src and writes the probabilities exp2(s - m_new) to dst (dst may be src; the
// window state of FusedWindow reads S^T and writes its own buffer); updates m and l and sets
// alpha = exp2(m_old - m_new). masked: columns outside [lo[r], hi[r]] count as -inf.
// Logits transforms of the variant, applied to a vector of rows r.. at key column c (base-2
// scores in, base-2 scores out).
struct NoLogit {
  static constexpr bool active = false;
};
template <class Arch>
struct SoftCapLogit {  // c2 · tanh(s / c2) with c2 = cap · log2(e)
  static constexpr bool active = true;
  float c2, inv_c2;
  fb<Arch> apply(fb<Arch> s, std::int64_t /*c*/, std::int64_t /*r*/) const {
    return simd::softcap<Arch>(s, c2, inv_c2);
  }
};
template <class Arch>
struct AlibiLogit {  // s + slope_r · c + bias_r (bias_r: the row's bias at the tile's first key)
  static constexpr bool active = true;
  const float* slope;
  const float* bias;
  fb<Arch> apply(fb<Arch> s, std::int64_t c, std::int64_t r) const {
    return s + simd::fma(fb<Arch>::load_aligned(slope + r), fb<Arch>(static_cast<float>(c)), fb<Arch>::load_aligned(bias + r));
  }
};

template <class Arch, class Logit = NoLogit>
inline void softmax_tile(const float* src, float* dst, std::int64_t rp, std::int64_t c_begin, std::int64_t c_end,
                         bool masked, const float* lo, const float* hi, float* m, float* l, float* alpha,
                         const Logit& logit = {}) {
  using B = fb<Arch>;
  constexpr std::int64_t W = lanes<Arch>;
  const B neg_inf(-std::numeric_limits<float>::infinity());
  const bool copy = masked || Logit::active;
  const float* in = copy ? dst : src;  // the exp2 pass reads the transformed / masked copy
  for (std::int64_t r = 0; r < rp; r += W) {
    B mx = neg_inf;
    if (copy) {
      const B vlo = B::load_aligned(lo + r), vhi = B::load_aligned(hi + r);
      for (std::int64_t c = c_begin; c < c_end; ++c) {
        B s = B::load_aligned(src + c * rp + r);
        if constexpr (Logit::active) s = logit.apply(s, c, r);
        if (masked) {
          const B cf(static_cast<float>(c));
          s = xsimd::select((vlo <= cf) && (cf <= vhi), s, neg_inf);
        }
        s.store_aligned(dst + c * rp + r);
        mx = xsimd::max(s, mx);
      }
    } else {
      for (std::int64_t c = c_begin; c < c_end; ++c) mx = xsimd::max(B::load_aligned(src + c * rp + r), mx);
    }
    // The maxima skip NaN scores (vmaxps returns its second operand for a NaN): a NaN score
    // gives a NaN probability below, and so a NaN sum and output, instead of ending the row's
    // maximum (max(NaN, -inf) of a masked column after it made the row look unvisited).
    const B m_old = B::load_aligned(m + r);
    const B m_new = xsimd::max(m_old, mx);
    const B m_use = xsimd::select(m_new == neg_inf, B(0.f), m_new);  // all masked so far: avoid -inf - -inf
    const B a = exp2<Arch>(m_old - m_use);
    // Two partial sums halve the add latency chain; the order is fixed, so still deterministic.
    B sum0(0.f), sum1(0.f);
    for (std::int64_t c = c_begin; c < c_end; c += 2) {
      const B p0 = exp2<Arch>(B::load_aligned(in + c * rp + r) - m_use);
      const B p1 = exp2<Arch>(B::load_aligned(in + (c + 1) * rp + r) - m_use);
      p0.store_aligned(dst + c * rp + r);
      p1.store_aligned(dst + (c + 1) * rp + r);
      sum0 += p0;
      sum1 += p1;
    }
    simd::fma(B::load_aligned(l + r), a, sum0 + sum1).store_aligned(l + r);
    m_new.store_aligned(m + r);
    a.store_aligned(alpha + r);
  }
}

// O = alpha·O + P·V over key columns [kb, ke) for rows [0, rows).
template <class Arch>
inline void pv_tile(const float* st, const float* vbuf, float* obuf, const float* alpha, std::int64_t rows,
                    std::int64_t rp, std::int64_t dvp, std::int64_t kb, std::int64_t ke) {
  constexpr std::int64_t W = lanes<Arch>;
  std::int64_t c0 = 0;
  for (; c0 + kPvCols * W <= dvp; c0 += kPvCols * W) pv_rows<Arch, kPvCols>(st, vbuf, obuf, alpha, rows, rp, dvp, kb, ke, c0);
  switch ((dvp - c0) / W) {
    case 1: pv_rows<Arch, 1>(st, vbuf, obuf, alpha, rows, rp, dvp, kb, ke, c0); break;
    case 2: pv_rows<Arch, 2>(st, vbuf, obuf, alpha, rows, rp, dvp, kb, ke, c0); break;
    case 3: pv_rows<Arch, 3>(st, vbuf, obuf, alpha, rows, rp, dvp, kb, ke, c0); break;
    default: break;
  }
  static_assert(kPvCols == 4);
}

// Key columns [c_begin, c_end) of tile [k0, k0 + kc) that some row of a sub-tile (positions
// p_first .. p_last) can see under `mask`, widened to whole key blocks, and whether any row
// sees less than the whole tile (then lo / hi must be filled and applied).
struct TileCols {
  bool masked;
  std::int64_t c_begin, c_end;
};
template <class Mask>
inline TileCols tile_cols(const Mask& mask, std::int64_t p_first, std::int64_t p_last, std::int64_t T_k,
                          std::int64_t k0, std::int64_t kc) {
  // The whole tile is visible to every row iff it is full and lies inside the visible range
  // of both the first and the last query (ranges move monotonically with position).
  TileCols tc{kc < kBc || mask.first_key(p_last) > k0 || k0 + kBc - 1 > mask.last_key(p_first), 0, kBc};
  // The columns outside are masked for every row, so skipping them changes no bit (they would
  // contribute exact zeros).
  if (tc.masked) {
    tc.c_begin = std::clamp<std::int64_t>(mask.first_key(p_first) - k0, 0, kBc) / kKeyBlock * kKeyBlock;
    tc.c_end = round_up(std::clamp<std::int64_t>(std::min(mask.last_key(p_last), T_k - 1) - k0 + 1, 0, kBc), kKeyBlock);
  }
  return tc;
}

// Per-row visible columns [lo, hi] of the tile (relative to k0; padding rows see nothing).
template <class Mask>
inline void row_bounds(const Mask& mask, const SubTile& sub, std::int64_t q_offset, std::int64_t T_k, std::int64_t k0,
                       float* lo, float* hi) {
  for (std::int64_t r = 0; r < sub.rp; ++r) {
    if (r < sub.rows) {
      const std::int64_t p = q_offset + sub.rel(r % sub.nq);
      lo[r] = static_cast<float>(std::clamp<std::int64_t>(mask.first_key(p) - k0, -1, kBc));
      hi[r] = static_cast<float>(std::clamp<std::int64_t>(std::min(mask.last_key(p), T_k - 1) - k0, -1, kBc));
    } else {
      lo[r] = 0.f;
      hi[r] = -1.f;  // padding rows see nothing
    }
  }
}

// One key tile [k0, k0 + kc) for one sub-tile: S^T = K Q^T, online softmax, O = alpha O + P V
// (and, for FusedWindow, the window's softmax and P·V from the same S^T).
template <class Arch, class Mask, class Extra = Plain, class Var = PlainAttention>
void tile_step(const SubTile& sub, const TileBuffers& tb, const Shape& sh, const Mask& mask, std::int64_t q_offset,
               std::int64_t T_k, std::int64_t k0, std::int64_t kc, Prefetcher& pf_q, Prefetcher& pf_kv,
               const Extra& ex = {}, const Var& var = {}) {
  constexpr std::int64_t W = lanes<Arch>;
  const std::int64_t rp = sub.rp, rows = sub.rows, nq = sub.nq, dvp = round_up(sh.d_v, W);
  float* st = tb.st;

  const std::int64_t p_first = q_offset + sub.rel(0), p_last = q_offset + sub.rel(nq - 1);
  const TileCols tc = tile_cols(mask, p_first, p_last, T_k, k0, kc);
  const std::int64_t c_begin = tc.c_begin, c_end = tc.c_end;
  const std::int64_t pv_end = std::min(c_end, kc);

  std::int64_t rb = 0;
  for (; rb + 2 * W <= rp; rb += 2 * W)
    for (std::int64_t kb = c_begin; kb < c_end; kb += kKeyBlock) {
      qk_block<Arch, 2>(tb.kbuf, sub.qt, st, sh.d_k, rp, kb, rb);
      pf_q.tick();
      pf_kv.tick();
    }
  if (rb < rp)
    for (std::int64_t kb = c_begin; kb < c_end; kb += kKeyBlock) {
      qk_block<Arch, 1>(tb.kbuf, sub.qt, st, sh.d_k, rp, kb, rb);
      pf_q.tick();
      pf_kv.tick();
    }

  // The window's softmax reads S^T before the global one exponentiates it in place. Its
  // columns lie inside [c_begin, c_end): the window is inside the causal mask.
  bool window = false;
  TileCols wc{};
  if constexpr (is_fused_v<Extra>) {
    static_assert(std::is_same_v<Mask, CausalMask>, "FusedWindow: the global mask must be causal");
    const SlidingWindowMask wm{ex.window};
    const std::int64_t wf = std::max<std::int64_t>(wm.first_key(p_first), 0), wl = std::min(p_last, T_k - 1);
    window = wl >= wf && k0 <= wl && k0 + kc - 1 >= wf;
    if (window) {
      wc = tile_cols(wm, p_first, p_last, T_k, k0, kc);
      if (wc.masked) row_bounds(wm, sub, q_offset, T_k, k0, tb.lo2, tb.hi2);
      softmax_tile<Arch>(st, tb.st2, rp, wc.c_begin, wc.c_end, wc.masked, tb.lo2, tb.hi2, sub.m2, sub.l2, tb.alpha2);
    }
  }

  if (tc.masked) row_bounds(mask, sub, q_offset, T_k, k0, tb.lo, tb.hi);
  if constexpr (Var::has_softcap) {
    const float c2 = var.logits.cap * kLog2e;
    softmax_tile<Arch>(st, st, rp, c_begin, c_end, tc.masked, tb.lo, tb.hi, sub.m, sub.l, tb.alpha,
                       SoftCapLogit<Arch>{c2, 1.f / c2});
  } else if constexpr (Var::has_alibi) {
    // The row's bias at key k0 is slope · (k0 - p): the integer distance first, so far positions
    // lose no precision (the kernel then adds slope · c for column c).
    for (std::int64_t r = 0; r < rp; ++r)
      tb.bias[r] = r < rows ? sub.slope[r] * static_cast<float>(k0 - (q_offset + sub.rel(r % nq))) : 0.f;
    softmax_tile<Arch>(st, st, rp, c_begin, c_end, tc.masked, tb.lo, tb.hi, sub.m, sub.l, tb.alpha,
                       AlibiLogit<Arch>{sub.slope, tb.bias});
  } else {
    softmax_tile<Arch>(st, st, rp, c_begin, c_end, tc.masked, tb.lo, tb.hi, sub.m, sub.l, tb.alpha);
  }
  pv_tile<Arch>(st, tb.vbuf, sub.obuf, tb.alpha, rows, rp, dvp, c_begin, pv_end);
  if (window) pv_tile<Arch>(tb.st2, tb.vbuf, sub.o2, tb.alpha2, rows, rp, dvp, wc.c_begin, std::min(wc.c_end, kc));
}

// dst[d] = g·(a[d]·ia) + (1 - g)·(b[d]·ib) for d < n, as one fixed sequence of float32
// operations (a may be dst): the fused and the unfused Loop Attention round identically.
template <class Arch>
inline void blend_finalize(float* dst, const float* a, float ia, const float* b, float ib, float g, std::int64_t n) {
  using B = fb<Arch>;
  constexpr std::int64_t W = lanes<Arch>;
  const float omg = 1.f - g;
  const B vg(g), vomg(omg), via(ia), vib(ib);
  const std::int64_t nv = n / W * W;
  for (std::int64_t d = 0; d < nv; d += W)
    simd::fma(vg, B::load_unaligned(a + d) * via, vomg * (B::load_unaligned(b + d) * vib)).store_unaligned(dst + d);
  for (std::int64_t d = nv; d < n; ++d) dst[d] = std::fma(g, a[d] * ia, omg * (b[d] * ib));
}

// A sub-tile's query and output rows are H·d floats apart and usually not cached; the streamers
// do not follow that stride. Called before touching row r of n (row(i): its address), this
// prefetches row r + kRowsAhead (and at r = 0 the first kRowsAhead rows), for writing when Write.
// Shared by the FMA and AMX kernels.
inline constexpr std::int64_t kRowsAhead = 8;
template <bool Write, class RowPtr>
inline void prefetch_row_ahead(const RowPtr& row, std::int64_t r, std::int64_t n, std::int64_t bytes) {
  if (r == 0)
    for (std::int64_t i = 0; i < std::min(kRowsAhead, n); ++i) prefetch_bytes<Write>(row(i), bytes);
  if (r + kRowsAhead < n) prefetch_bytes<Write>(row(r + kRowsAhead), bytes);
}

// dst[0, n) = o · inv: finalize_row's default store.
struct ScaledStore {
  void operator()(float* dst, const float* o, float inv, std::int64_t n) const {
    for (std::int64_t d = 0; d < n; ++d) dst[d] = o[d] * inv;
  }
};

// ScaledStore with the row's whole cache lines written by streaming stores (no read for
// ownership, nothing evicted for them), the partial lines at either end with plain ones; the
// kernels end each work item with an sfence. A sub-tile's output rows lie H·d floats apart,
// each in lines no prefetcher foresees: read for ownership, they cost the AMX kernel's finalize
// 8-15% of a one-thread call (amx_prefill_profile.cpp). Measured in flash_prefill_amx.hpp's
// header for the AMX kernel; for this one (amx_prefill_ab.cpp with AB_PRECISION=exact, 2
// threads, B/A medians, bits equal): sliding T 32768 / W 512 1.013, 1.006x on Zen 5 and 0.984x
// on an AMX Xeon; causal T 2048 1.016, 1.004x and 1.086x; 512 after 8192 keys 1.043, 0.998x and
// 1.043x.
struct StreamingStore {
  void operator()(float* dst, const float* o, float inv, std::int64_t n) const {
    std::int64_t d = 0;
#if defined(__AVX__)
    if (reinterpret_cast<std::uintptr_t>(dst) % 4 == 0) {
      const std::int64_t head = std::min<std::int64_t>(n, ((64 - reinterpret_cast<std::uintptr_t>(dst) % 64) % 64) / 4);
      for (; d < head; ++d) dst[d] = o[d] * inv;
      for (; d + 16 <= n; d += 16) {  // one whole line
#if defined(__AVX512F__)
        _mm512_stream_ps(dst + d, _mm512_mul_ps(_mm512_set1_ps(inv), _mm512_loadu_ps(o + d)));
#else
        _mm256_stream_ps(dst + d, _mm256_mul_ps(_mm256_set1_ps(inv), _mm256_loadu_ps(o + d)));
        _mm256_stream_ps(dst + d + 8, _mm256_mul_ps(_mm256_set1_ps(inv), _mm256_loadu_ps(o + d + 8)));
#endif
      }
    }
#endif
    for (; d < n; ++d) dst[d] = o[d] * inv;
  }
};

// out[t, h] = o / l (and lse) for a row with running max m (base 2) and sum l, with the
// variant's sink and output scale. Shared by the FMA and AMX kernels; `store` writes the row.
template <class KV, class Var, class Store = ScaledStore>
inline void finalize_row(const Segment<KV>& seg, const Shape& sh, const Var& var, std::int64_t t, std::int64_t h,
                         const float* o, float m, float l, const Store& store = {}) {
  constexpr float neg_inf = -std::numeric_limits<float>::infinity();
  float* dst = seg.out.ptr(t, h);
  float sink = neg_inf;
  if constexpr (Var::has_sink) sink = var.sink.logits[h];
  if (m == neg_inf && !std::isnan(l)) {  // the row saw no key (NaN: every score it saw was NaN)
    std::fill(dst, dst + sh.d_v, 0.f);
    if (seg.lse.data) seg.lse(t, h) = sink;
    return;
  }
  // The log only where an lse is wanted: it is a libm call per row (errno keeps it alive).
  float inv;
  if constexpr (Var::has_sink) {  // the sink joins the denominator: l' = l·2^(m - M) + 2^(sink - M)
    const float s2 = sink * kLog2e, mx = std::max(m, s2);
    const float a = std::exp2(m - mx), l2 = l * a + std::exp2(s2 - mx);
    inv = a / l2;
    if (seg.lse.data) seg.lse(t, h) = mx * kLn2 + std::log(l2);
  } else {
    inv = 1.f / l;
    if (seg.lse.data) seg.lse(t, h) = m * kLn2 + std::log(l);
  }
  if constexpr (Var::has_output) inv *= var.output.scale(seg.row0 + t, h);
  store(dst, o, inv, sh.d_v);
}

// The sub-tiles [first, end) that see key tile [k0, k0 + kc): a contiguous run, since visible
// ranges move with position. range(sub) gives a sub-tile's visible keys [lo, hi].
template <class Sub, class Range>
std::pair<std::int64_t, std::int64_t> subtiles_seeing(const std::vector<Sub>& subs, std::int64_t k0, std::int64_t kc,
                                                      const Range& range) {
  const auto n = static_cast<std::int64_t>(subs.size());
  std::int64_t first = n, end = 0;
  for (std::int64_t s = 0; s < n; ++s) {
    const auto [lo, hi] = range(subs[static_cast<std::size_t>(s)]);
    if (hi < lo || k0 > hi || k0 + kc - 1 < lo) continue;
    first = std::min(first, s);
    end = s + 1;
  }
  return {first, end};
}

// One work item: its queries are split into sub-tiles of query_tile(G) queries (about 64
// rows each, sized for L1/L2), and the key-tile loop is outermost, so each K/V tile is read
// from memory and packed once per item however many sub-tiles use it.
// What a variant needs prepared once per call: the metric transposed and padded for qk_block.
struct VariantPrep {
  const float* metric_t = nullptr;  // [round_up(d_k, kKeyBlock)][d_k]: row e = column e of M, zero rows past d_k
};

template <class Arch, class KV, class Mask, class Extra = Plain, class Var = PlainAttention>
void run_item(const Segment<KV>& seg, const Shape& sh, const Mask& mask, const WorkItem& it, const Extra& ex = {},
              const Var& var = {}, const VariantPrep& prep = {}) {
  static_assert(Var::is_plain || std::is_same_v<Extra, Plain>, "attention variants combine with plain attention only");
  constexpr std::int64_t W = lanes<Arch>;
  const std::int64_t nh = it.h_end - it.h_begin, bq = query_tile(sh.G);
  const std::int64_t n_sub = (it.t_end - it.t_begin + bq - 1) / bq;
  const std::int64_t rp_max = round_up(bq * nh, W), dvp = round_up(sh.d_v, W), d_k = sh.d_k;
  constexpr float neg_inf = -std::numeric_limits<float>::infinity();

  constexpr bool fused = is_fused_v<Extra>, dual = has_window_state_v<Extra>, gated = has_gate_v<Extra>;
  constexpr bool alibi = Var::has_alibi, metric = Var::has_query;
  const std::int64_t d_kp = round_up(d_k, kKeyBlock);
  const std::int64_t sub_need = Scratch::need(d_k * rp_max) + Scratch::need(bq * nh * dvp) + 2 * Scratch::need(rp_max) +
                                (dual ? Scratch::need(bq * nh * dvp) + 2 * Scratch::need(rp_max) : 0) +
                                (gated ? Scratch::need(rp_max) : 0) + (alibi ? Scratch::need(rp_max) : 0);
  Scratch scratch(n_sub * sub_need + Scratch::need(kBc * rp_max) + Scratch::need(kBc * d_k) + Scratch::need(kBc * dvp) +
                  3 * Scratch::need(rp_max) + (fused ? Scratch::need(kBc * rp_max) + 3 * Scratch::need(rp_max) : 0) +
                  (alibi ? Scratch::need(rp_max) : 0) + (metric ? Scratch::need(d_kp * rp_max) : 0));
  TileBuffers tb;
  tb.st = scratch.take(kBc * rp_max);
  tb.kbuf = scratch.take(kBc * d_k);
  tb.vbuf = scratch.take(kBc * dvp);
  tb.alpha = scratch.take(rp_max);
  tb.lo = scratch.take(rp_max);
  tb.hi = scratch.take(rp_max);
  if constexpr (fused) {
    tb.st2 = scratch.take(kBc * rp_max);
    tb.alpha2 = scratch.take(rp_max);
    tb.lo2 = scratch.take(rp_max);
    tb.hi2 = scratch.take(rp_max);
  }
  if constexpr (alibi) tb.bias = scratch.take(rp_max);
  float* q_metric = metric ? scratch.take(d_kp * rp_max) : nullptr;  // M^T · Q^T of the sub-tile being packed
  std::vector<SubTile> subs(static_cast<std::size_t>(n_sub));
  for (std::int64_t s = 0; s < n_sub; ++s) {
    SubTile& sub = subs[s];
    sub.t_begin = it.t_begin + s * bq;
    sub.nq = std::min(bq, it.t_end - sub.t_begin);
    sub.rows = sub.nq * nh;
    sub.rp = round_up(sub.rows, W);
    sub.positions = seg.positions;
    sub.qt = scratch.take(d_k * rp_max);
    sub.obuf = scratch.take(bq * nh * dvp);
    sub.m = scratch.take(rp_max);
    sub.l = scratch.take(rp_max);
    std::fill(sub.m, sub.m + sub.rp, neg_inf);
    std::fill(sub.l, sub.l + sub.rp, 0.f);
    std::fill(sub.obuf, sub.obuf + sub.rows * dvp, 0.f);
    if constexpr (dual) {
      sub.o2 = scratch.take(bq * nh * dvp);
      sub.m2 = scratch.take(rp_max);
      sub.l2 = scratch.take(rp_max);
      std::fill(sub.m2, sub.m2 + sub.rp, neg_inf);
      std::fill(sub.l2, sub.l2 + sub.rp, 0.f);
      std::fill(sub.o2, sub.o2 + sub.rows * dvp, 0.f);
    }
    if constexpr (gated) sub.gate = scratch.take(rp_max);
    if constexpr (alibi) sub.slope = scratch.take(rp_max);
  }

  // Visible keys of the first / last query of a range under mask m, for query row 0 at
  // position q_off among n_keys keys (clipped to [0, n_keys)).
  const auto rel = [&](std::int64_t t) { return seg.positions ? seg.positions[t] : t; };
  const auto key_range = [&](const auto& m, std::int64_t q_off, std::int64_t n_keys, std::int64_t t_first,
                             std::int64_t t_last) {
    return std::pair<std::int64_t, std::int64_t>{std::max<std::int64_t>(m.first_key(q_off + rel(t_first)), 0),
                                                 std::min(m.last_key(q_off + rel(t_last)), n_keys - 1)};
  };
  // Q^T of a sub-tile is packed when the sub-tile first meets a key tile, and the next
  // sub-tile's Q rows are prefetched meanwhile (they come from DRAM).
  std::vector<char> packed(static_cast<std::size_t>(n_sub), 0);
  const auto pack_q = [&](std::int64_t s) {
    const SubTile& sub = subs[s];
    for (std::int64_t r = 0; r < sub.rows; ++r) {
      const std::int64_t h = it.h_begin + r / sub.nq;
      const float* src = seg.q.ptr(sub.t_begin + r % sub.nq, h);
      for (std::int64_t d = 0; d < d_k; ++d) sub.qt[d * sub.rp + r] = src[d] * sh.q_scale;
      if constexpr (gated)  // from the raw query row, in the same float32 order as loop_attention_decode
        sub.gate[r] = gate_sigmoid(simd::dot<Arch>(ex.gate.w.ptr(h), src, d_k) + ex.gate.b[h]);
    }
    for (std::int64_t d = 0; d < d_k; ++d)
      for (std::int64_t r = sub.rows; r < sub.rp; ++r) sub.qt[d * sub.rp + r] = 0.f;
    if constexpr (metric) {
      // Q̃^T = M^T · Q^T by the S micro-kernel (M^T's rows play the keys), then back into qt.
      std::int64_t rb = 0;
      for (; rb + 2 * W <= sub.rp; rb += 2 * W)
        for (std::int64_t eb = 0; eb < d_kp; eb += kKeyBlock) qk_block<Arch, 2>(prep.metric_t, sub.qt, q_metric, d_k, sub.rp, eb, rb);
      if (rb < sub.rp)
        for (std::int64_t eb = 0; eb < d_kp; eb += kKeyBlock) qk_block<Arch, 1>(prep.metric_t, sub.qt, q_metric, d_k, sub.rp, eb, rb);
      std::memcpy(sub.qt, q_metric, static_cast<std::size_t>(d_k * sub.rp) * sizeof(float));
    }
    if constexpr (alibi)
      for (std::int64_t r = 0; r < sub.rp; ++r)
        sub.slope[r] = r < sub.rows ? var.logits.slopes[it.h_begin + r / sub.nq] * kLog2e : 0.f;
    packed[s] = 1;
  };
  Prefetcher pf_q, pf_kv;
  const std::int64_t ticks_per_step = (rp_max / W) * (kBc / kKeyBlock) / 2;  // qk_block calls, about
  // Normalises a finished sub-tile into out / lse. Done right after its last key tile, so the
  // stores (usually cache misses) overlap with the remaining work.
  std::vector<char> done(static_cast<std::size_t>(n_sub), 0);
  const auto finalize = [&](std::int64_t s) {
    const SubTile& sub = subs[s];
    done[s] = 1;
    const auto out_row = [&](std::int64_t r) { return seg.out.ptr(sub.t_begin + r % sub.nq, it.h_begin + r / sub.nq); };
    for (std::int64_t r = 0; r < sub.rows; ++r) {
      if constexpr (gated) prefetch_row_ahead<true>(out_row, r, sub.rows, sh.d_v * 4);
      const std::int64_t t = sub.t_begin + r % sub.nq, h = it.h_begin + r / sub.nq;
      float* dst = out_row(r);
      const float* src = sub.obuf + r * dvp;
      if constexpr (gated) {
        // Rows that saw no key contribute 0 (cannot happen for validated Loop Attention input).
        const float g = sub.gate[r], inv = sub.m[r] == neg_inf ? 0.f : 1.f / sub.l[r];
        if constexpr (dual) {
          const float inv2 = sub.m2[r] == neg_inf ? 0.f : 1.f / sub.l2[r];
          blend_finalize<Arch>(dst, src, inv, sub.o2 + r * dvp, inv2, g, sh.d_v);
        } else {
          blend_finalize<Arch>(dst, dst, 1.f, src, inv, g, sh.d_v);
        }
        if (ex.gate.out.data) ex.gate.out(t, h) = g;
        continue;
      }
      finalize_row(seg, sh, var, t, h, src, sub.m[r], sub.l[r], StreamingStore{});
    }
  };
  // The key-tile loop over (k, v) under mask m (query row 0 at position q_off). window_state:
  // the sub-tiles accumulate into their window state (o2, m2, l2); finish: a sub-tile is
  // finalised right after its last key tile. tile_extra goes to tile_step.
  const auto sweep = [&](const auto& k, const auto& v, const auto& m, std::int64_t q_off,  // KVRows of any storage
                         bool window_state, bool finish, const auto& tile_extra) {
    const std::int64_t n_keys = k.shape[0];
    const auto [key_lo, key_hi] = key_range(m, q_off, n_keys, it.t_begin, it.t_end - 1);
    if (key_hi < key_lo) return;
    for (std::int64_t kt = key_lo / kBc; kt <= key_hi / kBc; ++kt) {
      const std::int64_t k0 = kt * kBc, kc = std::min(kBc, n_keys - k0);
      pack_rows<Arch>(k, it.kv_head, k0, kc, d_k, d_k, tb.kbuf);
      pack_rows<Arch>(v, it.kv_head, k0, kc, sh.d_v, dvp, tb.vbuf);
      const auto [s_first, s_end] = subtiles_seeing(subs, k0, kc, [&](const SubTile& sub) {
        return key_range(m, q_off, n_keys, sub.t_begin, sub.t_begin + sub.nq - 1);
      });
      // Fetch the next tile's K/V rows while this one is computed: they usually come from DRAM.
      pf_kv.clear();
      if (kt < key_hi / kBc)
        for (std::int64_t c = k0 + kBc, ce = std::min(k0 + 2 * kBc, n_keys); c < ce; ++c) {
          pf_kv.add_row(k.ptr(c, it.kv_head), d_k);
          pf_kv.add_row(v.ptr(c, it.kv_head), sh.d_v);
        }
      if (s_end < n_sub && !packed[s_end]) {  // the sub-tile that joins next: its Q rows
        const SubTile& next = subs[s_end];
        for (std::int64_t r = 0; r < next.rows; ++r)
          pf_kv.add_row(seg.q.ptr(next.t_begin + r % next.nq, it.h_begin + r / next.nq), d_k);
      }
      pf_kv.plan(std::max<std::int64_t>(s_end - s_first, 1) * ticks_per_step);
      for (std::int64_t s = s_first; s < s_end; ++s) {
        if (!packed[s]) pack_q(s);
        pf_q.clear();
        if (s + 1 < s_end && !packed[s + 1]) {  // the next sub-tile's Q rows, during this step
          const SubTile& next = subs[s + 1];
          for (std::int64_t r = 0; r < next.rows; ++r)
            pf_q.add_row(seg.q.ptr(next.t_begin + r % next.nq, it.h_begin + r / next.nq), d_k);
        }
        pf_q.plan(ticks_per_step);
        SubTile sub = subs[s];
        if (window_state) {
          sub.obuf = sub.o2;
          sub.m = sub.m2;
          sub.l = sub.l2;
        }
        tile_step<Arch>(sub, tb, sh, m, q_off, n_keys, k0, kc, pf_q, pf_kv, tile_extra, var);
        if (finish && key_range(m, q_off, n_keys, sub.t_begin, sub.t_begin + sub.nq - 1).second < k0 + kc) finalize(s);
      }
    }
  };
  if constexpr (is_source_v<Extra>) {
    sweep(seg.k, seg.v, mask, seg.q_offset, false, false, Plain{});
    sweep(ex.k, ex.v, SlidingWindowMask{ex.window}, ex.q_offset, true, true, Plain{});
  } else {
    sweep(seg.k, seg.v, mask, seg.q_offset, false, true, ex);
  }

  for (std::int64_t s = 0; s < n_sub; ++s)
    if (!done[s]) finalize(s);
#if defined(__SSE__)
  _mm_sfence();  // the streamed output rows are visible before the item counts as done
#endif
}

// The variant's once-per-call preparation: M^T, row e = column e of M, zero rows up to a
// multiple of kKeyBlock (storage: where it lives).
template <class Var>
VariantPrep prepare_variant(const Shape& sh, const Var& var, std::vector<float>& storage) {
  VariantPrep prep;
  if constexpr (Var::has_query) {
    const std::int64_t d_kp = round_up(sh.d_k, kKeyBlock);
    storage.assign(static_cast<std::size_t>(d_kp * sh.d_k), 0.f);
    for (std::int64_t e = 0; e < sh.d_k; ++e)
      for (std::int64_t d = 0; d < sh.d_k; ++d) storage[static_cast<std::size_t>(e * sh.d_k + d)] = var.query.M(d, e);
    prep.metric_t = storage.data();
  }
  return prep;
}

// Work items of bq queries x one KV head (restricted to heads [h_begin, h_end)), in schedule order.
template <class KV>
std::vector<WorkItem> plan_items(const std::vector<Segment<KV>>& segs, const Shape& sh, std::int64_t h_begin,
                                 std::int64_t h_end, const std::vector<std::pair<std::int64_t, std::int64_t>>& q_ranges,
                                 std::int64_t bq) {
  std::vector<WorkItem> items;
  for (std::size_t s = 0; s < segs.size(); ++s) {
    const auto [qb, qe] = q_ranges[s];
    for (std::int64_t t = qb; t < qe; t += bq)
      for (std::int64_t j = h_begin / sh.G; j * sh.G < h_end; ++j) {
        const std::int64_t hb = std::max(h_begin, j * sh.G), he = std::min(h_end, (j + 1) * sh.G);
        if (he <= hb) continue;  // an empty head range (opt.heads = {h, h})
        items.push_back({static_cast<std::int32_t>(s), static_cast<std::int32_t>(j), static_cast<std::int32_t>(hb),
                         static_cast<std::int32_t>(he), t, std::min(qe, t + bq)});
      }
  }
  // KV-head major (consecutive items reuse that head's K/V from cache), latest query tiles
  // first within a head (under a causal mask they are the longest, so the schedule ends on
  // short items).
  std::stable_sort(items.begin(), items.end(), [&](const WorkItem& a, const WorkItem& b) {
    if (a.segment != b.segment) return a.segment < b.segment;
    if (a.kv_head != b.kv_head) return a.kv_head < b.kv_head;
    return a.t_begin > b.t_begin;
  });
  return items;
}

// Runs queries [q_range) and heads [h_range) of every segment. Items are ordered with the
// longest (latest query tiles under a causal mask) first for the dynamic schedule.
template <class Arch, class KV, class Mask, class Extra = Plain, class Var = PlainAttention>
void run_prefill(const std::vector<Segment<KV>>& segs, const Shape& sh, const Mask& mask, std::int64_t h_begin,
                 std::int64_t h_end, const std::vector<std::pair<std::int64_t, std::int64_t>>& q_ranges,
                 int num_threads, const Extra& ex = {}, const Var& var = {}) {
  std::vector<float> metric_t;
  const VariantPrep prep = prepare_variant(sh, var, metric_t);
  const std::vector<WorkItem> items = plan_items(segs, sh, h_begin, h_end, q_ranges, item_queries(sh.G));
  ATTNKIT_STAGE("prefill.items");
  parallel_for(
      static_cast<std::int64_t>(items.size()), num_threads,
      [&](std::int64_t i) { ATTNKIT_FAULT_POINT("prefill"); run_item<Arch>(segs[items[i].segment], sh, mask, items[i], ex, var, prep); }, /*dynamic=*/true);
}

}  // namespace attnkit::detail::flash
