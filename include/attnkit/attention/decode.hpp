// attnkit/attention/decode.hpp — attention of one query token against a KV cache (decode).
//
//   out[h] = Σ_s softmax_s(scale · q[h]·k[s, h/G]) · v[s, h/G],   lse[h] = log Σ_s exp(scale · q[h]·k[s, h/G])
//
// Shapes: q [H, d_k] f32; k [T_kv, H_kv, d_k], v [T_kv, H_kv, d_v] with KV = float or bf16 and any
// strides (last dimension contiguous), e.g. KVCache's head-major storage; out [H, d_v] f32;
// lse [H] optional (natural log). G = H / H_kv; query head h reads KV head h / G. Every key
// passed is visible and their order does not matter (a sliding layer passes its ring buffer's
// slots). T_kv = 0 gives out = 0 and lse = -inf. Only the query heads in opt.heads are written.
// out must not overlap q, k or v.
//
// Design: the keys are split into chunks of a fixed size (opt.kv_chunk, never derived from the
// thread count). A work item (KV head j, chunk c) streams each K and V row of the chunk once and
// updates the online-softmax state of all G query heads that share KV head j, so a head-major
// cache is read sequentially at memory bandwidth. Each thread takes a contiguous run of items
// (a head's chunks in order), and the prefetches of an item's last blocks run on into the
// thread's next item, so a thread's reads stay one stream. Token-major K/V (a token's KV heads
// adjacent, [T, H_kv, d] as engines store it) are read the other way: an item takes a chunk for
// all KV heads (or a group of them) and reads each block's rows of every head in turn, one
// contiguous run (chunk_state_heads; one head alone would read a few lines of every token's
// run: bf16, T 8192, 2 threads, 19.2 -> 25 GB/s). The per-chunk states are then merged
// by log-sum-exp in chunk order, so the result is bit-identical for any number of threads.
// bf16 K/V are widened to f32 in registers (exact); all arithmetic is f32. opt.precision = fast
// over bf16 K/V (an AVX512-BF16 build on AMD's cores: bf16_dot_pays) scores and sums them on
// vdpbf16ps instead, the scaled query and the probabilities rounded to bf16 (scores_block_dot,
// accumulate_block_dot).
//
// int8 K/V (QuantView3, attention/quant.hpp: codes + a scale per token and KV head, as
// KVCache<std::int8_t> stores them): the same kernel, the codes widened to f32 in registers
// (exact) and the scales applied per key row to the block's results, never to the 16-lane
// vectors: score_i = (q · codes_i) · kscale_i, and the probabilities are multiplied by vscale_i
// before P·V (the softmax sum uses the unscaled ones). So an int8 row costs one widening per
// 16 elements on top of the f32 kernel's FMAs, and a quarter of the bytes; scores_block_paired
// widens each key slice once for two query heads (bit-identical to one head at a time). The result
// equals attention over the dequantised K/V to f32 rounding; against the unquantised K/V it is
// off by the quantisation error (README: accuracy). opt.precision = fast (on a build with
// AVX512-VNNI) quantises each query head to int8 once per work item and scores the key codes
// with vpdpbusd, 64 codes per instruction instead of 16 widened ones per FMA: the scores are
// then off by the query's rounding as well; each block's P·V sums are then taken in fp16, 32
// lanes per FMA, on AVX512-FP16 (accumulate_block_f16), and otherwise on vpdpbusd with the
// probabilities in 16-bit fixed point (accumulate_block_vnni: AMD Zen 4 and 5);
// tests/test_attention_decode.cpp states the bounds.
//
// Variants (attention/variant.hpp), the last argument: the query metric is applied once per call
// before the chunks; soft-cap and ALiBi transform each block's scores before its softmax update
// (ALiBi reads positions: key row s sits at position s, or with opt.ring = W at the position
// in (q_position - W, q_position] that is s mod W, and the query at opt.q_position, default
// T_kv - 1); the sink and the output scale ([1, H]) are applied to the merged state.
#pragma once

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <memory>
#include <type_traits>
#include <utility>
#include <vector>

#include "attnkit/attention/common.hpp"
#include "attnkit/attention/merge.hpp"
#include "attnkit/attention/quant.hpp"
#include "attnkit/attention/variant.hpp"
#include "attnkit/core/bf16.hpp"
#include "attnkit/core/cpu.hpp"
#include "attnkit/core/error.hpp"
#include "attnkit/core/memory.hpp"
#include "attnkit/core/precision.hpp"
#include "attnkit/core/simd.hpp"
#include "attnkit/core/threading.hpp"
#include "attnkit/core/view.hpp"

namespace attnkit {

struct DecodeOptions {
  float scale = 0.f;          // 0 -> 1/sqrt(d_k)
  Range heads{};              // query heads to compute (others untouched)
  int num_threads = 0;        // 0 -> OpenMP default
  std::int64_t kv_chunk = 0;  // keys per work item; 0 -> 512; never derived from the thread count
  // Positions, read only by position-dependent variants (ALiBi):
  std::int64_t q_position = -1;  // the query's position; -1 -> T_kv - 1 (the newest key is the query's own)
  std::int64_t ring = 0;         // 0: key row s at position s; W: rows are ring slots, position = q_position - ((q_position - s) mod W)
  // int8 K/V: fast scores the keys with the query quantised to int8 per head, on VNNI
  // (vpdpbusd) where the build has it (README: accuracy); exact keeps the query in f32, so the
  // result is attention over the dequantised K/V. bf16 K/V: fast runs scores and P·V on
  // vdpbf16ps where the build has AVX512-BF16 and the CPU is AMD's (where it pays), the query
  // and the probabilities rounded to bf16 (about 3e-3 of the output's magnitude); elsewhere
  // it is exact. f32 K/V: ignored.
  Precision precision = Precision::exact;
};

namespace detail::decode {

inline constexpr std::int64_t kDefaultChunk = 512;
inline constexpr int kBlock = 32;  // keys whose scores are computed before one softmax update
inline constexpr float kLog2e = 1.4426950408889634f;
inline constexpr float kLn2 = 0.6931471805599453f;
inline constexpr float kNegInf = -std::numeric_limits<float>::infinity();

inline std::int64_t round_up16(std::int64_t n) { return (n + 15) / 16 * 16; }
inline std::int64_t round_up32(std::int64_t n) { return (n + 31) / 32 * 32; }

// bf16 rows are processed in 32-element pairs on the AVX-512 path.
template <bool Vectorized, class KV>
inline constexpr bool uses_pairs_v =
#if defined(__AVX512F__) && defined(__AVX512BW__)
    Vectorized && std::is_same_v<KV, bf16>;
#else
    false;
#endif

// Thread scratch uses (core/memory.hpp thread_scratch): one work item's state, a call's partials.
struct ItemScratch;
struct PartialScratch;
struct QuantRowScratch;  // int8 on the portable path: one block's rows widened to f32

// What one work item needs: the query heads [g0, g1) of KV head j (all offsets in elements).
struct Problem {
  std::int64_t H, G, dk, dv;
  std::int64_t dk_pad, dv_pad;  // padded to 16 (f32) or 32 (bf16 pairs) floats; dv_pad is the partial row stride
  float scale_log2;  // scale * log2(e): scores are kept in base 2
  bool quantized_query = false;  // int8 keys scored on VNNI against an int8 query (Precision::fast)
  bool bf16_dot = false;         // bf16 K/V: scores and P·V on vdpbf16ps (Precision::fast)
};

// Per-item state layout inside the item scratch: qs [G][dk_pad] (scaled query, zero padded),
// p [G][kBlock] (scores, then probabilities), m [G], l [G], alpha [G].
struct ItemState {
  float* qs;
  float* p;
  float* m;
  float* l;
  float* alpha;
};

#if defined(__AVX512F__) && defined(__AVX512BW__)

#if defined(__AVX512BF16__)
// x rounded to bf16 (to nearest even), as f32.
inline __m512 round_bf16_ps(__m512 x) {
  const __m256i h = reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(x));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
#endif

inline __mmask16 tail_mask(std::int64_t n) {  // lanes [0, n) of a 16-lane slice
  return static_cast<__mmask16>(n >= 16 ? 0xffffu : n <= 0 ? 0u : (1u << n) - 1u);
}

inline __m512 load16(const float* p, __mmask16 m) { return _mm512_maskz_loadu_ps(m, p); }
inline __m512 load16(const bf16* p, __mmask16 m) {
  const __m256i h = _mm256_maskz_loadu_epi16(m, p);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
inline __m512 load16(const std::int8_t* p, __mmask16 m) {
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(m, p)));
}

using simd::hmax;
using simd::hsum;

// Sums of 16 vectors, one per lane, in order (a transpose-and-add tree: 45 shuffles/adds for
// 16 dot products instead of 16 separate horizontal reductions). `add` adds lanes of the type
// the bits hold (f32 here, int32 for reduce16_epi32).
template <class Add>
inline __m512 reduce16_tree(const __m512 (&v)[16], Add add) {
  __m512 t[8], u[4];
#pragma GCC unroll 8
  for (int i = 0; i < 8; ++i) t[i] = add(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]), _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
#pragma GCC unroll 4
  for (int i = 0; i < 4; ++i)
    u[i] = add(_mm512_shuffle_ps(t[2 * i], t[2 * i + 1], 0x44), _mm512_shuffle_ps(t[2 * i], t[2 * i + 1], 0xee));
  const __m512 w0 = add(_mm512_shuffle_f32x4(u[0], u[1], 0x88), _mm512_shuffle_f32x4(u[0], u[1], 0xdd));
  const __m512 w1 = add(_mm512_shuffle_f32x4(u[2], u[3], 0x88), _mm512_shuffle_f32x4(u[2], u[3], 0xdd));
  return add(_mm512_shuffle_f32x4(w0, w1, 0x88), _mm512_shuffle_f32x4(w0, w1, 0xdd));
}
inline __m512 reduce16(const __m512 (&v)[16]) {
  return reduce16_tree(v, [](__m512 a, __m512 b) { return _mm512_add_ps(a, b); });
}

// Stores (or adds, for later slice groups) 16 scores of head g, keys [i0, i0 + 16) of the block.
inline void put_scores(const ItemState& st, std::int64_t g, int i0, __m512 sc, bool add) {
  float* dst = st.p + g * kBlock + i0;
  _mm512_storeu_ps(dst, add ? _mm512_add_ps(_mm512_loadu_ps(dst), sc) : sc);
}

// Scores of keys [0, n) of a block against heads [g0, g1), K slices [s0, s0 + NK) (16 floats
// each): per head, the query slices stay in registers and 16 keys are reduced together. Lanes
// past n reuse the last row (in bounds) and are masked out by the softmax.
template <int NK, class Rows>
inline void scores_group(const Rows& k0, int n, const ItemState& st, std::int64_t g0,
                         std::int64_t g1, std::int64_t dk, std::int64_t dk_pad, std::int64_t s0, bool add) {
  const __mmask16 last = tail_mask(dk - (s0 + NK - 1) * 16);
  for (std::int64_t g = g0; g < g1; ++g) {
    __m512 q[NK];
#pragma GCC unroll 8
    for (int s = 0; s < NK; ++s) q[s] = _mm512_loadu_ps(st.qs + g * dk_pad + (s0 + s) * 16);
    for (int i0 = 0; i0 < n; i0 += 16) {
      __m512 acc[16];
#pragma GCC unroll 16
      for (int r = 0; r < 16; ++r) {
        const auto* kr = k0(std::min(i0 + r, n - 1)) + s0 * 16;
        acc[r] = _mm512_mul_ps(q[0], load16(kr, NK == 1 ? last : __mmask16(0xffff)));
#pragma GCC unroll 8
        for (int s = 1; s < NK; ++s)
          acc[r] = _mm512_fmadd_ps(q[s], load16(kr + s * 16, s == NK - 1 ? last : __mmask16(0xffff)), acc[r]);
      }
      put_scores(st, g, i0, reduce16(acc), add);
    }
  }
}

template <class Rows>
inline void scores_block(const Rows& k0, int n, const ItemState& st, std::int64_t g0,
                         std::int64_t g1, std::int64_t dk, std::int64_t dk_pad) {
  const std::int64_t nks = dk_pad / 16;
  for (std::int64_t s0 = 0; s0 < nks; s0 += 8) {
    const bool add = s0 > 0;
    switch (std::min<std::int64_t>(8, nks - s0)) {
      case 1: scores_group<1>(k0, n, st, g0, g1, dk, dk_pad, s0, add); break;
      case 2: scores_group<2>(k0, n, st, g0, g1, dk, dk_pad, s0, add); break;
      case 3: scores_group<3>(k0, n, st, g0, g1, dk, dk_pad, s0, add); break;
      case 4: scores_group<4>(k0, n, st, g0, g1, dk, dk_pad, s0, add); break;
      case 5: scores_group<5>(k0, n, st, g0, g1, dk, dk_pad, s0, add); break;
      case 6: scores_group<6>(k0, n, st, g0, g1, dk, dk_pad, s0, add); break;
      case 7: scores_group<7>(k0, n, st, g0, g1, dk, dk_pad, s0, add); break;
      default: scores_group<8>(k0, n, st, g0, g1, dk, dk_pad, s0, add); break;
    }
  }
}

// 2^x to 8.6e-5 relative, for the `fast` paths whose probabilities are rounded next (to fp16 or
// bf16: 2^-11 or 2^-8): f = x - floor(x) in one vreduceps, a degree-3 minimax polynomial of 2^f
// on [0, 1) (constant term 1, so 2^0 = 1 exactly), and vscalefps, which floors its exponent
// itself: 5 vector uops against exp2_ps's 12, and a dependency chain half as long. No clamp:
// x = -inf (or below -150) gives exactly 0 and a NaN stays NaN. The AMX prefill kernel's softmax
// folds a power of two into the same coefficients (flash_prefill_amx.hpp).
inline constexpr float kExp2Short[4] = {1.f, 6.95116786e-01f, 2.27644991e-01f, 7.7067042e-02f};
#if defined(__AVX512DQ__)
inline __m512 exp2_short_ps(__m512 x) {
  const __m512 f = _mm512_reduce_ps(x, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
  __m512 p = _mm512_fmadd_ps(_mm512_set1_ps(kExp2Short[3]), f, _mm512_set1_ps(kExp2Short[2]));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(kExp2Short[1]));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(kExp2Short[0]));
  return _mm512_scalef_ps(p, x);
}
#endif

// 2^x for x <= 128, relative error ~1e-7; x = -inf (or anything below -160) gives exactly 0, NaN
// gives NaN (so a NaN score reaches the softmax sum and the output).
// x = n + f with n = round(x), |f| <= 1/2; 2^f = e^{f ln 2} by its degree-7 Taylor polynomial.
inline __m512 exp2_ps(__m512 x) {
  x = _mm512_max_ps(_mm512_set1_ps(-160.f), x);  // vmaxps returns its second operand for a NaN: kept
  const __m512 n = _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 t = _mm512_mul_ps(_mm512_sub_ps(x, n), _mm512_set1_ps(kLn2));
  __m512 p = _mm512_set1_ps(1.f / 5040.f);
  p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(1.f / 720.f));
  p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(1.f / 120.f));
  p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(1.f / 24.f));
  p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(1.f / 6.f));
  p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(1.f));
  p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(1.f));
  return _mm512_scalef_ps(p, n);  // p * 2^n, underflowing to 0 below the denormals
}

