// attnkit/attention/detail/flash_prefill_amx.hpp — the flash prefill kernel on AMX tiles. Not
// a public API: prefill.hpp (and routed attention) pick it where the CPU has AMX, for every mask,
// varlen, continuation and attention variant (Loop Attention's epilogues stay on the FMA kernel):
//  * Precision::fast, any K/V: Q, K, V and P rounded to bf16, one tile product each (Planes = 1).
//    ~2e-3 relative L2 error against float64 (1.4-3.1e-3 measured; tests bound it at 1e-2).
//  * Precision::exact with bf16 K/V, opt-in (amx_exact_prefill(), below): Q and P split into
//    three bf16 planes (hi + mid + lo == the f32 value; the linear layers do the same), so every
//    product of the bf16 K/V is exact and accumulates in f32 (Planes = 3): 1.5-6.5e-7 from the
//    FMA kernel. f32 K/V stay on the FMA kernel (the tiles would round them).
// Measured on an AMX Xeon (Emerald Rapids host, 2 threads, Qwen3-0.6B heads, causal T 2048, one
// run): FMA kernel 216 GFLOP/s, exact on tiles 423, fast 605; the machine's noise is +-30%.
// 2026-12-01 (fresh hosts of the same kind, five alternated pairs each): fast 490-771 ->
// 552-836 (a shorter exp2, 64-row sub-tiles, query/output rows prefetched); sliding T 32768 /
// W 512: 366-444 -> 395-464. Where the time goes (one core, phases in cache,
// amx_prefill_phases.cpp): the tile products run at 0.55 of the tiles' peak and the softmax
// takes as long as they do, one after the other. 2026-12-02: the softmax against an integer
// row reference instead of a running maximum (softmax_rows16, below): 5.8-6.4 -> 4.5-4.6
// cycles per 16 scores in cache, a sub-tile 5% faster. 2026-12-04: a masked tile's mask applied
// in the exp pass (RowCols) instead of a pass through S: a sliding-window sub-tile's softmax 13%
// faster in cache. A one-thread call's phases: amx_prefill_profile.cpp (ATTNKIT_AMX_PROFILE).
// Output rows written with streaming stores (StreamingStore, flash_prefill.hpp), old and new alternated in
// one process (amx_prefill_ab.cpp, 2 threads, B/A medians, five processes on four hosts):
// sliding T 32768 / W 512 1.069, 1.040, 1.083, 1.056, 1.054x; causal T 2048 1.073, 1.034, 1.053,
// 1.046, 1.040x; 512 after 8192 keys 1.014, 0.992, 1.071, 1.047, 0.985x; T 8192 1.011, 1.047x;
// bits equal.
//
// Same work items, key-tile walk and online softmax as the FMA kernel (flash_prefill.hpp), with
// the two products on tiles and the scores row-major:
//   S[row][key] = Q · K^T   A = Q rows (q · scale · log2 e in bf16 planes, once per sub-tile),
//                           B = K^T in pairs (K's 32-bit words transposed 16 x 16 per tile)
//   online softmax per row in f32 on AVX-512 (keys along lanes), P in bf16 planes
//   O[row][:] = alpha · O + P · V   A = P, B = V in key pairs (two rows interleaved);
//                                   O is rescaled in memory, then accumulated on the tiles.
// The K/V tile is packed once per work item and serves all its sub-tiles; every row's
// arithmetic is independent of the others in its tiles, so results do not depend on thread
// count, sub-ranges or varlen packing (as for the FMA kernel).
#pragma once

#include <algorithm>
#include <bit>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "attnkit/attention/decode.hpp"
#include "attnkit/attention/detail/flash_prefill.hpp"
#include "attnkit/core/amx.hpp"
#include "attnkit/core/memory.hpp"
#include "attnkit/core/precision.hpp"
#include "attnkit/core/stage_profile.hpp"

