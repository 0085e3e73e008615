// attnkit/core/simd.hpp — SIMD helpers over xsimd, with the instruction set as a template
// parameter (Arch, default: the best one the compiler targets).
//
// xsimd 8.1 lacks reduce_max and masked loads, and knows nothing of bf16; this header fills
// those gaps. Loops over n elements process whole batches and finish with a scalar tail.
// bf16 x bf16 dot products use AVX512-BF16 (vdpbf16ps) when the compiler targets it.
#pragma once

#include <cmath>
#include <cstdint>
#include <xsimd/xsimd.hpp>

#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

#include "attnkit/core/bf16.hpp"

namespace attnkit::simd {

using default_arch = xsimd::default_arch;
template <class Arch = default_arch>
using fbatch = xsimd::batch<float, Arch>;
template <class Arch = default_arch>
inline constexpr std::size_t width = fbatch<Arch>::size;

// a · b + c with one rounding (fnma: c - a · b). xsimd 8.1 writes its AVX-512 fma as x * y + z,
// which becomes one instruction only where GCC chooses to contract: that choice can differ
// between two instantiations of one loop (a full tile and a tail), so a sub-range of a call could
// round differently from the full call, and under -ffp-contract=off (the attnkit target's flag,
// for exactly that reason) it would never fuse. These emit the instructions.
template <class Arch>
inline fbatch<Arch> fma(fbatch<Arch> a, fbatch<Arch> b, fbatch<Arch> c) {
#if defined(__AVX512F__)
  if constexpr (width<Arch> == 16) return fbatch<Arch>(_mm512_fmadd_ps(a, b, c));
#endif
#if defined(__FMA__)
  if constexpr (width<Arch> == 8) return fbatch<Arch>(_mm256_fmadd_ps(a, b, c));
#endif
  return xsimd::fma(a, b, c);
}
template <class Arch>
inline fbatch<Arch> fnma(fbatch<Arch> a, fbatch<Arch> b, fbatch<Arch> c) {
#if defined(__AVX512F__)
  if constexpr (width<Arch> == 16) return fbatch<Arch>(_mm512_fnmadd_ps(a, b, c));
#endif
#if defined(__FMA__)
  if constexpr (width<Arch> == 8) return fbatch<Arch>(_mm256_fnmadd_ps(a, b, c));
#endif
  return xsimd::fnma(a, b, c);
}

template <class Arch = default_arch>
inline fbatch<Arch> load(const float* p) {
  return fbatch<Arch>::load_unaligned(p);
}

// Loads width<Arch> bf16 values widened to float (exact).
template <class Arch = default_arch>
inline fbatch<Arch> load(const bf16* p) {
#if defined(__AVX512F__)
  if constexpr (std::is_same_v<Arch, xsimd::avx512bw> || std::is_same_v<Arch, xsimd::avx512dq> ||
                std::is_same_v<Arch, xsimd::avx512cd> || std::is_same_v<Arch, xsimd::avx512f>) {
    const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    return fbatch<Arch>(_mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16)));
  }
#endif
#if defined(__AVX2__)
  if constexpr (std::is_same_v<Arch, xsimd::avx2> || std::is_same_v<Arch, xsimd::fma3<xsimd::avx2>>) {
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    return fbatch<Arch>(_mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16)));
  }
#endif
  alignas(64) float tmp[width<Arch>];
  for (std::size_t i = 0; i < width<Arch>; ++i) tmp[i] = to_float(p[i]);
  return fbatch<Arch>::load_aligned(tmp);
}

template <class Arch = default_arch>
inline void store(float* p, fbatch<Arch> v) {
  v.store_unaligned(p);
}

// Stores width<Arch> floats as bf16, rounding to nearest even.
template <class Arch = default_arch>
inline void store(bf16* p, fbatch<Arch> v) {
#if defined(__AVX512BF16__)
  if constexpr (width<Arch> == 16) {
    // vcvtneps2bf16 rounds to nearest even (NaN handling differs only in payload).
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), (__m256i)_mm512_cvtneps_pbh(v));
    return;
  }
#endif
  alignas(64) float tmp[width<Arch>];
  v.store_aligned(tmp);
  for (std::size_t i = 0; i < width<Arch>; ++i) p[i] = bf16(tmp[i]);
}