// Online-softmax update of head g for one block: p[g][0, n) holds base-2 scores on entry and
// probabilities 2^(score - ref) on exit, against the head's reference ref = m[g]: an integer,
// ceil(max) of the first block's scores, moved (to ceil(max) again, alpha[g] = 2^(old - new)
// then) only when a probability would pass kDecodeSlack; otherwise alpha[g] = 1. The same
// softmax as a running maximum (lse = m + log2 l either way), without a horizontal maximum
// and a scalar exp2 between a block's scores and its exponentials: in cache (T 512, G 2, one
// process alternating both versions) int8 `fast` 1.06-1.11x, int8 and bf16 1.03-1.06x, f32
// 0.99x. RoundBf16 (Precision::fast over bf16 K/V): each probability rounded to bf16, the sum
// of those. Short (the fast paths: RoundBf16, int8 under fast): exp2_short_ps instead of
// exp2_ps, within the rounding that follows.
// The slack keeps probabilities <= 8: the fp16 P·V (accumulate_heads_f16) sums 32 of them
// times int8 codes, 32 · 8 · 128 = 32768 within fp16's 65504.
inline constexpr float kDecodeSlack = 8.f;
template <bool RoundBf16 = false, bool Short = RoundBf16>
inline void softmax_block(int n, const ItemState& st, std::int64_t g) {
  static_assert(kBlock % 16 == 0);
  constexpr int NV = kBlock / 16;
  float* p = st.p + g * kBlock;
  __m512 s[NV], e[NV];
  for (int v = 0; v < NV; ++v) s[v] = _mm512_mask_loadu_ps(_mm512_set1_ps(kNegInf), tail_mask(n - 16 * v), p + 16 * v);
  const auto top = [&] {
    __m512 mx = s[0];
    for (int v = 1; v < NV; ++v) mx = _mm512_max_ps(mx, s[v]);
    return hmax(mx);
  };
  const auto exps = [&](float base) {
    const __m512 vb = _mm512_set1_ps(base);
    for (int v = 0; v < NV; ++v) {
#if defined(__AVX512DQ__)
      if constexpr (Short) e[v] = exp2_short_ps(_mm512_sub_ps(s[v], vb));
      else
#endif
        e[v] = exp2_ps(_mm512_sub_ps(s[v], vb));
#if defined(__AVX512BF16__)
      if constexpr (RoundBf16) e[v] = round_bf16_ps(e[v]);
#endif
    }
  };
  float ref = st.m[g], alpha = 1.f;
  if (ref == kNegInf) {  // the first block with a visible key: O and l are 0
    alpha = 0.f;
    const float t = top();
    ref = t == kNegInf ? kNegInf : std::ceil(t);
    exps(ref == kNegInf ? 0.f : ref);  // nothing visible yet (infinite inputs only): P = 0, or NaN for NaN
  } else {
    exps(ref);
    __m512 em = e[0];
    for (int v = 1; v < NV; ++v) em = _mm512_max_ps(em, e[v]);
    if (_mm512_cmp_ps_mask(em, _mm512_set1_ps(kDecodeSlack), _CMP_GT_OQ) != 0) {  // the maximum grew: move ref
      const float moved = std::ceil(top());
      alpha = std::exp2(ref - moved);  // a power of two (0 for moved = +inf)
      ref = moved;
      exps(ref);
    }
  }
  __m512 sum = e[0];
  for (int v = 1; v < NV; ++v) sum = _mm512_add_ps(sum, e[v]);
  for (int v = 0; v < NV; ++v) _mm512_storeu_ps(p + 16 * v, e[v]);
  st.alpha[g] = alpha;
  st.l[g] = st.l[g] * alpha + hsum(sum);
  st.m[g] = ref;
}

// o[g] = alpha[g] * o[g] + Σ_i p[g][i] v_i for V slices [s0, s0 + NV) and heads g0, g0 + 1
// (GT of them): each V slice is loaded once per key and used by both heads.
template <int NV, int GT, class Rows>
inline void accumulate_group(const Rows& v0, int n, const ItemState& st, float* o,
                             std::int64_t g0, std::int64_t dv, std::int64_t dv_pad, std::int64_t s0) {
  const __mmask16 last = tail_mask(dv - (s0 + NV - 1) * 16);
  __m512 acc[GT][NV];
#pragma GCC unroll 2
  for (int t = 0; t < GT; ++t) {
    const __m512 alpha = _mm512_set1_ps(st.alpha[g0 + t]);
#pragma GCC unroll 8
    for (int s = 0; s < NV; ++s) acc[t][s] = _mm512_mul_ps(alpha, _mm512_load_ps(o + (g0 + t) * dv_pad + (s0 + s) * 16));
  }
  for (int i = 0; i < n; ++i) {
    const auto* vr = v0(i) + s0 * 16;
    __m512 p[GT];
#pragma GCC unroll 2
    for (int t = 0; t < GT; ++t) p[t] = _mm512_set1_ps(st.p[(g0 + t) * kBlock + i]);
#pragma GCC unroll 8
    for (int s = 0; s < NV; ++s) {
      const __m512 vv = load16(vr + s * 16, s == NV - 1 ? last : __mmask16(0xffff));
#pragma GCC unroll 2
      for (int t = 0; t < GT; ++t) acc[t][s] = _mm512_fmadd_ps(p[t], vv, acc[t][s]);
    }
  }
#pragma GCC unroll 2
  for (int t = 0; t < GT; ++t)
#pragma GCC unroll 8
    for (int s = 0; s < NV; ++s) _mm512_store_ps(o + (g0 + t) * dv_pad + (s0 + s) * 16, acc[t][s]);
}

template <int GT, class Rows>
inline void accumulate_heads(const Rows& v0, int n, const ItemState& st, float* o,
                             std::int64_t g, std::int64_t dv, std::int64_t dv_pad) {
  const std::int64_t nvs = dv_pad / 16;
  for (std::int64_t s0 = 0; s0 < nvs; s0 += 8) {
    switch (std::min<std::int64_t>(8, nvs - s0)) {
      case 1: accumulate_group<1, GT>(v0, n, st, o, g, dv, dv_pad, s0); break;
      case 2: accumulate_group<2, GT>(v0, n, st, o, g, dv, dv_pad, s0); break;
      case 3: accumulate_group<3, GT>(v0, n, st, o, g, dv, dv_pad, s0); break;
      case 4: accumulate_group<4, GT>(v0, n, st, o, g, dv, dv_pad, s0); break;
      case 5: accumulate_group<5, GT>(v0, n, st, o, g, dv, dv_pad, s0); break;
      case 6: accumulate_group<6, GT>(v0, n, st, o, g, dv, dv_pad, s0); break;
      case 7: accumulate_group<7, GT>(v0, n, st, o, g, dv, dv_pad, s0); break;
      default: accumulate_group<8, GT>(v0, n, st, o, g, dv, dv_pad, s0); break;
    }
  }
}

// Calls f(std::integral_constant<int, GT>{}, g) for query heads [g0, g1) two at a time (GT = 2:
// the kernels share each K/V row's loads between the pair), then for an odd last one (GT = 1).
template <class F>
[[gnu::always_inline]] inline void for_head_pairs(std::int64_t g0, std::int64_t g1, const F& f) {
  std::int64_t g = g0;
  for (; g + 2 <= g1; g += 2) f(std::integral_constant<int, 2>{}, g);
  if (g < g1) f(std::integral_constant<int, 1>{}, g);
}

template <class Rows>
inline void accumulate_block(const Rows& v0, int n, const ItemState& st, float* o,
                             std::int64_t g0, std::int64_t g1, std::int64_t dv, std::int64_t dv_pad) {
  for_head_pairs(g0, g1, [&](auto gt, std::int64_t g) {
    accumulate_heads<decltype(gt)::value>(v0, n, st, o, g, dv, dv_pad);
  });
}

// bf16 K/V: a 64-byte load holds 32 values; shifting each 32-bit lane left by 16 widens the
// even-indexed ones and masking off the low half widens the odd-indexed ones (both exact). So
// each 32-element "pair" becomes two f32 vectors (even, odd): the query is stored permuted the
// same way (dot products do not care about order) and the V accumulators are kept permuted and
// interleaved back once per item (unpermute_pairs).
inline __mmask32 tail_mask32(std::int64_t n) {
  return static_cast<__mmask32>(n >= 32 ? 0xffffffffu : n <= 0 ? 0u : (1u << n) - 1u);
}
inline void load_pair(const bf16* p, __mmask32 m, __m512& even, __m512& odd) {
  const __m512i x = _mm512_maskz_loadu_epi16(m, p);
  even = _mm512_castsi512_ps(_mm512_slli_epi32(x, 16));
  odd = _mm512_castsi512_ps(_mm512_and_si512(x, _mm512_set1_epi32(static_cast<int>(0xffff0000u))));
}

// Pairs [p0, p0 + NP) of every key row in the block (d_k padded to 32 in qs); as scores_group.
template <int NP, class Rows>
inline void scores_group_bf16(const Rows& k0, int n, const ItemState& st, std::int64_t g0,
                              std::int64_t g1, std::int64_t dk, std::int64_t qs_pad, std::int64_t p0, bool add) {
  const __mmask32 last = tail_mask32(dk - (p0 + NP - 1) * 32);
  for (std::int64_t g = g0; g < g1; ++g) {
    __m512 q[2 * NP];
#pragma GCC unroll 8
    for (int s = 0; s < 2 * NP; ++s) q[s] = _mm512_loadu_ps(st.qs + g * qs_pad + p0 * 32 + s * 16);
    for (int i0 = 0; i0 < n; i0 += 16) {
      __m512 acc[16];
#pragma GCC unroll 16
      for (int r = 0; r < 16; ++r) {
        const auto* kr = k0(std::min(i0 + r, n - 1)) + p0 * 32;
        __m512 ev, od;
        load_pair(kr, NP == 1 ? last : __mmask32(0xffffffffu), ev, od);
        acc[r] = _mm512_fmadd_ps(q[1], od, _mm512_mul_ps(q[0], ev));
#pragma GCC unroll 4
        for (int s = 1; s < NP; ++s) {
          load_pair(kr + s * 32, s == NP - 1 ? last : __mmask32(0xffffffffu), ev, od);
          acc[r] = _mm512_fmadd_ps(q[2 * s], ev, acc[r]);
          acc[r] = _mm512_fmadd_ps(q[2 * s + 1], od, acc[r]);
        }
      }
      put_scores(st, g, i0, reduce16(acc), add);
    }
  }
}

// Lanes 0-7 of red: head g, rows i0..i0+7; lanes 8-15: head g + 1 (stored, or added for later slice groups).
inline void put_scores_pair(const ItemState& st, std::int64_t g, int i0, __m512 red, bool add) {
  float* a = st.p + g * kBlock + i0;
  float* b = st.p + (g + 1) * kBlock + i0 - 8;  // lanes 8-15
  if (add) {
    red = _mm512_mask_add_ps(red, 0x00ff, red, _mm512_maskz_loadu_ps(0x00ff, a));
    red = _mm512_mask_add_ps(red, 0xff00, red, _mm512_maskz_loadu_ps(0xff00, b));
  }
  _mm512_mask_storeu_ps(a, 0x00ff, red);
  _mm512_mask_storeu_ps(b, 0xff00, red);
}

// Heads g and g + 1 together, 8 rows at a time: each K pair is loaded and widened once for
// both heads (the widening is a third of a K row's vector work when done per head). Each
// head's products and sums are those of scores_group_bf16, in the same order (reduce16 sums
// every vector by the same tree whatever its position), so the bits do not depend on whether
// a head is computed alone or paired.
// The 8 rows are read as two halves of 4 (the query slices loaded again for the second): with
// all 8 row addresses live across the slice loop, GCC 12 ran out of general registers and sent
// 12 of the 32 loaded K vectors of a block through the stack (a 64-byte store and two reloads
// each). In one process, same bits (decode_ab, 2 threads): Intel VM in cache bf16 T 256 / 512
// 1.11x / 1.12x, paged B 8 mixed 512-8192 1.05x; AMX hosts paged mixed 1.05x / 1.05x / 1.03x,
// contiguous T 8192 1.04x.
template <int NP, class Rows>
inline void scores_pair_group_bf16(const Rows& k0, int n, const ItemState& st, std::int64_t g, std::int64_t dk,
                                   std::int64_t qs_pad, std::int64_t p0, bool add) {
  const __mmask32 last = tail_mask32(dk - (p0 + NP - 1) * 32);
  const float* qa = st.qs + g * qs_pad + p0 * 32;
  const float* qb = qa + qs_pad;
  for (int i0 = 0; i0 < n; i0 += 8) {
    __m512 acc[16];  // [r]: head g, row i0 + r; [8 + r]: head g + 1
#pragma GCC unroll 2
    for (int h = 0; h < 8; h += 4) {
      decltype(k0(0)) rows[4];
#pragma GCC unroll 4
      for (int r = 0; r < 4; ++r) rows[r] = k0(std::min(i0 + h + r, n - 1)) + p0 * 32;
#pragma GCC unroll 4
      for (int s = 0; s < NP; ++s) {
        const __mmask32 m = s == NP - 1 ? last : __mmask32(0xffffffffu);
        const __m512 ae = _mm512_loadu_ps(qa + s * 32), ao = _mm512_loadu_ps(qa + s * 32 + 16);
        const __m512 be = _mm512_loadu_ps(qb + s * 32), bo = _mm512_loadu_ps(qb + s * 32 + 16);
#pragma GCC unroll 4
        for (int r = h; r < h + 4; ++r) {
          __m512 ev, od;
          load_pair(rows[r - h] + s * 32, m, ev, od);
          if (s == 0) {
            acc[r] = _mm512_fmadd_ps(ao, od, _mm512_mul_ps(ae, ev));
            acc[8 + r] = _mm512_fmadd_ps(bo, od, _mm512_mul_ps(be, ev));
          } else {
            acc[r] = _mm512_fmadd_ps(ao, od, _mm512_fmadd_ps(ae, ev, acc[r]));
            acc[8 + r] = _mm512_fmadd_ps(bo, od, _mm512_fmadd_ps(be, ev, acc[8 + r]));
          }
        }
      }
    }
    put_scores_pair(st, g, i0, reduce16(acc), add);
  }
}

// Calls f(std::integral_constant<int, NP>{}, p0) for each group [p0, p0 + NP) of at most 4
// pairs (32 values each) of a row of np pairs: the kernels take their pair count as a template
// argument, so each group's slices stay in registers.
template <class F>
inline void for_pair_groups(std::int64_t np, const F& f) {
  for (std::int64_t p0 = 0; p0 < np; p0 += 4) {
    switch (std::min<std::int64_t>(4, np - p0)) {
      case 1: f(std::integral_constant<int, 1>{}, p0); break;
      case 2: f(std::integral_constant<int, 2>{}, p0); break;
      case 3: f(std::integral_constant<int, 3>{}, p0); break;
      default: f(std::integral_constant<int, 4>{}, p0); break;
    }
  }
}

template <class Rows>
inline void scores_block_bf16(const Rows& k0, int n, const ItemState& st, std::int64_t g0,
                              std::int64_t g1, std::int64_t dk, std::int64_t qs_pad) {
  for_pair_groups(qs_pad / 32, [&](auto np, std::int64_t p0) {
    constexpr int NP = decltype(np)::value;
    std::int64_t g = g0;
    for (; g + 2 <= g1; g += 2) scores_pair_group_bf16<NP>(k0, n, st, g, dk, qs_pad, p0, p0 > 0);
    if (g < g1) scores_group_bf16<NP>(k0, n, st, g, g1, dk, qs_pad, p0, p0 > 0);
  });
}

