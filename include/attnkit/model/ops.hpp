// attnkit/model/ops.hpp — the small per-token operations of a Qwen3 decoder: RMSNorm (over
// rows and per head), rotate-half RoPE, SwiGLU's SiLU(gate) * up, residual add, argmax.
//
// All take [rows, width] views with contiguous rows, compute in float32, and may run in place.
// Why these are not kernels of their own: they are memory-light next to the matrix products and
// attention, so they are written plainly and left to the compiler's vectoriser.
#pragma once

#include <cmath>
#include <cstdint>
#include <vector>

#include "attnkit/core/error.hpp"
#include "attnkit/core/simd.hpp"
#include "attnkit/core/threading.hpp"
#include "attnkit/core/view.hpp"

namespace attnkit::ops {

// y = w * (x / sqrt(mean(x^2) + eps)) for one row of n elements (Qwen3RMSNorm; w multiplies
// after normalising). y may equal x.
inline void rms_norm_row(const float* x, const float* w, float eps, float* y, std::int64_t n) {
  // Double accumulation removes the length dependence of fp32 sums. Eight partial sums (element
  // i into part[i % 8], added up in a fixed tree) let the loop vectorise: one chain of dependent
  // double adds made the norms of a 512-token prefill 0.05 s of Qwen3-0.6B's 2.1 s on the AMX
  // host (the stage profile's "layer.norm" and "attn.qk_norm", core/stage_profile.hpp).
  double part[8] = {};
  std::int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    for (int j = 0; j < 8; ++j) part[j] += static_cast<double>(x[i + j]) * x[i + j];
  for (int j = 0; i < n; ++i, ++j) part[j] += static_cast<double>(x[i]) * x[i];
  const double ss = ((part[0] + part[1]) + (part[2] + part[3])) + ((part[4] + part[5]) + (part[6] + part[7]));
  const float inv = static_cast<float>(1.0 / std::sqrt(ss / static_cast<double>(n) + eps));
  for (std::int64_t i = 0; i < n; ++i) y[i] = w[i] * (x[i] * inv);
}

// Row-wise RMSNorm of x [rows, n] into y [rows, n] (y may alias x).
inline void rms_norm(ConstView2<float> x, const float* w, float eps, View2<float> y, int threads = 0) {
  ATTNKIT_REQUIRE(x.shape == y.shape, "rms_norm: argument 'y': shape ", detail::shape_string(y),
                  " differs from x ", detail::shape_string(x));
  const std::int64_t rows = x.shape[0];
  parallel_for(rows, rows >= 16 ? threads : 1, [&](std::int64_t r) { ATTNKIT_FAULT_POINT("ops"); rms_norm_row(x.ptr(r), w, eps, y.ptr(r), x.shape[1]); });
}

// Per-head RMSNorm in place over x [tokens, heads, d] (Qwen3's q_norm / k_norm).
inline void rms_norm_heads(View3<float> x, const float* w, float eps, int threads = 0) {
  parallel_for(x.shape[0], x.shape[0] >= 16 ? threads : 1, [&](std::int64_t t) {
    ATTNKIT_FAULT_POINT("ops");
    for (std::int64_t h = 0; h < x.shape[1]; ++h) rms_norm_row(x.ptr(t, h), w, eps, x.ptr(t, h), x.shape[2]);
  });
}

// Rotate-half RoPE (spec §1.3): dimension i pairs with i + d/2; angle = position * inv_freq_i,
// inv_freq_i = theta^(-2i/d) computed in float32 as Hugging Face does.
class Rope {
 public:
  Rope() = default;
  Rope(std::int64_t head_dim, double theta) : d_(head_dim) {
    ATTNKIT_REQUIRE(head_dim > 0 && head_dim % 2 == 0, "Rope: argument 'head_dim': must be positive and even, got ",
                    head_dim);
    ATTNKIT_REQUIRE(theta > 0, "Rope: argument 'theta': must be positive, got ", theta);
    inv_freq_.resize(static_cast<std::size_t>(d_ / 2));
    for (std::int64_t i = 0; i < d_ / 2; ++i) {
      const float expo = static_cast<float>(2 * i) / static_cast<float>(d_);
      inv_freq_[i] = 1.0f / static_cast<float>(std::pow(static_cast<float>(theta), expo));
    }
  }
  std::int64_t head_dim() const { return d_; }