template <class Arch>
inline float reduce_add(fbatch<Arch> v) {
  return xsimd::hadd(v);
}

template <class Arch>
inline float reduce_max(fbatch<Arch> v) {
  // (GCC 12's _mm512_reduce_max_ps trips -Wuninitialized inside its own header: spill instead.)
  alignas(64) float tmp[width<Arch>];
  v.store_aligned(tmp);
  float m = tmp[0];
  for (std::size_t i = 1; i < width<Arch>; ++i) m = tmp[i] > m ? tmp[i] : m;
  return m;
}

// 2^x for x <= 0, about 1 ulp down to x = -126. Returns exactly 1 at x = 0 and exactly 0 for
// x < -126 and x = -inf (masked logits: visiting a masked tile is then an exact no-op), and NaN
// for NaN (a NaN score must reach the output, not become a zero probability). Written out
// rather than xsimd::exp2 because it is faster and keeps GCC 12's AVX-512 headers quiet.
template <class Arch>
inline fbatch<Arch> exp2_nonpositive(fbatch<Arch> x) {
  using B = fbatch<Arch>;
  const B xc = xsimd::max(B(-126.f), x);  // (vmaxps returns its second operand for a NaN: NaN passes)
  const B n = xsimd::nearbyint(xc);
  const B f = xc - n;  // [-0.5, 0.5]
  // Taylor series of e^(f ln 2) to degree 7: truncation error < 6e-9 relative on [-0.5, 0.5].
  B p(1.5252733804059840e-05f);
  p = simd::fma(p, f, B(1.5403530393381608e-04f));
  p = simd::fma(p, f, B(1.3333558146428443e-03f));
  p = simd::fma(p, f, B(9.6181291076284772e-03f));
  p = simd::fma(p, f, B(5.5504108664821580e-02f));
  p = simd::fma(p, f, B(2.4022650695910071e-01f));
  p = simd::fma(p, f, B(6.9314718055994531e-01f));
  p = simd::fma(p, f, B(1.f));
#if defined(__AVX512F__)
  if constexpr (width<Arch> == 16) {
    // vscalefps: p * 2^n in one instruction; then flush x < -126 (incl. -inf) to exactly 0
    // (NaN is not less than -126: it stays).
    const __m512 r = _mm512_scalef_ps(p, n);
    return B(_mm512_maskz_mov_ps(_mm512_cmp_ps_mask(x, _mm512_set1_ps(-126.f), _CMP_NLT_UQ), r));
  }
#endif
  using I = xsimd::batch<std::int32_t, Arch>;
  const I e = (xsimd::to_int(n) + I(127)) << 23;
  const B r = p * xsimd::bitwise_cast<B>(e);
  return xsimd::select(x < B(-126.f), B(0.f), r);
}

