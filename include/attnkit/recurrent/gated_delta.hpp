// attnkit/recurrent/gated_delta.hpp — the gated delta rule (Gated DeltaNet's token mixer; spec §7).
//
// Per value head h (key head j = h / (H_v / H_k)), with q̂ = c · q / sqrt(|q|² + eps),
// k̂ = k / sqrt(|k|² + eps) (c = d_k^-1/2 by default) and the state S [d_k, d_v]:
//
//     S ← exp(g_t) · S;   δ = β_t (v_t − S^T k̂_t);   S ← S + k̂_t δ^T;   o_t = S^T q̂_t
//
// Shapes: q, k [T, H_k, d_k]; v [T, H_v, d_v]; g (log decay, ≤ 0 in practice) and beta [T, H_v];
// state [H_v, d_k, d_v] f32, read as the initial state (zero it for none) and overwritten with
// the final state; out [T, H_v, d_v]. Any strides with a contiguous last dimension; out must not
// overlap the inputs or the state.
//
// Two paths give the same numbers to about 1e-6 relative:
//  * recurrent: the update above token by token (decode, short prompts): two passes over S per
//    token, S stays in cache (64 KiB at d = 128);
//  * chunked: the WY / UT form of spec §7.4 over chunks of opt.chunk tokens, whose products
//    are small dense matrix multiplications (prefill: O(T·C·d + T·d²) work in matrix products).
// GatedDeltaMode::automatic takes the recurrent path for T ≤ opt.recurrent_max_tokens.
// Heads are independent, so threads split the value heads; each head's arithmetic is the same
// on any number of threads (bit-identical results).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "attnkit/core/error.hpp"
#include "attnkit/core/simd.hpp"
#include "attnkit/core/threading.hpp"
#include "attnkit/core/view.hpp"

