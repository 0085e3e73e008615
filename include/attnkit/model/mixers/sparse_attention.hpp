// attnkit/model/mixers/sparse_attention.hpp — DeepSeek-style sparse attention (DSA, spec §8) on
// a Qwen3 attention layer, as a token mixer: layer types "sparse_attention" and
// "gated_sparse_attention" (with the Qwen3-Next / Qwen3.5 output gate).
//
//   x [T, D] (the layer's normalised input)
//     -> QKVProjection: q [T, H, d], k / v [T, H_kv, d] (q/k norms, RoPE), as Qwen3 attention
//     -> lightning indexer (one packed product [wq | wk | weights_proj] of x):
//          index_q[t, j] = (wq x_t)_j                        j = 1..H_I, d_I each
//          index_k[s]    = LayerNorm(wk x_s; k_norm.weight, k_norm.bias, eps 1e-6)   one key head
//          RoPE (rotate_half, the model's rope theta) on the FIRST index_rope_dim dims of every
//          index_q head and index_k, at the token's position (the other dims untouched)
//          index_w[t, j] = (weights_proj x_t)_j · H_I^-1/2 · d_I^-1/2
//          score[t, s]   = Σ_j index_w[t, j] · ReLU(index_q[t, j] · index_k[s])     s ≤ pos_t
//          S_t           = top-min(index_topk, pos_t + 1) positions by score (ties to the lower
//                          position; ascending)
//     -> softmax attention of every head (GQA) over the keys in S_t only (scale d^-1/2)
//     -> [σ(gate) ⊙] -> o_proj.
// Tensors under model.layers.{i}.self_attn.: q_proj, k_proj, v_proj, o_proj, q_norm, k_norm (as
// Qwen3 attention; q_proj [H·2d, D] when gated), indexer.wq.weight [H_I·d_I, D],
// indexer.wk.weight [d_I, D], indexer.k_norm.weight / indexer.k_norm.bias [d_I],
// indexer.weights_proj.weight [H_I, D]. Config fields: index_n_heads (H_I), index_head_dim (d_I),
// index_topk (k), index_rope_dim (default d_I; even, ≤ d_I).
// State per pass of the layer stack: the KV cache (f32, bf16 or int8, SessionOptions::kv_type; an
// int8 cache is read in place, in registers, by decode and prefill alike) and the index-key cache (d_I floats per token, f32). In a batch session the K/V (any cache type) live in the
// session's page pool and only the index keys are per sequence (forward_batch). Prefill, chunked prefill and decode run the same
// indexer and attention over the cached keys, so they agree. A trace records "topk_indices"
// [layers, tokens, index_topk]: each query's selected positions (as floats, ascending, -1
// padding) of the last pass.
#pragma once

#include <algorithm>
#include <cmath>
#include <memory>
#include <string>
#include <vector>

#include "attnkit/model/mixer.hpp"
#include "attnkit/model/mixers/attention.hpp"
#include "attnkit/model/parts/cached_attention.hpp"
#include "attnkit/model/parts/paged_attention.hpp"
#include "attnkit/model/parts/qkv_projection.hpp"
#include "attnkit/model/trace.hpp"
#include "attnkit/sparse/indexer.hpp"
#include "attnkit/sparse/sparse_attention.hpp"

