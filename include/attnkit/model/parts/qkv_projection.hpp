// attnkit/model/parts/qkv_projection.hpp — the query/key/value half of Qwen3 attention, as a
// part every softmax-attention mixer reuses (plain, Loop, and the sparse and gated variants).
//
//   x [T, D] -> one fused [q; k; v] product -> per-head RMSNorm of q and k (q_norm / k_norm,
//   when the checkpoint has them) -> RoPE (rotate-half) over the first rotary_dim dimensions
//   of every q and k head, at the step's absolute positions.
// Tensors: {prefix}q_proj.weight [H·d, D], k_proj.weight [H_kv·d, D], v_proj.weight [H_kv·d, D],
// q_norm.weight [d], k_norm.weight [d]. rotary_dim < d (partial rotary; default the config's
// rotary_dim()) leaves the remaining dimensions unrotated. q/k norm weights follow the model's
// norm convention (BuildContext::norm_weight_offset: (1 + w) for Qwen3.5).
// With an output gate (Qwen3-Next / Qwen3.5 gated attention) q_proj.weight is [H·2d, D] with
// rows per head [q (d) | gate (d)]: the gate comes out unnormalised and unrotated in QKV::gate,
// and the attention mixer multiplies its output by σ(gate) before o_proj.
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "attnkit/model/mixer.hpp"

namespace attnkit::model {

// The projected q, k, v of one step: views into one buffer, [T, heads, d] each; gate [T, H, d]
// when the projection has an output gate (else an empty view).
struct QKV {
  std::vector<float> buffer;  // the rows' storage where the step has no workspace
  View3<float> q, k, v, gate;
};

class QKVProjection {
 public:
  struct Options {
    std::string prefix;          // e.g. "model.layers.3.self_attn."
    bool qk_norm = true;         // Qwen3 normalises q and k per head; Qwen2/Ouro-style models do not
    std::int64_t rotary_dim = 0; // 0 -> the config's rotary_dim() (head_dim unless partial_rotary_factor)
    bool output_gate = false;    // q_proj also makes a per-head output gate: rows per head [q | gate]
  };

  QKVProjection() = default;
  QKVProjection(const BuildContext& ctx, const Options& o) : rope_(ctx.rope) {
    const auto& c = ctx.config;
    D_ = c.hidden_size;
    H_ = c.num_attention_heads;
    Hkv_ = c.num_key_value_heads;
    d_ = c.head_dim;
    eps_ = static_cast<float>(c.rms_norm_eps);
    rotary_ = o.rotary_dim ? o.rotary_dim : c.rotary_dim();
    gated_ = o.output_gate;
    ATTNKIT_REQUIRE(rotary_ > 0 && rotary_ <= d_ && rotary_ % 2 == 0, "QKVProjection: ", o.prefix,
                    ": rotary_dim must be even and in (0, head_dim = ", d_, "], got ", rotary_);
    if (!rope_ || rope_->head_dim() != rotary_) rope_ = std::make_shared<const ops::Rope>(rotary_, c.rope_theta);
    HostTensor q = ctx.source.get(o.prefix + "q_proj.weight", {(gated_ ? 2 : 1) * H_ * d_, D_});
    HostTensor k = ctx.source.get(o.prefix + "k_proj.weight", {Hkv_ * d_, D_});
    HostTensor v = ctx.source.get(o.prefix + "v_proj.weight", {Hkv_ * d_, D_});
    qkv_ = pack_fused({&q, &k, &v});
    if (o.qk_norm) {
      q_norm_ = ctx.norm_weight(o.prefix + "q_norm.weight", d_);
      k_norm_ = ctx.norm_weight(o.prefix + "k_norm.weight", d_);
    }
  }

  std::int64_t heads() const { return H_; }
  std::int64_t kv_heads() const { return Hkv_; }
  std::int64_t head_dim() const { return d_; }
  std::int64_t rotary_dim() const { return rotary_; }
  bool output_gate() const { return gated_; }
  // What a mixer's describe() adds for this projection: ", output gate", ", rotary r of d".
  std::string describe() const {
    std::string d;
    if (gated_) d += ", output gate";
    if (rotary_ != head_dim()) {
      d += ", rotary ";
      d += std::to_string(rotary_);
      d += " of ";
      d += std::to_string(head_dim());
    }
    return d;
  }
  std::size_t weight_bytes() const { return qkv_.bytes() + (q_norm_.size() + k_norm_.size()) * sizeof(float); }