template <int NP, int GT, class Rows>
inline void accumulate_group_bf16(const Rows& v0, int n, const ItemState& st, float* o,
                                  std::int64_t g0, std::int64_t dv, std::int64_t dv_pad, std::int64_t p0) {
  const __mmask32 last = tail_mask32(dv - (p0 + NP - 1) * 32);
  __m512 acc[GT][2 * NP];
#pragma GCC unroll 2
  for (int t = 0; t < GT; ++t) {
    const __m512 alpha = _mm512_set1_ps(st.alpha[g0 + t]);
#pragma GCC unroll 8
    for (int s = 0; s < 2 * NP; ++s)
      acc[t][s] = _mm512_mul_ps(alpha, _mm512_load_ps(o + (g0 + t) * dv_pad + p0 * 32 + s * 16));
  }
  for (int i = 0; i < n; ++i) {
    const auto* vr = v0(i) + p0 * 32;
    __m512 p[GT];
#pragma GCC unroll 2
    for (int t = 0; t < GT; ++t) p[t] = _mm512_set1_ps(st.p[(g0 + t) * kBlock + i]);
#pragma GCC unroll 4
    for (int s = 0; s < NP; ++s) {
      __m512 ev, od;
      load_pair(vr + s * 32, s == NP - 1 ? last : __mmask32(0xffffffffu), ev, od);
#pragma GCC unroll 2
      for (int t = 0; t < GT; ++t) {
        acc[t][2 * s] = _mm512_fmadd_ps(p[t], ev, acc[t][2 * s]);
        acc[t][2 * s + 1] = _mm512_fmadd_ps(p[t], od, acc[t][2 * s + 1]);
      }
    }
  }
#pragma GCC unroll 2
  for (int t = 0; t < GT; ++t)
#pragma GCC unroll 8
    for (int s = 0; s < 2 * NP; ++s) _mm512_store_ps(o + (g0 + t) * dv_pad + p0 * 32 + s * 16, acc[t][s]);
}

template <int GT, class Rows>
inline void accumulate_heads_bf16(const Rows& v0, int n, const ItemState& st, float* o,
                                  std::int64_t g, std::int64_t dv, std::int64_t dv_pad) {
  for_pair_groups(dv_pad / 32, [&](auto np, std::int64_t p0) {
    accumulate_group_bf16<decltype(np)::value, GT>(v0, n, st, o, g, dv, dv_pad, p0);
  });
}

template <class Rows>
inline void accumulate_block_bf16(const Rows& v0, int n, const ItemState& st, float* o,
                                  std::int64_t g0, std::int64_t g1, std::int64_t dv, std::int64_t dv_pad) {
  for_head_pairs(g0, g1, [&](auto gt, std::int64_t g) {
    accumulate_heads_bf16<decltype(gt)::value>(v0, n, st, o, g, dv, dv_pad);
  });
}

// Each 32 floats of a row of dv_pad (a multiple of 32), as vectors a = [0, 16) and b = [16, 32),
// replaced by permutex2var(a, lo, b) and permutex2var(a, hi, b): the P·V kernels keep their
// accumulators in a permuted column order and put it back once per item.
inline void permute_row32(float* o, std::int64_t dv_pad, __m512i lo, __m512i hi) {
  for (std::int64_t p = 0; p < dv_pad; p += 32) {
    const __m512 a = _mm512_load_ps(o + p), b = _mm512_load_ps(o + p + 16);
    _mm512_store_ps(o + p, _mm512_permutex2var_ps(a, lo, b));
    _mm512_store_ps(o + p + 16, _mm512_permutex2var_ps(a, hi, b));
  }
}

// Row of dv_pad (a multiple of 32) floats stored as (even, odd) pairs -> natural order.
inline void unpermute_pairs(float* o, std::int64_t dv_pad) {
  permute_row32(o, dv_pad, _mm512_set_epi32(23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0),
                _mm512_set_epi32(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8));
}

// The permuted query layout of load_pair: within each 32-block, evens then odds.
inline void permute_query_pairs(float* qs, std::int64_t qs_pad) {
  alignas(64) float tmp[32];
  for (std::int64_t p = 0; p < qs_pad; p += 32) {
    for (int i = 0; i < 16; ++i) {
      tmp[i] = qs[p + 2 * i];
      tmp[16 + i] = qs[p + 2 * i + 1];
    }
    std::copy(tmp, tmp + 32, qs + p);
  }
}

// Scores of heads g, g + 1 together, 8 rows at a time, so each key slice is loaded (and, for
// int8, widened to f32) once for both heads: the widening, not the FMA, is what an int8 row costs. The 16 sums reduce to lanes 0-7 (head g, rows i0..i0+7) and 8-15 (head g + 1).
// Bit-identical to scores_group for each head: the same products in the same
// order (an FMA into 0 is the product), the same groups of 128 elements reduced and then added,
// and reduce16 sums every vector by the same tree whatever its position (put_scores_pair above).
// f32 / int8 rows: slices [s0, s1) of 16 elements.
template <class Rows>
inline void scores_pair_group(const Rows& k0, int n, const ItemState& st, std::int64_t g, std::int64_t dk,
                              std::int64_t dk_pad, std::int64_t s0, std::int64_t s1) {
  const float* qa = st.qs + g * dk_pad;
  const float* qb = qa + dk_pad;
  for (int i0 = 0; i0 < n; i0 += 8) {
    decltype(k0(0)) rows[8];
#pragma GCC unroll 8
    for (int r = 0; r < 8; ++r) rows[r] = k0(std::min(i0 + r, n - 1));
    __m512 acc[16];
#pragma GCC unroll 16
    for (int r = 0; r < 16; ++r) acc[r] = _mm512_setzero_ps();
    for (std::int64_t e = s0 * 16; e < s1 * 16; e += 16) {
      const __mmask16 m = tail_mask(dk - e);
      const __m512 a = _mm512_load_ps(qa + e), b = _mm512_load_ps(qb + e);
#pragma GCC unroll 8
      for (int r = 0; r < 8; ++r) {
        const __m512 kv = load16(rows[r] + e, m);
        acc[r] = _mm512_fmadd_ps(a, kv, acc[r]);
        acc[8 + r] = _mm512_fmadd_ps(b, kv, acc[8 + r]);
      }
    }
    put_scores_pair(st, g, i0, reduce16(acc), s0 > 0);
  }
}

// Heads in pairs, an odd one left to scores_block; groups of 8 slices as scores_block groups them
// (used for int8 keys).
template <class Rows>
inline void scores_block_paired(const Rows& k0, int n, const ItemState& st, std::int64_t g0, std::int64_t g1,
                                std::int64_t dk, std::int64_t dk_pad) {
  const std::int64_t nks = dk_pad / 16;
  std::int64_t g = g0;
  for (; g + 2 <= g1; g += 2)
    for (std::int64_t s0 = 0; s0 < nks; s0 += 8) scores_pair_group(k0, n, st, g, dk, dk_pad, s0, std::min(nks, s0 + 8));
  if (g < g1) scores_block(k0, n, st, g, g1, dk, dk_pad);
}

#if defined(__AVX512VNNI__)
#define ATTNKIT_DECODE_VNNI 1

// Precision::fast over int8 keys: each query head's scaled query qs quantised to int8 once per
// work item, codes = round(qs / scale), scale = max|qs| / 127 (a zero query: scale 0). vpdpbusd
// multiplies unsigned by signed bytes, so the key codes are read as k + 128 (one xor per 64
// codes, shared by the heads) and the query's 128 · Σ codes (bias) is subtracted from each sum:
// q·k exactly, in int32. score = (sum - bias) · scale, then · the key row's scale as before.
struct QuantQuery {
  const std::int8_t* codes;  // [G][stride] (zero padded to stride, a multiple of 64)
  std::int64_t stride;
  const float* scale;        // [G]
  const std::int32_t* bias;  // [G]
};
struct QuantQueryScratch;

inline std::int64_t round_up64(std::int64_t n) { return (n + 63) / 64 * 64; }

// One scaled query row x [dk] quantised (see QuantQuery): codes c [stride] (zero padded past
// dk), its scale and bias. sparse/key_major.hpp quantises its tiles' rows with it too.
inline void quantize_query_row(const float* x, std::int64_t dk, std::int64_t stride, std::int8_t* c, float& scale,
                               std::int32_t& bias) {
  // max |x|, 16 lanes at a time (a scalar max chain costs its latency per element); a NaN is
  // noted separately (vmaxps would skip it) and becomes the scale below.
  const __m512 abs_mask = _mm512_castsi512_ps(_mm512_set1_epi32(0x7fffffff));
  __m512 mv = _mm512_setzero_ps();
  __mmask16 nan = 0;
  for (std::int64_t e = 0; e < dk; e += 16) {
    const __m512 xe = _mm512_maskz_loadu_ps(tail_mask(dk - e), x + e);
    nan |= _mm512_cmp_ps_mask(xe, xe, _CMP_UNORD_Q);
    mv = _mm512_max_ps(_mm512_and_ps(xe, abs_mask), mv);
  }
  // A NaN in the query makes the scale NaN, so every score is NaN as on the exact path (the
  // rounding would otherwise turn it into a finite code).
  const float m = nan ? std::numeric_limits<float>::quiet_NaN() : _mm512_reduce_max_ps(mv);
  // Codes round(x · inv) to nearest even (vcvtps2dq under the default rounding mode, as
  // std::nearbyint), 16 at a time: the scalar loop called nearbyintf per element, 5 TSC cycles
  // per key row of a 512-key work item.
  const float inv = m > 0.f ? 127.f / m : 0.f;
  const __m512 vinv = _mm512_set1_ps(inv);
  __m512i vsum = _mm512_setzero_si512();
  for (std::int64_t e = 0; e < dk; e += 16) {
    const __mmask16 tm = tail_mask(dk - e);
    const __m512i ci = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_maskz_loadu_ps(tm, x + e), vinv));
    // The stored codes (low bytes) are what the sum counts: a NaN lane converts to INT_MIN,
    // whose low byte is 0. Lanes past dk hold 0.
    const __m128i c8 = _mm512_cvtepi32_epi8(ci);
    _mm_mask_storeu_epi8(c + e, tm, c8);
    vsum = _mm512_add_epi32(vsum, _mm512_cvtepi8_epi32(c8));
  }
  const std::int32_t sum = _mm512_reduce_add_epi32(vsum);
  std::fill(c + dk, c + stride, std::int8_t{0});
  scale = m / 127.f;  // inf / NaN in q: inf or NaN scores, as the exact path gives
  bias = 128 * sum;
}

// The query heads [g0, g1) of st.qs quantised (see QuantQuery), into base.
// base: G * round_up64(dk) / 4 + 2 * G floats of scratch that hold the result.
inline QuantQuery quantize_query(const ItemState& st, std::int64_t G, std::int64_t g0, std::int64_t g1, std::int64_t dk,
                                 std::int64_t dk_pad, float* base) {
  const std::int64_t stride = round_up64(dk);
  auto* codes = reinterpret_cast<std::int8_t*>(base);
  float* scale = base + G * stride / 4;
  auto* bias = reinterpret_cast<std::int32_t*>(scale + G);
  for (std::int64_t g = g0; g < g1; ++g)
    quantize_query_row(st.qs + g * dk_pad, dk, stride, codes + g * stride, scale[g], bias[g]);
  return {codes, stride, scale, bias};
}

// acc + Σ of 4 u8 · s8 products per lane: vpdpbusd, written out because GCC 12 copies the
// accumulator in and out around the intrinsic (two extra moves per instruction).
inline __m512i dpbusd(__m512i acc, __m512i u8, __m512i s8) {
  __asm__("vpdpbusd %2, %1, %0" : "+v"(acc) : "v"(u8), "v"(s8));
  return acc;
}
inline __m512i dpbusd(__m512i acc, __m512i u8, const std::int8_t* s8) {  // s8: 64 bytes from memory
  __asm__("vpdpbusd %2, %1, %0" : "+v"(acc) : "v"(u8), "m"(*reinterpret_cast<const __m512i*>(s8)));
  return acc;
}

// reduce16 on int32 lanes (the same tree; integer adds are exact).
inline __m512i reduce16_epi32(const __m512i (&v)[16]) {
  __m512 f[16];
#pragma GCC unroll 16
  for (int i = 0; i < 16; ++i) f[i] = _mm512_castsi512_ps(v[i]);
  return _mm512_castps_si512(reduce16_tree(f, [](__m512 a, __m512 b) {
    return _mm512_castsi512_ps(_mm512_add_epi32(_mm512_castps_si512(a), _mm512_castps_si512(b)));
  }));
}

// Scores of keys [0, n) for head g (NH = 1) or heads g, g + 1 (NH = 2), 8 rows at a time: lanes
// 0-7 of the reduced sums are head g's rows, lanes 8-15 head g + 1's (as put_scores_pair).
template <int NH, class Rows>
inline void scores_group_vnni(const Rows& k0, int n, const ItemState& st, std::int64_t g, std::int64_t dk,
                              const QuantQuery& qq) {
  const __m512i flip = _mm512_set1_epi8(static_cast<char>(0x80));
  const std::int8_t* qa = qq.codes + g * qq.stride;
  const std::int8_t* qb = NH == 2 ? qa + qq.stride : qa;
  const std::int64_t gb = NH == 2 ? g + 1 : g;
  const __m512i bias = _mm512_mask_blend_epi32(0xff00, _mm512_set1_epi32(qq.bias[g]), _mm512_set1_epi32(qq.bias[gb]));
  const __m512 scale = _mm512_mask_blend_ps(0xff00, _mm512_set1_ps(qq.scale[g]), _mm512_set1_ps(qq.scale[gb]));
  for (int i0 = 0; i0 < n; i0 += 8) {
    const std::int8_t* rows[8];
#pragma GCC unroll 8
    for (int r = 0; r < 8; ++r) rows[r] = k0(std::min(i0 + r, n - 1));
    __m512i acc[16];
#pragma GCC unroll 16
    for (int r = 0; r < 16; ++r) acc[r] = _mm512_setzero_si512();
    for (std::int64_t e = 0; e < dk; e += 64) {
      // Codes past dk load as 0 (read as 128) against query codes 0: they add nothing.
      const __mmask64 m = dk - e >= 64 ? ~__mmask64{0} : (__mmask64{1} << (dk - e)) - 1;
      const __m512i a = _mm512_load_si512(qa + e), b = _mm512_load_si512(qb + e);
#pragma GCC unroll 8
      for (int r = 0; r < 8; ++r) {
        const __m512i ku = _mm512_xor_si512(_mm512_maskz_loadu_epi8(m, rows[r] + e), flip);
        acc[r] = dpbusd(acc[r], ku, a);
        if constexpr (NH == 2) acc[8 + r] = dpbusd(acc[8 + r], ku, b);
      }
    }
    const __m512 sc = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(reduce16_epi32(acc), bias)), scale);
    if constexpr (NH == 2) put_scores_pair(st, g, i0, sc, false);
    else _mm512_mask_storeu_ps(st.p + g * kBlock + i0, 0x00ff, sc);
  }
}