namespace attnkit::model {

// The indexer's config fields (spec §8.1; LT2 uses DeepSeek's names).
struct SparseIndexerSettings {
  std::int64_t heads = 0, head_dim = 0, topk = 0, rope_dim = 0;
  double norm_eps = 1e-6;  // the index key's LayerNorm (DeepSeek's fixed value)
};

// Reads (and consumes) index_n_heads, index_head_dim, index_topk (all required) and
// index_rope_dim (default index_head_dim).
inline SparseIndexerSettings read_sparse_indexer_settings(io::ConfigFields& f) {
  SparseIndexerSettings s;
  for (const char* key : {"index_n_heads", "index_head_dim", "index_topk"})
    if (!f.has(key)) f.fail(key, "missing: sparse attention layers need index_n_heads, index_head_dim and index_topk");
  s.heads = f.integer("index_n_heads", 0);
  s.head_dim = f.integer("index_head_dim", 0);
  s.topk = f.integer("index_topk", 0);
  if (s.heads < 1) f.fail("index_n_heads", "must be at least 1, got ", s.heads);
  if (s.head_dim < 1) f.fail("index_head_dim", "must be at least 1, got ", s.head_dim);
  if (s.topk < 1) f.fail("index_topk", "must be at least 1, got ", s.topk);
  if (s.topk > (std::int64_t{1} << 30)) f.fail("index_topk", "implausibly large (", s.topk, ")");
  s.rope_dim = f.integer("index_rope_dim", s.head_dim);
  if (s.rope_dim < 0 || s.rope_dim > s.head_dim || s.rope_dim % 2 != 0)
    f.fail("index_rope_dim", "must be even and in [0, index_head_dim = ", s.head_dim, "], got ", s.rope_dim);
  return s;
}

class SparseAttention final : public TokenMixer {
 public:
  SparseAttention(const BuildContext& ctx, int layer, const SparseIndexerSettings& s, QKVProjection::Options po = {})
      : s_(s), passes_(ctx.passes), layer_(layer) {
    ATTNKIT_REQUIRE(s.heads >= 1 && s.head_dim >= 1 && s.topk >= 1 && s.rope_dim >= 0 && s.rope_dim <= s.head_dim &&
                        s.rope_dim % 2 == 0,
                    "SparseAttention: layer ", layer, ": invalid indexer settings (", s.heads, " heads of ", s.head_dim,
                    ", top-", s.topk, ", rope dim ", s.rope_dim, ")");
    if (po.prefix.empty()) po.prefix = ctx.prefix(layer) + "self_attn.";
    proj_ = QKVProjection(ctx, po);
    const std::int64_t D = ctx.config.hidden_size;
    o_ = pack_linear(ctx.source.get(po.prefix + "o_proj.weight", {D, proj_.heads() * proj_.head_dim()}));
    const std::string ip = po.prefix + "indexer.";
    HostTensor wq = ctx.source.get(ip + "wq.weight", {s.heads * s.head_dim, D});
    HostTensor wk = ctx.source.get(ip + "wk.weight", {s.head_dim, D});
    HostTensor ww = ctx.source.get(ip + "weights_proj.weight", {s.heads, D});
    ATTNKIT_REQUIRE(wq.type == wk.type && wq.type == ww.type, "SparseAttention: layer ", layer, ": ", ip,
                    "wq / wk / weights_proj differ in storage type");
    index_proj_ = pack_fused({&wq, &wk, &ww});
    k_norm_w_ = ctx.source.get(ip + "k_norm.weight", {s.head_dim}).to_f32();
    k_norm_b_ = ctx.source.get(ip + "k_norm.bias", {s.head_dim}).to_f32();
    if (s.rope_dim > 0) index_rope_ = std::make_shared<const ops::Rope>(s.rope_dim, ctx.config.rope_theta);
    w_scale_ = static_cast<float>(1.0 / std::sqrt(static_cast<double>(s.heads) * static_cast<double>(s.head_dim)));
  }

  std::string kind() const override { return "sparse_attention"; }
  std::string describe() const override {
    std::string d = "sparse_attention (indexer ";
    d += std::to_string(s_.heads);
    d += " heads of ";
    d += std::to_string(s_.head_dim);
    d += ", rope ";
    d += std::to_string(s_.rope_dim);
    d += ", top-";
    d += std::to_string(s_.topk);
    d += ")";
    d += proj_.describe();
    return d;
  }
  const SparseIndexerSettings& settings() const { return s_; }
  std::size_t weight_bytes() const override {
    return proj_.weight_bytes() + o_.bytes() + index_proj_.bytes() + (k_norm_w_.size() + k_norm_b_.size()) * sizeof(float);
  }

