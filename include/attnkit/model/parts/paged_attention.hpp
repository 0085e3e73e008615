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
template <class KV, class Att>
void attend(const MutablePagedKV<KV>& pool, ConstView3<float> q, ConstView3<float> k, ConstView3<float> v,
            View3<float> out, const BatchStep& step, std::int64_t head0, const Att& att) {
  const std::int64_t Hkv = k.shape[1];
  const MutablePagedKV<KV> mine = kv_head_range(pool, head0, head0 + Hkv);
  paged_append(mine, step.table, step.cu_seqlens, k, v);
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

// Causal softmax attention (Qwen3 full attention), with a variant of the kernels' (Tuneable
// attention's query metric). Policies with a row per query (OutputScale) would need the step's
// rows of each sub-batch: not taken here.
template <class Var = PlainAttention>
struct CausalPaged {
  static_assert(!Var::has_output, "CausalPaged: an output scale per query row is not routed through sub-batches");
  const StepContext& ctx;
  Var var = {};
  template <class KV>
  void decode(ConstView3<float> q, const PagedKV<KV>& pages, const PageTable& table, View3<float> out,
              const std::vector<std::int64_t>&) const {
    DecodeOptions o;
    o.num_threads = ctx.num_threads;
    o.precision = ctx.precision;  // int8 pages: fast scores the codes on VNNI
    attention_decode_paged<KV>(q, pages, table, out, o, {}, 0, var);
  }
  template <class KV>
  void prefill(ConstView3<float> q, const PagedKV<KV>& pages, const PageTable& table, std::span<const std::int64_t> cu,
               View3<float> out, const std::vector<std::int64_t>&) const {
    AttentionOptions o;
    o.num_threads = ctx.num_threads;
    o.precision = ctx.precision;
    attention_prefill_paged<KV>(q, pages, table, cu, out, CausalMask{}, o, {}, var);
  }
};

}  // namespace detail_paged_attention

// See the top of the file. out [N, H, d_v] is overwritten.
// att: the attention the queries run over their pages (a policy with decode() and prefill() as
// described in detail_paged_attention::attend, for f32, bf16 and int8 pages; the default is
// causal softmax attention).
template <class Att>
void attend_paged(ConstView3<float> q, ConstView3<float> k, ConstView3<float> v, View3<float> out,
                  const BatchStep& step, std::int64_t head0, const Att& att) {
  ATTNKIT_REQUIRE(head0 >= 0, "attend_paged: the step gives this mixer no heads of the page pool");
  if (step.pages_bf16.k.data) return detail_paged_attention::attend(step.pages_bf16, q, k, v, out, step, head0, att);
  if (step.pages_int8.k.data) return detail_paged_attention::attend(step.pages_int8, q, k, v, out, step, head0, att);
  ATTNKIT_REQUIRE(step.pages_f32.k.data != nullptr, "attend_paged: the step has no page pool");
  detail_paged_attention::attend(step.pages_f32, q, k, v, out, step, head0, att);
}
inline void attend_paged(ConstView3<float> q, ConstView3<float> k, ConstView3<float> v, View3<float> out,
                         const BatchStep& step, std::int64_t head0, const StepContext& ctx) {
  attend_paged(q, k, v, out, step, head0, detail_paged_attention::CausalPaged<>{ctx});
}

// A softmax-attention mixer's batch step over the pool (Qwen3 and Tuneable attention): q/k/v of
// the step's tokens (proj), append then attend over this pass's heads of the pages (att), then
// after_attention(qkv, attn) (Qwen3's output gate; nothing elsewhere) and the output projection o.
template <class Att, class After>
void paged_attention_step(const QKVProjection& proj, const PackedLinear& o, ConstView2<float> x, View2<float> out,
                          const BatchStep& step, const StepContext& ctx, const Att& att, const After& after_attention) {
  const std::int64_t N = x.shape[0], H = proj.heads(), d = proj.head_dim();
  QKV qkv;
  proj.forward_batch(x, qkv, step, ctx);
  std::vector<float> own;
  float* attn = scratch(ctx.workspace, ScratchSlot::attention, static_cast<std::size_t>(N * H * d), own);
  {
    ATTNKIT_STAGE("attn.kernel");  // with the step's appends to its pages
    attend_paged(qkv.q, qkv.k, qkv.v, View3<float>(attn, {N, H, d}), step, step.kv_head0 + ctx.pass * proj.kv_heads(), att);
  }
  after_attention(qkv, attn);
  ATTNKIT_STAGE("attn.o_proj");
  o.forward(View2<float>(attn, {N, H * d}), out, {ctx.precision, ctx.num_threads, false});
}

}  // namespace attnkit::model
