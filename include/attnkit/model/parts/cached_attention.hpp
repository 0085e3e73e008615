// attnkit/model/parts/cached_attention.hpp — a layer's KV cache and "append, then attend",
// as a part every softmax-attention mixer reuses.
//
// AttentionCache holds either a growable full cache (causal attention over every earlier
// position) or a ring buffer of the last W positions (sliding window W), in f32, bf16 or int8
// (a scale per token and KV head, attention/quant.hpp).
// attend() appends the step's post-RoPE k/v at the step's position and attends q over what
// the mask lets it see. Keys are always read back from the cache (never from the fresh
// projection), so a bf16 cache gives the same numbers in prefill, chunked prefill and decode.
// Mechanisms that need the cached keys themselves (Loop Attention's global pass, a sparse
// indexer) reach the typed cache through visit(), and window_keys() gives the keys a chunk's
// sliding window needs (the ring's last W-1 positions followed by the chunk's own).
// Mechanisms that run another kernel over the same cache (routed attention, Tuneable
// attention) use append_then(): it appends, then hands the visible keys and the mask to a
// callable.
//
// int8 caches: decode (one query) runs attention_decode on the int8 rows themselves, and so does
// a chunk of several queries over a full cache (prefill, chunked prefill: attention_prefill's
// QuantView3 overload widens the rows as it packs its key tiles). A sliding window's chunk and
// the mechanisms that take float K/V (append_then's callable, Loop Attention's prefill, sparse
// attention) get the visible rows dequantised to an f32 staging buffer first (stage_f32,
// window_keys). Either way the values are exactly codes · scale, the values decode reads, so
// prefill, chunked prefill and decode agree to f32 rounding; the chunk's own rows are quantised
// and dequantised before they are attended, as the cache will return them.
#pragma once

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <variant>
#include <vector>

#include "attnkit/attention/decode.hpp"
#include "attnkit/attention/kv_cache.hpp"
#include "attnkit/attention/prefill.hpp"
#include "attnkit/model/mixer.hpp"

namespace attnkit::model {

// The type kernels read a cache of storage KV as: KV itself, or f32 for int8 (dequantised).
template <class KV>
using staged_t = std::conditional_t<std::is_same_v<KV, std::int8_t>, float, KV>;

// f32 copy of int8 rows, codes · scale: [T, H_kv, d] contiguous in buf.
inline ConstView3<float> stage_f32(const QuantView3& x, std::vector<float>& buf) {
  buf.resize(static_cast<std::size_t>(x.codes.numel()));
  const View3<float> out(buf.data(), x.codes.shape);
  dequantize(x, out);
  return out;
}

// Keys and values of a window in the cache's storage type (int8: f32, dequantised): rows are
// consecutive positions starting at pos0 (owned copies).
template <class KV>
struct WindowKV {
  std::vector<KV> kb, vb;
  std::int64_t pos0 = 0, rows = 0;
  ConstView3<KV> k, v;
};

// The ring's most recent min(W-1, size) positions, then the rows of k/v (a chunk at positions
// ring.total() ..), converted to the ring's type: what a sliding window over the chunk sees.
template <class KV>
WindowKV<staged_t<KV>> window_keys(const RingKVCache<KV>& ring, ConstView3<float> k, ConstView3<float> v) {
  using S = staged_t<KV>;
  constexpr bool quant = std::is_same_v<KV, std::int8_t>;
  const std::int64_t T = k.shape[0], Hkv = ring.kv_heads(), dk = ring.head_dim_k(), dv = ring.head_dim_v();
  const std::int64_t prev = std::min<std::int64_t>(ring.window() - 1, ring.size());
  if constexpr (quant) {
    detail::kv::check_finite("RingKVCache::append", "k", k, 0);
    detail::kv::check_finite("RingKVCache::append", "v", v, 0);
  }
  WindowKV<S> w;
  w.rows = prev + T;
  w.pos0 = ring.total() - prev;
  w.kb.resize(static_cast<std::size_t>(w.rows * Hkv * dk));
  w.vb.resize(static_cast<std::size_t>(w.rows * Hkv * dv));
  View3<S> kk(w.kb.data(), {w.rows, Hkv, dk}), vv(w.vb.data(), {w.rows, Hkv, dv});
  if (prev > 0) ring.copy_recent(prev, kk.slice(0, 0, prev), vv.slice(0, 0, prev));
  std::vector<std::int8_t> codes(static_cast<std::size_t>(quant ? std::max(dk, dv) : 0));
  for (std::int64_t t = 0; t < T; ++t)
    for (std::int64_t h = 0; h < Hkv; ++h) {
      if constexpr (quant) {  // as the ring will return them
        float s = 0.f;
        detail::quant::quantize_row(k.ptr(t, h), codes.data(), s, dk);
        detail::quant::dequantize_row(codes.data(), s, kk.ptr(prev + t, h), dk);
        detail::quant::quantize_row(v.ptr(t, h), codes.data(), s, dv);
        detail::quant::dequantize_row(codes.data(), s, vv.ptr(prev + t, h), dv);
      } else {
        convert(k.ptr(t, h), kk.ptr(prev + t, h), dk);
        convert(v.ptr(t, h), vv.ptr(prev + t, h), dv);
      }
    }
  w.k = kk;
  w.v = vv;
  return w;
}

class AttentionCache {
 public:
  // window == 0: full cache; otherwise a ring buffer of `window` positions.
  AttentionCache(std::int64_t kv_heads, std::int64_t d_k, std::int64_t d_v, std::int64_t window,
                 const SessionOptions& opt)
      : window_(window) {
    if (window == 0) {
      if (opt.kv_type == CacheType::f32) cache_.emplace<KVCache<float>>(kv_heads, d_k, d_v, opt.reserve_tokens);
      else if (opt.kv_type == CacheType::bf16) cache_.emplace<KVCache<bf16>>(kv_heads, d_k, d_v, opt.reserve_tokens);
      else cache_.emplace<KVCache<std::int8_t>>(kv_heads, d_k, d_v, opt.reserve_tokens);
    } else {
      if (opt.kv_type == CacheType::f32) cache_.emplace<RingKVCache<float>>(kv_heads, d_k, d_v, window);
      else if (opt.kv_type == CacheType::bf16) cache_.emplace<RingKVCache<bf16>>(kv_heads, d_k, d_v, window);
      else cache_.emplace<RingKVCache<std::int8_t>>(kv_heads, d_k, d_v, window);
    }
  }