  std::unique_ptr<MixerState> new_state(const SessionOptions& opt) const override {
    if (opt.reserve_tokens > 0)
      require_memory(mul_bytes(passes_, opt.reserve_tokens, s_.head_dim, sizeof(float)),
                     "SparseAttention: index-key cache of " + std::to_string(passes_) + " passes x " +
                         std::to_string(opt.reserve_tokens) + " tokens x " + std::to_string(s_.head_dim) + " floats");
    auto st = std::make_unique<State>();
    for (int p = 0; p < passes_; ++p) {
      st->passes.push_back({AttentionCache(proj_.kv_heads(), proj_.head_dim(), proj_.head_dim(), 0, opt), {}});
      if (opt.reserve_tokens > 0) st->passes.back().index_k.reserve(static_cast<std::size_t>(opt.reserve_tokens * s_.head_dim));
    }
    return st;
  }

  // Batch sessions: every pass's K/V (f32, bf16 or int8) in the session's page pool, the index
  // keys (d_I floats per token and pass) in a state per sequence. The projections run once over the step's rows; the indexer and its top-k per
  // sequence (each against its own index keys); the attention over the selected rows of every
  // sequence in one paged call for the decoding ones and one for the rest.
  PagedLayout paged_layout(const SessionOptions&) const override {
    return {proj_.kv_heads() * passes_, proj_.head_dim()};
  }
  std::unique_ptr<MixerState> new_paged_state(const SessionOptions&) const override {
    auto st = std::make_unique<IndexKeys>();
    st->passes.resize(static_cast<std::size_t>(passes_));
    return st;
  }
  std::uint64_t paged_state_bytes(std::int64_t positions, const SessionOptions&) const override {
    return mul_bytes(passes_, positions, s_.head_dim, sizeof(float));
  }
  void forward_batch(ConstView2<float> x, View2<float> out, const BatchStep& step, const StepContext& ctx) const override {
    if (step.kv_head0 < 0) return TokenMixer::forward_batch(x, out, step, ctx);
    const std::int64_t N = x.shape[0], H = proj_.heads(), d = proj_.head_dim();
    std::int64_t K = 1;
    for (std::int64_t b = 0; b < step.batch(); ++b) K = std::max(K, std::min(s_.topk, step.pos0[b] + step.tokens(b)));
    std::vector<float> ib(static_cast<std::size_t>(N * index_width()));
    index_proj_.forward(x, View2<float>(ib.data(), {N, index_width()}), {ctx.precision, ctx.num_threads, false});
    std::vector<std::int32_t> idx(static_cast<std::size_t>(N * K));
    for (std::int64_t b = 0; b < step.batch(); ++b) {
      const std::int64_t r0 = step.cu_seqlens[b], n = step.tokens(b);
      if (n == 0) continue;
      auto* st = dynamic_cast<IndexKeys*>(step.states[b]);
      ATTNKIT_REQUIRE(st != nullptr, "SparseAttention::forward_batch: sequence ", b, " has no index-key state");
      auto& index_k = st->passes.at(static_cast<std::size_t>(ctx.pass));
      ATTNKIT_REQUIRE(static_cast<std::int64_t>(index_k.size()) == step.pos0[b] * s_.head_dim,
                      "SparseAttention::forward_batch: sequence ", b, " at position ", step.pos0[b], " but its index keys hold ",
                      index_k.size() / static_cast<std::size_t>(s_.head_dim), " tokens");
      select(ib.data() + r0 * index_width(), n, step.pos0[b], step.rope.empty() ? nullptr : &step.rope[b], index_k,
             View2<std::int32_t>(idx.data() + r0 * K, {n, K}), ctx);
    }
    QKV qkv;
    proj_.forward_batch(x, qkv, step, ctx);
    std::vector<float> attn(static_cast<std::size_t>(N * H * d));
    attend_paged(qkv.q, qkv.k, qkv.v, View3<float>(attn.data(), {N, H, d}), step,
                 step.kv_head0 + ctx.pass * proj_.kv_heads(), SelectedPaged{idx, K, ctx});
    if (proj_.output_gate()) apply_output_gate(qkv.gate, attn.data(), layer_, ctx);
    o_.forward(View2<float>(attn.data(), {N, H * d}), out, {ctx.precision, ctx.num_threads, false});
    record_topk(ctx, idx, N, K);
  }

