// attnkit/attention/prefill.hpp — prefill (many-query) softmax attention: global causal GQA and
// sliding window, single sequence or a variable-length batch packed along the token axis.
//
//   out[t, h, :] = sum_s softmax_s(scale · q[t, h, :]·k[s, h/G, :]) · v[s, h/G, :]
//                  over the keys s visible to position p = q_offset + t under the mask
//                  (CausalMask: s <= p; SlidingWindowMask{W}: p - W < s <= p), G = H / H_kv.
//   lse[t, h]    = log sum_s exp(scale · q·k)   (natural log; optional)
//
// Shapes: q [T_q, H, d_k] f32; k [T_k, H_kv, d_k] and v [T_k, H_kv, d_v] of KV = float or bf16,
// or int8 as QuantView3 (codes and a scale per token and KV head, read in place); out
// [T_q, H, d_v] f32; lse [T_q, H] (any strides; pass an empty view to skip). Views may have any
// strides except that the last dimension of q, k, v, out must be contiguous.
// opt.q_offset = -1 places the queries at the end of the keys (q_offset = T_k - T_q); an
// explicit q_offset must be >= 0 with q_offset + T_q <= T_k. A query that sees no key (only
// possible with T_q > T_k under the default offset) gets out = 0 and lse = -inf. A NaN score
// (a NaN in q or in a key it sees) makes that query's out and lse NaN, on every path.
// opt.heads / opt.queries restrict the work to a sub-range; everything else in out and lse is
// left untouched and the computed values are bit-identical to those of the full call. Results
// are also bit-identical for any thread count.
// opt.precision = exact (default): float32 arithmetic on the FMA units (bf16 K/V are widened
// exactly; detail::flash::amx_exact_prefill() = true moves bf16 K/V onto AMX tiles with Q and P
// split into exact bf16 planes, ~5e-7 from the FMA kernel and 2x faster). fast: on AMX tiles (detail/flash_prefill_amx.hpp), Q, K, V and the probabilities
// rounded to bf16, products accumulated in f32, ~2e-3 relative error; without AMX, fast runs
// the exact kernel. No T x T buffer is formed either way.
// Arguments are validated up front; violations throw attnkit::Error.
//
// attention_prefill_varlen: cu_seqlens = {0, n0, n0 + n1, ...} splits the token axis of q, k,
// v, out (and lse) into sequences that attend only within themselves, each starting at
// position 0 (opt.q_offset must stay -1). opt.queries counts rows of the packed token axis.
// Each sequence gives bit-identical results to a separate attention_prefill call on it.
//
// Variants (attention/variant.hpp): the last argument, an AttentionVariant built by
// make_variant(...), adds a query metric (Tuneable attention), a logits transform (soft-cap or
// ALiBi, at the query's and keys' absolute positions), attention sinks and a per-token,
// per-head output scale. The default, PlainAttention, compiles to the plain kernel. Variants do
// not combine with Loop Attention's epilogues (attention/loop.hpp).
#pragma once

#include <cmath>
#include <cstdint>
#include <span>
#include <utility>
#include <vector>

#include "attnkit/attention/common.hpp"
#include "attnkit/attention/detail/flash_prefill.hpp"
#include "attnkit/attention/detail/flash_prefill_amx.hpp"
#include "attnkit/attention/quant.hpp"
#include "attnkit/attention/variant.hpp"
#include "attnkit/core/bf16.hpp"
#include "attnkit/core/error.hpp"
#include "attnkit/core/simd.hpp"
#include "attnkit/core/view.hpp"