template <class Rows>
inline void scores_block_vnni(const Rows& k0, int n, const ItemState& st, std::int64_t g0, std::int64_t g1,
                              std::int64_t dk, const QuantQuery& qq) {
  for_head_pairs(g0, g1, [&](auto gt, std::int64_t g) { scores_group_vnni<decltype(gt)::value>(k0, n, st, g, dk, qq); });
}

// Four rows' 64 codes each (r0 .. r3) interleaved into dwords for vpdpbusd, in two rounds of
// unpacks: w[m], 128-bit lane L, dword k holds the four rows' codes of column 16 L + 4 m + k.
inline void interleave_quads(__m512i r0, __m512i r1, __m512i r2, __m512i r3, __m512i (&w)[4]) {
  const __m512i a = _mm512_unpacklo_epi8(r0, r1), b = _mm512_unpackhi_epi8(r0, r1);
  const __m512i c = _mm512_unpacklo_epi8(r2, r3), d = _mm512_unpackhi_epi8(r2, r3);
  w[0] = _mm512_unpacklo_epi16(a, c);
  w[1] = _mm512_unpackhi_epi16(a, c);
  w[2] = _mm512_unpacklo_epi16(b, d);
  w[3] = _mm512_unpackhi_epi16(b, d);
}

#if defined(__AVX512FP16__)
#define ATTNKIT_DECODE_FP16_PV 1
// Precision::fast P·V over int8 values (with the VNNI scores above): each block's sums are
// taken in fp16, 32 lanes per FMA, and added to the f32 output once per block. The codes are
// exact in fp16 (|c| <= 127); the probabilities, already times their rows' value scales, are
// rounded to fp16 (11 bits). The f32 path widens 16 codes with two instructions for two FMAs:
// 15 TSC cycles per key row against 9 here (G = 2, d_v = 128). The output moves by about 5e-4
// of Σ p·|v| (mostly each probability's rounding to 11 bits), a tenth of the int8 quantisation
// error (tests/test_attention_decode.cpp states the bound against the exact path).
template <int GT, class Rows>
inline void accumulate_heads_f16(const Rows& v0, int n, const ItemState& st, float* o, std::int64_t g0,
                                 std::int64_t dv, std::int64_t dv_pad) {
  alignas(64) std::int16_t p16[GT][kBlock];  // fp16 bits
  for (int t = 0; t < GT; ++t) {
    const float* p = st.p + (g0 + t) * kBlock;
    static_assert(kBlock == 32);
    _mm256_store_si256(reinterpret_cast<__m256i*>(p16[t]), _mm256_castph_si256(_mm512_cvtxps_ph(_mm512_loadu_ps(p))));
    _mm256_store_si256(reinterpret_cast<__m256i*>(p16[t] + 16),
                       _mm256_castph_si256(_mm512_cvtxps_ph(_mm512_loadu_ps(p + 16))));
  }
  constexpr int NS = 4;  // 32-element slices per pass: 128 values, GT · 4 accumulators
  for (std::int64_t e0 = 0; e0 < dv; e0 += 32 * NS) {
    __m512h acc[GT][NS];
#pragma GCC unroll 2
    for (int t = 0; t < GT; ++t)
#pragma GCC unroll 4
      for (int s = 0; s < NS; ++s) acc[t][s] = _mm512_setzero_ph();
    __mmask32 m[NS];
#pragma GCC unroll 4
    for (int s = 0; s < NS; ++s) m[s] = tail_mask32(dv - e0 - 32 * s);
    for (int i = 0; i < n; ++i) {
      const std::int8_t* vr = v0(i) + e0;
      __m512h pb[GT];
#pragma GCC unroll 2
      for (int t = 0; t < GT; ++t) pb[t] = _mm512_castsi512_ph(_mm512_set1_epi16(p16[t][i]));
#pragma GCC unroll 4
      for (int s = 0; s < NS; ++s) {
        const __m512h x = _mm512_cvtepi16_ph(_mm512_cvtepi8_epi16(_mm256_maskz_loadu_epi8(m[s], vr + 32 * s)));
#pragma GCC unroll 2
        for (int t = 0; t < GT; ++t) acc[t][s] = _mm512_fmadd_ph(pb[t], x, acc[t][s]);
      }
    }
#pragma GCC unroll 2
    for (int t = 0; t < GT; ++t) {
      const __m512 alpha = _mm512_set1_ps(st.alpha[g0 + t]);
      float* og = o + (g0 + t) * dv_pad + e0;
#pragma GCC unroll 4
      for (int s = 0; s < NS; ++s) {
        const __m512i a = _mm512_castph_si512(acc[t][s]);
        const __m512 lo = _mm512_cvtxph_ps(_mm256_castsi256_ph(_mm512_castsi512_si256(a)));
        const __m512 hi = _mm512_cvtxph_ps(_mm256_castsi256_ph(_mm512_extracti64x4_epi64(a, 1)));
        // Lanes past d_v (masked off) stay untouched; dv_pad rounds d_v to 16 only.
        const __mmask16 ml = tail_mask(dv - e0 - 32 * s), mh = tail_mask(dv - e0 - 32 * s - 16);
        float* d = og + 32 * s;
        _mm512_mask_storeu_ps(d, ml, _mm512_fmadd_ps(alpha, _mm512_maskz_loadu_ps(ml, d), lo));
        _mm512_mask_storeu_ps(d + 16, mh, _mm512_fmadd_ps(alpha, _mm512_maskz_loadu_ps(mh, d + 16), hi));
      }
    }
  }
}

template <class Rows>
inline void accumulate_block_f16(const Rows& v0, int n, const ItemState& st, float* o, std::int64_t g0,
                                 std::int64_t g1, std::int64_t dv, std::int64_t dv_pad) {
  for_head_pairs(g0, g1, [&](auto gt, std::int64_t g) {
    accumulate_heads_f16<decltype(gt)::value>(v0, n, st, o, g, dv, dv_pad);
  });
}
#else  // no AVX512-FP16 (AMD Zen 4 and 5, Ice Lake): P·V on vpdpbusd as well
#define ATTNKIT_DECODE_VNNI_PV 1
// Precision::fast P·V over int8 values on VNNI: each head's block of probabilities (already
// times their rows' value scales, all >= 0) becomes 16-bit fixed point u = round(p / m · 65535),
// m the block's largest, split into a high and a low byte; vpdpbusd then sums 4 keys' u8 · s8
// products per int32 lane, so 4 value rows are interleaved byte by byte first (8 unpacks per 64
// columns) and each 4-key group costs 2 vpdpbusd per head and 64 columns, where the f32 path
// widens 16 codes with two instructions for every two FMAs. The unpacks leave the columns
// permuted within 128-bit lanes; one 4 x 4 transpose of lanes per 64 columns and block puts them
// back. Sums stay exact in int32 (|Σ| <= 32 · 255 · 128 per byte plane); each probability is off
// by at most m / 131070 (fp16 would be 2^-12 of itself). A block whose probabilities are not
// all finite and >= 0, or whose largest is 0 or below 1e-30 (NaN queries, caller scales that are
// negative), takes the f32 path, which gives what exact would.
template <int GT, class Rows>
inline void accumulate_heads_vnni(const Rows& v0, int n, const ItemState& st, float* o, std::int64_t g0,
                                  std::int64_t dv, std::int64_t dv_pad) {
  alignas(64) std::uint8_t hi[GT][kBlock], lo[GT][kBlock];
  float back[GT];
  static_assert(kBlock == 32);
  const __mmask16 m0 = tail_mask(n), m1 = tail_mask(n - 16);
  for (int t = 0; t < GT; ++t) {
    const float* p = st.p + (g0 + t) * kBlock;
    const __m512 a = _mm512_maskz_loadu_ps(m0, p), b = _mm512_maskz_loadu_ps(m1, p + 16);
    const __m512 zero = _mm512_setzero_ps();
    const __mmask16 bad = _mm512_cmp_ps_mask(a, zero, _CMP_NGE_UQ) | _mm512_cmp_ps_mask(b, zero, _CMP_NGE_UQ);
    const float mx = _mm512_reduce_max_ps(_mm512_max_ps(a, b));
    if (bad != 0 || !(mx >= 1e-30f && mx <= std::numeric_limits<float>::max())) {
      accumulate_heads<GT>(v0, n, st, o, g0, dv, dv_pad);
      return;
    }
    const __m512 inv = _mm512_set1_ps(65535.f / mx);
    const __m512i top = _mm512_set1_epi32(65535), byte = _mm512_set1_epi32(255);
    const __m512i ua = _mm512_min_epi32(_mm512_cvtps_epi32(_mm512_mul_ps(a, inv)), top);
    const __m512i ub = _mm512_min_epi32(_mm512_cvtps_epi32(_mm512_mul_ps(b, inv)), top);
    _mm_store_si128(reinterpret_cast<__m128i*>(hi[t]), _mm512_cvtepi32_epi8(_mm512_srli_epi32(ua, 8)));
    _mm_store_si128(reinterpret_cast<__m128i*>(hi[t] + 16), _mm512_cvtepi32_epi8(_mm512_srli_epi32(ub, 8)));
    _mm_store_si128(reinterpret_cast<__m128i*>(lo[t]), _mm512_cvtepi32_epi8(_mm512_and_si512(ua, byte)));
    _mm_store_si128(reinterpret_cast<__m128i*>(lo[t] + 16), _mm512_cvtepi32_epi8(_mm512_and_si512(ub, byte)));
    back[t] = mx / 65535.f;
  }
  // Rows past n repeat the last one (their probabilities are 0); each row looked up once.
  const int n4 = (n + 3) / 4 * 4;
  const std::int8_t* rows[kBlock];
  for (int i = 0; i < n; ++i) rows[i] = v0(i);
  for (int i = n; i < n4; ++i) rows[i] = rows[n - 1];
  for (std::int64_t e0 = 0; e0 < dv; e0 += 64) {
    const __mmask64 m = dv - e0 >= 64 ? ~__mmask64{0} : (__mmask64{1} << (dv - e0)) - 1;
    __m512i acc[GT][2][4];
#pragma GCC unroll 2
    for (int t = 0; t < GT; ++t)
#pragma GCC unroll 2
      for (int h = 0; h < 2; ++h)
#pragma GCC unroll 4
        for (int k = 0; k < 4; ++k) acc[t][h][k] = _mm512_setzero_si512();
    for (int i = 0; i < n4; i += 4) {
      __m512i w[4];
      interleave_quads(_mm512_maskz_loadu_epi8(m, rows[i] + e0), _mm512_maskz_loadu_epi8(m, rows[i + 1] + e0),
                       _mm512_maskz_loadu_epi8(m, rows[i + 2] + e0), _mm512_maskz_loadu_epi8(m, rows[i + 3] + e0), w);
#pragma GCC unroll 2
      for (int t = 0; t < GT; ++t) {
        std::int32_t ph, pl;
        std::memcpy(&ph, hi[t] + i, 4);
        std::memcpy(&pl, lo[t] + i, 4);
        const __m512i bh = _mm512_set1_epi32(ph), bl = _mm512_set1_epi32(pl);
#pragma GCC unroll 4
        for (int k = 0; k < 4; ++k) {
          acc[t][0][k] = dpbusd(acc[t][0][k], bh, w[k]);
          acc[t][1][k] = dpbusd(acc[t][1][k], bl, w[k]);
        }
      }
    }
#pragma GCC unroll 2
    for (int t = 0; t < GT; ++t) {
      __m512 f[4];
#pragma GCC unroll 4
      for (int k = 0; k < 4; ++k)
        f[k] = _mm512_cvtepi32_ps(_mm512_add_epi32(_mm512_slli_epi32(acc[t][0][k], 8), acc[t][1][k]));
      // 128-bit lane L of output vector L' = lane L' of f[L]: a 4 x 4 transpose of lanes.
      const __m512 t01l = _mm512_shuffle_f32x4(f[0], f[1], 0x44), t01h = _mm512_shuffle_f32x4(f[0], f[1], 0xee);
      const __m512 t23l = _mm512_shuffle_f32x4(f[2], f[3], 0x44), t23h = _mm512_shuffle_f32x4(f[2], f[3], 0xee);
      const __m512 out[4] = {_mm512_shuffle_f32x4(t01l, t23l, 0x88), _mm512_shuffle_f32x4(t01l, t23l, 0xdd),
                             _mm512_shuffle_f32x4(t01h, t23h, 0x88), _mm512_shuffle_f32x4(t01h, t23h, 0xdd)};
      const __m512 alpha = _mm512_set1_ps(st.alpha[g0 + t]), scale = _mm512_set1_ps(back[t]);
      float* og = o + (g0 + t) * dv_pad + e0;
#pragma GCC unroll 4
      for (int s = 0; s < 4; ++s) {
        // Lanes past d_v (masked off) stay untouched; dv_pad rounds d_v to 16 only.
        const __mmask16 ms = tail_mask(dv - e0 - 16 * s);
        if (ms == 0) break;
        float* dst = og + 16 * s;
        _mm512_mask_storeu_ps(dst, ms, _mm512_fmadd_ps(scale, out[s], _mm512_mul_ps(alpha, _mm512_maskz_loadu_ps(ms, dst))));
      }
    }
  }
}

template <class Rows>
inline void accumulate_block_vnni(const Rows& v0, int n, const ItemState& st, float* o, std::int64_t g0,
                                  std::int64_t g1, std::int64_t dv, std::int64_t dv_pad) {
  for_head_pairs(g0, g1, [&](auto gt, std::int64_t g) {
    accumulate_heads_vnni<decltype(gt)::value>(v0, n, st, o, g, dv, dv_pad);
  });
}
#endif  // AVX512-FP16
#endif  // VNNI

#if defined(__AVX512BF16__)
#define ATTNKIT_DECODE_BF16_DOT 1
// Precision::fast over bf16 K/V on AVX512-BF16: scores and P·V on vdpbf16ps, which multiplies
// 32 bf16 pairs and adds them two by two into 16 f32 lanes in one instruction, where the exact
// path widens the 32 values with two instructions and takes two FMAs (Zen 5: two vdpbf16ps a
// cycle, as many as FMAs; the widening shifts one a cycle).
// - Scores: each query head's scaled query is rounded to bf16 once per work item (stored in
//   natural order over its own f32 copy, zero padded), and the key rows are read as they are.
// - Softmax: each probability is rounded to bf16 (softmax_block<true>), so the sum l is that
//   of the weights P·V uses.
// - P·V: two value rows are interleaved 16 bits by 16 bits (vpunpcklwd / vpunpckhwd within each
//   128-bit lane) so that one vdpbf16ps against the broadcast pair (p_i, p_i+1) adds
//   p_i v_i + p_i+1 v_i+1 to each column. The columns then sit permuted within 128-bit lanes
//   (32-column group: lanes 4L + j of the low vector hold column 8L + j, of the high one
//   8L + 4 + j); unpermute_dot puts them back once per item.
// So the scores are off by the query's bf16 rounding (up to 2^-8 of each element) and the output by
// that of the probabilities; tests/test_attention_decode.cpp states the bound. vdpbf16ps
// flushes denormal inputs and results to zero.
inline __m512bh as_bh(__m512i x) { return reinterpret_cast<__m512bh>(x); }

// qs [dk_pad] f32 -> bf16 [dk_pad] in place (each 64-byte read precedes the 32-byte write
// that can overlap it).
inline void query_to_bf16(float* qs, std::int64_t dk_pad) {
  auto* out = reinterpret_cast<char*>(qs);
  for (std::int64_t e = 0; e < dk_pad; e += 16) {
    const __m256bh h = _mm512_cvtneps_pbh(_mm512_load_ps(qs + e));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + e * 2), reinterpret_cast<__m256i>(h));
  }
}
inline const char* query_bf16(const ItemState& st, std::int64_t g, std::int64_t qs_pad) {
  return reinterpret_cast<const char*>(st.qs + g * qs_pad);
}

