// attnkit/model/mixers/gated_deltanet.hpp — Gated DeltaNet as a token mixer (spec §7): layer
// type "linear_attention" (Qwen3-Next / Qwen3.5 hybrids).
//
//   x [T, D] -> one packed product [q | k | v | z | b | a]
//     q, k (n_k heads × d_k), v (n_v × d_v): causal depthwise conv (kernel K, no bias) + SiLU
//     β = σ(b), g = −exp(A_log) · softplus(a + dt_bias)            (per value head, f32)
//     o = gated delta rule(q, k, v, g, β; S)   (q, k L2-normalised inside; value head h reads
//                                               key head h / (n_v / n_k))
//     y = out_proj( gated RMSNorm(o, z; norm.weight, rms_norm_eps) )   (plain w, not 1 + w)
// Three checkpoint layouts, told apart by tensor names under {prefix} (default
// model.layers.{i}.linear_attn.), all rearranged at load into the one internal layout above:
//  * Qwen3.5: in_proj_qkv [2·n_k·d_k + n_v·d_v, D] (rows [q | k | v], the conv channels' order),
//    in_proj_z [n_v·d_v, D], in_proj_b / in_proj_a [n_v, D], conv1d.weight [C, 1, K], A_log,
//    dt_bias [n_v], norm.weight [d_v], out_proj.weight [D, n_v·d_v];
//  * Qwen3-Next: in_proj_qkvz [2·n_k·d_k + 2·n_v·d_v, D] and in_proj_ba [2·n_v, D], grouped per
//    key head ([q | k | v (r·d_v) | z (r·d_v)] and [b (r) | a (r)], r = n_v / n_k), de-interleaved
//    at load; the rest as Qwen3.5;
//  * fla (GatedDeltaNet): q_proj, k_proj, v_proj, g_proj (= z), b_proj, a_proj, q_conv1d /
//    k_conv1d / v_conv1d.weight, A_log, dt_bias, o_norm.weight, o_proj.weight.
// The per-sequence state is, per pass of the layer stack (looped stacks give every pass its own):
// S [n_v, d_k, d_v] f32 and the conv window (the last K−1 conv inputs). Prefill, chunked prefill
// and decode run the same kernels from that state. A trace records "gdn_beta" (β) and
// "gdn_decay" (α = exp(g)) [layers, T, n_v] (of the last pass, for looped stacks).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "attnkit/model/mixer.hpp"
#include "attnkit/model/trace.hpp"
#include "attnkit/recurrent/gated_delta.hpp"
#include "attnkit/recurrent/gated_norm.hpp"
#include "attnkit/recurrent/short_conv.hpp"

