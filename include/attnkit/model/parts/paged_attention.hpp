// attnkit/model/parts/paged_attention.hpp — "append, then attend" for a batch step over the
// batch session's page pool: the paged counterpart of AttentionCache::attend, as a part every
// softmax-attention mixer with a paged layout reuses.
//
// attend_paged(q, k, v, out, step, head0, ctx | att): q [N, H, d], k/v [N, H_kv, d] hold the step's
// packed new tokens (BatchStep::cu_seqlens); k/v are written into the pool's heads
// [head0, head0 + H_kv) at each sequence's positions pos0[b] ..; then the queries attend
// causally over their sequence's cached keys. Sequences with one new token (decode) go to the
// batched decode kernel together (each K/V row read once for every query head that shares it,
// bit-identical to attention_decode on a contiguous cache); sequences with several (a prompt, a
// chunk of one) go to the paged prefill kernel together. A mixed step (continuous batching)
// runs both, each over its own sub-table. Other softmax mixers pass their own kernels as a
// policy (Loop Attention's gated blend, sparse attention's selections) and reuse the rest.
#pragma once

#include <cstdint>
#include <span>
#include <vector>

#include "attnkit/attention/batched_decode.hpp"
#include "attnkit/attention/paged_kv.hpp"
#include "attnkit/model/mixer.hpp"
#include "attnkit/model/parts/qkv_projection.hpp"