// Scores of heads [g0, g1) one at a time, 16 rows at a time, pairs [p0, p0 + NP) of 32 values.
template <int NP, class Rows>
inline void scores_group_dot(const Rows& k0, int n, const ItemState& st, std::int64_t g0, std::int64_t g1,
                             std::int64_t dk, std::int64_t qs_pad, std::int64_t p0, bool add) {
  const __mmask32 last = tail_mask32(dk - (p0 + NP - 1) * 32);
  for (std::int64_t g = g0; g < g1; ++g) {
    const char* qg = query_bf16(st, g, qs_pad) + p0 * 64;
    __m512i q[NP];
#pragma GCC unroll 4
    for (int s = 0; s < NP; ++s) q[s] = _mm512_loadu_si512(qg + s * 64);
    for (int i0 = 0; i0 < n; i0 += 16) {
      __m512 acc[16];
#pragma GCC unroll 16
      for (int r = 0; r < 16; ++r) {
        const auto* kr = k0(std::min(i0 + r, n - 1)) + p0 * 32;
        acc[r] = _mm512_setzero_ps();
#pragma GCC unroll 4
        for (int s = 0; s < NP; ++s)
          acc[r] = _mm512_dpbf16_ps(acc[r], as_bh(q[s]),
                                    as_bh(_mm512_maskz_loadu_epi16(s == NP - 1 ? last : __mmask32(0xffffffffu), kr + s * 32)));
      }
      put_scores(st, g, i0, reduce16(acc), add);
    }
  }
}

// Heads g and g + 1 together, 8 rows at a time, each key slice loaded once for both; the same
// instructions per head as scores_group_dot, so pairing does not change the bits.
template <int NP, class Rows>
inline void scores_pair_group_dot(const Rows& k0, int n, const ItemState& st, std::int64_t g, std::int64_t dk,
                                  std::int64_t qs_pad, std::int64_t p0, bool add) {
  const __mmask32 last = tail_mask32(dk - (p0 + NP - 1) * 32);
  const char* qa = query_bf16(st, g, qs_pad) + p0 * 64;
  const char* qb = query_bf16(st, g + 1, qs_pad) + p0 * 64;
  for (int i0 = 0; i0 < n; i0 += 8) {
    decltype(k0(0)) rows[8];
#pragma GCC unroll 8
    for (int r = 0; r < 8; ++r) rows[r] = k0(std::min(i0 + r, n - 1)) + p0 * 32;
    __m512 acc[16];
#pragma GCC unroll 16
    for (int r = 0; r < 16; ++r) acc[r] = _mm512_setzero_ps();
#pragma GCC unroll 4
    for (int s = 0; s < NP; ++s) {
      const __mmask32 m = s == NP - 1 ? last : __mmask32(0xffffffffu);
      const __m512bh a = as_bh(_mm512_loadu_si512(qa + s * 64)), b = as_bh(_mm512_loadu_si512(qb + s * 64));
#pragma GCC unroll 8
      for (int r = 0; r < 8; ++r) {
        const __m512bh k = as_bh(_mm512_maskz_loadu_epi16(m, rows[r] + s * 32));
        acc[r] = _mm512_dpbf16_ps(acc[r], a, k);
        acc[8 + r] = _mm512_dpbf16_ps(acc[8 + r], b, k);
      }
    }
    put_scores_pair(st, g, i0, reduce16(acc), add);
  }
}

template <class Rows>
inline void scores_block_dot(const Rows& k0, int n, const ItemState& st, std::int64_t g0, std::int64_t g1,
                             std::int64_t dk, std::int64_t qs_pad) {
  for_pair_groups(qs_pad / 32, [&](auto np, std::int64_t p0) {
    constexpr int NP = decltype(np)::value;
    std::int64_t g = g0;
    for (; g + 2 <= g1; g += 2) scores_pair_group_dot<NP>(k0, n, st, g, dk, qs_pad, p0, p0 > 0);
    if (g < g1) scores_group_dot<NP>(k0, n, st, g, g1, dk, qs_pad, p0, p0 > 0);
  });
}

// The block's probabilities of heads g0 .. g0 + GT - 1 as bf16 pairs: pairs[t][i / 2] holds
// (p_i, p_i+1) for even i. They are bf16 values already (softmax_block<true>), and 0 past n.
template <int GT>
inline void probability_pairs(const ItemState& st, std::int64_t g0, std::uint32_t (&pairs)[GT][kBlock / 2]) {
  static_assert(kBlock == 32);
  for (int t = 0; t < GT; ++t) {
    const float* p = st.p + (g0 + t) * kBlock;
    const __m512bh h = _mm512_cvtne2ps_pbh(_mm512_loadu_ps(p + 16), _mm512_loadu_ps(p));
    _mm512_storeu_si512(pairs[t], reinterpret_cast<__m512i>(h));
  }
}

template <int NP, int GT, class Rows>
inline void accumulate_group_dot(const Rows& v0, int n, const ItemState& st, const std::uint32_t (&pairs)[GT][kBlock / 2],
                                 float* o, std::int64_t g0, std::int64_t dv, std::int64_t dv_pad, std::int64_t p0) {
  const __mmask32 last = tail_mask32(dv - (p0 + NP - 1) * 32);
  __m512 acc[GT][2 * NP];
#pragma GCC unroll 2
  for (int t = 0; t < GT; ++t) {
    const __m512 alpha = _mm512_set1_ps(st.alpha[g0 + t]);
#pragma GCC unroll 8
    for (int s = 0; s < 2 * NP; ++s)
      acc[t][s] = _mm512_mul_ps(alpha, _mm512_load_ps(o + (g0 + t) * dv_pad + p0 * 32 + s * 16));
  }
  // Rows i and i + 1 (a zero row past n: its probability is 0 and it must not be read).
  const auto step = [&](int i, const bf16* a, const bf16* b) {
    __m512bh pb[GT];
#pragma GCC unroll 2
    for (int t = 0; t < GT; ++t) pb[t] = as_bh(_mm512_set1_epi32(static_cast<int>(pairs[t][i / 2])));
#pragma GCC unroll 4
    for (int s = 0; s < NP; ++s) {
      const __mmask32 m = s == NP - 1 ? last : __mmask32(0xffffffffu);
      const __m512i va = _mm512_maskz_loadu_epi16(m, a + s * 32);
      const __m512i vb = b ? _mm512_maskz_loadu_epi16(m, b + s * 32) : _mm512_setzero_si512();
      const __m512bh lo = as_bh(_mm512_unpacklo_epi16(va, vb)), hi = as_bh(_mm512_unpackhi_epi16(va, vb));
#pragma GCC unroll 2
      for (int t = 0; t < GT; ++t) {
        acc[t][2 * s] = _mm512_dpbf16_ps(acc[t][2 * s], lo, pb[t]);
        acc[t][2 * s + 1] = _mm512_dpbf16_ps(acc[t][2 * s + 1], hi, pb[t]);
      }
    }
  };
  int i = 0;
  for (; i + 2 <= n; i += 2) {
    const bf16* a = v0(i) + p0 * 32;
    step(i, a, v0(i + 1) + p0 * 32);
  }
  if (i < n) step(i, v0(i) + p0 * 32, nullptr);
#pragma GCC unroll 2
  for (int t = 0; t < GT; ++t)
#pragma GCC unroll 8
    for (int s = 0; s < 2 * NP; ++s) _mm512_store_ps(o + (g0 + t) * dv_pad + p0 * 32 + s * 16, acc[t][s]);
}

template <int GT, class Rows>
inline void accumulate_heads_dot(const Rows& v0, int n, const ItemState& st, float* o, std::int64_t g,
                                 std::int64_t dv, std::int64_t dv_pad) {
  std::uint32_t pairs[GT][kBlock / 2];
  probability_pairs<GT>(st, g, pairs);
  for_pair_groups(dv_pad / 32, [&](auto np, std::int64_t p0) {
    accumulate_group_dot<decltype(np)::value, GT>(v0, n, st, pairs, o, g, dv, dv_pad, p0);
  });
}

template <class Rows>
inline void accumulate_block_dot(const Rows& v0, int n, const ItemState& st, float* o, std::int64_t g0,
                                 std::int64_t g1, std::int64_t dv, std::int64_t dv_pad) {
  for_head_pairs(g0, g1, [&](auto gt, std::int64_t g) {
    accumulate_heads_dot<decltype(gt)::value>(v0, n, st, o, g, dv, dv_pad);
  });
}

// Row of dv_pad (a multiple of 32) floats in accumulate_group_dot's column order -> natural order.
inline void unpermute_dot(float* o, std::int64_t dv_pad) {
  permute_row32(o, dv_pad, _mm512_set_epi32(23, 22, 21, 20, 7, 6, 5, 4, 19, 18, 17, 16, 3, 2, 1, 0),
                _mm512_set_epi32(31, 30, 29, 28, 15, 14, 13, 12, 27, 26, 25, 24, 11, 10, 9, 8));
}
#endif  // AVX512-BF16

#endif  // AVX-512

// Portable block primitives (scalar + xsimd through core/simd.hpp), same structure.
template <class Rows>
inline void scores_block_generic(const Rows& k0, int n, const ItemState& st, std::int64_t g0,
                                 std::int64_t g1, std::int64_t dk, std::int64_t dk_pad) {
  for (int i = 0; i < n; ++i)
    for (std::int64_t g = g0; g < g1; ++g) st.p[g * kBlock + i] = simd::dot(st.qs + g * dk_pad, k0(i), dk);
}

inline void softmax_block_generic(int n, const ItemState& st, std::int64_t g) {
  float* p = st.p + g * kBlock;
  float mx = kNegInf;
  for (int i = 0; i < n; ++i) mx = std::max(mx, p[i]);
  const float m_old = st.m[g];
  const float m_new = std::max(m_old, mx);
  const float base = m_new == kNegInf ? 0.f : m_new;
  float sum = 0.f;
  for (int i = 0; i < n; ++i) {
    p[i] = std::exp2(p[i] - base);
    sum += p[i];
  }
  const float alpha = m_old == kNegInf ? 0.f : std::exp2(m_old - base);
  st.alpha[g] = alpha;
  st.l[g] = st.l[g] * alpha + sum;
  st.m[g] = m_new;
}

template <class Rows>
inline void accumulate_block_generic(const Rows& v0, int n, const ItemState& st, float* o,
                                     std::int64_t g0, std::int64_t g1, std::int64_t dv, std::int64_t dv_pad) {
  for (std::int64_t g = g0; g < g1; ++g) {
    float* og = o + g * dv_pad;
    simd::scale(st.alpha[g], og, dv);
    for (int i = 0; i < n; ++i) simd::axpy(st.p[g * kBlock + i], v0(i), og, dv);
  }
}

// Rows of one KV head, as the block primitives read them: consecutive positions of a cache...
template <class KV>
struct StridedRows {
  const KV* base;
  std::int64_t stride;
  const KV* operator()(std::int64_t i) const { return base + i * stride; }
};
template <class Rows>
inline constexpr bool is_strided_rows_v = false;
template <class KV>
inline constexpr bool is_strided_rows_v<StridedRows<KV>> = true;
// ... or the positions a sparse selection lists (sparse/sparse_attention.hpp).
template <class KV>
struct GatheredRows {
  const KV* base;
  std::int64_t stride;
  const std::int32_t* idx;
  const KV* operator()(std::int64_t i) const { return base + static_cast<std::int64_t>(idx[i]) * stride; }
};
// ... or rows whose addresses were worked out beforehand (a block that spans pages of a paged cache).
// (Paged decode lists each token's row of its first KV head and reads head j at + offset.)
template <class KV>
struct PtrRows {
  const KV* const* rows;
  std::int64_t offset = 0;
  const KV* operator()(std::int64_t i) const { return rows[i] + offset; }
};

// Rows of the current block that, on each access to row i, also prefetch row i of the block
// that comes next (into L1, `lines` cache lines from its start; 0: nothing to prefetch) and,
// where `far_lines` > 0, row i of the block after it into L2. "Next" is the next block the same
// thread reads: the same head's next block here, the next head's rows of the same block in
// paged decode, whose items interleave heads. The requests are spread over the block's compute,
// one row per access: issuing a whole block's lines at once fills the load buffer and the L1
// fill buffers, so the core stalls on memory and computes afterwards instead of both at once.
// The L2 requests two blocks ahead keep more lines in flight than the L1 fill buffers allow
// (bf16 decode, T 8192, 2 threads: 22.5 -> 25 GB/s of a 34 GB/s read roofline on the 2-core VM).
// next(i) and far(i) must give an address for every i < kBlock, also past a shorter block's end:
// a prefetch never faults, and a last block's few extra requests cost less than clamping i on
// every access.
template <class Rows, class NextRows>
struct PrefetchingRows {
  Rows rows;
  NextRows next;
  int lines;
  NextRows far{};
  int far_lines = 0;
  // Always inlined: paged decode's row lists made GCC 12 call it out of line (24 call sites),
  // which clobbers every vector register around each row of the kernel loops (bf16, B 8, P 16:
  // 23.1-23.4 -> 23.5-23.7 GB/s, three alternated pairs).
  [[gnu::always_inline]] auto operator()(std::int64_t i) const {
    // Both addresses before either prefetch (int8 fast, T 8192: 21.7 -> 23.0 GB/s against
    // prefetching each as soon as it is known).
    const void* p = next(i);
    const void* f = far(i);
    prefetch_lines<3>(p, lines);
    prefetch_lines<1>(f, far_lines);
    return rows(i);
  }
};

// PrefetchingRows for strided rows (a cache's consecutive positions): the next and far blocks'
// rows sit at fixed byte offsets from the row being read, so an access costs one address and
// two prefetches from it. In cache (1 thread, T 512, G 2, int8 fast) 26.8 -> 24.7 TSC cycles a
// key row against the row lookups PrefetchingRows made (clamped to a shorter block, as they
// were then); from DRAM (T 8192, 2 threads, old and new headers alternated in one process,
// median ratio of rounds): int8 fast 1.04-1.06x (faster in 116 of 140 rounds), bf16
// 1.04-1.05x (53 of 70), f32 1.03x (12 of 20). Same bits.
template <class KV>
struct StridedPrefetchingRows {
  const KV* base;
  std::int64_t stride;
  std::ptrdiff_t near_off, far_off;  // bytes from a row to the same row of the next / far block
  int lines, far_lines;
  [[gnu::always_inline]] const KV* operator()(std::int64_t i) const {
    const KV* r = base + i * stride;
    const char* c = reinterpret_cast<const char*>(r);
    prefetch_lines<3>(c + near_off, lines);
    prefetch_lines<1>(c + far_off, far_lines);
    return r;
  }
};