namespace attnkit::model {

// config.json's linear_* fields (transformers' Qwen3NextConfig defaults when absent).
struct GatedDeltaNetSettings {
  std::int64_t key_heads = 16, value_heads = 32, key_dim = 128, value_dim = 128, conv_kernel = 4;
};

inline GatedDeltaNetSettings read_gated_deltanet_settings(io::ConfigFields& f) {
  GatedDeltaNetSettings s;
  s.key_heads = f.integer("linear_num_key_heads", s.key_heads);
  s.value_heads = f.integer("linear_num_value_heads", s.value_heads);
  s.key_dim = f.integer("linear_key_head_dim", s.key_dim);
  s.value_dim = f.integer("linear_value_head_dim", s.value_dim);
  s.conv_kernel = f.integer("linear_conv_kernel_dim", s.conv_kernel);
  const std::pair<const char*, std::int64_t> sizes[] = {{"linear_num_key_heads", s.key_heads},
                                                        {"linear_num_value_heads", s.value_heads},
                                                        {"linear_key_head_dim", s.key_dim},
                                                        {"linear_value_head_dim", s.value_dim}};
  for (const auto& [name, v] : sizes)
    if (v <= 0) f.fail(name, "must be positive, got ", v);
  if (s.value_heads % s.key_heads != 0)
    f.fail("linear_num_value_heads", s.value_heads, " is not a multiple of linear_num_key_heads ", s.key_heads,
           " (each key head serves a whole group of value heads)");
  if (s.conv_kernel < 1) f.fail("linear_conv_kernel_dim", "the conv kernel must be at least 1, got ", s.conv_kernel);
  return s;
}

namespace detail_gdn_mixer {

// Rows [row0, row0 + rows) of a [*, in] tensor.
struct RowBlock {
  const HostTensor* t;
  std::int64_t row0, rows;
};

// The row blocks stacked as one packed linear layer [Σ rows, in]: bf16 when every part is bf16,
// else f32 (exact either way), unless the source packs linear layers as another type.
inline PackedLinear pack_rows(const std::vector<RowBlock>& blocks, std::int64_t in) {
  std::int64_t out = 0;
  bool all_bf16 = true;
  for (const auto& b : blocks) {
    out += b.rows;
    all_bf16 = all_bf16 && b.t->type == WeightType::bf16;
  }
  auto stack = [&](auto tag) {
    using T = decltype(tag);
    std::vector<T> w(static_cast<std::size_t>(out * in));
    T* dst = w.data();
    for (const auto& b : blocks) {
      const std::int64_t n = b.rows * in, first = b.row0 * in;
      if constexpr (std::is_same_v<T, bf16>) {
        std::memcpy(dst, b.t->bf16_data() + first, static_cast<std::size_t>(n) * sizeof(T));
      } else if (b.t->type == WeightType::f32) {
        std::memcpy(dst, b.t->f32() + first, static_cast<std::size_t>(n) * sizeof(T));
      } else {
        convert(b.t->bf16_data() + first, dst, n);
      }
      dst += n;
    }
    // As stored, or as the source asks (PackAsSource: q8).
    const WeightType as = blocks[0].t->pack_as.value_or(all_bf16 ? WeightType::bf16 : WeightType::f32);
    return pack_as(w.data(), out, in, as, blocks[0].t->name + " (row blocks)");
  };
  return all_bf16 ? stack(bf16{}) : stack(float{});
}

// torch.nn.functional.softplus (beta 1, threshold 20) in f32.
inline float softplus(float x) { return x > 20.f ? x : std::log1p(std::exp(x)); }

}  // namespace detail_gdn_mixer

class GatedDeltaNet final : public TokenMixer {
 public:
  enum class Layout { qwen3_5, qwen3_next, fla };
  struct Options {
    std::string prefix;  // empty: model.layers.{layer}.linear_attn.
  };