  // x [T, D] -> out.q [T, H, d], out.k / out.v [T, H_kv, d] (post-norm, post-RoPE), out.gate.
  void forward(ConstView2<float> x, QKV& out, const StepContext& ctx) const {
    project(x, out, ctx);
    rotate(out.q, out.k, ctx.pos0, ctx.rope, ctx.num_threads);
  }

  // The same for a batch step's packed rows: one product over all of them, then each
  // sequence's rows rotated at its own positions.
  void forward_batch(ConstView2<float> x, QKV& out, const BatchStep& step, const StepContext& ctx) const {
    project(x, out, ctx);
    for (std::int64_t b = 0; b < step.batch(); ++b) {
      const std::int64_t r0 = step.cu_seqlens[b], r1 = step.cu_seqlens[b + 1];
      if (r1 > r0)
        rotate(out.q.slice(0, r0, r1), out.k.slice(0, r0, r1), step.pos0[b], step.rope.empty() ? nullptr : &step.rope[b],
               r1 - r0 >= 16 ? ctx.num_threads : 1);
    }
  }

 private:
  // The fused product and the q/k norms.
  void project(ConstView2<float> x, QKV& out, const StepContext& ctx) const {
    const std::int64_t qw = (gated_ ? 2 : 1) * H_ * d_, width = qw + 2 * Hkv_ * d_, T = x.shape[0];
    float* b = scratch(ctx.workspace, ScratchSlot::qkv, static_cast<std::size_t>(T * width), out.buffer);
    {
      ATTNKIT_STAGE("attn.qkv_proj");
      qkv_.forward(x, View2<float>(b, {T, width}), {ctx.precision, ctx.num_threads, false});
    }
    const std::int64_t head_stride = gated_ ? 2 * d_ : d_;  // gated: [q | gate] per head
    out.q = View3<float>(b, {T, H_, d_}, {width, head_stride, 1});
    out.gate = gated_ ? View3<float>(b + d_, {T, H_, d_}, {width, head_stride, 1}) : View3<float>();
    out.k = View3<float>(b + qw, {T, Hkv_, d_}, {width, d_, 1});
    out.v = View3<float>(b + qw + Hkv_ * d_, {T, Hkv_, d_}, {width, d_, 1});
    if (!q_norm_.empty()) {
      ATTNKIT_STAGE("attn.qk_norm");
      ops::rms_norm_heads(out.q, q_norm_.data(), eps_, ctx.num_threads);
      ops::rms_norm_heads(out.k, k_norm_.data(), eps_, ctx.num_threads);
    }
  }

  // RoPE on q and k [T, heads, d] at positions pos0 ...; `shared` angles serve when they were
  // made for this rotary width and these positions.
  void rotate(View3<float> q, View3<float> k, std::int64_t pos0, const ops::Rope::Angles* shared, int threads) const {
    ATTNKIT_STAGE("attn.rope");
    const std::int64_t T = q.shape[0];
    const bool use = shared && shared->half * 2 == rotary_ && shared->tokens == T && shared->pos0 == pos0;
    const ops::Rope::Angles own = use ? ops::Rope::Angles{} : rope_->angles(pos0, T);
    const ops::Rope::Angles& ang = use ? *shared : own;
    const auto rotary = [&](View3<float> x3) { return View3<float>(x3.data, {x3.shape[0], x3.shape[1], rotary_}, x3.stride); };
    rope_->apply(rotary(q), ang, threads);
    rope_->apply(rotary(k), ang, threads);
  }

  std::shared_ptr<const ops::Rope> rope_;
  std::int64_t D_ = 0, H_ = 0, Hkv_ = 0, d_ = 0, rotary_ = 0;
  bool gated_ = false;
  float eps_ = 1e-6f;
  PackedLinear qkv_;
  std::vector<float> q_norm_, k_norm_;
};

}  // namespace attnkit::model
