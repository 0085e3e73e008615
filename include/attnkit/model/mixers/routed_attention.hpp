// attnkit/model/mixers/routed_attention.hpp — R-GQA, routed grouped-query attention (spec §10),
// as a token mixer: layer type "routed_attention".
//
//   x [T, D] (the layer's normalised input)
//     -> QKVProjection: q [T, H, d], k / v [T, H_kv, d] (q/k norms, RoPE), as Qwen3 attention
//     -> router logits r = x W_rᵀ [T, H] (no bias)
//     -> route_heads (attention/routed.hpp): per token, a softmax of r within each KV group
//        (rgqa_scope "group") or over all H heads ("all"); the rgqa_top_k most probable heads of
//        every group are kept (ties to the lower head) with weight 1 ("none"), their
//        probability ("prob") or their probability over the kept ones' sum ("renorm")
//     -> routed_attention_{prefill,decode}: kept heads output weight · causal GQA attention over
//        the cached keys, the others 0
//     -> o_proj over the full H·d vector.
// Tensors under model.layers.{i}.self_attn.: q_proj, k_proj, v_proj, o_proj, q_norm, k_norm (as
// Qwen3 attention) and router.weight [H, D]. Config fields (attnkit's names: spec §10 marks the
// router's granularity, top-k and weighting as unverified): rgqa_top_k (default 1, in [1, G],
// G = H / H_kv), rgqa_weighting none|prob|renorm (default renorm), rgqa_scope group|all (default
// group). Every token's k/v are cached for all H_kv heads, whichever heads it kept, so later
// tokens may route anywhere. Routed layers attend causally over the whole cache (there is no
// sliding routed layer). State per pass of the layer stack: the KV cache; in a batch session the
// K/V of every pass live in the session's page pool (f32, bf16 or int8 pages, read in place)
// and the routes of all the step's rows are taken at once (forward_batch).
// A trace records "router_probs" [layers, T, H] (the router softmax) and "router_weight"
// [layers, T, H] (each head's output factor: the kept heads' weight, 0 for the heads not kept),
// of the last pass for looped stacks.
#pragma once

#include <cmath>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "attnkit/attention/routed.hpp"
#include "attnkit/model/mixer.hpp"
#include "attnkit/model/parts/cached_attention.hpp"
#include "attnkit/model/parts/paged_attention.hpp"
#include "attnkit/model/parts/qkv_projection.hpp"
#include "attnkit/model/trace.hpp"

namespace attnkit::model {

// Reads (and consumes) rgqa_top_k, rgqa_weighting and rgqa_scope; G = H / H_kv bounds top_k.
inline RouteOptions read_routed_attention_settings(io::ConfigFields& f) {
  const auto& c = f.config();
  const std::int64_t G = c.num_attention_heads / c.num_key_value_heads;
  RouteOptions o;
  const std::int64_t k = f.integer("rgqa_top_k", 1);
  if (k < 1 || k > G)
    f.fail("rgqa_top_k", "must be in [1, G = ", G, "] (query heads per KV group: ", c.num_attention_heads, " / ",
           c.num_key_value_heads, "), got ", k);
  o.top_k = static_cast<int>(k);
  const std::string w = f.string("rgqa_weighting", "renorm");
  if (w == "none") o.weighting = RouteWeighting::none;
  else if (w == "prob") o.weighting = RouteWeighting::prob;
  else if (w == "renorm") o.weighting = RouteWeighting::renorm;
  else f.fail("rgqa_weighting", "unknown weighting '", w, "' (expected none, prob or renorm)");
  const std::string s = f.string("rgqa_scope", "group");
  if (s == "group") o.scope = RouteScope::group;
  else if (s == "all") o.scope = RouteScope::all;
  else f.fail("rgqa_scope", "unknown scope '", s, "' (expected group or all)");
  return o;
}

class RoutedAttention final : public TokenMixer {
 public:
  RoutedAttention(const BuildContext& ctx, int layer, const RouteOptions& route, QKVProjection::Options po = {})
      : route_(route), passes_(ctx.passes), layer_(layer) {
    if (po.prefix.empty()) po.prefix = ctx.prefix(layer) + "self_attn.";
    proj_ = QKVProjection(ctx, po);
    const std::int64_t G = proj_.heads() / proj_.kv_heads();
    ATTNKIT_REQUIRE(route.top_k >= 1 && route.top_k <= G, "RoutedAttention: layer ", layer, ": top_k ", route.top_k,
                    " is not in [1, G = ", G, "]");
    const std::int64_t D = ctx.config.hidden_size;
    o_ = pack_linear(ctx.source.get(po.prefix + "o_proj.weight", {D, proj_.heads() * proj_.head_dim()}));
    router_ = pack_linear(ctx.source.get(po.prefix + "router.weight", {proj_.heads(), D}));
  }