  GatedDeltaNet(const BuildContext& ctx, int layer, const GatedDeltaNetSettings& s, Options o = {})
      : s_(s), layer_(layer), passes_(ctx.passes), eps_(static_cast<float>(ctx.config.rms_norm_eps)) {
    using detail_gdn_mixer::RowBlock;
    const std::string p = o.prefix.empty() ? ctx.prefix(layer) + "linear_attn." : o.prefix;
    const TensorSource& src = ctx.source;
    const std::int64_t D = ctx.config.hidden_size, nk = s.key_heads, nv = s.value_heads, dk = s.key_dim,
                       dv = s.value_dim, K = s.conv_kernel, r = nv / nk;
    ATTNKIT_REQUIRE(nk > 0 && nv > 0 && nv % nk == 0 && dk > 0 && dv > 0 && K >= 1, "GatedDeltaNet: layer ", layer,
                    ": invalid settings (", nk, " key heads, ", nv, " value heads, d_k ", dk, ", d_v ", dv, ", conv ", K,
                    ")");
    key_ = nk * dk;
    val_ = nv * dv;
    conv_ch_ = 2 * key_ + val_;
    width_ = conv_ch_ + val_ + 2 * nv;
    // A RandomSource holds every name: the Qwen3.5 layout comes first, so random models use it.
    if (src.contains(p + "in_proj_qkv.weight")) layout_ = Layout::qwen3_5;
    else if (src.contains(p + "in_proj_qkvz.weight")) layout_ = Layout::qwen3_next;
    else if (src.contains(p + "q_proj.weight")) layout_ = Layout::fla;
    else
      detail::throw_error("GatedDeltaNet: layer ", layer, ": ", src.describe(), " has no Gated DeltaNet projection under '",
                          p, "' (expected ", p, "in_proj_qkv.weight (Qwen3.5), ", p, "in_proj_qkvz.weight (Qwen3-Next) or ",
                          p, "q_proj.weight (fla))");

    std::vector<HostTensor> held;  // keeps the parts alive until packed
    held.reserve(6);
    auto get = [&](const std::string& name, std::vector<std::int64_t> shape) -> const HostTensor& {
      held.push_back(src.get(p + name, shape));
      return held.back();
    };
    std::vector<RowBlock> rows;  // the internal order [q | k | v | z | b | a]
    std::vector<const HostTensor*> convs;
    if (layout_ == Layout::qwen3_5) {
      const HostTensor& qkv = get("in_proj_qkv.weight", {conv_ch_, D});
      const HostTensor& z = get("in_proj_z.weight", {val_, D});
      const HostTensor& b = get("in_proj_b.weight", {nv, D});
      const HostTensor& a = get("in_proj_a.weight", {nv, D});
      rows = {{&qkv, 0, conv_ch_}, {&z, 0, val_}, {&b, 0, nv}, {&a, 0, nv}};
    } else if (layout_ == Layout::qwen3_next) {
      const HostTensor& qkvz = get("in_proj_qkvz.weight", {2 * key_ + 2 * val_, D});
      const HostTensor& ba = get("in_proj_ba.weight", {2 * nv, D});
      const std::int64_t group = 2 * dk + 2 * r * dv;  // rows of one key head in qkvz
      const std::int64_t offsets[] = {0, dk, 2 * dk, 2 * dk + r * dv}, sizes[] = {dk, dk, r * dv, r * dv};
      for (int part = 0; part < 4; ++part)  // all q, then all k, v, z
        for (std::int64_t j = 0; j < nk; ++j) rows.push_back({&qkvz, j * group + offsets[part], sizes[part]});
      for (int part = 0; part < 2; ++part)  // all b, then all a
        for (std::int64_t j = 0; j < nk; ++j) rows.push_back({&ba, j * 2 * r + part * r, r});
    } else {
      const HostTensor& q = get("q_proj.weight", {key_, D});
      const HostTensor& k = get("k_proj.weight", {key_, D});
      const HostTensor& v = get("v_proj.weight", {val_, D});
      const HostTensor& z = get("g_proj.weight", {val_, D});
      const HostTensor& b = get("b_proj.weight", {nv, D});
      const HostTensor& a = get("a_proj.weight", {nv, D});
      rows = {{&q, 0, key_}, {&k, 0, key_}, {&v, 0, val_}, {&z, 0, val_}, {&b, 0, nv}, {&a, 0, nv}};
    }
    in_ = detail_gdn_mixer::pack_rows(rows, D);
    held.clear();

    // Conv weights [C, 1, K] -> [C, K], channels [q | k | v].
    conv_w_.reserve(static_cast<std::size_t>(conv_ch_ * K));
    auto add_conv = [&](const std::string& name, std::int64_t channels) {
      const std::vector<float> w = src.get(p + name, {channels, 1, K}).to_f32();
      conv_w_.insert(conv_w_.end(), w.begin(), w.end());
    };
    if (layout_ == Layout::fla) {
      add_conv("q_conv1d.weight", key_);
      add_conv("k_conv1d.weight", key_);
      add_conv("v_conv1d.weight", val_);
    } else {
      add_conv("conv1d.weight", conv_ch_);
    }
    const std::vector<float> a_log = src.get(p + "A_log", {nv}).to_f32();
    dt_bias_ = src.get(p + "dt_bias", {nv}).to_f32();
    neg_a_.resize(a_log.size());
    for (std::size_t h = 0; h < a_log.size(); ++h) neg_a_[h] = -std::exp(a_log[h]);  // f32, as transformers
    // The gated norm's weight is used as stored (ones at init), whatever the model's norm convention.
    norm_w_ = src.get(p + (layout_ == Layout::fla ? "o_norm.weight" : "norm.weight"), {dv}).to_f32();
    out_ = pack_linear(src.get(p + (layout_ == Layout::fla ? "o_proj.weight" : "out_proj.weight"), {D, val_}));
  }

