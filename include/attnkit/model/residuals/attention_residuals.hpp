// attnkit/model/residuals/attention_residuals.hpp — Attention Residuals as a residual policy
// (shared/spec/semantics.md §5): before each sublayer, a learned softmax over earlier layer
// outputs (depth/attnres.hpp) replaces the plain residual stream as the sublayer's input.
//
// Per layer l and sublayer kind in {attn (before the token mixer), mlp}, the weights are
//   model.layers.{l}.{kind}_res_proj.weight [1, D]   the pseudo-query
//   model.layers.{l}.{kind}_res_norm.weight [D]      the key RMSNorm (eps = rms_norm_eps)
//   model.layers.{l}.{kind}_res_bias        []       recency bias on the partial's logit
// plus, by gate type (h = the routed input, p = the partial/stream):
//   sigmoid_scalar  {kind}_res_gate_logit []          h = (1 - σ(a)) p + σ(a) h
//   sigmoid_vector  {kind}_res_gate_proj.{weight [D, D], bias [D]}
//                                                      h = (1 - σ(W p + b)) ⊙ p + σ(W p + b) ⊙ h
//   learnable_alpha {kind}_res_alpha []               h = (1 - α) p + α h
// The forms (AttnResSettings; config fields in read_attnres_settings):
//  * open (open-attention-residuals, the released checkpoints; modes block / full): the stream
//    is kept. Sources start as [embedding], the partial is the stream itself. Per layer:
//    h = route(sources + [partial]); partial += attn_out; full: sources += [partial];
//    h = route(...) for the MLP; partial += mlp_out; sources += [partial] in full mode or when
//    (l + 1) % layers_per_block == 0, layers_per_block = max(1, ceil(L / num_blocks)). The same
//    vector can be a source twice (embedding and partial at layer 0; a snapshot right after it
//    is taken): each copy gets its own softmax mass, as in the checkpoints. Output: the stream.
//  * delta (Delta AttnRes, §5.3; modes delta / delta_block): sources are raw sublayer outputs
//    (embedding first; delta_block: the sum of each block's outputs, appended at block ends),
//    optionally after a learned null source {kind}_null_source [D]; h = p + Σ softmax · v (no
//    partial among the sources). The checkpoints carry {kind}_res_bias but the reference never
//    adds it: it is read and, likewise, not used.
//  * kimi (Kimi Team's Block / Full AttnRes, §5.1): sources are completed block sums of raw
//    sublayer outputs, [embedding] first, and the partial sum of the current block; the stream
//    is replaced. Blocks are sublayer-granular: a block closes before every sublayer s
//    (0-based over the 2L sublayers) with s % S == 0, S = block_sublayers (full mode: S = 1).
//    Output: a final route with model.final_res_{proj.weight, norm.weight, bias} (final =
//    route), or the sum of all sources (final = sum: the plain residual stream).
// AttnRes keeps nothing across tokens: a decode step holds (sources × D) floats per token.
// Speed: the queries are static, so each stored source is scored against every call's query
// once, when it is made (a [T, D] x [D, 2L] product, the paper's "phase 1"); a routing call then
// reads each stored source once, for the weighted sum, and scores only the partial.
// Trace: "attnres_weights" [layers, 2, T, S] (sublayer 0 = attn, 1 = mlp; S the most sources of
// any call; unused entries 0), the partial's column marked; kimi with final = route also
// "attnres_final_weights" [1, T, S].
#pragma once

#include <algorithm>
#include <array>
#include <cmath>
#include <memory>
#include <string>
#include <vector>

#include "attnkit/core/memory.hpp"
#include "attnkit/depth/attnres.hpp"
#include "attnkit/model/mixer.hpp"
#include "attnkit/model/residual.hpp"
#include "attnkit/model/trace.hpp"

namespace attnkit::model {

enum class AttnResForm { open, kimi };
enum class AttnResMode { block, full, delta, delta_block };
enum class AttnResGate { bias, sigmoid_scalar, sigmoid_vector, learnable_alpha };
enum class AttnResFinal { route, sum };

struct AttnResSettings {
  AttnResForm form = AttnResForm::open;
  AttnResMode mode = AttnResMode::block;
  int num_blocks = 8;
  int block_sublayers = 0;  // kimi: sublayers per block; 0: 2 × layers_per_block (full mode: 1)
  AttnResGate gate = AttnResGate::bias;
  bool null_source = false;  // delta modes: a learned source before the embedding
  AttnResFinal final_output = AttnResFinal::route;  // kimi
  double recency_bias_init = 3.0;  // training-time init of the biases (the checkpoint holds the values)