  void forward(ConstView2<float> x, View2<float> out, MixerState& state, const StepContext& ctx) const override {
    auto* st = dynamic_cast<State*>(&state);
    ATTNKIT_REQUIRE(st != nullptr, "SparseAttention::forward: argument 'state': not created by this mixer");
    ATTNKIT_REQUIRE(ctx.pass >= 0 && ctx.pass < static_cast<int>(st->passes.size()), "SparseAttention::forward: pass ",
                    ctx.pass, " but the model was built for ", st->passes.size(), " passes");
    State::Pass& ps = st->passes[static_cast<std::size_t>(ctx.pass)];
    ATTNKIT_REQUIRE(ps.cache.position() == ctx.pos0, "SparseAttention::forward: step starts at position ", ctx.pos0,
                    " but the cache has seen ", ps.cache.position(), " tokens");
    const std::int64_t T = x.shape[0], H = proj_.heads(), d = proj_.head_dim();
    const std::int64_t Tk = ctx.pos0 + T;

    // The lightning indexer: q, k, w of this step's tokens; k appended to the index-key cache.
    const std::int64_t K = std::min(s_.topk, Tk);  // columns the kernels see (the trace pads to topk)
    std::vector<float> ib(static_cast<std::size_t>(T * index_width()));
    index_proj_.forward(x, View2<float>(ib.data(), {T, index_width()}), {ctx.precision, ctx.num_threads, false});
    std::vector<std::int32_t> idx(static_cast<std::size_t>(T * K));
    select(ib.data(), T, ctx.pos0, ctx.rope, ps.index_k, View2<std::int32_t>(idx.data(), {T, K}), ctx);

    // Main attention over the selected keys of the cache.
    QKV qkv;
    proj_.forward(x, qkv, ctx);
    std::vector<float> attn(static_cast<std::size_t>(T * H * d));
    const View3<float> av(attn.data(), {T, H, d});
    SparseAttentionOptions so;
    so.q_offset = ctx.pos0;
    so.num_threads = ctx.num_threads;
    so.precision = ctx.precision;  // int8 caches: fast scores on VNNI, 8-bit probabilities in prefill
    ps.cache.visit([&](auto& cache) {
      if constexpr (requires { cache.total(); }) {
        detail::throw_error("SparseAttention::forward: the cache is a ring buffer (sparse attention keeps every key)");
      } else {
        using KV = std::remove_const_t<typename decltype(cache.keys())::element_type>;
        cache.append(qkv.k, qkv.v);
        const auto run = [&](auto keys, auto values) {
          using S = std::remove_const_t<typename decltype(keys)::element_type>;
          if (T == 1) {
            sparse_attention_decode<S>(ConstView2<float>(qkv.q.data, {H, d}, {qkv.q.stride[1], 1}), keys, values,
                                       ConstView1<std::int32_t>(idx.data(), {K}), View2<float>(attn.data(), {H, d}), so);
          } else {
            sparse_attention_prefill<S>(ConstView3<float>(qkv.q), keys, values,
                                        ConstView2<std::int32_t>(idx.data(), {T, K}), av, so);
          }
        };
        if constexpr (std::is_same_v<KV, std::int8_t>) {
          // int8: decode reads only the selected rows, prefill the codes in place (both in registers)
          if (T == 1) {
            sparse_attention_decode(ConstView2<float>(qkv.q.data, {H, d}, {qkv.q.stride[1], 1}), cache.keys(),
                                    cache.values(), ConstView1<std::int32_t>(idx.data(), {K}),
                                    View2<float>(attn.data(), {H, d}), so);
          } else {
            sparse_attention_prefill(ConstView3<float>(qkv.q), cache.keys(), cache.values(),
                                     ConstView2<std::int32_t>(idx.data(), {T, K}), av, so);
          }
        } else {
          run(cache.keys(), cache.values());
        }
      }
    });
    if (proj_.output_gate()) apply_output_gate(qkv.gate, attn.data(), layer_, ctx);
    o_.forward(View2<float>(attn.data(), {T, H * d}), out, {ctx.precision, ctx.num_threads, false});

    record_topk(ctx, idx, T, K);
  }