  std::string kind() const override { return "linear_attention"; }
  std::string describe() const override {
    std::string d = "linear_attention (Gated DeltaNet, ";
    d += std::to_string(s_.key_heads);
    d += " key / ";
    d += std::to_string(s_.value_heads);
    d += " value heads, d_k ";
    d += std::to_string(s_.key_dim);
    d += ", d_v ";
    d += std::to_string(s_.value_dim);
    d += ", conv ";
    d += std::to_string(s_.conv_kernel);
    d += ", ";
    d += layout_name();
    d += " layout)";
    return d;
  }
  Layout layout() const { return layout_; }
  const char* layout_name() const {
    return layout_ == Layout::qwen3_5 ? "Qwen3.5" : layout_ == Layout::qwen3_next ? "Qwen3-Next" : "fla";
  }
  const GatedDeltaNetSettings& settings() const { return s_; }
  std::size_t weight_bytes() const override {
    return in_.bytes() + out_.bytes() + (conv_w_.size() + 2 * neg_a_.size() + norm_w_.size()) * sizeof(float);
  }

  std::unique_ptr<MixerState> new_state(const SessionOptions&) const override {
    require_memory(mul_bytes(passes_, add_bytes(mul_bytes(s_.value_heads, s_.key_dim, s_.value_dim),
                                                mul_bytes(s_.conv_kernel - 1, conv_ch_)), sizeof(float)),
                   "GatedDeltaNet: recurrent state of " + std::to_string(passes_) + " passes x " +
                       std::to_string(s_.value_heads) + " value heads x " + std::to_string(s_.key_dim) + " x " +
                       std::to_string(s_.value_dim) + " floats, and the conv window");
    auto st = std::make_unique<State>();
    st->passes.resize(static_cast<std::size_t>(passes_));
    for (auto& ps : st->passes) {
      ps.S.assign(static_cast<std::size_t>(s_.value_heads * s_.key_dim * s_.value_dim), 0.f);
      ps.conv.assign(static_cast<std::size_t>((s_.conv_kernel - 1) * conv_ch_), 0.f);
    }
    return st;
  }

