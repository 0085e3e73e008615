// attnkit/model/mixers/tuneable_attention.hpp — Tuneable attention (spec §11; AGILLM-3's
// TuneableAttentionMHA) on a Qwen3 attention layer, as a token mixer: layer type
// "tuneable_attention".
//
// One learned U [d_k, r] per layer, shared by all heads: scores are
//   z = (q U) · (k U) / sqrt(d_k) = q (U Uᵀ) kᵀ / sqrt(d_k)      (the scale uses d_k, not r)
// with q, k the post-norm, post-RoPE query and key of Qwen3 attention; V is not projected.
// Two forms, chosen by the config field tuneable_form:
//   "folded" (default): M = U Uᵀ [d_k, d_k], formed once at load in double, is applied to the
//     query inside the kernel (the QueryMetric variant); keys are cached d_k wide as usual.
//     rank(M) <= d_k, so this is exact for any r and costs a d_k x d_k product per query head.
//   "unfolded" (AGILLM's own): q' = q U and k' = k U; the K cache is r wide, V stays d_k wide.
// Both compute the same scores up to rounding. M is applied after RoPE, so it breaks RoPE's
// strict relative-position invariance unless it commutes with the rotations (it does for
// M = I: an orthogonal U with r >= d_k gives plain attention).
// Tensors under model.layers.{i}.self_attn.: q_proj, k_proj, v_proj, o_proj, q_norm, k_norm (as
// Qwen3 attention) and U [d_k, r]. Config fields: tuneable_rank (r, required), tuneable_form
// (folded | unfolded). Full causal attention (there is no sliding Tuneable layer). State per
// pass of the layer stack: the KV cache; in a batch session the folded form's K/V live in the
// session's page pool (the paged kernels take the metric as their variant), the unfolded form
// keeps its r-wide keys per sequence.
#pragma once

#include <cmath>
#include <memory>
#include <string>
#include <vector>

#include "attnkit/attention/variant.hpp"
#include "attnkit/core/simd.hpp"
#include "attnkit/core/threading.hpp"
#include "attnkit/model/mixer.hpp"
#include "attnkit/model/parts/cached_attention.hpp"
#include "attnkit/model/parts/paged_attention.hpp"
#include "attnkit/model/parts/qkv_projection.hpp"

namespace attnkit::model {

struct TuneableSettings {
  std::int64_t rank = 0;  // r: columns of U
  bool unfolded = false;  // AGILLM's q U, k U (K cache r wide) instead of M = U Uᵀ on the query
};

// Reads (and consumes) tuneable_rank (required, >= 1) and tuneable_form (folded | unfolded).
inline TuneableSettings read_tuneable_settings(io::ConfigFields& f) {
  TuneableSettings s;
  if (!f.has("tuneable_rank")) f.fail("tuneable_rank", "missing: tuneable_attention layers need tuneable_rank (the columns r of U [head_dim, r])");
  s.rank = f.integer("tuneable_rank", 0);
  if (s.rank < 1 || s.rank > (std::int64_t{1} << 16)) f.fail("tuneable_rank", "must be in [1, 65536], got ", s.rank);
  const std::string form = f.string("tuneable_form", "folded");
  if (form == "unfolded") s.unfolded = true;
  else if (form != "folded") f.fail("tuneable_form", "unknown form '", form, "' (expected folded or unfolded)");
  return s;
}

class TuneableAttention final : public TokenMixer {
  using MetricVariant = decltype(make_variant(QueryMetric{}));  // the folded form's: q̃ = q M in the kernels

