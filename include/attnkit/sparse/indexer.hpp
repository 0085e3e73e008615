// attnkit/sparse/indexer.hpp — DeepSeek's lightning indexer (spec §8.1): which keys each query
// keeps for sparse attention.
//
//   score[t, s] = Σ_j w[t, j] · ReLU(index_q[t, j] · index_k[s])   for s <= p_t = q_offset + t
//               = -inf                                              for s >  p_t
//   indices[t]  = the top min(K, p_t + 1) keys s <= p_t by score (ties: lower index), ascending,
//                 then -1 up to K (sparse/topk.hpp)
//
// Shapes: index_q [T, H_I, d_I], index_k [T_k, d_I] (one key head shared by every index head),
// index_w [T, H_I], all f32, any strides with the last dimension contiguous; score [T, T_k] f32;
// indices [T, K] int32 with K = indices.shape[1] >= 1. opt.q_offset = -1 puts the queries at
// the end of the keys (q_offset = T_k - T); otherwise q_offset + T <= T_k. The head weights are
// taken as given (the model folds H_I^-1/2 · d_I^-1/2 into them).
//
// indexer_topk is the model path: it computes the scores of a strip of queries at a time, key
// block by key block (each block of index keys is read once per strip from cache and used by
// every query of the strip), and selects per query; no T x T_k buffer exists. A query that sees
// at most K keys keeps all of them without being scored. indexer_scores writes the whole matrix
// (tests, tools, pictures). Both give bit-identical scores for any thread count and strip.
// Arithmetic is f32: on AVX-512 each score is the index heads in vector lanes, summed by a
// transpose tree; elsewhere a portable loop.
//
// opt.precision = fast (on a build with AVX512-VNNI; elsewhere it means exact): the index
// vectors are quantised to int8 as DeepSeek's indexer runs in FP8: each key row once per call
// and each query head once (symmetric, a scale per row, attention/quant.hpp's quantize_row).
// The dot products are then exact integer sums, 64 products per vpdpbusd instead of 16 per
// FMA, and the score is scale_k[s] · Σ_j (w[t, j] · scale_q[t, j]) · ReLU(int dot): exactly the
// score of the dequantised vectors up to f32 rounding. Against the f32 vectors each dot product
// is off by at most (scale_q·|k|_1 + scale_k·|q|_1)/2 + d_I·scale_q·scale_k/4, and ReLU does not
// enlarge it, so a score moves by at most Σ_j |w[t, j]| times that (tests/test_sparse.cpp
// checks it), and the selection can differ from exact only among keys whose scores lie that
// close to the k-th one. A non-finite index vector is an Error naming its row (fast needs a
// scale for it). Quantising the keys costs about one f32 scoring of them, so only a call of at
// least 16 queries (prefill, chunks) takes the int8 path; one that scores fewer (decode) stays
// f32, and its scores are then the exact ones.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>
#include <optional>
#include <type_traits>
#include <vector>

#include "attnkit/attention/decode.hpp"
#include "attnkit/attention/quant.hpp"
#include "attnkit/core/precision.hpp"
#include "attnkit/core/error.hpp"
#include "attnkit/core/memory.hpp"
#include "attnkit/core/simd.hpp"
#include "attnkit/core/threading.hpp"
#include "attnkit/core/view.hpp"
#include "attnkit/sparse/topk.hpp"

