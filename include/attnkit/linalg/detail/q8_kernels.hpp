// attnkit/linalg/detail/q8_kernels.hpp — 8-bit weights behind PackedLinear (internal).
//
// Format (the information of GGUF's Q8_0): weights in groups of 32 along the input dimension,
// one scale per (output row, group), q = round(w / s) in [-127, 127], w ≈ q · s. The scale is
// amax / 127 rounded *up* to bf16: bf16 keeps f32's range (Q8_0's f16 scale goes subnormal for
// blocks below 0.008), rounding up keeps |w / s| <= 127, and since q is computed with the
// rounded scale the element error stays within s / 2.
//
// Packed layout, per block of 16 output rows (zero-padded rows and K tail quantise to 0):
//   values [kq][8 quads][16 rows][4] bytes, stored as u8 = q + 128 (VNNI's unsigned operand);
//          one 64-byte load is 16 rows x 4 consecutive K, the operand of vpdpbusd
//   scales [kq][16] bf16 bits, after all values of the block
// kq = ceil(K / 32); blocks are q8_block_bytes(kq) apart (64-byte multiple).
//
// Kernels (tile MR tokens x NB blocks):
//  * kernel_q8_vnni (Precision::fast, decode): activations quantised per token and group to
//    int8 (symmetric, round to nearest: llama.cpp's Q8_0 x Q8_0 dot), 32 products per
//    vpdpbusd, Σ (q_w + 128) q_x − 128 Σ q_x per group, then scaled by s_w · s_x in f32.
//  * kernel_q8_f32 (Precision::exact, decode): weights widened in registers (xor 0x80, shift,
//    convert: exact), f32 FMA with the f32 activations, scaled per group.
//  * prefill widens a K block of a strip once into an f32 panel (kernel_f32 reuses it for all
//    tokens), or on AMX into a bf16 B-tile panel (q · s rounded to bf16).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "attnkit/linalg/detail/linear_kernels.hpp"

namespace attnkit::detail::linear {

inline constexpr int kQ8Group = 32;                       // K per scale
inline constexpr int kQ8GroupBytes = kQ8Group * kBlock;   // values of one group of one block
inline constexpr int kQ8MR = 4;                           // tokens per q8 register tile (int + float accumulators)


inline std::int64_t q8_groups(std::int64_t K) { return (K + kQ8Group - 1) / kQ8Group; }
inline std::int64_t q8_block_bytes(std::int64_t kq) { return (kq * (kQ8GroupBytes + 2 * kBlock) + 63) / 64 * 64; }

// The scale of a group whose largest magnitude is amax: amax / 127 rounded up to bf16.
inline std::uint16_t q8_scale_bits(float amax) {
  std::uint32_t u;
  const float s = amax / 127.f;
  std::memcpy(&u, &s, 4);
  if (u & 0xffffu) u += 0x10000u;  // s > 0 and finite: rounding the magnitude up
  return static_cast<std::uint16_t>(u >> 16);
}
inline float q8_scale(std::uint16_t bits) { return bf16::to_float(bits); }

// Quantises one row's group (n <= 32 values; the rest of the group is zero) into the packed
// block at lane l: values at vals (the group's 512 bytes), scale at *scale.
inline void q8_quantize_group(const float* w, int n, int l, std::uint8_t* vals, std::uint16_t* scale) {
  float amax = 0.f;
  for (int i = 0; i < n; ++i) amax = std::max(amax, std::fabs(w[i]));
  const std::uint16_t sb = amax > 0.f ? q8_scale_bits(amax) : 0;
  const float s = q8_scale(sb);
  *scale = sb;
  for (int i = 0; i < kQ8Group; ++i) {
    const float q = i < n && s > 0.f ? std::nearbyint(w[i] / s) : 0.f;
    const int qi = static_cast<int>(std::clamp(q, -127.f, 127.f));
    vals[(i / 4) * 64 + l * 4 + (i % 4)] = static_cast<std::uint8_t>(qi + 128);
  }
}

// Dequantised W[o, k] of the block (lane l).
inline float q8_value(const std::uint8_t* block, std::int64_t kq, int l, std::int64_t k) {
  const std::int64_t g = k / kQ8Group, i = k % kQ8Group;
  const int q = static_cast<int>(block[g * kQ8GroupBytes + (i / 4) * 64 + l * 4 + (i % 4)]) - 128;
  const auto* scales = reinterpret_cast<const std::uint16_t*>(block + kq * kQ8GroupBytes);
  return static_cast<float>(q) * q8_scale(scales[g * kBlock + l]);
}

// Activations of the VNNI kernel: x[K] -> int8 xq[kq * 32] (zero tail), scale xs[kq], and
// xc[kq] = -128 * Σ xq (the correction for the weights' +128).
inline void q8_quantize_activations(const float* x, std::int64_t K, std::int8_t* xq, float* xs, std::int32_t* xc) {
  const std::int64_t kq = q8_groups(K);
  for (std::int64_t g = 0; g < kq; ++g) {
    const std::int64_t k0 = g * kQ8Group;
    const int n = static_cast<int>(std::min<std::int64_t>(kQ8Group, K - k0));
    std::int8_t* q = xq + k0;
#if defined(__AVX512F__)
    if (n == kQ8Group) {
      const __m512 a = _mm512_loadu_ps(x + k0), b = _mm512_loadu_ps(x + k0 + 16);
      const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(a), _mm512_abs_ps(b)));
      const float s = amax / 127.f, inv = amax > 0.f ? 127.f / amax : 0.f;
      const __m512i qa = _mm512_cvtps_epi32(_mm512_mul_ps(a, _mm512_set1_ps(inv)));  // RNE (MXCSR default)
      const __m512i qb = _mm512_cvtps_epi32(_mm512_mul_ps(b, _mm512_set1_ps(inv)));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(q), _mm512_cvtsepi32_epi8(qa));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(q + 16), _mm512_cvtsepi32_epi8(qb));
      xs[g] = s;
      xc[g] = -128 * _mm512_reduce_add_epi32(_mm512_add_epi32(qa, qb));
      continue;
    }
