// attnkit/model/attention_mixer.hpp — Qwen3 self-attention as a token mixer (spec §1.2).
//
// x [T, D] -> fused q/k/v projection -> per-head q_norm / k_norm -> RoPE at absolute positions
// -> GQA softmax attention over the layer's cache -> o_proj. Full layers keep a growable
// contiguous KV cache; sliding layers a ring buffer of the last W positions. Keys enter the
// cache after RoPE. Every step reads keys from the cache (not from the fresh projection), so a
// bf16 cache gives the same numbers in prefill, chunked prefill and decode.
#pragma once

#include <memory>
#include <variant>
#include <vector>

#include "attnkit/attention/decode.hpp"
#include "attnkit/attention/kv_cache.hpp"
#include "attnkit/attention/prefill.hpp"
#include "attnkit/model/mixer.hpp"

namespace attnkit::model {

class Qwen3Attention final : public TokenMixer {
 public:
  // window == 0: full causal attention; otherwise sliding window of `window` keys.
  Qwen3Attention(const BuildContext& ctx, int layer, std::int64_t window) : rope_(ctx.rope), window_(window) {
    const auto& c = ctx.config;
    D_ = c.hidden_size;
    H_ = c.num_attention_heads;
    Hkv_ = c.num_key_value_heads;
    d_ = c.head_dim;
    eps_ = static_cast<float>(c.rms_norm_eps);
    const std::string p = ctx.prefix(layer) + "self_attn.";
    HostTensor q = ctx.source.get(p + "q_proj.weight", {H_ * d_, D_});
    HostTensor k = ctx.source.get(p + "k_proj.weight", {Hkv_ * d_, D_});
    HostTensor v = ctx.source.get(p + "v_proj.weight", {Hkv_ * d_, D_});
    qkv_ = pack_fused({&q, &k, &v});
    o_ = pack_linear(ctx.source.get(p + "o_proj.weight", {D_, H_ * d_}));
    q_norm_ = ctx.source.get(p + "q_norm.weight", {d_}).to_f32();
    k_norm_ = ctx.source.get(p + "k_norm.weight", {d_}).to_f32();
  }

  std::string kind() const override { return window_ ? "sliding_attention" : "full_attention"; }
  std::int64_t window() const { return window_; }
  std::size_t weight_bytes() const override { return qkv_.bytes() + o_.bytes() + 2 * sizeof(float) * d_; }

  std::unique_ptr<MixerState> new_state(const SessionOptions& opt) const override {
    auto s = std::make_unique<State>();
    if (window_ == 0) {
      if (opt.kv_type == CacheType::f32) s->cache.emplace<KVCache<float>>(Hkv_, d_, d_, opt.reserve_tokens);
      else s->cache.emplace<KVCache<bf16>>(Hkv_, d_, d_, opt.reserve_tokens);
    } else {
      if (opt.kv_type == CacheType::f32) s->cache.emplace<RingKVCache<float>>(Hkv_, d_, d_, window_);
      else s->cache.emplace<RingKVCache<bf16>>(Hkv_, d_, d_, window_);
    }
    return s;
  }

  void forward(ConstView2<float> x, View2<float> out, MixerState& state, const StepContext& ctx) const override {
    const std::int64_t T = x.shape[0];
    ATTNKIT_REQUIRE(ctx.pass == 0, "Qwen3Attention::forward: pass ", ctx.pass,
                    ": this mixer keeps one cache per layer and runs in single-pass stacks only");
    const std::int64_t width = (H_ + 2 * Hkv_) * d_;
    std::vector<float> qkv(static_cast<std::size_t>(T * width));
    qkv_.forward(x, View2<float>(qkv.data(), {T, width}), {ctx.precision, ctx.num_threads, false});
    View3<float> q(qkv.data(), {T, H_, d_}, {width, d_, 1});
    View3<float> k(qkv.data() + H_ * d_, {T, Hkv_, d_}, {width, d_, 1});
    View3<float> v(qkv.data() + (H_ + Hkv_) * d_, {T, Hkv_, d_}, {width, d_, 1});
    ops::rms_norm_heads(q, q_norm_.data(), eps_, ctx.num_threads);
    ops::rms_norm_heads(k, k_norm_.data(), eps_, ctx.num_threads);
    const ops::Rope::Angles own = ctx.rope ? ops::Rope::Angles{} : rope_->angles(ctx.pos0, T);
    const ops::Rope::Angles& ang = ctx.rope ? *ctx.rope : own;
    rope_->apply(q, ang, ctx.num_threads);
    rope_->apply(k, ang, ctx.num_threads);

    std::vector<float> attn(static_cast<std::size_t>(T * H_ * d_));
    View3<float> a(attn.data(), {T, H_, d_});
    auto& st = static_cast<State&>(state);
    std::visit([&](auto& cache) { attend(cache, q, k, v, a, ctx); }, st.cache);
    o_.forward(View2<float>(attn.data(), {T, H_ * d_}), out, {ctx.precision, ctx.num_threads, false});
  }

