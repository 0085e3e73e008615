// attnkit/model/mixers/attention.hpp — Qwen3 self-attention as a token mixer (spec §1.2):
// layer types "full_attention" and "sliding_attention".
//
// x [T, D] -> QKVProjection (fused q/k/v, q/k norms, RoPE) -> AttentionCache (append, then
// causal or sliding-window GQA attention over the cached keys) -> o_proj. The state keeps one
// cache per pass of the layer stack, so a looped stack (the same weights run several times per
// token) gives every pass its own keys, as Ouro-style models need; a sliding layer may use
// another window in every pass (BuildContext::pass_windows, 0 = full attention in that pass).
// With QKVProjection's output gate (Qwen3-Next / Qwen3.5 gated attention, layer type
// "gated_attention" in the registry) the attention output is multiplied by σ(gate) elementwise
// before o_proj; a trace then records "attn_gate" [layers, T, H], the mean of σ(gate) over each
// head's dimensions (of the last pass, for looped stacks).
#pragma once

#include <cmath>
#include <memory>
#include <vector>

#include "attnkit/model/mixer.hpp"
#include "attnkit/model/parts/cached_attention.hpp"
#include "attnkit/model/parts/paged_attention.hpp"
#include "attnkit/model/parts/qkv_projection.hpp"
#include "attnkit/model/trace.hpp"

namespace attnkit::model {

// attn [T, H, d] (contiguous) *= σ(gate) elementwise (the Qwen3-Next / Qwen3.5 output gate); a
// trace gets "attn_gate" [layers, T, H], the mean of σ(gate) over each head's dimensions.
inline void apply_output_gate(ConstView3<float> gate, float* attn, int layer, const StepContext& ctx) {
  const std::int64_t T = gate.shape[0], H = gate.shape[1], d = gate.shape[2];
  std::vector<float> mean(ctx.trace ? static_cast<std::size_t>(T * H) : 0);
  parallel_for(T, T >= 16 ? ctx.num_threads : 1, [&](std::int64_t t) {
    ATTNKIT_FAULT_POINT("mixer");
    for (std::int64_t h = 0; h < H; ++h) {
      const float* g = gate.ptr(t, h);
      float* o = attn + (t * H + h) * d;
      double sum = 0;
      for (std::int64_t i = 0; i < d; ++i) {
        const float s = 1.f / (1.f + std::exp(-g[i]));
        o[i] *= s;
        sum += s;
      }
      if (!mean.empty()) mean[static_cast<std::size_t>(t * H + h)] = static_cast<float>(sum / static_cast<double>(d));
    }
  });
  if (ctx.trace) {
    ctx.trace->describe("attn_gate", {"layer", "token", "head"});
    ctx.trace->record("attn_gate", layer, ctx.pos0, ConstView2<float>(mean.data(), {T, H}));
  }
}

class Qwen3Attention final : public TokenMixer {
 public:
  // window == 0: full causal attention; otherwise sliding window of `window` keys.
  Qwen3Attention(const BuildContext& ctx, int layer, std::int64_t window, QKVProjection::Options po = {})
      : window_(window), passes_(ctx.passes), layer_(layer) {
    for (int p = 0; p < passes_; ++p)
      windows_.push_back(window_ && !ctx.pass_windows.empty() ? ctx.pass_windows.at(static_cast<std::size_t>(p)) : window_);
    if (po.prefix.empty()) po.prefix = ctx.prefix(layer) + "self_attn.";
    proj_ = QKVProjection(ctx, po);
    o_ = pack_linear(ctx.source.get(po.prefix + "o_proj.weight", {ctx.config.hidden_size, proj_.heads() * proj_.head_dim()}));
  }

  std::string kind() const override { return window_ ? "sliding_attention" : "full_attention"; }
  std::string describe() const override {
    std::string d = kind();
    d += proj_.describe();
    return d;
  }
  std::int64_t window() const { return window_; }
  std::int64_t window(int pass) const { return windows_.at(static_cast<std::size_t>(pass)); }
  std::size_t weight_bytes() const override { return proj_.weight_bytes() + o_.bytes(); }

