// attnkit/depth/attnres.hpp — Attention Residuals' depth routing (shared/spec/semantics.md §5):
// a per-token softmax over earlier layer outputs with one static learned query.
//
// For every token t (row t of each source), with sources V_0 .. V_{N-1} and the partial V_N:
//   logit_n = q · RMSNorm(V_n[t]) = (q ⊙ γ) · V_n[t] / rms(V_n[t]),
//             rms(v) = sqrt(mean(v²) + eps)                      (no 1/sqrt(D) scale)
//   logit_N += bias                                              (the recency bias)
//   w = softmax_n(logit)                                         (over n = 0..N)
//   out[t] = residual[t] + Σ_n w_n V_n[t]                        (residual: Delta AttnRes; else 0)
// The routing mixes nothing across tokens: any token range can be computed alone.
// Without a partial (DepthSource{}), the softmax runs over the N sources alone and the bias
// must be 0 (Delta AttnRes, spec §5.3). Infinite logits: a +inf logit (bias = +inf: "always the
// partial") takes all the weight, shared equally among +inf logits, and the others get exactly 0,
// so out is then exactly the partial; if every logit is -inf the weights are uniform. NaN in a
// source propagates to its token's output.
//
// Why the kernel is shaped this way (the cost is reading the sources, D floats per source per
// token, against 4·D flops):
//  * the norm weight is folded into the query (AttnResQuery::norm_weight, or once by the caller
//    with attnres_fold_query) so RMSNorm never materialises;
//  * 1/rms is computed in the same pass as the dot product, or taken from the source
//    (DepthSource::inv_rms, attnres_inv_rms) when the caller keeps it: a source routed by many
//    sublayers needs it once;
//  * the queries are static, so a caller that knows every query a source will meet can score
//    the source against all of them once, when it is made (one small GEMM, the paper's "phase
//    1"), and pass the logits (DepthSource::logits): the call then reads such a source once,
//    for the weighted sum, instead of twice;
//  * tokens are processed in tiles small enough that a tile's rows of all sources stay in L2
//    between the logit pass and the weighted sum, so each source is read from memory once;
//    the weighted sum (L2-bound) asks for the next tile's rows, so memory never waits on it;
//  * measured (benchmarks/bench_attnres.cpp, 2 threads, sources from DRAM): about half of the
//    read roofline. A plain sum over the same rows reaches 0.85 of it and the same loop with the
//    dot/square FMAs 0.65: what is left is memory-level parallelism lost to the compute
//    interleaved with the loads, not the access pattern.
//  * sources are caller-owned rows (float32 or bf16, any row stride; stride 0 broadcasts one
//    row, e.g. a learned null source): nothing is stacked or copied.
// Results are bit-identical for any thread count (threads split whole tokens; each token's
// arithmetic is fixed). Arguments are validated up front: violations throw attnkit::Error naming
// the function and the argument. out must not overlap any source; residual may be out itself.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <span>
#include <vector>

#include "attnkit/core/bf16.hpp"
#include "attnkit/core/error.hpp"
#include "attnkit/core/simd.hpp"
#include "attnkit/core/threading.hpp"
#include "attnkit/core/view.hpp"

namespace attnkit {

// One routed source: `rows` rows of `cols` values (float32 or bf16) at `row_stride` elements
// apart, owned by the caller. inv_rms (optional, [rows]): 1 / sqrt(mean(v²) + eps) per row,
// computed with the route's eps (attnres_inv_rms); null: the kernel computes it. logits
// (optional): this call's logit of row t, q · RMSNorm(v_t) without the bias, at
// logits[t * logit_stride]; the kernel then reads the row only for the weighted sum.
struct DepthSource {
  const float* f32 = nullptr;
  const bf16* b16 = nullptr;
  std::int64_t rows = 0, cols = 0, row_stride = 0;
  const float* inv_rms = nullptr;
  const float* logits = nullptr;
  std::int64_t logit_stride = 1;