#endif
    float amax = 0.f;
    for (int i = 0; i < n; ++i) amax = std::max(amax, std::fabs(x[k0 + i]));
    const float inv = amax > 0.f ? 127.f / amax : 0.f;
    std::int32_t sum = 0;
    for (int i = 0; i < kQ8Group; ++i) {
      const int v = i < n ? static_cast<int>(std::clamp(std::nearbyint(x[k0 + i] * inv), -127.f, 127.f)) : 0;
      q[i] = static_cast<std::int8_t>(v);
      sum += v;
    }
    xs[g] = amax / 127.f;
    xc[g] = -128 * sum;
  }
}

#if defined(__AVX512F__)

inline __m512 q8_load_scales(const std::uint16_t* s) {
  return _mm512_castsi512_ps(
      _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_load_si256(reinterpret_cast<const __m256i*>(s))), 16));
}

// Byte b (0..3) of each dword of v (values already xor 0x80, i.e. q as int8), as float.
template <int B>
inline __m512 q8_widen(__m512i v) {
  if constexpr (B == 3) return _mm512_cvtepi32_ps(_mm512_srai_epi32(v, 24));
  else return _mm512_cvtepi32_ps(_mm512_srai_epi32(_mm512_slli_epi32(v, 24 - 8 * B), 24));
}

