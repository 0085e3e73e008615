// attnkit/linalg/detail/linear_kernels.hpp — microkernels behind PackedLinear (internal).
//
// Packed layouts (64-byte aligned, every block zero-padded to 16 output rows):
//  * bf16: [blocks][kpairs][16][2] bf16, seen here as uint32 pairs [blocks][kpairs][16]: one
//    zmm load is 16 outputs x one K-pair, the operand shape of vdpbf16ps. An odd K is padded
//    with a zero column.
//  * f32:  [blocks][K][16] f32.
// Converted activations (scratch, one row per token):
//  * fast:  [kpairs] uint32, each the bf16 pair (x[2k], x[2k+1]) (low half = even element).
//  * exact: [kpairs][2] uint32: the hi pair bf16(x) then the lo pair bf16(x - hi); x = hi + lo
//    to ~2^-17 relative, and both products with bf16 weights are exact in float32.
// A microkernel computes an MR-token x NB-block (16 outputs each) tile over a K range, keeping
// MR*NB accumulators in registers; it either starts from zero or from the values in y.
#pragma once

#include <cstdint>
#include <cstring>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include "attnkit/core/bf16.hpp"

namespace attnkit::detail::linear {

inline constexpr int kBlock = 16;  // output rows per packed block
inline constexpr int kMR = 8;      // tokens per register tile
inline constexpr int kNB = 3;      // packed blocks per register tile (48 outputs)

#if defined(__AVX512F__) && defined(__AVX512BF16__)
#define ATTNKIT_LINEAR_AVX512BF16 1
#endif

// ---- activation conversion -------------------------------------------------------------------

inline std::uint32_t pack_pair(float a, float b) {
  return static_cast<std::uint32_t>(bf16::round(a)) | (static_cast<std::uint32_t>(bf16::round(b)) << 16);
}

// x[K] -> dst[kpairs] bf16 pairs (RNE), zero in the pad column of an odd K.
inline void convert_fast(const float* x, std::int64_t K, std::uint32_t* dst) {
  std::int64_t i = 0;
#if defined(ATTNKIT_LINEAR_AVX512BF16)
  for (; i + 32 <= K; i += 32) {
    const __m512 v0 = _mm512_loadu_ps(x + i), v1 = _mm512_loadu_ps(x + i + 16);
    _mm512_storeu_si512(dst + i / 2, (__m512i)_mm512_cvtne2ps_pbh(v1, v0));
  }
#endif
  for (; i + 2 <= K; i += 2) dst[i / 2] = pack_pair(x[i], x[i + 1]);
  if (i < K) dst[i / 2] = pack_pair(x[i], 0.f);
}

// x[K] -> dst[kpairs][2] (hi pair, lo pair).
inline void convert_exact(const float* x, std::int64_t K, std::uint32_t* dst) {
  std::int64_t i = 0;
#if defined(ATTNKIT_LINEAR_AVX512BF16)
  const __m512i idx0 = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
  const __m512i idx1 = _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
  for (; i + 32 <= K; i += 32) {
    const __m512 v0 = _mm512_loadu_ps(x + i), v1 = _mm512_loadu_ps(x + i + 16);
    const __m512i hb = (__m512i)_mm512_cvtne2ps_pbh(v1, v0);
    const __m512 h0 = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm512_castsi512_si256(hb)), 16));
    const __m512 h1 =
        _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm512_extracti64x4_epi64(hb, 1)), 16));
    const __m512i lb = (__m512i)_mm512_cvtne2ps_pbh(_mm512_sub_ps(v1, h1), _mm512_sub_ps(v0, h0));
    _mm512_storeu_si512(dst + i, _mm512_permutex2var_epi32(hb, idx0, lb));
    _mm512_storeu_si512(dst + i + 16, _mm512_permutex2var_epi32(hb, idx1, lb));
  }
#endif
  for (; i < K; i += 2) {
    const float a = x[i], b = i + 1 < K ? x[i + 1] : 0.f;
    const float ra = a - bf16::to_float(bf16::round(a)), rb = b - bf16::to_float(bf16::round(b));
    dst[i] = pack_pair(a, b);
    dst[i + 1] = pack_pair(ra, rb);
  }
}

