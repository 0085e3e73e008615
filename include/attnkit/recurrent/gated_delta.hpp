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
// Two paths, float32 throughout, give the same numbers to about 1e-6 relative:
//  * recurrent (decode, a few tokens): token by token, per token a read pass over S for S^T k̂
//    and S^T q̂, then one update pass S ← αS + k̂ δ^T (o follows from both: no third pass); S
//    stays in cache (64 KiB at d = 128);
//  * chunked (prefill): spec §7.4's WY / UT form over chunks of opt.chunk tokens (the last one
//    shorter; nothing is padded in memory). Ṽ = (I − L)^-1 diag(β) (V − diag(e^Γ) K̂ S) comes from
//    one forward substitution (equal to U − W S, without forming M or W); the products —
//    [Q; K] K^T and [Q; K] S (one [Q; K] operand for both), A Ṽ, K̂^T Ṽ — run in register-tiled
//    SIMD kernels on per-thread buffers padded to whole batches, skipping the zero triangles.
//    Work: about 1.4x the recurrence's 6·d_k·d_v flops per token at C = 64, d = 128, at a far
//    better rate (about twice the recurrent path's tokens/s, per core). The next chunk's rows
//    are prefetched during a chunk's products (the rows of one head are short runs in separate
//    pages, which the hardware prefetchers do not fetch ahead).
//    Not Eigen: with Eigen 3.4's products the whole path reached 0.34-0.39 of one core's FMA
//    peak (with these kernels 0.45-0.5), and an Eigen product called outside a parallel region
//    starts an OpenMP team of its own.
// GatedDeltaMode::automatic takes the recurrent path for T ≤ opt.recurrent_max_tokens (the
// chunked path is faster from about 5 tokens at 16 heads of d 128).
// Heads are independent, so threads take value heads (dynamically); each head's arithmetic is the
// same on any number of threads (bit-identical results). Each thread keeps one grow-only scratch
// block across calls (about 0.3 MiB at C = 64, d = 128); nothing is allocated per token.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <iterator>
#include <memory>
#include <vector>

#include "attnkit/core/error.hpp"
#include "attnkit/core/memory.hpp"
#include "attnkit/core/simd.hpp"
#include "attnkit/core/threading.hpp"
#include "attnkit/core/view.hpp"

