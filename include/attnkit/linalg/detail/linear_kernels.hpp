// attnkit/linalg/detail/linear_kernels.hpp — microkernels behind PackedLinear (internal).
//
// Packed layouts (64-byte aligned, every block zero-padded to 16 output rows):
//  * bf16: [blocks][kpairs][16][2] bf16, seen here as uint32 pairs [blocks][kpairs][16]: one
//    zmm load is 16 outputs x one K-pair, and 16 consecutive K-pairs of a block are one AMX
//    B tile. kpairs = ceil(K / 2) rounded up to 16, zero-filled.
//  * f32:  [blocks][K][16] f32.
// Vector microkernels compute an MR-token x NB-block (16 outputs each) tile over a K range,
// keeping MR*NB accumulators in registers, starting from zero or from the values in y; they
// use float32 FMA. On this CPU class vdpbf16ps retires one instruction (32 products) per two
// cycles against two 16-lane FMAs per cycle, so bf16 weights are widened to f32 (a shift or
// a mask, exact) instead. The AMX kernels compute 32 x 32 tiles from bf16 activation planes.
#pragma once

#include <atomic>
#include <cstdint>
#include <cstring>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include "attnkit/core/amx.hpp"
#include "attnkit/core/bf16.hpp"
#include "attnkit/core/cpu.hpp"

#if defined(ATTNKIT_AMX)
#define ATTNKIT_LINEAR_AMX 1
#endif

namespace attnkit::detail::linear {

inline constexpr int kBlock = 16;  // output rows per packed block
inline constexpr int kMR = 8;  // tokens per register tile (measured best of 8x3, 6x4, 12x2, 4x6)
inline constexpr int kNB = 3;  // packed blocks per register tile: 24 accumulators

#if defined(__AVX512F__) && defined(__AVX512BF16__)
#define ATTNKIT_LINEAR_AVX512BF16 1
#endif

// ---- conversions -------------------------------------------------------------------------------

// dst[k] = x[k] rounded to the nearest bf16 (RNE), as float: the activations of Precision::fast.
inline void round_to_bf16_row(const float* x, std::int64_t K, float* dst) {
  std::int64_t i = 0;
#if defined(ATTNKIT_LINEAR_AVX512BF16)
  for (; i + 16 <= K; i += 16) {
    const __m256i h = (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(x + i));
    _mm512_storeu_ps(dst + i, _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16)));
  }
#endif
  for (; i < K; ++i) dst[i] = bf16::to_float(bf16::round(x[i]));
}

// Widens kc K-pairs of nb packed bf16 blocks (uint32 pairs, block stride ldw) into an f32 panel
// [nb][2*kc][16]: the weight micro-panel the f32 kernel reuses across all token tiles.
inline void widen_panel(const std::uint32_t* w, std::int64_t ldw, int nb, std::int64_t kc, float* dst) {
  for (int j = 0; j < nb; ++j) {
    const std::uint32_t* src = w + j * ldw;
    float* out = dst + j * 2 * kc * kBlock;
    for (std::int64_t k = 0; k < kc; ++k) {
#if defined(__AVX512F__)
      const __m512i v = _mm512_load_si512(src + k * kBlock);
      _mm512_store_ps(out + (2 * k) * kBlock, _mm512_castsi512_ps(_mm512_slli_epi32(v, 16)));
      _mm512_store_ps(out + (2 * k + 1) * kBlock,
                      _mm512_castsi512_ps(_mm512_and_si512(v, _mm512_set1_epi32(static_cast<int>(0xffff0000u)))));
#else
      for (int l = 0; l < kBlock; ++l) {
        out[(2 * k) * kBlock + l] = bf16::to_float(static_cast<std::uint16_t>(src[k * kBlock + l]));
        out[(2 * k + 1) * kBlock + l] = bf16::to_float(static_cast<std::uint16_t>(src[k * kBlock + l] >> 16));
      }
#endif
    }
  }
}

