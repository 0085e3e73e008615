// attnkit/model/mixers/loop_attention.hpp — Loop Attention as a token mixer (spec §4.3–4.4;
// IQuest LoopCoder convention): a global causal pass and a local sliding-window pass blended
// per token and query head by g = sigmoid(gate_w[h]·q[t,h] + gate_b[h]) from the post-RoPE query.
//
// Two readings (LoopSettings::mode; config field `loop_mode`):
//  * stack: the stack runs `loop_num` times with the same weights. Pass 0 is plain causal
//    attention whose post-RoPE keys/values K1/V1 are kept (the layer's full cache); every later
//    pass p projects q, k, v again from its own input, attends globally over K1/V1 and locally
//    over its own k/v in a window of W, and blends. Decode state per layer: the full K1/V1 cache
//    plus, per later pass, a ring buffer of the last W positions (memory O(W), not O(T)).
//  * layer: one pass; global and local both from the layer's own q, k, v (the fused kernel path:
//    each score computed once). Decode state: the layer's full cache; local = its last W rows.
// In a batch session the full caches (K1/V1 in stack mode, every pass's in layer mode) live in
// the session's page pool and the rings stay per sequence (forward_batch).
// Tensors: the attention's own (q/k/v/o projections, q/k norms) plus
// model.gate_projections.{i}.weight [H, head_dim] and .bias [H].
// Trace: "gates" [T, H] per layer of the looping pass (stack mode with loop_num > 2 also
// records the earlier looping passes as "gates_pass{p}").
#pragma once

#include <memory>
#include <string>
#include <type_traits>
#include <vector>

#include "attnkit/attention/loop.hpp"
#include "attnkit/model/mixer.hpp"
#include "attnkit/model/parts/cached_attention.hpp"
#include "attnkit/model/parts/paged_attention.hpp"
#include "attnkit/model/parts/qkv_projection.hpp"
#include "attnkit/model/trace.hpp"

namespace attnkit::model {

enum class LoopMode { stack, layer };

struct LoopSettings {
  int loop_num = 2;          // passes over the stack in stack mode (layer mode runs one)
  std::int64_t window = 64;  // local window W, keys including the query's own position
  LoopMode mode = LoopMode::stack;
  int passes() const { return mode == LoopMode::stack ? loop_num : 1; }
};

// Reads (and consumes) loop_num, loop_window_size and loop_mode, with the IQuest defaults.
inline LoopSettings read_loop_settings(io::ConfigFields& f) {
  LoopSettings s;
  const std::int64_t n = f.integer("loop_num", 2);
  if (n < 1 || n > 64) f.fail("loop_num", "must be in [1, 64], got ", n);
  s.loop_num = static_cast<int>(n);
  s.window = f.integer("loop_window_size", 64);
  if (s.window < 1) f.fail("loop_window_size", "must be >= 1, got ", s.window);
  const std::string mode = f.string("loop_mode", "stack");
  if (mode == "stack") s.mode = LoopMode::stack;
  else if (mode == "layer") s.mode = LoopMode::layer;
  else f.fail("loop_mode", "unknown loop mode '", mode, "' (expected \"stack\" or \"layer\")");
  return s;
}

class LoopAttention final : public TokenMixer {
 public:
  LoopAttention(const BuildContext& ctx, int layer, const LoopSettings& s) : layer_(layer), s_(s), passes_(ctx.passes) {
    const std::string p = ctx.prefix(layer) + "self_attn.";
    proj_ = QKVProjection(ctx, {p});
    const std::int64_t H = proj_.heads(), d = proj_.head_dim();
    o_ = pack_linear(ctx.source.get(p + "o_proj.weight", {ctx.config.hidden_size, H * d}));
    const std::string g = "model.gate_projections." + std::to_string(layer) + ".";
    gate_w_ = ctx.source.get(g + "weight", {H, d}).to_f32();
    gate_b_ = ctx.source.get(g + "bias", {H}).to_f32();
  }