  // cos / sin of every angle for tokens at positions pos0 .. pos0+T-1: computed once per step
  // and shared by q, k and every layer.
  struct Angles {
    std::int64_t pos0 = 0, tokens = 0, half = 0;
    std::vector<float> cos, sin;  // [tokens, half]
  };
  Angles angles(std::int64_t pos0, std::int64_t tokens) const {
    Angles a{pos0, tokens, d_ / 2, {}, {}};
    a.cos.resize(static_cast<std::size_t>(tokens * a.half));
    a.sin.resize(a.cos.size());
    for (std::int64_t t = 0; t < tokens; ++t) {
      const float p = static_cast<float>(pos0 + t);
      for (std::int64_t i = 0; i < a.half; ++i) {
        const float ang = p * inv_freq_[i];  // float32 product, as the reference computes the angle
        a.cos[t * a.half + i] = static_cast<float>(std::cos(static_cast<double>(ang)));
        a.sin[t * a.half + i] = static_cast<float>(std::sin(static_cast<double>(ang)));
      }
    }
    return a;
  }

  // Applies RoPE in place to x [tokens, heads, d] with precomputed angles for those tokens.
  void apply(View3<float> x, const Angles& a, int threads = 0) const {
    ATTNKIT_REQUIRE(x.shape[2] == d_, "Rope::apply: argument 'x': head_dim ", x.shape[2], " != ", d_);
    ATTNKIT_REQUIRE(x.shape[0] == a.tokens && a.half == d_ / 2, "Rope::apply: argument 'angles': made for ", a.tokens,
                    " tokens of head_dim ", 2 * a.half, ", x has ", x.shape[0], " of ", d_);
    const std::int64_t half = d_ / 2;
    parallel_for(x.shape[0], x.shape[0] >= 16 ? threads : 1, [&](std::int64_t t) {
      ATTNKIT_FAULT_POINT("ops");
      const float* c = a.cos.data() + t * half;
      const float* s = a.sin.data() + t * half;
      for (std::int64_t h = 0; h < x.shape[1]; ++h) {
        float* v = x.ptr(t, h);
        for (std::int64_t i = 0; i < half; ++i) {
          const float p = v[i], q = v[i + half];
          v[i] = p * c[i] - q * s[i];
          v[i + half] = q * c[i] + p * s[i];
        }
      }
    });
  }
  // Convenience: token t of x at absolute position pos0 + t.
  void apply(View3<float> x, std::int64_t pos0) const { apply(x, angles(pos0, x.shape[0]), 1); }

 private:
  std::int64_t d_ = 0;
  std::vector<float> inv_freq_;
};

// act[t, i] = SiLU(gu[t, i]) * gu[t, I + i] for gu [T, 2I] (gate rows first, then up), act [T, I].
inline void silu_mul(ConstView2<float> gate_up, View2<float> act, int threads = 0) {
  const std::int64_t I = act.shape[1];
  ATTNKIT_REQUIRE(gate_up.shape[1] == 2 * I && gate_up.shape[0] == act.shape[0],
                  "silu_mul: argument 'act': shape ", detail::shape_string(act), " does not match gate_up ",
                  detail::shape_string(gate_up));
  using B = simd::fbatch<>;
  constexpr std::int64_t W = static_cast<std::int64_t>(B::size);
  parallel_for(act.shape[0], act.shape[0] >= 4 ? threads : 1, [&](std::int64_t t) {
    ATTNKIT_FAULT_POINT("ops");
    const float* g = gate_up.ptr(t);
    const float* u = g + I;
    float* y = act.ptr(t);
    std::int64_t i = 0;
    for (; i + W <= I; i += W) (simd::silu(B::load_unaligned(g + i)) * B::load_unaligned(u + i)).store_unaligned(y + i);
    for (; i < I; ++i) y[i] = g[i] / (1.0f + std::exp(-g[i])) * u[i];
  });
}

// y += x over [rows, n], rows split over `threads` (from 16 rows).
inline void add_inplace(View2<float> y, ConstView2<float> x, int threads = 1) {
  ATTNKIT_REQUIRE(x.shape == y.shape, "add_inplace: argument 'x': shape ", detail::shape_string(x), " != ",
                  detail::shape_string(y));
  parallel_for(y.shape[0], y.shape[0] >= 16 ? threads : 1, [&](std::int64_t r) {
    ATTNKIT_FAULT_POINT("ops");
    float* a = y.ptr(r);
    const float* b = x.ptr(r);
    for (std::int64_t i = 0; i < y.shape[1]; ++i) a[i] += b[i];
  });
}

// Index of the largest element (lowest index on ties); NaN is never chosen over a number.
inline std::int64_t argmax(const float* x, std::int64_t n) {
  std::int64_t best = 0;
  for (std::int64_t i = 1; i < n; ++i)
    if (x[i] > x[best] || (std::isnan(x[best]) && !std::isnan(x[i]))) best = i;
  return best;
}

}  // namespace attnkit::ops
