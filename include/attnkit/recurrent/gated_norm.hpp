// attnkit/recurrent/gated_norm.hpp — the gated RMSNorm at the output of Gated DeltaNet (spec §7.5;
// Qwen3-Next's RMSNormGated, fla's FusedRMSNormSwishGate):
//
//     y = w ⊙ (x / sqrt(mean(x²) + eps)) ⊙ SiLU(z)        per head, over its d values
//
// Shapes: x, z, y [T, H, d] (last dimension contiguous; y may be x); w [d], shared by the heads.
// Computed in float32 (the mean in double, as attnkit's RMSNorm does).
#pragma once

#include <cmath>
#include <cstdint>

#include "attnkit/core/error.hpp"
#include "attnkit/core/threading.hpp"
#include "attnkit/core/view.hpp"

namespace attnkit {

inline void gated_rms_norm(ConstView3<float> x, ConstView3<float> z, const float* w, float eps, View3<float> y,
                           int num_threads = 0) {
  const char* fn = "gated_rms_norm";
  check_view(x, fn, "x");
  check_view(z, fn, "z");
  check_view(y, fn, "y");
  ATTNKIT_REQUIRE(z.shape == x.shape, fn, ": argument 'z': shape ", detail::shape_string(z), " differs from x ",
                  detail::shape_string(x));
  ATTNKIT_REQUIRE(y.shape == x.shape, fn, ": argument 'y': shape ", detail::shape_string(y), " differs from x ",
                  detail::shape_string(x));
  ATTNKIT_REQUIRE(w != nullptr, fn, ": argument 'w': null");
  ATTNKIT_REQUIRE(eps >= 0.f, fn, ": argument 'eps': must be non-negative, got ", eps);
  const std::int64_t T = x.shape[0], H = x.shape[1], d = x.shape[2];
  parallel_for(T, T >= 16 ? num_threads : 1, [&](std::int64_t t) {
    ATTNKIT_FAULT_POINT("recurrent");
    for (std::int64_t h = 0; h < H; ++h) {
      const float* xi = x.ptr(t, h);
      const float* zi = z.ptr(t, h);
      float* yi = y.ptr(t, h);
      double ss = 0;
      for (std::int64_t i = 0; i < d; ++i) ss += static_cast<double>(xi[i]) * xi[i];
      const float inv = static_cast<float>(1.0 / std::sqrt(ss / static_cast<double>(d) + eps));
      for (std::int64_t i = 0; i < d; ++i) yi[i] = w[i] * (xi[i] * inv) * (zi[i] / (1.f + std::exp(-zi[i])));
    }
  });
}

}  // namespace attnkit