  std::string kind() const override { return "loop_attention"; }
  std::string describe() const override {
    return std::string("Loop Attention ") + (s_.mode == LoopMode::stack ? "stack" : "layer") + " mode, window " +
           std::to_string(s_.window);
  }
  const LoopSettings& settings() const { return s_; }
  std::size_t weight_bytes() const override {
    return proj_.weight_bytes() + o_.bytes() + (gate_w_.size() + gate_b_.size()) * sizeof(float);
  }

  std::unique_ptr<MixerState> new_state(const SessionOptions& opt) const override {
    auto st = std::make_unique<State>();
    const std::int64_t Hkv = proj_.kv_heads(), d = proj_.head_dim();
    if (s_.mode == LoopMode::stack) {
      st->global.emplace_back(Hkv, d, d, 0, opt);  // K1/V1 of pass 0
      for (int p = 1; p < passes_; ++p) st->local.emplace_back(Hkv, d, d, s_.window, opt);
    } else {
      for (int p = 0; p < passes_; ++p) st->global.emplace_back(Hkv, d, d, 0, opt);  // one per pass of an outer loop
    }
    return st;
  }

  // Batch sessions (f32, bf16 or int8 caches):
  //  * layer mode: every pass's full cache lives in the session's page pool and the paged Loop
  //    Attention kernels (attention/loop.hpp) run over it: global over the pages, local over
  //    their last W positions;
  //  * stack mode: pass 0's K1/V1 (the full cache) live in the pool; each looping pass keeps its
  //    ring of W keys per sequence (new_paged_state: pages shared across layers would hold every
  //    position instead). Decoding sequences run the global pass over the pages together, then
  //    each its ring; a sequence with several tokens runs loop_attention's kernel over its
  //    pages in place and the window from its ring.
  PagedLayout paged_layout(const SessionOptions&) const override {
    return {proj_.kv_heads() * (s_.mode == LoopMode::stack ? 1 : passes_), proj_.head_dim()};
  }
  std::unique_ptr<MixerState> new_paged_state(const SessionOptions& opt) const override {
    if (s_.mode != LoopMode::stack || passes_ < 2) return nullptr;
    auto st = std::make_unique<State>();
    for (int p = 1; p < passes_; ++p) st->local.emplace_back(proj_.kv_heads(), proj_.head_dim(), proj_.head_dim(), s_.window, opt);
    return st;
  }
  std::uint64_t paged_state_bytes(std::int64_t positions, const SessionOptions& opt) const override {
    if (s_.mode != LoopMode::stack) return 0;
    return mul_bytes(passes_ - 1, std::min(positions, s_.window), kv_token_bytes(opt.kv_type, proj_.kv_heads(), proj_.head_dim()));
  }
  void forward_batch(ConstView2<float> x, View2<float> out, const BatchStep& step, const StepContext& ctx) const override {
    if (step.kv_head0 < 0) return TokenMixer::forward_batch(x, out, step, ctx);
    const std::int64_t N = x.shape[0], H = proj_.heads(), d = proj_.head_dim();
    QKV qkv;
    proj_.forward_batch(x, qkv, step, ctx);
    std::vector<float> attn(static_cast<std::size_t>(N * H * d));
    const View3<float> a(attn.data(), {N, H, d});
    // The gates of every row, for a trace (as forward() records them: not in stack mode's pass 0).
    const bool gated = s_.mode == LoopMode::layer || ctx.pass > 0;
    std::vector<float> gates(ctx.trace && gated ? static_cast<std::size_t>(N * H) : 0);
    const View2<float> gv = gates.empty() ? View2<float>{} : View2<float>(gates.data(), {N, H});
    if (s_.mode == LoopMode::layer)
      attend_paged(qkv.q, qkv.k, qkv.v, a, step, step.kv_head0 + ctx.pass * proj_.kv_heads(), LayerPaged{*this, ctx, gv});
    else if (ctx.pass == 0)
      attend_paged(qkv.q, qkv.k, qkv.v, a, step, step.kv_head0, ctx);  // the global pass: plain attention, keeps K1/V1
    else if (step.pages_bf16.k.data)
      looping_pass_paged(step.pages_bf16, qkv, a, gv, step, ctx);
    else if (step.pages_int8.k.data)
      looping_pass_paged(step.pages_int8, qkv, a, gv, step, ctx);
    else
      looping_pass_paged(step.pages_f32, qkv, a, gv, step, ctx);
    if (!gates.empty()) record(ctx, gv, gates_name(ctx.pass));
    o_.forward(View2<float>(attn.data(), {N, H * d}), out, {ctx.precision, ctx.num_threads, false});
  }