 public:
  TuneableAttention(const BuildContext& ctx, int layer, const TuneableSettings& s, QKVProjection::Options po = {})
      : s_(s), passes_(ctx.passes) {
    ATTNKIT_REQUIRE(s.rank >= 1, "TuneableAttention: layer ", layer, ": rank must be >= 1, got ", s.rank);
    if (po.prefix.empty()) po.prefix = ctx.prefix(layer) + "self_attn.";
    proj_ = QKVProjection(ctx, po);
    const std::int64_t d = proj_.head_dim(), r = s.rank;
    o_ = pack_linear(ctx.source.get(po.prefix + "o_proj.weight", {ctx.config.hidden_size, proj_.heads() * d}));
    u_ = ctx.source.get(po.prefix + "U", {d, r}).to_f32();
    for (std::size_t i = 0; i < u_.size(); ++i)
      ATTNKIT_REQUIRE(std::isfinite(u_[i]), "TuneableAttention: ", po.prefix, "U: element ", i, " is ", u_[i]);
    if (!s.unfolded) {  // M = U Uᵀ in double, rounded once
      m_.resize(static_cast<std::size_t>(d * d));
      for (std::int64_t i = 0; i < d; ++i)
        for (std::int64_t j = 0; j < d; ++j) {
          double acc = 0;
          for (std::int64_t c = 0; c < r; ++c)
            acc += static_cast<double>(u_[static_cast<std::size_t>(i * r + c)]) * u_[static_cast<std::size_t>(j * r + c)];
          m_[static_cast<std::size_t>(i * d + j)] = static_cast<float>(acc);
        }
      u_.clear();
    }
    scale_ = static_cast<float>(1.0 / std::sqrt(static_cast<double>(d)));
  }

  std::string kind() const override { return "tuneable_attention"; }
  std::string describe() const override {
    std::string d = "tuneable_attention (U ";
    d += std::to_string(proj_.head_dim());
    d += " x ";
    d += std::to_string(s_.rank);
    d += s_.unfolded ? ", unfolded: q U and k U, keys cached " + std::to_string(s_.rank) + " wide)"
                     : ", folded: M = U U^T on the post-RoPE query)";
    d += proj_.describe();
    return d;
  }
  const TuneableSettings& settings() const { return s_; }
  // The folded metric M = U Uᵀ [d_k, d_k] (row-major; empty in the unfolded form).
  const std::vector<float>& metric() const { return m_; }
  std::size_t weight_bytes() const override { return proj_.weight_bytes() + o_.bytes() + (u_.size() + m_.size()) * sizeof(float); }

  std::unique_ptr<MixerState> new_state(const SessionOptions& opt) const override {
    auto st = std::make_unique<State>();
    const std::int64_t d = proj_.head_dim();
    for (int p = 0; p < passes_; ++p) st->caches.emplace_back(proj_.kv_heads(), s_.unfolded ? s_.rank : d, d, 0, opt);
    return st;
  }

  void forward(ConstView2<float> x, View2<float> out, MixerState& state, const StepContext& ctx) const override {
    auto* st = dynamic_cast<State*>(&state);
    ATTNKIT_REQUIRE(st != nullptr, "TuneableAttention::forward: argument 'state': not created by this mixer");
    ATTNKIT_REQUIRE(ctx.pass >= 0 && ctx.pass < static_cast<int>(st->caches.size()), "TuneableAttention::forward: pass ",
                    ctx.pass, " but the model was built for ", st->caches.size(), " passes");
    const std::int64_t T = x.shape[0], H = proj_.heads(), Hkv = proj_.kv_heads(), d = proj_.head_dim(), r = s_.rank;
    QKV qkv;
    proj_.forward(x, qkv, ctx);
    std::vector<float> attn(static_cast<std::size_t>(T * H * d));
    const View3<float> av(attn.data(), {T, H, d});
    AttentionCache& cache = st->caches[static_cast<std::size_t>(ctx.pass)];

    if (!s_.unfolded) {
      const auto var = metric_variant();
      cache.append_then(qkv.k, qkv.v, ctx, [&](auto k, auto v, const auto& mask) {
        using KV = std::remove_const_t<typename decltype(k)::element_type>;
        if (T == 1) {
          DecodeOptions o;
          o.num_threads = ctx.num_threads;
          o.precision = ctx.precision;
          attention_decode<KV>(ConstView2<float>(qkv.q.data, {H, d}, {qkv.q.stride[1], 1}), k, v,
                               View2<float>(attn.data(), {H, d}), o, {}, var);
        } else {
          AttentionOptions o;
          o.num_threads = ctx.num_threads;
          o.precision = ctx.precision;
          attention_prefill<KV>(ConstView3<float>(qkv.q), k, v, av, mask, o, {}, var);
        }
      });
    } else {
      // q' = q U [T, H, r], k' = k U [T, H_kv, r].
      std::vector<float> qu(static_cast<std::size_t>(T * H * r)), ku(static_cast<std::size_t>(T * Hkv * r));
      parallel_for(T, T >= 16 ? ctx.num_threads : 1, [&](std::int64_t t) {
        ATTNKIT_FAULT_POINT("mixer");
        for (std::int64_t h = 0; h < H; ++h) project(qkv.q.ptr(t, h), qu.data() + (t * H + h) * r);
        for (std::int64_t h = 0; h < Hkv; ++h) project(qkv.k.ptr(t, h), ku.data() + (t * Hkv + h) * r);
      });
      const ConstView3<float> qv(qu.data(), {T, H, r});
      cache.append_then(ConstView3<float>(ku.data(), {T, Hkv, r}), qkv.v, ctx, [&](auto k, auto v, const auto& mask) {
        using KV = std::remove_const_t<typename decltype(k)::element_type>;
        if (T == 1) {
          DecodeOptions o;
          o.num_threads = ctx.num_threads;
          o.precision = ctx.precision;
          o.scale = scale_;
          attention_decode<KV>(ConstView2<float>(qu.data(), {H, r}), k, v, View2<float>(attn.data(), {H, d}), o);
        } else {
          AttentionOptions o;
          o.num_threads = ctx.num_threads;
          o.precision = ctx.precision;
          o.scale = scale_;
          attention_prefill<KV>(qv, k, v, av, mask, o);
        }
      });
    }
    o_.forward(View2<float>(attn.data(), {T, H * d}), out, {ctx.precision, ctx.num_threads, false});
  }