  bool delta() const { return mode == AttnResMode::delta || mode == AttnResMode::delta_block; }
  int layers_per_block(int L) const { return std::max(1, (L + num_blocks - 1) / num_blocks); }
  int sublayers_per_block(int L) const {
    if (mode == AttnResMode::full) return 1;
    return block_sublayers > 0 ? block_sublayers : 2 * layers_per_block(L);
  }
};

inline const char* attnres_mode_name(AttnResMode m) {
  switch (m) {
    case AttnResMode::block: return "block";
    case AttnResMode::full: return "full";
    case AttnResMode::delta: return "delta";
    case AttnResMode::delta_block: return "delta_block";
  }
  return "?";
}
inline const char* attnres_gate_name(AttnResGate g) {
  switch (g) {
    case AttnResGate::bias: return "bias";
    case AttnResGate::sigmoid_scalar: return "sigmoid_scalar";
    case AttnResGate::sigmoid_vector: return "sigmoid_vector";
    case AttnResGate::learnable_alpha: return "learnable_alpha";
  }
  return "?";
}

// Reads (and consumes) the AttnRes fields of a qwen3_attnres config:
//   attnres_mode "block" | "full" | "delta" | "delta_block"   (default "block")
//   attnres_num_blocks >= 1 (default 8), attnres_gate_type (default "bias"),
//   attnres_recency_bias_init (a number; only an init value), attnres_use_null_source (delta),
//   and attnkit's own: attnres_form "open" | "kimi" (default "open"), attnres_block_sublayers
//   (kimi block mode), attnres_final "route" | "sum" (kimi).
inline AttnResSettings read_attnres_settings(io::ConfigFields& f) {
  AttnResSettings s;
  const std::string form = f.string("attnres_form", "open");
  if (form == "open") s.form = AttnResForm::open;
  else if (form == "kimi") s.form = AttnResForm::kimi;
  else f.fail("attnres_form", "unknown form '", form, "' (expected \"open\" or \"kimi\")");
  const std::string mode = f.string("attnres_mode", "block");
  if (mode == "block") s.mode = AttnResMode::block;
  else if (mode == "full") s.mode = AttnResMode::full;
  else if (mode == "delta") s.mode = AttnResMode::delta;
  else if (mode == "delta_block") s.mode = AttnResMode::delta_block;
  else
    f.fail("attnres_mode", "unknown mode '", mode, "' (attnkit implements \"block\", \"full\", \"delta\", \"delta_block\")");
  if (s.form == AttnResForm::kimi && s.delta())
    f.fail("attnres_mode", "'", mode, "' is an open-attention-residuals mode; the kimi form has \"block\" and \"full\"");
  const std::int64_t n = f.integer("attnres_num_blocks", 8);
  if (n < 1 || n > 1 << 20) f.fail("attnres_num_blocks", "must be >= 1, got ", n);
  s.num_blocks = static_cast<int>(n);
  const std::string gate = f.string("attnres_gate_type", "bias");
  if (gate == "bias") s.gate = AttnResGate::bias;
  else if (gate == "sigmoid_scalar") s.gate = AttnResGate::sigmoid_scalar;
  else if (gate == "sigmoid_vector") s.gate = AttnResGate::sigmoid_vector;
  else if (gate == "learnable_alpha") s.gate = AttnResGate::learnable_alpha;
  else
    f.fail("attnres_gate_type", "unknown gate type '", gate,
           "' (expected \"bias\", \"sigmoid_scalar\", \"sigmoid_vector\" or \"learnable_alpha\")");
  s.recency_bias_init = f.number("attnres_recency_bias_init", 3.0);
  if (!std::isfinite(s.recency_bias_init)) f.fail("attnres_recency_bias_init", "must be a finite number");
  s.null_source = f.boolean("attnres_use_null_source", false);
  if (s.null_source && !s.delta()) f.fail("attnres_use_null_source", "a null source exists only in the delta modes");
  if (f.has("attnres_block_sublayers")) {
    if (s.form != AttnResForm::kimi || s.mode != AttnResMode::block)
      f.fail("attnres_block_sublayers", "sublayer-granular blocks exist only in the kimi form's block mode");
    const std::int64_t b = f.integer("attnres_block_sublayers", 0);
    if (b < 1 || b > 1 << 20) f.fail("attnres_block_sublayers", "must be >= 1, got ", b);
    s.block_sublayers = static_cast<int>(b);
  }
  if (f.has("attnres_final")) {
    if (s.form != AttnResForm::kimi) f.fail("attnres_final", "only the kimi form has a final aggregation");
    const std::string fin = f.string("attnres_final", "route");
    if (fin == "route") s.final_output = AttnResFinal::route;
    else if (fin == "sum") s.final_output = AttnResFinal::sum;
    else f.fail("attnres_final", "unknown final output '", fin, "' (expected \"route\" or \"sum\")");
  }
  return s;
}

// The weights of one routing call.
struct AttnResRoute {
  std::vector<float> query;  // proj ⊙ γ (the norm weight folded in once)
  float bias = 0.f;
  float gate = 1.f;          // sigmoid_scalar: σ(a); learnable_alpha: α
  PackedLinear gate_proj;    // sigmoid_vector
  std::vector<float> gate_proj_bias;
  std::vector<float> null_source;  // delta modes with a null source