// cap · tanh(s / cap) (logit soft-capping; tanh itself is cap = 1), by the odd/even rational
// approximation of tanh on [-7.99, 7.99] that Eigen also uses, with s clamped to ±7.99 · cap
// (beyond, tanh rounds to ±1 in float anyway): a few ulp. The soft-cap variant runs it on every
// attention score, so it is kept short: cap · x = the clamped s itself, and an approximate
// reciprocal with one Newton step replaces the division (q lies in [0.0049, 0.6]).
template <class Arch = default_arch>
inline fbatch<Arch> softcap(fbatch<Arch> s, float cap, float inv_cap) {
  using B = fbatch<Arch>;
  const float lim = 7.99881172180175781f * cap;
  const B sc = [&] {
#if defined(__AVX512DQ__)
    // vrangeps: the smaller magnitude of s and lim, with s's sign — the clamp in one instruction.
    if constexpr (width<Arch> == 16) return B(_mm512_range_ps(s, _mm512_set1_ps(lim), 0x02));
#endif
    return xsimd::max(xsimd::min(s, B(lim)), B(-lim));
  }();
  const B x = sc * B(inv_cap), x2 = x * x;
  // Scores well inside the cap (|x| < 1/4: with a cap of 30, |s| < 7.5, most logits): tanh's
  // Taylor series to x^9, truncation below 1e-8 relative, in 4 FMAs instead of the rational's 9
  // plus a reciprocal. One test per vector keeps the result within the same few ulp either way.
  const bool small = [&] {
#if defined(__AVX512F__)
    if constexpr (width<Arch> == 16)
      return _mm512_cmp_ps_mask(xsimd::abs(x), _mm512_set1_ps(0.25f), _CMP_LT_OQ) == 0xFFFF;
#endif
    return xsimd::all(xsimd::abs(x) < B(0.25f));
  }();
  if (small) {
    B t = simd::fma(x2, B(62.f / 2835.f), B(-17.f / 315.f));
    t = simd::fma(x2, t, B(2.f / 15.f));
    t = simd::fma(x2, t, B(-1.f / 3.f));
    return simd::fma(sc * x2, t, sc);  // cap · (x + x^3 · t)
  }
  B p = simd::fma(x2, B(-2.76076847742355e-16f), B(2.00018790482477e-13f));
  p = simd::fma(x2, p, B(-8.60467152213735e-11f));
  p = simd::fma(x2, p, B(5.12229709037114e-08f));
  p = simd::fma(x2, p, B(1.48572235717979e-05f));
  p = simd::fma(x2, p, B(6.37261928875436e-04f));
  p = simd::fma(x2, p, B(4.89352455891786e-03f));
  B q = simd::fma(x2, B(1.19825839466702e-06f), B(1.18534705686654e-04f));
  q = simd::fma(x2, q, B(2.26843463243900e-03f));
  q = simd::fma(x2, q, B(4.89352518554385e-03f));
  const B sp = sc * p;  // cap · x · P(x²); near 0, P/Q = 1 - 1.3e-7, so no special case
#if defined(__AVX512F__)
  if constexpr (width<Arch> == 16) {
    const B r = B(_mm512_rcp14_ps(q));
    const B t = sp * r;
    return simd::fma(t, simd::fnma(q, r, B(1.f)), t);  // sp · r · (2 - q r)
  }
#endif
  return sp / q;
}

template <class Arch = default_arch>
inline fbatch<Arch> tanh(fbatch<Arch> x) {
  return softcap<Arch>(x, 1.f, 1.f);
}

// SiLU(x) = x * sigmoid(x), with the exponential only ever evaluated at non-positive arguments
// (no overflow): e = 2^(-|x| log2 e), sigmoid = 1 / (1 + e) for x >= 0 and e / (1 + e) below.
template <class Arch = default_arch>
inline fbatch<Arch> silu(fbatch<Arch> x) {
  using B = fbatch<Arch>;
  const B e = exp2_nonpositive<Arch>(-xsimd::abs(x) * B(1.4426950408889634f));
  const B sig = xsimd::select(x >= B(0.f), B(1.f), e) / (B(1.f) + e);
  return x * sig;
}

// sum_i a[i] * b[i] in float32 with float32 products. A may be float or bf16, B likewise.
template <class Arch = default_arch, class A, class B>
inline float dot(const A* a, const B* b, std::int64_t n) {
  constexpr std::int64_t W = static_cast<std::int64_t>(width<Arch>);
  fbatch<Arch> acc0(0.f), acc1(0.f);
  std::int64_t i = 0;
  for (; i + 2 * W <= n; i += 2 * W) {
    acc0 = simd::fma(load<Arch>(a + i), load<Arch>(b + i), acc0);
    acc1 = simd::fma(load<Arch>(a + i + W), load<Arch>(b + i + W), acc1);
  }
  for (; i + W <= n; i += W) acc0 = simd::fma(load<Arch>(a + i), load<Arch>(b + i), acc0);
  float s = reduce_add<Arch>(acc0 + acc1);
  for (; i < n; ++i) s += to_float(a[i]) * to_float(b[i]);
  return s;
}