// ---- microkernels ------------------------------------------------------------------------------
// Arguments shared by the kernels:
//   x, ldx   float activations of the tile's first token at the K range; ldx = row stride
//   w, ldw   first packed block of the tile at the K range; ldw = elements between blocks
//   kc       K steps: elements (f32 kernel) or whole K-pairs (bf16 kernel)
//   y, ldy   output tile; last_lanes = valid outputs of the tile's last block (1..16)
//   load_y   start from y (accumulate / later K range) instead of zero
// kernel_f32 multiplies f32 weights (packed f32 weights, or a widened bf16 panel) with FMA.
// kernel_bf16 widens packed bf16 pairs in registers (exact: bf16 -> f32 is a shift) and
// multiplies with FMA; it serves the few-token case, where each weight is used once and the
// loop is bound by memory bandwidth. `tail` adds the even half of one more pair (odd K).
// `Stream` adds software prefetch of the weight streams, and `Far` (with MR <= 2) the far one.

inline constexpr std::int64_t kPrefetchBytes = 1024;
// With one or two tokens (MR <= 2: decode, about 2 flops per weight byte) each weight stream is
// also prefetched this far ahead into L2, which keeps more lines in flight than the L1 fill
// buffers allow. 28 Qwen3-0.6B layers of GEMVs, without and with it alternated in one process:
// T 1 1.07x (faster in 32 of 40 rounds; 4 KiB ahead 1.06x, 16 KiB 1.07x), T 2 1.05x (19 of 20).
// At T 8 it measured slower (0.96x, 7 of 30), at T 4 level (1.00x), so larger tiles go without.
inline constexpr std::int64_t kFarPrefetchBytes = 8192;

// Whether that far prefetch runs on this CPU: it helps on Intel and hurts on AMD. Decode GEMVs
// (one token, bf16 weights, 2 threads) without it against with it, alternated in one process
// (benchmarks/experiments/decode_ab.cpp linear:N:K, N x K = 4096 x 1024, 1024 x 3072, 6144 x 1024):
// Intel Xeon with AMX (the device host, 2026-12-02) 0.87-0.91x, faster in 0 of 76 rounds;
// AMD EPYC Zen 5 (the 2-core VM of the same day) 1.17-1.22x, faster in 94 of 98 rounds (its
// L2 prefetcher follows the streams alone, and the extra requests only take miss slots).
// Zen 4 is taken to behave as Zen 5 (unmeasured); no other AMD CPU runs these AVX-512 kernels.
inline bool far_weight_prefetch() { return !cpu::is_amd(); }

#if defined(__AVX512F__)

// The MR x NB accumulator tile of a kernel: from y (masked in the last block) or zero, and back.
template <int MR, int NB>
inline void load_tile(__m512 (&acc)[MR][NB], const float* y, std::int64_t ldy, __mmask16 last_mask, bool load_y) {
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 4
    for (int j = 0; j < NB; ++j) {
      const __mmask16 m = j == NB - 1 ? last_mask : static_cast<__mmask16>(0xffff);
      acc[i][j] = load_y ? _mm512_maskz_loadu_ps(m, y + i * ldy + j * kBlock) : _mm512_setzero_ps();
    }
}
template <int MR, int NB>
inline void store_tile(const __m512 (&acc)[MR][NB], float* y, std::int64_t ldy, __mmask16 last_mask) {
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 4
    for (int j = 0; j < NB; ++j) {
      if (j == NB - 1) _mm512_mask_storeu_ps(y + i * ldy + j * kBlock, last_mask, acc[i][j]);
      else _mm512_storeu_ps(y + i * ldy + j * kBlock, acc[i][j]);
    }
}

