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

#include <Eigen/Dense>

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
  ATTNKIT_REQUIRE(Hk > 0 && Hv > 0 && Hv % Hk == 0, fn, ": argument 'v': value heads (", Hv,
                  ") must be a positive multiple of the key heads of q and k (", Hk, ")");
  ATTNKIT_REQUIRE(dk > 0 && dv > 0, fn, ": arguments 'q' and 'v': head dims must be positive, got d_k ", dk, ", d_v ", dv);
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

// dst = x · factor / sqrt(|x|² + eps) (when normalising) or x · factor. The sum of squares is
// accumulated in float32 over SIMD lanes (a scalar float64 loop cost as much as a decode update).
inline void normalise(const float* x, float* dst, std::int64_t n, bool l2, float eps, float factor) {
  using B = simd::fbatch<>;
  constexpr std::int64_t W = static_cast<std::int64_t>(B::size);
  float f = factor;
  if (l2) {
    B acc0(0.f), acc1(0.f);
    std::int64_t i = 0;
    for (; i + 2 * W <= n; i += 2 * W) {
      const B a = B::load_unaligned(x + i), b = B::load_unaligned(x + i + W);
      acc0 = xsimd::fma(a, a, acc0);
      acc1 = xsimd::fma(b, b, acc1);
    }
    for (; i + W <= n; i += W) {
      const B a = B::load_unaligned(x + i);
      acc0 = xsimd::fma(a, a, acc0);
    }
    float ss = simd::reduce_add(acc0 + acc1);
    for (; i < n; ++i) ss += x[i] * x[i];
    f = factor / std::sqrt(ss + eps);
  }
  const B fb(f);
  std::int64_t i = 0;
  for (; i + W <= n; i += W) (B::load_unaligned(x + i) * fb).store_unaligned(dst + i);
  for (; i < n; ++i) dst[i] = x[i] * f;
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


using RowMatrix = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
using MatrixMap = Eigen::Map<RowMatrix, Eigen::Unaligned, Eigen::OuterStride<>>;

inline MatrixMap matrix(float* p, std::int64_t rows, std::int64_t cols, std::int64_t row_stride) {
  return MatrixMap(p, rows, cols, Eigen::OuterStride<>(row_stride));
}

// exp(x) for x <= 0 (positive x works too, until exp overflows), 16 lanes at a time.
template <class B>
inline B exp_batch(B x) {
  return simd::exp2_nonpositive(x * B(1.4426950408889634f));
}

// Per-head buffers of the chunked path, sized for chunks of C tokens (allocated once per head).
struct ChunkScratch {
  std::int64_t C, dk, dv;
  std::vector<float> qk;    // [2C, dk]: the chunk's q̂ rows, then its k̂ rows (one [Q; K] operand)
  std::vector<float> p;     // [2C, dv]: [Q; K] S
  std::vector<float> gram;  // [2C, C]: [Q; K] K^T, then A (top) and the solve's matrix (bottom)
  std::vector<float> vt;    // [C, dv]: Ṽ
  std::vector<float> gam, eg, edec, beta;  // [C]: Γ_r, e^Γ_r, e^(Γ_c − Γ_r), β_r
  ChunkScratch(std::int64_t C_, std::int64_t dk_, std::int64_t dv_)
      : C(C_), dk(dk_), dv(dv_), qk(static_cast<std::size_t>(2 * C * dk)), p(static_cast<std::size_t>(2 * C * dv)),
        gram(static_cast<std::size_t>(2 * C * C)), vt(static_cast<std::size_t>(C * dv)), gam(static_cast<std::size_t>(C)),
        eg(gam.size()), edec(gam.size()), beta(gam.size()) {}
};

// One value head, tokens [0, T), in chunks of opt.chunk tokens (spec §7.4, with the pseudo-values
// computed as Ṽ = (I − L)^-1 diag(β) (V − diag(e^Γ) K̂ S): the same as U − W S, without forming W).
inline void chunked_head(ConstView3<float> q, ConstView3<float> k, ConstView3<float> v, ConstView2<float> g,
                         ConstView2<float> beta, float* S_ptr, std::int64_t ss, View3<float> out, std::int64_t h,
                         std::int64_t j, const GatedDeltaOptions& opt, float scale) {
  using B = simd::fbatch<>;
  constexpr std::int64_t W = static_cast<std::int64_t>(B::size);
  const std::int64_t T = q.shape[0], dk = q.shape[2], dv = v.shape[2], C = std::min(opt.chunk, T);
  ChunkScratch sc(C, dk, dv);
  auto S = matrix(S_ptr, dk, dv, ss);
  for (std::int64_t t0 = 0; t0 < T; t0 += C) {
    const std::int64_t c = std::min(C, T - t0);
    // Normalised rows, cumulative log decay and its exponentials.
    for (std::int64_t r = 0; r < c; ++r) {
      normalise(q.ptr(t0 + r, j), sc.qk.data() + r * dk, dk, opt.qk_l2norm, opt.l2_eps, scale);
      normalise(k.ptr(t0 + r, j), sc.qk.data() + (c + r) * dk, dk, opt.qk_l2norm, opt.l2_eps, 1.f);
      sc.gam[r] = (r ? sc.gam[r - 1] : 0.f) + g(t0 + r, h);
      sc.beta[r] = beta(t0 + r, h);
    }
    for (std::int64_t r = 0; r < c; ++r) {
      sc.eg[r] = std::exp(sc.gam[r]);
      sc.edec[r] = std::exp(sc.gam[c - 1] - sc.gam[r]);
    }
    auto QK = matrix(sc.qk.data(), 2 * c, dk, dk);
    auto K = matrix(sc.qk.data() + c * dk, c, dk, dk);
    auto G = matrix(sc.gram.data(), 2 * c, c, c);
    auto P = matrix(sc.p.data(), 2 * c, dv, dv);
    auto Vt = matrix(sc.vt.data(), c, dv, dv);
    G.noalias() = QK * K.transpose();
    P.noalias() = QK * S;
    // A_rs = (q̂_r·k̂_s) D_rs (s <= r) and N_rs = β_r (k̂_r·k̂_s) D_rs (s < r): I − L = I + N.
    for (std::int64_t r = 0; r < c; ++r) {
      float* a = sc.gram.data() + r * c;
      float* n = sc.gram.data() + (c + r) * c;
      const B gr(sc.gam[r]), br(sc.beta[r]);
      std::int64_t s = 0;
      for (; s + W <= r + 1; s += W) {
        const B d = exp_batch(gr - B::load_unaligned(sc.gam.data() + s));
        (B::load_unaligned(a + s) * d).store_unaligned(a + s);
        (B::load_unaligned(n + s) * d * br).store_unaligned(n + s);
      }
      for (; s <= r; ++s) {
        const float d = std::exp(sc.gam[r] - sc.gam[s]);
        a[s] *= d;
        n[s] *= d * sc.beta[r];
      }
    }
    // R = diag(β) (V − diag(e^Γ) K̂ S); then Ṽ = (I + N)^-1 R.
    for (std::int64_t r = 0; r < c; ++r) {
      const float* vr = v.ptr(t0 + r, h);
      const float* pr = sc.p.data() + (c + r) * dv;
      float* o = sc.vt.data() + r * dv;
      for (std::int64_t col = 0; col < dv; ++col) o[col] = sc.beta[r] * (vr[col] - sc.eg[r] * pr[col]);
    }
    G.bottomRows(c).triangularView<Eigen::UnitLower>().solveInPlace(Vt);
    // O = diag(e^Γ) Q̂ S + A Ṽ.
    auto O = matrix(out.ptr(t0, h), c, dv, out.stride[0]);
    O = Eigen::Map<Eigen::VectorXf>(sc.eg.data(), c).asDiagonal() * P.topRows(c);
    O.noalias() += G.topRows(c).triangularView<Eigen::Lower>() * Vt;
    // S ← e^Γ_c S + K̂^T diag(e^(Γ_c − Γ)) Ṽ.
    S *= sc.eg[c - 1];
    Vt = Eigen::Map<Eigen::VectorXf>(sc.edec.data(), c).asDiagonal() * Vt;
    S.noalias() += K.transpose() * Vt;
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

// The chunked path for every head (see the file comment).
inline void gated_delta_chunked(ConstView3<float> q, ConstView3<float> k, ConstView3<float> v, ConstView2<float> g,
                                ConstView2<float> beta, View3<float> state, View3<float> out,
                                const GatedDeltaOptions& opt = {}) {
  const std::int64_t group = detail_gdn::check(q, k, v, g, beta, state, out, opt);
  ATTNKIT_REQUIRE(state.stride[2] == 1, "gated_delta_rule: argument 'state': last dimension must be contiguous");
  if (q.shape[0] == 0) return;
  const float scale = opt.scale != 0.f ? opt.scale : 1.f / std::sqrt(static_cast<float>(q.shape[2]));
  parallel_for(v.shape[1], opt.num_threads, [&](std::int64_t h) {
    detail_gdn::chunked_head(q, k, v, g, beta, state.ptr(h), state.stride[1], out, h, h / group, opt, scale);
  });
}

// Either path by opt.mode (automatic: recurrent for T <= opt.recurrent_max_tokens, else chunked).
inline void gated_delta_rule(ConstView3<float> q, ConstView3<float> k, ConstView3<float> v, ConstView2<float> g,
                             ConstView2<float> beta, View3<float> state, View3<float> out, const GatedDeltaOptions& opt = {}) {
  const bool recurrent = opt.mode == GatedDeltaMode::recurrent ||
                         (opt.mode == GatedDeltaMode::automatic && q.shape[0] <= opt.recurrent_max_tokens);
  if (recurrent) gated_delta_recurrent(q, k, v, g, beta, state, out, opt);
  else gated_delta_chunked(q, k, v, g, beta, state, out, opt);
}

}  // namespace attnkit
