// attnkit/model/parts/qkv_projection.hpp — the query/key/value half of Qwen3 attention, as a
// part every softmax-attention mixer reuses (plain, Loop, and the sparse and gated variants).
//
//   x [T, D] -> one fused [q; k; v] product -> per-head RMSNorm of q and k (q_norm / k_norm,
//   when the checkpoint has them) -> RoPE (rotate-half) over the first rotary_dim dimensions
//   of every q and k head, at the step's absolute positions.
// Tensors: {prefix}q_proj.weight [H·d, D], k_proj.weight [H_kv·d, D], v_proj.weight [H_kv·d, D],
// q_norm.weight [d], k_norm.weight [d]. rotary_dim < d (partial rotary) leaves the remaining
// dimensions unrotated.
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "attnkit/model/mixer.hpp"

namespace attnkit::model {

// The projected q, k, v of one step: views into one buffer, [T, heads, d] each.
struct QKV {
  std::vector<float> buffer;
  View3<float> q, k, v;
};

class QKVProjection {
 public:
  struct Options {
    std::string prefix;          // e.g. "model.layers.3.self_attn."
    bool qk_norm = true;         // Qwen3 normalises q and k per head; Qwen2/Ouro-style models do not
    std::int64_t rotary_dim = 0; // 0 -> head_dim
  };

  QKVProjection() = default;
  QKVProjection(const BuildContext& ctx, const Options& o) : rope_(ctx.rope) {
    const auto& c = ctx.config;
    D_ = c.hidden_size;
    H_ = c.num_attention_heads;
    Hkv_ = c.num_key_value_heads;
    d_ = c.head_dim;
    eps_ = static_cast<float>(c.rms_norm_eps);
    rotary_ = o.rotary_dim ? o.rotary_dim : d_;
    ATTNKIT_REQUIRE(rotary_ > 0 && rotary_ <= d_ && rotary_ % 2 == 0, "QKVProjection: ", o.prefix,
                    ": rotary_dim must be even and in (0, head_dim = ", d_, "], got ", rotary_);
    if (!rope_ || rope_->head_dim() != rotary_) rope_ = std::make_shared<const ops::Rope>(rotary_, c.rope_theta);
    HostTensor q = ctx.source.get(o.prefix + "q_proj.weight", {H_ * d_, D_});
    HostTensor k = ctx.source.get(o.prefix + "k_proj.weight", {Hkv_ * d_, D_});
    HostTensor v = ctx.source.get(o.prefix + "v_proj.weight", {Hkv_ * d_, D_});
    qkv_ = pack_fused({&q, &k, &v});
    if (o.qk_norm) {
      q_norm_ = ctx.source.get(o.prefix + "q_norm.weight", {d_}).to_f32();
      k_norm_ = ctx.source.get(o.prefix + "k_norm.weight", {d_}).to_f32();
    }
  }

  std::int64_t heads() const { return H_; }
  std::int64_t kv_heads() const { return Hkv_; }
  std::int64_t head_dim() const { return d_; }
  std::size_t weight_bytes() const { return qkv_.bytes() + (q_norm_.size() + k_norm_.size()) * sizeof(float); }

  // x [T, D] -> out.q [T, H, d], out.k / out.v [T, H_kv, d] (post-norm, post-RoPE).
  void forward(ConstView2<float> x, QKV& out, const StepContext& ctx) const {
    const std::int64_t T = x.shape[0], width = (H_ + 2 * Hkv_) * d_;
    out.buffer.resize(static_cast<std::size_t>(T * width));
    qkv_.forward(x, View2<float>(out.buffer.data(), {T, width}), {ctx.precision, ctx.num_threads, false});
    float* b = out.buffer.data();
    out.q = View3<float>(b, {T, H_, d_}, {width, d_, 1});
    out.k = View3<float>(b + H_ * d_, {T, Hkv_, d_}, {width, d_, 1});
    out.v = View3<float>(b + (H_ + Hkv_) * d_, {T, Hkv_, d_}, {width, d_, 1});
    if (!q_norm_.empty()) {
      ops::rms_norm_heads(out.q, q_norm_.data(), eps_, ctx.num_threads);
      ops::rms_norm_heads(out.k, k_norm_.data(), eps_, ctx.num_threads);
    }
    // The step's shared angles serve when they were made for this rotary width.
    const bool shared = ctx.rope && ctx.rope->half * 2 == rotary_ && ctx.rope->tokens == T && ctx.rope->pos0 == ctx.pos0;
    const ops::Rope::Angles own = shared ? ops::Rope::Angles{} : rope_->angles(ctx.pos0, T);
    const ops::Rope::Angles& ang = shared ? *ctx.rope : own;
    const auto rotary = [&](View3<float> x3) { return View3<float>(x3.data, {x3.shape[0], x3.shape[1], rotary_}, x3.stride); };
    rope_->apply(rotary(out.q), ang, ctx.num_threads);
    rope_->apply(rotary(out.k), ang, ctx.num_threads);
  }

 private:
  std::shared_ptr<const ops::Rope> rope_;
  std::int64_t D_ = 0, H_ = 0, Hkv_ = 0, d_ = 0, rotary_ = 0;
  float eps_ = 1e-6f;
  PackedLinear qkv_;
  std::vector<float> q_norm_, k_norm_;
};

}  // namespace attnkit::model