namespace attnkit {

enum class GatedDeltaMode { automatic, recurrent, chunked };

struct GatedDeltaOptions {
  GatedDeltaMode mode = GatedDeltaMode::automatic;
  std::int64_t chunk = 64;                // chunk length of the chunked path (far longer chunks lose accuracy: ~1e-5 at 300)
  std::int64_t recurrent_max_tokens = 4;  // automatic: recurrent up to this many tokens (measured crossover ~5)
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
      acc0 = simd::fma(a, a, acc0);
      acc1 = simd::fma(b, b, acc1);
    }
    for (; i + W <= n; i += W) {
      const B a = B::load_unaligned(x + i);
      acc0 = simd::fma(a, a, acc0);
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

using Batch = simd::fbatch<>;
inline constexpr std::int64_t kW = static_cast<std::int64_t>(Batch::size);
inline std::int64_t padded(std::int64_t n) { return (n + kW - 1) / kW * kW; }

// exp(x) for x <= 0 (positive x works too, until exp overflows), a batch at a time.
inline Batch exp_batch(Batch x) { return simd::exp2_nonpositive(x * Batch(1.4426950408889634f)); }

// Cache lines to fetch into L2 while the products run: a register tile asks for one every
// kPrefetchEvery steps of its depth loop, so the requests trickle out between the arithmetic (a
// burst of prefetches stalls as soon as the line fill buffers are busy, and so do the products'
// own L2 reads behind it).
struct LineQueue {
  const float* const* next = nullptr;
  const float* const* end = nullptr;
  void drain() {
    for (; next != end; ++next) __builtin_prefetch(*next, 0, 2);
  }
};
inline constexpr std::int64_t kPrefetchEvery = 4;

// What C starts from in gemm: C ← diag(row_scale) X + A B, or scale · X + A B without row_scale,
// where X is `from` (row stride ld_from) or else C itself; scale 0 and no row_scale: C ← A B
// (nothing is read).
struct GemmInit {
  const float* row_scale = nullptr;
  float scale = 0.f;
  const float* from = nullptr;
  std::int64_t ld_from = 0;
};

// One register tile: C[0:R, 0:NV·kW] = init + A[0:R, 0:depth] B[0:depth, 0:NV·kW], row-major.
// R·NV accumulators stay in registers; each step loads NV batches of B and broadcasts R of A.
template <int R, int NV>
inline void gemm_tile(const float* A, std::int64_t lda, const float* B, std::int64_t ldb, float* C, std::int64_t ldc,
                      std::int64_t depth, GemmInit init, LineQueue& lines) {
  Batch acc[R][NV];
  const bool read_c = init.row_scale != nullptr || init.scale != 0.f;
  for (int i = 0; i < R; ++i) {
    const Batch s(init.row_scale ? init.row_scale[i] : init.scale);
    const float* x = init.from ? init.from + i * init.ld_from : C + i * ldc;
    for (int v = 0; v < NV; ++v) acc[i][v] = read_c ? Batch::load_unaligned(x + v * kW) * s : Batch(0.f);
  }
  for (std::int64_t p = 0; p < depth; ++p) {
    if (p % kPrefetchEvery == 0 && lines.next != lines.end) __builtin_prefetch(*lines.next++, 0, 2);
    Batch b[NV];
    for (int v = 0; v < NV; ++v) b[v] = Batch::load_unaligned(B + p * ldb + v * kW);
    for (int i = 0; i < R; ++i) {
      const Batch a(A[i * lda + p]);
      for (int v = 0; v < NV; ++v) acc[i][v] = simd::fma(a, b[v], acc[i][v]);
    }
  }
  for (int i = 0; i < R; ++i)
    for (int v = 0; v < NV; ++v) acc[i][v].store_unaligned(C + i * ldc + v * kW);
}

inline constexpr int kTileRows = 6, kTileBatches = 4;  // 24 accumulators of 32 registers (AVX-512)
using TileFn = void (*)(const float*, std::int64_t, const float*, std::int64_t, float*, std::int64_t, std::int64_t,
                        GemmInit, LineQueue&);
template <int R>
inline constexpr TileFn tile_row[kTileBatches] = {&gemm_tile<R, 1>, &gemm_tile<R, 2>, &gemm_tile<R, 3>, &gemm_tile<R, 4>};
inline constexpr const TileFn* tile_table[kTileRows] = {tile_row<1>, tile_row<2>, tile_row<3>,
                                                        tile_row<4>, tile_row<5>, tile_row<6>};

// Which part of a product is needed: all of it; only columns <= row (row i's columns past i are
// left unwritten, up to whole batches); or A is lower-triangular (A[i, p] = 0 for p > i), so a
// row block stops its depth at its last row.
enum class Tri { none, lower_cols, lower_depth };

// C[m, n] = init + A[m, depth] B[depth, n], row-major with leading dimensions; n a multiple of kW.
// Column panels of kTileBatches batches outside, so a panel of B stays in L1 across row tiles.
inline void gemm(std::int64_t m, std::int64_t n, std::int64_t depth, const float* A, std::int64_t lda, const float* B,
                 std::int64_t ldb, float* C, std::int64_t ldc, LineQueue& lines, GemmInit init = {},
                 Tri tri = Tri::none) {
  for (std::int64_t j0 = 0; j0 < n; j0 += kTileBatches * kW) {
    const std::int64_t nv = std::min<std::int64_t>(kTileBatches, (n - j0) / kW);
    for (std::int64_t i0 = tri == Tri::lower_cols ? j0 : 0; i0 < m; i0 += kTileRows) {
      const std::int64_t r = std::min<std::int64_t>(kTileRows, m - i0);
      const std::int64_t nvb = tri == Tri::lower_cols ? std::min(nv, (i0 + r - j0 + kW - 1) / kW) : nv;
      const std::int64_t dep = tri == Tri::lower_depth ? std::min(depth, i0 + r) : depth;
      GemmInit in = init;
      if (in.row_scale) in.row_scale += i0;
      if (in.from) in.from += i0 * in.ld_from + j0;
      tile_table[r - 1][nvb - 1](A + i0 * lda, lda, B + j0, ldb, C + i0 * ldc + j0, ldc, dep, in, lines);
    }
  }
}

// Thread scratch use (core/memory.hpp thread_scratch), reused across calls and heads.
struct HeadScratch;

// u = S^T k̂ and w = S^T q̂ over the NV batches of columns at S's column 0 (rows of stride ss),
// accumulated in registers.
template <int NV>
inline void read_columns(const float* S, std::int64_t ss, std::int64_t dk, const float* kn, const float* qn, float* u,
                         float* w) {
  Batch au[NV], aw[NV];
  for (int b = 0; b < NV; ++b) au[b] = aw[b] = Batch(0.f);
  for (std::int64_t i = 0; i < dk; ++i) {
    const Batch ki(kn[i]), qi(qn[i]);
    for (int b = 0; b < NV; ++b) {
      const Batch x = Batch::load_unaligned(S + i * ss + b * kW);
      au[b] = simd::fma(ki, x, au[b]);
      aw[b] = simd::fma(qi, x, aw[b]);
    }
  }
  for (int b = 0; b < NV; ++b) {
    au[b].store_unaligned(u + b * kW);
    aw[b].store_unaligned(w + b * kW);
  }
}

// One value head, tokens [0, T), token by token; S: [d_k, d_v] with row stride ss. Per token two
// passes over S: a read-only one for u = S^T k̂ and w = S^T q̂, then the update
// S ← α S + k̂ δ^T with δ = β (v − α u). The output needs no third pass:
// o = S'^T q̂ = α w + (k̂·q̂) δ.
inline void recurrent_head(ConstView3<float> q, ConstView3<float> k, ConstView3<float> v, ConstView2<float> g,
                           ConstView2<float> beta, float* S, std::int64_t ss, View3<float> out, std::int64_t h,
                           std::int64_t j, const GatedDeltaOptions& opt, float scale) {
  constexpr std::int64_t kBlock = 4;  // batches of columns per read pass: 8 accumulators
  using Fn = void (*)(const float*, std::int64_t, std::int64_t, const float*, const float*, float*, float*);
  static constexpr Fn read_fns[kBlock] = {&read_columns<1>, &read_columns<2>, &read_columns<3>, &read_columns<4>};
  const std::int64_t T = q.shape[0], dk = q.shape[2], dv = v.shape[2];
  float* qn = thread_scratch<HeadScratch>().get(2 * padded(dk) + 3 * padded(dv));
  float* kn = qn + padded(dk);
  float* u = kn + padded(dk);
  float* w = u + padded(dv);
  float* delta = w + padded(dv);
  const std::int64_t full = dv / kW * kW;  // columns in whole batches; the rest one by one
  for (std::int64_t t = 0; t < T; ++t) {
    normalise(q.ptr(t, j), qn, dk, opt.qk_l2norm, opt.l2_eps, scale);
    normalise(k.ptr(t, j), kn, dk, opt.qk_l2norm, opt.l2_eps, 1.f);
    const float alpha = std::exp(g(t, h)), b = beta(t, h), kq = simd::dot(kn, qn, dk);
    const float* vt = v.ptr(t, h);
    float* o = out.ptr(t, h);
    for (std::int64_t c0 = 0; c0 < full; c0 += kBlock * kW)
      read_fns[std::min(kBlock, (full - c0) / kW) - 1](S + c0, ss, dk, kn, qn, u + c0, w + c0);
    for (std::int64_t c = full; c < dv; ++c) {
      float su = 0.f, sw = 0.f;
      for (std::int64_t i = 0; i < dk; ++i) {
        su += kn[i] * S[i * ss + c];
        sw += qn[i] * S[i * ss + c];
      }
      u[c] = su;
      w[c] = sw;
    }
    for (std::int64_t c = 0; c < dv; ++c) {
      delta[c] = b * (vt[c] - alpha * u[c]);
      o[c] = alpha * w[c] + kq * delta[c];
    }
    const Batch a(alpha);
    for (std::int64_t i = 0; i < dk; ++i) {
      float* row = S + i * ss;
      const Batch ki(kn[i]);
      for (std::int64_t c = 0; c < full; c += kW)
        simd::fma(ki, Batch::load_unaligned(delta + c), Batch::load_unaligned(row + c) * a).store_unaligned(row + c);
      for (std::int64_t c = full; c < dv; ++c) row[c] = kn[i] * delta[c] + row[c] * alpha;
    }
  }
}

// The chunked path's buffers for chunks of up to C tokens, carved from one scratch block. Row
// lengths are padded to whole batches (dkp, dvp, Cp) and the padding is zero (or finite and never
// used) where a product reads it, so every product runs on whole batches.
struct ChunkBuffers {
  std::int64_t C, Cp, dkp, dvp;
  float* qk;   // [2C, dkp]: the chunk's q̂ rows, then its k̂ rows (one [Q; K] operand)
  float* kt;   // [dkp, Cp]: K̂^T, later with diag(e^(Γ_c − Γ)) applied to its columns
  float* S;    // [dkp, dvp]: the head's state
  float* P;    // [2C, dvp]: [Q; K] S, then O in the top half
  float* G;    // [2C, Cp]: [Q; K] K^T (lower parts), then N in the bottom half
  float* A;    // [C, Cp]: (Q̂ K̂^T) ⊙ D, lower with diagonal
  float* V;    // [C, dvp]: diag(β) (V − diag(e^Γ) K̂ S), then Ṽ
  float *gam, *eg, *edec, *beta;  // [Cp]: Γ_r, e^Γ_r, e^(Γ_c − Γ_r), β_r

  ChunkBuffers(std::int64_t C_, std::int64_t dk, std::int64_t dv)
      : C(C_), Cp(padded(C_)), dkp(padded(dk)), dvp(padded(dv)) {
    const std::int64_t sizes[] = {2 * C * dkp, dkp * Cp, dkp * dvp, 2 * C * dvp, 2 * C * Cp, C * Cp,
                                  C * dvp,     Cp,       Cp,        Cp,          Cp};
    std::int64_t total = 0;
    for (std::int64_t n : sizes) total += n;
    float* p = thread_scratch<HeadScratch>().get(total);
    float** slots[] = {&qk, &kt, &S, &P, &G, &A, &V, &gam, &eg, &edec, &beta};
    for (std::size_t i = 0; i < std::size(slots); ++i) {
      *slots[i] = p;
      p += sizes[i];
    }
    // Products read q̂/k̂ columns past d_k and K̂^T rows past d_k: zero.
    std::fill(qk, qk + 2 * C * dkp, 0.f);
    std::fill(kt, kt + dkp * Cp, 0.f);
  }
};

// dst[i * ldd + r] = src[r * lds + i] for r < rows, i < cols (a transpose), in 16 x 16 blocks
// held in AVX-512 registers where possible.
inline void transpose(const float* src, std::int64_t lds, float* dst, std::int64_t ldd, std::int64_t rows,
                      std::int64_t cols) {
  std::int64_t r0 = 0;
#if defined(__AVX512F__)
  for (; r0 + 16 <= rows; r0 += 16) {
    std::int64_t i0 = 0;
    for (; i0 + 16 <= cols; i0 += 16) {
      __m512 x[16];
      for (int r = 0; r < 16; ++r) x[r] = _mm512_loadu_ps(src + (r0 + r) * lds + i0);
      // Three rounds of pairwise interleaves (32-bit, 64-bit, 128-bit lanes), then 256-bit halves.
      __m512 t[16];
      for (int r = 0; r < 16; r += 2) {
        t[r] = _mm512_unpacklo_ps(x[r], x[r + 1]);
        t[r + 1] = _mm512_unpackhi_ps(x[r], x[r + 1]);
      }
      for (int r = 0; r < 16; r += 4)
        for (int u = 0; u < 2; ++u) {
          x[r + u] = _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(t[r + u]), _mm512_castps_pd(t[r + u + 2])));
          x[r + u + 2] = _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(t[r + u]), _mm512_castps_pd(t[r + u + 2])));
        }
      for (int r = 0; r < 16; r += 8)
        for (int u = 0; u < 4; ++u) {
          t[r + u] = _mm512_shuffle_f32x4(x[r + u], x[r + u + 4], 0x88);
          t[r + u + 4] = _mm512_shuffle_f32x4(x[r + u], x[r + u + 4], 0xdd);
        }
      for (int u = 0; u < 8; ++u) {
        x[u] = _mm512_shuffle_f32x4(t[u], t[u + 8], 0x88);
        x[u + 8] = _mm512_shuffle_f32x4(t[u], t[u + 8], 0xdd);
      }
      // x[m] now holds column i0 + kColumn[m] of the block's 16 rows.
      constexpr int kColumn[16] = {0, 2, 1, 3, 4, 6, 5, 7, 8, 10, 9, 11, 12, 14, 13, 15};
      for (int m = 0; m < 16; ++m) _mm512_storeu_ps(dst + (i0 + kColumn[m]) * ldd + r0, x[m]);
    }
    for (std::int64_t i = i0; i < cols; ++i)
      for (std::int64_t r = r0; r < r0 + 16; ++r) dst[i * ldd + r] = src[r * lds + i];
  }