  void forward(ConstView2<float> x, View2<float> out, MixerState& state, const StepContext& ctx) const override {
    auto* st = dynamic_cast<State*>(&state);
    ATTNKIT_REQUIRE(st != nullptr, "LoopAttention::forward: argument 'state': not created by this mixer");
    ATTNKIT_REQUIRE(ctx.pass >= 0 && ctx.pass < passes_, "LoopAttention::forward: pass ", ctx.pass,
                    " but the model was built for ", passes_, " passes");
    const std::int64_t T = x.shape[0], H = proj_.heads(), d = proj_.head_dim();
    QKV qkv;
    proj_.forward(x, qkv, ctx);
    std::vector<float> attn(static_cast<std::size_t>(T * H * d)), gates(static_cast<std::size_t>(T * H));
    View3<float> a(attn.data(), {T, H, d});
    View2<float> gv(gates.data(), {T, H});
    if (s_.mode == LoopMode::stack && ctx.pass == 0) {
      st->global[0].attend(qkv.q, qkv.k, qkv.v, a, ctx);  // the global pass: plain attention, keeps K1/V1
    } else if (s_.mode == LoopMode::stack) {
      AttentionCache& ring = st->local[static_cast<std::size_t>(ctx.pass - 1)];
      ATTNKIT_REQUIRE(ring.position() == ctx.pos0 && st->global[0].position() == ctx.pos0 + T,
                      "LoopAttention: pass ", ctx.pass, " at position ", ctx.pos0,
                      " does not follow pass 0 of the same step (caches out of step)");
      st->global[0].visit([&](auto& g) {
        ring.visit([&](auto& r) { looping_pass(g, r, qkv, a, gv, ctx); });
      });
      record(ctx, gv, gates_name(ctx.pass));
    } else {
      AttentionCache& c = st->global[static_cast<std::size_t>(ctx.pass)];
      ATTNKIT_REQUIRE(c.position() == ctx.pos0, "LoopAttention: step starts at position ", ctx.pos0,
                      " but the cache has seen ", c.position(), " tokens");
      c.visit([&](auto& g) { single_pass(g, qkv, a, gv, ctx); });
      record(ctx, gv, gates_name(ctx.pass));
    }
    o_.forward(View2<float>(attn.data(), {T, H * d}), out, {ctx.precision, ctx.num_threads, false});
  }

 private:
  struct State final : MixerState {
    std::vector<AttentionCache> global;  // stack: [K1/V1]; layer: one full cache per pass
    std::vector<AttentionCache> local;   // stack: ring of W per looping pass
    std::unique_ptr<MixerState> clone(const std::string&) const override { return std::make_unique<State>(*this); }
  };

