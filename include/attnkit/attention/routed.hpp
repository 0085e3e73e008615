// attnkit/attention/routed.hpp — R-GQA, routed grouped-query attention (spec §10): a learned
// router keeps only the best k_r query heads of each KV group per token, and attention is
// computed for those (token, head) pairs only; the others output 0.
//
//   route_heads: router logits r [T, H] (r = x W_rᵀ, computed by the caller) ->
//     probs    [T, H]          softmax within each KV group (scope group) or over all H heads (all)
//     heads    [T, H_kv, k_r]  the k_r most probable heads of each group, ascending head index;
//                              ties go to the lower head index
//     weights  [T, H_kv, k_r]  none: 1; prob: the probability; renorm: the probability divided
//                              by the sum of the kept probabilities of that group
//   routed_attention_prefill: out[t, h] = weight · attention(q[t, h]) for the kept (t, h), 0 for
//     the rest, under a causal or sliding-window mask (as attention_prefill: opt.q_offset,
//     opt.scale, opt.num_threads; opt.heads / opt.queries must be the full ranges).
//   routed_attention_decode: the same for one token against a KV cache (as attention_decode).
//   routed_attention_decode_paged / routed_attention_prefill_paged: the same over a paged KV
//     cache (attention/batched_decode.hpp's contracts): one token of each of B sequences
//     (heads / weights [B, H_kv, k_r]), or several sequences' new tokens packed along the token
//     axis by cu_seqlens (heads / weights [T, H_kv, k_r] by packed row). Bit-identical to the
//     contiguous forms on each sequence's contiguous keys.
//
// The kernel does the work of the kept pairs only: per KV group it packs the query rows that
// chose one of its heads, in position order, and runs the flash kernel over them as one
// single-head problem, so every K/V tile is widened once per block of packed rows and the
// compute scales with k_r / G. With every head kept and weighting none it is GQA attention.
// Over pages the same packing runs per (sequence, KV group), each segment reading its
// sequence's pages in place; decode packs each token's kept heads into a GQA problem of k_r
// heads per group for the batched decode kernel, so a K/V row is read once for the kept heads.
// Spec §10 marks k_r, the softmax scope and the weighting as our choices (the paper is not
// readable): they are parameters here. The orthogonality loss is training-only.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <span>
#include <vector>

#include "attnkit/attention/batched_decode.hpp"
#include "attnkit/attention/decode.hpp"
#include "attnkit/attention/prefill.hpp"
#include "attnkit/core/error.hpp"
#include "attnkit/core/memory.hpp"
#include "attnkit/core/threading.hpp"
#include "attnkit/core/view.hpp"