// The accessor of rows `cur` that prefetches `next` (`lines` lines of each row, into L1) and
// `far` (`far_lines`, into L2): StridedPrefetchingRows for strided rows, PrefetchingRows
// otherwise.
template <class Rows>
[[gnu::always_inline]] inline auto prefetching_rows(const Rows& cur, const Rows& next, int lines, const Rows& far,
                                                    int far_lines) {
  if constexpr (is_strided_rows_v<Rows>) {
    const auto off = [&](const Rows& to) {
      return reinterpret_cast<const char*>(to.base) - reinterpret_cast<const char*>(cur.base);
    };
    using KV = std::remove_cv_t<std::remove_pointer_t<decltype(cur.base)>>;
    return StridedPrefetchingRows<KV>{cur.base, cur.stride, off(next), off(far), lines, far_lines};
  } else {
    return PrefetchingRows<Rows, Rows>{cur, next, lines, far, far_lines};
  }
}

// 64-byte lines of a row of `elems` elements.
template <class KV>
inline int row_lines(std::int64_t elems) {
  return static_cast<int>((elems * static_cast<std::int64_t>(sizeof(KV)) + 63) / 64);
}

// Whether the next block's rows are prefetched into L1 (PrefetchingRows' near lines): only
// while a block's K and V rows take at most a third of L1, so that the block being read and the
// next one fit beside the rest. f32 rows at d 128 (32 KiB a block) evicted each other before
// use: f32 T 8192, 2 threads, with / without the L1 prefetch (the L2 one kept), three
// alternated pairs: 25.9 / 25.9 / 24.7 -> 27.3 / 28.0 / 28.3 GB/s; bf16 (16 KiB a block)
// loses without it (25.9 -> 23.6).
inline constexpr std::int64_t kNearBlockBytes = 16 * 1024;
template <class KV>
inline bool near_prefetch(std::int64_t dk, std::int64_t dv) {
  return kBlock * (dk + dv) * static_cast<std::int64_t>(sizeof(KV)) <= kNearBlockBytes;
}

// Whether a head's contiguous rows (head-major decode_keys) that are prefetched into L1 a block
// ahead also get the L2 prefetch two blocks ahead. The two vendors measured opposite ways (2
// threads, T 8192 / 512, without it against with it, in-process alternation over >= 1 GiB):
// Intel Xeon (AMX device host) bf16 0.84x / 0.93x, bf16 fast 0.87x / 0.93x, int8 fast 0.87x /
// 0.92x; AMD Zen 5 bf16 1.04x / 1.11x, bf16 fast 1.07x, int8 fast 1.07x / 1.12x (its L2
// streamer follows a head's run, so the requests only cost issue slots). Rows without the near
// prefetch (f32) keep the far one, as do interleaved heads (token-major, paged), whose short runs
// the streamer does not follow (token-major bf16 on Zen 5 without it: 0.92x).
inline bool far_prefetch_beside_near() { return !cpu::is_amd(); }

// The row accessors of one step of an item that interleaves its KV heads block by block
// (token-major decode below, paged decode in attention/batched_decode.hpp): the steps are
// (block, head), each block's heads 0 .. nh - 1 in turn, and step (block at s, head jj) reads
// its rows while prefetching those of the next step into L1 (where near_prefetch allows) and
// of the one after into L2 (PrefetchingRows), so the lines arrive just before their step
// whatever the number of heads. at(bo, hj) gives the K and V rows of head hj in the block bo
// blocks on from s (a std::pair of row accessors). Past t1 there is no step: the step's own rows,
// and no lines. int8 rows keep the near prefetch alone: over pages their 2 KiB runs measured no
// faster with the far one (mixed lengths, P 16, fast: 18.8 -> 17.5-18.4 GB/s), though contiguous
// int8 decode gains from it.
template <class KV, class RowsAt>
[[gnu::always_inline]] inline auto interleaved_step_rows(std::int64_t s, std::int64_t t1, std::int64_t jj,
                                                         std::int64_t nh, std::int64_t dk, std::int64_t dv,
                                                         const RowsAt& at) {
  constexpr bool quant = std::is_same_v<KV, std::int8_t>;
  const auto own = at(0, jj);
  using KR = decltype(own.first);
  using VR = decltype(own.second);
  const KR& k0 = own.first;
  const VR& v0 = own.second;
  struct Target {
    KR k;
    VR v;
    bool valid;
  };
  const auto ahead = [&](std::int64_t by) {
    const std::int64_t bo = (jj + by) / nh, sb = s + bo * kBlock;
    if (sb >= t1) return Target{k0, v0, false};
    const auto rows = at(bo, (jj + by) % nh);
    return Target{rows.first, rows.second, true};
  };
  const Target near = ahead(1), far = ahead(2);
  const bool l1 = near_prefetch<KV>(dk, dv);
  const int kl = row_lines<KV>(dk), vl = row_lines<KV>(dv);
  return std::pair{prefetching_rows(k0, near.k, near.valid && l1 ? kl : 0, far.k, far.valid && !quant ? kl : 0),
                   prefetching_rows(v0, near.v, near.valid && l1 ? vl : 0, far.v, far.valid && !quant ? vl : 0)};
}

// Rows the next block will gather: a selection jumps around the cache, which the hardware
// prefetcher cannot follow. r(i): row i's address (GatheredRows, or a paged selection).
template <class Rows>
inline void prefetch_rows(const Rows& r, int n, std::int64_t row_elems) {
  using KV = std::remove_cv_t<std::remove_pointer_t<decltype(r(0))>>;
  const std::int64_t bytes = row_elems * static_cast<std::int64_t>(sizeof(KV));
  for (int i = 0; i < n; ++i) {
    const char* p = reinterpret_cast<const char*>(r(i));
    for (std::int64_t b = 0; b < bytes; b += 64) __builtin_prefetch(p + b, 0, 3);
  }
}

// One work item: keys [t0, t1) of KV head j for its query heads [g0, g1) (local indices within
// the group); with idx, the keys are the positions idx[t0 .. t1) instead, and with
// prefetch_gather the rows of the next block are prefetched (worth it when they come from DRAM,
// not when the caller keeps them in L2). Writes the normalised partial output o_part[g] (row
// stride dv_pad) and its lse.
// Score transform of a variant, applied to each block between the scores and the softmax update:
// no-op by default (compiled out).
// Called once per block as t(p, n, h0, g0, g1, b): p [G][kBlock] holds the base-2 scores of
// heads g0..g1 (query head h0 + g) for key rows b .. b + n.
struct NoScoreTransform {
  static constexpr bool active = false;
  void operator()(float*, int, std::int64_t, std::int64_t, std::int64_t, std::int64_t) const {}
};
// Soft-cap: s -> c2 · tanh(s / c2), c2 = cap · log2(e). simd::softcap picks its polynomial once per vector (all
// lanes small or not), so a lane's bits depend on the others in its vector: only the vectors
// holding the block's n keys are capped, their lanes past n set to 0 first. Lanes past n held
// whatever the thread's scratch last held there (or the last row's score, repeated), and a
// short block's bits then changed with the items the thread ran before (paged decode against
// attention_decode: 1 ulp, one test run in 15). The softmax masks the lanes past n.
struct SoftCapScores {
  static constexpr bool active = true;
  float c2, inv_c2;
  void operator()(float* p, int n, std::int64_t /*h0*/, std::int64_t g0, std::int64_t g1, std::int64_t /*b*/) const {
    using B = simd::fbatch<>;
    constexpr int W = static_cast<int>(B::size);
    const int end = (n + W - 1) / W * W;
    for (std::int64_t g = g0; g < g1; ++g) {
      std::fill(p + g * kBlock + n, p + g * kBlock + end, 0.f);
      for (int i = 0; i < end; i += W) {
        float* x = p + g * kBlock + i;
        simd::softcap(B::load_unaligned(x), c2, inv_c2).store_unaligned(x);
      }
    }
  }
};
// ALiBi: s -> s + slope_h · (key position - query position), slopes in base-2 units.
struct AlibiScores {
  static constexpr bool active = true;
  const float* slopes2;  // [H]
  std::int64_t q_pos, ring;
  const std::int32_t* idx;  // sparse selection: key rows are idx[b + i]
  void operator()(float* p, int n, std::int64_t h0, std::int64_t g0, std::int64_t g1, std::int64_t b) const {
    alignas(64) float dist[kBlock];
    for (int i = 0; i < kBlock; ++i) {
      const std::int64_t row = i < n ? (idx ? idx[b + i] : b + i) : q_pos;
      const std::int64_t pos = ring > 0 ? q_pos - (((q_pos - row) % ring) + ring) % ring : row;
      dist[i] = static_cast<float>(pos - q_pos);
    }
    using B = simd::fbatch<>;
    for (std::int64_t g = g0; g < g1; ++g) {
      const B sl(slopes2[h0 + g]);
      for (int i = 0; i < kBlock; i += static_cast<int>(B::size)) {
        float* x = p + g * kBlock + i;
        simd::fma(sl, B::load_aligned(dist + i), B::load_unaligned(x)).store_unaligned(x);
      }
    }
  }
};

// int8 K/V: the scales [T, H_kv] of the key and value rows (unused for float and bf16). A
// chunk_state_rows caller may pass any type with k(row, j) / v(row, j) (paged caches do).
// A Scales type may also fill a plain block's scales itself, fill_block(j, b, n, ks, vs) (rows b
// .. b + n, lanes past n repeating the last row's), returning false to leave it to the element
// loop (chunk_state_rows): a cache's scales are one run per block, copied as vectors.
struct QuantScales {
  ConstView2<float> k, v;
  bool fill_block(std::int64_t j, std::int64_t b, int n, float* ks, float* vs) const {
    if (n != kBlock || k.stride[0] != 1 || v.stride[0] != 1) return false;
    // memcpy: the element loops became 64 scalar moves (the arrays may alias).
    std::memcpy(ks, k.ptr(b, j), kBlock * sizeof(float));
    std::memcpy(vs, v.ptr(b, j), kBlock * sizeof(float));
    return true;
  }
};

// p[g][0, kBlock) *= s[0, kBlock) for heads [g0, g1). Written out in vectors: GCC unrolled the
// loop to scalar code (p and s may alias), 10 cycles per key row, a fifth of an int8 row's time.
inline void scale_rows(const ItemState& st, std::int64_t g0, std::int64_t g1, const float* s) {
#if defined(__AVX512F__)
  static_assert(kBlock == 32);
  const __m512 s0 = _mm512_loadu_ps(s), s1 = _mm512_loadu_ps(s + 16);
  for (std::int64_t g = g0; g < g1; ++g) {
    float* p = st.p + g * kBlock;
    _mm512_storeu_ps(p, _mm512_mul_ps(_mm512_loadu_ps(p), s0));
    _mm512_storeu_ps(p + 16, _mm512_mul_ps(_mm512_loadu_ps(p + 16), s1));
  }
#else
  for (std::int64_t g = g0; g < g1; ++g) {
    float* p = st.p + g * kBlock;
    for (int i = 0; i < kBlock; ++i) p[i] *= s[i];
  }
#endif
}

