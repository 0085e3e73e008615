// attnkit/attention/merge.hpp — merging attention states computed over disjoint key sets
// (FlashInfer merge_state).
//
// An attention state for one (query, head) is (o, lse): o the softmax-weighted average of the
// values of some key set S, lse = log Σ_{s∈S} exp(logit_s) (natural log, scaled logits). For two
// disjoint key sets A and B the state over A ∪ B is
//     o   = (e^{lse_a} o_a + e^{lse_b} o_b) / (e^{lse_a} + e^{lse_b})
//     lse = log(e^{lse_a} + e^{lse_b}),
// computed relative to max(lse_a, lse_b) so nothing overflows. An empty key set has lse = -inf
// (its o is ignored); merging two empty sets gives o = 0, lse = -inf (never NaN).
// Shapes: o_* [T, H, d] f32 (any strides, last dimension contiguous), lse_* [T, H].
// The output may be exactly the same memory as a or b (element-wise in-place); partial overlap
// is not supported.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>

#include "attnkit/core/error.hpp"
#include "attnkit/core/simd.hpp"
#include "attnkit/core/threading.hpp"
#include "attnkit/core/view.hpp"

namespace attnkit {

namespace detail {

// Weights (w_a, w_b) with w_a + w_b = 1 and the merged lse. Both -inf gives (0, 0, -inf).
struct MergeWeights {
  float wa, wb, lse;
};

inline MergeWeights merge_weights(float lse_a, float lse_b) {
  constexpr float ninf = -std::numeric_limits<float>::infinity();
  if (lse_a == ninf && lse_b == ninf) return {0.f, 0.f, ninf};
  if (lse_b == ninf) return {1.f, 0.f, lse_a};
  if (lse_a == ninf) return {0.f, 1.f, lse_b};
  const float m = std::max(lse_a, lse_b);
  const float ea = std::exp(lse_a - m), eb = std::exp(lse_b - m);  // one of them is exactly 1
  const float sum = ea + eb;
  return {ea / sum, eb / sum, m + std::log1p(std::min(ea, eb))};
}

// out[i] = wa * a[i] + wb * b[i]; out may be a or b.
inline void blend_row(float* out, const float* a, float wa, const float* b, float wb, std::int64_t d) {
  using batch = simd::fbatch<>;
  constexpr std::int64_t W = static_cast<std::int64_t>(simd::width<>);
  const batch va(wa), vb(wb);
  std::int64_t i = 0;
  for (; i + W <= d; i += W) simd::store(out + i, simd::fma(va, simd::load(a + i), vb * simd::load(b + i)));
  for (; i < d; ++i) out[i] = std::fma(wa, a[i], wb * b[i]);
}

}  // namespace detail

// Merges (o_b, lse_b) into (o_a, lse_a) in place, over d elements. lse_b = -inf leaves a as it
// is; lse_a = -inf copies b; both -inf sets o_a to 0.
inline void merge_state_inplace(float* o_a, float& lse_a, const float* o_b, float lse_b, std::int64_t d) {
  const detail::MergeWeights w = detail::merge_weights(lse_a, lse_b);
  if (w.wb == 0.f && w.wa == 1.f) return;  // nothing to add (or b's weight underflowed to 0)
  if (w.wa == 0.f && w.wb == 0.f) {
    std::fill(o_a, o_a + d, 0.f);
  } else if (w.wa == 0.f) {
    std::copy(o_b, o_b + d, o_a);
  } else {
    detail::blend_row(o_a, o_a, w.wa, o_b, w.wb, d);
  }
  lse_a = w.lse;
}

// out[t, h, :] and lse_out[t, h] = merge of the states a and b at (t, h). lse_out is optional.
inline void merge_states(ConstView3<float> o_a, ConstView2<float> lse_a, ConstView3<float> o_b,
                         ConstView2<float> lse_b, View3<float> out, View2<float> lse_out = {}) {
  constexpr const char* fn = "merge_states";
  check_view(o_a, fn, "o_a");
  check_view(o_b, fn, "o_b");
  check_view(lse_a, fn, "lse_a");
  check_view(lse_b, fn, "lse_b");
  check_view(out, fn, "out");
  ATTNKIT_REQUIRE(o_b.shape == o_a.shape, fn, ": argument 'o_b': shape ", detail::shape_string(o_b),
                  " differs from 'o_a' shape ", detail::shape_string(o_a));
  ATTNKIT_REQUIRE(out.shape == o_a.shape, fn, ": argument 'out': shape ", detail::shape_string(out),
                  " differs from 'o_a' shape ", detail::shape_string(o_a));
  const std::int64_t T = o_a.shape[0], H = o_a.shape[1], d = o_a.shape[2];
  ATTNKIT_REQUIRE(lse_a.shape[0] == T && lse_a.shape[1] == H, fn, ": argument 'lse_a': shape ",
                  detail::shape_string(lse_a), " must be [T, H] = [", T, ", ", H, "]");
  ATTNKIT_REQUIRE(lse_b.shape[0] == T && lse_b.shape[1] == H, fn, ": argument 'lse_b': shape ",
                  detail::shape_string(lse_b), " must be [T, H] = [", T, ", ", H, "]");
  const bool want_lse = !lse_out.empty();
  if (want_lse) {
    check_view(lse_out, fn, "lse_out");
    ATTNKIT_REQUIRE(lse_out.shape[0] == T && lse_out.shape[1] == H, fn, ": argument 'lse_out': shape ",
                    detail::shape_string(lse_out), " must be [T, H] = [", T, ", ", H, "]");
  }

  auto merge_token = [&](std::int64_t t) {
    ATTNKIT_FAULT_POINT("merge");
    for (std::int64_t h = 0; h < H; ++h) {
      const detail::MergeWeights w = detail::merge_weights(lse_a(t, h), lse_b(t, h));
      float* o = out.ptr(t, h);
      const float* a = o_a.ptr(t, h);
      const float* b = o_b.ptr(t, h);
      if (w.wa == 0.f && w.wb == 0.f) std::fill(o, o + d, 0.f);
      else if (w.wb == 0.f && w.wa == 1.f) { if (o != a) std::copy(a, a + d, o); }
      else if (w.wa == 0.f && w.wb == 1.f) { if (o != b) std::copy(b, b + d, o); }
      else detail::blend_row(o, a, w.wa, b, w.wb, d);
      if (want_lse) lse_out(t, h) = w.lse;
    }
  };
  // Rows are independent, so threading changes no bits; small merges stay on the caller's thread.
  const int threads = T * H * d >= (std::int64_t{1} << 16) ? 0 : 1;
  parallel_for(T, threads, merge_token);
}

}  // namespace attnkit