namespace attnkit {

struct IndexerOptions {
  std::int64_t q_offset = -1;             // absolute position of query row 0; -1 -> T_k - T
  int num_threads = 0;                    // 0 -> OpenMP default
  Precision precision = Precision::exact;  // fast: int8 index vectors on VNNI (see the top of the file)
};

namespace detail::indexer {

inline constexpr std::int64_t kKeyBlock = 512;  // index keys scored per work item (128 KiB at d_I 64)
inline constexpr std::int64_t kStrip = 64;      // queries scored together in indexer_topk
inline constexpr std::int64_t kPanelQueries = 4;  // queries of a strip from which a key panel pays
inline constexpr std::int64_t kQuantMinQueries = 16;  // Precision::fast: queries per call from which int8 pays

struct Shape {
  std::int64_t T, T_k, H, d, H_pad, q_offset;
};

inline Shape validate(const char* fn, ConstView3<float> q, ConstView2<float> k, ConstView2<float> w,
                      const IndexerOptions& opt) {
  check_view(q, fn, "index_q");
  check_view(k, fn, "index_k");
  check_view(w, fn, "index_w");
  const std::int64_t T = q.shape[0], H = q.shape[1], d = q.shape[2], T_k = k.shape[0];
  ATTNKIT_REQUIRE(H >= 1 && d >= 1, fn, ": argument 'index_q': needs at least one head of dimension >= 1, got shape ",
                  detail::shape_string(q));
  ATTNKIT_REQUIRE(k.shape[1] == d, fn, ": argument 'index_k': dimension ", k.shape[1],
                  " differs from index_q's head dimension ", d, " (index_k is [T_k, d_I], one key head)");
  ATTNKIT_REQUIRE(w.shape[0] == T && w.shape[1] == H, fn, ": argument 'index_w': shape ", detail::shape_string(w),
                  " must be [T, H_I] = [", T, ", ", H, "]");
  ATTNKIT_REQUIRE(T_k <= INT32_MAX, fn, ": argument 'index_k': ", T_k, " keys exceed the int32 index range");
  ATTNKIT_REQUIRE(opt.q_offset >= -1, fn, ": argument 'opt.q_offset': must be -1 (default) or >= 0, got ", opt.q_offset);
  const std::int64_t off = opt.q_offset >= 0 ? opt.q_offset : T_k - T;
  ATTNKIT_REQUIRE(off >= 0 && off + T <= T_k, fn, ": ", T, " queries at position ", off, " need ", off + T,
                  " index keys, but index_k has ", T_k);
  ATTNKIT_REQUIRE(opt.num_threads >= 0, fn, ": argument 'opt.num_threads': must be >= 0 (0 = default), got ",
                  opt.num_threads);
  return {T, T_k, H, d, (H + 15) / 16 * 16, off};
}

// One query, prepared: its index vectors transposed to [d][H_pad] (heads in lanes, zero padded)
// and its head weights padded with zeros, so padded heads contribute 0.
inline void prepare_query(const Shape& sh, ConstView3<float> q, ConstView2<float> w, std::int64_t t, float* qt, float* wp) {
  for (std::int64_t e = 0; e < sh.d; ++e)
    for (std::int64_t h = 0; h < sh.H_pad; ++h) qt[e * sh.H_pad + h] = h < sh.H ? q(t, h, e) : 0.f;
  for (std::int64_t h = 0; h < sh.H_pad; ++h) wp[h] = h < sh.H ? w(t, h) : 0.f;
}

#if defined(__AVX512F__) && defined(__AVX512BW__)
// The scores of 16 keys (the first n valid) into dst, or added to it (later head chunks).
inline void store_scores(__m512 sc, float* dst, std::int64_t n, bool add) {
  const __mmask16 m = detail::decode::tail_mask(n);
  _mm512_mask_storeu_ps(dst, m, add ? _mm512_add_ps(_mm512_maskz_loadu_ps(m, dst), sc) : sc);
}

// Head chunk [c0, c0 + 16·NH) of the scores of keys [s0, s1) (rows of index_k): NK keys at a time
// share each loaded query column; 16 keys' per-lane terms are then summed by one transpose tree.
// Keys come from a panel (make_panel: one base pointer for 16 keys, best when a strip of
// queries shares it) or straight from the rows of k (one query: a panel would cost more than it
// saves).
template <int NH, bool UsePanel>
inline void score_keys_chunk(const Shape& sh, const float* qt, const float* wp, std::int64_t c0, const float* panel,
                             ConstView2<float> k, std::int64_t s0, std::int64_t s1, float* row, bool add) {
  constexpr int NK = NH == 1 ? 16 : NH == 2 ? 8 : 4;
  __m512 wv[NH];
#pragma GCC unroll 4
  for (int v = 0; v < NH; ++v) wv[v] = _mm512_loadu_ps(wp + c0 + 16 * v);
  const __m512 zero = _mm512_setzero_ps();
  for (std::int64_t s = s0; s < s1; s += 16) {
    __m512 red[16];
    const float* pk = UsePanel ? panel + (s - s0) * sh.d : nullptr;  // this group of 16 keys: [d][16]
    for (int g = 0; g < 16; g += NK) {
      const float* kr[NK];
      if constexpr (!UsePanel) {
#pragma GCC unroll 16
        for (int r = 0; r < NK; ++r) kr[r] = k.ptr(std::min(s + g + r, s1 - 1));
      }
      __m512 acc[NK][NH];
#pragma GCC unroll 16
      for (int r = 0; r < NK; ++r)
#pragma GCC unroll 4
        for (int v = 0; v < NH; ++v) acc[r][v] = zero;
      for (std::int64_t e = 0; e < sh.d; ++e) {
        __m512 qv[NH];
#pragma GCC unroll 4
        for (int v = 0; v < NH; ++v) qv[v] = _mm512_loadu_ps(qt + e * sh.H_pad + c0 + 16 * v);
#pragma GCC unroll 16
        for (int r = 0; r < NK; ++r) {
          const __m512 kb = _mm512_set1_ps(UsePanel ? pk[e * 16 + g + r] : kr[r][e]);
#pragma GCC unroll 4
          for (int v = 0; v < NH; ++v) acc[r][v] = _mm512_fmadd_ps(qv[v], kb, acc[r][v]);
        }
      }
#pragma GCC unroll 16
      for (int r = 0; r < NK; ++r) {
        // max(0, x) with x second: a NaN dot product stays NaN (and is refused by the selection).
        __m512 x = _mm512_mul_ps(wv[0], _mm512_max_ps(zero, acc[r][0]));
#pragma GCC unroll 4
        for (int v = 1; v < NH; ++v) x = _mm512_fmadd_ps(wv[v], _mm512_max_ps(zero, acc[r][v]), x);
        red[g + r] = x;
      }
    }
    store_scores(detail::decode::reduce16(red), row + (s - s0), s1 - s, add);
  }
}
#endif

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
#define ATTNKIT_INDEXER_VNNI 1
// Precision::fast: the index keys of a call, quantised once, in groups of 16 keys laid out
// [d4 / 4][16 keys][4 codes] (int8, zero past d_I and past the last key), so the kernel
// broadcasts each key's 4 codes from one base pointer into vpdpbusd's signed operand; ksum[s] =
// 128 · Σ codes of key s (what the +128 of the query bytes adds to each dot product);
// scale[s] the key's scale. Arrays padded to whole groups.
struct QuantKeys {
  std::int64_t d4 = 0;  // d_I rounded up to 4
  std::vector<std::int8_t> codes;
  std::vector<std::int32_t> ksum;
  std::vector<float> scale;
  const std::int8_t* group(std::int64_t s) const { return codes.data() + s / 16 * 16 * d4; }
};

inline QuantKeys quantize_keys(const char* fn, ConstView2<float> k, std::int64_t n_keys, int threads) {
  QuantKeys qk;
  const std::int64_t d = k.shape[1], padded = (n_keys + 15) / 16 * 16;
  qk.d4 = (d + 3) / 4 * 4;
  qk.codes.assign(static_cast<std::size_t>(padded * qk.d4), std::int8_t{0});
  qk.ksum.assign(static_cast<std::size_t>(padded), 0);
  qk.scale.assign(static_cast<std::size_t>(padded), 0.f);
  constexpr std::int64_t kRows = 256;
  parallel_for((n_keys + kRows - 1) / kRows, threads, [&](std::int64_t c) {
    std::vector<std::int8_t> code(static_cast<std::size_t>(qk.d4), std::int8_t{0});
    for (std::int64_t s = c * kRows; s < std::min(n_keys, (c + 1) * kRows); ++s) {
      if (!detail::quant::quantize_row(k.ptr(s), code.data(), qk.scale[static_cast<std::size_t>(s)], d))
        detail::throw_error(fn, ": argument 'index_k': row ", s, " holds a NaN or an infinity (Precision::fast ",
                            "quantises each index key and needs a finite scale)");
      std::int8_t* g = qk.codes.data() + s / 16 * 16 * qk.d4 + s % 16 * 4;
      std::int32_t sum = 0;
      for (std::int64_t e = 0; e < d; ++e) sum += code[static_cast<std::size_t>(e)];
      for (std::int64_t e = 0; e < qk.d4; e += 4) std::memcpy(g + e * 16, code.data() + e, 4);  // 4 codes per store
      qk.ksum[static_cast<std::size_t>(s)] = 128 * sum;
    }
  });
  return qk;
}

// One query prepared for the VNNI kernel: bytes [d4 / 4][H_pad][4] = code + 128 (4 consecutive
// dims of 16 heads per 64-byte vector; 128 past d_I and for padded heads), then
// wq[h] = w[t, h] · scale_q[t, h] (0 for padded heads). Sizes in floats: prepared_floats_int8.
inline std::int64_t prepared_floats_int8(const Shape& sh) { return (sh.d + 3) / 4 * sh.H_pad + sh.H_pad; }
inline void prepare_query_int8(const char* fn, const Shape& sh, ConstView3<float> q, ConstView2<float> w, std::int64_t t,
                               float* prep) {
  const std::int64_t d4 = (sh.d + 3) / 4 * 4;
  auto* codes = reinterpret_cast<std::uint8_t*>(prep);
  float* wq = prep + d4 / 4 * sh.H_pad;
  std::fill(codes, codes + d4 * sh.H_pad, std::uint8_t{128});
  thread_local std::vector<std::int8_t> code;
  code.resize(static_cast<std::size_t>(sh.d));
  for (std::int64_t h = 0; h < sh.H_pad; ++h) {
    wq[h] = 0.f;
    if (h >= sh.H) continue;
    float scale = 0.f;
    if (!detail::quant::quantize_row(q.ptr(t, h), code.data(), scale, sh.d))
      detail::throw_error(fn, ": argument 'index_q': query ", t, ", head ", h, " holds a NaN or an infinity ",
                          "(Precision::fast quantises each index query head and needs a finite scale)");
    for (std::int64_t e = 0; e < sh.d; ++e)
      codes[(e / 4 * sh.H_pad + h) * 4 + e % 4] = static_cast<std::uint8_t>(code[static_cast<std::size_t>(e)] ^ 0x80);
    wq[h] = w(t, h) * scale;
  }
}

// acc += u8 · (the 4 int8 at p, broadcast to every lane): vpdpbusd with its memory broadcast.
// Written out because GCC 12 copies the accumulator in and out around the intrinsic (two
// extra moves per instruction) and loads the broadcast separately.
inline __m512i dpbusd_broadcast(__m512i acc, __m512i u8, const std::int8_t* p) {
  __asm__("vpdpbusd %2%{1to16%}, %1, %0" : "+v"(acc) : "v"(u8), "m"(*reinterpret_cast<const std::int32_t*>(p)));
  return acc;
}

// Head chunk [c0, c0 + 16·NH) of the scores of keys [s0, s1) (s0 a multiple of 16), as
// score_keys_chunk: NK keys at a time share each loaded vector of query bytes.
template <int NH>
inline void score_keys_chunk_int8(const Shape& sh, const float* prep, std::int64_t c0, const QuantKeys& qk,
                                  std::int64_t s0, std::int64_t s1, float* row, bool add) {
  constexpr int NK = NH == 1 ? 16 : NH == 2 ? 8 : 4;
  const std::int64_t n4 = qk.d4 / 4;
  const auto* codes = reinterpret_cast<const std::uint8_t*>(prep);
  const float* wq = prep + n4 * sh.H_pad;
  __m512 wv[NH];
#pragma GCC unroll 4
  for (int v = 0; v < NH; ++v) wv[v] = _mm512_loadu_ps(wq + c0 + 16 * v);
  const __m512 zero = _mm512_setzero_ps();
  for (std::int64_t s = s0; s < s1; s += 16) {
    __m512 red[16];
    const std::int8_t* grp = qk.group(s);
    for (int g = 0; g < 16; g += NK) {
      __m512i acc[NK][NH];
#pragma GCC unroll 16
      for (int r = 0; r < NK; ++r)
#pragma GCC unroll 4
        for (int v = 0; v < NH; ++v) acc[r][v] = _mm512_setzero_si512();
      for (std::int64_t e = 0; e < n4; ++e) {
        __m512i qv[NH];
#pragma GCC unroll 4
        for (int v = 0; v < NH; ++v) qv[v] = _mm512_loadu_si512(codes + (e * sh.H_pad + c0 + 16 * v) * 4);
        const std::int8_t* ke = grp + e * 64 + g * 4;
#pragma GCC unroll 16
        for (int r = 0; r < NK; ++r)
#pragma GCC unroll 4
          for (int v = 0; v < NH; ++v) acc[r][v] = dpbusd_broadcast(acc[r][v], qv[v], ke + 4 * r);
      }
#pragma GCC unroll 16
      for (int r = 0; r < NK; ++r) {
        const __m512i bias = _mm512_set1_epi32(qk.ksum[static_cast<std::size_t>(s + g + r)]);
        // max(0, x) with x second, as the f32 kernel (an integer dot is never NaN; a NaN weight is).
        __m512 x = _mm512_mul_ps(wv[0], _mm512_max_ps(zero, _mm512_cvtepi32_ps(_mm512_sub_epi32(acc[r][0], bias))));
#pragma GCC unroll 4
        for (int v = 1; v < NH; ++v)
          x = _mm512_fmadd_ps(wv[v], _mm512_max_ps(zero, _mm512_cvtepi32_ps(_mm512_sub_epi32(acc[r][v], bias))), x);
        red[g + r] = x;
      }
    }
    store_scores(_mm512_mul_ps(detail::decode::reduce16(red), _mm512_loadu_ps(qk.scale.data() + s)), row + (s - s0),
                 s1 - s, add);
  }
}

inline void score_keys_int8(const Shape& sh, const float* prep, const QuantKeys& qk, std::int64_t s0, std::int64_t s1,
                            float* row) {
  if (s1 <= s0) return;
  for (std::int64_t c0 = 0; c0 < sh.H_pad; c0 += 64) {
    const bool add = c0 > 0;
    switch (std::min<std::int64_t>(4, (sh.H_pad - c0) / 16)) {
      case 1: score_keys_chunk_int8<1>(sh, prep, c0, qk, s0, s1, row, add); break;
      case 2: score_keys_chunk_int8<2>(sh, prep, c0, qk, s0, s1, row, add); break;
      case 3: score_keys_chunk_int8<3>(sh, prep, c0, qk, s0, s1, row, add); break;
      default: score_keys_chunk_int8<4>(sh, prep, c0, qk, s0, s1, row, add); break;
    }
  }
}
#else
struct QuantKeys {};
#endif

// The keys [s0, s1) as the AVX-512 kernel reads them: groups of 16 keys, each [d][16] (one
// broadcast base for all 16 keys; the last group repeats its last key).
inline void make_panel(const Shape& sh, ConstView2<float> k, std::int64_t s0, std::int64_t s1, float* panel) {
  for (std::int64_t g = s0; g < s1; g += 16)
    for (int r = 0; r < 16; ++r) {
      const float* kr = k.ptr(std::min<std::int64_t>(g + r, s1 - 1));
      float* dst = panel + (g - s0) * sh.d + r;
      for (std::int64_t e = 0; e < sh.d; ++e) dst[e * 16] = kr[e];
    }
}

// row[s - s0] = score of key s for s in [s0, s1) (one prepared query); panel: make_panel's keys
// from s0 on, or null to read the rows of k (AVX-512; the portable path reads k).
inline void score_keys(const Shape& sh, const float* qt, const float* wp, ConstView2<float> k, const float* panel,
                       std::int64_t s0, std::int64_t s1, float* row) {
  if (s1 <= s0) return;
#if defined(__AVX512F__) && defined(__AVX512BW__)
  auto run = [&](auto use_panel) {
    constexpr bool P = decltype(use_panel)::value;
    for (std::int64_t c0 = 0; c0 < sh.H_pad; c0 += 64) {
      const bool add = c0 > 0;
      switch (std::min<std::int64_t>(4, (sh.H_pad - c0) / 16)) {
        case 1: score_keys_chunk<1, P>(sh, qt, wp, c0, panel, k, s0, s1, row, add); break;
        case 2: score_keys_chunk<2, P>(sh, qt, wp, c0, panel, k, s0, s1, row, add); break;
        case 3: score_keys_chunk<3, P>(sh, qt, wp, c0, panel, k, s0, s1, row, add); break;
        default: score_keys_chunk<4, P>(sh, qt, wp, c0, panel, k, s0, s1, row, add); break;
      }
    }
  };
  if (panel) run(std::true_type{});
  else run(std::false_type{});
#else
  (void)panel;
  for (std::int64_t s = s0; s < s1; ++s) {
    const float* kr = k.ptr(s);
    float sum = 0.f;
    for (std::int64_t h = 0; h < sh.H; ++h) {
      float dot = 0.f;
      for (std::int64_t e = 0; e < sh.d; ++e) dot += qt[e * sh.H_pad + h] * kr[e];
      sum += wp[h] * std::max(dot, 0.f);
    }
    row[s - s0] = sum;
  }
#endif
}

// Floats of one prepared query (either form).
inline std::int64_t prepared_floats(const Shape& sh) {
  std::int64_t n = sh.d * sh.H_pad + sh.H_pad;
#if defined(ATTNKIT_INDEXER_VNNI)
  n = std::max(n, prepared_floats_int8(sh));
#endif
  return n;
}

// Thread scratch uses (core/memory.hpp thread_scratch): a key block's panel, a strip's rows.
struct PanelScratch;
struct StripScratch;

// Scores of queries [t0, t1) against every key each sees, into rows[t - t0][0 .. p_t] (row
// stride ld): the prepared queries first, then work items of one key block for every query of
// the strip that sees it.
inline void score_strip(const char* fn, const Shape& sh, ConstView3<float> q, ConstView2<float> k, ConstView2<float> w, std::int64_t t0,
                        std::int64_t t1, const std::vector<char>& wanted, float* rows, std::int64_t ld, float* prep,
                        int threads, const QuantKeys* qk) {
  (void)qk;
  const std::int64_t per = prepared_floats(sh);
  for (std::int64_t t = t0; t < t1; ++t) {
    if (!wanted[static_cast<std::size_t>(t - t0)]) continue;
    float* pt = prep + (t - t0) * per;
#if defined(ATTNKIT_INDEXER_VNNI)
    if (qk) {
      prepare_query_int8(fn, sh, q, w, t, pt);
      continue;
    }
#endif
    prepare_query(sh, q, w, t, pt, pt + sh.d * sh.H_pad);
  }
  const std::int64_t last = sh.q_offset + t1 - 1;  // the furthest key any query of the strip sees
  const std::int64_t n_wanted = std::count(wanted.begin(), wanted.end(), 1);
  const std::int64_t n_blocks = last / kKeyBlock + 1;
  parallel_for(n_blocks, threads, [&](std::int64_t b) {
    ATTNKIT_FAULT_POINT("sparse");
    const std::int64_t s0 = b * kKeyBlock, s_end = std::min(s0 + kKeyBlock, last + 1);
#if defined(ATTNKIT_INDEXER_VNNI)
    if (qk) {
      for (std::int64_t t = t0; t < t1; ++t)
        if (wanted[static_cast<std::size_t>(t - t0)])
          score_keys_int8(sh, prep + (t - t0) * per, *qk, s0, std::min(s_end, sh.q_offset + t + 1), rows + (t - t0) * ld + s0);
      return;
    }
#endif
    float* panel = nullptr;
#if defined(__AVX512F__) && defined(__AVX512BW__)
    if (n_wanted >= kPanelQueries) {
      panel = thread_scratch<PanelScratch>().get(kKeyBlock * sh.d);
      make_panel(sh, k, s0, s_end, panel);
    }
#endif
    for (std::int64_t t = t0; t < t1; ++t) {
      if (!wanted[static_cast<std::size_t>(t - t0)]) continue;
      const std::int64_t s1 = std::min(s_end, sh.q_offset + t + 1);
      const float* qt = prep + (t - t0) * per;
      score_keys(sh, qt, qt + sh.d * sh.H_pad, k, panel, s0, s1, rows + (t - t0) * ld + s0);
    }
  }, /*dynamic=*/true);
}

// The index keys quantised for Precision::fast, or nothing (exact, or a build without VNNI).
inline std::optional<QuantKeys> quantized_keys(const char* fn, const Shape& sh, ConstView2<float> k,
                                               const IndexerOptions& opt) {
#if defined(ATTNKIT_INDEXER_VNNI)
  // Quantising every key costs about what scoring it in f32 costs once, so a call that scores
  // few queries (decode) keeps f32 (measured: one query against 32768 keys took 2.1 ms
  // quantised against 0.8 ms in f32).
  if (opt.precision == Precision::fast && sh.T >= kQuantMinQueries)
    return quantize_keys(fn, k, sh.q_offset + sh.T, opt.num_threads);
#else
  (void)fn, (void)sh, (void)k, (void)opt;
#endif
  return std::nullopt;
}

}  // namespace detail::indexer

// The full score matrix [T, T_k] (-inf above each query's position). See the top of this file.
inline void indexer_scores(ConstView3<float> index_q, ConstView2<float> index_k, ConstView2<float> index_w,
                           View2<float> score, const IndexerOptions& opt = {}) {
  using namespace detail::indexer;
  constexpr const char* fn = "indexer_scores";
  const Shape sh = validate(fn, index_q, index_k, index_w, opt);
  check_view(score, fn, "score");
  ATTNKIT_REQUIRE(score.shape[0] == sh.T && score.shape[1] == sh.T_k, fn, ": argument 'score': shape ",
                  detail::shape_string(score), " must be [T, T_k] = [", sh.T, ", ", sh.T_k, "]");
  constexpr float ninf = -std::numeric_limits<float>::infinity();
  const std::optional<QuantKeys> qk = quantized_keys(fn, sh, index_k, opt);
  for (std::int64_t t0 = 0; t0 < sh.T; t0 += kStrip) {
    const std::int64_t t1 = std::min(sh.T, t0 + kStrip);
    const std::vector<char> wanted(static_cast<std::size_t>(t1 - t0), 1);
    float* prep = thread_scratch<StripScratch>().get((t1 - t0) * prepared_floats(sh));
    score_strip(fn, sh, index_q, index_k, index_w, t0, t1, wanted, score.ptr(t0), score.stride[0], prep, opt.num_threads,
                qk ? &*qk : nullptr);
    for (std::int64_t t = t0; t < t1; ++t) std::fill(score.ptr(t) + sh.q_offset + t + 1, score.ptr(t) + sh.T_k, ninf);
  }
}

// indices [T, K]: each query's top-K visible keys, ascending, -1 padded. See the top of this file.
inline void indexer_topk(ConstView3<float> index_q, ConstView2<float> index_k, ConstView2<float> index_w,
                         View2<std::int32_t> indices, const IndexerOptions& opt = {}) {
  using namespace detail::indexer;
  constexpr const char* fn = "indexer_topk";
  const Shape sh = validate(fn, index_q, index_k, index_w, opt);
  check_view(indices, fn, "indices");
  const std::int64_t K = indices.shape[1];
  ATTNKIT_REQUIRE(indices.shape[0] == sh.T && K >= 1, fn, ": argument 'indices': shape ", detail::shape_string(indices),
                  " must be [T, K] = [", sh.T, ", K >= 1]");
  // Rows of one strip; scratch is thread-local and grows to the longest strip seen.
  const std::int64_t ld = (sh.T_k + 15) / 16 * 16;
  const std::optional<QuantKeys> qk = quantized_keys(fn, sh, index_k, opt);
  for (std::int64_t t0 = 0; t0 < sh.T; t0 += kStrip) {
    const std::int64_t t1 = std::min(sh.T, t0 + kStrip);
    std::vector<char> wanted(static_cast<std::size_t>(t1 - t0));
    bool any = false;
    for (std::int64_t t = t0; t < t1; ++t) {
      wanted[static_cast<std::size_t>(t - t0)] = sh.q_offset + t + 1 > K;  // else it keeps every key it sees
      any = any || wanted[static_cast<std::size_t>(t - t0)];
    }
    float* rows = nullptr;
    if (any) {
      const std::int64_t per = prepared_floats(sh);
      float* buf = thread_scratch<StripScratch>().get((t1 - t0) * (ld + per));
      rows = buf + (t1 - t0) * per;
      score_strip(fn, sh, index_q, index_k, index_w, t0, t1, wanted, rows, ld, buf, opt.num_threads, qk ? &*qk : nullptr);
    }
    parallel_for(t1 - t0, (t1 - t0) >= 4 ? opt.num_threads : 1, [&](std::int64_t i) {
      ATTNKIT_FAULT_POINT("sparse");
      const std::int64_t t = t0 + i;
      const std::int64_t n = sh.q_offset + t + 1;
      select_topk(wanted[static_cast<std::size_t>(i)] ? rows + i * ld : nullptr, n, K, indices.ptr(t));
    });
  }
}

}  // namespace attnkit