  // Batch sessions: the folded form keeps its K/V in the session's page pool (keys d_k wide, as
  // plain attention's; the metric rides on the query in the paged kernels); the unfolded form's
  // keys are r wide, so it keeps a cache per sequence (TokenMixer::forward_batch).
  PagedLayout paged_layout(const SessionOptions&) const override {
    if (s_.unfolded) return {};
    return {proj_.kv_heads() * passes_, proj_.head_dim()};
  }
  void forward_batch(ConstView2<float> x, View2<float> out, const BatchStep& step, const StepContext& ctx) const override {
    if (step.kv_head0 < 0) return TokenMixer::forward_batch(x, out, step, ctx);
    paged_attention_step(proj_, o_, x, out, step, ctx, detail_paged_attention::CausalPaged<MetricVariant>{ctx, metric_variant()},
                         [](const QKV&, float*) {});
  }

 private:
  // The folded form's variant: q̃ = q M inside the kernels.
  MetricVariant metric_variant() const {
    const std::int64_t d = proj_.head_dim();
    return make_variant(QueryMetric{ConstView2<float>(m_.data(), {d, d})});
  }

  struct State final : MixerState {
    std::vector<AttentionCache> caches;  // one per pass
    std::unique_ptr<MixerState> clone(const std::string&) const override { return std::make_unique<State>(*this); }
  };

  // y [r] = x [d] · U.
  void project(const float* x, float* y) const {
    const std::int64_t d = proj_.head_dim(), r = s_.rank;
    std::fill(y, y + r, 0.f);
    for (std::int64_t i = 0; i < d; ++i) simd::axpy(x[i], u_.data() + i * r, y, r);
  }

  TuneableSettings s_;
  int passes_;
  QKVProjection proj_;
  PackedLinear o_;
  std::vector<float> u_;  // U [d_k, r] row-major (unfolded form only)
  std::vector<float> m_;  // M = U Uᵀ [d_k, d_k] (folded form only)
  float scale_ = 1.f;     // 1 / sqrt(d_k)
};

// Registers "tuneable_attention" (settings from the config's tuneable_* fields).
inline void register_tuneable_attention(MixerRegistry& r) {
  r.add("tuneable_attention", [](const BuildContext& c, int layer) {
    return std::make_unique<TuneableAttention>(c, layer, read_tuneable_settings(c.fields));
  });
}

}  // namespace attnkit::model
