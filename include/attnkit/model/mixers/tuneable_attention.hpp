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
// pass of the layer stack: the KV cache; in a batch session the K/V live in the session's page pool
// (folded: the paged kernels take the metric as their variant; unfolded: the r-wide keys span
// ceil(r / d_k) adjacent d_k-wide slots of the pool per KV head).
#pragma once

#include <algorithm>
#include <cmath>
#include <memory>
#include <string>
#include <vector>

#include "attnkit/attention/variant.hpp"
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
    const std::vector<float> u = ctx.source.get(po.prefix + "U", {d, r}).to_f32();  // [d_k, r] row-major
    for (std::size_t i = 0; i < u.size(); ++i)
      ATTNKIT_REQUIRE(std::isfinite(u[i]), "TuneableAttention: ", po.prefix, "U: element ", i, " is ", u[i]);
    if (s.unfolded) {  // Uᵀ [r, d_k] as an f32 linear layer: q U and k U of all rows in one product
      std::vector<float> ut(static_cast<std::size_t>(r * d));
      for (std::int64_t i = 0; i < d; ++i)
        for (std::int64_t c = 0; c < r; ++c) ut[static_cast<std::size_t>(c * d + i)] = u[static_cast<std::size_t>(i * r + c)];
      u_packed_ = pack_as(ut.data(), r, d, WeightType::f32, po.prefix + "U");
    } else {  // M = U Uᵀ in double, rounded once
      m_.resize(static_cast<std::size_t>(d * d));
      for (std::int64_t i = 0; i < d; ++i)
        for (std::int64_t j = 0; j < d; ++j) {
          double acc = 0;
          for (std::int64_t c = 0; c < r; ++c)
            acc += static_cast<double>(u[static_cast<std::size_t>(i * r + c)]) * u[static_cast<std::size_t>(j * r + c)];
          m_[static_cast<std::size_t>(i * d + j)] = static_cast<float>(acc);
        }
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
  std::size_t weight_bytes() const override { return proj_.weight_bytes() + o_.bytes() + u_packed_.bytes() + m_.size() * sizeof(float); }

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
    const std::int64_t T = x.shape[0], H = proj_.heads(), d = proj_.head_dim(), r = s_.rank;
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
      std::vector<float> own;
      const PagedQK unf = unfold(qkv, own, ctx);
      cache.append_then(unf.k, qkv.v, ctx, [&](auto k, auto v, const auto& mask) {
        using KV = std::remove_const_t<typename decltype(k)::element_type>;
        if (T == 1) {
          DecodeOptions o;
          o.num_threads = ctx.num_threads;
          o.precision = ctx.precision;
          o.scale = scale_;
          attention_decode<KV>(ConstView2<float>(unf.q.data, {H, r}), k, v, View2<float>(attn.data(), {H, d}), o);
        } else {
          AttentionOptions o;
          o.num_threads = ctx.num_threads;
          o.precision = ctx.precision;
          o.scale = scale_;
          attention_prefill<KV>(unf.q, k, v, av, mask, o);
        }
      });
    }
    o_.forward(View2<float>(attn.data(), {T, H * d}), out, {ctx.precision, ctx.num_threads, false});
  }

  // Batch sessions keep the K/V of both forms in the session's page pool. The folded form's keys are
  // d_k wide, as plain attention's (the metric rides on the query in the paged kernels). The
  // unfolded form's r-wide keys take ceil(r / d_k) adjacent slots of the pool per KV head (its V the
  // first of them): the pool is d_k wide for every layer, so r > d_k leaves (slots - 1) V slots
  // unused, memory the paged form spends so that one page id still covers every layer.
  PagedLayout paged_layout(const SessionOptions&) const override {
    return {proj_.kv_heads() * slots() * passes_, proj_.head_dim()};
  }
  void forward_batch(ConstView2<float> x, View2<float> out, const BatchStep& step, const StepContext& ctx) const override {
    if (step.kv_head0 < 0) return TokenMixer::forward_batch(x, out, step, ctx);
    const auto none = [](const QKV&, float*) {};
    if (!s_.unfolded)
      return paged_attention_step(proj_, o_, x, out, step, ctx,
                                  detail_paged_attention::CausalPaged<MetricVariant>{ctx, metric_variant()}, none);
    std::vector<float> own;
    paged_attention_step(proj_, o_, x, out, step, ctx, detail_paged_attention::CausalPaged<>{ctx, {}, scale_}, none,
                         [&](const QKV& qkv) { return unfold(qkv, own, ctx); });
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

  // Pool slots per KV head in a batch session: the keys' width over the pool's d_k.
  std::int64_t slots() const { return s_.unfolded ? (s_.rank + proj_.head_dim() - 1) / proj_.head_dim() : 1; }

  // The unfolded form's q' = q U [T, H, r] and k' = k U [T, H_kv, r]: the step's q and k heads
  // gathered into rows, then one product with Uᵀ (a linear layer: Precision::fast rounds the rows
  // to bf16, as the projections do), into the workspace's mixer slot (or own).
  PagedQK unfold(const QKV& qkv, std::vector<float>& own, const StepContext& ctx) const {
    const std::int64_t T = qkv.q.shape[0], H = proj_.heads(), Hkv = proj_.kv_heads(), d = proj_.head_dim(), r = s_.rank;
    const std::int64_t rows = T * (H + Hkv);
    float* buf = scratch(ctx.workspace, ScratchSlot::mixer, static_cast<std::size_t>(rows * (d + r)), own);
    float* in = buf + rows * r;  // [T * H + T * H_kv, d]; the products go to buf [T * H, r] then [T * H_kv, r]
    parallel_for(T, T >= 16 ? ctx.num_threads : 1, [&](std::int64_t t) {
      ATTNKIT_FAULT_POINT("mixer");
      for (std::int64_t h = 0; h < H; ++h) std::copy_n(qkv.q.ptr(t, h), d, in + (t * H + h) * d);
      for (std::int64_t h = 0; h < Hkv; ++h) std::copy_n(qkv.k.ptr(t, h), d, in + (T * H + t * Hkv + h) * d);
    });
    u_packed_.forward(ConstView2<float>(in, {rows, d}), View2<float>(buf, {rows, r}), {ctx.precision, ctx.num_threads, false});
    return {ConstView3<float>(buf, {T, H, r}), ConstView3<float>(buf + T * H * r, {T, Hkv, r}), slots()};
  }

  TuneableSettings s_;
  int passes_;
  QKVProjection proj_;
  PackedLinear o_;
  PackedLinear u_packed_;  // Uᵀ [r, d_k] (unfolded form only)
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