 private:
  // A trace's "topk_indices" [layers, tokens, topk]: each row's selection idx [T, K] (K <= topk,
  // padded with -1 like the selection itself), as float.
  void record_topk(const StepContext& ctx, const std::vector<std::int32_t>& idx, std::int64_t T, std::int64_t K) const {
    if (!ctx.trace) return;
    const std::int64_t k = s_.topk;
    std::vector<float> rows(static_cast<std::size_t>(T * k), -1.f);
    for (std::int64_t t = 0; t < T; ++t)
      for (std::int64_t i = 0; i < K; ++i)
        rows[static_cast<std::size_t>(t * k + i)] = static_cast<float>(idx[static_cast<std::size_t>(t * K + i)]);
    ctx.trace->describe("topk_indices", {"layer", "token", "selected key"});
    ctx.trace->record("topk_indices", layer_, ctx.pos0, ConstView2<float>(rows.data(), {T, k}));
  }

  struct State final : MixerState {
    struct Pass {
      AttentionCache cache;
      std::vector<float> index_k;  // [tokens, d_I]: LayerNorm'd, RoPE'd index keys
    };
    std::vector<Pass> passes;  // one per pass
    std::unique_ptr<MixerState> clone(const std::string&) const override { return std::make_unique<State>(*this); }
  };

  // A batch step's index-key caches, one per pass (the K/V live in the page pool).
  struct IndexKeys final : MixerState {
    std::vector<std::vector<float>> passes;  // [tokens, d_I] each
    std::unique_ptr<MixerState> clone(const std::string&) const override { return std::make_unique<IndexKeys>(*this); }
  };

  // The paged attention over each query's selection (idx [N, K]: the step's packed rows).
  struct SelectedPaged {
    const std::vector<std::int32_t>& idx;
    std::int64_t K;
    const StepContext& ctx;
    ConstView2<std::int32_t> rows_of(const std::vector<std::int64_t>& rows, std::vector<std::int32_t>& buf) const {
      buf.resize(rows.size() * static_cast<std::size_t>(K));
      for (std::size_t i = 0; i < rows.size(); ++i)
        std::copy_n(idx.data() + rows[i] * K, K, buf.data() + static_cast<std::int64_t>(i) * K);
      return ConstView2<std::int32_t>(buf.data(), {static_cast<std::int64_t>(rows.size()), K});
    }
    SparseAttentionOptions options() const {
      SparseAttentionOptions o;
      o.num_threads = ctx.num_threads;
      o.precision = ctx.precision;
      return o;
    }
    template <class KV>
    void decode(ConstView3<float> q, const PagedKV<KV>& pages, const PageTable& table, View3<float> out,
                const std::vector<std::int64_t>& rows) const {
      std::vector<std::int32_t> buf;
      sparse_attention_decode_paged<KV>(q, pages, table, rows_of(rows, buf), out, options());
    }
    template <class KV>
    void prefill(ConstView3<float> q, const PagedKV<KV>& pages, const PageTable& table, std::span<const std::int64_t> cu,
                 View3<float> out, const std::vector<std::int64_t>& rows) const {
      std::vector<std::int32_t> buf;
      sparse_attention_prefill_paged<KV>(q, pages, table, cu, rows_of(rows, buf), out, options());
    }
  };

  // Columns of the packed indexer product: [index_q (H_I·d_I) | index_k (d_I) | weights (H_I)].
  std::int64_t index_width() const { return s_.heads * s_.head_dim + s_.head_dim + s_.heads; }