// ---- microkernels ------------------------------------------------------------------------------
// Arguments shared by all kernels:
//   x, ldx   converted activations (bf16) or the caller's x rows (f32), first row of the tile,
//            already offset to the K range; ldx is the row stride in elements of that type
//   w, ldw   first packed block of the tile at the K range; ldw = elements between blocks
//   kc       K steps (pairs for bf16, elements for f32)
//   y, ldy   output tile; last_lanes = valid outputs of the tile's last block (1..16)
//   load_y   start from y (accumulate / later K range) instead of zero
// `Stream` adds software prefetch of the weight streams (single-token GEMV: memory bound).

inline constexpr std::int64_t kPrefetchBytes = 1024;

#if defined(ATTNKIT_LINEAR_AVX512BF16)

template <int MR, int NB, bool Exact, bool Stream>
void kernel_bf16(const std::uint32_t* x, std::int64_t ldx, const std::uint32_t* w, std::int64_t ldw, std::int64_t kc,
                 float* y, std::int64_t ldy, int last_lanes, bool load_y) {
  const __mmask16 last_mask = static_cast<__mmask16>((1u << last_lanes) - 1u);
  __m512 acc[MR][NB];
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 4
    for (int j = 0; j < NB; ++j) {
      const __mmask16 m = j == NB - 1 ? last_mask : static_cast<__mmask16>(0xffff);
      acc[i][j] = load_y ? _mm512_maskz_loadu_ps(m, y + i * ldy + j * kBlock) : _mm512_setzero_ps();
    }
  constexpr int xs = Exact ? 2 : 1;
  for (std::int64_t k = 0; k < kc; ++k) {
    __m512bh wv[NB];
#pragma GCC unroll 4
    for (int j = 0; j < NB; ++j) {
      const std::uint32_t* wp = w + j * ldw + k * kBlock;
      if constexpr (Stream) _mm_prefetch(reinterpret_cast<const char*>(wp) + kPrefetchBytes, _MM_HINT_T0);
      wv[j] = (__m512bh)_mm512_load_si512(wp);
    }
#pragma GCC unroll 8
    for (int i = 0; i < MR; ++i) {
      const __m512bh xh = (__m512bh)_mm512_set1_epi32(static_cast<int>(x[i * ldx + k * xs]));
#pragma GCC unroll 4
      for (int j = 0; j < NB; ++j) acc[i][j] = _mm512_dpbf16_ps(acc[i][j], wv[j], xh);
      if constexpr (Exact) {
        const __m512bh xl = (__m512bh)_mm512_set1_epi32(static_cast<int>(x[i * ldx + k * xs + 1]));
#pragma GCC unroll 4
        for (int j = 0; j < NB; ++j) acc[i][j] = _mm512_dpbf16_ps(acc[i][j], wv[j], xl);
      }
    }
  }
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 4
    for (int j = 0; j < NB; ++j) {
      if (j == NB - 1) _mm512_mask_storeu_ps(y + i * ldy + j * kBlock, last_mask, acc[i][j]);
      else _mm512_storeu_ps(y + i * ldy + j * kBlock, acc[i][j]);
    }
}

#else  // portable fallback: same layouts, float32 arithmetic

template <int MR, int NB, bool Exact, bool Stream>
void kernel_bf16(const std::uint32_t* x, std::int64_t ldx, const std::uint32_t* w, std::int64_t ldw, std::int64_t kc,
                 float* y, std::int64_t ldy, int last_lanes, bool load_y) {
  constexpr int xs = Exact ? 2 : 1;
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NB; ++j) {
      const int lanes = j == NB - 1 ? last_lanes : kBlock;
      float acc[kBlock];
      for (int l = 0; l < kBlock; ++l) acc[l] = load_y && l < lanes ? y[i * ldy + j * kBlock + l] : 0.f;
      for (std::int64_t k = 0; k < kc; ++k) {
        const std::uint32_t xp = x[i * ldx + k * xs];
        float x0 = bf16::to_float(static_cast<std::uint16_t>(xp)), x1 = bf16::to_float(static_cast<std::uint16_t>(xp >> 16));
        if constexpr (Exact) {
          const std::uint32_t lp = x[i * ldx + k * xs + 1];
          x0 += bf16::to_float(static_cast<std::uint16_t>(lp));
          x1 += bf16::to_float(static_cast<std::uint16_t>(lp >> 16));
        }
        const std::uint32_t* wp = w + j * ldw + k * kBlock;
        for (int l = 0; l < kBlock; ++l)
          acc[l] += bf16::to_float(static_cast<std::uint16_t>(wp[l])) * x0 +
                    bf16::to_float(static_cast<std::uint16_t>(wp[l] >> 16)) * x1;
      }
      for (int l = 0; l < lanes; ++l) y[i * ldy + j * kBlock + l] = acc[l];
    }
}

