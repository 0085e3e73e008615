// attnkit/attention/quant.hpp — int8 keys/values with a scale per (token, KV head).
//
// Quantisation (symmetric, round to nearest): for one row x [d] (one token of one KV head)
//   scale = max_i |x_i| / 127,   q_i = round(x_i / scale) in [-127, 127]   (ties to even),
// and a row of zeros gets scale 0 and q 0. The row is read back as q_i · scale, so each element
// is off by at most scale / 2 = max|x| / 254. A row holding NaN or ±inf has no scale: the
// quantiser throws attnkit::Error naming the argument, token and head (it never stores 0).
//
// QuantView3 is the read-only view of such a tensor [T, H_kv, d]: the int8 codes (any strides,
// last dimension contiguous) and the scales [T, H_kv] (any strides). KVCache<std::int8_t> and
// RingKVCache<std::int8_t> hand them out; attention_decode and loop_attention_decode take them
// directly (dequantising in registers), and dequantize() widens rows to f32 for kernels that
// take float K/V (prefill continuation stages the visible rows this way).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include "attnkit/core/error.hpp"
#include "attnkit/core/view.hpp"

namespace attnkit {

struct QuantView3 {
  using element_type = const std::int8_t;  // what the codes are, for generic code over caches
  ConstView3<std::int8_t> codes;  // [T, H_kv, d]
  ConstView2<float> scales;       // [T, H_kv]: element (t, h) of row (t, h) is codes(t, h, i) * scales(t, h)

  std::int64_t rows() const { return codes.shape[0]; }
  // Sub-range [begin, end) along dimension dim, as View::slice (dims 0 and 1 slice the scales too).
  QuantView3 slice(int dim, std::int64_t begin, std::int64_t end) const {
    return {codes.slice(dim, begin, end), dim < 2 ? scales.slice(dim, begin, end) : scales};
  }
};

namespace detail::quant {

// Quantises x [n] into q [n] and returns the scale (see the top of the file). Returns false
// (q and the scale untouched) when x holds a NaN or an infinity.
inline bool quantize_row(const float* x, std::int8_t* q, float& scale, std::int64_t n) {
#if defined(__AVX512F__) && defined(__AVX512BW__)
  // The same arithmetic 16 lanes at a time: IEEE division, round to nearest even (MXCSR default).
  {
    const __m512 fmax = _mm512_set1_ps(std::numeric_limits<float>::max());
    const __m512i absmask = _mm512_set1_epi32(0x7fffffff);
    __m512 m = _mm512_setzero_ps();
    bool ok = true;
    for (std::int64_t i = 0; i < n; i += 16) {
      const __mmask16 k = static_cast<__mmask16>(n - i >= 16 ? 0xffffu : (1u << (n - i)) - 1u);
      const __m512 a = _mm512_castsi512_ps(_mm512_and_si512(_mm512_castps_si512(_mm512_maskz_loadu_ps(k, x + i)), absmask));
      ok &= _mm512_mask_cmp_ps_mask(k, a, fmax, _CMP_LE_OQ) == k;  // NaN and inf fail
      m = _mm512_max_ps(m, a);
    }
    if (!ok) return false;
    const float mx = _mm512_reduce_max_ps(m);
    if (mx == 0.f) {
      std::fill(q, q + n, std::int8_t{0});
      scale = 0.f;
      return true;
    }
    const float s = mx / 127.f;
    const __m512 vs = _mm512_set1_ps(s);
    const __m512i lo = _mm512_set1_epi32(-127), hi = _mm512_set1_epi32(127);
    for (std::int64_t i = 0; i < n; i += 16) {
      const __mmask16 k = static_cast<__mmask16>(n - i >= 16 ? 0xffffu : (1u << (n - i)) - 1u);
      const __m512i r = _mm512_cvtps_epi32(_mm512_div_ps(_mm512_maskz_loadu_ps(k, x + i), vs));
      _mm_mask_storeu_epi8(q + i, k, _mm512_cvtepi32_epi8(_mm512_min_epi32(_mm512_max_epi32(r, lo), hi)));
    }
    scale = s;
    return true;
  }
#endif
  float mx = 0.f;
  bool finite = true;
  for (std::int64_t i = 0; i < n; ++i) {
    const float a = std::abs(x[i]);
    finite &= a <= std::numeric_limits<float>::max();  // false for NaN and inf
    mx = std::max(mx, a);
  }
  if (!finite) return false;
  if (mx == 0.f) {
    std::fill(q, q + n, std::int8_t{0});
    scale = 0.f;
    return true;
  }
  const float s = mx / 127.f;
  for (std::int64_t i = 0; i < n; ++i) {
    const float r = std::nearbyint(x[i] / s);  // default rounding mode: to nearest, ties to even
    q[i] = static_cast<std::int8_t>(std::clamp(r, -127.f, 127.f));
  }
  scale = s;
  return true;
}

inline void dequantize_row(const std::int8_t* q, float scale, float* y, std::int64_t n) {
  for (std::int64_t i = 0; i < n; ++i) y[i] = static_cast<float>(q[i]) * scale;
}

}  // namespace detail::quant

// Checks a QuantView3 as a kernel argument: codes as check_view does, scales [T, H_kv].
inline void check_quant_view(const QuantView3& v, const char* fn, const char* arg) {
  check_view(v.codes, fn, arg);
  ATTNKIT_REQUIRE(v.scales.shape[0] == v.codes.shape[0] && v.scales.shape[1] == v.codes.shape[1], fn, ": argument '",
                  arg, "': scales of shape ", detail::shape_string(v.scales), " must be [T, H_kv] = [", v.codes.shape[0],
                  ", ", v.codes.shape[1], "]");
  ATTNKIT_REQUIRE(v.scales.data != nullptr || v.scales.numel() == 0, fn, ": argument '", arg,
                  "': null scales pointer");
}

// dst [T, H_kv, d] = src dequantised (f32, exactly codes * scale rounded once).
inline void dequantize(const QuantView3& src, View3<float> dst) {
  constexpr const char* fn = "dequantize";
  check_quant_view(src, fn, "src");
  check_view(dst, fn, "dst");
  ATTNKIT_REQUIRE(dst.shape == src.codes.shape, fn, ": argument 'dst': shape ", detail::shape_string(dst),
                  " differs from the source's ", detail::shape_string(src.codes));
  for (std::int64_t t = 0; t < dst.shape[0]; ++t)
    for (std::int64_t h = 0; h < dst.shape[1]; ++h)
      detail::quant::dequantize_row(src.codes.ptr(t, h), src.scales(t, h), dst.ptr(t, h), dst.shape[2]);
}

}  // namespace attnkit