  // The KV cache of `pass` in a state this mixer made (benchmarks fill and truncate it directly;
  // Session::set_position() must then follow).
  AttentionCache& cache(MixerState& state, int pass = 0) const {
    auto* st = dynamic_cast<State*>(&state);
    ATTNKIT_REQUIRE(st != nullptr, "Qwen3Attention::cache: argument 'state': not created by this mixer");
    ATTNKIT_REQUIRE(pass >= 0 && pass < static_cast<int>(st->caches.size()), "Qwen3Attention::cache: argument 'pass': ",
                    pass, " but the model was built for ", st->caches.size(), " passes");
    return st->caches[static_cast<std::size_t>(pass)];
  }

  std::unique_ptr<MixerState> new_state(const SessionOptions& opt) const override {
    auto s = std::make_unique<State>();
    for (int p = 0; p < passes_; ++p)
      s->caches.emplace_back(proj_.kv_heads(), proj_.head_dim(), proj_.head_dim(), windows_[static_cast<std::size_t>(p)], opt);
    return s;
  }

  void forward(ConstView2<float> x, View2<float> out, MixerState& state, const StepContext& ctx) const override {
    auto* st = dynamic_cast<State*>(&state);
    ATTNKIT_REQUIRE(st != nullptr, "Qwen3Attention::forward: argument 'state': not created by this mixer");
    ATTNKIT_REQUIRE(ctx.pass >= 0 && ctx.pass < static_cast<int>(st->caches.size()), "Qwen3Attention::forward: pass ",
                    ctx.pass, " but the model was built for ", st->caches.size(), " passes");
    const std::int64_t T = x.shape[0], H = proj_.heads(), d = proj_.head_dim();
    QKV qkv;
    proj_.forward(x, qkv, ctx);
    std::vector<float> own;
    float* attn = scratch(ctx.workspace, ScratchSlot::attention, static_cast<std::size_t>(T * H * d), own);
    st->caches[static_cast<std::size_t>(ctx.pass)].attend(qkv.q, qkv.k, qkv.v, View3<float>(attn, {T, H, d}), ctx);
    if (proj_.output_gate()) apply_output_gate(qkv.gate, attn, layer_, ctx);
    ATTNKIT_STAGE("attn.o_proj");
    o_.forward(View2<float>(attn, {T, H * d}), out, {ctx.precision, ctx.num_threads, false});
  }

  // Batch sessions: the K/V of every pass go to the session's page pool of the layer's window
  // (f32, bf16 or int8 caches; a sliding layer's pages below the window are freed as sequences
  // advance). Passes with different windows (a looped stack's pass_windows) keep a state per
  // sequence.
  PagedLayout paged_layout(const SessionOptions&) const override {
    for (auto w : windows_)
      if (w != windows_.front()) return {};
    return {proj_.kv_heads() * passes_, proj_.head_dim(), windows_.front()};
  }
  void forward_batch(ConstView2<float> x, View2<float> out, const BatchStep& step, const StepContext& ctx) const override {
    if (step.kv_head0 < 0) return TokenMixer::forward_batch(x, out, step, ctx);
    const std::int64_t w = windows_.front();
    ATTNKIT_REQUIRE(step.window == w, "Qwen3Attention::forward_batch: layer ", layer_, " has a window of ", w,
                    " keys but the step's pages are those of a window of ", step.window);
    paged_attention_step(proj_, o_, x, out, step, ctx, detail_paged_attention::CausalPaged<>{ctx, {}, 0.f, w},
                         [&](const QKV& qkv, float* attn) {
                           if (proj_.output_gate()) apply_output_gate(qkv.gate, attn, layer_, ctx);
                         });
  }

 private:
  struct State final : MixerState {
    std::vector<AttentionCache> caches;  // one per pass
    std::unique_ptr<MixerState> clone(const std::string&) const override { return std::make_unique<State>(*this); }
  };
  std::int64_t window_;
  std::vector<std::int64_t> windows_;  // per pass
  int passes_;
  int layer_;
  QKVProjection proj_;
  PackedLinear o_;
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