  AttnResRoute() = default;
  AttnResRoute(const TensorSource& src, const std::string& stem, const std::string& null_name, const AttnResSettings& s,
               std::int64_t D) {
    const std::vector<float> proj = src.get(stem + "_proj.weight", {1, D}).to_f32();
    const std::vector<float> gamma = src.get(stem + "_norm.weight", {D}).to_f32();
    query.resize(static_cast<std::size_t>(D));
    attnres_fold_query(proj.data(), gamma.data(), D, query.data());
    bias = src.get(stem + "_bias", {}).to_f32().at(0);
    ATTNKIT_REQUIRE(!std::isnan(bias), stem, "_bias: is NaN");
    if (s.gate == AttnResGate::sigmoid_scalar) {
      const float a = src.get(stem + "_gate_logit", {}).to_f32().at(0);
      gate = static_cast<float>(1.0 / (1.0 + std::exp(-static_cast<double>(a))));
    } else if (s.gate == AttnResGate::learnable_alpha) {
      gate = src.get(stem + "_alpha", {}).to_f32().at(0);
    } else if (s.gate == AttnResGate::sigmoid_vector) {
      gate_proj = pack_linear(src.get(stem + "_gate_proj.weight", {D, D}));
      gate_proj_bias = src.get(stem + "_gate_proj.bias", {D}).to_f32();
    }
    if (s.null_source) null_source = src.get(null_name, {D}).to_f32();
  }
  std::size_t bytes() const {
    return (query.size() + gate_proj_bias.size() + null_source.size()) * sizeof(float) + gate_proj.bytes();
  }
};

class AttentionResiduals final : public ResidualPolicy {
 public:
  AttentionResiduals(const BuildContext& ctx, const AttnResSettings& s)
      : s_(s), L_(static_cast<int>(ctx.config.num_hidden_layers)), D_(ctx.config.hidden_size),
        eps_(static_cast<float>(ctx.config.rms_norm_eps)) {
    for (int l = 0; l < L_; ++l) {
      const std::string p = ctx.prefix(l);
      routes_.push_back({AttnResRoute(ctx.source, p + "attn_res", p + "attn_null_source", s_, D_),
                         AttnResRoute(ctx.source, p + "mlp_res", p + "mlp_null_source", s_, D_)});
    }
    if (s_.form == AttnResForm::kimi && s_.final_output == AttnResFinal::route) {
      AttnResSettings plain = s_;
      plain.gate = AttnResGate::bias;
      plain.null_source = false;
      final_ = AttnResRoute(ctx.source, "model.final_res", "", plain, D_);
    }
    // Every call's folded query as one [calls, D] matrix: call 2l + s, then the final route.
    calls_ = 2 * L_ + (final_.query.empty() ? 0 : 1);
    std::vector<float> q(static_cast<std::size_t>(calls_ * D_));
    for (int c = 0; c < calls_; ++c) {
      const auto& r = c < 2 * L_ ? routes_[static_cast<std::size_t>(c / 2)][static_cast<std::size_t>(c % 2)] : final_;
      std::copy(r.query.begin(), r.query.end(), q.begin() + c * D_);
    }
    scorer_ = PackedLinear::pack(q.data(), calls_, D_, D_);
  }