  std::int64_t window() const { return window_; }
  // Positions seen so far (the next step starts here).
  std::int64_t position() const {
    return std::visit([](const auto& c) -> std::int64_t {
      if constexpr (requires { c.total(); }) return c.total();
      else return c.size();
    }, cache_);
  }
  // f(cache) with the typed cache: KVCache<float|bf16|std::int8_t> or RingKVCache<float|bf16|std::int8_t>
  // (int8: keys()/values() are QuantView3).
  template <class F>
  decltype(auto) visit(F&& f) { return std::visit(std::forward<F>(f), cache_); }
  template <class F>
  decltype(auto) visit(F&& f) const { return std::visit(std::forward<F>(f), cache_); }

  // Appends k/v [T, H_kv, d] at position ctx.pos0 and writes out [T, H, d_v] = attention of q
  // [T, H, d_k] over the visible cached keys (causal, or the last `window` positions).
  void attend(ConstView3<float> q, ConstView3<float> k, ConstView3<float> v, View3<float> out, const StepContext& ctx) {
    ATTNKIT_REQUIRE(position() == ctx.pos0, "AttentionCache: step starts at position ", ctx.pos0,
                    " but the cache has seen ", position(), " tokens");
    std::visit([&](auto& c) { attend_in(c, q, k, v, out, ctx); }, cache_);
  }