namespace attnkit {

enum class RouteScope { group, all };              // softmax within each KV group, or over all heads
enum class RouteWeighting { none, prob, renorm };  // the kept heads' output factor

struct RouteOptions {
  int top_k = 1;  // heads kept per KV group, 1 <= top_k <= G
  RouteScope scope = RouteScope::group;
  RouteWeighting weighting = RouteWeighting::renorm;
  int num_threads = 0;
};

inline const char* route_scope_name(RouteScope s) { return s == RouteScope::group ? "group" : "all"; }
inline const char* route_weighting_name(RouteWeighting w) {
  return w == RouteWeighting::none ? "none" : w == RouteWeighting::prob ? "prob" : "renorm";
}

// logits [T, H]; heads / weights [T, H_kv, top_k]; probs [T, H] optional (empty view: skipped).
inline void route_heads(ConstView2<float> logits, std::int64_t H_kv, const RouteOptions& opt, View3<std::int32_t> heads,
                        View3<float> weights, View2<float> probs = {}) {
  constexpr const char* fn = "route_heads";
  check_view(logits, fn, "logits");
  const std::int64_t T = logits.shape[0], H = logits.shape[1];
  ATTNKIT_REQUIRE(H_kv >= 1 && H % H_kv == 0, fn, ": argument 'H_kv': ", H_kv, " does not divide H = ", H);
  const std::int64_t G = H / H_kv, K = opt.top_k;
  ATTNKIT_REQUIRE(K >= 1 && K <= G, fn, ": argument 'opt.top_k': must be in [1, G = ", G, "], got ", K);
  check_view(heads, fn, "heads");
  check_view(weights, fn, "weights");
  ATTNKIT_REQUIRE(heads.shape[0] == T && heads.shape[1] == H_kv && heads.shape[2] == K, fn, ": argument 'heads': shape ",
                  detail::shape_string(heads), " must be [T, H_kv, top_k] = [", T, ", ", H_kv, ", ", K, "]");
  ATTNKIT_REQUIRE(weights.shape[0] == T && weights.shape[1] == H_kv && weights.shape[2] == K, fn,
                  ": argument 'weights': shape ", detail::shape_string(weights), " must be [", T, ", ", H_kv, ", ", K, "]");
  if (probs.data) {
    check_view(probs, fn, "probs");
    ATTNKIT_REQUIRE(probs.shape[0] == T && probs.shape[1] == H, fn, ": argument 'probs': shape ", detail::shape_string(probs),
                    " must be [T, H] = [", T, ", ", H, "]");
  }
  for (std::int64_t t = 0; t < T; ++t)
    for (std::int64_t h = 0; h < H; ++h)
      ATTNKIT_REQUIRE(std::isfinite(logits(t, h)), fn, ": argument 'logits': router logit [", t, ", ", h, "] is ",
                      logits(t, h));
  parallel_for(T, T >= 64 ? opt.num_threads : 1, [&](std::int64_t t) {
    ATTNKIT_FAULT_POINT("routed");
    std::vector<double> p(static_cast<std::size_t>(H));
    const auto softmax = [&](std::int64_t h0, std::int64_t h1) {
      double mx = -std::numeric_limits<double>::infinity(), sum = 0;
      for (std::int64_t h = h0; h < h1; ++h) mx = std::max(mx, static_cast<double>(logits(t, h)));
      for (std::int64_t h = h0; h < h1; ++h) sum += p[h] = std::exp(static_cast<double>(logits(t, h)) - mx);
      for (std::int64_t h = h0; h < h1; ++h) p[h] /= sum;
    };
    if (opt.scope == RouteScope::all) softmax(0, H);
    else
      for (std::int64_t j = 0; j < H_kv; ++j) softmax(j * G, (j + 1) * G);
    if (probs.data)
      for (std::int64_t h = 0; h < H; ++h) probs(t, h) = static_cast<float>(p[h]);
    std::vector<std::int32_t> order(static_cast<std::size_t>(G));
    for (std::int64_t j = 0; j < H_kv; ++j) {
      for (std::int64_t g = 0; g < G; ++g) order[g] = static_cast<std::int32_t>(j * G + g);
      // By logit (softmax is monotone and the logits have no rounding ties the probabilities
      // might), ties to the lower head; then the kept ones in ascending head order.
      std::partial_sort(order.begin(), order.begin() + K, order.end(), [&](std::int32_t a, std::int32_t b) {
        return logits(t, a) > logits(t, b) || (logits(t, a) == logits(t, b) && a < b);
      });
      std::sort(order.begin(), order.begin() + K);
      double kept = 0;
      for (std::int64_t i = 0; i < K; ++i) kept += p[order[i]];
      for (std::int64_t i = 0; i < K; ++i) {
        const std::int32_t h = order[i];
        heads(t, j, i) = h;
        weights(t, j, i) = opt.weighting == RouteWeighting::none   ? 1.f
                           : opt.weighting == RouteWeighting::prob ? static_cast<float>(p[h])
                                                                   : static_cast<float>(p[h] / kept);
      }
    }
  });
}

namespace detail::routed {

// The caller thread's packed rows (queries, outputs, lse): reused across calls (core/memory.hpp).
struct PackedScratch;

// Checks heads [rows, H_kv, k_r] (each list strictly ascending, inside its group) and weights
// (same shape, finite; empty view: all 1).
inline void check_routes(const char* fn, ConstView3<std::int32_t> heads, ConstView3<float> weights, std::int64_t rows,
                         std::int64_t H, std::int64_t H_kv) {
  check_view(heads, fn, "heads");
  const std::int64_t G = H / H_kv, K = heads.shape[2];
  ATTNKIT_REQUIRE(heads.shape[0] == rows && heads.shape[1] == H_kv && K >= 1 && K <= G, fn, ": argument 'heads': shape ",
                  detail::shape_string(heads), " must be [", rows, ", H_kv = ", H_kv, ", k_r] with 1 <= k_r <= G = ", G);
  if (weights.data) {
    check_view(weights, fn, "weights");
    ATTNKIT_REQUIRE(weights.shape[0] == rows && weights.shape[1] == H_kv && weights.shape[2] == K, fn,
                    ": argument 'weights': shape ", detail::shape_string(weights), " must match heads ", detail::shape_string(heads));
  }
  for (std::int64_t t = 0; t < rows; ++t)
    for (std::int64_t j = 0; j < H_kv; ++j)
      for (std::int64_t i = 0; i < K; ++i) {
        const std::int64_t h = heads(t, j, i);
        ATTNKIT_REQUIRE(h >= j * G && h < (j + 1) * G && (i == 0 || h > heads(t, j, i - 1)), fn, ": argument 'heads': [",
                        t, ", ", j, ", ", i, "] = ", h, " must be a head of KV group ", j, " ([", j * G, ", ",
                        (j + 1) * G, ")) listed in ascending order without repeats");
        if (weights.data)
          ATTNKIT_REQUIRE(std::isfinite(weights(t, j, i)), fn, ": argument 'weights': [", t, ", ", j, ", ", i, "] is ",
                          weights(t, j, i));
      }
}


// The kept (token, head) pairs of KV group j packed as rows j·n + t·K + i (n = T·K, token order):
// queries in, outputs and lse out of the flash kernel as single-head problems.
struct Packed {
  float *q, *o, *l;
  std::int64_t n;
};

template <class Mask, class KV, class KVOf>
void run_packed_prefill(ConstView3<float> q, ConstView3<std::int32_t> heads, const detail::flash::Shape& sh,
                        std::span<const std::int64_t> cu, std::span<const std::int64_t> q_offsets, const Mask& mask,
                        const AttentionOptions& opt, bool want_lse, Packed& pk, KVOf&& kv_of) {
  const std::int64_t T = q.shape[0], H_kv = sh.H_kv, K = heads.shape[2], d_k = sh.d_k, d_v = sh.d_v, n = T * K;
  pk.n = n;
  pk.q = thread_scratch<PackedScratch>().get(H_kv * n * (d_k + d_v + 1));
  pk.o = pk.q + H_kv * n * d_k;
  pk.l = pk.o + H_kv * n * d_v;
  // Each packed row's position within its sequence's queries.
  std::vector<std::int64_t> pos(static_cast<std::size_t>(n));
  for (std::size_t b = 0; b + 1 < cu.size(); ++b)
    for (std::int64_t t = cu[b]; t < cu[b + 1]; ++t)
      for (std::int64_t i = 0; i < K; ++i) pos[t * K + i] = t - cu[b];
  parallel_for(T, T >= 64 ? opt.num_threads : 1, [&](std::int64_t t) {
    ATTNKIT_FAULT_POINT("routed");
    for (std::int64_t j = 0; j < H_kv; ++j)
      for (std::int64_t i = 0; i < K; ++i)
        std::copy(q.ptr(t, heads(t, j, i)), q.ptr(t, heads(t, j, i)) + d_k, pk.q + ((j * n) + t * K + i) * d_k);
  });
  std::vector<detail::flash::Segment<KV>> segs;
  std::vector<std::pair<std::int64_t, std::int64_t>> ranges;
  for (std::int64_t j = 0; j < H_kv; ++j)
    for (std::size_t b = 0; b + 1 < cu.size(); ++b) {
      const std::int64_t r0 = j * n + cu[b] * K, rows = (cu[b + 1] - cu[b]) * K;
      if (rows == 0) continue;
      const auto [kr, vr] = kv_of(static_cast<std::int64_t>(b), j);
      View2<float> seg_lse = want_lse ? View2<float>(pk.l + r0, {rows, 1}) : View2<float>{};
      segs.push_back({ConstView3<float>(pk.q + r0 * d_k, {rows, 1, d_k}), kr, vr, View3<float>(pk.o + r0 * d_v, {rows, 1, d_v}),
                      seg_lse, q_offsets[b], pos.data() + cu[b] * K, 0});
      ranges.emplace_back(0, rows);
    }
  const detail::flash::Shape one{1, 1, 1, d_k, d_v, sh.q_scale};
  detail::flash::run_prefill_at<simd::default_arch>(opt.precision, segs, one, mask, 0, 1, ranges, opt.num_threads);
}

// out[t, h] = weight · the packed output of (t, h) for the kept heads, 0 (lse -inf) for the rest;
// row(t, j, i): the packed row of token t's i-th kept head of group j.
template <class Row>
void scatter(ConstView3<std::int32_t> heads, ConstView3<float> weights, const float* o, const float* l, View3<float> out,
             View2<float> lse, int num_threads, Row&& row) {
  const std::int64_t T = out.shape[0], H = out.shape[1], d_v = out.shape[2], H_kv = heads.shape[1], K = heads.shape[2];
  parallel_for(T, T >= 64 ? num_threads : 1, [&](std::int64_t t) {
    ATTNKIT_FAULT_POINT("routed");
    for (std::int64_t h = 0; h < H; ++h) {
      std::fill(out.ptr(t, h), out.ptr(t, h) + d_v, 0.f);
      if (lse.data) lse(t, h) = -std::numeric_limits<float>::infinity();
    }
    for (std::int64_t j = 0; j < H_kv; ++j)
      for (std::int64_t i = 0; i < K; ++i) {
        const std::int64_t h = heads(t, j, i), r = row(t, j, i);
        const float w = weights.data ? weights(t, j, i) : 1.f;
        const float* src = o + r * d_v;
        float* dst = out.ptr(t, h);
        for (std::int64_t d = 0; d < d_v; ++d) dst[d] = w * src[d];
        if (lse.data) lse(t, h) = l[r];
      }
  });
}

}  // namespace detail::routed

// q [T_q, H, d_k]; k [T_k, H_kv, d_k], v [T_k, H_kv, d_v] (float or bf16); heads / weights
// [T_q, H_kv, k_r] (weights may be an empty view: 1); out [T_q, H, d_v]; lse [T_q, H] optional
// (-inf for heads not kept).
template <class KV, class Mask = CausalMask>
void routed_attention_prefill(ConstView3<float> q, ConstView3<KV> k, ConstView3<KV> v, ConstView3<std::int32_t> heads,
                              ConstView3<float> weights, View3<float> out, const Mask& mask = {},
                              const AttentionOptions& opt = {}, View2<float> lse = {}) {
  constexpr const char* fn = "routed_attention_prefill";
  const detail::flash::Shape sh = detail::check_prefill(fn, q, k, v, out, mask, opt, lse);
  ATTNKIT_REQUIRE(opt.heads.begin == 0 && opt.heads.resolve_end(sh.H) == sh.H && opt.queries.begin == 0 &&
                      opt.queries.resolve_end(q.shape[0]) == q.shape[0],
                  fn, ": arguments 'opt.heads' / 'opt.queries': sub-ranges are not supported (the routes choose the heads)");
  const std::int64_t T = q.shape[0], K = heads.shape[2];
  detail::routed::check_routes(fn, heads, weights, T, sh.H, sh.H_kv);
  const std::int64_t cu[2] = {0, T}, q_offset[1] = {opt.q_offset >= 0 ? opt.q_offset : k.shape[0] - T};
  detail::routed::Packed pk{};
  detail::routed::run_packed_prefill<Mask, KV>(
      q, heads, sh, cu, q_offset, mask, opt, lse.data != nullptr, pk, [&](std::int64_t, std::int64_t j) {
        return std::pair<detail::flash::KVRows<KV>, detail::flash::KVRows<KV>>{k.slice(1, j, j + 1), v.slice(1, j, j + 1)};
      });
  detail::routed::scatter(heads, weights, pk.o, pk.l, out, lse, opt.num_threads,
                          [&](std::int64_t t, std::int64_t j, std::int64_t i) { return j * pk.n + t * K + i; });
}

// One token: q [H, d_k]; k, v a KV cache as attention_decode reads it; heads / weights
// [1, H_kv, k_r]; out [H, d_v]; lse [H] optional (-inf for heads not kept).
template <class KV>
void routed_attention_decode(ConstView2<float> q, ConstView3<KV> k, ConstView3<KV> v, ConstView3<std::int32_t> heads,
                             ConstView3<float> weights, View2<float> out, const DecodeOptions& opt = {},
                             View1<float> lse = {}) {
  constexpr const char* fn = "routed_attention_decode";
  detail::decode::validate(q, k, v, out, opt, lse);
  const std::int64_t H = q.shape[0], d_k = q.shape[1], H_kv = k.shape[1], d_v = v.shape[2];
  ATTNKIT_REQUIRE(opt.heads.begin == 0 && opt.heads.resolve_end(H) == H, fn,
                  ": argument 'opt.heads': sub-ranges are not supported (the routes choose the heads)");
  detail::routed::check_routes(fn, heads, weights, 1, H, H_kv);
  const std::int64_t K = heads.shape[2], n = H_kv * K;
  // The kept heads as a GQA problem of K heads per group.
  std::vector<float> qc(static_cast<std::size_t>(n * d_k)), oc(static_cast<std::size_t>(n * d_v)), lc(static_cast<std::size_t>(n));
  for (std::int64_t j = 0; j < H_kv; ++j)
    for (std::int64_t i = 0; i < K; ++i) std::copy(q.ptr(heads(0, j, i)), q.ptr(heads(0, j, i)) + d_k, qc.data() + (j * K + i) * d_k);
  DecodeOptions o = opt;
  o.heads = {};
  detail::decode::decode_keys<true>(ConstView2<float>(qc.data(), {n, d_k}), k, v, View2<float>(oc.data(), {n, d_v}), o,
                                    View1<float>(lc.data(), {n}), k.shape[0], nullptr);
  detail::routed::scatter(heads, weights, oc.data(), lc.data(), View3<float>(out.data, {1, H, d_v}, {0, out.stride[0], 1}),
                          lse.empty() ? View2<float>{} : View2<float>(lse.data, {1, H}, {0, lse.stride[0]}), 1,
                          [&](std::int64_t, std::int64_t j, std::int64_t i) { return j * K + i; });
}

// B sequences' tokens over a paged cache (attention_decode_paged's contract): q [B, H, d_k];
// heads / weights [B, H_kv, k_r] (weights may be an empty view: 1); out [B, H, d_v]; lse [B, H]
// optional (-inf for heads not kept). KV = float, bf16 or std::int8_t (opt.precision as
// attention_decode_paged takes it).
template <class KV>
void routed_attention_decode_paged(ConstView3<float> q, const PagedKV<KV>& cache, const PageTable& table,
                                   ConstView3<std::int32_t> heads, ConstView3<float> weights, View3<float> out,
                                   const DecodeOptions& opt = {}, View2<float> lse = {}) {
  constexpr const char* fn = "routed_attention_decode_paged";
  detail::paged::check_decode(fn, q, cache, table, out, opt, lse);
  const std::int64_t B = q.shape[0], H = q.shape[1], d_k = q.shape[2], H_kv = cache.kv_heads(), d_v = cache.head_dim_v();
  ATTNKIT_REQUIRE(opt.heads.begin == 0 && opt.heads.resolve_end(H) == H, fn,
                  ": argument 'opt.heads': sub-ranges are not supported (the routes choose the heads)");
  detail::routed::check_routes(fn, heads, weights, B, H, H_kv);
  const std::int64_t K = heads.shape[2], n = H_kv * K;
  std::vector<float> qc(static_cast<std::size_t>(B * n * d_k)), oc(static_cast<std::size_t>(B * n * d_v)),
      lc(static_cast<std::size_t>(B * n));
  for (std::int64_t b = 0; b < B; ++b)
    for (std::int64_t j = 0; j < H_kv; ++j)
      for (std::int64_t i = 0; i < K; ++i)
        std::copy(q.ptr(b, heads(b, j, i)), q.ptr(b, heads(b, j, i)) + d_k, qc.data() + ((b * H_kv + j) * K + i) * d_k);
  DecodeOptions o = opt;
  o.heads = {};
  attention_decode_paged<KV>(ConstView3<float>(qc.data(), {B, n, d_k}), cache, table, View3<float>(oc.data(), {B, n, d_v}), o,
                             View2<float>(lc.data(), {B, n}));
  detail::routed::scatter(heads, weights, oc.data(), lc.data(), out, lse, opt.num_threads,
                          [&](std::int64_t b, std::int64_t j, std::int64_t i) { return (b * H_kv + j) * K + i; });
}

// Several sequences' new tokens over a paged cache (attention_prefill_paged's contract): q
// [T, H, d_k] packed by cu_seqlens, each sequence's rows its last cached tokens; heads / weights
// [T, H_kv, k_r] by packed row; out [T, H, d_v]; lse [T, H] optional. mask: causal or sliding
// window. opt.heads / opt.queries must be the full ranges, opt.q_offset -1.
template <class KV, class Mask = CausalMask>
void routed_attention_prefill_paged(ConstView3<float> q, const PagedKV<KV>& cache, const PageTable& table,
                                    std::span<const std::int64_t> cu_seqlens, ConstView3<std::int32_t> heads,
                                    ConstView3<float> weights, View3<float> out, const Mask& mask = {},
                                    const AttentionOptions& opt = {}, View2<float> lse = {}) {
  constexpr const char* fn = "routed_attention_prefill_paged";
  check_page_table(fn, cache, table);
  check_view(q, fn, "q");
  const std::int64_t B = table.batch(), T = q.shape[0], H_kv = cache.kv_heads(), K = heads.shape[2];
  detail::paged::check_cu_seqlens(fn, cu_seqlens, B, T, "q");
  detail::paged::sequences_with_queries(fn, table, cu_seqlens);
  ATTNKIT_REQUIRE(opt.q_offset == -1, fn, ": argument 'opt.q_offset': must be -1 (each sequence's queries are its "
                  "last tokens), got ", opt.q_offset);
  static const KV dummy{};
  const ConstView3<KV> k0(&dummy, {0, H_kv, cache.head_dim_k()}), v0(&dummy, {0, H_kv, cache.head_dim_v()});
  const detail::flash::Shape sh = detail::check_prefill(fn, q, k0, v0, out, mask, opt, lse, "cache.k", "cache.v");
  ATTNKIT_REQUIRE(opt.heads.begin == 0 && opt.heads.resolve_end(sh.H) == sh.H && opt.queries.begin == 0 &&
                      opt.queries.resolve_end(T) == T,
                  fn, ": arguments 'opt.heads' / 'opt.queries': sub-ranges are not supported (the routes choose the heads)");
  detail::routed::check_routes(fn, heads, weights, T, sh.H, H_kv);
  std::vector<std::int64_t> q_offsets(static_cast<std::size_t>(B));
  for (std::int64_t b = 0; b < B; ++b) q_offsets[b] = table.lengths[b] - (cu_seqlens[b + 1] - cu_seqlens[b]);
  detail::routed::Packed pk{};
  detail::routed::run_packed_prefill<Mask, KV>(
      q, heads, sh, cu_seqlens, q_offsets, mask, opt, lse.data != nullptr, pk, [&](std::int64_t b, std::int64_t j) {
        return detail::paged::sequence_kv(kv_head_range(cache, j, j + 1), table, b, table.lengths[b]);
      });
  detail::routed::scatter(heads, weights, pk.o, pk.l, out, lse, opt.num_threads,
                          [&](std::int64_t t, std::int64_t j, std::int64_t i) { return j * pk.n + t * K + i; });
}

}  // namespace attnkit