  DepthSource() = default;
  DepthSource(ConstView2<float> v, const float* inv = nullptr)
      : f32(v.data), rows(v.shape[0]), cols(v.shape[1]), row_stride(v.stride[0]), inv_rms(inv), inner_(v.stride[1]) {}
  DepthSource(ConstView2<bf16> v, const float* inv = nullptr)
      : b16(v.data), rows(v.shape[0]), cols(v.shape[1]), row_stride(v.stride[0]), inv_rms(inv), inner_(v.stride[1]) {}
  // One row [cols] seen as `rows` identical rows (row stride 0).
  static DepthSource broadcast(const float* row, std::int64_t rows, std::int64_t cols) {
    return DepthSource(ConstView2<float>(row, {rows, cols}, {0, 1}));
  }

  bool present() const { return f32 != nullptr || b16 != nullptr; }
  std::int64_t inner_stride() const { return inner_; }
  std::size_t element_bytes() const { return b16 ? sizeof(bf16) : sizeof(float); }

 private:
  std::int64_t inner_ = 1;
};

// The learned query of one routing call. proj: the pseudo-query [D]; norm_weight: the key
// RMSNorm's weight γ [D] (null: proj already holds proj ⊙ γ); bias: added to the partial's
// logit; eps: the RMSNorm epsilon.
struct AttnResQuery {
  const float* proj = nullptr;
  const float* norm_weight = nullptr;
  float bias = 0.f;
  float eps = 1e-6f;
};

struct AttnResOptions {
  View2<float> weights;        // optional [T, N(+1)]: the softmax weights (empty view: skipped)
  ConstView2<float> residual;  // optional [T, D] added to the routed sum (Delta AttnRes)
  int num_threads = 0;         // 0: OpenMP default
};

// proj ⊙ γ into folded [D] (what the kernel does per call when AttnResQuery::norm_weight is set).
inline void attnres_fold_query(const float* proj, const float* norm_weight, std::int64_t D, float* folded) {
  for (std::int64_t i = 0; i < D; ++i) folded[i] = proj[i] * (norm_weight ? norm_weight[i] : 1.f);
}

namespace detail {

template <class Arch, class T>
inline float sum_squares(const T* v, std::int64_t n) {
  return simd::dot<Arch>(v, v, n);
}

// q · v and v · v in one read of v.
template <class Arch, class T>
inline void dot_and_squares(const float* q, const T* v, std::int64_t n, float& dot, float& sq) {
  using B = simd::fbatch<Arch>;
  constexpr std::int64_t W = static_cast<std::int64_t>(simd::width<Arch>);
  B d0(0.f), d1(0.f), s0(0.f), s1(0.f);
  std::int64_t i = 0;
  for (; i + 2 * W <= n; i += 2 * W) {
    const B a = simd::load<Arch>(v + i), b = simd::load<Arch>(v + i + W);
    d0 = simd::fma(simd::load<Arch>(q + i), a, d0);
    d1 = simd::fma(simd::load<Arch>(q + i + W), b, d1);
    s0 = simd::fma(a, a, s0);
    s1 = simd::fma(b, b, s1);
  }
  for (; i + W <= n; i += W) {
    const B a = simd::load<Arch>(v + i);
    d0 = simd::fma(simd::load<Arch>(q + i), a, d0);
    s0 = simd::fma(a, a, s0);
  }
  dot = simd::reduce_add<Arch>(d0 + d1);
  sq = simd::reduce_add<Arch>(s0 + s1);
  for (; i < n; ++i) {
    const float x = to_float(v[i]);
    dot += q[i] * x;
    sq += x * x;
  }
}

inline float inv_rms_of(float sum_sq, std::int64_t D, float eps) {
  return static_cast<float>(1.0 / std::sqrt(static_cast<double>(sum_sq) / static_cast<double>(D) + eps));
}

// Softmax of logits[0..n) in place; +inf logits share all the weight, all -inf: uniform.
inline void depth_softmax(float* w, std::int64_t n) {
  float m = -std::numeric_limits<float>::infinity();
  for (std::int64_t i = 0; i < n; ++i) m = std::max(m, w[i]);
  if (std::isinf(m)) {
    std::int64_t hits = 0;
    for (std::int64_t i = 0; i < n; ++i) hits += w[i] == m;
    for (std::int64_t i = 0; i < n; ++i) w[i] = w[i] == m ? 1.f / static_cast<float>(hits) : 0.f;
    return;
  }
  float sum = 0.f;
  for (std::int64_t i = 0; i < n; ++i) sum += (w[i] = std::exp(w[i] - m));
  const float r = 1.f / sum;
  for (std::int64_t i = 0; i < n; ++i) w[i] *= r;
}

// Asks for the cache lines of row t of s (a row of D = 1024 floats is one 4 KiB page: the
// hardware prefetchers stop at page boundaries, so each source row would otherwise start cold).
// Always inlined: GCC deems a function whose only effect is prefetching side-effect free and
// deletes calls to it that it does not inline.
[[gnu::always_inline]] inline void prefetch_row(const DepthSource& s, std::int64_t t, std::int64_t D) {
  const char* p = s.f32 ? reinterpret_cast<const char*>(s.f32 + t * s.row_stride)
                        : reinterpret_cast<const char*>(s.b16 + t * s.row_stride);
  const std::int64_t bytes = D * static_cast<std::int64_t>(s.element_bytes());
  for (std::int64_t b = 0; b < bytes; b += 64) __builtin_prefetch(p + b, 0, 2);
}

// The rows of tile [t0, t1) in the order the logit pass reads them: source-major.
struct TileRows {
  std::span<const DepthSource> src;
  std::int64_t t0 = 0, t1 = 0;
  std::int64_t count() const { return static_cast<std::int64_t>(src.size()) * (t1 - t0); }
  [[gnu::always_inline]] void prefetch(std::int64_t i, std::int64_t D) const {
    if (i < count()) prefetch_row(src[static_cast<std::size_t>(i / (t1 - t0))], t0 + i % (t1 - t0), D);
  }
};

// One token tile. The memory stays busy throughout: the logit pass prefetches a few rows ahead
// of itself, and the weighted sum (which reads the tile from L2) prefetches the next tile.
template <class Arch>
void attnres_tile(std::span<const DepthSource> src, const float* q, float bias, float eps, bool bias_last,
                  std::int64_t t0, std::int64_t t1, std::int64_t next_t1, View2<float> out, const AttnResOptions& opt,
                  float* logits) {
  constexpr std::int64_t kAhead = 8;  // rows the logit pass runs ahead of itself
  const std::int64_t S = static_cast<std::int64_t>(src.size()), D = out.shape[1], rows = t1 - t0;
  const TileRows here{src, t0, t1}, next{src, t1, next_t1};
  // Pass 1: one logit per (token, source), reading each row once.
  for (std::int64_t n = 0; n < S; ++n) {
    const DepthSource& s = src[static_cast<std::size_t>(n)];
    for (std::int64_t t = t0; t < t1; ++t) {
      here.prefetch(n * rows + (t - t0) + kAhead, D);
      if (s.logits) {
        logits[(t - t0) * S + n] = s.logits[t * s.logit_stride];
        continue;
      }
      float dot, sq, inv;
      if (s.f32) {
        const float* row = s.f32 + t * s.row_stride;
        if (s.inv_rms) dot = simd::dot<Arch>(q, row, D), inv = s.inv_rms[t];
        else dot_and_squares<Arch>(q, row, D, dot, sq), inv = inv_rms_of(sq, D, eps);
      } else {
        const bf16* row = s.b16 + t * s.row_stride;
        if (s.inv_rms) dot = simd::dot<Arch>(q, row, D), inv = s.inv_rms[t];
        else dot_and_squares<Arch>(q, row, D, dot, sq), inv = inv_rms_of(sq, D, eps);
      }
      logits[(t - t0) * S + n] = dot * inv;
    }
  }
  // Pass 2: softmax per token, then the weighted sum of the (cache-resident) rows; one row of the
  // next tile is asked for per row summed, so the next tile arrives while this one finishes.
  const std::int64_t per_row = std::max<std::int64_t>(1, (next.count() + rows * S - 1) / std::max<std::int64_t>(rows * S, 1));
  std::int64_t ahead = 0;
  for (std::int64_t t = t0; t < t1; ++t) {
    float* w = logits + (t - t0) * S;
    if (bias_last) w[S - 1] += bias;
    depth_softmax(w, S);
    if (!opt.weights.empty()) std::copy(w, w + S, opt.weights.ptr(t));
    float* o = out.ptr(t);
    if (!opt.residual.empty()) {
      const float* r = opt.residual.ptr(t);
      if (r != o) std::copy(r, r + D, o);
    } else {
      std::fill(o, o + D, 0.f);
    }
    for (std::int64_t n = 0; n < S; ++n) {
      for (std::int64_t k = 0; k < per_row; ++k) next.prefetch(ahead++, D);
      const DepthSource& s = src[static_cast<std::size_t>(n)];
      if (s.f32) simd::axpy<Arch>(w[n], s.f32 + t * s.row_stride, o, D);
      else simd::axpy<Arch>(w[n], s.b16 + t * s.row_stride, o, D);
    }
  }
}

inline bool overlaps(const void* a0, std::size_t abytes, const void* b0, std::size_t bbytes) {
  const auto a = reinterpret_cast<std::uintptr_t>(a0), b = reinterpret_cast<std::uintptr_t>(b0);
  return a < b + bbytes && b < a + abytes;
}

}  // namespace detail

// Routes over `sources` and the optional `partial` (DepthSource{}: none) into out [T, D].
template <class Arch = simd::default_arch>
void attnres_route(std::span<const DepthSource> sources, const DepthSource& partial, const AttnResQuery& query,
                   View2<float> out, const AttnResOptions& opt = {}) {
  constexpr const char* fn = "attnres_route";
  check_view(out, fn, "out");
  const std::int64_t T = out.shape[0], D = out.shape[1];
  ATTNKIT_REQUIRE(D >= 1, fn, ": argument 'out': needs at least one column, got shape ", detail::shape_string(out));
  ATTNKIT_REQUIRE(query.proj != nullptr, fn, ": argument 'query': null proj pointer");
  ATTNKIT_REQUIRE(std::isfinite(query.eps) && query.eps >= 0.f, fn, ": argument 'query': eps must be finite and >= 0, got ",
                  query.eps);
  ATTNKIT_REQUIRE(!std::isnan(query.bias), fn, ": argument 'query': bias is NaN");
  ATTNKIT_REQUIRE(partial.present() || query.bias == 0.f, fn, ": argument 'query': a bias (", query.bias,
                  ") needs a partial to add it to");
  std::vector<DepthSource> all(sources.begin(), sources.end());
  if (partial.present()) all.push_back(partial);
  const std::int64_t S = static_cast<std::int64_t>(all.size());
  ATTNKIT_REQUIRE(S >= 1, fn, ": arguments 'sources' and 'partial': nothing to route over");
  std::size_t out_bytes = static_cast<std::size_t>(T > 0 ? ((T - 1) * out.stride[0] + D) : 0) * sizeof(float);
  for (std::int64_t n = 0; n < S; ++n) {
    const DepthSource& s = all[static_cast<std::size_t>(n)];
    const bool is_partial = partial.present() && n == S - 1;
    auto where = [&] { return is_partial ? std::string("partial") : "sources[" + std::to_string(n) + "]"; };
    ATTNKIT_REQUIRE(s.present(), fn, ": argument '", where(), "': null data pointer");
    ATTNKIT_REQUIRE(s.rows == T && s.cols == D, fn, ": argument '", where(), "': shape [", s.rows, ", ", s.cols,
                    "], expected [", T, ", ", D, "] like out");
    ATTNKIT_REQUIRE(s.inner_stride() == 1 || D <= 1, fn, ": argument '", where(),
                    "': the last dimension must be contiguous (stride 1), got stride ", s.inner_stride());
    ATTNKIT_REQUIRE(s.row_stride >= 0, fn, ": argument '", where(), "': negative row stride ", s.row_stride);
    ATTNKIT_REQUIRE(!s.logits || s.logit_stride >= 0, fn, ": argument '", where(), "': negative logit stride ",
                    s.logit_stride);
    const void* p = s.f32 ? static_cast<const void*>(s.f32) : static_cast<const void*>(s.b16);
    const std::size_t bytes = static_cast<std::size_t>(T > 0 ? (T - 1) * s.row_stride + D : 0) * s.element_bytes();
    ATTNKIT_REQUIRE(T == 0 || !detail::overlaps(out.data, out_bytes, p, bytes), fn, ": argument 'out': overlaps ",
                    where(), " (out must be a separate buffer)");
  }
  if (!opt.weights.empty()) {
    check_view(opt.weights, fn, "opt.weights");
    ATTNKIT_REQUIRE(opt.weights.shape[0] == T && opt.weights.shape[1] == S, fn, ": argument 'opt.weights': shape ",
                    detail::shape_string(opt.weights), ", expected [", T, ", ", S, "]");
  }
  if (!opt.residual.empty()) {
    check_view(opt.residual, fn, "opt.residual");
    ATTNKIT_REQUIRE(opt.residual.shape[0] == T && opt.residual.shape[1] == D, fn, ": argument 'opt.residual': shape ",
                    detail::shape_string(opt.residual), ", expected [", T, ", ", D, "]");
  }
  if (T == 0) return;

  std::vector<float> folded;
  const float* q = query.proj;
  if (query.norm_weight) {
    folded.resize(static_cast<std::size_t>(D));
    attnres_fold_query(query.proj, query.norm_weight, D, folded.data());
    q = folded.data();
  }
  // Token tile: a tile's rows of every source fit in about a quarter of L2 (2 MiB per core), so
  // the tile being summed and the next one being fetched fit together.
  std::size_t row_bytes = 0;
  for (auto& s : all) row_bytes += static_cast<std::size_t>(D) * s.element_bytes();
  const std::int64_t tile = std::clamp<std::int64_t>(static_cast<std::int64_t>((std::size_t{1} << 19) / row_bytes), 1, 64);
  const std::int64_t tiles = (T + tile - 1) / tile;
  const std::span<const DepthSource> srcs(all);
  parallel_for(tiles, opt.num_threads, [&](std::int64_t i) {
    ATTNKIT_FAULT_POINT("attnres");
    const std::int64_t t0 = i * tile, t1 = std::min(T, t0 + tile);
    std::vector<float> logits(static_cast<std::size_t>((t1 - t0) * S));
    detail::attnres_tile<Arch>(srcs, q, query.bias, query.eps, partial.present(), t0, t1, std::min(T, t1 + tile), out, opt,
                               logits.data());
  });
}

// 1 / sqrt(mean(v²) + eps) of each row of v into inv_rms [v.rows] (to pass as DepthSource::inv_rms).
template <class Arch = simd::default_arch>
void attnres_inv_rms(const DepthSource& v, float eps, float* inv_rms, int num_threads = 0) {
  constexpr const char* fn = "attnres_inv_rms";
  ATTNKIT_REQUIRE(v.present() || v.rows == 0, fn, ": argument 'v': null data pointer");
  ATTNKIT_REQUIRE(inv_rms != nullptr || v.rows == 0, fn, ": argument 'inv_rms': null pointer");
  ATTNKIT_REQUIRE(std::isfinite(eps) && eps >= 0.f, fn, ": argument 'eps': must be finite and >= 0, got ", eps);
  ATTNKIT_REQUIRE(v.inner_stride() == 1 || v.cols <= 1, fn, ": argument 'v': the last dimension must be contiguous");
  const std::int64_t D = v.cols;
  parallel_for((v.rows + 63) / 64, num_threads, [&](std::int64_t i) {
    ATTNKIT_FAULT_POINT("attnres");
    for (std::int64_t t = i * 64; t < std::min(v.rows, i * 64 + 64); ++t)
      inv_rms[t] = detail::inv_rms_of(v.f32 ? detail::sum_squares<Arch>(v.f32 + t * v.row_stride, D)
                                            : detail::sum_squares<Arch>(v.b16 + t * v.row_stride, D),
                                      D, eps);
  });
}

}  // namespace attnkit