  // attend() with the kernel call left to the caller, for mechanisms that run another kernel
  // over the same cache (routed attention, a query metric, another scale or key width): appends
  // k [T, H_kv, d_k] / v [T, H_kv, d_v] at position ctx.pos0, then calls once
  //   f(ConstView3<KV> keys, ConstView3<KV> values, const auto& mask)
  // with KV the cache's storage type (int8 caches: float, the rows dequantised to a staging
  // buffer, decode included) and the keys the step's T queries may see:
  //  * T > 1: keys at consecutive positions ending with the step's own, so the queries sit at
  //    the last T rows (a prefill kernel's default q_offset); mask is CausalMask (full cache)
  //    or SlidingWindowMask{W} (ring: the ring's last W-1 positions, then the step's).
  //  * T == 1: every key passed is visible (a ring's slots come in slot order, not position
  //    order): call a decode kernel, which needs no mask.
  template <class F>
  void append_then(ConstView3<float> k, ConstView3<float> v, const StepContext& ctx, F&& f) {
    ATTNKIT_REQUIRE(position() == ctx.pos0, "AttentionCache: step starts at position ", ctx.pos0,
                    " but the cache has seen ", position(), " tokens");
    std::visit([&](auto& c) {
      using KV = std::remove_const_t<typename decltype(c.keys())::element_type>;
      // int8: hand f the rows dequantised.
      const auto call = [&](const auto& keys, const auto& values, const auto& mask) {
        if constexpr (std::is_same_v<KV, std::int8_t>) {
          std::vector<float> kb, vb;
          f(stage_f32(keys, kb), stage_f32(values, vb), mask);
        } else {
          f(keys, values, mask);
        }
      };
      if constexpr (requires { c.total(); }) {  // ring
        if (k.shape[0] == 1) {
          c.append(k, v);
          call(c.keys(), c.values(), SlidingWindowMask{window_});
        } else {
          const auto w = window_keys(c, k, v);
          f(w.k, w.v, SlidingWindowMask{window_});
          c.append(k, v);
        }
      } else {
        c.append(k, v);
        call(c.keys(), c.values(), CausalMask{});
      }
    }, cache_);
  }

 private:
  // K: ConstView3<KV> or QuantView3 (int8).
  template <class KV, class K>
  static void decode_one(ConstView3<float> q, const K& k, const K& v, View3<float> out, const StepContext& ctx) {
    DecodeOptions opt;
    opt.num_threads = ctx.num_threads;
    opt.precision = ctx.precision;  // int8 caches: fast scores keys against an int8 query (VNNI)
    const std::int64_t H = q.shape[1];
    attention_decode<KV>(ConstView2<float>(q.data, {H, q.shape[2]}, {q.stride[1], 1}), k, v,
                         View2<float>(out.data, {H, out.shape[2]}, {out.stride[1], 1}), opt);
  }

  template <class KV>
  void attend_in(KVCache<KV>& cache, ConstView3<float> q, ConstView3<float> k, ConstView3<float> v, View3<float> out,
                 const StepContext& ctx) {
    {
      ATTNKIT_STAGE("attn.cache_append");
      cache.append(k, v);
    }
    ATTNKIT_STAGE("attn.kernel");
    if (q.shape[0] == 1) return decode_one<KV>(q, cache.keys(), cache.values(), out, ctx);
    AttentionOptions opt;
    opt.num_threads = ctx.num_threads;
    opt.precision = ctx.precision;
    if constexpr (std::is_same_v<KV, std::int8_t>)  // the int8 rows read in place (QuantView3)
      attention_prefill(q, cache.keys(), cache.values(), out, CausalMask{}, opt);
    else
      attention_prefill<KV>(q, cache.keys(), cache.values(), out, CausalMask{}, opt);
  }

  template <class KV>
  void attend_in(RingKVCache<KV>& ring, ConstView3<float> q, ConstView3<float> k, ConstView3<float> v, View3<float> out,
                 const StepContext& ctx) {
    if (q.shape[0] == 1) {
      {
        ATTNKIT_STAGE("attn.cache_append");
        ring.append(k, v);  // the ring now holds exactly the W positions the query may see
      }
      ATTNKIT_STAGE("attn.kernel");
      return decode_one<KV>(q, ring.keys(), ring.values(), out, ctx);
    }
    WindowKV<staged_t<KV>> w;
    {
      ATTNKIT_STAGE("attn.window_keys");
      w = window_keys(ring, k, v);
    }
    {
      ATTNKIT_STAGE("attn.kernel");
      AttentionOptions opt;
      opt.num_threads = ctx.num_threads;
      opt.precision = ctx.precision;
      attention_prefill<staged_t<KV>>(q, w.k, w.v, out, SlidingWindowMask{window_}, opt);
    }
    ATTNKIT_STAGE("attn.cache_append");
    ring.append(k, v);
  }

  std::int64_t window_;
  std::variant<KVCache<float>, KVCache<bf16>, KVCache<std::int8_t>, RingKVCache<float>, RingKVCache<bf16>,
               RingKVCache<std::int8_t>>
      cache_{std::in_place_index<0>, 1, 1, 1, 0};
};

}  // namespace attnkit::model