namespace attnkit::model {

namespace detail_paged_attention {

// Heads [head0, head0 + n * slots) of the pool as n KV heads of `slots` adjacent slots each, for a
// mixer whose keys are wider than the pool's head_dim d (Tuneable's unfolded form: r-wide keys in
// ceil(r / d) slots). In PagePool's [H, P, d] pages a group's slots are one contiguous block per
// page: K reads it as P rows of slots * d (their first dk entries). V [dv <= d] and the int8
// scales keep the group's first slot, in the pool's own layout.
template <class KV>
MutablePagedKV<KV> head_slots(const MutablePagedKV<KV>& pool, std::int64_t head0, std::int64_t n, std::int64_t slots,
                              std::int64_t dk, std::int64_t dv) {
  const auto& k = pool.k;
  const std::int64_t P = k.shape[1], d = k.shape[3], w = slots * d;
  ATTNKIT_REQUIRE(slots >= 1 && head0 >= 0 && head0 + n * slots <= k.shape[2], "attend_paged: heads [", head0, ", ",
                  head0 + n * slots, ") are not within the pool's ", k.shape[2], " KV heads");
  ATTNKIT_REQUIRE(dk <= w && dv <= pool.v.shape[3], "attend_paged: keys ", dk, " and values ", dv, " wide do not fit ",
                  slots, " slots of ", d);
  ATTNKIT_REQUIRE(k.stride[3] == 1 && k.stride[1] == d && k.stride[2] == P * d, "attend_paged: keys ", dk, " wide need ",
                  slots, " pool slots per head, read as one block: the pool's pages must be [H, P, d] (PagePool's)");
  const auto& v = pool.v;
  MutablePagedKV<KV> r{View4<KV>(k.data + head0 * k.stride[2], {k.shape[0], P, n, dk}, {k.stride[0], w, k.stride[2] * slots, 1}),
                       View4<KV>(v.data + head0 * v.stride[2], {v.shape[0], P, n, dv}, {v.stride[0], v.stride[1], v.stride[2] * slots, 1})};
  if (pool.k_scale.data)
    for (auto [from, to] : {std::pair{&pool.k_scale, &r.k_scale}, std::pair{&pool.v_scale, &r.v_scale}})
      *to = View3<float>(from->data + head0 * from->stride[2], {from->shape[0], P, n},
                         {from->stride[0], from->stride[1], from->stride[2] * slots});
  return r;
}

// The page tables, lengths and query rows of the sequences in `pick` (indices into the step).
struct SubBatch {
  std::vector<std::int64_t> indptr{0}, lengths, cu{0}, rows;  // rows: packed query rows, in order
  std::vector<std::int32_t> indices;
  PageTable table() const { return {indptr, indices, lengths}; }
};

inline SubBatch subset(const BatchStep& step, const std::vector<std::int64_t>& pick) {
  SubBatch s;
  for (std::int64_t b : pick) {
    const PageTable& t = step.table;
    s.indices.insert(s.indices.end(), t.indices.begin() + t.indptr[b], t.indices.begin() + t.indptr[b + 1]);
    s.indptr.push_back(static_cast<std::int64_t>(s.indices.size()));
    s.lengths.push_back(step.pos0[b] + step.tokens(b));
    for (std::int64_t r = step.cu_seqlens[b]; r < step.cu_seqlens[b + 1]; ++r) s.rows.push_back(r);
    s.cu.push_back(static_cast<std::int64_t>(s.rows.size()));
  }
  return s;
}

// Rows `rows` of x [N, a, c] gathered into buf as [rows, a, c].
inline View3<float> gather(ConstView3<float> x, const std::vector<std::int64_t>& rows, std::vector<float>& buf) {
  const std::int64_t n = static_cast<std::int64_t>(rows.size()), a = x.shape[1], c = x.shape[2];
  buf.resize(static_cast<std::size_t>(n * a * c));
  for (std::int64_t i = 0; i < n; ++i)
    for (std::int64_t h = 0; h < a; ++h) std::copy(x.ptr(rows[i], h), x.ptr(rows[i], h) + c, buf.data() + (i * a + h) * c);
  return View3<float>(buf.data(), {n, a, c});
}

// The skeleton every paged mixer shares: append the step's k/v into the pool's heads [head0,
// head0 + H_kv), then split the sequences into those decoding one token and those with several
// and hand each group, with its sub-table and its packed query rows, to the mixer's kernels:
//   att.decode(qs, pages, table, os, rows)       qs [n, H, d_k] -> os [n, H, d_v]
//   att.prefill(qs, pages, table, cu, os, rows)  the same, cu: the group's cu_seqlens
// rows: the step's packed row of each query (for per-row inputs such as sparse selections).
// att.ctx: the step's context (its threads also append the step's rows).
template <class KV, class Att>
void attend(const MutablePagedKV<KV>& pool, ConstView3<float> q, ConstView3<float> k, ConstView3<float> v,
            View3<float> out, const BatchStep& step, std::int64_t head0, const Att& att, std::int64_t slots) {
  const std::int64_t Hkv = k.shape[1];
  const MutablePagedKV<KV> mine = slots == 1 && k.shape[2] == pool.k.shape[3] && v.shape[2] == pool.v.shape[3]
                                      ? kv_head_range(pool, head0, head0 + Hkv)
                                      : head_slots(pool, head0, Hkv, slots, k.shape[2], v.shape[2]);
  {
    ATTNKIT_STAGE("attn.cache_append");
    paged_append(mine, step.table, step.cu_seqlens, k, v, att.ctx.num_threads);
  }
  std::vector<std::int64_t> decode, prefill;
  for (std::int64_t b = 0; b < step.batch(); ++b)
    if (step.tokens(b) > 0) (step.tokens(b) == 1 ? decode : prefill).push_back(b);
  const std::int64_t H = q.shape[1], dv = out.shape[2];
  std::vector<float> qb, ob;
  for (int part = 0; part < 2; ++part) {
    const auto& pick = part == 0 ? decode : prefill;
    if (pick.empty()) continue;
    const SubBatch sub = subset(step, pick);
    const bool all = static_cast<std::int64_t>(sub.rows.size()) == q.shape[0];  // the whole step: no copies
    const ConstView3<float> qs = all ? q : ConstView3<float>(gather(q, sub.rows, qb));
    ob.resize(all ? 0 : sub.rows.size() * static_cast<std::size_t>(H * dv));
    const View3<float> os = all ? out : View3<float>(ob.data(), {static_cast<std::int64_t>(sub.rows.size()), H, dv});
    const PagedKV<KV> pages = mine;
    if (part == 0) att.decode(qs, pages, sub.table(), os, sub.rows);
    else att.prefill(qs, pages, sub.table(), std::span<const std::int64_t>(sub.cu), os, sub.rows);
    if (!all)
      for (std::size_t i = 0; i < sub.rows.size(); ++i)
        for (std::int64_t h = 0; h < H; ++h)
          std::copy(os.ptr(static_cast<std::int64_t>(i), h), os.ptr(static_cast<std::int64_t>(i), h) + dv, out.ptr(sub.rows[i], h));
  }
}

// Causal softmax attention (Qwen3 full attention; window > 0: a sliding window of that many keys,
// the query's own included), with a variant of the kernels' (Tuneable attention's query metric).
// Policies with a row per query (OutputScale) would need the step's rows of each sub-batch: not
// taken here.
template <class Var = PlainAttention>
struct CausalPaged {
  static_assert(!Var::has_output, "CausalPaged: an output scale per query row is not routed through sub-batches");
  const StepContext& ctx;
  Var var = {};
  float scale = 0.f;  // 0: 1/sqrt(d_k); Tuneable's unfolded form keeps 1/sqrt(d) for r-wide keys
  std::int64_t window = 0;
  template <class KV>
  void decode(ConstView3<float> q, const PagedKV<KV>& pages, const PageTable& table, View3<float> out,
              const std::vector<std::int64_t>&) const {
    DecodeOptions o;
    o.num_threads = ctx.num_threads;
    o.precision = ctx.precision;  // int8 pages: fast scores the codes on VNNI
    o.scale = scale;
    attention_decode_paged<KV>(q, pages, table, out, o, {}, window, var);
  }
  template <class KV>
  void prefill(ConstView3<float> q, const PagedKV<KV>& pages, const PageTable& table, std::span<const std::int64_t> cu,
               View3<float> out, const std::vector<std::int64_t>&) const {
    AttentionOptions o;
    o.num_threads = ctx.num_threads;
    o.precision = ctx.precision;
    o.scale = scale;
    if (window > 0) attention_prefill_paged<KV>(q, pages, table, cu, out, SlidingWindowMask{window}, o, {}, var);
    else attention_prefill_paged<KV>(q, pages, table, cu, out, CausalMask{}, o, {}, var);
  }
};

}  // namespace detail_paged_attention

// See the top of the file. out [N, H, d_v] is overwritten.
// att: the attention the queries run over their pages (a policy with decode() and prefill() as
// described in detail_paged_attention::attend, for f32, bf16 and int8 pages; the default is
// causal softmax attention). slots: pool heads per KV head (keys wider than the pool's head_dim
// span several, detail_paged_attention::head_slots); head0 counts slots.
template <class Att>
void attend_paged(ConstView3<float> q, ConstView3<float> k, ConstView3<float> v, View3<float> out,
                  const BatchStep& step, std::int64_t head0, const Att& att, std::int64_t slots = 1) {
  ATTNKIT_REQUIRE(head0 >= 0, "attend_paged: the step gives this mixer no heads of the page pool");
  if (step.pages_bf16.k.data) return detail_paged_attention::attend(step.pages_bf16, q, k, v, out, step, head0, att, slots);
  if (step.pages_int8.k.data) return detail_paged_attention::attend(step.pages_int8, q, k, v, out, step, head0, att, slots);
  ATTNKIT_REQUIRE(step.pages_f32.k.data != nullptr, "attend_paged: the step has no page pool");
  detail_paged_attention::attend(step.pages_f32, q, k, v, out, step, head0, att, slots);
}
inline void attend_paged(ConstView3<float> q, ConstView3<float> k, ConstView3<float> v, View3<float> out,
                         const BatchStep& step, std::int64_t head0, const StepContext& ctx) {
  attend_paged(q, k, v, out, step, head0, detail_paged_attention::CausalPaged<>{ctx});
}

// The queries and keys a mixer attends with, and the pool slots each of its KV heads takes.
struct PagedQK {
  ConstView3<float> q, k;
  std::int64_t slots = 1;
};
// The projection's own q and k, one slot per KV head.
struct ProjectedQK {
  PagedQK operator()(const QKV& qkv) const { return {qkv.q, qkv.k, 1}; }
};

// A softmax-attention mixer's batch step over the pool (Qwen3 and Tuneable attention): q/k/v of
// the step's tokens (proj), the queries and keys to attend with (qk: the projection's, or
// Tuneable's unfolded q U and k U), append then attend over this pass's heads of the pages (att),
// then after_attention(qkv, attn) (Qwen3's output gate; nothing elsewhere) and the output
// projection o.
template <class Att, class After, class QK = ProjectedQK>
void paged_attention_step(const QKVProjection& proj, const PackedLinear& o, ConstView2<float> x, View2<float> out,
                          const BatchStep& step, const StepContext& ctx, const Att& att, const After& after_attention,
                          const QK& qk = {}) {
  const std::int64_t N = x.shape[0], H = proj.heads(), d = proj.head_dim();
  QKV qkv;
  proj.forward_batch(x, qkv, step, ctx);
  const PagedQK use = qk(qkv);
  std::vector<float> own;
  float* attn = scratch(ctx.workspace, ScratchSlot::attention, static_cast<std::size_t>(N * H * d), own);
  {
    ATTNKIT_STAGE("attn.kernel");  // with the step's appends to its pages
    attend_paged(use.q, use.k, qkv.v, View3<float>(attn, {N, H, d}), step,
                 step.kv_head0 + ctx.pass * proj.kv_heads() * use.slots, att, use.slots);
  }
  after_attention(qkv, attn);
  ATTNKIT_STAGE("attn.o_proj");
  o.forward(View2<float>(attn, {N, H * d}), out, {ctx.precision, ctx.num_threads, false});
}

}  // namespace attnkit::model