  // Stack mode, pass >= 1, in a batch step: global over pass 0's pages (which already hold the
  // step's tokens: pass 0 ran first), local over each sequence's ring of this pass plus the
  // step's own keys; the same kernels and blend as looping_pass, so the same bits (int8: decode
  // reads the codes of the pages and of the ring, a chunk the pages' codes in place).
  template <class KV>
  void looping_pass_paged(const MutablePagedKV<KV>& pool, const QKV& qkv, View3<float> a, View2<float> gates,
                          const BatchStep& step, const StepContext& ctx) const {
    namespace dp = detail_paged_attention;
    const std::int64_t Hkv = proj_.kv_heads(), H = proj_.heads(), d = proj_.head_dim();
    const PagedKV<KV> k1 = kv_head_range(pool, step.kv_head0, step.kv_head0 + Hkv);
    const auto ring_of = [&](std::int64_t b) -> AttentionCache& {
      auto* st = dynamic_cast<State*>(step.states[b]);
      ATTNKIT_REQUIRE(st != nullptr && ctx.pass - 1 < static_cast<int>(st->local.size()),
                      "LoopAttention::forward_batch: sequence ", b, " has no ring for pass ", ctx.pass);
      AttentionCache& r = st->local[static_cast<std::size_t>(ctx.pass - 1)];
      ATTNKIT_REQUIRE(r.position() == step.pos0[b], "LoopAttention::forward_batch: sequence ", b, " at position ",
                      step.pos0[b], " but its ring of pass ", ctx.pass, " has seen ", r.position(), " tokens");
      return r;
    };
    std::vector<std::int64_t> decode, chunks;
    for (std::int64_t b = 0; b < step.batch(); ++b)
      if (step.tokens(b) > 0) (step.tokens(b) == 1 ? decode : chunks).push_back(b);
    DecodeOptions dopt;
    dopt.num_threads = ctx.num_threads;
    if (!decode.empty()) {
      const dp::SubBatch sub = dp::subset(step, decode);
      std::vector<float> qb, glob(sub.rows.size() * static_cast<std::size_t>(H * d)), local(static_cast<std::size_t>(H * d));
      const std::int64_t n = static_cast<std::int64_t>(sub.rows.size());
      attention_decode_paged<KV>(dp::gather(qkv.q, sub.rows, qb), k1, sub.table(), View3<float>(glob.data(), {n, H, d}), dopt);
      for (std::int64_t i = 0; i < n; ++i) {
        const std::int64_t r = sub.rows[static_cast<std::size_t>(i)];
        ring_of(decode[static_cast<std::size_t>(i)]).visit([&](auto& ring) {
          using R = std::remove_reference_t<decltype(ring)>;
          if constexpr (!std::is_same_v<R, RingKVCache<KV>>) {
            throw Error("LoopAttention: the local cache is not a ring buffer of the pages' storage type");
          } else {
            ring.append(qkv.k.slice(0, r, r + 1), qkv.v.slice(0, r, r + 1));
            attention_decode<KV>(ConstView2<float>(qkv.q.ptr(r), {H, d}, {qkv.q.stride[1], 1}), ring.keys(), ring.values(),
                                 View2<float>(local.data(), {H, d}), dopt);
          }
        });
        for (std::int64_t h = 0; h < H; ++h) {
          const float g = detail::flash::gate_sigmoid(simd::dot(gate_w().ptr(h), qkv.q.ptr(r, h), d) + gate_b_[static_cast<std::size_t>(h)]);
          if (gates.data) gates(r, h) = g;
          detail::flash::blend_finalize<simd::default_arch>(a.ptr(r, h), glob.data() + (i * H + h) * d, 1.f,
                                                            local.data() + h * d, 1.f, g, d);
        }
      }
    }
    for (const std::int64_t b : chunks) {
      const std::int64_t r0 = step.cu_seqlens[b], r1 = step.cu_seqlens[b + 1];
      const dp::SubBatch sub = dp::subset(step, {b});
      const PageTable table = sub.table();
      // The pages in place; named pair members, not a structured binding, because clang 14 cannot capture
      // a binding in the lambda below.
      const auto gkv = detail::paged::sequence_kv(k1, table, 0, sub.lengths[0]);
      const auto& gk = gkv.first;
      const auto& gv = gkv.second;
      ring_of(b).visit([&](auto& ring) {
        using R = std::remove_reference_t<decltype(ring)>;
        if constexpr (!std::is_same_v<R, RingKVCache<KV>>) {
          throw Error("LoopAttention: the local cache is not a ring buffer of the pages' storage type");
        } else {
          ring_chunk(qkv.q.slice(0, r0, r1), qkv.k.slice(0, r0, r1), qkv.v.slice(0, r0, r1), gk, gv, ring,
                     a.slice(0, r0, r1), gates.data ? gates.slice(0, r0, r1) : View2<float>{}, step.pos0[b],
                     ctx.num_threads);
        }
      });
    }
  }