  std::string kind() const override { return "attnres"; }
  std::string describe() const override {
    std::string d = std::string("Attention Residuals ") + (s_.form == AttnResForm::kimi ? "kimi " : "") +
                    attnres_mode_name(s_.mode) + " mode";
    if (s_.mode == AttnResMode::block || s_.mode == AttnResMode::delta_block) {
      if (s_.form == AttnResForm::kimi) d += ", " + std::to_string(s_.sublayers_per_block(L_)) + " sublayers per block";
      else d += ", " + std::to_string(s_.num_blocks) + " blocks of " + std::to_string(s_.layers_per_block(L_)) + " layers";
    }
    if (s_.gate != AttnResGate::bias) d += std::string(", gate ") + attnres_gate_name(s_.gate);
    if (s_.null_source) d += ", null source";
    if (s_.form == AttnResForm::kimi) d += s_.final_output == AttnResFinal::route ? ", final route" : ", final sum";
    return d + ", up to " + std::to_string(max_sources()) + " sources";
  }
  const AttnResSettings& settings() const { return s_; }
  const AttnResRoute& route(int layer, Sublayer s) const {
    return routes_.at(static_cast<std::size_t>(layer))[s == Sublayer::mixer ? 0 : 1];
  }
  std::size_t weight_bytes() const {
    std::size_t b = final_.bytes() + scorer_.bytes();
    for (auto& r : routes_) b += r[0].bytes() + r[1].bytes();
    return b;
  }

  // The most sources (partial and null source included) any routing call of a pass sees.
  int max_sources() const {
    int most = 0;
    walk([&](int, int, int width, bool) { most = std::max(most, width); });
    return most;
  }

  std::unique_ptr<ResidualStream> begin(ConstView2<float> input, const StepContext& ctx) const override;

 private:
  class Stream;

  bool kimi_boundary(int layer, int sub) const { return (2 * layer + sub) % s_.sublayers_per_block(L_) == 0; }
  bool block_end(int layer) const { return (layer + 1) % s_.layers_per_block(L_) == 0; }
  // Calls f(layer, sub, sources of that call, partial among them) for every call of a pass, in
  // order, following the same schedule as Stream (kept here once for sizing and labels).
  template <class F>
  void walk(F&& f) const {
    int stored = s_.form == AttnResForm::kimi ? 0 : 1;  // kimi: completed blocks; others: [embedding]
    const int extra = s_.null_source ? 1 : 0;
    for (int l = 0; l < L_; ++l)
      for (int sub = 0; sub < 2; ++sub) {
        const bool partial = !s_.delta();
        f(l, sub, stored + extra + (partial ? 1 : 0), partial);
        if (s_.form == AttnResForm::kimi) stored += kimi_boundary(l, sub);
        else if (s_.mode == AttnResMode::full || s_.mode == AttnResMode::delta) ++stored;
        else stored += sub == 1 && block_end(l);
      }
  }