  // The indexer for T tokens at positions pos0 .. whose packed indexer products are the rows
  // ib [T, index_width()] (overwritten: RoPE is applied in place): their index keys are appended
  // to index_k (which holds pos0 tokens), and each query's top-min(topk, visible) positions go
  // to idx [T, K] (-1 padded). rope: the model's angles of these positions, shared when their
  // dimension is index_rope_dim (else computed).
  void select(float* ib, std::int64_t T, std::int64_t pos0, const ops::Rope::Angles* rope, std::vector<float>& index_k,
              View2<std::int32_t> idx, const StepContext& ctx) const {
    const std::int64_t HI = s_.heads, dI = s_.head_dim, W = index_width(), Tk = pos0 + T;
    const View3<float> iq(ib, {T, HI, dI}, {W, dI, 1});
    require_memory(mul_bytes(Tk, dI, sizeof(float)), "SparseAttention: index-key cache of " + std::to_string(Tk) +
                                                         " tokens x " + std::to_string(dI) + " floats");
    index_k.resize(static_cast<std::size_t>(Tk * dI));
    float* knew = index_k.data() + pos0 * dI;
    std::vector<float> iw(static_cast<std::size_t>(T * HI));
    for (std::int64_t t = 0; t < T; ++t) {
      const float* row = ib + t * W;
      layer_norm(row + HI * dI, knew + t * dI);
      for (std::int64_t j = 0; j < HI; ++j) iw[static_cast<std::size_t>(t * HI + j)] = row[HI * dI + dI + j] * w_scale_;
    }
    if (index_rope_) {
      const std::int64_t r = s_.rope_dim;
      const bool shared = rope && rope->half * 2 == r && rope->tokens == T && rope->pos0 == pos0;
      const ops::Rope::Angles own = shared ? ops::Rope::Angles{} : index_rope_->angles(pos0, T);
      const ops::Rope::Angles& ang = shared ? *rope : own;
      index_rope_->apply(View3<float>(iq.data, {T, HI, r}, iq.stride), ang, ctx.num_threads);
      index_rope_->apply(View3<float>(knew, {T, 1, r}, {dI, dI, 1}), ang, ctx.num_threads);
    }
    IndexerOptions io;
    io.q_offset = pos0;
    io.num_threads = ctx.num_threads;
    io.precision = ctx.precision;  // fast: int8 index vectors (as DeepSeek's FP8 indexer)
    indexer_topk(ConstView3<float>(iq), ConstView2<float>(index_k.data(), {Tk, dI}), ConstView2<float>(iw.data(), {T, HI}),
                 idx, io);
  }

  // y = (x - mean) / sqrt(var + eps) · w + b over d_I values (biased variance, double sums).
  void layer_norm(const float* x, float* y) const {
    const std::int64_t n = s_.head_dim;
    double mean = 0;
    for (std::int64_t i = 0; i < n; ++i) mean += x[i];
    mean /= static_cast<double>(n);
    double var = 0;
    for (std::int64_t i = 0; i < n; ++i) var += (x[i] - mean) * (x[i] - mean);
    var /= static_cast<double>(n);
    const double inv = 1.0 / std::sqrt(var + s_.norm_eps);
    for (std::int64_t i = 0; i < n; ++i)
      y[i] = static_cast<float>((x[i] - mean) * inv) * k_norm_w_[static_cast<std::size_t>(i)] +
             k_norm_b_[static_cast<std::size_t>(i)];
  }

  SparseIndexerSettings s_;
  int passes_;
  int layer_;
  QKVProjection proj_;
  PackedLinear o_, index_proj_;
  std::vector<float> k_norm_w_, k_norm_b_;
  std::shared_ptr<const ops::Rope> index_rope_;
  float w_scale_ = 1.f;
};

// Registers "sparse_attention" and "gated_sparse_attention" (indexer settings from the config's
// index_* fields).
inline void register_sparse_attention(MixerRegistry& r) {
  r.add("sparse_attention", [](const BuildContext& c, int layer) {
    return std::make_unique<SparseAttention>(c, layer, read_sparse_indexer_settings(c.fields));
  });
  r.add("gated_sparse_attention", [](const BuildContext& c, int layer) {
    QKVProjection::Options po;
    po.output_gate = true;
    return std::make_unique<SparseAttention>(c, layer, read_sparse_indexer_settings(c.fields), po);
  });
}

}  // namespace attnkit::model