  // Layer mode over pages: the same pages are the global and the local keys.
  struct LayerPaged {
    const LoopAttention& m;
    const StepContext& ctx;
    View2<float> gates;  // [N, H] of the step's rows (a trace's), or empty
    template <class KV>
    void decode(ConstView3<float> q, const PagedKV<KV>& pages, const PageTable& table, View3<float> out,
                const std::vector<std::int64_t>& rows) const {
      DecodeOptions o;
      o.num_threads = ctx.num_threads;
      std::vector<float> g;
      loop_attention_decode_paged<KV>(q, pages, pages, table, m.gate_w(), m.gate_b(), m.s_.window, out, o, group_gates(rows, g));
      scatter_gates(rows, g);
    }
    template <class KV>
    void prefill(ConstView3<float> q, const PagedKV<KV>& pages, const PageTable& table, std::span<const std::int64_t> cu,
                 View3<float> out, const std::vector<std::int64_t>& rows) const {
      LoopOptions o;
      o.num_threads = ctx.num_threads;
      std::vector<float> g;
      loop_attention_prefill_paged<KV>(q, pages, pages, table, cu, m.gate_w(), m.gate_b(), m.s_.window, out, o,
                                       group_gates(rows, g));
      scatter_gates(rows, g);
    }
    // The kernels write the gates of a group's rows into g; they go to the step's rows after.
    View2<float> group_gates(const std::vector<std::int64_t>& rows, std::vector<float>& g) const {
      if (!gates.data) return {};
      g.resize(rows.size() * static_cast<std::size_t>(gates.shape[1]));
      return View2<float>(g.data(), {static_cast<std::int64_t>(rows.size()), gates.shape[1]});
    }
    void scatter_gates(const std::vector<std::int64_t>& rows, const std::vector<float>& g) const {
      if (!gates.data) return;
      const std::int64_t H = gates.shape[1];
      for (std::size_t i = 0; i < rows.size(); ++i)
        std::copy(g.begin() + static_cast<std::ptrdiff_t>(i) * H, g.begin() + static_cast<std::ptrdiff_t>(i + 1) * H, gates.ptr(rows[i]));
    }
  };

  ConstView2<float> gate_w() const { return ConstView2<float>(gate_w_.data(), {proj_.heads(), proj_.head_dim()}); }
  std::span<const float> gate_b() const { return std::span<const float>(gate_b_.data(), gate_b_.size()); }

  // Layer mode: "gates" (each pass replaces the last); stack mode: the last pass's are "gates",
  // the earlier looping passes' "gates_pass{p}".
  std::string gates_name(int pass) const {
    return s_.mode == LoopMode::layer || pass + 1 == passes_ ? "gates" : "gates_pass" + std::to_string(pass);
  }
  void record(const StepContext& ctx, ConstView2<float> g, const std::string& name) const {
    if (ctx.trace) ctx.trace->record(name, layer_, ctx.pos0, g);
  }

  static ConstView2<float> row0(ConstView3<float> x) { return ConstView2<float>(x.data, {x.shape[1], x.shape[2]}, {x.stride[1], 1}); }
  static View2<float> row0(View3<float> x) { return View2<float>(x.data, {x.shape[1], x.shape[2]}, {x.stride[1], 1}); }

  // Stack mode, pass >= 1: global over pass 0's cache g (already holding this step), local over
  // the ring r of this pass plus the step's own keys.
  // int8 caches: decode reads the int8 rows (loop_attention_decode's QuantView3 overload), and so
  // does a chunk of several queries (the flash kernel widens them as it packs its key tiles),
  // beside a stack-mode chunk's window staged in f32 from the ring (window_keys: W - 1 + T rows).
  template <class C>
  static constexpr bool is_full_v =
      std::is_same_v<C, KVCache<float>> || std::is_same_v<C, KVCache<bf16>> || std::is_same_v<C, KVCache<std::int8_t>>;
  template <class C>
  static constexpr bool is_ring_v = std::is_same_v<C, RingKVCache<float>> || std::is_same_v<C, RingKVCache<bf16>> ||
                                    std::is_same_v<C, RingKVCache<std::int8_t>>;