// bf16 x bf16 dot product: products are exact in float32, accumulation in float32. Uses the
// AVX512-BF16 dot-product instruction (32 products per instruction) when available.
// Why the kernels mostly don't: on the Sapphire/Emerald Rapids parts we measure, vdpbf16ps
// issues once per cycle against two FMAs (213 vs 427 GFLOP/s on 2 cores), and float32 queries
// or probabilities would have to be split into 2-3 bf16 parts to keep float32 accuracy. So bf16
// K/V are widened to float32 (a shift) and multiplied with FMAs, and the bf16 weight GEMM of
// prefill runs on AMX tiles (linalg/packed_linear.hpp).
template <class Arch = default_arch>
inline float dot_bf16(const bf16* a, const bf16* b, std::int64_t n) {
#if defined(__AVX512BF16__)
  __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
  std::int64_t i = 0;
  for (; i + 64 <= n; i += 64) {
    acc0 = _mm512_dpbf16_ps(acc0, (__m512bh)_mm512_loadu_si512(a + i), (__m512bh)_mm512_loadu_si512(b + i));
    acc1 = _mm512_dpbf16_ps(acc1, (__m512bh)_mm512_loadu_si512(a + i + 32),
                            (__m512bh)_mm512_loadu_si512(b + i + 32));
  }
  for (; i + 32 <= n; i += 32)
    acc0 = _mm512_dpbf16_ps(acc0, (__m512bh)_mm512_loadu_si512(a + i), (__m512bh)_mm512_loadu_si512(b + i));
  float s = xsimd::hadd(xsimd::batch<float, xsimd::avx512bw>(_mm512_add_ps(acc0, acc1)));
  for (; i < n; ++i) s += to_float(a[i]) * to_float(b[i]);
  return s;
#else
  return dot<Arch>(a, b, n);
#endif
}

// y[i] += alpha * x[i]
template <class Arch = default_arch, class X>
inline void axpy(float alpha, const X* x, float* y, std::int64_t n) {
  constexpr std::int64_t W = static_cast<std::int64_t>(width<Arch>);
  const fbatch<Arch> a(alpha);
  std::int64_t i = 0;
  for (; i + W <= n; i += W) store<Arch>(y + i, simd::fma(a, load<Arch>(x + i), load<Arch>(y + i)));
  for (; i < n; ++i) y[i] += alpha * to_float(x[i]);
}

// y[i] *= alpha
template <class Arch = default_arch>
inline void scale(float alpha, float* y, std::int64_t n) {
  constexpr std::int64_t W = static_cast<std::int64_t>(width<Arch>);
  const fbatch<Arch> a(alpha);
  std::int64_t i = 0;
  for (; i + W <= n; i += W) store<Arch>(y + i, a * load<Arch>(y + i));
  for (; i < n; ++i) y[i] *= alpha;
}

// Converts n floats to bf16 (round to nearest even) with SIMD where available.
template <class Arch = default_arch>
inline void to_bf16(const float* src, bf16* dst, std::int64_t n) {
  constexpr std::int64_t W = static_cast<std::int64_t>(width<Arch>);
  std::int64_t i = 0;
  for (; i + W <= n; i += W) store<Arch>(dst + i, load<Arch>(src + i));
  for (; i < n; ++i) dst[i] = bf16(src[i]);
}

#if defined(__AVX512F__)
// Horizontal sum / max of 16 lanes (a fixed shuffle tree; without GCC 12's
// _mm512_reduce_add_ps warning). Shared by decode and the AMX prefill kernel.
inline float hsum(__m512 v) {
  v = _mm512_add_ps(v, _mm512_shuffle_f32x4(v, v, 0x4e));
  v = _mm512_add_ps(v, _mm512_shuffle_f32x4(v, v, 0xb1));
  v = _mm512_add_ps(v, _mm512_permute_ps(v, 0x4e));
  v = _mm512_add_ps(v, _mm512_permute_ps(v, 0xb1));
  return _mm512_cvtss_f32(v);
}
inline float hmax(__m512 v) {
  v = _mm512_max_ps(v, _mm512_shuffle_f32x4(v, v, 0x4e));
  v = _mm512_max_ps(v, _mm512_shuffle_f32x4(v, v, 0xb1));
  v = _mm512_max_ps(v, _mm512_permute_ps(v, 0x4e));
  v = _mm512_max_ps(v, _mm512_permute_ps(v, 0xb1));
  return _mm512_cvtss_f32(v);
}
#endif

}  // namespace attnkit::simd