namespace attnkit::detail::flash {

#if defined(ATTNKIT_AMX)

namespace amx_tiles {

// Tile shape. Measured on AMX Xeon hosts (2 threads, T 2048): 256 keys beat 128 (fewer O tile
// loads per P·V step); 32 rows beat 64 with the old softmax, 64 rows beat 32 since (2026-12-01,
// alternated runs: the per-sub-tile work — the 16-row softmax bookkeeping, Q packing, finalize —
// halves per row); 4 x 1 tile groups (each K/V tile serving four Q/P tiles) were no faster.
// Items of 1024 rows (2026-12-04): each item packs every key tile it sees once, so bigger items
// pack less per product. Separate processes could not tell 512 from 1024 through the hosts'
// noise; the two builds alternated call by call in one process (amx_prefill_ab.cpp, 2 threads
// pinned to the quietest vCPUs, B/A medians, two AMX hosts): 512 queries after 8192 keys (the
// model's prefill at depth) 1.105x (faster in 14 of 15 rounds) and 1.023x (13 of 21); causal
// T 2048 1.07x (9 of 15) and 1.03x (17 of 21); T 8192 1.09x (14 of 15); sliding T 32768 /
// W 512 1.03x (4 of 7) and 1.04x (8 of 9); bits equal. 2048-row items: 1.09x, 0.97x, 0.96x.
// The macros are for benchmarks/experiments/amx_prefill_shapes.cpp and amx_prefill_ab.cpp.
#ifndef ATTNKIT_AMX_KEYS
#define ATTNKIT_AMX_KEYS 256
#endif
#ifndef ATTNKIT_AMX_ROWS
#define ATTNKIT_AMX_ROWS 64
#endif
#ifndef ATTNKIT_AMX_ITEM_ROWS
#define ATTNKIT_AMX_ITEM_ROWS 1024
#endif
inline constexpr std::int64_t kKeys = ATTNKIT_AMX_KEYS;  // keys per key tile (multiple of 32)
inline constexpr std::int64_t kRows = ATTNKIT_AMX_ROWS;   // rows per sub-tile, about (multiple of 16 after padding)
inline constexpr std::int64_t kTileElems = 512;  // bf16 elements of one 16 x 64-byte tile
// Row strides of S (floats) and P (bf16) padded by one cache line: at kKeys · 4 = 1 KiB a C
// tile's 16 rows fell into 4 of L1's 64 sets.
#ifndef ATTNKIT_AMX_PAD
#define ATTNKIT_AMX_PAD 1
#endif
inline constexpr std::int64_t kSLd = kKeys + 16 * ATTNKIT_AMX_PAD;
inline constexpr std::int64_t kPLd = kKeys + 32 * ATTNKIT_AMX_PAD;

using u16 = std::uint16_t;

// C[NA x NB tiles] (+)= sum over `steps` of A(a, s) · B(s, b); tile registers: C 0-3, A 4-5, B 6-7.
// A(a, s) = a + a·a_block + s·a_step (rows a_stride bytes apart); B(s, b) = b + s·b_step + b·b_block
// (rows 64 bytes apart); C(a, b) = c + a·c_block + b·64 bytes (rows c_stride bytes apart).
struct Operands {
  const char* a;
  std::int64_t a_stride, a_block, a_step, a_plane;  // a_plane: bytes between the planes of A
  const char* b;
  std::int64_t b_step, b_block;
  char* c;
  std::int64_t c_stride, c_block;
};

// Planes > 1: A is the sum of that many bf16 planes (each multiplied by the same B tile).
template <int NA, int NB, bool Accumulate, int Planes>
inline void tile_product(const Operands& o, std::int64_t s0, std::int64_t s1) {
  if constexpr (Accumulate) {
    _tile_loadd(0, o.c, o.c_stride);
    if constexpr (NB == 2) _tile_loadd(1, o.c + 64, o.c_stride);
    if constexpr (NA == 2) _tile_loadd(2, o.c + o.c_block, o.c_stride);
    if constexpr (NA == 2 && NB == 2) _tile_loadd(3, o.c + o.c_block + 64, o.c_stride);
  } else {
    _tile_zero(0);
    if constexpr (NB == 2) _tile_zero(1);
    if constexpr (NA == 2) _tile_zero(2);
    if constexpr (NA == 2 && NB == 2) _tile_zero(3);
  }
  for (std::int64_t s = s0; s < s1; ++s) {
    _tile_loadd(6, o.b + s * o.b_step, 64);
    if constexpr (NB == 2) _tile_loadd(7, o.b + s * o.b_step + o.b_block, 64);
#pragma GCC unroll 3
    for (int p = 0; p < Planes; ++p) {
      const char* ap = o.a + p * o.a_plane + s * o.a_step;
      _tile_loadd(4, ap, o.a_stride);
      _tile_dpbf16ps(0, 4, 6);
      if constexpr (NB == 2) _tile_dpbf16ps(1, 4, 7);
      if constexpr (NA == 2) {
        _tile_loadd(5, ap + o.a_block, o.a_stride);
        _tile_dpbf16ps(2, 5, 6);
        if constexpr (NB == 2) _tile_dpbf16ps(3, 5, 7);
      }
    }
  }
  _tile_stored(0, o.c, o.c_stride);
  if constexpr (NB == 2) _tile_stored(1, o.c + 64, o.c_stride);
  if constexpr (NA == 2) _tile_stored(2, o.c + o.c_block, o.c_stride);
  if constexpr (NA == 2 && NB == 2) _tile_stored(3, o.c + o.c_block + 64, o.c_stride);
}

// All C tiles of row blocks [0, na) x column blocks [b0, b1), steps [s0, s1), in 2 x 2 groups.
// (4 x 1 groups, each B tile serving four A tiles, measured no faster on the AMX host, in cache
// or in the kernel: the B tiles' reads from L2 are not what holds the products back.)
template <bool Accumulate, int Planes>
inline void tile_products(Operands o, std::int64_t na, std::int64_t b0, std::int64_t b1, std::int64_t s0,
                          std::int64_t s1) {
  for (std::int64_t a = 0; a < na; a += 2) {
    for (std::int64_t b = b0; b < b1; b += 2) {
      Operands t = o;
      t.a += a * o.a_block;
      t.b += b * o.b_block;
      t.c += a * o.c_block + b * 64;
      const bool two_a = a + 1 < na, two_b = b + 1 < b1;
      if (two_a && two_b) tile_product<2, 2, Accumulate, Planes>(t, s0, s1);
      else if (two_a) tile_product<2, 1, Accumulate, Planes>(t, s0, s1);
      else if (two_b) tile_product<1, 2, Accumulate, Planes>(t, s0, s1);
      else tile_product<1, 1, Accumulate, Planes>(t, s0, s1);
    }
  }
}

// 32 bf16 of row[d0, d0 + 32) (zero past n) as 16 32-bit pairs.
inline __m512i load_pairs(const bf16* row, std::int64_t d0, std::int64_t n) {
  const std::int64_t left = n - d0;
  const __mmask32 m = left >= 32 ? ~__mmask32{0} : static_cast<__mmask32>((std::uint64_t{1} << std::max<std::int64_t>(left, 0)) - 1);
  return _mm512_maskz_loadu_epi16(m, row + d0);
}
inline __m512i load_pairs(const float* row, std::int64_t d0, std::int64_t n) {
  const std::int64_t left = n - d0;
  const auto mask16 = [](std::int64_t k) {
    return k >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << std::max<std::int64_t>(k, 0)) - 1);
  };
  const __m512 lo = _mm512_maskz_loadu_ps(mask16(left), row + d0);
  const __m512 hi = _mm512_maskz_loadu_ps(mask16(left - 16), row + d0 + 16);
  return (__m512i)_mm512_cvtne2ps_pbh(hi, lo);
}
// An int8 row with its scale (KVRows<std::int8_t>): dequantised to f32 in registers (code ·
// scale, exactly dequantize_row's values), then rounded to bf16 as f32 rows are.
struct ScaledRow {
  const std::int8_t* codes;
  float scale;
};
inline __m512 dequant16(const ScaledRow& row, std::int64_t d0, std::int64_t n) {
  const std::int64_t left = n - d0;
  const __mmask16 m = left >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << std::max<std::int64_t>(left, 0)) - 1);
  return _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(m, row.codes + d0))),
                       _mm512_set1_ps(row.scale));
}
inline __m512i load_pairs(const ScaledRow& row, std::int64_t d0, std::int64_t n) {
  return (__m512i)_mm512_cvtne2ps_pbh(dequant16(row, d0 + 16, n), dequant16(row, d0, n));
}
// The row handle the packers read: a pointer, or an int8 row with its scale.
template <class KV>
inline auto row_of(const KVRows<KV>& rows, std::int64_t s, std::int64_t head) {
  if constexpr (std::is_same_v<KV, std::int8_t>) return ScaledRow{rows.ptr(s, head), rows.scale_of(s, head)};
  else return rows.ptr(s, head);
}
// 16 bf16 of row[d0, d0 + 16) (zero past n), widened to the low halves of 16 32-bit lanes.
inline __m512i load_halves(const bf16* row, std::int64_t d0, std::int64_t n) {
  const std::int64_t left = n - d0;
  const __mmask16 m = left >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << std::max<std::int64_t>(left, 0)) - 1);
  return _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, row + d0));
}
inline __m512i load_halves(const float* row, std::int64_t d0, std::int64_t n) {
  const std::int64_t left = n - d0;
  const __mmask16 m = left >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << std::max<std::int64_t>(left, 0)) - 1);
  return _mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(_mm512_maskz_loadu_ps(m, row + d0)));
}
inline __m512i load_halves(const ScaledRow& row, std::int64_t d0, std::int64_t n) {
  return _mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(dequant16(row, d0, n)));
}