// MR tokens x NB blocks over all kq groups, f32 activations (rows ldx apart, zero-padded to
// kq * 32), weights widened exactly. w: first block's values, ldw bytes between blocks.
template <int MR, int NB>
void kernel_q8_f32(const float* x, std::int64_t ldx, const std::uint8_t* w, std::int64_t ldw, std::int64_t kq,
                   float* y, std::int64_t ldy, int last_lanes, bool load_y) {
  const __mmask16 last_mask = static_cast<__mmask16>((1u << last_lanes) - 1u);
  const __m512i flip = _mm512_set1_epi8(static_cast<char>(0x80));
  __m512 acc[MR][NB];
  load_tile<MR, NB>(acc, y, ldy, last_mask, load_y);
  const std::uint16_t* scales[NB];
  for (int j = 0; j < NB; ++j) scales[j] = reinterpret_cast<const std::uint16_t*>(w + j * ldw + kq * kQ8GroupBytes);
  for (std::int64_t g = 0; g < kq; ++g) {
    __m512 part[MR][NB];
#pragma GCC unroll 4
    for (int i = 0; i < MR; ++i)
#pragma GCC unroll 3
      for (int j = 0; j < NB; ++j) part[i][j] = _mm512_setzero_ps();
    for (int quad = 0; quad < 8; ++quad) {
      __m512i v[NB];
#pragma GCC unroll 3
      for (int j = 0; j < NB; ++j) {
        const std::uint8_t* wp = w + j * ldw + g * kQ8GroupBytes + quad * 64;
        _mm_prefetch(reinterpret_cast<const char*>(wp) + kPrefetchBytes, _MM_HINT_T0);
        v[j] = _mm512_xor_si512(_mm512_load_si512(wp), flip);
      }
      const std::int64_t k = g * kQ8Group + quad * 4;
      auto step = [&](auto b) {
        constexpr int B = decltype(b)::value;
        __m512 wf[NB];
#pragma GCC unroll 3
        for (int j = 0; j < NB; ++j) wf[j] = q8_widen<B>(v[j]);
#pragma GCC unroll 4
        for (int i = 0; i < MR; ++i) {
          const __m512 xb = _mm512_set1_ps(x[i * ldx + k + B]);
#pragma GCC unroll 3
          for (int j = 0; j < NB; ++j) part[i][j] = _mm512_fmadd_ps(wf[j], xb, part[i][j]);
        }
      };
      step(std::integral_constant<int, 0>{});
      step(std::integral_constant<int, 1>{});
      step(std::integral_constant<int, 2>{});
      step(std::integral_constant<int, 3>{});
    }
#pragma GCC unroll 3
    for (int j = 0; j < NB; ++j) {
      const __m512 s = q8_load_scales(scales[j] + g * kBlock);
#pragma GCC unroll 4
      for (int i = 0; i < MR; ++i) acc[i][j] = _mm512_fmadd_ps(part[i][j], s, acc[i][j]);
    }
  }
  store_tile<MR, NB>(acc, y, ldy, last_mask);
}

#if defined(__AVX512VNNI__)
#define ATTNKIT_LINEAR_VNNI 1

// MR tokens x NB blocks, int8 activations (q8_quantize_activations; rows ldq bytes apart,
// scales / corrections ldg entries apart).
template <int MR, int NB>
void kernel_q8_vnni(const std::int8_t* xq, std::int64_t ldq, const float* xs, const std::int32_t* xc,
                    std::int64_t ldg, const std::uint8_t* w, std::int64_t ldw, std::int64_t kq, float* y,
                    std::int64_t ldy, int last_lanes, bool load_y) {
  const __mmask16 last_mask = static_cast<__mmask16>((1u << last_lanes) - 1u);
  __m512 acc[MR][NB];
  load_tile<MR, NB>(acc, y, ldy, last_mask, load_y);
  const std::uint16_t* scales[NB];
  for (int j = 0; j < NB; ++j) scales[j] = reinterpret_cast<const std::uint16_t*>(w + j * ldw + kq * kQ8GroupBytes);
  for (std::int64_t g = 0; g < kq; ++g) {
    __m512i dot[MR][NB];
#pragma GCC unroll 4
    for (int i = 0; i < MR; ++i) {
      const __m512i c = _mm512_set1_epi32(xc[i * ldg + g]);
#pragma GCC unroll 3
      for (int j = 0; j < NB; ++j) dot[i][j] = c;
    }
#pragma GCC unroll 8
    for (int quad = 0; quad < 8; ++quad) {
      __m512i v[NB];
#pragma GCC unroll 3
      for (int j = 0; j < NB; ++j) {
        const std::uint8_t* wp = w + j * ldw + g * kQ8GroupBytes + quad * 64;
        _mm_prefetch(reinterpret_cast<const char*>(wp) + kPrefetchBytes, _MM_HINT_T0);
        v[j] = _mm512_load_si512(wp);
      }
#pragma GCC unroll 4
      for (int i = 0; i < MR; ++i) {
        std::int32_t xv;
        std::memcpy(&xv, xq + i * ldq + g * kQ8Group + quad * 4, 4);
        const __m512i xb = _mm512_set1_epi32(xv);
#pragma GCC unroll 3
        for (int j = 0; j < NB; ++j) dot[i][j] = _mm512_dpbusd_epi32(dot[i][j], v[j], xb);
      }
    }
#pragma GCC unroll 3
    for (int j = 0; j < NB; ++j) {
      const __m512 s = q8_load_scales(scales[j] + g * kBlock);
#pragma GCC unroll 4
      for (int i = 0; i < MR; ++i)
        acc[i][j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot[i][j]), _mm512_mul_ps(s, _mm512_set1_ps(xs[i * ldg + g])),
                                    acc[i][j]);
    }
  }
  store_tile<MR, NB>(acc, y, ldy, last_mask);
}
#endif