// The body of a work item over row accessors, for the query heads [h0, h1) of KV heads
// [j0, j1) (each KV head j serves its heads within [j·G, (j + 1)·G) ∩ [h0, h1)): for_blocks(block)
// calls block(j, kr, vr, n, b) for each KV head j and each block of n <= kBlock keys, the blocks
// of one head in order, b the block's first key (row b + i, or idx[b + i]), kr / vr row
// accessors (StridedRows, GatheredRows, PtrRows; attention/batched_decode.hpp's paged rows use
// the last). Each KV head keeps its own state, so the caller may interleave the heads block by
// block (paged decode reads a page's rows of all heads together). The arithmetic of a block
// depends only on its rows, never on the accessor or on the heads around it, so the same keys
// give the same bits however they are stored and grouped. Head j's normalised partial output
// goes to o_part + (j·G - j0·G + g)·dv_pad for its query head j·G + g, its lse likewise to
// lse_part (both indexed as if from query head j0·G).
inline constexpr std::int64_t kMaxItemHeads = 64;  // KV heads one item may interleave
template <bool Vectorized, class KV, class ScoreTransform = NoScoreTransform, class Scales, class ForBlocks>
void chunk_state_rows(const Problem& pb, ConstView2<float> q, std::int64_t j0, std::int64_t j1, std::int64_t h0,
                      std::int64_t h1, float* o_part, float* lse_part, const std::int32_t* idx,
                      const ScoreTransform& transform, const Scales& qsc, const ForBlocks& for_blocks) {
  constexpr bool quant = std::is_same_v<KV, std::int8_t>;
  const std::int64_t G = pb.G, nj = j1 - j0;
  ATTNKIT_REQUIRE(nj >= 1 && nj <= kMaxItemHeads, "attention decode: a work item of ", nj,
                  " KV heads (1 to ", kMaxItemHeads, " supported)");
  const std::int64_t per_head = round_up16(G * pb.dk_pad + G * kBlock + 3 * G);  // keeps each qs 64-byte aligned
  float* base = thread_scratch<ItemScratch>().get(nj * per_head);
  ItemState states[kMaxItemHeads];
  std::int64_t g_lo[kMaxItemHeads], g_hi[kMaxItemHeads];
  for (std::int64_t jj = 0; jj < nj; ++jj) {
    const std::int64_t j = j0 + jj;
    float* sb = base + jj * per_head;
    const ItemState st{sb, sb + G * pb.dk_pad, sb + G * (pb.dk_pad + kBlock), sb + G * (pb.dk_pad + kBlock) + G,
                       sb + G * (pb.dk_pad + kBlock) + 2 * G};
    states[jj] = st;
    const std::int64_t g0 = std::max(h0, j * G) - j * G, g1 = std::min(h1, (j + 1) * G) - j * G;
    g_lo[jj] = g0;
    g_hi[jj] = g1;
    float* oj = o_part + jj * G * pb.dv_pad;
    for (std::int64_t g = g0; g < g1; ++g) {
      const float* qr = q.ptr(j * G + g);
      float* qs = st.qs + g * pb.dk_pad;
      std::copy(qr, qr + pb.dk, qs);
      simd::scale(pb.scale_log2, qs, pb.dk);  // vectorised (a loop over qr and qs may alias)
      std::fill(qs + pb.dk, qs + pb.dk_pad, 0.f);
#if defined(ATTNKIT_DECODE_BF16_DOT)
      if (pb.bf16_dot) query_to_bf16(qs, pb.dk_pad);
      else
#endif
#if defined(__AVX512F__) && defined(__AVX512BW__)
      if constexpr (uses_pairs_v<Vectorized, KV>) permute_query_pairs(qs, pb.dk_pad);
#endif
      st.m[g] = kNegInf;
      st.l[g] = 0.f;
      std::fill(oj + g * pb.dv_pad, oj + (g + 1) * pb.dv_pad, 0.f);
    }
  }
  // int8: the block's key and value scales; lanes past n repeat the last row's (those lanes'
  // scores come from the last row too and are masked out by the softmax).
  alignas(64) float ksb[kBlock], vsb[kBlock];
  const auto fill_scales = [&](std::int64_t j, std::int64_t b, int n) {
    // The element loop costs 3 TSC cycles per key row of an int8 cache: the Scales type's own
    // block fill first where it has one.
    if constexpr (requires { qsc.fill_block(j, b, n, ksb, vsb); })
      if (idx == nullptr && qsc.fill_block(j, b, n, ksb, vsb)) return;
    for (int i = 0; i < kBlock; ++i) {
      const std::int64_t r = b + std::min(i, n - 1), row = idx ? idx[r] : r;
      ksb[i] = qsc.k(row, j);
      vsb[i] = qsc.v(row, j);
    }
  };
#if defined(ATTNKIT_DECODE_VNNI)
  QuantQuery qqs[quant && Vectorized ? kMaxItemHeads : 1]{};
  if constexpr (quant && Vectorized)
    if (pb.quantized_query) {
      const std::int64_t per_query = round_up16(G * round_up64(pb.dk) / 4 + 2 * G);  // codes stay 64-byte aligned
      float* qbase = thread_scratch<QuantQueryScratch>().get(nj * per_query);
      for (std::int64_t jj = 0; jj < nj; ++jj)
        qqs[jj] = quantize_query(states[jj], G, g_lo[jj], g_hi[jj], pb.dk, pb.dk_pad, qbase + jj * per_query);
    }
#endif
  auto block = [&](std::int64_t j, const auto& kr, const auto& vr, int n, std::int64_t b) {
    const std::int64_t jj = j - j0;
    const ItemState& st = states[jj];
    const std::int64_t g0 = g_lo[jj], g1 = g_hi[jj];
    float* oj = o_part + jj * G * pb.dv_pad;
    // Key rows of the block at b: b + i, or idx[b + i] (the transform's positions).
    const auto transform_block = [&] {
      if constexpr (ScoreTransform::active) transform(st.p, n, j * G, g0, g1, b);
    };
#if defined(__AVX512F__) && defined(__AVX512BW__)
    if constexpr (quant && Vectorized) {
      fill_scales(j, b, n);
#if defined(ATTNKIT_DECODE_VNNI)
      if (pb.quantized_query) scores_block_vnni(kr, n, st, g0, g1, pb.dk, qqs[jj]);
      else
#endif
        scores_block_paired(kr, n, st, g0, g1, pb.dk, pb.dk_pad);
      scale_rows(st, g0, g1, ksb);
      transform_block();
      if (pb.quantized_query)  // fast: the probabilities are rounded to 11 or 16 bits next
        for (std::int64_t g = g0; g < g1; ++g) softmax_block<false, true>(n, st, g);
      else
        for (std::int64_t g = g0; g < g1; ++g) softmax_block(n, st, g);
      scale_rows(st, g0, g1, vsb);
#if defined(ATTNKIT_DECODE_FP16_PV)
      if (pb.quantized_query) accumulate_block_f16(vr, n, st, oj, g0, g1, pb.dv, pb.dv_pad);
      else
#elif defined(ATTNKIT_DECODE_VNNI_PV)
      if (pb.quantized_query) accumulate_block_vnni(vr, n, st, oj, g0, g1, pb.dv, pb.dv_pad);
      else
#endif
        accumulate_block(vr, n, st, oj, g0, g1, pb.dv, pb.dv_pad);
      return;
    } else if constexpr (uses_pairs_v<Vectorized, KV>) {
#if defined(ATTNKIT_DECODE_BF16_DOT)
      if (pb.bf16_dot) {
        scores_block_dot(kr, n, st, g0, g1, pb.dk, pb.dk_pad);
        transform_block();
        for (std::int64_t g = g0; g < g1; ++g) softmax_block<true>(n, st, g);
        accumulate_block_dot(vr, n, st, oj, g0, g1, pb.dv, pb.dv_pad);
        return;
      }
#endif
      scores_block_bf16(kr, n, st, g0, g1, pb.dk, pb.dk_pad);
      transform_block();
      for (std::int64_t g = g0; g < g1; ++g) softmax_block(n, st, g);
      accumulate_block_bf16(vr, n, st, oj, g0, g1, pb.dv, pb.dv_pad);
      return;
    } else if constexpr (Vectorized) {
      scores_block(kr, n, st, g0, g1, pb.dk, pb.dk_pad);
      transform_block();
      for (std::int64_t g = g0; g < g1; ++g) softmax_block(n, st, g);
      accumulate_block(vr, n, st, oj, g0, g1, pb.dv, pb.dv_pad);
      return;
    }
#endif
    if constexpr (quant) {  // portable: the block's rows widened to f32 first
      fill_scales(j, b, n);
      float* kf = thread_scratch<QuantRowScratch>().get(kBlock * (pb.dk + pb.dv));
      float* vf = kf + kBlock * pb.dk;
      for (int i = 0; i < n; ++i) {
        std::copy(kr(i), kr(i) + pb.dk, kf + i * pb.dk);
        std::copy(vr(i), vr(i) + pb.dv, vf + i * pb.dv);
      }
      scores_block_generic(StridedRows<float>{kf, pb.dk}, n, st, g0, g1, pb.dk, pb.dk_pad);
      scale_rows(st, g0, g1, ksb);
      transform_block();
      for (std::int64_t g = g0; g < g1; ++g) softmax_block_generic(n, st, g);
      scale_rows(st, g0, g1, vsb);
      accumulate_block_generic(StridedRows<float>{vf, pb.dv}, n, st, oj, g0, g1, pb.dv, pb.dv_pad);
    } else {
      scores_block_generic(kr, n, st, g0, g1, pb.dk, pb.dk_pad);
      transform_block();
      for (std::int64_t g = g0; g < g1; ++g) softmax_block_generic(n, st, g);
      accumulate_block_generic(vr, n, st, oj, g0, g1, pb.dv, pb.dv_pad);
    }
  };
  for_blocks(block);
  for (std::int64_t jj = 0; jj < nj; ++jj) {
    const ItemState& st = states[jj];
    for (std::int64_t g = g_lo[jj]; g < g_hi[jj]; ++g) {
      const float l = st.l[g];
      float* og = o_part + (jj * G + g) * pb.dv_pad;
#if defined(ATTNKIT_DECODE_BF16_DOT)
      if (pb.bf16_dot) unpermute_dot(og, pb.dv_pad);
      else
#endif
#if defined(__AVX512F__) && defined(__AVX512BW__)
      if constexpr (uses_pairs_v<Vectorized, KV>) unpermute_pairs(og, pb.dv_pad);
#endif
      if (l > 0.f || std::isnan(l)) {  // NaN (a NaN among the inputs) goes on to the output
        simd::scale(1.f / l, og, pb.dv);
        lse_part[jj * G + g] = (st.m[g] + std::log2(l)) * kLn2;
      } else {
        std::fill(og, og + pb.dv, 0.f);
        lse_part[jj * G + g] = kNegInf;
      }
    }
  }
}

// A work item's keys: positions [t0, t1) of KV head j (j < 0: no item).
struct ItemKeys {
  std::int64_t j = -1, t0 = 0, t1 = 0;
};

// One work item over a strided K/V (or the rows idx lists): see chunk_state_rows. `after`: the
// thread's next item, whose first blocks the prefetches of this item's last blocks run into.
template <bool Vectorized, class KV, class ScoreTransform = NoScoreTransform>
void chunk_state(const Problem& pb, ConstView2<float> q, ConstView3<KV> k, ConstView3<KV> v, std::int64_t j,
                 std::int64_t g0, std::int64_t g1, std::int64_t t0, std::int64_t t1, float* o_part, float* lse_part,
                 const std::int32_t* idx = nullptr, bool prefetch_gather = true, const ScoreTransform& transform = {},
                 const QuantScales& qsc = {}, ItemKeys after = {}) {
  const std::int64_t ks = k.stride[0], vs = v.stride[0];
  // Block m of the rows this thread reads from t0 on: this item's blocks, then the next item's
  // (n = 0: none; the pointers then stay valid and are not read).
  struct Ahead {
    const KV *k, *v;
    std::int64_t n;
  };
  const std::int64_t item_blocks = (t1 - t0 + kBlock - 1) / kBlock;
  const bool near = near_prefetch<KV>(pb.dk, pb.dv);
  const bool far = !near || far_prefetch_beside_near();
  const int kl = row_lines<KV>(pb.dk), vl = row_lines<KV>(pb.dv);
  const auto ahead = [&](std::int64_t m) -> Ahead {
    std::int64_t hj = j, s = t0 + m * kBlock, e = t1;
    if (m >= item_blocks) {
      if (after.j < 0) return {k.ptr(t0, j), v.ptr(t0, j), 0};
      hj = after.j, s = after.t0 + (m - item_blocks) * kBlock, e = after.t1;
      if (s >= e) return {k.ptr(t0, j), v.ptr(t0, j), 0};
    }
    return {k.ptr(s, hj), v.ptr(s, hj), std::min<std::int64_t>(kBlock, e - s)};
  };
  chunk_state_rows<Vectorized, KV>(pb, q, j, j + 1, j * pb.G + g0, j * pb.G + g1, o_part, lse_part, idx, transform, qsc,
                                   [&](const auto& block) {
    for (std::int64_t b = t0; b < t1; b += kBlock) {
      const int n = static_cast<int>(std::min<std::int64_t>(kBlock, t1 - b));
      if (idx == nullptr) {
        // The next block's rows are prefetched a row per access into L1 and the one after into
        // L2 where far_prefetch_beside_near() says so (PrefetchingRows): the hardware prefetcher
        // alone leaves the core waiting for memory
        // at each block. Past t1 they run on into the thread's next item (with a static
        // contiguous schedule usually the same head's next chunk, so one stream continues).
        const std::int64_t bi = (b - t0) / kBlock;
        const Ahead nx = ahead(bi + 1), fr = ahead(bi + 2);
        using R = StridedRows<KV>;
        const bool nr = nx.n > 0 && near;
        const bool fa = fr.n > 0 && far;
        block(j, prefetching_rows(R{k.ptr(b, j), ks}, R{nx.k, ks}, nr ? kl : 0, R{fr.k, ks}, fa ? kl : 0),
              prefetching_rows(R{v.ptr(b, j), vs}, R{nx.v, vs}, nr ? vl : 0, R{fr.v, vs}, fa ? vl : 0), n, b);
      } else {
        const GatheredRows<KV> kr{k.ptr(0, j), ks, idx + b}, vr{v.ptr(0, j), vs, idx + b};
        if (prefetch_gather && b + kBlock < t1) {
          const int nn = static_cast<int>(std::min<std::int64_t>(kBlock, t1 - b - kBlock));
          prefetch_rows(GatheredRows<KV>{kr.base, ks, idx + b + kBlock}, nn, pb.dk);
          prefetch_rows(GatheredRows<KV>{vr.base, vs, idx + b + kBlock}, nn, pb.dv);
        }
        block(j, kr, vr, n, b);
      }
    }
  });
}

// KV heads per work item where items interleave heads (token-major and paged decode): as few
// groups per chunk as give every thread an equal count of items, or at least 4 each (a thread
// with one item more waits no longer than a quarter). Bf16, T 1536 (3 chunks), 2 threads: 2
// groups against 3 (the former rule, 4 items per thread) 20.0 -> 22.9 GB/s; at T 512 (1 chunk:
// 2 groups of 4 heads against 8 of 1) 20.5-21.1 -> 20.8-22.2.
inline std::int64_t heads_per_item(std::int64_t n_chunks, std::int64_t n_heads, std::int64_t threads) {
  std::int64_t groups = 1;
  for (; groups < n_heads; ++groups) {
    const std::int64_t items = n_chunks * groups;
    if (items >= threads && (items % threads == 0 || items >= 4 * threads)) break;
  }
  return std::min<std::int64_t>((n_heads + groups - 1) / groups, kMaxItemHeads);
}

// One work item over token-major K/V (a token's KV heads adjacent: [T, H_kv, d] as an engine
// stores it, not KVCache's head-major layout): keys [t0, t1) of KV heads [j0, j1), read block by
// block, each block's rows of every head in turn (chunk_state_rows lets an item interleave its
// heads). One head alone would read a few lines of every token's run, a pattern the hardware
// prefetchers follow badly; a block of all heads is one contiguous run. The steps (block, head)
// prefetch the next step's rows into L1 and the one after into L2 (PrefetchingRows), as paged
// decode does. Each head keeps its own state and every block's arithmetic depends only on its
// rows, so the bits equal chunk_state's, head by head.
template <bool Vectorized, class KV, class ScoreTransform = NoScoreTransform>
void chunk_state_heads(const Problem& pb, ConstView2<float> q, ConstView3<KV> k, ConstView3<KV> v, std::int64_t j0,
                       std::int64_t j1, std::int64_t h0, std::int64_t h1, std::int64_t t0, std::int64_t t1,
                       float* o_part, float* lse_part, const ScoreTransform& transform, const QuantScales& qsc) {
  const std::int64_t ks = k.stride[0], vs = v.stride[0], nh = j1 - j0;
  chunk_state_rows<Vectorized, KV>(pb, q, j0, j1, h0, h1, o_part, lse_part, nullptr, transform, qsc,
                                   [&](const auto& block) {
    for (std::int64_t s = t0; s < t1; s += kBlock) {
      const int n = static_cast<int>(std::min<std::int64_t>(kBlock, t1 - s));
      for (std::int64_t jj = 0; jj < nh; ++jj) {
        const auto [kr, vr] = interleaved_step_rows<KV>(s, t1, jj, nh, pb.dk, pb.dv, [&](std::int64_t bo, std::int64_t hj) {
          const std::int64_t sb = s + bo * kBlock;
          return std::pair{StridedRows<KV>{k.ptr(sb, j0 + hj), ks}, StridedRows<KV>{v.ptr(sb, j0 + hj), vs}};
        });
        block(j0 + jj, kr, vr, n, s);
      }
    }
  });
}

template <class KV>
void validate(ConstView2<float> q, ConstView3<KV> k, ConstView3<KV> v, View2<float> out, const DecodeOptions& opt,
              View1<float> lse) {
  constexpr const char* fn = "attention_decode";
  check_view(q, fn, "q");
  check_view(k, fn, "k");
  check_view(v, fn, "v");
  check_view(out, fn, "out");
  const std::int64_t H = q.shape[0], dk = q.shape[1];
  const std::int64_t T = k.shape[0], H_kv = k.shape[1];
  ATTNKIT_REQUIRE(dk >= 1, fn, ": argument 'q': head dimension d_k must be >= 1, got shape ", shape_string(q));
  ATTNKIT_REQUIRE(H_kv >= 1, fn, ": argument 'k': number of KV heads H_kv must be >= 1, got shape ", shape_string(k));
  ATTNKIT_REQUIRE(k.shape[2] == dk, fn, ": argument 'k': head dimension d_k = ", k.shape[2],
                  " differs from the query's d_k = ", dk);
  ATTNKIT_REQUIRE(v.shape[0] == T, fn, ": argument 'v': has ", v.shape[0], " keys (T_kv) but 'k' has ", T);
  ATTNKIT_REQUIRE(v.shape[1] == H_kv, fn, ": argument 'v': has ", v.shape[1], " KV heads but 'k' has ", H_kv);
  ATTNKIT_REQUIRE(v.shape[2] >= 1, fn, ": argument 'v': head dimension d_v must be >= 1, got shape ", shape_string(v));
  ATTNKIT_REQUIRE(H % H_kv == 0, fn, ": argument 'q': number of query heads H = ", H,
                  " is not a multiple of the number of KV heads H_kv = ", H_kv);
  ATTNKIT_REQUIRE(out.shape[0] == H && out.shape[1] == v.shape[2], fn, ": argument 'out': shape ", shape_string(out),
                  " must be [H, d_v] = [", H, ", ", v.shape[2], "]");
  if (!lse.empty()) {
    check_view(lse, fn, "lse");
    ATTNKIT_REQUIRE(lse.shape[0] == H, fn, ": argument 'lse': shape ", shape_string(lse), " must be [H] = [", H, "]");
  }
  const std::int64_t hb = opt.heads.begin, he = opt.heads.resolve_end(H);
  ATTNKIT_REQUIRE(hb >= 0 && hb <= he && he <= H, fn, ": argument 'opt.heads': range [", opt.heads.begin, ", ",
                  opt.heads.end, ") is not within [0, H = ", H, "]");
  ATTNKIT_REQUIRE(opt.kv_chunk >= 0, fn, ": argument 'opt.kv_chunk': must be >= 0 (0 = default), got ", opt.kv_chunk);
  ATTNKIT_REQUIRE(opt.num_threads >= 0, fn, ": argument 'opt.num_threads': must be >= 0 (0 = default), got ",
                  opt.num_threads);
  ATTNKIT_REQUIRE(opt.q_position >= -1, fn, ": argument 'opt.q_position': must be -1 (default) or >= 0, got ",
                  opt.q_position);
  ATTNKIT_REQUIRE(opt.ring >= 0, fn, ": argument 'opt.ring': must be >= 0 (0 = no ring), got ", opt.ring);
  ATTNKIT_REQUIRE(opt.ring == 0 || T <= opt.ring, fn, ": argument 'opt.ring': a ring of ", opt.ring,
                  " slots cannot hold T_kv = ", T, " keys");
}