  template <class G, class R>
  void looping_pass(G& g, R& r, const QKV& qkv, View3<float> a, View2<float> gv, const StepContext& ctx) const {
    if constexpr (!is_full_v<G>) {
      throw Error("LoopAttention: the global cache is not a full cache");
    } else if constexpr (!is_ring_v<R>) {
      throw Error("LoopAttention: the local cache is not a ring buffer");
    } else if constexpr (!std::is_same_v<decltype(g.keys()), decltype(r.keys())>) {
      throw Error("LoopAttention: global and local caches differ in storage type");
    } else {
      using KV = std::remove_const_t<typename decltype(g.keys())::element_type>;
      const std::int64_t T = qkv.q.shape[0];
      if (T == 1) {
        r.append(qkv.k, qkv.v);  // the ring now holds exactly the window of the new token
        DecodeOptions o;
        o.num_threads = ctx.num_threads;
        loop_attention_decode<KV>(row0(ConstView3<float>(qkv.q)), g.keys(), g.values(), r.keys(), r.values(), gate_w(),
                                  gate_b(), row0(a), o, std::span<float>(gv.data, static_cast<std::size_t>(gv.shape[1])));
        return;
      }
      ring_chunk(qkv.q, qkv.k, qkv.v, detail::flash::KVRows<KV>(g.keys()), detail::flash::KVRows<KV>(g.values()), r, a,
                 gv, ctx.pos0, ctx.num_threads);
    }
  }

  // Stack mode, pass >= 1, several tokens at pos0: global over (gk, gv), the cache's rows read in
  // place (a contiguous cache or a sequence's pages; int8 widened as the key tiles are packed),
  // local over the ring's last W - 1 positions followed by the chunk's own keys (window_keys'
  // copy: int8 dequantised); then the chunk joins the ring.
  template <class G, class R>
  void ring_chunk(ConstView3<float> q, ConstView3<float> k, ConstView3<float> v, const detail::flash::KVRows<G>& gk,
                  const detail::flash::KVRows<G>& gv, R& ring, View3<float> a, View2<float> gates, std::int64_t pos0,
                  int threads) const {
    const auto w = window_keys(ring, k, v);
    using S = std::remove_const_t<typename decltype(w.k)::element_type>;
    LoopOptions o;
    o.num_threads = threads;
    o.q_offset = pos0;
    o.local_offset = w.pos0;
    detail::loop_attention_arch<simd::default_arch, G, S>(q, gk, gv, w.k, w.v, gate_w(), gate_b(), s_.window, a, o, gates);
    ring.append(k, v);
  }

  // Layer mode: append to the full cache, then global and local over it (fused).
  template <class G>
  void single_pass(G& g, const QKV& qkv, View3<float> a, View2<float> gv, const StepContext& ctx) const {
    if constexpr (!is_full_v<G>) {
      throw Error("LoopAttention: the layer's cache is not a full cache");
    } else {
      using KV = std::remove_const_t<typename decltype(g.keys())::element_type>;
      g.append(qkv.k, qkv.v);
      const std::int64_t n = g.size();
      if (qkv.q.shape[0] == 1) {
        const std::int64_t w = std::min(s_.window, n);
        DecodeOptions o;
        o.num_threads = ctx.num_threads;
        loop_attention_decode<KV>(row0(ConstView3<float>(qkv.q)), g.keys(), g.values(), g.keys().slice(0, n - w, n),
                                  g.values().slice(0, n - w, n), gate_w(), gate_b(), row0(a), o,
                                  std::span<float>(gv.data, static_cast<std::size_t>(gv.shape[1])));
        return;
      }
      LoopOptions o;
      o.num_threads = ctx.num_threads;
      o.q_offset = ctx.pos0;
      if constexpr (std::is_same_v<KV, std::int8_t>) {  // the int8 rows in place, the same views: the fused path
        loop_attention(qkv.q, g.keys(), g.values(), g.keys(), g.values(), gate_w(), gate_b(), s_.window, a, o, gv);
      } else {
        loop_attention<KV>(qkv.q, g.keys(), g.values(), g.keys(), g.values(), gate_w(), gate_b(), s_.window, a, o, gv);
      }
    }
  }

  int layer_;
  LoopSettings s_;
  int passes_;
  QKVProjection proj_;
  PackedLinear o_;
  std::vector<float> gate_w_, gate_b_;
};

}  // namespace attnkit::model