  std::string kind() const override { return "routed_attention"; }
  std::string describe() const override {
    std::string d = "routed_attention (top-";
    d += std::to_string(route_.top_k);
    d += " of ";
    d += std::to_string(proj_.heads() / proj_.kv_heads());
    d += " heads per KV group, ";
    d += route_weighting_name(route_.weighting);
    d += route_.scope == RouteScope::group ? " weights, softmax within the group" : " weights, softmax over all heads";
    d += ")";
    d += proj_.describe();
    return d;
  }
  const RouteOptions& route() const { return route_; }
  std::size_t weight_bytes() const override { return proj_.weight_bytes() + o_.bytes() + router_.bytes(); }

  std::unique_ptr<MixerState> new_state(const SessionOptions& opt) const override {
    auto s = std::make_unique<State>();
    for (int p = 0; p < passes_; ++p) s->caches.emplace_back(proj_.kv_heads(), proj_.head_dim(), proj_.head_dim(), 0, opt);
    return s;
  }

  void forward(ConstView2<float> x, View2<float> out, MixerState& state, const StepContext& ctx) const override {
    auto* st = dynamic_cast<State*>(&state);
    ATTNKIT_REQUIRE(st != nullptr, "RoutedAttention::forward: argument 'state': not created by this mixer");
    ATTNKIT_REQUIRE(ctx.pass >= 0 && ctx.pass < static_cast<int>(st->caches.size()), "RoutedAttention::forward: pass ",
                    ctx.pass, " but the model was built for ", st->caches.size(), " passes");
    const std::int64_t T = x.shape[0], H = proj_.heads(), d = proj_.head_dim();
    QKV qkv;
    proj_.forward(x, qkv, ctx);
    const Routes r = route(x, ctx);
    std::vector<float> attn(static_cast<std::size_t>(T * H * d));
    st->caches[static_cast<std::size_t>(ctx.pass)].append_then(qkv.k, qkv.v, ctx, [&](auto k, auto v, const auto& mask) {
      using KV = std::remove_const_t<typename decltype(k)::element_type>;
      if (T == 1) {
        DecodeOptions o;
        o.num_threads = ctx.num_threads;
        o.precision = ctx.precision;
        routed_attention_decode<KV>(ConstView2<float>(qkv.q.data, {H, d}, {qkv.q.stride[1], 1}), k, v, r.heads(), r.weights(),
                                    View2<float>(attn.data(), {H, d}), o);
      } else {
        AttentionOptions o;
        o.num_threads = ctx.num_threads;
        o.precision = ctx.precision;
        routed_attention_prefill<KV>(ConstView3<float>(qkv.q), k, v, r.heads(), r.weights(), View3<float>(attn.data(), {T, H, d}),
                                     mask, o);
      }
    });
    o_.forward(View2<float>(attn.data(), {T, H * d}), out, {ctx.precision, ctx.num_threads, false});
    record(ctx, r);
  }

  // A batch session keeps the K/V in its page pool (every pass's heads), the routes are taken
  // for all the step's rows at once, and the kept heads attend over their pages.
  PagedLayout paged_layout(const SessionOptions&) const override { return {proj_.kv_heads() * passes_, proj_.head_dim()}; }
  void forward_batch(ConstView2<float> x, View2<float> out, const BatchStep& step, const StepContext& ctx) const override {
    if (step.kv_head0 < 0) return TokenMixer::forward_batch(x, out, step, ctx);
    const Routes r = route(x, ctx);
    paged_attention_step(proj_, o_, x, out, step, ctx, RoutedPaged{ctx, r}, [](const QKV&, float*) {});
    record(ctx, r);
  }

 private:
  // The router's output for T rows: probabilities [T, H], kept heads and weights [T, H_kv, k_r].
  struct Routes {
    std::int64_t T = 0, H_kv = 0, K = 0, H = 0;
    std::vector<float> probs, weight;
    std::vector<std::int32_t> head;
    ConstView3<std::int32_t> heads() const { return {head.data(), {T, H_kv, K}}; }
    ConstView3<float> weights() const { return {weight.data(), {T, H_kv, K}}; }
    // Rows `rows` of the routes (a sub-batch's packed rows), gathered.
    Routes rows(const std::vector<std::int64_t>& rows) const {
      Routes g{static_cast<std::int64_t>(rows.size()), H_kv, K, H, {}, {}, {}};
      const std::int64_t R = H_kv * K;
      for (const std::int64_t t : rows) {
        g.head.insert(g.head.end(), head.begin() + t * R, head.begin() + (t + 1) * R);
        g.weight.insert(g.weight.end(), weight.begin() + t * R, weight.begin() + (t + 1) * R);
      }
      return g;
    }
  };