namespace attnkit {

enum class GatedDeltaMode { automatic, recurrent, chunked };

struct GatedDeltaOptions {
  GatedDeltaMode mode = GatedDeltaMode::automatic;
  std::int64_t chunk = 64;                // chunk length of the chunked path
  std::int64_t recurrent_max_tokens = 16; // automatic: recurrent up to this many tokens
  bool qk_l2norm = true;                  // L2-normalise q and k inside (Qwen3-Next / fla use_qk_l2norm_in_kernel)
  float l2_eps = 1e-6f;                   // under the square root
  float scale = 0.f;                      // 0 -> d_k^-1/2
  int num_threads = 0;                    // 0: OpenMP default
};

namespace detail_gdn {

// Shared checks of both paths; returns the GVA group size H_v / H_k.
inline std::int64_t check(ConstView3<float> q, ConstView3<float> k, ConstView3<float> v, ConstView2<float> g,
                          ConstView2<float> beta, View3<float> state, View3<float> out, const GatedDeltaOptions& opt) {
  const char* fn = "gated_delta_rule";
  check_view(q, fn, "q");
  check_view(k, fn, "k");
  check_view(v, fn, "v");
  check_view(g, fn, "g");
  check_view(beta, fn, "beta");
  check_view(state, fn, "state");
  check_view(out, fn, "out");
  const std::int64_t T = q.shape[0], Hk = q.shape[1], dk = q.shape[2], Hv = v.shape[1], dv = v.shape[2];
  ATTNKIT_REQUIRE(k.shape == q.shape, fn, ": argument 'k': shape ", detail::shape_string(k), " differs from q ",
                  detail::shape_string(q));
  ATTNKIT_REQUIRE(v.shape[0] == T, fn, ": argument 'v': ", v.shape[0], " tokens, q has ", T);
  ATTNKIT_REQUIRE(Hk > 0 && Hv > 0 && Hv % Hk == 0, fn, ": value heads (", Hv, ") must be a positive multiple of key heads (",
                  Hk, ")");
  ATTNKIT_REQUIRE(dk > 0 && dv > 0, fn, ": head dims must be positive, got d_k ", dk, ", d_v ", dv);
  ATTNKIT_REQUIRE(g.shape[0] == T && g.shape[1] == Hv, fn, ": argument 'g': shape ", detail::shape_string(g), ", expected [",
                  T, ", ", Hv, "]");
  ATTNKIT_REQUIRE(beta.shape[0] == T && beta.shape[1] == Hv, fn, ": argument 'beta': shape ", detail::shape_string(beta),
                  ", expected [", T, ", ", Hv, "]");
  ATTNKIT_REQUIRE(state.shape[0] == Hv && state.shape[1] == dk && state.shape[2] == dv, fn, ": argument 'state': shape ",
                  detail::shape_string(state), ", expected [", Hv, ", ", dk, ", ", dv, "]");
  ATTNKIT_REQUIRE(out.shape[0] == T && out.shape[1] == Hv && out.shape[2] == dv, fn, ": argument 'out': shape ",
                  detail::shape_string(out), ", expected [", T, ", ", Hv, ", ", dv, "]");
  ATTNKIT_REQUIRE(opt.chunk >= 1 && opt.chunk <= 1024, fn, ": option 'chunk' must be in [1, 1024], got ", opt.chunk);
  ATTNKIT_REQUIRE(opt.l2_eps >= 0.f, fn, ": option 'l2_eps' must be non-negative, got ", opt.l2_eps);
  return Hv / Hk;
}

// dst = x · factor / sqrt(|x|² + eps) (when normalising) or x · factor.
inline void normalise(const float* x, float* dst, std::int64_t n, bool l2, float eps, float factor) {
  float f = factor;
  if (l2) {
    double ss = 0;
    for (std::int64_t i = 0; i < n; ++i) ss += static_cast<double>(x[i]) * x[i];
    f = static_cast<float>(factor / std::sqrt(ss + eps));
  }
  for (std::int64_t i = 0; i < n; ++i) dst[i] = x[i] * f;
}

// One value head, tokens [0, T), token by token. S: [d_k, d_v] with row stride ss.
inline void recurrent_head(ConstView3<float> q, ConstView3<float> k, ConstView3<float> v, ConstView2<float> g,
                           ConstView2<float> beta, float* S, std::int64_t ss, View3<float> out, std::int64_t h,
                           std::int64_t j, const GatedDeltaOptions& opt, float scale) {
  using B = simd::fbatch<>;
  constexpr std::int64_t W = static_cast<std::int64_t>(B::size);
  const std::int64_t T = q.shape[0], dk = q.shape[2], dv = v.shape[2];
  std::vector<float> qn(static_cast<std::size_t>(dk)), kn(qn.size()), u(static_cast<std::size_t>(dv));
  for (std::int64_t t = 0; t < T; ++t) {
    normalise(q.ptr(t, j), qn.data(), dk, opt.qk_l2norm, opt.l2_eps, scale);
    normalise(k.ptr(t, j), kn.data(), dk, opt.qk_l2norm, opt.l2_eps, 1.f);
    const float alpha = std::exp(g(t, h)), b = beta(t, h);
    const float* vt = v.ptr(t, h);
    float* o = out.ptr(t, h);
    // Pass 1: decay S and read the memory at k̂: u = S^T k̂.
    std::fill(u.begin(), u.end(), 0.f);
    for (std::int64_t i = 0; i < dk; ++i) {
      float* row = S + i * ss;
      const B a(alpha), ki(kn[i]);
      std::int64_t c = 0;
      for (; c + W <= dv; c += W) {
        const B s = B::load_unaligned(row + c) * a;
        s.store_unaligned(row + c);
        xsimd::fma(ki, s, B::load_unaligned(u.data() + c)).store_unaligned(u.data() + c);
      }
      for (; c < dv; ++c) {
        row[c] *= alpha;
        u[c] += kn[i] * row[c];
      }
    }
    // δ = β (v − u), kept in u.
    for (std::int64_t c = 0; c < dv; ++c) u[c] = b * (vt[c] - u[c]);
    // Pass 2: S += k̂ δ^T and o = S^T q̂.
    std::fill(o, o + dv, 0.f);
    for (std::int64_t i = 0; i < dk; ++i) {
      float* row = S + i * ss;
      const B ki(kn[i]), qi(qn[i]);
      std::int64_t c = 0;
      for (; c + W <= dv; c += W) {
        const B s = xsimd::fma(ki, B::load_unaligned(u.data() + c), B::load_unaligned(row + c));
        s.store_unaligned(row + c);
        xsimd::fma(qi, s, B::load_unaligned(o + c)).store_unaligned(o + c);
      }
      for (; c < dv; ++c) {
        row[c] += kn[i] * u[c];
        o[c] += qn[i] * row[c];
      }
    }
  }
}

}  // namespace detail_gdn

// The recurrent path for every head (see the file comment).
inline void gated_delta_recurrent(ConstView3<float> q, ConstView3<float> k, ConstView3<float> v, ConstView2<float> g,
                                  ConstView2<float> beta, View3<float> state, View3<float> out,
                                  const GatedDeltaOptions& opt = {}) {
  const std::int64_t group = detail_gdn::check(q, k, v, g, beta, state, out, opt);
  ATTNKIT_REQUIRE(state.stride[2] == 1, "gated_delta_rule: argument 'state': last dimension must be contiguous");
  const float scale = opt.scale != 0.f ? opt.scale : 1.f / std::sqrt(static_cast<float>(q.shape[2]));
  parallel_for(v.shape[1], opt.num_threads, [&](std::int64_t h) {
    detail_gdn::recurrent_head(q, k, v, g, beta, state.ptr(h), state.stride[1], out, h, h / group, opt, scale);
  });
}

// Either path by opt.mode (automatic: recurrent for T <= opt.recurrent_max_tokens, else chunked).
// TEMPORARY until the chunked path lands: every mode runs the recurrent path.
inline void gated_delta_rule(ConstView3<float> q, ConstView3<float> k, ConstView3<float> v, ConstView2<float> g,
                             ConstView2<float> beta, View3<float> state, View3<float> out, const GatedDeltaOptions& opt = {}) {
  gated_delta_recurrent(q, k, v, g, beta, state, out, opt);
}

}  // namespace attnkit