template <int MR, int NB, bool Stream, bool Far = Stream>
void kernel_bf16(const float* x, std::int64_t ldx, const std::uint32_t* w, std::int64_t ldw, std::int64_t kc,
                 bool tail, float* y, std::int64_t ldy, int last_lanes, bool load_y) {
  const __mmask16 last_mask = static_cast<__mmask16>((1u << last_lanes) - 1u);
  const __m512i hi_mask = _mm512_set1_epi32(static_cast<int>(0xffff0000u));
  __m512 acc[MR][NB];
  load_tile<MR, NB>(acc, y, ldy, last_mask, load_y);
  for (std::int64_t k = 0; k < kc; ++k) {
    __m512 we[NB], wo[NB];
#pragma GCC unroll 4
    for (int j = 0; j < NB; ++j) {
      const std::uint32_t* wp = w + j * ldw + k * kBlock;
      if constexpr (Stream) {
        _mm_prefetch(reinterpret_cast<const char*>(wp) + kPrefetchBytes, _MM_HINT_T0);
        if constexpr (Far && MR <= 2) _mm_prefetch(reinterpret_cast<const char*>(wp) + kFarPrefetchBytes, _MM_HINT_T2);
      }
      const __m512i v = _mm512_load_si512(wp);
      we[j] = _mm512_castsi512_ps(_mm512_slli_epi32(v, 16));
      wo[j] = _mm512_castsi512_ps(_mm512_and_si512(v, hi_mask));
    }
#pragma GCC unroll 8
    for (int i = 0; i < MR; ++i) {
      const __m512 xe = _mm512_set1_ps(x[i * ldx + 2 * k]), xo = _mm512_set1_ps(x[i * ldx + 2 * k + 1]);
#pragma GCC unroll 4
      for (int j = 0; j < NB; ++j) acc[i][j] = _mm512_fmadd_ps(wo[j], xo, _mm512_fmadd_ps(we[j], xe, acc[i][j]));
    }
  }
  if (tail) {
#pragma GCC unroll 4
    for (int j = 0; j < NB; ++j) {
      const __m512 we = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_load_si512(w + j * ldw + kc * kBlock), 16));
#pragma GCC unroll 8
      for (int i = 0; i < MR; ++i) acc[i][j] = _mm512_fmadd_ps(we, _mm512_set1_ps(x[i * ldx + 2 * kc]), acc[i][j]);
    }
  }
  store_tile<MR, NB>(acc, y, ldy, last_mask);
}

#else  // portable fallback: same layouts and order of operations, scalar float32