// Widens groups [g0, g0 + ng) of nb blocks (ldw bytes apart) into an f32 panel
// [nb][ng * 32][16] (the kernel_f32 operand): q · s, exact in f32.
inline void q8_widen_panel(const std::uint8_t* w, std::int64_t ldw, std::int64_t kq, int nb, std::int64_t g0,
                           std::int64_t ng, float* dst) {
  const __m512i flip = _mm512_set1_epi8(static_cast<char>(0x80));
  for (int j = 0; j < nb; ++j) {
    const std::uint8_t* blk = w + j * ldw;
    const auto* scales = reinterpret_cast<const std::uint16_t*>(blk + kq * kQ8GroupBytes);
    float* out = dst + j * ng * kQ8Group * kBlock;
    for (std::int64_t g = 0; g < ng; ++g) {
      const __m512 s = q8_load_scales(scales + (g0 + g) * kBlock);
      for (int quad = 0; quad < 8; ++quad) {
        const __m512i v = _mm512_xor_si512(_mm512_load_si512(blk + (g0 + g) * kQ8GroupBytes + quad * 64), flip);
        float* o = out + (g * kQ8Group + quad * 4) * kBlock;
        _mm512_store_ps(o, _mm512_mul_ps(q8_widen<0>(v), s));
        _mm512_store_ps(o + kBlock, _mm512_mul_ps(q8_widen<1>(v), s));
        _mm512_store_ps(o + 2 * kBlock, _mm512_mul_ps(q8_widen<2>(v), s));
        _mm512_store_ps(o + 3 * kBlock, _mm512_mul_ps(q8_widen<3>(v), s));
      }
    }
  }
}

#if defined(ATTNKIT_LINEAR_AMX)
// Dequantises all kq groups of nb blocks into a bf16 B-tile panel [nb][kq * 16 pairs][16]
// (uint32 pairs; the bf16 packed layout, one group = one AMX K step): bf16(q · s), RNE.
inline void q8_widen_panel_bf16(const std::uint8_t* w, std::int64_t ldw, std::int64_t kq, int nb, std::uint32_t* dst) {
  const __m512i flip = _mm512_set1_epi8(static_cast<char>(0x80));
  // cvtne2ps gives [16 bf16 of k | 16 bf16 of k + 1]; the B tile wants them paired per output.
  alignas(64) static constexpr std::uint16_t kPairIdx[32] = {0, 16, 1, 17, 2,  18, 3,  19, 4,  20, 5,  21, 6,  22, 7,  23,
                                                             8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31};
  const __m512i idx = _mm512_load_si512(kPairIdx);
  for (int j = 0; j < nb; ++j) {
    const std::uint8_t* blk = w + j * ldw;
    const auto* scales = reinterpret_cast<const std::uint16_t*>(blk + kq * kQ8GroupBytes);
    std::uint32_t* out = dst + j * kq * 16 * kBlock;
    for (std::int64_t g = 0; g < kq; ++g) {
      const __m512 s = q8_load_scales(scales + g * kBlock);
      for (int quad = 0; quad < 8; ++quad) {
        const __m512i v = _mm512_xor_si512(_mm512_load_si512(blk + g * kQ8GroupBytes + quad * 64), flip);
        const __m512i p0 = _mm512_permutexvar_epi16(
            idx, (__m512i)_mm512_cvtne2ps_pbh(_mm512_mul_ps(q8_widen<1>(v), s), _mm512_mul_ps(q8_widen<0>(v), s)));
        const __m512i p1 = _mm512_permutexvar_epi16(
            idx, (__m512i)_mm512_cvtne2ps_pbh(_mm512_mul_ps(q8_widen<3>(v), s), _mm512_mul_ps(q8_widen<2>(v), s)));
        std::uint32_t* o = out + (g * 16 + quad * 2) * kBlock;
        _mm512_store_si512(o, p0);
        _mm512_store_si512(o + kBlock, p1);
      }
    }
  }
}
#endif