  Routes route(ConstView2<float> x, const StepContext& ctx) const {
    Routes r{x.shape[0], proj_.kv_heads(), route_.top_k, proj_.heads(), {}, {}, {}};
    std::vector<float> logits(static_cast<std::size_t>(r.T * r.H));
    r.probs.resize(logits.size());
    r.head.resize(static_cast<std::size_t>(r.T * r.H_kv * r.K));
    r.weight.resize(r.head.size());
    router_.forward(x, View2<float>(logits.data(), {r.T, r.H}), {ctx.precision, ctx.num_threads, false});
    RouteOptions ro = route_;
    ro.num_threads = ctx.num_threads;
    route_heads(ConstView2<float>(logits.data(), {r.T, r.H}), r.H_kv, ro, View3<std::int32_t>(r.head.data(), {r.T, r.H_kv, r.K}),
                View3<float>(r.weight.data(), {r.T, r.H_kv, r.K}), View2<float>(r.probs.data(), {r.T, r.H}));
    return r;
  }

  // A trace's "router_probs" and "router_weight" rows (in a batch step, by packed row: the
  // routing trace files each sequence's rows at its own positions).
  void record(const StepContext& ctx, const Routes& r) const {
    if (!ctx.trace) return;
    std::vector<float> kept(static_cast<std::size_t>(r.T * r.H), 0.f);
    const ConstView3<std::int32_t> hv = r.heads();
    const ConstView3<float> wv = r.weights();
    for (std::int64_t t = 0; t < r.T; ++t)
      for (std::int64_t j = 0; j < r.H_kv; ++j)
        for (std::int64_t i = 0; i < r.K; ++i) kept[static_cast<std::size_t>(t * r.H + hv(t, j, i))] = wv(t, j, i);
    ctx.trace->describe("router_probs", {"layer", "token", "head"});
    ctx.trace->record("router_probs", layer_, ctx.pos0, ConstView2<float>(r.probs.data(), {r.T, r.H}));
    ctx.trace->describe("router_weight", {"layer", "token", "head"});
    ctx.trace->record("router_weight", layer_, ctx.pos0, ConstView2<float>(kept.data(), {r.T, r.H}));
  }

  // The kept heads over the pages (detail_paged_attention::attend's policy): each sub-batch
  // takes its rows' routes.
  struct RoutedPaged {
    const StepContext& ctx;
    const Routes& routes;
    template <class KV>
    void decode(ConstView3<float> q, const PagedKV<KV>& pages, const PageTable& table, View3<float> out,
                const std::vector<std::int64_t>& rows) const {
      DecodeOptions o;
      o.num_threads = ctx.num_threads;
      o.precision = ctx.precision;
      const Routes r = routes.rows(rows);
      routed_attention_decode_paged<KV>(q, pages, table, r.heads(), r.weights(), out, o);
    }
    template <class KV>
    void prefill(ConstView3<float> q, const PagedKV<KV>& pages, const PageTable& table, std::span<const std::int64_t> cu,
                 View3<float> out, const std::vector<std::int64_t>& rows) const {
      AttentionOptions o;
      o.num_threads = ctx.num_threads;
      o.precision = ctx.precision;
      const Routes r = routes.rows(rows);
      routed_attention_prefill_paged<KV>(q, pages, table, cu, r.heads(), r.weights(), out, CausalMask{}, o);
    }
  };

  struct State final : MixerState {
    std::vector<AttentionCache> caches;  // one per pass
    std::unique_ptr<MixerState> clone(const std::string&) const override { return std::make_unique<State>(*this); }
  };
  RouteOptions route_;
  int passes_;
  int layer_;
  QKVProjection proj_;
  PackedLinear o_, router_;
};

// Registers "routed_attention" (settings from the config's rgqa_* fields).
inline void register_routed_attention(MixerRegistry& r) {
  r.add("routed_attention", [](const BuildContext& c, int layer) {
    return std::make_unique<RoutedAttention>(c, layer, read_routed_attention_settings(c.fields));
  });
}

}  // namespace attnkit::model