namespace attnkit {

namespace detail {

template <class KV, class Mask>
flash::Shape check_prefill(const char* fn, const ConstView3<float>& q, const ConstView3<KV>& k,
                           const ConstView3<KV>& v, const View3<float>& out, const Mask& mask,
                           const AttentionOptions& opt, const View2<float>& lse, const char* kn = "k",
                           const char* vn = "v") {
  // kn / vn: how the caller names k and v in messages (loop_attention: k_glob, v_glob).
  static_assert(is_storage_type_v<KV> || std::is_same_v<KV, std::int8_t>,
                "attention_prefill: K/V must be float or bf16 (int8: QuantView3)");
  check_view(q, fn, "q");
  check_view(k, fn, kn);
  check_view(v, fn, vn);
  check_view(out, fn, "out");
  const std::int64_t T_q = q.shape[0], H = q.shape[1], d_k = q.shape[2];
  const std::int64_t T_k = k.shape[0], H_kv = k.shape[1], d_v = v.shape[2];
  ATTNKIT_REQUIRE(d_k >= 1, fn, ": argument 'q': head_dim d_k must be >= 1, got shape ", shape_string(q));
  ATTNKIT_REQUIRE(k.shape[2] == d_k, fn, ": argument '", kn, "': head_dim ", k.shape[2],
                  " does not match q's head_dim ", d_k);
  ATTNKIT_REQUIRE(v.shape[0] == T_k, fn, ": argument '", vn, "': ", v.shape[0], " rows, but ", kn, " has T_k = ", T_k);
  ATTNKIT_REQUIRE(H_kv >= 1, fn, ": argument '", kn, "': number of KV heads H_kv must be >= 1, got shape ",
                  shape_string(k));
  ATTNKIT_REQUIRE(v.shape[1] == H_kv, fn, ": argument '", vn, "': ", v.shape[1], " KV heads, but ", kn,
                  " has H_kv = ", H_kv);
  ATTNKIT_REQUIRE(H % H_kv == 0, fn, ": argument 'q': number of query heads H = ", H,
                  " is not a multiple of the number of KV heads H_kv = ", H_kv);
  ATTNKIT_REQUIRE(out.shape[0] == T_q && out.shape[1] == H && out.shape[2] == d_v, fn,
                  ": argument 'out': shape ", shape_string(out), " must be [T_q, H, d_v] = [", T_q, ", ", H, ", ",
                  d_v, "]");
  mask.validate(fn);
  if (lse.data != nullptr)
    ATTNKIT_REQUIRE(lse.shape[0] == T_q && lse.shape[1] == H, fn, ": argument 'lse': shape ", shape_string(lse),
                    " must be [T_q, H] = [", T_q, ", ", H, "]");
  ATTNKIT_REQUIRE(std::isfinite(opt.scale), fn, ": argument 'opt.scale': must be finite, got ", opt.scale);
  const std::int64_t he = opt.heads.resolve_end(H), qe = opt.queries.resolve_end(T_q);
  ATTNKIT_REQUIRE(opt.heads.begin >= 0 && opt.heads.begin <= he && he <= H, fn, ": argument 'opt.heads': range [",
                  opt.heads.begin, ", ", opt.heads.end, ") is out of bounds for H = ", H);
  ATTNKIT_REQUIRE(opt.queries.begin >= 0 && opt.queries.begin <= qe && qe <= T_q, fn,
                  ": argument 'opt.queries': range [", opt.queries.begin, ", ", opt.queries.end,
                  ") is out of bounds for T_q = ", T_q);
  ATTNKIT_REQUIRE(opt.q_offset >= -1, fn, ": argument 'opt.q_offset': must be -1 (default) or >= 0, got ",
                  opt.q_offset);
  ATTNKIT_REQUIRE(opt.q_offset < 0 || opt.q_offset + T_q <= T_k, fn, ": argument 'opt.q_offset': q_offset + T_q = ",
                  opt.q_offset + T_q, " exceeds T_k = ", T_k, " (queries would see keys that do not exist)");
  return flash::Shape{H, H_kv, H / H_kv, d_k, d_v, resolve_scale(opt.scale, d_k) * flash::kLog2e};
}

// attention_prefill on an explicit xsimd instruction set (the public functions use the best
// one the compiler targets); tests use it to exercise the narrower portable code path.
// int8 K/V: k and v as flash::KVRows built from QuantView3 (codes and scales).
template <class Arch, class KV, class Mask = CausalMask, class Var = PlainAttention>
void attention_prefill_rows(ConstView3<float> q, const flash::KVRows<KV>& k, const flash::KVRows<KV>& v,
                            View3<float> out, const Mask& mask = {}, const AttentionOptions& opt = {},
                            View2<float> lse = {}, const Var& var = {}) {
  const flash::Shape sh = check_prefill("attention_prefill", q, ConstView3<KV>(k), ConstView3<KV>(v), out, mask, opt, lse);
  check_variant("attention_prefill", var, sh.H, sh.d_k, q.shape[0]);
  const std::int64_t T_q = q.shape[0], T_k = k.shape[0];
  const std::vector<flash::Segment<KV>> segs{{q, k, v, out, lse, opt.q_offset >= 0 ? opt.q_offset : T_k - T_q}};
  const std::vector<std::pair<std::int64_t, std::int64_t>> ranges{{opt.queries.begin, opt.queries.resolve_end(T_q)}};
  flash::run_prefill_at<Arch>(opt.precision, segs, sh, mask, opt.heads.begin, opt.heads.resolve_end(sh.H), ranges,
                              opt.num_threads, var);
}

template <class Arch, class KV, class Mask = CausalMask, class Var = PlainAttention>
void attention_prefill_arch(ConstView3<float> q, ConstView3<KV> k, ConstView3<KV> v, View3<float> out,
                            const Mask& mask = {}, const AttentionOptions& opt = {}, View2<float> lse = {},
                            const Var& var = {}) {
  static_assert(is_storage_type_v<KV>, "attention_prefill: K/V must be float or bf16 (int8: pass QuantView3)");
  attention_prefill_rows<Arch, KV>(q, k, v, out, mask, opt, lse, var);
}

template <class Arch, class Mask = CausalMask, class Var = PlainAttention>
void attention_prefill_arch(ConstView3<float> q, const QuantView3& k, const QuantView3& v, View3<float> out,
                            const Mask& mask = {}, const AttentionOptions& opt = {}, View2<float> lse = {},
                            const Var& var = {}) {
  check_quant_view(k, "attention_prefill", "k");
  check_quant_view(v, "attention_prefill", "v");
  attention_prefill_rows<Arch, std::int8_t>(q, k, v, out, mask, opt, lse, var);
}

template <class Arch, class KV, class Mask = CausalMask, class Var = PlainAttention>
void attention_prefill_varlen_arch(ConstView3<float> q, ConstView3<KV> k, ConstView3<KV> v, View3<float> out,
                                   std::span<const std::int64_t> cu_seqlens, const Mask& mask = {},
                                   const AttentionOptions& opt = {}, View2<float> lse = {}, const Var& var = {}) {
  const char* fn = "attention_prefill_varlen";
  const flash::Shape sh = check_prefill(fn, q, k, v, out, mask, opt, lse);
  check_variant(fn, var, sh.H, sh.d_k, q.shape[0]);
  const std::int64_t T = q.shape[0];
  ATTNKIT_REQUIRE(k.shape[0] == T, fn, ": argument 'k': ", k.shape[0], " tokens, but q has ", T,
                  " (varlen packs q, k, v along the same token axis)");
  ATTNKIT_REQUIRE(opt.q_offset == -1, fn, ": argument 'opt.q_offset': must be -1 (each sequence starts at 0), got ",
                  opt.q_offset);
  ATTNKIT_REQUIRE(!cu_seqlens.empty() && cu_seqlens[0] == 0, fn,
                  ": argument 'cu_seqlens': must start with 0 (size batch + 1)");
  for (std::size_t b = 1; b < cu_seqlens.size(); ++b)
    ATTNKIT_REQUIRE(cu_seqlens[b] >= cu_seqlens[b - 1], fn, ": argument 'cu_seqlens': must be non-decreasing, but [",
                    b, "] = ", cu_seqlens[b], " < [", b - 1, "] = ", cu_seqlens[b - 1]);
  ATTNKIT_REQUIRE(cu_seqlens.back() == T, fn, ": argument 'cu_seqlens': last entry ", cu_seqlens.back(),
                  " must equal the number of tokens T = ", T);

  const std::int64_t qb = opt.queries.begin, qe = opt.queries.resolve_end(T);
  std::vector<flash::Segment<KV>> segs;
  std::vector<std::pair<std::int64_t, std::int64_t>> ranges;
  for (std::size_t b = 0; b + 1 < cu_seqlens.size(); ++b) {
    const std::int64_t s0 = cu_seqlens[b], s1 = cu_seqlens[b + 1];
    if (s1 == s0 || s1 <= qb || s0 >= qe) continue;
    View2<float> seg_lse = lse.data ? lse.slice(0, s0, s1) : View2<float>{};
    segs.push_back({q.slice(0, s0, s1), k.slice(0, s0, s1), v.slice(0, s0, s1), out.slice(0, s0, s1), seg_lse, 0, nullptr, s0});
    ranges.emplace_back(std::max(qb, s0) - s0, std::min(qe, s1) - s0);
  }
  flash::run_prefill_at<Arch>(opt.precision, segs, sh, mask, opt.heads.begin, opt.heads.resolve_end(sh.H), ranges,
                              opt.num_threads, var);
}

}  // namespace detail

// q [T_q, H, d_k] f32; k [T_k, H_kv, d_k], v [T_k, H_kv, d_v] of KV = float or bf16; out [T_q, H, d_v] f32.
// var: an AttentionVariant (make_variant(...)); lse then includes the sink, if any.
template <class KV, class Mask = CausalMask, class Var = PlainAttention>
void attention_prefill(ConstView3<float> q, ConstView3<KV> k, ConstView3<KV> v, View3<float> out,
                       const Mask& mask = {}, const AttentionOptions& opt = {}, View2<float> lse = {},
                       const Var& var = {}) {
  detail::attention_prefill_arch<simd::default_arch, KV, Mask, Var>(q, k, v, out, mask, opt, lse, var);
}

// int8 K/V (QuantView3: codes [T_k, H_kv, d] and a scale per (token, KV head), e.g.
// KVCache<std::int8_t>::keys()): read in place, each row widened to code · scale as the kernel
// packs its key tiles, so the result equals attention_prefill<float> over dequantize()d K/V bit
// for bit, without the copy. Everything else as above (fast: on AMX tiles, the dequantised
// rows rounded to bf16).
template <class Mask = CausalMask, class Var = PlainAttention>
void attention_prefill(ConstView3<float> q, const QuantView3& k, const QuantView3& v, View3<float> out,
                       const Mask& mask = {}, const AttentionOptions& opt = {}, View2<float> lse = {},
                       const Var& var = {}) {
  detail::attention_prefill_arch<simd::default_arch, Mask, Var>(q, k, v, out, mask, opt, lse, var);
}

// Several sequences packed along the token axis; cu_seqlens = {0, n0, n0 + n1, ...}.
template <class KV, class Mask = CausalMask, class Var = PlainAttention>
void attention_prefill_varlen(ConstView3<float> q, ConstView3<KV> k, ConstView3<KV> v, View3<float> out,
                              std::span<const std::int64_t> cu_seqlens, const Mask& mask = {},
                              const AttentionOptions& opt = {}, View2<float> lse = {}, const Var& var = {}) {
  detail::attention_prefill_varlen_arch<simd::default_arch, KV, Mask, Var>(q, k, v, out, cu_seqlens, mask, opt, lse, var);
}

}  // namespace attnkit