#else  // portable fallback: same layout, scalar float32

template <int MR, int NB>
void kernel_q8_f32(const float* x, std::int64_t ldx, const std::uint8_t* w, std::int64_t ldw, std::int64_t kq,
                   float* y, std::int64_t ldy, int last_lanes, bool load_y) {
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NB; ++j) {
      const int lanes = j == NB - 1 ? last_lanes : kBlock;
      for (int l = 0; l < lanes; ++l) {
        float acc = load_y ? y[i * ldy + j * kBlock + l] : 0.f;
        for (std::int64_t g = 0; g < kq; ++g) {
          float part = 0.f;
          for (int k = 0; k < kQ8Group; ++k) {
            const int q = static_cast<int>(w[j * ldw + g * kQ8GroupBytes + (k / 4) * 64 + l * 4 + k % 4]) - 128;
            part += static_cast<float>(q) * x[i * ldx + g * kQ8Group + k];
          }
          const auto* scales = reinterpret_cast<const std::uint16_t*>(w + j * ldw + kq * kQ8GroupBytes);
          acc += part * q8_scale(scales[g * kBlock + l]);
        }
        y[i * ldy + j * kBlock + l] = acc;
      }
    }
}

inline void q8_widen_panel(const std::uint8_t* w, std::int64_t ldw, std::int64_t kq, int nb, std::int64_t g0,
                           std::int64_t ng, float* dst) {
  for (int j = 0; j < nb; ++j)
    for (std::int64_t g = 0; g < ng; ++g)
      for (int k = 0; k < kQ8Group; ++k)
        for (int l = 0; l < kBlock; ++l)
          dst[(j * ng * kQ8Group + g * kQ8Group + k) * kBlock + l] = q8_value(w + j * ldw, kq, l, (g0 + g) * kQ8Group + k);
}

#endif

using KernelQ8F32 = void (*)(const float*, std::int64_t, const std::uint8_t*, std::int64_t, std::int64_t, float*,
                             std::int64_t, int, bool);
template <int MR = 1, int NB = 1>
KernelQ8F32 pick_q8_f32(int mr, int nb) {
  if (mr == MR && nb == NB) return &kernel_q8_f32<MR, NB>;
  if constexpr (NB < kNB) return pick_q8_f32<MR, NB + 1>(mr, nb);
  else if constexpr (MR < kQ8MR) return pick_q8_f32<MR + 1, 1>(mr, nb);
  else return nullptr;
}

#if defined(ATTNKIT_LINEAR_VNNI)
using KernelQ8Vnni = void (*)(const std::int8_t*, std::int64_t, const float*, const std::int32_t*, std::int64_t,
                              const std::uint8_t*, std::int64_t, std::int64_t, float*, std::int64_t, int, bool);
template <int MR = 1, int NB = 1>
KernelQ8Vnni pick_q8_vnni(int mr, int nb) {
  if (mr == MR && nb == NB) return &kernel_q8_vnni<MR, NB>;
  if constexpr (NB < kNB) return pick_q8_vnni<MR, NB + 1>(mr, nb);
  else if constexpr (MR < kQ8MR) return pick_q8_vnni<MR + 1, 1>(mr, nb);
  else return nullptr;
}
#endif

}  // namespace attnkit::detail::linear