#endif
  for (std::int64_t r = r0; r < rows; ++r)
    for (std::int64_t i = 0; i < cols; ++i) dst[i * ldd + r] = src[r * lds + i];
}

// Lane indices 0, 1, 2, ... of a batch, as floats (masks by column).
alignas(64) inline constexpr float kLaneIndex[64] = {0,  1,  2,  3,  4,  5,  6,  7,  8,  9,  10, 11, 12, 13, 14, 15,
                                                     16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 29, 30, 31,
                                                     32, 33, 34, 35, 36, 37, 38, 39, 40, 41, 42, 43, 44, 45, 46, 47,
                                                     48, 49, 50, 51, 52, 53, 54, 55, 56, 57, 58, 59, 60, 61, 62, 63};
static_assert(kW <= 64);

// Forward substitution Ṽ_r = R_r − Σ_{s<r} N_rs Ṽ_s over rows r < c, in place in V (row stride ldv),
// NV batches of columns at a time held in registers.
template <int NV>
inline void substitute_block(const float* N, std::int64_t ldn, float* V, std::int64_t ldv, std::int64_t c) {
  for (std::int64_t r = 0; r < c; ++r) {
    Batch acc[NV];
    float* vr = V + r * ldv;
    for (int u = 0; u < NV; ++u) acc[u] = Batch::load_unaligned(vr + u * kW);
    const float* nr = N + r * ldn;
    for (std::int64_t s = 0; s < r; ++s) {
      const Batch f(-nr[s]);
      for (int u = 0; u < NV; ++u) acc[u] = simd::fma(f, Batch::load_unaligned(V + s * ldv + u * kW), acc[u]);
    }
    for (int u = 0; u < NV; ++u) acc[u].store_unaligned(vr + u * kW);
  }
}