// Whether int8 keys are scored against an int8 query (Precision::fast on a VNNI build).
template <bool Vectorized, class KV>
inline bool quantized_query(const DecodeOptions& opt) {
#if defined(ATTNKIT_DECODE_VNNI)
  return Vectorized && std::is_same_v<KV, std::int8_t> && opt.precision == Precision::fast;
#else
  (void)opt;
  return false;
#endif
}

// Whether vdpbf16ps pays over widening on this CPU. AMD's cores issue it as often as an FMA
// (Zen 5: two a cycle) for twice the products; Intel's AVX512-BF16 cores one every two cycles,
// and there the fast path measured slower (Xeon with AMX, 2026-12-02, exact and fast alternated
// in one process, 2 threads: T 512 0.96x, faster in 0 of 10 rounds; T 8192 0.97x, 1 of 6), so
// fast keeps the exact kernel there. bf16_dot_override() = 1 or 0 forces the choice (the tests
// check the vdpbf16ps path on any build that has it); -1, the default, asks the CPU.
inline std::atomic<int>& bf16_dot_override() {
  static std::atomic<int> mode{-1};
  return mode;
}
inline bool bf16_dot_pays() {
  const int mode = bf16_dot_override().load(std::memory_order_relaxed);
  return mode >= 0 ? mode != 0 : cpu::is_amd();
}

// Whether bf16 K/V are scored and summed on vdpbf16ps (Precision::fast on an AVX512-BF16 build,
// where that pays).
template <bool Vectorized, class KV>
inline bool bf16_dot(const DecodeOptions& opt) {
#if defined(ATTNKIT_DECODE_BF16_DOT)
  return Vectorized && std::is_same_v<KV, bf16> && opt.precision == Precision::fast && bf16_dot_pays();
#else
  (void)opt;
  return false;
#endif
}

// A call's Problem: rows padded for the path KV takes, the fast paths opt.precision selects.
template <bool Vectorized, class KV>
inline Problem make_problem(std::int64_t H, std::int64_t G, std::int64_t dk, std::int64_t dv, const DecodeOptions& opt) {
  constexpr bool pairs = uses_pairs_v<Vectorized, KV>;
  return Problem{H, G, dk, dv, pairs ? round_up32(dk) : round_up16(dk), pairs ? round_up32(dv) : round_up16(dv),
                 resolve_scale(opt.scale, dk) * kLog2e, quantized_query<Vectorized, KV>(opt),
                 bf16_dot<Vectorized, KV>(opt)};
}

// What a variant (attention/variant.hpp) does around the chunks, shared by attention_decode and
// the paged kernels (attention/batched_decode.hpp):
// q̃ = q · M for one query head (QueryMetric), into dst [d_k]: up to 8 vectors of columns summed
// in registers over the rows of M (the same fused sums, in the same order, as an axpy per row of
// M, without storing and reloading q̃ for each: 8 x 16 Qwen3-0.6B heads 0.2 -> 0.05 ms a call).
template <class Var>
inline void metric_row(const Var& var, const float* q, float* dst, std::int64_t dk) {
  using Bt = simd::fbatch<>;
  constexpr std::int64_t W = static_cast<std::int64_t>(Bt::size), NB = 8;
  std::int64_t c = 0;
  while (c + W <= dk) {
    const std::int64_t nb = std::min<std::int64_t>(NB, (dk - c) / W);
    Bt acc[NB];
    for (std::int64_t j = 0; j < nb; ++j) acc[j] = Bt(0.f);
    for (std::int64_t d = 0; d < dk; ++d) {
      const Bt a(q[d]);
      const float* m = var.query.M.ptr(d) + c;
      for (std::int64_t j = 0; j < nb; ++j) acc[j] = simd::fma(a, Bt::load_unaligned(m + j * W), acc[j]);
    }
    for (std::int64_t j = 0; j < nb; ++j) acc[j].store_unaligned(dst + c + j * W);
    c += nb * W;
  }
  for (; c < dk; ++c) {  // columns past the last whole vector
    float s = 0.f;
    for (std::int64_t d = 0; d < dk; ++d) s += q[d] * var.query.M.ptr(d)[c];
    dst[c] = s;
  }
}
// q̃ for `rows` query heads (row i: q(i) -> dst(i)), on `threads` where the products are big
// enough to pay for a fork.
template <class Var, class QRow, class DstRow>
inline void metric_rows(const Var& var, std::int64_t rows, const QRow& q, const DstRow& dst, std::int64_t dk,
                        int threads) {
  parallel_for(rows, rows * dk * dk >= (std::int64_t{1} << 17) ? threads : 1,
               [&](std::int64_t i) { metric_row(var, q(i), dst(i), dk); });
}
// ALiBi's slopes in base-2 units (the kernel's scores are base 2); empty without ALiBi.
template <class Var>
inline std::vector<float> alibi_slopes2(const Var& var, std::int64_t H) {
  std::vector<float> s;
  if constexpr (Var::has_alibi)
    for (std::int64_t h = 0; h < H; ++h) s.push_back(var.logits.slopes[h] * kLog2e);
  return s;
}
// The block transform of the variant's logits policy for a query at position q_pos (key row s at
// position s, idx[s] for a selection, or a ring's slot as DecodeOptions::ring says).
template <class Var>
inline auto score_transform(const Var& var, const std::vector<float>& slopes2, std::int64_t q_pos, std::int64_t ring,
                            const std::int32_t* idx) {
  if constexpr (Var::has_softcap) return SoftCapScores{var.logits.cap * kLog2e, 1.f / (var.logits.cap * kLog2e)};
  else if constexpr (Var::has_alibi) return AlibiScores{slopes2.data(), q_pos, ring, idx};
  else return NoScoreTransform{};
}
// The merged state (o, l) of query head h of query row `row` made final: the sink joins the
// denominator, then the output scale of (row, h).
template <class Var>
inline void finish_variant_head(const Var& var, float* o, float& l, std::int64_t dv, std::int64_t row, std::int64_t h) {
  if constexpr (Var::has_sink) apply_sink(o, l, var.sink.logits[h], dv);
  if constexpr (Var::has_output) simd::scale(var.output.scale(row, h), o, dv);
}

// The work of a validated call over T keys: positions 0 .. T-1 of k/v, or with idx the
// positions idx[0 .. T) (a sparse selection).
// int8 K/V: qsc holds their scales.
template <bool Vectorized, class KV, class Var = PlainAttention>
void decode_keys(ConstView2<float> q, ConstView3<KV> k, ConstView3<KV> v, View2<float> out, const DecodeOptions& opt,
                 View1<float> lse, std::int64_t T, const std::int32_t* idx, const Var& var = {},
                 const QuantScales& qsc = {}) {
  const std::int64_t H = q.shape[0], dk = q.shape[1], H_kv = k.shape[1], dv = v.shape[2];
  const std::int64_t G = H / H_kv;
  const std::int64_t hb = opt.heads.begin, he = opt.heads.resolve_end(H);
  if (hb == he) return;
  const bool want_lse = !lse.empty();
  const auto finish = [&](std::int64_t h, float* o, float l) {
    finish_variant_head(var, o, l, dv, 0, h);
    if (want_lse) lse(h) = l;
  };
  if (T == 0) {
    for (std::int64_t h = hb; h < he; ++h) {
      std::fill(out.ptr(h), out.ptr(h) + dv, 0.f);
      finish(h, out.ptr(h), kNegInf);
    }
    return;
  }
  // Tuneable's metric: q̃ = q · M once per call, not once per chunk.
  std::vector<float> q_metric;
  if constexpr (Var::has_query) {
    q_metric.assign(static_cast<std::size_t>(H * dk), 0.f);
    metric_rows(var, he - hb, [&](std::int64_t i) { return q.ptr(hb + i); },
                [&](std::int64_t i) { return q_metric.data() + (hb + i) * dk; }, dk, opt.num_threads);
    q = ConstView2<float>(q_metric.data(), {H, dk});
  }
  const Problem pb = make_problem<Vectorized, KV>(H, G, dk, dv, opt);
  const std::int64_t chunk = opt.kv_chunk > 0 ? opt.kv_chunk : kDefaultChunk;
  const std::int64_t n_chunks = (T + chunk - 1) / chunk;
  const std::int64_t j_begin = hb / G, j_end = (he - 1) / G + 1;
  const std::int64_t n_items = (j_end - j_begin) * n_chunks;

  // Partial states: o [n_chunks][H][dv_pad] then lse [n_chunks][H] (only active heads written).
  float* part = thread_scratch<PartialScratch>().get(n_chunks * H * (pb.dv_pad + 1));
  float* part_lse = part + n_chunks * H * pb.dv_pad;

  const std::vector<float> slopes2 = alibi_slopes2(var, H);
  const auto transform = score_transform(var, slopes2, opt.q_position >= 0 ? opt.q_position : T - 1, opt.ring, idx);
  // Each thread takes a contiguous run of items (a head's chunks in order), so its reads form
  // one stream that the prefetches follow from item to item (chunk_state's `after`). Handing items out
  // dynamically interleaves the threads' chunks, and each item's start then waits on memory. A
  // thread done with its run takes items from the back of the other's (parallel_stealing), so
  // neither streams alone at the end of a call when the cores' speeds differ.
  const auto item_keys = [&](std::int64_t item) {
    const std::int64_t c = item % n_chunks;
    return ItemKeys{j_begin + item / n_chunks, c * chunk, std::min(T, c * chunk + chunk)};
  };
  // Token-major K/V (see chunk_state_heads): items of (chunk, group of KV heads)
  // (heads_per_item); any thread may take any item (the groups never change a bit).
  if (idx == nullptr && j_end - j_begin > 1 && k.stride[1] < k.stride[0] && v.stride[1] < v.stride[0]) {
    const std::int64_t per_group = heads_per_item(n_chunks, j_end - j_begin, resolve_threads(opt.num_threads));
    const std::int64_t groups = (j_end - j_begin + per_group - 1) / per_group;
    parallel_for(n_chunks * groups, opt.num_threads, [&](std::int64_t item) {
      ATTNKIT_FAULT_POINT("decode");
      const std::int64_t c = item / groups, ja = j_begin + item % groups * per_group;
      const std::int64_t jb = std::min(j_end, ja + per_group);
      chunk_state_heads<Vectorized>(pb, q, k, v, ja, jb, hb, he, c * chunk, std::min(T, c * chunk + chunk),
                                    part + (c * H + ja * G) * pb.dv_pad, part_lse + c * H + ja * G, transform, qsc);
    }, /*dynamic=*/true);
  } else
  parallel_stealing(n_items, opt.num_threads, [&](std::int64_t item, std::int64_t next) {
    ATTNKIT_FAULT_POINT("decode");
    const ItemKeys it = item_keys(item);
    const std::int64_t j = it.j, c = item % n_chunks;
    const std::int64_t g0 = std::max(hb, j * G) - j * G, g1 = std::min(he, (j + 1) * G) - j * G;
    chunk_state<Vectorized>(pb, q, k, v, j, g0, g1, it.t0, it.t1, part + (c * H + j * G) * pb.dv_pad,
                            part_lse + c * H + j * G, idx, true, transform, qsc,
                            next >= 0 && idx == nullptr ? item_keys(next) : ItemKeys{});
  });

  // Merge the chunk states of each head in chunk order (fixed, so bits do not depend on threads).
  // A small merge stays on the caller's thread: a second fork/join would cost more than it saves.
  const int merge_threads = n_chunks * (he - hb) * dv >= (std::int64_t{1} << 16) ? opt.num_threads : 1;
  parallel_for(he - hb, merge_threads, [&](std::int64_t i) {
    ATTNKIT_FAULT_POINT("decode");
    const std::int64_t h = hb + i;
    float* o = out.ptr(h);
    std::copy(part + h * pb.dv_pad, part + h * pb.dv_pad + dv, o);
    float l = part_lse[h];
    for (std::int64_t c = 1; c < n_chunks; ++c)
      merge_state_inplace(o, l, part + (c * H + h) * pb.dv_pad, part_lse[c * H + h], dv);
    finish(h, o, l);
  });
}

template <bool Vectorized, class KV, class Var = PlainAttention>
void run(ConstView2<float> q, ConstView3<KV> k, ConstView3<KV> v, View2<float> out, const DecodeOptions& opt,
         View1<float> lse, const Var& var = {}) {
  static_assert(is_storage_type_v<KV>, "attention_decode: K/V must be float or bf16");
  validate(q, k, v, out, opt, lse);
  check_variant("attention_decode", var, q.shape[0], q.shape[1], 1);
  decode_keys<Vectorized>(q, k, v, out, opt, lse, k.shape[0], nullptr, var);
}

template <bool Vectorized, class Var = PlainAttention>
void run_quant(ConstView2<float> q, const QuantView3& k, const QuantView3& v, View2<float> out,
               const DecodeOptions& opt, View1<float> lse, const Var& var = {}) {
  check_quant_view(k, "attention_decode", "k");
  check_quant_view(v, "attention_decode", "v");
  validate(q, k.codes, v.codes, out, opt, lse);
  check_variant("attention_decode", var, q.shape[0], q.shape[1], 1);
  decode_keys<Vectorized>(q, k.codes, v.codes, out, opt, lse, k.codes.shape[0], nullptr, var,
                          QuantScales{k.scales, v.scales});
}

}  // namespace detail::decode

// See the contract at the top of this file.
// var: an AttentionVariant (make_variant(...)); lse then includes the sink, if any.
template <class KV, class Var = PlainAttention>
void attention_decode(ConstView2<float> q, ConstView3<KV> k, ConstView3<KV> v, View2<float> out,
                      const DecodeOptions& opt = {}, View1<float> lse = {}, const Var& var = {}) {
  detail::decode::run<true>(q, k, v, out, opt, lse, var);
}

// int8 K/V (e.g. KVCache<std::int8_t>::keys() / values()): same contract; KV is only there so
// that generic code can call attention_decode<KV>(q, cache.keys(), cache.values(), ...).
template <class KV = std::int8_t, class Var = PlainAttention>
  requires std::is_same_v<KV, std::int8_t>
void attention_decode(ConstView2<float> q, const QuantView3& k, const QuantView3& v, View2<float> out,
                      const DecodeOptions& opt = {}, View1<float> lse = {}, const Var& var = {}) {
  detail::decode::run_quant<true>(q, k, v, out, opt, lse, var);
}

}  // namespace attnkit