  AttnResSettings s_;
  int L_;
  std::int64_t D_;
  float eps_;
  std::vector<std::array<AttnResRoute, 2>> routes_;
  AttnResRoute final_;
  int calls_ = 0;         // routing calls per pass (2L, + 1 for a final route)
  PackedLinear scorer_;   // [calls_, D]: every call's query, to score a source once
};

class AttentionResiduals::Stream final : public ResidualStream {
 public:
  Stream(const AttentionResiduals& p, ConstView2<float> x, const StepContext& ctx)
      : p_(p), ctx_(ctx), T_(x.shape[0]), D_(x.shape[1]) {
    const int most = p_.max_sources();
    require_memory(static_cast<std::uint64_t>(most + 3) * static_cast<std::uint64_t>(T_ * D_) * sizeof(float),
                   "Attention Residuals: " + std::to_string(most) + " sources x " + std::to_string(T_) + " tokens x " +
                       std::to_string(D_) + " floats (run the prompt in chunks: AttnRes keeps nothing across tokens)");
    partial_ = copy_of(x);
    h_.resize(partial_.size());
    if (p_.s_.form != AttnResForm::kimi) push(partial_);  // the embedding is source 0
    if (p_.s_.mode == AttnResMode::delta_block) block_start_ = partial_;
    if (ctx_.trace) {
      std::vector<std::string> cols;
      if (p_.s_.null_source) cols.push_back("null");
      cols.push_back("emb");
      for (int i = static_cast<int>(cols.size()); i < most; ++i) cols.push_back(std::to_string(i));
      ctx_.trace->describe("attnres_weights", {"layer", "sublayer", "token", "source"}, {{}, {"attn", "mlp"}, {}, cols});
      if (p_.s_.form == AttnResForm::kimi && p_.s_.final_output == AttnResFinal::route)
        ctx_.trace->describe("attnres_final_weights", {"output", "token", "source"}, {{}, {}, cols});
    }
  }

  ConstView2<float> input(int layer, Sublayer s) override {
    const int sub = s == Sublayer::mixer ? 0 : 1;
    const AttnResRoute& r = p_.route(layer, s);
    route(r, 2 * layer + sub, sub, layer, "attnres_weights");
    gate(r);
    if (p_.s_.form == AttnResForm::kimi && p_.kimi_boundary(layer, sub)) {  // the partial block is complete
      push(partial_);
      partial_present_ = false;
    }
    return ConstView2<float>(h_.data(), {T_, D_});
  }

  void add_output(int layer, Sublayer s, ConstView2<float> out) override {
    const int sub = s == Sublayer::mixer ? 0 : 1;
    View2<float> pv(partial_.data(), {T_, D_});
    if (!partial_present_) {  // kimi, first sublayer of a block
      partial_ = copy_of(out);
      partial_present_ = true;
      return;
    }
    ops::add_inplace(pv, out);
    if (p_.s_.form == AttnResForm::kimi) return;
    switch (p_.s_.mode) {
      case AttnResMode::block:
        if (sub == 1 && p_.block_end(layer)) push(partial_);
        break;
      case AttnResMode::full: push(partial_); break;
      case AttnResMode::delta: push(copy_of(out)); break;
      case AttnResMode::delta_block:
        if (sub == 1 && p_.block_end(layer)) {
          std::vector<float> d(partial_.size());
          for (std::size_t i = 0; i < d.size(); ++i) d[i] = partial_[i] - block_start_[i];
          push(std::move(d));
          block_start_ = partial_;
        }
        break;
    }
  }

  ConstView2<float> output() override {
    if (p_.s_.form != AttnResForm::kimi) return ConstView2<float>(partial_.data(), {T_, D_});
    if (p_.s_.final_output == AttnResFinal::route) {
      route(p_.final_, 2 * p_.L_, 0, -1, "attnres_final_weights");
    } else {
      h_ = partial_present_ ? partial_ : std::vector<float>(partial_.size(), 0.f);
      View2<float> hv(h_.data(), {T_, D_});
      for (auto& src : sources_) ops::add_inplace(hv, ConstView2<float>(src.data.data(), {T_, D_}));
    }
    return ConstView2<float>(h_.data(), {T_, D_});
  }

 private:
  struct Source {
    std::vector<float> data;     // [T, D]
    std::vector<float> inv_rms;  // [T]
    std::vector<float> logits;   // [T, calls]: q_c · RMSNorm_c(v_t) for every call c, computed once
  };

  std::vector<float> copy_of(ConstView2<float> v) const {
    std::vector<float> c(static_cast<std::size_t>(T_ * D_));
    for (std::int64_t t = 0; t < T_; ++t) std::copy(v.ptr(t), v.ptr(t) + D_, c.data() + t * D_);
    return c;
  }
  void push(std::vector<float> data) {
    const std::int64_t C = p_.calls_;
    Source s{std::move(data), std::vector<float>(static_cast<std::size_t>(T_)), std::vector<float>(static_cast<std::size_t>(T_ * C))};
    const ConstView2<float> v(s.data.data(), {T_, D_});
    attnres_inv_rms(DepthSource(v), p_.eps_, s.inv_rms.data(), ctx_.num_threads);
    // Always exact: the logits pick the routing, and this product is small.
    p_.scorer_.forward(v, View2<float>(s.logits.data(), {T_, C}), {Precision::exact, ctx_.num_threads, false});
    for (std::int64_t t = 0; t < T_; ++t)
      for (std::int64_t c = 0; c < C; ++c) s.logits[static_cast<std::size_t>(t * C + c)] *= s.inv_rms[static_cast<std::size_t>(t)];
    sources_.push_back(std::move(s));
  }