template <int MR, int NB, bool Stream, bool Far = Stream>
void kernel_bf16(const float* x, std::int64_t ldx, const std::uint32_t* w, std::int64_t ldw, std::int64_t kc,
                 bool tail, float* y, std::int64_t ldy, int last_lanes, bool load_y) {
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NB; ++j) {
      const int lanes = j == NB - 1 ? last_lanes : kBlock;
      float acc[kBlock];
      for (int l = 0; l < kBlock; ++l) acc[l] = load_y && l < lanes ? y[i * ldy + j * kBlock + l] : 0.f;
      const std::uint32_t* wb = w + j * ldw;
      for (std::int64_t k = 0; k < kc + (tail ? 1 : 0); ++k) {
        const float xe = x[i * ldx + 2 * k], xo = k < kc ? x[i * ldx + 2 * k + 1] : 0.f;
        for (int l = 0; l < kBlock; ++l) {
          acc[l] += bf16::to_float(static_cast<std::uint16_t>(wb[k * kBlock + l])) * xe;
          if (k < kc) acc[l] += bf16::to_float(static_cast<std::uint16_t>(wb[k * kBlock + l] >> 16)) * xo;
        }
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
  load_tile<MR, NB>(acc, y, ldy, last_mask, load_y);
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
  store_tile<MR, NB>(acc, y, ldy, last_mask);
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

// ---- AMX (bf16 tiles) --------------------------------------------------------------------------
// Used for Precision::fast prefill with bf16 weights: C[16 tokens x 16 outputs] (f32 tile) +=
// A[16 tokens x 32 K] (bf16 activations) . B[16 K-pairs x 16 outputs x 2] (a packed block,
// rows 64 bytes apart: the packed layout is already the B-tile layout). Packed K-pairs are
// padded to a multiple of 16 so every B tile lies inside its block.

inline constexpr int kAmxK = 32;  // K per tile step

using amx::amx_available;
using amx::amx_enabled;

#if defined(ATTNKIT_LINEAR_AMX)

using amx::amx_configure;
using amx::amx_permitted;
using amx::amx_release;

// NA activation tiles (16 tokens each, rows lda_bytes apart, P planes plane_bytes apart) x NW
// packed blocks (ldw uint32 apart) over ksteps K steps; writes the NA*NW accumulator tiles to
// c[(a*NW + b)*256]. P = 3 planes are x = hi + mid + lo (Precision::exact), P = 1 is bf16(x).
// Each K step also prefetches into L2 the next kAmxPrefetchLines lines of [pf, pf_end): the
// weights of the strip that comes next, which would otherwise arrive by the first token tile's
// tile loads, unprefetched (2 threads, the Qwen3-0.6B projections on 512 tokens: 1.06-1.25x in
// seven runs on four AMX hosts; 1024 and 2048 tokens 1.27x and 1.15x;
// experiments/amx_linear_variants.cpp).
inline constexpr int kAmxPrefetchLines = 8;
template <int NA, int NW, int P>
void amx_kernel(const std::uint16_t* a, std::int64_t lda_bytes, std::int64_t plane_bytes, const std::uint32_t* w,
                std::int64_t ldw, std::int64_t ksteps, float* c, const char* pf, const char* pf_end) {
  _tile_zero(0);
  if constexpr (NW == 2) _tile_zero(1);
  if constexpr (NA == 2) _tile_zero(2);
  if constexpr (NA == 2 && NW == 2) _tile_zero(3);
  const char* a0 = reinterpret_cast<const char*>(a);
  for (std::int64_t s = 0; s < ksteps; ++s) {
#pragma GCC unroll 3
    for (int p = 0; p < P; ++p) {  // each load next to its first use
      const char* ap = a0 + p * plane_bytes + s * kAmxK * 2;
      _tile_loadd(4, ap, lda_bytes);
      if (p == 0) _tile_loadd(6, w + s * 16 * kBlock, 64);
      _tile_dpbf16ps(0, 4, 6);
      if constexpr (NW == 2) {
        if (p == 0) _tile_loadd(7, w + ldw + s * 16 * kBlock, 64);
        _tile_dpbf16ps(1, 4, 7);
      }
      if constexpr (NA == 2) {
        _tile_loadd(5, ap + 16 * lda_bytes, lda_bytes);
        _tile_dpbf16ps(2, 5, 6);
        if constexpr (NW == 2) _tile_dpbf16ps(3, 5, 7);
      }
    }
    for (int i = 0; i < kAmxPrefetchLines && pf < pf_end; ++i, pf += 64) _mm_prefetch(pf, _MM_HINT_T1);
  }
  _tile_stored(0, c, 64);
  if constexpr (NW == 2) _tile_stored(1, c + 256, 64);
  if constexpr (NA == 2) _tile_stored(2, c + NW * 256, 64);
  if constexpr (NA == 2 && NW == 2) _tile_stored(3, c + 3 * 256, 64);
}

using AmxKernel = void (*)(const std::uint16_t*, std::int64_t, std::int64_t, const std::uint32_t*, std::int64_t,
                           std::int64_t, float*, const char*, const char*);
template <int P>
AmxKernel pick_amx(int na, int nw) {
  if (na == 2) return nw == 2 ? &amx_kernel<2, 2, P> : &amx_kernel<2, 1, P>;
  return nw == 2 ? &amx_kernel<1, 2, P> : &amx_kernel<1, 1, P>;
}

using amx::split_row_to_bf16;
using amx::widen_bf16;

#endif

// ---- dispatch on the runtime tile shape (mr in 1..kMR, nb in 1..kNB) ---------------------------

using KernelBf16 = void (*)(const float*, std::int64_t, const std::uint32_t*, std::int64_t, std::int64_t, bool,
                            float*, std::int64_t, int, bool);
using KernelF32 = void (*)(const float*, std::int64_t, const float*, std::int64_t, std::int64_t, float*,
                           std::int64_t, int, bool);

template <bool Stream, bool Far = Stream, int MR = 1, int NB = 1>
KernelBf16 pick_bf16(int mr, int nb) {
  if (mr == MR && nb == NB) return &kernel_bf16<MR, NB, Stream, Far>;
  if constexpr (NB < kNB) return pick_bf16<Stream, Far, MR, NB + 1>(mr, nb);
  else if constexpr (MR < kMR) return pick_bf16<Stream, Far, MR + 1, 1>(mr, nb);
  else return nullptr;
}
// The streaming kernels with this CPU's far prefetch (far_weight_prefetch).
inline KernelBf16 pick_bf16_stream(int mr, int nb) {
  return far_weight_prefetch() ? pick_bf16<true, true>(mr, nb) : pick_bf16<true, false>(mr, nb);
}

template <bool Stream, int MR = 1, int NB = 1>
KernelF32 pick_f32(int mr, int nb) {
  if (mr == MR && nb == NB) return &kernel_f32<MR, NB, Stream>;
  if constexpr (NB < kNB) return pick_f32<Stream, MR, NB + 1>(mr, nb);
  else if constexpr (MR < kMR) return pick_f32<Stream, MR + 1, 1>(mr, nb);
  else return nullptr;
}

}  // namespace attnkit::detail::linear