inline void substitute(const float* N, std::int64_t ldn, float* V, std::int64_t ldv, std::int64_t c, std::int64_t n) {
  constexpr std::int64_t kBlock = 8;  // 8 independent FMA chains per row: enough to cover the FMA latency
  using Fn = void (*)(const float*, std::int64_t, float*, std::int64_t, std::int64_t);
  static constexpr Fn fns[kBlock] = {&substitute_block<1>, &substitute_block<2>, &substitute_block<3>,
                                     &substitute_block<4>, &substitute_block<5>, &substitute_block<6>,
                                     &substitute_block<7>, &substitute_block<8>};
  for (std::int64_t j0 = 0; j0 < n; j0 += kBlock * kW)
    fns[std::min<std::int64_t>(kBlock, (n - j0) / kW) - 1](N, ldn, V + j0, ldv, c);
}

// The cache lines of tokens [t, t + n) of head h (key head j) that a chunk reads (q, k, v, g,
// beta) and writes (out), row by row, in a per-thread list; returned as a queue over it.
inline LineQueue next_chunk_lines(ConstView3<float> q, ConstView3<float> k, ConstView3<float> v, ConstView2<float> g,
                                  ConstView2<float> beta, View3<float> out, std::int64_t h, std::int64_t j, std::int64_t t,
                                  std::int64_t n) {
  thread_local std::vector<const float*> list;
  constexpr std::int64_t kLine = 64 / static_cast<std::int64_t>(sizeof(float));
  const std::int64_t dk = q.shape[2], dv = v.shape[2];
  list.clear();
  list.reserve(static_cast<std::size_t>(std::max<std::int64_t>(n, 0) * (2 * (dk / kLine + 1) + 2 * (dv / kLine + 1) + 2)));
  const auto add_row = [&](const float* p, std::int64_t floats) {
    for (std::int64_t i = 0; i < floats; i += kLine) list.push_back(p + i);
  };
  for (std::int64_t r = 0; r < n; ++r) {
    add_row(q.ptr(t + r, j), dk);
    add_row(k.ptr(t + r, j), dk);
    add_row(v.ptr(t + r, h), dv);
    add_row(out.ptr(t + r, h), dv);
    list.push_back(&g(t + r, h));
    list.push_back(&beta(t + r, h));
  }
  return {list.data(), list.data() + list.size()};
}