// In-register transpose of 16 x 16 32-bit elements.
inline void transpose16(__m512i (&r)[16]) {
  __m512i a[16], b[16];
  for (int i = 0; i < 8; ++i) {
    a[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
    a[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 4; ++i) {
    b[4 * i + 0] = _mm512_unpacklo_epi64(a[4 * i], a[4 * i + 2]);
    b[4 * i + 1] = _mm512_unpackhi_epi64(a[4 * i], a[4 * i + 2]);
    b[4 * i + 2] = _mm512_unpacklo_epi64(a[4 * i + 1], a[4 * i + 3]);
    b[4 * i + 3] = _mm512_unpackhi_epi64(a[4 * i + 1], a[4 * i + 3]);
  }
  // b[4i + j], 128-bit lane L, holds column 4L + j of rows 4i .. 4i + 3.
  for (int j = 0; j < 4; ++j) {
    const __m512i c0 = _mm512_shuffle_i32x4(b[j], b[4 + j], 0x88), c1 = _mm512_shuffle_i32x4(b[j], b[4 + j], 0xDD);
    const __m512i d0 = _mm512_shuffle_i32x4(b[8 + j], b[12 + j], 0x88), d1 = _mm512_shuffle_i32x4(b[8 + j], b[12 + j], 0xDD);
    r[j] = _mm512_shuffle_i32x4(c0, d0, 0x88);
    r[8 + j] = _mm512_shuffle_i32x4(c0, d0, 0xDD);
    r[4 + j] = _mm512_shuffle_i32x4(c1, d1, 0x88);
    r[12 + j] = _mm512_shuffle_i32x4(c1, d1, 0xDD);
  }
}

// K rows [k0, k0 + kc) of one head as B tiles of K^T: tile (s, kb) = d-pairs [16s, 16s + 16) x
// keys [16kb, 16kb + 16), at dst + (s · kKeys/16 + kb) · kTileElems. Keys past kc are zero.
template <class KV>
inline void pack_k(const KVRows<KV>& k, std::int64_t head, std::int64_t k0, std::int64_t kc, std::int64_t d_k,
                   std::int64_t d_kp, u16* dst) {
  constexpr std::int64_t nkb = kKeys / 16;
  for (std::int64_t kb = 0; kb < nkb; ++kb) {
    const std::int64_t c0 = kb * 16;
    for (std::int64_t s = 0; s < d_kp / 32; ++s) {
      __m512i r[16];
      for (int i = 0; i < 16; ++i)
        r[i] = c0 + i < kc ? load_pairs(row_of(k, k0 + c0 + i, head), s * 32, d_k) : _mm512_setzero_si512();
      transpose16(r);
      u16* t = dst + (s * nkb + kb) * kTileElems;
      for (int i = 0; i < 16; ++i) _mm512_store_si512(t + i * 32, r[i]);
    }
  }
}

// V rows [k0, k0 + kc) of one head as B tiles of key pairs: tile (j, nb) = keys [32j, 32j + 32)
// in pairs x columns [16nb, 16nb + 16), at dst + (j · d_vp/16 + nb) · kTileElems. Keys past kc are zero.
template <class KV>
inline void pack_v(const KVRows<KV>& v, std::int64_t head, std::int64_t k0, std::int64_t kc, std::int64_t d_v,
                   std::int64_t d_vp, u16* dst) {
  const std::int64_t nvb = d_vp / 16;
  for (std::int64_t c = 0; c < kKeys; c += 2) {
    const std::int64_t j = c / 32, i = (c % 32) / 2;
    const bool has_even = c < kc, has_odd = c + 1 < kc;
    const auto even = row_of(v, has_even ? k0 + c : k0, head);
    const auto odd = row_of(v, has_odd ? k0 + c + 1 : k0, head);
    for (std::int64_t nb = 0; nb < nvb; ++nb) {
      const __m512i lo = has_even ? load_halves(even, nb * 16, d_v) : _mm512_setzero_si512();
      const __m512i hi = has_odd ? load_halves(odd, nb * 16, d_v) : _mm512_setzero_si512();
      _mm512_store_si512(dst + (j * nvb + nb) * kTileElems + i * 32, _mm512_or_si512(lo, _mm512_slli_epi32(hi, 16)));
    }
  }
}

// The softmax's 2^x: detail::decode::exp2_short_ps (vreduceps, a degree-3 minimax polynomial
// with 2^0 = 1 exactly, vscalefps; no clamp: -inf gives 0, NaN stays NaN). It took the softmax
// from 6.1 to 4.7 TSC cycles per 16 scores on the AMX host against a clamp, round, subtract and
// degree-4 series (benchmarks/experiments/amx_prefill_phases.cpp); the old max(x, -150) also
// turned a NaN score into 0 where the FMA kernel passes it on.
using detail::decode::exp2_short_ps;
using detail::decode::kExp2Short;

// One sub-tile: rows (head h_begin + r / nq, query t_begin + r % nq), rp = rows padded to 16.
struct AmxSub {
  std::int64_t t_begin, nq, rows, rp;
  u16* q;    // [rp][d_kp] bf16 of the scaled query rows (zero rows and columns past the ends)
  float* o;  // [rp][d_vp] unnormalised output
  float* m;  // [rp] running max (base 2)
  float* l;  // [rp] running sum
  float* slope;  // ALiBi: each row's slope in base-2 units
};

// Row r's scores [cb, ce) with the variant's logits transform and the mask applied, written back
// in place when there are any (Masked || Var::has_logits); returns their lane-wise maximum when
// WithMax (-inf lanes where nothing is visible). Key columns outside the row's [lo, hi] are masked.
template <bool Masked, bool WithMax, class Var, class Row>
inline __m512 prepare_row(float* srow, std::int64_t cb, std::int64_t ce, [[maybe_unused]] const Var& var,
                          [[maybe_unused]] float c2, [[maybe_unused]] const Row& row) {
  using B = xsimd::batch<float, simd::default_arch>;
  const __m512 neg_inf = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  [[maybe_unused]] const __m512i iota = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  constexpr bool transform = Masked || Var::has_logits;
  __m512 v = neg_inf;
  for (std::int64_t c = cb; c < ce; c += 16) {
    __m512 sc = _mm512_load_ps(srow + c);
    if constexpr (Var::has_softcap) sc = simd::softcap<simd::default_arch>(B(sc), c2, 1.f / c2);
    if constexpr (Var::has_alibi)  // + slope · (key - query position), the distance exact in integers
      sc = _mm512_fmadd_ps(_mm512_set1_ps(row.slope), _mm512_cvtepi32_ps(_mm512_add_epi32(iota, _mm512_set1_epi32(static_cast<int>(c + row.dist0)))), sc);
    if constexpr (Masked) {
      const __m512i col = _mm512_add_epi32(iota, _mm512_set1_epi32(static_cast<int>(c)));
      const __mmask16 vis = _mm512_cmpge_epi32_mask(col, _mm512_set1_epi32(static_cast<int>(row.lo))) &
                            _mm512_cmple_epi32_mask(col, _mm512_set1_epi32(static_cast<int>(row.hi)));
      sc = _mm512_mask_blend_ps(vis, neg_inf, sc);
    }
    if constexpr (transform) _mm512_store_ps(srow + c, sc);
    if constexpr (WithMax) v = _mm512_max_ps(sc, v);  // skips a NaN score (its probability is NaN below), as the FMA kernel
  }
  return v;
}

// Planes = 1 (Precision::fast): P = bf16(2^(s - ref)) for a row reference `ref` that is an
// integer (or -inf before the row has seen a key) and moves only when a tile's probabilities
// would grow past kRefSlack: ref = ceil(max) at the row's first visible scores and when a tile's
// row sum exceeds 2^16 (so no probability does), else it stays where it is. The result is the
// same softmax (m = ref and l are what finalize_row divides by; P up to 2^16 loses nothing in
// bf16 or in the f32 sums), with two vector uops fewer per 16 scores than a running maximum
// (8.5 -> 6.5): no max pass over the scores, no subtraction (with |ref| <= 100, 2^-ref is folded into the
// exp2 polynomial's coefficients: frac(s - ref) = frac(s) for an integer ref, and vscalefps takes
// floor(s) itself), and alpha is 1 (no O rescale) unless the reference moved, by a power of two.
inline constexpr float kRefSlack = 65536.f;  // 2^16: a tile's largest row sum before ref moves

// 2^e for an integer e in [-126, 127], from its bits (std::ldexp is a call into libm).
inline float pow2i(int e) { return std::bit_cast<float>(static_cast<std::uint32_t>(e + 127) << 23); }

// A row's visible key columns in a masked tile, [lo, lo + span] relative to k0 (span >= 0).
// exp_row_ref<true> gives the other columns P = 0 through a zero-masked vscalefps: two uops more
// per 16 scores (an add and an unsigned compare), where a masking pass through S (prepare_row:
// a load, two compares, a blend and a store per 16) cost as much as a third of the exp pass
// (a sliding window's sub-tiles are masked in two of their three key tiles).
struct RowCols {
  std::int32_t lo = 0, span = 0;
};

// Columns [c, c + 16)'s visibility for a row: its lanes' (column - lo) are `rel`, advanced by 16.
inline __mmask16 visible16(__m512i& rel, __m512i span) {
  const __mmask16 k = _mm512_cmple_epu32_mask(rel, span);
  rel = _mm512_add_epi32(rel, _mm512_set1_epi32(16));
  return k;
}
inline __m512i cols_rel(std::int64_t cb, RowCols cols) {
  return _mm512_add_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                          _mm512_set1_epi32(static_cast<std::int32_t>(cb) - cols.lo));
}

// Row sum of P = bf16(2^(s - ref)) over [cb, ce), P written to prow; ref finite or +inf.
// Masked: columns outside `cols` get P = 0 whatever S holds there.
template <bool Masked = false>
inline __m512 exp_row_ref(const float* srow, u16* prow, std::int64_t cb, std::int64_t ce, float ref,
                          [[maybe_unused]] RowCols cols = {}) {
  __m512 sum = _mm512_setzero_ps();
  [[maybe_unused]] __m512i rel = _mm512_setzero_si512();
  [[maybe_unused]] const __m512i span = _mm512_set1_epi32(cols.span);
  if constexpr (Masked) rel = cols_rel(cb, cols);
  if (std::fabs(ref) <= 100.f) {  // 2^-ref folded into the coefficients (exact: a power of two)
    const float sc = pow2i(-static_cast<int>(ref));
    const __m512 k3 = _mm512_set1_ps(kExp2Short[3] * sc), k2 = _mm512_set1_ps(kExp2Short[2] * sc),
                 k1 = _mm512_set1_ps(kExp2Short[1] * sc), k0 = _mm512_set1_ps(kExp2Short[0] * sc);
    const auto ex = [&](__m512 s) {
      const __m512 f = _mm512_reduce_ps(s, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
      const __m512 poly = _mm512_fmadd_ps(_mm512_fmadd_ps(_mm512_fmadd_ps(k3, f, k2), f, k1), f, k0);
      if constexpr (Masked) return _mm512_maskz_scalef_ps(visible16(rel, span), poly, s);
      else return _mm512_scalef_ps(poly, s);
    };
    for (std::int64_t c = cb; c < ce; c += 32) {
      const __m512 p0 = ex(_mm512_load_ps(srow + c)), p1 = ex(_mm512_load_ps(srow + c + 16));
      sum = _mm512_add_ps(sum, _mm512_add_ps(p0, p1));
      _mm512_storeu_si512(prow + c, (__m512i)_mm512_cvtne2ps_pbh(p1, p0));
    }
  } else {
    const __m512 vm = _mm512_set1_ps(ref);
    const auto ex = [&](__m512 s) {
      const __m512 p = exp2_short_ps(_mm512_sub_ps(s, vm));
      if constexpr (Masked) return _mm512_maskz_mov_ps(visible16(rel, span), p);
      else return p;
    };
    for (std::int64_t c = cb; c < ce; c += 32) {
      const __m512 p0 = ex(_mm512_load_ps(srow + c)), p1 = ex(_mm512_load_ps(srow + c + 16));
      sum = _mm512_add_ps(sum, _mm512_add_ps(p0, p1));
      _mm512_storeu_si512(prow + c, (__m512i)_mm512_cvtne2ps_pbh(p1, p0));
    }
  }
  return sum;
}

// The largest score of a row over [cb, ce) (Masked: of its visible columns); NaN scores are
// skipped, as prepare_row skips them.
template <bool Masked = false>
inline float row_max(const float* srow, std::int64_t cb, std::int64_t ce, [[maybe_unused]] RowCols cols = {}) {
  __m512 mx = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  [[maybe_unused]] __m512i rel = _mm512_setzero_si512();
  [[maybe_unused]] const __m512i span = _mm512_set1_epi32(cols.span);
  if constexpr (Masked) rel = cols_rel(cb, cols);
  for (std::int64_t c = cb; c < ce; c += 16) {
    if constexpr (Masked) mx = _mm512_mask_max_ps(mx, visible16(rel, span), _mm512_load_ps(srow + c), mx);
    else mx = _mm512_max_ps(_mm512_load_ps(srow + c), mx);
  }
  return _mm512_reduce_max_ps(mx);
}

// The 16-row bookkeeping after exp_row_ref's passes (sums[i], ref[i] and a[i] per row, a = 1
// unless the row's reference was set this tile): rows whose sum passed kRefSlack (a score more
// than 16 - log2(keys) above ref) move ref to ceil(max) and are redone, with alpha = 2^(old -
// new); NaN sums compare false and stay NaN. Then l = l · alpha + sum, m = ref. Masked: the
// rows' visible columns, cols[i], as their exp passes had them.
template <bool Masked = false>
inline void settle_rows16_ref(const float* s_buf, u16* p_buf, std::int64_t r0, std::int64_t cb, std::int64_t ce,
                              const __m512 (&sums)[16], float (&ref)[16], float (&a)[16], float* m, float* l,
                              float* alpha, [[maybe_unused]] const RowCols* cols = nullptr) {
  alignas(64) float tot[16];
  _mm512_store_ps(tot, detail::decode::reduce16(sums));
  for (__mmask16 big = _mm512_cmp_ps_mask(_mm512_load_ps(tot), _mm512_set1_ps(kRefSlack), _CMP_GT_OQ); big;
       big = static_cast<__mmask16>(big & (big - 1))) {
    const int i = __builtin_ctz(big);
    const std::int64_t r = r0 + i;
    const float* srow = s_buf + r * kSLd;
    const RowCols ci = Masked ? cols[i] : RowCols{};
    const float moved = std::ceil(row_max<Masked>(srow, cb, ce, ci));
    a[i] = ref[i] - moved >= -126.f ? pow2i(static_cast<int>(ref[i] - moved)) : 0.f;
    ref[i] = moved;
    tot[i] = _mm512_reduce_add_ps(exp_row_ref<Masked>(srow, p_buf + r * kPLd, cb, ce, moved, ci));
  }
  const __m512 av = _mm512_load_ps(a);
  _mm512_store_ps(l + r0, _mm512_fmadd_ps(_mm512_load_ps(l + r0), av, _mm512_load_ps(tot)));
  _mm512_store_ps(m + r0, _mm512_load_ps(ref));
  _mm512_store_ps(alpha + r0, av);
}

// Online softmax of rows [r0, r0 + 16) over key columns [cb, ce) of the tile (relative to k0):
// reads S (base 2; transformed in place where the variant or the mask changes it), writes P,
// updates m, l and writes alpha (what O is multiplied by before this tile's P·V) per row.
// Rows past `rows` (padding) get P = 0. The row bookkeeping runs on 16 rows at once, through
// transposing reductions (reduce16), instead of horizontal reductions per row.
// Planes = 1: the reference scheme above. Planes = 3 (Precision::exact on AMX): a running
// maximum, P = 2^(s - m_new) from the 1-ulp exp2 split exactly into hi + mid + lo bf16 planes
// (`plane` elements apart), alpha = 2^(m_old - m_new).
template <bool Masked, int Planes, class Var, class RowInfo>
inline void softmax_rows16(float* s_buf, u16* p_buf, std::int64_t plane, std::int64_t r0, std::int64_t rows,
                           std::int64_t cb, std::int64_t ce, float* m, float* l, float* alpha, const Var& var, float c2,
                           const RowInfo& info) {
  using B = xsimd::batch<float, simd::default_arch>;
  constexpr float ninf = -std::numeric_limits<float>::infinity();
  const __m512 neg_inf = _mm512_set1_ps(ninf);
  constexpr bool transform = Masked || Var::has_logits;  // S rewritten in place before the exp pass
  __m512 sums[16];
  const auto zero_p = [&](u16* prow) {
    for (int p = 0; p < Planes; ++p)
      std::memset(prow + p * plane + cb, 0, static_cast<std::size_t>(ce - cb) * sizeof(u16));
  };
  if constexpr (Planes == 1) {
    alignas(64) float ref[16], a[16];
    // A plain masked tile applies each row's mask inside its exp pass (RowCols); a variant with a
    // logits transform rewrites S first (prepare_row), masking it on the way.
    constexpr bool fused_mask = Masked && !Var::has_logits;
    RowCols cols[16];
    for (int i = 0; i < 16; ++i) {
      const std::int64_t r = r0 + i;
      sums[i] = _mm512_setzero_ps();
      a[i] = 1.f;
      ref[i] = m[r];
      u16* prow = p_buf + r * kPLd;
      if (r >= rows) {  // padding rows: P = 0 (their outputs are never read)
        zero_p(prow);
        continue;
      }
      float* srow = s_buf + r * kSLd;
      const bool first = ref[i] == ninf;  // O and l are still 0: alpha stays 1
      float use = ref[i];
      if constexpr (fused_mask) {
        const auto row = info(r);
        const std::int64_t lo = std::max<std::int64_t>(row.lo, cb), hi = std::min<std::int64_t>(row.hi, ce - 1);
        if (hi < lo) {  // nothing visible in this tile: P = 0, the sum 0, ref as it was
          zero_p(prow);
          continue;
        }
        cols[i] = {static_cast<std::int32_t>(lo), static_cast<std::int32_t>(hi - lo)};
        if (first) {
          const float top = row_max<true>(srow, cb, ce, cols[i]);
          use = top == ninf ? 0.f : std::ceil(top);  // nothing but -inf (or NaN) yet: P = 0 (NaN for a NaN score)
          if (top != ninf) ref[i] = use;
        }
        sums[i] = exp_row_ref<true>(srow, prow, cb, ce, use, cols[i]);
        continue;
      }
      if (transform || first) {
        const auto row = info(r);
        const __m512 mx = first ? prepare_row<Masked, true>(srow, cb, ce, var, c2, row)
                                : prepare_row<Masked, false>(srow, cb, ce, var, c2, row);
        if (first) {
          const float top = _mm512_reduce_max_ps(mx);
          use = top == ninf ? 0.f : std::ceil(top);  // nothing visible yet: P = 0 (NaN for a NaN score)
          if (top != ninf) ref[i] = use;
        }
      }
      sums[i] = exp_row_ref(srow, prow, cb, ce, use);
    }
    settle_rows16_ref<fused_mask>(s_buf, p_buf, r0, cb, ce, sums, ref, a, m, l, alpha, cols);
  } else {
    __m512 mx[16];
    for (int i = 0; i < 16; ++i) {
      mx[i] = neg_inf;
      const std::int64_t r = r0 + i;
      if (r < rows) mx[i] = prepare_row<Masked, true>(s_buf + r * kSLd, cb, ce, var, c2, info(r));
    }
    const __m512 m_old = _mm512_load_ps(m + r0);
    const __m512 m_new = _mm512_max_ps(m_old, detail::decode::reduce16_tree(mx, [](__m512 a, __m512 b) { return _mm512_max_ps(a, b); }));
    // All masked so far: use 0 (avoids -inf - -inf); alpha is 0 where nothing was seen before.
    const __m512 m_use = _mm512_mask_blend_ps(_mm512_cmp_ps_mask(m_new, neg_inf, _CMP_EQ_OQ), m_new, _mm512_setzero_ps());
    __m512 a = simd::exp2_nonpositive<simd::default_arch>(B(_mm512_sub_ps(m_old, m_use)));
    a = _mm512_mask_blend_ps(_mm512_cmp_ps_mask(m_old, neg_inf, _CMP_EQ_OQ), a, _mm512_setzero_ps());
    alignas(64) float mu[16];
    _mm512_store_ps(mu, m_use);
    for (int i = 0; i < 16; ++i) {
      sums[i] = _mm512_setzero_ps();
      const std::int64_t r = r0 + i;
      u16* prow = p_buf + r * kPLd;
      if (r >= rows) {  // padding rows: P = 0 (their outputs are never read)
        zero_p(prow);
        continue;
      }
      const float* in = s_buf + r * kSLd;
      const __m512 vm = _mm512_set1_ps(mu[i]);
      __m512 sum = _mm512_setzero_ps();
      for (std::int64_t c = cb; c < ce; c += 16) {
        __m512 p = simd::exp2_nonpositive<simd::default_arch>(B(_mm512_sub_ps(_mm512_load_ps(in + c), vm)));
        sum = _mm512_add_ps(sum, p);
#pragma GCC unroll 3
        for (int k = 0; k < Planes; ++k) {
          const __m256i h = (__m256i)_mm512_cvtneps_pbh(p);
          _mm256_storeu_si256(reinterpret_cast<__m256i*>(prow + k * plane + c), h);
          if (k + 1 < Planes) p = _mm512_sub_ps(p, amx::widen_bf16(h));
        }
      }
      sums[i] = sum;
    }
    const __m512 l_new = _mm512_fmadd_ps(_mm512_load_ps(l + r0), a, detail::decode::reduce16(sums));
    _mm512_store_ps(l + r0, l_new);
    _mm512_store_ps(m + r0, m_new);
    _mm512_store_ps(alpha + r0, a);
  }
}

}  // namespace amx_tiles

// Where a work item's time goes, for benchmarks/experiments/amx_prefill_profile.cpp: built with
// ATTNKIT_AMX_PROFILE, each phase's TSC cycles add up in amx_profile() (meant for one-thread
// calls: the counters are shared); otherwise ATTNKIT_AMX_PHASE is nothing.
enum class AmxPhase { item, pack_kv, pack_q, qk, softmax, pv, finalize, count };
#if defined(ATTNKIT_AMX_PROFILE)
inline std::uint64_t* amx_profile() {
  static std::uint64_t cycles[static_cast<int>(AmxPhase::count)] = {};
  return cycles;
}
struct AmxPhaseTimer {
  AmxPhase phase;
  std::uint64_t t0 = __rdtsc();
  ~AmxPhaseTimer() { amx_profile()[static_cast<int>(phase)] += __rdtsc() - t0; }
};
#define ATTNKIT_AMX_PHASE(name) const AmxPhaseTimer attnkit_amx_phase_##name{AmxPhase::name}
#else
#define ATTNKIT_AMX_PHASE(name) static_cast<void>(0)
#endif

template <int Planes, class KV, class Mask, class Var = PlainAttention>
void run_item_amx(const Segment<KV>& seg, const Shape& sh, const Mask& mask, const WorkItem& it, const Var& var,
                  const VariantPrep& prep) {
  using namespace amx_tiles;
  ATTNKIT_AMX_PHASE(item);
  const std::int64_t nh = it.h_end - it.h_begin, d_k = sh.d_k, d_v = sh.d_v;
  const std::int64_t d_kp = round_up(d_k, 32), d_vp = round_up(d_v, 16);
  const std::int64_t o_ld = d_vp + 16 * ATTNKIT_AMX_PAD;  // O's row stride (floats), padded as S's
  const std::int64_t bq = std::max<std::int64_t>(1, kRows / nh);  // queries per sub-tile
  const std::int64_t n_sub = (it.t_end - it.t_begin + bq - 1) / bq;
  const std::int64_t rp_max = round_up(bq * nh, 16);
  constexpr float neg_inf = -std::numeric_limits<float>::infinity();
  constexpr bool alibi = Var::has_alibi;
  const std::int64_t half = 2;  // bf16 elements per float of scratch

  const std::int64_t sub_need = Scratch::need(Planes * rp_max * d_kp / half) + Scratch::need(rp_max * o_ld) +
                                2 * Scratch::need(rp_max) + (alibi ? Scratch::need(rp_max) : 0);
  Scratch scratch(n_sub * sub_need + Scratch::need(rp_max * kSLd) + Scratch::need(Planes * rp_max * kPLd / half) +
                  Scratch::need(kKeys * d_kp / half) + Scratch::need(kKeys * d_vp / half) + Scratch::need(rp_max) +
                  Scratch::need(2 * d_k));
  float* s_buf = scratch.take(rp_max * kSLd);                                       // S [rp][kSLd]
  u16* p_buf = reinterpret_cast<u16*>(scratch.take(Planes * rp_max * kPLd / half));  // P [Planes][rp][kPLd] bf16
  u16* k_buf = reinterpret_cast<u16*>(scratch.take(kKeys * d_kp / half));            // K^T tiles
  u16* v_buf = reinterpret_cast<u16*>(scratch.take(kKeys * d_vp / half));            // V tiles
  float* alpha = scratch.take(rp_max);
  float* qrow = scratch.take(2 * d_k);  // a scaled query row, then q̃ = q · M

  std::vector<AmxSub> subs(static_cast<std::size_t>(n_sub));
  for (std::int64_t s = 0; s < n_sub; ++s) {
    AmxSub& sub = subs[s];
    sub.t_begin = it.t_begin + s * bq;
    sub.nq = std::min(bq, it.t_end - sub.t_begin);
    sub.rows = sub.nq * nh;
    sub.rp = round_up(sub.rows, 16);
    sub.q = reinterpret_cast<u16*>(scratch.take(Planes * rp_max * d_kp / half));
    sub.o = scratch.take(rp_max * o_ld);
    sub.m = scratch.take(rp_max);
    sub.l = scratch.take(rp_max);
    sub.slope = alibi ? scratch.take(rp_max) : nullptr;
  }
  const auto rel = [&](std::int64_t t) { return seg.positions ? seg.positions[t] : t; };
  const auto row_pos = [&](const AmxSub& sub, std::int64_t r) { return seg.q_offset + rel(sub.t_begin + r % sub.nq); };

  std::vector<char> packed(static_cast<std::size_t>(n_sub), 0);
  const auto pack_q = [&](AmxSub& sub) {
    std::fill(sub.m, sub.m + sub.rp, neg_inf);
    std::fill(sub.l, sub.l + sub.rp, 0.f);
    std::memset(sub.o, 0, static_cast<std::size_t>(sub.rp * o_ld) * sizeof(float));
    for (int p = 0; p < Planes; ++p)  // padding rows
      std::memset(sub.q + p * rp_max * d_kp + sub.rows * d_kp, 0, static_cast<std::size_t>((sub.rp - sub.rows) * d_kp) * sizeof(u16));
    const auto q_row = [&](std::int64_t r) { return seg.q.ptr(sub.t_begin + r % sub.nq, it.h_begin + r / sub.nq); };
    for (std::int64_t r = 0; r < sub.rows; ++r) {
      prefetch_row_ahead<false>(q_row, r, sub.rows, d_k * 4);
      const std::int64_t h = it.h_begin + r / sub.nq;
      const float* src = q_row(r);
      for (std::int64_t d = 0; d < d_k; ++d) qrow[d] = src[d] * sh.q_scale;
      const float* qs = qrow;
      if constexpr (Var::has_query) {  // q̃ = q · M, as the FMA kernel orders it (scale first)
        for (std::int64_t e = 0; e < d_k; ++e) qrow[d_k + e] = simd::dot<simd::default_arch>(prep.metric_t + e * d_k, qrow, d_k);
        qs = qrow + d_k;
      }
      amx::split_row_to_bf16<Planes>(qs, d_k, sub.q + r * d_kp, rp_max * d_kp, d_kp);
      if constexpr (alibi) sub.slope[r] = var.logits.slopes[h] * kLog2e;
    }
  };

  const std::int64_t n_keys = seg.k.shape[0];
  const auto key_range = [&](std::int64_t t_first, std::int64_t t_last) {
    return std::pair<std::int64_t, std::int64_t>{std::max<std::int64_t>(mask.first_key(seg.q_offset + rel(t_first)), 0),
                                                 std::min(mask.last_key(seg.q_offset + rel(t_last)), n_keys - 1)};
  };
  const auto [key_lo, key_hi] = key_range(it.t_begin, it.t_end - 1);
  const float c2 = [&] {
    if constexpr (Var::has_softcap) return var.logits.cap * kLog2e;
    else return 1.f;
  }();
  std::vector<char> done(static_cast<std::size_t>(n_sub), 0);
  const auto finalize = [&](std::int64_t s) {
    ATTNKIT_AMX_PHASE(finalize);
    const AmxSub& sub = subs[s];
    done[s] = 1;
    for (std::int64_t r = 0; r < sub.rows; ++r)
      finalize_row(seg, sh, var, sub.t_begin + r % sub.nq, it.h_begin + r / sub.nq, sub.o + r * o_ld, sub.m[r], sub.l[r],
                   StreamingStore{});
  };
  Prefetcher pf;
  if (key_hi >= key_lo) {
    amx::amx_configure();
    for (std::int64_t kt = key_lo / kKeys; kt <= key_hi / kKeys; ++kt) {
      const std::int64_t k0 = kt * kKeys, kc = std::min(kKeys, n_keys - k0);
      {
        ATTNKIT_AMX_PHASE(pack_kv);
        pack_k(seg.k, it.kv_head, k0, kc, d_k, d_kp, k_buf);
        pack_v(seg.v, it.kv_head, k0, kc, d_v, d_vp, v_buf);
      }
      const auto [s_first, s_end] = subtiles_seeing(
          subs, k0, kc, [&](const AmxSub& sub) { return key_range(sub.t_begin, sub.t_begin + sub.nq - 1); });
      // The next tile's K/V rows (usually from DRAM), spread over this tile's sub-tiles.
      pf.clear();
      if (kt < key_hi / kKeys)
        for (std::int64_t c = k0 + kKeys, ce = std::min(k0 + 2 * kKeys, n_keys); c < ce; ++c) {
          pf.add_row(seg.k.ptr(c, it.kv_head), d_k);
          pf.add_row(seg.v.ptr(c, it.kv_head), d_v);
        }
      pf.plan(std::max<std::int64_t>(s_end - s_first, 1) * 4);
      for (std::int64_t s = s_first; s < s_end; ++s) {
        AmxSub& sub = subs[s];
        if (!packed[s]) {
          ATTNKIT_AMX_PHASE(pack_q);
          pack_q(sub);
          packed[s] = 1;
        }
        const std::int64_t p_first = row_pos(sub, 0), p_last = row_pos(sub, sub.nq - 1);
        // Key columns [cb, ce) that some row sees, in whole 32-key steps (the P·V K dimension);
        // masked: some row sees less than the whole tile (as tile_cols, at this tile size).
        const bool masked = kc < kKeys || mask.first_key(p_last) > k0 || k0 + kKeys - 1 > mask.last_key(p_first);
        std::int64_t cb = 0, ce = kKeys;
        if (masked) {
          cb = std::clamp<std::int64_t>(mask.first_key(p_first) - k0, 0, kKeys) / 32 * 32;
          ce = round_up(std::clamp<std::int64_t>(std::min(mask.last_key(p_last), n_keys - 1) - k0 + 1, 0, kKeys), 32);
        }
        const std::int64_t na = sub.rp / 16;
        // S = Q · K^T over the visible key blocks.
        {
          ATTNKIT_AMX_PHASE(qk);
          tile_products<false, Planes>({reinterpret_cast<const char*>(sub.q), d_kp * 2, 16 * d_kp * 2, 64, rp_max * d_kp * 2,
                                        reinterpret_cast<const char*>(k_buf), (kKeys / 16) * kTileElems * 2, kTileElems * 2,
                                        reinterpret_cast<char*>(s_buf), kSLd * 4, 16 * kSLd * 4},
                                       na, cb / 16, ce / 16, 0, d_kp / 32);
        }
        pf.tick();
        pf.tick();
        const auto info = [&](std::int64_t r) {
          struct Row {
            std::int64_t lo, hi;
            float slope;
            std::int64_t dist0;
          };
          const std::int64_t p = row_pos(sub, r);
          return Row{std::max<std::int64_t>(mask.first_key(p), 0) - k0, std::min(mask.last_key(p), n_keys - 1) - k0,
                     alibi ? sub.slope[r] : 0.f, k0 - p};
        };
        for (std::int64_t r0 = 0; r0 < sub.rp; r0 += 16) {
          ATTNKIT_AMX_PHASE(softmax);
          if (masked) softmax_rows16<true, Planes>(s_buf, p_buf, rp_max * kPLd, r0, sub.rows, cb, ce, sub.m, sub.l, alpha, var, c2, info);
          else softmax_rows16<false, Planes>(s_buf, p_buf, rp_max * kPLd, r0, sub.rows, cb, ce, sub.m, sub.l, alpha, var, c2, info);
        }
        pf.tick();
        // O = alpha · O (rows whose max moved), then O += P · V on the tiles.
        {
          ATTNKIT_AMX_PHASE(pv);
          for (std::int64_t r = 0; r < sub.rows; ++r) {
            if (alpha[r] == 1.f) continue;
            const __m512 a = _mm512_set1_ps(alpha[r]);
            float* orow = sub.o + r * o_ld;
            for (std::int64_t d = 0; d < d_vp; d += 16) _mm512_store_ps(orow + d, _mm512_mul_ps(a, _mm512_load_ps(orow + d)));
          }
          tile_products<true, Planes>({reinterpret_cast<const char*>(p_buf), kPLd * 2, 16 * kPLd * 2, 64, rp_max * kPLd * 2,
                                       reinterpret_cast<const char*>(v_buf), (d_vp / 16) * kTileElems * 2, kTileElems * 2,
                                       reinterpret_cast<char*>(sub.o), o_ld * 4, 16 * o_ld * 4},
                                      na, 0, d_vp / 16, cb / 32, ce / 32);
        }
        pf.tick();
        if (key_range(sub.t_begin, sub.t_begin + sub.nq - 1).second < k0 + kc) finalize(s);
      }
    }
    amx::amx_release();
  }
  for (std::int64_t s = 0; s < n_sub; ++s)
    if (!done[s]) {
      if (!packed[s]) pack_q(subs[s]);
      finalize(s);
    }
  _mm_sfence();  // the streamed output rows are visible before the item counts as done
}

// Queries per work item: about ATTNKIT_AMX_ITEM_ROWS rows (1024; the FMA kernel's are 512).
inline std::int64_t amx_item_queries(std::int64_t G) {
  const std::int64_t bq = std::max<std::int64_t>(1, amx_tiles::kRows / std::max<std::int64_t>(G, 1));
  return bq * std::max<std::int64_t>(1, ATTNKIT_AMX_ITEM_ROWS / (bq * std::max<std::int64_t>(G, 1)));
}

#endif  // ATTNKIT_AMX

// Precision::exact with bf16 K/V on AMX tiles: Q and P split into three bf16 planes (hi + mid +
// lo == the f32 value), so every product is exact and accumulates in f32. Measured 2.0x the FMA
// kernel at T 2048 (header comment), within 1e-6 of it. Off by default for now: results then
// differ in the last bits from the FMA-based paths (Loop Attention, the decode kernel), which
// several exact-equality tests assume, and no CI machine has AMX to keep it tested. Switch on
// per process with amx_exact_prefill() = true.
inline std::atomic<bool>& amx_exact_prefill() {
  static std::atomic<bool> on{false};
  return on;
}

// Whether the AMX kernel serves this call (opt.precision = fast, the AVX-512 build, AMX usable).
// fast: any K/V; exact: bf16 K/V only (f32 K/V would be rounded to bf16 for the tiles).
template <class Arch, class KV = bf16>
inline bool use_amx_prefill(Precision precision) {
#if defined(ATTNKIT_AMX)
  if constexpr (std::is_same_v<Arch, simd::default_arch>)
    return (precision == Precision::fast ||
            (std::is_same_v<KV, bf16> && amx_exact_prefill().load(std::memory_order_relaxed))) &&
           amx::amx_available();
#endif
  (void)precision;
  return false;
}

// run_prefill for plain attention and variants, on AMX tiles when use_amx_prefill says so.
template <class Arch, class KV, class Mask, class Var = PlainAttention>
void run_prefill_at([[maybe_unused]] Precision precision, const std::vector<Segment<KV>>& segs, const Shape& sh, const Mask& mask,
                    std::int64_t h_begin, std::int64_t h_end,
                    const std::vector<std::pair<std::int64_t, std::int64_t>>& q_ranges, int num_threads,
                    const Var& var = {}) {
#if defined(ATTNKIT_AMX)
  if (use_amx_prefill<Arch, KV>(precision)) {
    std::vector<float> metric_t;
    const VariantPrep prep = prepare_variant(sh, var, metric_t);
    const std::vector<WorkItem> items = plan_items(segs, sh, h_begin, h_end, q_ranges, amx_item_queries(sh.G));
    ATTNKIT_STAGE("prefill.items");
    parallel_for(
        static_cast<std::int64_t>(items.size()), num_threads,
        [&](std::int64_t i) {
          ATTNKIT_FAULT_POINT("prefill");
          if (precision == Precision::fast) run_item_amx<1>(segs[items[i].segment], sh, mask, items[i], var, prep);
          else run_item_amx<3>(segs[items[i].segment], sh, mask, items[i], var, prep);
        },
        /*dynamic=*/true);
    return;
  }
#endif
  run_prefill<Arch>(segs, sh, mask, h_begin, h_end, q_ranges, num_threads, Plain{}, var);
}

}  // namespace attnkit::detail::flash