  void forward(ConstView2<float> x, View2<float> out, MixerState& state, const StepContext& ctx) const override {
    auto* st = dynamic_cast<State*>(&state);
    ATTNKIT_REQUIRE(st != nullptr, "GatedDeltaNet::forward: argument 'state': not created by this mixer");
    ATTNKIT_REQUIRE(ctx.pass >= 0 && ctx.pass < static_cast<int>(st->passes.size()), "GatedDeltaNet::forward: pass ",
                    ctx.pass, " but the model was built for ", st->passes.size(), " passes");
    State::Pass& ps = st->passes[static_cast<std::size_t>(ctx.pass)];
    ATTNKIT_REQUIRE(ps.seen == ctx.pos0, "GatedDeltaNet::forward: step starts at position ", ctx.pos0,
                    " but the state has seen ", ps.seen, " tokens");
    const std::int64_t T = x.shape[0], nk = s_.key_heads, nv = s_.value_heads, dk = s_.key_dim, dv = s_.value_dim,
                       K = s_.conv_kernel, W = width_;
    std::vector<float> buf(static_cast<std::size_t>(T * W));
    float* b = buf.data();
    in_.forward(x, View2<float>(b, {T, W}), {ctx.precision, ctx.num_threads, false});

    // Short conv over the q/k/v channels, in place; the window carries over to the next step.
    View2<float> mixed(b, {T, conv_ch_}, {W, 1});
    ShortConvOptions co;
    co.num_threads = ctx.num_threads;
    causal_conv1d(mixed, ConstView2<float>(conv_w_.data(), {conv_ch_, K}),
                  View2<float>(ps.conv.data(), {K - 1, conv_ch_}), mixed, co);

    // Gates per token and value head, in f32.
    std::vector<float> g(static_cast<std::size_t>(T * nv)), beta(g.size());
    for (std::int64_t t = 0; t < T; ++t) {
      const float* bt = b + t * W + conv_ch_ + val_;
      const float* at = bt + nv;
      for (std::int64_t h = 0; h < nv; ++h) {
        const auto i = static_cast<std::size_t>(t * nv + h);
        beta[i] = 1.f / (1.f + std::exp(-bt[h]));
        g[i] = neg_a_[static_cast<std::size_t>(h)] *
               detail_gdn_mixer::softplus(at[h] + dt_bias_[static_cast<std::size_t>(h)]);
      }
    }

    std::vector<float> o(static_cast<std::size_t>(T * val_));
    const View3<float> ov(o.data(), {T, nv, dv});
    GatedDeltaOptions go;
    go.num_threads = ctx.num_threads;
    gated_delta_rule(ConstView3<float>(b, {T, nk, dk}, {W, dk, 1}), ConstView3<float>(b + key_, {T, nk, dk}, {W, dk, 1}),
                     ConstView3<float>(b + 2 * key_, {T, nv, dv}, {W, dv, 1}), ConstView2<float>(g.data(), {T, nv}),
                     ConstView2<float>(beta.data(), {T, nv}), View3<float>(ps.S.data(), {nv, dk, dv}), ov, go);
    gated_rms_norm(ov, ConstView3<float>(b + conv_ch_, {T, nv, dv}, {W, dv, 1}), norm_w_.data(), eps_, ov,
                   ctx.num_threads);
    out_.forward(View2<float>(o.data(), {T, val_}), out, {ctx.precision, ctx.num_threads, false});
    ps.seen += T;

    if (ctx.trace) {
      for (auto& v : g) v = std::exp(v);  // α, the per-token decay of the state
      ctx.trace->describe("gdn_beta", {"layer", "token", "value head"});
      ctx.trace->describe("gdn_decay", {"layer", "token", "value head"});
      ctx.trace->record("gdn_beta", layer_, ctx.pos0, ConstView2<float>(beta.data(), {T, nv}));
      ctx.trace->record("gdn_decay", layer_, ctx.pos0, ConstView2<float>(g.data(), {T, nv}));
    }
  }

 private:
  struct State final : MixerState {
    struct Pass {
      std::vector<float> S;     // [n_v, d_k, d_v]
      std::vector<float> conv;  // [K-1, conv channels]: the last conv inputs
      std::int64_t seen = 0;
    };
    std::vector<Pass> passes;
    std::unique_ptr<MixerState> clone(const std::string&) const override { return std::make_unique<State>(*this); }
  };

  GatedDeltaNetSettings s_;
  int layer_, passes_;
  float eps_;
  Layout layout_ = Layout::qwen3_5;
  std::int64_t key_ = 0, val_ = 0, conv_ch_ = 0, width_ = 0;
  PackedLinear in_, out_;
  std::vector<float> conv_w_, neg_a_, dt_bias_, norm_w_;
};

// Registers layer type "linear_attention" (settings from the config's linear_* fields).
inline void register_gated_deltanet(MixerRegistry& r) {
  r.add("linear_attention", [](const BuildContext& c, int layer) {
    return std::make_unique<GatedDeltaNet>(c, layer, read_gated_deltanet_settings(c.fields));
  });
}

}  // namespace attnkit::model