// One value head, tokens [0, T), in chunks of opt.chunk tokens (spec §7.4). The pseudo-values are
// computed as Ṽ = (I − L)^-1 diag(β) (V − diag(e^Γ) K̂ S), which equals U − W S without forming W
// or M: one forward substitution. [Q; K] is one operand of the products with K^T and with S.
// S: [d_k, d_v] with row stride ss, read at the start and written at the end.
inline void chunked_head(ConstView3<float> q, ConstView3<float> k, ConstView3<float> v, ConstView2<float> g,
                         ConstView2<float> beta, float* S_io, std::int64_t ss, View3<float> out, std::int64_t h,
                         std::int64_t j, const GatedDeltaOptions& opt, float scale) {
  const std::int64_t T = q.shape[0], dk = q.shape[2], dv = v.shape[2];
  ChunkBuffers b(std::min(opt.chunk, T), dk, dv);
  const std::int64_t Cp = b.Cp, dkp = b.dkp, dvp = b.dvp;
  for (std::int64_t i = 0; i < dkp; ++i) {
    float* row = b.S + i * dvp;
    if (i < dk) std::copy(S_io + i * ss, S_io + i * ss + dv, row);
    std::fill(row + (i < dk ? dv : 0), row + dvp, 0.f);
  }
  const Batch lanes = Batch::load_aligned(kLaneIndex);
  for (std::int64_t t0 = 0; t0 < T; t0 += b.C) {
    const std::int64_t c = std::min(b.C, T - t0), cp = padded(c);
    float* kq = b.qk + c * dkp;  // the k̂ rows
    // Normalised rows, K̂^T, cumulative log decay and its exponentials. A tail chunk's padding
    // tokens get g = 0, β = 0 and zero keys, as spec §7.4 pads.
    for (std::int64_t r = 0; r < c; ++r) {
      normalise(q.ptr(t0 + r, j), b.qk + r * dkp, dk, opt.qk_l2norm, opt.l2_eps, scale);
      normalise(k.ptr(t0 + r, j), kq + r * dkp, dk, opt.qk_l2norm, opt.l2_eps, 1.f);
      b.gam[r] = (r ? b.gam[r - 1] : 0.f) + g(t0 + r, h);
      b.beta[r] = beta(t0 + r, h);
    }
    transpose(kq, dkp, b.kt, Cp, c, dk);
    for (std::int64_t r = c; r < cp; ++r) {
      for (std::int64_t i = 0; i < dk; ++i) b.kt[i * Cp + r] = 0.f;
      b.gam[r] = b.gam[c - 1];
      b.beta[r] = 0.f;
    }
    for (std::int64_t r = 0; r < cp; r += kW) {
      const Batch gm = Batch::load_aligned(b.gam + r);
      exp_batch(gm).store_aligned(b.eg + r);
      exp_batch(Batch(b.gam[c - 1]) - gm).store_aligned(b.edec + r);
    }
    // The next chunk's rows (q, k, v, g, beta to read, out to write) are fetched into L2 during
    // this chunk's products; the hardware prefetchers would not (each row is a short run in
    // another page), and a cold row costs a DRAM round trip.
    LineQueue lines = next_chunk_lines(q, k, v, g, beta, out, h, j, t0 + c, std::min(b.C, T - t0 - c));
    // G = [Q; K] K^T, lower parts only; P = [Q; K] S.
    gemm(c, cp, dkp, b.qk, dkp, b.kt, Cp, b.G, Cp, lines, {}, Tri::lower_cols);
    gemm(c, cp, dkp, kq, dkp, b.kt, Cp, b.G + c * Cp, Cp, lines, {}, Tri::lower_cols);
    gemm(2 * c, dvp, dkp, b.qk, dkp, b.S, dvp, b.P, dvp, lines);
    // A_rs = (q̂_r·k̂_s) D_rs for s <= r and N_rs = β_r (k̂_r·k̂_s) D_rs for s < r (so I − L = I + N),
    // D_rs = exp(Γ_r − Γ_s); A is zero elsewhere up to Cp (the products read whole batches).
    for (std::int64_t r = 0; r < c; ++r) {
      float* a = b.A + r * Cp;
      float* n = b.G + (c + r) * Cp;
      const Batch gr(b.gam[r]), br(b.beta[r]), rb(static_cast<float>(r));
      std::int64_t s = 0;
      for (; s <= r; s += kW) {
        const Batch d = exp_batch(gr - Batch::load_aligned(b.gam + s));
        const Batch col = lanes + Batch(static_cast<float>(s));
        xsimd::select(col <= rb, Batch::load_aligned(b.G + r * Cp + s) * d, Batch(0.f)).store_aligned(a + s);
        xsimd::select(col < rb, Batch::load_aligned(n + s) * d * br, Batch(0.f)).store_aligned(n + s);
      }
      std::fill(a + s, a + Cp, 0.f);
    }
    // V = diag(β) (V − diag(e^Γ) K̂ S), then Ṽ = (I + N)^-1 V in place.
    for (std::int64_t r = 0; r < c; ++r) {
      const float* vr = v.ptr(t0 + r, h);
      const float* pk = b.P + (c + r) * dvp;
      float* o = b.V + r * dvp;
      const float br = b.beta[r], er = b.eg[r];
      for (std::int64_t col = 0; col < dv; ++col) o[col] = br * (vr[col] - er * pk[col]);
      std::fill(o + dv, o + dvp, 0.f);
    }
    substitute(b.G + c * Cp, Cp, b.V, dvp, c, dvp);
    // O = diag(e^Γ) Q̂ S + A Ṽ: straight into out when its rows are whole batches, else into the
    // top half of P and copied.
    if (dv == dvp) {
      gemm(c, dvp, c, b.A, Cp, b.V, dvp, out.ptr(t0, h), out.stride[0], lines, {b.eg, 0.f, b.P, dvp}, Tri::lower_depth);
    } else {
      gemm(c, dvp, c, b.A, Cp, b.V, dvp, b.P, dvp, lines, {b.eg, 0.f}, Tri::lower_depth);
      for (std::int64_t r = 0; r < c; ++r) std::copy(b.P + r * dvp, b.P + r * dvp + dv, out.ptr(t0 + r, h));
    }
    // S ← e^Γ_c S + (diag(e^(Γ_c − Γ)) K̂)^T Ṽ.
    for (std::int64_t i = 0; i < dk; ++i)
      for (std::int64_t r = 0; r < cp; r += kW)
        (Batch::load_aligned(b.kt + i * Cp + r) * Batch::load_aligned(b.edec + r)).store_aligned(b.kt + i * Cp + r);
    gemm(dk, dvp, c, b.kt, Cp, b.V, dvp, b.S, dvp, lines, {nullptr, b.eg[c - 1]});
    lines.drain();  // whatever is left (small shapes have short products)
  }
  for (std::int64_t i = 0; i < dk; ++i) std::copy(b.S + i * dvp, b.S + i * dvp + dv, S_io + i * ss);
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
    ATTNKIT_FAULT_POINT("recurrent");
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
  // Heads handed out one at a time: a core slowed by other work takes fewer of them.
  parallel_for(v.shape[1], opt.num_threads, [&](std::int64_t h) {
    ATTNKIT_FAULT_POINT("recurrent");
    detail_gdn::chunked_head(q, k, v, g, beta, state.ptr(h), state.stride[1], out, h, h / group, opt, scale);
  }, /*dynamic=*/true);
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