#endif

#if defined(__AVX512F__)

template <int MR, int NB, bool Stream>
void kernel_f32(const float* x, std::int64_t ldx, const float* w, std::int64_t ldw, std::int64_t kc, float* y,
                std::int64_t ldy, int last_lanes, bool load_y) {
  const __mmask16 last_mask = static_cast<__mmask16>((1u << last_lanes) - 1u);
  __m512 acc[MR][NB];
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 4
    for (int j = 0; j < NB; ++j) {
      const __mmask16 m = j == NB - 1 ? last_mask : static_cast<__mmask16>(0xffff);
      acc[i][j] = load_y ? _mm512_maskz_loadu_ps(m, y + i * ldy + j * kBlock) : _mm512_setzero_ps();
    }
  for (std::int64_t k = 0; k < kc; ++k) {
    __m512 wv[NB];
#pragma GCC unroll 4
    for (int j = 0; j < NB; ++j) {
      const float* wp = w + j * ldw + k * kBlock;
      if constexpr (Stream) _mm_prefetch(reinterpret_cast<const char*>(wp) + kPrefetchBytes, _MM_HINT_T0);
      wv[j] = _mm512_load_ps(wp);
    }
#pragma GCC unroll 8
    for (int i = 0; i < MR; ++i) {
      const __m512 xb = _mm512_set1_ps(x[i * ldx + k]);
#pragma GCC unroll 4
      for (int j = 0; j < NB; ++j) acc[i][j] = _mm512_fmadd_ps(wv[j], xb, acc[i][j]);
    }
  }
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 4
    for (int j = 0; j < NB; ++j) {
      if (j == NB - 1) _mm512_mask_storeu_ps(y + i * ldy + j * kBlock, last_mask, acc[i][j]);
      else _mm512_storeu_ps(y + i * ldy + j * kBlock, acc[i][j]);
    }
}

#else

template <int MR, int NB, bool Stream>
void kernel_f32(const float* x, std::int64_t ldx, const float* w, std::int64_t ldw, std::int64_t kc, float* y,
                std::int64_t ldy, int last_lanes, bool load_y) {
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NB; ++j) {
      const int lanes = j == NB - 1 ? last_lanes : kBlock;
      float acc[kBlock];
      for (int l = 0; l < kBlock; ++l) acc[l] = load_y && l < lanes ? y[i * ldy + j * kBlock + l] : 0.f;
      for (std::int64_t k = 0; k < kc; ++k) {
        const float xv = x[i * ldx + k];
        const float* wp = w + j * ldw + k * kBlock;
        for (int l = 0; l < kBlock; ++l) acc[l] += wp[l] * xv;
      }
      for (int l = 0; l < lanes; ++l) y[i * ldy + j * kBlock + l] = acc[l];
    }
}

#endif

// ---- dispatch on the runtime tile shape (mr in 1..kMR, nb in 1..kNB) ---------------------------

using KernelBf16 = void (*)(const std::uint32_t*, std::int64_t, const std::uint32_t*, std::int64_t, std::int64_t,
                            float*, std::int64_t, int, bool);
using KernelF32 = void (*)(const float*, std::int64_t, const float*, std::int64_t, std::int64_t, float*,
                           std::int64_t, int, bool);

template <bool Exact, bool Stream, int MR = 1, int NB = 1>
KernelBf16 pick_bf16(int mr, int nb) {
  if (mr == MR && nb == NB) return &kernel_bf16<MR, NB, Exact, Stream>;
  if constexpr (NB < kNB) return pick_bf16<Exact, Stream, MR, NB + 1>(mr, nb);
  else if constexpr (MR < kMR) return pick_bf16<Exact, Stream, MR + 1, 1>(mr, nb);
  else return nullptr;
}

template <bool Stream, int MR = 1, int NB = 1>
KernelF32 pick_f32(int mr, int nb) {
  if (mr == MR && nb == NB) return &kernel_f32<MR, NB, Stream>;
  if constexpr (NB < kNB) return pick_f32<Stream, MR, NB + 1>(mr, nb);
  else if constexpr (MR < kMR) return pick_f32<Stream, MR + 1, 1>(mr, nb);
  else return nullptr;
}

}  // namespace attnkit::detail::linear