 private:
  struct State final : MixerState {
    std::variant<std::monostate, KVCache<float>, KVCache<bf16>, RingKVCache<float>, RingKVCache<bf16>> cache;
  };

  void attend(std::monostate&, ConstView3<float>, ConstView3<float>, ConstView3<float>, View3<float>,
              const StepContext&) const {
    throw Error("Qwen3Attention: state was not created by this mixer");
  }

  // One query token against every key in k/v (all visible).
  template <class KV>
  void decode_one(ConstView3<float> q, ConstView3<KV> k, ConstView3<KV> v, View3<float> out,
                  const StepContext& ctx) const {
    DecodeOptions opt;
    opt.num_threads = ctx.num_threads;
    attention_decode<KV>(ConstView2<float>(q.data, {H_, d_}, {q.stride[1], 1}), k, v,
                         View2<float>(out.data, {H_, d_}, {out.stride[1], 1}), opt);
  }

  template <class KV>
  void attend(KVCache<KV>& cache, ConstView3<float> q, ConstView3<float> k, ConstView3<float> v, View3<float> out,
              const StepContext& ctx) const {
    const std::int64_t T = q.shape[0];
    ATTNKIT_REQUIRE(cache.size() == ctx.pos0, "Qwen3Attention: step starts at position ", ctx.pos0,
                    " but the cache holds ", cache.size(), " tokens");
    cache.append(k, v);
    if (T == 1) {
      decode_one<KV>(q, cache.keys(), cache.values(), out, ctx);
    } else {
      AttentionOptions opt;
      opt.num_threads = ctx.num_threads;
      attention_prefill<KV>(q, cache.keys(), cache.values(), out, CausalMask{}, opt);
    }
  }

  template <class KV>
  void attend(RingKVCache<KV>& ring, ConstView3<float> q, ConstView3<float> k, ConstView3<float> v, View3<float> out,
              const StepContext& ctx) const {
    const std::int64_t T = q.shape[0];
    ATTNKIT_REQUIRE(ring.total() == ctx.pos0, "Qwen3Attention: step starts at position ", ctx.pos0,
                    " but the ring buffer has seen ", ring.total(), " tokens");
    if (T == 1) {
      ring.append(k, v);  // the ring now holds exactly the W positions the query may see
      decode_one<KV>(q, ring.keys(), ring.values(), out, ctx);
      return;
    }
    // Chunk: the last W-1 cached positions (in order) followed by the chunk's own keys, stored
    // in the cache's type so the numbers match decode.
    const std::int64_t prev = std::min<std::int64_t>(window_ - 1, ring.size());
    const std::int64_t n = prev + T;
    std::vector<KV> kb(static_cast<std::size_t>(n * Hkv_ * d_)), vb(kb.size());
    View3<KV> kk(kb.data(), {n, Hkv_, d_}), vv(vb.data(), {n, Hkv_, d_});
    if (prev > 0) ring.copy_recent(prev, kk.slice(0, 0, prev), vv.slice(0, 0, prev));
    for (std::int64_t t = 0; t < T; ++t)
      for (std::int64_t h = 0; h < Hkv_; ++h) {
        convert(k.ptr(t, h), kk.ptr(prev + t, h), d_);
        convert(v.ptr(t, h), vv.ptr(prev + t, h), d_);
      }
    AttentionOptions opt;
    opt.num_threads = ctx.num_threads;
    attention_prefill<KV>(q, ConstView3<KV>(kk), ConstView3<KV>(vv), out, SlidingWindowMask{window_}, opt);
    ring.append(k, v);
  }

  std::shared_ptr<const ops::Rope> rope_;
  std::int64_t window_;
  std::int64_t D_ = 0, H_ = 0, Hkv_ = 0, d_ = 0;
  float eps_ = 1e-6f;
  PackedLinear qkv_, o_;
  std::vector<float> q_norm_, k_norm_;
};

// Registers Qwen3's two layer types.
inline void register_qwen3_attention(MixerRegistry& r) {
  r.add("full_attention", [](const BuildContext& c, int layer) { return std::make_unique<Qwen3Attention>(c, layer, 0); });
  r.add("sliding_attention", [](const BuildContext& c, int layer) {
    ATTNKIT_REQUIRE(c.config.sliding_window && *c.config.sliding_window > 0, "Qwen3Attention: layer ", layer,
                    " slides but the config has no positive sliding_window");
    return std::make_unique<Qwen3Attention>(c, layer, *c.config.sliding_window);
  });
}

}  // namespace attnkit::model