  // h = route over [null] + sources + [partial] with r's query, call number `call` (layer < 0:
  // the final route).
  void route(const AttnResRoute& r, int call, int sub, int layer, const char* trace_name) {
    std::vector<DepthSource> src;
    if (!r.null_source.empty()) src.push_back(DepthSource::broadcast(r.null_source.data(), T_, D_));
    for (auto& s : sources_) {
      DepthSource d(ConstView2<float>(s.data.data(), {T_, D_}), s.inv_rms.data());
      d.logits = s.logits.data() + call;
      d.logit_stride = p_.calls_;
      src.push_back(d);
    }
    const bool delta = p_.s_.delta();
    const ConstView2<float> pv(partial_.data(), {T_, D_});
    const DepthSource partial = delta || !partial_present_ ? DepthSource{} : DepthSource(pv);
    const std::int64_t S = static_cast<std::int64_t>(src.size()) + (partial.present() ? 1 : 0);
    AttnResOptions o;
    o.num_threads = ctx_.num_threads;
    if (delta) o.residual = pv;
    if (ctx_.trace) {
      w_.resize(static_cast<std::size_t>(T_ * S));
      o.weights = View2<float>(w_.data(), {T_, S});
    }
    const AttnResQuery q{r.query.data(), nullptr, partial.present() ? r.bias : 0.f, p_.eps_};
    attnres_route(src, partial, q, View2<float>(h_.data(), {T_, D_}), o);
    if (!ctx_.trace) return;
    const ConstView2<float> wv(w_.data(), {T_, S});
    if (layer >= 0) {
      ctx_.trace->record(trace_name, layer, sub, ctx_.pos0, wv);
      if (partial.present()) ctx_.trace->mark(trace_name, {layer, sub, S - 1}, "partial");
    } else {
      ctx_.trace->record(trace_name, 0, ctx_.pos0, wv);
      if (partial.present()) ctx_.trace->mark(trace_name, {0, S - 1}, "partial");
    }
  }

  // Mixes the routed h with the stream per the gate type (bias: h as it is).
  void gate(const AttnResRoute& r) {
    const AttnResGate g = p_.s_.gate;
    if (g == AttnResGate::bias) return;
    const std::size_t n = h_.size();
    if (g == AttnResGate::sigmoid_vector) {
      std::vector<float> z(n);
      r.gate_proj.forward(ConstView2<float>(partial_.data(), {T_, D_}), View2<float>(z.data(), {T_, D_}),
                          {ctx_.precision, ctx_.num_threads, false});
      for (std::size_t i = 0; i < n; ++i) {
        const float a = z[i] + r.gate_proj_bias[i % static_cast<std::size_t>(D_)];
        const float sg = static_cast<float>(1.0 / (1.0 + std::exp(-static_cast<double>(a))));
        h_[i] = (1.f - sg) * partial_[i] + sg * h_[i];
      }
      return;
    }
    for (std::size_t i = 0; i < n; ++i) h_[i] = (1.f - r.gate) * partial_[i] + r.gate * h_[i];
  }

  const AttentionResiduals& p_;
  const StepContext& ctx_;
  std::int64_t T_, D_;
  std::vector<Source> sources_;
  std::vector<float> partial_, h_, block_start_, w_;
  bool partial_present_ = true;
};

inline std::unique_ptr<ResidualStream> AttentionResiduals::begin(ConstView2<float> input, const StepContext& ctx) const {
  ATTNKIT_REQUIRE(input.shape[1] == D_, "AttentionResiduals::begin: argument 'input': width ", input.shape[1],
                  " != hidden_size ", D_);
  return std::make_unique<Stream>(*this, input, ctx);
}

}  // namespace attnkit::model
